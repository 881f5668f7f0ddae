"""Data parallelism for real: two gloo processes on this CPU (torchrun), against one process with
the same global batch; disjoint shards; resume under torchrun and across world sizes; FSDP2 with
sharded checkpoints and their consolidation; activation checkpointing's gradients."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sab_byon_omni.cli import main
from sab_byon_omni.config import ModelConfig, build_config
from sab_byon_omni.data.batching import iterate_batches, micro_steps_per_epoch
from sab_byon_omni.files.checkpoint import load_checkpoint
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training import memory as memory_mod
from sab_byon_omni.loss import causal_lm_loss
from sab_byon_omni.training.memory import apply_activation_checkpointing
from sab_byon_omni.training.launch import run_training
from tests.hostile import plant_metadata_payload, write_dcp

pytestmark = pytest.mark.integration  # whole runs, subprocesses: skip with -m "not integration"

# fp32 on CPU; two ranks sum gradients in another order than one process does, and AdamW's
# normalisation amplifies those last-bit differences a little over a few steps.
ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-5  # observed: 1.2e-7 (two ranks vs one; FSDP vs DDP) after 5 steps

RUN = dict(preset="tiny", num_samples=40, seq_len=64, epochs=1, gradient_accumulation_steps=2,
           learning_rate=3e-3, precision="fp32", device="cpu", progress=False, log_interval=1, seed=7)


# FSDP's meta-device build: a vocabulary of 101 rows splits 51 / 50 over two ranks
INIT = dict(batch_size=2, parallel="fsdp", vocab_size=101, checkpoint_dir="fsdp_init")


def flags(**kw):
    return [f"--{k}={v}" for k, v in kw.items()]


def torchrun(args, cwd, nproc=2, timeout=300, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))  # this checkout
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    return out


def weights(path):
    ck = torch.load(path, weights_only=True)
    return ck["model_state_dict"]


def assert_same_weights(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, global batch 4 (= 2 ranks x 2), the whole epoch; and a copy stopped at step 2."""
    d = tmp_path_factory.mktemp("single")
    cfg = build_config({**RUN, "batch_size": 4, "checkpoint_dir": str(d / "full")})
    run_training(cfg)
    return d


SCENARIOS = textwrap.dedent("""
    # Run by torchrun: every rank executes the same sequence of training runs.
    import sys
    from sab_byon_omni.config import build_config
    from sab_byon_omni.training.launch import run_training
    from sab_byon_omni.training import distributed as D
    RUN = %r
    INIT = %r
    def train(**kw):
        run_training(build_config({**RUN, "batch_size": 2, **kw}))
    def fsdp_initial_weights():  # built on meta, sharded, each rank initialising only its own rows
        import torch
        from sab_byon_omni.data.factory import load_datasets
        from sab_byon_omni.model import init
        from sab_byon_omni.training.build import build_run
        from sab_byon_omni.training.launch import new_model
        init.BLOCK_ELEMENTS = 1000  # shards of 51 and 50 rows cross blocks of 15 rows
        cfg = build_config({**RUN, **INIT})
        tok, tr, va = load_datasets(cfg.data)
        sab = new_model(cfg, tok)
        assert next(sab.model.parameters()).is_meta
        run = build_run(sab.model, tok, tr, va, sab.config)
        assert sab.model.head.weight is sab.model.embed.weight
        state = {n: p.full_tensor() for n, p in sab.model.named_parameters()}
        state.update({n: b.clone() for n, b in sab.model.named_buffers()})
        if run.info.is_main:
            torch.save({**state, "local_embed_rows": sab.model.embed.weight.to_local().shape[0]}, "fsdp_init.pt")
        run.close()
        init.BLOCK_ELEMENTS = 1 << 20
    fsdp_initial_weights()
    train(checkpoint_dir="ddp")                                          # the whole epoch
    train(checkpoint_dir="ddp_resumed", max_steps=2, save_every=2)       # stopped after step 2 ...
    train(checkpoint_dir="ddp_resumed", resume="auto")                   # ... and resumed under torchrun
    train(checkpoint_dir="fsdp", parallel="fsdp", save_every=2)           # FSDP2, sharded checkpoints
    train(checkpoint_dir="fsdp_resumed", parallel="fsdp", resume="fsdp/step_2.dcp")
    train(checkpoint_dir="fsdp_bf16", parallel="fsdp", precision="bf16", max_steps=2)  # MixedPrecisionPolicy
    train(checkpoint_dir="drop", dropout=0.1)                            # dropout: each rank's generator moves
    train(checkpoint_dir="drop_resumed", dropout=0.1, max_steps=2, save_every=2)  # on its own batch lengths
    train(checkpoint_dir="drop_resumed", dropout=0.1, resume="auto")
    import os
    from sab_byon_omni.errors import SabError
    try:  # a planted sharded checkpoint whose .metadata carries code: --resume auto picks it, and refuses it
        train(checkpoint_dir="evil", parallel="fsdp", resume="auto")
        outcome = "trained"
    except SabError as e:
        outcome = str(e)
    open(f"evil_rank{os.environ['RANK']}.txt", "w").write(outcome)
    D.shutdown()
""")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """All two-process runs, in one torchrun launch (starting processes is the slow part here)."""
    d = tmp_path_factory.mktemp("two")
    plant_metadata_payload(write_dcp(d / "evil" / "step_9.dcp"), d / "pwned.txt")
    (d / "scenarios.py").write_text(SCENARIOS % (RUN, INIT))
    torchrun(["scenarios.py"], cwd=d)
    return d


def test_two_processes_match_one_process_with_the_same_global_batch(single, two):
    one, both = single / "full" / "epoch_1.pt", two / "ddp" / "epoch_1.pt"
    assert_same_weights(weights(both), weights(one))
    a, b = load_checkpoint(one), load_checkpoint(both)
    assert a["global_step"] == b["global_step"] == 5  # 36 training samples, 8 per optimizer step
    assert b["data_state"]["world_size"] == 2
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)  # mean over the global token count


def test_resume_under_torchrun_from_a_rank0_checkpoint(two):
    assert (two / "ddp_resumed" / "step_2.pt").is_file()
    assert_same_weights(weights(two / "ddp_resumed" / "epoch_1.pt"), weights(two / "ddp" / "epoch_1.pt"), atol=1e-6)


def test_resume_under_torchrun_restores_each_ranks_own_random_state(two):
    """With dropout, ranks draw different amounts of randomness (their batches differ in length), so
    each must get its own generators back for the resumed run to equal the uninterrupted one."""
    step2 = load_checkpoint(two / "drop_resumed" / "step_2.pt")
    states = step2["rng_state_by_rank"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    assert torch.equal(states[0]["torch"], step2["rng_state"]["torch"])
    assert_same_weights(weights(two / "drop_resumed" / "epoch_1.pt"), weights(two / "drop" / "epoch_1.pt"), atol=0)


def test_checkpoint_of_two_processes_resumes_on_one_over_the_remaining_data(two, tmp_path):
    resumed = tmp_path / "one"
    step2 = load_checkpoint(two / "ddp_resumed" / "step_2.pt")
    assert step2["data_state"]["cursor"] == 16  # two steps of 2 ranks x 2 micro-steps x 2 samples
    cfg = build_config({**RUN, "batch_size": 4, "checkpoint_dir": str(resumed),
                        "resume": str(two / "ddp_resumed" / "step_2.pt")})
    _, result = run_training(cfg)
    assert result.global_step == 5
    assert_same_weights(weights(resumed / "epoch_1.pt"), weights(two / "ddp" / "epoch_1.pt"))


def test_fsdp_matches_ddp_and_its_sharded_checkpoint_resumes(two):
    d = two / "fsdp"
    assert {p.name for p in (d / "epoch_1.dcp").iterdir()} >= {"meta.pt", "__0_0.distcp", "__1_0.distcp"}
    out = d / "epoch_1.pt"
    assert main(["consolidate", str(d / "epoch_1.dcp"), "-o", str(out)]) == 0
    ck = load_checkpoint(out)
    ddp = weights(two / "ddp" / "epoch_1.pt")
    assert list(ck["model_state_dict"]) == list(ddp)  # the plain module's keys
    assert_same_weights(ck["model_state_dict"], ddp)
    assert isinstance(next(iter(ck["optimizer_state_dict"]["state"])), int)  # torch's own optimizer format
    # resumed by two FSDP ranks from step_2.dcp: the same weights as the uninterrupted run
    assert main(["consolidate", str(two / "fsdp_resumed" / "epoch_1.dcp"), "-o", str(two / "r.pt")]) == 0
    assert_same_weights(weights(two / "r.pt"), ck["model_state_dict"], atol=1e-6)


def test_fsdp_builds_on_meta_and_each_rank_initialises_its_shards_like_a_normal_build(two, monkeypatch):
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.model import init

    monkeypatch.setattr(init, "BLOCK_ELEMENTS", 1000)
    normal = SABTranscendentV2(config=build_config({**RUN, **INIT})).model  # one process, the same seed
    got = torch.load(two / "fsdp_init.pt", weights_only=True)
    assert got.pop("local_embed_rows") == 51  # rank 0's shard: the model really was sharded
    names = [n for n, _ in normal.named_parameters()] + [n for n, _ in normal.named_buffers()]
    assert sorted(got) == sorted(names)
    for name, want in [*normal.named_parameters(), *normal.named_buffers()]:
        assert torch.equal(got[name], want), name


def test_consolidated_fsdp_checkpoint_loads_and_resumes_in_one_process(two, tmp_path):
    out = tmp_path / "step_2.pt"
    assert main(["consolidate", str(two / "fsdp" / "step_2.dcp"), "-o", str(out)]) == 0
    model = CausalTransformer(build_config(load_checkpoint(out)["config"]).model)
    model.load_state_dict(load_checkpoint(out)["model_state_dict"])  # strict: the plain keys
    cfg = build_config({**RUN, "batch_size": 4, "checkpoint_dir": str(tmp_path / "one"), "resume": str(out)})
    run_training(cfg)
    assert_same_weights(weights(tmp_path / "one" / "epoch_1.pt"), weights(two / "ddp" / "epoch_1.pt"))


def test_a_sharded_checkpoint_also_resumes_in_one_process_without_consolidating(two, tmp_path):
    cfg = build_config({**RUN, "batch_size": 4, "checkpoint_dir": str(tmp_path / "one"),
                        "resume": str(two / "fsdp" / "step_2.dcp")})
    run_training(cfg)
    assert_same_weights(weights(tmp_path / "one" / "epoch_1.pt"), weights(two / "ddp" / "epoch_1.pt"))


def test_fsdp_with_a_bf16_mixed_precision_policy_trains_and_consolidates(two, tmp_path):
    out = tmp_path / "bf16.pt"
    assert main(["consolidate", str(two / "fsdp_bf16" / "step_2.dcp"), "-o", str(out)]) == 0
    got = weights(out)
    assert main(["consolidate", str(two / "fsdp" / "step_2.dcp"), "-o", str(tmp_path / "fp32.pt")]) == 0
    fp32 = weights(tmp_path / "fp32.pt")
    for k in fp32:  # fp32 master weights, updated from bf16 compute: close to the fp32 run, not equal
        assert got[k].dtype == torch.float32 and torch.isfinite(got[k]).all()
        torch.testing.assert_close(got[k], fp32[k], rtol=0, atol=0.05)


def test_consolidate_refuses_to_overwrite_and_names_bad_input(two, tmp_path, capsys):
    out = tmp_path / "x.pt"
    out.write_bytes(b"mine")
    assert main(["consolidate", str(two / "fsdp" / "epoch_1.dcp"), "-o", str(out)]) == 2
    assert out.read_bytes() == b"mine"
    assert main(["consolidate", str(tmp_path), "-o", str(tmp_path / "y.pt")]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and "not a sharded checkpoint" in err


def test_fsdp_resume_auto_refuses_a_sharded_checkpoint_carrying_code_on_every_rank(two):
    assert not (two / "pwned.txt").exists(), "the payload ran"
    for rank in (0, 1):
        outcome = (two / f"evil_rank{rank}.txt").read_text()
        assert "step_9.dcp" in outcome and "refused" in outcome and "\n" not in outcome, outcome
    assert sorted(p.name for p in (two / "evil").iterdir()) == [".lock", "step_9.dcp"]  # nothing else written


def test_only_rank0_writes_files(two):
    names = {p.name for p in (two / "ddp").iterdir()}
    assert names == {"epoch_1.pt", "best_model.pt", "metrics.jsonl", "config.yaml", ".lock"}
    rows = (two / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in rows if '"loss"' in r]) == 5  # one line per step, not one per rank


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    torchrun(["-m", "sab_byon_omni.cli", "train", *flags(**RUN, batch_size=2, checkpoint_dir="c")], cwd=tmp_path)
    assert (tmp_path / "c" / "epoch_1.pt").is_file()


# ----------------------------------------------------------------------------------- shards
@pytest.mark.parametrize("n,batch,world", [(36, 2, 2), (37, 3, 2), (50, 4, 3), (9, 1, 4)])
def test_shards_are_disjoint_and_cover_the_epoch(n, batch, world):
    data = [np.array([i, i]) for i in range(n)]
    per_rank = [[int(row[0]) for b in iterate_batches(data, batch, pad_id=0, epoch=1, seed=3, world=world, rank=r)
                 for row in b.input_ids] for r in range(world)]
    seen = [i for rank in per_rank for i in rank]
    assert len(seen) == len(set(seen))  # disjoint
    steps = micro_steps_per_epoch(n, batch, world)
    assert all(len(list(iterate_batches(data, batch, pad_id=0, world=world, rank=r))) == steps for r in range(world))
    dropped = n - len(seen)
    assert dropped < world  # covered, except a last chunk too small to give every rank a sample
    assert set(seen) <= set(range(n))


def test_shards_after_resume_continue_where_the_cursor_stopped():
    data = [np.array([i, i]) for i in range(40)]
    first = list(iterate_batches(data, 2, pad_id=0, world=2, rank=0))[:3]
    cursor = first[-1].cursor
    later = [int(row[0]) for r in range(2) for b in iterate_batches(data, 2, pad_id=0, world=2, rank=r, start=cursor)
             for row in b.input_ids]
    before = [int(row[0]) for r in range(2) for b in list(iterate_batches(data, 2, pad_id=0, world=2, rank=r))[:3]
              for row in b.input_ids]
    assert sorted(before + later) == list(range(40))


# ---------------------------------------------------------------------- activation checkpointing
def test_activation_checkpointing_gives_the_same_gradients(tiny_cfg):
    torch.manual_seed(0)
    ids = torch.randint(1, 96, (3, 40))
    grads = []
    for ac in (False, True):
        torch.manual_seed(1)
        model = CausalTransformer(tiny_cfg)
        if ac:
            apply_activation_checkpointing(model)
        causal_lm_loss(model(ids), ids).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        names = list(model.state_dict())
    assert names == list(CausalTransformer(tiny_cfg).state_dict())  # keys unchanged by the patch
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------- will it fit?
def test_training_that_cannot_fit_stops_before_allocating_with_settings_that_fit(in_tmp, capsys, monkeypatch):
    monkeypatch.setattr(memory_mod, "memory_budget", lambda device: (1.2e9, "a small test device (1.2 GB)"))
    code = main(["train", *flags(**{**RUN, "preset": "lightweight", "batch_size": 512, "checkpoint_dir": "c"})])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: this run needs about") and err.count("\n") == 1
    assert "--batch_size" in err and "--check_memory false" in err
    assert not (in_tmp / "c").exists()


def test_micro_batch_auto_keeps_the_effective_batch(in_tmp, monkeypatch):
    from sab_byon_omni.estimate import estimate

    m = ModelConfig.from_name("tiny", vocab_size=96, max_seq_len=256)
    # a budget where 4 sequences fit and 8 do not
    need4 = estimate(m, 64, 4, "fp32", device="cpu", fused_optimizer=True).peak
    monkeypatch.setattr(memory_mod, "memory_budget", lambda device: ((need4 * 1.05 - 5e5) / 0.9, "test"))
    cfg = build_config({**RUN, "batch_size": 16, "gradient_accumulation_steps": 1, "auto_micro_batch": True,
                        "max_steps": 1, "checkpoint_dir": "c", "num_samples": 80})
    from tests.helpers import trainer_for

    t = trainer_for(cfg).run.cfg.train  # the plan's config
    assert t.batch_size * t.gradient_accumulation_steps == 16
    assert t.batch_size < 16 and t.batch_size >= 2

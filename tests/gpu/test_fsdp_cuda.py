"""FSDP2 at world size 1 on NCCL (gloo in the dry run): built on the meta device and initialised
after sharding like a normal build, trained under a bf16 MixedPrecisionPolicy, saved with DCP,
consolidated into one file, and loaded back into a fresh sharded model with equal weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from sab_byon_omni.config import build_config
    from sab_byon_omni.device import make_precision
    from sab_byon_omni.files import dcp
    from sab_byon_omni.files.checkpoint import load_checkpoint
    from sab_byon_omni.model.transformer import CausalTransformer
    from sab_byon_omni.training import distributed as D
    from sab_byon_omni.training.consolidate import consolidate
    from sab_byon_omni.loss import causal_lm_loss
    from sab_byon_omni.training.optim import make_optimizer

    kind, preset = sys.argv[1], sys.argv[2]
    device = torch.device(kind, 0) if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    cfg = build_config({"preset": preset, "vocab_size": 96, "seq_len": 64, "precision": "bf16", "seed": 7,
                        "parallel": "fsdp", "device": kind})

    def sharded(seed, init=True):
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = CausalTransformer(cfg.model)
        D.wrap_fsdp(model, torch.bfloat16)
        D.materialize(model, device, init_weights=init)
        return model, make_optimizer(model, cfg.train, device)

    def full(model):
        return {n: p.full_tensor().detach().cpu() for n, p in model.named_parameters()}

    model, opt = sharded(7)
    torch.manual_seed(7)
    normal = CausalTransformer(cfg.model)
    assert all(torch.equal(full(model)[n], p) for n, p in normal.named_parameters()), "sharded init differs"
    assert type(model.embed.weight).__name__ == "DTensor" and model.head.weight is model.embed.weight

    ids = torch.randint(1, 96, (4, 64), generator=torch.Generator().manual_seed(0)).to(device)
    losses = []
    for _ in range(3):
        with make_precision("bf16", device).autocast():
            loss = causal_lm_loss(model(ids), ids) / ids[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    weights = full(model)

    path = Path("ck") / "step_3.dcp"
    dcp.save(path, model, opt, {"epoch": 0, "global_step": 3, "config": cfg.to_dict(), "loss": losses[-1]},
             True, dist.barrier)
    consolidate(path, Path("ck") / "step_3.pt")
    one = load_checkpoint(Path("ck") / "step_3.pt")["model_state_dict"]
    assert all(torch.equal(one[n], w) for n, w in weights.items()), "consolidated weights differ"

    again, opt2 = sharded(99, init=False)
    dcp.load(path, again, opt2)
    assert all(torch.equal(w, weights[n]) for n, w in full(again).items()), "reloaded weights differ"
    Path("result.json").write_text(json.dumps({"backend": dist.get_backend(), "losses": losses,
                                               "files": sorted(p.name for p in path.iterdir())}))
    dist.destroy_process_group()
''')


def test_fsdp2_world_size_1_dcp_save_consolidate_and_load(dev, sizes, tmp_path):
    (tmp_path / "fsdp.py").write_text(SCRIPT)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "fsdp.py",
           dev.type, sizes.preset]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["backend"] == ("nccl" if dev.type == "cuda" else "gloo")
    assert {"meta.pt", ".metadata", "__0_0.distcp"} <= set(result["files"])

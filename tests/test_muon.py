"""Muon (training/muon.py) for the matrices the model declares, AdamW for the rest, behind one
optimizer and one state dict (optim.py MuonWithAdamW)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from sab_byon_omni.config import ModelConfig, TrainConfig
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.muon import Muon, newton_schulz_dtype, orthogonalize, orthogonalize_all, shape_batches
from sab_byon_omni.training.optim import MuonWithAdamW, lr_at, make_optimizer, set_lr


def _model(seed: int = 0) -> CausalTransformer:
    torch.manual_seed(seed)
    return CausalTransformer(ModelConfig.from_name("tiny", vocab_size=50, max_seq_len=16))


def _loss(model: CausalTransformer, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 16), generator=g)
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))


def _train(model: CausalTransformer, opt: torch.optim.Optimizer, steps: range) -> None:
    for s in steps:
        _loss(model, s).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (4, 16, 48)])
def test_orthogonalize_pushes_every_singular_value_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    g[..., 0, :] *= 50  # a badly conditioned input: one direction dominates
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.3, (s.min(), s.max())
    assert orthogonalize(g).shape == g.shape
    assert torch.allclose(orthogonalize(3.0 * g), orthogonalize(g), atol=1e-5)  # the scale of g does not matter


def test_orthogonalize_of_a_batch_is_each_matrix_on_its_own():
    g = torch.randn(3, 20, 12, generator=torch.Generator().manual_seed(2))
    together = orthogonalize(g)
    for i in range(3):
        assert torch.allclose(together[i], orthogonalize(g[i]), atol=1e-6)


def test_batched_newton_schulz_equals_the_per_matrix_one():
    """Same-shape matrices stacked into one call (a tall one transposed to join the wide ones) give
    each matrix's own result, back in its own orientation."""
    g = torch.Generator().manual_seed(5)
    updates = [torch.randn(3, 16, 16, generator=g), torch.randn(1, 16, 16, generator=g),
               torch.randn(1, 64, 16, generator=g), torch.randn(1, 16, 64, generator=g),
               torch.randn(1, 8, 24, generator=g)]
    together = orthogonalize_all(updates, torch.float32)
    for u, t in zip(updates, together):
        assert t.shape == u.shape
        torch.testing.assert_close(t, orthogonalize(u), rtol=0, atol=1e-5)


def test_shape_batches_group_one_shape_up_to_a_size():
    cpu = torch.device("cpu")
    shapes = [(cpu, torch.float32, 3, 8, 8), (cpu, torch.float32, 1, 32, 8), (cpu, torch.float32, 1, 8, 8),
              (cpu, torch.float32, 1, 8, 32), (cpu, torch.bfloat16, 1, 8, 8), (cpu, torch.float32, 1, 8, 8)]
    assert shape_batches(shapes) == [[0, 2, 5], [1, 3], [4]]  # 8 x 32 and 32 x 8 share a call; bf16 apart
    assert shape_batches(shapes, max_elements=4 * 64) == [[0, 2], [5], [1], [3], [4]]  # a matrix over it: alone


def test_the_muon_step_is_each_matrixs_own_update():
    """Muon's step (batched by shape) moves each matrix by its own orthogonalised Nesterov momentum."""
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2, muon_learning_rate=0.05))
    opt.muon.ns_dtype = torch.float32
    _loss(model, 0).backward()
    before = {p: p.detach().clone() for p, _ in model.muon_matrices()}
    grads = {p: p.grad.clone() for p, _ in model.muon_matrices()}
    opt.step()
    for p, k in model.muon_matrices():
        rows, cols = p.shape[0] // k, p.shape[1]
        nesterov = grads[p] * (1 - 0.95) * (1 + 0.95)  # the first step: the buffer is (1 - beta) grad
        expected = before[p] * (1 - 0.05 * 0.01) - 0.05 * math.sqrt(max(1, rows / cols)) * \
            orthogonalize(nesterov.view(k, rows, cols)).view_as(p)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_bf16_newton_schulz_is_within_its_rounding_of_fp32():
    g = torch.randn(4, 64, 256, generator=torch.Generator().manual_seed(6))
    fp32, bf16 = orthogonalize(g), orthogonalize(g, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).norm() / fp32.norm() < 0.03  # 0.014 on a Xeon with AMX
    s = torch.linalg.svdvals(bf16)
    assert s.min() > 0.5 and s.max() < 1.3


def test_newton_schulz_runs_in_bf16_only_where_the_device_multiplies_it_natively(monkeypatch):
    """bf16 on CUDA sm_80+ and on CPUs with AVX-512 BF16 / AMX; fp32 where bf16 is emulated (T4,
    V100, AVX2-only CPUs), as ``precision: auto`` decides; SAB_MUON_NS_DTYPE forces one."""
    from sab_byon_omni.training import muon as M

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("SAB_MUON_NS_DTYPE", raising=False)
    monkeypatch.setenv("SAB_CPU_NATIVE_BF16", "0")
    assert newton_schulz_dtype(cpu) == torch.float32
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: True)
    assert newton_schulz_dtype(cpu) == torch.bfloat16
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(M, "native_cuda_bf16", lambda device, native=native: native)
        assert newton_schulz_dtype(cuda) == dtype
    monkeypatch.setenv("SAB_MUON_NS_DTYPE", "fp32")
    assert newton_schulz_dtype(cpu) == newton_schulz_dtype(cuda) == torch.float32
    monkeypatch.setenv("SAB_MUON_NS_DTYPE", "bf16")
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    _train(model, opt, range(1))
    assert opt.muon.ns_dtypes == {cpu: torch.bfloat16}  # the optimizer asked, once
    monkeypatch.setenv("SAB_MUON_NS_DTYPE", "fp64")
    with pytest.raises(ValueError, match="SAB_MUON_NS_DTYPE='fp64' is not one of: fp32, bf16"):
        newton_schulz_dtype(cpu)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_the_muon_update_is_torchs_muon_up_to_its_bf16_rounding():
    """Same momentum, Nesterov step, Newton-Schulz, decay and rate adjustment as torch.optim.Muon
    (which orthogonalises in bfloat16): after three steps the two updates point the same way."""
    torch.manual_seed(3)
    w0 = torch.randn(96, 32) * 0.05
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    a = Muon([ours], lr=0.05, weight_decay=0.1, ns_dtype=torch.float32)
    b = torch.optim.Muon([theirs], lr=0.05, weight_decay=0.1)
    for step in range(3):
        grad = torch.randn(96, 32, generator=torch.Generator().manual_seed(step))
        for p, opt in ((ours, a), (theirs, b)):
            p.grad = grad.clone()
            opt.step()
    da, db = (ours - w0).flatten(), (theirs - w0).flatten()
    assert torch.nn.functional.cosine_similarity(da, db, dim=0) > 0.999
    assert math.isclose(da.norm().item(), db.norm().item(), rel_tol=0.02)


def test_a_split_matrix_is_orthogonalised_block_by_block():
    """qkv (3h x h) is three matrices: each block moves by its own orthogonalised gradient, scaled
    for the block's shape (h x h: factor 1), after the decoupled weight decay."""
    torch.manual_seed(4)
    w0 = torch.randn(3 * 16, 16)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.5, split=3, ns_dtype=torch.float32)
    grad = torch.randn(48, 16)
    grad[:16] *= 100  # q's gradient is far larger: split, it must not drown k's and v's
    p.grad = grad
    opt.step()
    step = (w0 * (1 - 0.1 * 0.5) - p.detach()) / 0.1
    for i in range(3):
        block = slice(16 * i, 16 * (i + 1))
        assert torch.allclose(step[block], orthogonalize(grad[block]), atol=1e-5)
        assert torch.linalg.svdvals(step[block]).min() > 0.5


def test_unequal_row_blocks_are_orthogonalised_block_by_block():
    """A grouped-query qkv [q; k; v] with k and v smaller than q: each block moves by its own
    orthogonalised momentum, scaled for its own shape; the two equal ones share one call."""
    torch.manual_seed(5)
    w0, grad = torch.randn(32 + 8 + 8, 16), torch.randn(48, 16)
    p = torch.nn.Parameter(w0.clone())
    opt = Muon([p], lr=0.1, weight_decay=0.5, split=[32, 8, 8], ns_dtype=torch.float32)
    p.grad = grad
    opt.step()
    step = (w0 * (1 - 0.1 * 0.5) - p.detach()) / 0.1
    for block, scale in ((slice(0, 32), math.sqrt(2)), (slice(32, 40), 1.0), (slice(40, 48), 1.0)):
        assert torch.allclose(step[block], orthogonalize(grad[block]) * scale, atol=1e-5)
    with pytest.raises(ValueError, match="split into"):
        Muon([torch.nn.Parameter(torch.zeros(40, 4))], split=[32, 8, 8])


def test_a_grouped_query_model_trains_with_muon():
    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=50, n_kv_heads=2, mlp="swiglu"))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert [g["split"] for g in opt.param_groups if g["muon"]] == [[64, 32, 32], 1, 2]
    _train(model, opt, range(2))
    again = make_optimizer(model, TrainConfig(optimizer="muon"))
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # the list survives the state dict


def test_rows_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="split into 3"):
        Muon([torch.nn.Parameter(torch.zeros(10, 4))], split=3)
    opt = Muon([torch.nn.Parameter(torch.zeros(6, 4))], split=3)
    with pytest.raises(ValueError, match="split into 3"):  # a group added later, too; and it is not kept
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(10, 4))]})
    assert len(opt.param_groups) == 1


def test_make_optimizer_gives_muon_the_blocks_matrices_and_adamw_the_rest():
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=3e-3, muon_learning_rate=0.07))
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, Muon)
    assert type(opt.adamw) is torch.optim.AdamW and opt.adamw.defaults["fused"]
    name = {id(p): n for n, p in model.named_parameters()}
    seen = [name[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(name.values())  # every parameter exactly once (the tied head counts once)
    muon = {name[id(p)]: g for g in opt.param_groups if g["muon"] for p in g["params"]}
    assert set(muon) == {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert all(g["split"] == (3 if n.endswith("qkv.weight") else 1) for n, g in muon.items())
    assert {g["lr"] for g in muon.values()} == {0.07}
    adamw = [g for g in opt.param_groups if not g["muon"]]
    assert {name[id(p)] for g in adamw for p in g["params"]} >= {"embed.weight", "norm.weight"}
    assert {g["lr"] for g in adamw} == {3e-3}
    assert type(make_optimizer(model, TrainConfig())) is torch.optim.AdamW  # the guide's job keeps plain AdamW


def test_the_adamw_part_is_exactly_torchs_adamw():
    """Embedding, head and norms step exactly as a plain AdamW would step them."""
    model, ref = _model(), _model()
    t = TrainConfig(optimizer="muon", learning_rate=1e-2, weight_decay=0.1, beta1=0.8)
    opt = make_optimizer(model, t)
    adamw_ids = {id(p) for g in opt.param_groups if not g["muon"] for p in g["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in adamw_ids]
    ref_params = dict(ref.named_parameters())
    for p in ref.parameters():
        p.requires_grad_(False)
    plain = torch.optim.AdamW([{"params": [ref_params[n] for n in names if ref_params[n].dim() >= 2], "weight_decay": 0.1},
                               {"params": [ref_params[n] for n in names if ref_params[n].dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.8, 0.95), fused=True)
    for step in range(3):
        _loss(model, step).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if n in names}
        opt.step()
        opt.zero_grad(set_to_none=True)
        for n in names:
            ref_params[n].grad = grads[n]
        plain.step()
    got = dict(model.named_parameters())
    for n in names:
        assert torch.equal(got[n], ref_params[n]), n


def test_state_dict_round_trip_continues_bit_for_bit():
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2))
    _train(model, opt, range(2))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert any("momentum_buffer" in s for s in saved_opt["state"].values())
    assert any("exp_avg" in s for s in saved_opt["state"].values())
    _train(model, opt, range(2, 4))

    again = _model(seed=99)
    again.load_state_dict(saved_model)
    opt2 = make_optimizer(again, TrainConfig(optimizer="muon", learning_rate=1e-2))
    opt2.load_state_dict(saved_opt)
    _train(again, opt2, range(2, 4))
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_muon_groups_follow_their_own_peak_and_warmup():
    t = TrainConfig(optimizer="muon", learning_rate=1e-3, warmup_steps=20, muon_learning_rate=0.1,
                    muon_warmup_steps=5, lr_schedule="cosine", min_lr_ratio=0.1)
    opt = make_optimizer(_model(), t)
    set_lr(opt, 4, t, 100)
    lrs = {g["muon"]: g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(0.1) and lrs[False] == pytest.approx(1e-3 * 5 / 20)
    set_lr(opt, 99, t, 100)
    assert {g["muon"]: g["lr"] for g in opt.param_groups}[True] == pytest.approx(lr_at(99, t, 100, muon=True))
    assert lr_at(99, t, 100, muon=True) < 0.02 and lr_at(99, t, 100) < 2e-4  # both decay to their floor


def test_muon_learns_a_small_model_faster_than_adamw_at_the_same_budget():
    """The reason the recipe uses it (the learning benchmark measures it properly: docs/RECIPES.md)."""
    losses = {}
    for kind in ("adamw", "muon"):
        model = _model(seed=5)
        opt = make_optimizer(model, TrainConfig(optimizer=kind, learning_rate=3e-3, muon_learning_rate=0.05,
                                                weight_decay=0.0))
        for step in range(30):
            loss = _loss(model, step % 4)  # four batches, seen again and again: memorise them
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            losses[kind] = float(sum(_loss(model, s) for s in range(4))) / 4
    assert losses["muon"] < losses["adamw"], losses


def _saved_state(kind: str) -> tuple[CausalTransformer, dict]:
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer=kind, learning_rate=1e-2))
    _train(model, opt, range(2))
    return model, copy.deepcopy(opt.state_dict())


def _load(model: CausalTransformer, kind: str, saved: dict) -> torch.optim.Optimizer:
    from sab_byon_omni.training.optim import check_loaded_state

    opt = make_optimizer(model, TrainConfig(optimizer=kind, learning_rate=1e-2))
    built = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(saved)
    check_loaded_state(opt, built)
    return opt


def _first(saved: dict, key: str) -> dict:
    return next(s for s in saved["state"].values() if key in s)


@pytest.mark.parametrize("kind, damage, message", [
    ("adamw", lambda s: _first(s, "exp_avg").update(exp_avg=torch.zeros(1)), r"exp_avg \(1,\) does not fit"),
    ("muon", lambda s: _first(s, "exp_avg_sq").update(exp_avg_sq=torch.zeros(3, 3)), "exp_avg_sq"),
    ("muon", lambda s: _first(s, "momentum_buffer").update(momentum_buffer=torch.zeros(3, 3)), "momentum_buffer"),
    ("muon", lambda s: _first(s, "momentum_buffer").update(momentum_buffer=1.5), "momentum_buffer float"),
    ("muon", lambda s: _first(s, "momentum_buffer").update(
        momentum_buffer=torch.zeros(1).expand(*_first(s, "momentum_buffer")["momentum_buffer"].shape)), "momentum_buffer"),
    ("muon", lambda s: _first(s, "momentum_buffer").update(exp_avg=torch.zeros(1)), "is not Muon's"),
    ("adamw", lambda s: _first(s, "exp_avg").update(step=torch.tensor(float("nan"))), "step"),
    ("muon", lambda s: s["state"].pop(next(iter(s["state"]))), "only"),
])
def test_a_damaged_optimizer_state_is_refused_before_any_step(kind, damage, message):
    """A moment of the wrong size would make fused AdamW read and write out of bounds (a crash, or
    silent garbage); every such file stops at load with a ValueError naming the state."""
    model, saved = _saved_state(kind)
    damage(saved)
    with pytest.raises(ValueError, match=message):
        _load(model, kind, saved)


def test_the_codes_groups_win_over_a_files():
    """Which groups are Muon, their split and momentum come from the code: a file cannot switch an
    AdamW group to Muon, nor orthogonalise qkv whole."""
    model, saved = _saved_state("adamw")
    saved["param_groups"][0]["muon"] = True
    opt = _load(model, "adamw", saved)
    assert not any("muon" in g for g in opt.param_groups)
    model, saved = _saved_state("muon")
    for g in saved["param_groups"]:
        g.pop("momentum", None)
        if g.get("split") == 3:
            g["split"] = 1
    opt = _load(model, "muon", saved)
    assert sorted(g.get("split", 0) for g in opt.param_groups) == [0, 0, 1, 3]
    assert all(g["momentum"] == 0.95 for g in opt.param_groups if g["muon"])
    _train(model, opt, range(2, 3))  # and it steps


@pytest.mark.parametrize("split", [0, -3, 2.0, True, "3", [], [3, 0], [2.0, 4]])
def test_a_split_that_is_not_a_positive_integer_is_refused(split):
    with pytest.raises(ValueError, match="positive integer or a list"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(6, 4))], "split": split}])


def test_the_model_declares_its_muon_matrices():
    """Every block's 2-D weight, the fused qkv as three row blocks; not the embedding (= the tied
    head) nor the norms. optim.py asks the model instead of matching parameter names."""
    model = _model()
    declared = {n: k for n, p in model.named_parameters() for q, k in model.muon_matrices() if p is q}
    assert declared == {f"blocks.{i}.{m}.weight": 3 if m == "attn.qkv" else 1
                        for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    assert len(model.muon_matrices()) == len(declared)


def test_a_model_that_declares_no_matrices_is_refused_for_muon():
    with pytest.raises(ValueError, match="muon_matrices"):
        make_optimizer(torch.nn.Linear(4, 4), TrainConfig(optimizer="muon"))


# Parameter order of the optimizer's state dict for _model(): Muon's groups (qkv, then the other
# matrices), then AdamW's (the embedding, then the norms); the index of each is its position here.
ORDER = ["blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight",
         *(f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.proj", "mlp.up", "mlp.down")),
         "embed.weight", *(f"blocks.{i}.norm{j}.weight" for i in range(2) for j in (1, 2)), "norm.weight"]


def _earlier_format() -> dict:
    """An optimizer state dict exactly as the single ``MuonAdamW(torch.optim.AdamW)`` of earlier
    versions saved it for ``_model()`` after two steps (``make_optimizer(model, TrainConfig(
    optimizer="muon", learning_rate=1e-2))``, torch 2.13): its Muon groups carry AdamW's keys too.
    The moments are made up; their places and shapes are that optimizer's."""
    adamw = {"amsgrad": False, "betas": (0.9, 0.95), "capturable": False, "decoupled_weight_decay": True,
             "differentiable": False, "eps": 1e-08, "foreach": None, "fused": True, "maximize": False}
    groups = [{**adamw, "lr": 0.05, "momentum": 0.95, "muon": True, "params": [0, 1], "split": 3, "weight_decay": 0.01},
              {**adamw, "lr": 0.05, "momentum": 0.95, "muon": True, "params": [2, 3, 4, 5, 6, 7], "split": 1,
               "weight_decay": 0.01},
              {**adamw, "lr": 0.01, "muon": False, "params": [8], "weight_decay": 0.01},
              {**adamw, "lr": 0.01, "muon": False, "params": [9, 10, 11, 12, 13], "weight_decay": 0.0}]
    shapes = [(192, 64)] * 2 + [(64, 64), (256, 64), (64, 256)] * 2 + [(50, 64)] + [(64,)] * 5
    g = torch.Generator().manual_seed(11)
    state = {i: {"momentum_buffer": torch.randn(s, generator=g)} for i, s in enumerate(shapes[:8])}
    state.update({i: {"exp_avg": torch.randn(s, generator=g), "exp_avg_sq": torch.rand(s, generator=g),
                      "step": torch.tensor(2.0)} for i, s in enumerate(shapes) if i >= 8})
    return {"state": state, "param_groups": groups}


def test_a_checkpoint_of_the_earlier_single_optimizer_loads_each_moment_onto_its_parameter():
    from sab_byon_omni.training.optim import check_loaded_state

    saved = _earlier_format()
    model = _model()
    params = dict(model.named_parameters())
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2))
    built = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(copy.deepcopy(saved))  # the guide's line
    assert all("betas" not in g for g in opt.muon.param_groups)  # AdamW's keys are not Muon's
    check_loaded_state(opt, built)  # and the resume's check
    for i, name in enumerate(ORDER):
        for key, value in saved["state"][i].items():
            assert torch.equal(opt.state[params[name]][key], value), (name, key)
    again = opt.state_dict()  # and saved again in the same form
    assert again["state"].keys() == saved["state"].keys()
    keys = ("muon", "split", "momentum", "params", "lr", "weight_decay")
    assert [{k: g.get(k) for k in keys} for g in again["param_groups"]] == \
        [{k: g.get(k) for k in keys} for g in saved["param_groups"]]
    _train(model, opt, range(1))
    assert opt.state[params["embed.weight"]]["step"] == 3


def test_the_state_dict_is_one_optimizers_with_global_indices():
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2))
    _train(model, opt, range(1))
    saved = opt.state_dict()
    assert [i for g in saved["param_groups"] for i in g["params"]] == list(range(len(ORDER)))
    assert [g["muon"] for g in saved["param_groups"]] == [True, True, False, False]
    params = dict(model.named_parameters())
    for i, name in enumerate(ORDER):
        assert all(v is opt.state[params[name]][k] for k, v in saved["state"][i].items())
    assert set(saved["state"][0]) == {"momentum_buffer"} and set(saved["state"][8]) == {"exp_avg", "exp_avg_sq", "step"}


def test_a_state_dict_that_does_not_fit_is_refused_before_either_part_loads():
    """An AdamW-only file (2 groups, no Muon marks) into the Muon optimizer: a ValueError, and
    neither Muon nor AdamW has taken anything from it."""
    model, adamw_saved = _saved_state("adamw")
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2))
    with pytest.raises(ValueError, match="parameter groups"):
        opt.load_state_dict(adamw_saved)
    assert not opt.state and [g["lr"] for g in opt.param_groups] == [0.05, 0.05, 1e-2, 1e-2]
    saved = _earlier_format()
    saved["param_groups"][1]["params"].pop()
    with pytest.raises(ValueError, match=r"Muon parameter groups hold \[2, 5\] parameters, this optimizer's \[2, 6\]"):
        opt.load_state_dict(saved)


def test_grad_scaler_unscales_then_steps_or_skips_both_parts():
    """The trainer's ``scaler.unscale_(optimizer); scaler.step(optimizer)``: a finite step is the
    step without a scaler (a power-of-two scale unscales exactly); a non-finite one moves nothing,
    neither Muon's matrices and momentum nor AdamW's parameters and moments."""
    model, ref = _model(), _model()
    opt, ref_opt = (make_optimizer(m, TrainConfig(optimizer="muon", learning_rate=1e-2)) for m in (model, ref))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(2):
        scaler.scale(_loss(model, step)).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    _train(ref, ref_opt, range(2))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    scaler.scale(_loss(model, 2)).backward()
    model.blocks[0].attn.qkv.weight.grad[0, 0] = math.inf
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before[0].values()))
    assert all(torch.equal(v, before[1]["state"][i][k]) for i, s in opt.state_dict()["state"].items() for k, v in s.items())


def test_bench_times_the_step_with_muon(in_tmp, capsys, monkeypatch):
    """``sab-omni bench --optimizer muon``: the timed step is the Trainer's, Muon's step included."""
    import json

    from sab_byon_omni.cli import main

    calls = []
    real = Muon.step
    monkeypatch.setattr(Muon, "step", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    args = ["bench", "--preset", "tiny", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--warmup", "1"]
    assert main([*args, "--optimizer", "muon", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["optimizer"] == "Muon + AdamW fused" and len(calls) == 1 + 2
    assert main(["bench", "--mode", "epoch", "--optimizer", "muon"]) == 2
    assert "--set train.optimizer=" in capsys.readouterr().err


@pytest.mark.parametrize("shape", [(3, 16, 48), (2, 40, 8), (1, 24, 24)])
def test_newton_schulz_flops_match_torchs_flop_counter(shape):
    """The formula bench counts is what the iteration really multiplies (torch's own counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sab_byon_omni.training.muon import newton_schulz_flops

    with FlopCounterMode(display=False) as counter:
        orthogonalize(torch.randn(*shape))
    assert newton_schulz_flops(*shape) == counter.get_total_flops()


def test_muon_flops_per_step_sum_each_matrix_row_block():
    from sab_byon_omni.training.muon import newton_schulz_flops

    qkv, out = torch.nn.Parameter(torch.randn(48, 16)), torch.nn.Parameter(torch.randn(16, 16))
    frozen = torch.nn.Parameter(torch.randn(16, 16), requires_grad=False)
    opt = Muon([{"params": [qkv], "split": 3}, {"params": [out, frozen]}])
    assert opt.flops_per_step() == newton_schulz_flops(3, 16, 16) + newton_schulz_flops(1, 16, 16)


# ------------------------------------------------------------------ the Newton-Schulz schedule as a setting
PE = [(8.156554524902461, -22.48329292557795, 15.878769915207462),  # modded-nanogpt's polar_express_coeffs
      (4.042929935166739, -2.808917465908714, 0.5000178451051316),
      (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
      (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
      (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def _reference_ns(g: torch.Tensor, coefficients: list, scale: float, add: float) -> torch.Tensor:
    """Newton-Schulz written out, one matrix at a time, in fp32: X / (scale |X|_F + add), then
    X <- a X + b (X X^T) X + c (X X^T)^2 X on the wide form."""
    out = []
    for m in g.reshape(-1, *g.shape[-2:]):
        x = m.T if m.shape[0] > m.shape[1] else m
        x = x / (x.norm() * scale + add)
        for a, b, c in coefficients:
            gram = x @ x.T
            x = a * x + b * gram @ x + c * gram @ gram @ x
        out.append(x.T if m.shape[0] > m.shape[1] else x)
    return torch.stack(out).reshape(g.shape)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (3, 16, 48), (2, 48, 16)])
@pytest.mark.parametrize("steps", [3, 5, 7])
def test_polar_express_is_its_per_iteration_schedule(shape, steps):
    """polar_express: the paper's coefficients one per iteration (the last repeated beyond five), after
    dividing by 1.02 x the Frobenius norm (+1e-6), as modded-nanogpt runs it."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(21))
    want = _reference_ns(g, [PE[min(i, 4)] for i in range(steps)], 1.02, 1e-6)
    got = orthogonalize(g, steps=steps, schedule="polar_express")
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    quintic = _reference_ns(g, [(3.4445, -4.7750, 2.0315)] * steps, 1.0, 0.0)
    torch.testing.assert_close(orthogonalize(g, steps=steps), quintic, rtol=0, atol=2e-5)  # the default, unchanged


@pytest.mark.parametrize("schedule", ["quintic", "polar_express"])
def test_the_number_of_steps_changes_the_result(schedule):
    g = torch.randn(32, 64, generator=torch.Generator().manual_seed(22))
    results = [orthogonalize(g, steps=n, schedule=schedule) for n in (3, 4, 5)]
    for a, b in itertools.pairwise(results):
        assert (a - b).norm() > 1e-2 * a.norm()
    assert torch.equal(orthogonalize(g), orthogonalize(g, steps=5, schedule="quintic"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polar_express_lands_singular_values_in_its_band(dtype):
    """Five polar_express steps map every singular value of at least 1/1000 of the Frobenius norm
    into about [0.85, 1.15] (muon.orthogonalize's docstring); the quintic's band is wider."""
    g = torch.Generator().manual_seed(23)
    n = 96
    u, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    s = torch.logspace(-5, 0, n, dtype=torch.float64)
    m = ((u * s) @ v.T).float()
    kept = s / s.norm() >= 1e-3  # singular values at least 1/1000 of the Frobenius norm

    def mapped(schedule: str) -> torch.Tensor:  # what became of each singular value: u_i^T out v_i
        out = orthogonalize(m, dtype=dtype, schedule=schedule).double()
        return torch.diagonal(u.T @ out @ v)[kept]

    pe, quintic = mapped("polar_express"), mapped("quintic")
    assert pe.min() > 0.85 and pe.max() < 1.15, (pe.min(), pe.max())
    assert quintic.min() < 0.6 and quintic.max() > 1.15  # the quintic leaves them in a wider band


def test_the_schedule_is_a_group_setting_kept_in_the_state_dict():
    t = TrainConfig(optimizer="muon", learning_rate=1e-2, muon_ns_steps=4, muon_ns_coefficients="polar_express")
    model = _model()
    opt = make_optimizer(model, t)
    assert all((g["ns_steps"], g["ns_coefficients"]) == (4, "polar_express") for g in opt.muon.param_groups)
    _train(model, opt, range(2))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert all((g["ns_steps"], g["ns_coefficients"]) == (4, "polar_express")
               for g in saved_opt["param_groups"] if g["muon"])
    _train(model, opt, range(2, 4))

    again = _model(seed=99)
    again.load_state_dict(saved_model)
    opt2 = make_optimizer(again, TrainConfig(optimizer="muon", learning_rate=1e-2))  # built with the defaults
    opt2.load_state_dict(saved_opt)  # the guide's line: the file's schedule comes back
    assert all((g["ns_steps"], g["ns_coefficients"]) == (4, "polar_express") for g in opt2.muon.param_groups)
    _train(again, opt2, range(2, 4))
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_a_state_dict_from_before_the_schedule_loads_with_the_defaults():
    saved = _earlier_format()
    assert not any("ns_steps" in g for g in saved["param_groups"])
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2, muon_ns_steps=3))
    opt.load_state_dict(copy.deepcopy(saved))
    assert all((g["ns_steps"], g["ns_coefficients"]) == (5, "quintic") for g in opt.muon.param_groups)
    _train(model, opt, range(1))


@pytest.mark.parametrize("key, value, message", [("ns_steps", 0, "ns_steps must be an integer in"),
                                                 ("ns_steps", 21, "ns_steps must be an integer in"),
                                                 ("ns_steps", 4.0, "ns_steps must be an integer in"),
                                                 ("ns_coefficients", "cubic", "are not one of: quintic")])
def test_a_bad_schedule_is_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], key: value}])
    model, saved = _saved_state("muon")
    saved["param_groups"][0][key] = value
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=1e-2))
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)


def test_groups_with_different_schedules_are_never_stacked_together():
    cpu = torch.device("cpu")
    shapes = [(cpu, torch.float32, 1, 8, 8, 5, "quintic"), (cpu, torch.float32, 1, 8, 8, 5, "polar_express"),
              (cpu, torch.float32, 1, 8, 8, 5, "quintic"), (cpu, torch.float32, 1, 8, 8, 4, "quintic")]
    assert shape_batches(shapes) == [[0, 2], [1], [3]]
    a, b = torch.nn.Parameter(torch.zeros(8, 8)), torch.nn.Parameter(torch.zeros(8, 8))
    opt = Muon([{"params": [a]}, {"params": [b], "ns_coefficients": "polar_express", "ns_steps": 3}], lr=0.1,
               ns_dtype=torch.float32)
    g = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(24))
    a.grad, b.grad = g[0].clone(), g[1].clone()
    opt.step()
    nesterov = g * (1 - 0.95) * (1 + 0.95)
    torch.testing.assert_close(a.detach(), -0.1 * orthogonalize(nesterov[0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(b.detach(), -0.1 * orthogonalize(nesterov[1], steps=3, schedule="polar_express"),
                               rtol=0, atol=1e-6)
    assert opt.flops_per_step() == (5 + 3) * (4 * 8 ** 3 + 2 * 8 ** 3)

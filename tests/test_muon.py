"""Muon for the blocks' matrices, AdamW for the rest, as one optimizer (training/muon.py, optim.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sab_byon_omni.config import ModelConfig, TrainConfig
from sab_byon_omni.model.transformer import CausalTransformer
from sab_byon_omni.training.muon import MuonAdamW, orthogonalize
from sab_byon_omni.training.optim import lr_at, make_optimizer, set_lr


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


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_the_muon_update_is_torchs_muon_up_to_its_bf16_rounding():
    """Same momentum, Nesterov step, Newton-Schulz, decay and rate adjustment as torch.optim.Muon
    (which orthogonalises in bfloat16): after three steps the two updates point the same way."""
    torch.manual_seed(3)
    w0 = torch.randn(96, 32) * 0.05
    ours, theirs = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    a = MuonAdamW([{"params": [ours], "muon": True, "lr": 0.05, "weight_decay": 0.1}], lr=1e-3, betas=(0.9, 0.95))
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
    opt = MuonAdamW([{"params": [p], "muon": True, "split": 3, "lr": 0.1, "weight_decay": 0.5}], lr=1e-3,
                    betas=(0.9, 0.95))
    grad = torch.randn(48, 16)
    grad[:16] *= 100  # q's gradient is far larger: split, it must not drown k's and v's
    p.grad = grad
    opt.step()
    step = (w0 * (1 - 0.1 * 0.5) - p.detach()) / 0.1
    for i in range(3):
        block = slice(16 * i, 16 * (i + 1))
        assert torch.allclose(step[block], orthogonalize(grad[block]), atol=1e-5)
        assert torch.linalg.svdvals(step[block]).min() > 0.5


def test_rows_that_do_not_split_evenly_are_refused():
    with pytest.raises(ValueError, match="split into 3"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(10, 4))], "muon": True, "split": 3}], lr=1e-3,
                  betas=(0.9, 0.95))


def test_make_optimizer_gives_muon_the_blocks_matrices_and_adamw_the_rest():
    model = _model()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", learning_rate=3e-3, muon_learning_rate=0.07))
    assert isinstance(opt, MuonAdamW)
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
    assert isinstance(make_optimizer(model, TrainConfig()), torch.optim.AdamW)
    assert not isinstance(make_optimizer(model, TrainConfig()), MuonAdamW)  # the guide's job keeps plain AdamW


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


@pytest.mark.parametrize("split", [0, -3, 2.0, True, "3"])
def test_a_split_that_is_not_a_positive_integer_is_refused(split):
    with pytest.raises(ValueError, match="positive integer"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(6, 4))], "muon": True, "split": split}], lr=1e-3,
                  betas=(0.9, 0.95))

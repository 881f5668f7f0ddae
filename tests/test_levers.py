"""benchmarks/levers_step.py's matmul replay: the floor that ``levers.py matmul_floor`` sets a training
step against must run exactly the step's matrix multiplies (forward and backward), nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import levers_step  # noqa: E402


def test_the_replay_runs_the_steps_matmuls_forward_and_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)

    def step() -> None:
        net(x).square().sum().backward()

    replay = levers_step.matmul_replay(step)
    with levers_step._MatmulLog() as seen:
        replay()
    ops = [op.__name__ for op, _ in seen.calls]
    # forward: mm (no bias), addmm (bias); backward: two weight gradients and one input gradient
    # (the first layer's input needs none)
    assert sorted(ops) == sorted(["mm.default", "addmm.default", "mm.default", "mm.default", "mm.default"])
    shapes = {args[0][0] + args[1][0] if op.__name__ == "mm.default" else args[1][0] + args[2][0]
              for op, args in seen.calls}
    assert (5, 8, 8, 16) in shapes  # x @ W1^T
    assert (16, 5, 5, 8) in shapes  # dW1 = g^T @ x
    assert all(p.grad is not None for p in net.parameters())  # the capture ran the real step


def test_the_replay_keeps_each_operands_strides():
    a, b = torch.randn(6, 3), torch.randn(4, 3)

    def step() -> None:
        a @ b.t()  # the second operand is a transposed (non-contiguous) view

    replay = levers_step.matmul_replay(step)
    with levers_step._MatmulLog() as seen:
        replay()
    ((op, args),) = seen.calls
    assert args[1] == ((3, 4), (1, 3))


def test_muon_cost_interleaves_the_benchs_step_with_adamw_and_with_muon(monkeypatch):
    """``levers.py muon_cost``: the step ``sab-omni bench`` times (the Trainer's), once per optimizer,
    at each preset's shape; it prints times (no timed assertion here)."""
    import levers

    from sab_byon_omni.benchmark.train import OursStep

    seen = []
    monkeypatch.setattr(levers, "MUON_COST_SHAPES", (("tiny", 2, 16, ("fp32",), 1),))
    monkeypatch.setattr(levers, "interleave", lambda steps, reps: seen.append((steps, reps)))
    levers.bench_muon_cost(3)
    (steps, reps), = seen
    assert reps == 3 and all(isinstance(s, OursStep) for s in steps.values())
    assert [s.optimizer_kind() for s in steps.values()] == ["AdamW fused", "Muon + AdamW fused", "Muon + AdamW fused"]
    assert [g["ns_steps"] for s in list(steps.values())[1:] for g in s.trainer.run.optimizer.muon.param_groups][-1] == 3
    for step in steps.values():
        assert step() is True  # a real step


def test_every_import_of_the_package_in_the_benchmarks_resolves():
    """A benchmark imports names lazily, inside the function of its lever: a name moved or removed
    in the package must not leave a lever that fails only when someone runs it."""
    import ast
    import importlib
    from pathlib import Path

    missing = []
    for path in sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sab_byon_omni"):
                module = importlib.import_module(node.module)
                missing += [f"{path.name}: {node.module}.{a.name}" for a in node.names
                            if not hasattr(module, a.name) and not _is_module(f"{node.module}.{a.name}")]
    assert not missing, missing


def _is_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None

import math

import pytest
import torch

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.model import fragmergent as fm
from sab_byon_omni.model.fragmergent import Fragmergent, phi
from sab_byon_omni.model.transformer import CausalTransformer


def test_phi_formula():
    t = 1.7
    assert float(phi(t)) == pytest.approx(0.2 * math.exp(-0.02 * t) * math.sin(2.0 * t), rel=1e-6)
    assert float(phi(0.0)) == 0.0


def test_step_mode_scales_every_position_by_the_same_factor():
    m = Fragmergent("step")
    m.set_step(3)
    x = torch.randn(2, 50, 8)
    expected = 1 + 0.1 * float(phi(3.0))
    torch.testing.assert_close(m(x), x * expected)


def test_step_mode_wraps_at_the_period():
    m = Fragmergent("step")
    m.set_step(103)
    assert float(m.current_t()) == pytest.approx(3.0)


def test_fixed_and_off_modes():
    x = torch.randn(1, 4, 8)
    torch.testing.assert_close(Fragmergent("off")(x), x)
    torch.testing.assert_close(Fragmergent("fixed", t=0.5)(x), x * (1 + 0.1 * float(phi(0.5))))


def test_clock_mode_follows_the_wall_clock(monkeypatch):
    m = Fragmergent("clock")
    x = torch.ones(1, 2, 4)
    monkeypatch.setattr(fm.time, "time", lambda: 1000.25)
    a = m(x)
    monkeypatch.setattr(fm.time, "time", lambda: 1000.75)
    b = m(x)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(a, x * (1 + 0.1 * float(phi(0.25))))


@pytest.mark.parametrize("mode", ["step", "fixed", "off"])
def test_deterministic_modes_give_identical_models_and_outputs(mode):
    cfg = ModelConfig.from_name("tiny", vocab_size=96, fragmergent_mode=mode, fragmergent_t=1.0)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = CausalTransformer(cfg).eval()
        outs.append(model(torch.arange(1, 20).view(1, -1)))
    assert torch.equal(outs[0], outs[1])


def test_step_buffer_is_saved_with_the_model():
    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96))
    model.fragmergent.set_step(42)
    assert float(model.state_dict()["fragmergent.step"]) == 42.0

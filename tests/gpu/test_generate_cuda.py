"""KV-cache generation on a GPU equals the full forward, with the cache in the autocast dtype."""

from __future__ import annotations

import pytest
import torch

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.device import make_precision
from sab_byon_omni.model.generate import cache_dtype, generate_tokens
from sab_byon_omni.model.transformer import CausalTransformer, KVCache

pytestmark = pytest.mark.gpu


def _model(dev, preset):
    torch.manual_seed(3)
    return CausalTransformer(ModelConfig.from_name(preset, vocab_size=96, max_seq_len=128)).to(dev).eval()


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 0.1)])
def test_cached_logits_equal_the_full_forward(dev, sizes, precision, tol):
    model = _model(dev, sizes.preset)
    ids = torch.randint(1, 96, (2, 48), generator=torch.Generator().manual_seed(1)).to(dev)
    with make_precision(precision, dev).autocast(), torch.inference_mode():
        full = model(ids).float()
        cache = KVCache.empty(model.cfg, 2, 64, dev, cache_dtype(model, dev))
        assert cache.k[0].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        parts = [model(ids[:, :20], cache=cache), model(ids[:, 20:32], cache=cache)]
        parts += [model(ids[:, t:t + 1], cache=cache) for t in range(32, 48)]
    torch.testing.assert_close(torch.cat(parts, 1).float(), full, rtol=0, atol=tol)


def test_greedy_generation_with_and_without_the_cache_agree(dev, sizes):
    model = _model(dev, sizes.preset)
    prompt = list(range(5, 25))
    with_cache = list(generate_tokens(model, prompt, 40, temperature=0, use_cache=True))
    without = list(generate_tokens(model, prompt, 40, temperature=0, use_cache=False))
    assert with_cache == without and len(with_cache) == 40

import math

import pytest
import torch
import torch.nn.functional as F

from sab_byon_omni import estimate
from sab_byon_omni.config import ModelConfig
from sab_byon_omni.model.ops import linear
from sab_byon_omni.model.transformer import CausalTransformer, KVCache, apply_rope, rope_tables


def test_logits_shape_and_dtype(tiny_cfg):
    model = CausalTransformer(tiny_cfg)
    ids = torch.randint(0, 96, (3, 17))
    out = model(ids)
    assert out.shape == (3, 17, 96)
    assert out.dtype == torch.float32


def test_causal_mask_future_tokens_do_not_change_the_past(tiny_cfg):
    torch.manual_seed(0)
    model = CausalTransformer(tiny_cfg).eval()
    ids = torch.randint(1, 96, (2, 32))
    j = 20
    changed = ids.clone()
    changed[:, j] = (changed[:, j] + 7) % 95 + 1
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=1e-6)
    assert (a[:, j:] - b[:, j:]).abs().max() > 1e-4  # position j itself sees the change


def naive_attention(q, k, v):
    t = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def test_attention_matches_naive_masked_softmax(tiny_cfg):
    torch.manual_seed(1)
    model = CausalTransformer(tiny_cfg).eval()
    attn = model.blocks[0].attn
    x = torch.randn(2, 12, tiny_cfg.hidden)
    cos, sin = model.rope_cos[:12], model.rope_sin[:12]
    b, t, c = x.shape
    q, k, v = attn.qkv(x).view(b, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    expected = attn.proj(naive_attention(q, k, v).transpose(1, 2).reshape(b, t, c))
    torch.testing.assert_close(attn(x, cos, sin), expected, rtol=1e-5, atol=1e-5)


def test_rope_is_relative():
    # <R(m)q, R(n)k> depends only on m - n.
    cos, sin = rope_tables(8, 32)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def dot(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()
    torch.testing.assert_close(dot(5, 2), dot(20, 17), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dot(5, 2), dot(5, 4))


def test_tied_embeddings_and_parameter_count(tiny_cfg):
    model = CausalTransformer(tiny_cfg)
    assert model.head.weight is model.embed.weight
    h, f, l, v = tiny_cfg.hidden, tiny_cfg.ffn, tiny_cfg.n_layers, 96
    per_block = 4 * h * h + 2 * h * f + 2 * h
    assert model.num_parameters() == l * per_block + v * h + h


def test_lightweight_and_3b_parameter_counts():
    with torch.device("meta"):
        light = CausalTransformer(ModelConfig.from_name("lightweight", vocab_size=96))
        big = CausalTransformer(ModelConfig.from_name("3b", vocab_size=50_000))
    assert light.num_parameters() == 42_551_040
    # The "3b" preset is really ~7.45B parameters (FFN 16,384 x 36 layers).
    assert 7.4e9 < big.num_parameters() < 7.5e9


def test_sequence_longer_than_context_is_refused(tiny_cfg):
    model = CausalTransformer(tiny_cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, tiny_cfg.max_seq_len + 1, dtype=torch.long))


def test_padding_after_a_sequence_does_not_change_its_logits(tiny_cfg):
    model = CausalTransformer(tiny_cfg).eval()
    ids = torch.randint(1, 96, (1, 10))
    padded = F.pad(ids, (0, 6), value=0)
    torch.testing.assert_close(model(ids), model(padded)[:, :10], rtol=0, atol=1e-6)


def test_rope_equals_the_textbook_rotation():
    # x * cos + cat(-x2, x1) * sin, with the unsigned sine of the angles pos * base^(-2i/D).
    d, t = 16, 10
    cos, sin_signed = rope_tables(d, t)
    ang = torch.outer(torch.arange(t, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    sin = torch.cat([ang, ang], dim=-1).sin()
    x = torch.randn(2, 3, t, d)
    rotated = torch.cat([-x[..., d // 2:], x[..., :d // 2]], dim=-1)
    torch.testing.assert_close(apply_rope(x, cos, sin_signed), x * cos + rotated * sin)


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("n_threads", [2, 3])
def test_single_row_linear_split_across_threads_matches_f_linear(threads, n_threads, monkeypatch):
    threads(n_threads)
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(1) or real_bmm(*a))
    weight = torch.randn(768, 256)
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        out = linear(x, weight)
    assert calls, "one row on several threads takes the bmm path"
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    # Training and batches keep F.linear (and its autograd).
    calls.clear()
    w = weight.clone().requires_grad_()
    linear(x, w).sum().backward()
    linear(torch.randn(4, 256), weight)
    assert not calls
    torch.testing.assert_close(w.grad, x.reshape(1, -1).expand(768, -1))


def test_cached_decoding_on_several_threads_matches_the_full_forward(threads):
    threads(2)
    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name("small", vocab_size=96, max_seq_len=40)).eval()
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        full = model(ids)
        cache = KVCache.empty(model.cfg, 1, 40, torch.device("cpu"), torch.float32)
        parts = [model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- initial weights
@pytest.mark.parametrize("n_threads", [1, 3])
def test_initial_weights_are_the_same_in_any_split_of_rows(threads, n_threads, monkeypatch):
    """Any rows of a parameter can be drawn on their own (an FSDP shard) and equal the same rows of
    the whole parameter, across block boundaries and on any number of threads."""
    from sab_byon_omni.model import init as I

    monkeypatch.setattr(I, "BLOCK_ELEMENTS", 100)  # 7 rows of 14 per block: shards cross blocks
    threads(n_threads)
    shape = (61, 14)
    full = torch.empty(shape)
    I.init_rows(full, shape, seed=5, index=3, std=0.02)
    for cuts in ([0, 61], [0, 31, 61], [0, 3, 10, 29, 60, 61], [0, 0, 61, 61]):
        parts = []
        for a, b in zip(cuts, cuts[1:]):
            part = torch.full((b - a, 14), float("nan"), dtype=torch.float64)
            I.init_rows(part, shape, seed=5, index=3, std=0.02, start=a)
            parts.append(part.float())
        assert torch.equal(torch.cat(parts), full), cuts
    other = torch.empty(shape)
    I.init_rows(other, shape, seed=5, index=4, std=0.02)
    assert not torch.equal(other, full)  # each parameter has its own numbers
    assert abs(float(full.std()) - 0.02) < 0.003


def test_a_model_built_on_the_meta_device_materialises_to_the_normal_build(tiny_cfg):
    from sab_byon_omni.training.distributed import is_meta, materialize

    torch.manual_seed(11)
    normal = CausalTransformer(tiny_cfg)
    torch.manual_seed(11)
    with torch.device("meta"):
        meta = CausalTransformer(tiny_cfg)
    assert is_meta(meta) and not is_meta(normal)
    materialize(meta, torch.device("cpu"))
    assert meta.head.weight is meta.embed.weight  # still tied
    for (name, a), b in zip(normal.state_dict(keep_vars=True).items(), meta.state_dict(keep_vars=True).values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(normal.named_buffers(), meta.buffers()):  # RoPE tables (not saved) too
        assert torch.equal(a, b), name
    torch.manual_seed(12)
    assert not torch.equal(CausalTransformer(tiny_cfg).embed.weight, normal.embed.weight)


# ---- the speed/memory levers kept in the model must not change the math ------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gelu_recompute_mlp_gives_autograds_gradients(tiny_cfg, precision):
    import torch.nn.functional as F

    from sab_byon_omni.model.transformer import MLP

    torch.manual_seed(0)
    mlp = MLP(tiny_cfg)
    mlp.recompute_gelu = True  # the memory-saving path (the memory plan's choice)
    x = torch.randn(2, 8, 64)
    grads = []
    for fast in (True, False):
        xx = x.clone().requires_grad_()
        mlp.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = mlp(xx) if fast else mlp.down(F.gelu(mlp.up(xx), approximate="tanh"))
        (out.float() ** 2).sum().backward()
        grads.append((out.detach().float(), xx.grad, mlp.up.weight.grad.clone(), mlp.down.weight.grad.clone()))
    tol = {"rtol": 0, "atol": 0} if precision == "fp32" else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("saving, kept", [(True, 12), (False, 18)])
def test_training_keeps_fewer_activations(tiny_cfg, saving, kept):
    """GELU recomputed in backward and v copied out of the qkv output: per block, 12 tensors of
    hidden size per token are kept for backward instead of 18 (the estimator counts the same)."""
    from sab_byon_omni.model.transformer import Block

    block, rope = Block(tiny_cfg, 0), CausalTransformer(tiny_cfg)
    block.attn.copy_v = block.mlp.recompute_gelu = saving
    x = torch.randn(1, 32, 64, requires_grad=True)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params and t.numel() >= 32 * 64:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope.rope_cos[:32], rope.rope_sin[:32])
    assert sum(saved.values()) / (32 * 64 * 4) == kept
    per_token = estimate.block_activation_bytes(tiny_cfg, 4, memory_saving=saving) - 4 * tiny_cfg.n_heads
    assert per_token == kept * 64 * 4


def test_rotating_q_and_k_together_gives_the_same_bits(tiny_cfg):
    """The attention's q and k rotated as one (B, T, 2, H, D) tensor: the numbers of rotating each
    (B, H, T, D) view on its own, forward and backward."""
    import torch.nn.functional as F

    from sab_byon_omni.model.transformer import apply_rope

    torch.manual_seed(0)
    model = CausalTransformer(tiny_cfg)
    attn, (cos, sin) = model.blocks[0].attn, (model.rope_cos[:16], model.rope_sin[:16])
    x = torch.randn(2, 16, 64)
    outs = []
    for together in (True, False):
        xx = x.clone().requires_grad_()
        attn.zero_grad()
        if together:
            y = attn(xx, cos, sin)
        else:
            q, k, v = attn.qkv(xx).view(2, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = attn.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 16, 64))
        (y ** 2).sum().backward()
        outs.append((y.detach(), xx.grad, attn.qkv.weight.grad.clone()))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_memory_saving_keeps_the_models_gradients_bit_for_bit(tiny_cfg):
    """Each trick alone and both (as the memory plan switches them): the same loss and gradients."""
    from sab_byon_omni.loss import causal_lm_loss

    torch.manual_seed(0)
    model = CausalTransformer(tiny_cfg)
    ids = torch.randint(1, 96, (2, 24))
    results = []
    for copy_v, recompute in ((False, False), (True, False), (False, True), (True, True)):
        for block in model.blocks:
            block.attn.copy_v, block.mlp.recompute_gelu = copy_v, recompute
        model.zero_grad(set_to_none=True)
        loss = causal_lm_loss(model(ids), ids)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
    model.set_memory_saving(True)
    assert all(b.attn.copy_v and b.mlp.recompute_gelu for b in model.blocks)

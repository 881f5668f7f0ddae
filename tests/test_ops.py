"""model/ops.py: the head's loss computed a few rows at a time (``linear_cross_entropy``) equals the
two ops it replaces, in value and gradients, and keeps less for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.loss import causal_lm_loss, model_loss
from sab_byon_omni.model import ops
from sab_byon_omni.model.transformer import CausalTransformer


def _case(n: int, hidden: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.1).requires_grad_()
    y = torch.randint(0, vocab, (n,), generator=g)
    y[::4] = -100
    return x, w, y


def _grads(loss_fn, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype = torch.float32, scale: float = 0.37):
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss = loss_fn()
    (loss * scale).backward()
    return loss.detach(), x.grad.clone(), w.grad.clone()


def _textbook(x, w, y, softcap=0.0):
    z = F.linear(x, w)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.float(), y, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("rows", [1, 3, 1000])  # one row at a time, a ragged last chunk, all rows at once
@pytest.mark.parametrize("softcap", [0.0, 2.5])
def test_equals_linear_then_cross_entropy_in_fp32(monkeypatch, rows, softcap):
    monkeypatch.setattr(ops, "head_chunk_rows", lambda vocab, device: rows)
    x, w, y = _case(10, 16, 37)
    want = _grads(lambda: _textbook(x, w, y, softcap), x, w)
    got = _grads(lambda: ops.linear_cross_entropy(x, w, y, softcap), x, w)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the path without gradients: the same loss
        torch.testing.assert_close(ops.linear_cross_entropy(x, w, y, softcap), want[0], rtol=1e-5, atol=1e-6)


def test_bf16_is_as_close_to_fp32_as_the_two_ops_under_autocast():
    x, w, y = _case(64, 32, 500, seed=1)
    truth = _grads(lambda: _textbook(x, w, y), x, w)
    plain = _grads(lambda: _textbook(x, w, y), x, w, torch.bfloat16)
    fused = _grads(lambda: ops.linear_cross_entropy(x, w, y), x, w, torch.bfloat16)
    assert fused[1].dtype == x.dtype and fused[2].dtype == w.dtype
    for i in (1, 2):
        err = lambda g: float((g[i] - truth[i]).norm() / truth[i].norm())  # noqa: E731
        assert err(fused) <= 1.05 * err(plain) + 1e-6, (i, err(fused), err(plain))
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-4, atol=1e-3)


def test_ignored_rows_give_nothing():
    x, w, y = _case(6, 8, 11)
    y[:] = -100
    loss, gx, gw = _grads(lambda: ops.linear_cross_entropy(x, w, y), x, w)
    assert float(loss) == 0.0 and not gx.any() and not gw.any()


def test_a_large_incoming_gradient_stays_finite_in_fp16():
    """A GradScaler's scale arrives as the incoming gradient: fp16 inputs must not overflow with it."""
    x, w, y = _case(8, 16, 50)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = ops.linear_cross_entropy(x * 30, w, y)
    (loss * 2.0**16).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_keeps_no_fp32_logits_for_backward():
    """Under bf16 autocast only the bf16 logits (as their gradient) and the bf16 inputs are kept: the
    two ops keep an fp32 log-softmax of every logit as well."""
    x, w, y = _case(256, 16, 1000)
    for fn, most in ((lambda: _textbook(x, w, y), None), (lambda: ops.linear_cross_entropy(x, w, y), 0)):
        kept: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fn()
        fp32_vocab = [t for t in kept if t.dtype == torch.float32 and tuple(t.shape) == (256, 1000)]
        if most is None:
            assert fp32_vocab  # the textbook keeps fp32 logits: the check can see them
        else:
            assert len(fp32_vocab) == most
            assert sum(t.numel() * t.element_size() for t in kept) <= 256 * 1000 * 2 + (256 + 1000) * 16 * 2


@pytest.mark.parametrize("tie", [True, False])
def test_the_models_loss_equals_the_loss_of_its_logits(tie):
    cfg = ModelConfig.from_name("tiny", vocab_size=40, hidden=32, n_layers=2, n_heads=4, ffn=64,
                                tie_embeddings=tie, logit_softcap=5.0)
    torch.manual_seed(0)
    model = CausalTransformer(cfg)
    ids = torch.randint(0, 40, (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    model.zero_grad()
    want = causal_lm_loss(model(ids), labels)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = model_loss(model, ids, labels)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_estimate_counts_the_rows_the_head_takes_at_once():
    from sab_byon_omni import estimate

    assert estimate.HEAD_CHUNK_BYTES == ops.HEAD_CHUNK_BYTES


def test_bad_targets_get_the_errors_of_cross_entropy():
    x, w, _ = _case(6, 8, 11)
    for targets, error in ((torch.tensor([3]), ValueError), (torch.randint(0, 11, (7,)), ValueError),
                           (torch.tensor([0, 1, 2, 3, 4, 11]), (IndexError, RuntimeError)),
                           (torch.tensor([0, 1, 2, 3, 4, -1]), (IndexError, RuntimeError))):
        with pytest.raises(error, match="batch_size|out of bounds"):
            F.cross_entropy(F.linear(x, w), targets, reduction="sum")
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(error, match="batch_size|out of bounds"):
                ops.linear_cross_entropy(x, w, targets)


def test_a_non_finite_ignored_row_leaves_the_loss_finite():
    """As with F.cross_entropy: a padded or prompt position whose hidden state overflowed (fp16) does
    not turn an evaluation's loss into NaN, and gets no gradient (the weight's gradient takes the
    NaN from the input itself, as the two ops' does)."""
    x, w, y = _case(6, 8, 11)
    with torch.no_grad():
        x[4], x[5] = float("inf"), float("nan")
    y[4:] = -100
    want = F.cross_entropy(F.linear(x, w), y, reduction="sum")
    assert torch.isfinite(want)
    for softcap in (0.0, 3.0):
        with torch.no_grad():
            assert torch.isfinite(ops.linear_cross_entropy(x, w, y, softcap))
        loss, gx, _ = _grads(lambda: ops.linear_cross_entropy(x, w, y, softcap), x, w)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and not gx[4:].any()
        if not softcap:
            torch.testing.assert_close(loss, want)


def test_differentiating_twice_is_refused_in_words():
    x, w, y = _case(6, 8, 11)
    loss = ops.linear_cross_entropy(x, w, y)
    with pytest.raises(RuntimeError, match="cannot be differentiated twice"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_runs_on_the_meta_device_like_the_two_ops():
    """Shapes only (a model built on the meta device, as FSDP's initialisation does): no autocast there."""
    x = torch.randn(4, 8, device="meta", requires_grad=True)
    w = torch.randn(11, 8, device="meta", requires_grad=True)
    loss = ops.linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long, device="meta"))
    loss.backward()
    assert loss.shape == () and x.grad.shape == (4, 8) and w.grad.shape == (11, 8)


def _attention_inputs(t: int, heads: int = 9, kv_heads: int = 3, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(t)
    q = (torch.randn(2, t, heads, 16, generator=g) * 2).to(dtype).transpose(1, 2).requires_grad_()
    k, v = ((torch.randn(2, t, kv_heads, 16, generator=g)).to(dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(2, heads, t, 16, generator=g).to(dtype)


def _attention_grads(fn, q, k, v, grad):
    q.grad = k.grad = v.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _sdpa(q, k, v):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_attention_with_the_fp32_backward_gives_sdpas_output_and_better_gradients(dtype):
    q, k, v, grad = _attention_inputs(40, dtype=dtype)
    ours = _attention_grads(ops.CausalAttentionCpu.apply, q, k, v, grad)
    sdpa = _attention_grads(_sdpa, q, k, v, grad)
    exact = _attention_grads(_sdpa, *(x.detach().double().requires_grad_() for x in (q, k, v)), grad.double())
    torch.testing.assert_close(ours[0], sdpa[0], rtol=0, atol=0)  # the same forward kernel
    for a, b, e in zip(ours[1:], sdpa[1:], exact[1:]):  # dq, dk (summed over each group's 3 heads), dv
        assert a.dtype == dtype and a.shape == b.shape
        scale = e.abs().max().item()
        ours_err, sdpa_err = ((x.double() - e).abs().max().item() / scale for x in (a, b))
        assert ours_err < 0.02 and ours_err <= 1.5 * sdpa_err + 1e-3, (ours_err, sdpa_err)


@pytest.mark.parametrize(("t", "dtype", "kw", "grad", "taken"), [
    (ops.FP32_ATTENTION_BACKWARD_MAX_LEN, torch.bfloat16, {}, True, True),
    (ops.FP32_ATTENTION_BACKWARD_MAX_LEN + 1, torch.bfloat16, {}, True, False),  # long windows: bf16 kernel faster
    (16, torch.float32, {}, True, False),  # fp32: the same kernel either way
    (16, torch.bfloat16, {}, False, False),  # no gradient: plain SDPA
    (16, torch.bfloat16, {"dropout_p": 0.1}, True, False),
    (16, torch.bfloat16, {"attn_mask": torch.ones(16, 16, dtype=torch.bool).tril()}, True, False),
])
def test_attend_takes_the_fp32_backward_only_for_short_causal_reduced_precision_windows(monkeypatch, t, dtype, kw,
                                                                                        grad, taken):
    from sab_byon_omni.model import transformer

    calls = []
    monkeypatch.setattr(ops.CausalAttentionCpu, "apply", lambda *a: calls.append(a) or _sdpa(*a))
    q, k, v, _ = _attention_inputs(t, dtype=dtype)
    with torch.set_grad_enabled(grad):
        transformer.attend(q, k, v, **({"is_causal": True} if "attn_mask" not in kw else {}), **kw)
    assert bool(calls) == taken


def test_a_bf16_training_step_with_the_fp32_attention_backward_matches_sdpas(monkeypatch):
    cfg = ModelConfig.from_name("tiny", vocab_size=50, n_kv_heads=2)
    ids = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(0))

    def grads(max_len: int) -> list[torch.Tensor]:
        monkeypatch.setattr(ops, "FP32_ATTENTION_BACKWARD_MAX_LEN", max_len)
        torch.manual_seed(0)
        model = CausalTransformer(cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model_loss(model, ids[:, :-1], ids[:, 1:]).backward()
        return [p.grad for p in model.parameters()]

    with_fp32, with_sdpa = grads(ops.FP32_ATTENTION_BACKWARD_MAX_LEN), grads(0)
    assert any(not torch.equal(a, b) for a, b in zip(with_fp32, with_sdpa))  # the path was taken
    for a, b in zip(with_fp32, with_sdpa):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item() + 1e-6)


def _norm_case(dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 7, 48, generator=g) * 3).requires_grad_()
    w = (torch.rand(48, generator=g) + 0.5).requires_grad_()
    return x, w, torch.randn(3, 7, 48, generator=g).to(dtype)


def _norm_grads(fn, x, w, grad, autocast: bool):
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, w)
    y.backward(grad.to(y.dtype))
    return y.detach(), x.grad, w.grad


def test_rmsnorm_for_training_equals_torchs_in_fp32():
    x, w, grad = _norm_case()
    ours = _norm_grads(lambda x, w: ops.RMSNormCpu.apply(x, w, 1e-5, torch.float32), x, w, grad, False)
    ref = _norm_grads(lambda x, w: F.rms_norm(x, (48,), w, 1e-5), x, w, grad, False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rmsnorm_for_training_under_autocast_gives_the_matmuls_dtype_and_the_same_gradients():
    x, w, grad = _norm_case(torch.bfloat16)
    ours = _norm_grads(lambda x, w: ops.RMSNormCpu.apply(x, w, 1e-5, torch.bfloat16), x, w, grad, True)
    ref = _norm_grads(lambda x, w: F.rms_norm(x, (48,), w, 1e-5).to(torch.bfloat16), x, w, grad, True)
    assert ours[0].dtype == torch.bfloat16 and ours[1].dtype == ours[2].dtype == torch.float32
    torch.testing.assert_close(ours[0], ref[0], rtol=0.008, atol=1e-5)  # fp32 maths, one rounding to bf16
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("grad", "autocast", "dtype"), [(True, False, torch.float32), (True, True, torch.bfloat16),
                                                         (False, True, torch.float32), (False, False, torch.float32)])
def test_the_models_rmsnorm_trains_through_it_and_infers_as_torch(grad, autocast, dtype):
    from sab_byon_omni.model.transformer import make_norm

    norm = make_norm(ModelConfig.from_name("tiny", vocab_size=50, norm="rmsnorm"))
    assert isinstance(norm, torch.nn.RMSNorm) and list(norm.state_dict()) == ["weight"]
    x = torch.randn(2, 5, 64, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
        ref = F.rms_norm(x, (64,), norm.weight, norm.eps)
    assert y.dtype == dtype and (y.grad_fn is not None) == grad
    assert (type(y.grad_fn).__name__ == "RMSNormCpuBackward") == grad
    torch.testing.assert_close(y, ref.to(dtype), rtol=0.008 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_torch_func_and_double_backward_take_the_plain_ops():
    """The Functions have no vmap/jvp rules: under torch.func the model runs nn.RMSNorm and SDPA; a
    second derivative through the norm is the plain ops' one."""
    from sab_byon_omni.model import transformer

    norm = transformer.make_norm(ModelConfig.from_name("tiny", vocab_size=50, norm="rmsnorm"))
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    ref = torch.nn.RMSNorm(64, eps=norm.eps)
    ref.weight = torch.nn.Parameter(norm.weight.detach().clone())
    x = torch.randn(3, 5, 64, requires_grad=True)

    def loss(module, x):
        return module(x).square().sum()

    torch.testing.assert_close(torch.func.grad(lambda x: loss(norm, x))(x), torch.func.grad(lambda x: loss(ref, x))(x))
    assert type(norm(x).grad_fn).__name__ == "RMSNormCpuBackward"  # plain autograd: the fast path
    second = []
    for module in (norm, ref):
        x.grad = None
        (g,) = torch.autograd.grad(loss(module, x), x, create_graph=True)
        g.square().sum().backward()
        second.append(x.grad)
    torch.testing.assert_close(second[0], second[1], rtol=1e-4, atol=1e-4)  # through 1/rms too
    torch.testing.assert_close(norm.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    q, k, v, _ = _attention_inputs(16)
    calls = []
    real = ops.CausalAttentionCpu.apply
    ops.CausalAttentionCpu.apply = lambda *a: calls.append(1) or real(*a)
    try:
        torch.func.grad(lambda q: transformer.attend(q, k, v, is_causal=True).float().sum())(q.detach())
        assert not calls
        transformer.attend(q, k, v, is_causal=True)
        assert calls
    finally:
        ops.CausalAttentionCpu.apply = real


def test_attention_with_a_strided_head_dimension_takes_sdpa():
    q, k, v = (torch.randn(1, 2, 16, 8, 2, dtype=torch.bfloat16)[..., 0].requires_grad_() for _ in range(3))
    assert not ops.fp32_attention_backward(q, k, v)
    assert ops.fp32_attention_backward(*(t.detach().contiguous().requires_grad_() for t in (q, k, v)))


def test_batched_gradients_and_torch_func_through_the_models_loss():
    """vmap over the backward (jacobian(vectorize=True)) runs RMSNormCpu's backward batched; the
    head's loss under torch.func.grad is the two plain ops'."""
    from torch.func import functional_call

    from sab_byon_omni.model import transformer

    norm = transformer.make_norm(ModelConfig.from_name("tiny", vocab_size=50, norm="rmsnorm"))
    ref = torch.nn.RMSNorm(64, eps=norm.eps)
    x = torch.randn(2, 64, requires_grad=True)
    torch.testing.assert_close(torch.autograd.functional.jacobian(norm, x, vectorize=True),
                               torch.autograd.functional.jacobian(ref, x, vectorize=True), rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=50, norm="rmsnorm", mlp="swiglu"))
    ids = torch.randint(0, 50, (2, 9))
    params = dict(model.named_parameters())
    grads = torch.func.grad(lambda p: functional_call(model, p, (ids[:, :-1],), {"targets": ids[:, 1:]}))(params)
    model(ids[:, :-1], targets=ids[:, 1:]).backward()  # LinearCrossEntropy and RMSNormCpu
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5)

"""The architecture options of the one model class (norm, MLP, grouped-query attention, RoPE base,
fraction and scaling, learned positions, parallel residual, biases): the SAB model and its
checkpoints unchanged, each option against a plain reference, the KV cache, the estimator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sab_byon_omni import estimate
from sab_byon_omni.config import ModelConfig
from sab_byon_omni.errors import SabError
from sab_byon_omni.model.generate import generate_tokens
from sab_byon_omni.model.transformer import CausalTransformer, KVCache, rope_frequencies

DATA = Path(__file__).parent / "data"
SEPARATOR = 7  # the document_mask_id of the options that mask documents
SMALL = dict(preset="tiny", hidden=32, n_heads=4, n_layers=2, ffn=48, max_seq_len=40, vocab_size=50)
# One configuration per option, and the open families' combinations of them.
OPTIONS = {
    "sab": {},
    "rmsnorm": dict(norm="rmsnorm", norm_eps=1e-6),
    "layernorm-bias": dict(norm_bias=True),
    "swiglu": dict(mlp="swiglu"),
    "exact-gelu": dict(gelu_approximate="none"),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "rope-base-fraction": dict(rope_base=500.0, rope_fraction=0.5),
    "rope-linear": dict(rope_scaling="linear", rope_scaling_factor=4.0),
    "rope-llama3": dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=16),
    "learned": dict(positions="learned"),
    "parallel": dict(parallel_residual=True),
    "bias": dict(bias=True),
    "qkv-bias": dict(qkv_bias=True),
    "untied": dict(tie_embeddings=False),
    "llama": dict(family="llama", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, fragmergent_mode="off"),
    "qwen2": dict(family="qwen2", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, qkv_bias=True, fragmergent_mode="off"),
    "gpt2": dict(family="gpt2", norm_bias=True, bias=True, positions="learned", fragmergent_mode="off"),
    "gpt_neox": dict(family="gpt_neox", norm_bias=True, bias=True, parallel_residual=True, rope_fraction=0.5,
                     gelu_approximate="none", tie_embeddings=False, fragmergent_mode="off"),
    # the speed-run levers (docs/RECIPES.md), alone and together
    "qk-norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "softcap": dict(logit_softcap=2.0),
    "value-embed": dict(value_embed=True, n_kv_heads=2),
    "unet-skips": dict(unet_skips=True, n_layers=5),
    "document-mask": dict(document_mask_id=SEPARATOR),
    "all-levers": dict(qk_norm=True, mlp="relu2", logit_softcap=2.0, value_embed=True, unet_skips=True,
                       n_layers=4, document_mask_id=SEPARATOR, norm="rmsnorm", zero_init_proj=True),
}


def _model(seed: int = 0, **options) -> CausalTransformer:
    torch.manual_seed(seed)
    model = CausalTransformer(ModelConfig(**{**SMALL, **options})).eval()
    with torch.no_grad():  # biases and gains away from their initial zeros and ones, so that they count
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_a_checkpoint_written_by_main_gives_the_same_logits_and_tokens():
    """tests/data/main_step3.pt: 3 training steps of main before the options existed (untied head,
    fragmergent step 3), with its fp32 logits, greedy tokens and a seed's initial weights."""
    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2

    ref = torch.load(DATA / "main_step3_logits.pt")
    model = SABTranscendentV2.load(DATA / "main_step3.pt").model.float().eval()
    with torch.no_grad():
        assert torch.equal(model(ref["ids"]), ref["logits"])
    assert list(generate_tokens(model, ref["greedy_prompt"], 20, temperature=0, top_k=None)) == ref["greedy"]
    torch.manual_seed(0)
    fresh = CausalTransformer(ModelConfig(**{**SMALL, "n_heads": 2, "ffn": 64, "max_seq_len": 32, "vocab_size": 96}))
    state = fresh.state_dict()
    assert list(state) == list(ref["init_seed0"])  # the same names in the same order
    assert all(torch.equal(state[k], v) for k, v in ref["init_seed0"].items())  # the same initial weights


def test_the_sab_parameter_names_stay_and_options_add_their_own():
    names = lambda **o: {n for n, _ in CausalTransformer(ModelConfig(**{**SMALL, **o})).named_parameters()}  # noqa: E731
    sab = names()
    assert sab == {"embed.weight", "norm.weight", *(f"blocks.{i}.{p}.weight" for i in range(2) for p in (
        "norm1", "attn.qkv", "attn.proj", "norm2", "mlp.up", "mlp.down"))}
    assert names(norm="rmsnorm", mlp="swiglu", n_kv_heads=2, rope_base=1e6) == sab  # same names, other shapes
    assert names(positions="learned") == sab | {"pos.weight"}
    assert names(qkv_bias=True) == sab | {f"blocks.{i}.attn.qkv.bias" for i in range(2)}
    assert names(bias=True) - sab == {f"blocks.{i}.{p}.bias" for i in range(2)
                                      for p in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    assert names(norm_bias=True) - sab == {"norm.bias", *(f"blocks.{i}.{n}.bias" for i in range(2)
                                                          for n in ("norm1", "norm2"))}
    model = CausalTransformer(ModelConfig(**SMALL, n_kv_heads=1, mlp="swiglu", bias=True))
    assert model.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 1) * 8, 32)
    assert model.blocks[0].mlp.up.weight.shape == (2 * 48, 32)
    assert all(not torch.count_nonzero(p) for n, p in model.named_parameters() if n.endswith(".bias"))  # zeros
    assert {k for k in model.state_dict() if "rope" in k} == set()  # rotary tables are not saved


def _reference(model: CausalTransformer, ids: torch.Tensor) -> torch.Tensor:
    """The forward written out from the textbook definitions, one option at a time."""
    cfg = model.cfg
    h, kv, d, rot = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.rotary_dim
    t = ids.shape[1]

    def norm(m, x):
        if cfg.norm == "rmsnorm":
            return m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
        return F.layer_norm(x, (cfg.hidden,), m.weight, m.bias, cfg.norm_eps)

    def rotate(x):  # rotate-half on the first ``rot`` dimensions of (B, H, T, D)
        ang = torch.outer(torch.arange(t, dtype=torch.float32), rope_frequencies(cfg))
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        x1, x2, rest = x[..., :rot // 2], x[..., rot // 2:rot], x[..., rot:]
        return torch.cat([x[..., :rot] * cos + torch.cat([-x2, x1], -1) * sin, rest], -1)

    def rms(x, gain):  # per head
        return gain * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    x = model.fragmergent(model.embed(ids))
    if cfg.positions == "learned":
        x = x + model.pos.weight[:t]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if cfg.document_mask_id is not None:  # document of each token: separators before it
        doc = torch.tensor([[sum(int(z) == cfg.document_mask_id for z in row[:i]) for i in range(t)] for row in ids])
        mask = mask & (doc[:, :, None] == doc[:, None, :])[:, None]
    outputs = []
    for i, block in enumerate(model.blocks):
        if cfg.unet_skips and i >= cfg.n_layers - cfg.n_layers // 2:  # block n-1-j reads block j's output
            x = x + model.skip_gains[i - (cfg.n_layers - cfg.n_layers // 2)] * outputs[cfg.n_layers - 1 - i]
        a, m = block.attn, block.mlp
        q, k, v = F.linear(norm(block.norm1, x), a.qkv.weight, a.qkv.bias).split((h * d, kv * d, kv * d), -1)
        if cfg.value_embed:
            v = v + a.value_gate * model.value_embed.weight[ids]
        q, k, v = (z.view(*ids.shape, -1, d).transpose(1, 2) for z in (q, k, v))
        if cfg.qk_norm:
            q, k = rms(q, a.q_norm.weight), rms(k, a.k_norm.weight)
        if cfg.positions == "rope":
            q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~mask, float("-inf"))
        y = F.linear((scores.softmax(-1) @ v).transpose(1, 2).reshape(*ids.shape, -1), a.proj.weight, a.proj.bias)
        u = F.linear(norm(block.norm2, x if cfg.parallel_residual else x + y), m.up.weight, m.up.bias)
        if cfg.mlp == "swiglu":
            gate, up = u.chunk(2, -1)
            u = F.silu(gate) * up
        elif cfg.mlp == "relu2":
            u = torch.where(u > 0, u * u, 0.0)
        else:
            u = F.gelu(u, approximate=cfg.gelu_approximate)
        x = x + y + F.linear(u, m.down.weight, m.down.bias)
        outputs.append(x)
    logits = F.linear(norm(model.norm, x), model.head.weight)
    return cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap) if cfg.logit_softcap else logits


@pytest.mark.parametrize("options", list(OPTIONS.values()), ids=list(OPTIONS))
def test_each_option_matches_its_textbook_forward_and_the_kv_cache(options):
    model = _model(**options)
    ids = torch.randint(0, 50, (2, 30), generator=torch.Generator().manual_seed(1))
    ids[ids == SEPARATOR] = SEPARATOR + 1
    ids[0, [3, 8, 15, 24]] = ids[1, [0, 19, 20]] = SEPARATOR  # documents end in the prompt, a chunk, a decoded step
    with torch.inference_mode():
        full = model(ids)
        torch.testing.assert_close(full, _reference(model, ids), rtol=1e-5, atol=1e-5)
        cache = KVCache.empty(model.cfg, 2, 40, torch.device("cpu"), torch.float32)
        parts = [model(ids[:, :9], cache=cache), model(ids[:, 9:20], cache=cache)]  # prompt, then a chunk
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(20, 30)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.k[0].shape[1] == model.cfg.kv_heads  # the cache holds only the key/value heads


def test_the_estimator_counts_every_option_exactly():
    for name, options in OPTIONS.items():
        for extra in ({}, dict(n_layers=3, ffn=40, tie_embeddings=not options.get("tie_embeddings", True))):
            cfg = ModelConfig(**{**SMALL, **options, **extra})
            with torch.device("meta"):
                model = CausalTransformer(cfg)
            assert estimate.num_parameters(cfg) == model.num_parameters(), name
            matrices = sum(p.numel() for p, _ in model.muon_matrices()) + cfg.vocab_size * cfg.hidden
            assert estimate.matmul_params(cfg) == matrices, name


def test_smollm2_135m_has_its_published_parameter_count():
    cfg = ModelConfig(preset="small", family="llama", hidden=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn=1536,
                      vocab_size=49152, max_seq_len=8192, norm="rmsnorm", mlp="swiglu", rope_base=100000.0)
    assert estimate.num_parameters(cfg) == 134_515_008  # HuggingFaceTB/SmolLM2-135M
    with torch.device("meta"):
        assert CausalTransformer(cfg).num_parameters() == 134_515_008


def test_muon_matrices_name_each_hidden_matrix_with_its_row_blocks():
    model = CausalTransformer(ModelConfig(**SMALL, n_kv_heads=1, mlp="swiglu", bias=True))
    got = model.muon_matrices()
    blocks = [(p.shape, rows) for p, rows in got]
    assert blocks[:4] == [((48, 32), [32, 8, 8]), ((32, 32), 1), ((96, 32), 2), ((32, 48), 1)]
    assert len(got) == 4 * 2 and all(p.shape[0] % rows == 0 if isinstance(rows, int) else sum(rows) == p.shape[0] for p, rows in got)
    hidden = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert {id(p) for p, _ in got} == hidden  # every block matrix, nothing else
    sab = CausalTransformer(ModelConfig(**SMALL)).muon_matrices()
    assert [rows for _, rows in sab[:4]] == [3, 1, 1, 1]  # equal thirds: the SAB qkv, as Muon's split


@pytest.mark.parametrize("options", [dict(bias=True), dict(gelu_approximate="none", bias=True),
                                     dict(mlp="swiglu", n_kv_heads=2)], ids=["bias", "exact-gelu", "swiglu-gqa"])
def test_memory_saving_gives_the_same_gradients(options):
    model = _model(**options).train()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for saving in (False, True):
        model.set_memory_saving(saving)
        model.zero_grad()
        model(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
    if options.get("mlp") == "swiglu":  # no GELU to recompute
        assert not any(b.mlp.recompute_gelu for b in model.blocks)


def test_llama3_rope_scaling_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig(**SMALL, rope_base=500000.0, rope_scaling="llama3", rope_scaling_factor=32.0,
                      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192)
    theirs = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    inv, scale = ROPE_INIT_FUNCTIONS["llama3"](theirs, "cpu")
    torch.testing.assert_close(rope_frequencies(cfg), inv.float(), rtol=1e-6, atol=0)
    assert scale == 1.0


@pytest.mark.parametrize("options, message", [
    (dict(n_kv_heads=3), "n_kv_heads=3 does not divide model.n_heads=4"),
    (dict(n_kv_heads=0), "n_kv_heads=0 must be a positive integer"),
    (dict(norm="batchnorm"), "model.norm='batchnorm' is not one of: layernorm, rmsnorm"),
    (dict(mlp="relu3"), "model.mlp='relu3' is not one of: gelu, swiglu, relu2"),
    (dict(logit_softcap=-1.0), "model.logit_softcap=-1.0 must be 0 .off. or between 1 and 10,000"),
    (dict(logit_softcap=1e308), "model.logit_softcap=1e.308 must be 0 .off. or between 1 and 10,000"),
    (dict(logit_softcap=1e-30), "model.logit_softcap=1e-30 must be 0 .off. or between 1 and 10,000"),
    (dict(document_mask_id=-2), "model.document_mask_id=-2 must be a token id"),
    (dict(document_mask_id=96), "model.document_mask_id=96 must be a token id of the vocabulary .0 to 49."),
    (dict(family="llama4"), "model.family='llama4' is not one of"),
    (dict(rope_fraction=0.1), r"x model.rope_fraction=0 must be even"),
    (dict(rope_fraction=1.5), "rope_fraction=1.5 must be at most 1"),
    (dict(rope_base=float("nan")), "rope_base=nan must be a positive number"),
    (dict(norm_eps=0.0), "norm_eps=0.0 must be a positive number"),
    (dict(rope_scaling="yarn"), "rope_scaling='yarn' is not one of: none, linear, llama3"),
])
def test_bad_options_are_one_line_naming_the_field(options, message):
    with pytest.raises(SabError, match=message):
        ModelConfig(**{**SMALL, **options})
    ModelConfig(**{**SMALL, "hidden": 36, "n_heads": 4, "positions": "learned"})  # odd heads need no rotary


def test_grouped_heads_without_sdpa_gqa_give_the_same_logits(monkeypatch):
    """torch 2.4 has no enable_gqa: the key/value heads are repeated instead, the same numbers."""
    import sab_byon_omni.model.transformer as T

    model = _model(n_kv_heads=2)
    ids = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = model(ids)
        monkeypatch.setattr(T, "SDPA_GQA", False)
        torch.testing.assert_close(model(ids), fused, rtol=1e-6, atol=1e-6)


def test_one_row_decoding_with_biases_on_several_threads_matches_f_linear():
    from sab_byon_omni.model.ops import linear

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w, b, x = torch.randn(512, 256), torch.randn(512), torch.randn(1, 1, 256)
        with torch.no_grad():
            torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


def test_zero_init_proj_starts_each_block_as_the_identity_and_still_learns():
    model = CausalTransformer(ModelConfig(**SMALL, zero_init_proj=True))
    outputs = [p for n, p in model.named_parameters() if n.endswith(("attn.proj.weight", "mlp.down.weight"))]
    assert len(outputs) == 4 and all(not torch.count_nonzero(p) for p in outputs)
    assert all(torch.count_nonzero(b.attn.qkv.weight) for b in model.blocks)  # the others as before
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # the blocks add nothing: the logits are the embedding's, normed, times the head
        torch.testing.assert_close(model(ids), F.linear(model.norm(model.fragmergent(model.embed(ids))),
                                                       model.head.weight))
    model(ids).logsumexp(-1).sum().backward()
    assert all(torch.count_nonzero(p.grad) for p in outputs)  # the zeros get gradients: they learn


def test_levers_off_leave_the_initial_weights_as_they_were():
    """Each lever is off by default; switched on, it changes only what it names (same seed)."""
    torch.manual_seed(0)
    sab = CausalTransformer(ModelConfig(**SMALL)).state_dict()
    for options in (dict(logit_softcap=30.0), dict(document_mask_id=3), dict(qk_norm=True), dict(mlp="relu2"),
                    dict(value_embed=True), dict(unet_skips=True)):
        torch.manual_seed(0)
        state = CausalTransformer(ModelConfig(**SMALL, **options)).state_dict()
        assert all(torch.equal(state[k], v) for k, v in sab.items()), options


@pytest.mark.parametrize("tokenizer, mask_id, says", [
    ("char96", 1, "the char96 tokenizer has no <EOS>"),
    ("byte", 103, "the byte tokenizer's <EOS> is 1; use --document_mask_id 1"),
])
def test_document_mask_id_must_be_the_tokenizers_eos(tmp_path, capsys, tokenizer, mask_id, says):
    """Any other id cuts attention at an ordinary token (a space for char96's 1): refused, nothing written."""
    from sab_byon_omni.cli import main
    from sab_byon_omni.data.tokenizers import build_tokenizer
    from sab_byon_omni.training.launch import check_document_mask

    (tmp_path / "notes.txt").write_text("Some notes about the garden and the weather. " * 400)
    assert main(["train", "--data", str(tmp_path / "notes.txt"), "--preset", "tiny", "--tokenizer", tokenizer,
                 "--max_steps", "1", "--document_mask_id", str(mask_id), "--checkpoint_dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert says in err and not (tmp_path / "ck").exists()
    check_document_mask(build_tokenizer("byte").eos_id, build_tokenizer("byte"))  # the EOS itself is fine
    check_document_mask(None, build_tokenizer("char96"))


def test_qk_norm_under_bf16_autocast_runs_without_a_dtype_warning():
    """bf16 q/k into an fp32-weighted RMSNorm made torch warn (into generated text, too) and take its
    unfused path: the model normalises q and k in fp32."""
    import warnings

    from sab_byon_omni.config import ModelConfig
    from sab_byon_omni.model.transformer import CausalTransformer

    model = CausalTransformer(ModelConfig.from_name("tiny", vocab_size=96, qk_norm=True))
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        model(torch.randint(0, 96, (2, 16)))
    assert not [w for w in seen if "dtype" in str(w.message).lower()], [str(w.message) for w in seen]

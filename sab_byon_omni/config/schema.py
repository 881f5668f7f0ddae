"""The configuration's schema: one dataclass per concern, the presets, the choices of each field
(what a type cannot say is checked in ``__post_init__``; the package's doc says how it is read)."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from sab_byon_omni.errors import SabError, bounded


def fld(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line help text."""
    return field(default=default, metadata={"help": help})


# Architecture presets. "3b" keeps its historical name; with FFN 16,384 it has ~7.5B parameters.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, n_heads=4, n_layers=2, ffn=256, max_seq_len=256),
    "small": dict(hidden=256, n_heads=4, n_layers=4, ffn=1024, max_seq_len=1024),
    "lightweight": dict(hidden=768, n_heads=12, n_layers=6, ffn=3072, max_seq_len=1024),
    "1b": dict(hidden=2048, n_heads=16, n_layers=24, ffn=8192, max_seq_len=2048),
    "3b": dict(hidden=4096, n_heads=64, n_layers=36, ffn=16384, max_seq_len=2048),
}

PRESET_FIELDS = tuple(PRESETS["lightweight"])  # every preset sets these five
_LIGHT = PRESETS["lightweight"]  # the default model

# The choices of a field, as its type.
Preset = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the names above
FragmergentMode = Literal["clock", "step", "fixed", "off"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
TokenizerName = Literal["char96", "byte", "bpe", "hf"]
Schedule = Literal["constant", "cosine"]
OptimizerName = Literal["adamw", "muon"]
NsCoefficients = Literal["quintic", "polar_express"]  # Muon's Newton-Schulz schedule (training/muon.py)
MUON_NS_STEPS = (1, 20)  # train.muon_ns_steps' range
Parallel = Literal["ddp", "fsdp"]
MemorySaving = Literal["auto", "on", "off"]
FRAGMERGENT_MODES, PRECISIONS, TOKENIZERS, SCHEDULES, OPTIMIZERS, PARALLEL, MEMORY_SAVING = (
    typing.get_args(t) for t in (FragmergentMode, Precision, TokenizerName, Schedule, OptimizerName, Parallel,
                                 MemorySaving))
TRACKERS = ("tensorboard", "wandb")
EXPORT_FORMATS = ("safetensors", "hf", "pt", "gguf")  # sab-omni export --format
LORA_TARGETS = ("qkv", "proj", "up", "down")  # train.lora_targets: the projections of a block (model/lora.py)
GGUF_TYPES = ("f16", "q8_0", "f32")  # sab-omni export --format gguf --gguf-type: the types interop.gguf writes
# The model's architecture options (model/transformer.py, docs/HF_EXPORT.md); the first of each is ours.
Family = Literal["sab", "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "swiglu", "relu2"]
GeluApproximate = Literal["tanh", "none"]
Positions = Literal["rope", "learned"]
RopeScaling = Literal["none", "linear", "llama3"]


@dataclass
class ModelConfig:
    """Architecture of the causal decoder."""

    preset: Preset = fld("lightweight", "architecture preset, which sets the five dimensions below (those given "
                                        "explicitly win): " + ", ".join(PRESETS))
    hidden: int = fld(_LIGHT["hidden"], "model width (default: from the preset)")
    n_heads: int = fld(_LIGHT["n_heads"], "attention heads; must divide hidden (default: from the preset)")
    n_layers: int = fld(_LIGHT["n_layers"], "transformer blocks (default: from the preset)")
    ffn: int = fld(_LIGHT["ffn"], "feed-forward width (default: from the preset)")
    max_seq_len: int = fld(_LIGHT["max_seq_len"], "longest context the model accepts (default: from the preset)")
    vocab_size: int | None = fld(None, "vocabulary size (default: the tokenizer's)")
    dropout: float = fld(0.0, "dropout probability in attention output and MLP")
    tie_embeddings: bool = fld(True, "share the token embedding with the output head")
    activation_checkpointing: bool = fld(False, "recompute each block's activations in backward to save memory")
    fragmergent_mode: FragmergentMode = fld("step", "embedding modulation: step (reproducible), clock (the guide's), "
                                                    "fixed, off")
    fragmergent_t: float = fld(0.0, "the time t used when fragmergent_mode is fixed")
    fragmergent_alpha: float = fld(0.02, "decay rate alpha of phi(t)")
    fragmergent_lambda: float = fld(0.2, "amplitude lambda of phi(t)")
    fragmergent_omega: float = fld(2.0, "angular frequency omega of phi(t)")
    fragmergent_strength: float = fld(0.1, "hidden *= 1 + strength * phi(t)")
    # Options of open models; the defaults are the SAB model, so older configs and checkpoints mean what they meant.
    family: Family = fld("sab", "what the model is and `export --format hf` writes: sab (as GPT-NeoX), llama, "
                                "mistral, qwen2, qwen3, gpt2, gpt_neox")
    norm: Norm = fld("layernorm", "layernorm, or rmsnorm (Llama, Mistral, Qwen2)")
    norm_eps: float = fld(1e-5, "epsilon of every norm")
    norm_bias: bool = fld(False, "LayerNorms with a bias (GPT-2, GPT-NeoX)")
    mlp: Mlp = fld("gelu", "gelu: down(gelu(up x)); swiglu: down(silu(gate x) * up x) (Llama, Mistral, Qwen2)")
    gelu_approximate: GeluApproximate = fld("tanh", "the MLP's GELU: tanh (ours, GPT-2's gelu_new) or none (exact "
                                                    "erf: Pythia)")
    n_kv_heads: int | None = fld(None, "key/value heads (grouped-query attention), dividing n_heads (default: n_heads)")
    rope_base: float = fld(10000.0, "rotary base theta")
    rope_fraction: float = fld(1.0, "fraction of each head that rotary positions turn (Pythia: 0.25)")
    rope_scaling: RopeScaling = fld("none", "rotary frequency scaling: none, linear, or llama3 (Llama 3.1 and later)")
    rope_scaling_factor: float = fld(1.0, "rope_scaling (linear, llama3): the factor")
    rope_low_freq_factor: float = fld(1.0, "rope_scaling llama3: low_freq_factor")
    rope_high_freq_factor: float = fld(4.0, "rope_scaling llama3: high_freq_factor")
    rope_original_max_len: int = fld(8192, "rope_scaling llama3: original_max_position_embeddings")
    positions: Positions = fld("rope", "rope (rotary), or learned: a table of absolute positions (GPT-2)")
    parallel_residual: bool = fld(False, "x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX), not one after the other")
    bias: bool = fld(False, "biases in every projection: qkv, attention output, MLP (GPT-2, GPT-NeoX)")
    qkv_bias: bool = fld(False, "a bias in the qkv projection only (Qwen2); bias implies it")
    # Speed-run levers (modded-nanogpt; docs/RECIPES.md): off by default, so older checkpoints mean what they meant.
    qk_norm: bool = fld(False, "RMSNorm (with a gain) on each head's queries and keys before the rotary positions "
                               "(Qwen3)")
    zero_init_proj: bool = fld(False, "initialise the output projections attn.proj and mlp.down to zero (each "
                                      "block starts as the identity)")
    logit_softcap: float = fld(0.0, "logits = cap * tanh(logits / cap) (Gemma 2's final soft-capping; 0: off)")
    value_embed: bool = fld(False, "a second token embedding added, times a learned per-layer gain, to every "
                                   "layer's values")
    unet_skips: bool = fld(False, "U-net skips: the outputs of the first n_layers/2 blocks, times learned gains, "
                                  "added to the inputs of the last n_layers/2 blocks in mirror order")
    document_mask_id: int | None = fld(None, "the token id that ends a document (the tokenizer's <EOS>): attention "
                                             "does not cross it inside a packed window (default: off)")

    def __post_init__(self) -> None:
        _choices(self, "model")
        for name in PRESET_FIELDS:
            _positive(f"model.{name}", getattr(self, name))
        if self.vocab_size is not None:
            _positive("model.vocab_size", self.vocab_size)
        if self.hidden % self.n_heads:
            raise SabError(f"model.n_heads={self.n_heads} does not divide model.hidden={self.hidden}")
        for name in ("norm_eps", "rope_base", "rope_fraction", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            if not math.isfinite(getattr(self, name)) or not getattr(self, name) > 0:
                raise SabError(f"model.{name}={bounded(getattr(self, name))} must be a positive number")
        for name in ("n_kv_heads", "rope_original_max_len"):
            if getattr(self, name) is not None:
                _positive(f"model.{name}", getattr(self, name))
        if self.n_heads % self.kv_heads:
            raise SabError(f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}")
        if self.rope_fraction > 1:
            raise SabError(f"model.rope_fraction={self.rope_fraction} must be at most 1")
        if self.positions == "rope" and (self.rotary_dim < 2 or self.rotary_dim % 2):
            what = "model.hidden/model.n_heads" + (" x model.rope_fraction" if self.rope_fraction != 1 else "")
            raise SabError(f"{what}={self.rotary_dim} must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise SabError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not (self.logit_softcap == 0 or 1 <= self.logit_softcap <= 1e4):  # nan fails both
            raise SabError(f"model.logit_softcap={bounded(self.logit_softcap)} must be 0 (off) or between 1 and 10,000 "
                           "(Gemma 2 uses 30; a cap below 1 leaves nothing to learn, above fp32's range is nan)")
        if self.document_mask_id is not None and not 0 <= self.document_mask_id < (self.vocab_size or 1 << 62):
            raise SabError(f"model.document_mask_id={self.document_mask_id} must be a token id of the vocabulary "
                           f"(0 to {self.vocab_size - 1 if self.vocab_size else 'vocab_size - 1'})")
        for name in ("fragmergent_t", "fragmergent_alpha", "fragmergent_lambda", "fragmergent_omega", "fragmergent_strength"):
            _finite(f"model.{name}", getattr(self, name))
        self._check_rope_range()
        self._check_fragmergent_range()

    def _check_rope_range(self) -> None:
        """Values whose every forward is NaN (a base of 1e-300, a factor of 1e-300) or that transformers
        refuses (llama3 with low_freq_factor == high_freq_factor divides by zero)."""
        for name, lo, hi in (("rope_base", 1.0, MAX_ROPE_BASE), ("rope_scaling_factor", 1 / MAX_ROPE_FACTOR,
                                                                 MAX_ROPE_FACTOR)):
            if not lo <= getattr(self, name) <= hi:
                raise SabError(f"model.{name}={bounded(getattr(self, name))} is out of range: it must be in "
                               f"[{lo:g}, {hi:g}] (every forward would be NaN or inf)")
        if self.rope_scaling == "llama3" and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise SabError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be greater than "
                           f"model.rope_low_freq_factor={self.rope_low_freq_factor} for rope_scaling llama3")

    def _check_fragmergent_range(self) -> None:
        """The factor 1 + strength * phi(t) must stay finite and moderate at every t the mode takes
        (fixed: t; step, clock: [0, 100)): t = 1e308 was a math domain error, strength = 1e308 NaN."""
        if self.fragmergent_mode == "off":
            return
        for name in ("fragmergent_t", "fragmergent_omega"):
            if abs(getattr(self, name)) > MAX_FRAGMERGENT_T:
                raise SabError(f"model.{name}={bounded(getattr(self, name))} is out of range: its size must be at "
                               f"most {MAX_FRAGMERGENT_T:g} (sin(omega * t) must be finite)")
        ts = (self.fragmergent_t,) if self.fragmergent_mode == "fixed" else (0.0, 100.0)
        size = abs(self.fragmergent_strength * self.fragmergent_lambda)
        log_swing = math.log(size) + max(-self.fragmergent_alpha * t for t in ts) if size > 0 else -math.inf
        if log_swing > math.log(MAX_FRAGMERGENT_SWING):
            raise SabError(f"model.fragmergent_strength x fragmergent_lambda x exp(-fragmergent_alpha * t) reaches "
                           f"{_exp_text(log_swing)}: the modulation 1 + strength * phi(t) would scale the embeddings by "
                           f"more than {MAX_FRAGMERGENT_SWING:g}x (the forward overflows); lower them")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A preset built whole by name, e.g. ``ModelConfig.from_name("tiny", vocab_size=96)``; the
        fields given win over the preset's."""
        if name not in PRESETS:
            raise SabError(f"model.preset={bounded(name)} is not one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``n_kv_heads``, or ``n_heads`` when unset (no grouping)."""
        return self.n_kv_heads or self.n_heads

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions (the first ones) the rotary positions turn."""
        return int(self.head_dim * self.rope_fraction)

    def differences(self, saved: Any, may_change: frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
        """``(field, saved value, this value)`` for each field but ``may_change`` in which the model
        section ``saved`` (a checkpoint's, as a dict) differs from this one; a field it does not
        record (it predates the field) had the default's value. Nothing for a section that is not a dict."""
        if not isinstance(saved, dict):
            return []
        defaults = dataclasses.asdict(ModelConfig())
        return [(k, saved.get(k, defaults.get(k)), v) for k, v in dataclasses.asdict(self).items()
                if k not in may_change and saved.get(k, defaults.get(k)) != v]


@dataclass
class DataConfig:
    """Where the tokens come from and how they are batched."""

    dataset: str = fld("synthetic", "'synthetic' (the guide's multimodal dataset) or a path/glob of your own files")
    num_samples: int = fld(5000, "number of synthetic samples (train + validation)")
    seq_len: int = fld(1024, "maximum sequence length; synthetic batches are padded only to their longest sample")
    val_fraction: float = fld(0.1, "fraction of samples (or documents) held out for validation")
    tokenizer: TokenizerName = fld("char96", "tokenizer: char96 (the guide's), byte, bpe (trained on the corpus), or hf (an open model's tokenizer.json)")
    tokenizer_path: str | None = fld(None, "reuse a saved tokenizer.json (bpe) instead of training one")
    bpe_vocab_size: int = fld(8192, "vocabulary size when training a BPE tokenizer")
    text_field: str = fld("text", "field holding the text in .json/.jsonl files; column in .parquet/.arrow files "
                          "and datasets folders")
    csv_column: str = fld("text", "column holding the text in .csv files")
    cache_dir: str | None = fld(None, "folder for the tokenised corpus (default: ./.sab_cache/<data name>-<hash>)")
    shuffle: bool = fld(True, "visit samples/windows in a seeded random order each epoch (else sequential)")
    length_bucket_size: int = fld(64, "sort each run of N shuffled samples by length before batching, so batches "
                                    "pad less (0: off; variable-length data such as the synthetic set). With N = "
                                    "batch_size x gradient_accumulation_steps (the default job's 64) each optimizer "
                                    "step sums the same samples as without it")
    data_seed: int = fld(1234, "seed for data generation, splits and order")

    def __post_init__(self) -> None:
        _choices(self, "data")
        _positive("data.num_samples", self.num_samples)
        if self.seq_len < 2:
            raise SabError(f"data.seq_len={self.seq_len} must be at least 2 (one input and one target)")
        _positive("data.seq_len", self.seq_len)
        if not 0.0 < self.val_fraction < 1.0:
            raise SabError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.bpe_vocab_size < 300:
            raise SabError(f"data.bpe_vocab_size={self.bpe_vocab_size} must be at least 300 (256 bytes + specials + merges)")
        _positive("data.bpe_vocab_size", self.bpe_vocab_size)
        if self.length_bucket_size < 0:
            raise SabError(f"data.length_bucket_size={self.length_bucket_size} must not be negative")
        if not self.dataset:
            raise SabError("data.dataset is empty: use 'synthetic' or a path")
        if not 0 <= self.data_seed < 1 << 64:  # what numpy's generators take
            raise SabError(f"data.data_seed={bounded(self.data_seed)} must be in [0, 2**64)")


MAX_LORA_SCALE = 10_000  # lora_alpha / lora_rank beyond which an update only overflows (1e30 trained to NaN)


@dataclass
class TrainConfig:
    """The optimisation recipe and everything the training loop writes."""

    epochs: int = fld(3, "training epochs")
    batch_size: int = fld(4, "samples per micro-batch (per process)")
    gradient_accumulation_steps: int = fld(16, "micro-batches per optimizer step")
    learning_rate: float = fld(2e-5, "AdamW peak learning rate (with optimizer muon: of the embedding, head and norms)")
    weight_decay: float = fld(0.01, "decoupled decay of matrices, not norms (AdamW's; optimizer muon: Muon's too)")
    max_grad_norm: float = fld(1.0, "gradient clipping threshold (0 disables clipping)")
    beta1: float = fld(0.9, "AdamW beta1")
    beta2: float = fld(0.95, "AdamW beta2")
    optimizer: OptimizerName = fld("adamw", "adamw (the guide's), or muon: Muon for the blocks' weight matrices, "
                                            "AdamW for the rest (the from-scratch recipe's choice; docs/RECIPES.md)")
    muon_learning_rate: float = fld(0.05, "peak learning rate of the Muon-updated matrices (optimizer muon; the "
                                          "from-scratch recipe sets 0.8 / sqrt(hidden))")
    muon_warmup_steps: int = fld(10, "linear warmup steps of the Muon-updated matrices (optimizer muon)")
    muon_ns_steps: int = fld(5, "Newton-Schulz iterations per Muon step (optimizer muon; 1 to 20)")
    muon_ns_coefficients: NsCoefficients = fld("quintic", "Muon's Newton-Schulz coefficients: quintic (Keller "
                                                          "Jordan's, the same each iteration) or polar_express "
                                                          "(Amsel et al. 2025, one set per iteration; "
                                                          "docs/RECIPES.md)")
    lr_schedule: Schedule = fld("constant", "learning-rate schedule: constant (the guide's) or cosine")
    warmup_steps: int = fld(0, "linear warmup steps (both schedules)")
    min_lr_ratio: float = fld(0.1, "cosine floor as a fraction of learning_rate")
    precision: Precision = fld("auto", "auto | fp32 | bf16 | fp16 (fp16 uses a GradScaler)")
    device: str = fld("auto", "auto (cuda, then mps, then cpu) or a torch device string")
    compile: bool = fld(False, "torch.compile each block (one graph for all, shapes dynamic: no recompiles over lengths)")
    threads: int = fld(0, "torch threads on a CPU (0: auto, the cores no other process is using as the run starts, "
                          "at most torch's setting; under torchrun each local process takes its share)")
    checkpoint_dir: str = fld("checkpoints", "where checkpoints and metrics.jsonl are written")
    save_every: int = fld(0, "also save a checkpoint every N optimizer steps (0: only at epoch ends)")
    keep_last: int = fld(3, "step checkpoints to keep (epoch checkpoints and best_model.pt are always kept)")
    resume: str = fld("none", "none | auto (latest checkpoint in checkpoint_dir, if any) | a checkpoint path")
    init_from: str | None = fld(None, "start a new run from these weights (a checkpoint, .safetensors or .gguf file, "
                                      "saved or transformers folder, or a Hub id in the local cache): the model and "
                                      "tokenizer come from it, the optimizer and schedule start fresh; a checkpoint to "
                                      "resume from takes precedence")
    lora_rank: int = fld(0, "LoRA: train rank-R adapters beside the frozen weights of the projections lora_targets "
                            "names, instead of every weight (0: off, full training; docs/FINETUNE.md)")
    lora_alpha: float = fld(16.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = fld(0.0, "LoRA: dropout probability on the adapters' input")
    lora_targets: str = fld("qkv,proj,up,down", "LoRA: comma-separated projections of every block to adapt: qkv "
                                                "(fused attention input), proj (attention output), up (MLP up, "
                                                "with a SwiGLU's gate), down (MLP down)")
    eval_interval: int = fld(0, "evaluate every N optimizer steps (0: only at epoch ends)")
    eval_batches: int = fld(0, "validation batches per evaluation (0: the whole validation set)")
    log_interval: int = fld(10, "optimizer steps between metric lines")
    max_nonfinite_steps: int = fld(5, "abort after this many consecutive non-finite steps")
    max_steps: int = fld(0, "stop after this many optimizer steps (0: no limit)")
    progress: bool = fld(True, "show a progress bar on stderr")
    report_to: str = fld("none", "also send the metric rows to: none, or a comma-separated list of tensorboard "
                                 "(checkpoint_dir/tb) and wandb (WANDB_MODE=offline works without a network)")
    tensorboard: bool = fld(False, "also log to TensorBoard in checkpoint_dir/tb (the same as --report_to tensorboard)")
    seed: int = fld(1234, "seed for initialisation and sampling")
    deterministic: bool = fld(False, "use deterministic algorithms (slower; for bit-exact reproduction)")
    parallel: Parallel = fld("ddp", "under torchrun: ddp (every process holds the whole model) or fsdp "
                                    "(FSDP2: weights, gradients and optimizer state sharded across processes)")
    auto_micro_batch: bool = fld(False, "use the largest micro-batch the device's memory fits, raising "
                                 "gradient_accumulation_steps to keep batch_size x gradient_accumulation_steps")
    check_memory: bool = fld(True, "estimate peak memory before training and stop with advice if it cannot fit")
    memory_saving: MemorySaving = fld("auto", "keep fewer activations for a slightly slower step (GELU recomputed "
                                              "in backward, v copied out of the qkv output; same math): auto (only "
                                              "when the run would not fit without it), on, off")

    def __post_init__(self) -> None:
        _choices(self, "train")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "log_interval", "max_nonfinite_steps"):
            _positive(f"train.{name}", getattr(self, name))
        for name in ("threads", "save_every", "keep_last", "eval_interval", "eval_batches", "warmup_steps", "max_steps",
                     "muon_warmup_steps"):
            if getattr(self, name) < 0:
                raise SabError(f"train.{name}={getattr(self, name)} must not be negative")
        if not MUON_NS_STEPS[0] <= self.muon_ns_steps <= MUON_NS_STEPS[1]:
            raise SabError(f"train.muon_ns_steps={bounded(self.muon_ns_steps)} must be in "
                           f"[{MUON_NS_STEPS[0]}, {MUON_NS_STEPS[1]}]")
        for name in ("learning_rate", "muon_learning_rate"):
            _finite(f"train.{name}", getattr(self, name))
            if not 0 < getattr(self, name) <= 10:  # above 10 no model trains; fp32 overflows near 3.4e38
                raise SabError(f"train.{name}={getattr(self, name)} must be positive and at most 10")
        for name in ("weight_decay", "max_grad_norm"):
            _finite(f"train.{name}", getattr(self, name))
            if getattr(self, name) < 0:
                raise SabError(f"train.{name}={getattr(self, name)} must not be negative")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise SabError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SabError(f"train.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if not self.checkpoint_dir:
            raise SabError("train.checkpoint_dir is empty")
        for name in (n.strip() for n in self.report_to.split(",")):
            if name not in (*TRACKERS, "none", ""):
                raise SabError(f"train.report_to: unknown tracker {bounded(name)} (known: {', '.join(TRACKERS)}, none)")
        if not self.resume:
            raise SabError("train.resume is empty: use none, auto or a checkpoint path")
        self._check_lora()
        if not -(1 << 63) <= self.seed < 1 << 64:  # what torch.manual_seed takes
            raise SabError(f"train.seed={bounded(self.seed)} must be in [-2**63, 2**64)")


    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise SabError(f"train.lora_rank={self.lora_rank} must not be negative (0: off)")
        if self.lora_rank > LIMITS["lora_rank"]:
            raise SabError(f"train.lora_rank={self.lora_rank} is larger than this project supports "
                           f"({LIMITS['lora_rank']:,})")
        _finite("train.lora_alpha", self.lora_alpha)
        if not self.lora_alpha > 0:
            raise SabError(f"train.lora_alpha={self.lora_alpha} must be positive")
        if self.lora_rank and self.lora_alpha / self.lora_rank > MAX_LORA_SCALE:
            raise SabError(f"train.lora_alpha={self.lora_alpha:g} scales the adapters' update by lora_alpha / lora_rank = "
                           f"{self.lora_alpha / self.lora_rank:.3g}, more than {MAX_LORA_SCALE:,}: the run would "
                           "diverge (alpha is usually 1 to 2 x the rank)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise SabError(f"train.lora_dropout={self.lora_dropout} must be in [0, 1)")
        lora_target_names(self.lora_targets)
        if self.lora_rank and self.optimizer == "muon":
            raise SabError("train.optimizer=muon with train.lora_rank > 0 is not supported (the adapters are "
                           "low-rank matrices that AdamW trains); use --optimizer adamw, or --lora_rank 0")


def lora_target_names(spec: str) -> list[str]:
    """``"qkv,proj,up,down"`` -> the LoRA target names, each checked, without repeats."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    for name in names:
        if name not in LORA_TARGETS:
            raise SabError(f"train.lora_targets: unknown target {bounded(name)} (known: {', '.join(LORA_TARGETS)})"
                           + did_you_mean(name, LORA_TARGETS))
    if not names:
        raise SabError(f"train.lora_targets={bounded(spec)} names no projection (known: {', '.join(LORA_TARGETS)})")
    return list(dict.fromkeys(names))


@dataclass
class RunConfig:
    """A whole run: model, data and training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """A plain dict of primitives (safe for ``torch.load(weights_only=True)`` and YAML)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


# field name -> section, for flat keys and short CLI flags; names are unique across sections.
FIELD_SECTION: dict[str, str] = {f.name: s for s, c in SECTIONS.items() for f in fields(c)}
assert len(FIELD_SECTION) == sum(len(fields(c)) for c in SECTIONS.values()), "field names must be unique"


# Upper limits far beyond any real run, so that a typo (or a hostile file) is an error, not a
# 100 GB allocation or an hour-long loop.
LIMITS = {"hidden": 1 << 16, "n_heads": 1 << 12, "n_kv_heads": 1 << 12, "n_layers": 1 << 12, "ffn": 1 << 18,
          "max_seq_len": 1 << 20, "seq_len": 1 << 20, "vocab_size": 1 << 24, "bpe_vocab_size": 1 << 20,
          "batch_size": 1 << 20, "gradient_accumulation_steps": 1 << 20, "epochs": 1 << 20, "num_samples": 1 << 31,
          "rope_original_max_len": 1 << 24, "lora_rank": 1 << 16}


MAX_ROPE_BASE = 1e12  # real models: 1e4 to 1e7
MAX_ROPE_FACTOR = 1e4  # rope_scaling_factor in [1e-4, 1e4] (real: 2 to 64)
MAX_FRAGMERGENT_T = 1e6  # |fragmergent_t|, |fragmergent_omega|
MAX_FRAGMERGENT_SWING = 100.0  # the most strength * phi(t) may reach (default: 0.02)


def _exp_text(log_value: float) -> str:
    """e^log_value as text, also where it is past a float (``e^1e+05``)."""
    return f"{math.exp(log_value):.3g}" if log_value < 709 else f"e^{log_value:.4g}"


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SabError(f"{name}={bounded(value)} must be a positive integer")
    limit = LIMITS.get(name.rpartition(".")[2])
    if limit is not None and value > limit:
        raise SabError(f"{name}={value} is larger than this project supports ({limit:,})")


def did_you_mean(word: str, options: Any) -> str:
    """`` (did you mean 'x'?)`` for a close match among ``options``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word)[:100], [str(o) for o in options], n=1, cutoff=0.7)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _finite(name: str, value: Any) -> None:
    if not math.isfinite(value):
        raise SabError(f"{name}={bounded(value)} must be a finite number")


FIELD_TYPES: dict[str, dict[str, Any]] = {s: typing.get_type_hints(c) for s, c in SECTIONS.items()}


def _choices(cfg: Any, section: str) -> None:
    """Choices checked for a config built directly too (``TrainConfig(precision="fp8")``): one line."""
    for name, hint in FIELD_TYPES[section].items():
        if typing.get_origin(hint) is Literal and (v := getattr(cfg, name)) not in typing.get_args(hint):
            raise SabError(f"{section}.{name}={bounded(v)} {expected(hint, v)}")


def expected(hint: Any, value: Any = "") -> str:
    """What a field of this type takes, as the end of an error message."""
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return f"is not one of: {', '.join(choices)}{did_you_mean(str(value).lower(), choices)}"
    base = next(a for a in (*typing.get_args(hint), hint) if a is not type(None))
    return {int: "must be an integer", float: "must be a number", bool: "must be true or false"}.get(
        base, "must be a string")

"""How many parameters a configuration has, how much memory each device needs to train it, and
how long an epoch takes: an analytic model of *this* code base's training step.

The memory model counts what PyTorch really keeps alive in :class:`~sab_byon_omni.training.trainer.Trainer`:

* **weights**: fp32 master weights (all precisions keep them; autocast computes in bf16/fp16);
* **gradients**: fp32, one per parameter (alive from the first micro-step's backward to the step);
* **optimizer**: AdamW's two fp32 moments (with ``optimizer: muon`` the blocks' matrices keep one
  momentum instead, and Muon's step adds its temporaries: :func:`muon_step_bytes`);
* **activations**: the tensors autograd saves per block and token (enumerated in
  :func:`block_activation_bytes`), or only each block's input with activation checkpointing plus
  one block recomputed in backward;
* **logits**: the output head's logits, which its loss turns into their gradient in place (the
  fp32 softmax taken a few rows at a time: :func:`~sab_byon_omni.model.ops.linear_cross_entropy`);
* **workspace**: backward's temporaries in one block (the recomputed GELU and two gradients);
  the logits are freed before the blocks' backward begins, so the peak holds the larger of the two;
* **buffers**: what the framework adds: autocast's low-precision weight copies, NCCL's communication
  buffers (CUDA, several GPUs), FSDP's all-gathered blocks, and (foreach AdamW only) one temporary at the step.

With ``parallel="fsdp"`` over N devices, weights, gradients and optimizer state are divided by N
(FSDP2 ``fully_shard`` per block and at the root) and the buffers hold two unsharded blocks plus
the root's parameters. The peak is the larger of the forward/backward peak and the optimizer-step
peak, ``weights + gradients + optimizer + activations + max(logits, workspace) + buffers``.
``tests/test_estimate.py`` checks the total against the measured peak RSS of real training
runs on a CPU.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

from sab_byon_omni.config import PARALLEL, ModelConfig
from sab_byon_omni.config.schema import lora_target_names
from sab_byon_omni.errors import SabError

GiB = 2**30
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# the fp32 softmax rows the head's loss takes at once (model.ops.HEAD_CHUNK_BYTES, tested equal)
HEAD_CHUNK_BYTES = {"cpu": 4 << 20, "other": 256 << 20}


def num_parameters(cfg: ModelConfig) -> int:
    """Exactly ``CausalTransformer(cfg).num_parameters()`` (a tied head counts once)."""
    if cfg.vocab_size is None:
        raise SabError("model.vocab_size must be set to count parameters")
    h, v = cfg.hidden, cfg.vocab_size
    head = 0 if cfg.tie_embeddings else v * h
    positions = cfg.max_seq_len * h if cfg.positions == "learned" else 0
    levers = (v * cfg.kv_heads * cfg.head_dim if cfg.value_embed else 0) + (cfg.n_layers // 2 if cfg.unet_skips else 0)
    return v * h + positions + cfg.n_layers * block_parameters(cfg) + norm_parameters(cfg) + head + levers


def norm_parameters(cfg: ModelConfig) -> int:
    """One norm: a gain, and a bias for a LayerNorm with ``norm_bias``."""
    return cfg.hidden * (2 if cfg.norm == "layernorm" and cfg.norm_bias else 1)


def qkv_rows(cfg: ModelConfig) -> int:
    """Rows of the fused qkv matrix: q's ``n_heads`` heads, k's and v's ``n_kv_heads`` each."""
    return (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim


def block_matmul_parameters(cfg: ModelConfig) -> int:
    """One block's matrices: qkv (3h^2 without grouped heads), output projection h^2, MLP up (h f,
    2 h f for SwiGLU's gate and up) and down h f."""
    up = (2 if cfg.mlp == "swiglu" else 1) * cfg.ffn
    return cfg.hidden * qkv_rows(cfg) + cfg.hidden * cfg.hidden + cfg.hidden * up + cfg.ffn * cfg.hidden


def lora_shapes(cfg: ModelConfig, targets: str) -> list[tuple[int, int]]:
    """(in, out) of each projection of one block that LoRA ``targets`` adapts (model/lora.py)."""
    up = (2 if cfg.mlp == "swiglu" else 1) * cfg.ffn
    shapes = {"qkv": (cfg.hidden, qkv_rows(cfg)), "proj": (cfg.hidden, cfg.hidden), "up": (cfg.hidden, up),
              "down": (cfg.ffn, cfg.hidden)}
    return [shapes[name] for name in lora_target_names(targets)]


def lora_parameters(cfg: ModelConfig, rank: int, targets: str = "qkv,proj,up,down") -> int:
    """The adapters' parameters: rank x (in + out) per adapted projection, in every block."""
    return cfg.n_layers * sum(rank * (i + o) for i, o in lora_shapes(cfg, targets))


def block_parameters(cfg: ModelConfig) -> int:
    """One block: its matrices (:func:`block_matmul_parameters`), two norms, the biases its
    options give (every projection's with ``bias``, qkv's with ``qkv_bias``), the q and k norms'
    gains (``qk_norm``) and the value embedding's gain (``value_embed``). The levers add no matmul:
    the value embedding is a lookup, soft-capping, skips and document masks are elementwise (the
    attention FLOPs are counted unmasked anyway), so :func:`matmul_params` is unchanged by them."""
    up = (2 if cfg.mlp == "swiglu" else 1) * cfg.ffn
    biases = qkv_rows(cfg) * (cfg.bias or cfg.qkv_bias) + (2 * cfg.hidden + up) * cfg.bias
    levers = 2 * cfg.head_dim * cfg.qk_norm + cfg.value_embed
    return block_matmul_parameters(cfg) + 2 * norm_parameters(cfg) + biases + levers


def block_activation_bytes(cfg: ModelConfig, act_bytes: int, memory_saving: bool = False) -> float:
    """Bytes autograd saves per token in one block (no activation checkpointing).

    The residual stream stays fp32 under autocast (it starts as the fp32 embedding): the block
    input and the attention residual, saved by the two norms (one with a parallel residual: both
    norms read the block input). In the compute dtype: the two normalised inputs of the linears
    (2h), rotated q and k (q's h and k's kv = n_kv_heads x head_dim) and v, the attention output
    (h; its merged-head view is free, the fused kernels lay it out as (B, T, H, D)), and the MLP's
    up projection (ffn; a SwiGLU keeps gate and up, 2 ffn). Plus the attention's log-sum-exp, one
    fp32 per head; no T x T matrix is ever stored. Without memory saving, v is a view that keeps
    the whole qkv output (h + 2 kv instead of kv) and the GELU's output is kept for the down
    projection (another ffn; a SwiGLU keeps silu(gate) and the product, 2 ffn, either way); with it
    (``CausalTransformer.set_memory_saving``), v is copied out and a GELU recomputed.
    """
    h, f, kv = cfg.hidden, cfg.ffn, cfg.kv_heads * cfg.head_dim
    mlp = 4 * f if cfg.mlp == "swiglu" else (f if memory_saving else 2 * f)
    v = kv if memory_saving else h + 2 * kv
    levers = (h + kv) * cfg.qk_norm + kv * cfg.value_embed  # q, k before their norms; v before its embedding
    kept = 2 * h + h + kv + v + h + mlp + levers
    residual = 1 if cfg.parallel_residual else 2
    return residual * 4 * h + act_bytes * kept + 4 * cfg.n_heads


@dataclass
class Estimate:
    """Per-device memory (bytes) and compute for one training configuration."""

    preset: str
    parameters: int
    seq_len: int
    micro_batch: int
    precision: str
    gpus: int
    parallel: str
    activation_checkpointing: bool
    memory_saving: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    workspace: float  # backward's working set in one block (never at the same time as the logits)
    buffers: float
    peak: float
    flops_per_token: float  # model FLOPs (6N + attention), the MFU convention
    hardware_flops_per_token: float  # plus the recomputed forward with activation checkpointing

    def as_dict(self) -> dict:
        return asdict(self)

    def seconds_per_tokens(self, tokens: float, peak_tflops: float, mfu: float) -> float:
        """Wall time for ``tokens`` training tokens over all devices at ``mfu`` of ``peak_tflops`` each."""
        return tokens * self.flops_per_token / (self.gpus * peak_tflops * 1e12 * mfu)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply every token once: each block's qkv, output, up and down projections
    (4 d^2 + 2 d f for the SAB shape; :func:`block_matmul_parameters`) and the output head (V d).
    Norm gains, biases and the embedding and position lookups do no matmul."""
    return cfg.n_layers * block_matmul_parameters(cfg) + cfg.vocab_size * cfg.hidden


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """FLOPs of one training token: ``6 * matmul_params + 12 * n_layers * seq_len * hidden``.

    6 = 2 (multiply-add) x 3 (forward, and backward for inputs and for weights). The attention term
    counts QK^T and attention-times-V over the whole ``seq_len`` window as if not causal (the PaLM
    convention, so MFU figures stay comparable across code bases). Lightweight with the 96-token
    vocabulary at 1024 tokens: 6 x 42.54M + 56.6M = 311.9 MFLOP per token.
    """
    return 6 * matmul_params(cfg) + 12 * cfg.n_layers * seq_len * cfg.hidden


def forward_flops_per_token(cfg: ModelConfig, context: int) -> int:
    """FLOPs of one forward token attending to ``context`` positions (used for generation)."""
    return 2 * matmul_params(cfg) + 4 * cfg.n_layers * context * cfg.hidden


def estimate(cfg: ModelConfig, seq_len: int, micro_batch: int, precision: str = "bf16", gpus: int = 1,
             parallel: str = "ddp", activation_checkpointing: bool | None = None, device: str = "cuda",
             fused_optimizer: bool | None = None, memory_saving: bool = False, optimizer: str = "adamw",
             lora_rank: int = 0, lora_targets: str = "qkv,proj,up,down", lora_base_bytes: int = 4) -> Estimate:
    """Memory per device and FLOPs per token for training ``cfg`` with ``micro_batch`` sequences of
    ``seq_len`` tokens per device (the micro-batch, not the effective batch: accumulation costs no
    memory beyond the gradients). ``fused_optimizer`` (the trainer's choice on CUDA and CPU) has no
    temporaries; foreach AdamW adds one parameter-sized buffer at the step. ``memory_saving``: the
    model's GELU recompute and v copy (see :func:`block_activation_bytes`). ``optimizer="muon"``:
    the blocks' matrices keep one fp32 momentum instead of two moments, and Muon's step holds its
    temporaries (:func:`muon_step_bytes`). ``lora_rank``: LoRA on ``lora_targets``, frozen weights
    in ``lora_base_bytes`` per value (2: bf16/fp16 where native), gradients and AdamW state for the
    adapters only (their activations and the FLOPs saved on frozen weights are not counted)."""
    _check_estimate_args(cfg, precision, parallel, seq_len=seq_len, micro_batch=micro_batch, gpus=gpus)
    ac = cfg.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    p = num_parameters(cfg)
    h, v = cfg.hidden, cfg.vocab_size
    act = PRECISION_BYTES[precision]
    shard = gpus if parallel == "fsdp" else 1

    muon = cfg.n_layers * block_matmul_parameters(cfg) if optimizer == "muon" and not lora_rank else 0
    weights, gradients, opt_state = 4.0 * p / shard, 4.0 * p / shard, (8.0 * p - 4.0 * muon) / shard
    frozen_low = 0  # frozen weights already in the compute dtype: autocast copies none of them
    if lora_rank:
        adapters = lora_parameters(cfg, lora_rank, lora_targets)
        adapted = cfg.n_layers * sum(i * o for i, o in lora_shapes(cfg, lora_targets))
        weights = 4.0 * (p - adapted + adapters) + lora_base_bytes * adapted
        gradients, opt_state = 4.0 * adapters, 8.0 * adapters
        frozen_low = adapted if lora_base_bytes == act else 0

    tokens = seq_len * micro_batch
    activations, logits, workspace = _activation_memory(cfg, tokens, act, ac, memory_saving, device)
    buffers_fwd, ddp_buckets, opt_temp = _buffer_memory(cfg, p, act, parallel, gpus, device, fused_optimizer)
    if lora_rank:
        buffers_fwd -= act * frozen_low if act != 4 else 0
        ddp_buckets, opt_temp = min(ddp_buckets, gradients), min(opt_temp, gradients)
    opt_temp += muon_step_bytes(muon, gpus if parallel == "ddp" else 1, 2 if act == 2 else 4, device) if muon else 0.0
    persistent = weights + gradients + opt_state + ddp_buckets
    peak = persistent + max(activations + max(logits, workspace) + buffers_fwd, opt_temp)
    buffers = ddp_buckets + max(buffers_fwd, opt_temp - activations - max(logits, workspace), 0.0)

    flops = train_flops_per_token(cfg, seq_len)
    # activation checkpointing recomputes each block's forward (not the head's) in backward
    hw = flops + (forward_flops_per_token(cfg, seq_len) - 2 * v * h if ac else 0)
    return Estimate(preset=cfg.preset, parameters=p, seq_len=seq_len, micro_batch=micro_batch, precision=precision,
                    gpus=gpus, parallel=parallel, activation_checkpointing=ac, memory_saving=memory_saving,
                    weights=weights, gradients=gradients,
                    optimizer=opt_state, activations=activations, logits=logits, workspace=workspace, buffers=buffers,
                    peak=peak,
                    flops_per_token=flops, hardware_flops_per_token=hw)


def _check_estimate_args(cfg: ModelConfig, precision: str, parallel: str, **counts: int) -> None:
    if cfg.vocab_size is None:
        raise SabError("model.vocab_size must be set to estimate memory (pass --vocab-size)")
    if precision not in PRECISION_BYTES:
        raise SabError(f"precision={precision!r} is not one of: {', '.join(PRECISION_BYTES)}")
    if parallel not in PARALLEL:
        raise SabError(f"parallel={parallel!r} is not one of: {', '.join(PARALLEL)}")
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            raise SabError(f"{name}={value!r} must be a positive integer")


def _activation_memory(cfg: ModelConfig, tokens: int, act: int, ac: bool, memory_saving: bool, device: str
                       ) -> tuple[float, float, float]:
    """(activations kept for backward, logits + cross-entropy, backward's one-block workspace) in bytes."""
    h, v, L = cfg.hidden, cfg.vocab_size, cfg.n_layers
    mixed = act != 4
    per_block = block_activation_bytes(cfg, act, memory_saving)
    if ac:  # each block keeps only its fp32 input; backward recomputes one block at a time
        blocks = tokens * (L * 4 * h + per_block)
    else:
        blocks = tokens * L * per_block
    # after the blocks: the final norm's fp32 input and its output in the compute dtype
    activations = blocks + tokens * (4 * h + act * h)
    # the head computes the loss itself (model.ops.linear_cross_entropy): the logits in the compute
    # dtype, overwritten with their gradient and kept for backward, plus (mixed precision) the fp32
    # softmax of the few rows taken at a time
    softmax_rows = min(tokens * v * 4, HEAD_CHUNK_BYTES.get(device, HEAD_CHUNK_BYTES["other"]))
    logits = tokens * v * act + (softmax_rows if mixed else 0)
    # backward of one MLP: the gradient through the down projection and the GELU's input gradient
    # (2 ffn; with memory saving also the recomputed GELU; a SwiGLU's gate and up gradients, 3 ffn),
    # plus the residual gradient and its copy
    ffn_grads = 3 if memory_saving or cfg.mlp == "swiglu" else 2
    workspace = tokens * (ffn_grads * act * cfg.ffn + 8 * h)
    return activations, logits, workspace


# Weights per stacked Newton-Schulz call in Muon's step, at most, per device (training/muon.py explains the figures)
MUON_BATCH_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 25}


def muon_step_bytes(matrix_params: int, ranks: int, ns_bytes: int, device: str) -> float:
    """Bytes Muon's step holds beyond its momentum buffers, for ``matrix_params`` weights of fp32
    matrices split over ``ranks`` DDP ranks (each orthogonalises about 1/ranks of them) with the
    Newton-Schulz iteration in ``ns_bytes`` per element: the Nesterov momenta of this rank's share
    (fp32) and their orthogonalised directions (``ns_bytes``), all alive until the updates are
    applied; with several ranks the all-gather's send buffer and every rank's received share
    (about all the directions again); and one stacked batch's iteration (its copy, the normalised
    matrix and the two products, at most the device's batch of weights)."""
    share = matrix_params / ranks
    gathered = (share + matrix_params) * ns_bytes if ranks > 1 else 0.0
    batch = min(matrix_params, MUON_BATCH_ELEMENTS.get(device, MUON_BATCH_ELEMENTS["cuda"]))
    return share * (4 + ns_bytes) + gathered + 4 * batch * ns_bytes


NCCL_BUFFERS = 512 * 2**20  # bytes per process of NCCL's communicators (an upper estimate, see _buffer_memory)


def _buffer_memory(cfg: ModelConfig, p: int, act: int, parallel: str, gpus: int, device: str,
                   fused_optimizer: bool | None) -> tuple[float, float, float]:
    """(forward buffers: gathered FSDP blocks or autocast's weight copies, NCCL's buffers,
    the optimizer step's temporary) in bytes."""
    h, L = cfg.hidden, cfg.n_layers
    mixed = act != 4
    shard = gpus if parallel == "fsdp" else 1
    matrix_weights = p - L * (block_parameters(cfg) - block_matmul_parameters(cfg)) - norm_parameters(cfg) - (
        cfg.max_seq_len * h if cfg.positions == "learned" else 0)  # everything but norms, biases, positions
    buffers_fwd = 0.0
    if parallel == "fsdp" and gpus > 1:
        root = p - L * block_parameters(cfg)
        # two blocks all-gathered at a time (prefetch), in the compute dtype, plus their gradients
        # before the reduce-scatter (compute dtype, then an fp32 copy), and the root kept gathered
        buffers_fwd = act * (root + 2 * block_parameters(cfg)) + 2 * block_parameters(cfg) * (act + 4)
    elif mixed:
        buffers_fwd = act * matrix_weights  # autocast's cached low-precision weight copies
    # DDP(gradient_as_bucket_view=True): the gradients are views of its buckets, no second copy; what
    # remains is NCCL's own communication buffers on CUDA (NCCL_BUFFSIZE 4 MiB per channel and
    # direction, up to 32 channels, ring and tree: about 512 MiB), none with gloo on CPU
    ddp_buckets = NCCL_BUFFERS if device == "cuda" and gpus > 1 else 0.0
    if fused_optimizer is None:  # the trainer uses fused AdamW wherever torch has it (CUDA, CPU)
        fused_optimizer = device in ("cuda", "cpu")
    opt_temp = 0.0 if fused_optimizer else 4.0 * p / shard  # foreach AdamW's sqrt(v) temporary
    return buffers_fwd, ddp_buckets, opt_temp


# The fixed cost of a step, in units of one small eager op with autograd (measured): per block and
# micro-batch (a dispatch mode counts 92 aten ops per block forward and backward in fp32, 44 outside
# the blocks; on real tensors each costs about 4 small ones), per micro-batch (the trainer's batch
# assembly, loss sums and the rest outside the model), and per optimizer step (clipping, the
# finiteness check, AdamW, zeroing). Fitted to tiny and small steps on one Sapphire Rapids core;
# it is what dominates small models, where matmul FLOPs alone were 100-3000x too low.
OPS_PER_MICRO_BATCH, OPS_PER_BLOCK, OPS_PER_STEP = 2000, 400, 200
# Values each token streams through memory per block outside the matmuls (norms, residuals,
# activation and their gradients), per hidden unit and per FFN unit; the head's softmax per vocab
# entry; the optimizer per parameter (fused AdamW: weight, gradient, two moments read and written,
# clipping and zeroing the gradient), in bytes.
VALUES_PER_HIDDEN, VALUES_PER_FFN, VALUES_PER_VOCAB, OPTIMIZER_BYTES_PER_PARAM = 40, 12, 6, 40
MATMUL_EFFICIENCY = 0.5  # a training step's matmuls (rectangular, transposed in backward) at the square peak
AUTOCAST_OP_FACTOR = 3  # bf16/fp16 autocast: every matmul casts its weight and inputs, forward and backward


def step_seconds(cfg: ModelConfig, tokens: float, micro_batches: int, flops: float, matmul_rate: float,
                 op_seconds: float, bytes_per_second: float, act_bytes: int = 4) -> float:
    """Seconds of one optimizer step over ``micro_batches`` micro-batches of ``tokens`` tokens each
    (``flops``: the step's matmul FLOPs): its matmuls at :data:`MATMUL_EFFICIENCY` of the measured
    ``matmul_rate``, every eager op's fixed cost (``op_seconds``), and the elementwise work and the
    optimizer's at ``bytes_per_second`` (costs measured on the device:
    :func:`~sab_byon_omni.machine.measure_op_costs`). Checked against real steps of tiny, small and
    lightweight in docs/TRAINING.md."""
    ops = micro_batches * (OPS_PER_MICRO_BATCH + OPS_PER_BLOCK * cfg.n_layers) + OPS_PER_STEP
    ops *= AUTOCAST_OP_FACTOR if act_bytes < 4 else 1
    values = tokens * micro_batches * (cfg.n_layers * (VALUES_PER_HIDDEN * cfg.hidden + VALUES_PER_FFN * cfg.ffn))
    moved = values * act_bytes + tokens * micro_batches * VALUES_PER_VOCAB * (cfg.vocab_size or 0) * 4
    moved += OPTIMIZER_BYTES_PER_PARAM * num_parameters(cfg)
    return flops / (matmul_rate * MATMUL_EFFICIENCY) + ops * op_seconds + moved / bytes_per_second


def estimate_fitting(cfg: ModelConfig, seq_len: int, micro_batch: int, budget: float, **kw) -> Estimate:
    """What ``train.memory_saving: auto`` trains: the estimate without memory saving when it fits
    ``budget`` bytes, else the one with it."""
    e = estimate(cfg, seq_len, micro_batch, memory_saving=False, **kw)
    return e if e.peak <= budget else estimate(cfg, seq_len, micro_batch, memory_saving=True, **kw)


def divisors(n: int) -> list[int]:
    """The divisors of ``n`` in increasing order (O(sqrt n), fine for any batch size)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def largest_micro_batch(cfg: ModelConfig, seq_len: int, budget: float, effective_batch: int, **kw) -> int:
    """The largest micro-batch dividing ``effective_batch`` whose estimated peak fits ``budget``
    bytes; 0 if not even one sequence fits. Memory grows with the micro-batch: a binary search."""
    options = divisors(effective_batch)
    lo, hi = 0, len(options)  # options[:lo] fit, options[hi:] do not
    while lo < hi:
        mid = (lo + hi) // 2
        if estimate(cfg, seq_len, options[mid], **kw).peak <= budget:
            lo = mid + 1
        else:
            hi = mid
    return options[lo - 1] if lo else 0


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB"


MAX_EXP = math.log(sys.float_info.max)  # about 709.78: the largest x whose e^x is a float


def perplexity(loss: float) -> float:
    """e^loss: ``inf`` for a loss past :data:`MAX_EXP` (a diverged run; ``math.exp`` raises there),
    NaN for NaN. Printed with ``:.3f`` it reads ``inf``, never a made-up finite number."""
    return math.inf if loss > MAX_EXP else math.exp(loss)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 step``, ``2 steps``, ``1 process``, ``3 processes`` (``many``: the plural when not ``word + "s"``)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# ------------------------------------------------------------------------------ the GPU table
def epoch_tokens(num_samples: int, seq_len: int, val_fraction: float = 0.1) -> int:
    """Training tokens in one epoch if every sample filled ``seq_len`` (an upper bound)."""
    return int(round(num_samples * (1 - val_fraction))) * seq_len


def gpu_table(memory_gb: float = 80.0, peak_tflops: float = 989.0, mfu: float = 0.4,
              tokens: float = 1e9, precision: str = "bf16") -> str:
    """Markdown: Lightweight (vocab 96) and 3b (vocab 50,000) on 1, 8 and 64 GPUs, DDP and FSDP,
    with and without activation checkpointing; micro-batch 4 x 1024 (Lightweight) / 1 x 2048 (3b).
    Peaks are with ``memory_saving`` (the leanest the memory plan can choose): whether it fits."""
    budget = memory_gb * 1e9
    rows = ["| model | params | GPUs | parallel | act. ckpt | micro-batch | weights+grads+optim | activations "
            "| peak / GPU | fits " f"{memory_gb:g} GB | time for {fmt_count(tokens)} tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    setups = (("lightweight", 96, 4, 1024), ("3b", 50000, 1, 2048))
    for preset, vocab, mb, seq in setups:
        cfg = ModelConfig.from_name(preset, vocab_size=vocab, max_seq_len=seq)
        for gpus in (1, 8, 64):
            for parallel in ("ddp", "fsdp"):
                if gpus == 1 and parallel == "fsdp":
                    continue
                for ac in (False, True):  # the leanest setting without / with activation checkpointing
                    e = estimate(cfg, seq, mb, precision, gpus, parallel, ac, memory_saving=True)
                    fits = "yes" if e.peak <= budget else "no"
                    t = e.seconds_per_tokens(tokens, peak_tflops, mfu) * e.hardware_flops_per_token / e.flops_per_token
                    rows.append(f"| {preset} | {fmt_count(e.parameters)} | {gpus} | {parallel} "
                                f"| {'on' if ac else 'off'} "
                                f"| {mb} x {seq} | {fmt_bytes(e.weights + e.gradients + e.optimizer)} "
                                f"| {fmt_bytes(e.activations + max(e.logits, e.workspace))} "
                                f"| {fmt_bytes(e.peak)} | {fits} "
                                f"| {fmt_duration(t) if fits == 'yes' else '-'} |")
    return "\n".join(rows)


def single_gpu_table(sizes_gb: tuple[float, ...] = (24.0, 80.0), seq_len: int = 1024, precision: str = "bf16") -> str:
    """Markdown: for each preset, the largest micro-batch of ``seq_len`` tokens one GPU of each size
    can train (with activation checkpointing off / on); 0 = does not fit."""
    head = "| preset | params | " + " | ".join(f"{g:g} GB: act. ckpt off / on" for g in sizes_gb) + " |"
    rows = [head, "|---|---|" + "---|" * len(sizes_gb)]
    for preset, vocab in (("tiny", 96), ("small", 96), ("lightweight", 96), ("1b", 50000), ("3b", 50000)):
        cfg = ModelConfig.from_name(preset, vocab_size=vocab, max_seq_len=max(seq_len, 256))
        cells = []
        for gb in sizes_gb:
            mbs = [largest_micro_batch(cfg, seq_len, gb * 1e9, 64, precision=precision, activation_checkpointing=ac,
                                       memory_saving=True) for ac in (False, True)]
            cells.append(" / ".join(f"{m}" if m else "no" for m in mbs))
        rows.append(f"| {preset} | {fmt_count(num_parameters(cfg))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ the Colab table
# (name, GiB of memory, the precision the trainer picks there, dense data-sheet TFLOP/s in it)
COLAB_GPUS = (("T4", 16, "fp16", 65.0), ("A100", 40, "bf16", 312.0), ("A100", 80, "bf16", 312.0),
              ("H100 SXM", 80, "bf16", 989.4))


def colab_table(job_tokens: int, job_mean_len: int, mfu: float = 0.3, headroom: float = 0.9,
                reserve: float = 1.0 * GiB) -> str:
    """Markdown: on each Colab GPU, the largest micro-batch of 1024 tokens Lightweight, 1b and 3b
    train with (what the trainer's memory check accepts: ``headroom`` x memory - ``reserve``), and
    compute-bound times at ``mfu``: the default job's epoch (``job_tokens`` of Lightweight at
    ``job_mean_len`` tokens a sample) and 100M tokens of 1b at 2048."""
    rows = ["| GPU | precision | peak TFLOP/s | lightweight: micro-batch x 1024, act. ckpt off / on "
            "| 1b (50k vocab): the same | 3b (50k vocab): the same | notebook-job epoch (Lightweight) "
            "| 1b: 100M tokens of 2048 |",
            "|---|---|---:|---|---|---|---:|---:|"]
    light = ModelConfig.from_name("lightweight", vocab_size=96)
    big = ModelConfig.from_name("1b", vocab_size=50000)
    for name, gib, precision, peak in COLAB_GPUS:
        usable = gib * GiB * headroom - reserve
        cells = []
        for preset, vocab in (("lightweight", 96), ("1b", 50000), ("3b", 50000)):
            cfg = ModelConfig.from_name(preset, vocab_size=vocab)
            mbs = [largest_micro_batch(cfg, 1024, usable, 64, precision=precision, activation_checkpointing=ac)
                   for ac in (False, True)]
            cells.append(" / ".join(str(m) if m else "no" for m in mbs))
        epoch = estimate(light, job_mean_len, 1, precision).seconds_per_tokens(job_tokens, peak, mfu)
        fits_1b = cells[1] != "no / no"
        big_s = estimate(big, 2048, 1, precision).seconds_per_tokens(1e8, peak, mfu) if fits_1b else math.inf
        rows.append(f"| {name} {gib} GB | {precision} | {peak:g} | {' | '.join(cells)} | {epoch:.1f} s "
                    f"| {fmt_duration(big_s)} |")
    return "\n".join(rows)

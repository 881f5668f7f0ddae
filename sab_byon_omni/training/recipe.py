"""The from-scratch recipe: what a run that trains a fresh model on the user's own data uses when
the user has not chosen a recipe. Pure arithmetic on the model's shape and the corpus size.

The numbers come from a sweep of peak learning rate x model size on two corpora, 200 optimizer
steps of 16 x 128 byte tokens each (``benchmarks/learn.py``; table and plot in docs/RECIPES.md):

* **peak learning rate** ``LR_PER_WIDTH / hidden`` (0.6): the sweep's best rate fell about in
  proportion to the width (tiny, hidden 64: best 8e-3 to 1.6e-2; hidden 128: 8e-3; small, hidden 256:
  2e-3 better than 1e-3 and 4e-3), times ``sqrt(tokens per step / 2,048)`` (Adam's usual
  square-root rule for a larger batch; capped at ``BATCH_LR_CAP`` = 2x because the sweep did not
  measure it), clipped to ``[LR_MIN, LR_MAX]`` = [2e-4, 1e-2] (guard rails, not measured: above 1e-2
  even the smallest preset got worse, 3.2e-2 lost 0.4 bits per byte);
* **warmup** ``WARMUP_FRACTION`` (40%) of the run, at most ``WARMUP_MAX`` (100) steps: at 200 steps,
  80 warmup steps let a rate 2x higher train stably and gave lower loss than 0, 10, 40 or 120;
* **cosine** to ``MIN_LR_RATIO`` (0.1) of the peak: a floor of 0 was worse (at 10 warmup steps),
  0.3-0.4 within the run-to-run noise (about 0.03 bits per byte between two seeds), a constant rate
  better only with warmups shorter than 80 steps; AdamW beta2 0.95 (0.9 and 0.99 no better), beta1
  0.8 (never worse than AdamW's default 0.9 in five paired runs: -0.01 and -0.07 bits per byte on
  small, stdlib and prose; -0.00 to -0.06 on tiny; 0.95 and 0.5 clearly worse; the sweep of the
  rate ran at 0.9), weight decay 0.1 (0 the same, 0.5 worse), clipping at 1.0 (no clipping clearly
  worse, 0.5 and 0.25 the same);
* **batch geometry**: enough optimizer steps for the corpus. Tokens per step are chosen so one
  epoch gives at least ``TARGET_STEPS`` steps, between ``MIN_TOKENS_PER_STEP`` (the sweep's 2,048)
  and ``MAX_TOKENS_PER_STEP``; a corpus too small for that many steps even at the smallest batch is
  visited for more epochs (at most ``MAX_EPOCHS``). A micro-batch holds at most
  ``MAX_MICRO_TOKENS`` tokens; the rest is gradient accumulation. These bounds are engineering
  choices (memory, run time), not sweep results: the sweep only shows that 200 steps learn and that
  the loss was still falling at the end.

* **validation** about ``EVALUATIONS`` (10) times in the run, every ``total / EVALUATIONS`` optimizer
  steps, besides each epoch's end, on the first ``eval_batches`` validation batches: as many as keep
  all of them together within ``EVAL_SHARE`` (10%) of the training compute (a validation batch is a
  forward pass, about a third of a training micro-batch), but at least ``MIN_EVAL_BATCHES`` (8:
  fewer are too noisy to rank checkpoints by), and the whole validation set when it has no more
  batches than that (then ``sab-omni eval`` reproduces the run's validation loss). Every validation
  that improves on the best so far writes ``best_model.pt``. Engineering choices, not sweep results.

:func:`learns_slowly` names the rates the sweep showed to learn slowly (below ``1 / SLOW_FACTOR`` of
the rule's rate: on tiny, 2e-3, a fifth of the rule, ended 0.3-0.5 bits per byte behind the best rate),
and :func:`too_few_steps` a plan with fewer than ``MIN_STEPS`` optimizer steps (at 40-60 steps the
sweep's training loss was still falling fast: the 20-step means went 3.96, 2.76, 2.46).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sab_byon_omni.config import ModelConfig, TrainConfig
from sab_byon_omni.errors import SabError

SWEEP_TOKENS_PER_STEP = 16 * 128  # the sweep's batch geometry: the rule is exact there
LR_PER_WIDTH = 0.6  # peak learning rate = LR_PER_WIDTH / hidden at the sweep's geometry
LR_MIN, LR_MAX = 2e-4, 1e-2
BATCH_LR_CAP = 2.0  # the square-root batch factor never exceeds this (not measured beyond)
SLOW_FACTOR = 4.0  # a rate below rule / SLOW_FACTOR learns slowly
WARMUP_FRACTION, WARMUP_MAX = 0.4, 100
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.1
BETA1 = 0.8
BETA2 = 0.95
OPTIMIZER = "muon"  # Muon for the blocks' matrices, AdamW (at the rule's rate) for the rest
MUON_LR_PER_SQRT_WIDTH = 0.8  # Muon's peak rate = this / sqrt(hidden)
MUON_LR_MIN, MUON_LR_MAX = 0.01, 0.1
MUON_WARMUP = 10
# Muon's Newton-Schulz schedule: the train defaults (5 x quintic), measured against cheaper and Polar Express
# schedules on the time-to-loss benchmark at tiny (docs/RECIPES.md, "Muon's Newton-Schulz schedule"): fewer
# steps save little time at 2,048 tokens per step and lose more per step; Polar Express lost at two seeds
NS_REASON = ("the default: 2-4 quintic steps and 3-5 Polar Express steps did no better on the time-to-loss "
             "benchmark, docs/RECIPES.md")
TARGET_STEPS = 300  # optimizer steps per epoch the batch geometry aims for
MIN_STEPS = 50  # fewer planned optimizer steps than this: the run will hardly learn
MIN_TOKENS_PER_STEP, MAX_TOKENS_PER_STEP = 2048, 65536
MAX_MICRO_TOKENS = 16384
MAX_EPOCHS = 20
# The architecture levers a fresh model gets: those that paid on the time-to-loss benchmark and keep
# every export exact (docs/RECIPES.md, "Time to quality"). zero_init_proj is an initialisation only.
ARCHITECTURE: dict[str, Any] = {"zero_init_proj": True}
# The fine-tuning recipe (pretrained weights: --init_from): AdamW, peak rates from a sweep on
# SmolLM2-135M (benchmarks/finetune.py, docs/RECIPES.md), a short warmup, cosine to MIN_LR_RATIO.
# SmolLM2-135M, 20 steps of 4 x 128 tokens of the stdlib corpus, validation bits per byte (untouched 1.293):
# full 2e-5 1.258, 6e-5 1.234, 2e-4 1.230; LoRA rank 8 (alpha 16) 3e-4 1.264, 1e-3 1.229, 3e-3 1.224
FT_LR = 2e-4  # full fine-tuning: every weight moves (the sweep's best; 6e-5 0.004 behind, 2e-5 0.028)
LORA_LR = 3e-3  # LoRA: only the adapters move, from B = 0 (the sweep's best; 1e-3 0.005 behind)
FT_WARMUP_FRACTION, FT_WARMUP_MAX = 0.05, 50  # the weights are trained already: a short warmup
FT_WEIGHT_DECAY = 0.0  # decay pulls pretrained weights towards zero, not towards where they started
FT_BETA1 = 0.9
FT_MAX_EPOCHS = 3  # a pretrained model memorises a small corpus after a few passes
EVALUATIONS = 10  # validations at an interval in a from-scratch run (each epoch's end validates too)
EVAL_SHARE = 0.1  # the share of the training compute all of a run's validations together take
MIN_EVAL_BATCHES = 8  # fewer validation batches are too noisy to rank checkpoints by


RECIPE_FIELDS = ("learning_rate", "warmup_steps", "lr_schedule", "min_lr_ratio", "weight_decay", "beta1", "beta2",
                 "optimizer", "muon_learning_rate", "muon_warmup_steps", "batch_size", "gradient_accumulation_steps",
                 "epochs", "eval_interval", "eval_batches")  # the train settings a recipe sets


@dataclass(frozen=True)
class Recipe:
    """A from-scratch training recipe and, in ``reasons``, one line per choice saying why."""

    learning_rate: float
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    weight_decay: float
    beta1: float
    beta2: float
    optimizer: str
    muon_learning_rate: float
    muon_warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    total_steps: int  # optimizer steps planned (epochs x steps per epoch): the cosine's length
    eval_interval: int
    eval_batches: int
    reasons: list[str] = field(default_factory=list)

    def train_overrides(self) -> dict[str, Any]:
        """The ``train.*`` settings, for :func:`sab_byon_omni.config.replace` or ``build_config``."""
        return {f"train.{k}": getattr(self, k) for k in RECIPE_FIELDS}


def peak_learning_rate(model_cfg: ModelConfig, tokens_per_step: int = SWEEP_TOKENS_PER_STEP) -> float:
    """The rule's peak learning rate for a model of this width at this many tokens per step."""
    if tokens_per_step <= 0:
        raise SabError(f"tokens per optimizer step must be positive, got {tokens_per_step}")
    batch = min(math.sqrt(tokens_per_step / SWEEP_TOKENS_PER_STEP), BATCH_LR_CAP)
    return min(max(LR_PER_WIDTH / model_cfg.hidden * batch, LR_MIN), LR_MAX)


def muon_learning_rate(model_cfg: ModelConfig) -> float:
    """The rule's peak rate for the Muon-updated matrices of a model of this width."""
    return min(max(MUON_LR_PER_SQRT_WIDTH / math.sqrt(model_cfg.hidden), MUON_LR_MIN), MUON_LR_MAX)


def warmup_steps(total_steps: int) -> int:
    return max(1, min(round(WARMUP_FRACTION * total_steps), WARMUP_MAX))


def evaluation_cadence(total_steps: int, gradient_accumulation_steps: int, epochs: int,
                       validation_batches: int | None = None) -> tuple[int, int]:
    """(eval_interval, eval_batches): about ``EVALUATIONS`` validations at an interval, each on as
    many batches as keep all of them (those at the epochs' ends too) within ``EVAL_SHARE`` of the
    training compute of ``total_steps`` steps of ``gradient_accumulation_steps`` micro-batches, at
    least ``MIN_EVAL_BATCHES``; 0 (all of them) when a whole pass, ``validation_batches``, is no more.
    When even the least a validation costs (``MIN_EVAL_BATCHES``, or a smaller ``validation_batches``)
    would overrun the budget (a short run), fewer validations at a wider interval, down to none inside
    the run (interval 0: at the epochs' ends and the run's end)."""
    interval = max(1, math.ceil(total_steps / EVALUATIONS))
    validations = total_steps // interval + epochs
    budget = EVAL_SHARE * 3 * total_steps * gradient_accumulation_steps  # a micro-batch: forward + backward
    batches = max(MIN_EVAL_BATCHES, math.floor(budget / validations))
    least = MIN_EVAL_BATCHES if validation_batches is None else min(MIN_EVAL_BATCHES, validation_batches)
    if validations * least > budget:
        inside = math.floor(budget / max(least, 1)) - epochs  # the epochs' ends validate anyway
        interval = math.ceil(total_steps / inside) if inside > 0 else 0
    return interval, 0 if validation_batches is not None and validation_batches <= batches else batches


def batch_geometry(corpus_tokens: int, seq_len: int) -> tuple[int, int, int, int, list[str]]:
    """(batch_size, gradient_accumulation_steps, epochs, optimizer steps, reasons) for a corpus of
    ``corpus_tokens`` training tokens cut into windows of ``seq_len`` tokens."""
    if seq_len < 2:
        raise SabError(f"data.seq_len={seq_len} must be at least 2")
    windows = max(corpus_tokens - 1, 0) // (seq_len - 1)
    if windows < 1:
        raise SabError(f"the corpus has {corpus_tokens:,} training tokens, fewer than one window of "
                       f"data.seq_len={seq_len}: lower --seq_len or add data")
    lo = max(1, math.ceil(MIN_TOKENS_PER_STEP / seq_len))
    hi = max(lo, MAX_TOKENS_PER_STEP // seq_len)
    windows_per_step = min(max(windows // TARGET_STEPS, lo), hi, windows)
    # never more micro-batches than windows (one window longer than MAX_MICRO_TOKENS stays whole)
    accumulation = min(max(1, math.ceil(windows_per_step * seq_len / MAX_MICRO_TOKENS)), windows_per_step)
    while windows_per_step % accumulation:
        accumulation += 1
    batch = windows_per_step // accumulation
    # counted as the trainer counts them: a last, partial micro-batch and step still run
    steps_per_epoch = math.ceil(math.ceil(windows / batch) / accumulation)
    epochs = min(max(1, math.ceil(TARGET_STEPS / steps_per_epoch)), MAX_EPOCHS)
    reasons = [f"{windows_per_step} windows of {seq_len} tokens per optimizer step "
               f"({windows_per_step * seq_len:,} tokens): {steps_per_epoch:,} step{'s' * (steps_per_epoch != 1)} "
               f"per epoch over {windows:,} training window{'s' * (windows != 1)} (the recipe aims for at least "
               f"{TARGET_STEPS} steps per epoch)"]
    if epochs > 1:
        reasons.append(f"{epochs} epochs, so the run takes {steps_per_epoch * epochs:,} optimizer steps")
    if accumulation > 1:
        reasons.append(f"micro-batches of {windows_per_step // accumulation} x {accumulation} accumulation steps "
                       f"(at most {MAX_MICRO_TOKENS:,} tokens per micro-batch)")
    return batch, accumulation, epochs, steps_per_epoch * epochs, reasons


def optimizer_for(sharded: bool) -> tuple[str, str]:
    """The recipe's optimizer for a run whose weights are (``sharded``: FSDP) or are not sharded over
    processes, and why, for the banner: Muon orthogonalises whole matrices, which FSDP splits over the
    processes, so the recipe takes AdamW there."""
    if sharded:
        return "adamw", ("AdamW, not the recipe's Muon: --parallel fsdp shards the matrices Muon orthogonalises "
                         "whole (--parallel ddp keeps Muon)")
    return OPTIMIZER, ""


def from_scratch_recipe(model_cfg: ModelConfig, corpus_tokens: int, seq_len: int) -> Recipe:
    """The recipe for training ``model_cfg`` from a fresh initialisation on ``corpus_tokens`` tokens."""
    batch, accumulation, epochs, steps, reasons = batch_geometry(corpus_tokens, seq_len)
    return recipe_for_geometry(model_cfg, seq_len, batch, accumulation, epochs, steps, reasons)


def recipe_for_geometry(model_cfg: ModelConfig, seq_len: int, batch_size: int, gradient_accumulation_steps: int,
                        epochs: int, total_steps: int, reasons: list[str] | None = None) -> Recipe:
    """The rule's optimiser settings for a batch geometry chosen elsewhere (by the user or a benchmark)."""
    tokens_per_step = batch_size * gradient_accumulation_steps * seq_len
    lr, warm = peak_learning_rate(model_cfg, tokens_per_step), warmup_steps(total_steps)
    interval, batches = evaluation_cadence(total_steps, gradient_accumulation_steps, epochs)
    recipe = Recipe(learning_rate=lr, warmup_steps=warm, lr_schedule="cosine", min_lr_ratio=MIN_LR_RATIO,
                    weight_decay=WEIGHT_DECAY, beta1=BETA1, beta2=BETA2, optimizer=OPTIMIZER,
                    muon_learning_rate=muon_learning_rate(model_cfg), muon_warmup_steps=min(MUON_WARMUP, warm),
                    batch_size=batch_size, gradient_accumulation_steps=gradient_accumulation_steps, epochs=epochs,
                    total_steps=total_steps, eval_interval=interval, eval_batches=batches)
    train = TrainConfig(**{k.split(".", 1)[1]: v for k, v in recipe.train_overrides().items()})
    return dataclasses.replace(recipe, reasons=list(reasons or []) + describe(train, model_cfg, tokens_per_step,
                                                                              total_steps=total_steps))


def fine_tuning_recipe(model_cfg: ModelConfig, seq_len: int, batch_size: int, gradient_accumulation_steps: int,
                       epochs: int, total_steps: int, lora: bool, reasons: list[str] | None = None) -> Recipe:
    """The fine-tuning recipe for pretrained weights at a batch geometry: AdamW (never Muon), the
    swept peak rate (``LORA_LR`` for adapters, ``FT_LR`` for every weight), a short warmup, cosine."""
    warm = max(1, min(round(FT_WARMUP_FRACTION * total_steps), FT_WARMUP_MAX))
    interval, batches = evaluation_cadence(total_steps, gradient_accumulation_steps, epochs)
    defaults = TrainConfig()
    recipe = Recipe(learning_rate=LORA_LR if lora else FT_LR, warmup_steps=warm, lr_schedule="cosine",
                    min_lr_ratio=MIN_LR_RATIO, weight_decay=FT_WEIGHT_DECAY, beta1=FT_BETA1, beta2=BETA2,
                    optimizer="adamw", muon_learning_rate=defaults.muon_learning_rate,
                    muon_warmup_steps=defaults.muon_warmup_steps, batch_size=batch_size,
                    gradient_accumulation_steps=gradient_accumulation_steps, epochs=epochs, total_steps=total_steps,
                    eval_interval=interval, eval_batches=batches)
    train = TrainConfig(**{k.split(".", 1)[1]: v for k, v in recipe.train_overrides().items()},
                        lora_rank=8 if lora else 0)
    tokens = batch_size * gradient_accumulation_steps * seq_len
    return dataclasses.replace(recipe, reasons=list(reasons or []) + describe(train, model_cfg, tokens,
                                                                              total_steps=total_steps,
                                                                              finetuning=True))


def describe(t: TrainConfig, model_cfg: ModelConfig, tokens_per_step: int, explicit: frozenset[str] = frozenset(),
             total_steps: int | None = None, finetuning: bool | None = None) -> list[str]:
    """Banner lines for the optimiser and validation settings of ``t``: each value, and whether it is
    yours (a field in ``explicit``) or the rule's and why. ``total_steps``: the run's length;
    ``finetuning``: the fine-tuning recipe's reasons (default: when ``t`` starts from weights or has LoRA)."""
    def why(field: str, rule: str) -> str:
        return "yours" if field in explicit else rule

    batch = f" x sqrt({tokens_per_step:,} / {SWEEP_TOKENS_PER_STEP:,} tokens per step)" \
        if tokens_per_step != SWEEP_TOKENS_PER_STEP else ""
    tuned = finetuning if finetuning is not None else bool(t.init_from or t.lora_rank)
    rule = (f"the {'LoRA' if t.lora_rank else 'full'} fine-tuning rate of the sweep on SmolLM2-135M" if tuned else
            f"{LR_PER_WIDTH} / hidden {model_cfg.hidden}{batch}, within [{LR_MIN:g}, {LR_MAX:g}]")
    lr = f"peak {t.learning_rate:.3g} ({why('learning_rate', rule)})"
    if t.optimizer == "muon":
        muon = why("muon_learning_rate", f"{MUON_LR_PER_SQRT_WIDTH} / sqrt(hidden {model_cfg.hidden}), within "
                                         f"[{MUON_LR_MIN:g}, {MUON_LR_MAX:g}]")
        ns = "yours" if {"muon_ns_steps", "muon_ns_coefficients"} & explicit else NS_REASON
        first = (f"Muon for the blocks' matrices: peak {t.muon_learning_rate:.3g} ({muon}), "
                 f"{t.muon_warmup_steps} warmup steps ({why('muon_warmup_steps', f'{MUON_WARMUP}, at most the AdamW warmup')}), "
                 f"Newton-Schulz {t.muon_ns_steps} x {t.muon_ns_coefficients} ({ns}); "
                 f"AdamW for the embedding, head and norms: {lr}")
    else:
        who = "the LoRA adapters (every other weight frozen)" if t.lora_rank else "every parameter"
        muon = ("fine-tuning never uses Muon unless --optimizer muon" if tuned
                else "--optimizer muon puts Muon back on the blocks' matrices")
        first = f"AdamW for {who}{' (yours)' if 'optimizer' in explicit else ''}: {lr}" + (
            "" if "optimizer" in explicit or t.lora_rank else f"; a learning_rate you give is AdamW's, for every "
                                                            f"parameter ({muon})")
    schedule = "constant" if t.lr_schedule == "constant" else f"cosine to {t.min_lr_ratio:g} x the peak"
    run = f"the {total_steps:,}-step run" if total_steps else "the run"
    warm = (f"{FT_WARMUP_FRACTION:.0%} of {run}, at most {FT_WARMUP_MAX}" if tuned
            else f"{WARMUP_FRACTION:.0%} of {run}, at most {WARMUP_MAX}")
    lines = [first, f"{t.warmup_steps} warmup step{'s' * (t.warmup_steps != 1)} ({why('warmup_steps', warm)}), then "
                    f"{schedule}; AdamW betas ({t.beta1:g}, {t.beta2:g}), weight decay {t.weight_decay:g}"]
    if t.eval_interval:
        batches = (f"the first {t.eval_batches:,} batch{'es' if t.eval_batches > 1 else ''}" if t.eval_batches
                   else "the whole validation set")
        budget = f"all validations within {EVAL_SHARE:.0%} of the training compute, at least {MIN_EVAL_BATCHES} batches"
        share = f"the budget: {budget}" if t.eval_batches else f"no larger than the budget: {budget}"
        if "eval_interval" in explicit:  # the rule sized the batches for its own interval, not yours
            share = f"the rule's size for about {EVALUATIONS} validations; at your interval they may take more"
        every = "every step" if t.eval_interval == 1 else f"every {t.eval_interval:,} steps"
        count = f"{total_steps // t.eval_interval:,} in the run" if total_steps else f"about {EVALUATIONS} in the run"
        lines.append(f"validation {every} ({why('eval_interval', count)}) "
                     f"on {batches} ({why('eval_batches', share)}), and at each epoch's end and the run's end")
    elif "eval_interval" not in explicit:  # the rule's 0: a run too short for validations inside it
        lines.append("validation at each epoch's end and the run's end only: validations inside a run this short "
                     f"would take more than {EVAL_SHARE:.0%} of its training compute")
    return lines


def architecture(model_cfg: ModelConfig, explicit: frozenset[str] | set[str] = frozenset()
                 ) -> tuple[dict[str, Any], list[str]]:
    """The model fields of :data:`ARCHITECTURE` the recipe sets on a fresh model (those not given
    explicitly, nor already so) and the banner line that says so."""
    chosen = {k: v for k, v in ARCHITECTURE.items() if k not in explicit and getattr(model_cfg, k) != v}
    if not chosen:
        return {}, []
    what = ", ".join(f"{k} {'on' if v is True else v}" for k, v in chosen.items())
    return chosen, [f"model: {what} (zero-initialised attention and MLP output projections reached GPT-2's loss "
                    "sooner on the time-to-loss benchmark; an initialisation only, every export stays exact)"]


def learns_slowly(lr: float, model_cfg: ModelConfig, tokens_per_step: int = SWEEP_TOKENS_PER_STEP) -> str | None:
    """A one-line warning when ``lr`` is a rate the sweep showed to learn slowly from scratch, else None."""
    rule = peak_learning_rate(model_cfg, tokens_per_step)
    if lr < rule / SLOW_FACTOR:
        return (f"learning_rate {lr:.3g} is {rule / lr:.0f}x below the from-scratch rule's {rule:.3g} for hidden "
                f"{model_cfg.hidden}: a fresh model learns slowly at such a rate (docs/RECIPES.md); it suits "
                "fine-tuning")
    return None


def too_few_steps(total_steps: int, capped: bool = False) -> str | None:
    """A one-line warning when a from-scratch run plans fewer than ``MIN_STEPS`` optimizer steps
    (``capped``: because ``max_steps`` stops it there)."""
    if total_steps < MIN_STEPS:
        return (f"only {total_steps} optimizer step{'s' * (total_steps != 1)} planned: a model trained from "
                f"scratch needs at least ~{MIN_STEPS} to learn more than byte frequencies; "
                + ("raise --max_steps" if capped else "use a smaller batch or more epochs"))
    return None

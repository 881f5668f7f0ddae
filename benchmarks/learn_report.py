"""The learning benchmark's tables and plot (``python benchmarks/learn.py --report FILE``), from the
rows its runs append to a results file, and the constants both sides share."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sab_byon_omni.config import ModelConfig
from sab_byon_omni.errors import SabError
from sab_byon_omni.training.recipe import ARCHITECTURE, learns_slowly, recipe_for_geometry

DEFAULT_SEED = 1234
NANOGPT = dict(lr=1e-3, min_lr=1e-4, beta1=0.9, beta2=0.99, weight_decay=0.1, clip=1.0)
SWEEP_BETA1 = 0.9  # the rate sweep ran at AdamW's default beta1; the rule's 0.8 came after it
GPT2_WARMUP = 4  # nanoGPT warms up 100 of its 5,000 steps: 2%, 4 of our 200
NS_DEFAULT = (5, "quintic")  # train.muon_ns_steps, train.muon_ns_coefficients: what Muon ran before they were settings


def ns_fields(optimizer: str, steps: int | None, coefficients: str | None) -> dict:
    """Muon's Newton-Schulz schedule columns of a result row (None for AdamW)."""
    muon = optimizer == "muon"
    return dict(ns_steps=steps if muon else None, ns_coefficients=coefficients if muon else None)


def muon_fields(optimizer: str, lr: float | None, warmup: int | None) -> dict:
    """The optimizer columns of a result row (the Muon ones None for AdamW)."""
    muon = optimizer == "muon"
    return dict(optimizer=optimizer, muon_lr=lr if muon else None, muon_warmup=warmup if muon else None)


# -------------------------------------------------------------------------------------- report
def load_rows(path: str) -> list[dict]:
    """The rows of a results file (or of several, comma-separated); a repeated run (same corpus, shape, model, recipe and seed: the runs
    are deterministic) counts once, its latest row."""
    rows = [row for one in path.split(",") for row in _read_rows(one)]
    for r in rows:  # rows from before --beta1 / --optimizer existed ran AdamW at beta1 0.9
        r.setdefault("beta1", 0.9)
        for k, v in muon_fields("adamw", None, None).items():
            r.setdefault(k, v)
        for k, v in (ns_fields("muon", *NS_DEFAULT) if r["optimizer"] == "muon" else ns_fields("adamw", None, None)).items():
            r.setdefault(k, v)  # rows from before the schedule was a setting ran Muon's default
    key = lambda r: json.dumps([r["tag"] == "benchmark", r["corpus"], r["preset"], r["model"], r["lr"], r["seed"],  # noqa: E731
                                r["steps"], r["batch"], r["seq_len"], r["val_windows"], r.get("arch") or {},
                                r.get("mode", "steps"), r.get("precision", "fp32"), r["ns_steps"], r["ns_coefficients"]]
                               + [r[k] for k in SCHEDULE_KEYS])
    return list({key(r): r for r in rows}.values())


# the fields every report reads (a row of any day has them; the newer ones get defaults in load_rows)
REQUIRED = ("tag", "corpus", "preset", "model", "lr", "seed", "steps", "batch", "seq_len", "val_windows", "val",
            "warmup", "schedule", "min_lr_ratio", "beta2", "weight_decay", "clip", "params", "seconds")


def _read_rows(path: str) -> list[dict]:
    """The rows of one results file; SabError naming the file (and line) when it is missing,
    unreadable, not JSON lines, or a row lacks a field the report needs."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SabError(f"--report: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise SabError(f"--report: {path} line {n} is not JSON (a results file has one JSON object a line)") from None
        missing = [k for k in REQUIRED if k not in row] if isinstance(row, dict) else ["(not an object)"]
        if not missing and not (isinstance(row["val"], dict) and isinstance(row["val"].get("bits_per_byte"), (int, float))):
            missing = ["val.bits_per_byte"]
        if missing:
            raise SabError(f"--report: {path} line {n} is not a learn.py result row (missing {', '.join(missing[:4])})")
        rows.append(row)
    return rows


def _bpb(row: dict) -> float:
    return row["val"]["bits_per_byte"]


SCHEDULE_KEYS = ("warmup", "schedule", "min_lr_ratio", "beta1", "beta2", "weight_decay", "clip", "optimizer",
                 "muon_lr", "muon_warmup")


def on_rule_schedule(row: dict, beta1: float | None = SWEEP_BETA1, muon: bool = False) -> bool:
    """An ours run whose schedule, betas, decay and clipping are the rule's (only the rate may differ),
    except beta1, which must be ``beta1`` (default: the sweep's 0.9; None: the rule's), and the
    optimizer: AdamW (the rate sweep's) unless ``muon`` (then the rule's Muon, its rate free)."""
    rule = recipe_for_geometry(ModelConfig.from_name("tiny"), row["seq_len"], row["batch"], 1, 1, row["steps"])
    want = dict(warmup=rule.warmup_steps, schedule=rule.lr_schedule, min_lr_ratio=rule.min_lr_ratio,
                beta1=rule.beta1 if beta1 is None else beta1, beta2=rule.beta2, weight_decay=rule.weight_decay,
                clip=1.0, **muon_fields("muon" if muon else "adamw", row["muon_lr"], rule.muon_warmup_steps))
    return row["model"] == "ours" and all(row[k] == want[k] for k in SCHEDULE_KEYS)


def reference_gpt2(row: dict) -> bool:
    """A GPT-2 run with nanoGPT's recipe as this benchmark scales it (rate 1e-3, 4 warmup steps)."""
    return row["model"] == "gpt2" and row["lr"] == NANOGPT["lr"] and row["warmup"] == GPT2_WARMUP


def slow_in_rule(row: dict) -> bool:
    """Whether the current rule (not the one of the run's day) calls this rate slow."""
    shape = row.get("shape") or {}
    model = ModelConfig.from_name(row["preset"].split("/")[0], **shape)
    return learns_slowly(row["lr"], model, row["batch"] * row["seq_len"]) is not None


def _size(rows: list[dict], preset: str) -> int:
    return next((r["params"] for r in rows if r["preset"] == preset), 0)


def at_rule(row: dict) -> bool:
    """An ours run with everything from the rule: its schedule and its peak rate for this shape."""
    shape = row.get("shape") or {}
    model = ModelConfig.from_name(row["preset"].split("/")[0], **shape)
    rule = recipe_for_geometry(model, row["seq_len"], row["batch"], 1, 1, row["steps"])
    return (on_rule_schedule(row, beta1=None, muon=True) and math.isclose(row["lr"], rule.learning_rate, rel_tol=1e-6)
            and math.isclose(row["muon_lr"], rule.muon_learning_rate, rel_tol=1e-6))


def bench_table(rows: list[dict]) -> list[str]:
    """The learning benchmark: ours with the rule against GPT-2 with nanoGPT's recipe, same tokens."""
    rows = [r for r in rows if r["seed"] == DEFAULT_SEED and (at_rule(r) or reference_gpt2(r))
            and r.get("mode", "steps") == "steps" and r.get("arch", {}) in ({}, ARCHITECTURE)
            and r.get("precision", "fp32") == "fp32"  # the rule's model: of its day (no arch), or today's
            and (r.get("ns_steps"), r.get("ns_coefficients")) in ((None, None), NS_DEFAULT)]
    lines = ["| corpus | preset | ours: lr, warmup (Muon: rate, warmup) | ours bpb | GPT-2 bpb | ours / GPT-2 | ours s | GPT-2 s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for key in sorted({(r["corpus"], r["preset"]) for r in rows}, key=lambda k: (k[0], _size(rows, k[1]))):
        ours = [r for r in rows if (r["corpus"], r["preset"]) == key and r["model"] == "ours"]
        gpt2 = [r for r in rows if (r["corpus"], r["preset"]) == key and r["model"] == "gpt2"]
        if ours and gpt2:
            o, g = ours[-1], gpt2[-1]
            muon = f"; Muon {o['muon_lr']:g}, {o['muon_warmup']}" if o["optimizer"] == "muon" else ""
            lines.append(f"| {key[0]} | {key[1]} | {o['lr']:.3g}, {o['warmup']}{muon} | {_bpb(o):.4f} | {_bpb(g):.4f} "
                         f"| **{_bpb(o) / _bpb(g):.3f}** | {o['seconds']:.0f} | {g['seconds']:.0f} |")
    return lines + [""]


def arch_label(row: dict) -> str:
    """A model variant's name: ``base``, or its changed fields (``qk_norm=True,mlp=relu2``), and a
    Newton-Schulz schedule other than the default (``NS 4 x polar_express``)."""
    model = ",".join(f"{k}={v}" for k, v in (row.get("arch") or {}).items()) or "base"
    ns = (row.get("ns_steps"), row.get("ns_coefficients"))
    return model if None in ns or ns == NS_DEFAULT else f"{model}, NS {ns[0]} x {ns[1]}"


def time_table(rows: list[dict]) -> list[str]:
    """Time to quality, per corpus and preset, one row per variant of ours (and its precision): the
    training seconds at which it first reached GPT-2's final validation loss (evaluation time
    excluded), as a fraction of GPT-2's training seconds; its bits per byte at the step budget and,
    with ``--wall-budget``, at GPT-2's training seconds, each as a fraction of GPT-2's."""
    timed = [r for r in rows if r["model"] == "ours" and "time_to_target" in r]
    if not timed:
        return []
    lines = ["| corpus | preset | ours: model, precision | GPT-2 s (the run it divides by) | s/step ours / GPT-2 "
             "| time to GPT-2's loss (x GPT-2's time) | bpb at the step budget (x GPT-2) | bpb at GPT-2's seconds (x GPT-2) |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    gpt2s = {(r["corpus"], r["preset"], r["seed"]): r for r in rows if r["model"] == "gpt2" and "val_curve" in r}
    for r in [r for r in timed if r.get("mode", "steps") == "steps"]:
        g = gpt2s.get((r["corpus"], r["preset"], r["seed"]))  # the same seed's: a run is ours and GPT-2 at one seed
        if g is None:
            continue
        g = {**g, "seconds": r.get("gpt2_seconds", g["seconds"])}  # the GPT-2 run of the same invocation
        reach = "never" if r["time_to_target"] is None else \
            f"{r['time_to_target']:.1f} s ({r['time_to_target'] / g['seconds']:.2f}x)"
        same = lambda x: (x["corpus"], x["preset"], arch_label(x), x.get("precision"), x["seed"])
        wall = next((w for w in timed if w.get("mode") == "wall" and same(w) == same(r)), None)
        at_wall = "" if wall is None else f"{_bpb(wall):.4f} ({_bpb(wall) / _bpb(g):.3f}x)"
        per_step = (r["seconds"] / r["steps"]) / (g["seconds"] / g["steps"])
        seed = "" if r["seed"] == DEFAULT_SEED else f", seed {r['seed']}"
        lines.append(f"| {r['corpus']} | {r['preset']} | {arch_label(r)}, {r.get('precision', 'fp32')}{seed} | "
                     f"{g['seconds']:.2f} | {per_step:.2f} | {reach} | {_bpb(r):.4f} ({_bpb(r) / _bpb(g):.3f}x) | {at_wall} |")
    cpu = {r.get("cpu") for r in timed}
    ref = ", ".join(f"{k[0]} {k[1]}{'' if k[2] == DEFAULT_SEED else f' seed {k[2]}'} {_bpb(v):.4f}"
                    for k, v in gpt2s.items())  # deterministic: every GPT-2 run of a key ends at the same loss
    return lines + [f"GPT-2 bits per byte: {ref} (its training seconds vary from run to run: each row names the "
                    f"GPT-2 run it divides by); CPU {', '.join(sorted(c for c in cpu if c))}", ""]


def sweep_table(rows: list[dict], corpus: str) -> list[str]:
    """Preset x peak rate -> bits per byte (ours on the rule's schedule), with GPT-2's for reference."""
    here = [r for r in rows if r["corpus"] == corpus and r["seed"] == DEFAULT_SEED
            and (reference_gpt2(r) or on_rule_schedule(r))]
    lrs = sorted({r["lr"] for r in here if r["model"] == "ours"})
    lines = [f"Corpus `{corpus}`: validation bits per byte, ours by peak learning rate at beta1 {SWEEP_BETA1} "
             "(* best of the row, "
             "(s) below the rule's slow threshold), GPT-2 at nanoGPT's recipe:", "",
             "| preset | " + " | ".join(f"{lr:.3g}" for lr in lrs) + " | GPT-2 | best ours / GPT-2 |",
             "|---|" + "---:|" * (len(lrs) + 2)]
    for preset in sorted({r["preset"] for r in here}, key=lambda p: _size(here, p)):
        ours = {r["lr"]: r for r in here if r["preset"] == preset and r["model"] == "ours"}
        gpt2 = [r for r in here if r["preset"] == preset and r["model"] == "gpt2"]
        best = min(ours.values(), key=_bpb, default=None)
        cells = ["" if lr not in ours else f"{_bpb(ours[lr]):.3f}" + ("*" if ours[lr] is best else "")
                 + (" (s)" if slow_in_rule(ours[lr]) else "") for lr in lrs]
        g = f"{_bpb(gpt2[-1]):.3f}" if gpt2 else ""
        ratio = f"{_bpb(best) / _bpb(gpt2[-1]):.3f}" if gpt2 and best else ""
        lines.append(f"| {preset} | " + " | ".join(cells) + f" | {g} | {ratio} |")
    return lines + [""]


def muon_rule(row: dict) -> bool:
    """An ours run with the rule's Muon recipe in all but the Muon rate (a point of the Muon sweep)."""
    shape = row.get("shape") or {}
    model = ModelConfig.from_name(row["preset"].split("/")[0], **shape)
    rule = recipe_for_geometry(model, row["seq_len"], row["batch"], 1, 1, row["steps"])
    return on_rule_schedule(row, beta1=None, muon=True) and math.isclose(row["lr"], rule.learning_rate, rel_tol=1e-6)


def muon_table(rows: list[dict]) -> list[str]:
    """Corpus x preset x Muon peak rate -> bits per byte (everything else the rule's)."""
    here = [r for r in rows if r["seed"] == DEFAULT_SEED and muon_rule(r) and r.get("mode", "steps") == "steps"
            and r.get("precision", "fp32") == "fp32" and (r["ns_steps"], r["ns_coefficients"]) == NS_DEFAULT]
    if not here:
        return []
    rates = sorted({r["muon_lr"] for r in here})
    lines = ["Muon's peak rate (the rest of the rule unchanged): validation bits per byte (* best of the row):", "",
             "| corpus | preset | " + " | ".join(f"{lr:g}" for lr in rates) + " |", "|---|---|" + "---:|" * len(rates)]
    for corpus, preset in sorted({(r["corpus"], r["preset"]) for r in here}, key=lambda k: (k[0], _size(rows, k[1]))):
        got = {r["muon_lr"]: r for r in here if (r["corpus"], r["preset"]) == (corpus, preset)}
        best = min(got.values(), key=_bpb)
        cells = [f"{_bpb(got[lr]):.3f}" + ("*" if got[lr] is best else "") if lr in got else "" for lr in rates]
        lines.append(f"| {corpus} | {preset} | " + " | ".join(cells) + " |")
    return lines + [""]


def ablation_table(rows: list[dict]) -> list[str]:
    """Every run off the rule's schedule (ours) or off nanoGPT's (GPT-2): what changed, what it gave."""
    off = [r for r in rows if not (on_rule_schedule(r) or reference_gpt2(r) or muon_rule(r)) or r["seed"] != DEFAULT_SEED]
    lines = ["| corpus | preset | model | optimizer | steps | lr | warmup | schedule | min lr | beta1 | beta2 | wd | clip | seed "
             "| bpb |", "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(off, key=lambda r: (r["corpus"], _size(rows, r["preset"]), r["model"], r["lr"], r["warmup"])):
        opt = "AdamW" if r["optimizer"] == "adamw" else f"Muon {r['muon_lr']:g}, {r['muon_warmup']}"
        lines.append(f"| {r['corpus']} | {r['preset']} | {r['model']} | {opt} | {r['steps']} | {r['lr']:.3g} | {r['warmup']} | "
                     f"{r['schedule']} | "
                     f"{r['min_lr_ratio']:g} | {r['beta1']:g} | {r['beta2']:g} | {r['weight_decay']:g} | {r['clip']:g} | "
                     f"{r['seed']} | {_bpb(r):.3f} |")
    return lines + [""] if off else []


def report(rows: list[dict], plot: str | None) -> str:
    """Markdown tables (benchmark, sweep, other schedules) from result rows; draws the sweep plot."""
    lines = bench_table(rows) + time_table(rows)
    sweep = [r for r in rows if r["tag"] not in ("benchmark", "levers")]  # levers: time-to-loss rows
    for corpus in sorted({r["corpus"] for r in sweep}):
        lines += sweep_table(sweep, corpus)
    lines += muon_table(rows)  # the benchmark's own rows are points of it too
    lines += ablation_table(sweep)
    if plot and sweep:
        draw([r for r in sweep if r["seed"] == DEFAULT_SEED and (reference_gpt2(r) or on_rule_schedule(r))]
             + [r for r in rows if r["seed"] == DEFAULT_SEED and muon_rule(r)], plot)
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def draw(sweep: list[dict], path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = sorted({r["corpus"] for r in sweep})
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.5), squeeze=False)
    drawn = sorted({r["preset"] for r in sweep if r["model"] == "ours"}, key=lambda p: _size(sweep, p))
    colors = {preset: f"C{i}" for i, preset in enumerate(drawn)}  # one colour per preset on every panel
    for ax, corpus in zip(axes[0], corpora):
        here = [r for r in sweep if r["corpus"] == corpus]
        for preset in [p for p in drawn if any(r["preset"] == p and r["model"] == "ours" for r in here)]:
            color = colors[preset]
            mine = [r for r in here if r["preset"] == preset and r["model"] == "ours"]
            ours = sorted((r["lr"], _bpb(r)) for r in mine if r["optimizer"] == "adamw")
            if ours:
                ax.plot(*zip(*ours), "o-", color=color, label=f"ours, AdamW, {preset}")
            muon = sorted((r["muon_lr"], _bpb(r)) for r in mine if r["optimizer"] == "muon")
            if muon:
                ax.plot(*zip(*muon), "s-.", color=color, label=f"ours + Muon (x: Muon's rate), {preset}")
            gpt2 = [r for r in here if r["preset"] == preset and r["model"] == "gpt2"]
            if gpt2:
                ax.axhline(_bpb(gpt2[-1]), color=color, linestyle="--", label=f"GPT-2 (nanoGPT recipe), {preset}")
                ax.axhline(0.7 * _bpb(gpt2[-1]), color=color, linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        rates = []
        for lr in sorted({r["lr"] if r["optimizer"] == "adamw" else r["muon_lr"]
                          for r in here if r["model"] == "ours"}):  # labels at least 1.5x apart
            rates += [lr] if not rates or lr >= 1.5 * rates[-1] else []
        ax.set_xticks(rates, [f"{lr:.3g}" for lr in rates], fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("peak learning rate (ours: AdamW's, or Muon's with the rule's AdamW rate)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"{corpus}: 200 steps x 16 x 128 bytes (dotted: 0.7 x GPT-2)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

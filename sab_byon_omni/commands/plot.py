"""sab-omni plot: draw loss and learning rate against optimizer steps from a run's metrics.jsonl.

Validation loss is drawn too where the run evaluated (epoch ends, train.eval_interval).
"""

from __future__ import annotations

import argparse
import math

from sab_byon_omni.plotting import DEFAULT_PNG, collect_series, metrics_path, plot_metrics, read_metrics

EXAMPLE = f"""examples:
  sab-omni plot checkpoints/tiny                    # writes checkpoints/tiny/{DEFAULT_PNG}
  sab-omni plot checkpoints/lightweight -o loss.png --title "lightweight, lr 1e-3"
"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plot", help="plot loss and learning rate of a run to a PNG", description=__doc__,
                       epilog=EXAMPLE)
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="a checkpoint_dir written by train (or its metrics.jsonl file; a checkpoint in it "
                        "plots its folder)")
    p.add_argument("-o", "--output", metavar="PNG", default=None,
                   help=f"where to write the PNG (default: RUN_DIR/{DEFAULT_PNG}); an existing non-PNG file is never "
                        "overwritten")
    p.add_argument("--title", default=None, help="figure title (default: the run directory's name)")
    p.add_argument("--out", dest="output", default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # the earlier spelling
    return p


def run(args: argparse.Namespace) -> int:
    src = metrics_path(args.run_dir)  # a checkpoint file: its folder's, said once
    s = collect_series(read_metrics(src))  # read once: a skipped row is warned about once
    path = plot_metrics(src, args.output, args.title, series=s)
    parts = []
    if s.loss[0]:
        parts.append(f"last train loss {s.loss[1][-1]:.4f} at step {s.loss[0][-1]}")
    finite_val = [(v, st) for st, v in zip(*s.val_loss) if math.isfinite(v)]
    if finite_val:
        v, st = min(finite_val)
        parts.append(f"best validation loss {v:.4f} at step {st}")
    print(f"wrote {path}" + (f" ({'; '.join(parts)})" if parts else ""))
    return 0

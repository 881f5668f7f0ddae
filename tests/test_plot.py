"""sab-omni plot / sab_byon_omni.plotting: series from metrics.jsonl and a PNG that shows them."""

import json

import numpy as np
import pytest
from matplotlib.image import imread

from sab_byon_omni import cli
from sab_byon_omni.errors import SabError
from sab_byon_omni.plotting import collect_series, make_figure, plot_metrics, read_metrics


def write_run(d, rows, extra_text=""):
    d.mkdir(parents=True, exist_ok=True)
    with (d / "metrics.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write(extra_text)
    return d


def interval(step, loss, lr, epoch=1):
    return {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 1e3,
            "memory_mb": 300.0, "skipped": 0, "time": 0.0}


ROWS = [interval(s, 4.0 - 0.1 * s, 1e-3 * min(s, 5) / 5) for s in range(1, 21)] + [
    {"step": 10, "epoch": 1, "val_loss": 3.2, "time": 0.0},
    {"step": 20, "epoch": 1, "train_loss": 3.1, "val_loss": 2.5, "time": 0.0},
]


def test_series_are_split_and_a_resumed_run_overrides_repeated_steps(tmp_path):
    rows = ROWS + [interval(19, 9.9, 1e-4), {"step": 21, "epoch": 2, "val_loss": float("nan")}]
    write_run(tmp_path / "run", rows, extra_text='{"step": 22, "epoch": 2, "lo')  # torn last line
    s = collect_series(read_metrics(tmp_path / "run" / "metrics.jsonl"))
    assert s.loss[0] == list(range(1, 21)) and s.loss[1][18] == 9.9  # the later row for step 19 wins
    assert s.lr[1][4] == pytest.approx(1e-3)
    assert s.val_loss == ([10, 20], [3.2, 2.5])  # NaN dropped
    assert s.epoch_train_loss == ([20], [3.1])


def test_figure_has_loss_validation_and_learning_rate():
    fig = make_figure(collect_series(ROWS))
    loss_ax, lr_ax = fig.axes
    assert {line.get_label() for line in loss_ax.lines} == {"train loss", "validation loss"}
    assert [c.get_label() for c in loss_ax.collections] == ["train loss (epoch mean)"]
    assert [line.get_label() for line in lr_ax.lines] == ["learning rate"]
    assert lr_ax.get_xlabel() == "optimizer step"


def test_no_validation_line_without_validation_rows():
    fig = make_figure(collect_series(ROWS[:20]))
    assert {line.get_label() for line in fig.axes[0].lines} == {"train loss"}


def test_cli_writes_a_non_empty_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    assert cli.main(["plot", "run"]) == 0
    out = capsys.readouterr().out
    png = tmp_path / "run" / "metrics.png"
    assert "run/metrics.png" in out and "best validation loss 2.5000 at step 20" in out
    img = imread(png)
    assert img.shape[0] >= 400 and img.shape[1] >= 600
    assert np.asarray(img)[..., :3].std() > 0.05  # something is drawn
    # The curves' colours are in the picture: blue train loss, orange validation, green learning rate.
    rgb = (np.asarray(img)[..., :3] * 255).astype(int).reshape(-1, 3)
    for colour in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):
        assert (np.abs(rgb - colour).sum(axis=1) < 30).sum() > 50, colour
    # Plotting again replaces our own PNG.
    assert cli.main(["plot", "run", "--out", "run/metrics.png", "--title", "again"]) == 0


def test_never_overwrites_a_file_that_is_not_a_png(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    (tmp_path / "notes.png").write_text("my notes")
    assert cli.main(["plot", "run", "--out", "notes.png"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "notes.png").read_text() == "my notes"
    assert cli.main(["plot", "run", "--out", "plot.pdf"]) == 2
    assert "ending in .png" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "not found"),
    (lambda d: d.mkdir(), "no metrics.jsonl"),
    (lambda d: write_run(d, [{"step": 1, "epoch": 1, "lr": 1e-3}]), "no loss rows"),
])
def test_bad_run_directories_are_one_line_errors(tmp_path, make, message):
    make(tmp_path / "run")
    with pytest.raises(SabError, match=message):
        plot_metrics(tmp_path / "run")


def test_a_real_run_logs_every_metric_to_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sab_byon_omni.core.sab_transcendent import SABTranscendentV2
    from sab_byon_omni.training.train_3b import train_3b_rapid

    run = tmp_path / "run"
    train_3b_rapid(SABTranscendentV2(preset="tiny"), epochs=1, batch_size=8, grad_accum=1, seq_len=64,
                   num_samples=40, learning_rate=3e-3, log_interval=1, checkpoint_dir=str(run), tensorboard=True,
                   progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_mb", "skipped"} <= set(rows[0])
    assert "val_loss" in rows[-1] and "train_loss" in rows[-1]
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm", "epoch_end/val_loss"} <= set(events.Tags()["scalars"])
    assert plot_metrics(run).stat().st_size > 10_000


def test_a_line_python_cannot_convert_is_skipped_not_a_traceback(tmp_path):
    """An integer of 5,000 digits is valid JSON that ``json.loads`` refuses with a ValueError."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": ' + "1" * 5000 + "}\n")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]


def test_x_ticks_are_whole_steps_and_no_legend_covers_a_curve():
    """Three steps gave ticks at 1.25, 1.5, ...; the legends sat in the upper right, over a rising
    learning rate (warmup)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows = [interval(s, 4.0 - s, 1e-4 * s) for s in (1, 2, 3)] + [{"step": 3, "val_loss": 1.5}]
    fig = make_figure(collect_series(rows))
    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        legend, plot_area = ax.get_legend().get_window_extent(), ax.get_window_extent()
        assert not legend.overlaps(plot_area), (legend, plot_area)  # beside the plot, not on it
        assert fig.bbox.contains(legend.x1 - 1, legend.y0 + 1)  # and inside the picture


def test_steps_that_are_not_step_numbers_are_skipped_with_a_warning(tmp_path, monkeypatch, capsys, caplog):
    """``{"step": 1e400}`` is valid JSON for infinity: int() of it was an OverflowError traceback."""
    monkeypatch.chdir(tmp_path)
    bad = ['{"step": 1e400, "loss": 1.0}', '{"step": -1e400, "loss": 1.0}', '{"step": NaN, "loss": 1.0}',
           '{"step": 2.5, "loss": 1.0}', '{"step": -3, "loss": 1.0}', '{"step": 1e300, "loss": 1.0}',
           '{"step": 1' + "0" * 400 + ', "loss": 1.0}', '{"step": true, "loss": 1.0}']
    write_run(tmp_path / "run", ROWS, extra_text="\n".join(bad) + "\n")
    with caplog.at_level("WARNING"):
        assert cli.main(["plot", "run"]) == 0
    assert "last train loss 2.0000 at step 20" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    # the first three named, the rest counted; once, though the command reads the rows for two things
    assert len(warned) == 4 and warned[-1].endswith(f"{len(bad) - 3} more lines skipped ({len(bad)} in all)"), warned
    assert collect_series(read_metrics(tmp_path / "run" / "metrics.jsonl")).loss[0] == list(range(1, 21))


def test_missing_folders_of_the_output_are_created(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    assert cli.main(["plot", "run", "-o", "some/missing/dir/x.png"]) == 0
    assert imread(tmp_path / "some/missing/dir/x.png").shape[0] >= 400
    (tmp_path / "afile").write_text("mine")  # a file where a folder would go: one line, nothing created
    assert cli.main(["plot", "run", "-o", "afile/sub/x.png"]) == 2
    assert "afile" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "mine"


def test_a_muon_run_shows_both_learning_rates():
    rows = [{**interval(s, 4.0 - 0.1 * s, 1e-3), "muon_lr": 0.05 * s / 20} for s in range(1, 21)]
    s = collect_series(rows)
    assert s.muon_lr == (list(range(1, 21)), [0.05 * i / 20 for i in range(1, 21)])
    fig = make_figure(s)
    labels = sorted(line.get_label() for ax in fig.axes[1:] for line in ax.lines)
    assert labels == ["AdamW learning rate", "Muon learning rate"]
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["AdamW learning rate",
                                                                            "Muon learning rate"]
    assert collect_series(ROWS).muon_lr == ([], [])  # an AdamW run: one rate, as before


def test_a_checkpoint_file_plots_its_run_folder_and_another_file_is_one_line(tmp_path, monkeypatch, capsys, caplog):
    """The newcomer's `plot FILE.pt` printed 19,127 'not a JSON line; skipped' warnings."""
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    (tmp_path / "run" / "step_20.pt").write_bytes(b"PK\x03\x04" + b"\n\x00junk" * 20000)
    with caplog.at_level("WARNING"):
        assert cli.main(["plot", "run/step_20.pt"]) == 0
    out, err = capsys.readouterr()
    assert "run/metrics.png" in out and "plotting its run folder run" in err and "skipped" not in err
    (tmp_path / "elsewhere.pt").write_bytes(b"\n\x00junk" * 20000)
    assert cli.main(["plot", "elsewhere.pt"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "elsewhere.pt is not a run folder or a metrics.jsonl file" in err


def test_many_bad_lines_give_three_warnings_and_a_count(tmp_path, caplog):
    path = write_run(tmp_path / "run", ROWS, extra_text="x\n" * 19_000) / "metrics.jsonl"
    with caplog.at_level("WARNING"):
        assert len(read_metrics(path)) == len(ROWS)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and warned[-1].endswith("18997 more lines skipped (19000 in all)"), warned[-1]


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_folder_that_takes_no_files_is_named_as_such(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "run", ROWS)
    assert cli.main(["plot", "run", "-o", "/proc/x.png"]) == 2
    err = capsys.readouterr().err
    assert "takes no new files" in err and "No such file or directory" not in err, err

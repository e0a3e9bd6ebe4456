"""`lstm-jax plot` / plot.plot_runs: the PNG is written and its curves carry exactly the values of
each run's metrics.jsonl (read back from the figure's Line2D objects); a missing run is one line.

Each test names a plausible bug it catches."""
import json

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from lstm_jax import cli, plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
KEYS = ("train_loss", "val_loss", "val_last_loss")


def _write_run(workdir, offset: float) -> list[dict]:
    """A metrics.jsonl as training writes it: train events every 10 steps, an evaluation event
    (val_loss, val_bpc, val_last_loss) every 20, 100 steps per epoch; returns the records."""
    workdir.mkdir(parents=True)
    records = []
    for step in range(10, 101, 10):
        base = {"step": step, "epoch": step / 100, "elapsed_s": 1.5 * step + offset}
        records.append({**base, "train_loss": 2.9 - step / 100 - offset / 10, "chars_per_s": 4e4})
        if step % 20 == 0:
            val = 2.8 - step / 120 - offset / 10
            records.append({**base, "val_loss": val, "val_bpc": val / np.log(2),
                            "val_last_loss": val - 0.1})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_runs draws, kept for inspection after it closes them."""
    drawn = []
    close = plt.close

    def keep_and_close(fig=None):
        drawn.append(fig)
        close(fig)
    monkeypatch.setattr(plt, "close", keep_and_close)
    return drawn


def _lines(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(path).shape
    assert (width, height) == (1430, 528)          # 13 x 4.8 inches at 110 dpi


def test_plot_runs_draws_every_metric_of_every_run(tmp_path, figures):
    """Left panel: each run's train_loss, val_loss and val_last_loss against elapsed_s; right
    panel: the same against epoch; the Keras reference as separate points. Fails if a curve reads
    another field (val_bpc for val_loss, step for elapsed_s), drops an event, mixes two runs, or
    misses the Keras points."""
    runs = {"run_a": _write_run(tmp_path / "run_a", 0.0), "run_b": _write_run(tmp_path / "run_b", 3.0)}
    out = tmp_path / "loss.png"
    plot.plot_runs([str(tmp_path / name) for name in runs], str(out))
    _assert_png(out)
    (fig,) = figures
    ax_time, ax_epoch = fig.axes
    time_lines, epoch_lines = _lines(ax_time), _lines(ax_epoch)
    for name, records in runs.items():
        for key in KEYS:
            events = [r for r in records if key in r]
            y = [r[key] for r in events]
            assert time_lines[f"{name} {key}"] == ([r["elapsed_s"] for r in events], y)
            assert epoch_lines[f"{name} {key}"] == ([r["epoch"] for r in events], y)
    assert time_lines["Keras (this machine)"] == (plot.KERAS_HERE["elapsed_s"], plot.KERAS_HERE["loss"])
    assert epoch_lines["Keras (this machine)"] == (plot.KERAS_HERE["epoch"], plot.KERAS_HERE["loss"])
    assert "Keras (book's run)" in epoch_lines
    for lines in (time_lines, epoch_lines):                  # the Keras reference's epoch-20 bar
        assert lines["1.34 (Keras reference, epoch 20)"][1] == [plot.SEED_TARGET] * 2
    assert ax_time.get_xlabel() == "wall time (s)" and ax_epoch.get_xlabel() == "epoch"


def test_plot_cli_writes_the_png_without_the_reference(tmp_path, figures, capsys):
    """`lstm-jax plot --workdir A --nokeras_reference --out F` writes F with A's curves, the Keras reference's
    1.34 bar and no Keras points. Fails if the flag is not passed through or a run without evaluation events
    gets empty validation curves."""
    records = [r for r in _write_run(tmp_path / "run", 0.0) if "train_loss" in r]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "curves.png"
    assert cli.main(["lstm-jax", "plot", "--workdir", str(tmp_path / "run"), "--out", str(out),
                     "--nokeras_reference"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _assert_png(out)
    (fig,) = figures
    labels = set(_lines(fig.axes[0])) | set(_lines(fig.axes[1]))
    assert labels == {"run train_loss", "1.34 (Keras reference, epoch 20)"}, labels
    assert _lines(fig.axes[0])["run train_loss"][1] == [r["train_loss"] for r in records]


def test_plot_of_a_missing_run_is_a_one_line_error(tmp_path):
    """A directory without metrics.jsonl: one line naming it, and no PNG. Fails if a traceback
    escapes or an empty figure is written."""
    out = tmp_path / "loss.png"
    with pytest.raises(SystemExit) as info:
        cli.main(["lstm-jax", "plot", "--workdir", str(tmp_path / "nope"), "--out", str(out)])
    message = str(info.value.code)
    assert message.startswith("lstm-jax: error: ") and "\n" not in message
    assert "metrics.jsonl not found" in message and "nope" in message
    assert not out.exists()


def test_time_to_is_the_first_event_at_or_below_the_threshold():
    """Fails if time_to returns a later crossing, uses '<' instead of '<=', or trips over events
    without the key."""
    records = [{"elapsed_s": 1.0, "train_loss": 2.0}, {"elapsed_s": 2.0, "val_loss": 1.2},
               {"elapsed_s": 3.0, "train_loss": 1.34}, {"elapsed_s": 4.0, "train_loss": 1.2}]
    assert plot.time_to(records, "train_loss", 1.34) == 3.0
    assert plot.time_to(records, "val_loss", 1.5) == 2.0
    assert plot.time_to(records, "train_loss", 1.0) is None

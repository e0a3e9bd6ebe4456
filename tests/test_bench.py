"""`lstm-jax bench --quick`: the table, the JSON report (its figures consistent with the FLOP count
and the peak), the PNG, and the PyTorch worker in the same rounds where torch is installed."""
import json
import re
import time

import pytest

from conftest import REPO
from lstm_jax import bench, cli, flops
from lstm_jax.model import ModelConfig


def test_bench_quick_reports_train_step_mfu_and_sampler(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    assert cli.main(["lstm-jax", "bench", "--config", str(REPO / "configs" / "tiny.py"), "--quick",
                     "--vocab_size=30", f"--out={out}", f"--plot={png}", "--noprogress"]) == 0
    text = capsys.readouterr().out
    assert "lstm_jax" in text and "MFU" in text and "sampler rows" in text
    r = json.loads(out.read_text())
    w, t = r["workload"], r["train"]
    assert (w["vocab"], w["hidden"], w["batch"], w["seq"]) == (30, 32, 16, 20)
    per_char = flops.count(ModelConfig(vocab_size=30, hidden_size=32)).train
    assert t["flops_per_char"] == per_char
    assert t["chars_per_s"] == pytest.approx(16 * 20 / t["step_s"])
    assert t["flops_per_s"] == pytest.approx(per_char * t["chars_per_s"])
    assert t["mfu"] == pytest.approx(t["flops_per_s"] / r["peak"]["flops_per_s"])
    assert 0 < t["mfu"] < 1 and t["compile_s"] > 0
    assert [s["rows"] for s in r["sample"]] == [1, 64]
    assert all(s["chars_per_s"] == pytest.approx(s["rows"] * 16 / s["seconds"]) for s in r["sample"])
    assert ("torch" in r) == bench.torch_available()
    if "torch" in r:   # the same rounds: one PyTorch time per round
        assert len(r["torch"]["step_s_all"]) == len(t["step_s_all"]) and r["torch"]["chars_per_s"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_torch_on_without_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "torch_available", lambda: False)
    with pytest.raises(SystemExit, match="PyTorch is not installed"):
        cli.main(["lstm-jax", "bench", "--config", str(REPO / "configs" / "tiny.py"), "--quick",
                  "--vocab_size=30", "--torch=on", f"--out={tmp_path / 'b.json'}", "--noprogress"])
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("arg,message", [
    ("--repeats=0", "--repeats=0: 0 is not a positive integer"),
    ("--min_time=-1", "--min_time=-1"),
    ("--sample_length=0", "--sample_length=0"),
    ("--sample_rows=0,64", "--sample_rows must be positive row counts, got 0,64"),
    ("--sample_rows=x", "--sample_rows must be positive row counts, got x"),
])
def test_bench_refuses_bad_numbers_before_it_runs_and_keeps_the_old_report(tmp_path, arg, message):
    """A bad count next to an existing report: one line naming the flag, the report untouched.
    Before, --repeats=0 ended in 'no median for empty data' after the runs, and --min_time=-1 ran."""
    out = tmp_path / "b.json"
    out.write_text('{"kept": true}')
    with pytest.raises(SystemExit, match=re.escape(message)):
        cli.main(["lstm-jax", "bench", "--config", str(REPO / "configs" / "tiny.py"),
                  "--vocab_size=30", arg, f"--out={out}", "--noprogress"])
    assert out.read_text() == '{"kept": true}'


def test_benchmarks_torch_baseline_drives_the_packages_harness():
    """benchmarks/torch_baseline.py keeps no harness of its own: its FLOP count is
    lstm_jax.flops', its warm-up is lstm_jax.bench's, and its worker protocol is bench.serve
    (a fake step stands in for PyTorch)."""
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("torch_baseline", REPO / "benchmarks" / "torch_baseline.py")
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)
    assert tb.warm_up is bench.warm_up and tb.peak_rss_mb is bench.peak_rss_mb
    m = ModelConfig(vocab_size=57, hidden_size=128, num_layers=2)
    assert tb.train_flops("window", 128, 2, 16, 60, 57) == flops.train_flops_per_step(m, 16, 60, "window")
    calls = []
    stdout = io.StringIO()
    tb.serve(lambda k: calls.append(k) or 2.5, 3, float,
             stdin=io.StringIO('{"op": "time"}\n{"op": "time"}\n{"op": "finish"}\n'), stdout=stdout)
    replies = [json.loads(line) for line in stdout.getvalue().splitlines()]
    assert [sorted(r) for r in replies[:2]] == [["t"], ["t"]] and calls[:6] == list(range(6))
    assert replies[2]["finished"] and replies[2]["loss"] == 2.5 and replies[2]["peak_rss_mb"] > 0


def test_warm_up_waits_for_each_step_so_it_queues_no_more_than_it_needs():
    """A step that returns at once and finishes later (JAX's asynchronous dispatch): warm-up
    waits for each, so it runs 1 + 3 steps when those take longer than 0.5 x min_time, and sizes
    a repeat from their real time. Fails if warm-up only dispatches in its loop: it then queues
    thousands of steps before 0.5 x min_time has passed."""
    calls = []
    first_s, n = bench.warm_up(lambda k: calls.append(k) or k, 0.2,
                               sync=lambda out: time.sleep(0.04))
    assert calls == [0, 1, 2, 3]
    assert first_s >= 0.04 and 3 <= n <= 5      # 0.2 s / ~0.04 s per step


def test_bench_refuses_the_recipes_unchosen_model_in_one_line(tmp_path):
    """configs/recipe.py leaves the model to a run's time budget: bench says which fields to set
    (before, a raw 'model.hidden_size must be a positive integer, got 0' from the model)."""
    out = tmp_path / "b.json"
    out.write_text('{"kept": true}')
    with pytest.raises(SystemExit, match="bench times one model, and the recipe chooses it .* set "
                                         "model.hidden_size, model.num_layers"):
        cli.main(["lstm-jax", "bench", "--config", str(REPO / "configs" / "recipe.py"),
                  "--config.model.hidden_size=256", "--vocab_size=30", f"--out={out}",
                  "--noprogress"])
    assert out.read_text() == '{"kept": true}'

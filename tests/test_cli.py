"""End to end through `lstm-jax`: train then sample on a tiny config, and every bad input."""
import json
import pathlib
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, write_corpus
from lstm_jax import cli
from lstm_jax.commands import common

TINY = ["--config", str(REPO / "configs" / "tiny.py")]


def run_cli(*args):
    return cli.main(["lstm-jax", *args])


def test_train_then_sample_round_trip(tmp_path, repetitive_corpus, capsys, monkeypatch):
    from lstm_jax import hostenv
    seen = {}
    real_setup = hostenv.setup_host
    monkeypatch.setattr(hostenv, "setup_host", lambda **kw: seen.update(kw) or real_setup(**kw))
    workdir = str(tmp_path / "run")
    assert run_cli("train", *TINY, "--workdir", workdir, f"--config.corpus={repetitive_corpus}",
                   "--noprogress") == 0
    out = capsys.readouterr().out
    assert "temperature 1.2" in out and "done: step 30" in out
    # the CPU device rule saw the vocabulary (fails if the CLI sets up the host without it)
    assert seen["vocab_size"] == len(set(pathlib.Path(repetitive_corpus).read_text())), seen
    assert seen["mesh_devices"] == 1, seen   # tiny.py's mesh has 1 device: no second CPU device
    jsonl = tmp_path / "s.jsonl"
    assert run_cli("sample", "--workdir", workdir, "--num_samples=6", "--length=25",
                   "--temperature=0,1.0", "--prime=the quick", f"--out={jsonl}") == 0
    rows = [json.loads(l) for l in jsonl.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    assert [r["temperature"] for r in rows] == [0.0, 1.0] * 3
    assert all(r["prime"] == "the quick" and len(r["text"]) == 25 for r in rows)
    assert rows[0]["text"] == rows[2]["text"], "greedy rows with the same prime must agree"
    assert run_cli("sample", "--workdir", workdir, "--num_samples=2", "--length=10",
                   "--temperature=0", "--prime=the ") == 0
    # stdout: a header per sample, then prime + text; greedy rows with one prime are equal
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "----- sample 0, temperature 0" and out[2] == "----- sample 1, temperature 0"
    assert out[1] == out[3] and out[1].startswith("the ") and len(out[1]) == len("the ") + 10


def test_train_shows_a_progress_bar_that_reaches_the_last_step(tmp_path, repetitive_corpus, capsys):
    """The README's main command shows a progress bar. Fails if the loop never advances it (a bar
    stuck at 0/30 passed every other test)."""
    assert run_cli("train", *TINY, "--workdir", str(tmp_path / "run"),
                   f"--config.corpus={repetitive_corpus}") == 0
    err = capsys.readouterr().err.replace("\r", "\n")
    assert "30/30" in err and "chars_s=" in err, err[-2000:]


def expect_exit(match, *args):
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    message = str(e.value.code)
    assert match in message, message
    # every command's errors read alike: one line, one prefix, the fix in it
    assert message.startswith("lstm-jax: error: ") and "\n" not in message, message
    return message


def test_missing_corpus_path(tmp_path):
    expect_exit("does not exist", "train", *TINY, "--workdir", str(tmp_path / "w"),
                f"--config.corpus={tmp_path / 'nope.txt'}")
    assert not (tmp_path / "w").exists(), "a failed start must not create the workdir"


def test_empty_corpus(tmp_path):
    expect_exit("empty", "train", *TINY, "--workdir", str(tmp_path / "w"),
                f"--config.corpus={write_corpus(tmp_path, '')}")


def test_corpus_shorter_than_one_batch(tmp_path):
    expect_exit("fewer than one batch", "train", *TINY, "--workdir", str(tmp_path / "w"),
                f"--config.corpus={write_corpus(tmp_path, 'abc def ghi ' * 10)}")


def test_undecodable_bytes_say_where(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine text\nmore \xff\xfe here" * 50)
    msg = expect_exit("encoding_errors", "train", *TINY, "--workdir", str(tmp_path / "w"),
                      f"--config.corpus={path}")
    assert "line 2" in msg


@pytest.mark.parametrize("override,match", [
    ("--config.batch_size=0", "batch_size must be a positive integer"),
    ("--config.model.hidden_size=-4", "model.hidden_size must be a positive integer"),
    ("--config.seq_len=0", "seq_len must be a positive integer"),
    ("--config.objective=bigram", "objective must be"),
])
def test_bad_sizes_and_choices(tmp_path, override, match):
    expect_exit(match, "train", *TINY, "--workdir", str(tmp_path / "w"), override)


def test_unknown_config_field_names_the_closest(tmp_path):
    msg = expect_exit("config.model.hidden_size", "train", *TINY, "--workdir", str(tmp_path / "w"),
                      "--config.model.hiden_size=3")
    assert "did you mean" in msg.lower()


@pytest.mark.parametrize("args,match", [
    (["train", "--bogus"], "Unknown command line flag 'bogus'; `lstm-jax train --help` lists"),
    (["sample", "--workdir", "w", "--temperature", "hot"], "--temperature must be numbers"),
    (["sample", "--workdir", "w", "--prime", "a", "--prime_file", "p"], "not both"),
    (["plot", "--workdir", "w", "--out", "chart"], "has no file extension"),
])
def test_flag_errors_of_every_command_are_one_line(tmp_path, monkeypatch, args, match):
    monkeypatch.chdir(tmp_path)
    expect_exit(match, *args)
    assert not (tmp_path / "w").exists()


def test_batch_not_divisible_by_devices(tmp_path, repetitive_corpus):
    expect_exit("does not divide by the 8 devices", "train", *TINY, "--workdir", str(tmp_path / "w"),
                f"--config.corpus={repetitive_corpus}", "--config.parallel.num_devices=8",
                "--config.batch_size=12")


def test_workdir_with_a_different_model_is_refused_then_new_run_keeps_it(tmp_path, repetitive_corpus):
    workdir = tmp_path / "run"
    common = ["train", *TINY, "--workdir", str(workdir), f"--config.corpus={repetitive_corpus}",
              "--config.max_steps=10", "--noprogress"]
    assert run_cli(*common) == 0
    before = sorted(os.listdir(workdir / "checkpoints"))
    expect_exit("model.hidden_size: 32 (saved) != 48 (now)", *common, "--config.model.hidden_size=48")
    assert sorted(os.listdir(workdir / "checkpoints")) == before, "refusal must not touch the run"
    assert run_cli(*common, "--config.model.hidden_size=48", "--new_run") == 0
    assert (tmp_path / "run.prev1" / "checkpoints").is_dir()
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden_size"] == 48


def test_sample_from_a_missing_workdir(tmp_path):
    expect_exit("not a training workdir", "sample", "--workdir", str(tmp_path / "none"))


def test_help_lists_commands_and_config_fields(capsys):
    assert run_cli("--help") == 0
    assert "sample" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_cli("train", "--help")
    out = capsys.readouterr().out
    assert "--config.model.hidden_size" in out and "--workdir" in out


def test_console_script_entry_point_runs():
    """`python -m lstm_jax.cli --help` works in a fresh interpreter (the installed script's target)."""
    out = subprocess.run([sys.executable, "-m", "lstm_jax.cli", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "train" in out.stdout


@pytest.mark.parametrize("cpu_devices,hidden,batch,accum,expected", [
    (0, 128, 128, 1, 2),    # auto, small model: one device per core
    (0, 512, 128, 1, 1),    # auto, larger model: one multi-threaded device
    (0, 128, 130, 2, 1),    # auto, micro-batch 65 does not split over 2 cores
    (-1, 512, 128, 1, 2),   # one per core, whatever the model
    (3, 128, 128, 1, 3),    # explicit
])
def test_cpu_device_count(monkeypatch, cpu_devices, hidden, batch, accum, expected):
    """The CLI plans the host from the config (micro-batch = batch / grad_accum_steps)."""
    from lstm_jax import config as config_lib, hostenv
    seen = {}

    def fake_setup(**kwargs):
        seen.update(kwargs)
        return hostenv.plan_host(platform="cpu", cores=2, **kwargs)
    monkeypatch.setattr(hostenv, "setup_host", fake_setup)
    monkeypatch.setattr(hostenv, "cpu_count", lambda: 2)
    c = config_lib.get_config()
    c.parallel.cpu_devices, c.model.hidden_size, c.batch_size, c.grad_accum_steps = (
        cpu_devices, hidden, batch, accum)
    assert common.host_setup(c).cpu_devices == expected
    assert seen["batch_size"] == batch // accum


# --- one-line errors for what users get wrong -------------------------------------------------

@pytest.mark.parametrize("content,match", [
    (None, "config file '.*nope.py' does not exist"),
    ("def get_config(:\n", r"config file .*broken.py line 1: .*syntax"),
    ("x = 1\n", "has no get_config()"),
    ("def get_config():\n    return 1 / 0\n", "failed: ZeroDivisionError"),
])
def test_a_missing_or_broken_config_file_is_one_line(tmp_path, content, match):
    """Fails if a config file's error escapes as a traceback (absl loads it lazily, deep in
    validation) or the message does not name the file."""
    path = tmp_path / ("nope.py" if content is None else "broken.py")
    if content is not None:
        path.write_text(content)
    message = expect_exit("config file", "train", "--config", str(path), "--workdir", str(tmp_path / "w"))
    assert re.search(match, message) and "\n" not in message, message
    assert not (tmp_path / "w").exists()


def test_non_finite_numbers_are_refused_and_nothing_is_written(tmp_path, repetitive_corpus):
    """learning_rate=nan used to pass validation and overwrite config.json of the run."""
    workdir = tmp_path / "run"
    common = ["train", *TINY, "--workdir", str(workdir), f"--config.corpus={repetitive_corpus}",
              "--config.max_steps=2", "--noprogress"]
    assert run_cli(*common) == 0
    before = (workdir / "config.json").read_bytes()
    for bad in ("nan", "inf"):
        expect_exit("optimizer.learning_rate must be a finite number", *common,
                    f"--config.optimizer.learning_rate={bad}")
    assert (workdir / "config.json").read_bytes() == before


def test_a_validation_tail_shorter_than_one_window_creates_no_workdir(tmp_path, repetitive_corpus):
    """The check used to come after the workdir was made, so the next run was refused."""
    expect_exit("shorter than one", "train", *TINY, "--workdir", str(tmp_path / "w"),
                f"--config.corpus={repetitive_corpus}", "--config.val_fraction=0.001")
    assert not (tmp_path / "w").exists()


def test_a_locked_workdir_is_refused_in_one_line(tmp_path, repetitive_corpus):
    from lstm_jax.workdir import WorkdirLock
    workdir = tmp_path / "run"
    workdir.mkdir()
    held = WorkdirLock(workdir).acquire()
    try:
        message = expect_exit("in use by another trainer", "train", *TINY, "--workdir", str(workdir),
                              f"--config.corpus={repetitive_corpus}")
    finally:
        held.release()
    assert f"pid {os.getpid()}" in message and "\n" not in message
    assert sorted(os.listdir(workdir)) == []


def _mount_tmpfs(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_read_only_workdir_and_full_disk_are_one_line_errors(tmp_path, repetitive_corpus):
    """Real file systems, through the installed entry point: a read-only mount and a 300 kB one
    that fills up during the first checkpoint. Fails if stderr carries a traceback (Orbax and
    TensorStore log theirs before the error reaches the CLI) or the fix is not named."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    _mount_tmpfs(ro, "ro,size=64k")
    _mount_tmpfs(full, "size=300k")
    try:
        for workdir, says in ((ro / "run", "the file system is read-only writing"),
                              (full / "run", "the disk is full")):
            proc = subprocess.run(
                [sys.executable, "-m", "lstm_jax.cli", "train", *TINY, "--workdir", str(workdir),
                 f"--config.corpus={repetitive_corpus}", "--config.model.hidden_size=64", "--noprogress"],
                capture_output=True, text=True, timeout=120, cwd=REPO)
            assert proc.returncode == 1, proc.stderr[-2000:]
            assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and says in lines[0] and "--workdir" in lines[0], proc.stderr
    finally:
        subprocess.run(["umount", str(ro)])
        subprocess.run(["umount", str(full)])


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception) as error:
        run_cli("train", *TINY, "--workdir", str(tmp_path / "w"), "--debug",
                f"--config.corpus={tmp_path / 'missing.txt'}")
    assert not isinstance(error.value, SystemExit) and "does not exist" in str(error.value)


def test_eval_reports_whole_text_bpc_and_names_or_counts_unknown_chars(tmp_path, repetitive_corpus, capsys):
    """`lstm-jax eval`: the run's held-out split by default, any text encoded with the run's
    vocabulary; unknown characters are an error naming them, or dropped and counted. Each result
    is also appended to eval.jsonl. Fails if a different text is evaluated than asked, or if
    unknown characters are silently mapped to others."""
    workdir = tmp_path / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={repetitive_corpus}",
                   "--config.max_steps=10", "--noprogress") == 0
    capsys.readouterr()
    assert run_cli("eval", "--workdir", str(workdir)) == 0
    held_out = capsys.readouterr().out
    assert re.match(r"\d\.\d{4} bits/char \(\d\.\d{4} nats\) on the run's held-out split: 899 chars", held_out), held_out
    text = tmp_path / "t.txt"
    content = "the lazy dog ☃ jumps ✓ over the fox"
    text.write_text(content)
    expect_exit("characters not in the vocabulary: '☃✓'", "eval", "--workdir", str(workdir), f"--text={text}")
    assert run_cli("eval", "--workdir", str(workdir), f"--text={text}", "--drop_unknown") == 0
    assert "dropped 2 unknown chars" in capsys.readouterr().out
    records = [json.loads(line) for line in (workdir / "eval.jsonl").read_text().splitlines()]
    assert [r["chars"] for r in records] == [899, len(content) - 2 - 1] and records[1]["dropped_unknown"] == 2
    assert records[0]["text_bpc"] == pytest.approx(records[0]["text_loss"] / math.log(2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("c"), "the quick brown fox jumps over the lazy dog. " * 400)
    workdir = tmp_path_factory.mktemp("w") / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=5", "--noprogress") == 0
    return workdir


@pytest.mark.parametrize("bad,match", [("--top_p=1.5", "top_p must be in"),
                                       ("--prime=ZZZ", "outside the vocabulary")])
def test_sample_with_a_bad_argument_leaves_an_existing_out_untouched(tmp_path, trained, bad, match):
    """`lstm-jax sample --out keep.jsonl` with a bad argument used to truncate keep.jsonl to 0
    bytes (the file was opened before the arguments were checked)."""
    keep = tmp_path / "keep.jsonl"
    keep.write_text('{"index": 0, "text": "keep me"}\n' * 1000)
    before = keep.read_bytes()
    expect_exit(match, "sample", "--workdir", str(trained), bad, f"--out={keep}")
    assert keep.read_bytes() == before and os.listdir(tmp_path) == ["keep.jsonl"]


def test_sigint_during_sample_stops_with_one_line_and_keeps_valid_rows(tmp_path, trained):
    """A long `lstm-jax sample` interrupted by SIGINT stops within seconds (exit 130), says so in
    one line, and --out holds valid JSONL of the rows finished. Fails if the interrupt waits for
    the whole generation, prints a traceback, or leaves a cut-off line."""
    import signal
    import time
    out = tmp_path / "s.jsonl"
    # Python's default SIGINT handler even under a shell's background job (which starts with
    # SIGINT ignored, and the sampler respects an ignored signal, as under nohup)
    main = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'lstm-jax'; runpy.run_module('lstm_jax.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", main, "sample", "--workdir", str(trained),
                             "--num_samples=8192", "--length=2000", "--chunk_size=64", "--noprogress",
                             f"--out={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    def rows_on_disk():
        try:
            return sum(p.read_bytes().count(b"\n") for p in tmp_path.glob(".s.jsonl.*.tmp"))
        except FileNotFoundError:
            return 0

    # Into the second chunk of 64 rows, so the first is finished and counted (a signal while the
    # first chunk is being written rightly keeps nothing: --out is then left as it was).
    deadline = time.monotonic() + 120
    while rows_on_disk() <= 64:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - sent < 10, err
    lines = [l for l in err.strip().splitlines() if "Warning" not in l and l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) < 8192 and all(len(r["text"]) == 2000 for r in rows)
    assert [r["index"] for r in rows] == list(range(len(rows)))

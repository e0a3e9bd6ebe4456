"""What a hostile user tries (issue #21): every row is one line naming the problem and the fix
(exit 1), nothing already written is lost or replaced, values are checked before anything is
written or trained, and signals keep their exit codes in every phase."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, latest_step, write_corpus
from lstm_jax import cli
from lstm_jax.commands import tools

TINY = ["--config", str(REPO / "configs" / "tiny.py")]
TEXT = "the quick brown fox jumps over the lazy dog. " * 400


def run_cli(*args):
    return cli.main(["lstm-jax", *args])


def expect_exit(match, *args):
    with pytest.raises(SystemExit) as e:
        run_cli(*args)
    message = str(e.value.code)
    assert match in message and "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("c"), TEXT)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("w") / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=5", "--noprogress") == 0
    return workdir


# --- rows 2, 4, 6, 12: values checked at the start, before the workdir exists ------------------

@pytest.mark.parametrize("override,match", [
    ("--config.optimizer.final_lr_fraction=-1", "optimizer.final_lr_fraction must be in [0, 1]"),
    ("--config.optimizer.final_lr_fraction=1.5", "optimizer.final_lr_fraction must be in [0, 1]"),
    ("--config.optimizer.warmup_steps=-5", "optimizer.warmup_steps must be >= 0"),
    ("--config.model.dtype=float16", "model.dtype must be 'float32', 'bfloat16' or 'auto'"),
    ("--config.model.param_dtype=int8", "model.param_dtype must be 'float32' or 'bfloat16'"),
    ("--config.model.dropout=1.0", "model.dropout must be in [0, 1)"),
    ("--config.checkpoint.max_to_keep=0", "checkpoint.max_to_keep must be >= 1"),
    ("--config.sample.temperatures=(0.5,nan)", "sample.temperatures must be finite numbers >= 0"),
    ("--config.sample.temperatures=(0.5,abc)", "sample.temperatures must be finite numbers >= 0"),
    ("--config.sample.temperatures=(0.5,-1.0)", "-1.0 is not"),
    ("--config.seed=-1", "seed must be an integer in [0, 2**32)"),
    ("--config.sample.prime=€€", "sample.prime '€€' has characters outside the corpus's vocabulary"),
])
def test_bad_values_are_refused_before_anything_is_written(tmp_path, corpus, override, match):
    """Rows 2, 4, 6, 12. Fails if a value is accepted (final_lr_fraction=-1 trained by gradient
    ascent), raises a traceback (TypeError from validate), names no field ("expected
    non-negative integer") or is checked only after training (the prime)."""
    expect_exit(match, "train", *TINY, "--workdir", str(tmp_path / "w"), f"--config.corpus={corpus}",
                override)
    assert not (tmp_path / "w").exists()


# --- rows 1, 11: prepared corpora ---------------------------------------------------------------

def test_prepare_refuses_an_existing_output_and_eval_a_replaced_one(tmp_path, corpus, capsys):
    """Row 1. Fails if a second `prepare` silently replaces the arrays a run trained on, or if
    `eval` of that run then measures the other corpus."""
    other = write_corpus(tmp_path, "pack my box with five dozen liquor jugs! " * 400, "other.txt")
    out, workdir = tmp_path / "P", tmp_path / "run"
    assert run_cli("prepare", *TINY, f"--config.corpus={corpus}", "--out", str(out)) == 0
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus=prepared:{out}",
                   "--config.max_steps=5", "--noprogress") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    expect_exit("already holds a prepared corpus", "prepare", *TINY, f"--config.corpus={other}",
                "--out", str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run_cli("eval", "--workdir", str(workdir)) == 0   # the same corpus: evaluated
    assert run_cli("prepare", *TINY, f"--config.corpus={other}", "--out", str(out), "--replace") == 0
    log = (workdir / "eval.jsonl").read_bytes()
    expect_exit("holds another corpus than the one", "eval", "--workdir", str(workdir))
    assert (workdir / "eval.jsonl").read_bytes() == log
    (tmp_path / "file").write_text("x")
    expect_exit("is a file, not a directory", "prepare", *TINY, f"--config.corpus={corpus}",
                "--out", str(tmp_path / "file"))


def _truncate(d):
    with open(d / "train.bin", "r+b") as f:
        f.truncate(100)


def _ids_out_of_range(d):
    a = np.fromfile(d / "train.bin", np.uint8)
    a[10] = 200
    a.tofile(d / "train.bin")


@pytest.mark.parametrize("damage,match", [
    (_truncate, "train.bin has 100 bytes, meta.json expects"),
    (lambda d: (d / "meta.json").write_text('{"dtype": "uint8", "tr'), "meta.json is unreadable"),
    (lambda d: (d / "vocab.json").write_text('["a'), "cannot read the vocabulary"),
    (lambda d: (d / "vocab.json").write_text('["a", "b"]'), "cannot read the vocabulary"),
    (_ids_out_of_range, "holds token id 200, outside its vocabulary"),
])
def test_a_damaged_prepared_corpus_is_named_with_the_fix(tmp_path, corpus, damage, match):
    """Row 11. Fails on numpy's "mmap length is greater than file size", a JSON error without the
    file, the workdir's advice (--new_run) or ids out of range reported as a divergence."""
    out = tmp_path / "P"
    assert run_cli("prepare", *TINY, f"--config.corpus={corpus}", "--out", str(out)) == 0
    damage(out)
    message = expect_exit(match, "train", *TINY, "--workdir", str(tmp_path / "w"),
                          f"--config.corpus=prepared:{out}", "--noprogress")
    assert "prepare it again" in message and "--replace" in message, message
    assert not (tmp_path / "w").exists()


# --- rows 3, 13, 16: eval, sample and plot arguments --------------------------------------------

def test_prime_and_prime_file_together_or_an_empty_prime_file(tmp_path, trained):
    """Row 13. Fails if --prime is silently ignored, or an empty file gives the library's message."""
    pf, empty = tmp_path / "p.txt", tmp_path / "empty.txt"
    pf.write_text("the\n")
    empty.write_text("")
    expect_exit("pass --prime or --prime_file, not both", "sample", "--workdir", str(trained),
                "--prime=the", f"--prime_file={pf}")
    expect_exit(f"--prime_file {empty} is empty", "sample", "--workdir", str(trained),
                f"--prime_file={empty}")


def test_eval_text_errors_name_the_text_flag(tmp_path, trained):
    """Row 16. Fails if the --text errors tell the user to set --config.corpus."""
    empty, bad = tmp_path / "empty.txt", tmp_path / "bad.txt"
    empty.write_text("")
    bad.write_bytes(b"a\xffb")
    for text, match in ((tmp_path / "nope.txt", "does not exist"), (tmp_path, "is a directory"),
                        (empty, "is empty"), (bad, "--encoding_errors=replace")):
        message = expect_exit(match, "eval", "--workdir", str(trained), f"--text={text}")
        assert "--config" not in message, message


def _mount_tmpfs(path, options):
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")


def test_eval_on_a_read_only_workdir_is_refused_before_evaluating(tmp_path, trained, capsys):
    """Row 3. Fails if eval prints a result and then an OSError traceback writing eval.jsonl."""
    import shutil
    ro = tmp_path / "ro"
    _mount_tmpfs(ro, "size=4m")
    try:
        shutil.copytree(trained, ro / "run")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        expect_exit("cannot write", "eval", "--workdir", str(ro / "run"))
        assert "bits/char" not in capsys.readouterr().out
        assert run_cli("eval", "--workdir", str(ro / "run"), "--nolog") == 0
        assert "bits/char" in capsys.readouterr().out
    finally:
        subprocess.run(["umount", str(ro)])


def test_plot_refuses_a_directory_a_bare_name_and_nothing_to_plot(tmp_path, trained):
    """Row 16. Fails if `plot --out DIR` writes DIR.png and says "wrote DIR", or a metrics file
    holding only a cut-off line gives an empty plot and exit 0."""
    pytest.importorskip("matplotlib")
    (tmp_path / "DIR").mkdir()
    expect_exit("is a directory", "plot", "--workdir", str(trained), "--out", str(tmp_path / "DIR"))
    expect_exit("has no file extension", "plot", "--workdir", str(trained), "--out", str(tmp_path / "loss"))
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "metrics.jsonl").write_text('{"step": 1, "tr')
    expect_exit("has no loss events to plot", "plot", "--workdir", str(cut), "--out", str(tmp_path / "c.png"))
    assert sorted(os.listdir(tmp_path)) == ["DIR", "cut"]


# --- row 15: paths ------------------------------------------------------------------------------

def test_a_tilde_workdir_is_the_home_directory_and_a_file_workdir_is_refused(tmp_path, corpus, monkeypatch):
    """Row 15. Fails if '~/wd' creates a literal ./~ directory, or a file as --workdir gives
    "[Errno 17] File exists"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert run_cli("train", *TINY, "--workdir", "~/wd", f"--config.corpus={corpus}",
                   "--config.max_steps=2", "--noprogress") == 0
    assert (tmp_path / "home" / "wd" / "config.json").is_file() and not (tmp_path / "~").exists()
    (tmp_path / "afile").write_text("mine")
    expect_exit("--workdir afile is a file, not a directory", "train", *TINY, "--workdir", "afile",
                f"--config.corpus={corpus}")
    assert (tmp_path / "afile").read_text() == "mine"


# --- row 7: a signal while the command starts up ------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_jax_loads_stops_with_its_exit_code(tmp_path, corpus, sig, code):
    """Row 7: Ctrl-C while `train` imports JAX used to be swallowed by a JAX gc callback
    ("Exception ignored in: _xla_gc_callback", and training ran on) or to print a
    KeyboardInterrupt traceback. The signal is sent once the JAX libraries are being loaded."""
    main = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "sys.argv[0] = 'lstm-jax'; runpy.run_module('lstm_jax.cli', run_name='__main__')")
    proc = subprocess.Popen([sys.executable, "-c", main, "train", *TINY, "--workdir", str(tmp_path / "w"),
                             f"--config.corpus={corpus}", "--noprogress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    maps, deadline = pathlib.Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 60
    while "jaxlib" not in maps.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err)
    assert "done: step" not in out, out
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"stopped by {sig.name}" in lines[0], err


# --- rows 10, 17: warnings in one line each, no library tracebacks --------------------------------

def test_a_stale_lock_and_an_unreadable_checkpoint_are_one_warning_line_each(tmp_path, corpus):
    """Rows 10 and 17. A workdir left by a killed trainer (its lock) whose latest checkpoint holds
    garbage: the next `train` takes the lock over and falls back to the previous step, saying so
    in two lines. Fails on Python's two-line warning format (the warning "printed twice") or
    TensorStore's "Event loop is closed" tracebacks (132 lines)."""
    import socket
    workdir = tmp_path / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=20", "--noprogress") == 0
    for f in (workdir / "checkpoints" / "20" / "state").rglob("d/*"):
        f.write_bytes(os.urandom(300))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (workdir / "lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                              "started": time.time()}))
    proc = subprocess.run([sys.executable, "-m", "lstm_jax.cli", "train", *TINY, "--workdir", str(workdir),
                           f"--config.corpus={corpus}", "--config.max_steps=25", "--noprogress"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and "done: step 25" in proc.stdout, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, proc.stderr[-3000:]
    assert lines[0].startswith("lstm-jax: warning: taking over the stale lock"), lines
    assert lines[1].startswith("lstm-jax: warning: checkpoint step 20") and "using step 10" in lines[1], lines
    assert (workdir / "unreadable_checkpoints" / "20").is_dir()


def test_an_edited_vocab_json_is_named_by_sample_and_eval(tmp_path, trained):
    """Row 5. Fails if sample/eval blame the checkpoints ("no readable checkpoint") or decode
    with a vocabulary the model was not trained with."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    vocab = json.loads((workdir / "vocab.json").read_text())
    vocab["chars"] = vocab["chars"][:-5]
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    for command in ("sample", "eval"):
        message = expect_exit("vocab.json", command, "--workdir", str(workdir))
        assert "is not the vocabulary the checkpoints were trained with" in message, message


def test_a_signal_the_command_could_not_act_on_still_sets_the_exit_code(monkeypatch, capsys):
    """Row 7's remainder: a signal recorded where the command could not stop cleanly (here: a
    command that runs to its end) exits 130/143 with one line, not 0."""
    def finishes_anyway(argv):
        signal.raise_signal(signal.SIGTERM)
        return 0
    monkeypatch.setattr(tools, "plot", finishes_anyway)
    assert run_cli("plot") == 143
    assert "received SIGTERM where it could not stop cleanly" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the CLI's handler is gone again


# --- rows 5 and 9: what `train` finds already written ----------------------------------------------

def test_train_on_an_edited_vocab_json_says_so_and_keeps_the_edited_file(tmp_path, corpus, trained, capsys):
    """Row 5, `train`: the resume (the checkpoint's vocabulary is the corpus's) writes the run's
    vocab.json again. Fails if it silently replaces the edited file."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    original = (workdir / "vocab.json").read_text()
    vocab = json.loads(original)
    vocab["chars"] = vocab["chars"][:-5]
    edited = json.dumps(vocab)
    (workdir / "vocab.json").write_text(edited)
    capsys.readouterr()
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=6", "--noprogress") == 0
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if "vocab.json" in line]
    assert len(said) == 1 and said[0].startswith("lstm-jax: warning: ") and "vocab.json.edited" in said[0], err
    assert json.loads((workdir / "vocab.json").read_text()) == json.loads(original)
    assert (workdir / "vocab.json.edited").read_text() == edited


def test_a_workdir_whose_checkpoints_were_deleted_keeps_its_old_record(tmp_path, corpus, trained, capsys):
    """Row 9: `checkpoints/` deleted, then `train` again. Settings that change the run are refused
    (nothing touched); a fresh start moves the old run's record (config.json, metrics.jsonl, the
    TensorBoard events, samples.txt, vocab.json) to <workdir>.prev1. Fails if the fresh run overwrites
    config.json and metrics.jsonl and leaves the old TensorBoard file beside its own."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    shutil.rmtree(workdir / "checkpoints")
    record = {p.name: p.read_bytes() for p in workdir.iterdir()
              if p.name in ("config.json", "metrics.jsonl", "samples.txt") or p.name.startswith("events.")}
    assert len(record) == 4 and record["metrics.jsonl"], sorted(record)
    flags = [*TINY, "--workdir", str(workdir), f"--config.corpus={corpus}", "--noprogress"]
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        run_cli("train", *flags, "--config.model.hidden_size=16")
    assert {name: (workdir / name).read_bytes() for name in record} == record
    capsys.readouterr()
    assert run_cli("train", *flags, "--config.max_steps=3") == 0
    out = capsys.readouterr().out
    aside = tmp_path / "run.prev1"
    assert f"to {aside}" in out, out
    assert {name: (aside / name).read_bytes() for name in record} == record
    assert sorted(p.name for p in aside.iterdir()) == sorted([*record, "vocab.json"])
    assert len(list(workdir.glob("events.*"))) == 1
    assert json.loads((workdir / "config.json").read_text())["max_steps"] == 3
    assert latest_step(workdir) == 3


# --- rows 7 and 8: a signal before the loop's first step, and during the last samples -------------

def test_a_signal_while_the_run_is_planned_stops_it_at_its_first_step(tmp_path, corpus, monkeypatch, capsys):
    """Row 7's remainder: a SIGTERM after the CLI's last check and before the training loop
    installs its own handler (planning, restoring, compiling) is taken over by the loop, which
    stops and saves at its first step. Fails if the run trains to its end first."""
    from lstm_jax import train as train_lib
    plan_run = train_lib.plan_run

    def signalled(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return plan_run(*args, **kwargs)
    monkeypatch.setattr(train_lib, "plan_run", signalled)
    workdir = tmp_path / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--noprogress") == 143
    out, err = capsys.readouterr()
    assert "received SIGTERM: saved a checkpoint at step 1" in out and "done:" not in out, out
    assert "SIGTERM" not in err and "Traceback" not in err, err
    assert latest_step(workdir) == 1


def test_sigterm_during_the_end_of_run_samples_exits_143_with_the_run_saved(tmp_path, corpus, monkeypatch, capsys):
    """Row 8: a SIGTERM while the run writes its last samples. Fails on exit 0 without a word, or
    on a line that calls the output complete when the samples were not written."""
    from lstm_jax import sample as sample_lib
    dispatch = sample_lib._Chunk.dispatch

    def signalled(self, b):
        if b == 0:
            signal.raise_signal(signal.SIGTERM)
        return dispatch(self, b)
    monkeypatch.setattr(sample_lib._Chunk, "dispatch", signalled)
    workdir = tmp_path / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=5", "--config.sample.length=3000", "--noprogress") == 143
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if "SIGTERM" in line]
    assert len(lines) == 1 and "samples" in lines[0] and "not written" in lines[0], out + err
    assert "done:" not in out, out
    assert latest_step(workdir) == 5
    assert not (workdir / "samples.txt").exists()


# --- row 14: sample --out ----------------------------------------------------------------------

def test_sample_out_into_a_missing_directory_names_out(tmp_path, trained):
    """Row 14. Fails if the error names the internal temporary file."""
    message = expect_exit("--out", "sample", "--workdir", str(trained), "--length=5",
                          "--out", str(tmp_path / "nope" / "s.jsonl"))
    assert "does not exist" in message and ".tmp" not in message, message
    assert not (tmp_path / "nope").exists()


def test_sample_out_onto_a_symlink_writes_through_it(tmp_path, trained):
    """Row 14. Fails if the link is replaced by a regular file (its target left as it was)."""
    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target.name)
    assert run_cli("sample", "--workdir", str(trained), "--length=5", "--num_samples=2",
                   "--out", str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == target.name
    assert [json.loads(line)["index"] for line in target.read_text().splitlines()] == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl", "real.jsonl"]


def test_a_temp_file_left_by_kill_9_during_sample_out_is_cleaned_next_time(tmp_path, trained):
    """Row 14. `kill -9` while `sample --out F` writes leaves its hidden temporary file; the next
    write of F removes it (its writer is gone). Fails if the temporary file stays forever."""
    out = tmp_path / "s.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "lstm_jax.cli", "sample", "--workdir", str(trained),
                             "--num_samples=4", "--length=1000000", "--noprogress", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".s.jsonl.*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.returncode
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    left = list(tmp_path.glob(".s.jsonl.*.tmp"))
    assert len(left) == 1 and not out.exists()
    live = tmp_path / f".s.jsonl.{os.getpid()}.7.tmp"   # a writer that is alive: kept
    live.write_text("")
    assert run_cli("sample", "--workdir", str(trained), "--length=5", "--out", str(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "s.jsonl"])

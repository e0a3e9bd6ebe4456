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

from conftest import REPO, write_corpus
from lstm_jax import cli

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
    ("--config.model.dtype=float16", "model.dtype must be 'float32' or 'bfloat16'"),
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
    monkeypatch.setattr(cli, "plot", finishes_anyway)
    assert run_cli("plot") == 143
    assert "received SIGTERM where it could not stop cleanly" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the CLI's handler is gone again

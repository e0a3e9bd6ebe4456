"""The workdir contract: a resume that changes the run is refused (each field named), one writer
(the lock), crash-consistent metrics after kill -9, TensorBoard events, and --new_run."""
import hashlib
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, assert_same_arrays, cli_flags, param_arrays, tiny_config, write_corpus
from lstm_jax import train, workdir as workdir_lib
from lstm_jax.workdir import WorkdirError, WorkdirLock

TEXT = "the quick brown fox jumps over the lazy dog. " * 400
BASE = {"model.hidden_size": 16, "max_steps": 10, "checkpoint.every_steps": 5,
        "parallel.cpu_devices": 0, "parallel.tune_allocator": False}
WORKER = REPO / "tests" / "train_worker.py"


def config(corpus, **overrides):
    return tiny_config(corpus=corpus, **{**BASE, **overrides})


def snapshot(directory) -> dict:
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def events(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), TEXT)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, corpus):
    """A finished 10-step run (one device, global batch 16) that the resume tests try to change."""
    workdir = tmp_path_factory.mktemp("saved") / "run"
    train.train_and_evaluate(config(corpus), workdir, progress=False)
    return workdir


# --- the resume contract --------------------------------------------------------------------

GUARDED = [
    ({"batch_size": 8}, "global batch: 16 (saved) != 8 (now)"),
    ({"per_device_batch_size": 1, "parallel.num_devices": 8}, "global batch: 16 (saved) != 8 (now)"),
    ({"seq_len": 10}, "seq_len: 20 (saved) != 10 (now)"),
    ({"objective": "window"}, "objective: 'sequence' (saved) != 'window' (now)"),
    ({"window_step": 2}, "window_step: 3 (saved) != 2 (now)"),
    ({"val_fraction": 0.1}, "val_fraction: 0.05 (saved) != 0.1 (now)"),
    ({"seed": 1}, "seed: 0 (saved) != 1 (now)"),
    ({"grad_accum_steps": 2}, "grad_accum_steps: 1 (saved) != 2 (now)"),
    ({"lowercase": True}, "lowercase: False (saved) != True (now)"),
    ({"vocab": "bytes"}, "vocab: 'chars' (saved) != 'bytes' (now)"),
    ({"model.hidden_size": 24}, "model.hidden_size: 16 (saved) != 24 (now)"),
    ({"model.num_layers": 2}, "model.num_layers: 1 (saved) != 2 (now)"),
    ({"model.dropout": 0.1}, "model.dropout: 0.0 (saved) != 0.1 (now)"),
    ({"model.keras_init": True}, "model.keras_init: False (saved) != True (now)"),
    ({"model.dtype": "bfloat16"}, "model.dtype: 'float32' (saved) != 'bfloat16' (now)"),
    ({"optimizer.learning_rate": 0.02}, "optimizer.learning_rate: 0.01 (saved) != 0.02 (now)"),
    ({"optimizer.clip_norm": 0.0}, "optimizer.clip_norm: 5.0 (saved) != 0.0 (now)"),
    ({"optimizer.schedule": "constant"}, "optimizer.schedule: 'cosine' (saved) != 'constant' (now)"),
    ({"optimizer.warmup_steps": 3}, "optimizer.warmup_steps: 0 (saved) != 3 (now)"),
    ({"optimizer.decay": 0.8}, "optimizer.decay: 0.9 (saved) != 0.8 (now)"),
    ({"optimizer.final_lr_fraction": 0.5}, "optimizer.final_lr_fraction: 0.1 (saved) != 0.5 (now)"),
]


@pytest.mark.parametrize("overrides,named", GUARDED, ids=[next(iter(o)) for o, _ in GUARDED])
def test_a_resume_that_changes_the_run_is_refused_naming_the_field(saved_run, corpus, overrides, named):
    """Each setting that fixes the batches, the model or the update: refused before anything is
    written, naming the field and both values, with --new_run as the way out. Fails if the field
    is (wrongly) in config.RESUMABLE_FIELDS or the comparison misses it (the resume was silently
    accepted before)."""
    before = snapshot(saved_run)
    with pytest.raises(WorkdirError) as error:
        train.train_and_evaluate(config(corpus, max_steps=20, **overrides), saved_run, progress=False)
    message = str(error.value)
    assert named in message and "--new_run" in message, message
    assert snapshot(saved_run) == before


def test_a_changed_corpus_text_is_refused_even_with_the_same_vocabulary(saved_run, tmp_path):
    """The saved corpus fingerprint is compared (it was saved but never checked): same chars,
    one word changed, other path."""
    other = write_corpus(tmp_path, TEXT.replace("lazy", "zany", 1))
    with pytest.raises(WorkdirError, match=r"corpus text: it differs"):
        train.train_and_evaluate(config(other, max_steps=20), saved_run, progress=False)


def test_settings_that_keep_the_trajectory_may_change_on_resume(tmp_path, corpus, saved_run):
    """Evaluation/logging/checkpoint cadence, the device count at the same global batch (given as
    8 devices x 2 rows), the backward pass, and the corpus path of the same text: the resume is
    accepted and trains on."""
    import shutil
    workdir = shutil.copytree(saved_run, tmp_path / "run")
    moved = write_corpus(tmp_path, TEXT, "moved.txt")
    result = train.train_and_evaluate(
        config(moved, max_steps=12, log_every=1, eval_every=11, **{
            "checkpoint.every_steps": 11, "parallel.num_devices": 8, "batch_size": 0,
            "per_device_batch_size": 2, "model.backward": "autodiff", "sample.length": 7}),
        workdir, progress=False)
    assert result.step == 12
    assert json.loads((workdir / "config.json").read_text())["per_device_batch_size"] == 2


def test_resume_differences_names_every_field_and_allows_the_resumable_ones():
    saved = {"config": json.loads(tiny_config().to_json()), "vocab": list("abc"),
             "global_batch": 16, "corpus_fingerprint": "a" * 64}
    now = {"config": json.loads(tiny_config(seq_len=7, log_every=3, **{
        "model.num_layers": 2, "checkpoint.max_to_keep": 9, "parallel.mode": "pmap"}).to_json()),
        "vocab": list("abcd"), "global_batch": 16, "corpus_fingerprint": "a" * 64}
    diffs = workdir_lib.resume_differences(saved, now)
    assert diffs == ["model.num_layers: 1 (saved) != 2 (now)", "seq_len: 20 (saved) != 7 (now)",
                     "vocab: 3 chars (saved) != 4 chars (now), new chars 'd'"]
    assert workdir_lib.resume_differences(saved, saved) == []


# --- one writer -----------------------------------------------------------------------------

def test_a_stale_lock_is_taken_over_and_a_live_or_foreign_one_refused(tmp_path):
    """Fails if a dead holder's lock blocks forever, or a live / other-host holder is ignored."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                               "started": "earlier"}))
    with pytest.warns(RuntimeWarning, match=f"stale lock .*pid {dead.pid}"):
        lock = WorkdirLock(tmp_path).acquire()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirError, match=f"in use by another trainer \\(pid {os.getpid()}, started"):
        WorkdirLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / "lock").exists()

    (tmp_path / "lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(WorkdirError, match=r"pid 1 on host elsewhere.*remove .*lock"):
        WorkdirLock(tmp_path).acquire()


def test_new_run_is_refused_while_another_trainer_holds_the_workdir(tmp_path, corpus, saved_run):
    import shutil
    workdir = shutil.copytree(saved_run, tmp_path / "run")
    before = snapshot(workdir)
    held = WorkdirLock(workdir).acquire()
    try:
        with pytest.raises(WorkdirError, match="in use by another trainer"):
            train.train_and_evaluate(config(corpus), workdir, new_run=True, progress=False)
    finally:
        held.release()
    assert snapshot(workdir) == before and not workdir.with_name("run.prev1").exists()


def test_new_run_leaves_a_directory_that_holds_no_run_in_place(tmp_path, corpus):
    """--new_run moves only runs (config.json or checkpoints/): never, say, the current directory."""
    (tmp_path / "notes.txt").write_text("mine")
    train.train_and_evaluate(config(corpus, max_steps=2), tmp_path, new_run=True, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "config.json").exists()


def _start_worker(args, log, **env):
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(REPO)]),
               **env}
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=f, stderr=subprocess.STDOUT,
                                env=environ, cwd=REPO)


def _wait_for_step(workdir, proc, log, step, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists():
            steps = [json.loads(l)["step"] for l in path.read_text().splitlines() if '"train_loss"' in l]
            if steps and steps[-1] >= step:
                return steps[-1]
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} after {timeout}s:\n{log.read_text()}")


def test_second_trainer_refused_then_kill_9_between_checkpoints_resumes_consistently(tmp_path, corpus):
    """A trainer runs (slowly) in a subprocess. A second trainer on its workdir is refused naming
    the holder, writing nothing. The first is killed with SIGKILL between checkpoints; the next
    run takes the stale lock over, resumes from the last checkpoint, and metrics.jsonl ends with
    strictly increasing training steps (the events after the checkpoint are dropped, not
    repeated) and a cumulative elapsed_s. The params equal an uninterrupted run's. Fails without
    the lock (two trainers), without the metrics truncation (steps repeat: 6..8 then 6..20), or
    with elapsed_s restarting at 0."""
    workdir, log = tmp_path / "run", tmp_path / "worker.log"
    cfg = config(corpus, max_steps=20, log_every=1)
    proc = _start_worker(["train", "--workdir", str(workdir), "--progress=False", *cli_flags(cfg)], log,
                         LSTM_JAX_TEST_STEP_SLEEP="0.15")
    try:
        _wait_for_step(workdir, proc, log, 3)
        config_before = (workdir / "config.json").read_bytes()
        with pytest.raises(WorkdirError, match=f"in use by another trainer \\(pid {proc.pid}, started"):
            train.train_and_evaluate(cfg, workdir, progress=False)
        assert (workdir / "config.json").read_bytes() == config_before
        _wait_for_step(workdir, proc, log, 7)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    logged_before = [e["step"] for e in events(workdir) if "train_loss" in e]
    assert 7 <= logged_before[-1] < 10, logged_before     # killed after step 5's checkpoint, before 10's

    with pytest.warns(RuntimeWarning, match="stale lock"):
        resumed = train.train_and_evaluate(cfg, workdir, progress=False)
    reference = train.train_and_evaluate(cfg, tmp_path / "reference", progress=False)
    assert_same_arrays(param_arrays(resumed.model), param_arrays(reference.model))

    log_after = events(workdir)
    train_steps = [e["step"] for e in log_after if "train_loss" in e]
    assert train_steps == list(range(1, 21))
    assert all(a["step"] <= b["step"] for a, b in zip(log_after, log_after[1:]))
    elapsed = [e["elapsed_s"] for e in log_after]
    assert elapsed == sorted(elapsed)
    resumed_events = [e for e in log_after if e["step"] > 5]
    assert all(e["elapsed_s"] > e["session_elapsed_s"] for e in resumed_events)
    assert not (workdir / "lock").exists()


# --- TensorBoard --------------------------------------------------------------------------------

def _tensorboard_scalars(workdir) -> dict[str, dict[int, float]]:
    """Reads tensorboardX event files (TFRecord framing, Event protos) without TensorFlow."""
    from tensorboardX.proto import event_pb2
    scalars: dict = {}
    for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_tensorboard_event_files_hold_the_metrics(saved_run):
    """`tensorboard --logdir <workdir>` shows the run: the same numbers as metrics.jsonl."""
    scalars = _tensorboard_scalars(saved_run)
    assert {"train_loss", "train_bpc", "chars_per_s", "learning_rate", "grad_norm", "val_loss",
            "val_bpc", "val_last_loss"} <= set(scalars)
    for event in events(saved_run):
        for key in ("train_loss", "val_loss"):
            if key in event:
                np.testing.assert_allclose(scalars[key][event["step"]], event[key], rtol=1e-6)

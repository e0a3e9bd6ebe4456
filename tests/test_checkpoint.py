"""Checkpoints: exact resume, preemption (SIGTERM/SIGINT), SIGKILL mid-save, retention, restoring on
another device count, and refusing a workdir whose model or vocabulary differs.

Every run shares one tiny base config (hidden 16, 20 steps, a checkpoint every 5 steps, one device);
a module-scoped uninterrupted 20-step run is the reference that interrupted-and-resumed runs must
reproduce bit for bit. Subprocess runs go through tests/train_worker.py (`lstm-jax train` plus test
hooks: a per-step sleep so a signal lands mid-run, a SIGKILL inside an Orbax save).
"""
import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (REPO, assert_same_arrays, cli_flags, latest_step, param_arrays, tiny_config,
                      write_corpus)
from lstm_jax import checkpoint as ckpt
from lstm_jax import cli, evaluate, steps, train
from lstm_jax.workdir import WorkdirError

WORKER = REPO / "tests" / "train_worker.py"
TEXT = "the quick brown fox jumps over the lazy dog. " * 400   # as conftest's repetitive_corpus
TMP_SUFFIX = ".orbax-checkpoint-tmp"
BASE = {"model.hidden_size": 16, "max_steps": 20, "checkpoint.every_steps": 5,
        "parallel.cpu_devices": 0, "parallel.tune_allocator": False}


def base_config(corpus: str, **overrides):
    return tiny_config(corpus=corpus, **{**BASE, **overrides})


def checkpoint_arrays(workdir, step: int) -> dict:
    """Every array of a saved train state (step, params, optimizer state), by path."""
    checkpointer = ckpt.Checkpointer(workdir, read_only=True)
    try:
        restored = checkpointer.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
    finally:
        checkpointer.close()
    leaves = jax.tree_util.tree_leaves_with_path(restored.state)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def steps_on_disk(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def tmp_dirs(workdir) -> list[str]:
    return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                  if TMP_SUFFIX in p.name)


def read_metadata(workdir, step=None) -> dict:
    checkpointer = ckpt.Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.metadata(step)
    finally:
        checkpointer.close()


def snapshot(directory) -> dict:
    """relative path -> content hash of every file under `directory`."""
    directory = pathlib.Path(directory)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def start_worker(args: list[str], log_path: pathlib.Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(   # a PYTHONPATH copy of the package wins
        [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(REPO)]), **env}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, str(WORKER), *args], stdout=log,
                                stderr=subprocess.STDOUT, env=environ, cwd=REPO)


def finish(proc: subprocess.Popen, log_path: pathlib.Path, timeout: float = 120) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"worker timed out after {timeout}s:\n{log_path.read_text(errors='replace')}")
    return rc, log_path.read_text(errors="replace")


def wait_for_training_progress(metrics: pathlib.Path, proc, log_path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any("train_loss" in line for line in metrics.read_text().splitlines()):
            return
        if proc.poll() is not None:
            pytest.fail(f"worker exited ({proc.returncode}) before training progressed:\n"
                        f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail(f"no training progress in {metrics} after {timeout}s:\n{log_path.read_text(errors='replace')}")


# --- shared fixtures -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    return write_corpus(tmp_path_factory.mktemp("corpus"), TEXT)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The uninterrupted 20-step run every resumed run must reproduce exactly."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    result = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    assert result.step == 20 and not result.preempted
    return types.SimpleNamespace(workdir=workdir, result=result, params=param_arrays(result.model))


@pytest.fixture(scope="module")
def run_on_8_devices(tmp_path_factory, corpus):
    """A short run on an 8-device mesh (the batch of 16 split 2 rows per device)."""
    workdir = tmp_path_factory.mktemp("eight") / "run"
    result = train.train_and_evaluate(base_config(corpus, max_steps=5, **{"parallel.num_devices": 8}),
                                      workdir, progress=False)
    assert result.step == 5
    return types.SimpleNamespace(workdir=workdir, result=result, params=param_arrays(result.model))


# --- exact resume ----------------------------------------------------------------------------

def test_n_steps_then_resume_n_more_is_bitwise_identical_to_2n_steps(tmp_path, corpus, capsys):
    """Extending a finished N-step run to 2N reproduces a 2N-step run bit for bit when the
    learning rate does not depend on the run's length (constant schedule; a cosine run's decay
    follows its length, see test_train's schedule tests). Fails if resuming loses or repeats a
    batch, resets the RMSprop velocities or the step counter, or restores params inexactly."""
    constant = {"optimizer.schedule": "constant"}
    reference = train.train_and_evaluate(base_config(corpus, **constant), tmp_path / "ref",
                                         progress=False)
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(base_config(corpus, max_steps=10, **constant), workdir,
                                     progress=False)
    assert first.step == 10 and latest_step(workdir) == 10
    capsys.readouterr()

    second = train.train_and_evaluate(base_config(corpus, **constant), workdir, progress=False)
    assert "from step 10" in capsys.readouterr().out
    assert second.step == 20

    assert_same_arrays(param_arrays(second.model), param_arrays(reference.model))
    # the whole saved train state (step counter, params, RMSprop velocities) matches too
    assert_same_arrays(checkpoint_arrays(workdir, 20), checkpoint_arrays(tmp_path / "ref", 20))
    # and the second half did train: the resumed params moved away from the step-10 ones
    first_params = param_arrays(first.model)
    assert any(not np.array_equal(first_params[k], v) for k, v in param_arrays(second.model).items())


def test_exact_resume_with_pmap_on_two_devices(tmp_path, corpus):
    """The pmap path restores a host state and replicates it; saving takes device 0's copy. Resumes
    from the uninterrupted run's own mid-run checkpoint (a copy of its workdir cut back to step 4)."""
    config = base_config(corpus, max_steps=8, **{
        "parallel.mode": "pmap", "parallel.num_devices": 2, "checkpoint.every_steps": 4})
    whole = train.train_and_evaluate(config, tmp_path / "whole", progress=False)
    assert steps_on_disk(tmp_path / "whole") == [4, 8]
    split = shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(split / "checkpoints" / "8")
    resumed = train.train_and_evaluate(config, split, progress=False)
    assert whole.step == resumed.step == 8
    assert_same_arrays(param_arrays(resumed.model), param_arrays(whole.model))
    assert_same_arrays(checkpoint_arrays(split, 8), checkpoint_arrays(tmp_path / "whole", 8))


def test_checkpoint_metadata_describes_the_run(reference, run_on_8_devices):
    """What a resume needs, checked against independent figures: fails if the data position, the
    global batch, the schedule, the epoch's running loss or the device count are saved wrong."""
    from lstm_jax import corpora
    meta = read_metadata(reference.workdir)
    assert meta["config"] == json.loads((reference.workdir / "config.json").read_text())
    assert meta["vocab"] == sorted(set(TEXT))
    assert meta["corpus_fingerprint"] == hashlib.sha256(TEXT.encode()).hexdigest()
    train_chars = len(TEXT) - int(len(TEXT) * 0.05)            # the 5% held-out tail
    per_epoch = (train_chars - 20) // 20 // 16                  # 20-char chunks, batch 16
    assert (meta["steps_per_epoch"], meta["epoch"], meta["batch_in_epoch"]) == (per_epoch, 0, 20)
    assert meta["step"] == 20 and meta["global_batch"] == 16 and meta["total_steps"] == 20
    assert meta["lr_pieces"] == steps.lr_segments(base_config("x"), 20)
    logged = [r for r in map(json.loads, (reference.workdir / "metrics.jsonl").open()) if "train_loss" in r]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]       # log_every 5: means of 5 steps
    assert meta["epoch_loss"]["epoch"] == 0 and meta["epoch_loss"]["steps"] == 20
    np.testing.assert_allclose(meta["epoch_loss"]["sum"], 5 * sum(r["train_loss"] for r in logged), rtol=1e-6)
    assert 0 < meta["elapsed_s"] and meta["val_loss"] == pytest.approx(reference.result.metrics["val_loss"])
    # the device count the run trained on (its mesh), not how many devices the process had
    assert meta["num_devices"] == 1
    assert read_metadata(run_on_8_devices.workdir)["num_devices"] == 8
    assert corpora.corpus_fingerprint(TEXT) == meta["corpus_fingerprint"]


# --- preemption ------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_exits_143_and_the_next_run_resumes(tmp_path, corpus, reference,
                                                                      capsys):
    workdir, log = tmp_path / "run", tmp_path / "worker.log"
    proc = start_worker(["train", "--workdir", str(workdir), "--progress=False",
                         *cli_flags(base_config(corpus))], log, LSTM_JAX_TEST_STEP_SLEEP="0.25")
    wait_for_training_progress(workdir / "metrics.jsonl", proc, log)
    proc.send_signal(signal.SIGTERM)
    rc, out = finish(proc, log)

    assert rc == 143, out
    match = re.search(r"received SIGTERM: saved a checkpoint at step (\d+) in \S+; "
                      r"run the same command to resume", out)
    assert match, out
    stopped_at = int(match.group(1))
    assert 0 < stopped_at < 20, out
    assert latest_step(workdir) == stopped_at
    assert read_metadata(workdir)["step"] == stopped_at
    assert not tmp_dirs(workdir)

    capsys.readouterr()
    resumed = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    assert f"from step {stopped_at}" in capsys.readouterr().out
    assert resumed.step == 20 and not resumed.preempted
    assert_same_arrays(param_arrays(resumed.model), reference.params)


def test_sigint_in_process_saves_and_returns_preempted_then_resumes(tmp_path, corpus, reference,
                                                                    capsys, monkeypatch):
    """Ctrl-C from the library API: train_and_evaluate returns preempted=True after saving."""
    from lstm_jax import data
    original_prefetch = data.prefetch

    def interrupting_prefetch(iterable, *args, **kwargs):
        for i, item in enumerate(original_prefetch(iterable, *args, **kwargs)):
            if i == 7:
                os.kill(os.getpid(), signal.SIGINT)
            yield item
    monkeypatch.setattr(data, "prefetch", interrupting_prefetch)
    workdir, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    stopped = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    monkeypatch.setattr(data, "prefetch", original_prefetch)
    assert signal.getsignal(signal.SIGINT) is handler   # the caller's handler is back

    assert stopped.preempted and 0 < stopped.step < 20
    assert (f"received SIGINT: saved a checkpoint at step {stopped.step}"
            in capsys.readouterr().out)
    assert latest_step(workdir) == stopped.step
    resumed = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    assert f"from step {stopped.step}" in capsys.readouterr().out
    assert resumed.step == 20 and not resumed.preempted
    assert_same_arrays(param_arrays(resumed.model), reference.params)


# --- crash safety ----------------------------------------------------------------------------

def test_sigkill_during_a_save_leaves_the_previous_checkpoint_as_latest(tmp_path, corpus, reference,
                                                                        capsys):
    workdir, log = tmp_path / "run", tmp_path / "worker.log"
    proc = start_worker(["train", "--workdir", str(workdir), "--progress=False",
                         *cli_flags(base_config(corpus))], log, LSTM_JAX_TEST_KILL_AT_SAVE="10")
    rc, out = finish(proc, log)

    assert rc == -signal.SIGKILL, out
    assert "SIGKILL inside the save of step 10" in out
    # the process died with step 10's data in Orbax's temporary directory, not renamed into place
    assert tmp_dirs(workdir) == [f"10{TMP_SUFFIX}"], out
    assert steps_on_disk(workdir) == [5]
    assert latest_step(workdir) == 5
    model, vocab, _ = ckpt.restore_model(workdir)          # the previous checkpoint restores
    assert len(vocab) == len(set(TEXT))

    capsys.readouterr()
    resumed = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    assert "from step 5" in capsys.readouterr().out
    assert resumed.step == 20
    assert_same_arrays(param_arrays(resumed.model), reference.params)
    assert not tmp_dirs(workdir)        # the half-written step 10 was replaced by a complete one
    assert latest_step(workdir) == 20


# --- retention -------------------------------------------------------------------------------

def _tiny_state(value: float):
    return {"w": jnp.full((3,), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_retention_keeps_the_last_k_plus_the_best_by_val_loss(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, max_to_keep=2)
    val_losses = {1: 3.0, 2: 1.0, 3: 2.5, 4: None, 5: 2.0, 6: None}   # step 2 is the best
    for step, val in val_losses.items():
        checkpointer.save(step, _tiny_state(step), {"step": step}, None if val is None else {"val_loss": val})
    checkpointer.close()
    assert checkpointer.all_steps() == [2, 5, 6]
    assert steps_on_disk(tmp_path) == [2, 5, 6] and not tmp_dirs(tmp_path)
    state, meta = ckpt.Checkpointer(tmp_path, read_only=True).restore(_tiny_state(0.0), step=2)
    assert meta == {"step": 2}
    np.testing.assert_array_equal(state["w"], np.full(3, 2.0, np.float32))


def test_the_best_checkpoint_survives_a_restart(tmp_path):
    """Retention after a resume must still know which old checkpoint had the best val_loss."""
    first = ckpt.Checkpointer(tmp_path, max_to_keep=2)
    for step, val in {1: 1.0, 2: 2.0, 3: 3.0}.items():   # the best, step 1, is the oldest
        first.save(step, _tiny_state(step), {"step": step}, None if val is None else {"val_loss": val})
    first.close()
    assert steps_on_disk(tmp_path) == [1, 2, 3]

    second = ckpt.Checkpointer(tmp_path, max_to_keep=2)  # a resumed run
    assert second.best_step() == 1
    for step, val in {4: 4.0, 5: 5.0}.items():
        second.save(step, _tiny_state(step), {"step": step}, None if val is None else {"val_loss": val})
    second.close()
    assert steps_on_disk(tmp_path) == [1, 4, 5]


def test_training_keeps_the_last_k_checkpoints_and_the_best_on_disk(tmp_path):
    corpus = write_corpus(tmp_path, "the quick brown fox jumps over the lazy dog. " * 40)
    workdir = tmp_path / "run"
    config = base_config(corpus, max_steps=0, num_epochs=4,
                         **{"checkpoint.every_steps": 2, "checkpoint.max_to_keep": 2})
    result = train.train_and_evaluate(config, workdir, progress=False)

    per_epoch = read_metadata(workdir)["steps_per_epoch"]
    assert result.step == 4 * per_epoch and per_epoch % 2   # epoch ends fall between the 2-step saves
    evals = {r["step"]: r["val_loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
             if "val_loss" in r}
    assert sorted(evals) == [per_epoch * e for e in (1, 2, 3, 4)]
    saved = sorted(set(range(2, result.step + 1, 2)) | set(evals))
    expected = sorted(set(saved[-2:]) | {min(evals, key=evals.get)})
    assert steps_on_disk(workdir) == expected and not tmp_dirs(workdir)


# --- sampling needs only the workdir; other device counts ------------------------------------

def test_restore_model_onto_a_different_device_count(tmp_path, run_on_8_devices, reference):
    # 8 devices -> 1 device, in a fresh process that has only one
    log = tmp_path / "restore.log"
    rc, out = finish(start_worker(["restore", str(run_on_8_devices.workdir), str(tmp_path / "p.npz")],
                                  log, LSTM_JAX_TEST_DEVICES="1"), log)
    assert rc == 0, out
    assert "on 1 device(s)" in out
    with np.load(tmp_path / "p.npz") as restored:
        assert_same_arrays(dict(restored), run_on_8_devices.params)
    # 1 device -> 8 devices: restore_model builds its mesh over every device of this process
    assert jax.device_count() == 8
    model, vocab, config = ckpt.restore_model(reference.workdir)
    assert config.model.hidden_size == 16 and len(vocab) == len(set(TEXT))
    assert_same_arrays(param_arrays(model), reference.params)


def test_sample_cli_needs_only_the_workdir_on_one_device(tmp_path, run_on_8_devices):
    """`lstm-jax sample` in a fresh one-device process, from an 8-device run's workdir alone: the
    rows have the asked length, temperatures and prime, and the greedy row is the argmax chain of
    the trained model run step by step here. Fails if the wrong params or vocabulary are
    restored, or the flags are not honoured."""
    log, out_path = tmp_path / "sample.log", tmp_path / "samples.jsonl"
    rc, out = finish(start_worker(["sample", "--workdir", str(run_on_8_devices.workdir),
                                   "--num_samples=2", "--length=20", "--temperature=0,1",
                                   "--prime=the ", f"--out={out_path}"],
                                  log, LSTM_JAX_TEST_DEVICES="1"), log)
    assert rc == 0, out
    rows = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    assert [(r["index"], r["temperature"], r["prime"], len(r["text"])) for r in rows] == \
        [(0, 0.0, "the ", 20), (1, 1.0, "the ", 20)]
    model, vocab = run_on_8_devices.result.model, run_on_8_devices.result.vocab
    carry, token = model.initial_carry(1), None
    for char in "the ":
        logits, carry = model.step(jnp.array([vocab.chars.index(char)]), carry)
    greedy = []
    for _ in range(20):
        token = int(jnp.argmax(logits[0]))
        greedy.append(vocab.chars[token])
        logits, carry = model.step(jnp.array([token]), carry)
    assert rows[0]["text"] == "".join(greedy)


# --- mismatches ------------------------------------------------------------------------------

def test_a_different_hidden_size_is_refused_and_nothing_is_touched(tmp_path, corpus, reference):
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    before = snapshot(workdir)
    with pytest.raises(WorkdirError) as error:
        train.train_and_evaluate(base_config(corpus, **{"model.hidden_size": 32}), workdir,
                                 progress=False)
    message = str(error.value)
    assert "model.hidden_size: 16 (saved) != 32 (now)" in message
    assert "--new_run" in message
    assert snapshot(workdir) == before


@pytest.mark.parametrize("how", ["edited_corpus", "other_corpus"])
def test_a_corpus_with_a_different_vocab_is_refused(tmp_path, corpus, reference, how):
    """The saved run's corpus text gained characters (edited in place, or another file): a
    WorkdirError naming the vocab and the changed text (and the corpus field when its path
    differs), not an encoding error."""
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    new_text = TEXT + "NEW CHARS: XYZ!\n"
    if how == "edited_corpus":
        new_corpus = pathlib.Path(corpus)       # the saved run's own path, edited since
        saved_text = new_corpus.read_text()
        new_corpus.write_text(new_text)
    else:
        new_corpus = write_corpus(tmp_path, new_text, "other.txt")
    before = snapshot(workdir)
    try:
        with pytest.raises(WorkdirError) as error:
            train.train_and_evaluate(base_config(str(new_corpus)), workdir, progress=False)
    finally:
        if how == "edited_corpus":
            new_corpus.write_text(saved_text)
    message = str(error.value)
    assert f"vocab: {len(set(TEXT))} chars (saved) != {len(set(new_text))} chars (now)" in message
    assert "corpus text" in message and "--new_run" in message
    assert ("corpus: " in message) == (how == "other_corpus")
    assert snapshot(workdir) == before


def test_cli_refuses_a_model_override_unless_new_run_and_keeps_the_old_run(tmp_path, corpus, reference):
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    before = snapshot(workdir)
    bigger = base_config(corpus, max_steps=5, **{"model.hidden_size": 32})
    argv = ["lstm-jax", "train", "--workdir", str(workdir), "--progress=False", *cli_flags(bigger)]

    with pytest.raises(SystemExit) as refused:
        cli.main(argv)
    message = str(refused.value.code)
    assert "model.hidden_size" in message and "--new_run" in message
    assert snapshot(workdir) == before

    assert cli.main(argv + ["--new_run"]) == 0
    aside = workdir.with_name("run.prev1")
    assert snapshot(aside) == before                        # the old run, moved aside intact
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden_size"] == 32
    assert latest_step(workdir) == 5
    old_model, _, old_config = ckpt.restore_model(aside)   # and still usable
    assert old_config.model.hidden_size == 16
    assert_same_arrays(param_arrays(old_model), reference.params)


# --- checkpoint faults and --step -------------------------------------------------------------

def _truncate_largest_file(step_dir: pathlib.Path) -> None:
    """Cuts the step's biggest data file in half, as a crash or a bad disk would."""
    biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, corpus,
                                                                               reference):
    """Step 20 truncated: sampling restores step 15 with a warning; training resumes from 15,
    moves 20 out of the way (kept, under unreadable_checkpoints/) and redoes it bit-exactly.
    Fails if either dies on the TensorStore error (as both did) or picks another step."""
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    _truncate_largest_file(workdir / "checkpoints" / "20")
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 20 .* is unreadable .*; using step 15"):
        model, _, _ = ckpt.restore_model(workdir)
    at_15, _, _ = ckpt.restore_model(reference.workdir, step=15)
    assert_same_arrays(param_arrays(model), param_arrays(at_15))

    with pytest.warns(RuntimeWarning, match="using step 15"):
        resumed = train.train_and_evaluate(base_config(corpus), workdir, progress=False)
    assert resumed.step == 20
    assert_same_arrays(param_arrays(resumed.model), reference.params)
    assert (workdir / "unreadable_checkpoints" / "20").is_dir()
    assert latest_step(workdir) == 20


def test_no_readable_checkpoint_is_a_one_line_error(tmp_path, reference):
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    for step in steps_on_disk(workdir):
        _truncate_largest_file(workdir / "checkpoints" / str(step))
    with pytest.raises(SystemExit) as error:
        cli.main(["lstm-jax", "sample", "--workdir", str(workdir), "--length=5"])
    message = str(error.value.code)
    assert message.startswith("lstm-jax: error: no readable checkpoint in") and "\n" not in message
    assert "step 20:" in message and "step 10:" in message


def test_train_step_flag_resumes_an_earlier_checkpoint_and_sets_later_ones_aside(tmp_path, corpus,
                                                                                 reference, capsys):
    """`lstm-jax train --step 10` on a finished 20-step run: steps 15 and 20 move to
    abandoned_checkpoints/ (kept), the metrics after step 10 are dropped, and retraining from 10
    reproduces the same step-20 params."""
    workdir = shutil.copytree(reference.workdir, tmp_path / "run")
    assert cli.main(["lstm-jax", "train", "--workdir", str(workdir), "--progress=False", "--step=10",
                     *cli_flags(base_config(corpus))]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "from step 10" in out
    assert sorted(p.name for p in (workdir / "abandoned_checkpoints").iterdir()) == ["15", "20"]
    assert_same_arrays(checkpoint_arrays(workdir, 20), checkpoint_arrays(reference.workdir, 20))
    train_steps = [r["step"] for r in map(json.loads, (workdir / "metrics.jsonl").open()) if "train_loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 20
    with pytest.raises(SystemExit, match="no checkpoint at step 12 .* saved steps: \\[10, 15, 20\\]"):
        cli.main(["lstm-jax", "train", "--workdir", str(reference.workdir), "--step=12",
                  *cli_flags(base_config(corpus))])


@pytest.mark.parametrize("placement", [{}, {"parallel.mode": "pmap", "parallel.num_devices": 2}],
                         ids=["mesh", "pmap"])
def test_a_stream_run_resumed_mid_epoch_with_its_carry_is_bit_exact(tmp_path, corpus, placement):
    """The stream objective's LSTM carry is part of the checkpoint: rewinding a 20-step run to
    its step-10 checkpoint (mid-epoch: 53 steps per epoch) and training on reproduces step 20
    exactly, the carry included. Fails if the carry is not saved or restored (the resumed streams
    would restart from zero) or, under pmap, if device rows are merged in the wrong order."""
    config = base_config(corpus, objective="stream", **placement)
    train.train_and_evaluate(config, tmp_path / "whole", progress=False)
    workdir = shutil.copytree(tmp_path / "whole", tmp_path / "split")
    resumed = train.train_and_evaluate(config, workdir, progress=False, step=10)
    assert resumed.step == 20
    got, want = checkpoint_arrays(workdir, 20), checkpoint_arrays(tmp_path / "whole", 20)
    assert any("carry" in name for name in want)
    assert_same_arrays(got, want)
    assert read_metadata(workdir, 10)["steps_per_epoch"] == 53


def _greedy(model, vocab, prime: str, length: int) -> str:
    """The argmax chain of `model` after `prime`, step by step (independent of the sampler)."""
    carry = model.initial_carry(1)
    for char in prime:
        logits, carry = model.step(jnp.array([vocab.chars.index(char)]), carry)
    out = []
    for _ in range(length):
        token = int(jnp.argmax(logits[0]))
        out.append(vocab.chars[token])
        logits, carry = model.step(jnp.array([token]), carry)
    return "".join(out)


def test_sample_step_flag_uses_that_checkpoint(tmp_path, reference):
    """`lstm-jax sample --step 10` samples the step-10 model, not the latest: its rows equal the
    sampler run here on restore_model(step=10), and differ from the latest model's. Fails if
    --step is ignored."""
    from lstm_jax import sample
    out_path = tmp_path / "s.jsonl"
    args = dict(num_samples=4, length=40, temperature=1.0, prime="the ", seed=3)
    assert cli.main(["lstm-jax", "sample", "--workdir", str(reference.workdir), "--step=10",
                     "--num_samples=4", "--length=40", "--temperature=1", "--prime=the ", "--seed=3",
                     f"--out={out_path}"]) == 0
    texts = [json.loads(line)["text"] for line in out_path.read_text().splitlines()]
    at_10, vocab, _ = ckpt.restore_model(reference.workdir, step=10)
    assert texts == sample.generate(at_10, vocab, **args).texts
    assert texts != sample.generate(reference.result.model, vocab, **args).texts


def test_restore_model_of_the_best_step(tmp_path, corpus, monkeypatch):
    """With val_loss best at epoch 2 of 4 (an evaluator scripted to say so), retention keeps
    step 2 * spe as the best and restore_model(workdir, best_step) returns exactly its params.
    Fails if keep_best ranks by anything else or the best step cannot be restored."""
    scripted = iter([3.0, 1.0, 2.0, 4.0])
    monkeypatch.setattr(evaluate.Evaluator, "__call__", lambda self, params: {
        "val_loss": next(scripted), "val_bpc": 0.0, "val_last_loss": 0.0})
    small = write_corpus(tmp_path, "the quick brown fox jumps over the lazy dog. " * 40)
    config = base_config(small, max_steps=0, num_epochs=4, **{"checkpoint.every_steps": 0,
                                                              "checkpoint.max_to_keep": 1})
    result = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    spe = result.step // 4
    checkpointer = ckpt.Checkpointer(tmp_path / "run", read_only=True)
    best, kept = checkpointer.best_step(), checkpointer.all_steps()
    checkpointer.close()
    assert best == 2 * spe and kept == [2 * spe, 4 * spe]
    model, _, _ = ckpt.restore_model(tmp_path / "run", step=best)
    saved = checkpoint_arrays(tmp_path / "run", best)
    for name, value in param_arrays(model).items():   # "['layers'][0]['bias'].value" ->
        key = "['params']" + re.sub(r"\[(\d+)\]", r"['\1']", name).replace(".value", "['value']")
        np.testing.assert_array_equal(value, saved[key], err_msg=name)
    latest, _, _ = ckpt.restore_model(tmp_path / "run")
    assert any(not np.array_equal(a, b) for a, b in zip(param_arrays(model).values(),
                                                         param_arrays(latest).values()))

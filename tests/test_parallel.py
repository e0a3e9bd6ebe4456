"""Scale-out: the mesh step, the pmap step, gradient accumulation and a real two-process run all
give the parameters of the plain single-device step; prepared (memory-mapped) corpora give the same
batches as text; a batch that does not split over the devices is a clear error.

Comparisons use `assert_trees_close` (rtol 1e-5) with atol 3x the largest parameter error
observed: 3.2e-8 after 3 unit steps, 6.0e-8 after 4 training steps (two processes, pmap;
parameters of order 0.1-1; only the all-reduce order differs).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from asserts import assert_trees_close
from conftest import cli_flags, free_port, tiny_config, write_corpus
from lstm_jax import checkpoint, cli, data, parallel, steps, train

STEP_ATOL = 1e-7   # unit steps: observed max |error| 3.2e-8
RUN_ATOL = 1.8e-7  # four training steps: observed max |error| 6.0e-8
VOCAB = 13
STEPS = 3
WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


# --- unit level: one step function, placed three ways ------------------------------------------

def _step_config(**overrides):
    base = {"seq_len": 16, "batch_size": 16, "model.hidden_size": 16}
    return tiny_config(**{**base, **overrides})


def _batches(config) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, VOCAB, (config.batch_size, config.seq_len + 1)).astype(np.int32)
            for _ in range(STEPS)]


@functools.lru_cache(maxsize=None)
def _run_steps(mode: str, n_devices: int, overrides: tuple = ()) -> tuple[list[np.ndarray], list[float], list[np.ndarray]]:
    """STEPS train steps on fixed batches; returns (final param leaves, losses, initial param
    leaves), all on the host. Cached: several tests compare against the same reference run."""
    config = _step_config(**dict(overrides))
    devices = jax.devices()[:n_devices]
    mesh = parallel.make_mesh(devices)
    tx = steps.make_optimizer(config, total_steps=10)   # cosine: the learning rate moves each step
    graphdef, state = steps.init_state(config, steps.model_config(config, VOCAB), tx, mesh)
    key = jax.random.key(config.seed)
    initial = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    losses = []
    if mode == "mesh":
        step = steps.make_train_step(graphdef, tx, config, mesh=mesh)
        for batch in _batches(config):
            state, metrics = step(state, parallel.to_global(batch, mesh), key)
            losses.append(float(metrics["loss"]))
        params = jax.device_get(state.params)
    else:
        step = steps.make_pmap_train_step(graphdef, tx, config, devices=devices)
        state = parallel.replicate_for_pmap(jax.device_get(state), devices)
        for batch in _batches(config):
            state, metrics = step(state, batch.reshape((n_devices, -1) + batch.shape[1:]), key)
            loss = np.asarray(metrics["loss"])
            assert loss.shape == (n_devices,) and np.all(loss == loss[0])
            losses.append(float(loss[0]))
        stacked = jax.device_get(state.params)
        for leaf in jax.tree.leaves(stacked):   # every device holds the same parameters
            np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
        params = jax.tree.map(lambda x: x[0], stacked)
    return [np.asarray(x) for x in jax.tree.leaves(params)], losses, initial


def _assert_same_run(a, b):
    """Same initial parameters (exactly), same losses and final parameters; fails if a placement
    changes the result (a gradient summed instead of averaged over devices, a device's rows
    dropped, a different dropout mask)."""
    (params_a, losses_a, init_a), (params_b, losses_b, init_b) = a, b
    assert_trees_close(init_a, init_b, rtol=0, atol=0)
    assert_trees_close(losses_a, losses_b)   # observed max |error| 2.4e-7 on losses of 2.6
    assert_trees_close(params_a, params_b, atol=STEP_ATOL)
    # The steps moved the parameters far more than the tolerance: the comparison is not vacuous.
    assert max(np.abs(x - x0).max() for x, x0 in zip(params_a, init_a)) > 1e-2


def test_mesh_step_on_8_devices_equals_the_single_device_step():
    # With dropout: the mesh step draws the same mask as one device (one key for the global batch).
    single = _run_steps("mesh", 1, (("model.dropout", 0.25),))
    mesh = _run_steps("mesh", 8, (("model.dropout", 0.25),))
    _assert_same_run(single, mesh)


def test_pmap_step_equals_the_mesh_step():
    # No dropout: pmap folds the device index into the key, so its masks differ by design.
    _assert_same_run(_run_steps("mesh", 8), _run_steps("pmap", 8))


def _compiled_mesh_step(batch_size: int, accum_steps: int, n_devices: int = 8) -> str:
    """The optimised HLO of the mesh train step (per-device shapes after SPMD partitioning)."""
    config = _step_config(batch_size=batch_size, grad_accum_steps=accum_steps)
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    tx = steps.make_optimizer(config, total_steps=10)
    graphdef, state = steps.init_state(config, steps.model_config(config, VOCAB), tx, mesh)
    batch = parallel.to_global(np.zeros((batch_size, config.seq_len + 1), np.int32), mesh)
    step = steps.make_train_step(graphdef, tx, config, mesh=mesh)
    return step.lower(state, batch, jax.random.key(0)).compile().as_text()


@pytest.mark.parametrize("mode", ["mesh", "pmap"])
def test_gradient_accumulation_equals_the_plain_step(mode):
    """K=2 micro-batches give the plain step's parameters; on a mesh, each device also keeps its
    own rows: the compiled program has no all-gather, and the only token arrays are the device's
    B/n rows and its B/(n*K)-row micro-batches. Fails if the micro-batches cut across the device
    shards (micro-batch k = rows k*B/K..(k+1)*B/K: XLA all-gathers the batch and each device runs
    2x its rows), or if accumulation sums instead of averaging."""
    # 16 rows on 8 devices in 2 micro-batches: each device runs two 1-row micro-batches.
    _assert_same_run(_run_steps(mode, 8), _run_steps(mode, 8, (("grad_accum_steps", 2),)))
    if mode == "mesh":
        B, K, n, L1 = 32, 2, 8, 17
        hlo = _compiled_mesh_step(B, K, n)
        assert "all-gather" not in hlo, "the accumulation step all-gathers the sharded batch"
        token_rows = {int(rows) for rows in re.findall(rf"s32\[(?:\d+,)*(\d+),{L1}\]", hlo)}
        assert token_rows == {B // n, B // (n * K)}, token_rows


# --- configuration errors -----------------------------------------------------------------------

# In-process CLI run after JAX has started: hostenv rightly warns it cannot change the devices.
@pytest.mark.filterwarnings("ignore:lstm_jax.hostenv:RuntimeWarning")
def test_a_global_batch_that_does_not_split_over_the_devices_is_a_clear_error(tmp_path):
    mesh = parallel.make_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match=r"batch_size=12 does not divide by the 8 devices.*"
                                         r"multiple of 8 \(e\.g\. 8 or 16\).*per_device_batch_size"):
        steps.global_batch_size(tiny_config(batch_size=12), mesh)
    assert steps.global_batch_size(tiny_config(batch_size=12, per_device_batch_size=2), mesh) == 16
    with pytest.raises(ValueError, match=r"grad_accum_steps=4.*change one of them"):
        steps.global_batch_size(tiny_config(batch_size=16, grad_accum_steps=4), mesh)
    # ... and from the command line: one line, no traceback, before anything is compiled.
    corpus = write_corpus(tmp_path, "abcdefgh " * 500)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["lstm-jax", "train", "--workdir", str(tmp_path / "run"), "--progress=false",
                  f"--config.corpus={corpus}", "--config.batch_size=12",
                  "--config.parallel.num_devices=8", "--config.parallel.cpu_devices=0",
                  "--config.parallel.tune_allocator=False"])
    message = str(exit_info.value.code)
    assert message.startswith("lstm-jax: error: batch_size=12 does not divide by the 8 devices")
    assert "per_device_batch_size" in message
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- prepared (memory-mapped) corpora -------------------------------------------------------------

def test_prepared_corpus_gives_the_same_batches_as_the_text(tmp_path):
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * i}.\n" for i in range(300))
    path = write_corpus(tmp_path, text)
    assert cli.main(["lstm-jax", "prepare", f"--config.corpus={path}", "--out", str(tmp_path / "prep")]) == 0
    for objective in ("sequence", "window"):
        config = tiny_config(corpus=path, objective=objective)
        prepared = data.load_corpus(tiny_config(corpus=f"prepared:{tmp_path / 'prep'}", objective=objective))
        in_memory = data.load_corpus(config)
        assert isinstance(prepared.train_tokens, np.memmap) and isinstance(prepared.val_tokens, np.memmap)
        assert prepared.vocab == in_memory.vocab
        np.testing.assert_array_equal(prepared.train_tokens, in_memory.train_tokens)
        np.testing.assert_array_equal(prepared.val_tokens, in_memory.val_tokens)
        a = data.make_batcher(config, in_memory.train_tokens, 16)
        b = data.make_batcher(config, prepared.train_tokens, 16)
        assert a.steps_per_epoch == b.steps_per_epoch > 3
        for epoch, index in ((0, 0), (0, 3), (2, a.steps_per_epoch - 1)):
            full = a.batch(epoch, index)
            np.testing.assert_array_equal(b.batch(epoch, index), full)
            # Each of 2 processes reads its own rows straight from the memmap.
            halves = [b.batch(epoch, index, slice(p * 8, (p + 1) * 8)) for p in range(2)]
            np.testing.assert_array_equal(np.concatenate(halves), full)
        np.testing.assert_array_equal(
            data.eval_windows(prepared.val_tokens, 20, 3, 64), data.eval_windows(in_memory.val_tokens, 20, 3, 64))


# --- a real two-process run -----------------------------------------------------------------------

def _run_config(corpus: str, **overrides):
    return tiny_config(**{
        "corpus": corpus, "seq_len": 16, "batch_size": 8, "model.hidden_size": 16, "max_steps": 4,
        "log_every": 2, "eval_window": 20, "eval_max_windows": 16, "sample.length": 8,
        "checkpoint.every_steps": 2, "parallel.tune_allocator": False, **overrides})


def _run_two_processes(config, workdir: pathlib.Path, timeout: float = 150) -> list[str]:
    """Two `lstm-jax train` processes x 2 fake CPU devices, coordinated over 127.0.0.1."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    flags = ["--workdir", str(workdir), "--progress=false", *cli_flags(config)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), "2", "--", *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = [p.communicate()[0][-3000:] for p in procs]
        pytest.fail(f"the two-process run hung for {timeout} s; output tails:\n" + "\n---\n".join(tails))
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed ({p.returncode}):\n{out[-4000:]}"
    return outputs


def _params(workdir) -> list[np.ndarray]:
    """Parameters restored from a workdir alone (config.json, vocab.json, latest checkpoint)."""
    model, _, _ = checkpoint.restore_model(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference: one process, a 4-device mesh; returns (corpus path, workdir)."""
    tmp = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(tmp, "the quick brown fox jumps over the lazy dog. " * 60
                          + "Pack my box with five dozen liquor jugs! " * 20)
    workdir = tmp / "one_process"
    train.train_and_evaluate(_run_config(corpus, **{"parallel.num_devices": 4}), workdir, progress=False)
    return corpus, workdir


def _assert_same_workdir(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    assert_trees_close(_params(workdir), _params(reference), atol=RUN_ATOL)
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [m["step"] for m in expected] == [2, 4, 4]
    for m, r in zip(metrics, expected):
        for k in ("train_loss", "grad_norm", "val_loss", "val_last_loss"):
            if k in r:
                assert m[k] == pytest.approx(r[k], rel=1e-5), k
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]


def test_two_processes_with_two_devices_each_equal_one_process_with_four(tmp_path, one_process_run):
    corpus, reference = one_process_run
    workdir = tmp_path / "two_processes"
    outputs = _run_two_processes(_run_config(corpus, **{"parallel.num_devices": 0}), workdir)
    # Same parameters and metrics; process 0 alone wrote metrics.jsonl and samples.txt (no record
    # twice); both processes took part in the checkpoint saves at steps 2 and 4.
    _assert_same_workdir(workdir, reference)
    samples = (workdir / "samples.txt").read_text()
    assert samples.count("----- step 4") == 1 and samples.count("----- temperature") == 4
    assert json.loads((workdir / "config.json").read_text())["parallel"]["num_processes"] == 2
    assert "done: step 4" in outputs[0]


def test_pmap_mode_trains_like_mesh_mode(tmp_path, one_process_run):
    corpus, reference = one_process_run
    config = _run_config(corpus, **{"parallel.num_devices": 4, "parallel.mode": "pmap"})
    train.train_and_evaluate(config, tmp_path / "pmap", progress=False)
    _assert_same_workdir(tmp_path / "pmap", reference)


# --- the stream objective: the carry sharded with the batch ------------------------------------

@pytest.fixture(scope="module")
def stream_corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("stream"), "the quick brown fox jumps over the lazy dog. " * 300)


def _stream_run(tmp_path, corpus, **overrides):
    config = tiny_config(corpus=corpus, objective="stream", max_steps=12, **{
        "model.hidden_size": 16, "checkpoint.every_steps": 6, "sample.length": 5, **overrides})
    result = train.train_and_evaluate(config, tmp_path, progress=False)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.model, nnx.Param))], result


def test_stream_training_on_8_devices_and_under_pmap_equals_one_device(tmp_path, stream_corpus):
    """12 stateful steps: the carry split over an 8-device mesh, or held per device under pmap
    (split from and merged back into the global carry for checkpoints), trains the parameters of
    one device. Fails if a device continues another device's streams, or if pmap's carry
    placement is replicated instead of split."""
    one, r1 = _stream_run(tmp_path / "one", stream_corpus)
    mesh, _ = _stream_run(tmp_path / "mesh", stream_corpus, **{"parallel.num_devices": 8})
    pmap, _ = _stream_run(tmp_path / "pmap", stream_corpus, **{"parallel.num_devices": 8,
                                                               "parallel.mode": "pmap"})
    assert_trees_close(mesh, one, atol=RUN_ATOL)
    assert_trees_close(pmap, one, atol=RUN_ATOL)
    assert "val_text_bpc" in r1.metrics

"""The native CPU recurrence (lstm_jax/native) as the model, the train step and the CLI use it:
the model's loss and gradients against the custom scan (1-3 layers, a carry, dropout), the mesh
step calling the kernel on each device's rows (1, 2 and 8 devices equal), bit-for-bit repeats,
the lowering for CPU (kernel, no scan) against GPU/TPU (scan, no kernel), the one-line fallback
and the one-line refusal. The kernel against the float64 NumPy BPTT, path by path and in
bfloat16, is in tests/test_recurrence.py; exact resume runs on it in test_train/test_workdir
(the tiny config's hidden size makes `auto` native there).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from asserts import assert_trees_close
from conftest import REPO, tiny_config
from lstm_jax import CharLSTM, ModelConfig, native, parallel
from lstm_jax import steps as steps_lib

needs_native = pytest.mark.skipif(not native.available()[0],
                                  reason=f"native kernel: {native.available()[1]}")
KERNELS = ("lstm_jax_native_forward", "lstm_jax_native_backward")


def _model_loss_and_grads(backward: str, layers: int, dropout: float, carry_scale: float):
    V, H, B, T = 11, 32, 6, 9
    model = CharLSTM(ModelConfig(vocab_size=V, hidden_size=H, num_layers=layers, dropout=dropout,
                                 backward=backward), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, V)
    keys = jax.random.split(jax.random.key(2), 2 * layers)
    carry = tuple((carry_scale * jax.random.normal(keys[2 * i], (B, H)),
                   carry_scale * jax.random.normal(keys[2 * i + 1], (B, H))) for i in range(layers))

    def loss(params, carry):
        logits, new_carry = nnx.merge(graphdef, params)(
            tokens[:, :-1], carry, dropout_key=jax.random.key(3), return_carry=True)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        return nll + sum(jnp.sum(h * 0.1) + jnp.sum(c * 0.05) for h, c in new_carry)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, carry)
    return value, jax.tree.map(np.asarray, grads)


@needs_native
@pytest.mark.parametrize("layers,dropout,carry_scale", [(1, 0.0, 0.0), (2, 0.3, 1.0), (3, 0.5, 0.5)])
def test_the_model_on_the_kernel_equals_the_custom_scan(layers, dropout, carry_scale):
    """CharLSTM with backward='native': loss, every parameter gradient and the carry gradients
    equal the custom scan's (observed max |error| 1.2e-7 on gradients up to 0.3; atol 5e-7), with
    dropout between layers (the same mask) and a non-zero initial carry whose final value enters
    the loss. Fails if a layer's carry is not passed in or out, or the custom_vjp drops a
    cotangent (d h_T, d c_T, d carry)."""
    want = _model_loss_and_grads("custom", layers, dropout, carry_scale)
    got = _model_loss_and_grads("native", layers, dropout, carry_scale)
    assert_trees_close(got, want, rtol=1e-5, atol=5e-7)


def _train_three_steps(n_devices: int, backward: str = "native"):
    config = tiny_config(**{"model.backward": backward, "batch_size": 16})
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    tx = steps_lib.make_optimizer(config, 100)
    graphdef, state = steps_lib.init_state(config, steps_lib.model_config(config, 20), tx, mesh)
    step = steps_lib.make_train_step(graphdef, tx, config, steps_per_epoch=10, mesh=mesh)
    rows = np.random.default_rng(0).integers(0, 20, (3, 16, config.seq_len + 1), dtype=np.int32)
    hlo = step.lower(state, parallel.to_global(rows[0], mesh), jax.random.key(0)).compile().as_text()
    for batch in rows:
        state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(0))
    return jax.tree.map(np.asarray, state.params), float(metrics["loss"]), hlo, config


@needs_native
@pytest.mark.parametrize("n_devices", [2, 8])
def test_each_device_runs_the_kernel_on_its_rows_and_the_result_equals_one_device(n_devices):
    """On a mesh the train step calls the kernel inside shard_map: the compiled program's
    forward and backward calls take each device's 16/n rows, not the gathered batch, and three
    updates equal the one-device run (observed max |error| 4e-8; atol 1e-6: the gradient
    all-reduce sums in another order). Fails if the step is traced without the mesh (XLA then
    gathers the batch onto every device and each runs all 16 rows) or a shard is mixed up."""
    one, loss1, _, _ = _train_three_steps(1)
    many, loss_n, hlo, config = _train_three_steps(n_devices)
    assert_trees_close(many, one, rtol=1e-5, atol=1e-6)
    assert loss_n == pytest.approx(loss1, rel=1e-5)
    calls = re.findall(r"custom_call_target=\"(lstm_jax_native_\w+)\"", hlo)
    assert sorted(set(calls)) == sorted(KERNELS), calls
    xproj = f"f32[{config.seq_len},{16 // n_devices},{4 * config.model.hidden_size}]"
    forward = [line for line in hlo.splitlines() if '"lstm_jax_native_forward"' in line]
    assert forward and all(xproj in line for line in forward), (xproj, forward)


@needs_native
def test_the_kernel_is_deterministic_with_two_threads(monkeypatch):
    """Two threads split the panels of each timestep, never one sum: repeated runs are bit-for-bit
    equal (what exact resume needs). Fails if threads accumulate into shared sums."""
    monkeypatch.setattr(native, "_THREADS", 2)
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (20, 24, 4 * 64))
    w = jax.random.normal(k[1], (64, 4 * 64)) * 0.1
    zeros = jnp.zeros((24, 64))
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(native.lstm_native(x, w, (zeros, zeros))[1] ** 2),
                            argnums=(0, 1)))
    first = jax.tree.map(np.asarray, grad(x, w))
    for _ in range(3):
        for a, b in zip(first, grad(x, w)):
            np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("dtype,flags,hidden,expected", [
    ("float32", {"avx512f"}, 256, True),
    ("float32", {"avx512f"}, 248, False),                   # not a multiple of 16: the scan
    ("bfloat16", {"avx512f", "avx512_bf16"}, 512, True),     # AVX512-BF16 without AMX (Zen 4)
    ("bfloat16", {"avx512f", "avx512_bf16", "amx_bf16"}, 512, False),   # AMX: XLA's bf16 wins
    ("float32", {"avx2", "fma"}, 248, True),                 # AVX2: a multiple of 8 is enough
    ("float32", {"avx2", "fma"}, 250, False),
    ("bfloat16", {"avx2", "fma"}, 512, False),              # bf16 only on AVX512-BF16
    ("float32", {"sse4_2"}, 256, False),                    # no microkernel: sgemm per step
])
def test_auto_runs_the_kernel_where_it_measured_faster(monkeypatch, dtype, flags, hidden, expected):
    """`native.fast` (what backward='auto' runs) by dtype and CPU flags, on a kernel built for
    those flags (the build itself is stubbed: this runs on any host)."""
    width = 16 if "avx512f" in flags else 8 if "avx2" in flags else 0
    monkeypatch.setattr(native, "simd_width", lambda: width)
    monkeypatch.setattr(native, "has_bf16", lambda: "avx512_bf16" in flags)
    assert native.fast(hidden, dtype, flags) is expected


@needs_native
def test_cpu_lowering_runs_the_kernel_and_gpu_tpu_lowering_the_scan():
    """backward='auto' on this CPU: the step lowered for the CPU calls the kernel and has no
    while loop (the scan is gone); lowered for CUDA or TPU it has the scan and no kernel
    (`lax.platform_dependent`), so an exported or cross-compiled step carries no CPU call."""
    config = tiny_config(**{"model.backward": "auto"})
    mesh = parallel.make_mesh(jax.devices()[:1])
    tx = steps_lib.make_optimizer(config, 100)
    graphdef, state = steps_lib.init_state(config, steps_lib.model_config(config, 20), tx, mesh)
    traced = steps_lib.make_train_step(graphdef, tx, config, steps_per_epoch=10).trace(
        state, jnp.zeros((config.batch_size, config.seq_len + 1), jnp.int32), jax.random.key(0))
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert all(k in cpu for k in KERNELS) and "stablehlo.while" not in cpu
    for platform in ("cuda", "tpu"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert not any(k in text for k in KERNELS) and "stablehlo.while" in text, platform


@needs_native
@pytest.mark.parametrize("n_devices", [1, 2])
def test_the_kernel_threads_are_the_cores_over_the_mesh_devices(n_devices):
    """Each kernel call gets cores // (the mesh's devices) threads, whatever the process's device
    count (8 here): a 1-device mesh uses every core, as the start-up line says. Fails if a
    1-device mesh is traced without it (the calls then split the cores over all 8 devices)."""
    from lstm_jax import hostenv
    config = tiny_config(**{"model.backward": "native"})
    mesh = parallel.make_mesh(jax.devices()[:n_devices])
    tx = steps_lib.make_optimizer(config, 100)
    graphdef, state = steps_lib.init_state(config, steps_lib.model_config(config, 20), tx, mesh)
    text = steps_lib.make_train_step(graphdef, tx, config, steps_per_epoch=10, mesh=mesh).trace(
        state, jnp.zeros((config.batch_size, config.seq_len + 1), jnp.int32),
        jax.random.key(0)).lower(lowering_platforms=("cpu",)).as_text()
    threads = set(re.findall(r"threads = (\d+) : i32", text))
    assert threads == {str(max(1, hostenv.cpu_count() // n_devices))}, threads


def _cli(tmp_path, *args, env=None):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lstm_jax.cli", "train", "--config", str(REPO / "configs/tiny.py"),
           f"--config.corpus={corpus}", "--config.max_steps=2", "--config.sample.length=5",
           "--noprogress", "--workdir", str(workdir), *args]
    full_env = {**os.environ, "XLA_FLAGS": "", "PJRT_NPROC": "", "JAX_PLATFORMS": "cpu",
                **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO,
                          timeout=300), workdir


@needs_native
def test_the_start_up_line_names_the_native_backend(tmp_path):
    proc, _ = _cli(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"recurrence: native \((AVX-512|AVX2), float32, \d threads?/device\)",
                     proc.stdout), \
        proc.stdout


def test_without_the_kernel_one_line_says_why_and_the_scan_trains(tmp_path):
    """LSTM_JAX_NATIVE=0 (as a machine without a compiler): auto trains on the custom scan and
    the start-up line says so; backward='native' is refused in one line naming the cause and the
    fix, before anything is written. Fails if the refusal comes as a traceback or after the
    workdir was made."""
    env = {"LSTM_JAX_NATIVE": "0"}
    proc, _ = _cli(tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "recurrence: custom scan (native unavailable: disabled by LSTM_JAX_NATIVE=0)" in proc.stdout
    proc, workdir = _cli(tmp_path, "--config.model.backward=native", "--workdir",
                         str(tmp_path / "refused"), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "lstm-jax: error: model.backward='native' cannot run here: disabled by LSTM_JAX_NATIVE=0; "
        "use model.backward='auto' (the scan where native cannot run)"], proc.stderr
    assert not (tmp_path / "refused").exists()


def test_a_failed_build_is_one_line_and_leaves_the_scan(tmp_path):
    """A compiler that fails (here `false`) makes `available()` (False, one line naming the
    compiler) in a fresh process, and `lstm_layer(backward='native')` runs the scan."""
    script = ("from lstm_jax import native, recurrence; import jax.numpy as jnp\n"
              "ok, why = native.available(); print(ok); print(why)\n"
              "z = jnp.zeros((2, 16)); x = jnp.ones((3, 2, 64))\n"
              "print(recurrence.backend_name('native', 16, 'float32', 'cpu'))\n"
              "print(recurrence.lstm_layer(x, jnp.zeros((16, 64)), (z, z), backward='native')[1].shape)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "CXX": "false", "LSTM_JAX_CACHE_DIR": str(tmp_path),
                               "XLA_FLAGS": ""}, timeout=300)
    out = proc.stdout.splitlines()
    assert proc.returncode == 0 and out[0] == "False", proc.stderr[-2000:]
    assert out[1].startswith("building the native kernel failed (") and "false" in out[1]
    assert out[2].startswith("custom scan (native unavailable: building the native kernel failed")
    assert out[3] == "(3, 2, 16)"

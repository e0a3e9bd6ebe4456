"""Accelerator readiness on CPU: the cuDNN weight conversion against jax.experimental.rnn's own
layout and its pure-JAX reference `lstm_ref`, the cuDNN backend's wiring (emulated), where it
applies, and benchmarks/accelerator_check.py --smoke so the GPU check never rots."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import rnn

from lstm_jax import cudnn
from lstm_jax.model import CharLSTM, ModelConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _model(backward="custom", V=11, H=8, L=2, dropout=0.0, seed=0):
    cfg = ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, dropout=dropout, backward=backward)
    model = CharLSTM(cfg, rngs=nnx.Rngs(seed))
    # non-zero, distinct biases so a bias in the wrong place or gate shows
    for i, layer in enumerate(model.layers):
        layer.bias[...] = jnp.linspace(-0.5, 0.5, 4 * H) + 0.1 * i
    return model


def _same_params(src, dst):
    nnx.update(dst, nnx.state(src, nnx.Param))
    return dst


# --- the weight conversion ---------------------------------------------------------------------

def test_packed_weights_follow_jax_experimental_rnn_layout():
    """pack_weights against jax's own unpacker: W_ih = kernel_in.T (4H, I), W_hh = kernel_rec.T,
    b_ih = our bias, b_hh = 0, per layer, with layer 0's input size V. Catches a missing
    transpose, swapped W_ih/W_hh or biases, or a wrong total length."""
    V, H, L = 11, 8, 3
    model = _model(V=V, H=H, L=L)
    layers = cudnn.model_layers(model)
    flat = cudnn.pack_weights(layers)
    assert flat.shape == (rnn.get_num_params_in_lstm(V, H, L, False),)
    assert flat.shape == (cudnn.num_params(V, H, L),)
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(flat, V, H, L, False)
    for i, (k_in, k_rec, bias) in enumerate(layers):
        np.testing.assert_array_equal(w_ih[i], k_in.T)
        np.testing.assert_array_equal(w_hh[i], k_rec.T)
        np.testing.assert_array_equal(b_ih[i], bias)
        np.testing.assert_array_equal(b_hh[i], 0.0)


def test_weight_round_trip_is_exact():
    """unpack(pack(params)) gives our parameters back bit for bit (-0.0 included), so checkpoints
    keep one format whatever the backend."""
    layers = cudnn.model_layers(_model(V=7, H=4, L=2))
    layers[0] = (layers[0][0], layers[0][1], layers[0][2].at[3].set(-0.0))
    back = cudnn.unpack_weights(cudnn.pack_weights(layers), 7, 4, 2)
    for a, b in zip(jax.tree.leaves(layers), jax.tree.leaves(back)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


@pytest.mark.parametrize("L", [1, 2])
def test_model_forward_equals_lstm_ref_with_converted_weights(L):
    """Our scan model == jax.experimental.rnn.lstm_ref (one-hot input, converted weights, then our
    head): the conversion computes the same LSTM, gates in the same order (i, f, g, o)."""
    V, H, B, T = 11, 8, 3, 7
    model = _model(V=V, H=H, L=L)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)))
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(
        cudnn.pack_weights(cudnn.model_layers(model)), V, H, L, False)
    zeros = jnp.zeros((L, B, H))
    y, h_n, c_n = rnn.lstm_ref(jax.nn.one_hot(tokens, V), zeros, zeros, w_ih, w_hh, b_ih, b_hh,
                               jnp.full((B,), T, jnp.int32), V, H, L, 0.0, False)
    logits, carry = model(tokens, return_carry=True)
    np.testing.assert_allclose(model.head(y), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.stack([h for h, _ in carry]), h_n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.stack([c for _, c in carry]), c_n, rtol=1e-5, atol=1e-6)


# --- the backend's wiring (cuDNN call emulated by lstm_ref) --------------------------------------

def _loss(model, tokens, key=None):
    logits = model(tokens[:, :-1], dropout_key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cudnn_backend_matches_the_scan_forward_and_gradients(dropout):
    """backward='cudnn' (through lstm_ref on CPU) == backward='custom' on the same parameters:
    logits, last-position logits, carried state in and out, and the gradients of the training
    loss, dropout included (the same masks between and after the layers). Catches gradients not
    reaching our parameters through the packing, a dropout mask drawn in another layout, or the
    carry stacked in the wrong order."""
    V, H, L, B, T = 11, 8, 2, 3, 6
    ref = _model("custom", V, H, L, dropout)
    fast = _same_params(ref, _model("cudnn", V, H, L, dropout, seed=1))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, T + 1)))
    carry = tuple((jnp.full((B, H), 0.1 * i), jnp.full((B, H), -0.2 * i)) for i in range(L))
    key = jax.random.key(3) if dropout else None
    with cudnn.emulated():
        got, got_carry = fast(tokens, carry, dropout_key=key, return_carry=True)
        got_last = fast(tokens, carry, dropout_key=key, last_only=True)
        got_loss, got_grads = nnx.value_and_grad(_loss)(fast, tokens, key)
    want, want_carry = ref(tokens, carry, dropout_key=key, return_carry=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_last, want[:, -1], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_carry), jax.tree.leaves(want_carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    want_loss, want_grads = nnx.value_and_grad(_loss)(ref, tokens, key)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(got_grads)):
        w = nnx.to_pure_dict(want_grads)
        for k in path:
            w = w[k.key]
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_cudnn_backend_off_gpu_runs_the_scan():
    """On a CPU (not emulated) a backward='cudnn' model computes the same logits through the scan:
    a cuDNN-trained checkpoint evaluates and samples anywhere."""
    assert jax.default_backend() == "cpu" and not cudnn.runs_cudnn()
    ref = _model("custom")
    fast = _same_params(ref, _model("cudnn", seed=1))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 11, (2, 5)))
    np.testing.assert_array_equal(jax.jit(lambda m, t: m(t))(fast, tokens), ref(tokens))


# --- where it applies ----------------------------------------------------------------------------

def _cfg(dtype="float32"):
    return ModelConfig(vocab_size=5, hidden_size=4, dtype=dtype)


def test_cudnn_is_float32_only():
    with pytest.raises(ValueError, match="float32-only.*backward='custom'"):
        ModelConfig(vocab_size=5, dtype="bfloat16", backward="cudnn")


def test_check_supported_platform_decisions(monkeypatch):
    """One-line refusals off a CUDA GPU, without the kernels, and on a multi-device mesh; accepted
    on one GPU or under pmap (the platform is forced: this runs on CPU)."""
    with pytest.raises(ValueError, match="needs a CUDA GPU, but JAX runs on cpu"):
        cudnn.check_supported(_cfg(), "cpu")
    with pytest.raises(ValueError, match="tpu"):
        cudnn.check_supported(_cfg(), "tpu")
    monkeypatch.setattr(cudnn, "kernels_available", lambda: False)
    with pytest.raises(ValueError, match="no cuDNN RNN kernels"):
        cudnn.check_supported(_cfg(), "gpu")
    monkeypatch.setattr(cudnn, "kernels_available", lambda: True)
    cudnn.check_supported(_cfg(), "gpu")
    cudnn.check_supported(_cfg(), "gpu", num_devices=8, parallel_mode="pmap")
    with pytest.raises(ValueError, match="8-device mesh.*parallel.mode=pmap"):
        cudnn.check_supported(_cfg(), "gpu", num_devices=8)
    with pytest.raises(ValueError, match="float32"):
        cudnn.check_supported(_cfg("bfloat16"), "gpu")


def test_resolve_auto_backward(monkeypatch):
    monkeypatch.setattr(cudnn, "kernels_available", lambda: True)
    kw = dict(dtype="float32", param_dtype="float32")
    assert cudnn.resolve_backward("auto", platform="cpu", **kw)[0] == "custom"
    assert cudnn.resolve_backward("auto", platform="gpu", **kw)[0] == "cudnn"
    assert cudnn.resolve_backward("auto", platform="gpu", num_devices=2, **kw)[0] == "custom"
    assert cudnn.resolve_backward("auto", platform="gpu", dtype="bfloat16",
                                  param_dtype="float32")[0] == "custom"
    assert cudnn.resolve_backward("autodiff", platform="gpu", **kw) == ("autodiff", "as configured")


# --- the GPU check's smoke mode ----------------------------------------------------------------

def test_accelerator_check_smoke(tmp_path):
    """benchmarks/accelerator_check.py --smoke on CPU (tiny sizes, one device): every section runs
    or says why it skipped, the JSON and PNG are written, and the correctness checks pass."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accelerator_check.py"),
                           "--smoke", "--out", str(tmp_path),
                           "--budget-scale", "10"],   # a loaded machine skips nothing for time
                          env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert (tmp_path / "accelerator_check.png").stat().st_size > 0
    assert set(record["sections"]) == {"environment", "correctness", "training", "sampling",
                                       "time_to_quality"}
    checks = record["sections"]["correctness"]["checks"]
    assert checks and all(c["passed"] for c in checks if not c.get("skipped")), checks
    rows = record["sections"]["training"]["rows"]
    import importlib.util
    peer = {"torch_f32"} if importlib.util.find_spec("torch") else set()   # the [bench] extra
    assert {r["variant"] for r in rows if "step_s" in r} >= {"autodiff_f32", "custom_f32",
                                                              "custom_bf16"} | peer
    assert all(r["samples_per_s"] > 0 for r in rows if "step_s" in r)
    assert [r["rows"] for r in record["sections"]["sampling"]["rows"] if "jax_chars_per_s" in r]
    assert record["sections"]["time_to_quality"].get("val_last_loss") is not None
    assert "summary" in proc.stdout

"""The optional cuDNN backend, `model.backward="cudnn"`: CharLSTM's layers through
`jax.experimental.rnn.lstm` (cuDNN's fused LSTM kernels, forward and backward) on a CUDA GPU.

Parameters stay ours, so checkpoints have one format whatever the backend: every forward pass packs
them into cuDNN's flat weight vector (`pack_weights`, differentiable, so gradients flow back to our
parameters), and `unpack_weights` is its exact inverse. The packed layout is jax.experimental.rnn's
(PyTorch's nn.LSTM names): per layer W_ih (4H, I) then W_hh (4H, H), all layers' matrices first,
then per layer b_ih (4H,) and b_hh (4H,). Both libraries use our gate order i, f, g, o. Ours has one
bias; it goes to b_ih and b_hh is zero (unpacking adds them back). Packing costs one read and write
of the weights per step (3 layers x 1024 units: ~100 MB), small beside a step's recurrent GEMMs
(not measured here; benchmarks/ holds the measurements).

Layer 0 and the embedding: our first layer's input weights double as the embedding (tokens gather
rows of `layers[0].kernel_in`), but cuDNN takes dense inputs. We feed it the one-hot tokens
(B, T, V) with W_ih = kernel_in.T, which is the same product (exactly: one 1.0 per row). The cost
is cuDNN's input GEMM over all timesteps, (B*T, V) x (V, 4H), and its two backward GEMMs: V/H of
the recurrent FLOPs of that layer (V=57 at H=512: 11%; V=256 bytes at H=128: 2x) in large
GEMMs off the sequential path, plus a (B, T, V) one-hot and its cotangent in memory. The
alternatives are worse: gathering the projections ourselves and feeding cuDNN (B, T, 4H) with an
identity W_ih costs 4H/V times more input FLOPs, and running layer 0 outside cuDNN leaves
single-layer models (the Keras reference, LSTM(512)) with no cuDNN at all. PyTorch's nn.LSTM
baseline takes the same one-hot input, so throughput comparisons count the same work.

Where it applies (`check_supported`): a CUDA GPU whose jaxlib has the cuDNN RNN kernels, float32
compute and parameters (jax.experimental.rnn is float32-only; its TF32 use follows
`jax_default_matmul_precision` as our matmuls do), and one device per program: with no sharding
rule for the cuDNN call, a batch-sharded mesh would make XLA gather the whole batch onto every
device, so several GPUs need `parallel.mode="pmap"`. Dropout is ours, not cuDNN's: with dropout
active the layers run as separate cuDNN calls with our masks between them (the same masks as the
scan backends draw), without it all layers are one call. Sequence lengths are all T (int32) and
every size is a static Python int, so it traces under `jit` like the other backends.

Off a GPU the model computes the same function with the scan (`runs_cudnn()` is False), so a
cuDNN-trained checkpoint evaluates and samples anywhere; `emulated()` instead routes the cuDNN path
through `jax.experimental.rnn.lstm_ref` (pure JAX, same packed weights) to test it on a CPU.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

# (kernel_in (I, 4H), kernel_rec (H, 4H), bias (4H,)) for one layer
LayerParams = tuple[jax.Array, jax.Array, jax.Array]

_impl: Optional[Callable] = None   # set by `emulated()`; None = jax.experimental.rnn.lstm on GPU


# --- the weight conversion ---------------------------------------------------------------------

def pack_weights(layers: Sequence[LayerParams]) -> jax.Array:
    """Our layers -> cuDNN's flat float32 weight vector (jax.experimental.rnn layout)."""
    mats, biases = [], []
    for kernel_in, kernel_rec, bias in layers:
        mats += [kernel_in.T.reshape(-1), kernel_rec.T.reshape(-1)]
        biases += [bias.reshape(-1), jnp.zeros_like(bias).reshape(-1)]
    return jnp.concatenate(mats + biases).astype(jnp.float32)


def unpack_weights(weights: jax.Array, input_size: int, hidden_size: int,
                   num_layers: int) -> list[LayerParams]:
    """cuDNN's flat weights -> our layers (b_ih + b_hh as the one bias); inverts `pack_weights`
    exactly. Also imports weights trained by cuDNN elsewhere (e.g. PyTorch's nn.LSTM, i, f, g, o)."""
    from jax.experimental import rnn
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers,
                                                     False)
    # b_hh == 0 after pack_weights: keep b_ih's bits (x + 0.0 would turn -0.0 into +0.0)
    return [(w_ih[i].T, w_hh[i].T, jnp.where(b_hh[i] == 0, b_ih[i], b_ih[i] + b_hh[i]))
            for i in range(num_layers)]


def model_layers(model) -> list[LayerParams]:
    """A CharLSTM's layer parameters as (kernel_in, kernel_rec, bias) tuples."""
    return [(l.kernel_in[...], l.kernel_rec[...], l.bias[...]) for l in model.layers]


def num_params(input_size: int, hidden_size: int, num_layers: int) -> int:
    """Length of the flat weight vector (equals jax.experimental.rnn.get_num_params_in_lstm)."""
    h4 = 4 * hidden_size
    return (h4 * (input_size + hidden_size) + (num_layers - 1) * h4 * 2 * hidden_size
            + num_layers * 2 * h4)


# --- where it applies ----------------------------------------------------------------------------

def check_model_config(config) -> None:
    """The model-only conditions (no platform): float32 compute and parameters."""
    if config.dtype != "float32" or config.param_dtype != "float32":
        raise ValueError(
            f"model.backward='cudnn' needs model.dtype and model.param_dtype 'float32' (got "
            f"{config.dtype!r}, {config.param_dtype!r}): jax.experimental.rnn is float32-only; use "
            f"model.backward='custom' for bfloat16")


def kernels_available() -> bool:
    """True if this jaxlib has the CUDA cuDNN RNN kernels (the jax-cuda plugin's _rnn module).

    ROCm's MIOpen kernels do not count: they order the gates i, f, o, g, not our i, f, g, o.
    """
    try:
        from jax._src.lib import gpu_rnn
    except ImportError:
        return False
    if gpu_rnn is None or not hasattr(gpu_rnn, "compute_rnn_workspace_reserve_space_sizes"):
        return False
    if getattr(gpu_rnn, "_cuda_rnn", None) is not None:
        return True
    return getattr(gpu_rnn, "_hip_rnn", None) is None   # (attribute names of jaxlib 0.10)


def check_supported(model_config, platform: str, *, num_devices: int = 1,
                    parallel_mode: str = "mesh") -> None:
    """Raises ValueError (one line, with the fix) unless `model.backward="cudnn"` can train here.

    For train start-up, once JAX is up: `platform` is `jax.default_backend()`, `num_devices` the
    devices in the mesh, `parallel_mode` config.parallel.mode.
    """
    check_model_config(model_config)
    if platform not in ("gpu", "cuda"):
        raise ValueError(f"model.backward='cudnn' needs a CUDA GPU, but JAX runs on {platform}; "
                         f"use model.backward='custom' here")
    if not kernels_available():
        raise ValueError("model.backward='cudnn': this jaxlib has no cuDNN RNN kernels (install "
                         "the jax CUDA plugin, e.g. pip install 'jax[cuda13]'), or use "
                         "model.backward='custom'")
    if num_devices > 1 and parallel_mode != "pmap":
        raise ValueError(
            f"model.backward='cudnn' on a {num_devices}-device mesh: the cuDNN call has no "
            f"sharding rule, so XLA would gather the whole batch onto every device; use "
            f"--config.parallel.mode=pmap, --config.parallel.num_devices=1, or backward='custom'")


def resolve_backward(requested: str, *, dtype: str, param_dtype: str, platform: str,
                     num_devices: int = 1, parallel_mode: str = "mesh") -> tuple[str, str]:
    """(backward, why) for `model.backward="auto"`: cuDNN where `check_supported` passes (a CUDA
    GPU, float32, one device per program), else the hand-written BPTT ('custom', the fastest on
    CPU). Other values are returned as they are."""
    if requested != "auto":
        return requested, "as configured"
    import types
    try:
        check_supported(types.SimpleNamespace(dtype=dtype, param_dtype=param_dtype), platform,
                        num_devices=num_devices, parallel_mode=parallel_mode)
    except ValueError as e:
        return "custom", f"auto: custom, not cudnn ({e})"
    return "cudnn", "auto: cudnn (CUDA GPU, float32)"


def runs_cudnn() -> bool:
    """Whether the cuDNN path runs now: under `emulated()`, or on a GPU with the kernels."""
    return _impl is not None or (jax.default_backend() == "gpu" and kernels_available())


# --- the forward pass ----------------------------------------------------------------------------

def reference_lstm(x, h_0, c_0, weights, seq_lengths, input_size, hidden_size, num_layers,
                   dropout, bidirectional, precision=None):
    """`jax.experimental.rnn.lstm`'s signature over its pure-JAX reference `lstm_ref` (a scan,
    differentiated by JAX), with the same packed weights; runs on any platform."""
    from jax.experimental import rnn
    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers,
                                                     bidirectional)
    return rnn.lstm_ref(x, h_0, c_0, w_ih, w_hh, b_ih, b_hh, seq_lengths, input_size,
                        hidden_size, num_layers, dropout, bidirectional)


@contextlib.contextmanager
def emulated():
    """Within this block the cuDNN path runs through `reference_lstm` on any platform: for CPU
    tests of the conversion and wiring, not for speed. Functions traced inside keep it (jit cache)."""
    global _impl
    saved, _impl = _impl, reference_lstm
    try:
        yield
    finally:
        _impl = saved


def _lstm(x_BxTxI, h0_LxBxH, c0_LxBxH, layers: Sequence[LayerParams], hidden_size: int):
    """One cuDNN call over `layers` (all at once); returns (y (B, T, H), h_n, c_n)."""
    if _impl is None:
        from jax.experimental import rnn
        fn = rnn.lstm
    else:
        fn = _impl
    B, T, I = x_BxTxI.shape
    seq_lengths = jnp.full((B,), T, jnp.int32)
    return fn(x_BxTxI, h0_LxBxH, c0_LxBxH, pack_weights(layers), seq_lengths, int(I),
              int(hidden_size), len(layers), 0.0, False, None)


def forward(model, tokens_BxT: jax.Array, carry=None, *, dropout_key: Optional[jax.Array] = None,
            last_only: bool = False, return_carry: bool = False):
    """CharLSTM.__call__ through cuDNN; same arguments, results and dropout masks."""
    config = model.config
    B, T = tokens_BxT.shape
    if carry is None:
        carry = model.initial_carry(B)
    x = jax.nn.one_hot(tokens_BxT, config.vocab_size, dtype=jnp.float32)   # see the docstring
    h0 = jnp.stack([h for h, _ in carry]).astype(jnp.float32)
    c0 = jnp.stack([c for _, c in carry]).astype(jnp.float32)
    layers = model_layers(model)
    if dropout_key is None or config.dropout == 0:
        y, h_n, c_n = _lstm(x, h0, c0, layers, config.hidden_size)
        new_carry = tuple((h_n[i], c_n[i]) for i in range(len(layers)))
    else:
        keep = 1.0 - config.dropout
        new_carry = []
        for i, layer in enumerate(layers):
            y, h_n, c_n = _lstm(x, h0[i:i + 1], c0[i:i + 1], [layer], config.hidden_size)
            new_carry.append((h_n[0], c_n[0]))
            # the scan backends' mask, drawn time-major (T, B, H)
            mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, i), keep, (T, B, y.shape[-1]))
            y = jnp.where(jnp.swapaxes(mask, 0, 1), y / keep, 0.0)
            x = y
        new_carry = tuple(new_carry)
    logits = model.head(y[:, -1]) if last_only else model.head(y)
    return (logits, new_carry) if return_carry else logits

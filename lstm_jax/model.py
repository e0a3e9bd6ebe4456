"""CharLSTM: embedding gather -> stacked LSTM layers (each one `lax.scan`) -> linear head.

The first layer's input weights double as the embedding: a one-hot input times W_ih (the Keras reference's
formulation) is exactly a row gather of W_ih, so tokens index `layers[0].kernel_in` directly.
All gate matmuls are fused (one (., 4H) matrix per input), input projections for every timestep are
computed before the scan, and the head runs once over all timesteps after it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from lstm_jax import cudnn, recurrence

Carry = tuple[tuple[jax.Array, jax.Array], ...]  # one (h_BxH, c_BxH) per layer

BACKWARDS = ("auto", "native", "custom", "autodiff", "cudnn")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name_or_dtype) -> jnp.dtype:
    """Maps a config string ('float32', 'bfloat16') to a dtype; passes dtypes through."""
    if isinstance(name_or_dtype, str):
        if name_or_dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {name_or_dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[name_or_dtype]
    return jnp.dtype(name_or_dtype)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the parameter shapes and the forward computation."""
    vocab_size: int
    hidden_size: int = 128
    num_layers: int = 1
    dropout: float = 0.0
    keras_init: bool = False
    embed_scale: float = 0.0      # > 0: layer 0's input kernel (one row per character, that
                                  # character's embedding into the gates) drawn with this
                                  # standard deviation; 0: the layer's own init
    dtype: str = "float32"        # compute dtype of the matmuls (cell state stays float32)
    param_dtype: str = "float32"
    backward: str = "auto"        # auto (native on CPU where measured faster, else custom) | native
                                  # (lstm_jax.native) | custom (hand-written BPTT) | autodiff
                                  # (jax.grad of the scan) | cudnn (CUDA GPU; see lstm_jax.cudnn)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not self.embed_scale >= 0.0:
            raise ValueError(f"model.embed_scale must be >= 0 (0: the layer's own init), got "
                             f"{self.embed_scale}")
        as_dtype(self.dtype), as_dtype(self.param_dtype)
        if self.backward not in BACKWARDS:
            raise ValueError(f"model.backward must be one of {', '.join(BACKWARDS)}, got "
                             f"{self.backward!r}")
        if self.backward == "cudnn":
            cudnn.check_model_config(self)


class LSTMLayer(nnx.Module):
    """Parameters of one layer; the computation lives in `recurrence`."""

    def __init__(self, in_features: int, hidden_size: int, *, keras_init: bool, param_dtype,
                 rngs: nnx.Rngs, embed_scale: float = 0.0):
        h4 = 4 * hidden_size
        if keras_init:  # Keras LSTM: glorot_uniform kernel, orthogonal recurrent kernel
            kernel_init = nnx.initializers.glorot_uniform()
            rec_init = nnx.initializers.orthogonal()
        else:           # PyTorch-style U(-1/sqrt(H), 1/sqrt(H)) for both
            bound = hidden_size ** -0.5
            kernel_init = rec_init = _symmetric_uniform(bound)
        if embed_scale > 0:
            # One-hot input: one row feeds each step, so the fan-in that sets the scale is 1, not
            # in_features. With U(+-1/sqrt(H)) the gates barely see which character came in and
            # deep models sit at the unigram loss for hundreds of steps (benchmarks/README.md,
            # "Embedding scale"); a unit scale is what an nn.Embedding in front would give.
            kernel_init = _symmetric_uniform(embed_scale * 3 ** 0.5)   # std embed_scale
        self.kernel_in = nnx.Param(kernel_init(rngs.params(), (in_features, h4), param_dtype))
        self.kernel_rec = nnx.Param(rec_init(rngs.params(), (hidden_size, h4), param_dtype))
        # Forget-gate bias 1 (Keras unit_forget_bias=True; Jozefowicz et al. 2015) in both inits.
        bias = jnp.zeros((h4,), param_dtype).at[hidden_size:2 * hidden_size].set(1.0)
        self.bias = nnx.Param(bias)


def _symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class CharLSTM(nnx.Module):
    """Character-level LSTM language model.

    `model(tokens_BxT)` returns next-character logits (B, T, V) in float32; `model.step` advances
    one character for sampling.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = as_dtype(config.param_dtype)
        sizes = [config.vocab_size] + [config.hidden_size] * config.num_layers
        self.layers = nnx.List([
            LSTMLayer(sizes[i], config.hidden_size, keras_init=config.keras_init,
                      param_dtype=pdt, rngs=rngs,
                      embed_scale=config.embed_scale if i == 0 else 0.0)
            for i in range(config.num_layers)
        ])
        head_init = nnx.initializers.glorot_uniform() if config.keras_init else \
            _symmetric_uniform(config.hidden_size ** -0.5)
        self.head_kernel = nnx.Param(head_init(rngs.params(), (config.hidden_size, config.vocab_size), pdt))
        self.head_bias = nnx.Param(jnp.zeros((config.vocab_size,), pdt))

    @property
    def compute_dtype(self):
        return as_dtype(self.config.dtype)

    def initial_carry(self, batch_size: int) -> Carry:
        """Zero (h, c) for every layer, float32."""
        zeros = jnp.zeros((batch_size, self.config.hidden_size), jnp.float32)
        return tuple((zeros, zeros) for _ in range(self.config.num_layers))

    def head(self, h_xH: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        logits = jnp.dot(h_xH.astype(dt), self.head_kernel[...].astype(dt),
                         preferred_element_type=jnp.float32)
        return logits + self.head_bias[...].astype(jnp.float32)

    def __call__(self, tokens_BxT: jax.Array, carry: Optional[Carry] = None, *,
                 dropout_key: Optional[jax.Array] = None, last_only: bool = False,
                 return_carry: bool = False):
        """Logits for every position (B, T, V), or only the last one (B, V) if `last_only`.

        Dropout (between layers and before the head) is applied only when `dropout_key` is given.
        backward="cudnn" runs `cudnn.forward` where cuDNN is available, else the same function
        through the scan (so its checkpoints evaluate anywhere).
        """
        if self.config.backward == "cudnn" and cudnn.runs_cudnn():
            return cudnn.forward(self, tokens_BxT, carry, dropout_key=dropout_key,
                                 last_only=last_only, return_carry=return_carry)
        backward = "custom" if self.config.backward == "cudnn" else self.config.backward
        batch_size = tokens_BxT.shape[0]
        if carry is None:
            carry = self.initial_carry(batch_size)
        dt = self.compute_dtype
        new_carry = []
        x_TxBxH = None
        for i, layer in enumerate(self.layers):
            bias = layer.bias[...].astype(jnp.float32)
            if i == 0:  # one-hot @ W_ih == gather of W_ih's rows
                xproj = layer.kernel_in[...][tokens_BxT.T].astype(jnp.float32) + bias
            else:
                xproj = jnp.dot(x_TxBxH.astype(dt), layer.kernel_in[...].astype(dt),
                                preferred_element_type=jnp.float32) + bias
            layer_carry, x_TxBxH = recurrence.lstm_layer(xproj, layer.kernel_rec[...], carry[i], dt,
                                                         backward=backward)
            new_carry.append(layer_carry)
            if dropout_key is not None and self.config.dropout > 0:
                keep = 1.0 - self.config.dropout
                mask = jax.random.bernoulli(jax.random.fold_in(dropout_key, i), keep, x_TxBxH.shape)
                x_TxBxH = jnp.where(mask, x_TxBxH / keep, 0.0)
        T, B, H = x_TxBxH.shape
        if last_only:
            logits = self.head(x_TxBxH[-1])
        elif self.config.vocab_size > H:
            # Large vocabularies: the head on 2-D (B*T, H) rows in batch-major order. On the 3-D
            # (T, B, H) array XLA:CPU transposes the (T, B, V) logits for the (B, T, V) result
            # and their gradient for the weight gradient; here only the (T, B, H) input is
            # transposed, V/H times less data. Rows stay batch-major so that a batch sharded
            # over devices stays sharded (merging (T, B) into rows would make GSPMD gather it).
            x_BTxH = jnp.swapaxes(x_TxBxH, 0, 1).reshape(B * T, H)
            logits = self.head(x_BTxH).reshape(B, T, -1)
        else:
            logits = jnp.swapaxes(self.head(x_TxBxH), 0, 1)
        return (logits, tuple(new_carry)) if return_carry else logits

    def step(self, tokens_B: jax.Array, carry: Carry) -> tuple[jax.Array, Carry]:
        """One character for every row: logits (B, V) and the advanced carry. Used by the sampler."""
        dt = self.compute_dtype
        x = None
        new_carry = []
        for i, layer in enumerate(self.layers):
            h, c = carry[i]
            bias = layer.bias[...].astype(jnp.float32)
            if i == 0:
                xproj = layer.kernel_in[...][tokens_B].astype(jnp.float32) + bias
            else:
                xproj = jnp.dot(x.astype(dt), layer.kernel_in[...].astype(dt),
                                preferred_element_type=jnp.float32) + bias
            gates = xproj + recurrence.recurrent_gates(h, layer.kernel_rec[...], dt)
            h, c = recurrence.lstm_cell(gates, c)
            new_carry.append((h, c))
            x = h
        return self.head(x), tuple(new_carry)


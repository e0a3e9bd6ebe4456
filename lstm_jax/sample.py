"""The lax.scan sampler: thousands of samples per compiled call, O(1) work per character.

One jitted `lax.scan` carries the LSTM state over `prime + length` steps for a whole batch of rows.
At step t a row feeds its prime character while t < len(prime), else the character it drew at t-1;
its output is the draws from the last prime character on. Per-row temperature (0 = greedy), top-k
and top-p are traced arrays, so changing them, the seed or the prime text never recompiles.

Buckets (the only things that compile a new program):
  * steps: `len(longest prime) - 1 + length` rounded up to a multiple of STEP_BUCKET (64);
    asking for 400 and then 401 characters runs the same 448-step program.
  * rows per chunk: the next power of two >= num_samples (at least MIN_ROWS_PER_DEVICE per device),
    capped at `chunk_size`; larger requests run in chunks of exactly `chunk_size` rows.

Reproducibility: row i draws from fold_in(fold_in(key(seed), i), t), so its text depends only on
(seed, i, its prime, temperature, top-k, top-p), not on the batch, the chunking or the devices.
Bit-exactness across batch sizes needs the float math to be batch-size-independent too: XLA:CPU
picks a different matmul kernel below ~64 rows (its rounding differs in the last bit), hence the
MIN_ROWS_PER_DEVICE floor; a lone sample (num_samples=1) runs unpadded for speed and may in rare
draws differ from the same row generated inside a batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from typing import IO, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_jax import parallel

STEP_BUCKET = 64
MIN_ROWS_PER_DEVICE = 64
TRACE_COUNT = 0  # times `_generate` was traced; tests assert it compiles once per bucket

Primes = Union[None, str, Sequence[str]]


def _draw(logits_BxV, u_B, temperature_B, top_k_B, top_p_B, filtered):
    """Temperature/top-k/top-p categorical draw by inverse CDF (one uniform per row)."""
    greedy_B = temperature_B == 0
    scaled_BxV = logits_BxV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    probs_BxV = jnp.exp(scaled_BxV - scaled_BxV.max(-1, keepdims=True))  # unnormalised

    def threshold(probs_BxV):  # smallest probability each row keeps; 0 keeps all
        desc_BxV = -jnp.sort(-probs_BxV, axis=-1)
        cum_BxV = jnp.cumsum(desc_BxV, axis=-1)
        n_p = jnp.sum(cum_BxV - desc_BxV < top_p_B[:, None] * cum_BxV[:, -1:], -1)
        n = jnp.minimum(n_p, jnp.where(top_k_B > 0, top_k_B, probs_BxV.shape[-1]))
        thr_B = jnp.take_along_axis(desc_BxV, n[:, None] - 1, -1)[:, 0]
        return jnp.where((top_k_B > 0) | (top_p_B < 1), thr_B, 0.0)

    thr_B = jax.lax.cond(filtered, threshold, lambda p: jnp.zeros(p.shape[:1], p.dtype), probs_BxV)
    probs_BxV = jnp.where(probs_BxV >= thr_B[:, None], probs_BxV, 0.0)
    cdf_BxV = jnp.cumsum(probs_BxV, axis=-1)
    drawn_B = jnp.sum(cdf_BxV < (u_B * cdf_BxV[:, -1])[:, None], -1)
    drawn_B = jnp.minimum(drawn_B, logits_BxV.shape[-1] - 1)
    return jnp.where(greedy_B, jnp.argmax(logits_BxV, -1), drawn_B).astype(jnp.int32)


def _window_logits(model, window_BxW, valid_B):
    """Logits after re-running the LSTM from a zero state over the last `valid_B` window chars."""
    width = window_BxW.shape[1]

    def body(carry, xs):
        j, tok_B = xs
        logits, new = model.step(tok_B, carry)
        keep = (j >= width - valid_B)[:, None]
        return jax.tree.map(lambda n, c: jnp.where(keep, n, c), new, carry), logits

    _, logits_WxBxV = jax.lax.scan(body, model.initial_carry(window_BxW.shape[0]),
                                   (jnp.arange(width), window_BxW.T))
    return logits_WxBxV[-1]


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _generate(graphdef, params, prime_BxT, prime_len_B, temperature_B, top_k_B, top_p_B,
              row_index_B, seed, *, window: int = 0):
    """Draws (T, B) int32: step t's draw for every row. T = prime_BxT.shape[1] steps."""
    global TRACE_COUNT
    TRACE_COUNT += 1
    model = nnx.merge(graphdef, params)
    batch, num_steps = prime_BxT.shape
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_index_B)
    filtered = jnp.any((top_k_B > 0) | (top_p_B < 1))
    if window:
        state = (jnp.zeros((batch, window), jnp.int32), jnp.zeros((batch,), jnp.int32))
    else:
        state = model.initial_carry(batch)
    first_draw = prime_len_B.min() - 1  # no row needs logits before this step

    def body(carry, xs):
        state, prev_B = carry
        t, prime_B = xs
        tok_B = jnp.where(t < prime_len_B, prime_B, prev_B)
        if window:
            buf, valid = state
            state = (jnp.concatenate([buf[:, 1:], tok_B[:, None]], 1), jnp.minimum(valid + 1, window))
            logits = jax.lax.cond(t >= first_draw, lambda s: _window_logits(model, *s),
                                  lambda s: jnp.zeros((batch, model.config.vocab_size)), state)
        else:
            logits, state = model.step(tok_B, state)
        u_B = 1.0 - jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, t)))(row_keys)
        drawn_B = _draw(logits.astype(jnp.float32), u_B, temperature_B, top_k_B, top_p_B, filtered)
        return (state, drawn_B), drawn_B

    init = (state, jnp.zeros((batch,), jnp.int32))
    _, drawn_TxB = jax.lax.scan(body, init, (jnp.arange(num_steps), prime_BxT.T))
    return drawn_TxB

"""The sampler's draw: one token per row from its logits, at its temperature, within its top-k /
top-p set. Pure jnp, traced inside the sampler's scan (`lstm_jax.sample`) and the exported sampler
(`lstm_jax.export`).

The draw (`draw_kernel` picks one by vocabulary size and platform):
  * "cumsum": a two-level inverse CDF: the V probabilities in blocks of ~sqrt(V), a cumsum over the
    block sums, then a cumsum inside the chosen block. O(V) per row on every backend.
  * "unrolled": the V probabilities as V (B,) rows summed one by one. XLA:CPU fuses it into a
    single loop over the batch, the fastest kernel on CPU for small vocabularies; its program (and
    compile time) grows with V, so it is used only up to UNROLLED_MAX_VOCAB, and never on GPU/TPU.
  Filters: the top-k and top-p thresholds are found by bisection on the bits of the probabilities
  (31 passes over V each; no sort, no O(V^2) comparison), so ties are kept together.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

UNROLLED_MAX_VOCAB = 128  # CPU crossover (bench_sample.py crossover): above it the unrolled
                          # kernel loses at 64 rows and compiles 2-3x longer than cumsum
BISECTION_PASSES = 31     # the bits of a probability in [0, 1] span < 2**30 values


def draw_kernel(vocab_size: int, platform: str) -> str:
    """'unrolled' for vocabularies up to UNROLLED_MAX_VOCAB on CPU (measured faster there), else
    'cumsum' (any size, any backend)."""
    return "unrolled" if platform == "cpu" and vocab_size <= UNROLLED_MAX_VOCAB else "cumsum"


def draw_tokens(logits_BxV, u_B, temperature_B, top_k, top_p, *, kernel: str,
                filters: tuple[bool, bool]):
    """One token per row: the argmax where T == 0, else the inverse CDF at u in (0, 1] of
    softmax(logits / T) restricted to the top-k / top-p set; `filters` = (top-k on, top-p on)."""
    t_B = jnp.where(temperature_B == 0, 1.0, temperature_B)
    max_Bx1 = logits_BxV.max(1, keepdims=True)
    keep_BxV = None
    if any(filters):
        keep_BxV = keep_mask(jnp.exp((logits_BxV - max_Bx1) / t_B[:, None]), top_k, top_p, *filters)
    if kernel == "unrolled":
        drawn_B, argmax_B = _unrolled(logits_BxV, u_B, t_B, keep_BxV)
    else:
        drawn_B, argmax_B = _cumsum(logits_BxV, max_Bx1, u_B, t_B, keep_BxV)
    return jnp.where(temperature_B == 0, argmax_B, drawn_B)


def _cumsum(logits_BxV, max_Bx1, u_B, t_B, keep_BxV):
    """Two-level inverse CDF; returns (drawn, argmax). Subtracting the max keeps a tiny T finite.

    A cumsum of floats is not guaranteed monotone (XLA sums in a tree), so a draw that lands on a
    zero-probability entry (filtered out or underflowed) is replaced by the argmax: such a draw has
    a probability of about one ulp, and a filtered entry is never returned.
    """
    batch, vocab = logits_BxV.shape
    width = max(8, 1 << math.ceil(math.log2(math.sqrt(vocab))))   # chars per block
    blocks = -(-vocab // width)
    iota_V = jnp.arange(vocab, dtype=jnp.int32)
    argmax_B = jnp.min(jnp.where(logits_BxV == max_Bx1, iota_V, vocab), 1)  # first max, one pass
    p_BxV = jnp.exp((logits_BxV - max_Bx1) / t_B[:, None])
    if keep_BxV is not None:
        p_BxV = jnp.where(keep_BxV, p_BxV, 0.0)
    p_BxNxW = jnp.pad(p_BxV, ((0, 0), (0, blocks * width - vocab))).reshape(batch, blocks, width)
    mass_BxN = p_BxNxW.sum(2)
    cdf_BxN = jnp.cumsum(mass_BxN, 1)
    target_B = u_B * cdf_BxN[:, -1]
    block_B = jnp.minimum(jnp.sum(cdf_BxN < target_B[:, None], 1), blocks - 1)
    below_B = jnp.take_along_axis(cdf_BxN - mass_BxN, block_B[:, None], 1)[:, 0]
    inner_BxW = jnp.take_along_axis(p_BxNxW, block_B[:, None, None], 1)[:, 0]
    inner_cdf_BxW = below_B[:, None] + jnp.cumsum(inner_BxW, 1)
    col_B = jnp.minimum(jnp.sum(inner_cdf_BxW < target_B[:, None], 1), width - 1)
    positive_B = jnp.take_along_axis(inner_BxW, col_B[:, None], 1)[:, 0] > 0
    return jnp.where(positive_B, block_B * width + col_B, argmax_B), argmax_B


def _unrolled(logits_BxV, u_B, t_B, keep_BxV):
    """Inverse CDF over V unrolled (B,) rows; returns (drawn, argmax).

    The CDF is a sequential sum, so it is monotone and a masked (zero) entry is never drawn.
    XLA:CPU fuses the V rows of the (V, B) transpose into one loop vectorised over the batch.
    """
    rows = list(logits_BxV.T)
    best_B, argmax_B = rows[0], jnp.zeros(t_B.shape, jnp.int32)
    for j, row in enumerate(rows[1:], 1):
        better_B = row > best_B
        best_B, argmax_B = jnp.where(better_B, row, best_B), jnp.where(better_B, j, argmax_B)
    keep_VxB = keep_BxV.T if keep_BxV is not None else [None] * len(rows)
    total_B, cdf = jnp.zeros_like(u_B), []
    for row, keep_B in zip(rows, keep_VxB):
        p_B = jnp.exp((row - best_B) / t_B)
        total_B = total_B + (p_B if keep_B is None else jnp.where(keep_B, p_B, 0.0))
        cdf.append(total_B)
    drawn_B = sum((c_B < u_B * total_B).astype(jnp.int32) for c_B in cdf)
    return jnp.minimum(drawn_B, len(rows) - 1), argmax_B


def keep_mask(p_BxV, top_k, top_p, use_top_k: bool, use_top_p: bool):
    """Keep mask: the top_k most likely entries within the smallest most-likely set holding top_p of
    the mass, ties kept together (entry j is kept when fewer than top_k entries are more likely and
    those hold less than top_p). The two thresholds are found by bisection over the bits of p
    (p >= 0, so integer order is float order): BISECTION_PASSES masked counts or sums over V each,
    compared as floats (faster than as integers on CPU; each pass streams p from memory).
    """
    as_float = functools.partial(jax.lax.bitcast_convert_type, new_dtype=jnp.float32)
    top_B = jax.lax.bitcast_convert_type(p_BxV.max(1), jnp.int32)
    keep_BxV = jnp.ones(p_BxV.shape, bool)
    if use_top_k:  # the largest threshold with at least k entries at or above it: the k-th largest
        def halve_k(_, bounds):
            lo_B, hi_B = bounds
            mid_B = lo_B + (hi_B - lo_B + 1) // 2
            enough_B = jnp.sum(p_BxV >= as_float(mid_B)[:, None], 1) >= top_k
            return jnp.where(enough_B, mid_B, lo_B), jnp.where(enough_B, hi_B, mid_B - 1)
        kth_B, _ = jax.lax.fori_loop(0, BISECTION_PASSES, halve_k, (jnp.zeros_like(top_B), top_B))
        keep_BxV &= p_BxV >= as_float(kth_B)[:, None]
    if use_top_p:  # the smallest threshold whose strictly-above mass is below top_p of the total
        target_B = top_p * p_BxV.sum(1)

        def halve_p(_, bounds):
            lo_B, hi_B = bounds
            mid_B = lo_B + (hi_B - lo_B) // 2
            small_B = jnp.sum(jnp.where(p_BxV > as_float(mid_B)[:, None], p_BxV, 0.0), 1) < target_B
            return jnp.where(small_B, lo_B, mid_B), jnp.where(small_B, mid_B, hi_B)
        # From (0, top): the mass above 0 is the total (>= target), above the max none (< target).
        _, least_B = jax.lax.fori_loop(0, BISECTION_PASSES, halve_p, (jnp.zeros_like(top_B), top_B))
        keep_BxV &= p_BxV >= as_float(least_B)[:, None]
    return keep_BxV

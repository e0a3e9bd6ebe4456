"""The lax.scan sampler: thousands of samples per compiled call, O(1) work per character.

One jitted `lax.scan` carries the LSTM state over `prime + length` steps for a whole batch of rows.
At step t a row feeds its prime character while t < len(prime), else the character it drew at t-1;
its text is what it draws from its last prime character on (the prime itself is not repeated).
Temperature (per row, 0 = greedy), top-k and top-p are traced arrays: changing them, the seed or the
prime text never recompiles. An empty prime starts from '\n' (else ' ', else vocabulary index 0).

Buckets (only a new bucket compiles a new program):
  * steps: `len(longest prime) - 1 + length` rounded up to a multiple of STEP_BUCKET (64): 400 and
    401 characters both run the 448-step program;
  * rows per call (`rows_per_call`): one per device for a single sample; otherwise the next power
    of two >= num_samples, at least MIN_ROWS (64) per device, at most `chunk_size` (default
    DEFAULT_CHUNK = 1024, the fastest on a 2-core CPU). Larger requests run in chunks of exactly
    that many rows, split over the mesh's 'data' axis, the next chunk running while the host
    decodes the previous one.

Reproducibility: row i's uniform at step t comes from fold_in(fold_in(key(seed), i), t), so its text
depends only on (seed, i, its prime, temperature, top-k, top-p), not on chunking or devices.
Bit-exact equality also needs batch-size-independent float math: XLA:CPU switches matmul kernels
below ~64 rows (the last bit differs), hence the MIN_ROWS floor. A lone sample runs unpadded for
speed and can, in rare draws, differ from the same row drawn in a batch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_jax import parallel

STEP_BUCKET = 64
MIN_ROWS = 64
DEFAULT_CHUNK = 1024
TRACE_COUNT = 0  # times `_generate` was traced; the compile-once test reads it

Prime = Union[None, str, Sequence[str]]


def _draw(logits_BxV, u_B, temperature_B, top_k, top_p):
    """Greedy (T == 0) or temperature/top-k/top-p draw by inverse CDF, one uniform u in (0, 1] per row.

    The CDF is a sequential sum, so it is monotone and a masked (zero) entry is never drawn.
    """
    t_B = jnp.where(temperature_B == 0, 1.0, temperature_B)
    # The filter branch recomputes the probabilities from the logits: handing it `probs` stacked
    # would materialise a (V, B) array on every step, also when no filter is set (the default).
    keep_VxB = jax.lax.cond((top_k > 0) | (top_p < 1), _top_k_top_p,
                            lambda l, t, k, p: jnp.ones(l.shape[::-1], bool), logits_BxV, t_B, top_k, top_p)
    probs, argmax_B = _probs(logits_BxV, t_B)
    total_B, cdf = jnp.zeros_like(u_B), []
    for keep_B, p_B in zip(keep_VxB, probs):
        total_B = total_B + jnp.where(keep_B, p_B, 0.0)
        cdf.append(total_B)
    drawn_B = sum((c_B < u_B * total_B).astype(jnp.int32) for c_B in cdf)
    return jnp.where(temperature_B == 0, argmax_B, jnp.minimum(drawn_B, len(cdf) - 1))


def _probs(logits_BxV, t_B):
    """exp((logits - max) / T) for each of the V chars, as V (B,) rows, and the argmax.

    Subtracting the max first keeps a tiny T finite (no inf - inf). Unrolled over the V rows of the
    (V, B) transpose: XLA:CPU fuses it into one loop vectorised over the batch (its reductions over
    a short minor axis are ~10x slower).
    """
    rows = list(logits_BxV.T)
    best_B, argmax_B = rows[0], jnp.zeros(t_B.shape, jnp.int32)
    for j, row in enumerate(rows[1:], 1):
        better_B = row > best_B
        best_B, argmax_B = jnp.where(better_B, row, best_B), jnp.where(better_B, j, argmax_B)
    return [jnp.exp((row - best_B) / t_B) for row in rows], argmax_B


def _top_k_top_p(logits_BxV, t_B, top_k, top_p):
    """Keep mask (V, B): the k most likely chars (k <= 0: all) within the smallest set holding top_p
    of the mass; ties are kept together. O(V^2) comparisons: a sort per row is ~100x slower on CPU.
    """
    logits_VxB = logits_BxV.T
    probs_VxB = jnp.exp((logits_VxB - logits_VxB.max(0)) / t_B)
    rank_VxB = jnp.zeros(probs_VxB.shape, jnp.int32)  # how many chars are strictly more likely
    above_VxB = jnp.zeros_like(probs_VxB)             # and their total mass
    for p_B in probs_VxB:
        more_VxB = p_B > probs_VxB
        rank_VxB, above_VxB = rank_VxB + more_VxB, above_VxB + jnp.where(more_VxB, p_B, 0.0)
    total_B = functools.reduce(jnp.add, probs_VxB)
    return ((top_k <= 0) | (rank_VxB < top_k)) & ((top_p >= 1) | (above_VxB < top_p * total_B))


def _window_logits(model, window_BxW, valid_B):
    """Logits after running the LSTM from a zero state over the last `valid_B` chars of the window."""
    width = window_BxW.shape[1]

    def body(carry, xs):
        j, tok_B = xs
        logits_BxV, new = model.step(tok_B, carry)
        use = (j >= width - valid_B)[:, None]
        return jax.tree.map(lambda n, c: jnp.where(use, n, c), new, carry), logits_BxV

    _, logits_WxBxV = jax.lax.scan(body, model.initial_carry(window_BxW.shape[0]),
                                   (jnp.arange(width), window_BxW.T))
    return logits_WxBxV[-1]


@functools.partial(jax.jit, static_argnames=("graphdef", "window"))
def _generate(graphdef, params, prime_BxT, prime_len_B, temperature_B, first_row, seed, top_k,
              top_p, first_draw, *, window: int = 0):
    """Draws (T, B) int32 of rows first_row, first_row + 1, ... at every step t < T = prime_BxT.shape[1].

    Row arrays may be sharded over devices; scalars are replicated. first_draw (the first step whose
    draw any row keeps) comes from the host so that sharded rows never communicate (XLA:CPU
    collectives between in-process devices can deadlock). window=0: O(1) per step, the LSTM state
    is carried. window=W: the state is recomputed from zero over the last W input chars at every
    step (the seed's window semantics).
    """
    global TRACE_COUNT
    TRACE_COUNT += 1
    model = nnx.merge(graphdef, params)
    batch, num_steps = prime_BxT.shape
    # All uniforms up front (one vectorised hash; CPU's threefry is a rolled loop, slow per step).
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed),
                                                       first_row + jnp.arange(batch))
    step_keys = jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (None, 0))(
        row_keys, jnp.arange(num_steps))
    u_TxB = 1.0 - jax.vmap(jax.vmap(jax.random.uniform))(step_keys)  # in (0, 1]
    if window:
        state = (jnp.zeros((batch, window), jnp.int32), jnp.zeros((batch,), jnp.int32))
    else:
        state = model.initial_carry(batch)

    def body(carry, xs):
        state, prev_B = carry
        t, prime_B, u_B = xs
        tok_B = jnp.where(t < prime_len_B, prime_B, prev_B)
        if window:
            buf, valid = state
            state = (jnp.concatenate([buf[:, 1:], tok_B[:, None]], 1), jnp.minimum(valid + 1, window))
            logits_BxV = jax.lax.cond(
                t >= first_draw, lambda s: _window_logits(model, *s).astype(jnp.float32),
                lambda s: jnp.zeros((batch, model.config.vocab_size), jnp.float32), state)
        else:
            logits_BxV, state = model.step(tok_B, state)
        drawn_B = _draw(logits_BxV.astype(jnp.float32), u_B, temperature_B, top_k, top_p)
        return (state, drawn_B), drawn_B

    init = (state, jnp.zeros((batch,), jnp.int32))
    _, drawn_TxB = jax.lax.scan(body, init, (jnp.arange(num_steps), prime_BxT.T, u_TxB))
    return drawn_TxB


@dataclasses.dataclass
class Samples:
    """Generated rows: global row indices, texts (without their primes) and their tokens."""
    index: np.ndarray        # (N,) int64
    texts: list[str]
    tokens: np.ndarray       # (N, length) int32
    temperature: np.ndarray  # (N,) float64, as given
    prime: list[str]


class Sampler:
    """Holds a model split once (params replicated over the mesh) and the vocabulary's char table.

    `vocab` is anything with `.chars`, the characters in index order (e.g. `data.Vocab`).
    """

    def __init__(self, model: nnx.Module, vocab, *, mesh: Optional[jax.sharding.Mesh] = None):
        self.chars = list(vocab.chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        if len(self.chars) != model.config.vocab_size:
            raise ValueError(f"the vocabulary has {len(self.chars)} chars but the model "
                             f"{model.config.vocab_size}; load the vocab.json of the model's run")
        # Process-local devices: in a multi-process run every process samples its own copy.
        self.mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        self.graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, parallel.replicated(self.mesh))
        self.start = self.index.get("\n", self.index.get(" ", 0))
        self._codepoints = (np.array([ord(c) for c in self.chars], np.uint32)
                            if all(len(c) == 1 and c != "\0" for c in self.chars) else None)

    def encode(self, prime: str, unknown: str = "error") -> np.ndarray:
        """Prime text -> int32 ids; chars outside the vocabulary raise (or are dropped: unknown='drop')."""
        missing = sorted(set(prime) - self.index.keys())
        if missing and unknown != "drop":
            raise ValueError(f"prime {_short(prime)} has characters outside the vocabulary: "
                             f"{missing}; remove them or drop them (unknown='drop', --drop_unknown)")
        return np.array([self.index[c] for c in prime if c in self.index], np.int32)

    def decode(self, tokens_NxL: np.ndarray) -> list[str]:
        if self._codepoints is None:
            return ["".join(self.chars[i] for i in row) for row in tokens_NxL]
        length = tokens_NxL.shape[1]
        if length == 0:
            return [""] * len(tokens_NxL)
        codes = np.ascontiguousarray(self._codepoints[tokens_NxL])  # one UTF-32 string per row
        return codes.view(f"<U{length}")[:, 0].tolist()

    def iter_chunks(self, num_samples: int = 1, length: int = 400, *,
                    temperature: Union[float, Sequence[float]] = 1.0, top_k: int = 0,
                    top_p: float = 1.0, prime: Prime = None, seed: int = 0,
                    chunk_size: int = DEFAULT_CHUNK, unknown: str = "error", context: str = "state",
                    window: int = 60) -> Iterator[Samples]:
        """Yields the rows chunk by chunk (see `generate` for the arguments)."""
        temps = _check_args(num_samples, length, temperature, top_k, top_p, seed, chunk_size,
                            unknown, context, window)
        primes = [prime] if prime is None or isinstance(prime, str) else list(prime)
        if not primes or not all(p is None or isinstance(p, str) for p in primes):
            raise ValueError(f"prime must be None, a string, or a non-empty list of strings cycled "
                             f"over the rows; got {_short(repr(prime))}")
        prime_ids = [self.encode(p or "", unknown) for p in primes]
        prime_ids = [ids if len(ids) else np.array([self.start], np.int32) for ids in prime_ids]
        steps = _round_up(max(len(ids) for ids in prime_ids) - 1 + length, STEP_BUCKET)
        rows = rows_per_call(num_samples, chunk_size, self.mesh.devices.size)
        padded = np.zeros((len(prime_ids), steps), np.int32)
        for j, ids in enumerate(prime_ids):
            padded[j, :len(ids)] = ids
        lengths = np.array([len(ids) for ids in prime_ids], np.int32)
        pending = None
        for start in range(0, num_samples, rows):
            index = np.arange(start, start + rows)
            which = index % len(primes)
            row_args = (padded[which], lengths[which], np.array(temps, np.float32)[index % len(temps)])
            if self.mesh.devices.size > 1:  # else let jit place them: ~0.2 ms faster per call
                row_args = jax.device_put(row_args, parallel.data_sharded(self.mesh))
            drawn = _generate(self.graphdef, self.params, *row_args,
                              np.int32(start), np.uint32(seed), np.int32(top_k), np.float32(top_p),
                              np.int32(lengths[which].min() - 1),
                              window=window if context == "window" else 0)
            if pending is not None:  # fetch the previous chunk while this one runs
                yield self._collect(*pending)
            pending = (drawn, index[:num_samples - start], lengths[which], length, primes, temps)
        if pending is not None:
            yield self._collect(*pending)

    def _collect(self, drawn_TxB, index_B, prime_len_B, length, primes, temps) -> Samples:
        n = len(index_B)
        drawn_BxT = np.asarray(drawn_TxB).T[:n]
        tokens = np.take_along_axis(drawn_BxT, prime_len_B[:n, None] - 1 + np.arange(length), 1)
        return Samples(index_B, self.decode(tokens), tokens, np.asarray(temps)[index_B % len(temps)],
                       [primes[i % len(primes)] or "" for i in index_B])

    def generate(self, num_samples: int = 1, length: int = 400, **kwargs) -> Samples:
        chunks = list(self.iter_chunks(num_samples, length, **kwargs))
        if len(chunks) == 1:
            return chunks[0]
        return Samples(np.concatenate([c.index for c in chunks]),
                       [t for c in chunks for t in c.texts],
                       np.concatenate([c.tokens for c in chunks]),
                       np.concatenate([c.temperature for c in chunks]),
                       [p for c in chunks for p in c.prime])


def generate(model: nnx.Module, vocab, *, num_samples: int = 1, length: int = 400,
             temperature: Union[float, Sequence[float]] = 1.0, top_k: int = 0, top_p: float = 1.0,
             prime: Prime = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK, unknown: str = "error",
             context: str = "state", window: int = 60,
             mesh: Optional[jax.sharding.Mesh] = None) -> Samples:
    """Generates `num_samples` continuations of `length` characters each.

    temperature: one value or a list cycled over the rows (row i gets temperature[i % len]); 0 = greedy.
    top_k: keep the k most likely chars (0 = off). top_p: nucleus mass in (0, 1] (1 = off).
    prime: None/"" (start from '\\n'), one string for every row, or a list cycled over the rows.
    unknown: 'error' (list prime chars outside the vocabulary) or 'drop' them.
    context: 'state' (carry the LSTM state) or 'window' (re-run the last `window` chars for every
    new one, the seed's semantics for a model trained with the window objective).
    chunk_size: most rows per compiled call; bounds memory.
    """
    return Sampler(model, vocab, mesh=mesh).generate(
        num_samples, length, temperature=temperature, top_k=top_k, top_p=top_p, prime=prime,
        seed=seed, chunk_size=chunk_size, unknown=unknown, context=context, window=window)


def write_samples(model: nnx.Module, vocab, out: Optional[str] = None, *, num_samples: int = 1,
                  progress: bool = True, **kwargs) -> int:
    """Streams samples to `out` as JSONL ({index, temperature, prime, text}) chunk by chunk, or as
    plain text to stdout when `out` is None; a tqdm bar counts rows when there is more than one chunk.
    Takes `generate`'s keyword arguments; returns the number of rows written.
    """
    from tqdm import tqdm
    sampler = Sampler(model, vocab, mesh=kwargs.pop("mesh", None))
    chunks = sampler.iter_chunks(num_samples, **kwargs)
    rows = rows_per_call(num_samples, kwargs.get("chunk_size", DEFAULT_CHUNK), sampler.mesh.devices.size)
    f = open(out, "w", encoding="utf-8") if out else sys.stdout
    written = 0
    try:
        with tqdm(total=num_samples, unit="sample", file=sys.stderr,
                  disable=not progress or rows >= num_samples) as bar:
            for chunk in chunks:
                for i, t, p, text in zip(chunk.index, chunk.temperature, chunk.prime, chunk.texts):
                    if out:
                        f.write(json.dumps({"index": int(i), "temperature": float(t), "prime": p,
                                            "text": text}, ensure_ascii=False) + "\n")
                    else:
                        head = f"----- sample {i}, temperature {float(t):g}\n" if num_samples > 1 else ""
                        f.write(f"{head}{p}{text}\n")
                written += len(chunk.texts)
                f.flush()
                bar.update(len(chunk.texts))
    finally:
        if out:
            f.close()
    return written


def _check_args(num_samples, length, temperature, top_k, top_p, seed, chunk_size, unknown,
                context, window) -> list[float]:
    """Every bad argument raises ValueError naming the value and the fix; returns the temperatures."""
    for name, value, low in (("num_samples", num_samples, 1), ("length", length, 1),
                             ("chunk_size", chunk_size, 1), ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    temps = [temperature] if np.ndim(temperature) == 0 else list(temperature)
    if not temps:
        raise ValueError("temperature is an empty list; give at least one value, e.g. 1.0")
    for t in temps:
        if not isinstance(t, (int, float, np.number)) or isinstance(t, bool) or math.isnan(t):
            raise ValueError(f"temperature {t!r} is not a number; use 0 for greedy or a positive value")
        if math.isinf(t) or t < 0:
            raise ValueError(f"temperature {t!r} is {'infinite' if math.isinf(t) else 'negative'}; "
                             f"use 0 for greedy or a positive finite value")
    if not (isinstance(top_p, (int, float, np.number)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if unknown not in ("error", "drop"):
        raise ValueError(f"unknown must be 'error' or 'drop', got {unknown!r}")
    if context not in ("state", "window"):
        raise ValueError(f"context must be 'state' or 'window', got {context!r}")
    if context == "window" and not (isinstance(window, (int, np.integer)) and window >= 1):
        raise ValueError(f"window must be a positive integer with context='window', got {window!r}")
    return [float(t) for t in temps]


def rows_per_call(num_samples: int, chunk_size: int, devices: int = 1) -> int:
    """The batch bucket: one row per device for a single sample; else the next power of two
    >= num_samples, at least MIN_ROWS per device, at most chunk_size; a multiple of `devices`."""
    if num_samples == 1:
        return devices
    rows = max(MIN_ROWS * devices, 1 << (num_samples - 1).bit_length())
    return _round_up(min(rows, chunk_size), devices)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")

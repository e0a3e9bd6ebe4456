"""The sampler: thousands of rows per compiled program, O(1) work per character, any vocabulary.

A jitted block function advances a batch of rows S steps with one `lax.scan`, carrying the LSTM
state and the previous token; the host calls it block after block (the next block runs while the
host stores the previous one), so memory does not grow with the length and SIGINT/SIGTERM are
honoured between blocks. At step t a row feeds its prime character while t < len(prime), else the
character it drew at t - 1; its text is what it draws from its last prime character on (the prime
itself is not repeated). Temperature (per row, 0 = greedy), top-k and top-p are traced: changing
them, the seed or the prime never recompiles. Whether top-k and top-p are on at all is decided on
the host, so the default unfiltered program carries no filter code. An empty prime starts from
'\\n' (else ' ', else vocabulary index 0).

The draw itself (inverse CDF kernels, top-k / top-p filters) is `lstm_jax.draw`.

Shapes (only a new shape compiles a new program: one per (rows, steps per block, kernel, filters)):
  * rows per call (`rows_per_call`): one per device for a single sample; otherwise the next power
    of two >= num_samples, at least MIN_ROWS (64) per device, at most `chunk_size` (default
    DEFAULT_CHUNK = 1024). Larger requests run in chunks of exactly that many rows, split over the
    mesh's 'data' axis.
  * steps per block (`block_steps`): a short request runs in one block of `len(longest prime) - 1 +
    length` steps rounded up to STEP_BUCKET (64); a long one in equal blocks of at most MAX_BLOCK
    steps, fewer when the rows x vocabulary make a step costly (BLOCK_FLOPS bounds the work of one
    block, hence the time to honour a signal).

Vocabularies: a "chars" vocabulary maps each character to one token; prime characters outside it
are an error (or dropped). A "bytes" vocabulary (`data.Vocab.bytes()`) samples UTF-8 bytes: a prime
is encoded as its UTF-8 bytes (nothing is unknown), `length` counts bytes, and each finished row is
decoded once with errors="replace", so only an invalid or cut-off sequence becomes U+FFFD.

Reproducibility: row i's uniform at step t comes from fold_in(fold_in(key(seed), i), t), so its text
depends only on (seed, i, its prime, temperature, top-k, top-p), not on chunking, blocks or devices.
Bit-exact equality also needs batch-size-independent float math: XLA:CPU switches matmul kernels
below ~64 rows (the last bit differs), hence the MIN_ROWS floor. A lone sample runs unpadded for
speed and can, in rare draws, differ from the same row drawn in a batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lstm_jax import draw, parallel, signals

STEP_BUCKET = 64
MIN_ROWS = 64
DEFAULT_CHUNK = 1024
MAX_BLOCK = 1024          # most steps per block call
BLOCK_FLOPS = 1e11        # model FLOPs per block call: ~1 s on a 2-core CPU, far less on a GPU
CALL_FLOPS = 1e7          # the host overhead of one block call (~0.1 ms), in FLOPs of model work
MIN_STEP_FLOPS = 5e5      # what a step costs at the least, however small the model (loop overhead)

Prime = Union[None, str, Sequence[str]]


class SamplingInterrupted(Exception):
    """SIGINT or SIGTERM stopped sampling between blocks; `rows_done` rows were finished."""

    def __init__(self, message: str, signal_name: str, rows_done: int):
        super().__init__(message)
        self.signal_name, self.rows_done = signal_name, rows_done


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


class _HashedOnce:
    """A static jit argument hashed once: jit hashes static arguments at every call, and a GraphDef
    hashes its whole structure, a visible share of a 1-row call."""

    def __init__(self, value):
        self.value, self._hash = value, hash(value)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return other is self or (isinstance(other, _HashedOnce) and self._hash == other._hash
                                 and self.value == other.value)


@functools.partial(jax.jit, static_argnames=("graphdef", "kernel", "filters", "window", "rows"))
def _block(graphdef, params, carry, prime_BxS, prime_len_B, temperature_B, first_row, seed, top_k,
           top_p, t0, first_draw, *, kernel: str, filters: tuple[bool, bool], window: int,
           rows: jax.sharding.Sharding):
    """Steps t0 ... t0 + S - 1 (S = prime_BxS.shape[1]) of rows first_row, first_row + 1, ...

    carry = (model state, token drawn at the previous step); returns (carry, (B, S) int32 draws),
    both with the `rows` sharding, which the first block's carry is given too: every block then
    sees the same input shardings and reuses one program.
    prime_BxS holds each row's prime characters at these steps (anything past its prime). Row
    arrays may be sharded over devices; scalars are replicated. first_draw (the first step whose
    draw any row keeps) comes from the host so that sharded rows never communicate (XLA:CPU
    collectives between in-process devices can deadlock). window=0: O(1) per step, the LSTM state
    is carried. window=W: the state is recomputed from zero over the last W input chars at every
    step (the Keras reference's window semantics).
    """
    model = nnx.merge(graphdef.value, params)
    batch, num_steps = prime_BxS.shape
    steps_S = t0 + jnp.arange(num_steps)
    # This block's uniforms in one vectorised hash (CPU's threefry is a rolled loop, slow per step).
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed),
                                                       first_row + jnp.arange(batch))
    step_keys = jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (None, 0))(row_keys, steps_S)
    u_SxB = 1.0 - jax.vmap(jax.vmap(jax.random.uniform))(step_keys)  # in (0, 1]

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
        drawn_B = draw.draw_tokens(logits_BxV.astype(jnp.float32), u_B, temperature_B, top_k, top_p,
                                   kernel=kernel, filters=filters)
        return (state, drawn_B), drawn_B

    carry, drawn_SxB = jax.lax.scan(body, carry, (steps_S, prime_BxS.T, u_SxB))
    return jax.lax.with_sharding_constraint((carry, drawn_SxB.T), rows)


@dataclasses.dataclass
class Samples:
    """Generated rows: global row indices, texts (without their primes) and their tokens."""
    index: np.ndarray        # (N,) int64
    texts: list[str]
    tokens: np.ndarray       # (N, length) int32
    temperature: np.ndarray  # (N,) float64, as given
    prime: list[str]


@dataclasses.dataclass
class _Plan:
    """A validated request, with its shapes: what `_run` needs and nothing it must check again."""
    num_samples: int
    length: int
    primes: list[str]
    prime_BxP: np.ndarray    # (len(primes), longest) int32, zero-padded
    prime_len: np.ndarray    # (len(primes),) int32, >= 1
    temps: list[float]
    seed: int
    top_k: int
    top_p: float
    filters: tuple[bool, bool]
    window: int              # 0: carry the state
    rows: int                # rows per call
    block: int               # steps per block call
    num_blocks: int


class Sampler:
    """Holds a model split once (params replicated over the mesh) and the vocabulary.

    `vocab` is a `data.Vocab` (or anything with `.chars` in index order, and `.is_bytes`).
    `kernel` forces the draw kernel ('unrolled' | 'cumsum'); default `draw.draw_kernel(V, platform)`.
    """

    def __init__(self, model: nnx.Module, vocab, *, mesh: Optional[jax.sharding.Mesh] = None,
                 kernel: Optional[str] = None):
        self.chars = list(vocab.chars)
        self.is_bytes = bool(getattr(vocab, "is_bytes", False))
        self.index = {c: i for i, c in enumerate(self.chars)}
        if len(self.chars) != model.config.vocab_size:
            raise ValueError(f"the vocabulary has {len(self.chars)} chars but the model "
                             f"{model.config.vocab_size}; load the vocab.json of the model's run")
        # Process-local devices: in a multi-process run every process samples its own copy.
        self.mesh = mesh if mesh is not None else parallel.make_mesh(jax.local_devices())
        if kernel not in (None, "unrolled", "cumsum"):
            raise ValueError(f"kernel must be None, 'unrolled' or 'cumsum', got {kernel!r}")
        self.kernel = kernel or draw.draw_kernel(len(self.chars), self.mesh.devices.flat[0].platform)
        self.model = model
        graphdef, params = nnx.split(model)
        self.graphdef = _HashedOnce(graphdef)
        self.params = jax.device_put(params, parallel.replicated(self.mesh))
        self.start = self.index.get("\n", self.index.get(" ", 0))
        self._zero_carry: dict = {}
        self._codepoints = (np.array([ord(c) for c in self.chars], np.uint32)
                            if not self.is_bytes and "\0" not in self.index else None)

    def encode(self, prime: str, unknown: str = "error") -> np.ndarray:
        """Prime text -> int32 ids: its UTF-8 bytes for a byte vocabulary; else its chars, where
        chars outside the vocabulary raise (or are dropped: unknown='drop')."""
        if self.is_bytes:
            return np.frombuffer(prime.encode("utf-8"), np.uint8).astype(np.int32)
        missing = sorted(set(prime) - self.index.keys())
        if missing and unknown != "drop":
            raise ValueError(f"prime {_short(prime)} has characters outside the vocabulary: "
                             f"{missing}; remove them or drop them (unknown='drop', --drop_unknown)")
        return np.array([self.index[c] for c in prime if c in self.index], np.int32)

    def decode(self, tokens_NxL: np.ndarray) -> list[str]:
        """Token rows -> strings (a byte row is decoded as a whole, invalid sequences replaced)."""
        if self.is_bytes:
            return [row.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
                    for row in tokens_NxL]
        if self._codepoints is None:  # a '\0' char: the UTF-32 view below would strip it
            return ["".join(self.chars[i] for i in row) for row in tokens_NxL]
        length = tokens_NxL.shape[1]
        if length == 0:
            return [""] * len(tokens_NxL)
        codes = np.ascontiguousarray(self._codepoints[tokens_NxL])  # one UTF-32 string per row
        return codes.view(f"<U{length}")[:, 0].tolist()

    def plan(self, num_samples: int = 1, length: int = 400, *,
             temperature: Union[float, Sequence[float]] = 1.0, top_k: int = 0, top_p: float = 1.0,
             prime: Prime = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK,
             unknown: str = "error", context: str = "state", window: int = 60) -> _Plan:
        """Checks every argument (ValueError naming the value and the fix) and fixes the shapes."""
        temps = _check_args(num_samples, length, temperature, top_k, top_p, seed, chunk_size,
                            unknown, context, window)
        primes = [prime] if prime is None or isinstance(prime, str) else list(prime)
        if not primes or not all(p is None or isinstance(p, str) for p in primes):
            raise ValueError(f"prime must be None, a string, or a non-empty list of strings cycled "
                             f"over the rows; got {_short(repr(prime))}")
        prime_ids = [self.encode(p or "", unknown) for p in primes]
        prime_ids = [ids if len(ids) else np.array([self.start], np.int32) for ids in prime_ids]
        lengths = np.array([len(ids) for ids in prime_ids], np.int32)
        prime_BxP = np.zeros((len(prime_ids), lengths.max()), np.int32)
        for j, ids in enumerate(prime_ids):
            prime_BxP[j, :len(ids)] = ids
        vocab = len(self.chars)
        top_k = 0 if top_k >= vocab else int(top_k)   # k >= V keeps every char: off
        window = window if context == "window" else 0
        rows = rows_per_call(num_samples, chunk_size, self.mesh.devices.size)
        c = self.model.config
        flops = 2 * c.hidden_size * (8 * c.hidden_size * c.num_layers + vocab) * max(window, 1)
        block = block_steps(int(lengths.max()) - 1 + length, rows * flops)
        return _Plan(num_samples, length, [p or "" for p in primes], prime_BxP, lengths, temps,
                     int(seed), top_k, float(top_p), (top_k > 0, top_p < 1), window, rows, block,
                     -(-(int(lengths.max()) - 1 + length) // block))

    def iter_chunks(self, num_samples: int = 1, length: int = 400, **kwargs) -> Iterator[Samples]:
        """Checks the arguments now, then yields the rows chunk by chunk as they finish (see
        `generate` for the arguments). Raises SamplingInterrupted on SIGINT/SIGTERM."""
        return self.run(self.plan(num_samples, length, **kwargs))

    def run(self, plan: _Plan) -> Iterator[Samples]:
        """Yields the planned rows chunk by chunk. Each block call is dispatched before the previous
        one's tokens are fetched, so the device never waits for the host; SIGINT/SIGTERM are
        checked before every block (`signals.StopSignals`)."""
        sharded = self.mesh.devices.size > 1   # else let jit place host arrays: faster per call
        put = (lambda x: jax.device_put(x, parallel.data_sharded(self.mesh))) if sharded else (lambda x: x)
        done, in_flight = 0, None
        with signals.StopSignals(once=True) as stop:
            for first in range(0, plan.num_samples, plan.rows):
                chunk = _Chunk(self, plan, first, put)
                for b in range(plan.num_blocks):
                    if stop.signal_name:
                        raise SamplingInterrupted(
                            f"sampling interrupted by {stop.signal_name} after {done:,} of "
                            f"{plan.num_samples:,} rows", stop.signal_name, done)
                    drawn_BxS = chunk.dispatch(b)
                    if in_flight is not None:
                        finished = in_flight[0].store(*in_flight[1:])
                        if finished is not None:
                            done += len(finished.texts)
                            yield finished
                    in_flight = (chunk, b, drawn_BxS)
            if in_flight is not None:
                yield in_flight[0].store(*in_flight[1:])

    def initial_carry(self, rows: int, window: int):
        """(sharding of row arrays, zero carry placed with it), cached: the carry every block
        returns has that sharding, so jit reuses one program. One device reports all outputs as
        replicated, hence replicated there."""
        if (rows, window) not in self._zero_carry:
            mesh = self.mesh
            sharding = parallel.data_sharded(mesh) if mesh.devices.size > 1 else parallel.replicated(mesh)
            if window:
                state = (np.zeros((rows, window), np.int32), np.zeros((rows,), np.int32))
            else:  # zeros built on the host: no device round trip
                shapes = jax.eval_shape(lambda: self.model.initial_carry(rows))
                state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
            carry = jax.device_put((state, np.zeros((rows,), np.int32)), sharding)
            self._zero_carry[(rows, window)] = (sharding, carry)
        return self._zero_carry[(rows, window)]

    def generate(self, num_samples: int = 1, length: int = 400, **kwargs) -> Samples:
        chunks = list(self.iter_chunks(num_samples, length, **kwargs))
        if len(chunks) == 1:
            return chunks[0]
        return Samples(np.concatenate([c.index for c in chunks]),
                       [t for c in chunks for t in c.texts],
                       np.concatenate([c.tokens for c in chunks]),
                       np.concatenate([c.temperature for c in chunks]),
                       [p for c in chunks for p in c.prime])


class _Chunk:
    """One chunk of rows in flight: its row arrays, its carry on the device, its tokens on the host."""

    def __init__(self, sampler: Sampler, plan: _Plan, first: int, put):
        self.sampler, self.plan, self.first, self.put = sampler, plan, first, put
        rows = plan.rows
        self.index = np.arange(first, min(first + rows, plan.num_samples))
        which = np.arange(first, first + rows) % len(plan.primes)
        self.primes, self.prime_len = plan.prime_BxP[which], plan.prime_len[which]
        temps = np.array(plan.temps, np.float32)[np.arange(first, first + rows) % len(plan.temps)]
        self.row_sharding, self.carry = sampler.initial_carry(rows, plan.window)
        self.row_args = put((self.prime_len, temps))
        self.scalars = (np.int32(first), np.uint32(plan.seed), np.int32(plan.top_k),
                        np.float32(plan.top_p))
        self.first_draw = np.int32(self.prime_len.min() - 1)
        self.drawn_NxT = np.empty((len(self.index), plan.num_blocks * plan.block), np.int32)

    def dispatch(self, b: int) -> jax.Array:
        """Starts block b (asynchronously); returns its (B, S) draws, still on the device."""
        s = self.plan.block
        prime_BxS = np.zeros((self.plan.rows, s), np.int32)
        prime_BxS[:, :max(0, self.primes.shape[1] - b * s)] = self.primes[:, b * s:(b + 1) * s]
        self.carry, drawn_BxS = _block(
            self.sampler.graphdef, self.sampler.params, self.carry, self.put(prime_BxS),
            *self.row_args, *self.scalars, np.int32(b * s), self.first_draw,
            kernel=self.sampler.kernel, filters=self.plan.filters, window=self.plan.window,
            rows=self.row_sharding)
        return drawn_BxS

    def store(self, b: int, drawn_BxS: jax.Array) -> Optional[Samples]:
        """Copies block b's draws to the host; after the last block, returns the finished rows."""
        s, n = self.plan.block, len(self.index)
        self.drawn_NxT[:, b * s:(b + 1) * s] = np.asarray(drawn_BxS)[:n]
        if b < self.plan.num_blocks - 1:
            return None
        plan = self.plan
        steps = self.prime_len[:n, None] - 1 + np.arange(plan.length)
        tokens = np.take_along_axis(self.drawn_NxT, steps, 1)
        return Samples(self.index, self.sampler.decode(tokens), tokens,
                       np.asarray(plan.temps)[self.index % len(plan.temps)],
                       [plan.primes[i % len(plan.primes)] for i in self.index])


def generate(model: nnx.Module, vocab, *, num_samples: int = 1, length: int = 400,
             temperature: Union[float, Sequence[float]] = 1.0, top_k: int = 0, top_p: float = 1.0,
             prime: Prime = None, seed: int = 0, chunk_size: int = DEFAULT_CHUNK, unknown: str = "error",
             context: str = "state", window: int = 60,
             mesh: Optional[jax.sharding.Mesh] = None) -> Samples:
    """Generates `num_samples` continuations of `length` tokens (characters, or bytes) each.

    temperature: one value or a list cycled over the rows (row i gets temperature[i % len]); 0 = greedy.
    top_k: keep the k most likely chars (0 or >= V = off). top_p: nucleus mass in (0, 1] (1 = off).
    prime: None/"" (start from '\\n'), one string for every row, or a list cycled over the rows.
    unknown: 'error' (list prime chars outside the vocabulary) or 'drop' them.
    context: 'state' (carry the LSTM state) or 'window' (re-run the last `window` chars for every
    new one, the Keras reference's semantics for a model trained with the window objective).
    chunk_size: most rows per compiled call; bounds memory.
    Raises SamplingInterrupted on SIGINT/SIGTERM (checked between blocks, within about a second).
    """
    return Sampler(model, vocab, mesh=mesh).generate(
        num_samples, length, temperature=temperature, top_k=top_k, top_p=top_p, prime=prime,
        seed=seed, chunk_size=chunk_size, unknown=unknown, context=context, window=window)


def block_steps(steps: int, flops_per_step: float) -> int:
    """Steps per block call for a request of `steps` steps whose every step costs `flops_per_step`
    (all rows). The cap: MAX_BLOCK steps, or fewer so that a block stays within BLOCK_FLOPS (a
    power of two, 1 at the least); a cap below STEP_BUCKET is the block itself. Under the cap, the
    multiple of STEP_BUCKET with the least cost = padded steps x step cost + calls x CALL_FLOPS:
    400 cheap steps run as one 448-step block, 400 costly ones (cap 256) as 7 blocks of 64, not 2
    of 256; 1,025 cheap steps as 2 blocks of 576, not 17 of 64.
    """
    cap = min(MAX_BLOCK, 1 << max(0, int(BLOCK_FLOPS // max(flops_per_step, 1)).bit_length() - 1))
    if cap < STEP_BUCKET:
        return cap
    step_cost = max(flops_per_step, MIN_STEP_FLOPS)
    return min(range(cap - cap % STEP_BUCKET, 0, -STEP_BUCKET),   # ties: the larger block
               key=lambda b: -(-steps // b) * (b * step_cost + CALL_FLOPS))


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

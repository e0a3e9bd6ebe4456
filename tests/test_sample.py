"""The sampler: exact outputs of injected models, draw statistics at V = 2 ... 5,000 for both draw
kernels, batch independence, compile-once, bounded memory, byte vocabularies, the Keras reference's window
semantics, the JSONL writer (output safety, interrupts), and every bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_jax import draw, parallel, sample
from lstm_jax.commands import sampling
from lstm_jax.data import Vocab
from lstm_jax.model import CharLSTM, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = Vocab(tuple("abcdefgh"))            # no '\n' or ' ': an empty prime starts from 'a'


@pytest.fixture(scope="module")
def one_device():
    return parallel.make_mesh(jax.devices()[:1])


def vocab_of(size: int) -> Vocab:
    """A sorted character vocabulary of `size` CJK ideographs."""
    return Vocab(tuple(chr(0x4E00 + i) for i in range(size)))


class NextChar(nnx.Module):
    """Always predicts the character after its input, cyclically."""

    def __init__(self, vocab_size: int):
        self.config = ModelConfig(vocab_size=vocab_size)
        self.unused = nnx.Param(jnp.zeros(()))

    def initial_carry(self, batch_size):
        return (jnp.zeros((batch_size, 1)),)

    def step(self, tokens_B, carry):
        v = self.config.vocab_size
        return jnp.where(jax.nn.one_hot((tokens_B + 1) % v, v) > 0, 0.0, -1e4), carry


class Bigram(nnx.Module):
    """Logits are the row of a fixed table picked by the input character."""

    def __init__(self, table_VxV):
        self.config = ModelConfig(vocab_size=len(table_VxV))
        self.table = nnx.Param(jnp.asarray(table_VxV, jnp.float32))

    def initial_carry(self, batch_size):
        return ()

    def step(self, tokens_B, carry):
        return self.table[...][tokens_B], carry


class FixedLogits(nnx.Module):
    """The same logits at every step, whatever the input."""

    def __init__(self, logits_V):
        self.config = ModelConfig(vocab_size=len(logits_V))
        self.logits = nnx.Param(jnp.asarray(logits_V, jnp.float32))

    def initial_carry(self, batch_size):
        return ()

    def step(self, tokens_B, carry):
        return jnp.broadcast_to(self.logits[...], (len(tokens_B), self.config.vocab_size)), carry


class Script(nnx.Module):
    """Emits the tokens of a fixed script cyclically, counting its steps in the carry."""

    def __init__(self, tokens, vocab_size: int):
        self.config = ModelConfig(vocab_size=vocab_size)
        self.script = nnx.Param(jnp.asarray(tokens, jnp.int32))

    def initial_carry(self, batch_size):
        return (jnp.zeros((batch_size,), jnp.int32),)

    def step(self, tokens_B, carry):
        (t_B,) = carry
        script = self.script[...]
        nxt_B = script[t_B % len(script)]
        return jnp.where(jax.nn.one_hot(nxt_B, self.config.vocab_size) > 0, 0.0, -1e4), (t_B + 1,)


@pytest.fixture(params=["auto", "cumsum"])
def kernel(request, monkeypatch):
    """Runs a test with the kernel `draw_kernel` picks, then with the cumsum kernel forced."""
    if request.param != "auto":
        monkeypatch.setattr(draw, "draw_kernel", lambda vocab_size, platform: request.param)
    return request.param


@nnx.jit
def _logits(model, tokens_1xT):
    return model(tokens_1xT)


def next_greedy(model, tokens, width):
    """Argmax after `tokens` by the model's full forward pass from a zero state (right-padded to
    `width` so one compile serves every length: later positions cannot change earlier ones)."""
    padded = np.zeros((1, width), np.int32)
    padded[0, :len(tokens)] = tokens
    return int(jnp.argmax(_logits(model, jnp.asarray(padded))[0, len(tokens) - 1]))


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def reference_probs(logits, temperature, top_k=0, top_p=1.0):
    """softmax(logits / T) restricted to entry j when fewer than top_k entries are more likely and
    those hold less than top_p of the mass (ties kept together), renormalised. NumPy, float64."""
    probs = softmax(np.asarray(logits, np.float64) / temperature)
    more = probs[None, :] > probs[:, None]            # more[j, i]: i more likely than j
    keep = np.ones(len(probs), bool)
    if 0 < top_k < len(probs):
        keep &= more.sum(1) < top_k
    if top_p < 1:
        keep &= (more * probs[None, :]).sum(1) < top_p
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


def chi_square_quantile(df: int, q_z: float = 3.0902) -> float:
    """The 0.999 quantile of chi-square with `df` degrees of freedom (Wilson-Hilferty; within 3%
    of the exact value for df >= 1, on the lenient side)."""
    return df * (1 - 2 / (9 * df) + q_z * math.sqrt(2 / (9 * df))) ** 3


def assert_follows(counts, probs, bins: int = 40):
    """No draw outside the support, and a chi-square test at p = 0.001 over bins of about equal
    expected mass (so V = 5,000 mostly tiny probabilities still have expected counts >= 5)."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew {counts[~support].sum()} outside the kept set"
    order = np.argsort(probs[support])
    c, p = counts[support][order], probs[support][order]
    edges = np.unique(np.searchsorted(np.cumsum(p), np.linspace(0, 1, bins + 1)[1:-1]))
    obs = np.array([s.sum() for s in np.split(c, edges) if len(s)])
    exp = np.array([s.sum() for s in np.split(p, edges) if len(s)]) * counts.sum()
    if len(obs) < 2:
        return
    stat = float(((obs - exp) ** 2 / exp).sum())
    assert stat < chi_square_quantile(len(obs) - 1), (stat, len(obs), obs[:10], exp[:10])


# --- exact outputs -------------------------------------------------------------------------------

def test_injected_next_char_model_gives_the_exact_strings(one_device):
    """Catches prime feeding, prime lengths within a batch, row order and the text offset."""
    primes = ["abc", "h", "", "gfedcba"]  # different lengths in one batch; "" starts from 'a'
    out = sample.generate(NextChar(8), LETTERS, num_samples=8, length=10, prime=primes,
                          temperature=[0.0, 0.2, 1.0, 1.2, 5.0], seed=3, mesh=one_device)
    expected = {"abc": "defghabcde", "h": "abcdefghab", "": "bcdefghabc", "gfedcba": "bcdefghabc"}
    assert out.texts == [expected[primes[i % 4]] for i in range(8)]
    assert out.prime == [primes[i % 4] for i in range(8)]
    assert out.index.tolist() == list(range(8))
    assert out.temperature.tolist() == pytest.approx([0.0, 0.2, 1.0, 1.2, 5.0, 0.0, 0.2, 1.0])
    assert out.tokens.shape == (8, 10) and out.tokens.dtype == np.int32
    assert LETTERS.decode(out.tokens[0]) == out.texts[0]


def test_an_empty_prime_starts_from_a_newline(one_device):
    vocab = Vocab(("\n", " ", "a", "b"))
    out = sample.generate(NextChar(4), vocab, num_samples=1, length=6, mesh=one_device)
    assert out.texts == [" ab\n a"]


def test_a_nul_char_takes_the_slow_decode_path(one_device):
    """Catches the fast UTF-32 decode being used with a '\\0' char (NumPy strips trailing NULs)."""
    vocab = Vocab(("\0", "a", "b"))
    out = sample.generate(NextChar(3), vocab, num_samples=2, length=5, prime=["a", "b"],
                          mesh=one_device)
    assert out.texts == ["b\0ab\0", "\0ab\0a"]


@pytest.mark.parametrize("vocab_size", [8, 300])
def test_greedy_is_the_argmax_chain(one_device, kernel, vocab_size):
    """Catches a greedy row that samples, a wrong argmax, or a NaN at a tiny T."""
    table = np.random.default_rng(0).normal(size=(vocab_size, vocab_size)) * 3
    vocab = LETTERS if vocab_size == 8 else vocab_of(vocab_size)
    primes = [vocab.chars[0], "".join(vocab.chars[i] for i in (2, 0, 1)), vocab.chars[7]]
    out = sample.generate(Bigram(table), vocab, num_samples=3, length=30, seed=7,
                          temperature=[0.0, 1e-30, 0.0],  # a tiny T is greedy too, never NaN
                          prime=primes, mesh=one_device)
    for prime, tokens in zip(primes, out.tokens):
        prev, expected = vocab.chars.index(prime[-1]), []
        for _ in range(30):
            prev = int(np.argmax(table[prev]))
            expected.append(prev)
        assert tokens.tolist() == expected


@pytest.mark.parametrize("vocab_size", [57, 5000])
def test_greedy_picks_the_first_of_tied_maxima(one_device, kernel, vocab_size):
    """T = 0 is jnp.argmax (the first maximum): catches a kernel that returns another one."""
    logits = fixed_logits(vocab_size)
    out = sample.generate(FixedLogits(logits), vocab_of(vocab_size), num_samples=3, length=20,
                          temperature=0.0, seed=1, mesh=one_device)
    assert (logits == logits.max()).sum() == 2
    assert (out.tokens == np.argmax(logits)).all()


def test_greedy_char_lstm_follows_its_own_full_forward_pass(one_device):
    """Catches state threading errors between steps and between blocks."""
    model = CharLSTM(ModelConfig(vocab_size=8, hidden_size=16), rngs=nnx.Rngs(1))
    out = sample.generate(model, LETTERS, num_samples=1, length=12, temperature=0.0,
                          prime="abcab", mesh=one_device)
    tokens = list(LETTERS.encode("abcab"))
    for _ in range(12):  # re-run the whole sequence each time: no state threading to get wrong
        tokens.append(next_greedy(model, tokens, 17))
    assert out.texts == [LETTERS.decode(tokens[5:])]


# --- draw statistics -----------------------------------------------------------------------------

def fixed_logits(vocab_size: int) -> np.ndarray:
    """Random logits with a tie at the 3rd-largest value (three entries) and at the 1st."""
    logits = np.random.default_rng(vocab_size).normal(size=vocab_size) * 1.5
    if vocab_size >= 8:
        order = np.argsort(-logits)
        logits[order[1]] = logits[order[0]]             # tied maxima
        logits[order[3:5]] = logits[order[2]]           # the 3rd-largest value three times
    return logits


@pytest.mark.parametrize("vocab_size", [2, 57, 300, 5000])
@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.6), (4, 0.9)])
def test_draws_follow_the_filtered_softmax(one_device, kernel, vocab_size, top_k, top_p):
    """Frequencies match softmax(logits / T) over the kept set, for both kernels: catches a wrong
    CDF (off-by-one block or column, missing temperature), top-k leaving the k best or splitting
    ties (k = 3 keeps five entries here), and a top-p set that is not the smallest holding p."""
    if kernel == "cumsum" and vocab_size > 57:
        pytest.skip("the automatic kernel is already cumsum")
    logits = fixed_logits(vocab_size)
    temps = [0.5, 1.3] if (top_k, top_p) == (0, 1.0) else [1.3]
    rows = 512 if vocab_size < 5000 or (top_k, top_p) == (0, 1.0) else 128
    out = sample.generate(FixedLogits(logits), vocab_of(vocab_size), num_samples=rows, length=100,
                          temperature=temps, top_k=top_k, top_p=top_p, seed=11, mesh=one_device)
    for t in temps:
        counts = np.bincount(out.tokens[out.temperature == t].ravel(), minlength=vocab_size)
        assert_follows(counts, reference_probs(logits, t, top_k, top_p))


@pytest.mark.parametrize("vocab_size", [8, 300])
def test_top_k_ties_stay_together_and_k_of_v_or_more_is_off(one_device, kernel, vocab_size):
    """Catches top-k dropping some of the entries tied at the k-th value, and top_k >= V filtering
    (or drawing differently from) anything: it must give exactly the unfiltered draws."""
    logits = np.full(vocab_size, -2.0)
    logits[[1, 4, 6]] = 1.0       # three-way tie at the 2nd largest value
    logits[3] = 2.0
    model, vocab = FixedLogits(logits), LETTERS if vocab_size == 8 else vocab_of(vocab_size)
    kwargs = dict(num_samples=64, length=100, temperature=1.0, seed=4, mesh=one_device)
    drawn = np.unique(sample.generate(model, vocab, top_k=2, **kwargs).tokens)
    assert drawn.tolist() == [1, 3, 4, 6]
    plain = sample.generate(model, vocab, **kwargs).tokens
    for k in (vocab_size, vocab_size + 5):
        np.testing.assert_array_equal(sample.generate(model, vocab, top_k=k, **kwargs).tokens, plain)
        plan = sample.Sampler(model, vocab, mesh=one_device).plan(64, 100, top_k=k)
        assert plan.filters == (False, False)   # no filter compiled in


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (4, 0.6)])
def test_filters_hold_for_every_context(one_device, top_k, top_p):
    """Catches a filter computed once per row instead of from each step's logits."""
    table = np.random.default_rng(1).normal(size=(8, 8)) * 2
    out = sample.generate(Bigram(table), LETTERS, num_samples=64, length=50, temperature=1.5,
                          top_k=top_k, top_p=top_p, prime="a", mesh=one_device)
    sequences = np.concatenate([np.zeros((64, 1), np.int32), out.tokens], 1)
    for prev, nxt in zip(sequences[:, :-1].ravel(), sequences[:, 1:].ravel()):
        assert reference_probs(table[prev], 1.5, top_k, top_p)[nxt] > 0


def test_draw_kernel_is_unrolled_only_for_small_vocabularies_on_cpu():
    """Catches the unrolled kernel (whose program grows with V) reaching large V or a GPU/TPU."""
    limit = draw.UNROLLED_MAX_VOCAB
    assert [draw.draw_kernel(v, "cpu") for v in (2, limit, limit + 1, 20_000)] == \
        ["unrolled", "unrolled", "cumsum", "cumsum"]
    for platform in ("gpu", "tpu"):
        assert {draw.draw_kernel(v, platform) for v in (2, 57, limit, 20_000)} == {"cumsum"}


# --- batch independence, sharding, compile-once, memory ------------------------------------------

BATCH_VOCAB = Vocab(tuple(sorted("\n abcdefghijklmnopqrstuvwxyz.,")))
BATCH_KWARGS = dict(num_samples=4096, length=40, temperature=[0.2, 0.5, 1.0, 1.2, 0.0],
                    prime=["the ", "", "a much longer prime.", "x"], seed=5)
BIG_KWARGS = dict(num_samples=1024, length=40, temperature=[0.7, 1.0, 0.0], seed=6)
EIGHT_DEVICES = f"""
import json, sys
sys.path.insert(0, {REPO!r})
import jax
from flax import nnx
from lstm_jax import sample
from lstm_jax.data import Vocab
from lstm_jax.model import CharLSTM, ModelConfig
assert jax.device_count() == 8
model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=128), rngs=nnx.Rngs(0))
out = sample.generate(model, Vocab(tuple({''.join(BATCH_VOCAB.chars)!r})), **{BATCH_KWARGS!r})
big = CharLSTM(ModelConfig(vocab_size=300, hidden_size=64), rngs=nnx.Rngs(1))
vocab = Vocab(tuple(chr(0x4E00 + i) for i in range(300)))
print(json.dumps([out.texts, sample.generate(big, vocab, **{BIG_KWARGS!r}).texts]))
"""


def test_rows_do_not_depend_on_chunks_or_devices(one_device):
    """4,096 rows in one call == four chunks of 1,024 == sharded over 8 devices, bit for bit, for
    the unrolled (V = 30) and the cumsum (V = 300) kernels: catches randomness tied to the batch
    position or the device, and float math that depends on the batch size."""
    model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=128), rngs=nnx.Rngs(0))
    one_call = sample.generate(model, BATCH_VOCAB, chunk_size=4096, mesh=one_device, **BATCH_KWARGS)
    chunked = sample.generate(model, BATCH_VOCAB, chunk_size=1024, mesh=one_device, **BATCH_KWARGS)
    big = CharLSTM(ModelConfig(vocab_size=300, hidden_size=64), rngs=nnx.Rngs(1))
    big_one = sample.generate(big, vocab_of(300), mesh=one_device, **BIG_KWARGS)
    big_chunked = sample.generate(big, vocab_of(300), chunk_size=256, mesh=one_device, **BIG_KWARGS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sharded, big_sharded = json.loads(run.stdout)
    assert len(set(one_call.texts)) > 3000  # real samples (the greedy rows repeat per prime)
    assert chunked.texts == one_call.texts
    assert sharded == one_call.texts
    assert len(set(big_one.texts)) > 600
    assert big_chunked.texts == big_one.texts
    assert big_sharded == big_one.texts


def test_first_rows_do_not_depend_on_how_many_rows_follow(one_device):
    model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=128), rngs=nnx.Rngs(0))
    kwargs = dict(length=30, temperature=[0.5, 1.0], prime="the ", seed=2, mesh=one_device)
    small = sample.generate(model, BATCH_VOCAB, num_samples=5, **kwargs)
    large = sample.generate(model, BATCH_VOCAB, num_samples=300, **kwargs)
    assert large.texts[:5] == small.texts
    other_seed = sample.generate(model, BATCH_VOCAB, num_samples=5, **{**kwargs, "seed": 3})
    assert other_seed.texts != small.texts


def test_rows_do_not_depend_on_the_block_size(one_device, monkeypatch):
    """Catches a block boundary that loses the carry, the previous token or the step count."""
    model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=32), rngs=nnx.Rngs(3))
    kwargs = dict(num_samples=70, length=300, temperature=[0.8, 0.0], prime=["the ", "a"],
                  seed=9, mesh=one_device)
    whole = sample.generate(model, BATCH_VOCAB, **kwargs)
    monkeypatch.setattr(sample, "MAX_BLOCK", 64)
    assert sample.Sampler(model, BATCH_VOCAB, mesh=one_device).plan(70, 300).num_blocks == 5
    assert sample.generate(model, BATCH_VOCAB, **kwargs).texts == whole.texts


@pytest.mark.parametrize("vocab_size", [8, 5000])
def test_compiles_once_per_bucket(one_device, vocab_size):
    """One program per (rows, block steps, filters) at small and large V, read from the jit cache:
    catches a length, temperature, prime, seed, k or p that recompiles, and top_k >= V or a
    filter that is off compiling a filtered program."""
    # hidden 24: no other test compiles this model (the cache is shared by equal graphdefs)
    model = CharLSTM(ModelConfig(vocab_size=vocab_size, hidden_size=24), rngs=nnx.Rngs(0))
    vocab = LETTERS if vocab_size == 8 else vocab_of(vocab_size)
    a, b = vocab.chars[0], vocab.chars[1] * 3 + vocab.chars[2]
    n = 400 if vocab_size == 8 else 40   # every length below needs 385-448 (or 1-64) steps
    calls = [dict(num_samples=4, length=n, temperature=1.0, prime=a, seed=0),
             dict(num_samples=4, length=n + 1, temperature=[0.2, 0.5, 1.0, 1.2], prime=b, seed=1),
             dict(num_samples=64, length=n - 10, temperature=0.7, top_k=vocab_size + 1, seed=3),
             dict(num_samples=50, length=n - 10, temperature=0.0, top_k=3, prime=[a, b], seed=2),
             dict(num_samples=64, length=n - 10, temperature=0.7, top_k=5, seed=3),
             dict(num_samples=64, length=n - 10, temperature=0.7, top_p=0.9, top_k=5, seed=3),
             dict(num_samples=60, length=n - 9, temperature=0.9, top_p=0.5, top_k=2, seed=4)]
    before = sample._block._cache_size()
    texts = [sample.generate(model, vocab, mesh=one_device, **kw).texts for kw in calls[:3]]
    assert sample._block._cache_size() - before == 1   # (64 rows, one block), no filter
    texts += [sample.generate(model, vocab, mesh=one_device, **kw).texts for kw in calls[3:]]
    # ... and with filters {top-k, top-k + top-p}
    assert sample._block._cache_size() - before == 3
    assert [(len(t), len(t[0])) for t in texts] == [(c["num_samples"], c["length"]) for c in calls]
    sample.generate(model, vocab, num_samples=4, length=n + 60, mesh=one_device)  # next bucket
    assert sample._block._cache_size() - before == 4


def _avals(jaxpr):
    """Every intermediate array shape in a jaxpr, sub-jaxprs (scan/cond bodies) included."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for sub in p if isinstance(p, (tuple, list)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _avals(inner)


def test_long_generations_run_in_bounded_blocks(one_device, monkeypatch):
    """100,000 chars x 4 rows run as blocks of at most MAX_BLOCK steps whose programs hold no
    array with a length-long axis: catches (T, B) uniforms or token buffers on the device."""
    calls = []
    real_block = sample._block

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real_block(*args, **kwargs)
    monkeypatch.setattr(sample, "_block", spy)
    length = 100_000
    out = sample.generate(NextChar(8), LETTERS, num_samples=4, length=length, prime="ab",
                          temperature=0.5, mesh=one_device)
    assert out.texts == ["".join(LETTERS.chars[(2 + j) % 8] for j in range(length))] * 4
    steps = {args[3].shape[1] for args, _ in calls}
    assert len(steps) == 1 and steps.pop() <= sample.MAX_BLOCK
    assert len(calls) == -(-(length + 1) // calls[0][0][3].shape[1])
    args, kwargs = calls[0]
    jaxpr = real_block.trace(*args, **kwargs).jaxpr.jaxpr
    biggest = max(max(shape, default=1) for shape in _avals(jaxpr))
    assert biggest <= sample.MAX_BLOCK


def test_block_steps_bound_the_work_of_one_call():
    """Catches blocks longer than MAX_BLOCK or heavier than BLOCK_FLOPS, and padding that costs
    more than the calls it saves (400 costly steps as 2 x 256 ran 14% slower than 7 x 64)."""
    assert sample.block_steps(401, 1e3) == 448                   # one block, as before blocks
    assert sample.block_steps(400, sample.BLOCK_FLOPS / 353) == 64   # 1,024 rows, V = 57
    assert sample.block_steps(1025, 1e3) == 576                  # not 17 blocks of 64
    for steps in (1025, 2100, 10**6):
        block = sample.block_steps(steps, 1e3)
        blocks = -(-steps // block)
        assert block <= sample.MAX_BLOCK and block % sample.STEP_BUCKET == 0
        assert blocks * block - steps < sample.STEP_BUCKET * blocks
    assert sample.block_steps(400, sample.BLOCK_FLOPS / 10) == 8
    assert sample.block_steps(400, sample.BLOCK_FLOPS * 3) == 1


# --- byte vocabularies ---------------------------------------------------------------------------

MIXED = "Grüße, мир! 日本語のテキスト 🙂 مرحبا\n"


def test_byte_vocabulary_round_trips_mixed_scripts(one_device):
    """Catches a prime encoded by code point (or refused as unknown) in a byte vocabulary."""
    sampler = sample.Sampler(NextChar(256), Vocab.bytes(), mesh=one_device)
    ids = sampler.encode(MIXED)
    assert ids.tolist() == list(MIXED.encode("utf-8"))
    assert sampler.decode(ids[None]) == [MIXED]


def test_byte_sampling_decodes_each_finished_row_as_utf8(one_device):
    """A model that spells MIXED in bytes gives MIXED back, and a row cut inside a character ends
    in one U+FFFD: catches per-byte decoding (chr of each byte) and replacement before the end."""
    data = MIXED.encode("utf-8")
    cut = len("Grüße, мир! 日".encode("utf-8")) + 1   # one byte into '本'
    model = Script(list(data), 256)
    out = sample.generate(model, Vocab.bytes(), num_samples=2, length=len(data), mesh=one_device)
    assert out.texts == [MIXED, MIXED]
    cut_out = sample.generate(model, Vocab.bytes(), num_samples=1, length=cut, mesh=one_device)
    assert cut_out.texts == ["Grüße, мир! 日\ufffd"]
    primed = sample.generate(NextChar(256), Vocab.bytes(), num_samples=1, length=3,
                             prime="日", mesh=one_device)  # e6 97 a5 -> a6 a7 a8: invalid
    assert primed.prime == ["日"] and primed.tokens.tolist() == [[0xA6, 0xA7, 0xA8]]
    assert primed.texts == ["\ufffd" * 3]


def test_random_bytes_decode_like_python(one_device):
    """Whatever bytes are drawn, each text is exactly bytes(row).decode('utf-8', 'replace')."""
    logits = np.zeros(256)
    logits[0x20:0x7F] = 2.0
    logits[0xC0:0xF0] = 1.0     # lead bytes, often followed by an invalid continuation
    out = sample.generate(FixedLogits(logits), Vocab.bytes(), num_samples=64, length=50, seed=1,
                          mesh=one_device)
    assert out.tokens.shape == (64, 50)
    assert out.texts == [bytes(row.tolist()).decode("utf-8", "replace") for row in out.tokens]
    assert any("\ufffd" in t for t in out.texts) and any(len(t) < 50 for t in out.texts)


# --- the Keras reference's window semantics -----------------------------------------------------------------

def test_window_context_reruns_the_last_window_for_every_char(one_device):
    model = CharLSTM(ModelConfig(vocab_size=8, hidden_size=16), rngs=nnx.Rngs(2))
    primes = ["abcdefgh", "ab"]  # longer and shorter than the window
    out = sample.generate(model, LETTERS, num_samples=2, length=10, temperature=0.0,
                          prime=primes, context="window", window=5, mesh=one_device)
    for prime, text in zip(primes, out.texts):
        tokens = list(LETTERS.encode(prime))
        for _ in range(10):
            tokens.append(next_greedy(model, tokens[-5:], 5))
        assert text == LETTERS.decode(tokens[len(prime):])
    stateful = sample.generate(model, LETTERS, num_samples=2, length=10, temperature=0.0,
                               prime=primes, mesh=one_device)
    assert stateful.texts != out.texts  # the window really forgets


# --- the CLI's writer ----------------------------------------------------------------------------

def test_write_samples_streams_jsonl_chunks(tmp_path, one_device):
    path = tmp_path / "samples.jsonl"
    n = sampling.write_samples(NextChar(8), LETTERS, str(path), num_samples=130, length=5,
                             temperature=[0.0, 1.0, 1.2], prime=["ab", "c"], chunk_size=64,
                             mesh=one_device)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 130 and [r["index"] for r in rows] == list(range(130))
    assert rows[4] == {"index": 4, "temperature": 1.0, "prime": "ab", "text": "cdefg"}
    assert [r["temperature"] for r in rows[:4]] == [0.0, 1.0, 1.2, 0.0]
    assert os.listdir(tmp_path) == ["samples.jsonl"]  # no temporary file left


def test_write_samples_prints_text_without_out(capsys, one_device):
    """The exact stdout: a header per sample only when there are several, then prime + text."""
    sampling.write_samples(NextChar(8), LETTERS, None, num_samples=2, length=3, prime="a",
                         temperature=[0.5, 1.0], mesh=one_device)
    assert capsys.readouterr().out == ("----- sample 0, temperature 0.5\nabcd\n"
                                       "----- sample 1, temperature 1\nabcd\n")
    sampling.write_samples(NextChar(8), LETTERS, None, num_samples=1, length=4, prime="g",
                         mesh=one_device)
    assert capsys.readouterr().out == "ghabc\n"


KEEP = '{"index": 0, "text": "keep me"}\n' * 1000


@pytest.mark.parametrize("kwargs", [dict(top_p=1.5), dict(prime="abZ"), dict(temperature=-1.0),
                                    dict(length=0), dict(context="window", window=0)])
def test_a_bad_argument_leaves_an_existing_out_untouched(tmp_path, one_device, kwargs):
    """Catches `out` being opened (truncated) before the arguments are checked (issue #11)."""
    path = tmp_path / "keep.jsonl"
    path.write_text(KEEP)
    with pytest.raises(ValueError):
        sampling.write_samples(NextChar(8), LETTERS, str(path), mesh=one_device,
                             **{"num_samples": 3, "length": 5, **kwargs})
    assert path.read_text() == KEEP and os.listdir(tmp_path) == ["keep.jsonl"]


def test_a_crash_while_sampling_leaves_an_existing_out_untouched(tmp_path, one_device, monkeypatch):
    """Catches writing into `out` itself (or renaming a partial file over it) on an error."""
    path = tmp_path / "keep.jsonl"
    path.write_text(KEEP)
    real_store, stored = sample._Chunk.store, []

    def failing_store(self, *args):
        stored.append(1)
        if len(stored) > 2:
            raise RuntimeError("disk on fire")
        return real_store(self, *args)
    monkeypatch.setattr(sample._Chunk, "store", failing_store)
    with pytest.raises(RuntimeError, match="disk on fire"):
        sampling.write_samples(NextChar(8), LETTERS, str(path), num_samples=256, length=5,
                             chunk_size=64, mesh=one_device)
    assert path.read_text() == KEEP and os.listdir(tmp_path) == ["keep.jsonl"]


def test_a_signal_stops_between_blocks_and_keeps_finished_rows(tmp_path, one_device, monkeypatch):
    """A SIGTERM during the third block call: write_samples renames the rows of the chunks already
    finished into `out`, raises SamplingInterrupted saying so, calls the handler installed before
    (a trainer's stop flag) and restores it. Catches an ignored signal, a lost partial result, and
    a trainer that never hears of the signal."""
    received = []

    def recorder(signum, frame):
        received.append(signum)
    previous = signal.signal(signal.SIGTERM, recorder)
    real_block, calls = sample._block, []

    def signalling_block(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return real_block(*args, **kwargs)
    monkeypatch.setattr(sample, "_block", signalling_block)
    monkeypatch.setattr(sample, "MAX_BLOCK", 64)  # 2 blocks per chunk
    path = tmp_path / "out.jsonl"
    path.write_text(KEEP)
    try:
        with pytest.raises(sample.SamplingInterrupted, match=r"SIGTERM after 64 of 640 rows; "
                           r".*out.jsonl holds the 64 finished rows") as e:
            sampling.write_samples(NextChar(8), LETTERS, str(path), num_samples=640, length=100,
                                 chunk_size=64, mesh=one_device)
        assert received == [signal.SIGTERM] and e.value.rows_done == 64
        assert len(calls) == 3  # stopped before the fourth block
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["index"] for r in rows] == list(range(64))
        assert os.listdir(tmp_path) == ["out.jsonl"]
        assert signal.getsignal(signal.SIGTERM) is recorder  # restored
        signal.raise_signal(signal.SIGTERM)
        assert received == [signal.SIGTERM] * 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sampling_in_a_thread_leaves_signals_alone(one_device):
    """signal.signal raises outside the main thread: catches the sampler failing there."""
    result = []
    thread = threading.Thread(target=lambda: result.append(sample.generate(
        NextChar(8), LETTERS, length=3, prime="a", mesh=one_device).texts))
    thread.start()
    thread.join(60)
    assert result == [["bcd"]]


INTERRUPTED_WRITER = f"""
import signal, sys
sys.path.insert(0, {REPO!r})
import jax.numpy as jnp
from flax import nnx
from lstm_jax import sample
from lstm_jax.commands import sampling
from lstm_jax.data import Vocab
from lstm_jax.model import ModelConfig

class NextChar(nnx.Module):
    def __init__(self):
        self.config = ModelConfig(vocab_size=8)
        self.unused = nnx.Param(jnp.zeros(()))
    def initial_carry(self, batch_size):
        return ()
    def step(self, tokens_B, carry):
        import jax
        return jnp.where(jax.nn.one_hot((tokens_B + 1) % 8, 8) > 0, 0.0, -1e4), carry

try:
    sampling.write_samples(NextChar(), Vocab(tuple("abcdefgh")), sys.argv[1], num_samples=64 * 10_000,
                         length=2_000, chunk_size=64, progress=False)
except sample.SamplingInterrupted as e:
    print(f"lstm-jax: {{e}}", file=sys.stderr)
    sys.exit(128 + signal.Signals[e.signal_name].value)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_real_signal_stops_the_writer_within_seconds(tmp_path, signum):
    """A subprocess writing 640,000 rows gets the signal once rows are streaming: it exits within
    5 s with one line on stderr and a valid JSONL `out` of whole chunks. Catches SIGTERM ignored
    (issue #12), a traceback, a truncated row and a lost file."""
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    # a shell's background job starts with SIGINT ignored, which the writer respects (nohup
    # semantics): the child restores Python's default handler first, so the test means the same
    # under any launcher
    code = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n" + INTERRUPTED_WRITER
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
            assert proc.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.05)
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - sent < 5
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], stderr
    assert f"{out} holds the" in lines[0]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) < 640_000 and len(rows) % 64 == 0
    assert [r["index"] for r in rows] == list(range(len(rows)))
    assert os.listdir(tmp_path) == ["out.jsonl"]


# --- bad input -----------------------------------------------------------------------------------

def test_unknown_prime_chars_are_listed_or_dropped(one_device):
    with pytest.raises(ValueError, match=r"outside the vocabulary: \['!', 'Z'\].*drop"):
        sample.generate(NextChar(8), LETTERS, prime="abZ!c", length=3, mesh=one_device)
    out = sample.generate(NextChar(8), LETTERS, prime="abZ!c", length=3, unknown="drop",
                          mesh=one_device)
    assert out.texts == ["def"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "negative; use 0 for greedy"),
    (dict(temperature=[0.5, float("nan")]), "not a number"),
    (dict(temperature=math.inf), "infinite"),
    (dict(temperature=[]), "empty list"),
    (dict(temperature="hot"), "not a number"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(num_samples=0), "num_samples must be an integer >= 1"),
    (dict(length=0), "length must be an integer >= 1"),
    (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(seed=2**32), r"seed must be an integer in \[0, 2\*\*32\)"),
    (dict(prime=[]), "prime must be None, a string, or a non-empty list of strings"),
    (dict(prime=["ok", 3]), "prime must be None, a string, or a non-empty list of strings"),
    (dict(unknown="ignore"), "unknown must be 'error' or 'drop'"),
    (dict(context="attention"), "context must be 'state' or 'window'"),
    (dict(context="window", window=0), "window must be a positive integer"),
])
def test_bad_inputs_raise_clear_errors(kwargs, match, one_device):
    with pytest.raises(ValueError, match=match):
        sample.generate(NextChar(8), LETTERS, mesh=one_device, **{"length": 3, **kwargs})


def test_bad_inputs_raise_before_any_work():
    """iter_chunks checks its arguments when called, not at the first row (a lazy generator would
    let write_samples open its output first)."""
    with pytest.raises(ValueError, match="top_p"):
        sample.Sampler(NextChar(8), LETTERS).iter_chunks(2, 5, top_p=2.0)


def test_a_vocabulary_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="vocabulary has 8 chars but the model 9"):
        sample.generate(NextChar(9), LETTERS, length=3)


def test_an_out_that_is_a_directory_is_refused_before_sampling(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        sampling.write_samples(NextChar(8), LETTERS, str(tmp_path), length=3)

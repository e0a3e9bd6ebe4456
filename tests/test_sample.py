"""The lax.scan sampler: exact outputs of injected models, draw statistics, batch independence,
compile-once, the seed's window semantics, the JSONL writer, and every bad input."""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lstm_jax import parallel, sample
from lstm_jax.data import Vocab
from lstm_jax.model import CharLSTM, ModelConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = Vocab(tuple("abcdefgh"))            # no '\n' or ' ': an empty prime starts from 'a'
CHI2_CRITICAL_P001 = {2: 13.82, 7: 24.32}     # chi-square quantile 0.999 by degrees of freedom


@pytest.fixture(scope="module")
def one_device():
    return parallel.make_mesh(jax.devices()[:1])


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


def chi_square(observed, probs):
    expected = observed.sum() * probs
    return float(((observed - expected) ** 2 / expected).sum())


# --- exact outputs -------------------------------------------------------------------------------

def test_injected_next_char_model_gives_the_exact_strings(one_device):
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


def test_greedy_is_the_argmax_chain(one_device):
    table = np.random.default_rng(0).normal(size=(8, 8)) * 3
    out = sample.generate(Bigram(table), LETTERS, num_samples=3, length=30, seed=7,
                          temperature=[0.0, 1e-30, 0.0],  # a tiny T is greedy too, never NaN
                          prime=["a", "cab", "h"], mesh=one_device)
    for prime, tokens in zip(["a", "cab", "h"], out.tokens):
        prev, expected = LETTERS.chars.index(prime[-1]), []
        for _ in range(30):
            prev = int(np.argmax(table[prev]))
            expected.append(prev)
        assert tokens.tolist() == expected


def test_greedy_char_lstm_follows_its_own_full_forward_pass(one_device):
    model = CharLSTM(ModelConfig(vocab_size=8, hidden_size=16), rngs=nnx.Rngs(1))
    out = sample.generate(model, LETTERS, num_samples=1, length=12, temperature=0.0,
                          prime="abcab", mesh=one_device)
    tokens = list(LETTERS.encode("abcab"))
    for _ in range(12):  # re-run the whole sequence each time: no state threading to get wrong
        tokens.append(next_greedy(model, tokens, 17))
    assert out.texts == [LETTERS.decode(tokens[5:])]


# --- draw statistics -----------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def draws(one_device, **kwargs):
    """Every generated char of a model whose logits are always LOGITS, by row temperature."""
    out = sample.generate(Bigram(np.tile(LOGITS, (8, 1))), LETTERS, num_samples=1024,
                          length=100, seed=11, mesh=one_device, **kwargs)
    return out.tokens, out.temperature


def test_draws_follow_softmax_of_logits_over_temperature(one_device):
    tokens, temps = draws(one_device, temperature=[0.5, 1.2])
    for t in (0.5, 1.2):
        counts = np.bincount(tokens[temps == t].ravel(), minlength=8)
        assert chi_square(counts, softmax(LOGITS / t)) < CHI2_CRITICAL_P001[7], (t, counts)


def test_top_k_never_leaves_the_k_best_and_renormalises(one_device):
    tokens, _ = draws(one_device, temperature=1.0, top_k=3)
    counts = np.bincount(tokens.ravel(), minlength=8)
    assert counts[3:].sum() == 0
    assert chi_square(counts[:3], softmax(LOGITS[:3])) < CHI2_CRITICAL_P001[2]


def test_top_p_keeps_the_smallest_nucleus(one_device):
    probs = softmax(LOGITS)  # cumulative 0.39, 0.63, 0.77, 0.86, ...: p=0.7 keeps the first three
    tokens, _ = draws(one_device, temperature=1.0, top_p=0.7)
    counts = np.bincount(tokens.ravel(), minlength=8)
    assert probs[:2].sum() < 0.7 <= probs[:3].sum() and counts[3:].sum() == 0
    assert chi_square(counts[:3], softmax(LOGITS[:3])) < CHI2_CRITICAL_P001[2]


@pytest.mark.parametrize("top_k, top_p", [(3, 1.0), (0, 0.5), (4, 0.6)])
def test_filters_hold_for_every_context(one_device, top_k, top_p):
    table = np.random.default_rng(1).normal(size=(8, 8)) * 2
    out = sample.generate(Bigram(table), LETTERS, num_samples=64, length=50, temperature=1.5,
                          top_k=top_k, top_p=top_p, prime="a", mesh=one_device)
    sequences = np.concatenate([np.zeros((64, 1), np.int32), out.tokens], 1)
    for prev, nxt in zip(sequences[:, :-1].ravel(), sequences[:, 1:].ravel()):
        probs = softmax(table[prev] / 1.5)
        order = np.argsort(-probs)
        nucleus = np.searchsorted(np.cumsum(probs[order]), top_p) + 1
        assert nxt in order[:min(nucleus, top_k or 8)]


# --- batch independence, sharding, compile-once ----------------------------------------------------

BATCH_VOCAB = Vocab(tuple("\n abcdefghijklmnopqrstuvwxyz.,"))
BATCH_KWARGS = dict(num_samples=4096, length=40, temperature=[0.2, 0.5, 1.0, 1.2, 0.0],
                    prime=["the ", "", "a much longer prime.", "x"], seed=5)
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
print(json.dumps(out.texts))
"""


def test_rows_do_not_depend_on_chunks_or_devices(one_device):
    """4,096 rows in one call == four chunks of 1,024 == sharded over 8 devices, bit for bit."""
    model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=128), rngs=nnx.Rngs(0))
    one_call = sample.generate(model, BATCH_VOCAB, chunk_size=4096, mesh=one_device, **BATCH_KWARGS)
    chunked = sample.generate(model, BATCH_VOCAB, chunk_size=1024, mesh=one_device, **BATCH_KWARGS)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", EIGHT_DEVICES], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    sharded = json.loads(run.stdout)
    assert len(set(one_call.texts)) > 3000  # real samples (the greedy rows repeat per prime)
    assert chunked.texts == one_call.texts
    assert sharded == one_call.texts


def test_first_rows_do_not_depend_on_how_many_rows_follow(one_device):
    model = CharLSTM(ModelConfig(vocab_size=30, hidden_size=128), rngs=nnx.Rngs(0))
    kwargs = dict(length=30, temperature=[0.5, 1.0], prime="the ", seed=2, mesh=one_device)
    small = sample.generate(model, BATCH_VOCAB, num_samples=5, **kwargs)
    large = sample.generate(model, BATCH_VOCAB, num_samples=300, **kwargs)
    assert large.texts[:5] == small.texts
    other_seed = sample.generate(model, BATCH_VOCAB, num_samples=5, **{**kwargs, "seed": 3})
    assert other_seed.texts != small.texts


def test_compiles_once_per_bucket(one_device):
    model = CharLSTM(ModelConfig(vocab_size=8, hidden_size=16), rngs=nnx.Rngs(0))
    calls = [dict(num_samples=4, length=400, temperature=1.0, prime="abc", seed=0),
             dict(num_samples=4, length=401, temperature=[0.2, 0.5, 1.0, 1.2], prime="hgf", seed=1),
             dict(num_samples=50, length=380, temperature=0.0, top_k=3, prime=["a", "bcdefgh"], seed=2),
             dict(num_samples=64, length=390, temperature=0.7, top_p=0.9, top_k=5, seed=3)]
    before = sample.TRACE_COUNT
    texts = [sample.generate(model, LETTERS, mesh=one_device, **kw).texts for kw in calls]
    assert sample.TRACE_COUNT - before == 1  # one (64 rows, 448 steps) program for all four
    assert [(len(t), len(t[0])) for t in texts] == [(4, 400), (4, 401), (50, 380), (64, 390)]
    sample.generate(model, LETTERS, num_samples=4, length=460, mesh=one_device)  # next bucket
    assert sample.TRACE_COUNT - before == 2


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
    n = sample.write_samples(NextChar(8), LETTERS, str(path), num_samples=130, length=5,
                             temperature=[0.0, 1.0, 1.2], prime=["ab", "c"], chunk_size=64,
                             mesh=one_device)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert n == 130 and [r["index"] for r in rows] == list(range(130))
    assert rows[4] == {"index": 4, "temperature": 1.0, "prime": "ab", "text": "cdefg"}
    assert [r["temperature"] for r in rows[:4]] == [0.0, 1.0, 1.2, 0.0]


def test_write_samples_prints_text_without_out(capsys, one_device):
    sample.write_samples(NextChar(8), LETTERS, None, num_samples=2, length=3, prime="a",
                         mesh=one_device)
    out = capsys.readouterr().out
    assert "abcd" in out and out.count("sample") == 2


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


def test_a_vocabulary_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="vocabulary has 8 chars but the model 9"):
        sample.generate(NextChar(9), LETTERS, length=3)

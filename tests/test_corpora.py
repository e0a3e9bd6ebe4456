"""Tests for lstm_jax.corpora: every source kind, offline (the downloader is faked)."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
import subprocess
import sys
import types
import urllib.error
import urllib.request

import pytest

from lstm_jax import corpora
from lstm_jax.corpora import CorpusError, load_text

REAL_NIETZSCHE = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nietzsche.txt"
PAYLOAD = "Hello, Zarathustra!\n".encode()


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    """Point the cache at tmp, clear the data dir, and make any network access fail loudly."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LSTM_JAX_CACHE_DIR", str(cache))
    monkeypatch.delenv("LSTM_JAX_DATA_DIR", raising=False)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("test tried to touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return cache


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register a tiny corpus whose checksum matches PAYLOAD."""
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    monkeypatch.setitem(corpora.REGISTRY, "tiny", ("tiny.txt", "https://example.invalid/tiny.txt", sha))
    return "tiny"


def serve(monkeypatch: pytest.MonkeyPatch, payload: bytes) -> list[str]:
    """Fake urlopen returning ``payload``; returns the list of requested URLs."""
    urls: list[str] = []

    def fake_urlopen(url: str, timeout: float = 0) -> io.BytesIO:
        urls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    return urls


def test_builtin_is_deterministic_and_large() -> None:
    """'builtin' is every pydoc help topic, each once, in sorted-key order, joined by blank lines,
    and a fresh interpreter with another hash seed builds the same text (same fingerprint). Fails
    if the topics are taken in set/hash order (resumed runs would see another corpus), a topic is
    dropped or repeated, or something else is added."""
    from pydoc_data.topics import topics
    text = load_text("builtin")
    assert len(text) > 100_000
    pos = 0
    for i, key in enumerate(sorted(topics)):      # walk the text topic by topic
        if i:
            assert text[pos:pos + 2] == "\n\n", f"no blank line before topic {key!r}"
            pos += 2
        assert text.startswith(topics[key], pos), f"topic {key!r} is not where sorted order puts it"
        pos += len(topics[key])
    assert pos == len(text), "text after the last topic"
    # corpora.py alone (stdlib only), loaded by path in interpreters with other hash seeds.
    script = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location("
              "'corpora', sys.argv[1]); m = importlib.util.module_from_spec(spec); "
              "spec.loader.exec_module(m); print(m.corpus_fingerprint(m.load_text('builtin')))")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, corpora.__file__], check=True,
                             capture_output=True, text=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        assert out == corpora.corpus_fingerprint(text), f"PYTHONHASHSEED={seed} gives another text"


def test_corpus_fingerprint_is_the_sha256_of_the_utf8_text() -> None:
    """Known answers (FIPS 180-2's "abc"; a non-ASCII text hashed as UTF-8). Fails if the
    fingerprint hashes another encoding, a normalised or lower-cased text, or uses another hash."""
    assert corpora.corpus_fingerprint("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    text = "Übermensch, 超人"
    assert corpora.corpus_fingerprint(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert corpora.corpus_fingerprint(text) != corpora.corpus_fingerprint(text.lower())


def test_builtin_missing_pydoc_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(CorpusError, match="pydoc_data.*--config.corpus=PATH"):
        load_text("builtin")


@pytest.mark.skipif(not REAL_NIETZSCHE.is_file(), reason="shared nietzsche.txt not available")
def test_real_nietzsche_via_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTM_JAX_DATA_DIR", str(REAL_NIETZSCHE.parent))
    text = load_text("nietzsche", lowercase=True)
    assert len(text) == 600_893
    assert len(set(text)) == 57


def test_data_dir_argument_beats_env(monkeypatch, tmp_path, fake_registry) -> None:
    (tmp_path / "arg").mkdir()
    (tmp_path / "arg" / "tiny.txt").write_bytes(PAYLOAD)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "tiny.txt").write_bytes(b"corrupt")
    monkeypatch.setenv("LSTM_JAX_DATA_DIR", str(tmp_path / "env"))
    assert load_text(fake_registry, data_dir=str(tmp_path / "arg")) == PAYLOAD.decode()


def test_found_in_cache(isolated, fake_registry) -> None:
    isolated.mkdir()
    (isolated / "tiny.txt").write_bytes(PAYLOAD)
    assert load_text(fake_registry, lowercase=True) == PAYLOAD.decode().lower()


def test_cache_dir_resolution(monkeypatch, tmp_path) -> None:
    assert corpora.resolve_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LSTM_JAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.resolve_cache_dir() == tmp_path / "xdg" / "lstm_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert corpora.resolve_cache_dir() == pathlib.Path.home() / ".cache" / "lstm_jax"


def test_download_good_checksum(monkeypatch, isolated, fake_registry) -> None:
    urls = serve(monkeypatch, PAYLOAD)
    assert load_text(fake_registry) == PAYLOAD.decode()
    assert urls == ["https://example.invalid/tiny.txt"]
    assert sorted(p.name for p in isolated.iterdir()) == ["tiny.txt"]  # no temp file left
    assert load_text(fake_registry) == PAYLOAD.decode()  # second call hits the cache
    assert len(urls) == 1


def test_download_bad_checksum_leaves_nothing(monkeypatch, isolated, fake_registry) -> None:
    serve(monkeypatch, b"tampered")
    with pytest.raises(CorpusError, match="checksum mismatch") as info:
        load_text(fake_registry)
    assert corpora.REGISTRY[fake_registry][2] in str(info.value)
    assert hashlib.sha256(b"tampered").hexdigest() in str(info.value)
    assert list(isolated.iterdir()) == []


def test_download_network_failure(monkeypatch, isolated) -> None:
    def offline(url: str, timeout: float = 0) -> None:
        raise urllib.error.URLError("no route")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(CorpusError, match="LSTM_JAX_DATA_DIR"):
        load_text("nietzsche")
    assert list(isolated.iterdir()) == []


def test_wrong_checksum_in_data_dir(tmp_path) -> None:
    bad = tmp_path / "nietzsche.txt"
    bad.write_text("not nietzsche")
    with pytest.raises(CorpusError, match="wrong checksum") as info:
        load_text("nietzsche", data_dir=str(tmp_path))
    assert str(bad) in str(info.value)
    assert corpora.NIETZSCHE_SHA256 in str(info.value)


def test_file_and_glob(tmp_path) -> None:
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.md").write_text("nope")
    assert load_text(str(tmp_path / "a.txt")) == "first"
    assert load_text(str(tmp_path / "*.txt")) == "first\nsecond"


@pytest.mark.parametrize("name", ["missing.txt", "nothing*.txt"])
def test_missing_path(tmp_path, name) -> None:
    with pytest.raises(CorpusError, match="builtin") as info:
        load_text(str(tmp_path / name))
    assert name in str(info.value)


def test_empty_file(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))


def test_undecodable_bytes(tmp_path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok line\ncaf\xe9 au lait\n")
    with pytest.raises(CorpusError) as info:
        load_text(str(path))
    message = str(info.value)
    for fragment in (str(path), "byte offset 11", "line 2", "column 4", r"b'\xe9'",
                     "--config.encoding_errors=replace", "re-encode"):
        assert fragment in message
    assert load_text(str(path), errors="replace") == "ok line\ncaf\ufffd au lait\n"
    assert load_text(str(path), errors="ignore") == "ok line\ncaf au lait\n"
    with pytest.raises(CorpusError, match="invalid"):
        load_text(str(path), errors="bogus")


def test_tfds_fake_module(monkeypatch) -> None:
    calls = []

    def fake_load(name: str, split: str) -> list[dict[str, object]]:
        calls.append((name, split))
        return [{"text": "First Citizen:\n".encode(), "id": 0}, {"text": "Before we proceed".encode(), "id": 1}]

    fake = types.SimpleNamespace(load=fake_load, as_numpy=lambda ds: ds)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    assert load_text("tfds:tiny_shakespeare") == "First Citizen:\n\nBefore we proceed"
    assert load_text("tfds:tiny_shakespeare:test", lowercase=True).startswith("first citizen")
    assert calls == [("tiny_shakespeare", "train"), ("tiny_shakespeare", "test")]


def test_tfds_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(CorpusError, match=r"pip install 'lstm_jax\[tfds\]'"):
        load_text("tfds:tiny_shakespeare")


def _fake_tfds(monkeypatch, examples=None, error=None) -> None:
    def fake_load(name: str, split: str):
        if error:
            raise error
        return examples
    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        types.SimpleNamespace(load=fake_load, as_numpy=lambda ds: ds))


def test_tfds_reads_the_one_text_feature_and_explains_failures(monkeypatch) -> None:
    """Only the bytes feature becomes text (ids and labels do not), undecodable bytes name the
    split, and every failure is a CorpusError naming the fix. Fails if another feature leaks into
    the text, a dataset with two text features is guessed at, or tfds's own exception escapes."""
    _fake_tfds(monkeypatch, [{"id": 7, "label": 2, "text": b"caf\xc3\xa9"}, {"id": 8, "label": 0, "text": b"noir"}])
    assert load_text("tfds:cafe") == "caf\u00e9\nnoir"
    _fake_tfds(monkeypatch, [{"title": b"t", "text": b"x"}])
    with pytest.raises(CorpusError, match=r"exactly one text feature, found \['text', 'title'\]"):
        load_text("tfds:two_texts")
    _fake_tfds(monkeypatch, [{"text": b"caf\xe9"}])
    with pytest.raises(CorpusError, match="tfds:latin:train is not valid UTF-8"):
        load_text("tfds:latin")
    assert load_text("tfds:latin", errors="replace") == "caf\ufffd"
    _fake_tfds(monkeypatch, [])
    with pytest.raises(CorpusError, match="is empty"):
        load_text("tfds:nothing:test")
    _fake_tfds(monkeypatch, error=KeyError("no such dataset"))
    with pytest.raises(CorpusError, match="could not load 'nope' split 'validation'.*catalog"):
        load_text("tfds:nope:validation")
    for bad in ("tfds:", "tfds:a:b:c"):
        with pytest.raises(CorpusError, match="use 'tfds:NAME' or 'tfds:NAME:SPLIT'"):
            load_text(bad)


def test_tfds_mock_data() -> None:
    """With tfds's own mock data (needs tensorflow_datasets; skipped without it), the text is each
    example's text feature, in order, joined by newlines. Fails if an example is dropped or the
    order changes."""
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=3):
        examples = [ex["text"].decode("utf-8")
                    for ex in tfds.as_numpy(tfds.load("tiny_shakespeare", split="train"))]
        text = load_text("tfds:tiny_shakespeare")
    assert len(examples) == 3
    assert text == "\n".join(examples)

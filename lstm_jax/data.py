"""Vocabulary, encoding, train/validation split and fixed-shape integer batches.

Text is encoded once into the smallest unsigned dtype. Batches are (rows, L + 1) token arrays:
inputs are `[:, :-1]`; targets are `[:, -1]` (window objective: the char after each window) or
`[:, 1:]` (sequence objective: every position). Every batch is a pure function of
(seed, epoch, index), so any process can build its own rows of any global batch, and resuming at a
step rebuilds exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import queue
import threading
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from lstm_jax import corpora, files


class DataError(ValueError):
    """A problem with the corpus or batch sizes, with the fix in the message."""


# The largest character vocabulary accepted: beyond it the head and the embedding dominate the
# model, and a byte vocabulary (V = 256) is the better tool.
MAX_CHAR_VOCAB = 65_536
VOCAB_KINDS = ("chars", "bytes")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """Token table in index order.

    kind="chars" (default): the sorted distinct characters of the corpus (the Keras reference's
    `sorted(set(text))`); encoding text with a character outside it is an error (or the character
    is dropped). kind="bytes": the 256 UTF-8 byte values, so any text in any script encodes and
    nothing is unknown; `chars[i]` is then `chr(i)` (a placeholder: decode token runs with
    `decode`, which reassembles UTF-8 and replaces invalid sequences, never char by char).
    """
    chars: tuple[str, ...]
    kind: str = "chars"

    def __post_init__(self):
        if self.kind not in VOCAB_KINDS:
            raise DataError(f"vocabulary kind must be one of {VOCAB_KINDS}, got {self.kind!r}")
        if self.kind == "bytes":
            if self.chars != _BYTE_CHARS:
                raise DataError("a bytes vocabulary has exactly the 256 byte values; build it "
                                "with Vocab.bytes()")
            return
        if not self.chars:
            raise DataError("a vocabulary needs at least one character")
        if any(not isinstance(c, str) or len(c) != 1 for c in self.chars):
            bad = next(c for c in self.chars if not isinstance(c, str) or len(c) != 1)
            raise DataError(f"vocabulary entries must be single characters, got {bad!r}")
        if any(a >= b for a, b in zip(self.chars, self.chars[1:])):
            raise DataError("vocabulary characters must be sorted and distinct (index order is "
                            "code-point order); build it with Vocab.from_text or sorted(set(...))")
        if len(self.chars) > MAX_CHAR_VOCAB:
            raise DataError(f"the corpus has {len(self.chars):,} distinct characters, more than "
                            f"the {MAX_CHAR_VOCAB:,} a character vocabulary allows; use "
                            f"--config.vocab=bytes (UTF-8 bytes, 256 tokens)")

    @classmethod
    def from_text(cls, text: str, kind: str = "chars") -> "Vocab":
        if kind == "bytes":
            return cls.bytes()
        if not text:
            raise DataError("cannot build a vocabulary from an empty corpus; check the corpus source")
        return cls(tuple(sorted(set(text))))

    @classmethod
    def bytes(cls) -> "Vocab":
        return cls(_BYTE_CHARS, kind="bytes")

    @property
    def is_bytes(self) -> bool:
        return self.kind == "bytes"

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned integer dtype that holds every index."""
        return np.dtype(np.uint8 if len(self) <= 2**8 else np.uint16 if len(self) <= 2**16 else np.uint32)

    def unknown_chars(self, text: str) -> list[str]:
        return [] if self.is_bytes else sorted(set(text) - set(self.chars))

    def encode(self, text: str, unknown: str = "error") -> np.ndarray:
        """Text -> index array. `unknown` = 'error' (list the offending chars) or 'drop'."""
        if self.is_bytes:
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()
        missing = self.unknown_chars(text)
        if missing:
            if unknown != "drop":
                shown = "".join(missing[:40]) + ("..." if len(missing) > 40 else "")
                raise DataError(f"characters not in the vocabulary: {shown!r} "
                                f"({len(missing)} distinct); remove them or drop them (unknown='drop', --drop_unknown)")
            drop = set(missing)
            text = "".join(c for c in text if c not in drop)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted (enforced)
        return np.searchsorted(table, codes).astype(self.dtype)

    def decode(self, ids: Iterable[int]) -> str:
        if self.is_bytes:
            return bytes(np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids,
                                    dtype=np.uint8)).decode("utf-8", errors="replace")
        chars = self.chars
        return "".join(chars[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": list(self.chars)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        d = json.loads(text)
        if d.get("kind", "chars") == "bytes":
            return cls.bytes()
        return cls(tuple(d["chars"]))

    def save(self, path: os.PathLike) -> None:
        files.atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: os.PathLike, fix: str = "restore it from the run's checkpoint metadata "
                                                "or start afresh with --new_run") -> "Vocab":
        try:
            return cls.from_json(pathlib.Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"cannot read the vocabulary {path}: {e}; {fix}") from None


_BYTE_CHARS = tuple(chr(i) for i in range(256))


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train = head, validation = held-out tail (no shuffling across the boundary)."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


class Batcher:
    """Deterministic per-epoch shuffled batches of (rows, L + 1) tokens."""
    num_examples: int
    example_len: int  # L + 1

    def __init__(self, tokens: np.ndarray, global_batch: int, seed: int):
        self.tokens = tokens
        self.global_batch = global_batch
        self.seed = seed
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_examples // self.global_batch

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_examples), epoch
        return self._perm

    def _starts(self, epoch: int, example_ids: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def batch(self, epoch: int, index: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of global batch `index` in `epoch`, as int32 (rows, L + 1)."""
        ids = self._permutation(epoch)[index * self.global_batch:(index + 1) * self.global_batch][rows]
        starts = self._starts(epoch, ids)
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.example_len)], dtype=np.int32)

    def epoch_batches(self, epoch: int, start_index: int = 0, rows: slice = slice(None)) -> Iterator[np.ndarray]:
        for index in range(start_index, self.steps_per_epoch):
            yield self.batch(epoch, index, rows)


class WindowBatcher(Batcher):
    """The Keras reference's windows: `text[i:i+maxlen]` -> `text[i+maxlen]` for i in range(0, n - maxlen, step)."""

    def __init__(self, tokens: np.ndarray, maxlen: int, step: int, global_batch: int, seed: int):
        super().__init__(tokens, global_batch, seed)
        self.maxlen, self.step = maxlen, step
        self.num_examples = len(range(0, len(tokens) - maxlen, step))
        self.example_len = maxlen + 1
        _check_enough(self.num_examples, global_batch, "windows", len(tokens))

    def _starts(self, epoch: int, example_ids: np.ndarray) -> np.ndarray:
        return example_ids * self.step


class SequenceBatcher(Batcher):
    """Contiguous chunks of T + 1 tokens, next-char loss at every position.

    Each epoch shifts the chunk grid by a random offset in [0, T) so chunk boundaries move.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        super().__init__(tokens, global_batch, seed)
        self.seq_len = seq_len
        self.num_examples = max(0, (len(tokens) - seq_len) // seq_len)  # fits every offset
        self.example_len = seq_len + 1
        _check_enough(self.num_examples, global_batch, f"{seq_len}-char chunks", len(tokens))

    def _starts(self, epoch: int, example_ids: np.ndarray) -> np.ndarray:
        offset = np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len)
        return offset + example_ids * self.seq_len


class StreamBatcher(Batcher):
    """`global_batch` contiguous streams of the training split, read `seq_len` chars at a time:
    row j of step i is text[start_j + i*T : start_j + i*T + T + 1], so every step continues each
    stream where the previous step stopped (the LSTM carry is passed on: `objective="stream"`).

    Stream j starts at offset + j * stream_len, with one random offset in [0, T) per epoch so the
    chunk boundaries move between epochs. In an epoch no character is a target twice and none is
    skipped except the offset, each stream's last partial chunk and the split's tail remainder.
    Each process builds only its rows (its streams).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int):
        super().__init__(tokens, global_batch, seed)
        self.seq_len = seq_len
        self.stream_len = max(0, (len(tokens) - seq_len) // global_batch)   # leaves room for the offset
        steps = max(0, (self.stream_len - 1) // seq_len)
        self.num_examples = steps * global_batch
        self.example_len = seq_len + 1
        if steps == 0:
            raise DataError(
                f"the training split ({len(tokens)} chars) cut into batch_size={global_batch} streams "
                f"gives streams of {self.stream_len} chars, shorter than one {seq_len + 1}-char "
                f"step; use a larger corpus, a smaller batch_size or a shorter seq_len")

    def offset(self, epoch: int) -> int:
        return int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len))

    def batch(self, epoch: int, index: int, rows: slice = slice(None)) -> np.ndarray:
        streams = np.arange(self.global_batch)[rows]
        starts = self.offset(epoch) + streams * self.stream_len + index * self.seq_len
        return np.asarray(self.tokens[starts[:, None] + np.arange(self.example_len)], dtype=np.int32)


def _check_enough(num_examples: int, global_batch: int, what: str, num_tokens: int) -> None:
    if num_examples < global_batch:
        raise DataError(
            f"the training split ({num_tokens} chars) gives {num_examples} {what}, fewer than one "
            f"batch of {global_batch}; use a larger corpus, a smaller batch_size or a shorter seq_len")


def make_batcher(config, tokens: np.ndarray, global_batch: int) -> Batcher:
    if config.objective == "window":
        return WindowBatcher(tokens, config.seq_len, config.window_step, global_batch, config.seed)
    if config.objective == "stream":
        return StreamBatcher(tokens, config.seq_len, global_batch, config.seed)
    return SequenceBatcher(tokens, config.seq_len, global_batch, config.seed)


def text_streams(tokens: np.ndarray, num_streams: int) -> tuple[np.ndarray, np.ndarray]:
    """The whole text as `num_streams` contiguous streams for evaluation with the state carried:
    (S, L + 1) tokens and (S, L) target weights. Stream j's inputs run from where stream j - 1's
    targets end, so every char after the first is a target exactly once; the last stream is
    padded (weight 0) to the common length."""
    targets = len(tokens) - 1
    if targets < 1:
        raise DataError(f"a text of {len(tokens)} chars has nothing to predict; use a longer text")
    num_streams = max(1, min(num_streams, targets))
    length = -(-targets // num_streams)
    starts = np.arange(num_streams) * length
    index = np.minimum(starts[:, None] + np.arange(length + 1), len(tokens) - 1)
    weight = (starts[:, None] + np.arange(1, length + 1) <= targets).astype(np.float32)
    return np.asarray(tokens[index], dtype=np.int32), weight


def eval_windows(val_tokens: np.ndarray, window: int, stride: int, max_windows: int) -> np.ndarray:
    """Held-out (N, window + 1) windows starting every `stride` chars, at most `max_windows`
    of them, evenly spaced: the Keras reference's windows, on text the model never trained on."""
    starts = np.arange(0, len(val_tokens) - window, stride)
    if len(starts) == 0:
        raise DataError(f"the validation split ({len(val_tokens)} chars) is shorter than one "
                        f"{window}-char window; raise val_fraction or lower eval_window")
    if len(starts) > max_windows:
        starts = starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
    return np.asarray(val_tokens[starts[:, None] + np.arange(window + 1)], dtype=np.int32)


def pad_rows(rows: np.ndarray, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Pads to a multiple of `multiple` rows; returns (rows, weight) with weight 0 on padding."""
    pad = (-len(rows)) % multiple
    weight = np.concatenate([np.ones(len(rows), np.float32), np.zeros(pad, np.float32)])
    return np.concatenate([rows, np.zeros((pad,) + rows.shape[1:], rows.dtype)]), weight


# --- prepared (memory-mapped) corpora ---------------------------------------------------------

PREPARED_FILES = ("train.bin", "val.bin", "vocab.json", "meta.json")


def check_prepare_out(out_dir: os.PathLike, replace: bool = False) -> None:
    """Refuses an output that is not a directory, or (unless `replace`) one that already holds a
    prepared corpus: runs trained from it record its fingerprint, and replacing it silently would
    make their `eval` measure another text."""
    out = pathlib.Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; choose a directory path")
    existing = [name for name in PREPARED_FILES if (out / name).exists()]
    if existing and not replace:
        raise DataError(f"{out} already holds a prepared corpus ({', '.join(existing)}); choose "
                        f"another --out, or pass --replace to overwrite it (runs trained from it "
                        f"will then refuse to eval on it)")


def prepare(text: str, out_dir: os.PathLike, val_fraction: float, vocab: Optional[Vocab] = None,
            replace: bool = False) -> Vocab:
    """Encodes once and writes train.bin / val.bin (raw indices) + vocab.json + meta.json.
    An existing prepared corpus in `out_dir` is refused unless `replace`."""
    out = pathlib.Path(out_dir)
    check_prepare_out(out, replace)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab or Vocab.from_text(text)
    train, val = split_tokens(vocab.encode(text), val_fraction)
    for name, arr in (("train.bin", train), ("val.bin", val)):
        with files.atomic_open(out / name, "wb") as f:
            arr.astype(vocab.dtype).tofile(f)
    vocab.save(out / "vocab.json")
    import hashlib   # the text's fingerprint, so a run on the prepared arrays resumes as the text
    files.atomic_write_text(out / "meta.json", json.dumps(
        {"dtype": vocab.dtype.name, "train_tokens": int(len(train)), "val_tokens": int(len(val)),
         "val_fraction": val_fraction,
         "fingerprint": hashlib.sha256(text.encode("utf-8")).hexdigest()}))
    return vocab


def load_prepared(directory: os.PathLike, with_meta: bool = False):
    """Memory-maps a `prepare`d corpus: nothing is read until a batch touches it.
    Returns (vocab, train, val), plus meta.json's dict if `with_meta`."""
    d = pathlib.Path(directory)
    again = f"prepare it again: lstm-jax prepare --config ... --out {d} --replace"
    if not (d / "meta.json").is_file():
        raise DataError(f"{d} is not a prepared corpus (no meta.json); create it with "
                        f"`lstm-jax prepare --config ... --out {d}`")
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        sizes = {"train.bin": int(meta["train_tokens"]), "val.bin": int(meta["val_tokens"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"the prepared corpus's {d / 'meta.json'} is unreadable ({e}); {again}") from None
    vocab = Vocab.load(d / "vocab.json", fix=again)
    if dtype != vocab.dtype:
        raise DataError(f"{d / 'meta.json'} says dtype {dtype.name}, its vocabulary of "
                        f"{len(vocab)} needs {vocab.dtype.name}; {again}")
    arrays = []
    for name, n in sizes.items():
        size = (d / name).stat().st_size if (d / name).is_file() else None
        if size != n * dtype.itemsize:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise DataError(f"{d / name} {found}, meta.json expects {n:,} tokens "
                            f"({n * dtype.itemsize:,} bytes): a truncated or replaced file; {again}")
        # np.memmap cannot map an empty file (val_fraction=0 writes an empty val.bin)
        arrays.append(np.memmap(d / name, dtype=dtype, mode="r", shape=(n,)) if n
                      else np.zeros((0,), dtype))
    if len(vocab) < np.iinfo(dtype).max + 1:   # ids the dtype can hold but the vocabulary lacks
        for name, arr in zip(sizes, arrays):
            top = max((int(arr[i:i + (1 << 24)].max()) for i in range(0, len(arr), 1 << 24)), default=0)
            if top >= len(vocab):
                raise DataError(f"{d / name} holds token id {top}, outside its vocabulary of "
                                f"{len(vocab)} (vocab.json and the arrays do not belong together); {again}")
    return (vocab, arrays[0], arrays[1], meta) if with_meta else (vocab, arrays[0], arrays[1])


@dataclasses.dataclass
class Corpus:
    """A run's text, encoded: the vocabulary, the train/validation split, and the text's hash."""
    vocab: Vocab
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    fingerprint: str


def load_corpus(config, vocab: Optional[Vocab] = None) -> Corpus:
    """config.corpus -> text -> vocab (built, or the given one) -> encoded train/val split; a
    `prepared:DIR` corpus is memory-mapped as `prepare` wrote it."""
    if config.corpus.startswith("prepared:"):
        directory = config.corpus.split(":", 1)[1]
        vocab_p, train, val, meta = load_prepared(directory, with_meta=True)
        if vocab_p.kind != config.vocab:
            raise DataError(f"{directory} was prepared with vocab={vocab_p.kind!r}, the config "
                            f"says {config.vocab!r}; prepare it again or set --config.vocab={vocab_p.kind}")
        if not math.isclose(meta.get("val_fraction", config.val_fraction), config.val_fraction):
            raise DataError(f"{directory} was prepared with val_fraction={meta['val_fraction']}, "
                            f"the config says {config.val_fraction}; prepare it again or set "
                            f"--config.val_fraction={meta['val_fraction']}")
        return Corpus(vocab_p, train, val,
                      fingerprint=meta.get("fingerprint", f"prepared:{pathlib.Path(directory).name}"))
    text = corpora.load_text(config.corpus, lowercase=config.lowercase, errors=config.encoding_errors)
    vocab = vocab or Vocab.from_text(text, kind=config.vocab)
    train, val = split_tokens(vocab.encode(text), config.val_fraction)
    return Corpus(vocab, train, val, corpora.corpus_fingerprint(text))


def prefetch(iterable: Iterable, size: int = 2) -> Iterator:
    """Runs `iterable` in a background thread, `size` items ahead (overlaps batch building and
    host-to-device transfer with the device step)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    end = object()

    def worker():
        try:
            for item in iterable:
                q.put(item)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
            return
        q.put(end)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item

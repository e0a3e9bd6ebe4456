"""Vocab (chars and bytes kinds, invariants, vocab.json), encoding, the Keras reference's window
construction, sequence chunks, held-out windows, padding, memmaps (also with no validation split).

Each test names a plausible bug it catches."""
import json

import numpy as np
import pytest

from lstm_jax import data


def seed_windows(text, maxlen, step):
    """The Keras example, verbatim in spirit."""
    sentences, next_chars = [], []
    for i in range(0, len(text) - maxlen, step):
        sentences.append(text[i: i + maxlen])
        next_chars.append(text[i + maxlen])
    return sentences, next_chars


MIXED = "Zarathustra sprach: «Übermensch»\nκόσμος, 超人, привет 🙂\ttab"   # 1-4 UTF-8 bytes


def test_vocab_is_sorted_distinct_chars_and_round_trips():
    """Index i is the i-th smallest code point of the corpus (the Keras reference's sorted(set(text))), for
    any script, astral characters included. Fails if encode maps a char to another index (e.g. a
    search over UTF-16 units or an unsorted table) or decode is not its inverse."""
    vocab = data.Vocab.from_text(MIXED)
    assert len(vocab) == len(set(MIXED))
    assert all(a < b for a, b in zip(vocab.chars, vocab.chars[1:]))
    ids = vocab.encode(MIXED)
    assert ids.dtype == np.uint8 and len(ids) == len(MIXED)
    assert [vocab.chars[i] for i in ids] == list(MIXED)
    assert vocab.decode(ids) == MIXED


@pytest.mark.parametrize("chars, message", [
    (("c", "a", "b"), "sorted and distinct"),
    (("a", "b", "b"), "sorted and distinct"),
    (("a", "bc"), "single characters"),
    (("a", 1), "single characters"),
    ((), "at least one character"),
])
def test_vocab_invariants_are_enforced(chars, message):
    """A Vocab is sorted, distinct single characters: anything else is refused with the rule in
    the message. Fails if Vocab(("c", "a", "b")) is accepted (encode's binary search would then
    map "abc" to the wrong indices)."""
    with pytest.raises(data.DataError, match=message):
        data.Vocab(chars)


def test_vocab_kinds_are_checked():
    """Fails if an unknown kind passes, or a "bytes" vocabulary can hold other entries."""
    with pytest.raises(data.DataError, match="kind"):
        data.Vocab(("a", "b"), kind="words")
    with pytest.raises(data.DataError, match="256 byte values.*Vocab.bytes"):
        data.Vocab(("a", "b"), kind="bytes")


def test_vocab_dtype_grows_with_size():
    """uint8 up to 256 entries, uint16 from 257. Fails at an off-by-one boundary (257 entries in
    uint8 would wrap index 256 to 0)."""
    assert data.Vocab(tuple(chr(0x100 + i) for i in range(256))).dtype == np.uint8
    big = data.Vocab(tuple(chr(0x100 + i) for i in range(257)))
    assert big.dtype == np.uint16
    ids = big.encode(big.chars[-1] + big.chars[0])
    assert ids.tolist() == [256, 0] and big.decode(ids) == big.chars[-1] + big.chars[0]


def test_bytes_vocab_encodes_utf8_in_any_script():
    """kind="bytes": V = 256, tokens are the UTF-8 bytes, nothing is unknown, decode reassembles
    multi-byte characters and replaces a cut one instead of failing. Fails if bytes are encoded
    per character (code points > 255 would overflow) or decoded char by char."""
    vocab = data.Vocab.from_text(MIXED, kind="bytes")
    assert vocab == data.Vocab.bytes() and vocab.is_bytes and len(vocab) == 256
    ids = vocab.encode(MIXED)
    assert ids.dtype == np.uint8 and ids.tolist() == list(MIXED.encode("utf-8"))
    assert vocab.decode(ids) == MIXED
    assert vocab.unknown_chars(MIXED) == []
    emoji = vocab.encode("🙂")                       # 4 bytes
    assert vocab.decode(emoji[:3]) == "\ufffd" and vocab.decode(list(emoji)) == "🙂"


def test_character_vocab_cap_names_the_bytes_vocab():
    """65,536 distinct characters are accepted (uint16), one more is refused with a message that
    names --config.vocab=bytes. Fails if the cap is off by one or the message gives no way out."""
    code_points = [c for c in range(0x20, 0x20 + 65_537 + 2048) if not 0xD800 <= c <= 0xDFFF]
    chars = [chr(c) for c in code_points[:65_537]]
    assert data.Vocab.from_text("".join(chars[:-1])).dtype == np.uint16
    with pytest.raises(data.DataError, match=r"65,537 distinct characters.*--config\.vocab=bytes"):
        data.Vocab.from_text("".join(chars))


@pytest.mark.parametrize("kind", ["chars", "bytes"])
def test_vocab_json_round_trips_in_index_order(tmp_path, kind):
    """vocab.json (the workdir contract) lists the entries in index order with the kind, and
    loads back equal. Fails if the kind is lost (a bytes run would resume as a 256-char
    vocabulary of Latin-1) or non-ASCII characters are mangled."""
    vocab = data.Vocab.from_text(MIXED, kind=kind)
    vocab.save(tmp_path / "vocab.json")
    saved = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert saved == {"kind": kind, "chars": list(vocab.chars)}
    loaded = data.Vocab.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.kind == kind
    assert loaded.decode(loaded.encode(MIXED)) == MIXED


@pytest.mark.parametrize("content", ["{not json", '{"chars": ["b", "a"]}', '{"kind": "chars"}', None])
def test_unreadable_vocab_json_is_a_data_error(tmp_path, content):
    """Corrupt JSON, an unsorted table, a missing field or a missing file: a DataError naming the
    file and the way out, never a raw JSONDecodeError/KeyError/OSError traceback."""
    path = tmp_path / "vocab.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(data.DataError, match=r"cannot read the vocabulary .*vocab\.json.*--new_run"):
        data.Vocab.load(path)


def test_unknown_chars_are_listed_or_dropped():
    vocab = data.Vocab.from_text("abc")
    with pytest.raises(data.DataError, match="'xz'"):
        vocab.encode("abxcz")
    assert vocab.decode(vocab.encode("abxcz", unknown="drop")) == "abc"


def test_window_batches_equal_the_keras_reference_construction():
    text = "the cat sat on the mat; the dog sat on the log. " * 3
    maxlen, step = 10, 3
    vocab = data.Vocab.from_text(text)
    tokens = vocab.encode(text)
    sentences, next_chars = seed_windows(text, maxlen, step)
    batcher = data.WindowBatcher(tokens, maxlen, step, global_batch=4, seed=0)
    assert batcher.num_examples == len(sentences) == len(range(0, len(text) - maxlen, step))
    assert batcher.steps_per_epoch == len(sentences) // 4
    from collections import Counter
    keras_pairs = Counter(zip(sentences, next_chars))
    ours = Counter()
    for batch in batcher.epoch_batches(epoch=0):
        assert batch.shape == (4, maxlen + 1)
        ours.update((vocab.decode(row[:-1]), vocab.decode(row[-1:])) for row in batch)
    # every (window, next char) pair is the Keras reference's; only the remainder (< one batch) is left out
    assert not ours - keras_pairs
    assert sum((keras_pairs - ours).values()) == len(sentences) % 4


def test_shuffling_is_deterministic_per_epoch_and_seed():
    tokens = np.arange(1000) % 50
    a = data.WindowBatcher(tokens, 10, 3, 8, seed=1)
    b = data.WindowBatcher(tokens, 10, 3, 8, seed=1)
    c = data.WindowBatcher(tokens, 10, 3, 8, seed=2)
    np.testing.assert_array_equal(a.batch(2, 5), b.batch(2, 5))
    assert not np.array_equal(a.batch(0, 0), a.batch(1, 0))
    assert not np.array_equal(a.batch(0, 0), c.batch(0, 0))


def test_process_rows_of_a_batch_are_slices_of_the_global_batch():
    tokens = np.arange(2000) % 61
    b = data.SequenceBatcher(tokens, 16, 8, seed=0)
    full = b.batch(1, 3)
    np.testing.assert_array_equal(np.concatenate([b.batch(1, 3, slice(0, 4)), b.batch(1, 3, slice(4, 8))]), full)


def test_sequence_chunks_are_contiguous_text_and_shift_per_epoch():
    tokens = np.arange(10_000, dtype=np.int64)     # token == position, so contiguity is visible
    b = data.SequenceBatcher(tokens, seq_len=32, global_batch=16, seed=0)
    assert b.num_examples == (10_000 - 32) // 32
    for epoch in range(3):
        batch = b.batch(epoch, 0)
        assert batch.shape == (16, 33)
        np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    offsets = {int(b.batch(e, 0)[0, 0]) % 32 for e in range(8)}
    assert len(offsets) > 1, "the chunk grid never moves between epochs"


def test_corpus_shorter_than_one_batch_is_a_clear_error():
    with pytest.raises(data.DataError, match="fewer than one batch of 64.*smaller batch_size"):
        data.SequenceBatcher(np.zeros(500, np.uint8), seq_len=50, global_batch=64, seed=0)
    with pytest.raises(data.DataError, match="windows"):
        data.WindowBatcher(np.zeros(100, np.uint8), 60, 3, 128, seed=0)


def test_split_tokens_holds_out_the_tail():
    """Validation is the last int(n * val_fraction) tokens, training the rest, in order. Fails if
    the split shuffles, overlaps or rounds the other way."""
    train, val = data.split_tokens(np.arange(1009), 0.1)
    np.testing.assert_array_equal(train, np.arange(909))
    np.testing.assert_array_equal(val, np.arange(909, 1009))
    train, val = data.split_tokens(np.arange(10), 0.0)
    assert len(train) == 10 and len(val) == 0


def test_eval_windows_are_held_out_and_evenly_capped():
    """Windows of window + 1 tokens every `stride` chars; capped, an evenly spaced subset that
    keeps the first and the last window. Fails if the cap takes only the head of the split."""
    val = np.arange(1000)                           # token == position
    w = data.eval_windows(val, window=60, stride=3, max_windows=10_000)
    starts = np.arange(0, 1000 - 60, 3)
    np.testing.assert_array_equal(w, starts[:, None] + np.arange(61))
    capped = data.eval_windows(val, 60, 3, 50)
    assert capped.shape == (50, 61)
    capped_starts = capped[:, 0]
    assert set(capped_starts) <= set(starts) and capped_starts[0] == 0 and capped_starts[-1] == starts[-1]
    gaps = np.diff(capped_starts)
    assert gaps.max() - gaps.min() <= 3, gaps       # even spacing, up to one stride of rounding
    with pytest.raises(data.DataError, match="val_fraction"):
        data.eval_windows(val[:30], 60, 3, 10)


def test_pad_rows_marks_padding_with_zero_weight():
    """The real rows come first, unchanged; padding rows are zeros with weight 0. Fails if padding
    is weighted or overwrites a row."""
    real = np.arange(15, dtype=np.int32).reshape(5, 3) + 1
    rows, weight = data.pad_rows(real, 4)
    assert rows.shape == (8, 3) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows[:5], real)
    np.testing.assert_array_equal(rows[5:], 0)
    assert weight.tolist() == [1] * 5 + [0] * 3
    rows, weight = data.pad_rows(real[:4], 4)       # already a multiple: untouched
    np.testing.assert_array_equal(rows, real[:4])
    assert weight.tolist() == [1] * 4


def test_prepared_memmap_gives_the_same_batches_as_in_memory(tmp_path):
    text = "abcdefghij klmnop qrstuv wxyz.\n" * 200
    vocab = data.prepare(text, tmp_path / "prep", val_fraction=0.1)
    v2, train_mm, val_mm = data.load_prepared(tmp_path / "prep")
    assert v2 == vocab and isinstance(train_mm, np.memmap)
    train, val = data.split_tokens(vocab.encode(text), 0.1)
    np.testing.assert_array_equal(train_mm, train)
    np.testing.assert_array_equal(val_mm, val)
    for cls_args in ((data.WindowBatcher, (60, 3)), (data.SequenceBatcher, (50,))):
        cls, args = cls_args
        a, b = cls(train, *args, 16, 0), cls(train_mm, *args, 16, 0)
        np.testing.assert_array_equal(a.batch(1, 2), b.batch(1, 2))


def test_prepare_without_validation_split_loads(tmp_path):
    """val_fraction=0 writes an empty val.bin; load_prepared maps it as an empty array of the
    vocabulary's dtype and the training tokens are the whole text. Fails if np.memmap is asked to
    map the empty file ("cannot mmap an empty file")."""
    text = "abcdefghij klmnop qrstuv wxyz.\n" * 50
    vocab = data.prepare(text, tmp_path / "prep", val_fraction=0.0)
    assert (tmp_path / "prep" / "val.bin").stat().st_size == 0
    loaded, train, val = data.load_prepared(tmp_path / "prep")
    assert loaded == vocab
    np.testing.assert_array_equal(train, vocab.encode(text))
    assert val.shape == (0,) and val.dtype == vocab.dtype
    with pytest.raises(data.DataError, match="val_fraction"):
        data.eval_windows(val, 60, 3, 10)


def test_prepare_with_a_bytes_vocabulary(tmp_path):
    """A prepared corpus keeps the bytes kind: tokens are the UTF-8 bytes. Fails if prepare or
    load_prepared falls back to a character vocabulary."""
    vocab = data.prepare(MIXED * 20, tmp_path / "prep", val_fraction=0.25, vocab=data.Vocab.bytes())
    loaded, train, val = data.load_prepared(tmp_path / "prep")
    assert loaded == vocab == data.Vocab.bytes()
    np.testing.assert_array_equal(np.concatenate([train, val]), list((MIXED * 20).encode("utf-8")))
    assert len(val) == int(len((MIXED * 20).encode("utf-8")) * 0.25)


def test_load_prepared_missing_dir_names_the_fix(tmp_path):
    with pytest.raises(data.DataError, match="lstm-jax prepare"):
        data.load_prepared(tmp_path / "nope")


def test_prefetch_preserves_order_and_reraises():
    assert list(data.prefetch(iter(range(10)))) == list(range(10))

    def broken():
        yield 1
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        list(data.prefetch(broken()))


def test_stream_batches_continue_every_stream_and_cover_the_split_once_per_epoch():
    """Row j of step i is text[offset + j * stream_len + i * T : ... + T + 1] (NumPy reference on
    a text whose tokens are their own positions). Fails if a stream does not continue where it
    stopped, if a character is a target twice in an epoch, if anything beyond the offset, the
    streams' last partial chunks and the tail is skipped, if epochs share their offset, or if a
    process's rows differ from its slice of the global batch."""
    T, B = 7, 4
    tokens = np.arange(1003)
    batcher = data.StreamBatcher(tokens, T, B, seed=0)
    stream_len = (1003 - T) // B
    assert batcher.stream_len == stream_len and batcher.steps_per_epoch == (stream_len - 1) // T
    offsets = {batcher.offset(e) for e in range(4)}
    assert len(offsets) > 1 and all(0 <= o < T for o in offsets)
    for epoch in (0, 1):
        offset, targets = batcher.offset(epoch), []
        batches = [batcher.batch(epoch, i) for i in range(batcher.steps_per_epoch)]
        for i, batch in enumerate(batches):
            want = offset + np.arange(B)[:, None] * stream_len + i * T + np.arange(T + 1)
            np.testing.assert_array_equal(batch, want)
            np.testing.assert_array_equal(batcher.batch(epoch, i, slice(2, 4)), batch[2:4])
            if i:
                np.testing.assert_array_equal(batch[:, 0], batches[i - 1][:, -1])
            targets.extend(batch[:, 1:].ravel())
        assert len(targets) == len(set(targets)) == B * batcher.steps_per_epoch * T
        skipped = set(range(1, 1003)) - set(targets)
        per_stream = stream_len - batcher.steps_per_epoch * T        # each stream's partial chunk
        assert len(skipped) == offset + B * per_stream + (1003 - 1 - offset - B * stream_len)


def test_text_streams_cut_a_text_into_contiguous_streams_with_every_char_a_target_once():
    tokens = np.arange(103)
    streams, weight = data.text_streams(tokens, 4)
    targets = streams[:, 1:][weight > 0]
    np.testing.assert_array_equal(np.sort(targets), np.arange(1, 103))   # each char after the first
    assert weight.sum() == 102 and streams.shape == (4, 27)
    np.testing.assert_array_equal(streams[1, 0], streams[0, -1])        # stream 1 starts where 0 ends
    with pytest.raises(data.DataError, match="nothing to predict"):
        data.text_streams(np.arange(1), 3)

"""Vocab, encoding, the seed's window construction, sequence chunks, held-out windows, memmaps."""
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


def test_vocab_is_sorted_distinct_chars_and_round_trips(tmp_path):
    text = "hello, wörld!\nçà"
    vocab = data.Vocab.from_text(text)
    assert list(vocab.chars) == sorted(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8 and vocab.decode(ids) == text
    vocab.save(tmp_path / "vocab.json")
    assert data.Vocab.load(tmp_path / "vocab.json") == vocab


def test_vocab_dtype_grows_with_size():
    big = data.Vocab(tuple(chr(0x100 + i) for i in range(300)))
    assert big.dtype == np.uint16
    assert big.decode(big.encode("".join(big.chars[::7]))) == "".join(big.chars[::7])


def test_unknown_chars_are_listed_or_dropped():
    vocab = data.Vocab.from_text("abc")
    with pytest.raises(data.DataError, match="'xz'"):
        vocab.encode("abxcz")
    assert vocab.decode(vocab.encode("abxcz", unknown="drop")) == "abc"


def test_window_batches_equal_the_seed_construction():
    text = "the cat sat on the mat; the dog sat on the log. " * 3
    maxlen, step = 10, 3
    vocab = data.Vocab.from_text(text)
    tokens = vocab.encode(text)
    sentences, next_chars = seed_windows(text, maxlen, step)
    batcher = data.WindowBatcher(tokens, maxlen, step, global_batch=4, seed=0)
    assert batcher.num_examples == len(sentences) == len(range(0, len(text) - maxlen, step))
    assert batcher.steps_per_epoch == len(sentences) // 4
    from collections import Counter
    seed_pairs = Counter(zip(sentences, next_chars))
    ours = Counter()
    for batch in batcher.epoch_batches(epoch=0):
        assert batch.shape == (4, maxlen + 1)
        ours.update((vocab.decode(row[:-1]), vocab.decode(row[-1:])) for row in batch)
    # every (window, next char) pair is the seed's; only the remainder (< one batch) is left out
    assert not ours - seed_pairs
    assert sum((seed_pairs - ours).values()) == len(sentences) % 4


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


def test_eval_windows_are_held_out_and_evenly_capped():
    val = np.arange(1000) % 97
    w = data.eval_windows(val, window=60, stride=3, max_windows=10_000)
    assert w.shape == (len(range(0, 1000 - 60, 3)), 61)
    capped = data.eval_windows(val, 60, 3, 50)
    assert capped.shape == (50, 61) and capped[0, 0] == val[0]
    with pytest.raises(data.DataError, match="val_fraction"):
        data.eval_windows(val[:30], 60, 3, 10)


def test_pad_rows_marks_padding_with_zero_weight():
    rows, weight = data.pad_rows(np.ones((5, 3), np.int32), 4)
    assert rows.shape == (8, 3) and weight.tolist() == [1] * 5 + [0] * 3


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

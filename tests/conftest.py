"""Test setup: 8 fake CPU devices (before JAX initialises), tiny configs, no network."""
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a URL fails the test."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def tiny_config(**overrides):
    """A config that trains in seconds: small corpus slice, small model, 1 device."""
    from lstm_jax.config import get_config
    c = get_config()
    c.model.hidden_size = 32
    c.batch_size = 16
    c.seq_len = 20
    c.num_epochs = 1
    c.max_steps = 20
    c.log_every = 5
    c.eval_max_windows = 64
    c.sample.length = 40
    c.checkpoint.every_steps = 10
    c.parallel.num_devices = 1
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def write_corpus(tmp_path, text: str, name: str = "corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def repetitive_corpus(tmp_path):
    """A small, highly predictable corpus: loss must drop fast on it."""
    return write_corpus(tmp_path, "the quick brown fox jumps over the lazy dog. " * 400)

"""Test setup: 8 fake CPU devices (before JAX initialises), tiny configs, no network."""
import os
import pathlib
import sys

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two XLA:CPU pool threads per fake device: with one per device the in-process all-reduce can
# starve and abort (see lstm_jax.hostenv.configure_cpu_devices).
os.environ.setdefault("PJRT_NPROC", "16")

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
    """configs/tiny.py (small model, 1 device), 20 steps, logging every 5, plus `overrides`."""
    from lstm_jax.config import load_config_file
    c = load_config_file(str(REPO / "configs" / "tiny.py"))
    c.max_steps = 20
    c.log_every = 5
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

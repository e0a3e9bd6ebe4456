"""Test setup: 8 fake CPU devices (before JAX initialises), one XLA compilation cache per session,
tiny configs, no network."""
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Two XLA:CPU pool threads per fake device: with one per device the in-process all-reduce can
# starve and abort (see lstm_jax.hostenv, MIN_POOL_THREADS_PER_DEVICE).
os.environ.setdefault("PJRT_NPROC", "16")
# No persistent compilation cache in ~/.cache from tests (tests/test_compile_cache.py turns it on).
os.environ.setdefault("LSTM_JAX_COMPILE_CACHE", "0")
# Instead one for this test session, in a fresh temporary directory removed at its end: many tests
# build the same small programs, in this process and in the `lstm-jax` processes they start
# (which inherit the variables), and each is compiled once. A program is the same program from the
# cache, so no test's result depends on it.
SESSION_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")
SESSION_XLA_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    SESSION_XLA_CACHE = tempfile.mkdtemp(prefix="lstm_jax_tests_xla_")
    os.environ.update(zip(SESSION_CACHE_VARIABLES, (SESSION_XLA_CACHE, "0", "0")))

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_sessionfinish(session, exitstatus):
    if SESSION_XLA_CACHE is not None:
        shutil.rmtree(SESSION_XLA_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a URL fails the test."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("tests must not touch the network")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def config_file(name: str, **overrides):
    """configs/<name>.py with `overrides` ({"model.hidden_size": 64, "max_steps": 3, ...})."""
    from lstm_jax.config import load_config_file
    c = load_config_file(str(REPO / "configs" / f"{name}.py"))
    for key, value in overrides.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def tiny_config(**overrides):
    """configs/tiny.py (small model, 1 device), 20 steps, logging every 5, plus `overrides`."""
    return config_file("tiny", **{"max_steps": 20, "log_every": 5, **overrides})


def cli_flags(config) -> list[str]:
    """`--config.FIELD=VALUE` for every field where `config` differs from the default config."""
    from lstm_jax.config import flat_items, get_config
    default = dict(flat_items(get_config()))
    flags = []
    for name, value in flat_items(config):
        if value != default[name]:
            assert not isinstance(value, (tuple, list)), f"cannot pass {name}={value!r} as a flag"
            flags.append(f"--config.{name}={value}")
    return flags


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a multi-process coordinator)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def param_arrays(model) -> dict:
    """A model's parameters as host arrays, by path."""
    import numpy as np
    from flax import nnx
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_same_arrays(got: dict, want: dict) -> None:
    import numpy as np
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def latest_step(workdir):
    """The newest checkpoint step of a workdir (read-only)."""
    from lstm_jax import checkpoint
    checkpointer = checkpoint.Checkpointer(workdir, read_only=True)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


def write_corpus(tmp_path, text: str, name: str = "corpus.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture
def repetitive_corpus(tmp_path):
    """A small, highly predictable corpus: loss must drop fast on it."""
    return write_corpus(tmp_path, "the quick brown fox jumps over the lazy dog. " * 400)

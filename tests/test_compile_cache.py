"""The persistent compilation cache: a first `lstm-jax sample` writes entries into the user cache
directory, a second start of the same command loads them instead of compiling; off with
--nocompile_cache."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, SESSION_CACHE_VARIABLES, write_corpus
from lstm_jax import cli

# Counts JAX's persistent-cache hits in the child, then runs `lstm-jax ARGS`.
COUNT_HITS = ("import sys, jax, jax.monitoring\n"
              "hits = []\n"
              "jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) "
              "if name == '/jax/compilation_cache/cache_hits' else None)\n"
              "from lstm_jax import cli\n"
              "code = cli.main(['lstm-jax'] + sys.argv[1:])\n"
              "print('HITS', len(hits))\n"
              "sys.exit(code)\n")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("c"), "the quick brown fox jumps over the lazy dog. " * 400)
    w = tmp_path_factory.mktemp("w") / "run"
    assert cli.main(["lstm-jax", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(w),
                     f"--config.corpus={corpus}", "--config.max_steps=2", "--noprogress"]) == 0
    return w


def sample_hits(workdir, cache, *flags) -> int:
    env = {k: v for k, v in os.environ.items() if k not in SESSION_CACHE_VARIABLES}   # own cache only
    env.update(LSTM_JAX_CACHE_DIR=str(cache), LSTM_JAX_COMPILE_CACHE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", COUNT_HITS, "sample", "--workdir", str(workdir),
                           "--num_samples=2", "--length=20", *flags], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.rsplit("HITS ", 1)[1])


def test_second_start_loads_the_cached_programs(workdir, tmp_path):
    cache = tmp_path / "cache"
    assert sample_hits(workdir, cache) == 0
    entries = list((cache / "xla").iterdir())
    assert entries, "the first start wrote no cache entry"
    assert sample_hits(workdir, cache) >= 1


def test_nocompile_cache_writes_nothing(workdir, tmp_path):
    cache = tmp_path / "cache"
    assert sample_hits(workdir, cache, "--nocompile_cache") == 0
    assert not (cache / "xla").exists() or not list((cache / "xla").iterdir())

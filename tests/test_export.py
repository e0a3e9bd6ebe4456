"""`lstm-jax export`: the exported sampler, run by its loader in a process where lstm_jax cannot be
imported, gives exactly `lstm-jax sample`'s rows; it is lowered for cpu, cuda and tpu."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, write_corpus
from lstm_jax import cli
from lstm_jax.data import Vocab

TINY = ["--config", str(REPO / "configs" / "tiny.py")]
# Runs a script with lstm_jax made unimportable (an installed copy too), from an isolated
# interpreter (-I: no PYTHONPATH, no script directory on sys.path).
NO_PACKAGE = ("import sys, runpy\n"
              "sys.modules['lstm_jax'] = None\n"
              "try:\n    import lstm_jax\nexcept ImportError:\n    pass\n"
              "else:\n    raise SystemExit('lstm_jax is importable')\n"
              "sys.argv = sys.argv[1:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_cli(*args):
    return cli.main(["lstm-jax", *args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("c"), "the quick brown fox jumps over the lazy dog. " * 400)
    workdir = tmp_path_factory.mktemp("w") / "run"
    assert run_cli("train", *TINY, "--workdir", str(workdir), f"--config.corpus={corpus}",
                   "--config.max_steps=10", "--config.model.num_layers=2", "--noprogress") == 0
    out = tmp_path_factory.mktemp("x") / "sampler.lstmx"
    assert run_cli("export", "--workdir", str(workdir), "--out", str(out), "--steps=32") == 0
    return workdir, out


def run_loader(loader, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([sys.executable, "-I", "-c", NO_PACKAGE, str(loader), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=loader.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("filters", [[], ["--top_k=5", "--top_p=0.9"]])
def test_exported_rows_equal_lstm_jax_sample_without_the_package(exported, tmp_path, filters):
    workdir, out = exported
    args = ["--num_samples=5", "--length=70", "--temperature=0.5,1.0,0", "--seed=3",
            "--prime=the qu", *filters]   # 70 chars after a 6-char prime: 3 calls of 32 steps
    ref = tmp_path / "ref.jsonl"
    assert run_cli("sample", "--workdir", str(workdir), *args, f"--out={ref}") == 0
    got = tmp_path / "got.jsonl"
    run_loader(out.parent / "load_exported.py", out, *args, f"--out={got}")
    want_rows = [json.loads(l) for l in ref.read_text().splitlines()]
    got_rows = [json.loads(l) for l in got.read_text().splitlines()]
    assert len(got_rows) == 5 and got_rows == want_rows
    assert len({r["text"] for r in got_rows}) > 1


def test_export_file_holds_three_platforms_and_the_vocabulary(exported):
    workdir, out = exported
    with np.load(out) as z:
        meta = json.loads(z["meta"].tobytes())
        assert sorted(k for k in z.files if k.startswith("program_")) == ["program_filtered", "program_plain"]
    assert meta["platforms"] == ["cpu", "cuda", "tpu"]
    assert tuple(meta["chars"]) == Vocab.load(workdir / "vocab.json").chars
    assert meta["num_layers"] == 2 and meta["rows"] == 64 and meta["steps"] == 32


def test_export_stdout_text_and_bad_prime(exported):
    _, out = exported
    proc = run_loader(out.parent / "load_exported.py", out, "--num_samples=2", "--length=10",
                      "--temperature=0", "--prime=the ")
    lines = proc.stdout.splitlines()
    assert lines[0] == "----- sample 0, temperature 0" and lines[1] == lines[3]
    assert len(lines[1]) == len("the ") + 10


def test_export_refuses_an_unknown_platform(exported, tmp_path):
    workdir, _ = exported
    with pytest.raises(SystemExit, match="platforms must be some of"):
        run_cli("export", "--workdir", str(workdir), "--out", str(tmp_path / "s"), "--platforms=cpu,rocm9")
    assert not (tmp_path / "s").exists()

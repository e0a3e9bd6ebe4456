"""Each script in examples/ runs as its docstring says (tiny sizes), in its own process."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, write_corpus
from lstm_jax import cli

EXAMPLES = REPO / "examples"


def run(script, *args, cwd, package=True):
    env = dict(os.environ)
    if package:   # lstm_jax from this checkout (installed or not)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    else:
        env.pop("PYTHONPATH", None)
    cmd = [sys.executable, *(() if package else ("-I",)), str(EXAMPLES / script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("c"), "the quick brown fox jumps over the lazy dog. " * 400)
    w = tmp_path_factory.mktemp("w") / "run"
    assert cli.main(["lstm-jax", "train", "--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(w),
                     f"--config.corpus={corpus}", "--config.max_steps=5", "--noprogress"]) == 0
    return w, corpus


def test_own_training_loop_learns(workdir, tmp_path):
    _, corpus = workdir
    out = run("own_training_loop.py", "--text", corpus, "--steps", "100", "--hidden", "32",
              "--batch", "16", "--seq_len", "20", cwd=tmp_path)
    first = float(out.splitlines()[0].split("val_loss ")[1].split()[0])
    last = float(out.splitlines()[-1].split("val_loss ")[1])
    assert last < first - 1.0, out


def test_generate_many_writes_thousands_of_rows(workdir, tmp_path):
    w, _ = workdir
    out = tmp_path / "rows.jsonl"
    printed = run("generate_many.py", "--workdir", w, "--num_samples", "2048", "--length", "8",
                  "--out", out, cwd=tmp_path)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(2048)) and "wrote 2,048 rows" in printed
    assert [r["prime"] for r in rows[:3]] == ["the ", "a ", "\n"] and all(len(r["text"]) == 8 for r in rows)


def test_use_exported_without_the_package(workdir, tmp_path):
    w, _ = workdir
    assert cli.main(["lstm-jax", "export", "--workdir", str(w), "--out", str(tmp_path / "x" / "s.lstmx"),
                     "--platforms=cpu"]) == 0
    out = run("use_exported.py", tmp_path / "x" / "s.lstmx", cwd=tmp_path, package=False)
    lines = out.splitlines()
    assert lines[0].startswith("vocabulary of") and "platforms cpu" in lines[0]
    assert len(lines) == 4 and lines[1].startswith("[0, T=0.5] the ")

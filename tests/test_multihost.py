"""Two processes (jax.distributed on 127.0.0.1, one CPU device each), stateful (stream)
training: a SIGTERM to one of them stops both at the same step with one collective save (the
carry sharded across the processes included), and the resumed run is bit-exact."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import (REPO, assert_same_arrays, cli_flags, free_port, latest_step, param_arrays,
                      tiny_config, write_corpus)
from lstm_jax import checkpoint

WORKER = REPO / "tests" / "train_worker.py"


def _start(config, workdir, tmp_path, name, **env) -> list[subprocess.Popen]:
    port = free_port()
    environ = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "LSTM_JAX_TEST_DEVICES": "1",
               "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(REPO)]), **env}
    procs = []
    for i in range(2):
        flags = ["--workdir", str(workdir), "--progress=False", *cli_flags(config),
                 "--config.parallel.distributed=True",
                 f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                 "--config.parallel.num_processes=2", f"--config.parallel.process_id={i}"]
        log = open(tmp_path / f"{name}{i}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "train", *flags], stdout=log,
                                      stderr=subprocess.STDOUT, env=environ, cwd=REPO))
    return procs


def _finish(procs, tmp_path, name, timeout=150) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("hung:\n" + "\n---\n".join((tmp_path / f"{name}{i}.log").read_text()[-2000:]
                                                    for i in range(2)))
    return [(p.returncode, (tmp_path / f"{name}{i}.log").read_text()) for i, p in enumerate(procs)]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_bit_exactly(tmp_path):
    """SIGTERM reaches only process 1. Fails if the processes stop at different steps (the
    collective save then hangs: the test's timeout), if only one exits, or if the resumed
    two-process run differs from an uninterrupted one."""
    corpus = write_corpus(tmp_path, "the quick brown fox jumps over the lazy dog. " * 400)
    config = tiny_config(corpus=corpus, max_steps=16, log_every=2, objective="stream", **{
        "model.hidden_size": 16, "checkpoint.every_steps": 8, "parallel.tune_allocator": False,
        "parallel.num_devices": 0,
        "sample.length": 5})
    whole = _finish(_start(config, tmp_path / "whole", tmp_path, "whole"), tmp_path, "whole")
    assert [rc for rc, _ in whole] == [0, 0], whole

    workdir = tmp_path / "run"
    procs = _start(config, workdir, tmp_path, "run", LSTM_JAX_TEST_STEP_SLEEP="0.3")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        path = workdir / "metrics.jsonl"
        if path.exists() and any('"train_loss"' in line for line in path.read_text().splitlines()):
            break
        assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    stopped = _finish(procs, tmp_path, "run", timeout=90)
    assert [rc for rc, _ in stopped] == [143, 143], stopped
    match = re.search(r"received SIGTERM: saved a checkpoint at step (\d+)", stopped[0][1])
    assert match, stopped[0][1]
    step = int(match.group(1))
    assert 0 < step < 16 and latest_step(workdir) == step

    resumed = _finish(_start(config, workdir, tmp_path, "resumed"), tmp_path, "resumed")
    assert [rc for rc, _ in resumed] == [0, 0], resumed
    assert f"from step {step}" in resumed[0][1]
    assert_same_arrays(param_arrays(checkpoint.restore_model(workdir)[0]),
                       param_arrays(checkpoint.restore_model(tmp_path / "whole")[0]))
    steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()
             if '"train_loss"' in l]
    assert steps == sorted(set(steps))

"""hostenv: the CPU host settings (allocator, CPU device count, XLA:CPU pool) `lstm-jax train` applies."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


_SOAK_SCRIPT = textwrap.dedent("""
    import sys, jax, numpy as np
    from lstm_jax import hostenv
    assert hostenv.configure_cpu_devices(2) == 2
    from lstm_jax import parallel, train
    from lstm_jax.config import get_config
    c = get_config(); c.model.hidden_size, c.seq_len, c.batch_size = 64, 32, 32
    mesh = parallel.make_mesh()
    tx = train.make_optimizer(c, 1000)
    graphdef, state = train.init_state(c, train.model_config(c, 50), tx, mesh)
    step = train.make_train_step(graphdef, tx, c)
    rng, key = np.random.default_rng(0), jax.random.key(0)
    batches = [parallel.to_global(rng.integers(0, 50, (32, 33)).astype(np.int32), mesh)
               for _ in range(4)]
    for i in range(int(sys.argv[1])):   # async dispatch: up to 500 steps in flight
        state, metrics = step(state, batches[i % 4], key)
        if i % 500 == 0:
            jax.device_get(metrics)
    print(float(jax.device_get(metrics["loss"])))
""")


@pytest.mark.slow
def test_two_cpu_devices_soak_does_not_hang():
    """3,000 all-reducing train steps on two CPU devices set up by configure_cpu_devices. With
    XLA:CPU's default pool (one thread per device) this aborted within ~500 steps ("Expected 2
    threads to join the rendezvous"); two threads per device (PJRT_NPROC) fixed it."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", _SOAK_SCRIPT, "3000"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.isfinite(float(proc.stdout.strip().splitlines()[-1]))


def test_tune_cpu_allocator_reports_what_it_applied():
    from lstm_jax import hostenv
    import platform
    applied = hostenv.tune_cpu_allocator()
    if platform.libc_ver()[0] == "glibc":
        assert applied == hostenv.DEFAULT_MALLOPT
    else:
        assert applied == {}
    env = hostenv.allocator_env()
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_MMAP_MAX_"] == "0"
    with pytest.raises(ValueError):
        hostenv.tune_cpu_allocator({"M_NOPE": 1})


def test_configure_cpu_devices_too_late_warns(monkeypatch):
    from lstm_jax import hostenv
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if jax.config.jax_num_cpu_devices not in (-1, None):
        pytest.skip("jax_num_cpu_devices was set explicitly in this process")
    jax.devices()  # backends are initialised in this process
    with pytest.warns(RuntimeWarning, match="before any JAX computation"):
        assert hostenv.configure_cpu_devices(2) is None


def test_configure_cpu_devices_in_fresh_process():
    code = ("from lstm_jax import hostenv; import os, jax; n = hostenv.configure_cpu_devices(2); "
            "print(n, jax.device_count(), os.environ.get('PJRT_NPROC'), os.environ.get('XLA_FLAGS'))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, count, nproc, flags = proc.stdout.split()[:4]
    assert (n, count, nproc) == ("2", "2", "4")
    assert "--xla_cpu_multi_thread_eigen=false" in proc.stdout

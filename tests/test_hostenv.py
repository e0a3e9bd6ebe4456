"""hostenv: the host settings `lstm-jax train` applies (allocator, CPU device count, XLA:CPU pool),
only on CPU runs; the decision is tested on CPU by forcing the platform argument."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import pytest

from lstm_jax import hostenv

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"     # hostbench.py: the benchmark-only host helpers
sys.path.insert(0, str(BENCHMARKS))
import hostbench  # noqa: E402


def _fresh_env(**extra) -> dict:
    """This process's environment without the CPU device/pool settings conftest makes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "PJRT_NPROC", "NPROC", "JAX_NUM_CPU_DEVICES")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    env.update(extra)
    return env


def _run(code: str, env: dict, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


# --- the decision (pure) -----------------------------------------------------------------------

def _plan(**kw):
    args = dict(platform="cpu", hidden_size=32, batch_size=16, cpu_devices=0, tune_allocator=True,
                env={}, cores=2, jax_num_cpu_devices=-1)
    args.update(kw)
    return hostenv.plan_host(**args)


@pytest.mark.parametrize("platform", ["gpu", "cuda", "tpu", "rocm"])
def test_nothing_cpu_only_is_planned_off_the_cpu(platform):
    """GPU/TPU runs get no mallopt, no CPU device count, no pool, no XLA:CPU flags, even when the
    environment forces 8 CPU devices. Catches CPU tuning leaking onto accelerator hosts."""
    plan = _plan(platform=platform, cpu_devices=-1,
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert plan == hostenv.HostPlan(platform=hostenv.normalize_platform(platform))
    assert not plan.tune_allocator and plan.pool_threads is None and not plan.xla_flags
    assert "CPU host tuning skipped" in plan.summary()


@pytest.mark.parametrize("source, kw, n", [
    ("XLA_FLAGS", dict(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}), 8),
    ("jax_num_cpu_devices", dict(jax_num_cpu_devices=3), 3),
    ("parallel.cpu_devices", dict(cpu_devices=4), 4),
    ("one per core", dict(cpu_devices=-1, cores=6), 6),
    ("auto", dict(cores=2), 2),
])
def test_pool_is_sized_from_the_effective_device_count_whatever_set_it(source, kw, n):
    """Issue #11: with 8 devices forced through XLA_FLAGS the pool was left at XLA's default and the
    all-reduce aborted under load. Every source of the count now gets >= 2 threads per device."""
    plan = _plan(**kw)
    cores = kw.get("cores", 2)
    assert plan.cpu_devices == n and plan.source.startswith(source)
    assert plan.pool_threads == max(cores, 2 * n)
    assert plan.xla_flags == ("--xla_cpu_multi_thread_eigen=false",)
    # counts the environment fixed are left to it; the others are set by hostenv
    assert plan.num_cpu_devices == (None if source in ("XLA_FLAGS", "jax_num_cpu_devices") else n)
    assert f"{n} CPU device(s)" in plan.summary() and f"pool {max(cores, 2 * n)}" in plan.summary()


def test_explicit_counts_take_precedence_as_jax_applies_them():
    """jax_num_cpu_devices beats the XLA flag (as JAX does), both beat parallel.cpu_devices, and the
    overridden config value is named in the plan."""
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert _plan(env=env, jax_num_cpu_devices=3).cpu_devices == 3
    plan = _plan(env=env, cpu_devices=2)
    assert plan.cpu_devices == 8 and "parallel.cpu_devices=2 ignored" in plan.summary()


@pytest.mark.parametrize("hidden, batch, vocab, expected", [
    (128, 128, 57, 2),      # the Keras reference model: one device per core
    (256, 32, 103, 2),      # the default config's shape
    (512, 32, 57, 1),       # big GEMMs already use every core
    (256, 32, 10_000, 1),   # a large vocabulary: the head's GEMM dominates
    (256, 31, 57, 1),       # the batch does not split over 2 cores
])
def test_the_auto_device_rule_follows_the_measured_grid(hidden, batch, vocab, expected):
    """Fails if a bound of the rule moves off what the batch grid measured (benchmarks/README.md)
    or the vocabulary is ignored."""
    assert hostenv.recommended_cpu_devices(hidden, batch, cores=2, vocab_size=vocab) == expected
    plan = _plan(hidden_size=hidden, batch_size=batch, vocab_size=vocab)
    assert plan.cpu_devices == expected and f"vocab {vocab}" in plan.summary()


def test_auto_creates_exactly_the_devices_a_sized_mesh_uses():
    """parallel.num_devices sizes the auto count (fails if a 1-device mesh still gets a device per
    core, or an 8-device mesh only 2); an explicit cpu_devices still wins."""
    assert _plan(mesh_devices=1).cpu_devices == 1
    assert _plan(mesh_devices=8).cpu_devices == 8 and "parallel.num_devices" in _plan(mesh_devices=8).summary()
    assert _plan(mesh_devices=1, cpu_devices=-1).cpu_devices == 2


def test_one_device_gets_no_pool_or_flags_and_big_models_get_one_device():
    plan = _plan(hidden_size=512)
    assert (plan.cpu_devices, plan.pool_threads, plan.xla_flags) == (1, None, ())
    assert plan.tune_allocator and "malloc tuned" in plan.summary()
    assert _plan(batch_size=15).cpu_devices == 1   # the batch must split over the devices


def test_unsafe_explicit_pool_is_refused_in_one_line():
    with pytest.raises(hostenv.UnsafeHostSetting, match=r"PJRT_NPROC=12 .* at least 16$"):
        _plan(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "12"})
    plan = _plan(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "PJRT_NPROC": "16"})
    assert plan.pool_threads is None                                  # a safe explicit pool stays
    assert _plan(env={"NPROC": "4"}, cpu_devices=4).pool_threads == 8  # PJRT_NPROC overrides NPROC


def test_user_xla_flags_are_respected():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=true"}
    assert _plan(env=env).xla_flags == ()
    with pytest.raises(ValueError, match="device_count=zero"):
        _plan(env={"XLA_FLAGS": "--xla_force_host_platform_device_count=zero"})


def test_confirm_names_a_wrong_platform_guess():
    assert _plan().confirm("cpu") is None
    assert "JAX_PLATFORMS=cpu" in _plan(platform="gpu").confirm("cpu")


# --- applying it, in fresh processes ---------------------------------------------------------

_SETUP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from lstm_jax import hostenv
    plan = hostenv.setup_host(hidden_size=32, batch_size=16, cpu_devices=int(sys.argv[1]))
    import jax
    print(json.dumps({"summary": plan.summary(), "platform": plan.platform,
                      "devices": jax.device_count(), "backend": jax.default_backend(),
                      "pjrt_nproc": os.environ.get("PJRT_NPROC"),
                      "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "mallopt": hostenv.applied_allocator_settings()}))
""")


@pytest.mark.parametrize("env, cpu_devices, n", [
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, 0, 8),
    ({"JAX_NUM_CPU_DEVICES": "3"}, 0, 3),
    ({}, 2, 2),
])
def test_setup_host_in_fresh_process(env, cpu_devices, n):
    """What setup_host applies is what JAX then uses: the device count, and PJRT_NPROC =
    max(cores, 2 per device) for that effective count."""
    proc = _run(_SETUP_SCRIPT, _fresh_env(**env), cpu_devices)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == n and out["backend"] == "cpu"
    assert out["pjrt_nproc"] == str(max(hostenv.cpu_count(), 2 * n))
    assert "--xla_cpu_multi_thread_eigen=false" in out["xla_flags"]


def test_setup_host_changes_nothing_when_the_run_is_on_an_accelerator():
    """JAX_PLATFORMS=cuda (platform guessed 'gpu' without initialising JAX): no mallopt, no
    PJRT_NPROC, no XLA flags, no CPU device count, even with parallel.cpu_devices=-1."""
    code = textwrap.dedent("""
        import json, os
        from lstm_jax import hostenv
        plan = hostenv.setup_host(hidden_size=32, batch_size=16, cpu_devices=-1)
        import jax
        print(json.dumps({"platform": plan.platform, "summary": plan.summary(),
                          "pjrt_nproc": os.environ.get("PJRT_NPROC"),
                          "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "num_cpu_devices": jax.config.jax_num_cpu_devices,
                          "mallopt": hostenv.applied_allocator_settings()}))
    """)
    proc = _run(code, _fresh_env(JAX_PLATFORMS="cuda"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["platform"] == "gpu" and "skipped" in out["summary"]
    assert (out["pjrt_nproc"], out["xla_flags"], out["mallopt"]) == (None, "", {})
    assert out["num_cpu_devices"] in (-1, None)


def test_configure_cpu_devices_in_fresh_process():
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
            "import hostbench; import os, jax; n = hostbench.configure_cpu_devices(2); "
            "print(n, jax.device_count(), os.environ.get('PJRT_NPROC'), os.environ.get('XLA_FLAGS'))")
    proc = _run(code, _fresh_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n, count, nproc, flags = proc.stdout.split()[:4]
    assert (n, count, nproc) == ("2", "2", str(max(hostenv.cpu_count(), 4)))
    assert "--xla_cpu_multi_thread_eigen=false" in proc.stdout


def test_configure_cpu_devices_too_late_warns(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if jax.config.jax_num_cpu_devices not in (-1, None):
        pytest.skip("jax_num_cpu_devices was set explicitly in this process")
    jax.devices()  # backends are initialised in this process
    with pytest.warns(RuntimeWarning, match="before any JAX computation"):
        assert hostbench.configure_cpu_devices(2) is None


# --- the allocator -----------------------------------------------------------------------------

_MALLOC_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    from lstm_jax import hostenv
    applied = hostenv.tune_cpu_allocator() if sys.argv[1] == "tuned" else {}
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    before = libc.mallinfo2()
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    during = libc.mallinfo2()
    libc.free(p)
    after = libc.mallinfo2()
    print(json.dumps({"applied": applied,
                      "mmapped": during.hblkhd - before.hblkhd >= size,
                      # the heap grows by the block less what was free at its top already
                      "heap_kept_after_free": after.arena - before.arena >= size // 2}))
""")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and
                         __import__("platform").libc_ver()[0] == "glibc"), reason="glibc only")
def test_tune_cpu_allocator_takes_effect():
    """Read back through glibc's mallinfo2 in fresh processes: untuned, a 64 MiB malloc is an
    mmap (the control); tuned, it comes from the heap and the heap is not trimmed after free.
    Catches a wrong mallopt parameter number or value, or settings reported but not applied."""
    untuned, tuned = (json.loads(_run(_MALLOC_SCRIPT, _fresh_env(), mode).stdout.splitlines()[-1])
                      for mode in ("untuned", "tuned"))
    assert untuned["mmapped"] and not untuned["heap_kept_after_free"]
    assert tuned["applied"] == hostenv.DEFAULT_MALLOPT
    assert not tuned["mmapped"] and tuned["heap_kept_after_free"]


def test_allocator_env_and_unknown_parameter():
    env = hostbench.allocator_env()
    assert env["MALLOC_ARENA_MAX"] == "1" and env["MALLOC_MMAP_MAX_"] == "0"
    with pytest.raises(ValueError, match="M_NOPE"):
        hostenv.tune_cpu_allocator({"M_NOPE": 1})


# --- the soak test -----------------------------------------------------------------------------

_SOAK_SCRIPT = textwrap.dedent("""
    import functools, sys, time
    from lstm_jax import hostenv
    plan = hostenv.setup_host(hidden_size=32, batch_size=16, cpu_devices=0)
    print(plan.summary(), flush=True)
    import jax, numpy as np, optax
    from flax import nnx
    from lstm_jax import parallel
    from lstm_jax.model import CharLSTM, ModelConfig
    graphdef, params = nnx.split(CharLSTM(ModelConfig(vocab_size=50, hidden_size=32),
                                          rngs=nnx.Rngs(0)))
    mesh = parallel.make_mesh()
    tx = optax.rmsprop(1e-3)
    state = jax.device_put((params, tx.init(params)), parallel.replicated(mesh))

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):            # steps.py's step: gradients all-reduced over the mesh
        params, opt_state = state
        def loss(p):
            logits = nnx.merge(graphdef, p)(batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    rng = np.random.default_rng(0)
    batches = [parallel.to_global(rng.integers(0, 50, (16, 17)).astype(np.int32), mesh)
               for _ in range(4)]
    t0 = time.perf_counter()
    for i in range(int(sys.argv[1])):  # async dispatch: many steps in flight
        state, loss = step(state, batches[i % 4])
        if i % 500 == 0:
            jax.block_until_ready(loss)
    print(jax.device_count(), float(loss), round(time.perf_counter() - t0, 1), flush=True)
""")


@pytest.mark.slow
def test_eight_forced_cpu_devices_under_load_do_not_abort():
    """4,000 all-reducing train steps on 8 CPU devices forced through XLA_FLAGS, with one busy
    process per core loading the host, set up by `setup_host` (issue #11). Without the pool sized
    from the effective count (XLA's default 8 threads, or anything below 16) this aborted within
    ~20 s: "Termination timeout for all reduce ... Expected 8 threads to join the rendezvous"
    (the XLA timeouts are shortened to 10 s here so a hang fails fast). Loads the cores: run it
    alone."""
    env = _fresh_env(XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                               "--xla_cpu_collective_call_warn_stuck_timeout_seconds=5 "
                               "--xla_cpu_collective_call_terminate_timeout_seconds=10")
    load = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(hostenv.cpu_count())]
    try:
        t0 = time.perf_counter()
        proc = _run(_SOAK_SCRIPT, env, 4000, timeout=180)
    finally:
        for p in load:
            p.kill()
            p.wait()
    assert proc.returncode == 0, f"after {time.perf_counter() - t0:.0f} s:\n{proc.stderr[-3000:]}"
    summary, last = proc.stdout.strip().splitlines()[0], proc.stdout.strip().splitlines()[-1]
    assert "8 CPU device(s) (XLA_FLAGS)" in summary and "pool" in summary
    devices, loss, seconds = last.split()
    assert devices == "8" and float(loss) == float(loss)   # finite, not NaN

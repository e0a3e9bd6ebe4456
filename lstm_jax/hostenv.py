"""Host (CPU) settings that make LSTM training fast and safe on a CPU host, and only there.

`setup_host(...)` is the one call a command line makes before JAX initialises its backends: it
guesses the platform the run will use, decides (`plan_host`, a pure function of the platform, the
model size, the environment and the core count, tested on CPU by passing "gpu" or "tpu"), applies
the decision, and returns a `HostPlan` that prints as one start-up line. On a GPU/TPU host it
changes nothing: every knob below is CPU-only.

The knobs, each applied to *this* process only, none of which initialises JAX:

* glibc `mallopt` (`tune_cpu_allocator`): XLA's CPU runtime frees and re-allocates its big
  temporaries (MBs) every step; with glibc's defaults they are fresh `mmap`s (page faults, `munmap`)
  or heap tops trimmed back to the kernel. No mmap + no trim keeps them on the heap, warm. Only the
  pair helps (either setting alone was slower than neither); with one device per core the
  per-device buffers are small enough that it makes no difference.
* CPU device count (`jax_num_cpu_devices`): one device per core lets a data-parallel step (batch
  split over a 'data' mesh) use every core. Pays off where one device's per-timestep matmuls are
  too small to use several cores (`recommended_cpu_devices`).
* XLA:CPU thread pool (`PJRT_NPROC`), sized from the *effective* CPU device count, whatever set it
  (`--xla_force_host_platform_device_count` in XLA_FLAGS, `jax_num_cpu_devices` /
  JAX_NUM_CPU_DEVICES, or the rule above): with several devices, at least 2 threads per device
  (`MIN_POOL_THREADS_PER_DEVICE`). XLA:CPU runs every device's programs, collectives included, on
  one shared pool; a device waiting in the in-process all-reduce holds a thread, and so does the
  dispatch of the next step. With fewer threads the train step aborts under load ("Termination
  timeout for all reduce ... Expected 8 threads to join the rendezvous, but only 7 of them
  arrived"; tests/test_hostenv.py soaks it, benchmarks/README.md has the measurements). An explicit PJRT_NPROC below that bound is refused
  (`UnsafeHostSetting`).
* `--xla_cpu_multi_thread_eigen=false` with several devices: each device's matmuls run on its own
  thread (less oversubscription); this flag alone does not stop the all-reduce abort.

Start-up order in a CLI (before anything touches JAX arrays):

    from lstm_jax import hostenv
    plan = hostenv.setup_host(hidden_size=256, batch_size=32, cpu_devices=0, tune_allocator=True)
    print(plan.summary())
    ...                                   # then build mesh, model, train

Measurements behind each choice: benchmarks/README.md and benchmarks/results/train_cpu.json.
Benchmark-only helpers (`configure_cpu_devices`, `allocator_env`, `describe`) live in
benchmarks/hostbench.py.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import os
import platform
import re
import sys
import warnings
from typing import Mapping, Optional

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_TEST = -7
M_ARENA_MAX = -8

# The largest mmap threshold glibc accepts on 64-bit hosts (HEAP_MAX_SIZE / 2 = 32 MiB).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024

# Defaults chosen by measurement (see `tune_cpu_allocator`).
DEFAULT_MALLOPT = {
    "M_MMAP_MAX": 0,                      # never serve malloc from fresh mmaps
    "M_TRIM_THRESHOLD": 2 ** 31 - 1,      # never give heap tops back to the kernel
    "M_ARENA_MAX": 1,                     # one arena: freed blocks are reused by every thread
}

_PARAMS = {
    "M_TRIM_THRESHOLD": M_TRIM_THRESHOLD,
    "M_TOP_PAD": M_TOP_PAD,
    "M_MMAP_THRESHOLD": M_MMAP_THRESHOLD,
    "M_MMAP_MAX": M_MMAP_MAX,
    "M_ARENA_TEST": M_ARENA_TEST,
    "M_ARENA_MAX": M_ARENA_MAX,
}

_applied: dict[str, int] = {}

# XLA:CPU pool threads per CPU device when there are several (see the module docstring): 2n - 1
# aborted, 2n did not, for n = 2 and n = 8.
MIN_POOL_THREADS_PER_DEVICE = 2

_FORCE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_EIGEN_FLAG = "--xla_cpu_multi_thread_eigen"


class UnsafeHostSetting(ValueError):
    """An explicit setting that XLA:CPU is known to abort with; the message names the fix."""


def _glibc() -> Optional[ctypes.CDLL]:
    if not sys.platform.startswith("linux"):
        return None
    libc_name, _ = platform.libc_ver()
    if libc_name != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


def tune_cpu_allocator(settings: Optional[dict[str, int]] = None) -> dict[str, int]:
    """Applies glibc `mallopt` settings to this process; returns {name: value} of what was applied.

    `settings` maps names from `_PARAMS` (e.g. "M_MMAP_MAX") to ints; default `DEFAULT_MALLOPT`:
    no mmap-backed mallocs, no heap trimming, one arena. A no-op returning {} off glibc (macOS,
    Windows, musl) or when `LSTM_JAX_NO_MALLOC_TUNING=1`. It changes only host-side malloc (the
    same memory is kept for reuse instead of returned to the kernel, so the resident set stays at
    the peak of the step instead of dropping between steps); `setup_host` applies it on CPU runs only.
    """
    if os.environ.get("LSTM_JAX_NO_MALLOC_TUNING", "") not in ("", "0"):
        return {}
    libc = _glibc()
    if libc is None:
        return {}
    settings = DEFAULT_MALLOPT if settings is None else settings
    applied = {}
    for name, value in settings.items():
        if name not in _PARAMS:
            raise ValueError(f"unknown mallopt parameter {name!r}; use one of {sorted(_PARAMS)}")
        if name == "M_MMAP_THRESHOLD":
            value = min(int(value), _MMAP_THRESHOLD_MAX)
        if libc.mallopt(_PARAMS[name], int(value)) == 1:
            applied[name] = int(value)
    _applied.update(applied)
    return applied


def applied_allocator_settings() -> dict[str, int]:
    """What `tune_cpu_allocator` has applied in this process so far."""
    return dict(_applied)


def _backends_initialized() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except Exception:  # private API moved: assume not initialised and let jax validate
        return False


def cpu_flags_line() -> str:
    """This CPU's feature flags as the OS reports them (the `flags` line of /proc/cpuinfo, else
    `platform.processor()`): what the native build is keyed by and the recipe reads."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("flags"):
                return line.rstrip("\n")
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> set[str]:
    """The feature flags of `cpu_flags_line()` as a set, e.g. {'avx2', 'avx512f', 'avx512_bf16'}."""
    line = cpu_flags_line()
    return set(line.split(":", 1)[1].split()) if line.startswith("flags") else set()


def bf16_on_native_kernel(flags: Optional[set[str]] = None) -> bool:
    """Whether bfloat16 matmuls are faster on the native kernel than through XLA on this CPU:
    AVX512-BF16 without AMX (where AMX is present, XLA's bf16 matmuls use its tiles and win;
    benchmarks/README.md, "Native recurrence"). `flags`: default, this CPU's."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def cpu_count() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- which platform will the run use? ---------------------------------------------------------

_PLUGIN_PLATFORMS = {
    "jax-cuda12-plugin": "gpu", "jax-cuda13-plugin": "gpu", "jax-cuda12-pjrt": "gpu",
    "jax-cuda13-pjrt": "gpu", "jax-rocm6-plugin": "gpu", "jax-rocm7-plugin": "gpu",
    "libtpu": "tpu", "libtpu-nightly": "tpu", "jax-metal": "METAL",
}
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu", "metal": "METAL"}


def normalize_platform(name: str) -> str:
    """'cuda'/'rocm'/'gpu' -> 'gpu'; 'cpu', 'tpu' as they are (JAX's `default_backend()` names)."""
    return _ALIASES.get(name.strip().lower(), name.strip())


def guess_platform() -> str:
    """The platform of JAX's default backend, without initialising JAX when it is not yet.

    Exact once JAX's backends are up; before that: the first entry of JAX_PLATFORMS /
    jax_platforms, else the installed accelerator plugin (jax-cuda*/rocm* -> 'gpu', libtpu ->
    'tpu'), else 'cpu'. A plugin installed on a host without its device makes this guess 'gpu'
    where JAX falls back to the CPU: `HostPlan.confirm` names that after start-up.
    """
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
        if _backends_initialized():
            return normalize_platform(sys.modules["jax"].default_backend())
    if platforms:
        return normalize_platform(platforms.split(",")[0])
    from importlib import metadata
    for dist, name in _PLUGIN_PLATFORMS.items():
        try:
            metadata.version(dist)
            return name
        except metadata.PackageNotFoundError:
            continue
    return "cpu"


# --- the decision: a pure function of its arguments ----------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostPlan:
    """What `plan_host` decided for this process, and why (`summary()` is the start-up line).

    `cpu_devices` is the effective CPU device count (None when the run is not on the CPU);
    `num_cpu_devices`, `pool_threads` and `xla_flags` are what `apply_plan` sets (None / () =
    leave as it is); `source` names what fixed the device count.
    """
    platform: str
    cpu_devices: Optional[int] = None
    source: str = ""
    num_cpu_devices: Optional[int] = None
    pool_threads: Optional[int] = None
    xla_flags: tuple[str, ...] = ()
    tune_allocator: bool = False
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.platform != "cpu":
            return f"host: {self.platform} backend; CPU host tuning skipped" + "".join(
                f"; {n}" for n in self.notes)
        parts = [f"host: cpu, {self.cpu_devices} CPU device(s) ({self.source})"]
        if self.pool_threads:
            parts.append(f"XLA:CPU pool {self.pool_threads} threads (PJRT_NPROC)")
        parts += [f for f in self.xla_flags]
        parts.append("malloc tuned" if self.tune_allocator else "malloc untuned")
        return ", ".join(parts) + "".join(f"; {n}" for n in self.notes)

    def confirm(self, actual_platform: str) -> Optional[str]:
        """None if the guessed platform was right; else a one-line note for the start-up log."""
        actual = normalize_platform(actual_platform)
        if actual == self.platform:
            return None
        if actual == "cpu":
            return (f"note: hostenv expected a {self.platform} backend but JAX runs on the CPU, so "
                    f"the CPU host settings were not applied; set JAX_PLATFORMS=cpu to get them")
        return (f"note: hostenv expected a {self.platform} backend but JAX runs on {actual}; the "
                f"CPU host settings applied do not affect it")


def forced_cpu_device_count(xla_flags: str) -> Optional[int]:
    """N from `--xla_force_host_platform_device_count=N` in an XLA_FLAGS string (last one wins)."""
    found = re.findall(rf"{_FORCE_COUNT_FLAG}=(\S*)", xla_flags)
    if not found:
        return None
    try:
        n = int(found[-1])
    except ValueError:
        raise ValueError(f"XLA_FLAGS has {_FORCE_COUNT_FLAG}={found[-1]}; it must be a positive "
                         f"integer") from None
    if n < 1:
        raise ValueError(f"XLA_FLAGS has {_FORCE_COUNT_FLAG}={n}; it must be >= 1")
    return n


def plan_host(*, platform: str, hidden_size: int, batch_size: int, cpu_devices: int = 0,
              tune_allocator: bool = True, env: Mapping[str, str] = {}, cores: int = 1,
              jax_num_cpu_devices: int = -1, single_threaded_devices: bool = True,
              vocab_size: int = 0, mesh_devices: int = 0) -> HostPlan:
    """Decides the host settings for one run; pure (reads only its arguments).

    platform: JAX's default backend for the run ('cpu', 'gpu', 'tpu', ...). Off the CPU nothing is
      planned: allocator, device count and pool are CPU-only.
    hidden_size, batch_size, vocab_size: the model width, the (micro-)batch per step and the
      vocabulary size (0 = unknown), for the auto rule.
    mesh_devices: `parallel.num_devices` of a one-process run (0 = all): with cpu_devices auto,
      exactly that many CPU devices are created (the mesh would leave any more idle).
    cpu_devices: `parallel.cpu_devices`: 0 = auto (`recommended_cpu_devices`), -1 = one per core,
      n > 0 = n. An explicit count in the environment wins over it: `jax_num_cpu_devices` >= 1
      (JAX uses it over the XLA flag), then `--xla_force_host_platform_device_count` in
      env["XLA_FLAGS"].
    env: the process environment (XLA_FLAGS, PJRT_NPROC, NPROC). cores: usable cores.
    Raises UnsafeHostSetting when env pins PJRT_NPROC below 2 threads per device.
    """
    platform = normalize_platform(platform)
    if platform != "cpu":
        return HostPlan(platform=platform)
    if int(cpu_devices) < -1:
        raise ValueError(f"parallel.cpu_devices must be -1 (one per core), 0 (auto) or a positive "
                         f"count, got {cpu_devices}")
    xla_flags = env.get("XLA_FLAGS", "")
    forced = forced_cpu_device_count(xla_flags)
    notes = []
    num_cpu_devices = None
    if jax_num_cpu_devices is not None and jax_num_cpu_devices >= 1:
        n, source = int(jax_num_cpu_devices), "jax_num_cpu_devices"
    elif forced is not None:
        n, source = forced, "XLA_FLAGS"
    elif cpu_devices > 0:
        n, source = int(cpu_devices), "parallel.cpu_devices"
    elif cpu_devices == -1:
        n, source = max(cores, 1), "one per core"
    elif mesh_devices > 0:
        n, source = int(mesh_devices), "parallel.num_devices"
    else:
        n = recommended_cpu_devices(hidden_size, batch_size, cores=cores, vocab_size=vocab_size)
        source = (f"auto: hidden {hidden_size}, batch {batch_size}"
                  + (f", vocab {vocab_size}" if vocab_size else "") + f", {cores} cores")
    if source in ("jax_num_cpu_devices", "XLA_FLAGS") and cpu_devices > 0 and cpu_devices != n:
        notes.append(f"parallel.cpu_devices={cpu_devices} ignored: {source} sets {n}")
    if source not in ("jax_num_cpu_devices", "XLA_FLAGS"):
        num_cpu_devices = n
    pool_threads, flags = None, []
    if n > 1:
        need = MIN_POOL_THREADS_PER_DEVICE * n
        pinned = env.get("PJRT_NPROC", "")
        if pinned:
            try:
                pinned_n = int(pinned)
            except ValueError:
                raise UnsafeHostSetting(f"PJRT_NPROC={pinned!r} is not an integer; unset it or "
                                        f"set it to at least {need}") from None
            if pinned_n < need:
                raise UnsafeHostSetting(
                    f"PJRT_NPROC={pinned_n} gives XLA:CPU fewer than {MIN_POOL_THREADS_PER_DEVICE} "
                    f"threads for each of the {n} CPU devices, and its in-process all-reduce then "
                    f"aborts ('Expected {n} threads to join the rendezvous'); unset PJRT_NPROC or "
                    f"set it to at least {need}")
        else:   # PJRT_NPROC wins over NPROC (a CI core reservation), which may be too small
            pool_threads = max(cores, need)
        if single_threaded_devices and not re.search(rf"{_EIGEN_FLAG}(=|\s|$)", xla_flags):
            flags.append(f"{_EIGEN_FLAG}=false")
    return HostPlan(platform="cpu", cpu_devices=n, source=source, num_cpu_devices=num_cpu_devices,
                    pool_threads=pool_threads, xla_flags=tuple(flags),
                    tune_allocator=bool(tune_allocator), notes=tuple(notes))


# --- applying it -----------------------------------------------------------------------------

def _jax_num_cpu_devices() -> int:
    """The explicit `jax_num_cpu_devices` (config, or JAX_NUM_CPU_DEVICES before jax is imported)."""
    if "jax" in sys.modules:
        value = sys.modules["jax"].config.jax_num_cpu_devices
        return -1 if value is None else int(value)
    raw = os.environ.get("JAX_NUM_CPU_DEVICES", "")
    try:
        return int(raw) if raw else -1
    except ValueError:
        raise ValueError(f"JAX_NUM_CPU_DEVICES={raw!r} must be an integer") from None


def _add_xla_flag(flag: str) -> bool:
    """Appends --name=value to XLA_FLAGS unless --name is already there; True if added."""
    key = flag.split("=")[0]
    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(f.split("=")[0] == key for f in flags):
        return False
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    return True


def apply_plan(plan: HostPlan) -> bool:
    """Applies a CPU `HostPlan` to this process; True if the device settings took effect.

    The allocator is tuned whenever the plan says so; the device count, pool size and XLA flags
    only before JAX initialises its backends (called later it warns and leaves them).
    """
    if plan.platform != "cpu":
        return True
    if plan.tune_allocator:
        tune_cpu_allocator()
    if plan.num_cpu_devices is None and plan.pool_threads is None and not plan.xla_flags:
        return True
    if _backends_initialized():
        warnings.warn(
            "lstm_jax.hostenv: JAX initialised its backends before the host settings were applied; "
            "the CPU device count and XLA:CPU pool stay as they are. Call it before any JAX "
            "computation.", RuntimeWarning, stacklevel=3)
        return False
    if plan.num_cpu_devices is not None:
        import jax  # importing does not initialise backends
        jax.config.update("jax_num_cpu_devices", plan.num_cpu_devices)
    if plan.pool_threads is not None:
        os.environ["PJRT_NPROC"] = str(plan.pool_threads)
    for flag in plan.xla_flags:
        _add_xla_flag(flag)
    return True


def setup_host(*, hidden_size: int, batch_size: int, cpu_devices: int = 0,
               tune_allocator: bool = True, platform: Optional[str] = None,
               vocab_size: int = 0, mesh_devices: int = 0) -> HostPlan:
    """Decides and applies the host settings for one run; returns the plan (print `summary()`).

    The CLI's one call, before JAX initialises its backends. `platform` defaults to
    `guess_platform()`; off the CPU nothing is changed. Raises UnsafeHostSetting (a ValueError)
    with a one-line fix for an explicit PJRT_NPROC that XLA:CPU would abort with.
    """
    plan = plan_host(platform=platform or guess_platform(), hidden_size=hidden_size,
                     batch_size=batch_size, cpu_devices=cpu_devices, tune_allocator=tune_allocator,
                     env=dict(os.environ), cores=cpu_count(),
                     jax_num_cpu_devices=_jax_num_cpu_devices(), vocab_size=vocab_size,
                     mesh_devices=mesh_devices)
    apply_plan(plan)
    return plan


# Bounds of the auto rule, from the batch grid on 2 cores (benchmarks/README.md, "Training speed"):
# one device per core won at hidden 128 and 256 for every batch size measured, one device from
# hidden 512 on; and one device won at large vocabularies (LSTM(256), B=32: two devices ahead at
# V = 500 and 1,000, one device at 3,000 and 10,000), where the head's (B*T, H) x (H, V) GEMM
# dominates the step and is big enough for all cores.
PER_CORE_DEVICES_MAX_HIDDEN = 384
PER_CORE_DEVICES_MAX_VOCAB = 2048


def recommended_cpu_devices(hidden_size: int, batch_size: int = 128,
                            cores: Optional[int] = None, vocab_size: int = 0) -> int:
    """How many CPU devices suit this model on a host with `cores` cores (default: this one).

    One per core for small LSTMs, whose per-step matmuls are too small to use several cores from
    one device; one (multi-threaded) device for large ones, whose GEMMs already use every core and
    which lose more to the smaller per-device batch than they gain, and for large vocabularies
    (`vocab_size`, 0 = unknown), whose softmax head is such a GEMM. Also one device when the batch
    does not split evenly over the cores (the data-parallel step needs it to).
    """
    cores = cpu_count() if cores is None else cores
    if (cores < 2 or hidden_size > PER_CORE_DEVICES_MAX_HIDDEN or batch_size % cores
            or vocab_size > PER_CORE_DEVICES_MAX_VOCAB):
        return 1
    return cores

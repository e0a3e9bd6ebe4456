"""Host (CPU) settings that make LSTM training fast on a CPU host; all safe on GPU/TPU hosts.

Independent knobs, each applied to *this* process only, none of which initialises JAX:

* `tune_cpu_allocator()`: glibc `mallopt` through ctypes. XLA's CPU runtime frees and re-allocates
  its big temporaries (MBs) every step; with glibc's defaults they are fresh `mmap`s (page faults,
  `munmap`) or heap tops trimmed back to the kernel. No mmap + no trim keeps them on the heap, warm.
  Seed model (H=128, B=128, T=60, window objective), one CPU device, same run: 1,735 -> 2,463
  samples/s (+42%). With one device per core the per-device buffers are half as big and it made no
  difference (3,092 untuned vs 3,021 tuned, within noise). Only the pair matters: M_MMAP_MAX=0
  alone (2,098) or M_TRIM_THRESHOLD alone (2,132) were *slower* than neither (3,087) on 2 devices;
  M_ARENA_MAX=1 was neutral (1 device: 2,448 without it vs 2,462 with it).
  Apply before JAX allocates anything big; `allocator_env()` gives the same settings as MALLOC_*
  environment variables for a child process (e.g. a PyTorch baseline).
* `configure_cpu_devices(n)`: `jax_num_cpu_devices = n` (default: the core count) so a CPU host
  shows one JAX device per core and a data-parallel step (batch split over a 'data' mesh) uses
  every core; with n > 1 also an XLA:CPU thread pool of 2 threads per device (PJRT_NPROC), which
  avoids the in-process all-reduce hang, and single-threaded devices. Seed model, malloc tuned:
  3,113 -> 3,837 samples/s on 2 cores (benchmarks/results/train_cpu.json).
  Pays off for small hidden sizes only (`recommended_cpu_devices`). Must run before JAX
  initialises its backends (the first array, computation or `jax.devices()` call).
* `cpu_xla_flags(max_isa=...)`: optional XLA CPU flags, e.g. `--xla_cpu_max_isa=AVX512_BF16`
  where the CPU exposes native bf16 dot instructions (`cpu_has_native_bf16()`); on this project's
  VM (Zen 4 host, AVX-512 hidden by the hypervisor: AVX2 only) bf16 matmuls are emulated and
  slower (seed model on 2 devices: 2,302 vs 3,008 samples/s f32).

Start-up order in a CLI (before anything touches JAX arrays):

    from lstm_jax import hostenv
    hostenv.tune_cpu_allocator()
    hostenv.configure_cpu_devices(hostenv.recommended_cpu_devices(hidden_size, batch_size))
    ...                                   # then build mesh, model, train

Numbers: benchmarks/bench_train.py, benchmarks/results/train_cpu.json (2-core VM shared with other
jobs; medians of interleaved repeats).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import warnings
from typing import Optional

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

# The same settings as environment variables glibc reads at start-up (for a child process such as
# a PyTorch baseline; they do nothing once the process is running).
_ENV_NAMES = {
    "M_TRIM_THRESHOLD": "MALLOC_TRIM_THRESHOLD_",
    "M_TOP_PAD": "MALLOC_TOP_PAD_",
    "M_MMAP_THRESHOLD": "MALLOC_MMAP_THRESHOLD_",
    "M_MMAP_MAX": "MALLOC_MMAP_MAX_",
    "M_ARENA_TEST": "MALLOC_ARENA_TEST",
    "M_ARENA_MAX": "MALLOC_ARENA_MAX",
}

_applied: dict[str, int] = {}

# Intra-op pool threads per CPU device when there are several (see configure_cpu_devices).
MIN_POOL_THREADS_PER_DEVICE = 2


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
    Windows, musl) or when `LSTM_JAX_NO_MALLOC_TUNING=1`. Harmless on GPU/TPU hosts: it changes
    only host-side malloc (the same memory is kept for reuse instead of returned to the kernel, so
    the resident set stays at the peak of the step instead of dropping between steps).

    Measured (2-core VM, seed model H=128 B=128 T=60, custom-VJP step): +42% on one CPU device,
    neutral with one device per core; see the module docstring.
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


def allocator_env(settings: Optional[dict[str, int]] = None) -> dict[str, str]:
    """The environment variables that give a *child* process the same glibc malloc settings."""
    settings = DEFAULT_MALLOPT if settings is None else settings
    return {_ENV_NAMES[k]: str(v) for k, v in settings.items()}


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


def cpu_count() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_ACCELERATOR_PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin", "jax-cuda12-pjrt",
                        "jax-cuda13-pjrt", "jax-rocm6-plugin", "jax-rocm7-plugin", "libtpu",
                        "libtpu-nightly", "jax-metal")


def default_backend_is_cpu() -> bool:
    """Best guess, without initialising JAX, that the default backend will be the CPU: true when
    JAX_PLATFORMS / jax_platforms names cpu first, or when no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if "jax" in sys.modules:
        platforms = sys.modules["jax"].config.jax_platforms or platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    from importlib import metadata
    for dist in _ACCELERATOR_PLUGINS:
        try:
            metadata.version(dist)
            return False
        except metadata.PackageNotFoundError:
            continue
    return True


def _add_xla_flag(flag: str) -> bool:
    """Appends --name=value to XLA_FLAGS unless --name is already there; True if added."""
    key = flag.split("=")[0]
    flags = os.environ.get("XLA_FLAGS", "").split()
    if any(f.split("=")[0] == key for f in flags):
        return False
    os.environ["XLA_FLAGS"] = " ".join(flags + [flag])
    return True


def configure_cpu_devices(n: Optional[int] = None, *,
                          single_threaded_devices: bool = True) -> Optional[int]:
    """Makes JAX's CPU backend expose `n` devices (default: one per core); returns n, or None.

    Must be called before JAX initialises its backends, i.e. before the first JAX computation,
    array creation or `jax.devices()` call (importing jax is fine). Called too late it changes
    nothing, warns, and returns None. Leaves an explicit `jax_num_cpu_devices` or
    `--xla_force_host_platform_device_count` alone (returns None). Does nothing (returns None) when
    the default backend will not be the CPU (`default_backend_is_cpu()`), so GPU/TPU hosts are
    unaffected.

    With n > 1 it gives XLA:CPU's thread pool two threads per device (`PJRT_NPROC`, unless set):
    with one per device the in-process all-reduce aborts within a few hundred steps ("Expected 2
    threads to join the rendezvous"); see the comment in the body. With `single_threaded_devices`
    it also sets `--xla_cpu_multi_thread_eigen=false` (unless XLA_FLAGS names it), so each device's
    matmuls run on its own thread (less oversubscription); that flag alone does not stop the hang.

    What it buys: a data-parallel train step (batch split over the devices) runs each half's small
    (B/n, H) x (H, 4H) matmuls and elementwise loops on its own core; one XLA CPU device runs these
    on one core at a time. Best for small hidden sizes; for large ones one multi-threaded device
    wins (see `recommended_cpu_devices`).
    """
    if n is None:
        n = cpu_count()
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if "--xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if not default_backend_is_cpu():
        return None
    import jax  # importing does not initialise backends
    if jax.config.jax_num_cpu_devices not in (-1, None):
        return None
    if _backends_initialized():
        warnings.warn(
            "lstm_jax.hostenv.configure_cpu_devices() was called after JAX initialised its "
            "backends; the CPU device count stays as it is. Call it before any JAX computation.",
            RuntimeWarning, stacklevel=2)
        return None
    jax.config.update("jax_num_cpu_devices", n)
    if n > 1:
        # XLA:CPU runs every device's thunks, collectives included, on one shared pool of
        # max(cores, devices) threads; a device blocked in an all-reduce holds a thread while its
        # peer may need threads to get there. With 2 devices on 2 cores the step aborted within
        # 500 steps ("Expected 2 threads to join the rendezvous") with pools of 2 and 3 threads,
        # and ran 20,000+ steps without a hang with 4 (= 2 per device), --xla_cpu_multi_thread_eigen
        # on or off (tests/test_recurrence.py::test_two_cpu_devices_soak_does_not_hang).
        if not (os.environ.get("PJRT_NPROC") or os.environ.get("NPROC")):
            os.environ["PJRT_NPROC"] = str(max(cpu_count(), MIN_POOL_THREADS_PER_DEVICE * n))
        if single_threaded_devices:
            _add_xla_flag("--xla_cpu_multi_thread_eigen=false")
    return n


# Largest hidden size for which one CPU device per core beat one multi-threaded device in the
# size grid (benchmarks/results/train_cpu.json, "grid1": sequence objective, B=64, T=50, 2 cores):
# H=128: 2 devices 1.27x one device; H=256: 0.96x; H=512: 0.84x; H=1024: 0.58x.
PER_CORE_DEVICES_MAX_HIDDEN = 192


def recommended_cpu_devices(hidden_size: int, batch_size: int = 128) -> int:
    """How many CPU devices `configure_cpu_devices` should make for this model on this host.

    One per core for small LSTMs, whose per-step matmuls are too small to use several cores from
    one device; one (multi-threaded) device for large ones, whose GEMMs already use every core and
    which lose more to the smaller per-device batch than they gain. Also one device when the batch
    does not split evenly over the cores (the data-parallel step needs it to).
    """
    cores = cpu_count()
    if cores < 2 or hidden_size > PER_CORE_DEVICES_MAX_HIDDEN or batch_size % cores:
        return 1
    return cores


def cpu_xla_flags(max_isa: Optional[str] = None, extra: tuple[str, ...] = ()) -> str:
    """Appends XLA CPU flags to `XLA_FLAGS` (effective until JAX initialises its backends); returns
    the new value.

    `max_isa` sets `--xla_cpu_max_isa` (e.g. "AVX512_BF16" on a Zen 4 / Sapphire Rapids host whose
    kernel exposes AVX-512; bf16 matmul inputs only pay off where the CPU has native bf16 dot
    instructions, see `cpu_has_native_bf16`). Flags already present are not duplicated. CPU-only
    flags: no effect on GPU/TPU computations.
    """
    if _backends_initialized():
        warnings.warn("cpu_xla_flags(): JAX backends are initialised; XLA_FLAGS is read already.",
                      RuntimeWarning, stacklevel=2)
    new = list(extra) + ([f"--xla_cpu_max_isa={max_isa}"] if max_isa else [])
    for f in new:
        _add_xla_flag(f)
    return os.environ.get("XLA_FLAGS", "")


def cpu_has_native_bf16() -> bool:
    """True if the CPU advertises AVX512_BF16 or AMX-BF16 (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def describe() -> dict:
    """Host facts for benchmark records: cores, libc, bf16 support, applied settings."""
    info = {
        "cpu_count": cpu_count(),
        "libc": "-".join(platform.libc_ver()),
        "native_bf16": cpu_has_native_bf16(),
        "mallopt": applied_allocator_settings(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info

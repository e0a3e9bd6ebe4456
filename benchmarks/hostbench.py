"""Host helpers the benchmarks use and the package does not: a CPU device count set by hand,
the allocator settings for a child process, and host facts for benchmark records. The package's
own host set-up is lstm_jax/hostenv.py (`setup_host`)."""
from __future__ import annotations

import os
import platform
from typing import Optional

from lstm_jax import hostenv

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


def allocator_env(settings: Optional[dict[str, int]] = None) -> dict[str, str]:
    """The environment variables that give a *child* process the same glibc malloc settings."""
    settings = hostenv.DEFAULT_MALLOPT if settings is None else settings
    return {_ENV_NAMES[k]: str(v) for k, v in settings.items()}


def configure_cpu_devices(n: Optional[int] = None, *,
                          single_threaded_devices: bool = True) -> Optional[int]:
    """Makes JAX's CPU backend expose `n` devices (default: one per core); returns n, or None.

    For library users and benchmarks (the CLI calls `hostenv.setup_host`). Must be called before JAX
    initialises its backends (the first computation, array or `jax.devices()` call; importing jax
    is fine); called too late it changes nothing, warns, and returns None. An explicit
    `jax_num_cpu_devices` or `--xla_force_host_platform_device_count` keeps its count (returns
    None), but the XLA:CPU pool is still sized for that effective count. Off the CPU
    (`hostenv.guess_platform()`) it does nothing and returns None. With more than one device: a pool of at
    least 2 threads per device (PJRT_NPROC, unless set; an explicit one below that raises
    hostenv.UnsafeHostSetting) and, with `single_threaded_devices`, `--xla_cpu_multi_thread_eigen=false`.
    """
    if n is not None and int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    plan = hostenv.plan_host(platform=hostenv.guess_platform(), hidden_size=0, batch_size=0,
                     cpu_devices=-1 if n is None else int(n), tune_allocator=False,
                     env=dict(os.environ), cores=hostenv.cpu_count(),
                     jax_num_cpu_devices=hostenv._jax_num_cpu_devices(),
                     single_threaded_devices=single_threaded_devices)
    if plan.platform != "cpu" or not hostenv.apply_plan(plan):
        return None
    return plan.num_cpu_devices


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
        "cpu_count": hostenv.cpu_count(),
        "libc": "-".join(platform.libc_ver()),
        "native_bf16": cpu_has_native_bf16(),
        "mallopt": hostenv.applied_allocator_settings(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "pjrt_nproc": os.environ.get("PJRT_NPROC", ""),
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

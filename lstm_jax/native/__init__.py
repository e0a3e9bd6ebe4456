"""The native CPU recurrence: one LSTM layer (all timesteps) as one XLA FFI call per direction.

`lstm_cpu.cc` (beside this file) holds the forward and backward loops. On AVX-512 or AVX2 CPUs
(hidden size a multiple of the vector width, 16 or 8 floats) W_rec is packed once per call and
each timestep's recurrent matmul is a register-blocked microkernel with the gate math applied to
the tile in registers; elsewhere each timestep is one sgemm of scipy's OpenBLAS (its function pointer comes from
`scipy.linalg.cython_blas`, so nothing links against a BLAS at build time) and one fused pass of
gate math. It is compiled from source on first use with the C++ compiler at hand (`$CXX`, else
`c++`/`g++`) into the user cache, keyed by the source, the compiler, jaxlib and this CPU's flags;
nothing compiled is shipped.

`lstm_native(xproj, kernel_rec, carry, dtype)` has the contract of `recurrence.lstm_layer`: a
`custom_vjp` whose forward and backward are the two FFI calls, the weight gradient one large GEMM
left to XLA. On a ('data',) mesh each device's batch shard calls the kernel (`shard_map` over the
abstract mesh set by `jax.set_mesh`, which `parallel.under_mesh` does for the step functions),
with cores // devices threads; under `pmap` each device's call sees its own rows. `available()`
says whether the kernel can run here and, if not, why (no compiler, not x86-64 Linux, the build
failed): `recurrence.lstm_layer` then runs the pure-JAX scan.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lstm_jax import hostenv

SOURCE = pathlib.Path(__file__).with_name("lstm_cpu.cc")
_TARGETS = {"forward": "lstm_jax_native_forward", "backward": "lstm_jax_native_backward"}


class NativeUnavailable(RuntimeError):
    """The native kernel cannot run on this machine; the message says why, in one line."""


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("LSTM_JAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lstm_jax")
    return pathlib.Path(root) / "native"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None



def _build(compiler: str) -> pathlib.Path:
    """Compiles lstm_cpu.cc into the cache (atomically: concurrent processes may build at once)
    unless a build of the same source, compiler, jaxlib and CPU is already there."""
    import jaxlib
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-std=c++17",
             "-fopenmp", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout.splitlines()[:1]
    # Keyed by what the build depends on; the include path (a venv's site-packages) is not, so a
    # new virtualenv with the same jaxlib reuses the build.
    key = hashlib.sha256("\n".join([SOURCE.read_text(), *version, jaxlib.__version__, *flags[:-1],
                                    hostenv.cpu_flags_line()]).encode()).hexdigest()[:16]
    out = _cache_dir() / key / "liblstm_jax_cpu.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_lib = pathlib.Path(tmp) / out.name
        proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp_lib)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise NativeUnavailable(f"building the native kernel failed ({compiler}): {first}")
        os.replace(tmp_lib, out)
    return out


def _blas_pointers() -> tuple[int, int]:
    """(sgemm, openblas_set_num_threads_local) from the OpenBLAS scipy ships (0 where absent)."""
    from scipy.linalg import cython_blas
    capsule = cython_blas.__pyx_capi__["sgemm"]
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    name = ctypes.pythonapi.PyCapsule_GetName
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    sgemm = get(capsule, name(capsule))
    threads = 0
    import scipy
    libs = pathlib.Path(scipy.__file__).parent.parent / "scipy.libs"
    for lib in sorted(libs.glob("libscipy_openblas*.so*")):
        try:
            threads = ctypes.cast(ctypes.CDLL(str(lib)).openblas_set_num_threads_local,
                                  ctypes.c_void_p).value or 0
            break
        except (OSError, AttributeError):
            continue
    return sgemm, threads


@functools.lru_cache(maxsize=None)
def _load() -> ctypes.CDLL:
    """Builds (once per machine), loads and registers the kernel; raises NativeUnavailable."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise NativeUnavailable(f"the native kernel is built for x86-64 Linux, not "
                                f"{sys.platform}/{platform.machine()}")
    if os.environ.get("LSTM_JAX_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by LSTM_JAX_NATIVE=0")
    compiler = _compiler()
    if compiler is None:
        raise NativeUnavailable("no C++ compiler on PATH (set $CXX or install g++)")
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        sgemm, threads = _blas_pointers()
    except NativeUnavailable:
        raise
    except Exception as e:  # a missing scipy, an unloadable library: one line, then the scan
        raise NativeUnavailable(f"the native kernel could not load: {type(e).__name__}: {e}") from None
    lib.lstm_jax_native_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    if not lib.lstm_jax_native_init(sgemm, threads or None):
        raise NativeUnavailable("the native kernel found no sgemm in scipy's BLAS")
    jax.ffi.register_ffi_target(_TARGETS["forward"], jax.ffi.pycapsule(lib.LstmJaxForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(_TARGETS["backward"], jax.ffi.pycapsule(lib.LstmJaxBackward),
                                platform="cpu")
    return lib


def available() -> tuple[bool, str]:
    """(True, '') where the kernel builds and loads here, else (False, why) in one line."""
    try:
        _load()
        return True, ""
    except NativeUnavailable as e:
        return False, str(e)


def has_bf16() -> bool:
    """Whether the loaded kernel was built with AVX512-BF16 (bfloat16 recurrent matmuls)."""
    ok, _ = available()
    return ok and bool(_load().lstm_jax_native_has_bf16())


def simd_width() -> int:
    """Floats per vector of the loaded kernel's microkernel: 16 (AVX-512), 8 (AVX2 with FMA), or
    0 (none: every hidden size runs one sgemm per step)."""
    ok, _ = available()
    return int(_load().lstm_jax_native_simd_width()) if ok else 0


def kind(hidden_size: int) -> str:
    """What runs a layer of `hidden_size` here, for the start-up line: the microkernel's
    instruction set where the hidden size is a multiple of its vector width, else the sgemm."""
    width = simd_width()
    if width and hidden_size % width == 0:
        return "AVX-512" if width == 16 else "AVX2"
    return "OpenBLAS sgemm"


def fast(hidden_size: int, dtype, flags: Optional[set[str]] = None) -> bool:
    """Whether `backward='auto'` runs this layer natively: where the measured grid has the kernel
    ahead of the XLA scan (benchmarks/README.md, "Native recurrence"). float32: on the
    microkernel (AVX-512 or AVX2, hidden size a multiple of the vector width). bfloat16: on CPUs
    with AVX512-BF16 but without AMX; where AMX is present, XLA's bf16 matmuls (oneDNN on AMX
    tiles) beat the kernel's AVX512-BF16 loop, so auto keeps the scan. `flags`: the CPU's
    feature flags (default: this CPU's)."""
    width = simd_width()
    if not width or hidden_size % width:
        return False
    if jnp.dtype(dtype) == jnp.float32:
        return True
    return jnp.dtype(dtype) == jnp.bfloat16 and has_bf16() and hostenv.bf16_on_native_kernel(flags)


def check_supported(hidden_size: int, dtype: str) -> None:
    """Raises NativeUnavailable (one line) unless the native kernel can run this layer here."""
    ok, why = available()
    if not ok:
        raise NativeUnavailable(why)
    if dtype == "bfloat16" and not (has_bf16() and hidden_size % 16 == 0):
        raise NativeUnavailable("the native kernel runs bfloat16 only on CPUs with AVX512-BF16 and "
                                f"hidden_size a multiple of 16 (hidden_size={hidden_size}, AVX512-BF16: "
                                f"{'yes' if has_bf16() else 'no'})")
    if dtype not in ("float32", "bfloat16"):
        raise NativeUnavailable(f"the native kernel runs float32 or bfloat16, not {dtype}")


# --- threads --------------------------------------------------------------------------------------

_THREADS = 0


def set_threads(n: int) -> None:
    """Threads per kernel call; 0 (the default): the cores divided by the devices that run the
    kernel at once (the mesh's, else this process's CPU devices), so kernel threads x devices
    never exceeds the cores and XLA's pool waits while the kernel runs."""
    global _THREADS
    _THREADS = max(int(n), 0)


def threads_per_call(devices: int) -> int:
    """The threads one call uses when `devices` devices call the kernel at once."""
    if _THREADS:
        return _THREADS
    return max(1, hostenv.cpu_count() // max(int(devices), 1))


def _concurrent_devices() -> int:
    local = max(1, len(jax.local_devices(backend="cpu")))
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and "data" in mesh.axis_names:
        return min(mesh.shape["data"], local)
    return local


# --- the layer ------------------------------------------------------------------------------------

def _shard_over_batch(fn, batch_axes, n_out_batch_axes):
    """Runs `fn` on each device's batch shard when a ('data',) mesh is set (`jax.set_mesh`) and
    the batch divides over it; else as is. `batch_axes`: the batch axis of each argument (None:
    replicated); outputs are batch-sharded on axis 1 (time-major) or 0 as `n_out_batch_axes`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1:
        return fn
    if any(t == jax.sharding.AxisType.Manual for t in mesh.axis_types):
        return fn   # already inside shard_map

    def spec(axis):
        return P() if axis is None else P(*([None] * axis + ["data"]))

    def wrapped(*args):
        if any(ax is not None and a.shape[ax] % mesh.shape["data"] for a, ax in zip(args, batch_axes)):
            return fn(*args)
        return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a) for a in batch_axes),
                             out_specs=tuple(spec(a) for a in n_out_batch_axes),
                             check_vma=False)(*args)
    return wrapped


def _forward_call(xproj, kernel, h0, c0, bf16: bool, threads: int):
    T, B, H4 = xproj.shape
    H = H4 // 4
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((T + 1, B, H), f32), jax.ShapeDtypeStruct((T + 1, B, H), f32),
           jax.ShapeDtypeStruct((T, B, H4), f32))
    return jax.ffi.ffi_call(_TARGETS["forward"], out, vmap_method="sequential")(
        xproj, kernel, h0, c0, threads=np.int32(threads), bf16=bool(bf16))


def _backward_call(kernel, c_all, act, d_hs, dh, dc, bf16: bool, threads: int):
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct(act.shape, f32), jax.ShapeDtypeStruct(dh.shape, f32),
           jax.ShapeDtypeStruct(dc.shape, f32))
    return jax.ffi.ffi_call(_TARGETS["backward"], out, vmap_method="sequential")(
        kernel, c_all, act, d_hs, dh, dc, threads=np.int32(threads), bf16=bool(bf16))


def _forward(xproj, kernel, carry, bf16):
    _load()
    f32 = jnp.float32
    threads = threads_per_call(_concurrent_devices())
    call = _shard_over_batch(functools.partial(_forward_call, bf16=bf16, threads=threads),
                             (1, None, 0, 0), (1, 1, 1))
    return call(xproj.astype(f32), kernel.astype(f32), carry[0].astype(f32), carry[1].astype(f32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lstm(xproj, kernel, carry, bf16):
    h_all, c_all, _ = _forward(xproj, kernel, carry, bf16)
    return (h_all[-1], c_all[-1]), h_all[1:]


def _lstm_fwd(xproj, kernel, carry, bf16):
    h_all, c_all, act = _forward(xproj, kernel, carry, bf16)
    likes = tuple(jnp.zeros((0,), a.dtype) for a in (xproj, carry[0], carry[1]))
    return ((h_all[-1], c_all[-1]), h_all[1:]), (kernel, h_all, c_all, act, likes)


def _lstm_bwd(bf16, residuals, cotangents):
    kernel, h_all, c_all, act, (x_like, h_like, c_like) = residuals
    (dh_T, dc_T), d_hs = cotangents
    f32 = jnp.float32
    threads = threads_per_call(_concurrent_devices())
    call = _shard_over_batch(functools.partial(_backward_call, bf16=bf16, threads=threads),
                             (None, 1, 1, 1, 0, 0), (1, 0, 0))
    dgates, dh0, dc0 = call(kernel.astype(f32), c_all, act, d_hs.astype(f32), dh_T.astype(f32),
                            dc_T.astype(f32))
    # dW_rec: one (H, T*B) x (T*B, 4H) GEMM, contracted over (t, b) so a batch-sharded mesh runs
    # it locally and all-reduces the (H, 4H) result (as recurrence._backward).
    dt = jnp.bfloat16 if bf16 else f32
    dkernel = jax.lax.dot_general(h_all[:-1].astype(dt), dgates.astype(dt),
                                  (((0, 1), (0, 1)), ((), ())), preferred_element_type=f32)
    return (dgates.astype(x_like.dtype), dkernel.astype(kernel.dtype),
            (dh0.astype(h_like.dtype), dc0.astype(c_like.dtype)))


_lstm.defvjp(_lstm_fwd, _lstm_bwd)


def lstm_native(xproj_TxBx4H: jax.Array, kernel_rec_Hx4H: jax.Array, carry,
                dtype=jnp.float32):
    """One LSTM layer over time through the native kernel: ((h_T, c_T), hs_TxBxH), the contract
    of `recurrence.lstm_layer`. `dtype` bfloat16 runs the recurrent matmuls (forward and
    backward) and the weight-gradient GEMM in bfloat16 with float32 accumulation; gate math,
    carries and outputs stay float32."""
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    return _lstm(xproj_TxBx4H, kernel_rec_Hx4H, (carry[0], carry[1]), bool(bf16))

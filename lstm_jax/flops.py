"""FLOPs per character and the device's peak, for FLOP/s and MFU (model FLOPs utilisation).

The count (matrix-multiply FLOPs only, 2 per multiply-add, as MFU is usually counted): a forward
character costs, per layer l with input width E_l and hidden size H,

    input projection   2 * E_l * 4H     (E_0 = 0: the first layer gathers a row of its input
                                         matrix for each token, the "embedding": no multiply)
    recurrence         2 * H * 4H       (h_{t-1} @ W_hh, every timestep)

plus the head, 2 * H * V (h @ W_out; only at the last position of a window for the `window`
objective). The backward pass costs twice the forward (the gradient with respect to the input and
the one with respect to the weight of each product; the embedding's gradient is a scatter-add, the
first layer's input needs no gradient), so a training character costs 3 x forward:

    train = 3 * 2 * (sum_l 4H * (E_l + H) + H * V)

The gate nonlinearities, the softmax and the optimizer (O(H) and O(V) per character, or per step)
are not counted: they are memory-bound, and counting them would make MFU depend on XLA's fusion.
Sampling a character is one forward step: 2 * (sum_l 4H (E_l + H) + H V).

The peak (`device_peak`): on CPU a large float32 GEMM measured on every local device at once
(what XLA:CPU can do at best on this host); on GPUs and TPUs a table of vendor dense peaks by
device kind and compute dtype (float32 matmuls run as TF32 on NVIDIA tensor cores and as bf16
passes on TPUs under JAX's default precision), or a measured GEMM (`measure=True`) for a kind the
table does not know.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Optional, Sequence

import numpy as np

# Dense (no sparsity) peak TFLOP/s per chip: (float32 as JAX runs it by default, bfloat16).
# NVIDIA: float32 = TF32 tensor cores. TPU: float32 matmuls run as bf16 passes by default.
KNOWN_PEAKS_TFLOPS = {
    "H200": (494.7, 989.4),
    "H100 PCIe": (378.0, 756.0),
    "H100": (494.7, 989.4),          # SXM
    "A100": (156.0, 312.0),
    "L40S": (183.0, 362.0),
    "L4": (60.0, 121.0),
    "A10G": (35.0, 70.0),
    "V100": (15.7, 125.0),           # no TF32: float32 on CUDA cores
    "T4": (8.1, 65.0),
    "TPU v6 lite": (918.0, 918.0),   # v6e (Trillium)
    "TPU v5p": (459.0, 459.0),
    "TPU v5 lite": (197.0, 197.0),   # v5e
    "TPU v5": (459.0, 459.0),
    "TPU v4": (275.0, 275.0),
    "TPU v3": (123.0, 123.0),
}


@dataclasses.dataclass(frozen=True)
class Count:
    """FLOPs per character of one model, by part; `train` and `forward` are the totals."""
    embedding: float
    input_projection: float
    recurrence: float
    head: float

    @property
    def forward(self) -> float:
        return self.embedding + self.input_projection + self.recurrence + self.head

    @property
    def train(self) -> float:
        return 3 * self.forward


def count(model_cfg, *, objective: str = "sequence", seq_len: Optional[int] = None) -> Count:
    """Forward matmul FLOPs per input character of `model_cfg` (a ModelConfig or anything with
    vocab_size, hidden_size, num_layers). For the `window` objective the head runs once per
    window of `seq_len` characters, so its share per character is divided by seq_len."""
    h, v, layers = model_cfg.hidden_size, model_cfg.vocab_size, model_cfg.num_layers
    head = 2.0 * h * v
    if objective == "window":
        if not seq_len:
            raise ValueError("the window objective needs seq_len: the head runs once per window")
        head /= seq_len
    return Count(embedding=0.0, input_projection=2.0 * h * 4 * h * (layers - 1),
                 recurrence=2.0 * h * 4 * h * layers, head=head)


def train_flops_per_step(model_cfg, batch_size: int, seq_len: int, objective: str = "sequence") -> float:
    """Training FLOPs of one step of `batch_size` rows of `seq_len` input characters."""
    return count(model_cfg, objective=objective, seq_len=seq_len).train * batch_size * seq_len


def sample_flops_per_char(model_cfg) -> float:
    """One sampled character (one row, one step): the forward of a single position."""
    return count(model_cfg).forward


@dataclasses.dataclass(frozen=True)
class Peak:
    flops_per_s: float
    source: str               # "table: ..." or "measured: ..."


def table_peak(device_kind: str, dtype: str = "float32") -> Optional[float]:
    """FLOP/s of one chip of `device_kind` (jax Device.device_kind) from KNOWN_PEAKS_TFLOPS, or None."""
    for name, (f32, bf16) in KNOWN_PEAKS_TFLOPS.items():   # longest names first where they nest
        if name.lower() in device_kind.lower():
            return 1e12 * (f32 if dtype == "float32" else bf16)
    return None


def measure_gemm(devices: Optional[Sequence] = None, *, size: int = 2048, dtype: str = "float32",
                 repeats: int = 5) -> float:
    """FLOP/s of a (size x size) @ (size x size) GEMM run on every device of `devices` at once
    (default: all local devices), best of `repeats` after one warm-up call."""
    import jax
    import jax.numpy as jnp
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("d",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    n = len(devices)
    a = jax.device_put(jnp.ones((n, size, size), dtype) / size, sharding)
    gemm = jax.jit(lambda x: jnp.einsum("nij,njk->nik", x, x), out_shardings=sharding)
    gemm(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        gemm(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * size ** 3 * n / best


@functools.lru_cache(maxsize=None)
def _cached_measure(platform: str, n: int, dtype: str, size: int) -> float:
    import jax
    devices = [d for d in jax.local_devices() if d.platform == platform][:n]
    return measure_gemm(devices, size=size, dtype=dtype)


def device_peak(devices: Optional[Sequence] = None, dtype: str = "float32",
                measure: Optional[bool] = None, size: int = 2048) -> Peak:
    """The peak FLOP/s of `devices` (default: all local devices) together: a measured
    (size x size) GEMM on CPU (measure=None) or for a device kind outside the table; else the
    table's figure x devices. Measurements are cached for the process."""
    import jax
    devices = list(devices) if devices is not None else jax.local_devices()
    kind, platform, n = devices[0].device_kind, devices[0].platform, len(devices)
    per_chip = None if platform == "cpu" or measure else table_peak(kind, dtype)
    if per_chip is not None:
        return Peak(per_chip * n, f"table: {n} x {kind} ({dtype})")
    flops = _cached_measure(platform, n, dtype, size)
    return Peak(flops, f"measured: {size}^3 {dtype} GEMM on {n} {platform} device{'s' * (n > 1)}")


# The training loop's peak: a 1024^3 GEMM takes about 0.2 s on this 2-core host (2048^3: 0.9 s on
# 2 devices) and measured the same FLOP/s (310 vs 306 GFLOP/s), so a run's start-up barely notices.
RUN_GEMM_SIZE = 1024


def mesh_peak(mesh, dtype: str = "float32") -> Peak:
    """The peak of a training run's mesh: this process's devices in it (measured once per process
    on CPU), times the processes (a multi-host run's hosts are taken to be alike)."""
    import jax
    devices = list(mesh.devices.flat)
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    peak = device_peak(local, dtype=dtype, size=RUN_GEMM_SIZE)
    scale = len(devices) / len(local)
    return peak if scale == 1 else Peak(peak.flops_per_s * scale, f"{peak.source}, x {scale:g} processes")


def mfu(flops_per_s: float, peak: Peak | float) -> float:
    """Achieved / peak FLOP/s."""
    p = peak.flops_per_s if isinstance(peak, Peak) else float(peak)
    return flops_per_s / p if p > 0 else float("nan")

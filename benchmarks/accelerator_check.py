"""Where lstm_jax stands on an accelerator, in one command: environment, correctness on the device,
training throughput vs PyTorch nn.LSTM (cuDNN) in the same run, sampling vs PyTorch's loop, and
time to quality. Sized for <= 8 minutes on one H200, compiles included; every section has a time
budget and skips what does not fit, saying so.

    python benchmarks/accelerator_check.py --out DIR            # on the GPU (see ACCELERATOR.md)
    python benchmarks/accelerator_check.py --smoke --out DIR    # CPU, tiny sizes, < 1 min (CI)

Writes DIR/accelerator_check.json and DIR/accelerator_check.png and prints a summary table. Exit
status 1 if a correctness check failed or a measurement raised (the JSON says which).

Sections:
 1. environment: versions, device kind and memory, the host plan (no CPU tuning on a GPU), the
    peak FLOP/s used for MFU (datasheet, dense: see PEAKS) and a measured large-GEMM rate.
 2. correctness: model vs a float64 NumPy LSTM, custom VJP vs jax.grad, the cuDNN backend vs the
    scan (forward and gradients; emulated through lstm_ref off a GPU), sampler statistics through
    `lstm_jax.sample.generate`, exact resume through `lstm_jax.train_and_evaluate` run twice.
    Strict checks run under jax.default_matmul_precision("highest") (GPUs otherwise use TF32 for
    float32 matmuls, ~1e-3 relative); the default-precision errors are reported beside them.
 3. training: the Keras reference LSTM(128) B=128 T=60 (window objective, samples/s), LSTM(512)
    B=64 T=100 and 3xLSTM(1024) B=256 T=100 (sequence objective, target chars/s); ours with the
    autodiff / custom VJP / cuDNN backends in float32 and bfloat16 compute (cuDNN: float32 only),
    against PyTorch nn.LSTM in float32 and under bf16 autocast. The step is the project's own
    (benchmarks/bench_train.py `_make_step`: train.make_train_step, RMSprop, no clipping). MFU =
    model matmul FLOPs (torch_baseline.train_flops, backward = 2x forward, one-hot input not
    counted, the same for both libraries) / step time / peak.
 4. sampling: generated chars/s of `lstm_jax.sample.generate` (one compiled call per chunk,
    chunk = rows) at 1, 1,024, 4,096 and 65,536 rows of LSTM(512) vs PyTorch's per-char loop.
 5. time to quality: configs/nietzsche.py on the device for a fixed training time (120 s):
    a short calibration run measures steps/s, then a fresh run gets that many steps (its cosine
    schedule ends with the run); val_last_loss reached, the best, and when it first fell to 1.34
    (the Keras reference's epoch-20 training loss). Needs nietzsche.txt in $LSTM_JAX_DATA_DIR;
    without it the builtin corpus is used and the record says so.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import pathlib
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
# JAX takes 75% of GPU memory up front by default; leave room for PyTorch in the same process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

from torch_baseline import train_flops, warm_up  # noqa: E402  (plain python, no torch import)

# Dense peak FLOP/s by device kind (NVIDIA datasheets; H200 SXM has the H100 SXM's compute):
# bf16 tensor core, tf32 tensor core, fp32 non-tensor. Lookup by substring of device_kind.
PEAKS = {
    "H200": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12, "source": "NVIDIA H200 SXM datasheet"},
    "H100 80GB HBM3": {"bf16": 989e12, "tf32": 494e12, "fp32": 67e12,
                       "source": "NVIDIA H100 SXM datasheet"},
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12, "source": "NVIDIA H100 PCIe datasheet"},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12, "source": "NVIDIA A100 datasheet"},
}

NIETZSCHE_VOCAB = 57   # lowercased Nietzsche corpus (the Keras reference's vocabulary size)
WORKLOADS = {
    "keras_lstm128": dict(vocab=NIETZSCHE_VOCAB, hidden=128, layers=1, batch=128, seq=60,
                          objective="window"),
    "lstm512": dict(vocab=NIETZSCHE_VOCAB, hidden=512, layers=1, batch=64, seq=100,
                    objective="sequence"),
    "3xlstm1024": dict(vocab=NIETZSCHE_VOCAB, hidden=1024, layers=3, batch=256, seq=100,
                       objective="sequence"),
}
SMOKE_WORKLOADS = {
    "keras_lstm128": dict(vocab=11, hidden=16, layers=1, batch=8, seq=12, objective="window"),
    "3xlstm1024": dict(vocab=11, hidden=16, layers=3, batch=8, seq=10, objective="sequence"),
}
JAX_VARIANTS = {   # name -> (backward, compute dtype)
    "autodiff_f32": ("autodiff", "float32"), "custom_f32": ("custom", "float32"),
    "cudnn_f32": ("cudnn", "float32"), "autodiff_bf16": ("autodiff", "bfloat16"),
    "custom_bf16": ("custom", "bfloat16"),
}
TORCH_VARIANTS = {"torch_f32": False, "torch_bf16": True}   # name -> bf16 autocast
# (workload, variant) in the order they run: the targets first (LSTM(512), 3xLSTM(1024): our best
# candidates against PyTorch), so a budget that runs out skips the least important.
PRIORITY = [(w, v) for w in ("lstm512", "3xlstm1024")
            for v in ("torch_f32", "torch_bf16", "cudnn_f32", "custom_bf16")]
PRIORITY += [("keras_lstm128", v) for v in ("torch_f32", "cudnn_f32", "custom_f32", "custom_bf16")]
PRIORITY += [(w, v) for w in ("lstm512", "3xlstm1024") for v in ("custom_f32", "autodiff_bf16")]
PRIORITY += [("keras_lstm128", v) for v in ("torch_bf16", "autodiff_bf16")]
PRIORITY += [(w, "autodiff_f32") for w in WORKLOADS]
# smoke: every code path once (backends, dtypes, both objectives, 1 and 3 layers, PyTorch)
# Smoke: every kind of row once (ours f32/bf16, PyTorch, the emulated cuDNN path, a 3-layer model);
# the cuDNN numerics themselves are checked in the correctness section.
SMOKE_PRIORITY = [("keras_lstm128", v) for v in ("autodiff_f32", "custom_f32", "custom_bf16",
                                                 "torch_f32")]
SMOKE_PRIORITY += [("3xlstm1024", v) for v in ("cudnn_f32",)]

SAMPLE_ROWS, SMOKE_SAMPLE_ROWS = (1, 1024, 4096, 65536), (1, 64)
KERAS_EPOCH20_LOSS = 1.34


@dataclasses.dataclass
class Settings:
    smoke: bool
    total_s: float           # the whole check, start-up included
    budgets: dict            # section -> seconds
    min_time: float          # seconds per timed training repeat
    repeats: int
    sample_length: int
    ttq_seconds: float


def settings(args) -> Settings:
    k = args.budget_scale
    if args.smoke:
        return Settings(True, 120.0 * k, dict(correctness=60 * k, training=40 * k, sampling=20 * k,
                                              time_to_quality=30 * k),
                        min_time=0.05, repeats=1, sample_length=32, ttq_seconds=args.ttq_seconds or 1)
    return Settings(False, 470.0 * k, dict(correctness=60 * k, training=160 * k, sampling=50 * k,
                                           time_to_quality=170 * k),
                    min_time=0.4, repeats=3, sample_length=256,
                    ttq_seconds=args.ttq_seconds or 120 * min(k, 1.0))


class Budget:
    """A section's time budget: `fits(estimate)` before starting an item, `skip(...)` records why not."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate

    def skip(self, what: str) -> None:
        self.skipped.append(f"{what}: skipped, {max(self.left(), 0):.0f} s of the section's "
                            f"{self.seconds:.0f} s budget left")


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600] + "\n" + traceback.format_exc()[-1500:]


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:100] if (text or "").strip() else ""


def _sync_jax(tree):
    import jax
    return jax.block_until_ready(tree)


# --- 1. environment --------------------------------------------------------------------------

def environment(host_plan) -> dict:
    import jax
    from importlib import metadata
    versions = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax",
                 "orbax-checkpoint", "torch", "numpy", "ml_collections", "tensorboardX", "tqdm"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    dev = jax.devices()[0]
    info = {"versions": versions, "platform": dev.platform, "device_kind": dev.device_kind,
            "jax_default_matmul_precision": str(jax.config.jax_default_matmul_precision),
            "device_count": jax.device_count(), "host_plan": host_plan.summary(),
            "host_plan_confirm": host_plan.confirm(jax.default_backend())}
    try:
        stats = dev.memory_stats() or {}
        info["memory_bytes_limit"] = stats.get("bytes_limit")
    except Exception:   # CPU devices have no memory stats
        pass
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["torch_device"] = {"name": p.name, "total_memory": p.total_memory,
                                    "multiprocessors": p.multi_processor_count}
        # PyTorch's float32 defaults: cuDNN (nn.LSTM) may use TF32, plain matmuls may not
        info["torch_tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32,
                              "matmul": torch.backends.cuda.matmul.allow_tf32}
    except Exception as e:
        info["torch_error"] = _error(e)
    info["peak"] = next((dict(v, matched=k) for k, v in PEAKS.items() if k in dev.device_kind), None)
    info["measured_gemm_tflops"] = _gemm_rates(dev.platform)
    import hostbench
    info["host"] = hostbench.describe()
    return info


def _gemm_rates(plat: str) -> dict:
    """TFLOP/s of one large square matmul under XLA (best of 5 after a warm-up), bf16 and f32."""
    import jax
    import jax.numpy as jnp
    n = 8192 if plat == "gpu" else 512
    out = {}
    for name, dt in (("bf16", jnp.bfloat16), ("f32_default_precision", jnp.float32)):
        a = jnp.ones((n, n), dt)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out[name] = round(2 * n ** 3 / min(ts) / 1e12, 2)
    out["n"] = n
    return out


# --- 2. correctness --------------------------------------------------------------------------

def _numpy_forward(params, tokens_BxT):
    """float64 reference: one-hot inputs, explicit per-step gates (i, f, g, o)."""
    import numpy as np
    sig = lambda x: 1 / (1 + np.exp(-x))
    B, T = tokens_BxT.shape
    V = params["head_kernel"].shape[1]
    x = np.eye(V)[tokens_BxT]
    for layer in params["layers"]:
        H = layer["kernel_rec"].shape[0]
        h, c, outs = np.zeros((B, H)), np.zeros((B, H)), []
        for t in range(T):
            z = x[:, t] @ layer["kernel_in"] + h @ layer["kernel_rec"] + layer["bias"]
            i, f, g, o = np.split(z, 4, axis=-1)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(c)
            outs.append(h)
        x = np.stack(outs, axis=1)
    return x @ params["head_kernel"] + params["head_bias"]


def _rel_err(a, b) -> float:
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _tree_rel_err(a, b) -> float:
    import jax
    return max(_rel_err(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_model_vs_numpy() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lstm_jax.model import CharLSTM, ModelConfig
    model = CharLSTM(ModelConfig(vocab_size=11, hidden_size=16, num_layers=2), rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 11, (4, 9))
    pure = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    pure["layers"] = [pure["layers"][i] for i in sorted(pure["layers"])]
    want = _numpy_forward(pure, tokens)
    out = []
    for precision, tol in (("highest", 1e-5), ("default", 3e-2)):
        with jax.default_matmul_precision(None if precision == "default" else precision):
            got = jax.jit(lambda m, t: m(t))(model, jnp.asarray(tokens))
        err = _rel_err(got, want)
        out.append({"name": f"model_vs_numpy_f64[{precision}]", "max_rel_err": err, "tol": tol,
                    "passed": err <= tol, "strict": precision == "highest"})
    return out


def check_custom_vjp() -> list[dict]:
    import jax
    import jax.numpy as jnp
    from lstm_jax import recurrence
    T, B, H = 24, 8, 32
    k = jax.random.split(jax.random.key(0), 4)
    xproj = jax.random.normal(k[0], (T, B, 4 * H))
    kernel = jax.random.normal(k[1], (H, 4 * H)) * H ** -0.5
    carry = (jax.random.normal(k[2], (B, H)) * 0.1, jax.random.normal(k[3], (B, H)) * 0.1)
    w = jax.random.normal(jax.random.key(1), (T, B, H))

    def loss(fn, x, kr, c):
        (h, cc), hs = fn(x, kr, c)
        return (hs * w).sum() + (h * cc).sum()
    out = []
    for precision, tol in (("highest", 1e-4), ("default", 3e-2)):
        with jax.default_matmul_precision(None if precision == "default" else precision):
            got = jax.jit(jax.grad(lambda *a: loss(recurrence.lstm_scan_custom_vjp, *a),
                                   argnums=(0, 1, 2)))(xproj, kernel, carry)
            want = jax.jit(jax.grad(lambda *a: loss(recurrence.lstm_scan, *a),
                                    argnums=(0, 1, 2)))(xproj, kernel, carry)
        err = _tree_rel_err(got, want)
        out.append({"name": f"custom_vjp_vs_jax_grad[{precision}]", "max_rel_err": err, "tol": tol,
                    "passed": err <= tol, "strict": precision == "highest"})
    return out


def check_cudnn_vs_scan() -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from lstm_jax import cudnn
    from lstm_jax.model import CharLSTM, ModelConfig
    emulate = not cudnn.runs_cudnn()
    try:
        cudnn.check_supported(ModelConfig(vocab_size=2), jax.default_backend())
        reason = None
    except ValueError as e:
        reason = str(e)
    V, H, L, B, T = 13, 32, 2, 8, 20
    ref = CharLSTM(ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, dropout=0.2,
                               backward="autodiff"), rngs=nnx.Rngs(0))
    fast = CharLSTM(ModelConfig(vocab_size=V, hidden_size=H, num_layers=L, dropout=0.2,
                                backward="cudnn"), rngs=nnx.Rngs(1))
    nnx.update(fast, nnx.state(ref, nnx.Param))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, V, (B, T + 1)))

    def loss(model, key):
        logits = model(tokens[:, :-1], dropout_key=key)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    grad = jax.jit(lambda m, key: nnx.value_and_grad(loss)(m, key))
    out = []
    label = "emulated: lstm_ref" if emulate else "cuDNN"
    for precision, tol, key in (("highest", 1e-4, None), ("highest", 1e-4, jax.random.key(5)),
                                ("default", 3e-2, None)):
        ctx = cudnn.emulated() if emulate else contextlib.nullcontext()
        with jax.default_matmul_precision(None if precision == "default" else precision), ctx:
            l1, g1 = grad(fast, key)
        with jax.default_matmul_precision(None if precision == "default" else precision):
            l0, g0 = grad(ref, key)
        err = max(_rel_err(l1, l0), _tree_rel_err(nnx.to_pure_dict(g1), nnx.to_pure_dict(g0)))
        out.append({"name": f"cudnn_vs_scan[{precision}{', dropout' if key is not None else ''}]",
                    "max_rel_err": err, "tol": tol, "passed": err <= tol, "backend": label,
                    "strict": precision == "highest",
                    **({"note": reason} if reason else {})})
    return out


def check_sampler_statistics(smoke: bool) -> list[dict]:
    """A model whose logits are log p whatever the state (zero head kernel, bias log p): the drawn
    characters' frequencies must match p within 5 standard errors; temperature 0 draws argmax."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from lstm_jax import sample
    from lstm_jax.data import Vocab
    from lstm_jax.model import CharLSTM, ModelConfig
    p = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.08, 0.05, 0.02])
    vocab = Vocab(tuple("abcdefgh"))
    model = CharLSTM(ModelConfig(vocab_size=8, hidden_size=16), rngs=nnx.Rngs(0))
    model.head_kernel[...] = jnp.zeros_like(model.head_kernel[...])
    model.head_bias[...] = jnp.log(jnp.asarray(p, jnp.float32))
    rows, length = (64, 64) if smoke else (1024, 256)
    out = sample.generate(model, vocab, num_samples=rows, length=length, temperature=1.0, seed=0)
    tokens = np.asarray(out.tokens).ravel()
    freq = np.bincount(tokens, minlength=8) / tokens.size
    z = float(np.max(np.abs(freq - p) / np.sqrt(p * (1 - p) / tokens.size)))
    greedy = sample.generate(model, vocab, num_samples=8, length=32, temperature=0.0, seed=1)
    return [{"name": "sampler_frequencies_match_p", "max_z": z, "tol": 5.0, "passed": z <= 5.0,
             "draws": int(tokens.size), "freq": freq.round(4).tolist()},
            {"name": "sampler_greedy_is_argmax", "passed": bool(np.all(np.asarray(greedy.tokens) == 0))}]


def check_exact_resume(smoke: bool, workroot: pathlib.Path) -> list[dict]:
    """train_and_evaluate for 2N steps straight vs N steps then resumed to 2N in the same workdir
    (constant learning rate, so the schedule does not depend on the horizon)."""
    import jax
    import numpy as np
    import lstm_jax
    from flax import nnx
    n = 6 if smoke else 20

    def config(steps):
        c = lstm_jax.load_config_file(str(ROOT / "configs" / "tiny.py"))
        c.max_steps, c.log_every, c.checkpoint.every_steps = steps, 5, n
        c.optimizer.schedule = "constant"
        c.eval_max_windows = 32
        return c

    def run(c, workdir):
        kwargs = {"progress": False} if "progress" in inspect.signature(
            lstm_jax.train_and_evaluate).parameters else {}
        with contextlib.redirect_stdout(sys.stderr):
            return lstm_jax.train_and_evaluate(c, str(workdir), **kwargs)
    straight = run(config(2 * n), workroot / "straight")
    run(config(n), workroot / "resumed")
    resumed = run(config(2 * n), workroot / "resumed")
    a = jax.tree.leaves(nnx.state(straight.model, nnx.Param))
    b = jax.tree.leaves(nnx.state(resumed.model, nnx.Param))
    exact = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    err = _tree_rel_err(b, a)
    gpu = jax.default_backend() != "cpu"
    # XLA's GPU scatter-add (the embedding gather's gradient) sums in a nondeterministic order
    tol = 1e-4 if gpu else 0.0
    return [{"name": "exact_resume", "bitwise": exact, "max_rel_err": err, "tol": tol,
             "passed": exact or err <= tol, "steps": [n, 2 * n], "step": resumed.step,
             **({"note": "GPU: bitwise equality not required (nondeterministic scatter-add)"}
                if gpu else {})}]


def correctness(s: Settings, budget: Budget, workroot: pathlib.Path) -> dict:
    checks = []
    for name, fn in (("model_vs_numpy", check_model_vs_numpy), ("custom_vjp", check_custom_vjp),
                     ("cudnn_vs_scan", check_cudnn_vs_scan),
                     ("sampler", lambda: check_sampler_statistics(s.smoke)),
                     ("exact_resume", lambda: check_exact_resume(s.smoke, workroot))):
        if not budget.fits(5):
            budget.skip(name)
            checks.append({"name": name, "skipped": True, "passed": False})
            continue
        t0 = time.perf_counter()
        try:
            results = fn()
        except Exception as e:
            results = [{"name": name, "passed": False, "error": _error(e)}]
        for r in results:
            r["seconds"] = round(time.perf_counter() - t0, 2)
        checks += results
    return {"checks": checks, "skipped": budget.skipped}


# --- 3. training -------------------------------------------------------------------------------

def _jax_train(wl: dict, backward: str, dtype: str):
    """(step(k) -> metrics, sync) for the project's own train step (bench_train._make_step)."""
    import bench_train
    state, run, _, _ = bench_train._make_step(wl, {"backward": backward, "dtype": dtype})
    holder = {"state": state}

    def step(k):
        holder["state"], metrics = run(holder["state"], k)
        return metrics

    def sync(metrics):
        _sync_jax((holder["state"], metrics))
        return metrics["loss"]
    return step, sync


def _torch_train(wl: dict, bf16: bool):
    """PyTorch nn.LSTM trained as torch_baseline.build does (one-hot input, RMSprop with Keras's
    settings), on the GPU when there is one, bf16 under autocast."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bf16 and device == "cpu":
        raise RuntimeError("bf16 autocast is measured on CUDA only")
    torch.manual_seed(0)
    V, H, L, B, T = wl["vocab"], wl["hidden"], wl["layers"], wl["batch"], wl["seq"]
    window = wl["objective"] == "window"

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(V, H, num_layers=L, batch_first=True)
            self.fc = nn.Linear(H, V)

        def forward(self, x_onehot):
            out, _ = self.lstm(x_onehot)
            return self.fc(out[:, -1] if window else out)

    model = CharLSTM().to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-7)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, V, (B, T), generator=gen).to(device),
                torch.randint(0, V, (B,) if window else (B, T), generator=gen).to(device))
               for _ in range(4)]

    def step(k):
        x, y = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(F.one_hot(x, V).float())
        loss = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    def sync(loss):
        if device == "cuda":
            torch.cuda.synchronize()
        return loss
    return step, sync


def _torch_release() -> None:
    """Hands PyTorch's cached GPU memory back (JAX holds most of the device)."""
    import gc
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time(step, sync, s: Settings) -> dict:
    t0 = time.perf_counter()
    first_s, n = warm_up(step, s.min_time, sync)
    times = []
    for _ in range(s.repeats):
        t = time.perf_counter()
        for k in range(n):
            out = step(k)
        sync(out)
        times.append((time.perf_counter() - t) / n)
    return {"step_s": statistics.median(times), "step_s_all": times, "first_step_s": first_s,
            "steps_per_repeat": n, "wall_s": time.perf_counter() - t0,
            "final_loss": float(sync(out))}


def training(s: Settings, budget: Budget, peak) -> dict:
    import jax
    from lstm_jax import cudnn
    from lstm_jax.model import ModelConfig
    workloads = SMOKE_WORKLOADS if s.smoke else WORKLOADS
    rows, est = [], 5.0
    for wname, variant in (SMOKE_PRIORITY if s.smoke else PRIORITY):
        wl = workloads[wname]
        row = {"workload": wname, "shape": wl, "variant": variant}
        if not budget.fits(est):
            budget.skip(f"{wname}/{variant}")
            rows.append(dict(row, skipped="time budget"))
            continue
        try:
            ctx = contextlib.nullcontext()
            if variant in JAX_VARIANTS:
                backward, dtype = JAX_VARIANTS[variant]
                if backward == "cudnn":
                    try:
                        cudnn.check_supported(ModelConfig(vocab_size=2), jax.default_backend())
                    except ValueError as e:
                        if not s.smoke:
                            rows.append(dict(row, skipped=str(e)))
                            continue
                        ctx, row["emulated"] = cudnn.emulated(), "lstm_ref (no cuDNN here)"
                with ctx:
                    step, sync = _jax_train(wl, backward, dtype)
                    timing = _time(step, sync, s)
            else:
                step, sync = _torch_train(wl, TORCH_VARIANTS[variant])
                timing = _time(step, sync, s)
                del step, sync
                _torch_release()
        except Exception as e:
            if isinstance(e, ImportError) and variant in TORCH_VARIANTS:   # the [bench] extra
                rows.append(dict(row, skipped=f"{e} (pip install '.[bench]')"))
            else:
                rows.append(dict(row, error=_error(e)))
            continue
        est = min(max(est, timing["wall_s"]), 60.0)
        flops = train_flops(wl["objective"], wl["hidden"], wl["layers"], wl["batch"], wl["seq"],
                            wl["vocab"])
        targets = wl["batch"] * (1 if wl["objective"] == "window" else wl["seq"])
        row.update(timing, samples_per_s=wl["batch"] / timing["step_s"],
                   target_chars_per_s=targets / timing["step_s"],
                   model_tflops=flops / timing["step_s"] / 1e12)
        if peak:
            row["mfu_bf16_peak"] = flops / timing["step_s"] / peak["bf16"]
            row["mfu_fp32_peak"] = flops / timing["step_s"] / peak["fp32"]
        rows.append(row)
        print(f"  training {wname}/{variant}: {row['step_s'] * 1e3:.2f} ms/step", file=sys.stderr,
              flush=True)
    for r in rows:   # ratios against PyTorch float32 in the same run
        base = next((b for b in rows if b["workload"] == r["workload"] and b["variant"] == "torch_f32"
                     and "step_s" in b), None)
        if base and "step_s" in r:
            r["x_torch_f32"] = base["step_s"] / r["step_s"]
    return {"rows": rows, "skipped": budget.skipped}


# --- 4. sampling -----------------------------------------------------------------------------

def _torch_sampler(V: int, H: int):
    """PyTorch's stateful per-char loop (bench_sample.torch_runner on the GPU, LSTM(H))."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(V, H, batch_first=True).to(device)
    head = torch.nn.Linear(H, V).to(device)

    @torch.inference_mode()
    def run(rows: int, length: int) -> float:
        t0 = time.perf_counter()
        x = torch.zeros(rows, 1, V, device=device)
        x[:, 0, 0] = 1.0
        state, out = None, []
        for _ in range(length):
            y, state = lstm(x, state)
            idx = torch.multinomial(torch.softmax(head(y[:, 0]), dim=-1), 1)
            x = torch.zeros(rows, 1, V, device=device).scatter_(2, idx[:, :, None], 1.0)
            out.append(idx)
        torch.cat(out, 1).cpu()
        return time.perf_counter() - t0
    return run


def sampling(s: Settings, budget: Budget) -> dict:
    from flax import nnx
    from lstm_jax import sample
    from lstm_jax.data import Vocab
    from lstm_jax.model import CharLSTM, ModelConfig
    V, H = (11, 32) if s.smoke else (NIETZSCHE_VOCAB, 512)
    vocab = Vocab(tuple(chr(ord(" ") + i) for i in range(V)))
    model = CharLSTM(ModelConfig(vocab_size=V, hidden_size=H), rngs=nnx.Rngs(0))
    takes_chunk = "chunk_size" in inspect.signature(sample.generate).parameters
    try:
        torch_run = _torch_sampler(V, H)
    except Exception as e:
        torch_run, torch_error = None, _error(e)
    rows_out, est = [], 5.0
    length = s.sample_length
    for rows in (SMOKE_SAMPLE_ROWS if s.smoke else SAMPLE_ROWS):
        row = {"rows": rows, "length": length, "model": f"LSTM({H}), V={V}"}
        if not budget.fits(est):
            budget.skip(f"{rows} rows")
            rows_out.append(dict(row, skipped="time budget"))
            continue
        t_start = time.perf_counter()
        try:
            kwargs = {"chunk_size": rows} if takes_chunk else {}
            t0 = time.perf_counter()
            sample.generate(model, vocab, num_samples=rows, length=length, seed=0, **kwargs)
            first = time.perf_counter() - t0
            times = []
            for seed in range(1, 1 + max(s.repeats, 2)):
                t0 = time.perf_counter()
                out = sample.generate(model, vocab, num_samples=rows, length=length, seed=seed, **kwargs)
                times.append(time.perf_counter() - t0)
            assert len(out.texts) == rows
            row.update(jax_chars_per_s=rows * length / statistics.median(times),
                       jax_first_call_s=first, jax_runs_s=times)
            if torch_run is not None:
                torch_run(rows, min(length, 8))   # warm-up
                t = statistics.median(torch_run(rows, length) for _ in range(max(s.repeats, 2)))
                row.update(torch_chars_per_s=rows * length / t,
                           speedup=row["jax_chars_per_s"] * t / (rows * length))
            else:
                row["torch_error"] = torch_error
        except Exception as e:
            row["error"] = _error(e)
        est = min(max(est, time.perf_counter() - t_start), 40.0)
        rows_out.append(row)
        print(f"  sampling {rows} rows: {row.get('jax_chars_per_s', 0):,.0f} chars/s",
              file=sys.stderr, flush=True)
    return {"rows": rows_out, "chunk_size": "rows" if takes_chunk else "default",
            "skipped": budget.skipped}


# --- 5. time to quality ------------------------------------------------------------------------

def _events(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def time_to_quality(s: Settings, budget: Budget, workroot: pathlib.Path) -> dict:
    import lstm_jax
    from lstm_jax import corpora
    name = "configs/tiny.py" if s.smoke else "configs/nietzsche.py"
    base = lstm_jax.load_config_file(str(ROOT / name))
    result = {"config": name}
    if not s.smoke:
        try:
            corpora.load_text("nietzsche", lowercase=True)
        except Exception as e:
            base.corpus = "builtin"
            result["corpus_note"] = (f"nietzsche.txt not found ({str(e)[:200]}); the builtin corpus "
                                     f"is used: val_last_loss is not comparable with 1.34")
    result["corpus"] = base.corpus
    kwargs = {"progress": False} if "progress" in inspect.signature(
        lstm_jax.train_and_evaluate).parameters else {}

    def run(c, workdir):
        with contextlib.redirect_stdout(sys.stderr):
            lstm_jax.train_and_evaluate(c, str(workdir), **kwargs)
        return _events(workdir)

    # calibration: steps/s of this config on this device, compile excluded
    cal = base.copy_and_resolve_references()
    cal.max_steps, cal.log_every = (30, 5) if s.smoke else (400, 50)
    cal.sample.every_epochs = 0
    t0 = time.perf_counter()
    events = run(cal, workroot / "ttq_calibration")
    train = [e for e in events if "train_loss" in e and "elapsed_s" in e]
    if len(train) < 3:
        return dict(result, error=f"calibration logged {len(train)} training events")
    first, last = train[1], train[-1]   # from the second event on: past compile and start-up
    rate = (last["step"] - first["step"]) / max(last["elapsed_s"] - first["elapsed_s"], 1e-9)
    steps_per_epoch = round(last["step"] / last["epoch"])
    # elapsed_s is the loop's wall time: it includes compiling and the evaluations, so the run's
    # steps are what is left of `seconds` after those (the calibration's end-of-run evaluation)
    compile_s = max(train[0]["elapsed_s"] - train[0]["step"] / rate, 0.0)
    evals = [e for e in events if "val_last_loss" in e]
    eval_s = max(evals[-1]["elapsed_s"] - last["elapsed_s"], 0.0) if evals else 0.0
    overhead = time.perf_counter() - t0 - last["elapsed_s"]   # start-up, saving, samples
    seconds = min(s.ttq_seconds, budget.left() - max(overhead, 5.0))
    if seconds < min(s.ttq_seconds, 30.0):
        budget.skip("the timed run")
        return dict(result, skipped=budget.skipped, steps_per_s=rate)
    n_evals = 6
    steps = max(int(rate * max(seconds - compile_s - (n_evals + 1) * eval_s, 0.3 * seconds)), 10)
    c = base.copy_and_resolve_references()
    c.max_steps = steps
    c.num_epochs = max(math.ceil(steps / steps_per_epoch), 1)   # the cosine horizon ends with the run
    c.eval_every = max(steps // n_evals, 1)
    c.log_every = max(min(c.log_every, steps // 20), 1)
    c.sample.every_epochs = 0
    # Safety net if the calibrated rate was too optimistic: SIGINT (the loop saves and stops; else
    # KeyboardInterrupt) once the budget is spent, and the evaluations so far are reported.
    fired = threading.Event()

    def stop():
        fired.set()
        os.kill(os.getpid(), signal.SIGINT)
    watchdog = threading.Timer(max(budget.left() - 5.0, seconds), stop)
    watchdog.start()
    try:
        events = run(c, workroot / "ttq")
    except KeyboardInterrupt:
        events = _events(workroot / "ttq")
    finally:
        watchdog.cancel()
    evals = [e for e in events if "val_last_loss" in e]
    trains = [e for e in events if "train_loss" in e]
    reached = next((e["elapsed_s"] for e in evals if e["val_last_loss"] <= KERAS_EPOCH20_LOSS), None)
    result.update(
        steps_per_s=rate, compile_s=compile_s, eval_s=eval_s, planned_train_s=seconds, steps=steps,
        num_epochs=c.num_epochs,
        batch=c.batch_size, seq_len=c.seq_len, hidden=c.model.hidden_size,
        elapsed_s=max((e.get("elapsed_s", 0.0) for e in events), default=None),  # loop wall time
        val_last_loss=evals[-1]["val_last_loss"] if evals else None,
        best_val_last_loss=min((e["val_last_loss"] for e in evals), default=None),
        val_loss=evals[-1].get("val_loss") if evals else None,
        s_to_keras_epoch20_loss=reached,
        curve=[(e["elapsed_s"], e["val_last_loss"]) for e in evals],
        skipped=budget.skipped)
    if s.ttq_seconds > seconds:
        result["note"] = f"training time shortened to {seconds:.0f} s to fit the budget"
    if fired.is_set():
        result["note"] = (f"stopped by the budget watchdog at step {trains[-1]['step'] if trains else 0}"
                          f" of {steps} (the calibrated rate was too high)")
    return result


# --- report --------------------------------------------------------------------------------

def plot(record: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sec = record["sections"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    rows = [r for r in sec.get("training", {}).get("rows", []) if "x_torch_f32" in r]
    labels = [f"{r['workload']}\n{r['variant']}" for r in rows]
    ax.barh(range(len(rows)), [r["x_torch_f32"] for r in rows],
            color=["#d62728" if r["variant"].startswith("torch") else "#1f77b4" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("training throughput / PyTorch float32 (same run)")
    ax = axes[1]
    srows = [r for r in sec.get("sampling", {}).get("rows", []) if "jax_chars_per_s" in r]
    if srows:
        ax.loglog([r["rows"] for r in srows], [r["jax_chars_per_s"] for r in srows], "o-",
                  label="lstm_jax (lax.scan)")
        trows = [r for r in srows if "torch_chars_per_s" in r]
        if trows:
            ax.loglog([r["rows"] for r in trows], [r["torch_chars_per_s"] for r in trows], "s--",
                      label="PyTorch loop")
        ax.legend(fontsize=8)
    ax.set_xlabel("rows per call")
    ax.set_ylabel("generated chars/s")
    ax.set_title(srows[0]["model"] if srows else "sampling", fontsize=9)
    ax = axes[2]
    curve = sec.get("time_to_quality", {}).get("curve") or []
    if curve:
        ax.plot(*zip(*curve), "o-")
        ax.axhline(KERAS_EPOCH20_LOSS, color="g", ls="--", lw=0.8, label="Keras epoch-20 loss")
        ax.legend(fontsize=8)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("val_last_loss (nats/char)")
    ax.set_title(f"time to quality: {sec.get('time_to_quality', {}).get('config', '')}", fontsize=9)
    env = sec.get("environment", {})
    fig.suptitle(f"accelerator check{' (smoke)' if record['smoke'] else ''}: {env.get('device_kind')}, "
                 f"jax {env.get('versions', {}).get('jax')}, torch {env.get('versions', {}).get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(record: dict) -> None:
    sec = record["sections"]
    env = sec.get("environment", {})
    print("\n=== accelerator check summary" + (" (smoke: tiny sizes, not figures)" if record["smoke"] else ""))
    v = env.get("versions", {})
    print(f"environment: {env.get('device_kind')} x{env.get('device_count')} ({env.get('platform')}), "
          f"memory {env.get('memory_bytes_limit') or (env.get('torch_device') or {}).get('total_memory')}"
          f" bytes; jax {v.get('jax')} jaxlib {v.get('jaxlib')} flax {v.get('flax')} optax "
          f"{v.get('optax')} orbax {v.get('orbax-checkpoint')} torch {v.get('torch')}")
    peak = env.get("peak")
    print(f"  peak (MFU reference): " + (f"bf16 {peak['bf16'] / 1e12:.0f}, fp32 {peak['fp32'] / 1e12:.0f} "
          f"TFLOP/s ({peak['source']})" if peak else "unknown device: MFU not computed")
          + f"; measured GEMM {env.get('measured_gemm_tflops')} TFLOP/s; {env.get('host_plan')}")
    print("correctness:")
    for c in sec.get("correctness", {}).get("checks", []):
        err = next((f"{k} {c[k]:.2e}" for k in ("max_rel_err", "max_z") if k in c), "")
        tol = f" (tol {c['tol']:.0e})" if "tol" in c else ""
        status = "SKIP" if c.get("skipped") else ("PASS" if c.get("passed") else
                                                  ("FAIL" if c.get("strict", True) else "info"))
        extra = f" [{c['backend']}]" if "backend" in c else ""
        print(f"  {status}  {c['name']:<40s} {err}{tol}{extra}  {_first_line(c.get('error'))}")
    print("training (samples/s for window, target chars/s for sequence):")
    print(f"  {'workload':<14s} {'variant':<14s} {'ms/step':>9s} {'throughput':>12s} {'x torch_f32':>11s} "
          f"{'TFLOP/s':>8s} {'MFU bf16':>8s}")
    for r in sec.get("training", {}).get("rows", []):
        if "step_s" not in r:
            print(f"  {r['workload']:<14s} {r['variant']:<14s} "
                  f"{_first_line(r.get('skipped') or r.get('error'))}")
            continue
        metric = r["samples_per_s"] if r["shape"]["objective"] == "window" else r["target_chars_per_s"]
        ratio = f"{r['x_torch_f32']:.2f}" if "x_torch_f32" in r else "-"
        mfu = f"{r['mfu_bf16_peak']:.1%}" if "mfu_bf16_peak" in r else "-"
        note = " (emulated)" if r.get("emulated") else ""
        print(f"  {r['workload']:<14s} {r['variant']:<14s} {r['step_s'] * 1e3:9.3f} {metric:12,.0f} "
              f"{ratio:>11s} {r['model_tflops']:8.2f} {mfu:>8s}{note}")
    print("sampling (generated chars/s):")
    for r in sec.get("sampling", {}).get("rows", []):
        if "jax_chars_per_s" not in r:
            print(f"  {r['rows']:>6,d} rows  {_first_line(r.get('skipped') or r.get('error'))}")
            continue
        t = f"{r['torch_chars_per_s']:14,.0f}  x{r['speedup']:.1f}" if "torch_chars_per_s" in r else ""
        print(f"  {r['rows']:>6,d} rows  jax {r['jax_chars_per_s']:14,.0f}  torch {t}")
    q = sec.get("time_to_quality")
    if q is None:
        pass
    elif "val_last_loss" in q:
        print(f"time to quality: {q['config']} ({q['corpus']}), {q['steps']} steps in "
              f"{q.get('elapsed_s')} s (the loop's elapsed_s: compile and evaluations included): "
              f"val_last_loss {q['val_last_loss']:.4f} "
              f"(best {q['best_val_last_loss']:.4f}); <= {KERAS_EPOCH20_LOSS} after "
              f"{q.get('s_to_keras_epoch20_loss')} s" + (f"; {q['note']}" if "note" in q else "")
              + (f"; {q['corpus_note']}" if "corpus_note" in q else ""))
    else:
        print(f"time to quality: {q.get('error') or q.get('skipped')}")
    skipped = [x for k in ("correctness", "training", "sampling", "time_to_quality")
               for x in sec.get(k, {}).get("skipped", [])]
    if skipped:
        print("skipped for time: " + "; ".join(skipped))
    print("section seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds"].items())
          + f"; total {record['total_s']:.0f} s")


def failures(record: dict) -> list[str]:
    sec = record["sections"]
    bad = [c["name"] for c in sec.get("correctness", {}).get("checks", [])
           if not c.get("passed") and not c.get("skipped") and c.get("strict", True)]
    bad += [f"{r['workload']}/{r['variant']}" for r in sec.get("training", {}).get("rows", []) if "error" in r]
    bad += [f"sampling {r['rows']}" for r in sec.get("sampling", {}).get("rows", []) if "error" in r]
    bad += [f"{k}: {_first_line(sec[k]['error'])}" for k in sec if "error" in sec[k]]
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for accelerator_check.json and .png")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, any platform (CI)")
    ap.add_argument("--sections", default="correctness,training,sampling,time_to_quality",
                    help="comma list of sections to run (the environment always runs)")
    ap.add_argument("--ttq-seconds", type=float, default=0,
                    help="training time of the time-to-quality run (default 120; smoke 1)")
    ap.add_argument("--budget-scale", type=float, default=1.0,
                    help="scales every time budget (default 1: 470 s in all on a GPU); e.g. 0.5 "
                         "for a quicker partial check")
    args = ap.parse_args(argv)
    s = settings(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    from lstm_jax import hostenv
    # the CLI's host set-up: a no-op on a GPU/TPU host (the record shows what it decided)
    host_plan = hostenv.setup_host(hidden_size=512, batch_size=64, cpu_devices=1, tune_allocator=True)
    record = {"smoke": s.smoke, "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "budgets_s": dict(s.budgets, total=s.total_s),
              "sections": {}, "seconds": {}}
    names = ["correctness", "training", "sampling", "time_to_quality"]
    wanted = [x for x in args.sections.split(",") if x]
    if set(wanted) - set(names):
        raise SystemExit(f"unknown --sections {sorted(set(wanted) - set(names))}; use some of {names}")
    with tempfile.TemporaryDirectory(prefix="accelerator_check_") as tmp:
        workroot = pathlib.Path(tmp)
        for name in ["environment"] + [x for x in names if x in wanted]:
            t0 = time.perf_counter()
            print(f"[{time.perf_counter() - t_start:5.0f} s] {name}", file=sys.stderr, flush=True)
            # a section's budget, less what the sections after it need from the whole check's
            later = sum(s.budgets[x] for x in names[names.index(name) + 1:] if x in wanted) \
                if name in names else sum(s.budgets[x] for x in wanted)
            budget = Budget(max(0.0, min(s.budgets.get(name, 0.0),
                                         s.total_s - (time.perf_counter() - t_start) - later)))
            try:
                if name == "environment":
                    result = environment(host_plan)
                elif name == "correctness":
                    result = correctness(s, budget, workroot)
                elif name == "training":
                    result = training(s, budget, record["sections"]["environment"].get("peak"))
                elif name == "sampling":
                    result = sampling(s, budget)
                else:
                    result = time_to_quality(s, budget, workroot)
            except Exception as e:
                result = {"error": _error(e)}
            record["sections"][name] = result
            record["seconds"][name] = round(time.perf_counter() - t0, 1)
            record["total_s"] = round(time.perf_counter() - t_start, 1)
            (out / "accelerator_check.json").write_text(json.dumps(record, indent=1, default=str))
    try:
        plot(record, out / "accelerator_check.png")
    except Exception as e:
        record["plot_error"] = _error(e)
    record["failures"] = failures(record)
    record["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "accelerator_check.json").write_text(json.dumps(record, indent=1, default=str))
    print_summary(record)
    if record["failures"]:
        print("FAILED: " + "; ".join(record["failures"]))
    print(f"wrote {out / 'accelerator_check.json'} and {out / 'accelerator_check.png'}")
    return 1 if record["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

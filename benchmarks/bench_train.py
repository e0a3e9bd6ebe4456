"""Training throughput of lstm_jax on this host, with a same-run PyTorch baseline.

Each *variant* (a set of host/model settings) runs in its own worker process, because allocator
settings must be applied before the first big allocation and the CPU device count before JAX starts.
For one workload all variants' workers (PyTorch included) are started and warmed up one after the
other, then timed in interleaved rounds (A B C ... A B C ...), so a change in host load (other jobs
on a shared machine) hits every variant alike and every ratio compares numbers taken seconds apart.

Variants (cumulative, as in the performance issue):
  plain        autodiff backward (jax.grad of lax.scan), 1 CPU device, glibc malloc defaults, f32
  custom       + hand-written BPTT (recurrence.lstm_scan_custom_vjp)
  malloc       + glibc malloc tuned (hostenv.tune_cpu_allocator)
  devices      + one XLA CPU device per core, batch split over them (hostbench.configure_cpu_devices:
               also single-threaded devices and an intra-op pool of 2 threads per device)
  bf16         + bfloat16 matmul inputs (f32 accumulation, f32 cell state)
  plain_dev    autodiff backward + malloc + devices (the "straightforward step" on all cores)
  devices_mt   devices, but the devices share a multi-threaded intra-op pool
  default_env_dev  custom + devices without malloc tuning
  native       the native CPU recurrence (backward='native', = 'auto' in float32 on AVX-512/AVX2)
               + malloc + the host plan's devices, as `lstm-jax train` runs it (the runs in
               results/ before the AVX2 ones used one device per core at every shape: = native_2dev);
               native_1dev / native_2dev: 1 device x 2 kernel threads / 2 devices x 1;
               native_bf16: its bfloat16 recurrent matmuls, devices as native
  torch        PyTorch nn.LSTM as users run it (default environment)
  torch_malloc PyTorch with the same glibc malloc settings (MALLOC_* env vars)
`--define NAME=BASE:JSON` adds ad-hoc variants (other mallopt settings, env vars, XLA flags, or
"root": a copy of the repository to import lstm_jax from, for A/B runs of a code change).

Workloads (`--workloads`): window (Keras reference: H=128, B=128, T=60, loss on the last char; samples/s),
sequence (same model, loss at every position; target chars/s), large (H=512, B=64, T=100,
sequence objective), grid1/grid2/grid3 (1/2/3 layers x hidden 128-1024, B=64, T=50, sequence
objective; "grid" = all three).

The step is the project's own (lstm_jax.steps.make_train_step: jitted, state donated, RMSprop;
clipping off and constant lr, as the Keras reference and the PyTorch baseline). Reported per variant: the
median (and best) of `--repeats` interleaved repeats of ~`--min-time` s each, after compile and
warm-up, ending in block_until_ready; model GFLOP/s (matmul FLOPs, backward = 2x forward) and the
fraction of a large-GEMM peak measured in the same run (MFU); compile time (trace + lower + XLA
compile, from jax.monitoring) and the number of compilations after warm-up (must be 0).

    flock /tmp/lstm_jax_cpu.lock python benchmarks/bench_train.py --workloads window   # ~2 min
    python benchmarks/bench_train.py --workloads window --variants custom,devices,torch
    python benchmarks/bench_train.py --workloads grid1 --variants malloc,devices,torch

    # the batch grid of benchmarks/README.md (B 16-256 x hidden 128-1024 x 1-2 layers, ~35 min):
    python benchmarks/bench_train.py --workloads batchL1,batchL2,default,bigv \
        --variants malloc,devices,torch --repeats 3 --min-time 0.8 --no-gemm-peak
    python benchmarks/bench_train.py --replot          # the table and train_cpu_batch.png

Writes benchmarks/results/train_cpu.json (runs merged per workload name unless --fresh), the
batch grid's chart train_cpu_batch.png, and a chart per other workload run (train_cpu_<name>.png).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from torch_baseline import train_flops  # noqa: E402  (plain python, no torch import)

SEED = dict(vocab=57, hidden=128, layers=1, batch=128, seq=60)
WORKLOADS = {
    "window": [dict(SEED, objective="window")],
    "sequence": [dict(SEED, objective="sequence")],
    "large": [dict(vocab=57, hidden=512, layers=1, batch=64, seq=100, objective="sequence")],
}
# The size grid (sequence objective, B=64, T=50), one entry per layer count so that each run stays
# short; "grid" runs all three.
for _l in (1, 2, 3):
    WORKLOADS[f"grid{_l}"] = [dict(vocab=57, hidden=h, layers=_l, batch=64, seq=50,
                                   objective="sequence") for h in (128, 256, 512, 1024)]
WORKLOADS["grid"] = WORKLOADS["grid1"] + WORKLOADS["grid2"] + WORKLOADS["grid3"]
# The default config's exact shape (`lstm-jax train`: LSTM(256), B=32, T=64, the built-in corpus's
# 103 characters) and issue #12's large vocabulary (V=10,000; the PyTorch peer takes nn.Embedding
# input there, as a PyTorch user would: one-hot input at that V is not a fair peer).
WORKLOADS["default"] = [dict(vocab=103, hidden=256, layers=1, batch=32, seq=64, objective="sequence")]
# configs/recipe.py's shape (LSTM(512), B=32, T=100; the built-in corpus's 103 characters).
WORKLOADS["recipe"] = [dict(vocab=103, hidden=512, layers=1, batch=32, seq=100, objective="sequence")]
WORKLOADS["bigv"] = [dict(vocab=10_000, hidden=256, layers=1, batch=32, seq=64,
                          objective="sequence", torch_input="embedding")]
WORKLOADS["bigv20k"] = [dict(WORKLOADS["bigv"][0], vocab=20_000)]
# Where one device overtakes one per core as V grows (the auto rule's vocabulary bound).
WORKLOADS["vocab"] = [dict(WORKLOADS["bigv"][0], vocab=v) for v in (500, 1_000, 3_000)]
# The batch grid (issue #14): B x hidden x layers, sequence objective, T=64, V=57. One workload
# name per (layers, hidden) so each invocation stays short; "batchL<l>" runs all hidden sizes.
BATCHES = (16, 32, 64, 128, 256)
for _l in (1, 2):
    for _h in (128, 256, 512, 1024):
        WORKLOADS[f"batchL{_l}H{_h}"] = [dict(vocab=57, hidden=_h, layers=_l, batch=_b, seq=64,
                                              objective="sequence") for _b in BATCHES]
    WORKLOADS[f"batchL{_l}"] = [w for _h in (128, 256, 512, 1024)
                                for w in WORKLOADS[f"batchL{_l}H{_h}"]]

# name -> worker settings (backward, malloc, devices, dtype) or torch settings
VARIANTS = {
    "plain": dict(kind="jax", backward="autodiff", malloc=False, devices=1, dtype="float32"),
    "custom": dict(kind="jax", backward="custom", malloc=False, devices=1, dtype="float32"),
    "malloc": dict(kind="jax", backward="custom", malloc=True, devices=1, dtype="float32"),
    "devices": dict(kind="jax", backward="custom", malloc=True, devices=0, dtype="float32"),
    "bf16": dict(kind="jax", backward="custom", malloc=True, devices=0, dtype="bfloat16"),
    "plain_dev": dict(kind="jax", backward="autodiff", malloc=True, devices=0, dtype="float32"),
    "plain_nomalloc_dev": dict(kind="jax", backward="autodiff", malloc=False, devices=0,
                               dtype="float32"),
    "default_env_dev": dict(kind="jax", backward="custom", malloc=False, devices=0, dtype="float32"),
    "devices_mt": dict(kind="jax", backward="custom", malloc=True, devices=0, dtype="float32",
                       single_threaded=False),
    # the native CPU recurrence (lstm_jax/native; what backward='auto' runs in float32 here): the
    # host plan's devices, as `lstm-jax train` (hostenv.recommended_cpu_devices: one per core up
    # to hidden 384, else one; cores // devices kernel threads each), or 1 / 2 devices
    "native": dict(kind="jax", backward="native", malloc=True, devices=0, dtype="float32"),
    "native_1dev": dict(kind="jax", backward="native", malloc=True, devices=1, dtype="float32"),
    "native_2dev": dict(kind="jax", backward="native", malloc=True, devices=2, dtype="float32"),
    "native_bf16": dict(kind="jax", backward="native", malloc=True, devices=0, dtype="bfloat16"),
    "torch": dict(kind="torch", malloc=False),
    "torch_malloc": dict(kind="torch", malloc=True),
}
DEFAULT_VARIANTS = "plain,custom,malloc,devices,bf16,plain_dev,torch,torch_malloc"
GRID_VARIANTS = "devices,torch"


# ------------------------------------------------------------------------------------------------
# Worker: one JAX variant, several workloads, one process.
# ------------------------------------------------------------------------------------------------

def _compile_listener():
    """Collects jax.monitoring compile-duration events; returns (events list, reset fn)."""
    import jax
    events = []

    def listener(name, secs, **kw):
        if "compile" in name or "trace" in name or "lower" in name or "mlir" in name:
            events.append((name, secs))
    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


def _gemm_peak(repeats: int = 5) -> dict:
    """GFLOP/s of a large f32 GEMM under XLA on one device (all its threads) = the MFU reference."""
    import jax
    import jax.numpy as jnp
    out = {}
    for n in (1024, 2048):
        a = jnp.ones((n, n), jnp.float32)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f(a, a).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out[f"xla_f32_{n}"] = 2 * n ** 3 / min(ts) / 1e9
    return out


def _make_step(wl: dict, var: dict):
    """The project's own train step (lstm_jax.steps.make_train_step) on a ('data',) mesh."""
    import jax
    import jax.numpy as jnp
    from lstm_jax import config as config_lib, parallel, steps as train   # the steps module (was train.py)

    cfg = config_lib.get_config()
    cfg.objective = wl["objective"]
    cfg.seq_len = wl["seq"]
    cfg.batch_size = wl["batch"]
    cfg.model.hidden_size = wl["hidden"]
    cfg.model.num_layers = wl["layers"]
    cfg.model.dtype = var["dtype"]
    cfg.model.backward = var["backward"]
    # The Keras reference's optimiser (as the PyTorch baseline): RMSprop, constant lr, no clipping.
    cfg.optimizer.clip_norm = 0.0
    cfg.optimizer.schedule = "constant"
    mesh = parallel.make_mesh()
    mcfg = train.model_config(cfg, wl["vocab"])
    tx = train.make_optimizer(cfg, 1000)
    graphdef, state = train.init_state(cfg, mcfg, tx, mesh)
    step = train.make_train_step(graphdef, tx, cfg, mesh=mesh)
    rng = jax.random.key(1)
    batches = []
    for k in range(4):  # (B, T + 1): inputs and next-char targets
        rows = jax.random.randint(jax.random.fold_in(rng, k), (wl["batch"], wl["seq"] + 1), 0,
                                  wl["vocab"], dtype=jnp.int32)
        batches.append(jax.device_put(rows, parallel.data_sharded(mesh)))
    key = jax.random.key(0)

    def run(state, k):
        return step(state, batches[k % len(batches)], key)
    return state, run, step, mesh


def worker(spec: dict) -> None:
    """One JAX variant x one workload, in a fresh process: set up, compile, warm up, print a ready
    line, then time n steps per {"op": "time"} line on stdin (torch_baseline.serve protocol)."""
    from lstm_jax import hostenv
    from torch_baseline import serve, warm_up
    applied = {}
    if spec["malloc"]:
        applied = hostenv.tune_cpu_allocator(spec.get("mallopt") or None)
    import jax
    n_dev = spec["devices"]
    if n_dev == 0 and spec.get("backward") == "native":
        # as `lstm-jax train` runs it: the host plan's device count for this shape
        wl = spec["workload"]
        n_dev = hostenv.recommended_cpu_devices(wl["hidden"], wl["batch"], vocab_size=wl["vocab"])
    import hostbench
    hostbench.configure_cpu_devices(n_dev if n_dev else None,
                                    single_threaded_devices=spec.get("single_threaded", True))
    events = _compile_listener()
    wl = spec["workload"]
    t0 = time.perf_counter()
    state, run, step, mesh = _make_step(wl, spec)
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - t0
    del events[:]
    holder = {"state": state}

    def one(k):
        holder["state"], metrics = run(holder["state"], k)
        return metrics

    def sync(metrics):
        jax.block_until_ready((holder["state"], metrics))
        return metrics["loss"]

    first_s, n = warm_up(one, spec["min_time"], sync=sync)
    compile_events = list(events)

    def total(suffix):
        return sum(s for name, s in compile_events if name.endswith(suffix))
    # A warm-up that spans several steps may include the first step's compile only; any
    # compilation event after that is a recompilation.
    n_compiles = sum(1 for name, _ in compile_events if name.endswith("backend_compile_duration"))
    ready = {"ready": True, "jax_devices": [str(d) for d in jax.devices()],
             "mallopt_applied": applied, "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "first_step_s": first_s, "setup_s": setup_s, "steps_per_repeat": n,
             "compile_s": {"trace": total("jaxpr_trace_duration"),
                           "lower": total("jaxpr_to_mlir_module_duration"),
                           "backend_compile": total("backend_compile_duration")},
             "compiles_in_warmup": n_compiles}
    if spec.get("gemm_peak"):
        ready["gemm_peak_gflops"] = _gemm_peak()
    del events[:]
    print(json.dumps(ready), flush=True)
    serve(one, n, sync=lambda m: float(sync(m)))
    # after serve returns (finish): report compilations during the timed repeats
    recompiles = sum(1 for name, _ in events if name.endswith("backend_compile_duration"))
    print(json.dumps({"compiles_after_warmup": recompiles}), flush=True)


# ------------------------------------------------------------------------------------------------
# Orchestrator
# ------------------------------------------------------------------------------------------------

class Child:
    """A worker process speaking the ready / time / finish line protocol."""

    def __init__(self, name: str, cmd: list[str], env: dict, timeout: float):
        self.name, self.timeout = name, timeout
        self.proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.info = self._read()
        self.times: list[float] = []

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                err = self.proc.stderr.read()[-4000:]
                raise RuntimeError(f"{self.name} exited ({self.proc.wait()}):\n{err}")
            if line.startswith("{"):
                return json.loads(line)

    def time(self) -> float:
        self.proc.stdin.write('{"op": "time"}\n')
        self.proc.stdin.flush()
        t = self._read()["t"]
        self.times.append(t)
        return t

    def finish(self) -> dict:
        self.proc.stdin.write('{"op": "finish"}\n')
        self.proc.stdin.flush()
        out = self._read()
        if self.info.get("ready") and "jax_devices" in self.info:
            out.update(self._read())
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return out


def start_child(name: str, wl: dict, args, gemm_peak: bool) -> Child:
    from lstm_jax import hostenv  # no jax import
    var = VARIANTS[name]
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES":
            del env[k]
    if var["kind"] == "torch":
        if var["malloc"]:
            import hostbench
            env.update(hostbench.allocator_env())
        cmd = [sys.executable, str(ROOT / "benchmarks" / "torch_baseline.py"), "--serve",
               "--workloads-json", json.dumps([wl]), "--min-time", str(args.min_time)]
        return Child(name, cmd, env, args.timeout)
    spec = dict(var, name=name, workload=wl, min_time=args.min_time, gemm_peak=gemm_peak)
    env.update(var.get("env", {}))
    if var.get("xla_flags"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + var["xla_flags"]).strip()
    if var["dtype"] == "bfloat16" and args.bf16_isa:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_cpu_max_isa={args.bf16_isa}").strip()
    env.pop("LSTM_JAX_NO_MALLOC_TUNING", None)
    # "root": a copy of the repository whose lstm_jax the worker imports (A/B of a code change in
    # the same interleaved run; the worker puts its own root first on sys.path).
    script = pathlib.Path(var["root"]) / "benchmarks" / "bench_train.py" if var.get("root") else \
        pathlib.Path(__file__).resolve()
    cmd = [sys.executable, str(script), "--worker", json.dumps(spec)]
    return Child(name, cmd, env, args.timeout)


def run_workload(wl: dict, variants: list[str], args, want_peak: bool) -> tuple[list[dict], dict]:
    """Starts one worker per variant (one at a time: compile and warm-up), then times them in
    interleaved rounds, so that a load change on the host hits every variant alike."""
    children, peak = [], None
    # The peak is measured in a one-device worker (all cores in its pool) where there is one: a
    # worker with one single-threaded device per core measures a core's share, not the host's.
    peak_at = next((i for i, v in enumerate(variants) if VARIANTS[v].get("devices") == 1), 0)
    try:
        for i, v in enumerate(variants):
            t0 = time.perf_counter()
            children.append(start_child(v, wl, args, gemm_peak=want_peak and i == peak_at))
            peak = peak or children[-1].info.get("gemm_peak_gflops")
            print(f"  [{_wl_key(wl)}] {v}: ready in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        for _ in range(args.repeats):
            for c in children:
                time.sleep(args.pause)
                c.time()
        finals = [c.finish() for c in children]
    finally:
        for c in children:
            if c.proc.poll() is None:
                c.proc.kill()
    rows = []
    window = wl["objective"] == "window"
    flops = train_flops(wl["objective"], wl["hidden"], wl["layers"], wl["batch"], wl["seq"],
                        wl["vocab"])
    for c, fin in zip(children, finals):
        med = statistics.median(c.times)
        info = {k: v for k, v in c.info.items() if k not in ("ready", "gemm_peak_gflops")}
        rows.append(dict(info, **fin, variant=c.name, settings=VARIANTS[c.name], workload=wl,
                         step_s=med, step_s_min=min(c.times), step_s_all=c.times,
                         samples_per_s=wl["batch"] / med,
                         target_chars_per_s=(wl["batch"] if window else wl["batch"] * wl["seq"]) / med,
                         gflops=flops / med / 1e9, model_gflop_per_step=flops / 1e9))
    return rows, peak


def _wl_key(wl: dict) -> str:
    return f"{wl['objective']}/L{wl['layers']}xH{wl['hidden']}/B{wl['batch']}xT{wl['seq']}"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "torch"):
        try:
            from importlib.metadata import version
            out[mod] = version(mod)
        except Exception:
            out[mod] = None
    return out


def summarize(rows: list[dict], peak: float | None) -> dict:
    """{workload_key: {variant: metric, ..., ratios}} with the headline metric per objective."""
    table = {}
    for r in rows:
        if "workload" not in r:
            continue
        key = _wl_key(r["workload"])
        metric = "samples_per_s" if r["workload"]["objective"] == "window" else "target_chars_per_s"
        t = table.setdefault(key, {"metric": metric, "values": {}, "best": {}, "gflops": {},
                                   "mfu": {}, "compile_s": {}, "peak_rss_mb": {}})
        t["values"][r["variant"]] = r[metric]
        t["best"][r["variant"]] = r[metric] * r["step_s"] / r["step_s_min"]
        if "compile_s" in r:
            t["compile_s"][r["variant"]] = sum(r["compile_s"].values())
        t["gflops"][r["variant"]] = r["gflops"]
        if r.get("peak_rss_mb"):
            t["peak_rss_mb"][r["variant"]] = r["peak_rss_mb"]
        if peak:
            t["mfu"][r["variant"]] = r["gflops"] / peak
    for t in table.values():
        v = t["values"]
        for base in ("torch", "torch_malloc"):
            if base in v:
                t[f"ratio_vs_{base}"] = {k: x / v[base] for k, x in v.items()}
    return table


def print_table(table: dict) -> None:
    for key, t in table.items():
        print(f"\n{key}  [{t['metric']}]")
        for var, val in t["values"].items():
            extra = f"  (best {t['best'][var]:,.0f})"
            for base in ("torch", "torch_malloc"):
                if f"ratio_vs_{base}" in t:
                    extra += f"  x{t[f'ratio_vs_{base}'][var]:.2f} vs {base}"
            mfu = f"  MFU {t['mfu'][var]:.0%}" if var in t["mfu"] else ""
            rss = t.get("peak_rss_mb", {}).get(var)
            extra += f"  peak RSS {rss:,.0f} MiB" if rss else ""
            print(f"  {var:<20s} {val:12,.0f}   {t['gflops'][var]:6.1f} GFLOP/s{mfu}{extra}")


def plot(table: dict, path: pathlib.Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = list(table)
    fig, axes = plt.subplots(1, len(keys), figsize=(max(6.4, 4.2 * len(keys)), 4.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        t = table[key]
        names = list(t["values"])
        base = t.get("ratio_vs_torch")
        vals = [base[n] if base else t["values"][n] for n in names]
        colors = ["#d62728" if n.startswith("torch") else "#1f77b4" for n in names]
        ax.barh(names, vals, color=colors)
        ax.invert_yaxis()
        if base:
            ax.axvline(1.0, color="k", lw=0.8)
            ax.axvline(1.5, color="g", lw=0.8, ls="--")
            ax.set_xlabel("throughput / PyTorch (default env)")
        else:
            ax.set_xlabel(t["metric"])
        for i, n in enumerate(names):
            ax.text(vals[i], i, f" {t['values'][n]:,.0f}", va="center", fontsize=7)
        ax.set_title(key.replace("/", "\n", 1), fontsize=9)
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cpu_count_label() -> str:
    return f"{os.cpu_count()} cores"


def plot_grid(rows: list[dict], path: pathlib.Path, peak: float | None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for var in sorted({r["variant"] for r in rows if "workload" in r}):
        for layers in (1, 2, 3):
            pts = sorted((r["workload"]["hidden"], r["gflops"]) for r in rows
                         if r.get("variant") == var and r.get("workload", {}).get("layers") == layers)
            if pts:
                ax.plot(*zip(*pts), marker="o", ls="-" if not var.startswith("torch") else "--",
                        label=f"{var} L={layers}")
    if peak:
        ax.axhline(peak, color="k", lw=0.8, ls=":", label=f"GEMM peak {peak:.0f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden size")
    ax.set_ylabel("achieved model GFLOP/s")
    ax.legend(fontsize=7, ncol=2)
    shapes = {(r["workload"]["batch"], r["workload"]["seq"]) for r in rows if "workload" in r}
    ax.set_title("sequence objective, " + ", ".join(f"B={b}, T={t}" for b, t in sorted(shapes))
                 + f", {cpu_count_label()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def auto_variant(wl: dict) -> str:
    """The JAX variant `lstm-jax train` runs for this shape: one device per core ("devices") or
    one device ("malloc"), as hostenv.recommended_cpu_devices decides on a 2-core host."""
    from lstm_jax import hostenv
    n = hostenv.recommended_cpu_devices(wl["hidden"], wl["batch"], cores=2,
                                        vocab_size=wl["vocab"])
    return "devices" if n > 1 else "malloc"


def batch_grid_rows(record: dict) -> list[dict]:
    """One row per shape of the batch grid and the default/large-V workloads (untagged runs):
    target chars/s of PyTorch, one device ("malloc") and one per core ("devices"), the variant
    the auto rule picks, and each one's ratio to PyTorch in the same interleaved run."""
    out = []
    for key, run in record["runs"].items():
        if ":" in key or not key.startswith(("batch", "default", "recipe", "bigv")):
            continue
        shapes = {_wl_key(r["workload"]): r["workload"] for r in run["rows"] if "workload" in r}
        for wl_key, t in run["summary"].items():
            v = t["values"]
            if not {"torch", "malloc", "devices"} <= set(v):
                continue
            wl = shapes[wl_key]
            auto = auto_variant(wl)
            out.append(dict(workload=key, layers=wl["layers"], hidden=wl["hidden"],
                            batch=wl["batch"], vocab=wl["vocab"], torch=v["torch"],
                            one_device=v["malloc"], two_devices=v["devices"], auto=auto,
                            auto_value=v[auto], ratio_auto=v[auto] / v["torch"],
                            ratio_one=v["malloc"] / v["torch"], ratio_two=v["devices"] / v["torch"],
                            time=run["time"]))
    return sorted(out, key=lambda r: (r["vocab"] != 57, r["layers"], r["hidden"], r["batch"]))


def native_grid_rows(record: dict) -> list[dict]:
    """One row per shape of the runs tagged "native" (`--tag native --variants native,torch`,
    plus custom-scan and bf16 variants where run): chars/s, ratio to PyTorch and MFU per variant."""
    out = []
    for key, run in record["runs"].items():
        if not key.endswith(":native"):
            continue
        shapes = {_wl_key(r["workload"]): r["workload"] for r in run["rows"] if "workload" in r}
        for wl_key, t in run["summary"].items():
            v = t["values"]
            if not {"torch", "native"} <= set(v):
                continue
            wl = shapes[wl_key]
            out.append(dict(workload=key, layers=wl["layers"], hidden=wl["hidden"],
                            batch=wl["batch"], vocab=wl["vocab"], seq=wl["seq"], values=v,
                            ratio={k: x / v["torch"] for k, x in v.items()},
                            mfu=t.get("mfu", {}), ratio_auto=v["native"] / v["torch"],
                            time=run["time"]))
    return sorted(out, key=lambda r: (r["vocab"] != 57, r["layers"], r["hidden"], r["batch"]))


def print_native_grid(rows: list[dict]) -> None:
    """The native grid as a Markdown table: ratio to PyTorch and MFU of each variant."""
    variants = sorted({k for r in rows for k in r["values"]} - {"torch"},
                      key=lambda k: (k != "native", k))
    print("| layers | hidden | B | T | V | PyTorch chars/s | " +
          " | ".join(f"{k} / PyTorch (MFU)" for k in variants) + " | PyTorch MFU |")
    print("|---|---|---|---|---|---|" + "---|" * (len(variants) + 1))
    for r in rows:
        cells = [f"{r['ratio'][k]:.2f}x ({r['mfu'].get(k, float('nan')):.0%})" if k in r["values"]
                 else "" for k in variants]
        print(f"| {r['layers']} | {r['hidden']} | {r['batch']} | {r['seq']} | {r['vocab']} | "
              f"{r['values']['torch']:,.0f} | " + " | ".join(cells) +
              f" | {r['mfu'].get('torch', float('nan')):.0%} |")


def print_batch_grid(rows: list[dict]) -> None:
    """The grid as a Markdown table (for the README)."""
    print("| layers | hidden | B | V | PyTorch | 1 device | 2 devices | auto | auto / PyTorch |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['hidden']} | {r['batch']} | {r['vocab']} | {r['torch']:,.0f} | "
              f"{r['one_device']:,.0f} ({r['ratio_one']:.2f}x) | {r['two_devices']:,.0f} "
              f"({r['ratio_two']:.2f}x) | {'2' if r['auto'] == 'devices' else '1'} | "
              f"**{r['ratio_auto']:.2f}x** |")


def plot_batch_grid(rows: list[dict], path: pathlib.Path,
                    who: str = "lstm_jax (auto devices)") -> None:
    """Throughput / PyTorch against batch size, one line per hidden size, one panel per layer
    count, for the setting the auto rule picks; the default config's shape and V = 10,000 as
    markers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, layers in zip(axes, (1, 2)):
        for hidden in sorted({r["hidden"] for r in rows}):
            pts = sorted((r["batch"], r["ratio_auto"]) for r in rows if r["vocab"] == 57
                         and r["layers"] == layers and r["hidden"] == hidden)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"hidden {hidden}")
        if layers == 1:
            for r in rows:
                if r["vocab"] != 57:
                    ax.plot(r["batch"], r["ratio_auto"], marker="*" if r["vocab"] < 1000 else "s",
                            ms=11, ls="", color="k",
                            label=f"default config (V={r['vocab']})" if r["vocab"] < 1000
                            else f"LSTM(256), V={r['vocab']:,}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(1.2, color="g", lw=0.8, ls="--")
        ax.set_yscale("log", base=2)   # ratios above ~2 are PyTorch's own slowdowns (glibc malloc)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size B (T = 64)")
        ax.set_title(f"{layers} layer{'s' if layers > 1 else ''}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"target chars/s: {who} / PyTorch")
    axes[1].text(0.02, 0.02, "ratios far above 2: PyTorch's default glibc malloc collapses at "
                 "that shape\n(benchmarks/README.md)", transform=axes[1].transAxes, fontsize=7)
    fig.suptitle("Training throughput relative to PyTorch nn.LSTM on this CPU (2 cores), same "
                 "interleaved run, sequence objective", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default="window,sequence,large",
                    help=f"comma list of {sorted(WORKLOADS)}")
    ap.add_argument("--native", action="store_true",
                    help="with --replot: only the native grid (runs tagged 'native')")
    ap.add_argument("--variants", default=None,
                    help=f"comma list of {sorted(VARIANTS)} (default: {DEFAULT_VARIANTS}; "
                         f"for grid: {GRID_VARIANTS})")
    ap.add_argument("--define", action="append", default=[], metavar="NAME=BASE:JSON",
                    help="ad-hoc variant: BASE's settings updated with a JSON object, e.g. "
                         "'st2=devices:{\"xla_flags\": \"--xla_cpu_multi_thread_eigen=false\"}'")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch variants")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats per variant")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timed repeat")
    ap.add_argument("--bf16-isa", default="",
                    help="--xla_cpu_max_isa for the bf16 variant, e.g. AVX512_BF16 (only where the "
                         "CPU exposes it)")
    ap.add_argument("--no-gemm-peak", dest="gemm_peak", action="store_false",
                    help="skip measuring the large-GEMM peak (the MFU reference)")
    ap.add_argument("--pause", type=float, default=0.05,
                    help="seconds of idle between timed repeats (lets spinning threads settle)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", default=str(RESULTS / "train_cpu.json"))
    ap.add_argument("--fresh", action="store_true", help="do not merge with an existing JSON")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNGs from the JSON")
    ap.add_argument("--all-charts", action="store_true",
                    help="with --replot: every workload's chart, not only train_cpu_batch.png "
                         "(the one the docs show)")
    ap.add_argument("--tag", default="", help="store the runs as '<workload>:<tag>' (keeps the "
                                              "main per-workload entries)")
    args = ap.parse_args(argv)

    if args.worker:
        worker(json.loads(args.worker))
        return 0

    for d in args.define:
        name, rest = d.split("=", 1)
        base, js = rest.split(":", 1)
        VARIANTS[name] = dict(VARIANTS[base], **json.loads(js))

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.replot:
        record = json.loads(out.read_text())
        peak = (record.get("gemm_peak_gflops") or {}).get("max")
        for key, run in record["runs"].items() if args.all_charts else ():
            if key.startswith(("grid", "batch", "default", "recipe", "bigv")) or ":" in key:
                continue
            wname, _, tag = key.partition(":")
            plot(run["summary"], out.parent / f"train_cpu_{wname}{'_' + tag if tag else ''}.png",
                 f"{key}: lstm_jax vs PyTorch {record['versions'].get('torch')}, "
                 f"{record['host']['cpu_count']} cores (median of {run['repeats']} interleaved "
                 f"repeats, {run['time']})")
        grid_rows = [r for k, v in record["runs"].items() if k.startswith("grid") for r in v["rows"]]
        if grid_rows and args.all_charts:
            plot_grid(grid_rows, out.parent / "train_cpu_grid.png", peak)
        batch_rows = batch_grid_rows(record)
        if batch_rows and not args.native:
            plot_batch_grid(batch_rows, out.parent / "train_cpu_batch.png")
            print_batch_grid(batch_rows)
        native_rows = native_grid_rows(record)
        if native_rows:
            plot_batch_grid(native_rows, out.parent / "train_cpu_native.png",
                            who="lstm_jax (native kernel)")
            print_native_grid(native_rows)
        return 0
    record = {}
    if out.exists() and not args.fresh:
        record = json.loads(out.read_text())
    runs = record.setdefault("runs", {})
    for wname in args.workloads.split(","):
        variants = (args.variants or (GRID_VARIANTS if wname.startswith("grid") else DEFAULT_VARIANTS)).split(",")
        if args.no_torch:
            variants = [v for v in variants if not v.startswith("torch")]
        t_start = time.time()
        rows, peak = [], None
        errors = []
        for wl in WORKLOADS[wname]:
            try:
                r, p = run_workload(wl, variants, args, want_peak=peak is None and args.gemm_peak)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                print(f"  [{_wl_key(wl)}] FAILED: {e}", file=sys.stderr, flush=True)
                errors.append({"workload": wl, "error": str(e)[-2000:]})
                continue
            rows += r
            peak = peak or p
        if peak:
            record["gemm_peak_gflops"] = dict(peak, max=max(peak.values()))
        peak_val = (record.get("gemm_peak_gflops") or {}).get("max")
        table = summarize(rows, peak_val)
        print_table(table)
        key = f"{wname}:{args.tag}" if args.tag else wname
        runs[key] = {"time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t_start)),
                       "command": " ".join([pathlib.Path(sys.argv[0]).name] + sys.argv[1:]),
                       "repeats": args.repeats, "min_time_s": args.min_time,
                       "load_avg_after": os.getloadavg(), "errors": errors,
                       "summary": table, "rows": rows}
        import hostbench
        record["host"] = hostbench.describe()
        record["host"]["machine"] = platform.machine()
        record["host"]["device_kind"] = "cpu"
        record["versions"] = _versions()
        out.write_text(json.dumps(record, indent=1))
        if wname.startswith("grid"):
            plot_grid([r for k, v in runs.items() if k.startswith("grid") for r in v["rows"]],
                      out.parent / "train_cpu_grid.png", peak_val)
        elif wname.startswith(("batch", "default", "recipe", "bigv")) and not args.tag:
            if batch_grid_rows(record):
                plot_batch_grid(batch_grid_rows(record), out.parent / "train_cpu_batch.png")
        elif table and not args.tag:   # tagged A/B runs are kept in the JSON only
            plot(table, out.parent / f"train_cpu_{wname}{'_' + args.tag if args.tag else ''}.png",
                 f"{wname}: lstm_jax vs PyTorch {record['versions'].get('torch')}, "
                 f"{record['host']['cpu_count']} cores (median of {args.repeats} interleaved repeats)")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

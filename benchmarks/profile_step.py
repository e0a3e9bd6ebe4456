"""Where the train step's time goes: a jax.profiler trace of the Keras reference model's step, summed per XLA op.

Runs the project's train step (lstm_jax.steps.make_train_step, the CLI's host settings) for the Keras reference
model (LSTM(128), vocab 57, B=128, T=60, window objective; or the shape given by --hidden, --layers,
--batch, --seq, --vocab, --objective and --config), traces `--steps`
steps with `jax.profiler.trace(create_perfetto_trace=True)`, and sums the XLA:CPU thunk events by
name. Each op is put in a group: the per-timestep matmuls inside the time loops (forward h @ W_hh,
backward dgates @ W_hh.T), the one weight-gradient GEMM after the loop, the elementwise gate work
inside the loops, the native kernel's calls (where `auto` runs it: the whole recurrence, the
matmuls and gates of every timestep, in one call per direction), the gradient all-reduce, and the
rest. Times are summed over devices (with 2
devices on 2 cores, a group's wall share is about its sum / 2).

    python benchmarks/profile_step.py --devices 1
    python benchmarks/profile_step.py --devices 2 --out benchmarks/results/profile_cpu_2dev.json
    python benchmarks/profile_step.py --devices 2 --objective sequence --hidden 256 --batch 32 \
        --seq 64 --vocab 103 --config configs/default.py --gemm      # the default config's step
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1, help="CPU devices (one per core: 2)")
    ap.add_argument("--objective", default="window", choices=["window", "sequence"])
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None, help="default: the Keras reference's 128")
    ap.add_argument("--seq", type=int, default=None, help="default: the Keras reference's 60")
    ap.add_argument("--vocab", type=int, default=57)
    ap.add_argument("--steps", type=int, default=20, help="traced steps")
    ap.add_argument("--top", type=int, default=25, help="ops listed by name")
    ap.add_argument("--config", default=str(ROOT / "configs" / "nietzsche_keras.py"),
                    help="config file the optimizer and init come from (default: the Keras reference's)")
    ap.add_argument("--gemm", action="store_true",
                    help="also time the loops' matmul shapes alone: XLA (a loop of 64 dependent "
                         "matmuls, as in the recurrence) against PyTorch/MKL torch.mm")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = ap.parse_args()

    from lstm_jax import hostenv
    hostenv.tune_cpu_allocator()
    import hostbench
    hostbench.configure_cpu_devices(args.devices)
    import jax
    import numpy as np
    from lstm_jax import parallel, steps as train   # the steps module (was train.py)
    from lstm_jax.config import load_config_file

    config = load_config_file(args.config)
    config.objective = args.objective
    config.model.hidden_size, config.model.num_layers = args.hidden, args.layers
    config.batch_size = args.batch or config.batch_size
    config.seq_len = args.seq or config.seq_len
    mesh = parallel.make_mesh()
    tx = train.make_optimizer(config, 1000)
    graphdef, state = train.init_state(config, train.model_config(config, args.vocab), tx, mesh)
    step = train.make_train_step(graphdef, tx, config, mesh=mesh)
    rows = np.random.default_rng(0).integers(0, args.vocab, (config.batch_size, config.seq_len + 1))
    batch, key = parallel.to_global(rows.astype(np.int32), mesh), jax.random.key(0)
    hlo = step.lower(state, batch, key).compile().as_text()
    for _ in range(10):
        state, _ = step(state, batch, key)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, _ = step(state, batch, key)
    jax.block_until_ready(state)
    step_ms = (time.perf_counter() - t0) / args.steps * 1e3

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, _ = step(state, batch, key)
            jax.block_until_ready(state)
            traced_ms = (time.perf_counter() - t0) / args.steps * 1e3
        trace = sorted(glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(trace))["traceEvents"]

    per_op = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and _is_xla_op(e["name"]):
            per_op[e["name"]][0] += e["dur"] / 1e3 / args.steps
            per_op[e["name"]][1] += 1 / args.steps
    groups = collections.defaultdict(float)
    ops = []
    for name, (ms, calls) in sorted(per_op.items(), key=lambda kv: -kv[1][0]):
        group = _group(name, calls, hlo, config.seq_len)
        if not name.startswith("while"):   # a loop's time is the sum of the ops inside it
            groups[group] += ms
        ops.append({"op": name, "ms_per_step": round(ms, 3), "calls_per_step": round(calls, 1),
                    "group": group})
    result = {
        "benchmark": "profile_step", "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "batch": config.batch_size, "seq": config.seq_len, "objective": args.objective},
        "devices": jax.device_count(), "step_ms_untraced": round(step_ms, 2),
        "samples_per_s_untraced": round(config.batch_size / step_ms * 1e3),
        "note": "ms per step summed over devices (2 devices on 2 cores run concurrently)",
        "groups_ms_per_step": {g: round(v, 2) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        # Tracing slows small ops down: compare the summed op time with the traced step time.
        "traced_step_ms": round(traced_ms, 2),
        "op_ms_sum_per_device": round(sum(groups.values()) / jax.device_count(), 2),
        "ops": ops[:args.top],
    }
    if args.gemm:
        result["gemm"] = _gemm_table(config.batch_size // jax.device_count(), args.hidden)
    print(f"{jax.device_count()} device(s): {step_ms:.2f} ms/step untraced "
          f"({result['samples_per_s_untraced']} samples/s)")
    for g, v in result["groups_ms_per_step"].items():
        print(f"  {v:8.2f} ms  {g}")
    print(f"  (traced: {traced_ms:.2f} ms/step; summed ops per device {result['op_ms_sum_per_device']} ms)")
    for row in result.get("gemm", []):
        print(f"  gemm {row}")
    for op in result["ops"]:
        print(f"    {op['ms_per_step']:8.3f} ms {op['calls_per_step']:6.1f}x  {op['op']}  [{op['group']}]")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1))
        print("wrote", args.out)


def _gemm_table(rows: int, hidden: int) -> list[dict]:
    """GFLOP/s of the recurrence's two per-step matmul shapes, (rows, H) x (H, 4H) and
    (rows, 4H) x (4H, H): XLA as a jitted loop of 64 dependent matmuls on one device (the loop's
    own situation; with several CPU devices each device runs them single-threaded), and
    PyTorch's torch.mm (MKL) on 1 and on all threads, median of 7 x 200 calls."""
    import statistics
    import jax
    import jax.numpy as jnp
    import numpy as np
    out = []
    for k, n in ((hidden, 4 * hidden), (4 * hidden, hidden)):
        flop = 2 * rows * k * n
        w = jax.device_put(jnp.asarray(np.random.randn(k, n).astype(np.float32) * 0.01),
                           jax.devices()[0])
        x = jax.device_put(jnp.asarray(np.random.randn(rows, k).astype(np.float32)), jax.devices()[0])

        def loop(x, w, k=k, n=n):
            def body(i, a):
                y = jnp.dot(a, w)
                return y[:, :k] if n >= k else jnp.tile(y, (1, k // n))
            return jax.lax.fori_loop(0, 64, body, x)
        f = jax.jit(loop)
        f(x, w).block_until_ready()
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(5):
                r = f(x, w)
            r.block_until_ready()
            ts.append((time.perf_counter() - t0) / 5 / 64)
        row = {"shape": f"({rows}, {k}) x ({k}, {n})", "xla_loop_us": statistics.median(ts) * 1e6}
        try:
            import torch
        except ImportError:
            out.append(row)
            continue
        a, b, c = torch.randn(rows, k), torch.randn(k, n), torch.empty(rows, n)
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            for _ in range(20):
                torch.mm(a, b, out=c)
            ts = []
            for _ in range(7):
                t0 = time.perf_counter()
                for _ in range(200):
                    torch.mm(a, b, out=c)
                ts.append((time.perf_counter() - t0) / 200)
            row[f"torch_mm_{threads}thr_us"] = statistics.median(ts) * 1e6
        torch.set_num_threads(default_threads)
        for key in [key for key in row if key.endswith("_us")]:
            row[key.replace("_us", "_gflops")] = flop / row[key] * 1e-3
        out.append({key: round(v, 1) if isinstance(v, float) else v for key, v in row.items()})
    return out


def _is_xla_op(name: str) -> bool:
    """Thunk-level XLA ops (fusions, dots, copies, collectives), not runtime/Python scopes."""
    if name.startswith(("$", "Thunk", "Pjit", "Common", "[", "Wait", "Slinky", "Rendezvous")):
        return False
    return re.fullmatch(r"[\w.\-]+", name) is not None and " " not in name


def _group(name: str, calls: float, hlo: str, seq_len: int) -> str:
    in_loop = calls >= seq_len - 0.5       # runs once per timestep (per device)
    if name.startswith("while"):
        return "while loop thunk (its inner ops are listed separately; not summed)"
    if name.startswith("all-reduce"):
        return "gradient all-reduce (incl. waiting for the other device)"
    if _is_native(name, hlo):
        return "native recurrence kernel (forward and backward, all timesteps)"
    is_dot = name.startswith(("ynn_fusion", "dot", "xnn_fusion")) and _is_dot(name, hlo)
    if is_dot and in_loop:
        return "per-timestep matmuls (inside loops)"
    if is_dot:
        return "matmuls outside the loops (weight-gradient GEMM, head)"
    if in_loop:
        return "elementwise / slicing inside loops"
    return "other (loss, optimizer, scatter, copies)"


def _hlo_line(name: str, hlo: str) -> str:
    """The compiled HLO's defining line of op `name` ('' if absent)."""
    m = re.search(rf"%{re.escape(name)} = [^\n]*", hlo)
    return m.group(0) if m else ""


def _is_native(name: str, hlo: str) -> bool:
    return "lstm_jax_native_" in _hlo_line(name, hlo)


def _is_dot(name: str, hlo: str) -> bool:
    return "dot_general" in _hlo_line(name, hlo) or name.startswith("dot")


if __name__ == "__main__":
    main()

"""PyTorch CPU baseline: the same character LSTM trained the way a PyTorch user would write it.

Model: one-hot input (B, T, V) -> nn.LSTM(V, H, num_layers, batch_first=True) -> nn.Linear(H, V),
or with workload["torch_input"] = "embedding" nn.Embedding(V, H) -> nn.LSTM(H, H, ...) (large V);
RMSprop(lr=0.01, alpha=0.9, eps=1e-7) (Keras's RMSprop defaults, as the Keras reference). Objectives:
  window:   logits of the last position only, cross-entropy against the next char (samples/s)
  sequence: logits at every position, cross-entropy against every next char (target chars/s)

Usually run by benchmarks/bench_train.py in a subprocess (so allocator env vars such as
MALLOC_MMAP_MAX_ apply from process start); standalone:

    python benchmarks/torch_baseline.py --objective window --hidden 128 --batch 128 --seq 60

prints one JSON object per workload on stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lstm_jax import bench, flops  # noqa: E402  (the standard library and numpy only: no JAX)


def train_flops(objective: str, hidden: int, layers: int, batch: int, seq: int, vocab: int,
                count_onehot: bool = False) -> float:
    """Model FLOPs of one training step: `lstm_jax.flops` (matmuls only; backward = 2x forward).

    The first layer's input projection is a gather in lstm_jax (one-hot @ W_ih), so it is not
    counted unless `count_onehot`; the same count is used for both libraries.
    """
    model = types.SimpleNamespace(vocab_size=vocab, hidden_size=hidden, num_layers=layers)
    onehot = 3.0 * seq * batch * 2 * vocab * 4 * hidden if count_onehot else 0.0
    return flops.train_flops_per_step(model, batch, seq, objective) + onehot


def build(wl: dict, threads: int | None = None):
    """(step(k) -> loss tensor, info) for one workload: `lstm_jax.bench.torch_step` (one-hot input
    unless wl["torch_input"] == "embedding"), plus the MALLOC_ settings in effect."""
    step, info = bench.torch_step(dict(wl, torch_input=wl.get("torch_input", "onehot")), threads)
    info["malloc_env"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return step, info


peak_rss_mb = bench.peak_rss_mb
warm_up = bench.warm_up


def serve(step, n: int, sync, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """`lstm_jax.bench.serve`; {"op": "finish"} answers the last loss and the peak RSS. Used by
    bench_train.py to interleave repeats of all variants."""
    bench.serve(step, n, sync, stdin, stdout,
                finish=lambda last: {"finished": True, "loss": float(sync(last(0))) if last else None,
                                     "peak_rss_mb": peak_rss_mb()})


def run_workload(wl: dict, repeats: int, min_time: float, threads: int | None) -> dict:
    """Standalone timing of one workload (median of `repeats`)."""
    step, info = build(wl, threads)
    first_s, n = warm_up(step, min_time, sync=float)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for k in range(n):
            loss = step(k)
        float(loss)
        times.append((time.perf_counter() - t0) / n)
    med = statistics.median(times)
    B, T = wl["batch"], wl["seq"]
    flops = train_flops(wl["objective"], wl["hidden"], wl["layers"], B, T, wl["vocab"])
    return dict(info, workload=wl, step_s=med, step_s_all=times, steps_per_repeat=n,
                first_step_s=first_s, samples_per_s=B / med,
                target_chars_per_s=(B if wl["objective"] == "window" else B * T) / med,
                gflops=flops / med / 1e9, loss=float(loss))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--objective", choices=["window", "sequence"], default="window")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seq", type=int, default=60)
    ap.add_argument("--vocab", type=int, default=57)
    ap.add_argument("--workloads-json", default=None,
                    help="JSON list of workload dicts (objective/hidden/layers/batch/seq/vocab); "
                         "overrides the single-workload flags")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds per timed repeat")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--serve", action="store_true",
                    help="(for bench_train.py) warm up one workload, print a ready line, then time "
                         "n steps per {\"op\": \"time\"} line read from stdin")
    args = ap.parse_args(argv)
    if args.workloads_json:
        workloads = json.loads(args.workloads_json)
    else:
        workloads = [dict(objective=args.objective, hidden=args.hidden, layers=args.layers,
                          batch=args.batch, seq=args.seq, vocab=args.vocab)]
    if args.serve:
        (wl,) = workloads
        step, info = build(wl, args.threads)
        first_s, n = warm_up(step, args.min_time, sync=float)
        print(json.dumps(dict(info, ready=True, first_step_s=first_s, steps_per_repeat=n)), flush=True)
        serve(step, n, sync=float)
        return 0
    for wl in workloads:
        res = run_workload(wl, args.repeats, args.min_time, args.threads)
        print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

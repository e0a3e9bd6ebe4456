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
import statistics
import sys
import time


def train_flops(objective: str, hidden: int, layers: int, batch: int, seq: int, vocab: int,
                count_onehot: bool = False) -> float:
    """Model FLOPs of one training step (matmuls only; backward = 2x forward).

    The first layer's input projection is a gather in lstm_jax (one-hot @ W_ih), so it is not
    counted unless `count_onehot`; the same count is used for both libraries.
    """
    h4 = 4 * hidden
    fwd = layers * seq * batch * 2 * hidden * h4            # h @ W_hh, every layer and step
    fwd += (layers - 1) * seq * batch * 2 * hidden * h4     # x @ W_ih of layers 2..
    if count_onehot:
        fwd += seq * batch * 2 * vocab * h4
    positions = batch if objective == "window" else batch * seq
    fwd += positions * 2 * hidden * vocab                   # head
    return 3.0 * fwd


def build(wl: dict, threads: int | None = None):
    """(step(k) -> loss tensor, info) for one workload: model, optimiser and 4 random batches."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    V, H, L, B, T = wl["vocab"], wl["hidden"], wl["layers"], wl["batch"], wl["seq"]
    window = wl["objective"] == "window"
    embedding = wl.get("torch_input", "onehot") == "embedding"

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            # embedding input: nn.Embedding(V, H) -> nn.LSTM(H, H), what a PyTorch user writes
            # for a large vocabulary (one more (V, H) table than lstm_jax's gather of W_ih).
            self.embed = nn.Embedding(V, H) if embedding else None
            self.lstm = nn.LSTM(H if embedding else V, H, num_layers=L, batch_first=True)
            self.fc = nn.Linear(H, V)

        def forward(self, x):
            x = self.embed(x) if embedding else F.one_hot(x, V).float()
            out, _ = self.lstm(x)
            return self.fc(out[:, -1] if window else out)

    model = CharLSTM()
    opt = torch.optim.RMSprop(model.parameters(), lr=0.01, alpha=0.9, eps=1e-7)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randint(0, V, (B, T), generator=gen)
        y = torch.randint(0, V, (B,) if window else (B, T), generator=gen)
        batches.append((x, y))

    def step(k):
        x, y = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    info = {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    return step, info


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss), MiB."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def warm_up(step, min_time: float, sync=lambda out: None) -> tuple[float, int]:
    """First-step seconds, and steps per timed repeat so that one repeat takes ~min_time."""
    t0 = time.perf_counter()
    sync(step(0))
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    n_warm = 0
    while n_warm < 3 or time.perf_counter() - t0 < 0.5 * min_time:
        out = step(n_warm + 1)
        n_warm += 1
    sync(out)
    per = (time.perf_counter() - t0) / n_warm
    return first_s, max(2, int(round(min_time / per)))


def serve(step, n: int, sync, stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Answers {"op": "time"} lines with {"t": seconds per step over n steps}; stops at EOF or
    {"op": "finish"}. Used by bench_train.py to interleave repeats of all variants."""
    k = 0
    for line in stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            t0 = time.perf_counter()
            for _ in range(n):
                out = step(k)
                k += 1
            sync(out)
            print(json.dumps({"t": (time.perf_counter() - t0) / n}), file=stdout, flush=True)
        elif cmd["op"] == "finish":
            print(json.dumps({"finished": True, "loss": float(sync(out)) if k else None,
                              "peak_rss_mb": peak_rss_mb()}), file=stdout, flush=True)
            return


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

"""Sampler throughput: generated chars/s of lstm_jax's lax.scan sampler against PyTorch's stateful loop.

Model: LSTM(57 -> 128) + Linear(128 -> 57), random weights (speed does not depend on them).
  lstm_jax: `sample.Sampler.generate` end to end (host arrays in, strings out), the seed's four
            temperatures 0.2/0.5/1.0/1.2 cycled over the rows, default chunk_size; the first call
            (trace + compile + run) is reported separately from the steady calls.
  PyTorch:  nn.LSTM + nn.Linear stepped one char at a time carrying (h, c), one-hot input,
            torch.multinomial on softmax(logits / T), under torch.inference_mode (skipped when
            torch is not installed).
chars/s counts generated characters only (num_samples x length). Each of `--repeats` rounds times
lstm_jax then PyTorch, each called back to back for at least `--min-round` seconds (so a 4 ms
batch-1 call is timed ~50 times per round), so both see the same load from other jobs on a shared
host; medians over all calls are reported, with every call time and the load average in the JSON.

    flock /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py     # ~3 min on 2 cores
    python benchmarks/bench_sample.py --batches 1,64 --repeats 3 --no-torch

Writes benchmarks/results/sample_cpu.json (and sample_cpu.png when matplotlib is installed).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, HIDDEN = 57, 128
TEMPERATURES = [0.2, 0.5, 1.0, 1.2]
TARGETS = {1: 20.0, 1024: 2.0}  # minimum speed-up over PyTorch, by batch


def jax_runner(args):
    import jax
    from flax import nnx
    from lstm_jax import sample
    from lstm_jax.model import CharLSTM, ModelConfig

    class Vocab:
        chars = [chr(ord(" ") + i) for i in range(VOCAB)]

    model = CharLSTM(ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN), rngs=nnx.Rngs(0))
    sampler = sample.Sampler(model, Vocab())
    seeds = iter(range(1, 10 ** 6))

    def run(batch, length, **kwargs):
        t0 = time.perf_counter()
        out = sampler.generate(batch, length, temperature=TEMPERATURES, seed=next(seeds), **kwargs)
        elapsed = time.perf_counter() - t0
        assert len(out.texts) == batch and len(out.texts[-1]) == length
        return elapsed

    return run, {"devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
                 "platform": jax.devices()[0].platform}


def torch_runner():
    try:
        import torch
    except ImportError:
        return None, {}
    torch.manual_seed(0)
    lstm, head = torch.nn.LSTM(VOCAB, HIDDEN, batch_first=True), torch.nn.Linear(HIDDEN, VOCAB)

    @torch.inference_mode()
    def run(batch, length, temperature=1.0):
        t0 = time.perf_counter()
        x = torch.zeros(batch, 1, VOCAB)
        x[:, 0, 0] = 1.0
        state, out = None, []
        for _ in range(length):
            y, state = lstm(x, state)
            probs = torch.softmax(head(y[:, 0]) / temperature, dim=-1)
            idx = torch.multinomial(probs, 1)
            x = torch.zeros(batch, 1, VOCAB).scatter_(2, idx[:, :, None], 1.0)
            out.append(idx)
        torch.cat(out, 1)
        return time.perf_counter() - t0

    return run, {"torch_threads": torch.get_num_threads()}


def bench(args) -> dict:
    jax_run, jax_info = jax_runner(args)
    torch_run, torch_info = (None, {}) if args.no_torch else torch_runner()
    rows = []
    cases = [dict(batch=b) for b in args.batches]
    if args.extras:
        cases += [dict(batch=1024, top_k=5, top_p=0.9, note="top-k 5 + top-p 0.9"),
                  dict(batch=4096, chunk_size=4096, note="one chunk of 4,096 rows"),
                  dict(batch=256, length=100, context="window", window=60, repeats=2,
                       note="seed's window mode: the LSTM re-run over the last 60 chars per char")]
    for case in cases:
        batch, length = case["batch"], case.get("length", args.length)
        kwargs = {k: v for k, v in case.items() if k not in ("batch", "length", "note", "repeats")}
        chars = batch * length
        first = jax_run(batch, length, **kwargs)
        jax_times, torch_times = [], []
        if torch_run is not None and not kwargs:
            torch_run(batch, length)  # warm-up
        for _ in range(case.get("repeats", args.repeats)):
            jax_times += _round(lambda: jax_run(batch, length, **kwargs), args.min_round)
            if torch_run is not None and not kwargs:
                torch_times += _round(lambda: torch_run(batch, length), args.min_round)
        steady = statistics.median(jax_times)
        row = {"batch": batch, "length": length, **kwargs,
               "jax_chars_per_s": round(chars / steady),
               "jax_first_call_s": round(first, 3),
               "jax_compile_s": round(max(first - steady, 0.0), 3),
               "jax_calls": len(jax_times), "jax_runs_s": [round(t, 4) for t in jax_times]}
        if "note" in case:
            row["note"] = case["note"]
        if torch_times:
            row["torch_chars_per_s"] = round(chars / statistics.median(torch_times))
            row["torch_calls"] = len(torch_times)
            row["torch_runs_s"] = [round(t, 4) for t in torch_times]
            row["speedup"] = round(row["jax_chars_per_s"] / row["torch_chars_per_s"], 2)
            if batch in TARGETS:
                row["target_speedup"] = TARGETS[batch]
                row["target_met"] = row["speedup"] >= TARGETS[batch]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs_s")}), flush=True)
    return {"benchmark": "sample", "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "model": {"vocab": VOCAB, "hidden": HIDDEN, "layers": 1},
            "temperatures_jax": TEMPERATURES, "temperature_torch": 1.0, "repeats": args.repeats,
            "min_round_s": args.min_round,
            "host": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                     "load_avg_1min": round(os.getloadavg()[0], 2), **jax_info, **torch_info},
            "versions": _versions(), "rows": rows}


def _round(call, min_seconds: float) -> list[float]:
    """Times `call()` back to back until `min_seconds` have passed (at least once)."""
    times = []
    while sum(times) < min_seconds or not times:
        times.append(call())
    return times


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _versions() -> dict:
    from importlib import metadata
    out = {}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def plot(result: dict, path: pathlib.Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [r for r in result["rows"] if "note" not in r]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["jax_chars_per_s"] for r in rows], 0.4, label="lstm_jax (lax.scan)")
    if all("torch_chars_per_s" in r for r in rows):
        ax.bar([i + 0.2 for i in x], [r["torch_chars_per_s"] for r in rows], 0.4, label="PyTorch loop")
        for i, r in enumerate(rows):
            ax.annotate(f"{r['speedup']}x", (i, r["jax_chars_per_s"]), ha="center", va="bottom")
    ax.set_xticks(list(x), [str(r["batch"]) for r in rows])
    ax.set_yscale("log")
    ax.set_xlabel("samples per call (batch)")
    ax.set_ylabel("generated chars/s")
    ax.set_title(f"Sampling LSTM(57->128), length {rows[0]['length']}, {result['host']['cpu']}",
                 fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,64,1024,4096")
    parser.add_argument("--length", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5, help="rounds, alternating the libraries")
    parser.add_argument("--min-round", type=float, default=0.25,
                        help="seconds of back-to-back calls per library and round")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--no-extras", dest="extras", action="store_false",
                        help="skip the top-k/top-p, single-chunk and window-mode rows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sample_cpu.json"))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    result = bench(args)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Sampler benchmarks: lstm_jax's blocked lax.scan sampler against PyTorch's batched stateful loop.

Sections (each run updates its own section of benchmarks/results/sample_cpu.json; take timings
under `flock -x /tmp/lstm_jax_cpu.lock`, one short invocation per section or vocabulary):
  batch      V = 57, LSTM(128), length 400: chars/s by rows per call (1, 64, 1,024, 4,096) for
             lstm_jax now, lstm_jax at --baseline-ref (the sampler before the any-vocabulary
             rewrite) and PyTorch; plus top-k/top-p and window-mode rows.
  vocab      LSTM(256), 1,024 rows, length --vocab-length: by V, compile s per bucket (trace +
             lower + XLA compile, from jax.monitoring), chars/s, peak RSS (each V in a fresh
             process), and PyTorch in the same process.
  filtered   top-k 40 + top-p 0.95 by V, LSTM(256), 1,024 rows: compile s of the filtered bucket,
             chars/s against the unfiltered program (lstm_jax only).
  crossover  chars/s of the "unrolled" and "cumsum" draw kernels by V and rows, LSTM(128): the
             measurement behind draw.UNROLLED_MAX_VOCAB.
  long       peak RSS of 4 samples x --long-length chars (a fresh process each; not a timing).

lstm_jax: `sample.Sampler.generate` end to end (host arrays in, strings out), the Keras reference's four
  temperatures 0.2/0.5/1.0/1.2 cycled over the rows.
PyTorch: nn.LSTM + nn.Linear stepped one char at a time carrying (h, c), torch.multinomial on
  softmax(logits / T), torch.inference_mode. Input "onehot" (the Keras reference's formulation, run up to
  V = 1,024) and "embedding" (nn.Embedding(V, H), what a PyTorch user writes at large V); the
  faster of the two is the peer in `speedup`.
chars/s counts generated characters only (rows x length). Each of `--repeats` rounds times lstm_jax
then PyTorch, each called back to back for at least `--min-round` seconds, so both see the same
load; medians over all calls are reported, with every call time and the load average in the JSON.

    flock -x /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py batch
    for v in 57 256 1024 4096 10000 16384 20000; do
        flock -x /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py vocab --vocab $v; done
    flock -x /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py filtered --vocab 57,1024,20000
    flock -x /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py crossover --vocab 32,57,96
    flock -s /tmp/lstm_jax_cpu.lock python benchmarks/bench_sample.py long
    python benchmarks/bench_sample.py plot

Writes benchmarks/results/sample_cpu.json and sample_cpu.png (chars/s against V; by batch).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lstm_jax.bench import peak_rss_mb  # noqa: E402  (the package's harness; no JAX import)

TEMPERATURES = [0.2, 0.5, 1.0, 1.2]
TARGETS = {  # issue #12: minimum speed-up over PyTorch's loop in the same run; compile seconds
    "batch": {1: 25.0, 1024: 2.5}, "vocab_10000_speedup": 1.5, "compile_s": 3.0}
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
OUT = ROOT / "benchmarks" / "results" / "sample_cpu.json"


class CompileClock:
    """Seconds spent tracing, lowering and compiling since the last `take()` (jax.monitoring)."""

    def __init__(self):
        import jax
        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, seconds, **kwargs):
        if event in COMPILE_EVENTS:
            self.total += seconds

    def take(self) -> float:
        t, self.total = self.total, 0.0
        return t


def load_sampler_module(ref: str | None):
    """lstm_jax.sample now (ref None), or the file at git `ref` imported as a separate module."""
    if ref is None:
        from lstm_jax import sample
        return sample
    source = subprocess.run(["git", "show", f"{ref}:lstm_jax/sample.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = pathlib.Path(tempfile.mkdtemp()) / "sample_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("sample_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def jax_runner(vocab_size: int, hidden: int, module=None, kernel: str | None = None):
    """run(rows, length, **kwargs) -> seconds, for a random-weight CharLSTM."""
    from flax import nnx
    from lstm_jax.data import Vocab
    from lstm_jax.model import CharLSTM, ModelConfig

    module = module or load_sampler_module(None)
    model = CharLSTM(ModelConfig(vocab_size=vocab_size, hidden_size=hidden), rngs=nnx.Rngs(0))
    vocab = Vocab(tuple(chr(0x4E00 + i) for i in range(vocab_size)))
    extra = {"kernel": kernel} if kernel else {}
    sampler = module.Sampler(model, vocab, **extra)
    seeds = iter(range(1, 10 ** 6))

    def run(rows, length, **kwargs):
        t0 = time.perf_counter()
        out = sampler.generate(rows, length, temperature=TEMPERATURES, seed=next(seeds), **kwargs)
        elapsed = time.perf_counter() - t0
        assert len(out.texts) == rows and len(out.texts[-1]) == length
        return elapsed

    run.kernel = getattr(sampler, "kernel", "unrolled")
    return run


def torch_runner(vocab_size: int, hidden: int, inputs: str):
    import torch
    torch.manual_seed(0)
    embed = torch.nn.Embedding(vocab_size, hidden) if inputs == "embedding" else None
    lstm = torch.nn.LSTM(hidden if embed is not None else vocab_size, hidden, batch_first=True)
    head = torch.nn.Linear(hidden, vocab_size)

    def encode(idx_Bx1):
        if embed is not None:
            return embed(idx_Bx1)
        return torch.zeros(len(idx_Bx1), 1, vocab_size).scatter_(2, idx_Bx1[:, :, None], 1.0)

    @torch.inference_mode()
    def run(rows, length, temperature=1.0):
        t0 = time.perf_counter()
        x, state, out = encode(torch.zeros(rows, 1, dtype=torch.long)), None, []
        for _ in range(length):
            y, state = lstm(x, state)
            probs = torch.softmax(head(y[:, 0]) / temperature, dim=-1)
            idx = torch.multinomial(probs, 1)
            x = encode(idx)
            out.append(idx)
        torch.cat(out, 1)
        return time.perf_counter() - t0

    return run


def timed_rounds(runners: dict, rows: int, length: int, repeats: int, min_round: float,
                 kwargs=None) -> dict:
    """{name: [seconds per call]}: rounds alternate the runners, each called back to back for at
    least min_round seconds (at least once)."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            spent = 0.0
            own = (kwargs or {}) if name.startswith("jax") else {}
            while spent < min_round or not spent:
                t = run(rows, length, **own)
                times[name].append(t)
                spent += t
    return times


def summarise(times: dict, chars: int) -> dict:
    row = {}
    for name, ts in times.items():
        row[f"{name}_chars_per_s"] = round(chars / statistics.median(ts))
        row[f"{name}_calls"] = len(ts)
        row[f"{name}_runs_s"] = [round(t, 4) for t in ts]
    torch_names = [n for n in times if n.startswith("torch")]
    if torch_names:
        best = max(torch_names, key=lambda n: row[f"{n}_chars_per_s"])
        row["torch_peer"] = best
        row["speedup"] = round(row["jax_chars_per_s"] / row[f"{best}_chars_per_s"], 2)
    if "jax_baseline_chars_per_s" in row:
        row["vs_baseline"] = round(row["jax_chars_per_s"] / row["jax_baseline_chars_per_s"], 3)
    return row


# --- sections ------------------------------------------------------------------------------------

def section_batch(args) -> dict:
    clock = CompileClock()
    vocab, hidden, length = 57, 128, 400
    runners = {"jax": jax_runner(vocab, hidden)}
    if args.baseline_ref:
        runners["jax_baseline"] = jax_runner(vocab, hidden, load_sampler_module(args.baseline_ref))
    if not args.no_torch:
        runners["torch_onehot"] = torch_runner(vocab, hidden, "onehot")
        runners["torch_embedding"] = torch_runner(vocab, hidden, "embedding")
    rows_out = {}
    for rows in args.batches:
        first = {}
        for name, run in runners.items():
            clock.take()
            first[name] = round(run(rows, length), 3)
            if name.startswith("jax"):
                first[name + "_compile_s"] = round(clock.take(), 3)
        times = timed_rounds(runners, rows, length, args.repeats, args.min_round)
        row = {"rows": rows, "length": length, "first_call_s": first, **summarise(times, rows * length)}
        if rows in TARGETS["batch"]:
            row["target_speedup"] = TARGETS["batch"][rows]
            row["target_met"] = row.get("speedup", 0) >= TARGETS["batch"][rows]
        rows_out[str(rows)] = row
        _print(row)
    extras = [("top-k 5 + top-p 0.9", 1024, 400, dict(top_k=5, top_p=0.9)),
              ("seed's window mode (LSTM re-run over the last 60 chars per char)", 256, 100,
               dict(context="window", window=60))]
    for note, rows, length, kwargs in ([] if args.no_extras else extras):
        jax_only = {k: v for k, v in runners.items() if k.startswith("jax")}
        for run in jax_only.values():
            run(rows, length, **kwargs)
        times = timed_rounds(jax_only, rows, length, 2, args.min_round, kwargs)
        row = {"rows": rows, "length": length, **kwargs, "note": note,
               **summarise(times, rows * length)}
        rows_out[note] = row
        _print(row)
    return {"model": {"vocab": vocab, "hidden": hidden, "layers": 1},
            "baseline_ref": args.baseline_ref, "rows": rows_out}


def section_vocab(args) -> dict:
    """Each V in a fresh process (clean compile and peak RSS)."""
    out = {}
    for v in args.vocab:
        row = _worker({"case": "vocab", "vocab": v, "hidden": 256, "rows": 1024,
                       "length": args.vocab_length, "repeats": args.repeats,
                       "min_round": args.min_round, "torch": not args.no_torch})
        out[str(v)] = row
        _print(row)
    return {"rows": out}


def case_vocab(spec: dict) -> dict:
    clock = CompileClock()
    v, hidden, rows, length = spec["vocab"], spec["hidden"], spec["rows"], spec["length"]
    run = jax_runner(v, hidden)
    rss0 = peak_rss_mb()
    clock.take()
    first = run(rows, length)
    compile_s = clock.take()
    second = run(rows, length)
    compile_again = clock.take()
    rss_jax = peak_rss_mb()
    runners = {"jax": run}
    if spec["torch"]:
        runners["torch_embedding"] = torch_runner(v, hidden, "embedding")
        if v <= 1024:
            runners["torch_onehot"] = torch_runner(v, hidden, "onehot")
        for name, r in runners.items():
            if name != "jax":
                r(rows, min(length, 8))  # warm-up
    times = timed_rounds(runners, rows, length, spec["repeats"], spec["min_round"])
    row = {"vocab": v, "hidden": hidden, "rows": rows, "length": length, "kernel": run.kernel,
           "compile_s": round(compile_s, 3), "recompile_s_second_call": round(compile_again, 3),
           "first_call_s": round(first, 3), "second_call_s": round(second, 3),
           "peak_rss_mb_before": round(rss0), "peak_rss_mb_jax": round(rss_jax),
           "peak_rss_mb_all": round(peak_rss_mb()), **summarise(times, rows * length)}
    row["target_compile_met"] = compile_s < TARGETS["compile_s"]
    if v == 10000 and "speedup" in row:
        row["target_speedup"] = TARGETS["vocab_10000_speedup"]
        row["target_met"] = row["speedup"] >= row["target_speedup"]
    return row


def section_filtered(args) -> dict:
    """top-k 40 + top-p 0.95 (the bisection filters), LSTM(256), 1,024 rows, by V: compile s of the
    filtered bucket and chars/s (lstm_jax only; fresh process per V)."""
    out = {}
    for v in args.vocab:
        row = _worker({"case": "filtered", "vocab": v, "length": args.filtered_length})
        out[str(v)] = row
        _print(row)
    return {"filters": {"top_k": 40, "top_p": 0.95}, "rows": out}


def case_filtered(spec: dict) -> dict:
    clock = CompileClock()
    v, rows, length = spec["vocab"], 1024, spec["length"]
    run = jax_runner(v, 256)
    plain_first = run(rows, length)
    clock.take()
    plain = run(rows, length)
    filtered_first = run(rows, length, top_k=40, top_p=0.95)
    compile_s = clock.take()
    filtered = min(run(rows, length, top_k=40, top_p=0.95) for _ in range(2))
    return {"vocab": v, "rows": rows, "length": length, "kernel": run.kernel,
            "filtered_compile_s": round(compile_s, 3),
            "filtered_first_call_s": round(filtered_first, 3),
            "unfiltered_chars_per_s": round(rows * length / min(plain, plain_first)),
            "filtered_chars_per_s": round(rows * length / filtered),
            "filtered_over_unfiltered": round(min(plain, plain_first) / filtered, 3),
            "target_compile_met": compile_s < TARGETS["compile_s"],
            "peak_rss_mb": round(peak_rss_mb())}


def section_crossover(args) -> dict:
    out = {}
    for v in args.vocab:
        row = _worker({"case": "crossover", "vocab": v, "batches": args.batches,
                       "repeats": args.repeats, "min_round": args.min_round})
        out[str(v)] = row
        _print(row)
    return {"model": {"hidden": 128, "layers": 1, "length": 400}, "rows": out}


def case_crossover(spec: dict) -> dict:
    clock = CompileClock()
    v, length = spec["vocab"], 400
    runners = {f"jax_{k}": jax_runner(v, 128, kernel=k) for k in ("unrolled", "cumsum")}
    row = {"vocab": v}
    for rows in spec["batches"]:
        compile_s = {}
        for name, run in runners.items():
            clock.take()
            run(rows, length)
            compile_s[name] = round(clock.take(), 3)
        times = timed_rounds(runners, rows, length, spec["repeats"], spec["min_round"])
        cps = {name: round(rows * length / statistics.median(ts)) for name, ts in times.items()}
        row[str(rows)] = {"chars_per_s": cps, "compile_s": compile_s,
                          "unrolled_over_cumsum": round(cps["jax_unrolled"] / cps["jax_cumsum"], 3)}
    return row


def section_long(args) -> dict:
    """Now at --long-length and a tenth of it; the baseline at a tenth (it holds (T, B) arrays)."""
    cases = [(None, args.long_length), (None, args.long_length // 10)]
    if args.baseline_ref:
        cases.append((args.baseline_ref, args.long_length // 10))
    out = {}
    for ref, length in cases:
        row = _worker({"case": "long", "ref": ref, "length": length})
        out[f"{ref or 'now'}_{length}"] = row
        _print(row)
    return {"rows": out}


def case_long(spec: dict) -> dict:
    """4 samples x length chars, LSTM(128) V = 57, as `lstm-jax sample --num_samples 4`."""
    module = load_sampler_module(spec["ref"])
    run = jax_runner(57, 128, module)
    rss0 = peak_rss_mb()
    seconds = run(4, spec["length"])
    return {"ref": spec["ref"] or "now", "samples": 4, "length": spec["length"],
            "seconds_not_exclusive": round(seconds, 1), "peak_rss_mb_before": round(rss0),
            "peak_rss_mb": round(peak_rss_mb())}


# --- plumbing ------------------------------------------------------------------------------------

def _worker(spec: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "_case", json.dumps(spec)], cwd=ROOT,
                         capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"worker {spec} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _print(row: dict) -> None:
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs_s")}), flush=True)


def _host() -> dict:
    import jax
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1min": round(os.getloadavg()[0], 2), "devices": jax.device_count(),
            "platform": jax.devices()[0].platform}
    try:
        import torch
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    vocab = result.get("vocab", {}).get("rows", {})
    if vocab:
        rows = sorted(vocab.values(), key=lambda r: r["vocab"])
        xs = [r["vocab"] for r in rows]
        ax = axes[0]
        ax.plot(xs, [r["jax_chars_per_s"] for r in rows], "o-", label="lstm_jax")
        for name, style in (("torch_embedding", "s--"), ("torch_onehot", "^:")):
            pts = [(r["vocab"], r[f"{name}_chars_per_s"]) for r in rows if f"{name}_chars_per_s" in r]
            if pts:
                ax.plot(*zip(*pts), style, label=f"PyTorch loop ({name.split('_')[1]} input)")
        for r in rows:
            if "speedup" in r:
                ax.annotate(f"{r['speedup']}x", (r["vocab"], r["jax_chars_per_s"]),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel("generated chars/s")
        ax.set_title(f"LSTM(256), {rows[0]['rows']} rows, length {rows[0]['length']}", fontsize=9)
        ax.legend(fontsize=8)
    batch = result.get("batch", {}).get("rows", {})
    sizes = [r for r in batch.values() if "note" not in r]
    if sizes:
        ax = axes[1]
        x = range(len(sizes))
        names = [n for n in ("jax", "jax_baseline", "torch_onehot", "torch_embedding")
                 if f"{n}_chars_per_s" in sizes[0]]
        width = 0.8 / len(names)
        labels = {"jax": "lstm_jax", "torch_onehot": "PyTorch loop (one-hot)",
                  "torch_embedding": "PyTorch loop (embedding)",
                  "jax_baseline": f"lstm_jax before ({result['batch'].get('baseline_ref')})"}
        for i, name in enumerate(names):
            ax.bar([j + (i - (len(names) - 1) / 2) * width for j in x],
                   [r[f"{name}_chars_per_s"] for r in sizes], width, label=labels[name])
        ax.set_xticks(list(x), [str(r["rows"]) for r in sizes])
        ax.set_yscale("log")
        ax.set_xlabel("rows per call (V = 57, LSTM(128), length 400)")
        ax.set_ylabel("generated chars/s")
        ax.legend(fontsize=8)
    fig.suptitle(f"Sampling on {result.get('host', {}).get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "_case":
        spec = json.loads(sys.argv[2])
        print(json.dumps({"vocab": case_vocab, "crossover": case_crossover, "long": case_long,
                          "filtered": case_filtered}[spec["case"]](spec)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("section", choices=["batch", "vocab", "filtered", "crossover", "long",
                                            "plot"])
    parser.add_argument("--batches", default="1,64,1024,4096")
    parser.add_argument("--vocab", default="57,256,1024,4096,16384")
    parser.add_argument("--vocab-length", type=int, default=64, help="chars per row in `vocab`")
    parser.add_argument("--long-length", type=int, default=1_000_000)
    parser.add_argument("--filtered-length", type=int, default=16, help="chars per row in `filtered`")
    parser.add_argument("--baseline-ref", default="95aab48",
                        help="git ref of the sampler to compare with ('' = none)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, alternating the libraries")
    parser.add_argument("--min-round", type=float, default=0.25,
                        help="seconds of back-to-back calls per library and round")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--no-extras", dest="no_extras", action="store_true",
                        help="batch: skip the top-k/top-p and window-mode rows")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.vocab = [int(v) for v in args.vocab.split(",")]
    args.baseline_ref = args.baseline_ref or None
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    if result.get("benchmark") != "sample" or "rows" in result:  # an older layout: start afresh
        result = {"benchmark": "sample"}
    if args.section != "plot":
        section = {"batch": section_batch, "vocab": section_vocab, "filtered": section_filtered,
                   "crossover": section_crossover, "long": section_long}[args.section](args)
        previous = result.get(args.section, {})
        merged_rows = {**previous.get("rows", {}), **section.pop("rows")}
        result[args.section] = {**section, "rows": merged_rows,
                                "command": " ".join(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "host": _host(), "versions": _versions()}
        result["host"] = _host()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    plot(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()

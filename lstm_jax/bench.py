"""`lstm-jax bench`: what a config's training step and the sampler achieve on this machine.

For one config (default: the default config; any `--config.FIELD=VALUE`), on the devices
`lstm-jax train` would use:
  * the train step (the package's own: jitted, state donated, the config's optimizer) on random
    batches of the config's shape: compile seconds, then chars/s (input chars: batch x seq_len
    per step, as metrics.jsonl), FLOP/s from `lstm_jax.flops` and MFU against the device peak
    (a measured GEMM on CPU, the table on GPUs/TPUs);
  * if PyTorch is installed, the same model in `nn.LSTM` (one-hot input, or nn.Embedding above
    V = 1,024; RMSprop), in a subprocess timed in the same interleaved rounds (A B A B ...), so a
    change in machine load hits both alike;
  * the sampler's chars/s at 1, 1,024 and 4,096 rows (after a compiling call), and its compile s.
Prints a table, writes JSON (`--out`) and optionally a PNG (`--plot`).

The PyTorch harness here (`torch_step`, `serve`) is the one benchmarks/ drives: a worker answers
{"op": "time"} lines with the seconds per step of n steps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Optional, Sequence

TORCH_EMBEDDING_ABOVE = 1024   # vocabulary above which the PyTorch model embeds instead of one-hot


# --- the PyTorch side (imports torch only inside the worker) --------------------------------

def torch_step(wl: dict, threads: Optional[int] = None):
    """(step(k) -> loss tensor, info) for workload wl = {vocab, hidden, layers, batch, seq,
    objective}: nn.LSTM as a PyTorch user writes it, RMSprop(lr=0.01, alpha=0.9, eps=1e-7)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    V, H, L, B, T = wl["vocab"], wl["hidden"], wl["layers"], wl["batch"], wl["seq"]
    window = wl["objective"] == "window"
    embedding = wl.get("torch_input", "embedding" if V > TORCH_EMBEDDING_ABOVE else "onehot") == "embedding"

    class CharLSTM(nn.Module):
        def __init__(self):
            super().__init__()
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
    batches = [(torch.randint(0, V, (B, T), generator=gen),
                torch.randint(0, V, (B,) if window else (B, T), generator=gen)) for _ in range(4)]

    def step(k):
        x, y = batches[k % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x).reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.detach()

    return step, {"threads": torch.get_num_threads(), "torch": torch.__version__,
                  "input": "embedding" if embedding else "onehot"}


def warm_up(step, min_time: float, sync=lambda out: None) -> tuple[float, int]:
    """First-step seconds, and steps per timed repeat so that one repeat takes ~min_time.

    Each warm-up step is waited for: JAX dispatches asynchronously, so a loop that only
    dispatched would keep queueing steps for 0.5 x min_time of dispatching, dozens of steps
    (minutes at 2 x LSTM(1024)) before it knew how long one takes."""
    t0 = time.perf_counter()
    sync(step(0))
    first_s = time.perf_counter() - t0
    t0, n_warm = time.perf_counter(), 0
    while n_warm < 3 or time.perf_counter() - t0 < 0.5 * min_time:
        sync(step(n_warm + 1))
        n_warm += 1
    per = (time.perf_counter() - t0) / n_warm
    return first_s, max(2, int(round(min_time / per)))


def time_steps(step, n: int, sync, start: int = 0) -> float:
    """Seconds per step over n steps, ending when the last one is done."""
    t0 = time.perf_counter()
    out = None
    for k in range(n):
        out = step(start + k)
    sync(out)
    return (time.perf_counter() - t0) / n


def serve(step, n: int, sync, stdin=sys.stdin, stdout=sys.stdout, finish=None) -> None:
    """Answers {"op": "time"} lines with {"t": seconds per step over n steps}, until EOF or
    {"op": "finish"}, which `finish(step)` (if given: a dict, e.g. the last loss and peak RSS)
    answers."""
    k = 0
    for line in stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            print(json.dumps({"t": time_steps(step, n, sync, k)}), file=stdout, flush=True)
            k += n
        elif cmd["op"] == "finish":
            if finish is not None:
                print(json.dumps(finish(step if k else None)), file=stdout, flush=True)
            return


def peak_rss_mb() -> float:
    """This process's peak resident memory (ru_maxrss), MiB."""
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _torch_worker(argv: Sequence[str]) -> int:
    """`python lstm_jax/bench.py --torch-serve WORKLOAD_JSON MIN_TIME`: a PyTorch timing worker."""
    wl, min_time = json.loads(argv[0]), float(argv[1])
    step, info = torch_step(wl)
    first_s, n = warm_up(step, min_time, sync=float)
    print(json.dumps(dict(info, ready=True, first_step_s=first_s, steps_per_repeat=n)), flush=True)
    serve(step, n, sync=float)
    return 0


class TorchWorker:
    """A PyTorch worker process for one workload, or None-like if torch is not installed."""

    def __init__(self, wl: dict, min_time: float):
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        # This file run as a script (only the standard library and torch are imported there).
        run = "import sys, runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", run, os.path.abspath(__file__), "--torch-serve", json.dumps(wl),
             str(min_time)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            cwd=os.getcwd())
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PyTorch worker failed: {self.proc.stderr.read()[-2000:]}")
        self.info = json.loads(line)

    def time(self) -> float:
        self.proc.stdin.write(json.dumps({"op": "time"}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["t"]

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "finish"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


# --- the harness -----------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
    repeats: int = 5               # interleaved timed rounds
    min_time: float = 1.0          # seconds per timed round and side
    sample_rows: tuple = (1, 1024, 4096)
    sample_length: int = 200
    torch: str = "auto"            # auto (if installed) | on | off
    progress: bool = True

    @classmethod
    def quick(cls, **kw) -> "Options":
        """Seconds, for tests and smoke checks: one short round, small sampler requests."""
        return cls(**{"repeats": 1, "min_time": 0.05, "sample_rows": (1, 64), "sample_length": 16, **kw})


def run(config, vocab_size: int, options: Options = Options()) -> dict:
    """Measures `config`'s train step and the sampler on this process's devices; returns the
    report (the JSON `lstm-jax bench` writes)."""
    import jax
    import numpy as np
    from flax import nnx
    from tqdm import tqdm
    from lstm_jax import flops, parallel
    from lstm_jax import sample as sample_lib
    from lstm_jax import steps as steps_lib
    from lstm_jax.model import CharLSTM

    use_torch = options.torch == "on" or (options.torch == "auto" and torch_available())
    if options.torch == "on" and not torch_available():
        raise ValueError("--torch=on but PyTorch is not installed; pip install torch, or --torch=auto")
    n_dev = config.parallel.num_devices
    mesh = parallel.make_mesh(parallel.first_devices(n_dev) if n_dev else None)
    batch = steps_lib.global_batch_size(config, mesh)
    mcfg = steps_lib.model_config(config, vocab_size)
    T = config.seq_len
    phases = 3 + options.repeats + len(options.sample_rows) + int(use_torch)
    bar = tqdm(total=phases, unit="phase", file=sys.stderr, disable=not options.progress,
               desc="bench")
    report = {"host": {"machine": platform.machine(), "processor": platform.processor(),
                       "cpus": os.cpu_count(), "python": platform.python_version()},
              "jax": jax.__version__, "backend": jax.default_backend(),
              "devices": mesh.devices.size, "device_kind": mesh.devices.flat[0].device_kind,
              "workload": {"vocab": vocab_size, "hidden": mcfg.hidden_size, "layers": mcfg.num_layers,
                           "batch": batch, "seq": T, "objective": config.objective,
                           "dtype": mcfg.dtype, "backward": mcfg.backward}}
    try:
        bar.set_postfix_str("device peak")
        peak = flops.device_peak(list(mesh.devices.flat), dtype=mcfg.dtype)
        report["peak"] = {"flops_per_s": peak.flops_per_s, "source": peak.source}
        bar.update()

        bar.set_postfix_str("compile train step")
        tx = steps_lib.make_optimizer(config, 1000)
        graphdef, state = steps_lib.init_state(config, mcfg, tx, mesh)
        steps_per_epoch = 1000 if config.objective == "stream" else None
        train_step = steps_lib.make_train_step(graphdef, tx, config, steps_per_epoch, mesh)
        rng = np.random.default_rng(0)
        batches = [jax.device_put(rng.integers(0, vocab_size, (batch, T + 1), dtype=np.int32),
                                  parallel.data_sharded(mesh)) for _ in range(4)]
        key = jax.random.key(0)
        holder = {"state": state}

        def step(k):
            holder["state"], metrics = train_step(holder["state"], batches[k % 4], key)
            return metrics["loss"]
        sync = lambda out: jax.block_until_ready(out)  # noqa: E731
        first_s, n = warm_up(step, options.min_time, sync)
        bar.update()
        worker = None
        if use_torch:
            bar.set_postfix_str("start PyTorch")
            wl = dict(report["workload"])
            worker = TorchWorker(wl, options.min_time)
            bar.update()
        jax_t, torch_t = [], []
        try:
            for r in range(options.repeats):
                bar.set_postfix_str(f"round {r + 1}/{options.repeats}")
                jax_t.append(time_steps(step, n, sync, 100 + r * n))
                if worker:
                    torch_t.append(worker.time())
                bar.update()
        finally:
            if worker:
                worker.close()
        step_s = statistics.median(jax_t)
        chars = batch * T
        per_step = flops.train_flops_per_step(mcfg, batch, T, config.objective)
        train = {"compile_s": max(first_s - step_s, 0.0), "step_s": step_s, "step_s_all": jax_t,
                 "steps_per_round": n, "chars_per_s": chars / step_s,
                 "flops_per_char": per_step / chars, "flops_per_s": per_step / step_s,
                 "mfu": flops.mfu(per_step / step_s, peak)}
        report["train"] = train
        if worker:
            ts = statistics.median(torch_t)
            report["torch"] = dict(worker.info, step_s=ts, step_s_all=torch_t, chars_per_s=chars / ts,
                                   flops_per_s=per_step / ts, mfu=flops.mfu(per_step / ts, peak))
            report["train"]["vs_torch"] = ts / step_s

        bar.set_postfix_str("sampler")
        model = nnx.merge(graphdef, holder["state"].params)
        vocab = _Vocab(vocab_size)
        sampler = sample_lib.Sampler(model, vocab, mesh=mesh)
        rows_report = []
        for rows in options.sample_rows:
            bar.set_postfix_str(f"sampler {rows} rows")
            kw = dict(num_samples=rows, length=options.sample_length, temperature=1.0, seed=0)
            t0 = time.perf_counter()
            sampler.generate(**kw)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            sampler.generate(**dict(kw, seed=1))
            s = time.perf_counter() - t0
            rows_report.append({"rows": rows, "length": options.sample_length, "seconds": s,
                                "chars_per_s": rows * options.sample_length / s,
                                "compile_s": max(first - s, 0.0),
                                "flops_per_s": rows * options.sample_length *
                                flops.sample_flops_per_char(mcfg) / s})
            bar.update()
        report["sample"] = rows_report
    finally:
        bar.close()
    return report


class _Vocab:
    """A stand-in vocabulary of `size` distinct characters (the sampler decodes through it)."""

    def __init__(self, size: int):
        self.chars = tuple(chr(0x4E00 + i) for i in range(size))
        self.is_bytes = False


def table(report: dict) -> str:
    """The short text table `lstm-jax bench` prints."""
    w, t = report["workload"], report["train"]
    lines = [f"lstm-jax bench: {report['devices']} {report['backend']} device(s) ({report['device_kind']}), "
             f"jax {report['jax']}",
             f"model LSTM({w['hidden']}) x {w['layers']}, V={w['vocab']}, batch {w['batch']}, "
             f"seq {w['seq']}, {w['objective']}, {w['dtype']}",
             f"peak {report['peak']['flops_per_s'] / 1e9:,.1f} GFLOP/s ({report['peak']['source']})",
             "",
             f"{'train step':24s} {'chars/s':>12s} {'GFLOP/s':>10s} {'MFU':>7s} {'compile s':>10s}",
             f"{'  lstm_jax':24s} {t['chars_per_s']:12,.0f} {t['flops_per_s'] / 1e9:10.2f} "
             f"{100 * t['mfu']:6.1f}% {t['compile_s']:10.2f}"]
    if "torch" in report:
        p = report["torch"]
        lines.append(f"{'  PyTorch ' + p['torch']:24s} {p['chars_per_s']:12,.0f} "
                     f"{p['flops_per_s'] / 1e9:10.2f} {100 * p['mfu']:6.1f}% {'':>10s}")
        lines.append(f"  lstm_jax / PyTorch: {t['vs_torch']:.2f}x (same interleaved rounds)")
    lines += ["", f"{'sampler rows':24s} {'chars/s':>12s} {'GFLOP/s':>10s} {'':>7s} {'compile s':>10s}"]
    for s in report["sample"]:
        lines.append(f"  {s['rows']:<22,d} {s['chars_per_s']:12,.0f} {s['flops_per_s'] / 1e9:10.2f} "
                     f"{'':>7s} {s['compile_s']:10.2f}")
    return "\n".join(lines)


def plot(report: dict, out: str) -> None:
    """Two bar charts: training chars/s (lstm_jax, PyTorch) and sampler chars/s by rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    names, values = ["lstm_jax"], [report["train"]["chars_per_s"]]
    if "torch" in report:
        names.append("PyTorch")
        values.append(report["torch"]["chars_per_s"])
    a.bar(names, values, color=["C0", "C1"][:len(names)])
    a.set_title(f"train step (MFU {100 * report['train']['mfu']:.1f}%)")
    a.set_ylabel("chars/s")
    b.bar([f"{s['rows']:,}" for s in report["sample"]], [s["chars_per_s"] for s in report["sample"]])
    b.set_yscale("log")
    b.set_title("sampler")
    b.set_xlabel("rows")
    w = report["workload"]
    fig.suptitle(f"LSTM({w['hidden']}) x {w['layers']}, V={w['vocab']}, B={w['batch']}, T={w['seq']} "
                 f"on {report['devices']} {report['backend']} device(s)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torch-serve":
        sys.exit(_torch_worker(sys.argv[2:]))
    sys.exit("usage: lstm-jax bench --help")

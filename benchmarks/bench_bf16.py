"""bfloat16 against float32 on Nietzsche: the 2-epoch loss curve, as `lstm-jax train` runs it.

Trains configs/nietzsche.py for 2 epochs three times, one after the other in fresh processes:
float32 (backward='auto': the native kernel on an AVX-512 CPU), bfloat16 through the native
kernel (backward='native': its AVX512-BF16 recurrent matmuls) and bfloat16 as `auto` runs it (the
custom scan, XLA's bf16 matmuls). Keeps each run's metrics.jsonl in benchmarks/results/runs/ and
writes benchmarks/results/bf16_nietzsche.json (final losses, chars/s medians) and
bf16_nietzsche.png (train and validation loss against step).

    flock -x /tmp/lstm_jax_cpu.lock python benchmarks/bench_bf16.py      # ~2 min on 2 cores
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
RUNS = {
    "float32 (auto: native)": ["--config.model.dtype=float32", "--config.model.backward=auto"],
    "bfloat16 (native)": ["--config.model.dtype=bfloat16", "--config.model.backward=native"],
    "bfloat16 (auto: custom scan)": ["--config.model.dtype=bfloat16", "--config.model.backward=auto"],
}


def _metrics(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> int:
    out = {"command": "python benchmarks/bench_bf16.py", "config": "configs/nietzsche.py",
           "num_epochs": 2, "runs": {}}
    curves = {}
    for name, flags in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            workdir = pathlib.Path(tmp) / "run"
            cmd = [sys.executable, "-m", "lstm_jax.cli", "train", "--config",
                   str(ROOT / "configs/nietzsche.py"), "--config.num_epochs=2",
                   "--config.eval_every=100", "--config.sample.every_epochs=0", "--noprogress",
                   "--workdir", str(workdir), *flags]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
            if proc.returncode:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            start_up = [ln for ln in proc.stdout.splitlines() if "recurrence:" in ln]
            rows = _metrics(workdir / "metrics.jsonl")
            slug = name.split(" ")[0] + ("_native" if "(native)" in name else
                                         "_auto" if "auto" in name else "")
            (RESULTS / "runs" / f"bf16_nietzsche_{slug}.metrics.jsonl").write_text(
                (workdir / "metrics.jsonl").read_text())
        train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        speed = [r["chars_per_s"] for r in rows if "chars_per_s" in r][1:]   # after the compile
        curves[name] = (train, val)
        out["runs"][name] = dict(flags=flags, start_up=start_up, final_train_loss=train[-1][1],
                                 final_val_loss=val[-1][1], steps=train[-1][0],
                                 chars_per_s_median=statistics.median(speed) if speed else None)
        print(name, json.dumps(out["runs"][name]), flush=True)
    (RESULTS / "bf16_nietzsche.json").write_text(json.dumps(out, indent=1))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, (train, val)), color in zip(curves.items(), ("C0", "C1", "C2")):
        ax.plot(*zip(*train), color=color, lw=0.8, alpha=0.6)
        ax.plot(*zip(*val), color=color, marker="o", ms=3, label=f"{name}: val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/char); thin: train")
    ax.set_ylim(top=2.6)
    ax.legend(fontsize=8)
    ax.set_title("configs/nietzsche.py, 2 epochs: bfloat16 against float32", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "bf16_nietzsche.png", dpi=110)
    print(f"wrote {RESULTS / 'bf16_nietzsche.json'} and bf16_nietzsche.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

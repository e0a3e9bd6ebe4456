"""Embedding scale: how fast a model leaves the unigram plateau, by the scale of its first layer's
input kernel (model.embed_scale; 0 is the PyTorch-style U(+-1/sqrt(H)) every kernel had before).
Into benchmarks/results/embed_scale_cpu.json.

    python benchmarks/bench_embed.py --root /tmp/embed

Each point is `lstm-jax train --config configs/recipe.py` on Nietzsche with the model, dropout
(0.25) and dtype (bfloat16 where the CPU has AVX512-BF16, else float32) pinned, a fixed number
of steps instead of a time budget, and nothing but the training loss logged: the loss is counted
in steps, so this measures learning per step, not speed, and other load does not change it.
Two horizons: 400 steps at a constant rate (the start-up plateau), and 1,500 steps with the
recipe's cosine (where that leaves a short run), with the held-out window loss at the end.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import hostbench   # benchmarks/hostbench.py (this script's directory is on sys.path)

from lstm_jax import hostenv

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "embed_scale_cpu.json"
MODELS = {"1x512": (512, 1), "2x256": (256, 2)}
SCALES = (0.0, 1.0)
RUNS = {"plateau": (400, "constant"), "short_run": (1500, "cosine")}


def train(root: pathlib.Path, name: str, hidden: int, layers: int, scale: float, steps: int,
          schedule: str, dtype: str) -> dict:
    workdir = root / name
    cmd = [sys.executable, "-m", "lstm_jax.cli", "train", "--config", str(ROOT / "configs/recipe.py"),
           "--config.corpus=nietzsche", "--config.lowercase=True", "--config.time_budget_s=0",
           f"--config.max_steps={steps}", f"--config.model.hidden_size={hidden}",
           f"--config.model.num_layers={layers}", "--config.model.dropout=0.25",
           f"--config.model.dtype={dtype}", f"--config.model.embed_scale={scale}",
           f"--config.optimizer.schedule={schedule}", "--config.log_every=25",
           "--config.eval_every=1000000", "--config.eval_text=False",
           "--config.checkpoint.best_metric=val_loss", "--config.checkpoint.every_steps=1000000",
           "--config.sample.length=10", "--workdir", str(workdir), "--new_run", "--noprogress"]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    curve = {r["step"]: round(r["train_loss"], 4) for r in rows if "train_loss" in r}
    final = [r for r in rows if "val_loss" in r][-1]
    return {"hidden": hidden, "layers": layers, "embed_scale": scale, "steps": steps,
            "schedule": schedule, "dtype": dtype, "train_loss": curve,
            "final_val_loss": round(final["val_loss"], 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="/tmp/lstm_jax_embed", help="workdirs")
    args = ap.parse_args()
    root = pathlib.Path(args.root)
    dtype = "bfloat16" if "avx512_bf16" in hostenv.cpu_flags() else "float32"
    runs = {}
    for run, (steps, schedule) in RUNS.items():
        for model, (hidden, layers) in MODELS.items():
            for scale in SCALES:
                name = f"{model}_embed{scale:g}_{run}"
                runs[name] = train(root, name, hidden, layers, scale, steps, schedule, dtype)
                curve = runs[name]["train_loss"]
                print(f"{name:28s} train_loss at step 100/400/last: {curve.get(100, '-')} "
                      f"{curve.get(400, '-')} {curve[max(curve)]}  "
                      f"val_loss {runs[name]['final_val_loss']}", flush=True)
    record = {"command": "python benchmarks/bench_embed.py",
              "metric": "train_loss per logged step (nats/char, running mean of the last 25 "
                        "steps); final_val_loss: held-out 60-char windows at the end",
              "corpus": "nietzsche (lowercased)", "host": hostbench.describe(), "runs": runs}
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

"""configs/recipe.py on three corpora, stateless (sequence) vs stateful (stream): whole-text
val_text_bpc against training minutes, into benchmarks/results/recipe_cpu.json and .png.

    python benchmarks/bench_recipe.py --root /tmp/recipe run       # 6 runs of --minutes each
    python benchmarks/bench_recipe.py --root /tmp/recipe summary   # JSON + PNG from the workdirs

Corpora: the built-in pydoc text, Nietzsche (lowercased, as the Keras reference), and the Python
standard library's own source (every .py file under sysconfig's stdlib path outside
site-packages and test folders, joined into one file under --root: ~12 MB, 222 distinct chars).
Each run is `lstm-jax train --config configs/recipe.py` with `time_budget_s = minutes * 60`; the
curve is the run's own evaluations (every 250 steps), so the points before the end come from a
schedule sized for the whole budget (an anytime curve, not separate shorter runs). The baseline
for the Nietzsche target is configs/nietzsche.py under the same budget. Run it alone on the
machine (flock -x /tmp/lstm_jax_cpu.lock).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CORPORA = ("builtin", "nietzsche", "stdlib")
OBJECTIVES = ("sequence", "stream")
MARKS_MIN = (1, 2, 5, 10, 20)


def stdlib_corpus(root: pathlib.Path) -> pathlib.Path:
    """The standard library's source as one UTF-8 file (built once under `root`)."""
    path = root / "stdlib.txt"
    if not path.exists():
        lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts
                       and not {"test", "tests", "idle_test"} & set(p.parts))
        text = "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return path


def runs(root: pathlib.Path, minutes: float) -> list[tuple[str, list[str]]]:
    """(workdir name, lstm-jax train arguments) of every run."""
    source = {"builtin": ["--config.corpus=builtin"],
              "nietzsche": ["--config.corpus=nietzsche", "--config.lowercase=True"],
              "stdlib": [f"--config.corpus={stdlib_corpus(root)}"]}
    budget = f"--config.time_budget_s={minutes * 60:g}"
    out = [(f"{c}_{o}", ["--config", str(ROOT / "configs" / "recipe.py"), *source[c],
                         f"--config.objective={o}", budget])
           for c in CORPORA for o in OBJECTIVES]
    out.append(("nietzsche_baseline", ["--config", str(ROOT / "configs" / "nietzsche.py"), budget,
                                       "--config.num_epochs=1000", "--config.sample.every_epochs=0",
                                       "--config.checkpoint.every_steps=0"]))
    return out


def run(root: pathlib.Path, minutes: float, only: list[str]) -> None:
    for name, args in runs(root, minutes):
        if only and name not in only:
            continue
        workdir = root / name
        cmd = [sys.executable, "-m", "lstm_jax.cli", "train", *args, "--workdir", str(workdir),
               "--new_run", "--noprogress"]
        print(" ".join(cmd), flush=True)
        with open(root / f"{name}.log", "w") as log:
            subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False, env=os.environ)


def curve(workdir: pathlib.Path) -> dict:
    """Evaluations (train_s, val_text_bpc) and the median training rate of one run."""
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "val_text_bpc" in e]
    rates = sorted(e["chars_per_s"] for e in events if "chars_per_s" in e)
    config = json.loads((workdir / "config.json").read_text())
    at = {}
    for m in MARKS_MIN:   # the last evaluation within m minutes of training, if the run got there
        within = [e for e in evals if e["train_s"] <= m * 60 * 1.03]
        if within and evals[-1]["train_s"] >= m * 60 * 0.97:
            at[str(m)] = round(within[-1]["val_text_bpc"], 4)
    best = min(evals, key=lambda e: e["val_text_bpc"])
    return {"points": [[round(e["train_s"], 1), round(e["val_text_bpc"], 4)] for e in evals],
            "at_minutes": at, "final": round(evals[-1]["val_text_bpc"], 4),
            "best": round(best["val_text_bpc"], 4), "best_at_s": round(best["train_s"], 1),
            "steps": evals[-1]["step"], "epochs": round(evals[-1]["epoch"], 2),
            "chars_per_s_median": rates[len(rates) // 2] if rates else None,
            "objective": config["objective"], "hidden": config["model"]["hidden_size"],
            "dropout": config["model"]["dropout"], "time_budget_s": config["time_budget_s"]}


def summary(root: pathlib.Path) -> dict:
    record = {"command": "benchmarks/bench_recipe.py", "runs": {}}
    for name, _ in runs(root, 0):
        if (root / name / "metrics.jsonl").exists():
            record["runs"][name] = curve(root / name)
    (RESULTS / "recipe_cpu.json").write_text(json.dumps(record, indent=1))
    plot(record, RESULTS / "recipe_cpu.png")
    for name, r in record["runs"].items():
        print(f"{name:22s} final {r['final']:.3f} best {r['best']:.3f} @ {r['best_at_s']:.0f}s "
              f"at min {r['at_minutes']} chars/s {r['chars_per_s_median']:,.0f}")
    return record


def plot(record: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(12, 3.8))
    for ax, corpus in zip(axes, CORPORA):
        for name, r in record["runs"].items():
            if not name.startswith(corpus):
                continue
            t, bpc = zip(*r["points"])
            label = name[len(corpus) + 1:]
            label = "configs/nietzsche.py" if label == "baseline" else f"recipe, {label}"
            ax.plot([s / 60 for s in t], bpc, marker=".", label=label)
        ax.set_title({"builtin": "pydoc (builtin)", "nietzsche": "Nietzsche",
                      "stdlib": "stdlib source (12 MB)"}[corpus], fontsize=9)
        ax.set_xlabel("training minutes (2-core CPU)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("whole-text val_text_bpc")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", choices=("run", "summary"))
    ap.add_argument("--root", default="/tmp/lstm_jax_recipe", help="workdirs and the stdlib file")
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--only", default="", help="comma list of run names (default: all)")
    args = ap.parse_args(argv)
    root = pathlib.Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.what == "run":
        run(root, args.minutes, [n for n in args.only.split(",") if n])
    summary(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())

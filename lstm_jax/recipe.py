"""The recipe's choices that depend on the corpus, the time budget and the host.

`configs/recipe.py` leaves four fields to this module: `model.hidden_size = 0`,
`model.num_layers = 0`, `model.dropout = -1` and `model.dtype = "auto"`. `resolve(config,
train_chars)` fills the ones still at those values (a value set on the command line wins)
before anything is built, and says what it chose and why in one line. The rule, from the
measured quality-per-minute runs (benchmarks/README.md, "Recipe"):

- how many characters the budget trains is estimated from the model's FLOPs per character and a
  rate for the host (CPU: cores x a per-core rate by instruction set; accelerators: effectively
  unbounded); `epochs` is that over the training split;
- dtype: bfloat16 on CPUs with AVX512-BF16 (the same loss as float32 over two Nietzsche epochs,
  more characters per second), float32 elsewhere;
- the model on CPUs: the last of `MODELS` (LSTM(256), LSTM(384), two layers of 256) that the
  budget reads the training text at least `MODEL_EPOCHS` times at (or `num_epochs`, if fewer)
  or trains at least `MODEL_CHARS` characters on, else LSTM(256). A cheaper model trains more
  characters in the same time: on a small corpus a dearer model read fewer times than that had
  not caught up with the cheaper one; past it the cheaper model is at its epoch cap and the
  dearer one wins. A large corpus is never read that often; there what counts is the characters
  trained, and `MODEL_CHARS` sits between where LSTM(384) tied LSTM(256) on the stdlib source
  and where the dearer models won. LSTM(512) is not a CPU choice: with unit-scale character
  embeddings (configs/recipe.py's `model.embed_scale`) two layers of 256 beat it at the same
  budget on pydoc and Nietzsche, overfitting less. Accelerators: LSTM(512) (there the smaller
  models are not that much faster);
- dropout (between layers and before the head): none for about one epoch, rising with
  log2(epochs) (0.25 at about twelve epochs, 0.3 at about 24): a small corpus read many times
  over overfits LSTM(512), a large one read once does not, and too much dropout slows a short
  run down;
- epochs are at most `num_epochs` (configs/recipe.py: 20): on the small corpora the best
  held-out loss came well before the end of longer runs, so a budget that fits more ends early.

A resumed run keeps the choices saved in its workdir's config.json, so changing the budget on
resume does not change the model.
"""
from __future__ import annotations

import copy
import math
import pathlib
import types
from typing import Optional

import ml_collections

from lstm_jax import flops, hostenv

AUTO_HIDDEN, AUTO_LAYERS, AUTO_DROPOUT, AUTO_DTYPE = 0, 0, -1.0, "auto"
# On CPUs, (hidden, layers) from the cheapest per character (at small vocabularies) to the
# dearest: the recipe takes the last one the budget reads MODEL_EPOCHS times or trains
# MODEL_CHARS characters on.
MODELS = ((256, 1), (384, 1), (256, 2))
MODEL_EPOCHS = 14            # epochs of the training text a bigger model needs to beat a smaller
MODEL_CHARS = 14e6           # ... or characters trained, on a corpus too large to read that often
TRAINING_SHARE = 0.85        # of the budget: the rest is compiles, evaluations, checkpoints
# Sustained training FLOP/s per core of the recurrence on x86-64 CPUs, float32 (bfloat16: x1.5 on
# the native kernel, x1.2 on XLA's matmuls where AMX makes those the faster):
# what the native kernel reaches at hidden 256-512 (benchmarks/results/train_cpu*.json: 60-79
# GFLOP/s per core on AVX-512, 25-29 on AVX2).
CPU_FLOPS_PER_CORE = {"avx512": 70e9, "avx2": 28e9, "other": 10e9}
ACCELERATOR_FLOPS = 20e12


def is_auto(config: ml_collections.ConfigDict) -> bool:
    m = config.model
    return (m.hidden_size == AUTO_HIDDEN or m.num_layers == AUTO_LAYERS
            or m.dropout == AUTO_DROPOUT or m.dtype == AUTO_DTYPE)



def host_rate(platform: str, dtype: str, flags: Optional[set[str]] = None,
              cores: Optional[int] = None) -> float:
    """Estimated sustained training FLOP/s of this host (deterministic: a resumed run on the
    same machine chooses the same)."""
    if platform != "cpu":
        return ACCELERATOR_FLOPS
    flags = hostenv.cpu_flags() if flags is None else flags
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    rate = CPU_FLOPS_PER_CORE[isa] * (cores or hostenv.cpu_count())
    if dtype != "bfloat16":
        return rate
    # bfloat16 runs on the native kernel where the CPU has AVX512-BF16 but no AMX (native.fast),
    # else on XLA's bf16 matmuls (benchmarks/README.md, "Native recurrence").
    return rate * (1.5 if hostenv.bf16_on_native_kernel(flags) else 1.2)


def choose_dtype(platform: str, flags: Optional[set[str]] = None) -> str:
    flags = hostenv.cpu_flags() if flags is None else flags
    return "bfloat16" if platform == "cpu" and "avx512_bf16" in flags else "float32"


def trained_chars(hidden: int, vocab: int, layers: int, budget_s: float, rate: float) -> float:
    """Characters a budget of `budget_s` trains at `rate` FLOP/s (forward + backward per char)."""
    model = types.SimpleNamespace(hidden_size=hidden, vocab_size=vocab, num_layers=layers)
    return TRAINING_SHARE * budget_s * rate / flops.count(model).train


def choose_dropout(epochs: float) -> float:
    """0 up to about one epoch, 0.07 x log2(epochs) after (0.25 at ~12 epochs, 0.3 at ~24), at
    most 0.5; rounded to 0.05. At ~12 epochs 0.25 beat 0.5 (benchmarks/README.md, "Recipe")."""
    if epochs <= 1.0:
        return 0.0
    return round(min(0.5, 0.07 * math.log2(epochs)) * 20) / 20


def candidates(hidden: int, layers: int, platform: str) -> tuple[tuple[int, int], ...]:
    """The (hidden, layers) the recipe chooses from, in MODELS order, given what the user set
    (AUTO_*: not set). On accelerators one layer of 512 (there the smaller models are not that
    much faster). A layer count set alone keeps the MODELS with that many, else LSTM(256)s (a
    hidden size set alone has its one layer from `resolve` already)."""
    if platform != "cpu" or hidden != AUTO_HIDDEN:
        return ((hidden or 512, layers or 1),)
    if layers == AUTO_LAYERS:
        return MODELS
    return tuple(m for m in MODELS if m[1] == layers) or ((256, layers),)


def choose_model(chars_at: dict[tuple[int, int], float], enough: float) -> tuple[int, int]:
    """Of the candidates (`chars_at`'s keys, cheapest first) the last the budget trains at
    least `enough` characters on, else the first."""
    trained_enough = [m for m in chars_at if chars_at[m] >= enough]
    return trained_enough[-1] if trained_enough else next(iter(chars_at))


def describe(hidden: int, layers: int) -> str:
    """'hidden 384', or '2 layers of 256'."""
    return f"hidden {hidden}" if layers == 1 else f"{layers} layers of {hidden}"


def resolve(config: ml_collections.ConfigDict, train_chars: int, vocab_size: int, *,
            platform: Optional[str] = None, saved: Optional[dict] = None,
            flags: Optional[set[str]] = None, cores: Optional[int] = None) -> Optional[str]:
    """Fills the auto fields of `config` in place; returns the one line that says what and why
    (None when nothing was auto). `saved`: a resumed run's config.json, whose choices win."""
    m = config.model
    if m.hidden_size != AUTO_HIDDEN and m.num_layers == AUTO_LAYERS:
        m.num_layers = 1     # a hidden size set alone keeps one layer: `hidden_size384` means
                             # what it meant before the recipe chose layers
    if not is_auto(config):
        return None
    # Checked first, resumed runs too: without a budget the recipe would train for num_epochs
    # (an upper bound, not a length).
    budget = config.time_budget_s
    if not budget or budget <= 0:
        raise ValueError("the recipe (model.hidden_size=0, model.num_layers=0, model.dropout=-1 "
                         "or model.dtype='auto') chooses from the time budget; set "
                         "time_budget_s, or set those fields yourself")
    if saved is not None:
        model = saved.get("model", {})
        for key, auto in (("hidden_size", AUTO_HIDDEN), ("num_layers", AUTO_LAYERS),
                          ("dropout", AUTO_DROPOUT), ("dtype", AUTO_DTYPE)):
            if m[key] == auto and key in model:
                m[key] = model[key]
        if not is_auto(config):
            return (f"recipe: {describe(m.hidden_size, m.num_layers)}, dropout {m.dropout:g}, "
                    f"{m.dtype}, as chosen when this run started")
    platform = platform or hostenv.guess_platform()
    if m.dtype == AUTO_DTYPE:
        m.dtype = choose_dtype(platform, flags)
    rate = host_rate(platform, m.dtype, flags, cores)
    why = ""
    if m.hidden_size == AUTO_HIDDEN or m.num_layers == AUTO_LAYERS:
        options = candidates(m.hidden_size, m.num_layers, platform)
        chars_at = {(h, n): trained_chars(h, vocab_size, n, budget, rate) for h, n in options}
        need = min(MODEL_EPOCHS, config.num_epochs)    # a run reads at most num_epochs
        # `need` epochs of the training text, or MODEL_CHARS on a text too large for that
        enough = min(need * max(train_chars, 1), MODEL_CHARS)
        m.hidden_size, m.num_layers = choose_model(chars_at, enough)
        chosen = options.index((m.hidden_size, m.num_layers))
        bigger = options[chosen + 1:]
        if chosen and chars_at[options[chosen]] < need * max(train_chars, 1):
            why += (f"; over the {MODEL_CHARS / 1e6:g}M chars a bigger model needs on a "
                    f"corpus it reads under {need:g} times")
        if bigger:
            more = chars_at[bigger[0]]
            why += (f"; {describe(*bigger[0])} would read it ~{more / max(train_chars, 1):,.1f} "
                    f"times (~{more / 1e6:,.1f}M chars), under the {need:g} (or "
                    f"{MODEL_CHARS / 1e6:g}M) a bigger model needs")
    chars = trained_chars(m.hidden_size, vocab_size, m.num_layers, budget, rate)
    fits = chars / max(train_chars, 1)
    epochs = min(fits, config.num_epochs)     # num_epochs caps the run (configs/recipe.py: 20)
    if m.dropout == AUTO_DROPOUT:
        m.dropout = choose_dropout(epochs)
    where = f"{platform}, ~{rate / 1e9:,.0f} GFLOP/s" if platform == "cpu" else platform
    capped = (f"num_epochs={config.num_epochs} of {train_chars:,} training chars (the budget "
              f"fits ~{fits:,.1f}: the run ends early)" if fits > config.num_epochs else
              f"~{epochs:,.1f} epochs of {train_chars:,} training chars")
    return (f"recipe: {describe(m.hidden_size, m.num_layers)}, dropout {m.dropout:g}, {m.dtype}: "
            f"{budget:g} s trains ~{chars / 1e6:,.1f}M chars here ({where}), {capped}{why}")


def apply(config: ml_collections.ConfigDict, corpus, workdir=None,
          new_run: bool = False) -> tuple[ml_collections.ConfigDict, Optional[str]]:
    """`config` with its auto fields chosen for `corpus` (a data.Corpus) and the budget, and the
    line that says so (the config itself and None when nothing is auto). A run resumed in
    `workdir` keeps the choices in its config.json."""
    if not is_auto(config):
        return config, None
    from lstm_jax import workdir as workdir_lib
    config = copy.deepcopy(config)
    saved = None
    if workdir is not None and not new_run:
        saved = workdir_lib.read_json(pathlib.Path(workdir) / "config.json")
    line = resolve(config, len(corpus.train_tokens), len(corpus.vocab),
                   saved=saved if isinstance(saved, dict) else None)
    return config, line

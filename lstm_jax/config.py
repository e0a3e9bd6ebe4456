"""The one config schema (an ml_collections ConfigDict) and its validation.

`get_config()` is the default run: the built-in corpus, finishing in a few minutes on 2 CPU cores.
Files in `configs/` start from it and change fields; `--config.FIELD=VALUE` overrides any field.
"""
from __future__ import annotations

import difflib
import importlib.util
import math
import pathlib
import re
from typing import Any, Iterable, Optional

import ml_collections

# Fields a resumed run may change: when to evaluate, save or sample, how the work is placed on
# devices and processes, which backward pass computes the same gradients, and how long to train
# (a new length continues the learning-rate schedule; see train.lr_segments). Every other field
# fixes the batches, the model or the update, and a resume that changes it is refused
# (workdir.resume_differences).
RESUMABLE_FIELDS = (
    "num_epochs", "max_steps", "time_budget_s", "log_every", "eval_every", "eval_window", "eval_stride",
    "eval_max_windows", "eval_text", "encoding_errors", "model.backward",
    "sample.temperatures", "sample.length", "sample.every_epochs", "sample.prime",
    "checkpoint.every_steps", "checkpoint.max_to_keep", "checkpoint.keep_best",
    "checkpoint.best_metric", "checkpoint.early_stop_evals",
    "parallel.mode", "parallel.num_devices", "parallel.cpu_devices", "parallel.tune_allocator",
    "parallel.distributed", "parallel.coordinator_address", "parallel.num_processes",
    "parallel.process_id", "profile_steps",
)


def get_config() -> ml_collections.ConfigDict:
    """Default: sequence objective on the built-in corpus (pydoc reference text), ~2 min on 2 cores."""
    c = ml_collections.ConfigDict()
    # --- data -----------------------------------------------------------------------------------
    c.corpus = "builtin"           # builtin | nietzsche | PATH or GLOB | tfds:NAME[:split] | prepared:DIR
    c.lowercase = False            # the Keras reference lowercases its corpus
    c.encoding_errors = "strict"   # how undecodable bytes are handled: strict | replace | ignore
    c.vocab = "chars"              # chars (sorted distinct characters) | bytes (UTF-8 bytes, V = 256)
    c.val_fraction = 0.05          # held-out tail of the corpus used for validation
    c.objective = "sequence"       # window (Keras: loss on the char after each window) | sequence
                                   # (every position, zero state per row) | stream (every position,
                                   # B contiguous streams, the LSTM state carried between steps)
    c.seq_len = 64                 # window length (Keras reference: 60) or chunk length T for `sequence`
    c.window_step = 3              # window objective: a window starts every `window_step` chars
    c.batch_size = 32              # global batch (all devices, all processes)
    c.per_device_batch_size = 0    # if > 0, overrides batch_size = this x device count
    c.grad_accum_steps = 1         # micro-batches per update, for global batches that do not fit
    # --- model ----------------------------------------------------------------------------------
    c.model = ml_collections.ConfigDict()
    c.model.hidden_size = 256      # LSTM units per layer (0: the recipe chooses, lstm_jax.recipe)
    c.model.num_layers = 1         # stacked LSTM layers (0: the recipe chooses)
    c.model.dropout = 0.0          # dropout between layers and before the head (training only;
                                   # -1: the recipe chooses)
    c.model.keras_init = False     # Keras initialisers (glorot / orthogonal) for parity runs
    c.model.embed_scale = 0.0      # > 0: std of layer 0's input kernel (the characters'
                                   # embeddings into the gates); 0: that layer's own init
    c.model.dtype = "float32"      # matmul compute dtype: float32 | bfloat16 (cell state stays
                                   # f32) | auto (the recipe chooses)
    c.model.param_dtype = "float32"   # parameter (and optimizer state) dtype
    c.model.backward = "auto"      # auto (the native CPU kernel where it runs and measured faster,
                                   # else custom) | native | custom (hand BPTT in JAX) | autodiff
                                   # (jax.grad of the scan) | cudnn (GPU)
    # --- optimisation ---------------------------------------------------------------------------
    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "rmsprop"       # rmsprop (Keras-identical) | adam | adamw
    c.optimizer.learning_rate = 0.01   # Keras RMSprop default
    c.optimizer.weight_decay = 0.0     # adamw: decoupled decay; rmsprop/adam: L2 added to the gradient
    c.optimizer.decay = 0.9            # RMSprop rho
    c.optimizer.eps = 1e-7             # Keras epsilon, inside the sqrt
    c.optimizer.clip_norm = 5.0        # global-norm gradient clipping; 0 disables (Keras reference: none)
    c.optimizer.schedule = "cosine"    # constant | cosine (decays to lr * final_lr_fraction)
    c.optimizer.warmup_steps = 0       # linear warm-up steps
    c.optimizer.final_lr_fraction = 0.1  # the cosine ends at learning_rate x this
    c.num_epochs = 8                   # passes over the training split
    c.max_steps = 0                    # if > 0, stop after this many updates (overrides epochs)
    c.time_budget_s = 0.0              # if > 0, as many steps as fit in this much wall time
                                       # (elapsed_s: evaluations, checkpoints, samples included;
                                       # periodic evaluations read a fixed subset sized to ~5% of
                                       # it), at most num_epochs / max_steps; the cosine decays
                                       # to that end (periodic.Budget)
    c.seed = 0                         # params, shuffling, dropout and samples all derive from it
    # --- logging, evaluation, samples -----------------------------------------------------------
    c.log_every = 50                   # steps between metrics.jsonl training events
    c.eval_every = 0                   # steps between evaluations; 0 = at the end of each epoch
    c.eval_window = 60                 # held-out windows of this length give val_last_loss
    c.eval_stride = 3                  # ... one starting every eval_stride chars (Keras reference: 3)
    c.eval_max_windows = 2048          # cap on held-out windows per evaluation (evenly spaced)
    c.eval_text = True                 # also val_text_bpc: the whole held-out text, state carried
    c.profile_steps = ""               # "A:B": a jax.profiler trace of steps A to B in <workdir>/profile
    c.sample = ml_collections.ConfigDict()
    c.sample.temperatures = (0.2, 0.5, 1.0, 1.2)  # the Keras reference's four
    c.sample.length = 400              # chars per sample
    c.sample.every_epochs = 4          # sample after every N epochs (and at the end); 0 = only at end
    c.sample.prime = ""                # empty: a random held-out window, as the Keras reference does
    # --- checkpoints ----------------------------------------------------------------------------
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000    # save every N steps (and at each epoch end and the end)
    c.checkpoint.max_to_keep = 3       # keep the last K ...
    c.checkpoint.keep_best = True      # ... plus the best by best_metric
    c.checkpoint.best_metric = "val_loss"  # val_loss (windows) | val_text_bpc (whole held-out text)
    c.checkpoint.early_stop_evals = 0  # stop after N evaluations without a new best; 0 = never
    # --- parallelism and host -------------------------------------------------------------------
    c.parallel = ml_collections.ConfigDict()
    c.parallel.mode = "mesh"           # mesh (jit over a ('data',) mesh) | pmap
    c.parallel.num_devices = 0         # devices in the mesh; 0 = all devices of all processes
    c.parallel.cpu_devices = 0         # CPU hosts: 0 = auto (one per core for hidden <= 384 and
                                       # V <= 2048, else one; hostenv.recommended_cpu_devices);
                                       # -1 = one per core; n
    c.parallel.tune_allocator = True   # glibc malloc settings that stop XLA re-mapping temporaries
    c.parallel.distributed = False     # call jax.distributed.initialize (multi-host)
    c.parallel.coordinator_address = ""  # host:port of process 0 ('' = auto-detect, TPU/SLURM)
    c.parallel.num_processes = 0       # 0 = auto-detect
    c.parallel.process_id = -1         # -1 = auto-detect
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """Imports a `configs/*.py` file and returns its `get_config()`; ValueError naming the file
    and what is wrong with it otherwise."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist; pass a path such as configs/nietzsche.py")
    try:
        spec = importlib.util.spec_from_file_location(f"lstm_jax_config_{p.stem}", p)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except AttributeError as e:
        if "get_config" not in str(e):
            raise ValueError(f"config file {path} failed: {e}") from None
        raise ValueError(f"config file {path} has no get_config(); define one that returns "
                         f"lstm_jax.config.get_config() with your changes") from None
    except SyntaxError as e:
        raise ValueError(f"config file {path} line {e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - any error in user code, named in one line
        raise ValueError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"config file {path}: get_config() returned {type(config).__name__}, "
                         f"not an ml_collections.ConfigDict")
    return config


def from_saved(saved: dict) -> ml_collections.ConfigDict:
    """A run's saved config.json on top of today's defaults: fields added since it was written
    take their default values (which reproduce the old behaviour); fields since removed are
    dropped."""
    config = get_config()
    known = dict(flat_items(config))
    for name, value in flat_items(ml_collections.ConfigDict(saved)):
        if name in known:
            *parents, leaf = name.split(".")
            target = config
            for part in parents:
                target = target[part]
            with target.ignore_type():
                target[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    """('model.hidden_size', 256), ... for every leaf field."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from flat_items(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def closest_fields(name: str, config: ml_collections.ConfigDict | None = None) -> list[str]:
    """The valid field names nearest to a misspelt one, for error messages."""
    names = [k for k, _ in flat_items(config or get_config())]
    return difflib.get_close_matches(name, names, n=3, cutoff=0.5)


def check_fields(config: ml_collections.ConfigDict) -> None:
    """Every field must exist in the schema; unknown ones name the closest valid fields."""
    known = dict(flat_items(get_config()))
    for name, _ in flat_items(config):
        if name not in known:
            hint = closest_fields(name)
            raise ValueError(f"unknown config field {name!r}"
                             + (f"; did you mean {' or '.join(map(repr, hint))}?" if hint else ""))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the fix for anything that cannot run."""
    check_fields(config)
    for name, value in flat_items(config):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(value, (tuple, list)) and any(isinstance(v, float) and not math.isfinite(v)
                                                     for v in value):
            raise ValueError(f"{name} must hold finite numbers, got {value!r}")
    positive = ["seq_len", "window_step", "num_epochs", "model.hidden_size", "model.num_layers",
                "log_every", "eval_window", "eval_stride", "eval_max_windows", "grad_accum_steps",
                "sample.length"]
    for name in positive:
        value = _get(config, name)
        recipe_chooses = name in ("model.hidden_size", "model.num_layers")   # lstm_jax.recipe
        if recipe_chooses and value == 0:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            auto = ", or 0 for the recipe to choose" if recipe_chooses else ""
            raise ValueError(f"{name} must be a positive integer{auto}, got {value!r}")
    if config.per_device_batch_size < 0 or (config.per_device_batch_size == 0 and config.batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer, got {config.batch_size!r}")
    for name in ("max_steps", "time_budget_s", "eval_every", "checkpoint.every_steps", "sample.every_epochs"):
        if _get(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {_get(config, name)!r}")
    if config.objective not in ("window", "sequence", "stream"):
        raise ValueError(f"objective must be 'window', 'sequence' or 'stream', got {config.objective!r}")
    if not 0.0 <= config.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.optimizer.learning_rate <= 0 or config.optimizer.eps <= 0:
        raise ValueError("optimizer.learning_rate and optimizer.eps must be positive")
    if not 0.0 <= config.optimizer.decay < 1.0:
        raise ValueError(f"optimizer.decay must be in [0, 1), got {config.optimizer.decay}")
    if config.optimizer.clip_norm < 0:
        raise ValueError("optimizer.clip_norm must be >= 0 (0 disables clipping)")
    if config.optimizer.name not in ("rmsprop", "adam", "adamw"):
        raise ValueError(f"optimizer.name must be rmsprop, adam or adamw, got {config.optimizer.name!r}")
    if config.optimizer.weight_decay < 0:
        raise ValueError(f"optimizer.weight_decay must be >= 0, got {config.optimizer.weight_decay}")
    if config.checkpoint.best_metric not in ("val_loss", "val_text_bpc"):
        raise ValueError(f"checkpoint.best_metric must be val_loss or val_text_bpc, got "
                         f"{config.checkpoint.best_metric!r}")
    if config.checkpoint.best_metric == "val_text_bpc" and not config.eval_text:
        raise ValueError("checkpoint.best_metric=val_text_bpc needs eval_text=True")
    if config.checkpoint.early_stop_evals < 0:
        raise ValueError("checkpoint.early_stop_evals must be >= 0 (0 = never stop early)")
    if config.optimizer.schedule not in ("constant", "cosine"):
        raise ValueError(f"optimizer.schedule must be 'constant' or 'cosine', got {config.optimizer.schedule!r}")
    if config.model.backward not in ("auto", "native", "custom", "autodiff", "cudnn"):
        raise ValueError(f"model.backward must be 'auto', 'native', 'custom', 'autodiff' or "
                         f"'cudnn', got {config.model.backward!r}")
    if config.vocab not in ("chars", "bytes"):
        raise ValueError(f"vocab must be 'chars' or 'bytes', got {config.vocab!r}")
    if config.parallel.mode not in ("mesh", "pmap"):
        raise ValueError(f"parallel.mode must be 'mesh' or 'pmap', got {config.parallel.mode!r}")
    if config.encoding_errors not in ("strict", "replace", "ignore"):
        raise ValueError("encoding_errors must be strict, replace or ignore")
    temps = config.sample.temperatures
    bad = [t for t in temps if not _is_number(t) or not math.isfinite(t) or t < 0] if isinstance(
        temps, (tuple, list)) and temps else [temps]
    if bad:
        raise ValueError(f"sample.temperatures must be finite numbers >= 0, such as "
                         f"'(0.2,0.5,1.0)'; {bad[0]!r} is not")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {config.seed!r}")
    if not _is_number(config.optimizer.final_lr_fraction) or not 0 <= config.optimizer.final_lr_fraction <= 1:
        raise ValueError(f"optimizer.final_lr_fraction must be in [0, 1] (the cosine's end as a "
                         f"fraction of learning_rate), got {config.optimizer.final_lr_fraction!r}")
    if config.optimizer.warmup_steps < 0:
        raise ValueError(f"optimizer.warmup_steps must be >= 0, got {config.optimizer.warmup_steps!r}")
    if config.model.dtype not in ("float32", "bfloat16", "auto"):
        raise ValueError(f"model.dtype must be 'float32', 'bfloat16' or 'auto' (the recipe "
                         f"chooses), got {config.model.dtype!r}")
    if config.model.param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"model.param_dtype must be 'float32' or 'bfloat16', got "
                         f"{config.model.param_dtype!r}")
    if not config.model.embed_scale >= 0.0:
        raise ValueError(f"model.embed_scale must be >= 0 (0: the first layer's own init), got "
                         f"{config.model.embed_scale!r}")
    if not (0.0 <= config.model.dropout < 1.0 or config.model.dropout == -1):
        raise ValueError(f"model.dropout must be in [0, 1), or -1 for the recipe to choose, got "
                         f"{config.model.dropout!r}")
    if config.checkpoint.max_to_keep < 1:
        raise ValueError(f"checkpoint.max_to_keep must be >= 1, got {config.checkpoint.max_to_keep!r}")
    if not isinstance(config.sample.prime, str):
        raise ValueError(f"sample.prime must be a string, got {config.sample.prime!r}")
    profile_window(config.profile_steps)
    for name, low in (("parallel.num_devices", 0), ("parallel.cpu_devices", -1),
                      ("parallel.num_processes", 0), ("parallel.process_id", -1)):
        if _get(config, name) < low:
            raise ValueError(f"{name} must be >= {low}, got {_get(config, name)!r}")


def profile_window(spec: Any) -> Optional[tuple[int, int]]:
    """profile_steps "A:B" as (A, B), None for ""; ValueError for anything else."""
    if spec == "" or spec is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec) if isinstance(spec, str) else None
    if not match or int(match[1]) >= int(match[2]):
        raise ValueError(f"profile_steps must be 'A:B' with integers 0 <= A < B (trace the updates "
                         f"from step A to step B, e.g. 10:20), or '' for none; got {spec!r}")
    return int(match[1]), int(match[2])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config

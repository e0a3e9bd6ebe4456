"""Pure train/eval steps and the training loop `train_and_evaluate(config, workdir)`.

The NNX model is split once (`nnx.split`) into a static graphdef and a params pytree; the hot paths
are plain functions of pytrees under `jax.jit` (state donated). The mesh path and the pmap path share
`loss_and_grads` and `apply_update`; they differ only in how arrays are placed and how the step is
wrapped.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import signal
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from lstm_jax import checkpoint as ckpt
from lstm_jax import config as config_lib
from lstm_jax import corpora, data, parallel
from lstm_jax.model import CharLSTM, ModelConfig

LN2 = math.log(2.0)


@struct.dataclass
class TrainState:
    """Everything that changes during training. The step's RNG is fold_in(seed key, step), so the
    step counter is the whole RNG state and the data position is (step // steps_per_epoch, rest)."""
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss); the message says what to change."""


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    m = config.model
    return ModelConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                       dropout=m.dropout, keras_init=m.keras_init, dtype=m.dtype,
                       param_dtype=m.param_dtype, backward=m.backward)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Keras-identical RMSprop (rho 0.9, eps inside the sqrt, zero initial velocity), optional
    global-norm clipping before it and an optional cosine schedule."""
    o = config.optimizer
    if o.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(
            0.0 if o.warmup_steps else o.learning_rate, o.learning_rate, o.warmup_steps,
            max(total_steps, o.warmup_steps + 1), end_value=o.learning_rate * o.final_lr_fraction)
    elif o.warmup_steps:
        lr = optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    else:
        lr = o.learning_rate
    rmsprop = optax.rmsprop(lr, decay=o.decay, eps=o.eps, eps_in_sqrt=True, initial_scale=0.0)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), rmsprop) if o.clip_norm > 0 else rmsprop


# --- the pure step functions -----------------------------------------------------------------

def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch_BxL1: jax.Array, dropout_key,
            objective: str) -> jax.Array:
    """Mean next-char cross-entropy (nats): the char after each window, or every position."""
    model = nnx.merge(graphdef, params)
    inputs = batch_BxL1[:, :-1]
    if objective == "window":
        logits = model(inputs, dropout_key=dropout_key, last_only=True)
        targets = batch_BxL1[:, -1]
    else:
        logits = model(inputs, dropout_key=dropout_key)
        targets = batch_BxL1[:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def loss_and_grads(params, graphdef, batch_BxL1, key, *, objective: str, accum_steps: int):
    """Loss and gradients, averaged over `accum_steps` micro-batches of the batch."""
    grad_fn = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
        return grad_fn(params, graphdef, batch_BxL1, key, objective)
    # Micro-batch k = rows k, k + K, k + 2K, ...: (B, L) -> (B/K, K, L) splits the batch axis
    # minor-to-major, so with the rows sharded over devices every device keeps its own B/(n*K)
    # rows of every micro-batch. (A (K, B/K) split would cut across the device shards and make
    # XLA all-gather the batch inside the accumulation loop.)
    micro = jnp.swapaxes(batch_BxL1.reshape((-1, accum_steps) + batch_BxL1.shape[1:]), 0, 1)

    def body(carry, inputs):
        loss_sum, grad_sum = carry
        i, mb = inputs
        loss, grads = grad_fn(params, graphdef, mb, jax.random.fold_in(key, i), objective)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (0.0, zeros), (jnp.arange(accum_steps), micro))
    return loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads)


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state)


def make_train_step(graphdef, tx, config) -> Callable:
    """`train_step(state, batch, key) -> (state, metrics)`, jitted, state donated.

    On a mesh, pass a replicated state and a batch sharded over 'data'; XLA inserts the gradient
    all-reduce. `key` is the run's base key; the step's key is fold_in(key, state.step).
    """
    def train_step(state: TrainState, batch_BxL1: jax.Array, key: jax.Array):
        step_key = jax.random.fold_in(key, state.step)
        loss, grads = loss_and_grads(state.params, graphdef, batch_BxL1, step_key,
                                     objective=config.objective, accum_steps=config.grad_accum_steps)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return apply_update(state, grads, tx), metrics
    return jax.jit(train_step, donate_argnums=0)


def make_pmap_train_step(graphdef, tx, config, axis_name: str = "batch",
                         devices: Optional[list] = None) -> Callable:
    """The same step under `jax.pmap`: state replicated with a leading device axis, batch
    (devices, rows, L + 1), gradients and loss averaged with `pmean`."""
    def train_step(state: TrainState, batch_BxL1: jax.Array, key: jax.Array):
        step_key = jax.random.fold_in(jax.random.fold_in(key, state.step), jax.lax.axis_index(axis_name))
        loss, grads = loss_and_grads(state.params, graphdef, batch_BxL1, step_key,
                                     objective=config.objective, accum_steps=config.grad_accum_steps)
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        return apply_update(state, grads, tx), metrics
    return jax.pmap(train_step, axis_name=axis_name, donate_argnums=0, in_axes=(0, 0, None),
                    devices=devices)


def make_eval_step(graphdef) -> Callable:
    """`eval_step(params, windows_BxL1) -> (loss_sum_B, last_loss_B)`: per-row sums of the
    next-char loss over every position (val_loss) and the loss on the char after the window
    (val_last_loss, the seed's loss). Rows stay sharded and the host reduces them: the program has
    no collectives, so any number of eval steps may be in flight (XLA:CPU can deadlock when
    several multi-device programs with collectives are queued at once)."""
    def eval_step(params, windows_BxL1):
        model = nnx.merge(graphdef, params)
        logits = model(windows_BxL1[:, :-1])
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, windows_BxL1[:, 1:])
        return losses_BxT.sum(axis=1), losses_BxT[:, -1]
    return jax.jit(eval_step)


# --- building a run --------------------------------------------------------------------------

@dataclasses.dataclass
class Corpus:
    vocab: data.Vocab
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    fingerprint: str


def load_corpus(config: ml_collections.ConfigDict, vocab: Optional[data.Vocab] = None) -> Corpus:
    """Text -> vocab (built, or the saved one when resuming) -> encoded train/val split."""
    if config.corpus.startswith("prepared:"):
        directory = config.corpus.split(":", 1)[1]
        vocab_p, train, val = data.load_prepared(directory)
        return Corpus(vocab_p, train, val, fingerprint=f"prepared:{pathlib.Path(directory).name}")
    text = corpora.load_text(config.corpus, lowercase=config.lowercase, errors=config.encoding_errors)
    vocab = vocab or data.Vocab.from_text(text, kind=config.vocab)
    train, val = data.split_tokens(vocab.encode(text), config.val_fraction)
    return Corpus(vocab, train, val, corpora.corpus_fingerprint(text))


def init_state(config, model_cfg: ModelConfig, tx, mesh) -> tuple[nnx.GraphDef, TrainState]:
    """Builds params and optimizer state directly in their replicated placement."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharLSTM(model_cfg, rngs=nnx.Rngs(0))))

    def init():
        params = nnx.state(CharLSTM(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    return graphdef, jax.jit(init, out_shardings=parallel.replicated(mesh))()


def global_batch_size(config, mesh) -> int:
    n = mesh.devices.size
    batch = config.per_device_batch_size * n if config.per_device_batch_size else config.batch_size
    parallel.check_divisible(batch, mesh)
    if batch % (config.grad_accum_steps * n):
        raise ValueError(f"batch_size={batch} must divide into grad_accum_steps={config.grad_accum_steps}"
                         f" micro-batches of a multiple of {n} devices; change one of them")
    return batch


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` hands back: the trained model and what it needs to sample."""
    model: CharLSTM
    vocab: data.Vocab
    step: int
    metrics: dict
    preempted: bool = False
    preempted_by: Optional[str] = None   # 'SIGTERM' | 'SIGINT'


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (then save and exit)."""

    def __init__(self):
        self.received: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _to_jsonable(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       new_run: bool = False, progress: bool = True) -> TrainResult:
    """Trains (resuming from the workdir's latest checkpoint if any) and returns the model.

    Process 0 writes config.json, vocab.json, metrics.jsonl and samples.txt; every process takes
    part in checkpoint saves.
    """
    from lstm_jax import sample  # late import: sampling is optional for training
    from tqdm.auto import tqdm

    config_lib.validate(config)
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if new_run and (workdir / "config.json").exists() and is_main:
        aside = _move_aside(workdir)
        print(f"--new_run: moved the previous run to {aside}")
    saved_config = _read_json(workdir / "config.json")
    saved_vocab = data.Vocab.load(workdir / "vocab.json") if (workdir / "vocab.json").exists() else None
    if saved_config is not None:
        # Compare against the vocab this config's corpus would build, so a changed corpus is named.
        fresh = load_corpus(config)
        ckpt.check_compatible(saved_config, _to_jsonable(config), list(saved_vocab.chars) if saved_vocab else [],
                              list(fresh.vocab.chars), str(workdir))
        corpus = fresh
    else:
        corpus = load_corpus(config)
    vocab = corpus.vocab

    n_dev = config.parallel.num_devices
    mesh = parallel.make_mesh(parallel.first_devices(n_dev) if n_dev else None)
    batch = global_batch_size(config, mesh)
    batcher = data.make_batcher(config, corpus.train_tokens, batch)
    steps_per_epoch = batcher.steps_per_epoch
    horizon = steps_per_epoch * config.num_epochs
    total_steps = min(horizon, config.max_steps) if config.max_steps else horizon
    if is_main:
        print(f"{mesh.devices.size} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
              f"process(es), batch {batch}, {steps_per_epoch} steps/epoch, {total_steps} steps")

    workdir.mkdir(parents=True, exist_ok=True)   # only now: bad input above writes nothing
    mcfg = model_config(config, len(vocab))
    tx = make_optimizer(config, horizon)
    graphdef, state = init_state(config, mcfg, tx, mesh)
    checkpointer = ckpt.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                     keep_best=config.checkpoint.keep_best)
    if checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        if is_main:
            print(f"resuming {workdir} from step {int(state.step)} (epoch {meta['epoch']})")
    if is_main:
        data.atomic_write_text(workdir / "config.json", json.dumps(_to_jsonable(config), indent=2))
        vocab.save(workdir / "vocab.json")

    windows = data.eval_windows(corpus.val_tokens, config.eval_window, config.eval_stride,
                                config.eval_max_windows) if len(corpus.val_tokens) else None
    eval_step = make_eval_step(graphdef)
    base_key = jax.random.key(config.seed)
    pmap = config.parallel.mode == "pmap"
    if pmap:
        pmap_devices = list(mesh.devices.flat)   # every process's devices: pmap wants the same list everywhere
        n_local = sum(d.process_index == jax.process_index() for d in pmap_devices)
        step_fn = make_pmap_train_step(graphdef, tx, config, devices=pmap_devices)
        state = parallel.replicate_for_pmap(jax.device_get(state), pmap_devices)
    else:
        step_fn = make_train_step(graphdef, tx, config)
    rows = parallel.process_rows(batch)

    def place(batch_rows: np.ndarray):
        if pmap:
            return batch_rows.reshape((n_local, -1) + batch_rows.shape[1:])
        return parallel.to_global(batch_rows, mesh)

    def host_state():
        if not pmap:
            return state
        # device 0's copy as one array replicated over the mesh (what Orbax and eval_step take;
        # pmap's outputs are host-local, which Orbax refuses to save in a multi-process run)
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            parallel.replicated(mesh), np.asarray(x[0])), state)

    def metadata(step: int) -> dict:
        return {"config": _to_jsonable(config), "vocab": list(vocab.chars), "step": step,
                "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                "steps_per_epoch": steps_per_epoch, "corpus_fingerprint": corpus.fingerprint,
                "num_devices": int(mesh.devices.size), "jax_version": jax.__version__,
                "lstm_jax_version": _version()}

    def barrier() -> None:
        """Waits for in-flight train steps before another program runs. XLA:CPU deadlocks when two
        different multi-device programs with collectives are in flight at once (reproduced on 2 CPU
        devices: a train step and an eval step, each with an all-reduce); GPUs/TPUs order them."""
        jax.block_until_ready(state)

    def evaluate() -> dict:
        if windows is None:
            return {}
        barrier()
        n_dev = mesh.devices.size
        eval_rows = max(n_dev, (batch // n_dev) * n_dev)
        padded, weight = data.pad_rows(windows, eval_rows)
        params = host_state().params
        rows = parallel.process_rows(eval_rows)
        parts = [eval_step(params, parallel.to_global(padded[i:i + eval_rows][rows], mesh))
                 for i in range(0, len(padded), eval_rows)]
        loss_sum = np.concatenate([np.asarray(jax.device_get(_gather(p[0]))) for p in parts])
        last = np.concatenate([np.asarray(jax.device_get(_gather(p[1]))) for p in parts])
        val_loss = float((loss_sum * weight).sum() / (weight.sum() * config.eval_window))
        val_last = float((last * weight).sum() / weight.sum())
        return {"val_loss": val_loss, "val_bpc": val_loss / LN2, "val_last_loss": val_last}

    log = _MetricsLog(workdir / "metrics.jsonl", is_main)
    start_step = int(jax.device_get(host_state().step))
    chars_per_step = batch * config.seq_len
    targets_per_step = batch * (1 if config.objective == "window" else config.seq_len)
    t_start = time.perf_counter()
    pending: list[tuple[int, Any]] = []   # (step, device metrics) not yet fetched
    epoch_sums: dict[int, float] = {}     # epoch -> sum of its step losses (this session's steps)
    window_t, window_steps = time.perf_counter(), 0
    last_logged: dict = {}
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and is_main),
               unit="step", dynamic_ncols=True)

    def flush(upto_all: bool) -> None:
        """Fetches metrics of finished steps (all but the newest unless `upto_all`) and logs them."""
        nonlocal pending, window_t, window_steps, last_logged
        ready, pending = (pending, []) if upto_all else (pending[:-1], pending[-1:])
        if not ready:
            return
        # pmap metrics carry a leading device axis (all equal after pmean): take entry 0
        fetched = [jax.tree.map(lambda x: np.ravel(x)[0], m) for m in jax.device_get([m for _, m in ready])]
        losses = np.array([float(m["loss"]) for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = ready[int(np.argmin(np.isfinite(losses)))][0]
            raise TrainingError(
                f"the training loss became {losses[~np.isfinite(losses)][0]} at step {bad + 1}; the "
                f"last saved checkpoint is intact. Lower optimizer.learning_rate or enable gradient "
                f"clipping (--config.optimizer.clip_norm=5).")
        for (s, _), loss in zip(ready, losses):   # Keras-style mean training loss per epoch
            epoch_sums[s // steps_per_epoch] = epoch_sums.get(s // steps_per_epoch, 0.0) + loss
        now = time.perf_counter()
        step = ready[-1][0] + 1
        elapsed = now - window_t
        last_logged = {"step": step, "epoch": step / steps_per_epoch,
                       "elapsed_s": round(now - t_start, 3), "train_loss": float(losses.mean()),
                       "train_bpc": float(losses.mean() / LN2),
                       "grad_norm": float(fetched[-1]["grad_norm"]),
                       "chars_per_s": round(window_steps * chars_per_step / max(elapsed, 1e-9), 1),
                       "targets_per_s": round(window_steps * targets_per_step / max(elapsed, 1e-9), 1)}
        window_t, window_steps = now, 0
        log.write(last_logged)
        bar.set_postfix(loss=f"{last_logged['train_loss']:.4f}",
                        chars_s=f"{last_logged['chars_per_s']:,.0f}")

    def save(step: int, val_loss: Optional[float] = None) -> None:
        flush(upto_all=True)   # never checkpoint a state whose loss was not checked
        barrier()
        if checkpointer.latest_step() != step:
            checkpointer.save(step, host_state(), metadata(step), val_loss)

    def write_samples(step: int) -> None:
        barrier()
        rng = np.random.default_rng([config.seed, step])
        prime = config.sample.prime
        if not prime and windows is not None:   # the seed: a random window of the text as prime
            prime = vocab.decode(windows[rng.integers(len(windows)), :config.eval_window])
        model = nnx.merge(graphdef, jax.device_get(host_state().params))
        temps = list(config.sample.temperatures)
        out = sample.generate(model, vocab, num_samples=len(temps), length=config.sample.length,
                              temperature=temps, prime=prime or None, seed=config.seed + step)
        if not is_main:
            return
        lines = [f"----- step {step} (epoch {step / steps_per_epoch:.2f}), prime: {prime!r}"]
        for t, text in zip(temps, out.texts):
            lines += [f"----- temperature {t}", prime + text]
        block = "\n".join(lines) + "\n"
        bar.write(block)
        with open(workdir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(block)

    step = start_step
    preempted = None
    if start_step >= total_steps and is_main:
        print(f"{workdir} is already at step {start_step} of {total_steps}: nothing to train "
              f"(raise --config.num_epochs or --config.max_steps to continue)")
    eval_metrics: dict = {}
    with _StopSignal() as stop:
        try:
            while step < total_steps:
                epoch, index = divmod(step, steps_per_epoch)
                end_in_epoch = min(steps_per_epoch, index + (total_steps - step))
                batches = data.prefetch(place(b) for b in
                                        (batcher.batch(epoch, i, rows) for i in range(index, end_in_epoch)))
                for placed in batches:
                    state, metrics = step_fn(state, placed, base_key)
                    pending.append((step, metrics))
                    step += 1
                    window_steps += 1
                    bar.update(1)
                    if len(pending) > config.log_every:
                        flush(upto_all=False)
                    if stop.received is not None:
                        break
                    if config.eval_every and step % config.eval_every == 0 and step < total_steps:
                        eval_metrics = evaluate()
                        log.write({"step": step, "epoch": step / steps_per_epoch,
                                   "elapsed_s": round(time.perf_counter() - t_start, 3), **eval_metrics})
                    epoch_end = epoch * steps_per_epoch + end_in_epoch  # saved below, with val_loss
                    if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0 \
                            and step != epoch_end:
                        save(step)
                if stop.received is not None:
                    preempted = stop.received
                    break
                # end of an epoch (or of the run)
                flush(upto_all=True)
                eval_metrics = evaluate()
                finished = (step - 1) // steps_per_epoch
                epoch_steps = step - max(start_step, finished * steps_per_epoch)
                epoch_loss = ({"epoch_train_loss": epoch_sums[finished] / epoch_steps}
                              if step % steps_per_epoch == 0 and finished in epoch_sums else {})
                log.write({"step": step, "epoch": step / steps_per_epoch,
                           "elapsed_s": round(time.perf_counter() - t_start, 3), **epoch_loss,
                           **eval_metrics})
                if eval_metrics and is_main:
                    bar.write(f"epoch {step / steps_per_epoch:.2f} step {step}: "
                              f"train_loss {last_logged.get('train_loss', float('nan')):.4f} "
                              f"val_loss {eval_metrics['val_loss']:.4f} "
                              f"val_last_loss {eval_metrics['val_last_loss']:.4f} "
                              f"({eval_metrics['val_bpc']:.3f} bpc)")
                save(step, eval_metrics.get("val_loss"))
                every = config.sample.every_epochs
                done_epochs = step // steps_per_epoch
                if step >= total_steps or (every and done_epochs % every == 0 and step % steps_per_epoch == 0):
                    write_samples(step)
            if preempted is not None:
                save(step)
                checkpointer.wait()
                if is_main:
                    bar.write(f"received {signal.Signals(preempted).name}: saved a checkpoint at step "
                              f"{step} in {checkpointer.directory}; run the same command to resume")
        finally:
            bar.close()
            checkpointer.close()
            log.close()
    params = jax.device_get(host_state().params)
    model = nnx.merge(graphdef, params)
    return TrainResult(model=model, vocab=vocab, step=step,
                       metrics={**last_logged, **eval_metrics}, preempted=preempted is not None,
                       preempted_by=signal.Signals(preempted).name if preempted else None)


def _gather(x: jax.Array) -> jax.Array:
    """A (possibly multi-process) sharded array as one fully addressable array."""
    if x.is_fully_addressable:
        return x
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(x, tiled=True)


def restore_model(workdir: str | pathlib.Path, step: Optional[int] = None) -> tuple[CharLSTM, data.Vocab, ml_collections.ConfigDict]:
    """Rebuilds the trained model from a workdir alone (config.json, vocab.json, checkpoint),
    on whatever devices this process has."""
    workdir = pathlib.Path(workdir)
    if not (workdir / "config.json").is_file():
        raise ckpt.CheckpointError(f"{workdir} is not a training workdir (no config.json); train "
                                   f"first: lstm-jax train --workdir {workdir}")
    config = ml_collections.ConfigDict(_read_json(workdir / "config.json"))
    vocab = data.Vocab.load(workdir / "vocab.json")
    checkpointer = ckpt.Checkpointer(workdir, read_only=True)
    try:
        if checkpointer.latest_step() is None:
            raise ckpt.CheckpointError(f"no checkpoint in {workdir}/checkpoints; train first")
        mcfg = model_config(config, len(vocab))
        tx = make_optimizer(config, 1)
        mesh = parallel.make_mesh()
        graphdef, abstract = _abstract_state(config, mcfg, tx, mesh)
        state, _ = checkpointer.restore(abstract, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, jax.device_get(state.params)), vocab, config


def _abstract_state(config, mcfg, tx, mesh):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharLSTM(mcfg, rngs=nnx.Rngs(0))))
    sharding = parallel.replicated(mesh)

    def init():
        params = nnx.state(CharLSTM(mcfg, rngs=nnx.Rngs(0)), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    shapes = jax.eval_shape(init)
    return graphdef, jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


class _MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (process 0 only)."""

    def __init__(self, path: pathlib.Path, enabled: bool):
        self._f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self._f:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


def _read_json(path: pathlib.Path) -> Optional[dict]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _move_aside(workdir: pathlib.Path) -> pathlib.Path:
    i = 1
    while (aside := workdir.with_name(f"{workdir.name}.prev{i}")).exists():
        i += 1
    shutil.move(str(workdir), str(aside))
    return aside


@functools.cache
def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lstm_jax")
    except Exception:   # not pip-installed (a source checkout on PYTHONPATH)
        from lstm_jax import __version__
        return __version__

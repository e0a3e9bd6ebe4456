"""Pure train/eval steps, the optimizer and its learning-rate schedule, and the train state
(flax's examples call this module train.py; the loop that drives it is `lstm_jax.train`).

The NNX model is split once (`nnx.split`) into a static graphdef and a params pytree; the hot paths
are plain functions of pytrees. `train_step` is one pure function; a placement
(`parallel.MeshPlacement`: jit over a mesh, or `parallel.PmapPlacement`) wraps it, so the two
differ only in how arrays are placed and how the step is wrapped.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct

from lstm_jax import parallel
from lstm_jax.model import CharLSTM, ModelConfig


@struct.dataclass
class TrainState:
    """Everything that changes during training. The step's RNG is fold_in(seed key, step), so the
    step counter is the whole RNG state and the data position is (step // steps_per_epoch, rest).
    `carry` is the LSTM state (h, c) per layer of every stream, (batch, hidden) arrays sharded like
    the batch, for the stream objective (None otherwise): checkpoints and resumes include it."""
    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    carry: Any = None


def state_to_tree(state: TrainState) -> dict:
    """The state as saved: {step, params, opt_state} plus `carry` for the stream objective (the
    format of checkpoints written before the carry existed, so those still restore)."""
    tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state}
    return tree if state.carry is None else {**tree, "carry": state.carry}


def state_from_tree(tree: dict) -> TrainState:
    return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"],
                      carry=tree.get("carry"))


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss); the message says what to change."""


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    m = config.model
    return ModelConfig(vocab_size=vocab_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
                       dropout=m.dropout, keras_init=m.keras_init,
                       embed_scale=m.embed_scale, dtype=m.dtype,
                       param_dtype=m.param_dtype, backward=m.backward)


def lr_segments(config: ml_collections.ConfigDict, total_steps: int) -> list[dict]:
    """The learning-rate schedule of a fresh run as JSON-able pieces (saved in checkpoints).

    Each piece takes over at step `begin` and follows its own curve from `lr0` at `start` to `lr1`
    at `end` (`linear` or `cosine`), holding `lr1` after `end`: an optional linear warm-up, then
    constant or a cosine decay to `final_lr_fraction * learning_rate` at `total_steps`.
    """
    o = config.optimizer
    lr, warmup = o.learning_rate, min(o.warmup_steps, total_steps)
    pieces = [_piece(0, 0, warmup, 0.0, lr, "linear")] if warmup else []
    if o.schedule == "cosine":
        pieces.append(_piece(warmup, warmup, max(total_steps, warmup + 1), lr,
                             lr * o.final_lr_fraction, "cosine"))
    else:
        pieces.append(_piece(warmup, warmup, warmup, lr, lr, "linear"))
    return pieces


def continue_lr_segments(pieces: list[dict], config: ml_collections.ConfigDict, step: int,
                         total_steps: int) -> tuple[list[dict], str]:
    """The schedule of a run resumed at `step` with a new length `total_steps`, continuous at
    `step`, and a sentence saying what it does. A cosine run decays from its current rate to the
    same final rate at the new end (a run that had finished holds its final rate: a constant tail);
    a constant schedule does not depend on the length."""
    horizon = max(p["end"] for p in pieces)
    if config.optimizer.schedule != "cosine" or total_steps == horizon or total_steps <= step:
        return pieces, ""
    final = config.optimizer.learning_rate * config.optimizer.final_lr_fraction
    if step <= min(config.optimizer.warmup_steps, horizon):   # still warming up: same warm-up
        return lr_segments(config, total_steps), (
            f"the warm-up continues, then the cosine decays to {final:.3g} at step {total_steps}")
    now = lr_at(pieces, step)
    pieces = pieces + [_piece(step, step, total_steps, now, final, "cosine")]
    how = ("stays at its final value" if math.isclose(now, final, rel_tol=1e-6)
           else f"decays from {now:.3g} to {final:.3g} by step {total_steps}")
    return pieces, f"the learning rate continues from step {step} and {how}"


def _piece(begin, start, end, lr0, lr1, shape) -> dict:
    return {"begin": int(begin), "start": int(start), "end": int(end), "lr0": float(lr0),
            "lr1": float(lr1), "shape": shape}


def _piece_value(p: dict, t, xp):
    frac = xp.clip((t - p["start"]) / max(p["end"] - p["start"], 1), 0.0, 1.0)
    if p["shape"] == "cosine":
        return p["lr1"] + (p["lr0"] - p["lr1"]) * 0.5 * (1.0 + xp.cos(math.pi * frac))
    return p["lr0"] + (p["lr1"] - p["lr0"]) * frac


def lr_at(pieces: list[dict], step: int) -> float:
    """The learning rate of update `step` (host side, for logs and messages)."""
    piece = [p for p in pieces if p["begin"] <= step][-1]
    return float(_piece_value(piece, float(step), np))


def lr_schedule(pieces: list[dict]) -> optax.Schedule:
    """`lr_at` as a traced optax schedule (the last piece that has begun gives the value)."""
    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        value = _piece_value(pieces[0], t, jnp)
        for p in pieces[1:]:
            value = jnp.where(t >= p["begin"], _piece_value(p, t, jnp), value)
        return value
    return schedule


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                   pieces: Optional[list[dict]] = None) -> optax.GradientTransformation:
    """Keras-identical RMSprop (rho 0.9, eps inside the sqrt, zero initial velocity) or optax's
    Adam/AdamW, optional global-norm clipping before it, and the learning rate of `pieces`
    (default: a fresh run of `total_steps`). The rate is always a schedule, so the optimizer
    state has one structure whatever the schedule (constant, cosine, continued)."""
    o = config.optimizer
    lr = lr_schedule(pieces or lr_segments(config, total_steps))
    if o.name == "adamw":
        update = optax.adamw(lr, weight_decay=o.weight_decay)
    else:
        update = (optax.adam(lr) if o.name == "adam" else
                  optax.rmsprop(lr, decay=o.decay, eps=o.eps, eps_in_sqrt=True, initial_scale=0.0))
        if o.weight_decay:
            update = optax.chain(optax.add_decayed_weights(o.weight_decay), update)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), update) if o.clip_norm > 0 else update


# --- the pure step functions -----------------------------------------------------------------

def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch_BxL1: jax.Array, dropout_key,
            objective: str, carry=None):
    """(mean next-char cross-entropy in nats, final LSTM carry): the char after each window
    (window), or every position from `carry` (zero when None). The carry is a constant here: no
    gradient flows into the previous step (truncated BPTT)."""
    model = nnx.merge(graphdef, params)
    inputs = batch_BxL1[:, :-1]
    if objective == "window":
        logits = model(inputs, dropout_key=dropout_key, last_only=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxL1[:, -1]).mean(), None
    carry = None if carry is None else jax.lax.stop_gradient(carry)
    logits, new_carry = model(inputs, carry, dropout_key=dropout_key, return_carry=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch_BxL1[:, 1:]).mean()
    return loss, (new_carry if objective == "stream" else None)


def loss_and_grads(params, graphdef, batch_BxL1, key, *, objective: str, accum_steps: int,
                   carry=None):
    """(loss, gradients, final carry), averaged over `accum_steps` micro-batches of the batch.

    Micro-batch k = rows k, k + K, k + 2K, ...: (B, L) -> (B/K, K, L) splits the batch axis
    minor-to-major, so with the rows sharded over devices every device keeps its own B/(n*K)
    rows of every micro-batch (a (K, B/K) split would cut across the device shards and make XLA
    all-gather the batch inside the accumulation loop). Micro-batches split the streams, not
    time, so every stream's carry continues through its own micro-batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, new_carry), grads = grad_fn(params, graphdef, batch_BxL1, key, objective, carry)
        return loss, grads, new_carry
    split = lambda x: jnp.swapaxes(x.reshape((-1, accum_steps) + x.shape[1:]), 0, 1)  # noqa: E731
    merge = lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])              # noqa: E731

    def body(sums, inputs):
        loss_sum, grad_sum = sums
        i, mb, mb_carry = inputs
        (loss, new_carry), grads = grad_fn(params, graphdef, mb, jax.random.fold_in(key, i),
                                           objective, mb_carry)
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), new_carry

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro_carry = None if carry is None else jax.tree.map(split, carry)
    (loss, grads), new_carry = jax.lax.scan(
        body, (0.0, zeros), (jnp.arange(accum_steps), split(batch_BxL1), micro_carry))
    new_carry = None if new_carry is None else jax.tree.map(merge, new_carry)
    return loss / accum_steps, jax.tree.map(lambda g: g / accum_steps, grads), new_carry


def apply_update(state: TrainState, grads, tx: optax.GradientTransformation, carry=None) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      opt_state=opt_state, carry=carry)


def _step_carry(state: TrainState, steps_per_epoch: Optional[int]):
    """The carry a step starts from: the state's, zeroed at the first step of every epoch."""
    if state.carry is None:
        return None
    if not steps_per_epoch:
        raise ValueError("the stream objective needs steps_per_epoch to reset its carry each epoch")
    fresh = state.step % steps_per_epoch == 0
    return jax.tree.map(lambda c: jnp.where(fresh, jnp.zeros_like(c), c), state.carry)


def train_step(state: TrainState, batch_BxL1: jax.Array, key: jax.Array, *, graphdef, tx,
               objective: str, accum_steps: int, steps_per_epoch: Optional[int] = None,
               axis_name: Optional[str] = None, carry_sharding=None):
    """`(state, batch, key) -> (state, metrics)`, pure: a placement jits or pmaps it.

    `key` is the run's base key; the step's key is fold_in(key, state.step) (and the device index
    under pmap's `axis_name`, whose gradients and loss are averaged with `pmean`). The stream
    objective carries the LSTM state to the next step and resets it every `steps_per_epoch`
    steps; `carry_sharding` keeps it sharded like the batch (else XLA may return it replicated:
    a recompile, and an all-gather per step).
    """
    step_key = jax.random.fold_in(key, state.step)
    if axis_name is not None:
        step_key = jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))
    loss, grads, carry = loss_and_grads(
        state.params, graphdef, batch_BxL1, step_key, objective=objective,
        accum_steps=accum_steps, carry=_step_carry(state, steps_per_epoch))
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
    if carry is not None and carry_sharding is not None:
        carry = jax.lax.with_sharding_constraint(carry, carry_sharding)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return apply_update(state, grads, tx, carry), metrics


def step_function(graphdef, tx, config, steps_per_epoch: Optional[int] = None) -> Callable:
    """`train_step` bound to a model, an optimizer and the config's objective: what
    `placement.compile` takes."""
    return functools.partial(train_step, graphdef=graphdef, tx=tx, objective=config.objective,
                             accum_steps=config.grad_accum_steps, steps_per_epoch=steps_per_epoch)


def make_train_step(graphdef, tx, config, steps_per_epoch: Optional[int] = None,
                    mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
    """`train_step(state, batch, key) -> (state, metrics)`, jitted, state donated.

    On a mesh, pass a replicated state (its carry sharded like the batch) and a batch sharded over
    'data'; XLA inserts the gradient all-reduce. Give the `mesh` so the stream objective's carry
    stays sharded like the batch and the native CPU recurrence runs on each device's rows (without
    it XLA gathers the batch for the kernel call: the same numbers, each device doing all rows).
    """
    return parallel.jit_step(step_function(graphdef, tx, config, steps_per_epoch), mesh)


def make_pmap_train_step(graphdef, tx, config, devices: Optional[list] = None,
                         steps_per_epoch: Optional[int] = None) -> Callable:
    """The same step under `jax.pmap`: state with a leading device axis (params replicated, the
    carry holding each device's rows), batch (devices, rows, L + 1), gradients and loss averaged
    with `pmean`."""
    return parallel.pmap_step(step_function(graphdef, tx, config, steps_per_epoch), devices)


def make_eval_step(graphdef, mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
    """`eval_step(params, windows_BxL1) -> (loss_sum_B, last_loss_B)`: per-row sums of the
    next-char loss over every position (val_loss) and the loss on the char after the window
    (val_last_loss, the Keras reference's loss). Rows stay sharded and the host reduces them: the
    program has no collectives, so any number of eval steps may be in flight (XLA:CPU can
    deadlock when several multi-device programs with collectives are queued at once); give the
    `mesh` the rows are sharded over, so the native recurrence runs on each device's rows."""
    def eval_step(params, windows_BxL1):
        model = nnx.merge(graphdef, params)
        logits = model(windows_BxL1[:, :-1])
        losses_BxT = optax.softmax_cross_entropy_with_integer_labels(logits, windows_BxL1[:, 1:])
        return losses_BxT.sum(axis=1), losses_BxT[:, -1]
    return jax.jit(parallel.traced_on(eval_step, mesh))


def make_text_eval_step(graphdef, mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
    """`text_eval_step(params, chunk_SxL1, weight_SxL, carry) -> (loss_sum_S, carry)`: one chunk
    of S long text streams, continuing each from `carry` (whole-text evaluation with the state
    carried). Per-row sums, no collectives (as `make_eval_step`)."""
    def text_eval_step(params, chunk_SxL1, weight_SxL, carry):
        model = nnx.merge(graphdef, params)
        logits, carry = model(chunk_SxL1[:, :-1], carry, return_carry=True)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, chunk_SxL1[:, 1:])
        return (losses * weight_SxL).sum(axis=1), carry
    return jax.jit(parallel.traced_on(text_eval_step, mesh), donate_argnums=3)


# --- the train state, built in place ----------------------------------------------------------

def _state_shardings(config, model_cfg: ModelConfig, tx, mesh, batch: int):
    """The train state's shapes and placement: replicated, but a stream carry sharded like the
    batch (each device holds its own streams' (h, c))."""
    def init():
        params = nnx.state(CharLSTM(model_cfg, rngs=nnx.Rngs(0)), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          carry=_zero_carry(config, model_cfg, batch))
    shapes = jax.eval_shape(init)
    # On one device both are the same layout, and the step returns the carry as P(): start there
    # so the state is a fixed point of the step (else it compiles twice).
    rep = parallel.replicated(mesh)
    rows = parallel.data_sharded(mesh) if mesh.devices.size > 1 else rep
    shardings = TrainState(step=rep, params=jax.tree.map(lambda _: rep, shapes.params),
                           opt_state=jax.tree.map(lambda _: rep, shapes.opt_state),
                           carry=jax.tree.map(lambda _: rows, shapes.carry))
    return shapes, shardings


def _zero_carry(config, model_cfg: ModelConfig, batch: int):
    if config.objective != "stream":
        return None
    zeros = jnp.zeros((batch, model_cfg.hidden_size), jnp.float32)
    return tuple((zeros, zeros) for _ in range(model_cfg.num_layers))


def init_state(config, model_cfg: ModelConfig, tx, mesh, batch: Optional[int] = None
               ) -> tuple[nnx.GraphDef, TrainState]:
    """(graphdef, a fresh state) on `mesh` for a global `batch` (default: the config's); see
    `init_like`."""
    graphdef, abstract = abstract_state(config, model_cfg, tx, mesh, batch=batch)
    return graphdef, init_like(config, model_cfg, tx, abstract)


def init_like(config, model_cfg: ModelConfig, tx, abstract: TrainState) -> TrainState:
    """A fresh state with `abstract`'s shapes, built directly in its shardings (replicated; a
    stream carry sharded over 'data'): nothing lands on device 0 first."""
    carry_rows = None if abstract.carry is None else abstract.carry[0][0].shape[0]

    def init():
        params = nnx.state(CharLSTM(model_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          carry=_zero_carry(config, model_cfg, carry_rows))
    return jax.jit(init, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()


def global_batch_size(config, mesh) -> int:
    """The global batch (all devices, all processes), checked against the mesh and the
    micro-batches; the run's plan computes it once (`train.Plan.batch`)."""
    n = mesh.devices.size
    batch = config.per_device_batch_size * n if config.per_device_batch_size else config.batch_size
    parallel.check_divisible(batch, mesh)
    if batch % (config.grad_accum_steps * n):
        raise ValueError(f"batch_size={batch} must divide into grad_accum_steps={config.grad_accum_steps}"
                         f" micro-batches of a multiple of {n} devices; change one of them")
    return batch


def abstract_state(config, model_cfg: ModelConfig, tx, mesh, *, batch: Optional[int] = None,
                   replicate_all: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """The graphdef and the train state's shapes, dtypes and shardings (for restores). `batch`
    (the run's global batch, default: the config's) sizes a stream carry; `replicate_all` places
    it replicated too, for a process that only samples and whose device count need not divide
    the batch."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharLSTM(model_cfg, rngs=nnx.Rngs(0))))
    batch = global_batch_size(config, mesh) if batch is None else batch
    shapes, shardings = _state_shardings(config, model_cfg, tx, mesh, batch)
    if replicate_all:
        shardings = jax.tree.map(lambda _: parallel.replicated(mesh), shardings)
    return graphdef, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                  shapes, shardings)

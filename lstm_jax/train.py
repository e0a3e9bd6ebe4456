"""The training loop: `train_and_evaluate(config, workdir)`.

A run, top to bottom: plan it (every input is checked, every derived value computed once, nothing
written), claim the workdir (one writer), resume or start (the resume contract:
workdir.resume_differences), then one loop over steps. The loop's periodic work (logging,
evaluation, checkpoints, samples) is a small named piece each (`lstm_jax.periodic`), timed apart
from the step rate. The pure step is `steps.train_step`; the placement (`parallel.placement`: a
mesh, or pmap) wraps it and places the arrays. Only process 0 writes files; every process saves
checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lstm_jax import checkpoint as ckpt
from lstm_jax import config as config_lib
from lstm_jax import data, evaluate, flops, parallel, periodic, recipe, recurrence, steps
from lstm_jax import workdir as workdir_lib
from lstm_jax.model import CharLSTM, ModelConfig
from lstm_jax.periodic import say


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` hands back: the trained model and what it needs to sample."""
    model: CharLSTM
    vocab: data.Vocab
    step: int
    metrics: dict
    preempted: bool = False
    preempted_by: Optional[str] = None   # 'SIGTERM' | 'SIGINT'


@dataclasses.dataclass
class Plan:
    """A run as configured, before anything is written: building it checks every input, and it
    holds every value derived from the config, so nothing downstream derives them again."""
    config: ml_collections.ConfigDict
    corpus: data.Corpus
    mesh: jax.sharding.Mesh
    batch: int                      # global batch (all devices, all processes)
    per_device_batch: int           # rows of it on each device
    batcher: data.Batcher
    total_steps: int                # the configured length (a time budget may shorten it)
    windows: Optional[np.ndarray]   # held-out (N, eval_window + 1) windows; None without a val split
    model_cfg: ModelConfig
    tx: optax.GradientTransformation   # the optimizer of a fresh run of total_steps
    graphdef: nnx.GraphDef
    abstract_state: steps.TrainState   # shapes, dtypes and shardings (what a restore fills)

    @property
    def vocab(self) -> data.Vocab:
        return self.corpus.vocab

    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.steps_per_epoch

    def optimizer(self, lr_pieces: list) -> optax.GradientTransformation:
        """The optimizer with the learning rate of `lr_pieces` (a resumed or budgeted run's
        schedule; the state's structure is `tx`'s)."""
        return steps.make_optimizer(self.config, self.total_steps, lr_pieces)

    def description(self) -> dict:
        """What the resume contract compares (saved in every checkpoint's metadata)."""
        return {"config": _to_json(self.config), "vocab": list(self.vocab.chars),
                "global_batch": self.batch, "corpus_fingerprint": self.corpus.fingerprint}


def plan_run(config: ml_collections.ConfigDict, corpus: Optional[data.Corpus] = None) -> Plan:
    if recipe.is_auto(config):
        raise ValueError("model.hidden_size=0, model.num_layers=0, model.dropout=-1 or "
                         "model.dtype='auto' are the recipe's to choose: pass the config "
                         "through recipe.apply first")
    corpus = corpus if corpus is not None else data.load_corpus(config)
    n_dev = config.parallel.num_devices
    mesh = parallel.make_mesh(parallel.first_devices(n_dev) if n_dev else None)
    batch = steps.global_batch_size(config, mesh)
    batcher = data.make_batcher(config, corpus.train_tokens, batch)
    epochs_steps = batcher.steps_per_epoch * config.num_epochs
    total = min(epochs_steps, config.max_steps) if config.max_steps else epochs_steps
    windows = (data.eval_windows(corpus.val_tokens, config.eval_window, config.eval_stride,
                                 config.eval_max_windows) if len(corpus.val_tokens) else None)
    model_cfg = steps.model_config(config, len(corpus.vocab))
    if model_cfg.backward == "cudnn":   # GPU-only, one device or pmap: a clear refusal elsewhere
        from lstm_jax import cudnn
        cudnn.check_supported(model_cfg, jax.default_backend(), num_devices=mesh.devices.size,
                              parallel_mode=config.parallel.mode)
    if model_cfg.backward == "native":   # asked for by name: refused in one line where it cannot run
        from lstm_jax import native
        try:
            if jax.default_backend() != "cpu":
                raise native.NativeUnavailable(f"it runs on the CPU, and JAX runs on "
                                               f"{jax.default_backend()}")
            native.check_supported(model_cfg.hidden_size, model_cfg.dtype)
        except native.NativeUnavailable as e:
            raise ValueError(f"model.backward='native' cannot run here: {e}; use "
                             f"model.backward='auto' (the scan where native cannot run)") from None
    tx = steps.make_optimizer(config, total)
    graphdef, abstract = steps.abstract_state(config, model_cfg, tx, mesh, batch=batch)
    return Plan(config, corpus, mesh, batch, batch // mesh.devices.size, batcher, total, windows,
                model_cfg, tx, graphdef, abstract)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       new_run: bool = False, progress: bool = True,
                       step: Optional[int] = None,
                       corpus: Optional[data.Corpus] = None) -> TrainResult:
    """Trains, resuming from the workdir's newest readable checkpoint (or `step`), and returns the
    model. Config and data errors are raised before the workdir is touched; a workdir held by
    another trainer or holding a run with other settings raises workdir.WorkdirError; a
    diverging run raises TrainingError with the last good checkpoint kept as the latest.
    `corpus`: `data.load_corpus(config)` if already loaded (the CLI loads it before JAX starts,
    so the CPU device rule can see the vocabulary size)."""
    config_lib.validate(config)
    corpus = corpus if corpus is not None else data.load_corpus(config)
    config, chosen = recipe.apply(config, corpus, workdir, new_run)
    if chosen:
        say(chosen)
    plan = plan_run(config, corpus)
    workdir = pathlib.Path(workdir)
    with _claimed(workdir, new_run):
        checkpointer = ckpt.Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         keep_best=config.checkpoint.keep_best,
                                         best_metric=config.checkpoint.best_metric)
        try:
            start = _resume_or_start(plan, workdir, checkpointer, step)
            return _fit(plan, workdir, checkpointer, start, progress)
        finally:
            checkpointer.close()


# --- claiming the workdir and resuming ------------------------------------------------------------

@contextlib.contextmanager
def _claimed(workdir: pathlib.Path, new_run: bool) -> Iterator[None]:
    """Process 0 creates the workdir and takes its lock (after moving an old run aside for
    --new_run, under that run's lock); the other processes wait for it and stop if it failed."""
    lock, error = None, None
    if parallel.is_main_process():
        try:
            if new_run and ((workdir / "config.json").exists() or (workdir / ckpt.CHECKPOINT_DIR).exists()):
                workdir_lib.WorkdirLock(workdir).acquire()   # never move a run that is training
                aside = workdir_lib.move_aside(workdir)
                (aside / workdir_lib.LOCK).unlink(missing_ok=True)
                print(f"--new_run: moved the previous run to {aside}")
            workdir.mkdir(parents=True, exist_ok=True)
            lock = workdir_lib.WorkdirLock(workdir).acquire()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the processes agree
            error = e
    if parallel.max_over_processes(int(error is not None)):
        if error is not None:
            raise error
        raise workdir_lib.WorkdirError(f"process 0 could not claim {workdir}; see its output")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Start:
    """Where this session starts: the state, and what a resume restores besides it."""
    state: steps.TrainState
    step: int
    lr_pieces: list
    elapsed_s: float = 0.0
    epoch_loss: Optional[dict] = None    # {"epoch", "sum", "steps"} of the epoch in progress
    best: Optional[dict] = None          # {"step", "value", "evals_since"} of the best metric
    side_s: float = 0.0                  # eval/checkpoint/sample time of earlier sessions
    total_steps: int = 0                 # the run's length (the plan's, or fixed by the time budget)
    budget_fixed: bool = False           # time_budget_s already fixed the length (saved)
    eval_subset_chars: Optional[int] = None   # ... and sized the periodic evaluations' subset


def _resume_or_start(plan: Plan, workdir: pathlib.Path, checkpointer: ckpt.Checkpointer,
                     step: Optional[int]) -> _Start:
    """Restores the newest readable checkpoint whose run matches this one (or `step`), else
    starts afresh; refuses (naming each field) a workdir whose run has other settings. Then
    writes config.json and vocab.json."""
    config, described = plan.config, plan.description()

    def check(saved: dict) -> None:
        diffs = workdir_lib.resume_differences(saved, described)
        if diffs:
            raise workdir_lib.refuse_resume(workdir, diffs)

    start = None
    if checkpointer.all_steps() or step is not None:
        at, tree, meta, unreadable = checkpointer.restore_readable(
            steps.state_to_tree(plan.abstract_state), step, check)
        state = steps.state_from_tree(tree)
        if parallel.is_main_process():
            _set_aside(checkpointer, unreadable, [s for s in checkpointer.all_steps()
                                                  if s > at and s not in unreadable])
        parallel.barrier("lstm_jax: checkpoints set aside")
        pieces = meta.get("lr_pieces") or steps.lr_segments(config, meta.get("total_steps", plan.total_steps))
        budget_fixed = bool(config.time_budget_s) and meta.get("budget_fixed_for") == config.time_budget_s
        total = min(meta["total_steps"], plan.total_steps) if budget_fixed else plan.total_steps
        pieces, how = steps.continue_lr_segments(pieces, config, at, total)
        say(f"resuming {workdir} from step {at} (epoch {at / plan.steps_per_epoch:.2f})"
             + (f"; {meta.get('total_steps')} -> {total} steps: {how}" if how else ""))
        start = _Start(state, at, pieces, meta.get("elapsed_s", 0.0), meta.get("epoch_loss"),
                       meta.get("best"), meta.get("side_s", 0.0), total, budget_fixed,
                       meta.get("eval_subset_chars") if budget_fixed else None)
    else:
        saved = workdir_lib.read_json(workdir / "config.json")
        if saved is not None:   # a run stopped before its first checkpoint: same contract
            vocab = workdir_lib.read_json(workdir / "vocab.json") or {}
            check({"config": saved, "vocab": vocab.get("chars", described["vocab"])})
        if parallel.is_main_process() and (aside := workdir_lib.move_record_aside(
                workdir, keep=(ckpt.CHECKPOINT_DIR,))):
            say(f"{workdir} holds a run's record but no checkpoint to resume it from; moved the "
                f"record to {aside} and started afresh")
        state = steps.init_like(config, plan.model_cfg, plan.tx, plan.abstract_state)
        start = _Start(state, 0, steps.lr_segments(config, plan.total_steps),
                       total_steps=plan.total_steps)
    if parallel.is_main_process():
        workdir_lib.write_json(workdir / "config.json", described["config"])
        workdir_lib.keep_other_vocab(workdir / "vocab.json", described["vocab"])
        plan.vocab.save(workdir / "vocab.json")
    return start


def _set_aside(checkpointer: ckpt.Checkpointer, unreadable: list[int], later: list[int]) -> None:
    for moved, into, why in ((unreadable, "unreadable_checkpoints", "unreadable"),
                             (later, "abandoned_checkpoints", "after the step resumed from")):
        for path in checkpointer.move_aside(moved, into):
            say(f"moved checkpoint {path.name} ({why}) to {path}")


# --- the loop -------------------------------------------------------------------------------

def _recurrence_backend(plan: Plan) -> str:
    """What runs each LSTM layer, for the start-up line."""
    cfg, platform = plan.model_cfg, jax.default_backend()
    if cfg.backward == "cudnn":
        return "cuDNN" if platform == "gpu" else "custom scan (cudnn: no GPU)"
    return recurrence.backend_name(cfg.backward, cfg.hidden_size, cfg.dtype, platform,
                                   devices=min(plan.mesh.devices.size, jax.local_device_count()))

def _fit(plan: Plan, workdir: pathlib.Path, checkpointer: ckpt.Checkpointer, start: _Start,
         progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    config, total, pieces = plan.config, start.total_steps, start.lr_pieces
    placement = parallel.placement(config.parallel.mode, plan.mesh, plan.batch)
    compile_step = lambda tx: placement.compile(  # noqa: E731 - again when the budget fixes the length
        steps.step_function(plan.graphdef, tx, config, plan.steps_per_epoch))
    train_step, key = compile_step(plan.optimizer(pieces)), jax.random.key(config.seed)
    state = placement.place_state(start.state)
    peak = flops.mesh_peak(plan.mesh, config.model.dtype)   # CPU: a 0.2 s GEMM, once per process
    say(f"{plan.mesh.devices.size} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
         f"process(es), batch {plan.batch}, {plan.steps_per_epoch} steps/epoch, {total} steps; "
         f"recurrence: {_recurrence_backend(plan)}; "
         f"peak {peak.flops_per_s / 1e9:,.1f} GFLOP/s for mfu ({peak.source})")
    if start.step >= total:
        say(f"{workdir} is already at step {start.step} of {total}: nothing to train (raise "
             f"--config.num_epochs or --config.max_steps to continue: the learning rate carries on "
             f"from where it is)")
    bar = tqdm(total=total, initial=start.step, disable=not (progress and parallel.is_main_process()), unit="step",
               dynamic_ncols=True)
    log = workdir_lib.MetricsLog(workdir, start.step, enabled=parallel.is_main_process())
    meter = periodic.Meter(plan, log, bar, start.step, start.lr_pieces, start.elapsed_s,
                           start.side_s, start.epoch_loss, peak_flops=peak.flops_per_s)
    profiler = periodic.Profiler(config.profile_steps, workdir, start.step)
    evaluator = evaluate.Evaluator(plan, plan.graphdef)   # the whole held-out text
    # a budgeted run's periodic evaluations: a fixed subset, sized when the budget fixes the length
    subset = lambda chars: evaluate.Evaluator(plan, plan.graphdef, chars) if chars else evaluator  # noqa: E731
    periodic_eval = subset(start.eval_subset_chars)
    best_params = None   # (step, a device copy of the params) of the best subset evaluation
    early_stop = periodic.EarlyStop(config.checkpoint.best_metric, config.checkpoint.early_stop_evals,
                            start.best)
    save = periodic.Saver(plan, checkpointer, meter, pieces, early_stop, total, start.budget_fixed,
                          start.eval_subset_chars)
    write_samples = periodic.SampleWriter(plan, workdir, plan.graphdef, bar)
    budget = periodic.Budget(config.time_budget_s, fixed=start.budget_fixed,
                             full_eval_chars=evaluator.chars,
                             eval_every=config.eval_every, steps_per_epoch=plan.steps_per_epoch)
    every = lambda n, k: bool(k) and n % k == 0   # noqa: E731
    done, stop = start.step, periodic.StopRequests(agree_every=config.log_every)
    try:
        with stop:
            spe, rows = plan.steps_per_epoch, placement.rows   # this process's rows of each batch
            batches = data.prefetch(placement.place_batch(plan.batcher.batch(*divmod(s, spe), rows))
                                    for s in range(start.step, plan.total_steps))
            for step in range(start.step, plan.total_steps):   # the budget may end the run sooner
                if step >= total:
                    break
                with profiler.around(step, state, meter):
                    state, metrics = train_step(state, next(batches), key)
                first = step == start.step
                if first:   # it compiles the step: timed apart, kept out of chars_per_s
                    with meter.side_work("compile_s"):
                        jax.block_until_ready(metrics)
                meter.record(step, metrics, counted=not first)
                done = step + 1
                profiler.stop(done, state, meter, bar)
                bar.update(1)   # host-side only: no device sync
                if (length := budget.length(done, meter, state, total)) is not None:
                    total, pieces, how = length, *steps.continue_lr_segments(pieces, config, done, length)
                    with meter.side_work("compile_s"):   # timed: the next fix reserves it
                        train_step = compile_step(plan.optimizer(pieces))
                    save.set_length(total, pieces, budget.subset_chars)
                    meter.lr_pieces, bar.total = pieces, total
                    if budget.rechecked:
                        say(f"time budget {config.time_budget_s:g} s of wall time: {total} steps at "
                            f"the wall-clock rate since ({budget.rate:.1f} steps/s, side work "
                            f"included)" + (f"; {how}" if how else ""), bar)
                    else:
                        periodic_eval = subset(budget.subset_chars)
                        say(f"time budget {config.time_budget_s:g} s of wall time (steps, evaluations, "
                            f"checkpoints, samples): {total} steps ({budget.rate:.1f} steps/s measured, "
                            f"{budget.reserve_s:.1f} s kept for side work); periodic evaluations on "
                            + (f"a fixed {periodic_eval.chars:,}-char subset of the held-out text"
                               if periodic_eval is not evaluator else "the whole held-out text")
                            + f" ({evaluator.chars:,} chars at the end)"
                            + (f"; {how}" if how else ""), bar)
                if stop.requested(done, state):
                    break
                end_of_epoch = done % plan.steps_per_epoch == 0 or done == total
                val: dict = {}
                if end_of_epoch or every(done, config.eval_every):
                    with meter.side_work("eval_s"):
                        val = (evaluator if done == total else periodic_eval)(
                            placement.global_state(state).params)
                    meter.write_eval(done, val, end_of_epoch)
                    early_stop.update(done, val)
                    if periodic_eval is not evaluator and early_stop.best["step"] == done:
                        best_params = (done, jax.tree.map(jnp.copy, placement.global_state(state).params))
                if end_of_epoch or every(done, config.checkpoint.every_steps) or early_stop.stop:
                    with meter.side_work("checkpoint_s"):
                        save(done, placement.global_state(state), val)
                if early_stop.stop:
                    say(early_stop.message(), bar)
                    with meter.side_work("sample_s"):
                        write_samples(done, placement.global_state(state).params)
                    break
                epochs_done, in_epoch = divmod(done, plan.steps_per_epoch)
                if done == total or (in_epoch == 0 and every(epochs_done, config.sample.every_epochs)):
                    with meter.side_work("sample_s"):
                        write_samples(done, placement.global_state(state).params)
            profiler.stop(done, state, meter, bar, final=True)   # the run ended inside the window
            if periodic_eval is not evaluator and not stop.signal and config.checkpoint.keep_best:
                with meter.side_work("eval_s"):   # the kept best was ranked on the subset
                    best = _evaluate_best(plan, checkpointer, evaluator, done, best_params)
                if best:
                    meter.write_extra(done, best)
                    say(f"best checkpoint (step {best['best_step']}) on the whole held-out text: "
                        f"val_loss {best['best_val_loss']:.4f}"
                        + (f", val_text_bpc {best['best_val_text_bpc']:.4f}"
                           if "best_val_text_bpc" in best else ""), bar)
            late = not stop.signal and stop.requested(done, state, final=True)   # in the last samples
            if stop.signal:
                with meter.side_work("checkpoint_s"):
                    save(done, placement.global_state(state))
                checkpointer.wait()
                say(f"received {stop.signal}: saved a checkpoint at step {done} in "
                    f"{checkpointer.directory}; run the same command to resume" if not late else
                    f"received {stop.signal} at the end of the run: it is complete, its checkpoint "
                    f"at step {done} is in {checkpointer.directory}"
                    + ("; its last samples were not written (interrupted; lstm-jax sample "
                       f"--workdir {workdir} draws some)" if write_samples.interrupted_at == done
                       else ""), bar)
            meter.flush()
    except periodic.Diverged as diverged:
        raise periodic.diverged_error(diverged, plan, checkpointer) from None
    finally:
        profiler.abandon()
        bar.close()
        log.close()
    params = jax.device_get(placement.global_state(state).params)
    return TrainResult(model=nnx.merge(plan.graphdef, params), vocab=plan.vocab, step=done,
                       metrics={**meter.last_train, **meter.last_eval},
                       preempted=stop.signal is not None, preempted_by=stop.signal)


def _evaluate_best(plan: Plan, checkpointer: ckpt.Checkpointer, evaluator: evaluate.Evaluator,
                   done: int, held: Optional[tuple]) -> dict:
    """The whole held-out text's metrics of the kept best checkpoint, as best_* (empty when the
    best is the last step, evaluated whole already, or there is none). Its params are `held`
    (step, params) when this session saw it, else restored."""
    checkpointer.wait()
    best = checkpointer.best_step()
    if best is None or best == done:
        return {}
    if held is not None and held[0] == best:
        params = held[1]
    else:
        tree, _ = checkpointer.restore(steps.state_to_tree(plan.abstract_state), best)
        params = steps.state_from_tree(tree).params
    val = evaluator(params)
    return {"best_step": best, **{f"best_{k}": v for k, v in val.items()}}


# --- small helpers ----------------------------------------------------------------------------

def _to_json(config: ml_collections.ConfigDict) -> dict:
    import json
    return json.loads(config.to_json())

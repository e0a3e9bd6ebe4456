"""The training loop `train_and_evaluate(config, workdir)`, and `restore_model(workdir)`.

A run, top to bottom: plan it (every input is checked and nothing is written), claim the workdir
(one writer), resume or start (the resume contract: workdir.resume_differences), then one loop over
steps. The loop's periodic work (logging, evaluation, checkpoints, samples) is a small named piece
each, timed apart from the step rate. Only process 0 writes files; every process saves checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import signal
import time
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
from flax import nnx

from lstm_jax import checkpoint as ckpt
from lstm_jax import config as config_lib
from lstm_jax import data, parallel
from lstm_jax import train as train_lib
from lstm_jax import workdir as workdir_lib
from lstm_jax.model import CharLSTM, ModelConfig

LN2 = math.log(2.0)
# Training diverged when the loss is non-finite, or worse than guessing uniformly (ln V nats/char)
# by DIVERGENCE_MARGIN for DIVERGENCE_STEPS steps in a row (early spikes, e.g. RMSprop's first
# updates from zero velocity, recover within a few steps; a diverged run stays there).
DIVERGENCE_MARGIN = 1.0
DIVERGENCE_STEPS = 20


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
    """A run as configured, before anything is written: building it checks every input."""
    config: ml_collections.ConfigDict
    corpus: train_lib.Corpus
    mesh: jax.sharding.Mesh
    batch: int                      # global batch (all devices, all processes)
    batcher: data.Batcher
    total_steps: int
    windows: Optional[np.ndarray]   # held-out (N, eval_window + 1) windows; None without a val split
    model_cfg: ModelConfig

    @property
    def vocab(self) -> data.Vocab:
        return self.corpus.vocab

    @property
    def steps_per_epoch(self) -> int:
        return self.batcher.steps_per_epoch

    def description(self) -> dict:
        """What the resume contract compares (saved in every checkpoint's metadata)."""
        return {"config": _to_json(self.config), "vocab": list(self.vocab.chars),
                "global_batch": self.batch, "corpus_fingerprint": self.corpus.fingerprint}


def plan_run(config: ml_collections.ConfigDict,
             corpus: Optional[train_lib.Corpus] = None) -> Plan:
    corpus = corpus if corpus is not None else train_lib.load_corpus(config)
    n_dev = config.parallel.num_devices
    mesh = parallel.make_mesh(parallel.first_devices(n_dev) if n_dev else None)
    batch = train_lib.global_batch_size(config, mesh)
    batcher = data.make_batcher(config, corpus.train_tokens, batch)
    epochs_steps = batcher.steps_per_epoch * config.num_epochs
    total = min(epochs_steps, config.max_steps) if config.max_steps else epochs_steps
    windows = (data.eval_windows(corpus.val_tokens, config.eval_window, config.eval_stride,
                                 config.eval_max_windows) if len(corpus.val_tokens) else None)
    model_cfg = train_lib.model_config(config, len(corpus.vocab))
    if model_cfg.backward == "cudnn":   # GPU-only, one device or pmap: a clear refusal elsewhere
        from lstm_jax import cudnn
        cudnn.check_supported(model_cfg, jax.default_backend(), num_devices=mesh.devices.size,
                              parallel_mode=config.parallel.mode)
    return Plan(config, corpus, mesh, batch, batcher, total, windows, model_cfg)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
                       new_run: bool = False, progress: bool = True,
                       step: Optional[int] = None,
                       corpus: Optional[train_lib.Corpus] = None) -> TrainResult:
    """Trains, resuming from the workdir's newest readable checkpoint (or `step`), and returns the
    model. Config and data errors are raised before the workdir is touched; a workdir held by
    another trainer or holding a run with other settings raises workdir.WorkdirError; a
    diverging run raises TrainingError with the last good checkpoint kept as the latest.
    `corpus`: `train.load_corpus(config)` if already loaded (the CLI loads it before JAX starts,
    so the CPU device rule can see the vocabulary size)."""
    config_lib.validate(config)
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

def _is_main() -> bool:
    return jax.process_index() == 0


@contextlib.contextmanager
def _claimed(workdir: pathlib.Path, new_run: bool) -> Iterator[None]:
    """Process 0 creates the workdir and takes its lock (after moving an old run aside for
    --new_run, under that run's lock); the other processes wait for it and stop if it failed."""
    lock, error = None, None
    if _is_main():
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
    graphdef: nnx.GraphDef
    state: train_lib.TrainState
    step: int
    lr_pieces: list
    elapsed_s: float = 0.0
    epoch_loss: Optional[dict] = None    # {"epoch", "sum", "steps"} of the epoch in progress
    best: Optional[dict] = None          # {"step", "value", "evals_since"} of the best metric
    side_s: float = 0.0                  # eval/checkpoint/sample time of earlier sessions
    total_steps: int = 0                 # the run's length (the plan's, or fixed by the time budget)
    budget_fixed: bool = False           # time_budget_s already fixed the length (saved)


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
        tx = train_lib.make_optimizer(config, plan.total_steps)   # the state's structure only
        graphdef, abstract = train_lib.abstract_state(config, plan.model_cfg, tx, plan.mesh)
        at, tree, meta, unreadable = checkpointer.restore_readable(train_lib.state_to_tree(abstract),
                                                                   step, check)
        state = train_lib.state_from_tree(tree)
        if _is_main():
            _set_aside(checkpointer, unreadable, [s for s in checkpointer.all_steps()
                                                  if s > at and s not in unreadable])
        parallel.barrier("lstm_jax: checkpoints set aside")
        pieces = meta.get("lr_pieces") or train_lib.lr_segments(config, meta.get("total_steps", plan.total_steps))
        budget_fixed = bool(config.time_budget_s) and meta.get("budget_fixed_for") == config.time_budget_s
        total = min(meta["total_steps"], plan.total_steps) if budget_fixed else plan.total_steps
        pieces, how = train_lib.continue_lr_segments(pieces, config, at, total)
        _say(f"resuming {workdir} from step {at} (epoch {at / plan.steps_per_epoch:.2f})"
             + (f"; {meta.get('total_steps')} -> {total} steps: {how}" if how else ""))
        start = _Start(graphdef, state, at, pieces, meta.get("elapsed_s", 0.0), meta.get("epoch_loss"),
                       meta.get("best"), meta.get("side_s", 0.0), total, budget_fixed)
    else:
        saved = workdir_lib.read_json(workdir / "config.json")
        if saved is not None:   # a run stopped before its first checkpoint: same contract
            vocab = workdir_lib.read_json(workdir / "vocab.json") or {}
            check({"config": saved, "vocab": vocab.get("chars", described["vocab"])})
        tx = train_lib.make_optimizer(config, plan.total_steps)
        graphdef, state = train_lib.init_state(config, plan.model_cfg, tx, plan.mesh)
        start = _Start(graphdef, state, 0, train_lib.lr_segments(config, plan.total_steps),
                       total_steps=plan.total_steps)
    if _is_main():
        workdir_lib.write_json(workdir / "config.json", described["config"])
        plan.vocab.save(workdir / "vocab.json")
    return start


def _set_aside(checkpointer: ckpt.Checkpointer, unreadable: list[int], later: list[int]) -> None:
    for steps, into, why in ((unreadable, "unreadable_checkpoints", "unreadable"),
                             (later, "abandoned_checkpoints", "after the step resumed from")):
        for path in checkpointer.move_aside(steps, into):
            _say(f"moved checkpoint {path.name} ({why}) to {path}")


# --- the loop -------------------------------------------------------------------------------

def _fit(plan: Plan, workdir: pathlib.Path, checkpointer: ckpt.Checkpointer, start: _Start,
         progress: bool) -> TrainResult:
    from tqdm.auto import tqdm

    config, total, pieces = plan.config, start.total_steps, start.lr_pieces
    tx = train_lib.make_optimizer(config, total, pieces)
    placement = _Placement(plan, start.graphdef, tx)
    state = placement.place_state(start.state)
    _say(f"{plan.mesh.devices.size} {jax.devices()[0].platform} device(s) in {jax.process_count()} "
         f"process(es), batch {plan.batch}, {plan.steps_per_epoch} steps/epoch, {total} steps")
    if start.step >= total:
        _say(f"{workdir} is already at step {start.step} of {total}: nothing to train (raise "
             f"--config.num_epochs or --config.max_steps to continue: the learning rate carries on "
             f"from where it is)")
    bar = tqdm(total=total, initial=start.step, disable=not (progress and _is_main()), unit="step",
               dynamic_ncols=True)
    log = workdir_lib.MetricsLog(workdir, start.step, enabled=_is_main())
    meter = _Meter(plan, log, bar, start)
    evaluate = _Evaluator(plan, start.graphdef)
    early_stop = _EarlyStop(config.checkpoint.best_metric, config.checkpoint.early_stop_evals,
                            start.best)
    save = _Saver(plan, checkpointer, meter, pieces, early_stop, total, start.budget_fixed)
    write_samples = _SampleWriter(plan, workdir, start.graphdef, bar)
    budget = _Budget(config.time_budget_s, fixed=start.budget_fixed)
    every = lambda n, k: bool(k) and n % k == 0   # noqa: E731
    done, stop = start.step, _StopRequests(agree_every=config.log_every)
    try:
        with stop:
            batches = placement.batches(start.step)
            for step in range(start.step, plan.total_steps):   # the budget may end the run sooner
                if step >= total:
                    break
                state, metrics = placement.train_step(state, next(batches))
                first = step == start.step
                if first:   # it compiles the step: timed apart, kept out of chars_per_s
                    with meter.side_work("compile_s"):
                        jax.block_until_ready(metrics)
                meter.record(step, metrics, counted=not first)
                done = step + 1
                bar.update(1)   # host-side only: no device sync
                if (length := budget.length(done, meter, state, total)) is not None:
                    total, pieces, how = length, *train_lib.continue_lr_segments(pieces, config, done, length)
                    placement.set_optimizer(train_lib.make_optimizer(config, total, pieces))
                    save.set_length(total, pieces)
                    meter.lr_pieces, bar.total = pieces, total
                    _say(f"time budget {config.time_budget_s:g} s of training: {total} steps "
                         f"({budget.rate:.1f} steps/s measured)"
                         + (f"; {how}" if how else ""), bar)
                if stop.requested(done, state):
                    break
                end_of_epoch = done % plan.steps_per_epoch == 0 or done == total
                val: dict = {}
                if end_of_epoch or every(done, config.eval_every):
                    with meter.side_work("eval_s"):
                        val = evaluate(placement.global_state(state).params)
                    meter.write_eval(done, val, end_of_epoch)
                    early_stop.update(done, val)
                if end_of_epoch or every(done, config.checkpoint.every_steps) or early_stop.stop:
                    with meter.side_work("checkpoint_s"):
                        save(done, placement.global_state(state), val)
                if early_stop.stop:
                    _say(early_stop.message(), bar)
                    with meter.side_work("sample_s"):
                        write_samples(done, placement.global_state(state).params)
                    break
                epochs_done, in_epoch = divmod(done, plan.steps_per_epoch)
                if done == total or (in_epoch == 0 and every(epochs_done, config.sample.every_epochs)):
                    with meter.side_work("sample_s"):
                        write_samples(done, placement.global_state(state).params)
            if stop.signal:
                with meter.side_work("checkpoint_s"):
                    save(done, placement.global_state(state))
                checkpointer.wait()
                _say(f"received {stop.signal}: saved a checkpoint at step {done} in "
                     f"{checkpointer.directory}; run the same command to resume", bar)
            meter.flush()
    except _Diverged as diverged:
        raise _diverged_error(diverged, plan, checkpointer) from None
    finally:
        bar.close()
        log.close()
    params = jax.device_get(placement.global_state(state).params)
    return TrainResult(model=nnx.merge(start.graphdef, params), vocab=plan.vocab, step=done,
                       metrics={**meter.last_train, **meter.last_eval},
                       preempted=stop.signal is not None, preempted_by=stop.signal)


class _Placement:
    """How the run's arrays live on devices: a ('data',) mesh under jit (the default), or one copy
    of the state per device under pmap. Both build the same global batches."""

    def __init__(self, plan: Plan, graphdef, tx):
        self.plan, self.config, self.graphdef = plan, plan.config, graphdef
        self.pmap = self.config.parallel.mode == "pmap"
        self.key = jax.random.key(self.config.seed)
        if self.pmap:
            self.devices = list(plan.mesh.devices.flat)   # pmap wants the same list on every process
            self.n_local = sum(d.process_index == jax.process_index() for d in self.devices)
        self.rows = parallel.process_rows(plan.batch)
        self.set_optimizer(tx)

    def set_optimizer(self, tx) -> None:
        """Builds the step for `tx` (again when the time budget fixes the run's length)."""
        spe = self.plan.steps_per_epoch
        if self.pmap:
            self.step_fn = train_lib.make_pmap_train_step(self.graphdef, tx, self.config,
                                                          devices=self.devices, steps_per_epoch=spe)
        else:
            self.step_fn = train_lib.make_train_step(self.graphdef, tx, self.config,
                                                     steps_per_epoch=spe, mesh=self.plan.mesh)

    def place_state(self, state):
        """pmap: params and optimizer state copied to every device, a stream carry split so each
        device holds the rows of its own streams."""
        if not self.pmap:
            return state
        placed = parallel.replicate_for_pmap(jax.device_get(state.replace(carry=None)), self.devices)
        carry = jax.tree.map(parallel.local_rows, state.carry)
        return placed.replace(carry=parallel.split_for_pmap(carry, self.devices))

    def train_step(self, state, batch):
        return self.step_fn(state, batch, self.key)

    def batches(self, start: int) -> Iterator[jax.Array]:
        """This process's rows of every global batch from step `start` on, placed, built ahead."""
        spe = self.plan.steps_per_epoch
        return data.prefetch(self._place(self.plan.batcher.batch(*divmod(s, spe), self.rows))
                             for s in range(start, self.plan.total_steps))

    def _place(self, rows: np.ndarray):
        if self.pmap:
            return rows.reshape((self.n_local, -1) + rows.shape[1:])
        return parallel.to_global(rows, self.plan.mesh)

    def global_state(self, state):
        """The state as arrays replicated over the mesh (what Orbax saves and eval reads). For
        pmap, device 0's copy: pmap's outputs are host-local, which Orbax refuses in a
        multi-process run."""
        if not self.pmap:
            return state
        sharding, mesh = parallel.replicated(self.plan.mesh), self.plan.mesh
        glob = jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x[0])),
                            state.replace(carry=None))
        rows = lambda x: parallel.to_global(np.asarray(x).reshape((-1,) + x.shape[2:]), mesh)  # noqa: E731
        return glob.replace(carry=jax.tree.map(rows, state.carry))


class _Budget:
    """time_budget_s: once per budget, fixes the run's length at what fits in the budget's
    remaining training time (train_s) at the measured step rate, never beyond num_epochs /
    max_steps. The rate is measured after WARMUP steps (the first ones after compiling are slow),
    over at least PROBE steps and min(5% of the budget, 30 s). The processes of a run take the
    shortest length any of them measured. Saved with checkpoints, so a resume keeps it."""
    WARMUP, PROBE = 5, 30

    def __init__(self, budget_s: float, fixed: bool):
        self.budget_s, self.pending = budget_s, budget_s > 0 and not fixed
        self.probe_s = min(0.05 * budget_s, 30.0)
        self.first: Optional[int] = None
        self.probe_from: Optional[tuple[int, float]] = None
        self.rate = 0.0

    def length(self, done: int, meter: "_Meter", state, total: int) -> Optional[int]:
        if not self.pending:
            return None
        if self.first is None:            # after the session's first (compiling) step
            self.first = done
        if self.probe_from is None:
            if done - self.first >= self.WARMUP:
                jax.block_until_ready(state)
                self.probe_from = (done, meter.train_time())
            return None
        steps, seconds = done - self.probe_from[0], meter.train_time() - self.probe_from[1]
        if steps < self.PROBE or seconds < self.probe_s:
            return None
        jax.block_until_ready(state)
        self.pending = False
        self.rate = steps / max(meter.train_time() - self.probe_from[1], 1e-9)
        # the new schedule compiles the step once more (about as long as the first compile)
        left = self.budget_s - meter.train_time() - meter.compile_s
        fits = done + int(max(0.0, left) * self.rate)
        return -parallel.max_over_processes(-min(total, max(done, fits)))


class _Diverged(Exception):
    """The params after `step` updates scored `value` on `what` (train_loss or val_loss)."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(step, what, value)
        self.step, self.what, self.value = step, what, value


class _Meter:
    """Training metrics: kept on device and fetched one step behind (the host never stalls the
    device), checked for divergence, logged every `log_every` steps with a step rate that
    excludes the periodic side work, and summed per epoch (Keras's mean training loss)."""

    def __init__(self, plan: Plan, log: workdir_lib.MetricsLog, bar, start: _Start):
        self.plan, self.log, self.bar = plan, log, bar
        c = plan.config
        self.log_every = c.log_every
        self.chars_per_step = plan.batch * c.seq_len
        self.targets_per_step = plan.batch * (1 if c.objective == "window" else c.seq_len)
        self.limit = math.log(len(plan.vocab)) + DIVERGENCE_MARGIN
        self.bad_since: Optional[int] = None   # first step of the current run of too-high losses
        self.lr_pieces = start.lr_pieces
        self.elapsed_before, self.side_before = start.elapsed_s, start.side_s
        self.session_start = self.window_start = time.perf_counter()
        self.side_total = 0.0                         # this session's eval/checkpoint/sample time
        self.compile_s = 0.0                          # the session's first step (it compiles)
        self.pending: list[tuple[int, Any, bool]] = []   # (step, device metrics, in the rate)
        self.side_s: dict[str, float] = {}
        e = start.epoch_loss or {}
        here = start.step // plan.steps_per_epoch
        self.epoch = (here, e["sum"], e["steps"]) if e.get("epoch") == here else (here, 0.0, 0)
        self.last_train: dict = {}
        self.last_eval: dict = {}

    def elapsed(self) -> float:
        """Wall time of the run's loop across sessions (a killed session's lost steps excluded)."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def train_time(self) -> float:
        """`elapsed` without the side work (evaluation, checkpoints, samples); compilation in."""
        return self.elapsed() - self.side_before - self.side_total

    def _event(self, step: int) -> dict:
        return {"step": step, "epoch": step / self.plan.steps_per_epoch,
                "elapsed_s": round(self.elapsed(), 3), "train_s": round(self.train_time(), 3),
                "session_elapsed_s": round(time.perf_counter() - self.session_start, 3)}

    def record(self, step: int, metrics, counted: bool = True) -> None:
        self.pending.append((step, metrics, counted))
        if len(self.pending) > self.log_every:
            self._fetch(keep_newest=True)

    def flush(self) -> None:
        """Fetches and logs every pending step (before anything reads or saves the state)."""
        self._fetch(keep_newest=False)

    def _fetch(self, keep_newest: bool) -> None:
        ready, self.pending = ((self.pending[:-1], self.pending[-1:]) if keep_newest
                               else (self.pending, []))
        if not ready:
            return
        # pmap metrics carry a leading device axis (all equal after pmean): take entry 0
        fetched = [jax.tree.map(lambda x: float(np.ravel(x)[0]), m)
                   for m in jax.device_get([m for _, m, _ in ready])]
        for (step, _, _), m in zip(ready, fetched):
            if not math.isfinite(m["loss"]):
                raise _Diverged(step, "train_loss", m["loss"])
            if m["loss"] < self.limit:
                self.bad_since = None
            elif self.bad_since is None:
                self.bad_since = step
            elif step - self.bad_since + 1 >= DIVERGENCE_STEPS:
                raise _Diverged(self.bad_since, "train_loss", m["loss"])
            epoch = step // self.plan.steps_per_epoch
            e, total, n = self.epoch if self.epoch[0] == epoch else (epoch, 0.0, 0)
            self.epoch = (e, total + m["loss"], n + 1)
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9)
        timed = sum(counted for _, _, counted in ready)
        losses = [m["loss"] for m in fetched]
        last = ready[-1][0] + 1
        self.last_train = {
            **self._event(last), "train_loss": float(np.mean(losses)),
            "train_bpc": float(np.mean(losses) / LN2), "grad_norm": fetched[-1]["grad_norm"],
            "learning_rate": train_lib.lr_at(self.lr_pieces, ready[-1][0]),
            "chars_per_s": round(timed * self.chars_per_step / seconds, 1),
            "targets_per_s": round(timed * self.targets_per_step / seconds, 1),
            **{k: round(v, 3) for k, v in self.side_s.items()}}
        self.window_start, self.side_s = now, {}
        self.log.write(self.last_train)
        self.bar.set_postfix(loss=f"{self.last_train['train_loss']:.4f}",
                             chars_s=f"{self.last_train['chars_per_s']:,.0f}")

    @contextlib.contextmanager
    def side_work(self, name: str) -> Iterator[None]:
        """Checks every pending step first, then times the block into `name` (reported with the
        next training event) and keeps it out of chars_per_s."""
        self.flush()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            now = time.perf_counter()
            self.side_s[name] = self.side_s.get(name, 0.0) + now - t0
            if name == "compile_s":
                self.compile_s = now - t0
            else:
                self.side_total += now - t0
            self.window_start = now

    def write_eval(self, step: int, val: dict, end_of_epoch: bool) -> None:
        if val and not val["val_loss"] < self.limit:
            raise _Diverged(step, "val_loss", val["val_loss"])
        e, total, n = self.epoch   # a whole epoch just ended, every step of it seen (or restored)
        whole = end_of_epoch and e + 1 == step / self.plan.steps_per_epoch and n == self.plan.steps_per_epoch
        epoch_loss = {"epoch_train_loss": total / n} if whole else {}
        if not (val or epoch_loss):
            return
        self.last_eval = val
        self.log.write({**self._event(step), **epoch_loss, **val})
        if val and _is_main():
            self.bar.write(f"epoch {step / self.plan.steps_per_epoch:.2f} step {step}: train_loss "
                           f"{self.last_train.get('train_loss', float('nan')):.4f} val_loss "
                           f"{val['val_loss']:.4f} val_last_loss {val['val_last_loss']:.4f} "
                           f"({val['val_bpc']:.3f} bpc)")

    def snapshot(self) -> dict:
        """What a checkpoint needs to resume the metrics exactly (after `flush`)."""
        e, total, n = self.epoch
        return {"elapsed_s": self.elapsed(), "side_s": self.side_before + self.side_total,
                "epoch_loss": {"epoch": e, "sum": total, "steps": n}}


class TextEval:
    """Loss of a model on a whole text with the LSTM state carried: the text cut into `streams`
    long contiguous streams (each read from a zero state), run `CHUNK` chars per call (one
    compiled shape), per-row sums reduced on the host (no collectives). The bits-per-char that
    papers report (enwik8, text8, PTB-char)."""
    CHUNK = 256

    def __init__(self, graphdef, model_cfg: ModelConfig, tokens: np.ndarray, mesh, streams: int):
        n = mesh.devices.size
        streams = max(n, streams // n * n)
        tokens, weight = data.text_streams(np.asarray(tokens), streams)
        tokens, weight = data.pad_rows(tokens, n)[0], data.pad_rows(weight, n)[0]
        pad = -weight.shape[1] % self.CHUNK
        self.tokens = np.pad(tokens, ((0, 0), (0, pad)), mode="edge")
        self.weight = np.pad(weight, ((0, 0), (0, pad)))
        self.chars, self.streams = int(self.weight.sum()), len(self.tokens)
        self.mesh, self.model_cfg = mesh, model_cfg
        self.step = train_lib.make_text_eval_step(graphdef)

    def __call__(self, params) -> float:
        """Mean next-char loss (nats) over every char of the text after the first."""
        mesh, rows = self.mesh, parallel.process_rows(self.streams)
        local = np.zeros((rows.stop - rows.start, self.model_cfg.hidden_size), np.float32)
        carry = tuple((parallel.to_global(local, mesh), parallel.to_global(local, mesh))
                      for _ in range(self.model_cfg.num_layers))   # separate buffers: donated
        sums = []
        for i in range(0, self.weight.shape[1], self.CHUNK):
            chunk = parallel.to_global(self.tokens[rows, i:i + self.CHUNK + 1], mesh)
            w = parallel.to_global(self.weight[rows, i:i + self.CHUNK], mesh)
            loss_sum, carry = self.step(params, chunk, w, carry)
            sums.append(loss_sum)
        return float(sum(_gather(x).astype(np.float64).sum() for x in sums)) / self.chars


class _Evaluator:
    """Held-out metrics of params. On windows (the Keras reference's yardstick, from a zero state):
    val_loss (nats/char over every position), val_bpc, and val_last_loss (the loss on the char
    after each window). On the whole held-out text with the state carried (`TextEval`, as many
    long streams as one eval batch has rows, fewer for a short text): val_text_loss and
    val_text_bpc. Rows stay sharded and the host reduces them: no collectives."""
    MIN_STREAM = 1024    # chars per stream at least: less of a short text read from a cold state

    def __init__(self, plan: Plan, graphdef):
        self.plan, self.eval_step = plan, train_lib.make_eval_step(graphdef)
        n = plan.mesh.devices.size
        self.rows_per_call = max(n, (plan.batch // n) * n)
        if plan.windows is not None:
            self.padded, self.weight = data.pad_rows(plan.windows, self.rows_per_call)
        val, self.text = plan.corpus.val_tokens, None
        if plan.config.eval_text and len(val) > 1:
            self.text = TextEval(graphdef, plan.model_cfg, val, plan.mesh,
                                 min(self.rows_per_call, (len(val) - 1) // self.MIN_STREAM))

    def __call__(self, params) -> dict:
        out = {}
        if self.plan.windows is not None:
            k, mesh = self.rows_per_call, self.plan.mesh
            rows = parallel.process_rows(k)
            parts = [self.eval_step(params, parallel.to_global(self.padded[i:i + k][rows], mesh))
                     for i in range(0, len(self.padded), k)]
            loss_sum = np.concatenate([np.asarray(_gather(p[0])) for p in parts])
            last = np.concatenate([np.asarray(_gather(p[1])) for p in parts])
            w = self.weight
            val_loss = float((loss_sum * w).sum() / (w.sum() * self.plan.config.eval_window))
            out.update(val_loss=val_loss, val_bpc=val_loss / LN2,
                       val_last_loss=float((last * w).sum() / w.sum()))
        if self.text is not None:
            loss = self.text(params)
            out.update(val_text_loss=loss, val_text_bpc=loss / LN2)
        return out


class _EarlyStop:
    """Tracks the best value of `metric` (lower is better) over evaluations and asks the loop to
    stop after `patience` evaluations without a new best (0: never)."""

    def __init__(self, metric: str, patience: int, best: Optional[dict]):
        self.metric, self.patience = metric, patience
        self.best = best or {"step": None, "value": None, "evals_since": 0}
        self.stop = False

    def update(self, step: int, val: dict) -> None:
        if self.metric not in val:
            return
        if self.best["value"] is None or val[self.metric] < self.best["value"]:
            self.best = {"step": step, "value": val[self.metric], "evals_since": 0}
        else:
            self.best = {**self.best, "evals_since": self.best["evals_since"] + 1}
        self.stop = bool(self.patience) and self.best["evals_since"] >= self.patience

    def message(self) -> str:
        return (f"stopping early: {self.metric} has not improved for {self.patience} evaluations "
                f"(best {self.best['value']:.4f} at step {self.best['step']}, kept as the best "
                f"checkpoint)")


class _Saver:
    """Checkpoints the state with the metadata a resume needs (the run's description, the data
    position, the learning-rate schedule, elapsed time and the epoch's running loss)."""

    def __init__(self, plan: Plan, checkpointer: ckpt.Checkpointer, meter: _Meter, lr_pieces: list,
                 early_stop: "_EarlyStop", total_steps: int, budget_fixed: bool):
        self.plan, self.checkpointer, self.meter, self.lr_pieces = plan, checkpointer, meter, lr_pieces
        self.early_stop, self.total_steps = early_stop, total_steps
        self.budget_fixed_for = plan.config.time_budget_s if budget_fixed else None

    def set_length(self, total_steps: int, lr_pieces: list) -> None:
        """The time budget fixed the run's length: later checkpoints carry it."""
        self.total_steps, self.lr_pieces = total_steps, lr_pieces
        self.budget_fixed_for = self.plan.config.time_budget_s

    def __call__(self, step: int, state, val: Optional[dict] = None) -> None:
        if self.checkpointer.latest_step() == step:
            return
        spe, val = self.plan.steps_per_epoch, val or {}
        meta = {**self.plan.description(), "step": step, "epoch": step // spe,
                "batch_in_epoch": step % spe, "steps_per_epoch": spe,
                "total_steps": self.total_steps, "budget_fixed_for": self.budget_fixed_for,
                "lr_pieces": self.lr_pieces,
                "num_devices": int(self.plan.mesh.devices.size), "jax_version": jax.__version__,
                "lstm_jax_version": _version(), "val_loss": val.get("val_loss"),
                "best": self.early_stop.best, **self.meter.snapshot()}
        ranked = {k: v for k, v in val.items() if k in ("val_loss", "val_text_bpc")}
        self.checkpointer.save(step, train_lib.state_to_tree(state), meta, metrics=ranked or None)


class _SampleWriter:
    """Samples at the configured temperatures into samples.txt (and the console), primed like the
    Keras reference with a random held-out window when no prime is configured."""

    def __init__(self, plan: Plan, workdir: pathlib.Path, graphdef, bar):
        self.plan, self.path, self.graphdef, self.bar = plan, workdir / "samples.txt", graphdef, bar

    def __call__(self, step: int, params) -> None:
        from lstm_jax import sample
        c, vocab = self.plan.config, self.plan.vocab
        prime = c.sample.prime
        if not prime and self.plan.windows is not None:
            windows = self.plan.windows
            row = np.random.default_rng([c.seed, step]).integers(len(windows))
            prime = vocab.decode(windows[row, :c.eval_window])
        temps = list(c.sample.temperatures)
        model = nnx.merge(self.graphdef, jax.device_get(params))
        try:
            out = sample.generate(model, vocab, num_samples=len(temps), length=c.sample.length,
                                  temperature=temps, prime=prime or None, seed=c.seed + step)
        except sample.SamplingInterrupted:
            return   # the signal reached _StopRequests too: the loop stops and saves next step
        if not _is_main():
            return
        lines = [f"----- step {step} (epoch {step / self.plan.steps_per_epoch:.2f}), prime: {prime!r}"]
        for t, text in zip(temps, out.texts):
            lines += [f"----- temperature {t}", prime + text]
        block = "\n".join(lines) + "\n"
        self.bar.write(block)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(block)


class _StopRequests:
    """SIGTERM/SIGINT become a stop at the next step boundary. The processes of a multi-process
    run agree every `agree_every` steps (one small all-gather), so all stop and save at one step."""

    def __init__(self, agree_every: int):
        self.agree_every, self.received, self.signal = agree_every, 0, None
        self._old: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def requested(self, done: int, state) -> bool:
        if jax.process_count() == 1:
            agreed = self.received
        elif done % self.agree_every:
            return False
        else:
            jax.block_until_ready(state)   # XLA:CPU: no other collective program in flight
            agreed = parallel.max_over_processes(self.received)
        self.signal = signal.Signals(agreed).name if agreed else None
        return bool(agreed)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _diverged_error(d: _Diverged, plan: Plan, checkpointer: ckpt.Checkpointer) -> train_lib.TrainingError:
    """Moves the checkpoints whose params may be the diverged ones aside (saved at or after the
    divergence and not vouched for by an evaluation) and says what is on disk."""
    limit = math.log(len(plan.vocab)) + DIVERGENCE_MARGIN

    def vouched(step: int) -> bool:
        try:
            val = checkpointer.metadata(step).get("val_loss")
        except Exception:  # noqa: BLE001 - unreadable: not vouched for
            return False
        return val is not None and val < limit

    moved = []
    if _is_main():
        checkpointer.wait()
        moved = checkpointer.move_aside([s for s in checkpointer.all_steps()
                                         if s >= d.step and not vouched(s)], "diverged_checkpoints")
    parallel.barrier("lstm_jax: diverged")
    latest = checkpointer.latest_step()
    o = plan.config.optimizer
    on_disk = (f"the latest checkpoint is step {latest}, saved before the loss went bad "
               f"(`lstm-jax sample` uses it)" if latest is not None else "no checkpoint was saved before it")
    if moved:
        on_disk += f"; moved the checkpoint(s) saved since then to {moved[0].parent}"
    fix = f"--new_run --config.optimizer.learning_rate={o.learning_rate / 10:g}"
    if o.clip_norm == 0:
        fix += " or gradient clipping (--config.optimizer.clip_norm=5)"
    lnv = math.log(len(plan.vocab))
    what = (f"{d.what} {d.value:.4g}" if d.what == "val_loss" or not math.isfinite(d.value) else
            f"{d.what} above ln V + {DIVERGENCE_MARGIN:g} = {lnv + DIVERGENCE_MARGIN:.2f} for "
            f"{DIVERGENCE_STEPS} steps from step {d.step} (last {d.value:.4g})")
    return train_lib.TrainingError(
        f"training diverged at step {d.step}: {what}; a uniform guess scores ln V = {lnv:.2f}; "
        f"{on_disk}. Start afresh with a lower learning rate ({fix}).")


# --- restoring a trained model ----------------------------------------------------------------

def restore_model(workdir: str | pathlib.Path, step: Optional[int] = None
                  ) -> tuple[CharLSTM, data.Vocab, ml_collections.ConfigDict]:
    """Rebuilds the trained model from a workdir alone (config.json, vocab.json, checkpoint),
    on whatever devices this process has: `step`, else the newest readable checkpoint."""
    model, vocab, config, _ = _restore(workdir, step)
    return model, vocab, config


def _restore(workdir, step):
    workdir = pathlib.Path(workdir)
    saved = workdir_lib.read_json(workdir / "config.json")
    if saved is None:
        raise ckpt.CheckpointError(f"{workdir} is not a training workdir (no config.json); train "
                                   f"first: lstm-jax train --workdir {workdir}")
    config = config_lib.from_saved(saved)
    vocab = data.Vocab.load(workdir / "vocab.json")
    checkpointer = ckpt.Checkpointer(workdir, read_only=True)
    try:
        if not checkpointer.all_steps():
            raise ckpt.CheckpointError(f"no checkpoint in {checkpointer.directory}; train first")
        mcfg = train_lib.model_config(config, len(vocab))
        tx = train_lib.make_optimizer(config, 1)
        mesh = parallel.make_mesh()

        def abstract(meta: dict):
            return train_lib.state_to_tree(train_lib.abstract_state(
                config, mcfg, tx, mesh, replicate_all=True,
                batch=meta.get("global_batch", config.batch_size))[1])
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharLSTM(mcfg, rngs=nnx.Rngs(0))))
        at, tree, _, _ = checkpointer.restore_readable(abstract, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, jax.device_get(tree["params"])), vocab, config, at


def evaluate_text(workdir: str | pathlib.Path, text: Optional[str] = None, *,
                  step: Optional[int] = None, drop_unknown: bool = False,
                  streams: int = 64) -> dict:
    """Whole-text loss and bits per char of a trained workdir's model on `text` (default: the
    run's own held-out split), encoded with the run's vocabulary: characters outside it are an
    error naming them, or dropped and counted with `drop_unknown`."""
    model, vocab, config, at = _restore(workdir, step)
    dropped = 0
    if text is None:
        tokens = train_lib.load_corpus(config, vocab).val_tokens
        source = "the run's held-out split"
    else:
        unknown = set(vocab.unknown_chars(text))
        dropped = sum(1 for c in text if c in unknown) if unknown else 0
        tokens = vocab.encode(text, unknown="drop" if drop_unknown else "error")
        source = "the given text"
    graphdef, params = nnx.split(model)
    mesh = parallel.make_mesh()
    params = jax.device_put(params, parallel.replicated(mesh))
    n_streams = max(1, min(streams, (len(tokens) - 1) // _Evaluator.MIN_STREAM))
    evaluator = TextEval(graphdef, model.config, tokens, mesh, n_streams)
    loss = evaluator(params)
    return {"step": at, "source": source, "chars": evaluator.chars, "streams": evaluator.streams,
            "dropped_unknown": dropped, "text_loss": loss, "text_bpc": loss / LN2}


# --- small helpers ----------------------------------------------------------------------------

def _say(message: str, bar=None) -> None:
    if _is_main():
        (bar.write if bar is not None else print)(message)


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-process) sharded array as one host array."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _to_json(config: ml_collections.ConfigDict) -> dict:
    import json
    return json.loads(config.to_json())


@functools.cache
def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lstm_jax")
    except Exception:   # noqa: BLE001 - not pip-installed (a source checkout on PYTHONPATH)
        from lstm_jax import __version__
        return __version__

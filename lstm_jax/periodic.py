"""The training loop's periodic pieces, each small enough to read, test and change alone: the
metrics (fetched one step behind, logged, summed per epoch), the divergence check, the time
budget, early stopping, checkpoint saves, training samples, and stop requests (SIGTERM/SIGINT).
`train.train_and_evaluate` builds them once and calls them from its one loop.
"""
from __future__ import annotations

import contextlib
import functools
import math
import pathlib
import signal
import time
from typing import Any, Iterator, Optional

import jax
import numpy as np
from flax import nnx

from lstm_jax import checkpoint as ckpt
from lstm_jax import flops, parallel, signals, steps
from lstm_jax import workdir as workdir_lib

LN2 = math.log(2.0)
# Training diverged when the loss is non-finite, or worse than guessing uniformly (ln V nats/char)
# by DIVERGENCE_MARGIN for DIVERGENCE_STEPS steps in a row (early spikes, e.g. RMSprop's first
# updates from zero velocity, recover within a few steps; a diverged run stays there).
DIVERGENCE_MARGIN = 1.0
DIVERGENCE_STEPS = 20


def say(message: str, bar=None) -> None:
    """Prints on process 0 (through the progress bar when there is one)."""
    if parallel.is_main_process():
        (bar.write if bar is not None else print)(message)


class Budget:
    """time_budget_s is the run's wall time: the loop's `elapsed_s`, steps, compiles,
    evaluations, checkpoints and samples together. Once per budget it fixes the run's length at
    what fits in the time left at the measured step rate, never beyond num_epochs / max_steps,
    after a reserve for the side work still to come:
    - EVAL_SHARE of the budget (of the run's expected wall time where num_epochs / max_steps
      end it first) for the periodic evaluations, which then read a fixed subset of the
      held-out text sized to fit it (`subset_chars`, None: the whole of it fits);
    - the end: a whole-text evaluation of the last state and one of the kept best checkpoint,
      each char costed at EVAL_CHAR_COST of a trained char (a forward pass is ~1/3 of one), and
      one more compile of the step (the new schedule).
    The rate is measured after WARMUP steps (the first ones after compiling are slow), over at
    least PROBE steps and min(5% of the budget, 30 s). A quarter of the way through the steps
    then left (a step count: every process rechecks at the same one), the length is fixed once
    more from the wall-clock rate since (steps per second of everything: evaluations,
    checkpoints and logging included), which corrects the first estimate of the side work; the
    end's evaluations are then costed at what the periodic ones since cost per char, where that
    is less than the first fix's EVAL_CHAR_COST (a bound, and a large held-out text makes it a
    large one). Then twice more, each halfway through the steps then left, from the rate since
    the recheck before: a host that slows down later in the run (a shared machine) would
    otherwise overrun its budget. The processes of a run take the shortest length any of them
    measured. Saved with checkpoints, so a resume keeps it."""
    WARMUP, PROBE = 5, 30
    RECHECKS = 3
    EVAL_SHARE = 0.05
    EVAL_CHAR_COST = 0.5

    def __init__(self, budget_s: float, fixed: bool, full_eval_chars: int = 0, eval_every: int = 0,
                 steps_per_epoch: int = 0):
        self.budget_s, self.pending = budget_s, budget_s > 0 and not fixed
        self.full_eval_chars, self.eval_every, self.spe = full_eval_chars, eval_every, steps_per_epoch
        self.probe_s = min(0.05 * budget_s, 30.0)
        self.first: Optional[int] = None
        self.probe_from: Optional[tuple[int, float]] = None
        self.rate = 0.0
        self.reserve_s = 0.0
        self.subset_chars: Optional[int] = None
        self.recheck: Optional[tuple[int, float, int]] = None   # (step, elapsed, step to recheck at)
        self.cap, self.end_s, self.rechecked = 0, 0.0, False
        self.rechecks_left = self.RECHECKS
        self.eval_at_fix = (0.0, 0)      # the meter's (eval seconds, chars) at the first fix

    def length(self, done: int, meter: "Meter", state, total: int) -> Optional[int]:
        if self.recheck is not None and done >= self.recheck[2]:
            # The host dispatches steps ahead of the device: read the clock when they are done,
            # or the rate since the first fix comes out high (by a few seconds' worth of steps).
            jax.block_until_ready(state)
            return self._recheck(done, meter, total)
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
        char_s = 1.0 / (self.rate * meter.chars_per_step)      # seconds per trained char
        # seconds per evaluated char: as measured by the evaluations so far (their compile in:
        # an overestimate), else EVAL_CHAR_COST of a trained char
        eval_s, eval_chars = self.eval_at_fix = getattr(meter, "eval_cost", (0.0, 0))
        eval_char_s = max(eval_s / eval_chars if eval_chars else 0.0, self.EVAL_CHAR_COST * char_s)
        end_s = 2 * self.full_eval_chars * eval_char_s
        # EVAL_SHARE of the run's wall time: the budget, or less where num_epochs / max_steps
        # (`total`) end the run first (at the training rate, with the share itself on top)
        short_s = meter.elapsed() + ((total - done) / self.rate + end_s + meter.compile_s) / \
            (1 - self.EVAL_SHARE)
        periodic_s = self.EVAL_SHARE * min(self.budget_s, short_s)
        self.reserve_s = end_s + periodic_s + meter.compile_s
        left = self.budget_s - meter.elapsed() - self.reserve_s
        fits = -parallel.max_over_processes(-min(total, max(done, done + int(max(0.0, left) * self.rate))))
        evals = sum((fits - 1) // k - done // k for k in {self.eval_every, self.spe} if k)
        if evals > 0:   # the periodic ones (the last is whole): each gets its share of periodic_s
            chars = -parallel.max_over_processes(-int(periodic_s / evals / eval_char_s))
            self.subset_chars = chars if chars < self.full_eval_chars else None
        if fits - done >= 4 * self.PROBE:
            self.recheck = (done, meter.elapsed(), done + (fits - done) // 4)
        self.end_s, self.cap = end_s, total
        return fits

    def _recheck(self, done: int, meter: "Meter", total: int) -> Optional[int]:
        since, t0, _ = self.recheck
        self.recheck, self.rechecks_left = None, self.rechecks_left - 1
        wall_rate = (done - since) / max(meter.elapsed() - t0, 1e-9)
        # the end's two whole evaluations at the cost per char the evaluations since the first
        # fix measured (their compiles in), where that is less than the first fix reserved
        eval_s, eval_chars = getattr(meter, "eval_cost", (0.0, 0))
        if eval_chars > self.eval_at_fix[1]:
            measured = (eval_s - self.eval_at_fix[0]) / (eval_chars - self.eval_at_fix[1])
            self.end_s = min(self.end_s, 2 * self.full_eval_chars * measured)
        left = self.budget_s - meter.elapsed() - self.end_s - meter.compile_s
        fits = done + int(max(0.0, left) * wall_rate)
        fits = -parallel.max_over_processes(-min(self.cap, max(done + 1, fits)))
        if self.rechecks_left > 0 and fits - done >= 4 * self.PROBE:
            self.recheck = (done, meter.elapsed(), done + (fits - done) // 2)
        if abs(fits - total) <= 0.01 * total:
            return None      # within 1%: not worth a compile
        self.rate, self.rechecked = wall_rate, True
        return fits


class Diverged(Exception):
    """The params after `step` updates scored `value` on `what` (train_loss or val_loss)."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(step, what, value)
        self.step, self.what, self.value = step, what, value


class DivergenceCheck:
    """Raises `Diverged` for a non-finite training loss, one at or above ln V + DIVERGENCE_MARGIN
    for DIVERGENCE_STEPS steps in a row, or a validation loss at or above that limit."""

    def __init__(self, vocab_size: int):
        self.limit = math.log(vocab_size) + DIVERGENCE_MARGIN
        self.bad_since: Optional[int] = None   # first step of the current run of too-high losses

    def train_loss(self, step: int, loss: float) -> None:
        if not math.isfinite(loss):
            raise Diverged(step, "train_loss", loss)
        if loss < self.limit:
            self.bad_since = None
        elif self.bad_since is None:
            self.bad_since = step
        elif step - self.bad_since + 1 >= DIVERGENCE_STEPS:
            raise Diverged(self.bad_since, "train_loss", loss)

    def val_loss(self, step: int, loss: float) -> None:
        if not loss < self.limit:
            raise Diverged(step, "val_loss", loss)


class Meter:
    """Training metrics: kept on device and fetched one step behind (the host never stalls the
    device), checked for divergence, logged every `log_every` steps with a step rate that
    excludes the periodic side work, and summed per epoch (Keras's mean training loss). A resumed
    session continues the run's `elapsed_s`, side-work time and epoch loss from its checkpoint.
    With `peak_flops` (the mesh's peak FLOP/s), training events add `flops_per_s` (chars_per_s x
    `lstm_jax.flops.count(...).train`, the documented FLOPs per training character) and `mfu`
    (flops_per_s / peak_flops): host arithmetic on the logged rate, no device sync."""

    def __init__(self, plan, log: workdir_lib.MetricsLog, bar, start_step: int, lr_pieces: list,
                 elapsed_s: float = 0.0, side_s: float = 0.0, epoch_loss: Optional[dict] = None,
                 peak_flops: Optional[float] = None):
        self.plan, self.log, self.bar = plan, log, bar
        c = plan.config
        self.log_every = c.log_every
        self.chars_per_step = plan.batch * c.seq_len
        self.flops_per_char = flops.count(plan.model_cfg, objective=c.objective, seq_len=c.seq_len).train
        self.peak_flops = peak_flops
        self.targets_per_step = plan.batch * (1 if c.objective == "window" else c.seq_len)
        self.divergence = DivergenceCheck(len(plan.vocab))
        self.lr_pieces = lr_pieces
        self.elapsed_before, self.side_before = elapsed_s, side_s
        self.session_start = self.window_start = time.perf_counter()
        self.side_total = 0.0                         # this session's eval/checkpoint/sample time
        self.compile_s = 0.0                          # the session's first step (it compiles)
        self.pending: list[tuple[int, Any, bool]] = []   # (step, device metrics, in the rate)
        self.side_s: dict[str, float] = {}
        self.side_by: dict[str, float] = {}           # this session's side work by name
        self.eval_chars = 0                           # held-out chars this session evaluated
        e = epoch_loss or {}
        here = start_step // plan.steps_per_epoch
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
        # a placement may return one copy per device (all equal): take the first
        fetched = [jax.tree.map(lambda x: float(np.ravel(x)[0]), m)
                   for m in jax.device_get([m for _, m, _ in ready])]
        for (step, _, _), m in zip(ready, fetched):
            self.divergence.train_loss(step, m["loss"])
            epoch = step // self.plan.steps_per_epoch
            e, total, n = self.epoch if self.epoch[0] == epoch else (epoch, 0.0, 0)
            self.epoch = (e, total + m["loss"], n + 1)
        now = time.perf_counter()
        seconds = max(now - self.window_start, 1e-9)
        timed = sum(counted for _, _, counted in ready)
        losses = [m["loss"] for m in fetched]
        last = ready[-1][0] + 1
        chars_per_s = timed * self.chars_per_step / seconds
        achieved = {}
        if self.peak_flops:
            achieved = {"flops_per_s": round(chars_per_s * self.flops_per_char),
                        "mfu": round(flops.mfu(chars_per_s * self.flops_per_char, self.peak_flops), 6)}
        self.last_train = {
            **self._event(last), "train_loss": float(np.mean(losses)),
            "train_bpc": float(np.mean(losses) / LN2), "grad_norm": fetched[-1]["grad_norm"],
            "learning_rate": steps.lr_at(self.lr_pieces, ready[-1][0]),
            "chars_per_s": round(chars_per_s, 1), **achieved,
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
            self.side_by[name] = self.side_by.get(name, 0.0) + now - t0
            if name == "compile_s":
                self.compile_s = now - t0
            else:
                self.side_total += now - t0
            self.window_start = now

    def write_eval(self, step: int, val: dict, end_of_epoch: bool) -> None:
        self.eval_chars += val.get("val_chars", 0)
        if val:
            self.divergence.val_loss(step, val["val_loss"])
        e, total, n = self.epoch   # a whole epoch just ended, every step of it seen (or restored)
        whole = end_of_epoch and e + 1 == step / self.plan.steps_per_epoch and n == self.plan.steps_per_epoch
        epoch_loss = {"epoch_train_loss": total / n} if whole else {}
        if not (val or epoch_loss):
            return
        self.last_eval = val
        self.log.write({**self._event(step), **epoch_loss, **val})
        if val and parallel.is_main_process():
            self.bar.write(f"epoch {step / self.plan.steps_per_epoch:.2f} step {step}: train_loss "
                           f"{self.last_train.get('train_loss', float('nan')):.4f} val_loss "
                           f"{val['val_loss']:.4f} val_last_loss {val['val_last_loss']:.4f} "
                           f"({val['val_bpc']:.3f} bpc)")

    @property
    def eval_cost(self) -> tuple[float, int]:
        """(seconds, chars) of this session's evaluations."""
        return self.side_by.get("eval_s", 0.0), self.eval_chars

    def write_extra(self, step: int, fields: dict) -> None:
        """An event of other fields at `step` (the kept best checkpoint's whole-text metrics)."""
        self.log.write({**self._event(step), **fields})

    def snapshot(self) -> dict:
        """What a checkpoint needs to resume the metrics exactly (after `flush`)."""
        e, total, n = self.epoch
        return {"elapsed_s": self.elapsed(), "side_s": self.side_before + self.side_total,
                "epoch_loss": {"epoch": e, "sum": total, "steps": n}}


class EarlyStop:
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


class Saver:
    """Checkpoints the state with the metadata a resume needs (the run's description, the data
    position, the learning-rate schedule, elapsed time and the epoch's running loss)."""

    def __init__(self, plan, checkpointer: ckpt.Checkpointer, meter: Meter, lr_pieces: list,
                 early_stop: "EarlyStop", total_steps: int, budget_fixed: bool,
                 eval_subset_chars: Optional[int] = None):
        self.plan, self.checkpointer, self.meter, self.lr_pieces = plan, checkpointer, meter, lr_pieces
        self.early_stop, self.total_steps = early_stop, total_steps
        self.budget_fixed_for = plan.config.time_budget_s if budget_fixed else None
        self.eval_subset_chars = eval_subset_chars

    def set_length(self, total_steps: int, lr_pieces: list, eval_subset_chars: Optional[int] = None) -> None:
        """The time budget fixed the run's length (and its evaluation subset): later checkpoints
        carry them."""
        self.total_steps, self.lr_pieces = total_steps, lr_pieces
        self.budget_fixed_for = self.plan.config.time_budget_s
        self.eval_subset_chars = eval_subset_chars

    def __call__(self, step: int, state, val: Optional[dict] = None) -> None:
        if self.checkpointer.latest_step() == step:
            return
        spe, val = self.plan.steps_per_epoch, val or {}
        meta = {**self.plan.description(), "step": step, "epoch": step // spe,
                "batch_in_epoch": step % spe, "steps_per_epoch": spe,
                "total_steps": self.total_steps, "budget_fixed_for": self.budget_fixed_for,
                "eval_subset_chars": self.eval_subset_chars,
                "lr_pieces": self.lr_pieces,
                "num_devices": int(self.plan.mesh.devices.size), "jax_version": jax.__version__,
                "lstm_jax_version": _version(), "val_loss": val.get("val_loss"),
                "best": self.early_stop.best, **self.meter.snapshot()}
        ranked = {k: v for k, v in val.items() if k in ("val_loss", "val_text_bpc")}
        self.checkpointer.save(step, steps.state_to_tree(state), meta, metrics=ranked or None)


class SampleWriter:
    """Samples at the configured temperatures into samples.txt (and the console), primed like the
    Keras reference with a random held-out window when no prime is configured."""

    def __init__(self, plan, workdir: pathlib.Path, graphdef, bar):
        self.plan, self.path, self.graphdef, self.bar = plan, workdir / "samples.txt", graphdef, bar
        self.interrupted_at: Optional[int] = None   # the step whose samples a signal stopped

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
            self.interrupted_at = step   # the signal reached StopRequests too: the loop stops
            return
        if not parallel.is_main_process():
            return
        lines = [f"----- step {step} (epoch {step / self.plan.steps_per_epoch:.2f}), prime: {prime!r}"]
        for t, text in zip(temps, out.texts):
            lines += [f"----- temperature {t}", prime + text]
        block = "\n".join(lines) + "\n"
        self.bar.write(block)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(block)


class Profiler:
    """--config.profile_steps=A:B: a `jax.profiler` trace of the updates that take the state from
    step A to step B, written into <workdir>/profile (TensorBoard's profile plugin reads
    `plugins/profile/<run>/*.xplane.pb`: `tensorboard --logdir <workdir>`; Perfetto opens the
    `*.trace.json.gz` beside it). The state is made ready before the trace starts and after it
    stops, so the trace holds exactly those steps; starting and writing the trace is side work
    (`profile_s`, out of chars_per_s). Steps outside the window run as without it: no sync, no
    annotation. A session that starts past A (a resume) does not trace."""

    DIR = "profile"

    def __init__(self, spec: str, workdir: pathlib.Path, start_step: int):
        from lstm_jax import config as config_lib
        self.window = config_lib.profile_window(spec)
        self.directory = workdir / self.DIR
        self.active = False
        if self.window and start_step > self.window[0]:
            say(f"profile_steps={spec}: this session starts at step {start_step}, after {self.window[0]}: "
                f"no trace")
            self.window = None

    def around(self, step: int, state, meter: "Meter"):
        """Wraps the update from `step`: starts the trace at A (state ready first), and names
        each update inside the window for the profile's step view."""
        if self.window and not self.active and step == self.window[0]:
            with meter.side_work("profile_s"):
                jax.block_until_ready(state)
                jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active, self.first = True, step
        if not self.active:
            return contextlib.nullcontext()
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def stop(self, done: int, state, meter: "Meter", bar=None, *, final: bool = False) -> None:
        """After the update to `done`: stops and writes the trace at B (or where the run ends)."""
        if not self.active or (done < self.window[1] and not final):
            return
        with meter.side_work("profile_s"):
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
        self.active, self.window = False, None
        say(f"profiler trace of steps {self.first}:{done} written to {self.directory}", bar)

    def abandon(self) -> None:
        """The loop raised inside the window: stops the trace (what it holds is still written)."""
        if self.active:
            self.active, self.window = False, None
            jax.profiler.stop_trace()


class StopRequests(signals.StopSignals):
    """SIGTERM/SIGINT become a stop at the next step boundary. The processes of a multi-process
    run agree every `agree_every` steps (one small all-gather), so all stop and save at one step;
    `signal` names the agreed signal."""

    def __init__(self, agree_every: int):
        super().__init__()
        self.agree_every, self.signal = agree_every, None

    def requested(self, done: int, state, final: bool = False) -> bool:
        """`final`: after the loop (every process is there), agree whatever the step."""
        if jax.process_count() == 1:
            agreed = self.signal_number
        elif done % self.agree_every and not final:
            return False
        else:
            jax.block_until_ready(state)   # XLA:CPU: no other collective program in flight
            agreed = parallel.max_over_processes(self.signal_number)
        self.signal = signal.Signals(agreed).name if agreed else None
        return bool(agreed)


def diverged_error(d: Diverged, plan, checkpointer: ckpt.Checkpointer) -> steps.TrainingError:
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
    if parallel.is_main_process():
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
    return steps.TrainingError(
        f"training diverged at step {d.step}: {what}; a uniform guess scores ln V = {lnv:.2f}; "
        f"{on_disk}. Start afresh with a lower learning rate ({fix}).")


@functools.cache
def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lstm_jax")
    except Exception:   # noqa: BLE001 - not pip-installed (a source checkout on PYTHONPATH)
        from lstm_jax import __version__
        return __version__

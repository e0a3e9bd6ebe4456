"""The training loop's periodic pieces, each alone (lstm_jax.periodic and lstm_jax.signals): the
divergence check, early stopping, the time budget, the metrics meter, and stop signals. The loop
that wires them together is tested end to end in test_train.py / test_workdir.py."""
import math
import os
import signal
import types

import numpy as np
import pytest

from lstm_jax import periodic, signals
from lstm_jax.model import ModelConfig
from conftest import tiny_config


# --- divergence ---------------------------------------------------------------------------------

def test_a_non_finite_loss_diverges_at_its_step():
    check = periodic.DivergenceCheck(vocab_size=10)
    check.train_loss(1, 2.0)
    with pytest.raises(periodic.Diverged) as e:
        check.train_loss(2, math.nan)
    assert (e.value.step, e.value.what) == (2, "train_loss")


def test_a_loss_above_ln_v_plus_margin_diverges_after_divergence_steps_from_the_first_bad_one():
    check = periodic.DivergenceCheck(vocab_size=10)
    high = math.log(10) + periodic.DIVERGENCE_MARGIN + 0.5
    for step in range(100, 100 + periodic.DIVERGENCE_STEPS - 1):   # a spike that recovers
        check.train_loss(step, high)
    check.train_loss(200, 1.0)
    assert check.bad_since is None
    for step in range(300, 300 + periodic.DIVERGENCE_STEPS - 1):
        check.train_loss(step, high)
    with pytest.raises(periodic.Diverged) as e:
        check.train_loss(300 + periodic.DIVERGENCE_STEPS - 1, high)
    assert (e.value.step, e.value.what, e.value.value) == (300, "train_loss", high)


def test_a_validation_loss_at_the_limit_diverges():
    check = periodic.DivergenceCheck(vocab_size=10)
    check.val_loss(5, math.log(10))
    with pytest.raises(periodic.Diverged, match="val_loss"):
        check.val_loss(6, math.log(10) + periodic.DIVERGENCE_MARGIN)


# --- early stopping -----------------------------------------------------------------------------

def test_early_stop_counts_evaluations_without_a_new_best():
    stop = periodic.EarlyStop("val_loss", patience=2, best=None)
    stop.update(10, {"val_loss": 2.0})
    stop.update(20, {"val_text_bpc": 9.0})   # another metric: not an evaluation of this one
    stop.update(30, {"val_loss": 2.5})
    assert not stop.stop and stop.best == {"step": 10, "value": 2.0, "evals_since": 1}
    stop.update(40, {"val_loss": 2.0})       # equal is not better
    assert stop.stop and "not improved for 2 evaluations (best 2.0000 at step 10" in stop.message()


def test_early_stop_resumes_from_the_saved_best_and_never_stops_without_patience():
    stop = periodic.EarlyStop("val_loss", patience=3, best={"step": 5, "value": 1.0, "evals_since": 2})
    stop.update(10, {"val_loss": 0.5})
    assert stop.best == {"step": 10, "value": 0.5, "evals_since": 0} and not stop.stop
    never = periodic.EarlyStop("val_loss", patience=0, best=None)
    for step in range(1, 10):
        never.update(step, {"val_loss": float(step)})
    assert not never.stop


# --- the time budget ----------------------------------------------------------------------------

class _Clock:
    """A meter whose training time and wall time the test sets (`side`: side work so far)."""
    def __init__(self):
        self.t, self.side, self.compile_s, self.chars_per_step = 0.0, 0.0, 2.0, 1000

    def train_time(self):
        return self.t

    def elapsed(self):
        return self.t + self.side


def test_the_budget_fixes_the_length_once_from_the_measured_rate():
    budget, meter = periodic.Budget(100.0, fixed=False), _Clock()
    assert budget.probe_s == 5.0
    lengths = []
    for done in range(1, 200):
        meter.t = 1.0 + 0.1 * done              # 10 steps/s after the first (compiling) step
        lengths.append(budget.length(done, meter, None, total=10_000))
    fixed = [(done, n) for done, n in enumerate(lengths, 1) if n is not None]
    assert len(fixed) == 1
    done, n = fixed[0]
    assert done == 1 + periodic.Budget.WARMUP + 50   # probe: max(30 steps, 5 s at 10 steps/s)
    # no held-out text: the reserve is the periodic-evaluation share and one more compile
    left = 100.0 - (1.0 + 0.1 * done) - meter.compile_s - periodic.Budget.EVAL_SHARE * 100.0
    assert budget.rate == pytest.approx(10.0) and n == done + int(left * 10.0)


def test_the_budget_is_wall_time_and_keeps_room_for_the_evaluations_to_come():
    """The side work already done (3 s of evaluations) and the end's two whole-text evaluations
    come out of the budget; the periodic evaluations get a fixed subset sized to EVAL_SHARE.
    Fails if the budget counted training time only."""
    budget = periodic.Budget(100.0, fixed=False, full_eval_chars=40_000, eval_every=100)
    meter = _Clock()
    meter.side = 3.0
    n = None
    for done in range(1, 200):
        meter.t = 1.0 + 0.1 * done              # 10 steps/s of 1,000 chars: 10,000 chars/s
        n = budget.length(done, meter, None, total=10_000) or n
    done = 1 + periodic.Budget.WARMUP + 50
    end_s = 2 * 40_000 * periodic.Budget.EVAL_CHAR_COST / 10_000      # 4 s
    assert budget.reserve_s == pytest.approx(end_s + 5.0 + meter.compile_s)
    wall = 1.0 + 0.1 * done + 3.0
    assert n == done + int((100.0 - wall - budget.reserve_s) * 10.0)
    # the evaluations between `done` and the end: 5 s over them, 0.5 s of a trained char each
    evals = (n - 1) // 100 - done // 100
    assert budget.subset_chars == int(5.0 / evals / (0.5 / 10_000)) < 40_000
    # predicted wall time of the run: everything fits in the budget
    assert wall + (n - done) / budget.rate + budget.reserve_s <= 100.0


def test_a_run_that_num_epochs_ends_before_its_budget_sizes_its_evaluations_to_its_length():
    """The recipe caps epochs: a 100 s budget whose run ends after 300 steps (30 s at 10 steps/s)
    gets EVAL_SHARE of ~30 s for its periodic evaluations, not of 100 s (which would take a
    sixth of the run). Fails if the share is taken of the budget."""
    budget = periodic.Budget(100.0, fixed=False, full_eval_chars=40_000, eval_every=50)
    meter = _Clock()
    n = None
    for done in range(1, 100):
        meter.t = 1.0 + 0.1 * done
        n = budget.length(done, meter, None, total=300) or n
    done = 1 + periodic.Budget.WARMUP + 50
    assert n == 300
    end_s = 2 * 40_000 * periodic.Budget.EVAL_CHAR_COST / 10_000      # 4 s
    wall = 1.0 + 0.1 * done + (0.1 * (300 - done) + end_s + meter.compile_s) / 0.95
    periodic_s = periodic.Budget.EVAL_SHARE * wall
    assert budget.reserve_s == pytest.approx(end_s + periodic_s + meter.compile_s)
    evals = (300 - 1) // 50 - done // 50
    assert budget.subset_chars == int(periodic_s / evals / (0.5 / 10_000))


def test_the_budget_rechecks_once_at_the_wall_clock_rate_when_side_work_slows_the_run():
    """Evaluations and checkpoints that take more than foreseen (here: half of the wall time
    after the first fix) shorten the run once more, so it still ends inside the budget."""
    budget, meter = periodic.Budget(100.0, fixed=False), _Clock()
    fixes = []
    for done in range(1, 5000):
        meter.t = 1.0 + 0.1 * min(done, 57) + 0.1 * max(0, done - 57)
        meter.side = 0.1 * max(0, done - 57)         # after the fix: 1 s of side work per 10 steps
        n = budget.length(done, meter, None, total=fixes[-1][1] if fixes else 10_000)
        if n is not None:
            fixes.append((done, n))
        if fixes and done >= fixes[-1][1]:
            break
    (d1, n1), (d2, n2) = fixes
    assert d2 == d1 + (n1 - d1) // 4 and n2 < n1 and budget.rate == pytest.approx(5.0, rel=0.01)
    assert meter.elapsed() <= 100.0    # the end: inside the budget


def test_a_host_that_slows_down_later_is_rechecked_until_the_end_fits():
    """A shared host that slows to 2/3 of its speed halfway through (a 10-minute run ended 5.6%
    past its budget so) is measured again halfway through the steps left after each recheck,
    and the run still ends inside the budget. Fails with one recheck (RECHECKS = 1:
    the run ends at 114 s) or two (107 s)."""
    budget, meter = periodic.Budget(100.0, fixed=False), _Clock()
    fixes = []
    for done in range(1, 5000):
        meter.t += 0.1 if done < 500 else 0.15       # 10 steps/s, then 6.7 from step 500
        n = budget.length(done, meter, None, total=fixes[-1][1] if fixes else 10_000)
        if n is not None:
            fixes.append((done, n))
            meter.side += meter.compile_s            # the step compiled for the new length
        if fixes and done >= fixes[-1][1]:
            break
    assert fixes[-1][0] > 500 and fixes[-1][1] < fixes[0][1]
    assert 95.0 <= meter.elapsed() <= 100.0


def test_the_recheck_costs_the_end_at_what_the_periodic_evaluations_measured():
    """The first fix reserves the end's two whole evaluations at EVAL_CHAR_COST of a trained char
    (here 20 s of a 100 s budget: a large held-out text); the periodic evaluations after it cost
    a fifth of that per char, so the recheck reserves 4 s and trains into the rest, still inside
    the budget. Fails if the recheck keeps the first estimate (the run then ends 16 s early)."""
    full, eval_every, per_char = 200_000, 100, 1e-5    # eval s per char: 0.1 of a trained char
    budget = periodic.Budget(100.0, fixed=False, full_eval_chars=full, eval_every=eval_every)
    meter = _Clock()
    meter.eval_cost = (0.0, 0)
    fixes = []
    for done in range(1, 5000):
        meter.t = 1.0 + 0.1 * done                  # 10 steps/s of 1,000 chars
        n = budget.length(done, meter, None, total=fixes[-1][1] if fixes else 10_000)
        if n is not None:
            fixes.append((done, n, meter.elapsed()))
            meter.side += meter.compile_s            # the step compiled for the new length
        if done % eval_every == 0 and fixes:        # the periodic evaluations, on the subset
            s, c = meter.eval_cost
            meter.eval_cost = (s + budget.subset_chars * per_char, c + budget.subset_chars)
            meter.side += budget.subset_chars * per_char
        if fixes and done >= fixes[-1][1]:
            break
    (d1, n1, t1), (d2, n2, t2) = fixes[:2]      # the first fix, the first recheck
    assert budget.end_s == pytest.approx(2 * full * per_char)
    wall_rate = (d2 - d1) / (t2 - t1)
    assert n2 == d2 + int((100.0 - t2 - budget.end_s - meter.compile_s) * wall_rate)
    assert n2 > n1 and meter.elapsed() + 2 * full * per_char <= 100.0


def test_the_recheck_reads_the_clock_after_the_dispatched_steps_are_done(monkeypatch):
    """JAX dispatches steps ahead of the device, so at a step the host's clock can be seconds
    short of when that step is done (here 3 s). Read then, the wall-clock rate since the first
    fix comes out high, and a 10-minute run ended 6.5% past its budget. The recheck waits for
    the state first, as the first fix does. Fails if it reads the clock without waiting."""
    budget, meter = periodic.Budget(100.0, fixed=False), _Clock()
    synced = meter.elapsed
    meter.elapsed = lambda: synced() - meter.lag       # the host's clock, ahead of the device
    monkeypatch.setattr(periodic.jax, "block_until_ready",
                        lambda state: setattr(meter, "lag", 0.0) or state)
    fixes = []
    for done in range(1, 5000):
        meter.t = 1.0 + 0.1 * done
        meter.side = 0.1 * max(0, done - 57)         # after the fix: 1 s of side work per 10 steps
        meter.lag = 3.0
        n = budget.length(done, meter, None, total=fixes[-1][1] if fixes else 10_000)
        if n is not None:
            fixes.append((done, n))
        if fixes and done >= fixes[-1][1]:
            break
    assert len(fixes) == 2 and budget.rate == pytest.approx(5.0, rel=0.01)
    assert synced() <= 100.0


def test_the_budget_never_lengthens_the_run_and_a_fixed_budget_does_nothing():
    budget, meter = periodic.Budget(1e6, fixed=False), _Clock()
    got = [budget.length(d, meter, None, total=1000) for d in range(1, 400)
           if not setattr(meter, "t", 0.1 * d)]   # the probe takes 30 s: measured at step 306
    assert [n for n in got if n is not None] == [1000]
    assert budget.subset_chars is None       # no held-out text to subset
    assert periodic.Budget(100.0, fixed=True).length(10, meter, None, total=60) is None


# --- the meter ----------------------------------------------------------------------------------

class _Log:
    def __init__(self):
        self.events = []

    def write(self, event):
        self.events.append(event)


class _Bar:
    def set_postfix(self, **kw):
        pass

    def write(self, text):
        pass


def _meter(steps_per_epoch=4, log_every=2, **kw):
    config = tiny_config(log_every=log_every)
    plan = types.SimpleNamespace(config=config, batch=8, vocab=list("abcdefgh"),
                                 steps_per_epoch=steps_per_epoch,
                                 model_cfg=ModelConfig(vocab_size=8, hidden_size=config.model.hidden_size))
    log = _Log()
    return periodic.Meter(plan, log, _Bar(), kw.pop("start_step", 0), [
        {"begin": 0, "start": 0, "end": 0, "lr0": 0.1, "lr1": 0.1, "shape": "linear"}], **kw), log


def test_metrics_are_fetched_one_step_behind_and_logged_every_log_every_steps():
    meter, log = _meter(log_every=2)
    for step in range(4):
        meter.record(step, {"loss": np.float32(1.0 + step), "grad_norm": np.float32(0.5)})
    # after 4 records with log_every=2: steps 0-1 logged at the third record; step 3 still pending
    assert [e["step"] for e in log.events] == [2] and len(meter.pending) == 2
    assert log.events[0]["train_loss"] == pytest.approx(1.5)
    meter.flush()
    assert [e["step"] for e in log.events] == [2, 4] and not meter.pending
    assert log.events[1]["learning_rate"] == pytest.approx(0.1)
    assert log.events[1]["chars_per_s"] > 0


def test_the_epoch_loss_is_logged_once_a_whole_epoch_was_seen():
    meter, log = _meter(steps_per_epoch=4)
    for step in range(4):
        meter.record(step, {"loss": np.float32(step), "grad_norm": np.float32(0.0)})
    meter.flush()
    meter.write_eval(4, {}, end_of_epoch=True)
    assert log.events[-1]["epoch_train_loss"] == pytest.approx(1.5)
    resumed, log = _meter(steps_per_epoch=4, start_step=2,
                          epoch_loss={"epoch": 0, "sum": 1.0, "steps": 2})   # steps 0, 1 restored
    for step in (2, 3):
        resumed.record(step, {"loss": np.float32(step), "grad_norm": np.float32(0.0)})
    resumed.flush()
    resumed.write_eval(4, {}, end_of_epoch=True)
    assert log.events[-1]["epoch_train_loss"] == pytest.approx(1.5)
    assert resumed.snapshot()["epoch_loss"] == {"epoch": 0, "sum": 6.0, "steps": 4}


def test_side_work_is_timed_apart_from_training_time():
    meter, log = _meter()
    before = meter.train_time()
    with meter.side_work("eval_s"):
        t = meter.elapsed()
        while meter.elapsed() - t < 0.05:
            pass
    assert meter.train_time() - before < 0.05 <= meter.side_s["eval_s"]
    assert meter.snapshot()["side_s"] >= 0.05


def test_flops_per_s_and_mfu_follow_chars_per_s_by_the_hand_count():
    # tiny: LSTM(32) x 1, V = 8, sequence: forward = recurrence 2*32*4*32 + head 2*32*8 = 8704
    # FLOPs per char (the first layer gathers: no input product); train = 3 x forward.
    meter, log = _meter(log_every=2, peak_flops=1e9)
    assert meter.flops_per_char == 3 * (2 * 32 * 128 + 2 * 32 * 8) == 26112
    for step in range(5):
        meter.record(step, {"loss": np.float32(1.0), "grad_norm": np.float32(0.5)})
    meter.flush()
    for event in log.events:
        assert event["flops_per_s"] == pytest.approx(event["chars_per_s"] * 26112, rel=1e-5)
        assert event["mfu"] == pytest.approx(event["flops_per_s"] / 1e9, rel=1e-4)
    no_peak, log = _meter(log_every=2)   # no peak known: neither field
    for step in range(3):
        no_peak.record(step, {"loss": np.float32(1.0), "grad_norm": np.float32(0.5)})
    no_peak.flush()
    assert log.events and not any("mfu" in e or "flops_per_s" in e for e in log.events)


def _tensorboard_tags(workdir) -> set:
    """Scalar tags of tensorboardX event files (TFRecord framing, Event protos)."""
    import pathlib
    import struct
    from tensorboardX.proto import event_pb2
    tags = set()
    for path in pathlib.Path(workdir).glob("events.out.tfevents.*"):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            tags |= {v.tag for v in event.summary.value}
    return tags


def test_a_run_traces_its_profile_steps_and_logs_mfu(tmp_path, capsys):
    import gzip
    import json
    from lstm_jax import train
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(max_steps=12, log_every=4, profile_steps="4:8"), workdir,
                             progress=False)
    runs = list((workdir / "profile" / "plugins" / "profile").iterdir())
    assert len(runs) == 1, runs   # TensorBoard's profile plugin layout: plugins/profile/<run>/
    assert list(runs[0].glob("*.xplane.pb"))
    perfetto = list(runs[0].glob("*.trace.json.gz"))
    assert perfetto and "traceEvents" in json.loads(gzip.decompress(perfetto[0].read_bytes()))
    assert "profiler trace of steps 4:8 written to" in capsys.readouterr().out
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    trained = [e for e in events if "chars_per_s" in e]
    assert trained and all(0 < e["mfu"] < 1 and e["flops_per_s"] > 0 for e in trained[1:])
    assert "profile_s" in trained[1] and "profile_s" in trained[2]   # start at 4, stop at 8
    assert {"flops_per_s", "mfu"} <= _tensorboard_tags(workdir)


@pytest.mark.parametrize("spec", ["5", "8:4", "3:3", "a:b", "-1:4", "1:2:3"])
def test_bad_profile_steps_are_refused_in_one_line(spec):
    from lstm_jax import config as config_lib
    with pytest.raises(ValueError, match=r"^profile_steps must be 'A:B' with integers 0 <= A < B"):
        config_lib.validate(tiny_config(profile_steps=spec))


def test_profile_steps_parse_and_a_session_past_a_does_not_trace(tmp_path):
    from lstm_jax import config as config_lib
    assert config_lib.profile_window("") is None and config_lib.profile_window("10:20") == (10, 20)
    assert periodic.Profiler("10:20", tmp_path, start_step=15).window is None
    assert periodic.Profiler("10:20", tmp_path, start_step=10).window == (10, 20)


# --- stop signals -------------------------------------------------------------------------------

def test_a_stop_signal_is_recorded_until_the_block_ends_then_the_old_handler_is_back():
    old = signal.getsignal(signal.SIGTERM)
    with periodic.StopRequests(agree_every=5) as stop:
        assert not stop.requested(1, None)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)    # a second one is recorded too: no exit mid-save
        assert stop.requested(2, None) and stop.signal == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is old


def test_the_sampler_gives_a_second_signal_back_and_passes_the_first_to_an_outer_handler():
    calls = []
    old = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        with signals.StopSignals(once=True) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signal_name == "SIGTERM" and calls == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) is not stop._handle   # the outer one is back
    finally:
        signal.signal(signal.SIGTERM, old)


def test_the_sampler_leaves_an_ignored_signal_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.StopSignals(once=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)

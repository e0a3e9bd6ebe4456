"""Train step: Keras RMSprop rule, learning, compile-once, accumulation, non-finite loss."""
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import tiny_config, write_corpus
from lstm_jax import checkpoint, evaluate, parallel, steps, train


def keras_rmsprop_step(var, grad, velocity, lr=0.01, rho=0.9, eps=1e-7):
    """keras/src/optimizers/rmsprop.py (Keras 3, centered=False, momentum=0)."""
    velocity = rho * velocity + (1 - rho) * grad ** 2
    return var - lr * grad / np.sqrt(velocity + eps), velocity


def test_rmsprop_update_equals_keras_formula():
    config = tiny_config(**{"optimizer.clip_norm": 0.0, "optimizer.schedule": "constant"})
    tx = steps.make_optimizer(config, total_steps=10)
    var = np.array([0.5, -1.0, 2.0], np.float32)
    grads = [np.array([0.1, -0.2, 3.0], np.float32), np.array([1e-4, 0.5, -0.7], np.float32)]
    params, opt_state = jnp.asarray(var), tx.init(jnp.asarray(var))
    want, velocity = var.astype(np.float64), np.zeros(3)
    for g in grads:
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        params = params + updates
        want, velocity = keras_rmsprop_step(want, g.astype(np.float64), velocity)
    np.testing.assert_allclose(np.asarray(params), want, rtol=1e-6)


def test_clipping_bounds_the_global_norm():
    config = tiny_config(**{"optimizer.clip_norm": 1.0, "optimizer.schedule": "constant"})
    tx = steps.make_optimizer(config, 10)
    g = jnp.array([30.0, 40.0])               # norm 50 -> clipped to norm 1
    updates, _ = tx.update(g, tx.init(jnp.zeros(2)), jnp.zeros(2))
    clipped = g / 50.0
    expected = -0.01 * clipped / np.sqrt(0.1 * clipped ** 2 + 1e-7)
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


def _setup(config, vocab_size=20):
    mesh = parallel.make_mesh(jax.devices()[:1])
    mcfg = steps.model_config(config, vocab_size)
    tx = steps.make_optimizer(config, 100)
    graphdef, state = steps.init_state(config, mcfg, tx, mesh)
    return mesh, tx, graphdef, state


def test_train_step_compiles_once_and_lowers_the_loss():
    config = tiny_config(objective="window")
    mesh, tx, graphdef, state = _setup(config)
    step = steps.make_train_step(graphdef, tx, config)
    rng = np.random.default_rng(0)
    pattern = np.tile(np.arange(20), 10)
    losses = []
    for i in range(50):
        starts = rng.integers(0, 100, 16)
        batch = np.stack([pattern[s:s + 21] for s in starts]).astype(np.int32)
        state, metrics = step(state, parallel.to_global(batch, mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1, "the train step recompiled"
    assert int(state.step) == 50
    assert losses[0] > math.log(20) - 0.3 and losses[-1] < 0.6 * losses[0]


def test_gradient_accumulation_equals_the_full_batch():
    config = tiny_config(**{"optimizer.clip_norm": 0.0})
    _, _, graphdef, state = _setup(config)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 20, (16, 21)), jnp.int32)
    key = jax.random.key(0)
    full = steps.loss_and_grads(state.params, graphdef, batch, key, objective="sequence", accum_steps=1)
    acc = steps.loss_and_grads(state.params, graphdef, batch, key, objective="sequence", accum_steps=4)
    np.testing.assert_allclose(full[0], acc[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(acc[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_dropout_is_used_in_training_only_and_scaled_by_one_over_keep():
    """Fails if dropout is ignored in training (two keys give the same loss), if eval_step
    applies it (its loss then differs from the no-dropout loss), or if the kept activations are
    not scaled by 1/keep (the mean over many masks of the logits, which are linear in the dropped
    head input, then misses the no-dropout logits by a factor keep)."""
    config = tiny_config(**{"model.dropout": 0.5, "model.num_layers": 2})
    _, _, graphdef, state = _setup(config)
    batch = jnp.asarray(np.random.default_rng(2).integers(0, 20, (4, 21)), jnp.int32)
    l1, _ = steps.loss_fn(state.params, graphdef, batch, jax.random.key(1), "sequence")
    l2, _ = steps.loss_fn(state.params, graphdef, batch, jax.random.key(2), "sequence")
    l0, _ = steps.loss_fn(state.params, graphdef, batch, None, "sequence")
    assert float(l1) != float(l2)
    loss_sum, _ = steps.make_eval_step(graphdef)(state.params, batch)
    np.testing.assert_allclose(float(loss_sum.sum()) / batch[:, 1:].size, float(l0), rtol=1e-6)

    g1, s1 = _setup(tiny_config(**{"model.dropout": 0.5}))[2:]
    one_layer = nnx.merge(g1, s1.params)   # one layer: dropout only on the head's input
    plain = one_layer(batch[:, :-1])
    keys = jax.random.split(jax.random.key(3), 2000)
    mean = jax.vmap(lambda k: one_layer(batch[:, :-1], dropout_key=k))(keys).mean(0)
    # The logits minus the head's bias are linear in the dropped input: E[mean - b] = plain - b
    # with the 1/keep scale, keep * (plain - b) without it. Their size is small (max |plain - b|
    # ~0.095 at this init), so compare against it, not an absolute tolerance: observed max
    # |mean - plain| ~0.0027 (3% of it) and a least-squares slope of 1.001 over the 1,600
    # logits with the scale; 0.047 (50%) and 0.501 without (checked by removing `/ keep`).
    signal = plain - one_layer.head_bias[...]
    np.testing.assert_allclose(mean, plain, atol=0.1 * float(jnp.abs(signal).max()))
    slope = float(((mean - one_layer.head_bias[...]) * signal).sum() / (signal ** 2).sum())
    assert abs(slope - 1.0) < 0.05, f"E[dropout logits] = {slope:.3f} x the plain ones, not 1"


def test_train_and_evaluate_learns_repetitive_text_and_writes_the_workdir(tmp_path, repetitive_corpus):
    config = tiny_config(corpus=repetitive_corpus, max_steps=40, **{"optimizer.learning_rate": 0.02})
    result = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    workdir = tmp_path / "run"
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train_loss"] for r in records if "train_loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert all({"step", "epoch", "elapsed_s"} <= r.keys() for r in records)
    assert train_losses[-1] < 0.5 * train_losses[0]
    assert evals and {"val_loss", "val_bpc", "val_last_loss"} <= evals[-1].keys()
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden_size"] == 32
    assert json.loads((workdir / "vocab.json").read_text())["chars"] == list(result.vocab.chars)
    samples = (workdir / "samples.txt").read_text()
    for t in (0.2, 0.5, 1.0, 1.2):
        assert f"temperature {t}" in samples
    assert result.step == 40 and isinstance(result.model, nnx.Module)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path, repetitive_corpus, monkeypatch):
    """A NaN loss after a resume stops training with a message that is true about the disk: the
    step-10 checkpoint (vouched for by its evaluation) stays the latest. Fails if the NaN state is
    saved, if the message claims a checkpoint that does not exist, or if training goes on."""
    from lstm_jax.checkpoint import Checkpointer
    original = steps.loss_fn
    config = tiny_config(corpus=repetitive_corpus, max_steps=10)
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.setattr(steps, "loss_fn", lambda *a: (original(*a)[0] * jnp.nan, None))
    config.max_steps = 20
    with pytest.raises(steps.TrainingError, match=r"diverged at step 10: train_loss nan.*the latest "
                                                  r"checkpoint is step 10.*learning_rate=0.001"):
        train.train_and_evaluate(config, tmp_path / "run", progress=False)
    c = Checkpointer(tmp_path / "run")
    assert c.all_steps() == [10]            # the NaN state was never saved
    c.close()


def test_an_exploding_loss_stops_and_no_diverged_checkpoint_is_left_latest(tmp_path, repetitive_corpus):
    """learning_rate=1e6 with clipping keeps the loss finite but huge (no NaN): the guard
    (loss above ln V + 1 for 20 steps) must stop the run, and every checkpoint left in
    checkpoints/ must hold params whose loss is still sane. Fails without the explosion check
    (the run 'succeeds' with a garbage latest checkpoint) or if checkpoints saved after the
    divergence stay in place."""
    from lstm_jax.checkpoint import Checkpointer
    config = tiny_config(corpus=repetitive_corpus, max_steps=40, log_every=1,
                         **{"optimizer.learning_rate": 1e6, "checkpoint.every_steps": 1})
    with pytest.raises(steps.TrainingError, match=r"diverged at step \d+: train_loss above ln V "
                                                  r"\+ 1 = \d\.\d\d for 20 steps") as error:
        train.train_and_evaluate(config, tmp_path / "run", progress=False)
    message = str(error.value)
    workdir = tmp_path / "run"
    c = Checkpointer(workdir)
    left = c.all_steps()
    c.close()
    diverged_at = int(message.split("diverged at step ")[1].split(":")[0])
    assert all(s < diverged_at for s in left)
    assert sorted(int(p.name) for p in (workdir / "diverged_checkpoints").iterdir())
    if left:
        assert f"the latest checkpoint is step {max(left)}" in message
        model, vocab, _ = checkpoint.restore_model(workdir)
        tokens = jnp.asarray(vocab.encode("the quick brown fox jumps over the lazy dog. ")[None], jnp.int32)
        logits = model(tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        assert float(loss) < math.log(len(vocab)) + 1
    else:
        assert "no checkpoint was saved before it" in message


# --- the learning-rate schedule -------------------------------------------------------------

def test_cosine_schedule_reaches_its_final_rate_at_the_run_length():
    """`max_steps` is the cosine horizon (a max_steps run used to stop at 0.55 lr, never decayed).
    Fails if the horizon is num_epochs * steps_per_epoch or the warm-up is skipped."""
    config = tiny_config(**{"optimizer.warmup_steps": 4, "optimizer.learning_rate": 0.01})
    pieces = steps.lr_segments(config, 20)
    lrs = [steps.lr_at(pieces, t) for t in range(25)]
    np.testing.assert_allclose(lrs[:5], [0.0, 0.0025, 0.005, 0.0075, 0.01], atol=1e-12)
    np.testing.assert_allclose(lrs[12], 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    np.testing.assert_allclose(lrs[20:], [0.001] * 5)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_the_optimizer_applies_the_schedule_step_by_step():
    """Each update is scaled by lr_at(step): compares optax's updates for a constant gradient with
    the RMSprop formula at the host-side rate. Fails if the traced schedule and lr_at disagree or
    are off by one step."""
    config = tiny_config(**{"optimizer.clip_norm": 0.0, "optimizer.warmup_steps": 2})
    pieces = steps.lr_segments(config, 6)
    pieces, _ = steps.continue_lr_segments(pieces, config, 4, 10)
    tx = steps.make_optimizer(config, 10, pieces)
    g, v = np.float64(0.5), 0.0
    params, opt_state = jnp.zeros(1), tx.init(jnp.zeros(1))
    for t in range(10):
        updates, opt_state = tx.update(jnp.full(1, g, jnp.float32), opt_state, params)
        v = 0.9 * v + 0.1 * g * g
        np.testing.assert_allclose(float(updates[0]), -steps.lr_at(pieces, t) * g / math.sqrt(v + 1e-7),
                                   rtol=1e-5, err_msg=f"update {t}")


@pytest.mark.parametrize("resume_at,new_total,expect", [
    (20, 40, "stays at its final value"),   # a finished run extended: a constant tail
    (10, 40, "decays from"),                # extended mid-run: re-stretched decay to the new end
    (2, 40, "warm-up continues"),           # still warming up: the same warm-up, new horizon
])
def test_a_longer_run_continues_the_learning_rate_without_a_jump(resume_at, new_total, expect):
    """Raising num_epochs/max_steps on resume: the rate at the resume step is unchanged, the new
    schedule never rises after the warm-up, and it ends at the final rate. Fails with the old
    behaviour (a fresh cosine over the new horizon: 0.1 lr -> 0.55 lr when doubling)."""
    config = tiny_config(**{"optimizer.warmup_steps": 4})
    old = steps.lr_segments(config, 20)
    new, how = steps.continue_lr_segments(old, config, resume_at, new_total)
    assert expect in how
    for t in range(resume_at + 1):
        assert steps.lr_at(new, t) == pytest.approx(steps.lr_at(old, t), rel=1e-9)
    after = [steps.lr_at(new, t) for t in range(max(resume_at, 4), new_total + 3)]
    assert all(a >= b - 1e-15 for a, b in zip(after, after[1:]))
    assert after[-1] == pytest.approx(config.optimizer.learning_rate * config.optimizer.final_lr_fraction)


def test_extending_a_run_logs_a_continuous_learning_rate(tmp_path, repetitive_corpus, capsys):
    """End to end: a 10-step cosine run extended to 20 steps logs learning_rate events that do
    not jump at step 10, and says how the rate continues."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config(corpus=repetitive_corpus, max_steps=10, log_every=1), workdir,
                             progress=False)
    train.train_and_evaluate(tiny_config(corpus=repetitive_corpus, max_steps=20, log_every=1), workdir,
                             progress=False)
    assert "10 -> 20 steps: the learning rate continues from step 10 and stays at its final value" \
        in capsys.readouterr().out
    lrs = {r["step"]: r["learning_rate"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
           if "learning_rate" in r}
    # the event at step s reports the rate of update s - 1 (the last one it covers)
    assert sorted(lrs) == list(range(1, 21))
    np.testing.assert_allclose(lrs[10], 0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * 9 / 10)), rtol=1e-6)
    np.testing.assert_allclose([lrs[s] for s in range(11, 21)], [0.001] * 10, rtol=1e-6)
    assert lrs[1] > lrs[5] > lrs[9] > lrs[10] > lrs[11]


# --- evaluation: val_loss and val_last_loss against NumPy --------------------------------------

def _numpy_logits(params, tokens_T):
    """float64 forward pass of a 1-layer CharLSTM (gates i, f, g, o) over one row."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(params))
    layer = p["layers"][0]
    sig = lambda x: 1 / (1 + np.exp(-x))   # noqa: E731
    H = layer["kernel_rec"].shape[0]
    h, c, out = np.zeros(H), np.zeros(H), []
    for tok in tokens_T:
        z = layer["kernel_in"][tok] + h @ layer["kernel_rec"] + layer["bias"]
        i, f, g, o = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        out.append(h @ p["head_kernel"] + p["head_bias"])
    return np.array(out)


def test_val_loss_and_val_last_loss_equal_a_numpy_reference_with_padding(tmp_path):
    """The held-out windows (37 of them, padded to the 16-row eval batch with zero-weight rows):
    val_loss = mean next-char loss over every position, val_last_loss = mean loss on the char
    after each window. Fails if the padding rows are counted, if val_loss averages per row
    instead of per char, or if val_last_loss takes another position."""
    from lstm_jax import data
    text = "".join(np.random.default_rng(0).choice(list("abcdefgh \n"), 3000))
    config = tiny_config(corpus=write_corpus(tmp_path, text), eval_window=12, eval_stride=4,
                         eval_max_windows=37, val_fraction=0.1)
    plan = train.plan_run(config)
    assert len(plan.windows) == 37 and len(plan.windows) % plan.batch
    tx = steps.make_optimizer(config, 10)
    graphdef, state = steps.init_state(config, plan.model_cfg, tx, plan.mesh)
    got = evaluate.Evaluator(plan, graphdef)(state.params)
    losses = []
    for row in plan.windows:
        logits = _numpy_logits(state.params, row[:-1])
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
        losses.append(-logp[np.arange(12), row[1:]])
    losses = np.array(losses)
    np.testing.assert_allclose(got["val_loss"], losses.mean(), rtol=1e-5)
    np.testing.assert_allclose(got["val_last_loss"], losses[:, -1].mean(), rtol=1e-5)
    np.testing.assert_allclose(got["val_bpc"], losses.mean() / math.log(2), rtol=1e-5)
    assert isinstance(data.Vocab, type)


# --- the loop's cadence and resumed epoch loss ------------------------------------------------

def test_eval_every_and_sample_every_epochs_are_honoured(tmp_path):
    """Evaluations at every eval_every steps and at epoch ends; samples after every
    sample.every_epochs epochs and at the end. Fails if either setting is ignored."""
    text = "the quick brown fox jumps over the lazy dog. " * 30
    config = tiny_config(corpus=write_corpus(tmp_path, text), max_steps=0, num_epochs=4,
                         eval_every=3, **{"sample.every_epochs": 3, "sample.length": 5})
    result = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    spe = result.step // 4
    evals = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "val_loss" in r]
    assert evals == sorted(set(range(3, 4 * spe + 1, 3)) | {spe * e for e in (1, 2, 3, 4)})
    blocks = [int(line.split()[2]) for line in (tmp_path / "run" / "samples.txt").read_text().splitlines()
              if line.startswith("----- step")]
    assert blocks == [3 * spe, 4 * spe]


def test_epoch_train_loss_after_a_mid_epoch_resume_equals_the_uninterrupted_run(tmp_path):
    """The epoch's running loss is saved with the checkpoint, so a run resumed mid-epoch logs the
    same epoch_train_loss as an uninterrupted one. Fails if the resumed run averages only the
    steps of its own session (or divides by the wrong count)."""
    text = "the quick brown fox jumps over the lazy dog. " * 300    # 40 steps per epoch
    corpus = write_corpus(tmp_path, text)
    base = {"corpus": corpus, "max_steps": 0, "num_epochs": 2, "optimizer.schedule": "constant"}
    train.train_and_evaluate(tiny_config(**base), tmp_path / "whole", progress=False)
    train.train_and_evaluate(tiny_config(**{**base, "max_steps": 50}), tmp_path / "split", progress=False)
    train.train_and_evaluate(tiny_config(**base), tmp_path / "split", progress=False)

    def epoch_losses(workdir):
        return {r["step"]: r["epoch_train_loss"] for r in map(json.loads, (workdir / "metrics.jsonl").open())
                if "epoch_train_loss" in r}
    whole, split = epoch_losses(tmp_path / "whole"), epoch_losses(tmp_path / "split")
    assert sorted(whole) == [40, 80] and split == whole


def test_chars_per_s_excludes_evaluation_time_and_reports_it(tmp_path, repetitive_corpus, monkeypatch):
    """An evaluation that takes 0.5 s (far longer than 5 tiny steps) must not depress the next
    event's chars_per_s; its time is reported as eval_s. Fails with the old timer, which reset
    only on some flushes and counted the evaluation into the step rate."""
    import time as time_lib
    original = evaluate.Evaluator.__call__

    def slow(self, params):
        time_lib.sleep(0.5)
        return original(self, params)
    monkeypatch.setattr(evaluate.Evaluator, "__call__", slow)
    config = tiny_config(corpus=repetitive_corpus, max_steps=40, log_every=5, eval_every=10)
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
    events = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open()) if "chars_per_s" in r]
    rates = sorted(r["chars_per_s"] for r in events)
    assert rates[0] > rates[len(rates) // 2] / 4, rates     # no event carries the 0.5 s pauses
    assert [r["step"] for r in events if r.get("eval_s", 0) >= 0.5] == [15, 25, 35]


def test_val_fraction_zero_trains_without_evaluation(tmp_path, repetitive_corpus):
    """val_fraction=0 is allowed (no held-out split): training, checkpoints and samples work and
    no evaluation event is written. Fails if an empty split reaches the evaluator."""
    result = train.train_and_evaluate(tiny_config(corpus=repetitive_corpus, val_fraction=0.0),
                                      tmp_path / "run", progress=False)
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 20 and not any("val_loss" in e for e in events)
    assert "----- temperature 1.2" in (tmp_path / "run" / "samples.txt").read_text()


# --- the stream objective: the LSTM state carried between steps -------------------------------

def test_a_carried_state_equals_running_the_whole_sequence_in_one_call():
    """Two halves with the carry handed over give the logits of one call over the whole
    sequence (and loss_fn returns that carry). Fails if the model or loss_fn drops the given
    carry (restarting from zero) or returns another layer's state."""
    config = tiny_config(objective="stream", **{"model.num_layers": 2})
    _, _, graphdef, state = _setup(config)
    model = nnx.merge(graphdef, state.params)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 20, (3, 41)), jnp.int32)
    whole = model(tokens[:, :40])
    first, carry = model(tokens[:, :20], return_carry=True)
    second, _ = model(tokens[:, 20:40], carry, return_carry=True)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-5, atol=1e-6)
    _, from_loss = steps.loss_fn(state.params, graphdef, tokens[:, :21], None, "stream")
    for a, b in zip(jax.tree.leaves(from_loss), jax.tree.leaves(carry)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_stream_step_carries_the_state_and_resets_it_at_each_epoch():
    """After step i the state holds the final (h, c) of step i's batch run from step i-1's
    carry, except that the first step of every epoch starts from zero. Fails without the reset
    (epochs would leak state across the per-epoch offset) or if the carry is not passed on."""
    config = tiny_config(objective="stream")
    mesh, tx, graphdef, state = _setup(config)
    step = steps.make_train_step(graphdef, tx, config, steps_per_epoch=2, mesh=mesh)
    batches = [jnp.asarray(np.random.default_rng(i).integers(0, 20, (16, 21)), jnp.int32) for i in range(3)]
    for i, batch in enumerate(batches):
        params, carry = jax.tree.map(jnp.copy, (state.params, state.carry))
        start = None if i % 2 == 0 else carry                       # epoch boundaries: steps 0, 2
        _, want = steps.loss_fn(params, graphdef, batch, None, "stream", start)
        state, _ = step(state, batch, jax.random.key(0))
        for got, exp in zip(jax.tree.leaves(state.carry), jax.tree.leaves(want)):
            np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6, err_msg=f"step {i}")
    assert step._cache_size() == 1


def test_stream_gradient_accumulation_equals_the_full_batch_and_keeps_each_streams_carry():
    """Micro-batches split the streams: the loss, gradients and every stream's next carry
    equal one full-batch step. Fails if micro-batch rows and carry rows are taken in different
    orders (streams would continue from another stream's state)."""
    config = tiny_config(objective="stream", **{"optimizer.clip_norm": 0.0})
    _, _, graphdef, state = _setup(config)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 20, (16, 21)), jnp.int32)
    carry = jax.tree.map(lambda c: jax.random.normal(jax.random.key(7), c.shape) * 0.5, state.carry)
    key = jax.random.key(0)
    full = steps.loss_and_grads(state.params, graphdef, batch, key, objective="stream", accum_steps=1, carry=carry)
    acc = steps.loss_and_grads(state.params, graphdef, batch, key, objective="stream", accum_steps=4, carry=carry)
    np.testing.assert_allclose(full[0], acc[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full[1:]), jax.tree.leaves(acc[1:])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)   # sums in another order: ~1e-7 observed


def test_whole_text_evaluation_equals_a_numpy_reference(tmp_path):
    """TextEval over 3 streams of a 900-char text, read in 256-char calls with the state carried
    across calls, against a float64 NumPy LSTM run over each stream in one go. Fails if the
    carry is dropped between calls, if padding counts, or if a stream boundary char is skipped
    or counted twice."""
    from lstm_jax import data
    config = tiny_config()
    _, _, graphdef, state = _setup(config)
    params = jax.tree.map(lambda p: p * 4, state.params)   # a fresh init barely uses its state
    tokens = np.random.default_rng(5).integers(0, 20, 900)
    evaluator = evaluate.TextEval(graphdef, steps.model_config(config, 20), tokens,
                              parallel.make_mesh(jax.devices()[:1]), streams=3)
    got = evaluator(params)
    streams, weight = data.text_streams(tokens, 3)
    total = 0.0
    for row, w in zip(streams, weight):
        logits = _numpy_logits(params, row[:-1])
        shift = logits.max(1, keepdims=True)
        logp = logits - shift - np.log(np.exp(logits - shift).sum(1, keepdims=True))
        total += (-logp[np.arange(len(row) - 1), row[1:]] * w).sum()
    assert evaluator.chars == 899
    np.testing.assert_allclose(got, total / 899, rtol=1e-5)


def test_a_time_budget_fixes_the_run_length_once_and_a_resume_keeps_it(tmp_path, repetitive_corpus,
                                                                        capsys, monkeypatch):
    """time_budget_s: the length is set once from the measured rate, the cosine ends at it (the
    last update at the final rate), it is saved, and the same command afterwards has nothing left
    to train (no second measurement). Fails if the budget is ignored (the run goes on for all
    epochs), if the schedule keeps the old horizon, or if a resume measures again. The loop's
    clock is a fake that advances 10 ms per reading, so the measured rate and the length it fixes
    do not depend on the machine (under load, compiling once ate the real 1.5 s and the length
    was fixed at the current step, the cosine cut short)."""
    import types
    from lstm_jax import periodic
    from lstm_jax.checkpoint import Checkpointer
    clock = iter(range(1, 10**9))
    monkeypatch.setattr(periodic, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 0.01))
    config = tiny_config(corpus=repetitive_corpus, max_steps=0, num_epochs=20, time_budget_s=1.5,
                         log_every=5, **{"checkpoint.every_steps": 0})
    result = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert re.search(rf"time budget 1.5 s of wall time.*: {result.step} steps", out), out
    c = Checkpointer(tmp_path / "run")
    meta = c.metadata()
    c.close()
    assert meta["total_steps"] == result.step < 20 * meta["steps_per_epoch"]
    assert meta["budget_fixed_for"] == 1.5
    assert steps.lr_at(meta["lr_pieces"], result.step) == pytest.approx(0.001)
    again = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert again.step == result.step and "nothing to train" in out and "time budget" not in out


def test_an_early_loss_spike_that_recovers_is_not_divergence(tmp_path, repetitive_corpus, monkeypatch):
    """A loss above ln V + 1 for a few steps (RMSprop's first updates can do this) must not stop
    the run; fails if the guard stops at the first high loss."""
    original = steps.loss_fn

    def spiky(params, graphdef, batch, key, objective, carry=None):
        loss, new_carry = original(params, graphdef, batch, key, objective, carry)
        return loss + 20.0 * (loss > 2.9), new_carry     # the first few (high-loss) steps spike
    monkeypatch.setattr(steps, "loss_fn", spiky)
    result = train.train_and_evaluate(tiny_config(corpus=repetitive_corpus, max_steps=30, log_every=1,
                                                  **{"optimizer.learning_rate": 0.02}),
                                      tmp_path / "run", progress=False)
    losses = [r["train_loss"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
              if "train_loss" in r]
    assert result.step == 30 and max(losses) > 20 and losses[-1] < 3

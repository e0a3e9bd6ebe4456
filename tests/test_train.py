"""Train step: Keras RMSprop rule, learning, compile-once, accumulation, non-finite loss."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_config, write_corpus
from lstm_jax import parallel, train


def keras_rmsprop_step(var, grad, velocity, lr=0.01, rho=0.9, eps=1e-7):
    """keras/src/optimizers/rmsprop.py (Keras 3, centered=False, momentum=0)."""
    velocity = rho * velocity + (1 - rho) * grad ** 2
    return var - lr * grad / np.sqrt(velocity + eps), velocity


def test_rmsprop_update_equals_keras_formula():
    config = tiny_config(**{"optimizer.clip_norm": 0.0, "optimizer.schedule": "constant"})
    tx = train.make_optimizer(config, total_steps=10)
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
    tx = train.make_optimizer(config, 10)
    g = jnp.array([30.0, 40.0])               # norm 50 -> clipped to norm 1
    updates, _ = tx.update(g, tx.init(jnp.zeros(2)), jnp.zeros(2))
    clipped = g / 50.0
    expected = -0.01 * clipped / np.sqrt(0.1 * clipped ** 2 + 1e-7)
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


def _setup(config, vocab_size=20):
    mesh = parallel.make_mesh(jax.devices()[:1])
    mcfg = train.model_config(config, vocab_size)
    tx = train.make_optimizer(config, 100)
    graphdef, state = train.init_state(config, mcfg, tx, mesh)
    return mesh, tx, graphdef, state


def test_train_step_compiles_once_and_lowers_the_loss():
    config = tiny_config(objective="window")
    mesh, tx, graphdef, state = _setup(config)
    step = train.make_train_step(graphdef, tx, config)
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
    full = train.loss_and_grads(state.params, graphdef, batch, key, objective="sequence", accum_steps=1)
    acc = train.loss_and_grads(state.params, graphdef, batch, key, objective="sequence", accum_steps=4)
    np.testing.assert_allclose(full[0], acc[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(acc[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_dropout_is_used_in_training_only():
    config = tiny_config(**{"model.dropout": 0.5, "model.num_layers": 2})
    _, _, graphdef, state = _setup(config)
    batch = jnp.asarray(np.random.default_rng(2).integers(0, 20, (4, 21)), jnp.int32)
    l1 = train.loss_fn(state.params, graphdef, batch, jax.random.key(1), "sequence")
    l2 = train.loss_fn(state.params, graphdef, batch, jax.random.key(2), "sequence")
    l0 = train.loss_fn(state.params, graphdef, batch, None, "sequence")
    assert float(l1) != float(l2) and float(l0) == float(train.loss_fn(state.params, graphdef, batch, None, "sequence"))


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
    assert abs(evals[-1]["val_bpc"] - evals[-1]["val_loss"] / math.log(2)) < 1e-9
    assert json.loads((workdir / "config.json").read_text())["model"]["hidden_size"] == 32
    assert json.loads((workdir / "vocab.json").read_text())["chars"] == list(result.vocab.chars)
    samples = (workdir / "samples.txt").read_text()
    for t in (0.2, 0.5, 1.0, 1.2):
        assert f"temperature {t}" in samples
    assert result.step == 40 and isinstance(result.model, nnx.Module)


def test_non_finite_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path, repetitive_corpus, monkeypatch):
    original = train.loss_fn
    config = tiny_config(corpus=repetitive_corpus, max_steps=10)
    train.train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.setattr(train, "loss_fn", lambda *a: original(*a) * jnp.nan)
    config.max_steps = 20
    with pytest.raises(train.TrainingError, match="became nan.*clip_norm"):
        train.train_and_evaluate(config, tmp_path / "run", progress=False)
    from lstm_jax.checkpoint import Checkpointer
    c = Checkpointer(tmp_path / "run")
    assert c.latest_step() == 10            # the NaN state was never saved
    c.close()

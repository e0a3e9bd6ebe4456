"""Held-out evaluation (lstm_jax.evaluate): the fixed, bounded subset a time-budgeted run's
periodic evaluations read, and a budgeted run that uses it (the whole text at the end)."""
import json
import types

import numpy as np
import pytest

from conftest import config_file, tiny_config
from lstm_jax import evaluate, periodic, train


def test_the_subset_is_fixed_bounded_and_drawn_from_the_whole_held_out_text():
    plan = train.plan_run(tiny_config(eval_max_windows=512))
    whole = evaluate.Evaluator(plan, plan.graphdef)
    assert whole.chars == len(plan.windows) * plan.config.eval_window + len(plan.corpus.val_tokens) - 1
    for max_chars in (2_000, 9_000):   # (at least one window, however small)
        a = evaluate.Evaluator(plan, plan.graphdef, max_chars)
        b = evaluate.Evaluator(plan, plan.graphdef, max_chars)
        assert 0 < a.chars <= max_chars and a.chars == b.chars
        np.testing.assert_array_equal(a.windows, b.windows)            # the same every time
        rows = [int(np.flatnonzero((plan.windows == w).all(axis=1))[0]) for w in a.windows]
        assert rows == sorted(rows) and (len(rows) == 1 or rows[-1] > len(plan.windows) // 2)  # spread
        np.testing.assert_array_equal(a.text.tokens[0, :10], np.asarray(plan.corpus.val_tokens[:10]))
    from lstm_jax import steps
    state = steps.init_like(plan.config, plan.model_cfg, plan.tx, plan.abstract_state)
    small = evaluate.Evaluator(plan, plan.graphdef, 2_000)(state.params)
    full = whole(state.params)
    assert small["val_chars"] == evaluate.Evaluator(plan, plan.graphdef, 2_000).chars < full["val_chars"]
    assert small["val_loss"] == pytest.approx(full["val_loss"], rel=0.05)   # untrained: ~ln V both


def test_the_recipes_whole_evaluation_scores_each_held_out_char_once():
    """configs/recipe.py's windows tile the held-out text (the end of a budgeted run evaluates it
    whole twice: windows every 3 chars read it ~8 times over, most of that cost)."""
    config = config_file("recipe", corpus="builtin", time_budget_s=60.0, val_fraction=0.01,
                         **{"model.hidden_size": 32, "model.num_layers": 1, "model.dropout": 0.0,
                            "model.dtype": "float32"})
    plan = train.plan_run(config)
    val, w = np.asarray(plan.corpus.val_tokens), config.eval_window
    assert len(plan.windows) == (len(val) - 1) // w <= config.eval_max_windows
    np.testing.assert_array_equal(plan.windows[:, :-1].ravel(), val[:len(plan.windows) * w])
    whole = evaluate.Evaluator(plan, plan.graphdef)
    assert whole.chars <= 2 * (len(val) - 1)      # the windows' positions + the text's chars


def test_a_budgeted_run_evaluates_a_subset_periodically_and_the_whole_text_at_the_end(
        tmp_path, monkeypatch, capsys):
    """The loop's clock is a fake (10 ms per reading), so the length and subset do not depend on
    the machine's load."""
    clock = iter(range(1, 10**9))
    monkeypatch.setattr(periodic, "time", types.SimpleNamespace(perf_counter=lambda: next(clock) * 0.01))
    config = tiny_config(max_steps=0, num_epochs=50, time_budget_s=20.0, eval_every=20,
                         eval_max_windows=2048, log_every=10, **{"checkpoint.every_steps": 20})
    result = train.train_and_evaluate(config, tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert "s of wall time (steps, evaluations, checkpoints, samples)" in out, out
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [e for e in events if "val_loss" in e]
    whole = evals[-1]["val_chars"]
    assert evals[-1]["step"] == result.step
    first = next(i for i, e in enumerate(evals) if e["val_chars"] < whole)   # once the budget is fixed
    later = evals[first:-1]
    assert later and len({e["val_chars"] for e in later}) == 1, [e["val_chars"] for e in evals]
    assert f"a fixed {later[0]['val_chars']:,}-char subset of the held-out text ({whole:,} chars at the end)" in out
    best = [e for e in events if "best_step" in e]
    assert all(e["best_val_chars"] == whole for e in best)

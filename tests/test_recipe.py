"""configs/recipe.py's choices (lstm_jax.recipe): what it picks from the corpus size, the budget and
the host, that a value set by the user wins, that a resumed run keeps the choices it started
with, and the one-line errors. The quality they buy is measured in benchmarks/bench_recipe.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, config_file
from lstm_jax import config as config_lib
from lstm_jax import recipe, train

AVX512_BF16 = {"avx512f", "avx2", "avx512_bf16", "amx_bf16"}   # the Intel host the rule was measured on


def _recipe_config(**overrides):
    return config_file("recipe", **overrides)


def _chosen(train_chars, budget_s, flags=AVX512_BF16, platform="cpu", vocab=65, **overrides):
    c = _recipe_config(time_budget_s=budget_s, **overrides)
    line = recipe.resolve(c, train_chars, vocab, platform=platform, flags=flags, cores=2)
    return c.model.hidden_size, c.model.dropout, c.model.dtype, line


def test_a_small_corpus_read_many_times_gets_the_dearest_model_with_dropout():
    assert _model(1_000_000, 900) == (256, 2, 0.3)
    hidden, dropout, dtype, line = _chosen(1_000_000, 900)
    assert dtype == "bfloat16"
    assert line.startswith("recipe: 2 layers of 256, dropout 0.3, bfloat16: 900 s trains ~") and \
        "of 1,000,000 training chars" in line and "would read" not in line


def test_a_corpus_read_about_once_gets_no_dropout_and_the_small_model_on_a_cpu():
    assert _chosen(100_000_000, 600)[:2] == (256, 0.0)
    assert _chosen(100_000_000, 600, platform="gpu")[0] == 512
    # for one model, dropout grows with the epochs the budget reads: 0 -> 0.5, never down
    drops = [_chosen(1_000_000, s, **{"model.hidden_size": 512, "num_epochs": 1000})[1]
             for s in (20, 120, 300, 900, 90_000)]
    assert drops == sorted(drops) and drops[-1] == 0.5 and drops[0] == 0.0


def _model(train_chars, budget_s, flags=AVX512_BF16, vocab=65, **overrides):
    c = _recipe_config(time_budget_s=budget_s, **overrides)
    recipe.resolve(c, train_chars, vocab, platform="cpu", flags=flags, cores=2)
    return c.model.hidden_size, c.model.num_layers, c.model.dropout


def test_the_model_is_the_last_the_budget_reads_14_times():
    """The measured cases on a 2-core AVX2 host (benchmarks/README.md, "Recipe"; the rule's
    estimated epochs): LSTM(512) read 7.7-11.6 times lost to a smaller model (Nietzsche, pydoc
    and the Vim manual at 10 minutes, Nietzsche and the Vim manual at 15) and won read 14.7
    times (pydoc at 15); LSTM(384) won read 17.1 times (pydoc at 10) and lost read 13.6
    (Nietzsche at 10); two layers of 256 read 14.6 and 15.6 times beat LSTM(384) (the Vim
    manual and Nietzsche at 15). With unit-scale embeddings (model.embed_scale) two layers of 256
    beat LSTM(512) on pydoc and Nietzsche (the Intel host), so LSTM(512) is no longer a CPU
    choice. So 10 minutes of the 0.6M-char Vim manual get 256 (384 would read it ~12.5 times,
    the line says so) and 15 get two layers; pydoc gets 384 at 10 and two layers at 15,
    Nietzsche 256 at 10 and two layers at 15. (The stdlib source, read under 14 times, is
    the next test's.)"""
    avx2 = {"avx2"}
    hidden, dropout, dtype, line = _chosen(600_068, 600, flags=avx2, vocab=117)
    assert (hidden, dropout, dtype) == (256, 0.3, "float32")
    assert line.endswith("; hidden 384 would read it ~12.5 times (~7.5M chars), under the 14 "
                         "(or 14M) a bigger model needs"), line
    assert _model(600_068, 900, flags=avx2, vocab=117) == (256, 2, 0.25)
    line = _chosen(600_068, 900, flags=avx2, vocab=117)[3]
    assert line.startswith("recipe: 2 layers of 256, dropout 0.25, float32: 900 s trains ~"), line
    assert "would read" not in line, line      # nothing dearer to choose
    assert _model(441_870, 600, flags=avx2, vocab=103) == (384, 1, 0.3)
    assert _chosen(441_870, 600, flags=avx2, vocab=103)[3].endswith(
        "; 2 layers of 256 would read it ~13.3 times (~5.9M chars), under the 14 (or 14M) a "
        "bigger model needs")
    assert _model(441_870, 900, flags=avx2, vocab=103) == (256, 2, 0.3)
    assert "would read" not in _chosen(441_870, 900, flags=avx2, vocab=103)[3]
    assert _model(570_849, 600, flags=avx2, vocab=57) == (256, 1, 0.3)
    assert _model(570_849, 900, flags=avx2, vocab=57) == (256, 2, 0.3)
    # a faster host reads more: the Intel host gets two layers from 5 minutes of Nietzsche on
    assert _chosen(570_849, 300, vocab=57)[2] == "bfloat16"
    assert _model(570_849, 300, vocab=57)[:2] == (256, 2)
    assert _model(1_000_000, 300, vocab=57)[:2] == (256, 1)   # 384 read ~11.6 times: not yet
    # a small num_epochs lowers the bar: what the run can read at most is all it needs
    assert _model(600_068, 600, flags=avx2, vocab=117, num_epochs=5)[:2] == (256, 2)


def test_a_corpus_too_large_to_read_14_times_gets_the_model_that_trains_14m_chars():
    """The stdlib source (11.5M training chars) is read 1-7 times in 5-15 minutes: the epoch rule
    alone would keep LSTM(256). Measured on the Intel host (benchmarks/README.md, "Recipe"; the
    rule's estimated chars): at 5 minutes LSTM(384) (~10.6M) tied with LSTM(256); at 10 it won
    (~21.2M), and two layers of 256 (~16.9M) won by more; at 15 two layers of 256 (~25.4M) won.
    The AVX2 host trains a third of that: LSTM(256) at 15 minutes, two layers at 45."""
    stdlib = dict(train_chars=11_512_068, vocab=222)
    assert _model(budget_s=300, **stdlib) == (256, 1, 0.05)
    assert _model(budget_s=450, **stdlib)[:2] == (384, 1)          # ~15.9M; two layers ~12.7M
    assert _model(budget_s=600, **stdlib) == (256, 2, 0.05)
    assert _model(budget_s=900, **stdlib) == (256, 2, 0.1)
    line = _chosen(budget_s=900, **stdlib)[3]
    assert line.startswith("recipe: 2 layers of 256, dropout 0.1, bfloat16: 900 s trains ~25.4M "
                           "chars here") and line.endswith(
        "; over the 14M chars a bigger model needs on a corpus it reads under 14 times"), line
    assert _chosen(budget_s=300, **stdlib)[3].endswith(
        "; hidden 384 would read it ~0.9 times (~10.6M chars), under the 14 (or 14M) a bigger "
        "model needs")
    assert _model(budget_s=900, flags={"avx2"}, **stdlib)[:2] == (256, 1)
    assert _model(budget_s=2700, flags={"avx2"}, **stdlib)[:2] == (256, 2)
    # 2 layers of 256 would read a 0.8M-char text ~12 times in 5 minutes: under 14, and 9.6M chars
    assert _model(800_000, 300, vocab=65)[:2] == (384, 1)
    # 2 layers read a 10M-char text 2.7 times in 15 minutes: 27M chars, enough; a num_epochs
    # of 2 is read whole (the epoch rule), 3 is not (the character rule)
    assert _model(10_000_000, 900, vocab=65, num_epochs=3)[:2] == (256, 2)
    assert _chosen(10_000_000, 900, vocab=65, num_epochs=3)[3].endswith("reads under 3 times")
    assert _chosen(10_000_000, 900, vocab=65, num_epochs=2)[3].endswith("the run ends early)")


def test_what_the_user_sets_narrows_the_models():
    """A hidden size set alone keeps one layer (the recipe's before it chose layers, so that
    `hidden_size384` means what it meant); a layer count set alone chooses among the MODELS
    with that many layers, else LSTM(256)s; both set leave nothing to choose but the rest."""
    avx2 = {"avx2"}
    assert _model(600_068, 900, flags=avx2, vocab=117, **{"model.hidden_size": 256}) == \
        (256, 1, 0.3)
    assert _model(600_068, 900, flags=avx2, vocab=117, **{"model.num_layers": 1})[:2] == (384, 1)
    assert _model(600_068, 900, flags=avx2, vocab=117, **{"model.num_layers": 2})[:2] == (256, 2)
    assert _model(600_068, 90, flags=avx2, vocab=117, **{"model.num_layers": 3})[:2] == (256, 3)
    c = _recipe_config(time_budget_s=900, **{"model.num_layers": 2, "model.hidden_size": 384})
    line = recipe.resolve(c, 600_068, 117, platform="cpu", flags=avx2, cores=2)
    assert (c.model.hidden_size, c.model.num_layers) == (384, 2)
    assert line.startswith("recipe: 2 layers of 384, dropout ") and "would read" not in line


def test_a_budget_that_fits_more_than_num_epochs_ends_early_and_says_so():
    """configs/recipe.py caps the run at 20 epochs: the dropout is the one for 20 epochs, the line
    says the run ends early, and the config keeps the cap (the budget stops before it otherwise)."""
    c = _recipe_config(time_budget_s=90_000)
    assert c.num_epochs == 20
    line = recipe.resolve(c, 1_000_000, 65, platform="cpu", flags=AVX512_BF16, cores=2)
    assert c.model.dropout == recipe.choose_dropout(20) == 0.3 and c.num_epochs == 20
    assert "num_epochs=20 of 1,000,000 training chars (the budget fits ~" in line and \
        "the run ends early" in line
    assert "ends early" not in _chosen(30_000_000, 600)[3]      # read about once: not capped


def test_bfloat16_only_where_the_cpu_has_it_and_accelerators_get_the_big_model():
    assert _chosen(1_000_000, 600, flags={"avx512f"})[2] == "float32"
    assert _chosen(1_000_000, 600, flags={"avx2"})[2] == "float32"
    hidden, dropout, dtype, _ = _chosen(30_000_000, 60, platform="gpu")
    assert (hidden, dtype) == (512, "float32") and dropout > 0
    c = _recipe_config(time_budget_s=60)
    recipe.resolve(c, 30_000_000, 65, platform="gpu")
    assert c.model.num_layers == 1


def test_bfloat16_on_the_native_kernel_is_counted_faster():
    """Without AMX the native kernel runs bfloat16 (native.fast), measured ~1.5x float32's rate
    there against ~1.2x through XLA's matmuls: the estimate, and so the epochs, follow."""
    amx = recipe.host_rate("cpu", "bfloat16", AVX512_BF16, cores=2)
    zen4 = recipe.host_rate("cpu", "bfloat16", AVX512_BF16 - {"amx_bf16"}, cores=2)
    assert zen4 == pytest.approx(1.25 * amx)
    assert recipe.host_rate("cpu", "float32", AVX512_BF16 - {"amx_bf16"}, cores=2) == \
        recipe.host_rate("cpu", "float32", AVX512_BF16, cores=2)


def test_what_the_user_sets_wins():
    hidden, dropout, dtype, line = _chosen(1_000_000, 600, **{"model.hidden_size": 1024,
                                                              "model.dtype": "float32"})
    assert (hidden, dtype) == (1024, "float32") and 0 < dropout <= 0.5
    assert "hidden 1024" in line
    c = _recipe_config(**{"model.hidden_size": 128, "model.dropout": 0.1, "model.dtype": "float32"})
    assert recipe.resolve(c, 1000, 65) is None     # nothing left to choose: no line, no change


def test_a_resumed_run_keeps_the_choices_it_started_with():
    saved = {"model": {"hidden_size": 256, "num_layers": 1, "dropout": 0.3, "dtype": "float32"}}
    c = _recipe_config(time_budget_s=3600.0)          # a longer budget would choose otherwise
    line = recipe.resolve(c, 1_000_000, 65, platform="cpu", flags=AVX512_BF16, saved=saved)
    assert (c.model.hidden_size, c.model.dropout, c.model.dtype) == (256, 0.3, "float32")
    assert "as chosen when this run started" in line


def test_no_budget_and_unresolved_plans_are_refused_in_one_line():
    c = _recipe_config(time_budget_s=0.0)
    with pytest.raises(ValueError, match="set time_budget_s, or set those fields yourself"):
        recipe.resolve(c, 1000, 65, platform="cpu", flags=AVX512_BF16)
    saved = {"model": {"hidden_size": 256, "num_layers": 1, "dropout": 0.3, "dtype": "float32"}}
    with pytest.raises(ValueError, match="set time_budget_s"):    # resuming without one too
        recipe.resolve(_recipe_config(time_budget_s=0.0), 1000, 65, saved=saved)
    with pytest.raises(ValueError, match="pass the config through recipe.apply first"):
        train.plan_run(_recipe_config())
    config_lib.validate(_recipe_config())            # the auto values are valid as such ...
    with pytest.raises(ValueError, match=r"model.dropout must be in \[0, 1\), or -1"):
        config_lib.validate(_recipe_config(**{"model.dropout": -0.5}))   # ... others are not
    with pytest.raises(ValueError, match="model.dtype must be 'float32', 'bfloat16' or 'auto'"):
        config_lib.validate(_recipe_config(**{"model.dtype": "float16"}))


def test_the_cli_says_what_it_chose_saves_it_and_a_resume_with_another_budget_keeps_it(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "PJRT_NPROC": "", "JAX_PLATFORMS": "cpu"}

    def train_for(budget):
        cmd = [sys.executable, "-m", "lstm_jax.cli", "train", "--config",
               str(REPO / "configs/recipe.py"), f"--config.corpus={corpus}",
               f"--config.time_budget_s={budget}", "--config.batch_size=8", "--config.seq_len=20",
               "--config.eval_every=0", "--config.sample.length=5", "--noprogress",
               "--config.num_epochs=1000",   # uncapped: the budget ends both runs
               "--workdir", str(workdir)]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)

    first = train_for(4)
    assert first.returncode == 0, first.stderr[-2000:]
    line = [s for s in first.stdout.splitlines() if s.startswith("recipe: ")]
    assert len(line) == 1 and "epochs of 17,100 training chars" in line[0], first.stdout
    model = json.loads((workdir / "config.json").read_text())["model"]
    # a small corpus read many times: dropout (how much depends on this host's rate)
    assert (model["hidden_size"], model["num_layers"]) in recipe.MODELS
    assert 0.1 <= model["dropout"] <= 0.5
    second = train_for(9)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "as chosen when this run started" in second.stdout
    assert json.loads((workdir / "config.json").read_text())["model"] == model

"""The config schema: every shipped config validates, and each bad value is refused before
anything runs with one line naming the field. No JAX here: these are pure checks."""
import pathlib

import ml_collections
import pytest

from lstm_jax import config as config_lib

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def _with(**overrides) -> ml_collections.ConfigDict:
    config = config_lib.get_config()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split("__")
        target = config
        for part in parents:
            target = target[part]
        with target.ignore_type():
            target[leaf] = value
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    config_lib.validate(config_lib.load_config_file(str(path)))


def test_the_default_config_validates_and_every_field_is_commented():
    config_lib.validate(config_lib.get_config())
    source = pathlib.Path(config_lib.__file__).read_text()
    body = source[source.index("def get_config()"):source.index("def load_config_file(")]
    bare = [line for line in body.splitlines()
            if line.strip().startswith("c.") and "=" in line and "ConfigDict()" not in line
            and "#" not in line]
    assert not bare, f"fields without a one-line comment: {bare}"


@pytest.mark.parametrize("overrides, message", [
    ({"seq_len": 0}, r"seq_len must be a positive integer, got 0"),
    ({"model__hidden_size": 2.5}, r"model.hidden_size must be a positive integer"),
    ({"model__num_layers": -1}, r"model.num_layers must be a positive integer, or 0 for the "
                                r"recipe to choose, got -1"),
    ({"num_epochs": True}, r"num_epochs must be a positive integer, got True"),
    ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
    ({"max_steps": -1}, r"max_steps must be >= 0, got -1"),
    ({"objective": "next"}, r"objective must be 'window', 'sequence' or 'stream', got 'next'"),
    ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\), got 1.0"),
    ({"optimizer__learning_rate": 0.0}, r"optimizer.learning_rate and optimizer.eps must be positive"),
    ({"optimizer__learning_rate": float("nan")}, r"optimizer.learning_rate must be a finite number"),
    ({"optimizer__decay": 1.0}, r"optimizer.decay must be in \[0, 1\)"),
    ({"optimizer__clip_norm": -1.0}, r"optimizer.clip_norm must be >= 0"),
    ({"optimizer__name": "sgd"}, r"optimizer.name must be rmsprop, adam or adamw, got 'sgd'"),
    ({"optimizer__schedule": "linear"}, r"optimizer.schedule must be 'constant' or 'cosine'"),
    ({"checkpoint__best_metric": "train_loss"}, r"checkpoint.best_metric must be val_loss or val_text_bpc"),
    ({"checkpoint__best_metric": "val_text_bpc", "eval_text": False}, r"needs eval_text=True"),
    ({"checkpoint__early_stop_evals": -1}, r"checkpoint.early_stop_evals must be >= 0"),
    ({"model__backward": "fast"}, r"model.backward must be 'auto', 'native', 'custom', 'autodiff' or 'cudnn'"),
    ({"vocab": "words"}, r"vocab must be 'chars' or 'bytes', got 'words'"),
    ({"parallel__mode": "dp"}, r"parallel.mode must be 'mesh' or 'pmap', got 'dp'"),
    ({"encoding_errors": "skip"}, r"encoding_errors must be strict, replace or ignore"),
    ({"sample__temperatures": (0.5, float("inf"))}, r"sample.temperatures must hold finite numbers"),
    ({"sample__temperatures": (0.5, -1.0)}, r"sample.temperatures must be finite numbers >= 0.*-1.0 is not"),
])
def test_each_bad_value_is_refused_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate(_with(**overrides))


def test_an_unknown_field_names_the_closest_valid_ones():
    config = config_lib.get_config()
    with config.model.unlocked():
        config.model.hidden = 64
    with pytest.raises(ValueError, match=r"unknown config field 'model.hidden'; did you mean "
                                         r"'model.hidden_size'"):
        config_lib.validate(config)


def test_a_saved_config_gets_todays_defaults_for_fields_it_predates():
    saved = {"seq_len": 17, "model": {"hidden_size": 48}, "removed_long_ago": 1}
    config = config_lib.from_saved(saved)
    assert config.seq_len == 17 and config.model.hidden_size == 48
    assert config.model.num_layers == config_lib.get_config().model.num_layers
    assert "removed_long_ago" not in config


def test_a_config_file_error_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "nope.py"
    with pytest.raises(ValueError, match=r"does not exist; pass a path such as configs/nietzsche.py"):
        config_lib.load_config_file(str(missing))
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    with pytest.raises(ValueError, match=rf"config file {broken} line 1: "):
        config_lib.load_config_file(str(broken))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"has no get_config\(\)"):
        config_lib.load_config_file(str(empty))

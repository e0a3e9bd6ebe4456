"""lstm_jax: character-level LSTM language models in JAX/Flax NNX, trained data-parallel on a
device mesh and sampled thousands of rows at a time by one compiled `lax.scan`.

    import lstm_jax
    config = lstm_jax.get_config()
    result = lstm_jax.train_and_evaluate(config, "runs/demo")
    texts = lstm_jax.generate(result.model, result.vocab, num_samples=4, length=200).texts
"""
import importlib

from lstm_jax.config import get_config, load_config_file, validate
from lstm_jax.corpora import load_text
from lstm_jax.data import Vocab

# Imported on first use: `import lstm_jax` (and so the `lstm-jax` command) does not load JAX, so
# the command line is up, with its signal handling, within a fraction of a second.
_LAZY = {"CharLSTM": "model", "ModelConfig": "model", "generate": "sample", "TrainResult": "train",
         "evaluate_text": "evaluate", "restore_model": "checkpoint", "train_and_evaluate": "train"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"lstm_jax.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lstm_jax' has no attribute {name!r}")


__all__ = ["CharLSTM", "ModelConfig", "TrainResult", "Vocab", "evaluate_text", "generate", "get_config",
           "load_config_file", "load_text", "restore_model", "train_and_evaluate", "validate"]
__version__ = "0.1.0"

"""lstm_jax: character-level LSTM language models in JAX/Flax NNX, trained data-parallel on a
device mesh and sampled thousands of rows at a time by one compiled `lax.scan`.

    import lstm_jax
    config = lstm_jax.get_config()
    result = lstm_jax.train_and_evaluate(config, "runs/demo")
    texts = lstm_jax.generate(result.model, result.vocab, num_samples=4, length=200).texts
"""
from lstm_jax.config import get_config, load_config_file, validate
from lstm_jax.corpora import load_text
from lstm_jax.data import Vocab
from lstm_jax.model import CharLSTM, ModelConfig
from lstm_jax.sample import generate
from lstm_jax.loop import TrainResult, evaluate_text, restore_model, train_and_evaluate

__all__ = ["CharLSTM", "ModelConfig", "TrainResult", "Vocab", "evaluate_text", "generate", "get_config",
           "load_config_file", "load_text", "restore_model", "train_and_evaluate", "validate"]
__version__ = "0.1.0"

"""Nietzsche, done properly: sequence objective (loss at every position), clipping, cosine decay.

Same lowercased corpus and held-out tail as configs/nietzsche_keras.py, so val_last_loss (loss on the
char after held-out 60-char windows) is comparable with the seed's training loss.

Command:  lstm-jax train --config configs/nietzsche.py --workdir runs/nz
Expected: see the README's configs table (measured on a 2-core CPU).
"""
from lstm_jax.config import get_config as _base


def get_config():
    c = _base()
    c.corpus = "nietzsche"
    c.lowercase = True
    c.objective = "sequence"
    c.seq_len = 100
    c.batch_size = 64
    c.model.hidden_size = 384
    c.model.num_layers = 1
    c.model.dropout = 0.0
    c.optimizer.learning_rate = 0.005
    c.optimizer.clip_norm = 5.0
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps = 50
    c.num_epochs = 10
    c.log_every = 50
    c.checkpoint.every_steps = 1000
    return c

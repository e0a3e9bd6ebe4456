"""Strict parity with the Keras text-generation example (the Keras reference).

Lowercased Nietzsche, windows of 60 chars every 3, loss on the char after each window, LSTM(128)
with Keras initialisation, batch 128, RMSprop(lr=0.01) without clipping, constant learning rate.
The only departures: the last 5% of the corpus is held out for validation (the Keras reference trains on all of
it), and each epoch drops the final partial batch.

Command:  lstm-jax train --config configs/nietzsche_keras.py --workdir runs/nz_keras
Expected (2-core CPU): mean training loss 2.036-2.054 after epoch 1 and 1.652-1.665 after epoch 2
(seeds 0-2; Keras on the same machine: 2.0465, 1.6548), 1.493 after epoch 4 (the book: 1.4973);
54 s per epoch on 2 CPU devices (Keras: 86-90 s). Like the Keras reference, expect divergence near epoch 56 (no clipping).
"""
from lstm_jax.config import get_config as _base


def get_config():
    c = _base()
    c.corpus = "nietzsche"
    c.lowercase = True
    c.objective = "window"
    c.seq_len = 60
    c.window_step = 3
    c.batch_size = 128
    c.model.hidden_size = 128
    c.model.num_layers = 1
    c.model.keras_init = True
    c.optimizer.learning_rate = 0.01
    c.optimizer.clip_norm = 0.0        # the Keras reference does not clip (and diverges near epoch 56)
    c.optimizer.schedule = "constant"
    c.num_epochs = 60
    c.sample.every_epochs = 1          # the Keras reference samples after every epoch
    c.eval_max_windows = 4096
    c.log_every = 100
    c.checkpoint.every_steps = 2000
    return c

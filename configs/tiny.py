"""A seconds-long config for tests and smoke checks: small model, few steps, one device.

Command:  lstm-jax train --config configs/tiny.py --workdir /tmp/tiny
Expected: finishes in ~10 s on 2 CPU cores; the loss falls from ~4.6 but samples are noise.
"""
from lstm_jax.config import get_config as _base


def get_config():
    c = _base()
    c.model.hidden_size = 32
    c.batch_size = 16
    c.seq_len = 20
    c.num_epochs = 1
    c.max_steps = 30
    c.log_every = 10
    c.eval_max_windows = 64
    c.sample.length = 40
    c.checkpoint.every_steps = 10
    c.parallel.num_devices = 1
    return c

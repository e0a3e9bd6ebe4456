"""Default run: the built-in corpus (Python's pydoc reference text, always present, offline).

Command:  lstm-jax train                     (same as --config configs/default.py)
Expected: see the README's configs table (measured on a 2-core CPU).
"""
from lstm_jax.config import get_config as _packaged_default


def get_config():
    return _packaged_default()

"""The persistent XLA compilation cache `lstm-jax` commands use by default: compiled programs are
kept in `<user cache>/xla` ($LSTM_JAX_CACHE_DIR, else $XDG_CACHE_HOME/lstm_jax, else
~/.cache/lstm_jax), so a second `lstm-jax train` or `sample` of the same shapes loads its programs
instead of compiling them. Off with `--nocompile_cache` or LSTM_JAX_COMPILE_CACHE=0.

JAX keys each entry by the program, the devices, the XLA flags and the jax/jaxlib versions, so a
stale entry is never used; the directory can be deleted at any time. Entries of programs that
compiled in under MIN_COMPILE_S are not written (they cost more to store than to rebuild).
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

MIN_COMPILE_S = 0.2


def cache_dir() -> pathlib.Path:
    from lstm_jax.corpora import resolve_cache_dir
    return resolve_cache_dir() / "xla"


def enabled_by_env() -> bool:
    return os.environ.get("LSTM_JAX_COMPILE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def enable(directory: Optional[os.PathLike] = None) -> Optional[pathlib.Path]:
    """Points JAX's persistent compilation cache at `directory` (default `cache_dir()`); returns
    it, or None where it cannot be created (a read-only home: the run goes on without a cache)."""
    import jax
    d = pathlib.Path(directory) if directory is not None else cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_S)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return d

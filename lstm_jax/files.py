"""The package's one way to write a file: to a temporary file beside it, renamed over it when
complete, so a crash, a full disk or a bad input never leaves a half-written file (and an
existing one survives)."""
from __future__ import annotations

import contextlib
import itertools
import os
import pathlib
from typing import IO, Iterator

_serial = itertools.count()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *,
                encoding: str = "utf-8") -> Iterator[IO]:
    """A file object for `.NAME.PID.N.tmp` beside `path` (same directory, so the rename is
    atomic), renamed over `path` when the block ends normally. If the block raises, the temporary
    file is removed and `path` is left as it was: to keep what was written so far, handle the
    error inside the block."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{next(_serial)}.tmp")
    done = False
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(text)

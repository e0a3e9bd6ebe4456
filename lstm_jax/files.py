"""The package's one way to write a file: to a temporary file beside it, renamed over it when
complete, so a crash, a full disk or a bad input never leaves a half-written file (and an
existing one survives).

The temporary file is `.NAME.HOST.PID.N.tmp`. One left by a writer that is gone (kill -9) is
removed by the next write of NAME from this host. A symlink is written through: its target is
replaced, the link stays.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pathlib
import socket
from typing import IO, Iterator

_serial = itertools.count()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *,
                encoding: str = "utf-8") -> Iterator[IO]:
    """A file object for a temporary file beside `path` (same directory, so the rename is atomic),
    renamed over `path` when the block ends normally. If the block raises, the temporary file is
    removed and `path` is left as it was: to keep what was written so far, handle the error inside
    the block. An OSError opening it names `path`, not the temporary file."""
    path = pathlib.Path(path)
    if path.is_symlink():
        path = pathlib.Path(os.path.realpath(path))
    remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{next(_serial)}.tmp")
    done = False
    try:
        try:
            f = open(tmp, mode, encoding=None if "b" in mode else encoding)
        except OSError as e:
            raise type(e)(e.errno, e.strerror, str(path)) from None
        with f:
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


def remove_stale_temps(path: pathlib.Path) -> list[pathlib.Path]:
    """Removes the temporary files of `path` whose writer, a process of this host, is gone (also
    the `.NAME.PID.N.tmp` of earlier versions); returns them."""
    host, removed = socket.gethostname(), []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        head, pid, serial, _ = tmp.name.rsplit(".", 3)
        if (head in (f".{path.name}", f".{path.name}.{host}") and pid.isdigit() and serial.isdigit()
                and not _alive(int(pid))):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True

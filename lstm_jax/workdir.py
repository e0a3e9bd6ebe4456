"""The run directory: one writer (a lock), the resume contract, and crash-consistent metrics.

    <workdir>/config.json    the resolved config       <workdir>/vocab.json   the vocabulary
    <workdir>/metrics.jsonl  one JSON event per line   <workdir>/samples.txt  samples during training
    <workdir>/checkpoints/   Orbax (checkpoint.py)     <workdir>/lock         who is training here
    <workdir>/events.out.tfevents.*  the same scalars for `tensorboard --logdir <workdir>`

Only process 0 of a run writes here (checkpoints aside, which every process saves). A run is
resumed only by a command whose settings give the same training trajectory: `resume_differences`
names every field that would change it.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import shutil
import socket
import warnings
from typing import Any, Optional

from lstm_jax import files
from lstm_jax.config import RESUMABLE_FIELDS, flat_items

LOCK = "lock"
METRICS = "metrics.jsonl"


class WorkdirError(ValueError):
    """The workdir cannot be used as asked; the message says why and what to do."""


# --- one writer per workdir -------------------------------------------------------------------

def _process_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of `pid` (Linux), so a reused PID is not mistaken for the holder."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = holder.get("proc_start")
    return started is None or _process_start_time(pid) in (None, started)


class WorkdirLock:
    """`<workdir>/lock`: JSON with the holder's PID, host and start time, created atomically.

    A second trainer gets a `WorkdirError` naming the holder. A lock left by a dead process on
    this host (kill -9, a crash) is taken over with a warning; a lock from another host cannot
    be checked and is refused with the command to remove it if that run is gone.
    """

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / LOCK
        self._mine: Optional[dict] = None

    def acquire(self) -> "WorkdirLock":
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "proc_start": _process_start_time(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:      # unreadable (half-written by a killed process): stale
                    self._take_over(None)
                    continue
                if holder.get("host") == me["host"] and not _alive(holder):
                    self._take_over(holder)
                    continue
                where = "" if holder.get("host") == me["host"] else f" on host {holder.get('host')}"
                raise WorkdirError(
                    f"{self.path.parent} is in use by another trainer (pid {holder.get('pid')}"
                    f"{where}, started {holder.get('started')}); wait for it, use another "
                    f"--workdir, or if that run is gone remove {self.path}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._mine = me
            return self
        raise WorkdirError(f"could not take {self.path}: other processes keep replacing it")

    def _read(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else None
        except (OSError, ValueError):
            return None

    def _take_over(self, holder: Optional[dict]) -> None:
        who = f"pid {holder.get('pid')}, started {holder.get('started')}" if holder else "unreadable"
        warnings.warn(f"taking over the stale lock {self.path} ({who}: that process is gone)",
                      RuntimeWarning, stacklevel=3)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._mine is not None and self._read() == self._mine:
            self.path.unlink(missing_ok=True)
        self._mine = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --- the resume contract ----------------------------------------------------------------------

def _flat(config_json: dict) -> dict:
    """Every field of a saved config, with today's defaults for fields it predates."""
    from lstm_jax.config import from_saved
    return dict(flat_items(from_saved(config_json)))


def resume_differences(saved: dict, now: dict) -> list[str]:
    """'seq_len: 64 (saved) != 32 (now)' for every setting that would change the training
    trajectory, comparing two run descriptions ({"config", "vocab", "global_batch",
    "corpus_fingerprint"}; older checkpoints may lack the last two). Fields in
    config.RESUMABLE_FIELDS may change freely; batch_size / per_device_batch_size only through
    the global batch they give; the corpus path only through the text it names."""
    old, new = _flat(saved["config"]), _flat(now["config"])
    skip = set(RESUMABLE_FIELDS) | {"batch_size", "per_device_batch_size", "corpus"}
    diffs = [f"{name}: {old.get(name)!r} (saved) != {new.get(name)!r} (now)"
             for name in sorted(set(old) | set(new)) if name not in skip and old.get(name) != new.get(name)]
    if saved.get("global_batch", now["global_batch"]) != now["global_batch"]:
        diffs.append(f"global batch: {saved['global_batch']} (saved) != {now['global_batch']} (now)"
                     " (batch_size, per_device_batch_size x devices)")
    same_text = saved.get("corpus_fingerprint", now["corpus_fingerprint"]) == now["corpus_fingerprint"]
    if not same_text:
        diffs.append("corpus text: it differs from the text the run was trained on (sha256 "
                     f"{saved['corpus_fingerprint'][:12]}... (saved) != {now['corpus_fingerprint'][:12]}... (now))")
    if old.get("corpus") != new.get("corpus") and not (same_text and "corpus_fingerprint" in saved):
        diffs.append(f"corpus: {old.get('corpus')!r} (saved) != {new.get('corpus')!r} (now)")
    if list(saved["vocab"]) != list(now["vocab"]):
        added = sorted(set(now["vocab"]) - set(saved["vocab"]))
        diffs.append(f"vocab: {len(saved['vocab'])} chars (saved) != {len(now['vocab'])} chars (now)"
                     + (f", new chars {''.join(added[:40])!r}" if added else ""))
    return diffs


def refuse_resume(workdir: pathlib.Path, diffs: list[str]) -> WorkdirError:
    return WorkdirError(
        f"{workdir} holds a run with other settings; resuming it with these would change what it "
        f"trains on or how ({'; '.join(diffs)}): use another --workdir, drop the overrides, or "
        "pass --new_run to move the old run aside (nothing is deleted) and start afresh")


def move_aside(workdir: pathlib.Path) -> pathlib.Path:
    """Renames `workdir` to the first free `<workdir>.prevN` and returns the new path."""
    aside = _free_name(workdir, ".prev")
    shutil.move(str(workdir), str(aside))
    return aside


RECORD = (METRICS, "samples.txt", "eval.jsonl")   # what a run that did anything has written


def move_record_aside(workdir: pathlib.Path, keep: tuple[str, ...]) -> Optional[pathlib.Path]:
    """A fresh start in a workdir that holds a run's record (metrics, samples, evaluations) but
    no checkpoint to resume it from (`checkpoints/` deleted): moves everything but the lock and
    `keep` to the first free `<workdir>.prevN`, so the new run replaces nothing. Returns that
    directory, None when there was no record (config.json and vocab.json alone are rewritten:
    the resume contract has already compared them)."""
    if not any((workdir / name).is_file() and (workdir / name).stat().st_size for name in RECORD):
        return None
    aside = _free_name(workdir, ".prev")
    aside.mkdir()
    for path in sorted(workdir.iterdir()):
        if path.name not in (LOCK, *keep):
            shutil.move(str(path), str(aside / path.name))
    return aside


def keep_other_vocab(path: pathlib.Path, chars: list) -> Optional[pathlib.Path]:
    """Before the run's vocabulary is written to `path` (vocab.json): a file there with other
    characters (edited, or unreadable) is renamed to `path.edited` (or `.editedN`), with a
    warning. Returns the new name, None if `path` held `chars` or nothing."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))["chars"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found is not None and list(found) == list(chars):
        return None
    kept = _free_name(path, ".edited")
    path.rename(kept)
    what = "is unreadable" if found is None else f"({len(found)} chars) is not the run's vocabulary"
    warnings.warn(f"{path} {what} ({len(chars)} chars, the checkpoint's); wrote the run's "
                  f"vocabulary there and kept that file as {kept}", RuntimeWarning, stacklevel=2)
    return kept


def _free_name(path: pathlib.Path, suffix: str) -> pathlib.Path:
    """The first free name of `path` + suffix + N: `.prev1`, `.prev2`, ...; `.edited`, `.edited1`, ..."""
    i = 1 if suffix == ".prev" else 0
    while (free := path.with_name(f"{path.name}{suffix}{i or ''}")).exists() or free.is_symlink():
        i += 1
    return free


# --- metrics ----------------------------------------------------------------------------------

class MetricsLog:
    """metrics.jsonl (the contract) plus TensorBoard event files (tensorboardX: no TensorFlow).

    Opened at the step a run starts from: events after it (written before a crash or kill -9,
    for steps the resumed run will redo) are dropped first, so steps never go backwards in the
    file, and TensorBoard is told to purge them too. Disabled (writes nothing) on processes > 0.
    """

    def __init__(self, workdir: pathlib.Path, start_step: int, enabled: bool = True,
                 tensorboard: bool = True):
        self._f = None
        self._tb = None
        if not enabled:
            return
        path = workdir / METRICS
        if path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if _step_of(line) is not None and _step_of(line) <= start_step]
            files.atomic_write_text(path, "".join(kept))
        self._f = open(path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir), purge_step=start_step or None, flush_secs=30)

    def write(self, event: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps(event) + "\n")
        self._f.flush()
        if self._tb is not None:
            for key, value in event.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, event["step"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step_of(line: str) -> Optional[int]:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None     # a line cut short by a kill: dropped


def read_json(path: pathlib.Path) -> Optional[Any]:
    """The parsed file, None if absent; a WorkdirError naming the file if it is unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"cannot read {path}: {e}; restore it or start afresh with --new_run") from None


def write_json(path: pathlib.Path, obj: Any) -> None:
    files.atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))

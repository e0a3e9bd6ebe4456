"""What every `lstm-jax` command shares: its flags (--config and --config.FIELD overrides, --debug,
--compile_cache, --help), path flags, the host set-up before JAX computes, and the translation of
the errors a user causes into one line (`friendly`), with library noise muted.

Flags use absl; `--config` takes a configs/*.py file (default: the built-in default config) and
`--config.FIELD=VALUE` overrides any field, as in the Flax examples.
"""
from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import re
import sys
from typing import Optional, Sequence

from absl import flags
from ml_collections import config_flags

from lstm_jax import hostenv  # light: imports no JAX
from lstm_jax.commands import COMMANDS


def config_help() -> str:
    """Every config field with its default and the comment from lstm_jax/config.py."""
    from lstm_jax import config as config_lib
    comments = {}
    for line in inspect.getsource(config_lib.get_config).splitlines():
        m = re.match(r"\s*c\.([\w.]+)\s*=\s*(.+?)\s*#\s*(.*)", line)
        if m:
            comments[m.group(1)] = m.group(3)
    rows = [f"  --config.{name}={value!r}  {comments.get(name, '')}"
            for name, value in config_lib.flat_items(config_lib.get_config())]
    return "config fields (override with --config.FIELD=VALUE):\n" + "\n".join(rows)


def define_config(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
    """Defines --config (the default config, or the file `--config FILE` names, loaded here so
    a missing or broken file is a one-line error); --config.FIELD=VALUE overrides either.
    Returns argv without `--config FILE` (absl sees only the overrides)."""
    from lstm_jax import config as config_lib
    argv, path = list(argv), None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            path, argv = argv[i + 1], argv[:i] + argv[i + 2:]
            break
        if a.startswith("--config="):
            path, argv = a.split("=", 1)[1], argv[:i] + argv[i + 1:]
            break
    try:
        config = config_lib.load_config_file(path) if path else config_lib.get_config()
    except ValueError as e:
        raise SystemExit(f"lstm-jax: error: {e}") from None
    try:   # sys_argv: absl defines a flag for each --config.FIELD override it finds there
        config_flags.DEFINE_config_dict("config", config, f"config ({path or 'the default'})",
                                        flag_values=fv, sys_argv=argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"lstm-jax: error: {_explain_flag_error(e, argv, 'train')}") from None
    return argv


def parse(fv: flags.FlagValues, argv: Sequence[str], command: str, extra_help: str = "") -> None:
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(f"usage: lstm-jax {command} [flags]\n\n{COMMANDS[command][2]}\n")
        print(fv.get_help())
        if extra_help:
            print("\n" + extra_help)
        raise SystemExit(0)
    try:
        fv(list(argv))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        raise SystemExit(f"lstm-jax: error: {_explain_flag_error(e, argv, command)}") from None
    if command in ("train", "sample", "eval", "bench", "export") and fv["compile_cache"].value:
        from lstm_jax import compile_cache
        if compile_cache.enabled_by_env():
            compile_cache.enable()


def _explain_flag_error(e: Exception, argv: Sequence[str], command: str) -> str:
    """One line: a misspelt --config.FIELD and the closest valid fields, else absl's message;
    then where the valid ones are listed."""
    from lstm_jax import config as config_lib
    known = {name for name, _ in config_lib.flat_items(config_lib.get_config())}
    for arg in argv[1:]:
        m = re.match(r"--config\.([\w.]+)", arg)
        if m and m.group(1) not in known:
            hint = config_lib.closest_fields(m.group(1))
            return (f"unknown config field --config.{m.group(1)}"
                    + (f"; did you mean {' or '.join('--config.' + h for h in hint)}?" if hint else "")
                    + "; `lstm-jax train --help` lists every config field")
    return f"{'; '.join(str(e).splitlines())}; `lstm-jax {command} --help` lists every flag"


def host_setup(config, vocab_size: int = 0) -> "hostenv.HostPlan":
    """Host settings (CPU runs only: allocator, CPU device count, XLA:CPU pool) and multi-host
    start-up; must run before JAX computes anything."""
    batch = (config.per_device_batch_size * hostenv.cpu_count() if config.per_device_batch_size
             else config.batch_size) // max(config.grad_accum_steps, 1)
    try:
        plan = hostenv.setup_host(hidden_size=config.model.hidden_size, batch_size=batch,
                                  cpu_devices=config.parallel.cpu_devices,
                                  tune_allocator=config.parallel.tune_allocator,
                                  vocab_size=vocab_size,
                                  mesh_devices=0 if config.parallel.distributed
                                  else config.parallel.num_devices)
    except ValueError as e:   # hostenv.UnsafeHostSetting: a PJRT_NPROC XLA:CPU would abort with
        raise SystemExit(f"lstm-jax: error: {e}") from None
    if config.parallel.distributed:
        from lstm_jax import parallel
        parallel.initialize_distributed(config.parallel.coordinator_address,
                                        config.parallel.num_processes, config.parallel.process_id)
    return plan


def path(value: Optional[str]) -> Optional[str]:
    """A path flag as the user meant it: `~` expanded (a shell leaves a quoted '~/wd' alone)."""
    return os.path.expanduser(value) if value else value


def define_common(fv: flags.FlagValues) -> None:
    flags.DEFINE_bool("debug", False, "show the full traceback of an error", flag_values=fv)
    flags.DEFINE_bool("compile_cache", True, "keep compiled programs in the user cache directory "
                      "(lstm_jax/compile_cache.py); --nocompile_cache or LSTM_JAX_COMPILE_CACHE=0: off", flag_values=fv)


_OS_ERRORS = {   # errno -> (what happened, what to do)
    errno.ENOSPC: ("the disk is full", "free space or choose another --workdir/--out; checkpoints "
                   "saved before this one are intact"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or choose another --workdir/--out; "
                   "checkpoints saved before this one are intact"),
    errno.EROFS: ("the file system is read-only", "choose a writable --workdir/--out"),
    errno.EACCES: ("permission denied", "choose a writable --workdir/--out or fix its permissions"),
    errno.EPERM: ("permission denied", "choose a writable --workdir/--out or fix its permissions"),
}


def friendly(fn, debug: bool = False):
    """Errors a user causes (bad input, a locked or read-only workdir, a full disk, an unreadable
    checkpoint) become one clear line instead of a traceback; --debug shows the traceback."""
    from lstm_jax import checkpoint, corpora, data, workdir
    from lstm_jax.steps import TrainingError
    try:
        with _quiet_library_tracebacks(debug):
            return fn()
    except Exception as e:  # noqa: BLE001 - translated below, or re-raised
        if debug:
            raise
        os_error = _os_error_in(e)
        if os_error is not None and os_error.errno in _OS_ERRORS:
            what, fix = _OS_ERRORS[os_error.errno]
            where = f" writing {os_error.filename}" if os_error.filename else ""
            raise SystemExit(f"lstm-jax: error: {what}{where}; {fix}") from None
        if isinstance(e, (corpora.CorpusError, data.DataError, checkpoint.CheckpointError,
                          workdir.WorkdirError, TrainingError, ValueError, OSError)):
            raise SystemExit(f"lstm-jax: error: {e}") from None
        raise


class _DropLibraryErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR or record.exc_info)


@contextlib.contextmanager
def _quiet_library_tracebacks(debug: bool):
    """Orbax and TensorStore report a failed background save (a full disk, say) as logged
    tracebacks, and their callbacks print asyncio's 'Event loop is closed' through sys.excepthook
    and sys.unraisablehook, before and after the save's error reaches `_friendly`, which reports it
    in one line. Muted while a command runs and, after an error, until the process exits (the
    unraisable ones always: `_drop_asyncio_noise`); --debug keeps them."""
    if debug:
        yield
        return
    loggers, drop, hook = [logging.getLogger(n) for n in ("absl", "asyncio")], _DropLibraryErrors(), sys.excepthook
    for logger in loggers:
        logger.addFilter(drop)
    sys.excepthook = lambda *exc: None
    if sys.unraisablehook is not _drop_asyncio_noise:   # kept to the exit: callbacks run late
        _drop_asyncio_noise.previous = sys.unraisablehook
        sys.unraisablehook = _drop_asyncio_noise
    yield    # on an error, stay muted: the command exits, and pending callbacks print on the way out
    sys.excepthook = hook
    for logger in loggers:
        logger.removeFilter(drop)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings (a stale lock taken over, an unreadable checkpoint set aside) in
    one line each, not Python's two (the second being the source line that warned)."""
    if f"{os.sep}lstm_jax{os.sep}" in filename:
        print(f"lstm-jax: warning: {message}", file=file or sys.stderr)
    else:
        show_warning.previous(message, category, filename, lineno, file, line)


def _drop_asyncio_noise(info) -> None:
    """TensorStore's callbacks into Orbax's closed event loop, after a restore that failed (an
    unreadable checkpoint the trainer set aside) or a failed save, end as 'unraisable'
    RuntimeErrors ('Event loop is closed', one traceback each: 132 lines for one bad step) or
    coroutines never awaited. The error that matters is reported in one line; drop these."""
    import asyncio
    if (isinstance(info.exc_value, RuntimeError) and "Event loop is closed" in str(info.exc_value)
            or asyncio.iscoroutine(info.object)):
        return
    _drop_asyncio_noise.previous(info)


_drop_asyncio_noise.previous = sys.unraisablehook


def _os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind an exception (Orbax and TensorStore wrap disk errors), if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        for code in _OS_ERRORS:
            if os.strerror(code) in str(e):
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None

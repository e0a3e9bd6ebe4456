"""SIGINT and SIGTERM: exit codes 130/143 in every phase of a command, and a stop at the next
safe point once the trainer or the sampler runs.

`StartupSignals` (the CLI, while a command starts up: imports, corpus loading, planning,
restoring) only records a signal; the command checks between phases (`stop_if_signalled`).
Within `StopSignals`, the two signals set `signal_name` instead of acting; the code polls it where
stopping is clean (the trainer at a step boundary, the sampler between blocks). A `StopSignals`
takes over a signal the handler before it recorded and has not acted on (the CLI's, or the
trainer's while it samples), so the trainer stops at its first step and the sampler before its
first block. A callable handler installed before is still called, so a nested sampler passes the
signal on; outside the main thread nothing is installed.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals(contextlib.AbstractContextManager):
    """`once=False` (the trainer): every signal is recorded until the block ends, whatever the
    signal's previous disposition. `once=True` (the sampler): after the first signal the previous
    handlers are back, so a second Ctrl-C acts at once, and a signal set to be ignored (nohup, a
    non-interactive shell's background job) stays ignored."""

    def __init__(self, once: bool = False):
        self.once = once
        self.signal_name: Optional[str] = None
        self._old: dict = {}

    @property
    def signal_number(self) -> int:
        """The received signal's number (0: none yet)."""
        return int(signal.Signals[self.signal_name]) if self.signal_name else 0

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            olds = {sig: signal.getsignal(sig) for sig in SIGNALS}
            self.signal_name = next(filter(None, map(_pending, olds.values())), None)
            if self.once and self.signal_name:
                return self   # the first signal already came: the previous handlers stay
            for sig, old in olds.items():
                if self.once and old is signal.SIG_IGN:
                    continue
                self._old[sig] = old
                signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        old = self._old.get(signum)
        if self.once:
            self._restore()
        if callable(old) and old is not signal.default_int_handler:
            old(signum, frame)

    def _restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old = {}

    def __exit__(self, *exc):
        self._restore()
        return False


class Terminated(BaseException):
    """SIGTERM while a command starts up (`stop_if_signalled`): the CLI exits 143."""


class StartupSignals:
    """SIGINT/SIGTERM while a command starts up (imports, corpus loading, restoring, compiling).
    The handler only records the signal (`pending`): raised from a handler, KeyboardInterrupt is
    swallowed by JAX's gc callbacks (training ran on) or, mid-way through loading jaxlib, crashes
    the interpreter. The command checks between phases (`stop_if_signalled`); the training loop's
    stop handler takes a recorded signal over and saves at its first step. An ignored signal
    (nohup, a shell's background job) stays ignored."""

    def __init__(self):
        self.pending, self.raising = 0, False
        self._old: dict = {}

    def __call__(self, signum, frame):
        self.pending = self.pending or signum
        if self.raising and signal.getsignal(signum) is self:   # not when a stop handler chains to it
            stop_if_signalled()

    def __enter__(self):
        for sig in SIGNALS:
            try:
                if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
                    self._old[sig] = signal.signal(sig, self)
            except ValueError:   # not the main thread
                pass
        _STARTUP.append(self)
        return self

    def __exit__(self, *exc):
        _STARTUP.remove(self)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False


_STARTUP: list = []   # the running command's StartupSignals


def stop_if_signalled(then_raise: bool = False) -> None:
    """Stops the command (KeyboardInterrupt, Terminated) if a signal came while it started up;
    `then_raise`: from now on a signal stops it at once (once JAX is loaded, for the commands that
    have no stop handler of their own)."""
    if _STARTUP and _STARTUP[-1].pending:
        raise KeyboardInterrupt if _STARTUP[-1].pending == signal.SIGINT else Terminated()
    if _STARTUP and then_raise:
        _STARTUP[-1].raising = True


def _pending(handler) -> Optional[str]:
    """The signal `handler` (a StartupSignals, or a StopSignals' method) recorded and has not
    acted on."""
    if isinstance(handler, StartupSignals) and handler.pending:
        return signal.Signals(handler.pending).name
    owner = getattr(handler, "__self__", None)
    return owner.signal_name if isinstance(owner, StopSignals) else None

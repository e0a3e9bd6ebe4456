"""SIGINT and SIGTERM as a request to stop at the next safe point, for the trainer and the sampler.

Within `StopSignals`, the two signals set `signal_name` instead of acting; the code polls it where
stopping is clean (the trainer at a step boundary, the sampler between blocks). A callable handler
installed before (the trainer's, while it samples) is still called, so a nested sampler passes the
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
            for sig in SIGNALS:
                old = signal.getsignal(sig)
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

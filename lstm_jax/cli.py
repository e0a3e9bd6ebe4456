"""The `lstm-jax` command line: train | sample | eval | prepare | plot | bench | export.

`main` picks the command (`lstm_jax.commands`: one module per group) and runs it with the exit
codes every phase keeps: SIGINT/SIGTERM while it starts up exit 130/143 in one line
(`signals.StartupSignals`), the package's warnings print as one line each.
"""
from __future__ import annotations

import importlib
import signal
import sys
import warnings
from typing import Optional, Sequence

from lstm_jax import signals  # light: imports no JAX
from lstm_jax.commands import COMMANDS, common


def _usage() -> str:
    lines = ["usage: lstm-jax COMMAND [flags]", "", "commands:"]
    lines += [f"  {name:8s} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += ["", "`lstm-jax COMMAND --help` lists that command's flags (and, for train, every "
              "config field)."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console entry point (`lstm-jax`, `python -m lstm_jax.cli`)."""
    return _main(sys.argv if argv is None else argv)


def _main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[1]
    if command not in COMMANDS:
        import difflib
        hint = difflib.get_close_matches(command, COMMANDS, n=1)
        raise SystemExit(f"lstm-jax: error: unknown command {command!r}"
                         + (f"; did you mean {hint[0]!r}?" if hint else "") + "\n\n" + _usage())
    module, function, _ = COMMANDS[command]
    run = getattr(importlib.import_module(f"lstm_jax.commands.{module}"), function)
    try:
        with signals.StartupSignals() as startup, warnings.catch_warnings():
            common.show_warning.previous, warnings.showwarning = warnings.showwarning, common.show_warning
            code = run([f"lstm-jax {command}"] + argv[2:]) or 0
            if code == 0 and startup.pending:   # recorded, but the command ran to its end
                name = signal.Signals(startup.pending).name
                print(f"lstm-jax {command}: received {name} where it could not stop cleanly; acted on only "
                      f"now, after the command finished (its output is complete)", file=sys.stderr)
                return 130 if startup.pending == signal.SIGINT else 143
            return code
    except (KeyboardInterrupt, signals.Terminated) as e:
        if "--debug" in argv:
            raise
        name, code = ("SIGINT", 130) if isinstance(e, KeyboardInterrupt) else ("SIGTERM", 143)
        print(f"lstm-jax {command}: stopped by {name}" + ("; nothing already saved is lost (train "
              "again to resume from the last checkpoint)" if command == "train" else ""), file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

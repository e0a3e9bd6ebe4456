"""A thin wrapper over Orbax's CheckpointManager: <workdir>/checkpoints/<step>/{state,metadata},
and `restore_model`: a trained model rebuilt from a workdir alone.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest). Retention keeps the last
`max_to_keep` steps plus the best one by `best_metric` (val_loss or val_text_bpc). A step that cannot be read back (a
truncated file, a disk error) is skipped with a warning in favour of the newest readable one, and
steps a run must not resume from (unreadable, or saved after training diverged) are moved out of
the manager's directory rather than deleted.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import pathlib
import shutil
import warnings
from typing import Any, Callable, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

from lstm_jax import config as config_lib
from lstm_jax import data, parallel, steps
from lstm_jax import workdir as workdir_lib
from lstm_jax.model import CharLSTM

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run, with the fix in the message."""


class _ExpectedOrbaxWarnings(logging.Filter):
    """Drops two Orbax warnings that describe how this module uses it on purpose: saves between
    evaluations carry no metric, and sampling opens the manager read-only."""
    EXPECTED = ("Requested `tracked_metric`; did not provide metrics", "Given directory is read only",
                "CheckpointManagerOptions.read_only=True")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.EXPECTED)


logging.getLogger("absl").addFilter(_ExpectedOrbaxWarnings())


def _reason(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return lines[0][:200]


class Checkpointer:
    """Saves/restores the train state (a pytree) with JSON metadata beside it."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, keep_best: bool = True,
                 best_metric: str = "val_loss", read_only: bool = False):
        keep: list = [policies.LatestN(n=max_to_keep)]
        metric = lambda m: m.get(best_metric, float("inf"))   # noqa: E731 - lower is better
        if keep_best:
            keep.append(policies.BestN(get_metric_fn=metric, reverse=True, n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep), create=not read_only,
            read_only=read_only, enable_async_checkpointing=True,
            # best_fn makes Orbax write each step's metrics beside it, so BestN still knows the
            # best checkpoint after a restart (and best_step() returns it, not the latest).
            best_fn=metric if keep_best else None, best_mode="min")
        self.workdir = pathlib.Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.workdir}; train first with "
                                  f"`lstm-jax train --workdir {self.workdir}`")
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "metadata"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def save(self, step: int, state: Any, metadata: dict, metrics: Optional[dict] = None) -> None:
        """Starts an asynchronous save (collective: every process calls it). `metrics` (e.g.
        {"val_loss": ...}) rank the checkpoint for keep_best. A save that cannot fit on the disk
        is refused before it starts (an OSError ENOSPC): Orbax's background writers would
        otherwise fail halfway, leaving a partial step and their tracebacks."""
        self._check_space(state, metadata)
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          metadata=ocp.args.JsonSave(metadata)),
            metrics={k: float(v) for k, v in metrics.items()} if metrics else None, force=True)

    def _check_space(self, state: Any, metadata: dict) -> None:
        size = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state)) + len(json.dumps(metadata))
        free = shutil.disk_usage(self.directory).free
        if free < 1.1 * size + (1 << 20):   # a margin for Orbax's own files
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: a checkpoint needs about "
                          f"{size / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free", str(self.directory))

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores into the shapes and shardings of `abstract_state` (any device count)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
        return restored.state, dict(restored.metadata)

    def restore_readable(self, abstract_state: Any, step: Optional[int] = None,
                         check: Optional[Callable[[dict], None]] = None
                         ) -> tuple[int, Any, dict, list[int]]:
        """(step, state, metadata, unreadable steps): `step` if given (an error if it cannot be
        read), else the newest step that restores, warning about each newer one that does not.
        `check(metadata)` runs before the state is read and may raise to refuse the run;
        `abstract_state` may be a function of the step's metadata."""
        steps = self.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; saved steps: "
                                  f"{steps or 'none'}")
        failures: dict[int, str] = {}
        for s in ([step] if step is not None else reversed(steps)):
            try:
                meta = self.metadata(s)
            except Exception as e:  # noqa: BLE001 - any read failure means: not this step
                failures[s] = _reason(e)
                continue
            if check is not None:
                check(meta)
            try:
                target = abstract_state(meta) if callable(abstract_state) else abstract_state
                state, meta = self.restore(target, s)
            except Exception as e:  # noqa: BLE001
                failures[s] = _reason(e)
                continue
            for bad, why in failures.items():
                warnings.warn(f"checkpoint step {bad} in {self.directory} is unreadable ({why}); "
                              f"using step {s}", RuntimeWarning, stacklevel=2)
            return s, state, meta, sorted(failures)
        detail = "; ".join(f"step {s}: {why}" for s, why in failures.items())
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({detail}); start afresh "
                              f"with --new_run (the unreadable steps are kept)")

    def move_aside(self, steps: list[int], into: str) -> list[pathlib.Path]:
        """Moves step directories to <workdir>/<into>/<step> (out of Orbax's sight, kept on disk)."""
        self.manager.wait_until_finished()
        moved = []
        for s in steps:
            src = self.directory / str(s)
            if not src.exists():
                continue
            dest_dir = self.workdir / into
            dest_dir.mkdir(exist_ok=True)
            dest, i = dest_dir / str(s), 1
            while dest.exists():
                dest, i = dest_dir / f"{s}.{i}", i + 1
            shutil.move(str(src), str(dest))
            moved.append(dest)
        self.manager.reload()
        return moved

    def metadata(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return dict(self.manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore())).metadata)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# --- restoring a trained model ----------------------------------------------------------------

def restore_model(workdir: str | pathlib.Path, step: Optional[int] = None
                  ) -> tuple[CharLSTM, data.Vocab, ml_collections.ConfigDict]:
    """Rebuilds the trained model from a workdir alone (config.json, vocab.json, checkpoint),
    on whatever devices this process has: `step`, else the newest readable checkpoint."""
    model, vocab, config, _ = restore_model_at(workdir, step)
    return model, vocab, config


def restore_model_at(workdir: str | pathlib.Path, step: Optional[int] = None
                     ) -> tuple[CharLSTM, data.Vocab, ml_collections.ConfigDict, int]:
    """`restore_model` and the step it restored."""
    workdir = pathlib.Path(workdir)
    saved = workdir_lib.read_json(workdir / "config.json")
    if saved is None:
        raise CheckpointError(f"{workdir} is not a training workdir (no config.json); train "
                              f"first: lstm-jax train --workdir {workdir}")
    config = config_lib.from_saved(saved)
    vocab = data.Vocab.load(workdir / "vocab.json")
    checkpointer = Checkpointer(workdir, read_only=True)
    try:
        if not checkpointer.all_steps():
            raise CheckpointError(f"no checkpoint in {checkpointer.directory}; train first")
        mcfg = steps.model_config(config, len(vocab))
        tx = steps.make_optimizer(config, 1)   # the optimizer state's structure only
        mesh = parallel.make_mesh()

        def abstract(meta: dict):   # a stream carry is sized by the run's global batch
            return steps.state_to_tree(steps.abstract_state(
                config, mcfg, tx, mesh, replicate_all=True,
                batch=meta.get("global_batch", config.batch_size))[1])
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: CharLSTM(mcfg, rngs=nnx.Rngs(0))))
        at, tree, _, _ = checkpointer.restore_readable(abstract, step)
    finally:
        checkpointer.close()
    return nnx.merge(graphdef, jax.device_get(tree["params"])), vocab, config, at

"""A thin wrapper over Orbax's CheckpointManager: <workdir>/checkpoints/<step>/{state,metadata}.

Saves are asynchronous and atomic (Orbax writes a temporary directory and renames it when complete,
so a process killed mid-save leaves the previous checkpoint as the latest). Retention keeps the last
`max_to_keep` steps plus the best one by validation loss.
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from lstm_jax.config import MODEL_FIELDS

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run, with the fix in the message."""


class Checkpointer:
    """Saves/restores the train state (a pytree) with JSON metadata beside it."""

    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, keep_best: bool = True,
                 read_only: bool = False):
        keep: list = [policies.LatestN(n=max_to_keep)]
        if keep_best:
            keep.append(policies.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1,
                                       keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep), create=not read_only,
            read_only=read_only, enable_async_checkpointing=True,
            # best_fn makes Orbax write each step's metrics beside it, so BestN still knows the
            # best checkpoint after a restart (and best_step() returns it, not the latest).
            best_fn=(lambda m: m["val_loss"]) if keep_best else None, best_mode="min")
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints in {self.directory.parent}; train first with "
                                  f"`lstm-jax train --workdir {self.directory.parent}`")
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "metadata"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def save(self, step: int, state: Any, metadata: dict, val_loss: Optional[float] = None) -> None:
        """Starts an asynchronous save (collective: every process calls it)."""
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          metadata=ocp.args.JsonSave(metadata)),
            metrics=None if val_loss is None else {"val_loss": float(val_loss)}, force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores into the shapes and shardings of `abstract_state` (any device count)."""
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), metadata=ocp.args.JsonRestore()))
        return restored.state, dict(restored.metadata)

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


def config_differences(saved: dict, current: dict, fields=MODEL_FIELDS) -> list[str]:
    """'model.hidden_size: 128 (saved) != 256 (now)' for each model-defining field that differs."""
    def get(d, dotted):
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return None
            d = d[part]
        return d
    return [f"{f}: {get(saved, f)!r} (saved) != {get(current, f)!r} (now)"
            for f in fields if get(saved, f) != get(current, f)]


def check_compatible(saved_config: dict, config: dict, saved_vocab: list[str], vocab: list[str],
                     workdir: str) -> None:
    """Refuses to resume a workdir whose model config or vocabulary differs from this run's."""
    diffs = config_differences(saved_config, config)
    if list(saved_vocab) != list(vocab):
        missing = sorted(set(vocab) - set(saved_vocab))
        diffs.append(f"vocab: {len(saved_vocab)} chars (saved) != {len(vocab)} chars (now)"
                     + (f", new chars {''.join(missing)!r}" if missing else ""))
    if diffs:
        raise CheckpointError(
            f"workdir {workdir} holds a run with a different model; differing fields:\n  "
            + "\n  ".join(diffs)
            + "\nUse another --workdir, drop the overrides, or pass --new_run to move the old run "
              "aside (nothing is deleted) and start afresh.")

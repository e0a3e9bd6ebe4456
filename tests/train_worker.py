"""Subprocess driver for tests/test_checkpoint.py (not a test module itself).

    python tests/train_worker.py train  LSTM_JAX_TRAIN_FLAGS...   # `lstm-jax train ...`
    python tests/train_worker.py sample LSTM_JAX_SAMPLE_FLAGS...  # `lstm-jax sample ...`
    python tests/train_worker.py restore WORKDIR OUT.npz           # restore_model -> params .npz

Test hooks, all from environment variables (the training itself is untouched):
  LSTM_JAX_TEST_DEVICES=N         fake CPU devices in this process (set before JAX is imported)
  LSTM_JAX_TEST_STEP_SLEEP=SECS   sleep before each training step, so a test can signal mid-run
  LSTM_JAX_TEST_KILL_AT_SAVE=STEP SIGKILL this process inside the save of STEP, after Orbax has
                                  written the step's data to its temporary directory and before
                                  it renames it into place (the worst moment to die)
"""
import os
import pathlib
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _set_devices() -> None:
    n = os.environ.get("LSTM_JAX_TEST_DEVICES")
    if n:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"


def _install_hooks() -> None:
    from lstm_jax import data

    delay = float(os.environ.get("LSTM_JAX_TEST_STEP_SLEEP", "0") or 0)
    if delay > 0:
        original_prefetch = data.prefetch

        def slow_prefetch(iterable, *args, **kwargs):
            for item in original_prefetch(iterable, *args, **kwargs):
                time.sleep(delay)
                yield item
        data.prefetch = slow_prefetch

    kill_step = os.environ.get("LSTM_JAX_TEST_KILL_AT_SAVE")
    if kill_step:
        from orbax.checkpoint._src.path import atomicity
        original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_or_die(self, *args, **kwargs):
            if self.get_final().name == kill_step:
                print(f"train_worker: SIGKILL inside the save of step {kill_step} "
                      f"(temporary directory {self.get().name})", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return await original_finalize(self, *args, **kwargs)
        atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


def _restore(workdir: str, out: str) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from lstm_jax import checkpoint
    model, vocab, config = checkpoint.restore_model(workdir)
    leaves = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))
    np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
    print(f"train_worker: restored {len(leaves)} params on {jax.device_count()} device(s), "
          f"vocab {len(vocab)}, hidden {config.model.hidden_size}", flush=True)
    return 0


def main(argv: list[str]) -> int:
    _set_devices()
    sys.path.append(str(REPO))   # last: a PYTHONPATH copy of the package (bug injection) wins
    _install_hooks()
    command = argv[1]
    if command == "restore":
        return _restore(argv[2], argv[3])
    from lstm_jax import cli
    return cli.main(["lstm-jax", command, *argv[2:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv))

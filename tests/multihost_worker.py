"""One process of the two-process test in tests/test_parallel.py (not a test module itself).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES -- TRAIN_FLAGS...

Runs `lstm-jax train TRAIN_FLAGS --config.parallel.distributed=True ...` as process PROCESS_ID of
NUM_PROCESSES, with LOCAL_DEVICES fake CPU devices, the coordinator on 127.0.0.1:PORT. The device
count comes from XLA_FLAGS (set here, before JAX is imported); the CLI leaves a forced count alone.
"""
import os
import pathlib
import sys


def main(argv: list[str]) -> int:
    process_id, num_processes, port, local_devices = (int(a) for a in argv[1:5])
    assert argv[5] == "--", "usage: multihost_worker.py ID N PORT DEVICES -- TRAIN_FLAGS..."
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={local_devices}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

    from lstm_jax import cli
    return cli.main(["lstm-jax", "train", *argv[6:],
                     "--config.parallel.distributed=True",
                     f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                     f"--config.parallel.num_processes={num_processes}",
                     f"--config.parallel.process_id={process_id}",
                     "--config.parallel.cpu_devices=0"])


if __name__ == "__main__":
    sys.exit(main(sys.argv))

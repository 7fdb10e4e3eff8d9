"""Real processes: 2 Python processes on 127.0.0.1, joined by `jax.distributed`.

Each process simulates 2 CPU devices (CPU collectives through gloo), reads its own elements
of a stream, batches them per device and trains data-parallel on the global 4-device mesh,
saving and restoring the sharded batcher states beside the parameters (orbax) halfway.
The final parameters equal the single-process run on 4 devices (this process, conftest),
up to float32 rounding of the cross-process all-reduce.
Every wait is bounded and the processes are always reaped.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import _multiprocess_worker as worker
import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # a subprocess run of minutes: `make test-slow`

WORKER = pathlib.Path(worker.__file__)
TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: pathlib.Path, lines: int = 25) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    kept = [line for line in text.splitlines() if "Gloo" not in line]
    return "\n".join(kept[-lines:])


def test_two_processes_train_like_one_process_on_four_devices(tmp_path):
    pytest.importorskip("orbax.checkpoint", reason="needs the `distributed` extra")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    port, procs, logs = free_port(), [], []
    try:
        for pid in range(2):
            log = tmp_path / f"process_{pid}.log"
            logs.append(log)
            with open(log, "wb") as f:
                command = [sys.executable, str(WORKER), str(pid), "2", str(port), str(tmp_path)]
                procs.append(subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the processes did not finish in {TIMEOUT_S} s:\n"
            + "\n".join(f"--- {log.name}\n{tail(log)}" for log in logs)
        )
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.name} exited with {proc.returncode}:\n{tail(log)}"

    got = np.load(tmp_path / "params.npz")
    mesh = jax.make_mesh((4,), (worker.AXIS,))
    expected, _ = worker.run(mesh)  # one process, 4 devices, no checkpoint
    # Equal up to float32 rounding: gloo's all-reduce of the gradient across processes sums
    # the four devices' parts in another order than the in-process all-reduce (1 ulp seen).
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], np.asarray(v), rtol=1e-6, err_msg=f"parameter {k}")

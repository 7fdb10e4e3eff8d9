"""Real processes: 2 Python processes on 127.0.0.1, joined by `jax.distributed`.

Each process simulates 2 CPU devices (CPU collectives through gloo), reads its own elements
of a stream, batches them per device and trains data-parallel on the global 4-device mesh,
saving and restoring the sharded batcher states beside the parameters (orbax) halfway.
The final parameters equal the single-process run on 4 devices (this process, conftest),
up to float32 rounding of the cross-process all-reduce; so do those of a small LM
(embedding, segment-masked attention over packed rows) trained on the README's mesh.

Elastic resume, 2 processes -> 1 process: the 2 processes read the first part of a stream
(`fixed_size`, `pack`) on their 4 devices and save the per-device states through orbax
mid-stream; this process loads them and continues on 2 devices (`resume_per_device`):
every element is batched exactly once over the whole run, in the order that a
single-process run with the same `(D, D', split point)` gives.
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
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbatch as jb

pytestmark = pytest.mark.slow  # a subprocess run of minutes: `make test-slow`

WORKER = pathlib.Path(worker.__file__)
TIMEOUT_S = 120  # 2 processes compiling on a shared 2-core machine


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

    # The LM: the same global batches, so the same parameters up to the all-reduce's order.
    got = np.load(tmp_path / "lm.npz")
    expected = worker.run_lm(jax.make_mesh((4,), (worker.AXIS,)))
    for k, v in expected.items():
        np.testing.assert_allclose(got[k], np.asarray(v), rtol=1e-5, atol=1e-7, err_msg=k)

    for name in ("fixed_size", "pack"):
        continue_elsewhere(tmp_path / f"elastic_{name}", name)


def continue_elsewhere(checkpoint, name):
    """Load the 2 processes' per-device states (4 streams) in this one process, continue on
    2 devices; compare with the same resume from this process's own 4-device run."""
    batcher, data, read = worker.elastic_case(name)
    old = jax.make_mesh((4,), (worker.AXIS,))
    new = jax.make_mesh((2,), (worker.AXIS,), devices=jax.devices()[:2])
    seen_here, states_here = worker.read_first_part(old, name)  # the single-process twin
    # `like`: the saved tree's structure, its 4 streams placed on the 2 new devices.
    spec = {k: jax.ShapeDtypeStruct((4, 1, *v.shape[1:]), v.dtype) for k, v in data.items()}
    empty = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(new, P())),
        seen_here,
    )
    like = {"batcher": jb.init_per_device(batcher, spec, new, worker.AXIS), "seen": empty}
    loaded = jb.load_distributed(checkpoint, like=like)
    jax.tree.map(np.testing.assert_array_equal, loaded["seen"], seen_here)  # same first part

    length = len(next(iter(data.values())))
    idx = jb.stream_indices(length - 4 * read, new, worker.AXIS, start=4 * read)
    rest = jb.device_streams({k: v[idx] for k, v in data.items()}, new, worker.AXIS)
    element = {k: v[0] for k, v in data.items()}
    outs = []
    for saved in (loaded["batcher"], states_here):
        states = jb.resume_per_device(batcher, saved, new, worker.AXIS, element_spec=element)
        fresh = (jnp.full(worker.ELASTIC_SEEN, -1, jnp.int32), jnp.int32(0))
        (out, _), states = jb.scan_per_device(
            batcher, worker.seen, fresh, rest, new, worker.AXIS, states=states
        )
        outs.append(np.asarray(out))
        # The counters read as the whole run's totals: each element accepted once.
        assert int(jb.operation_stats(states)["applied_count"]) == length, name
    np.testing.assert_array_equal(outs[0], outs[1])  # deterministic given (D, D', split)
    got = np.concatenate([np.asarray(loaded["seen"][0]), outs[0]])
    want = data["i"] if "i" in data else data["tokens"][data["tokens"] > 0]
    assert sorted(got[got >= 0].tolist()) == sorted(want.tolist()), name

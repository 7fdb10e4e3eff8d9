"""One process of the 2-process test (`test_multiprocess.py`); also its single-process twin.

Run as `python tests/_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR`: it
simulates 2 CPU devices, joins the others through `jax.distributed.initialize` (CPU
collectives through gloo), reads only its own elements of the stream (`stream_indices`),
assembles the global per-device streams (`device_streams`), trains data-parallel on the
global 4-device mesh with a checkpoint/restore (orbax) halfway, and process 0 writes the
final parameters to `OUT_DIR/params.npz`. It also trains the small LM of
`test_scale_out.py` (embedding, segment-masked attention over `pack`ed rows) on the mesh
exactly as the README builds it (`OUT_DIR/lm.npz`), and reads the first part of two streams
(`fixed_size`, `pack`), saving the per-device batcher states mid-stream through orbax
(`OUT_DIR/elastic_<name>`) for the test process to continue on another number of devices.

`run`, `run_lm` and `read_first_part` are imported by the test to compute the same things
in one process on 4 devices.
"""

import os
import sys

import jax

NUM, DIM, BATCH_PER_DEVICE, LR = 64, 3, 4, 0.1
AXIS = "data"


def make_stream():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((NUM, DIM)).astype(np.float32)
    y = x @ np.arange(1, DIM + 1, dtype=np.float32) + np.float32(0.5)
    return {"x": x, "y": y}


def train_step(params, batch):
    import jax.numpy as jnp

    def loss(p):
        err = jnp.where(batch.valid_mask, batch.data["x"] @ p["w"] + p["b"] - batch.data["y"], 0.0)
        return jnp.sum(err**2) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


BATCHERS = {}


def run(mesh, checkpoint_dir=None):
    """Train on `mesh` (one epoch); with `checkpoint_dir`, save and restore halfway."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxbatch as jb

    batcher = BATCHERS.setdefault("fixed", jb.fixed_size(BATCH_PER_DEVICE))
    data = make_stream()
    idx = jb.stream_indices(NUM, mesh, AXIS)  # only this process's elements are read
    streams = jb.device_streams({k: v[idx] for k, v in data.items()}, mesh, AXIS)
    params = {"w": jnp.zeros(DIM, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    params = jax.device_put(params, NamedSharding(mesh, P()))  # replicated, global
    if checkpoint_dir is None:
        params, states = jb.scan_per_device(batcher, train_step, params, streams, mesh, AXIS)
        return params, states
    half = NUM // mesh.shape[AXIS] // 2 + 1  # mid-batch: rows stay buffered on each device
    first = jax.tree.map(lambda x: x[:, :half], streams)
    second = jax.tree.map(lambda x: x[:, half:], streams)
    params, states = jb.scan_per_device(batcher, train_step, params, first, mesh, AXIS, flush=False)
    tree = {"batcher": states, "train": params}
    jb.save_distributed(checkpoint_dir, tree)
    tree = jb.load_distributed(checkpoint_dir, like=tree)
    return jb.scan_per_device(
        batcher, train_step, tree["train"], second, mesh, AXIS, states=tree["batcher"]
    )


def run_lm(mesh):
    """The LM of `test_scale_out.py` trained for one epoch of packed documents on `mesh`."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from test_scale_out import PACK, documents, init_params, lm_step

    import jaxbatch as jb

    data = documents()
    idx = jb.stream_indices(len(data["n"]), mesh, AXIS)
    streams = jb.device_streams({k: v[idx] for k, v in data.items()}, mesh, AXIS)
    params = jax.device_put(init_params(), NamedSharding(mesh, P()))
    return jb.scan_per_device(PACK, lm_step, params, streams, mesh, AXIS)[0]


# --------------------------------------------------------------------------- elastic resume
# Two streams whose elements carry their identity (an id, or unique token values), read in
# part on 4 devices (of 2 processes, or of one), then continued on 2 devices of one process.
ELASTIC_ROW, ELASTIC_SEEN = 8, 512


def elastic_case(name):
    """`(batcher, stream, elements read per old device)` of the elastic test `name`."""
    import numpy as np

    import jaxbatch as jb

    if name == "fixed_size":
        batcher = BATCHERS.setdefault(name, jb.fixed_size(3))
        return batcher, {"i": np.arange(44, dtype=np.int32)}, 5  # 2 rows stay buffered
    batcher = BATCHERS.setdefault(name, jb.pack(ELASTIC_ROW, 2, lengths={"tokens": "n"}))
    rng = np.random.default_rng(4)
    n = rng.integers(1, ELASTIC_ROW + 1, 24).astype(np.int32)
    unique = np.arange(1, 24 * ELASTIC_ROW + 1, dtype=np.int32).reshape(24, ELASTIC_ROW)
    tokens = np.where(np.arange(ELASTIC_ROW) < n[:, None], unique, 0).astype(np.int32)
    return batcher, {"tokens": tokens, "n": n}, 3  # half-packed rows stay buffered


def seen(carry, batch):
    """Consumer: every valid row's element id (`pack`: real tokens), in order; -1 else."""
    import jax.numpy as jnp

    out, k = carry
    if "i" in batch.data:
        ids = jnp.where(batch.valid_mask, batch.data["i"], -1)
    else:
        real = (batch.data["tokens_segment_ids"] > 0) & batch.valid_mask[:, None]
        ids = jnp.where(real, batch.data["tokens"], -1).reshape(-1)
    return jax.lax.dynamic_update_slice_in_dim(out, ids, k * ids.shape[0], 0), k + 1


def read_first_part(mesh, name):
    """Read the first part of stream `name` on `mesh` without `flush`: `(seen, states)`."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jaxbatch as jb

    batcher, data, read = elastic_case(name)
    length = len(next(iter(data.values())))
    idx = jb.stream_indices(length, mesh, AXIS)[:, :read]
    streams = jb.device_streams({k: v[idx] for k, v in data.items()}, mesh, AXIS)
    empty = (jnp.full(ELASTIC_SEEN, -1, jnp.int32), jnp.int32(0))
    empty = jax.device_put(empty, NamedSharding(mesh, P()))
    return jb.scan_per_device(batcher, seen, empty, streams, mesh, AXIS, flush=False)


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    import numpy as np

    import jaxbatch as jb

    jax.distributed.initialize(
        f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=30,
    )
    try:
        if jax.process_count() != num_processes or jax.device_count() != 2 * num_processes:
            raise RuntimeError(
                f"Expected {num_processes} processes of 2 CPU devices, got "
                f"{jax.process_count()} processes and {jax.device_count()} devices."
            )
        mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
        params, states = run(mesh, os.path.join(out_dir, "checkpoint"))
        local = {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}
        counts = np.asarray(states.stats.accepted.lo.addressable_data(0))
        lm = {k: np.asarray(v.addressable_data(0)) for k, v in run_lm(mesh).items()}
        if process_id == 0:
            np.savez(os.path.join(out_dir, "params.npz"), **local)
            np.savez(os.path.join(out_dir, "lm.npz"), **lm)
        for name in ("fixed_size", "pack"):
            carry, states = read_first_part(mesh, name)
            tree = {"batcher": states, "seen": carry}
            jb.save_distributed(os.path.join(out_dir, f"elastic_{name}"), tree)
        print(f"process {process_id}: done, local accepted {counts.tolist()}", flush=True)
    finally:
        jax.distributed.shutdown()


if __name__ == "__main__":
    # Before any JAX op (so before importing jaxbatch): 2 CPU devices, gloo collectives.
    # Set here, not inherited: the test's conftest simulates 4 devices in its own process.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, nproc, port_arg, out = sys.argv[1:5]
    main(int(pid), int(nproc), int(port_arg), out)

"""Data-parallel training on a mesh of 4 devices, batching included, in one `jit`.

What it teaches:

* **Deal the stream out, one stream per device.** `jb.stream_indices` says which elements
  each device's stream holds (element `i` goes to device `i % 4`); `jb.device_streams` puts
  the streams on the mesh, device `d` holding stream `d`. On several hosts the same two
  calls read and assemble each process's part (`jax.make_array_from_process_local_data`).
* **Each device batches its own stream.** `jb.scan_per_device` keeps one `fixed_size`
  state per device (a leading device axis, sharded) and runs each device's bulk `feed`
  under `shard_map`: no data moves between devices to batch.
* **The train step is ordinary code.** It sees one *global* batch, the 4 devices' batches
  side by side, sharded over `"data"` and never gathered to one device; XLA partitions the
  step (the gradient becomes an all-reduce). The result equals single-device training on
  batches of `4 * BATCH_PER_DEVICE`: the same elements in every batch.
* **Checkpoint beside the model.** With orbax-checkpoint installed
  (`pip install 'jaxbatch[distributed]'`), the sharded batcher states are saved next to
  the parameters mid-epoch and training resumes bit-identically.

Run: `python examples/sharded_training.py` (it simulates 4 CPU devices; on a real
accelerator host, drop the `jax_num_cpu_devices` line).
"""

import os
import tempfile

import jax

if __name__ == "__main__":  # simulate 4 CPU devices: before any JAX op, so before jaxbatch
    jax.config.update("jax_num_cpu_devices", 4)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxbatch as jb  # noqa: E402

NUM, DIM, BATCH_PER_DEVICE, EPOCHS, LR = 1024, 4, 8, 3, 0.1
TRUE_W = np.arange(1, DIM + 1, dtype=np.float32)


def make_data(num: int = NUM, seed: int = 0) -> dict[str, np.ndarray]:
    """A linear-regression stream: `y = x @ TRUE_W + 0.5` plus a little noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, DIM)).astype(np.float32)
    noise = 0.01 * rng.standard_normal(num).astype(np.float32)
    return {"x": x, "y": x @ TRUE_W + np.float32(0.5) + noise}


def init_params() -> dict[str, jax.Array]:
    return {"w": jnp.zeros(DIM, jnp.float32), "b": jnp.zeros((), jnp.float32)}


def train_step(params: dict[str, jax.Array], batch: jb.Batch) -> dict[str, jax.Array]:
    """One SGD step on a global batch (any sharding): mean squared error over valid rows."""

    def loss(p):
        err = batch.data["x"] @ p["w"] + p["b"] - batch.data["y"]
        err = jnp.where(batch.valid_mask, err, 0.0)
        return jnp.sum(err**2) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - LR * g, params, grads)


BATCHER = jb.fixed_size(BATCH_PER_DEVICE)  # build once: a static argument of the driver


def streams_on(mesh: jax.sharding.Mesh, data: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's per-device streams, assembled into the global `[devices, n, ...]`."""
    num = len(data["y"])
    idx = jb.stream_indices(num, mesh)  # [this process's devices, num // devices]
    return jb.device_streams({k: v[idx] for k, v in data.items()}, mesh)


def train(
    mesh: jax.sharding.Mesh, data: dict[str, np.ndarray], epochs: int = EPOCHS, step=train_step
):
    """`epochs` passes over `data`, data-parallel over the mesh's `"data"` axis."""
    streams = streams_on(mesh, data)
    params = init_params()
    for _ in range(epochs):
        params, states = jb.scan_per_device(BATCHER, step, params, streams, mesh)
    return params, states


def train_with_checkpoint(mesh: jax.sharding.Mesh, data: dict[str, np.ndarray], directory: str):
    """One epoch, saved and restored halfway (batcher states beside the parameters)."""
    streams = streams_on(mesh, data)
    half = streams["x"].shape[1] // 2
    first = jax.tree.map(lambda x: x[:, :half], streams)
    second = jax.tree.map(lambda x: x[:, half:], streams)
    params, states = jb.scan_per_device(
        BATCHER, train_step, init_params(), first, mesh, flush=False
    )
    tree = {"batcher": states, "train": params}
    jb.save_distributed(directory, tree)
    tree = jb.load_distributed(directory, like=tree)  # e.g. in a new process
    params, _ = jb.scan_per_device(
        BATCHER, train_step, tree["train"], second, mesh, states=tree["batcher"]
    )
    return params


def main() -> None:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    data = make_data()
    params, states = train(mesh, data)
    print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}")
    print("batcher states sharded:", states.count.sharding.spec, "per device counts", states.count)
    print("learned w:", np.round(np.asarray(params["w"]), 2), "b:", round(float(params["b"]), 2))

    single, _ = jb.scan(
        jb.fixed_size(BATCH_PER_DEVICE * jax.device_count()), train_step, init_params(), data
    )
    for _ in range(EPOCHS - 1):
        single, _ = jb.scan(
            jb.fixed_size(BATCH_PER_DEVICE * jax.device_count()), train_step, single, data
        )
    gap = max(float(jnp.max(jnp.abs(params[k] - single[k]))) for k in params)
    print(f"largest difference from single-device training: {gap:.2e}")

    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        print("orbax-checkpoint not installed: skipping the distributed checkpoint")
        return
    with tempfile.TemporaryDirectory() as tmp:
        resumed = train_with_checkpoint(mesh, data, os.path.join(tmp, "ckpt"))
    once, _ = jb.scan_per_device(BATCHER, train_step, init_params(), streams_on(mesh, data), mesh)
    same = all(bool(jnp.all(resumed[k] == once[k])) for k in once)
    print("checkpointed halfway and resumed: bit-identical to one epoch straight through:", same)


if __name__ == "__main__":
    main()

"""The main example: a scan-fused training loop, batching included, in one `jit`.

A logistic-regression classifier learns two Gaussian blobs. Each epoch is one call of
`jb.scan`: the batcher cuts the stream into batches of 32 and the SGD step consumes each
batch inside the same XLA loop; the final partial batch is padded and masked out of the
loss. Then the same stream is batched on the host with `jb.iterate`, checkpointed
mid-stream and resumed exactly. Data is generated here, so nothing is downloaded.

Run: `make demo` (or `python examples/demo.py`).
"""

import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

NUM, DIM, BATCH, EPOCHS, LR = 1000, 2, 32, 5, 0.5


def make_data(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=NUM).astype(np.int32)
    centres = np.where(labels[:, None] == 1, 1.5, -1.5).astype(np.float32)
    points = centres + rng.standard_normal((NUM, DIM)).astype(np.float32)
    return {"x": points, "y": labels}


def masked_loss(params, batch: jb.Batch):
    w, b = params
    logits = batch.data["x"] @ w + b
    y = batch.data["y"].astype(jnp.float32)
    per_row = jnp.logaddexp(0.0, logits) - y * logits  # binary cross-entropy
    return jnp.sum(jnp.where(batch.valid_mask, per_row, 0.0)) / jnp.maximum(batch.num_valid, 1)


def train_step(carry, batch: jb.Batch):
    params, loss_sum, steps = carry
    loss, grads = jax.value_and_grad(masked_loss)(params, batch)
    params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
    return params, loss_sum + loss, steps + 1


BATCHER = jb.fixed_size(BATCH)  # built once: drivers take it as a static argument


@jax.jit
def epoch(params, stream):
    carry = (params, jnp.float32(0), jnp.int32(0))
    (params, loss_sum, steps), state = jb.scan(BATCHER, train_step, carry, stream)
    return params, loss_sum / steps, state


def accuracy(params, data) -> float:
    w, b = params
    return float(np.mean(((data["x"] @ np.asarray(w) + float(b)) > 0) == data["y"]))


def main() -> None:
    data = make_data()
    stream = jax.tree.map(jnp.asarray, data)
    params = (jnp.zeros((DIM,), jnp.float32), jnp.float32(0))
    print(f"{NUM} elements, batches of {BATCH}, one jitted scan per epoch")
    for i in range(EPOCHS):
        params, mean_loss, state = epoch(params, stream)
        stats = {k: int(v) for k, v in jb.operation_stats(state).items()}
        print(
            f"epoch {i}: loss {float(mean_loss):.4f}  accuracy {accuracy(params, data):.3f}  "
            f"batches {stats['batch_count']}  padded rows {stats['padded_count']}"
        )

    # Host streaming from a Python generator, with an exact mid-stream checkpoint.
    rows = [{"x": data["x"][i], "y": data["y"][i]} for i in range(NUM)]
    stream_iter = jb.iterate(BATCHER, rows, chunk_size=128)
    first = [next(stream_iter) for _ in range(10)]
    path = os.path.join(tempfile.mkdtemp(), "iterate.ckpt")
    jb.save_state(path, stream_iter.checkpoint())
    resumed = jb.load_state(path, stream_iter.checkpoint())
    rest = list(jb.iterate(BATCHER, rows, chunk_size=128, resume=resumed))
    labels = np.concatenate(
        [np.asarray(b.data["y"])[np.asarray(b.valid_mask)] for b in first + rest]
    )
    assert np.array_equal(labels, data["y"]), "resumed stream differs"
    print(f"iterate: {len(first)} batches, checkpoint, resume, {len(rest)} more: exact")


if __name__ == "__main__":
    main()

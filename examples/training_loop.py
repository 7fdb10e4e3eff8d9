"""A scan-fused training loop: an MLP classifier whose batching and train step are one program.

What it teaches:

* **The train step is the consumer.** `jb.scan(BATCHER, train_step, carry, stream)` batches
  the stream and runs `carry = train_step(carry, batch)` on every ready batch inside one XLA
  loop. The carry is whatever the step threads through: parameters, optimiser state (here
  SGD with momentum in plain JAX, no optax) and running metrics.
* **Mask the loss per row.** The last batch of an epoch is padded; `batch.valid_mask` marks
  its real rows. The loss is a sum of per-row losses over valid rows divided by
  `batch.num_valid`, so padding never reaches a gradient or a metric.
* **Compiled once.** The batcher and the step are static arguments: a new epoch (new
  values, same shapes) reuses the program. A Python counter in `train_step` counts traces.
* **Continue a stream across calls.** Data that arrives in pieces (shards, files) is fed
  with `flush=False`, passing the returned batcher state to the next call (`state=`); the
  last piece flushes. The batches, and so the training, are those of one call over the whole
  epoch.
* **Checkpoint mid-epoch.** The batcher state (its buffered rows, its counters) is a PyTree:
  `jb.save_state` it beside the parameters, `jb.load_state` it back (the `like=` tree checks
  structure, shapes and dtypes) and carry on, bit-identical to never stopping.

Run: `python examples/training_loop.py` (add `--small` for a seconds-long run).
"""

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

CLASSES, BATCH_SIZE, LR, MOMENTUM = 3, 32, 0.1, 0.9
BATCHER = jb.fixed_size(BATCH_SIZE)  # build once: a static argument of `jb.scan`
TRACES = {"train_step": 0}


def make_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Three interleaved spirals in 2-D: `{"x": [n, 2] float32, "label": [n] int32}`."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, CLASSES, n).astype(np.int32)
    t = rng.uniform(0.1, 1.0, n)
    angle = label * (2 * np.pi / CLASSES) + 7.0 * t + rng.normal(0.0, 0.2, n)
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1).astype(np.float32)
    return {"x": x, "label": label}


def init_params(key: jax.Array, hidden: int) -> list[dict[str, jax.Array]]:
    sizes = [2, hidden, hidden, CLASSES]
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (a, b), jnp.float32) * np.float32(np.sqrt(2.0 / a)),
            "b": jnp.zeros(b, jnp.float32),
        }
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def forward(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"][None, :])
    return x @ params[-1]["w"] + params[-1]["b"][None, :]


def init_carry(params: list[dict[str, jax.Array]]) -> dict:
    zero = jnp.zeros((), jnp.int32)
    return {
        "params": params,
        "momentum": jax.tree.map(jnp.zeros_like, params),
        "loss_sum": jnp.zeros((), jnp.float32),  # summed over valid rows
        "rows": zero,
        "steps": zero,
    }


def train_step(carry: dict, batch: jb.Batch) -> dict:
    """One SGD-with-momentum step on a batch, padding rows masked out of the loss."""
    TRACES["train_step"] += 1  # runs while tracing only: counts compilations

    def loss_fn(params):
        logp = jax.nn.log_softmax(forward(params, batch.data["x"]))
        per_row = -jnp.take_along_axis(logp, batch.data["label"][:, None], axis=1)[:, 0]
        per_row = jnp.where(batch.valid_mask, per_row, 0.0)  # padding rows: no loss
        rows = jnp.maximum(batch.num_valid, 1).astype(jnp.float32)
        return jnp.sum(per_row) / rows, jnp.sum(per_row)

    (_, loss_sum), grads = jax.value_and_grad(loss_fn, has_aux=True)(carry["params"])
    momentum = jax.tree.map(lambda m, g: MOMENTUM * m + g, carry["momentum"], grads)
    params = jax.tree.map(lambda p, m: p - LR * m, carry["params"], momentum)
    return {
        "params": params,
        "momentum": momentum,
        "loss_sum": carry["loss_sum"] + loss_sum,
        "rows": carry["rows"] + batch.num_valid,
        "steps": carry["steps"] + 1,
    }


@jax.jit
def accuracy(params: list[dict[str, jax.Array]], data: dict[str, jax.Array]) -> jax.Array:
    predicted = jnp.argmax(forward(params, data["x"]), axis=1)
    return jnp.mean((predicted == data["label"]).astype(jnp.float32))


def reset_metrics(carry: dict) -> dict:
    zero = jnp.zeros((), jnp.int32)
    return {**carry, "loss_sum": jnp.zeros((), jnp.float32), "rows": zero}


def trees_equal(a, b) -> bool:
    return all(bool(jnp.all(x == y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def main(small: bool = False) -> dict:
    n, epochs, hidden = (300, 12, 16) if small else (3000, 30, 64)
    data = make_data(n)
    rng = np.random.default_rng(1)
    carry = init_carry(init_params(jax.random.key(0), hidden))

    # 1. Epochs: a fresh host-side permutation each time (new values, same shapes).
    print(f"{n} points, 3 spiral classes, MLP 2-{hidden}-{hidden}-3, batches of {BATCH_SIZE}")
    for epoch in range(epochs):
        order = rng.permutation(n)
        epoch_data = {k: v[order] for k, v in data.items()}
        carry, state = jb.scan(BATCHER, train_step, reset_metrics(carry), epoch_data)
        if epoch % max(epochs // 6, 1) == 0 or epoch == epochs - 1:
            loss = float(carry["loss_sum"]) / int(carry["rows"])
            acc = float(accuracy(carry["params"], data))
            print(f"  epoch {epoch:3d}  loss {loss:.3f}  accuracy {acc:.3f}")
    traces_after_epochs = TRACES["train_step"]
    stats = {k: int(v) for k, v in jb.operation_stats(state).items()}
    print(f"train_step traced {traces_after_epochs} time(s) for {epochs} epochs")
    print(f"last epoch: {stats['batch_count']} batches, {stats['padded_count']} padding rows")

    # 2. The same epoch arriving in three pieces: flush=False, then state= to continue.
    #    After the first piece, checkpoint the batcher state beside the training carry.
    pieces = np.array_split(np.arange(n), 3)  # piece sizes are not multiples of BATCH_SIZE
    pieces = [{k: v[piece] for k, v in data.items()} for piece in pieces]
    whole, _ = jb.scan(BATCHER, train_step, carry, data)
    split = carry
    state = BATCHER.init({"x": jnp.zeros(2, jnp.float32), "label": jnp.int32(0)})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.jb")
        for i, piece in enumerate(pieces):
            last = i == len(pieces) - 1
            split, state = jb.scan(BATCHER, train_step, split, piece, state=state, flush=last)
            if i == 0:
                jb.save_state(path, {"batcher": state, "train": split})
                saved = {"buffered": int(state.count), "like": {"batcher": state, "train": split}}
            if not last:
                size, buffered = len(piece["label"]), int(state.count)
                print(f"piece {i}: {size} elements, {buffered} rows left buffered")
        same_steps = int(split["steps"]) == int(whole["steps"])
        gap = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(split["params"]), jax.tree.leaves(whole["params"]))
        )
        steps = int(whole["steps"]) - int(carry["steps"])
        print(f"three calls vs one: the same {steps} steps: {same_steps}, params gap {gap:.1e}")

        # 3. Restore the checkpoint (as a new process would) and finish the epoch from it.
        #    `like` gives the structure, shapes and dtypes to check against: here the trees
        #    themselves; in a new process, the same trees built afresh or `jax.eval_shape`d.
        restored = jb.load_state(path, like=saved["like"])
    resumed, state = restored["train"], restored["batcher"]
    for i, piece in enumerate(pieces[1:], start=1):
        last = i == len(pieces) - 1
        resumed, state = jb.scan(BATCHER, train_step, resumed, piece, state=state, flush=last)
    identical = trees_equal(resumed, split)
    print(f"checkpoint after piece 0 ({saved['buffered']} rows buffered), restored and")
    print(f"  continued: bit-identical to the run that never stopped: {identical}")
    print(f"train_step traced {TRACES['train_step']} time(s) in all (one per program)")
    return {
        "accuracy": float(accuracy(carry["params"], data)),
        "traces_after_epochs": traces_after_epochs,
        "same_steps": same_steps,
        "gap": gap,
        "resumed_identical": identical,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small, seconds-long run")
    main(small=parser.parse_args().small)

"""Streaming from the host: `jb.iterate` over a Python generator or a Grain dataset, with
an exact mid-stream checkpoint.

What it teaches:

* **When the data does not fit on the device, stream it.** `jb.iterate(batcher, source,
  chunk_size=...)` takes any Python iterable of elements (dicts of numpy arrays here),
  stacks `chunk_size` of them on the host, batches them in one jitted call and yields the
  ready `jb.Batch`es; the batcher is flushed at the end of the source. Your jitted train
  step runs on each batch in a plain Python loop (compare `jb.scan`, which fuses the two).
* **Any iterable is a source**: a generator reading records, or a Grain `MapDataset`
  (`grain.MapDataset.source(...).shuffle(seed=...).map(...)`), which brings its own
  random access, seeded shuffling and transformations.
* **Checkpoint mid-stream, resume exactly.** `iterator.checkpoint()` is a
  `jb.IterateCheckpoint` (the batcher state, the source position, the batches of the
  current chunk already yielded). Save it with `jb.save_state` beside the model; to resume,
  load it against a `like` built the same way and pass it as `jb.iterate(...,
  resume=checkpoint)` with a source that yields the same elements from the start (the first
  `position` are read and skipped). The batches that follow are those of the run that never
  stopped.

Run: `python examples/streaming.py` (add `--small`). The Grain part needs `pip install grain`
(the `bench` extra) and is skipped with a note without it.
"""

import argparse
import os
import tempfile
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

DIM = 3
TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)


def make_record(i: int) -> dict[str, np.ndarray]:
    """Record `i` of the stream: `features` [3] float32, a float32 `target`, its `id`."""
    rng = np.random.default_rng(i)
    features = rng.standard_normal(DIM).astype(np.float32)
    return {"features": features, "target": np.float32(features @ TRUE_W), "id": np.int32(i)}


def read_records(n: int) -> Iterator[dict[str, np.ndarray]]:
    """A plain generator: think of it as reading lines of a file or messages of a queue."""
    for i in range(n):
        yield make_record(i)


@jax.jit
def train_step(w: jax.Array, batch: jb.Batch) -> jax.Array:
    """SGD on the squared error, padding rows masked out (a `jb.Batch` is a PyTree)."""

    def loss(w):
        err = batch.data["features"] @ w - batch.data["target"]
        err = jnp.where(batch.valid_mask, err, 0.0)
        return jnp.sum(err**2) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32)

    return w - 0.1 * jax.grad(loss)(w)


def like_checkpoint(batcher: jb.Batcher, element: dict) -> jb.IterateCheckpoint:
    """An `IterateCheckpoint` of the right structure, shapes and dtypes to load into."""
    return jb.IterateCheckpoint(
        state=batcher.init(element), position=jb.Counter.of(0), skip=jnp.int32(0)
    )


def train(
    batcher: jb.Batcher, source: Iterable, chunk_size: int, stop_after: int, path: str
) -> dict:
    """Train over `source`, checkpointing after `stop_after` batches; return what the rest of
    the stream gave (ids per batch and final weights) for comparison with a resumed run."""
    w = jnp.zeros(DIM, jnp.float32)
    stream = jb.iterate(batcher, source, chunk_size=chunk_size)
    rest = []
    for k, batch in enumerate(stream):
        if k >= stop_after:
            rest.append(np.asarray(batch.data["id"])[np.asarray(batch.valid_mask)].tolist())
        w = train_step(w, batch)
        if k + 1 == stop_after:
            # After the step: the checkpoint stands after every batch yielded so far.
            jb.save_state(path, {"iterate": stream.checkpoint(), "w": w})
    return {"rest": rest, "w": np.asarray(w), "batches": k + 1}


def resume(batcher: jb.Batcher, source: Iterable, chunk_size: int, path: str) -> dict:
    """As a new process would: load the checkpoint and finish the stream from it."""
    like = {"iterate": like_checkpoint(batcher, make_record(0)), "w": jnp.zeros(DIM, jnp.float32)}
    saved = jb.load_state(path, like=like)
    w = saved["w"]
    rest = []
    stream = jb.iterate(batcher, source, chunk_size=chunk_size, resume=saved["iterate"])
    for batch in stream:
        rest.append(np.asarray(batch.data["id"])[np.asarray(batch.valid_mask)].tolist())
        w = train_step(w, batch)
    position = int(saved["iterate"].position)
    return {"rest": rest, "w": np.asarray(w), "position": position}


def check_resume(
    name: str, batcher: jb.Batcher, make_source, chunk_size: int, stop_after: int
) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stream.jb")
        whole = train(batcher, make_source(), chunk_size, stop_after, path)
        resumed = resume(batcher, make_source(), chunk_size, path)
    same = whole["rest"] == resumed["rest"] and np.array_equal(whole["w"], resumed["w"])
    print(f"{name}: {whole['batches']} batches; learned w {np.round(whole['w'], 2)}")
    print(f"  checkpoint after {stop_after} batches (chunk starting at element")
    print(f"  {resumed['position']}), resumed: the same batches and weights: {same}")
    print(f"  the first batch after the checkpoint holds ids {whole['rest'][0][:8]} ...")
    return bool(same)


def main(small: bool = False) -> dict:
    n, batch_size, chunk_size = (50, 4, 8) if small else (20_000, 32, 256)
    batcher = jb.fixed_size(batch_size)  # build once per configuration
    stop_after = n // batch_size // 2 + 1  # mid-chunk: resume skips the batches yielded
    generator = check_resume("generator", batcher, lambda: read_records(n), chunk_size, stop_after)
    result = {"generator": generator}
    try:
        import grain
    except ImportError:
        print("grain is not installed (`pip install grain`): skipping the Grain source.")
        return result

    def grain_source():
        # Random access, a seeded shuffle and a map: the same elements on every pass.
        return grain.MapDataset.range(n).shuffle(seed=0).map(make_record)

    result["grain"] = check_resume(
        "grain.MapDataset", batcher, grain_source, chunk_size, stop_after
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a short stream")
    main(small=parser.parse_args().small)

"""Quickstart: batches of a fixed size, made and consumed inside one `jit`.

What it teaches:

* **An element is a PyTree of arrays; a stream is the same tree stacked.** Here each
  element is `{"x": [2] float32, "label": int32}` and the stream stacks `n` of them.
* **`jb.fixed_size(batch_size)` is a batcher**: pure `init / step / flush` functions over
  an explicit state. Build it once: drivers take it as a static argument.
* **`jb.scan(batcher, fn, carry, stream)`** batches the stream and calls
  `carry = fn(carry, batch)` on every ready batch, all in one compiled XLA program (the
  batches are never materialised). `fn` sees a `jb.Batch`: `batch.data` (the tree, each leaf
  `[batch_size, ...]`) and `batch.valid_mask` (`[batch_size]` bool).
* **The final flush.** At the end of the stream the partial batch is padded (with 0) and
  emitted; `valid_mask` marks its real rows, so mask every sum and mean with it. With
  `flush=False` the rows stay buffered in the returned state instead, to be continued by
  the next call (`state=`).
* **`jb.operation_stats(state)`** counts what happened: elements taken in, batches,
  padding rows, elements still buffered.
* **`jb.batch_all`** materialises every batch instead, for tests and small data.

Run: `python examples/quickstart.py` (add `--small` for a smaller stream).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

BATCH_SIZE = 4
BATCHER = jb.fixed_size(BATCH_SIZE)  # build once: a static argument of the drivers


def make_stream(n: int) -> dict[str, jax.Array]:
    """`n` elements `{"x": [2] float32, "label": int32}`, stacked on a leading axis."""
    x = jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)
    return {"x": x, "label": jnp.arange(n, dtype=jnp.int32) % 3}


def summarise(carry: dict[str, jax.Array], batch: jb.Batch) -> dict[str, jax.Array]:
    """The consumer: runs once per ready batch, inside the compiled program.

    Padding rows hold 0 here, but "unspecified" is the contract: always mask with
    `batch.valid_mask` rather than trusting the pad value.
    """
    valid = batch.valid_mask  # [batch_size] bool
    x_sum = jnp.sum(jnp.where(valid[:, None], batch.data["x"], 0.0), axis=0)
    return {
        "batches": carry["batches"] + 1,
        "rows": carry["rows"] + batch.num_valid,
        "x_sum": carry["x_sum"] + x_sum,
        "last_mask": valid,  # the mask of the last batch seen
    }


def empty_summary() -> dict[str, jax.Array]:
    zero = jnp.zeros((), jnp.int32)
    return {
        "batches": zero,
        "rows": zero,
        "x_sum": jnp.zeros(2, jnp.float32),
        "last_mask": jnp.zeros(BATCH_SIZE, bool),
    }


def counts(state) -> dict[str, int]:
    return {name: int(value) for name, value in jb.operation_stats(state).items()}


def main(small: bool = False) -> dict:
    n = 10 if small else 1002  # not a multiple of BATCH_SIZE: the last batch is partial
    stream = make_stream(n)

    # 1. One step at a time, by hand (what the drivers do for you, compiled).
    state = BATCHER.init({"x": jnp.zeros(2, jnp.float32), "label": jnp.int32(0)})
    for i in range(BATCH_SIZE):
        state, emit = BATCHER.step(state, {key: leaf[i] for key, leaf in stream.items()})
    print(f"after {BATCH_SIZE} steps: ready={bool(emit.ready)}, labels {emit.batch.data['label']}")

    # 2. The fused path: batching and the consumer in one jitted program.
    summary, state = jb.scan(BATCHER, summarise, empty_summary(), stream)
    print(f"\njb.scan over {n} elements in batches of {BATCH_SIZE}:")
    print(f"  {int(summary['batches'])} batches, {int(summary['rows'])} valid rows")
    print(f"  last batch's valid_mask {np.asarray(summary['last_mask'])} (the flushed remainder)")
    expected = np.asarray(stream["x"]).sum(axis=0)
    print(f"  masked sum of x {np.asarray(summary['x_sum'])} (numpy: {expected})")
    stats = counts(state)
    print(f"  operation_stats: {stats}")

    # 3. flush=False: the remainder stays buffered in the state, to continue the stream.
    _, open_state = jb.scan(BATCHER, summarise, empty_summary(), stream, flush=False)
    buffered = int(open_state.count)
    num_batches = counts(open_state)["batch_count"]
    print(f"\nwith flush=False: {num_batches} batches, {buffered} rows left buffered in the state")
    more = make_stream(BATCH_SIZE - buffered)  # just enough to complete that batch
    summary2, open_state = jb.scan(
        BATCHER, summarise, empty_summary(), more, state=open_state, flush=False
    )
    print(f"  {BATCH_SIZE - buffered} more elements complete it: {int(summary2['batches'])} batch")

    # 4. Materialised: every batch at once (for tests and small data).
    batches, count = jb.batch_all(BATCHER, stream)
    print(f"\njb.batch_all: {int(count)} batches, data['x'] {batches.data['x'].shape}")
    print(f"  last batch labels {batches.data['label'][-1]}, mask {batches.valid_mask[-1]}")
    return {
        "batches": int(summary["batches"]),
        "rows": int(summary["rows"]),
        "x_sum": np.asarray(summary["x_sum"]),
        "expected_x_sum": expected,
        "stats": stats,
        "buffered": buffered,
        "continued_batches": int(summary2["batches"]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small stream")
    main(small=parser.parse_args().small)

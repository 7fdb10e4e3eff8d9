"""Shuffling inside `jit`: a shuffle buffer and its PRNG key, both in the batcher state.

What it teaches:

* **`jb.shuffle(batch_size, buffer_size)`** holds `buffer_size` elements; once full, each
  incoming element takes the place of a uniformly drawn one, which goes into the batch
  being built. At the end of the stream `flush` drains the buffer in random order, the last
  batch padded (`valid_mask`). Every element comes out exactly once.
* **The key is part of the state.** A stochastic batcher's `init` needs a key: pass
  `key=jax.random.key(seed)` to `jb.scan` / `jb.batch_all` / `jb.iterate` (or to
  `batcher.init`). Same key, same order, on any run; `jax.random.fold_in(key, epoch)` gives
  every epoch its own order.
* **Exact resume.** The state holds the buffer and the key, so saving it mid-stream with
  `jb.save_state` and continuing from `jb.load_state` gives the very batches of the run that
  never stopped.
* **Buffer size is the randomness.** An element moves about `buffer_size` positions from
  where it came in (a full permutation of `n` moves one `n / 3` on average): shuffle a sorted
  or grouped stream with a buffer as large as its groups.

Run: `python examples/shuffling.py` (add `--small` for a short stream).
"""

import argparse
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb


def recorder(num_batches: int, batch_size: int):
    """A consumer that writes batch `k`'s `x` and `valid_mask` into slot `k` of its carry,
    and its initial carry: to look at the order the batcher produced."""

    def record(carry, batch):
        xs, masks, k = carry
        xs = jax.lax.dynamic_update_index_in_dim(xs, batch.data["x"], k, 0)
        masks = jax.lax.dynamic_update_index_in_dim(masks, batch.valid_mask, k, 0)
        return xs, masks, k + 1

    empty = (
        jnp.zeros((num_batches, batch_size), jnp.int32),
        jnp.zeros((num_batches, batch_size), bool),
        jnp.zeros((), jnp.int32),
    )
    return record, empty


def order(carry) -> np.ndarray:
    """The valid elements in the order they came out."""
    xs, masks, _ = carry
    return np.asarray(xs)[np.asarray(masks)]


def main(small: bool = False) -> dict:
    n, batch_size, buffer_size = (100, 8, 16) if small else (10_000, 32, 500)
    batcher = jb.shuffle(batch_size, buffer_size)
    record, empty = recorder(-(-n // batch_size), batch_size)
    stream = {"x": jnp.arange(n, dtype=jnp.int32)}  # a sorted stream: 0, 1, 2, ...
    key = jax.random.key(0)

    # 1. Same key, same order; another key, another order; every element exactly once.
    first = order(jb.scan(batcher, record, empty, stream, key=key)[0])
    again = order(jb.scan(batcher, record, empty, stream, key=key)[0])
    other = order(jb.scan(batcher, record, empty, stream, key=jax.random.key(1))[0])
    print(f"shuffle({batch_size}, buffer_size={buffer_size}) of {n} sorted elements")
    print(f"  key 0: {first[:8]} ...")
    print(f"  key 0: {again[:8]} ... (same: {np.array_equal(first, again)})")
    print(f"  key 1: {other[:8]} ... (same: {np.array_equal(first, other)})")
    exactly_once = np.array_equal(np.sort(first), np.arange(n))
    print(f"  every element exactly once: {exactly_once}")
    epoch_keys = [jax.random.fold_in(key, epoch) for epoch in range(2)]
    epochs = [order(jb.scan(batcher, record, empty, stream, key=k)[0]) for k in epoch_keys]
    print(f"  fold_in(key, epoch) for epochs 0 and 1: {epochs[0][:4]} ... vs {epochs[1][:4]} ...")

    # 2. How far elements move: about `buffer_size`, not the n/3 of a full permutation.
    moved = float(np.mean(np.abs(first - np.arange(n))))
    print(f"  mean displacement {moved:.0f} positions (a full permutation: about {n / 3:.0f})")

    # 3. Stop halfway (mid-batch), checkpoint, restore, continue: the same batches.
    half = n // 2 + 3
    head = {"x": stream["x"][:half]}
    tail = {"x": stream["x"][half:]}
    carry, state = jb.scan(batcher, record, empty, head, key=key, flush=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shuffle.jb")
        jb.save_state(path, {"batcher": state, "consumer": carry})
        like = {"batcher": state, "consumer": carry}  # or `jax.eval_shape` of how you built it
        restored = jb.load_state(path, like=like)
    resumed, _ = jb.scan(batcher, record, restored["consumer"], tail, state=restored["batcher"])
    identical = np.array_equal(order(resumed), first)
    print(f"\nstopped after {half} elements ({int(state.filled)} in the buffer, the key in the")
    print(f"  state), saved, restored, continued: the same order as one run: {identical}")
    return {
        "same_key_same_order": bool(np.array_equal(first, again)),
        "other_key_other_order": not np.array_equal(first, other),
        "exactly_once": bool(exactly_once),
        "epochs_differ": not np.array_equal(*epochs),
        "moved": moved,
        "resumed_identical": bool(identical),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a short stream")
    main(small=parser.parse_args().small)

"""Benchmark: `jb.shuffle` throughput against a memory copy and the peers, in one run.

8192 elements `{"image": f32[32,32,3], "label": i32[]}` (~100 MB) shuffled and batched by
128, every batch read by the same consumer (masked per-row sums). Printed, best of
`repeats`:

* `jb.scan(jb.shuffle(128, buffer_size))` for a small and a large buffer, and
  `jb.scan(jb.fixed_size(128))` (the same driver, no shuffle), as elements/s and as a ratio
  to a jitted XLA copy and a NumPy copy of the same bytes;
* Grain 0.2.18 on the same job: `MapDataset.source(rows).shuffle(seed).batch(128)` (a full
  random permutation by random access, no buffer) and
  `WindowShuffleIterDataset(window_size=buffer_size)` then `.batch(128)` (a windowed
  shuffle: closest to a shuffle buffer), the consumer in NumPy on each batch;
* tf.data `.shuffle(buffer_size).batch(128)` if TensorFlow is importable (else a note).

`jb.shuffle` has a bulk `feed` (plan the buffer's moves on slot numbers, then gather each
batch from the stream): `jb.scan` runs it like `fixed_size`'s, the consumer in one
`fori_loop` over the planned batches, the end-of-stream drain folded into the same plan.
It is compared with `fixed_size` both bulk and stepped one element at a time
(`by_element`). The `consume+drain` rows run the bulk `feed` without the drain, then
`jb.drain`: the drain as repeated `flush` calls, each moving the payload of the whole buffer
(a permutation gather of its `buffer_size + 1` rows), so they are slower for a large buffer;
before the bulk path they were the fast variant, since stepping with the drain folded into
one `while_loop` cost a copy of the state per element (a `lax.cond(i < n, step, flush)`).

Run `python benchmarks/bench_shuffle.py` (or `--quick` for a smoke run). Timings on a shared
CPU machine are noisy: compare ratios taken in the same run.
"""

import argparse
import importlib.util
import platform

import jax
import jax.numpy as jnp
import numpy as np
from _common import timeit

import jaxbatch as jb

NUM, BATCH, SHAPE = 8192, 128, (32, 32, 3)


def consume(carry, batch):
    """Reads every byte of the batch: per-row sums, masked like a per-example loss."""
    img_sum, label_sum = carry
    rows = jnp.sum(batch.data["image"], axis=(1, 2, 3))
    img = jnp.sum(jnp.where(batch.valid_mask, rows, 0.0))
    labels = jnp.sum(jnp.where(batch.valid_mask, batch.data["label"], 0))
    return img_sum + img, label_sum + labels


CARRY = (jnp.float32(0), jnp.int32(0))


class _Rows:
    """A random-access source of elements (what Grain's `MapDataset.source` takes)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _numpy_consume(image, label):
    return np.sum(image, axis=(1, 2, 3)).sum() + label.sum()


def main(quick: bool = False) -> None:
    num = 1024 if quick else NUM
    repeats = 2 if quick else 5
    buffers = (256,) if quick else (256, 4096)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((num, *SHAPE), dtype=np.float32)
    labels = rng.integers(0, 10, num, dtype=np.int32)
    stream = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
    key = jax.random.key(0)
    first = jax.tree.map(lambda x: x[0], stream)
    nbytes = images.nbytes + labels.nbytes

    results = {}
    for buffer_size in buffers:
        batcher = jb.shuffle(BATCH, buffer_size)
        results[f"jb.shuffle(buffer={buffer_size})"] = timeit(
            lambda b=batcher: jax.block_until_ready(jb.scan(b, consume, CARRY, stream, key=key)),
            repeats,
        )

        # The same work as two loops (the bulk `feed` without the drain, then `jb.drain`'s
        # `flush` calls): the consumer at two sites (see the module docstring).
        def steps_then_drain(key, stream, b=batcher):
            state = b.init(jb.element_spec(first), key=key)
            carry, state = jb.consume(b, consume, CARRY, state, stream)
            return jb.drain(b, consume, carry, state)[0]

        two_loops = jax.jit(steps_then_drain)
        results[f"jb.shuffle(buffer={buffer_size}) consume+drain"] = timeit(
            lambda f=two_loops: jax.block_until_ready(f(key, stream)), repeats
        )
    fixed = jb.fixed_size(BATCH)
    results["jb.fixed_size (bulk feed)"] = timeit(
        lambda: jax.block_until_ready(jb.scan(fixed, consume, CARRY, stream)), repeats
    )
    stepped = fixed._replace(feed=None)  # the same driver loop as shuffle: one step each
    results["jb.fixed_size (by_element)"] = timeit(
        lambda: jax.block_until_ready(jb.scan(stepped, consume, CARRY, stream)), repeats
    )
    xla_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
    results["xla_copy"] = timeit(lambda: jax.block_until_ready(xla_copy(stream)), repeats)
    warm = {"image": np.empty_like(images), "label": np.empty_like(labels)}

    def numpy_copy():
        np.copyto(warm["image"], images)
        np.copyto(warm["label"], labels)

    results["numpy_copy"] = timeit(numpy_copy, repeats)

    notes = []
    if importlib.util.find_spec("grain") is not None:
        import grain.python as grain
        from grain import experimental as grain_experimental

        source = grain.MapDataset.source(_Rows(images, labels))
        full = source.shuffle(seed=0).batch(BATCH)

        def run_full():
            for b in full:
                _numpy_consume(b["image"], b["label"])

        results["grain MapDataset.shuffle (full perm.)"] = timeit(run_full, max(1, repeats // 2))
        for buffer_size in buffers:
            windowed = grain_experimental.WindowShuffleIterDataset(
                source.to_iter_dataset(), window_size=buffer_size, seed=0
            ).batch(BATCH)

            def run_windowed(ds=windowed):
                for b in ds:
                    _numpy_consume(b["image"], b["label"])

            name = f"grain WindowShuffleIterDataset(window={buffer_size})"
            results[name] = timeit(run_windowed, max(1, repeats // 2))
    else:
        notes.append("grain is not installed: skipped")
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        for buffer_size in buffers:
            ds = (
                tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
                .shuffle(buffer_size, seed=0)
                .batch(BATCH)
            )

            def run_tf(ds=ds):
                for b in ds:
                    _numpy_consume(b["image"].numpy(), b["label"].numpy())

            results[f"tf.data shuffle({buffer_size}).batch"] = timeit(run_tf, max(1, repeats // 2))
    else:
        notes.append("tensorflow is not importable: tf.data `.shuffle(n).batch(b)` skipped")

    print(
        f"{num} elements of {nbytes / num / 1024:.1f} KiB ({nbytes / 2**20:.0f} MiB), batch "
        f"{BATCH}; {platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"best of {repeats}"
    )
    print(f"{'path':<46} {'ms':>9} {'Melem/s':>9} {'GB/s':>7} {'/ xla_copy':>10}")
    for name, t in results.items():
        print(
            f"{name:<46} {1e3 * t:>9.2f} {num / t / 1e6:>9.3f} {nbytes / t / 1e9:>7.2f} "
            f"{t / results['xla_copy']:>10.1f}"
        )
    for note in notes:
        print("note:", note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

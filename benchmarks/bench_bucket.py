"""Benchmark: `jb.bucket_by_length` inside `jit` against host-side bucketing, same data, same run.

16384 int32 sequences with lengths uniform in [16, 512] (padded to 512 for `jit`) bucketed
by length into boundaries (64, 128, 256, 512) with batch sizes (128, 64, 32, 16): about
8192 tokens per batch. The fused path is `jb.scan` with `jb.by_bucket(consume)`, a consumer
that reads every token of the ready bucket's batch (a masked sum), traced once per bucket
shape inside one `lax.switch`. Printed: sequences/s of

* `jb.scan` (the fused path: `bucket_by_length` has no bulk `feed`, so the driver steps it
  one element at a time in one loop);
* `jb.iterate` over host rows (numpy), the same consumer in numpy on each ready batch;
* Grain 0.2.18 has no bucketing transformation: its row is `MapDataset.source` read in
  order, bucketed by a plain Python loop (what a Grain user writes), the consumer in numpy;
* tf.data's `bucket_by_sequence_length`, only if TensorFlow is importable;

each as a ratio to a plain numpy copy of the same (padded) token bytes, measured in the same
run. `measure(num, repeats)` returns the table `benchmarks/run.py` prints; `time_fused(num,
repeats)` times the fused path alone. Run `python benchmarks/bench_bucket.py [--quick]`.
"""

import argparse
import functools
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import print_rows, timeit

import jaxbatch as jb

NUM, MIN_LEN, MAX_LEN = 16384, 16, 512
BOUNDARIES, BATCH_SIZES = (64, 128, 256, 512), (128, 64, 32, 16)


def make_data(num, seed=0):
    """`num` sequences: tokens `[num, MAX_LEN]` int32 (zero past each length) and lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=num).astype(np.int32)
    tokens = rng.integers(1, 100, size=(num, MAX_LEN), dtype=np.int32)  # sums fit in int32
    tokens = np.where(np.arange(MAX_LEN) < lengths[:, None], tokens, 0)
    return tokens, lengths


def consume(total, batch):
    """Reads every token of a bucket's batch (a masked sum), as a loss over it would."""
    rows = jnp.sum(batch.data["tokens"], axis=1)
    return total + jnp.sum(jnp.where(batch.valid_mask, rows, 0))


@functools.cache
def make_batcher():
    """The batcher, built once: it is a static argument, so a new one would recompile."""
    return jb.bucket_by_length(BOUNDARIES, BATCH_SIZES, length="length", features=["tokens"])


CONSUMER = jb.by_bucket(consume)


def _fused(num):
    """The compiled fused program and its input stream, and the trace + compile time."""
    tokens, lengths = make_data(num)
    stream = jax.block_until_ready({"tokens": jnp.asarray(tokens), "length": jnp.asarray(lengths)})
    batcher = make_batcher()
    fused = jax.jit(lambda s: jb.scan(batcher, CONSUMER, jnp.int32(0), s))
    start = time.perf_counter()
    compiled = fused.lower(stream).compile()
    return compiled, stream, time.perf_counter() - start, tokens, lengths


def time_fused(num, repeats=3):
    """Best time of the fused path (`jb.scan` of `bucket_by_length`) on `num` sequences."""
    compiled, stream, _, _, _ = _fused(num)
    return timeit(lambda: jax.block_until_ready(compiled(stream)), repeats)


class _Rows:
    """A random-access source of sequences (what Grain's `MapDataset.source` takes)."""

    def __init__(self, tokens, lengths):
        self.tokens, self.lengths = tokens, lengths

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        return {"tokens": self.tokens[i], "length": self.lengths[i]}


def _iterate(tokens, lengths):
    """`jb.iterate` over host rows; the consumer in numpy on the ready bucket's batch.

    Chunks of 128 rows, with the documented safe room `sum(ceil(128 / b))` (+ one per
    bucket for the flush): `iterate`'s compile time grows with `max_batches_per_chunk`, as
    every slot holds one batch per bucket.
    """
    chunk = 128
    room = sum(-(-chunk // b) for b in BATCH_SIZES) + len(BATCH_SIZES)
    total = 0
    for out in jb.iterate(make_batcher(), _Rows(tokens, lengths), chunk_size=chunk,
                          max_batches_per_chunk=room):  # fmt: skip
        batch = out.batches[int(out.bucket)]
        mask = np.asarray(batch.valid_mask)
        total += int(np.sum(np.asarray(batch.data["tokens"])[mask]))
    return total


def _python_bucketing(rows):
    """Bucket host rows with a Python loop (no Grain op does it); numpy consumer per batch."""
    bounds = np.asarray(BOUNDARIES)
    buckets = [[] for _ in BOUNDARIES]
    total = 0
    for row in rows:
        i = int(np.searchsorted(bounds, row["length"], side="left"))
        buckets[i].append(row["tokens"][: BOUNDARIES[i]])
        if len(buckets[i]) == BATCH_SIZES[i]:
            total += int(np.sum(np.stack(buckets[i])))
            buckets[i] = []
    for bucket in buckets:  # flush: the partial buckets, in bucket order
        if bucket:
            total += int(np.sum(np.stack(bucket)))
    return total


def _grain(tokens, lengths):
    import grain.python as grain

    return _python_bucketing(grain.MapDataset.source(_Rows(tokens, lengths)))


def _tfdata(tokens, lengths):
    """tf.data's `bucket_by_sequence_length` on the same sequences (untested without TF)."""
    import tensorflow as tf

    def gen():
        for t, n in zip(tokens, lengths):
            yield t[:n]

    ds = tf.data.Dataset.from_generator(gen, output_signature=tf.TensorSpec([None], tf.int32))
    # tf buckets are [0, b0), [b0, b1), ...: boundaries + 1 give ours, (b_{i-1}, b_i].
    ds = ds.bucket_by_sequence_length(
        lambda x: tf.shape(x)[0],
        bucket_boundaries=[b + 1 for b in BOUNDARIES],
        bucket_batch_sizes=[*BATCH_SIZES, BATCH_SIZES[-1]],
        pad_to_bucket_boundary=False,
    )
    total = 0
    for batch in ds:
        total += int(np.sum(batch.numpy()))
    return total


def measure(num=NUM, repeats=5, peers=True):
    """Measure every path on `num` sequences (best of `repeats`; host paths a third as many).

    Returns:
        `{"bucket": table}`: a dict with `title`, `unit` ("sequences"), `num`, `bytes` (the
        padded token bytes), `repeats`, `numpy_copy_s`, `compile_s` (trace + compile of the
        fused program), `rows` (`name`, `seconds`, `system`, `group`), `fused`, `checks` and
        `notes`.
    """
    compiled, stream, compile_s, tokens, lengths = _fused(num)
    expected = int(np.sum(tokens, dtype=np.int64))
    total, state = compiled(stream)
    assert int(total) == expected, "the fused consumer missed tokens"
    assert _iterate(tokens, lengths) == expected, "jb.iterate missed tokens"
    host_repeats = max(1, repeats // 3)
    warm_tokens, warm_lengths = np.empty_like(tokens), np.empty_like(lengths)

    def numpy_copy():
        np.copyto(warm_tokens, tokens)
        np.copyto(warm_lengths, lengths)

    copy_s = timeit(numpy_copy, repeats)
    rows = [
        {"name": "numpy copy (reference)", "seconds": copy_s, "system": "numpy", "group": ""},
        {
            "name": "jb.scan + jb.by_bucket",
            "seconds": timeit(lambda: jax.block_until_ready(compiled(stream)), repeats),
            "system": "jaxbatch",
            "group": "",
        },
        {
            "name": "jb.iterate (host rows, numpy consumer)",
            "seconds": timeit(lambda: _iterate(tokens, lengths), host_repeats),
            "system": "jaxbatch",
            "group": "",
        },
    ]
    notes = []
    if peers and importlib.util.find_spec("grain") is not None:
        assert _grain(tokens, lengths) == expected
        rows.append(
            {
                "name": "Grain source + Python bucketing loop",
                "seconds": timeit(lambda: _grain(tokens, lengths), host_repeats),
                "system": "grain",
                "group": "",
            }
        )
        notes.append(
            "Grain 0.2.18 has no bucketing transformation: its row reads `MapDataset.source` "
            "in order and buckets with a plain Python loop."
        )
    if peers and importlib.util.find_spec("tensorflow") is not None:
        rows.append(
            {
                "name": "tf.data bucket_by_sequence_length",
                "seconds": timeit(lambda: _tfdata(tokens, lengths), host_repeats),
                "system": "tf.data",
                "group": "",
            }
        )
    stats = state.stats
    checks = [
        ("batches emitted", int(stats.batches), ""),
        ("padding rows (partial buckets at flush)", int(stats.padded), ""),
        ("trace + compile (s)", compile_s, ""),
    ]
    return {
        "bucket": {
            "title": (
                f"bucket_by_length: int32 sequences, lengths in [{MIN_LEN}, {MAX_LEN}], "
                f"boundaries {BOUNDARIES}, batch sizes {BATCH_SIZES}"
            ),
            "unit": "sequences",
            "num": num,
            "bytes": tokens.nbytes + lengths.nbytes,
            "repeats": repeats,
            "numpy_copy_s": copy_s,
            "compile_s": compile_s,
            "rows": rows,
            "fused": "jb.scan + jb.by_bucket",
            "checks": checks,
            "notes": notes,
        }
    }


def main(quick=False):
    num = 1024 if quick else NUM
    repeats = 2 if quick else 5
    table = measure(num, repeats)["bucket"]
    print(f"jaxbatch bucket benchmark: {table['title']}; {num} sequences, best of {repeats}")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print_rows(table, unit="seq/s", width=42)
    for note in table["notes"]:
        print("note:", note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

"""Benchmark: `fixed_size` batching against the memory-copy ceiling, measured in one run.

16384 elements `{"image": f32[32,32,3], "label": i32[]}` into batches of 128 (~200 MB).
Every path feeds the same consumer, which reads every byte of each batch. Printed:

* `scan` driver vs the zero-overhead limit (the consumer scanned over data already reshaped
  into batches), for two consumers: the light one (masked per-row sums)   target <= 1.10x
  and a 2-layer MLP train step (3072 -> 256 -> 10, SGD, masked per-row loss)  <= 1.05x
* compile time of the MLP `scan` program vs the plain `lax.scan` one    target <= 1.15x
  and the consumer's trace count in each driver program                 target 1
* element-by-element (one element per scan step) vs limit + numpy's copy of the bytes, the
  floor for writing every element into the buffer once.             target <= 1.25x
* `batch_all` vs a jitted XLA copy of the same arrays.               target >= 1.0x (speed)
  (`fixed_size`'s `Emissions.stacked` builds all batches as one pad-and-reshape.)
* compile time of the `scan` driver and its trace count.           target < 1 s, 1 trace
* `iterate` (host streaming from numpy rows) and Grain and tf.data on the same batching
  job, where installed.

Run with `make bench` (or `python benchmarks/bench_fixed_size.py --quick` for a smoke run).
"""

import argparse
import importlib.util
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

NUM, BATCH, SHAPE = 16384, 128, (32, 32, 3)


def timeit(fn, repeats):
    """Best wall time of `fn()` (which must block) over `repeats` runs after one warm-up.

    The minimum, as `timeit` advises: on a shared machine the noise only ever adds time.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def consume(carry, batch):
    """Reads every byte of the batch: per-row sums, masked like a per-example loss."""
    img_sum, label_sum = carry
    rows = jnp.sum(batch.data["image"], axis=(1, 2, 3))
    img = jnp.sum(jnp.where(batch.valid_mask, rows, 0.0))
    labels = jnp.sum(jnp.where(batch.valid_mask, batch.data["label"], 0))
    return img_sum + img, label_sum + labels


CARRY = (jnp.float32(0), jnp.int32(0))


def main(quick: bool = False) -> None:
    num = 2048 if quick else NUM
    repeats = 3 if quick else 15
    rng = np.random.default_rng(0)
    images = rng.standard_normal((num, *SHAPE), dtype=np.float32)
    labels = rng.integers(0, 10, size=(num,), dtype=np.int32)
    stream = jax.block_until_ready({"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    nbytes = images.nbytes + labels.nbytes
    batcher = jb.fixed_size(BATCH)
    stepper = batcher._replace(feed=None)  # the same batcher, stepped one element at a time
    traces = []

    # --- the limit: the consumer over data already in batch shape
    reshaped = jax.tree.map(lambda x: x.reshape(num // BATCH, BATCH, *x.shape[1:]), stream)

    @jax.jit
    def limit(batched):
        def body(carry, rows):
            batch = jb.Batch(data=rows, valid_mask=jnp.ones((BATCH,), bool))
            return consume(carry, batch), None

        return jax.lax.scan(body, CARRY, batched)[0]

    # --- the fused driver (bulk feed), as a user jits it
    @jax.jit
    def fused(elements):
        traces.append(1)
        return jb.scan(batcher, consume, CARRY, elements)[0]

    start = time.perf_counter()
    compiled = fused.lower(stream).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(stream))
    jax.block_until_ready(fused(stream))
    jax.block_until_ready(fused(jax.tree.map(lambda x: x + 1, stream)))  # new values
    trace_count = len(traces)

    # --- element by element: one element per scan step (as when produced inside the scan)
    @jax.jit
    def by_element(elements):
        state = batcher.init(jb.element_spec(jax.tree.map(lambda x: x[0], elements)))
        return jb.consume(stepper, state, elements, consume, CARRY)[1]

    # --- materialise
    @jax.jit
    def xla_copy(tree):
        return jax.tree.map(jnp.copy, tree)

    warm = {k: np.empty_like(v) for k, v in (("image", images), ("label", labels))}

    def numpy_copy():
        np.copyto(warm["image"], images)
        np.copyto(warm["label"], labels)

    results = {
        "limit": timeit(lambda: jax.block_until_ready(limit(reshaped)), repeats),
        "scan": timeit(lambda: jax.block_until_ready(fused(stream)), repeats),
        "by_element": timeit(lambda: jax.block_until_ready(by_element(stream)), repeats),
        "batch_all": timeit(lambda: jax.block_until_ready(jb.batch_all(batcher, stream)), repeats),
        "xla_copy": timeit(lambda: jax.block_until_ready(xla_copy(stream)), repeats),
        "numpy_copy": timeit(numpy_copy, repeats),
        "iterate": timeit(lambda: _iterate(batcher, images, labels), max(1, repeats // 3)),
    }
    check = [np.asarray(x) for x in (limit(reshaped), fused(stream), by_element(stream))]
    assert all(np.allclose(c, check[0]) for c in check), "paths disagree"

    peers = {}
    if importlib.util.find_spec("grain") is not None:
        peers["grain"] = _grain(images, labels, repeats)
    if importlib.util.find_spec("tensorflow") is not None:
        peers["tf.data"] = _tfdata(images, labels, repeats)

    mlp = _mlp(batcher, stream, reshaped, repeats)
    r = results
    print(
        f"jaxbatch fixed_size benchmark: {num} elements of {SHAPE} f32 + i32 label, batch {BATCH}"
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.machine()}")
    print(f"bytes: {nbytes / 1e6:.1f} MB; times are the best of {repeats}")
    print()
    row = "{:<34} {:>9.2f} ms {:>12,.0f} el/s  {}"
    names = ("limit", "scan", "by_element", "batch_all", "xla_copy", "numpy_copy", "iterate")
    for name in names:
        print(row.format(name, r[name] * 1e3, num / r[name], ""))
    for name, t in peers.items():
        print(row.format(name + " (peer, host batching)", t * 1e3, num / t, ""))
    print()
    floor = r["limit"] + r["numpy_copy"]
    lines = [
        ("scan / limit", r["scan"] / r["limit"], "<= 1.10"),
        ("by_element / (limit + numpy_copy)", r["by_element"] / floor, "<= 1.25"),
        ("batch_all speed / xla_copy speed", r["xla_copy"] / r["batch_all"], ">= 1.0"),
        ("batch_all speed / numpy_copy speed", r["numpy_copy"] / r["batch_all"], ""),
        ("xla_copy speed / numpy_copy speed", r["numpy_copy"] / r["xla_copy"], ""),
        ("scan / numpy_copy", r["scan"] / r["numpy_copy"], ""),
    ]
    for name, t in peers.items():
        lines.append((f"{name} time / scan time", t / r["scan"], ""))
        lines.append((f"{name} time / iterate time", t / r["iterate"], ""))
    for name, ratio, target in lines:
        print(f"{name:<40} {ratio:6.2f}x   {('target ' + target) if target else ''}")
    print(f"{'scan trace + compile':<40} {compile_s:6.2f} s    target < 1 s")
    print(f"{'scan traces over 3 calls':<40} {trace_count:>6}      target 1")
    print()
    print("MLP consumer (3072 -> 256 -> 10, SGD, masked per-row loss):")
    print(row.format("limit (lax.scan over batches)", mlp["limit"] * 1e3, num / mlp["limit"], ""))
    print(row.format("jb.scan", mlp["scan"] * 1e3, num / mlp["scan"], ""))
    print(
        row.format(
            "jb.scan, stepped one by one", mlp["by_element"] * 1e3, num / mlp["by_element"], ""
        )
    )
    print(f"{'MLP scan / limit':<40} {mlp['scan'] / mlp['limit']:6.2f}x   target <= 1.05")
    print(
        f"{'MLP compile: scan / lax.scan':<40} {mlp['compile_scan'] / mlp['compile_limit']:6.2f}x"
        f"   target <= 1.15 ({mlp['compile_scan']:.2f} s vs {mlp['compile_limit']:.2f} s)"
    )
    for name, count in mlp["traces"].items():  # each program was traced 3 times
        print(f"{'consumer traces per program: ' + name:<40} {count / 3:>6.0f}      target 1")
    if not peers:
        print("peers: grain and tf.data not installed; skipped")


def _mlp(batcher, stream, reshaped, repeats):
    """The fused path with a real train step: time, compile time and consumer traces."""
    k1, k2 = jax.random.split(jax.random.key(0))
    size = int(np.prod(SHAPE))
    params = {
        "w1": jax.random.normal(k1, (size, 256)) / np.sqrt(size),
        "b1": jnp.zeros(256),
        "w2": jax.random.normal(k2, (256, 10)) / 16.0,
        "b2": jnp.zeros(10),
    }
    traces = {"jb.scan": 0, "jb.scan, stepped": 0, "lax.scan": 0}  # per program, x3 compiles

    def train_step(name):
        def step(params, batch):
            traces[name] += 1

            def loss(params):
                x = batch.data["image"].reshape(batch.batch_size, -1)
                h = jax.nn.relu(x @ params["w1"] + params["b1"])
                logits = h @ params["w2"] + params["b2"]
                logp = jax.nn.log_softmax(logits)
                nll = -jnp.take_along_axis(logp, batch.data["label"][:, None], axis=1)[:, 0]
                n = jnp.maximum(batch.num_valid, 1).astype(jnp.float32)
                return jnp.sum(jnp.where(batch.valid_mask, nll, 0.0)) / n

            grads = jax.grad(loss)(params)
            return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)

        return step

    limit_step, scan_step = train_step("lax.scan"), train_step("jb.scan")
    stepped_step = train_step("jb.scan, stepped")

    def limit(params, batched):
        def body(params, rows):
            return limit_step(
                params, jb.Batch(data=rows, valid_mask=jnp.ones((BATCH,), bool))
            ), None

        return jax.lax.scan(body, params, batched)[0]

    def fused(params, elements):
        return jb.scan(batcher, scan_step, params, elements)[0]

    def by_element(params, elements):
        return jb.scan(batcher._replace(feed=None), stepped_step, params, elements)[0]

    def compile_time(fn, *args):  # best of 3 fresh trace + compile (a fresh `jit` each time)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            times.append(time.perf_counter() - start)
        return min(times), compiled

    compile_limit, limit_c = compile_time(limit, params, reshaped)
    compile_scan, fused_c = compile_time(fused, params, stream)
    _, by_element_c = compile_time(by_element, params, stream)
    a, b = limit_c(params, reshaped), fused_c(params, stream)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.allclose(x, y, atol=1e-5), a, b)))
    return {
        "limit": timeit(lambda: jax.block_until_ready(limit_c(params, reshaped)), repeats),
        "scan": timeit(lambda: jax.block_until_ready(fused_c(params, stream)), repeats),
        "by_element": timeit(lambda: jax.block_until_ready(by_element_c(params, stream)), 3),
        "compile_limit": compile_limit,
        "compile_scan": compile_scan,
        "traces": traces,
    }


def _iterate(batcher, images, labels):
    """Host streaming: `jb.iterate` over numpy rows, the consumer (numpy) on each batch."""
    for b in jb.iterate(batcher, _Rows(images, labels), chunk_size=1024):
        image, label = np.asarray(b.data["image"]), np.asarray(b.data["label"])
        np.sum(image, axis=(1, 2, 3)).sum() + label.sum()


class _Rows:
    """A random-access source of elements (what Grain's `MapDataset.source` takes)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


def _grain(images, labels, repeats):
    import grain.python as grain

    batches = grain.MapDataset.source(_Rows(images, labels)).batch(BATCH)

    def run():
        for b in batches:  # the same consumer, in numpy: read every byte of the batch
            np.sum(b["image"], axis=(1, 2, 3)).sum() + b["label"].sum()

    return timeit(run, max(1, repeats // 3))


def _tfdata(images, labels, repeats):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(BATCH)

    def run():
        for b in ds:
            np.sum(b["image"].numpy(), axis=(1, 2, 3)).sum() + b["label"].numpy().sum()

    return timeit(run, max(1, repeats // 3))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

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
  job, where installed: with the light consumer in numpy on each batch, and with the MLP
  train step jitted once and called on each host batch.

`measure(num, repeats)` returns the measurements (one table per consumer, in the schema
`benchmarks/run.py` tabulates) and `time_fused(num, repeats)` times the fused path alone.
Run with `make bench` (all workloads) or `python benchmarks/bench_fixed_size.py [--quick]`
(this one, with its targets).
"""

import argparse
import importlib.util
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import print_rows, timeit

import jaxbatch as jb

NUM, BATCH, SHAPE = 16384, 128, (32, 32, 3)


def consume(carry, batch):
    """Reads every byte of the batch: per-row sums, masked like a per-example loss."""
    img_sum, label_sum = carry
    rows = jnp.sum(batch.data["image"], axis=(1, 2, 3))
    img = jnp.sum(jnp.where(batch.valid_mask, rows, 0.0))
    labels = jnp.sum(jnp.where(batch.valid_mask, batch.data["label"], 0))
    return img_sum + img, label_sum + labels


CARRY = (jnp.float32(0), jnp.int32(0))


def make_data(num, seed=0):
    """`num` random images and labels, as numpy arrays."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((num, *SHAPE), dtype=np.float32)
    labels = rng.integers(0, 10, size=(num,), dtype=np.int32)
    return images, labels


def _numpy_copy_time(images, labels, repeats):
    """A plain numpy copy of the same bytes into a warm buffer: the reference of every ratio."""
    warm = {"image": np.empty_like(images), "label": np.empty_like(labels)}

    def numpy_copy():
        np.copyto(warm["image"], images)
        np.copyto(warm["label"], labels)

    return timeit(numpy_copy, repeats)


def _row(name, seconds, system, group=""):
    return {"name": name, "seconds": float(seconds), "system": system, "group": group}


def measure(num=NUM, repeats=15, consumers=("light", "mlp"), compile_repeats=3, peers=True):
    """Measure every path for each consumer; one table (a dict) per consumer.

    Args:
        num: elements in the stream (a multiple of `BATCH`).
        repeats: timed runs per path (the best is kept); host paths run a third as many.
        consumers: `"light"` (masked per-row sums) and/or `"mlp"` (a train step).
        compile_repeats: fresh compiles of each MLP program (the best is kept).
        peers: measure Grain and tf.data where installed.

    Returns:
        `{"fixed_size": table, "fixed_size_mlp": table}` (those asked for), each table a dict
        with `title`, `unit`, `num`, `bytes`, `repeats`, `compile_s` (trace + compile of the
        fused `jb.scan` program), `rows` (`name`, `seconds`, `system`, `group`), `numpy_copy_s`,
        `fused` (the fused row's name), `checks` (`(name, value, target)`) and `notes`.
    """
    images, labels = make_data(num)
    stream = jax.block_until_ready({"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    reshaped = jax.tree.map(lambda x: x.reshape(num // BATCH, BATCH, *x.shape[1:]), stream)
    copy_s = _numpy_copy_time(images, labels, repeats)
    host_repeats = max(1, repeats // 3)
    have = {
        "grain": peers and importlib.util.find_spec("grain") is not None,
        "tf.data": peers and importlib.util.find_spec("tensorflow") is not None,
    }
    base = {
        "unit": "elements",
        "num": num,
        "bytes": images.nbytes + labels.nbytes,
        "repeats": repeats,
        "numpy_copy_s": copy_s,
        "fused": "jb.scan",
    }
    out = {}
    if "light" in consumers:
        out["fixed_size"] = {
            **base,
            "title": f"fixed_size({BATCH}), light consumer (masked per-row sums)",
            **_light(images, labels, stream, reshaped, repeats, host_repeats, have, copy_s),
        }
        out["fixed_size"]["rows"].insert(0, _row("numpy copy (reference)", copy_s, "numpy"))
    if "mlp" in consumers:
        out["fixed_size_mlp"] = {
            **base,
            "title": f"fixed_size({BATCH}), MLP train step (3072 -> 256 -> 10, SGD)",
            **_mlp(images, labels, stream, reshaped, repeats, host_repeats, compile_repeats, have),
        }
        out["fixed_size_mlp"]["rows"].insert(0, _row("numpy copy (reference)", copy_s, "numpy"))
    return out


def time_fused(num, repeats=3, consumer="light"):
    """Best time of the fused path (`jb.scan` of `fixed_size` into `consumer`) on `num`."""
    images, labels = make_data(num)
    stream = jax.block_until_ready({"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    batcher = jb.fixed_size(BATCH)
    if consumer == "light":
        fn, carry = consume, CARRY
    else:
        fn, carry = _train_step(), _params()
    compiled = jax.jit(lambda s: jb.scan(batcher, fn, carry, s)[0]).lower(stream).compile()
    return timeit(lambda: jax.block_until_ready(compiled(stream)), repeats)


def _light(images, labels, stream, reshaped, repeats, host_repeats, have, copy_s):
    batcher = jb.fixed_size(BATCH)
    stepper = batcher._replace(feed=None)  # the same batcher, stepped one element at a time
    traces = []

    # --- the limit: the consumer over data already in batch shape
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
        return jb.consume(stepper, consume, CARRY, state, elements)[0]

    xla_copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
    t = {
        "limit": timeit(lambda: jax.block_until_ready(limit(reshaped)), repeats),
        "scan": timeit(lambda: jax.block_until_ready(fused(stream)), repeats),
        "by_element": timeit(lambda: jax.block_until_ready(by_element(stream)), repeats),
        "batch_all": timeit(lambda: jax.block_until_ready(jb.batch_all(batcher, stream)), repeats),
        "xla_copy": timeit(lambda: jax.block_until_ready(xla_copy(stream)), repeats),
        "iterate": timeit(lambda: _iterate(batcher, images, labels), host_repeats),
    }
    check = [np.asarray(x) for x in (limit(reshaped), fused(stream), by_element(stream))]
    assert all(np.allclose(c, check[0]) for c in check), "paths disagree"
    rows = [
        _row("limit: lax.scan over pre-batched data", t["limit"], "limit"),
        _row("jb.scan", t["scan"], "jaxbatch"),
        _row("jb.scan, stepped one element at a time", t["by_element"], "jaxbatch"),
        _row("jb.batch_all", t["batch_all"], "jaxbatch"),
        _row("jitted XLA copy", t["xla_copy"], "xla"),
        _row("jb.iterate (host rows, numpy consumer)", t["iterate"], "jaxbatch"),
    ]
    if have["grain"]:
        rows.append(
            _row(
                "Grain MapDataset.batch (numpy consumer)",
                _grain(images, labels, host_repeats),
                "grain",
            )
        )
    if have["tf.data"]:
        rows.append(
            _row(
                "tf.data .batch (numpy consumer)", _tfdata(images, labels, host_repeats), "tf.data"
            )
        )
    return {
        "compile_s": compile_s,
        "rows": rows,
        "checks": [
            ("scan / limit", t["scan"] / t["limit"], "<= 1.10"),
            ("stepped / (limit + numpy copy)", t["by_element"] / (t["limit"] + copy_s), "<= 1.25"),
            ("batch_all speed / XLA copy speed", t["xla_copy"] / t["batch_all"], ">= 1.0"),
            ("scan trace + compile (s)", compile_s, "< 1"),
            ("scan traces over 3 calls", trace_count, "1"),
        ],
        "notes": [],
    }


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    size = int(np.prod(SHAPE))
    return {
        "w1": jax.random.normal(k1, (size, 256)) / np.sqrt(size),
        "b1": jnp.zeros(256),
        "w2": jax.random.normal(k2, (256, 10)) / 16.0,
        "b2": jnp.zeros(10),
    }


def _train_step(on_trace=lambda: None):
    """An SGD step of a 2-layer MLP on a `Batch`, masked per-row loss."""

    def step(params, batch):
        on_trace()

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


def _mlp(images, labels, stream, reshaped, repeats, host_repeats, compile_repeats, have):
    """The fused path with a real train step: time, compile time and consumer traces; and
    the host paths feeding the same step, jitted once, one call per batch."""
    batcher = jb.fixed_size(BATCH)
    params = _params()
    traces = {"jb.scan": 0, "jb.scan, stepped": 0, "lax.scan": 0}  # per program

    def counting(name):
        def bump():
            traces[name] += 1

        return _train_step(bump)

    limit_step, scan_step = counting("lax.scan"), counting("jb.scan")
    stepped_step = counting("jb.scan, stepped")

    def limit(params, batched):
        def body(params, rows):
            batch = jb.Batch(data=rows, valid_mask=jnp.ones((BATCH,), bool))
            return limit_step(params, batch), None

        return jax.lax.scan(body, params, batched)[0]

    def fused(params, elements):
        return jb.scan(batcher, scan_step, params, elements)[0]

    def by_element(params, elements):
        return jb.scan(batcher._replace(feed=None), stepped_step, params, elements)[0]

    def compile_time(fn, *args):  # best of fresh trace + compile: caches cleared each time
        times = []
        for _ in range(compile_repeats):
            jax.clear_caches()  # else a new `jit` of the same `fn` reuses the executable
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile()
            times.append(time.perf_counter() - start)
        return min(times), compiled

    compile_limit, limit_c = compile_time(limit, params, reshaped)
    compile_scan, fused_c = compile_time(fused, params, stream)
    _, by_element_c = compile_time(by_element, params, stream)
    a, b = limit_c(params, reshaped), fused_c(params, stream)
    assert all(jax.tree.leaves(jax.tree.map(lambda x, y: np.allclose(x, y, atol=1e-5), a, b)))
    t = {
        "limit": timeit(lambda: jax.block_until_ready(limit_c(params, reshaped)), repeats),
        "scan": timeit(lambda: jax.block_until_ready(fused_c(params, stream)), repeats),
        "by_element": timeit(
            lambda: jax.block_until_ready(by_element_c(params, stream)), min(3, repeats)
        ),
    }
    host_step = jax.jit(_train_step())
    mask = jnp.ones((BATCH,), bool)

    def iterate():
        p = params
        for batch in jb.iterate(batcher, _Rows(images, labels), chunk_size=min(1024, len(labels))):
            p = host_step(p, batch)
        return jax.block_until_ready(p)

    t["iterate"] = timeit(iterate, host_repeats)
    rows = [
        _row("limit: lax.scan over pre-batched data", t["limit"], "limit"),
        _row("jb.scan", t["scan"], "jaxbatch"),
        _row("jb.scan, stepped one element at a time", t["by_element"], "jaxbatch"),
        _row("jb.iterate + jitted step per batch", t["iterate"], "jaxbatch"),
    ]
    if have["grain"]:
        import grain.python as grain

        batches = grain.MapDataset.source(_Rows(images, labels)).batch(BATCH)

        def run_grain():
            p = params
            for b in batches:
                p = host_step(p, jb.Batch(data=b, valid_mask=mask))
            return jax.block_until_ready(p)

        rows.append(
            _row("Grain MapDataset.batch + jitted step", timeit(run_grain, host_repeats), "grain")
        )
    if have["tf.data"]:
        import tensorflow as tf

        ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(BATCH)

        def run_tf():
            p = params
            for b in ds:
                data = {"image": b["image"].numpy(), "label": b["label"].numpy()}
                p = host_step(p, jb.Batch(data=data, valid_mask=mask))
            return jax.block_until_ready(p)

        rows.append(_row("tf.data .batch + jitted step", timeit(run_tf, host_repeats), "tf.data"))
    checks = [
        ("scan / limit", t["scan"] / t["limit"], "<= 1.05"),
        ("compile: scan / lax.scan", compile_scan / compile_limit, "<= 1.15"),
    ]
    for name, count in traces.items():  # each program was compiled `compile_repeats` times
        checks.append((f"consumer traces per program: {name}", count / compile_repeats, "1"))
    return {
        "compile_s": compile_scan,
        "compile_limit_s": compile_limit,
        "rows": rows,
        "checks": checks,
        "notes": [],
    }


def _iterate(batcher, images, labels):
    """Host streaming: `jb.iterate` over numpy rows, the consumer (numpy) on each batch."""
    for b in jb.iterate(batcher, _Rows(images, labels), chunk_size=min(1024, len(labels))):
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

    return timeit(run, repeats)


def _tfdata(images, labels, repeats):
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(BATCH)

    def run():
        for b in ds:
            np.sum(b["image"].numpy(), axis=(1, 2, 3)).sum() + b["label"].numpy().sum()

    return timeit(run, repeats)


def report(tables):
    """Print the detailed report of `measure`'s tables, with the targets."""
    for table in tables.values():
        print(f"{table['title']}: {table['num']} elements, {table['bytes'] / 1e6:.1f} MB")
        print(f"times are the best of {table['repeats']} (host paths: a third as many)")
        print_rows(table)
        print()
    if not any(r["system"] in ("grain", "tf.data") for t in tables.values() for r in t["rows"]):
        print("peers: grain and tf.data not installed; skipped")


def main(quick: bool = False) -> None:
    num = 2048 if quick else NUM
    repeats = 3 if quick else 15
    print(
        f"jaxbatch fixed_size benchmark: {num} elements of {SHAPE} f32 + i32 label, batch {BATCH}"
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {platform.machine()}")
    print()
    report(measure(num, repeats, compile_repeats=1 if quick else 3))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

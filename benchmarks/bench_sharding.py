"""Benchmark: `jb.scan_per_device` (one batcher per device) on a simulated 4-device CPU mesh.

16384 rows of 64 float32 features + an int32 label are dealt round-robin into 4 per-device
streams (`jb.stream_indices` / `jb.device_streams`) on `jax.make_mesh((4,), ("data",))`,
batched by `jb.fixed_size(32)` on every device (a global batch of 128 rows, sharded over
the mesh) and read by a light consumer (masked per-row sums, a row count and a label sum).
Printed: rows/s of

* `jb.scan_per_device(jb.fixed_size(32))`, the bulk path (the fused row): each device runs
  `collect` on its stream under `shard_map` (plan, then one gather), then one `fori_loop`
  hands the global batches to the consumer;
* the same batcher with `feed=None`: the stepped path, every device stepping its batcher
  one element at a time inside one loop;
* the limit: the consumer in one `lax.scan` over the rows already in global-batch shape on
  the mesh (sharded), what any data-parallel loop pays on these devices;
* `jb.scan(jb.fixed_size(128))` on one device, the same rows: the one-device comparison
  (the same global batches' rows, in another order);
* `jb.scan_per_device(jb.pack(...))` on a variable-length version of the same rows (the
  features zeroed past a length in [1, 64], packed into rows of 256 features), next to
  `jb.scan(jb.pack(...))` on one device with 4x the rows per batch;

each as a ratio to a plain numpy copy of the same bytes, measured in the same run. Every
path must consume every row (checked: row count, label sum, feature sum). The devices are
CPU devices simulated by `jax_num_cpu_devices` (set when this module is imported, before
JAX starts its backend): they share the machine's cores, so this measures the batching
machinery's cost, not a speed-up from more devices. No peers: Grain and tf.data have no
per-device batching.

`measure(num, repeats)` returns the table `benchmarks/run.py` prints; `time_fused(num,
repeats)` times the fused path alone. Run `python benchmarks/bench_sharding.py [--quick]`.
"""

import argparse
import functools
import time

import jax

DEVICES = 4
try:  # before JAX starts its backend (any op, `jax.devices()`); `_check_devices` says if not
    jax.config.update("jax_num_cpu_devices", DEVICES)
    jax.config.update("jax_platforms", "cpu")  # simulated CPU devices, even beside a GPU
except RuntimeError:
    pass

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _common import print_rows, timeit  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jaxbatch as jb  # noqa: E402

NUM, FEATURES, BATCH = 16384, 64, 32  # BATCH rows per device: global batches of 128
ROW, PACK_ROWS = 256, 4  # pack: rows of 256 features, 4 rows per device per batch


def _check_devices():
    if jax.device_count() != DEVICES:
        raise RuntimeError(
            f"bench_sharding needs {DEVICES} devices, JAX has {jax.device_count()} "
            f"({jax.default_backend()}): `jax_num_cpu_devices` must be set before JAX starts "
            "its backend (import this module first), or run with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} JAX_PLATFORMS=cpu."
        )


@functools.cache
def _mesh():
    _check_devices()
    return jax.make_mesh((DEVICES,), ("data",))


@functools.cache
def _batchers():
    """Built once: batchers are static arguments, so a new one would recompile."""
    fixed = jb.fixed_size(BATCH)
    pack = jb.pack(ROW, PACK_ROWS, lengths={"x": "length"}, max_sequences_per_row=ROW // 4)
    return {
        "bulk": fixed,
        "stepped": fixed._replace(feed=None),  # the same batcher, stepped element by element
        "one_device": jb.fixed_size(DEVICES * BATCH),
        "pack": pack,
        "pack_one_device": jb.pack(
            ROW, DEVICES * PACK_ROWS, lengths={"x": "length"}, max_sequences_per_row=ROW // 4
        ),
    }


def make_data(num, seed=0):
    """`num` rows: features `[num, 64]` float32, labels int32 and lengths in [1, 64]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, FEATURES), dtype=np.float32)
    labels = rng.integers(0, 10, num, dtype=np.int32)
    lengths = rng.integers(1, FEATURES + 1, num, dtype=np.int32)
    return x, labels, lengths


def _carry():
    return (jnp.float32(0), jnp.int32(0), jnp.int32(0))


def consume(carry, batch):
    """Reads every row: the masked sum of its features, the rows and the labels."""
    total, rows, labels = carry
    mask = batch.valid_mask
    sums = jnp.sum(batch.data["x"], axis=1)
    return (
        total + jnp.sum(jnp.where(mask, sums, 0.0)),
        rows + jnp.sum(mask, dtype=jnp.int32),
        labels + jnp.sum(jnp.where(mask, batch.data["label"], 0)),
    )


def consume_packed(carry, batch):
    """Reads every packed row: the features' sum, the sequences and their lengths."""
    total, sequences, tokens = carry
    ids = batch.data["x_segment_ids"]
    lengths = batch.data["length"]  # per-segment table, 0 on unused entries
    return (
        total + jnp.sum(jnp.where(ids > 0, batch.data["x"], 0.0)),
        sequences + jnp.sum(lengths > 0, dtype=jnp.int32),
        tokens + jnp.sum(lengths),
    )


def _streams(tree, mesh):
    """Per-device streams: element `i` to device `i % 4` (`[4, num / 4, ...]`, sharded)."""
    idx = jb.stream_indices(len(jax.tree.leaves(tree)[0]), mesh)
    return jb.device_streams(jax.tree.map(lambda x: x[idx], tree), mesh)


def _per_device(batcher, fn, carry, streams, mesh):
    """One call as a user makes it (outside `jit`: `scan_per_device` jits itself)."""
    return jax.block_until_ready(jb.scan_per_device(batcher, fn, carry, streams, mesh)[0])


def time_fused(num, repeats=3):
    """Best time of the fused path (`scan_per_device` of `fixed_size`, bulk) on `num` rows."""
    mesh = _mesh()
    x, labels, _ = make_data(num)
    streams = _streams({"x": x, "label": labels}, mesh)
    bulk, carry = _batchers()["bulk"], _carry()
    return timeit(lambda: _per_device(bulk, consume, carry, streams, mesh), repeats)


def _mesh_limit(data, mesh):
    """The consumer over data already in global-batch shape on the mesh (rows sharded), in
    one `lax.scan`: what per-device batching could at best cost on these devices."""
    size = DEVICES * BATCH
    where = NamedSharding(mesh, P(None, "data"))
    batched = jax.tree.map(lambda x: jax.device_put(x.reshape(-1, size, *x.shape[1:]), where), data)
    with jax.set_mesh(mesh):

        @jax.jit
        def limit(batched):
            def body(carry, rows):
                return consume(carry, jb.Batch(data=rows, valid_mask=jnp.ones(size, bool))), None

            return jax.lax.scan(body, _carry(), batched)[0]

        limit = limit.lower(batched).compile()
    return lambda: jax.block_until_ready(limit(batched))


def _timed_first(fn, repeats):
    """`(first call's time, best of repeats)`: the first includes trace + compile."""
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    return first, timeit(fn, repeats), out


def measure(num=NUM, repeats=5, pack=True):
    """Measure every path on `num` rows (best of `repeats`; the stepped path a third as many).

    Returns:
        `{"per_device": table}`: a dict with `title`, `unit` ("rows"), `num`, `bytes`,
        `repeats`, `numpy_copy_s`, `compile_s` (the fused path's first call less its best
        time: trace + compile), `rows` (`name`, `seconds`, `system`, `group`), `fused`,
        `checks` and `notes`.
    """
    mesh = _mesh()
    b = _batchers()
    x, labels, lengths = make_data(num)
    data = {"x": x, "label": labels}
    streams = _streams(data, mesh)
    stream = jax.block_until_ready(jax.tree.map(jnp.asarray, data))  # one device (device 0)
    carry = _carry()
    expect_rows, expect_labels = num, int(np.sum(labels, dtype=np.int64))
    expect_total, scale = float(np.sum(x, dtype=np.float64)), float(np.sum(np.abs(x)))

    def check(out, what, rows=expect_rows, labels=expect_labels, total=expect_total):
        t, r, s = (np.asarray(v).item() for v in out)
        assert (r, s) == (rows, labels), f"{what}: {r} rows / {s} (expected {rows} / {labels})"
        assert abs(t - total) <= 1e-5 * scale + 1e-3, f"{what}: feature sum {t} != {total}"

    warm = {k: np.empty_like(v) for k, v in data.items()}

    def numpy_copy():
        for k, v in data.items():
            np.copyto(warm[k], v)

    copy_s = timeit(numpy_copy, repeats)
    t = {}
    first, t["bulk"], out = _timed_first(
        lambda: _per_device(b["bulk"], consume, carry, streams, mesh), repeats
    )
    compile_s = max(first - t["bulk"], 0.0)
    check(out, "scan_per_device (bulk)")
    _, t["stepped"], out = _timed_first(
        lambda: _per_device(b["stepped"], consume, carry, streams, mesh), max(1, repeats // 3)
    )
    check(out, "scan_per_device (stepped)")
    one = jax.jit(lambda s: jb.scan(b["one_device"], consume, _carry(), s)[0])
    _, t["one"], out = _timed_first(lambda: jax.block_until_ready(one(stream)), repeats)
    check(out, "jb.scan (one device)")
    limit = num % (DEVICES * BATCH) == 0
    if limit:
        _, t["limit"], out = _timed_first(_mesh_limit(data, mesh), repeats)
        check(out, "limit on the mesh")

    def row(name, key, system="jaxbatch", group="fixed_size"):
        return {"name": name, "seconds": t[key], "system": system, "group": group}

    fused = f"jb.scan_per_device(jb.fixed_size({BATCH}))"
    rows = [
        {"name": "numpy copy (reference)", "seconds": copy_s, "system": "numpy", "group": ""},
        *([row("limit: lax.scan over pre-batched sharded data", "limit", "limit")] * limit),
        row(fused, "bulk"),
        row(f"{fused}, feed=None (stepped)", "stepped"),
        row(f"jb.scan(jb.fixed_size({DEVICES * BATCH})), one device", "one"),
    ]
    checks = [
        ("stepped / bulk (time)", t["stepped"] / t["bulk"], ""),
        *([("bulk / limit on the mesh (time)", t["bulk"] / t["limit"], "")] * limit),
        ("bulk per-device / one-device jb.scan (time)", t["bulk"] / t["one"], ""),
        ("bulk trace + compile (s)", compile_s, ""),
    ]
    if pack:
        masked = np.where(np.arange(FEATURES) < lengths[:, None], x, 0).astype(np.float32)
        packed = {"x": masked, "length": lengths}
        pack_streams = _streams(packed, mesh)
        pack_stream = jax.block_until_ready(jax.tree.map(jnp.asarray, packed))
        expect = {
            "labels": int(np.sum(lengths, dtype=np.int64)),
            "total": float(np.sum(masked, dtype=np.float64)),
        }
        _, t["pack"], out = _timed_first(
            lambda: _per_device(b["pack"], consume_packed, carry, pack_streams, mesh), repeats
        )
        check(out, "scan_per_device (pack)", **expect)
        one_pack = jax.jit(lambda s: jb.scan(b["pack_one_device"], consume_packed, _carry(), s)[0])
        _, t["pack_one"], out = _timed_first(
            lambda: jax.block_until_ready(one_pack(pack_stream)), repeats
        )
        check(out, "jb.scan (pack, one device)", **expect)
        one_name = f"jb.scan(jb.pack({ROW}, {DEVICES * PACK_ROWS})), one device"
        rows += [
            row(f"jb.scan_per_device(jb.pack({ROW}, {PACK_ROWS}))", "pack", group="pack"),
            row(one_name, "pack_one", group="pack"),
        ]
        checks.append(("pack: per-device / one-device (time)", t["pack"] / t["pack_one"], ""))
    notes = [
        f"{DEVICES} CPU devices simulated in one process (`jax_num_cpu_devices`): they share "
        "this machine's cores, so per-device batching is not expected to beat one device "
        "here; the table shows what batching per device costs. The global batch is the "
        f"devices' {BATCH}-row batches side by side ({DEVICES * BATCH} rows, sharded), the "
        f"same rows as one device's `fixed_size({DEVICES * BATCH})` batch in another order. "
        "`scan_per_device` is timed as called, outside `jit` (it jits itself), so its rows "
        "include its per-call host work; its trace + compile is the first call's time less "
        "the best. The stepped row is the best of a third as many runs.",
        "The limit row is the same consumer in one `lax.scan` over data already in global-"
        "batch shape on the mesh (rows sharded): every global batch's reduction crosses the "
        "devices, the floor of any data-parallel loop on these simulated devices, and the "
        "main reason the mesh rows trail the one-device `jb.scan`.",
        "No peers: Grain and tf.data have no per-device batching (they batch on the host; "
        "placing batches on devices is left to the user).",
    ]
    if pack:
        notes.append(
            "The `pack` rows batch a variable-length version of the same rows (features "
            "zeroed past a length in [1, 64], the label replaced by the length: the same "
            f"bytes), packed into rows of {ROW} features: each device packs its own stream, "
            "so the packing (and the number of batches) differs from one device's."
        )
    return {
        "per_device": {
            "title": (
                f"scan_per_device on {DEVICES} simulated CPU devices: fixed_size({BATCH}) per "
                f"device, f32[{FEATURES}] + i32 rows, light consumer"
            ),
            "unit": "rows",
            "num": num,
            "bytes": x.nbytes + labels.nbytes,
            "repeats": repeats,
            "numpy_copy_s": copy_s,
            "compile_s": compile_s,
            "rows": rows,
            "fused": fused,
            "checks": checks,
            "notes": notes,
        }
    }


def main(quick=False):
    num = 1024 if quick else NUM
    repeats = 3 if quick else 5
    table = measure(num, repeats)["per_device"]
    print(f"jaxbatch per-device benchmark: {table['title']}; {num} rows, best of {repeats}")
    kind = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
    print(f"devices: {jax.device_count()} x {kind}")
    print_rows(table, unit="rows/s", width=48)
    for note in table["notes"]:
        print("note:", note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

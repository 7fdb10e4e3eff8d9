"""`make bench`: every workload, one table each, written to RESULTS.md and a PNG chart.

Workloads (each measured in its own subprocess, one after the other):

* `fixed_size`      - `bench_fixed_size.py`, light consumer (masked per-row sums)
* `fixed_size_mlp`  - `bench_fixed_size.py`, a 2-layer MLP train step as the consumer
* `pack`            - `bench_pack.py`, `jb.pack` first-fit / best-fit vs Grain's packers
* `bucket`          - `bench_bucket.py`, `jb.bucket_by_length` + `jb.by_bucket`
* `shuffle`         - `bench_shuffle.py`, `jb.shuffle` vs Grain's (and tf.data's) shuffles
* `per_device`      - `bench_sharding.py`, `jb.scan_per_device` on 4 simulated CPU devices
  (no peers: Grain and tf.data have no per-device batching)

Then two benchmarks that print their own report (kept verbatim in RESULTS.md):
* `pipeline`        - `bench_pipeline.py`, `jb.pipeline`: a shuffled epoch vs the limit,
  shuffle -> pack vs pack over pre-shuffled data, a 3-source mixture, compile times, Grain
* `host`            - `bench_host.py`, `jb.scan_host`: reading overlapped with training, and
  tokens/s from memmap and ArrayRecord corpora vs in memory

Each table has one row per system (`jb.scan`, `jb.iterate` where relevant, Grain and tf.data
where installed) with elements (or sequences) per second, the time as a multiple of a plain
numpy copy of the same bytes (measured in the same process, same run) and the speed as a
multiple of the peer's (Grain / tf.data) on the same job. Per workload it also reports the
trace + compile time of the fused `jb.scan` program, the peak memory of the subprocess, and
the fused path's time at 2**12 .. 2**16 elements with the exponent `a` of a least-squares fit
`log t = a log n + b` (linear time: `a` near 1).

Peak memory is `ru_maxrss`, the kernel's peak resident set size of the workload's own
subprocess: read by the child with `getrusage(RUSAGE_SELF)` right after importing (the
baseline: Python + JAX + jaxbatch) and after measuring every system (before the scaling
sweep), and by this parent with `os.wait4` when the child exits (including the sweep).

Usage:
    python benchmarks/run.py            # full size: writes benchmarks/RESULTS.md + throughput.png
    python benchmarks/run.py --quick    # small sizes, a smoke run (under a minute when quiet)
    python benchmarks/run.py --quick --out /tmp/bench   # write somewhere else
    python benchmarks/run.py --only pack,bucket
"""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# name -> module, the tables it returns, `measure` kwargs (full, quick), `time_fused` kwargs.
WORKLOADS = {
    "fixed_size": {
        "module": "bench_fixed_size",
        "full": {"num": 16384, "repeats": 15, "consumers": ("light",)},
        "quick": {"num": 2048, "repeats": 3, "consumers": ("light",)},
        "fused": {"consumer": "light"},
    },
    "fixed_size_mlp": {
        "module": "bench_fixed_size",
        "full": {"num": 16384, "repeats": 5, "consumers": ("mlp",), "compile_repeats": 3},
        "quick": {"num": 512, "repeats": 2, "consumers": ("mlp",), "compile_repeats": 1},
        "fused": {"consumer": "mlp"},
    },
    "pack": {
        "module": "bench_pack",
        "full": {"num": 16384, "repeats": 5},
        "quick": {
            "num": 512,
            "repeats": 2,
            "configs": (("first_fit", 16),),
            "check_rows": False,
        },
        "fused": {},
    },
    "bucket": {
        "module": "bench_bucket",
        "full": {"num": 16384, "repeats": 5},
        "quick": {"num": 1024, "repeats": 2},
        "fused": {},
    },
    "shuffle": {
        "module": "bench_shuffle",
        "full": {"num": 8192, "repeats": 5, "buffer_size": 1024},
        "quick": {"num": 1024, "repeats": 2, "buffer_size": 256},
        "fused": {},
    },
    "per_device": {  # the module sets `jax_num_cpu_devices` (4) on import, before any JAX op
        "module": "bench_sharding",
        "full": {"num": 16384, "repeats": 5},
        "quick": {"num": 1024, "repeats": 2},
        "fused": {},
    },
}
SCALE_FULL, SCALE_QUICK = (12, 13, 14, 15, 16), (9, 10)
PEERS = ("grain", "tf.data")
PEER_NAMES = {"grain": "Grain", "tf.data": "tf.data"}


# --------------------------------------------------------------------------- the shuffle hook


def _shuffle_measure(num, repeats, buffer_size, peers=True):
    """HOOK (shuffle): `bench_shuffle.measure(num, repeats, buffer_size=...)` when that module
    has one returning `{"shuffle": table}` in the schema of the other benches; until then, this
    builds the table from `bench_shuffle`'s own consumer, carry, row source and constants."""
    import bench_shuffle as bs

    if hasattr(bs, "measure"):
        out = bs.measure(num, repeats, buffer_size=buffer_size)
        if isinstance(out, dict) and "rows" in out.get("shuffle", {}):
            return out
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbatch as jb

    rng = np.random.default_rng(0)
    images = rng.standard_normal((num, *bs.SHAPE), dtype=np.float32)
    labels = rng.integers(0, 10, num, dtype=np.int32)
    stream = jax.block_until_ready({"image": jnp.asarray(images), "label": jnp.asarray(labels)})
    key = jax.random.key(0)
    batcher = jb.shuffle(bs.BATCH, buffer_size)
    fused = jax.jit(lambda s, k: jb.scan(batcher, bs.consume, bs.CARRY, s, key=k)[0])
    start = time.perf_counter()
    compiled = fused.lower(stream, key).compile()
    compile_s = time.perf_counter() - start
    warm = {"image": np.empty_like(images), "label": np.empty_like(labels)}

    def numpy_copy():
        np.copyto(warm["image"], images)
        np.copyto(warm["label"], labels)

    def iterate():
        rows = bs._Rows(images, labels)
        for b in jb.iterate(batcher, rows, chunk_size=min(1024, num), key=key):
            bs._numpy_consume(np.asarray(b.data["image"]), np.asarray(b.data["label"]))

    host = max(1, repeats // 3)
    copy_s = bs.timeit(numpy_copy, repeats)
    group = f"buffer {buffer_size}"
    rows = [
        _row("numpy copy (reference)", copy_s, "numpy"),
        _row(
            f"jb.scan(jb.shuffle(buffer={buffer_size}))",
            bs.timeit(lambda: jax.block_until_ready(compiled(stream, key)), repeats),
            "jaxbatch",
            group,
        ),
        _row("jb.iterate (host rows, numpy consumer)", bs.timeit(iterate, host), "jaxbatch", group),
    ]
    notes = []
    if peers and importlib.util.find_spec("grain") is not None:
        import grain.python as grain
        from grain import experimental

        source = grain.MapDataset.source(bs._Rows(images, labels))
        windowed = experimental.WindowShuffleIterDataset(
            source.to_iter_dataset(), window_size=buffer_size, seed=0
        ).batch(bs.BATCH)
        full = source.shuffle(seed=0).batch(bs.BATCH)

        def run(ds):
            for b in ds:
                bs._numpy_consume(b["image"], b["label"])

        rows.append(
            _row(
                f"Grain WindowShuffleIterDataset(window={buffer_size})",
                bs.timeit(lambda: run(windowed), host),
                "grain",
                group,
            )
        )
        rows.append(
            _row(
                "Grain MapDataset.shuffle (full permutation)",
                bs.timeit(lambda: run(full), host),
                "grain",
                "full permutation",
            )
        )
    if peers and importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        ds = (
            tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
            .shuffle(buffer_size, seed=0)
            .batch(bs.BATCH)
        )

        def run_tf():
            for b in ds:
                bs._numpy_consume(b["image"].numpy(), b["label"].numpy())

        rows.append(
            _row(
                f"tf.data .shuffle({buffer_size}).batch", bs.timeit(run_tf, host), "tf.data", group
            )
        )
    notes.append(
        "`jb.shuffle` has a bulk `feed`: the key chain and the slot draws are planned on "
        "scalars, then each batch is gathered once. Speed vs Grain compares with Grain's "
        "windowed shuffle (same buffer), the closest to a shuffle "
        "buffer; Grain's full permutation is shown for reference."
    )
    return {
        "shuffle": {
            "title": f"shuffle(batch {bs.BATCH}, buffer {buffer_size}) of f32[32,32,3] + i32",
            "unit": "elements",
            "num": num,
            "bytes": images.nbytes + labels.nbytes,
            "repeats": repeats,
            "numpy_copy_s": copy_s,
            "compile_s": compile_s,
            "rows": rows,
            "fused": rows[1]["name"],
            "checks": [],
            "notes": notes,
        }
    }


def _shuffle_time_fused(num, repeats, buffer_size=1024):
    """HOOK (shuffle): `bench_shuffle.time_fused(num, repeats, buffer_size=...)` when it
    exists, else this."""
    import bench_shuffle as bs

    if hasattr(bs, "time_fused"):
        return bs.time_fused(num, repeats, buffer_size=buffer_size)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxbatch as jb

    rng = np.random.default_rng(0)
    stream = {
        "image": jnp.asarray(rng.standard_normal((num, *bs.SHAPE), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, num, dtype=np.int32)),
    }
    key, batcher = jax.random.key(0), jb.shuffle(bs.BATCH, buffer_size)
    fused = jax.jit(lambda s, k: jb.scan(batcher, bs.consume, bs.CARRY, s, key=k)[0])
    compiled = fused.lower(stream, key).compile()
    return bs.timeit(lambda: jax.block_until_ready(compiled(stream, key)), repeats)


def _row(name, seconds, system, group=""):
    return {"name": name, "seconds": float(seconds), "system": system, "group": group}


# --------------------------------------------------------------------------- the worker


def _maxrss_mib(who=resource.RUSAGE_SELF):
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def worker(name, quick, scale, scale_repeats, out):
    """Run one workload in this (sub)process and write its results as JSON to `out`."""
    sys.path.insert(0, str(HERE))
    import jax

    import jaxbatch  # noqa: F401

    spec = WORKLOADS[name]
    kwargs = dict(spec["quick" if quick else "full"])
    start = time.perf_counter()
    if spec["module"] == "bench_shuffle":
        measure, time_fused = _shuffle_measure, _shuffle_time_fused
        fused_kwargs = {"buffer_size": kwargs["buffer_size"]}
    else:
        module = importlib.import_module(spec["module"])
        measure, time_fused, fused_kwargs = module.measure, module.time_fused, spec["fused"]
    rss_import = _maxrss_mib()
    tables = measure(**kwargs)
    table = tables[name]
    rss_measure = _maxrss_mib()
    measure_s = time.perf_counter() - start
    scaling = []
    for k in scale:
        scaling.append([2**k, time_fused(2**k, scale_repeats, **fused_kwargs)])
    result = {
        "name": name,
        "table": table,
        "scaling": scaling,
        "rss_import_mib": rss_import,
        "rss_measure_mib": rss_measure,
        "measure_s": measure_s,
        "scaling_s": time.perf_counter() - start - measure_s,
        "jax": jax.__version__,
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
    }
    Path(out).write_text(json.dumps(result, default=float))


def run_worker(name, quick, scale, scale_repeats):
    """Run `worker(name)` in a subprocess; its result, plus its peak RSS from `os.wait4`."""
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name]
        cmd += ["--scale", ",".join(map(str, scale)), "--scale-repeats", str(scale_repeats)]
        cmd += ["--json", str(out)] + (["--quick"] if quick else [])
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"workload {name!r} failed ({proc.returncode}):\n{log.read_text()}")
        result = json.loads(out.read_text())
    result["rss_peak_mib"] = usage.ru_maxrss / 1024
    return result


# --------------------------------------------------------------------------- reporting


def fit_exponent(points):
    """The exponent `a` of `t ~ n**a`, a least-squares line through `(log n, log t)`."""
    import numpy as np

    n, t = np.array(points, dtype=float).T
    return float(np.polyfit(np.log(n), np.log(t), 1)[0])


def _peer_seconds(rows, row, system):
    """The time of the `system` peer row in `row`'s group (the first such), or None."""
    for r in rows:
        if r["system"] == system and r["group"] == row["group"]:
            return r["seconds"]
    return None


def workload_markdown(result):
    """One workload's heading, context line and table (markdown)."""
    t = result["table"]
    unit, num = t["unit"], t["num"]
    copy_s = t["numpy_copy_s"]
    present = [p for p in PEERS if any(r["system"] == p for r in t["rows"])]
    lines = [f"### `{result['name']}`: {t['title']} (JAX {result.get('jax', '?')})", ""]
    exponent = fit_exponent(result["scaling"]) if len(result["scaling"]) > 1 else float("nan")
    ns = [n for n, _ in result["scaling"]]
    scale_text = f"2**{ns[0].bit_length() - 1}..2**{ns[-1].bit_length() - 1}" if ns else "-"
    lines.append(
        f"{num} {unit}, {t['bytes'] / 1e6:.1f} MB; best of {t['repeats']} (host paths: a third "
        f"as many). Fused path: trace + compile {t['compile_s']:.2f} s; time ~ n^{exponent:.2f} "
        f"over {scale_text}. Peak RSS {result['rss_measure_mib']:.0f} MiB measuring "
        f"({result['rss_peak_mib']:.0f} MiB with the scaling sweep; "
        f"{result['rss_import_mib']:.0f} MiB after imports)."
    )
    lines.append("")
    header = f"| system | time (ms) | {unit}/s | time / numpy copy |"
    header += "".join(f" speed vs {PEER_NAMES[p]} |" for p in present)
    lines += [header, "|---" * (4 + len(present)) + "|"]
    for r in t["rows"]:
        s = r["seconds"]
        name = f"**{r['name']}**" if r["name"] == t["fused"] else r["name"]
        cells = [name, f"{s * 1e3:.2f}", f"{num / s:,.0f}", f"{s / copy_s:.2f}x"]
        for p in present:
            peer = _peer_seconds(t["rows"], r, p)
            cells.append("-" if peer is None or r["system"] == p else f"{peer / s:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    if t["checks"]:
        lines.append("")
        for name, value, target in t["checks"]:
            value = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"* {name}: {value}" + (f" (target {target})" if target else ""))
    for note in t["notes"]:
        lines.append(f"\n{note}")
    return "\n".join(lines)


def summary_markdown(results):
    lines = [
        "| workload | fused path | units/s | / numpy copy | vs Grain | compile (s) "
        "| peak RSS (MiB) | exponent a |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        t = res["table"]
        fused = next(r for r in t["rows"] if r["name"] == t["fused"])
        grain = _peer_seconds(t["rows"], fused, "grain")
        exponent = fit_exponent(res["scaling"]) if len(res["scaling"]) > 1 else float("nan")
        vs_grain = "-" if grain is None else f"{grain / fused['seconds']:.1f}x"
        lines.append(
            f"| {res['name']} | {fused['name']} | {t['num'] / fused['seconds']:,.0f} {t['unit']} "
            f"| {fused['seconds'] / t['numpy_copy_s']:.2f}x | {vs_grain} "
            f"| {t['compile_s']:.2f} | {res['rss_measure_mib']:.0f} | {exponent:.2f} |"
        )
    return "\n".join(lines)


def scaling_markdown(results):
    sizes = sorted({n for res in results for n, _ in res["scaling"]})
    if not sizes:
        return "(scaling sweep skipped)"
    head = "| workload | " + " | ".join(f"2**{n.bit_length() - 1}" for n in sizes) + " | a |"
    lines = [head, "|---" * (len(sizes) + 2) + "|"]
    for res in results:
        times = dict(res["scaling"])
        cells = [f"{times[n] * 1e3:.1f} ms" if n in times else "-" for n in sizes]
        a = fit_exponent(res["scaling"]) if len(res["scaling"]) > 1 else float("nan")
        lines.append(f"| {res['name']} | " + " | ".join(cells) + f" | {a:.2f} |")
    return "\n".join(lines)


def machine():
    """CPU model, cores, versions and the date, for the record."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name, mod in (("jax", "jax"), ("jaxlib", "jaxlib"), ("numpy", "numpy"), ("grain", "grain")):
        try:
            from importlib.metadata import version

            versions[name] = version(mod)
        except Exception:
            versions[name] = "not installed"
    versions["tensorflow"] = (
        "installed" if importlib.util.find_spec("tensorflow") else "not installed"
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "load": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


NOTES = """\
## Notes on `fixed_size` (hand-written; the numbers are filled in from this run)

* `jb.scan` keeps up with the limit (the consumer scanned over data already in batch
  shape): `scan / limit` = {scan_limit:.2f}x. `fixed_size`'s bulk `feed` plans on scalars
  (from `count` alone, row `i` of batch `k` is stream position `k * 128 + i - count`) and
  `jb.scan` builds each batch with one gather (`jnp.take` of those rows) and a `where` for
  buffered rows and padding, in the same XLA loop as the consumer. The consumer is called at
  one site and traced once per program (the trace counts above).
* The element-by-element path (`feed=None`, one element per scan step) writes every element
  into the buffer once (`dynamic_update_slice` in the carry) and pays a while-loop iteration
  plus the counters per element: {stepped:.2f}x (limit + numpy copy), target <= 1.25x. Its
  ratio moves mostly with the limit's run-to-run spread on a shared machine.
* `batch_all` now takes `Emissions.stacked`: all batches as one pad-and-reshape of the stream
  (from an empty buffer XLA reduces it to a copy), instead of a loop that zero-fills the
  `[batches, 128, ...]` result and writes each batch into it. Its speed is {batch_all:.2f}x a
  jitted XLA copy's (target >= 1.0x). `batch_all` is for tests and small data; the fast path
  is `scan`.
* `jb.iterate` stacks host rows in numpy and unstacks a chunk's batches in one jitted call
  (building an `Element` per host row, as it first did, took 3.7 s for 16384 rows): here it
  runs at {iterate_grain} Grain's speed on the same host batching job.
* The consumer masks per-row results (`jnp.where(valid_mask, rows, 0)`), the usual way to
  write a loss. An earlier one broadcast the mask over every pixel: it was 2x slower whenever
  the mask was a run-time value, which penalised only the element-by-element path (the
  limit's all-True mask is a constant XLA folds away).
* Compile time of the MLP program (`fixed_size_mlp`, "compile: scan / lax.scan"): the
  target (<= 1.15x the plain `lax.scan` program) is met in some runs and missed in others
  (1.04x to 1.49x across runs on this machine); it is **not reliably met**. The consumer is
  compiled once: both optimised programs hold the same 5 `dot`s (2 forward, 3 backward), one
  `while` loop and no `conditional`. What `jb.scan` adds is the batcher's own machinery
  (the plan, the gather that builds each batch, the buffer left for the next call, 64-bit
  counters): about 240 more lines of optimised HLO and 0.05 to 0.15 s of trace + compile,
  a fixed cost. Against this 0.25 s MLP that is up to 1.3x; against a train step that
  compiles in 20 s it would be under 1.01x.
* The first run of this harness measured `scan / limit` at 2.4x for the light consumer and
  the next at 0.97x, with no code change between them: on this shared machine a single run
  can be far off. In isolation (`benchmarks/bench_fixed_size.py`, three interleaved rounds)
  it measures 0.92x to 1.13x.
"""


def notes_markdown(results):
    fixed = next((r for r in results if r["name"] == "fixed_size"), None)
    if fixed is None:
        return ""
    t = fixed["table"]
    checks = {name: value for name, value, _ in t["checks"]}
    seconds = {r["name"]: r["seconds"] for r in t["rows"]}
    grain = next((r["seconds"] for r in t["rows"] if r["system"] == "grain"), None)
    iterate = next(s for n, s in seconds.items() if n.startswith("jb.iterate"))
    return NOTES.format(
        scan_limit=checks["scan / limit"],
        stepped=checks["stepped / (limit + numpy copy)"],
        batch_all=checks["batch_all speed / XLA copy speed"],
        iterate_grain="(Grain not installed)" if grain is None else f"{grain / iterate:.2f}x",
    )


def results_markdown(results, info, quick, wall_s):
    v = info["versions"]
    load = info["load"]
    mode = "`--quick`: small sizes, a smoke run, not for quoting" if quick else "full size"
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `benchmarks/run.py` ({mode}) on {info['date']}, in {wall_s:.0f} s.",
        "",
        "## Machine",
        "",
        f"* CPU: {info['cpu']} ({info['machine']}), {info['cores']} cores"
        + (f" ({info['usable_cores']} usable)" if info["usable_cores"] else ""),
        f"* device: {results[0]['device'] if results else '?'}; JAX {v['jax']}, jaxlib "
        f"{v['jaxlib']}, numpy {v['numpy']}, Python {info['python']}",
        f"* peers: Grain {v['grain']}; TensorFlow {v['tensorflow']}",
    ]
    if load:
        lines.append(f"* load average at start: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    lines += [
        "",
        "## How to reproduce",
        "",
        "```",
        "make bench                                  # = .venv-newest/bin/python benchmarks/run.py",
        "make bench-sweep                            # headline ratios per JAX release",
        ".venv/bin/python benchmarks/run.py --quick  # small sizes, under a minute",
        ".venv/bin/python benchmarks/run.py --only pack --out /tmp/bench",
        ".venv/bin/python benchmarks/bench_fixed_size.py   # one workload, with its targets",
        "```",
        "",
        "## Method",
        "",
        "* Every time is the best of `repeats` runs after a warm-up run (the minimum: on a shared "
        "machine noise only adds time); host-side paths run a third as many.",
        "* `time / numpy copy`: the time over that of `np.copyto` of the same bytes (the stacked "
        "or padded input) into a warm buffer, measured in the same process.",
        "* `speed vs Grain` / `vs tf.data`: the peer's time over this row's on the same job (the "
        "same group of the table: same packing strategy, same shuffle buffer); > 1 is faster.",
        "* Compile: `jax.jit(f).lower(x).compile()` wall time of the fused program.",
        "* Peak RSS: `ru_maxrss` of the workload's own subprocess, read with "
        "`getrusage(RUSAGE_SELF)` in the child after measuring every system (the table's "
        "number), and with `os.wait4` by the parent at exit (including the scaling sweep).",
        "* Scaling: the fused path alone at each size, a fresh compile per size, best of "
        "a few runs; `a` is the slope of a least-squares line through `(log n, log t)`.",
        "",
        "## Summary",
        "",
        summary_markdown(results),
        "",
        "![throughput by system](throughput.png)",
        "",
        "## Workloads",
        "",
    ]
    for res in results:
        lines += [workload_markdown(res), ""]
    lines += ["## Scaling of the fused path", "", scaling_markdown(results), ""]
    notes = notes_markdown(results)
    if notes:
        lines += [notes]
    return "\n".join(lines).rstrip() + "\n"


def chart(results, path):
    """Throughput by system per workload (log scale), and the scaling sweep, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = {
        "jaxbatch": "tab:blue",
        "limit": "tab:cyan",
        "numpy": "tab:gray",
        "xla": "silver",
        "grain": "tab:orange",
        "tf.data": "tab:red",
    }
    panels = len(results) + 1
    cols = 2
    rows = (panels + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results):
        t = res["table"]
        names = [r["name"] for r in t["rows"]][::-1]
        speeds = [t["num"] / r["seconds"] for r in t["rows"]][::-1]
        bars = ax.barh(names, speeds, color=[colors.get(r["system"], "k") for r in t["rows"]][::-1])
        for bar, speed in zip(bars, speeds):
            ax.text(
                speed, bar.get_y() + bar.get_height() / 2, f" {speed:,.0f}", va="center", fontsize=7
            )
        ax.set_xscale("log")
        ax.set_title(res["name"] + f" ({t['num']} {t['unit']})", fontsize=9)
        ax.set_xlabel(f"{t['unit']}/s (log)", fontsize=8)
        ax.tick_params(labelsize=7)
    ax = axes.flat[len(results)]
    for res in results:
        if len(res["scaling"]) > 1:
            n, s = zip(*res["scaling"])
            ax.loglog(n, s, "o-", label=f"{res['name']} (a={fit_exponent(res['scaling']):.2f})")
    sizes = sorted({n for res in results for n, _ in res["scaling"]})
    if sizes:
        ax.set_xticks(sizes, [f"2^{n.bit_length() - 1}" for n in sizes])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_title("fused path: time vs n (log-log)", fontsize=9)
    ax.set_xlabel("elements n", fontsize=8)
    ax.set_ylabel("seconds", fontsize=8)
    ax.legend(fontsize=7)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Benchmarks with their own printed report (targets and ratios measured in one run), run as
# they are and kept verbatim in RESULTS.md: pipelines (issue: shuffled epochs, shuffle -> pack,
# mixtures) and the host feed (overlap, on-disk corpora).
STANDALONE = {
    "pipeline": ("bench_pipeline.py", "Pipelines: shuffled epochs, shuffle -> pack, mixtures"),
    "host": ("bench_host.py", "Host feed: overlap of reading and training, on-disk corpora"),
}


def run_standalone(name, quick):
    """Run one standalone benchmark; returns its printed report (or why it failed)."""
    script, _ = STANDALONE[name]
    cmd = [sys.executable, str(HERE / script)] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    if proc.returncode:
        return f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc.stdout.rstrip()


# What the pipeline benchmark's targets (issue 18) came to over this session's quiet runs;
# the report above each is one run.
_PIPELINE_ROWS = [
    (
        "shuffled epoch <= 1.5x the zero-overhead limit",
        "1.48-1.64x (JAX 0.12.1), 1.61x (0.11.1), 1.75x (0.10.2)",
        "**not met**",
    ),
    (
        "faster than Datarax 0.1.17 `Pipeline.scan(shuffle=True)`",
        "1.13-1.34x faster (JAX 0.11.1, `make bench-datarax`)",
        "met",
    ),
    ("shuffle -> pack >= 0.8x the tokens/s of pack, pre-shuffled corpus", "0.86-0.95x", "met"),
    ("3-source mixture -> pack >= 0.8x one source", "0.90-0.95x", "met"),
    (">= 50x Grain's shuffle -> FirstFitPack", "348-507x", "met"),
    ("compile within 1.5x of the batcher alone: pack", "1.14-1.26x", "met"),
    (
        "the same: fixed_size (resumed state, the fair baseline)",
        "1.8-2.25x (3.1-4.0x against a fresh state)",
        "**not met**",
    ),
]
PIPELINE_TARGETS = "\n".join(
    [
        "Pipeline targets over several quiet full-size runs (CPU, 2 cores; the report above "
        "is one run):",
        "",
        "| target | measured | |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in _PIPELINE_ROWS),
        "",
        textwrap.fill(
            "Why the shuffled epoch misses: reading 128 random 12 KiB rows per batch costs "
            '1.38-1.46x the limit on this CPU by itself (the "hand gather" row: the same '
            "rows gathered by hand, no pipeline), and the pipeline adds a fixed ~0.75 ms per "
            "16384-position call (the order's Feistel rounds 0.22 ms, the range check, the row "
            "table, the counters). XLA fuses the gather with the batch's masking but not into "
            "the consumer's reduction, so each batch is written once before it is read. The "
            "fixed-size compile gap is the pipeline's own scalar kernels (counters, order "
            "state, Feistel rounds: a few ms each to compile on CPU) against a batcher whose "
            "program is tiny.",
            92,
        ),
        "",
    ]
)


def standalone_markdown(reports):
    lines = []
    for name, report in reports.items():
        script, title = STANDALONE[name]
        lines += [f"### {title} (`benchmarks/{script}`)", "", "```text", report, "```", ""]
        if name == "pipeline":
            lines += [PIPELINE_TARGETS]
    return "\n".join(lines)


def _kept_blocks(text):
    """The blocks of an earlier RESULTS.md that other commands write (kept: this run
    measures one JAX release, without Datarax): `make bench-sweep`'s table and
    `make bench-datarax`'s report."""
    kept = []
    for name in ("version-sweep", "datarax"):
        begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if begin in text and end in text:
            kept.append(begin + text.split(begin, 1)[1].split(end, 1)[0] + end)
    return "\n\n".join(kept)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", default=str(HERE), help="folder for RESULTS.md + throughput.png")
    parser.add_argument("--only", default="", help="comma-separated workloads (default: all)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the 2**k size sweep")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--scale", default="", help=argparse.SUPPRESS)
    parser.add_argument("--scale-repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        scale = [int(k) for k in args.scale.split(",") if k]
        return worker(args.worker, args.quick, scale, args.scale_repeats, args.json)
    only = [n for n in args.only.split(",") if n]
    names = [n for n in only if n in WORKLOADS] if only else list(WORKLOADS)
    standalone = [n for n in only if n in STANDALONE] if only else list(STANDALONE)
    unknown = [n for n in only if n not in WORKLOADS and n not in STANDALONE]
    if unknown:
        choices = list(WORKLOADS) + list(STANDALONE)
        parser.error(f"`--only` has unknown workloads {unknown}; choose from {choices}")
    scale = () if args.no_scaling else (SCALE_QUICK if args.quick else SCALE_FULL)
    scale_repeats = 2 if args.quick else 3
    info = machine()
    start = time.perf_counter()
    print(f"{info['cpu']}, {info['cores']} cores; {'quick' if args.quick else 'full'} run\n")
    results = []
    for name in names:
        t0 = time.perf_counter()
        res = run_worker(name, args.quick, scale, scale_repeats)
        results.append(res)
        print(workload_markdown(res))
        print(
            f"({name}: {time.perf_counter() - t0:.1f} s in its subprocess: "
            f"{res['measure_s']:.1f} s measuring, {res['scaling_s']:.1f} s scaling)\n",
            flush=True,
        )
    reports = {}
    for name in standalone:
        reports[name] = run_standalone(name, args.quick)
        print(reports[name] + "\n", flush=True)
    wall = time.perf_counter() - start
    print("Summary\n" + summary_markdown(results) + "\n")
    print("Scaling\n" + scaling_markdown(results) + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = results_markdown(results, info, args.quick, wall)
    if reports:
        text += "\n## Standalone benchmarks\n\n" + standalone_markdown(reports)
    previous = out / "RESULTS.md"
    sweep = _kept_blocks(previous.read_text() if previous.exists() else "")
    (out / "RESULTS.md").write_text(text + ("\n" + sweep + "\n" if sweep else ""))
    if results:
        chart(results, out / "throughput.png")
    print(f"wrote {out / 'RESULTS.md'} and {out / 'throughput.png'} ({wall:.0f} s)")


if __name__ == "__main__":
    main()

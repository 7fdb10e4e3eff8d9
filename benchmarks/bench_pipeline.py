"""Benchmark: `jb.pipeline` (a new global shuffle every epoch, mixtures, packing) against
the limits and peers of the same job, measured in one run.

Printed, best of `repeats` (ratios are taken within this run, on this machine):

* **Shuffled epoch, fixed size.** `num` rows of 12 KiB (`f32[3072]`), batches of 128, a
  consumer that reads every byte (masked per-row sums). `jb.pipeline(data, fixed_size,
  order=jb.epochs())` over one epoch of positions, against the zero-overhead limit (the same
  consumer over the data already batched: a loop of dynamic slices), a plain XLA copy of
  the bytes, and the user's way before pipelines (`jax.random.permutation`, a gather of the
  whole dataset, then `jb.scan(jb.fixed_size)`), and the same rows gathered by hand in the
  consumer from pre-batched indices (the cost of random row access itself).
* **Shuffle -> pack.** A token corpus (lengths uniform in [16, 256]) packed into rows of
  512: `jb.pipeline(corpus, jb.pack(...), lengths=...)` over one shuffled epoch, tokens/s
  (its default, reading the chunk's rows first, and `late_gather=True`), against
  `jb.scan(jb.pack)` over the same corpus already in that shuffled order.
* **3-source mixture -> pack** (the corpus split in three, weights 0.5/0.3/0.2,
  deterministic schedule) against one source, tokens/s.
* **Compile time** of the pipeline's program against its batcher's alone (`jb.scan`), the
  batcher from a fresh state (its counters fold into constants) and resumed (its state an
  argument, as a training loop that continues a stream passes it, and as a pipeline's
  always is: it holds the data).
* Grain 0.2.18's `MapDataset.source(...).shuffle(seed)` then `FirstFitPackIterDataset` on
  the same corpus, where `grain` is installed.
* Datarax 0.1.17's `Pipeline.from_arrays(..., shuffle=True).scan(...)` on the fixed-size
  workload, where `datarax` imports (it needs JAX 0.11, outside jaxbatch's range: `make
  bench-datarax` builds its own venv; the row names the JAX it ran on).

Run `python benchmarks/bench_pipeline.py` (or `--quick`; `--fixed-only` for the fixed-size
section alone, as `make bench-datarax` does).
"""

import argparse
import contextlib
import importlib.util
import io
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _common import timeit, write_block

import jaxbatch as jb

NUM, ROW_FLOATS, BATCH = 16384, 3072, 128
DOCS, MIN_LEN, MAX_LEN, PACK_ROW, PACK_ROWS = 8192, 16, 256, 512, 16
LENGTHS = {"tokens": "length"}
DATARAX_BEGIN, DATARAX_END = "<!-- datarax -->", "<!-- /datarax -->"


def consume_rows(carry, batch):
    """Reads every byte: per-row sums, masked like a per-example loss."""
    rows = jnp.sum(batch.data["x"], axis=1)
    return carry + jnp.sum(jnp.where(batch.valid_mask, rows, 0.0))


def consume_tokens(total, batch):
    tokens, ids = batch.data["tokens"], batch.data["tokens_segment_ids"]
    return total + jnp.sum(jnp.where(ids > 0, tokens, 0))


def _without_data(out):
    """`(carry, state)` with the state's copy of the dataset dropped. A state returned whole
    makes XLA write the dataset out again (a full copy per call, 4x the epoch's time on the
    fixed-size workload) unless the caller donates it; a training loop donates the state or
    keeps the data apart (`jb.without_data` / `jb.with_data`), so that is what is timed."""
    carry, state = out
    return carry, jb.without_data(state)


def _interleaved(runs, repeats):
    """Best wall time of each of `runs` (blocking callables), the runs taken in turn: on a
    shared machine a burst of load then hits every contender alike, not one of them."""
    for fn in runs.values():  # warm-up
        fn()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


COMPILE_TRIES = {"tries": 3}  # one under `--quick`


def _compile(fn, *args, tries=None):
    """The compiled `fn` and its best trace-and-compile time over `tries` (noise only
    ever adds time)."""
    best = float("inf")
    for _ in range(tries or COMPILE_TRIES["tries"]):
        jax.clear_caches()  # else the second try is a cache hit
        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        best = min(best, time.perf_counter() - start)
    return compiled, best


def fixed_size_rows(num, repeats):
    rng = np.random.default_rng(0)
    x = jax.block_until_ready(jnp.asarray(rng.standard_normal((num, ROW_FLOATS), np.float32)))
    data = {"x": x}
    key = jax.random.key(0)
    out = {}

    # The zero-overhead limit: the consumer over data already batched.
    def limit(x):
        batched = x.reshape(num // BATCH, BATCH, ROW_FLOATS)
        mask = jnp.ones((BATCH,), bool)

        def body(k, c):
            b = jb.Batch(data={"x": batched[k]}, valid_mask=mask)
            return consume_rows(c, b)

        return jax.lax.fori_loop(0, num // BATCH, body, jnp.float32(0))

    limit_c, _ = _compile(limit, x)
    runs = {"limit": lambda: jax.block_until_ready(limit_c(x))}
    copy_c, _ = _compile(lambda x: x + 0.0, x)
    runs["copy"] = lambda: jax.block_until_ready(copy_c(x))

    pipe = jb.pipeline(data, jb.fixed_size(BATCH), order=jb.epochs())
    state = pipe.init(jnp.int32(0), key=key)
    positions = jb.next_positions(state, num)

    def run_pipe(state, positions):
        return _without_data(jb.scan(pipe, consume_rows, jnp.float32(0), positions, state=state))

    pipe_c, out["compile_pipeline"] = _compile(run_pipe, state, positions)
    runs["pipeline"] = lambda: jax.block_until_ready(pipe_c(state, positions)[0])

    alone = jb.fixed_size(BATCH)

    def run_alone(data):
        return jb.scan(alone, consume_rows, jnp.float32(0), data)

    def run_resumed(state, data):
        return jb.scan(alone, consume_rows, jnp.float32(0), data, state=state)

    _, out["compile_batcher"] = _compile(run_alone, data)
    resumed = alone.init(jax.tree.map(lambda v: v[0], data))
    _, out["compile_resumed"] = _compile(run_resumed, resumed, data)

    def user_way(data, key):  # before pipelines: permute, gather the dataset, batch
        perm = jax.random.permutation(key, num)
        shuffled = jax.tree.map(lambda v: jnp.take(v, perm, axis=0), data)
        return jb.scan(alone, consume_rows, jnp.float32(0), shuffled)[0]

    def hand_gather(data, rows):  # the indices batched, each batch's rows gathered by hand
        mask = jnp.ones((BATCH,), bool)

        def body(k, c):
            index = jax.lax.dynamic_slice_in_dim(rows, k * BATCH, BATCH)
            b = jb.Batch(data={"x": jnp.take(data["x"], index, axis=0)}, valid_mask=mask)
            return consume_rows(c, b)

        return jax.lax.fori_loop(0, num // BATCH, body, jnp.float32(0))

    rows = jb.order_rows(jb.epochs(), num, key, jnp.arange(num)).row
    hand_c, _ = _compile(hand_gather, data, rows)
    runs["hand_gather"] = lambda: jax.block_until_ready(hand_c(data, rows))

    user_c, _ = _compile(user_way, data, key)
    runs["user_way"] = lambda: jax.block_until_ready(user_c(data, key))
    total = float(pipe_c(state, positions)[0])
    assert np.isclose(total, float(limit_c(x)), rtol=1e-3), "the pipeline missed rows"
    peer = datarax_epoch(data, num, total)
    # The limit, the pipeline and the hand gather in turn; the others (which allocate a
    # dataset-sized output per call, and would slow whatever runs next) each on their own.
    alone_runs = {name: runs.pop(name) for name in ("copy", "user_way")}
    if "datarax" in peer:
        alone_runs["datarax"] = peer.pop("datarax")
    out.update(peer)
    out.update(_interleaved(runs, repeats))
    out.update({name: timeit(fn, repeats) for name, fn in alone_runs.items()})
    return out


def datarax_epoch(data, num, total):
    """Datarax's shuffled epoch (`Pipeline.scan` over `from_arrays(..., shuffle=True)`, a
    new permutation per epoch) with the same consumer, or the reason it was not run."""
    try:
        import datarax
    except Exception as e:  # not installed, or not importable on this JAX
        return {"datarax_skipped": f"{type(e).__name__}: {e}".splitlines()[0][:100]}

    source = datarax.Pipeline.from_arrays(
        {"x": data["x"]}, batch_size=BATCH, seed=0, shuffle=True, num_epochs=None
    )

    def step(carry, batch):  # every batch is full: the mask of `consume_rows` is all True
        return carry + jnp.sum(jnp.sum(batch["x"], axis=1)), None

    def epoch():  # `step` is one function object: Datarax caches its scan by identity
        return jax.block_until_ready(
            source.scan(step, length=num // BATCH, init_carry=jnp.float32(0))[0]
        )

    start = time.perf_counter()
    got = float(epoch())
    first = time.perf_counter() - start
    assert np.isclose(got, total, rtol=1e-3), "Datarax's epoch missed rows"
    return {
        "datarax": epoch,
        "datarax_first": first,
        "datarax_version": getattr(datarax, "__version__", "?"),
    }


def corpus(num, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=num).astype(np.int32)
    tokens = rng.integers(1, 100, size=(num, MAX_LEN), dtype=np.int32)
    tokens = np.where(np.arange(MAX_LEN) < lengths[:, None], tokens, 0).astype(np.int32)
    return tokens, lengths


def packing(num, repeats):
    tokens, lengths = corpus(num)
    data = jax.block_until_ready({"tokens": jnp.asarray(tokens), "length": jnp.asarray(lengths)})
    key = jax.random.key(0)
    out = {"tokens": int(lengths.sum())}

    def packer():
        return jb.pack(PACK_ROW, PACK_ROWS, lengths=LENGTHS, max_segments=PACK_ROW // 16)

    pipe = jb.pipeline(data, packer(), order=jb.epochs(), lengths=LENGTHS)
    state = pipe.init(jnp.int32(0), key=key)
    positions = jb.next_positions(state, num)

    def run_pipe(state, positions):
        return _without_data(jb.scan(pipe, consume_tokens, jnp.int32(0), positions, state=state))

    pipe_c, out["compile_pipeline"] = _compile(run_pipe, state, positions)
    runs = {"pipeline": lambda: jax.block_until_ready(pipe_c(state, positions)[0])}
    assert int(pipe_c(state, positions)[0]) == int(tokens.sum()), "the pipeline missed tokens"

    late = jb.pipeline(data, packer(), order=jb.epochs(), lengths=LENGTHS, late_gather=True)
    late_state = late.init(jnp.int32(0), key=key)

    def run_late(state, positions):
        return _without_data(jb.scan(late, consume_tokens, jnp.int32(0), positions, state=state))

    late_c, _ = _compile(run_late, late_state, positions)
    runs["pipeline_late"] = lambda: jax.block_until_ready(late_c(late_state, positions)[0])

    # The same corpus already in the pipeline's shuffled order.
    rows = np.asarray(jb.order_rows(jb.epochs(), num, key, jnp.arange(num)).row)
    shuffled = jax.block_until_ready({k: v[rows] for k, v in data.items()})
    alone = packer()

    def run_alone(data):
        return jb.scan(alone, consume_tokens, jnp.int32(0), data)

    alone_c, out["compile_batcher"] = _compile(run_alone, shuffled)

    def run_resumed(state, data):
        return jb.scan(alone, consume_tokens, jnp.int32(0), data, state=state)

    resumed = alone.init(jax.tree.map(lambda v: v[0], shuffled))
    _, out["compile_resumed"] = _compile(run_resumed, resumed, shuffled)
    runs["pack_preshuffled"] = lambda: jax.block_until_ready(alone_c(shuffled)[0])

    # Three sources, weights 0.5 / 0.3 / 0.2: as many positions as the one-source epoch.
    cuts = [0, num // 2, num // 2 + num * 3 // 10, num]
    parts = [{k: v[a:b] for k, v in data.items()} for a, b in zip(cuts, cuts[1:])]
    mix = jb.pipeline(parts, packer(), order=jb.mixture([0.5, 0.3, 0.2]), lengths=LENGTHS)
    mix_state = mix.init(jnp.int32(0), key=key)

    def run_mix(state, positions):
        return _without_data(jb.scan(mix, consume_tokens, jnp.int32(0), positions, state=state))

    mix_c, _ = _compile(run_mix, mix_state, positions)
    runs["mixture"] = lambda: jax.block_until_ready(mix_c(mix_state, positions)[0])
    _, end = mix_c(mix_state, positions)
    out["mixture_tokens"] = int(jb.packing_stats(end.inner)["tokens"])
    out.update(_interleaved(runs, repeats))

    if importlib.util.find_spec("grain") is not None:
        import grain
        from grain import experimental

        sequences = [{"tokens": t[:n]} for t, n in zip(tokens, lengths)]

        def grain_run():
            ds = experimental.FirstFitPackIterDataset(
                grain.MapDataset.source(sequences).shuffle(seed=0).to_iter_dataset(),
                length_struct={"tokens": PACK_ROW},
                num_packing_bins=PACK_ROWS,
                shuffle_bins=False,
                max_sequences_per_bin=PACK_ROW // 16,
            )
            total = 0
            for row in ds:
                total += int(np.sum(np.where(row["tokens_segment_ids"] > 0, row["tokens"], 0)))
            return total

        out["grain"] = timeit(grain_run, 1)
    return out


def _rate(name, seconds, count, unit):
    print(f"  {name:<36} {seconds * 1e3:9.2f} ms {count / seconds:>14,.0f} {unit}")


def _ratio(name, value, target=""):
    print(f"  {name:<36} {value:9.2f}x   {('target ' + target) if target else ''}")


def main(quick: bool = False, fixed_only: bool = False) -> None:
    num = 2048 if quick else NUM
    docs = 1024 if quick else DOCS
    repeats = 7
    COMPILE_TRIES["tries"] = 1 if quick else 3
    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    print(
        f"jaxbatch pipeline benchmark (JAX {jax.__version__}, {device}); best of {repeats}, "
        "contenders timed in turn"
    )
    f = fixed_size_rows(num, repeats)
    mib = num * ROW_FLOATS * 4 / 2**20
    print(f"\nshuffled epoch, fixed size: {num} rows of 12 KiB ({mib:.0f} MiB), batch {BATCH}")
    for name in ("limit", "copy", "pipeline", "hand_gather", "user_way"):
        _rate(name, f[name], num, "rows/s")
    peer = f"Datarax {f.get('datarax_version', '')} scan(shuffle) JAX {jax.__version__}"
    if "datarax" in f:
        _rate(peer, f["datarax"], num, "rows/s")
    _ratio("pipeline / zero-overhead limit", f["pipeline"] / f["limit"], "<= 1.5")
    _ratio("pipeline / plain copy", f["pipeline"] / f["copy"])
    _ratio("hand gather (same rows) / limit", f["hand_gather"] / f["limit"])
    _ratio("user way (permute+gather) / limit", f["user_way"] / f["limit"])
    if "datarax" in f:
        _ratio("Datarax / limit", f["datarax"] / f["limit"])
        _ratio("speedup over Datarax", f["datarax"] / f["pipeline"], "> 1")
        print(f"    (Datarax's first call, trace and compile: {f['datarax_first']:.2f} s)")
    else:
        print(f"  Datarax not run: {f['datarax_skipped']}")
    compile_ratio = f["compile_pipeline"] / f["compile_resumed"]
    _ratio("compile: pipeline / fixed_size resumed", compile_ratio, "<= 1.5")
    _ratio("compile: pipeline / fixed_size fresh", f["compile_pipeline"] / f["compile_batcher"])
    print(
        f"    ({f['compile_pipeline']:.2f} s vs {f['compile_resumed']:.2f} s resumed, "
        f"{f['compile_batcher']:.2f} s fresh)"
    )
    if fixed_only:
        return

    p = packing(docs, repeats)
    tok = p["tokens"]
    print(f"\nshuffle -> pack: {docs} docs, lengths in [{MIN_LEN}, {MAX_LEN}], rows of {PACK_ROW}")
    _rate("pipeline (shuffle -> pack)", p["pipeline"], tok, "tok/s")
    _rate("pipeline, late_gather=True", p["pipeline_late"], tok, "tok/s")
    _rate("pack over pre-shuffled corpus", p["pack_preshuffled"], tok, "tok/s")
    _rate("3-source mixture -> pack", p["mixture"], p["mixture_tokens"], "tok/s")
    _ratio("tok/s: pipeline / pre-shuffled", p["pack_preshuffled"] / p["pipeline"], ">= 0.8")
    _ratio("tok/s: late_gather=True / pre-shuffled", p["pack_preshuffled"] / p["pipeline_late"])
    mix_ratio = (p["mixture_tokens"] / p["mixture"]) / (tok / p["pipeline"])
    _ratio("tok/s: mixture / one source", mix_ratio, ">= 0.8")
    pack_compile = p["compile_pipeline"] / p["compile_resumed"]
    _ratio("compile: pipeline / pack resumed", pack_compile, "<= 1.5")
    _ratio("compile: pipeline / pack fresh", p["compile_pipeline"] / p["compile_batcher"])
    print(
        f"    ({p['compile_pipeline']:.2f} s vs {p['compile_resumed']:.2f} s resumed, "
        f"{p['compile_batcher']:.2f} s fresh)"
    )
    if "grain" in p:
        _rate("Grain shuffle -> FirstFitPack", p["grain"], tok, "tok/s")
        _ratio("speedup over Grain", p["grain"] / p["pipeline"], ">= 50")
    else:
        print("  grain not installed: no peer")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument(
        "--fixed-only", action="store_true", help="the shuffled fixed-size epoch alone"
    )
    parser.add_argument(
        "--results",
        help="also write the report into this RESULTS.md, between the `datarax` markers "
        "(`make bench-datarax`; `benchmarks/run.py` keeps that block)",
    )
    args = parser.parse_args()
    if not args.results:
        main(args.quick, args.fixed_only)
    else:
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            main(args.quick, args.fixed_only)
        print(report.getvalue(), end="")
        block = "\n".join(
            [
                DATARAX_BEGIN,
                "## Beside Datarax (`make bench-datarax`)",
                "",
                "Datarax 0.1.17 needs JAX 0.11.1 (outside jaxbatch's range), so this runs in its"
                " own venv, both libraries in one process on that JAX.",
                "",
                "```text",
                report.getvalue().rstrip(),
                "```",
                DATARAX_END,
            ]
        )
        write_block(Path(args.results), block, DATARAX_BEGIN, DATARAX_END)

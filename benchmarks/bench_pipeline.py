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
  512: `jb.pipeline(corpus, jb.pack(...), lengths=...)` over one shuffled epoch, tokens/s,
  against `jb.scan(jb.pack)` over the same corpus already in that shuffled order.
* **3-source mixture -> pack** (the corpus split in three, weights 0.5/0.3/0.2,
  deterministic schedule) against one source, tokens/s.
* **Compile time** of the pipeline's program against its batcher's alone (`jb.scan`).
* Grain 0.2.18's `MapDataset.source(...).shuffle(seed)` then `FirstFitPackIterDataset` on
  the same corpus, where `grain` is installed.

Run `python benchmarks/bench_pipeline.py` (or `--quick`).
"""

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import timeit

import jaxbatch as jb

NUM, ROW_FLOATS, BATCH = 16384, 3072, 128
DOCS, MIN_LEN, MAX_LEN, PACK_ROW, PACK_ROWS = 8192, 16, 256, 512, 16
LENGTHS = {"tokens": "length"}


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


def _compile(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


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
    out["limit"] = timeit(lambda: jax.block_until_ready(limit_c(x)), repeats)
    copy_c, _ = _compile(lambda x: x + 0.0, x)
    out["copy"] = timeit(lambda: jax.block_until_ready(copy_c(x)), repeats)

    pipe = jb.pipeline(data, jb.fixed_size(BATCH), order=jb.epochs())
    state = pipe.init(jnp.int32(0), key=key)
    positions = jb.next_positions(state, num)

    def run_pipe(state, positions):
        return _without_data(jb.scan(pipe, consume_rows, jnp.float32(0), positions, state=state))

    pipe_c, out["compile_pipeline"] = _compile(run_pipe, state, positions)
    out["pipeline"] = timeit(lambda: jax.block_until_ready(pipe_c(state, positions)[0]), repeats)

    alone = jb.fixed_size(BATCH)

    def run_alone(data):
        return jb.scan(alone, consume_rows, jnp.float32(0), data)

    _, out["compile_batcher"] = _compile(run_alone, data)

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
    out["hand_gather"] = timeit(lambda: jax.block_until_ready(hand_c(data, rows)), repeats)

    user_c, _ = _compile(user_way, data, key)
    out["user_way"] = timeit(lambda: jax.block_until_ready(user_c(data, key)), repeats)
    total = float(pipe_c(state, positions)[0])
    assert np.isclose(total, float(limit_c(x)), rtol=1e-3), "the pipeline missed rows"
    return out


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
    out["pipeline"] = timeit(lambda: jax.block_until_ready(pipe_c(state, positions)[0]), repeats)
    assert int(pipe_c(state, positions)[0]) == int(tokens.sum()), "the pipeline missed tokens"

    early = jb.pipeline(data, packer(), order=jb.epochs(), lengths=LENGTHS, late_gather=False)
    early_state = early.init(jnp.int32(0), key=key)

    def run_early(state, positions):
        return _without_data(jb.scan(early, consume_tokens, jnp.int32(0), positions, state=state))

    early_c, _ = _compile(run_early, early_state, positions)
    out["pipeline_early"] = timeit(
        lambda: jax.block_until_ready(early_c(early_state, positions)[0]), repeats
    )

    # The same corpus already in the pipeline's shuffled order.
    rows = np.asarray(jb.order_rows(jb.epochs(), num, key, jnp.arange(num)).row)
    shuffled = jax.block_until_ready({k: v[rows] for k, v in data.items()})
    alone = packer()

    def run_alone(data):
        return jb.scan(alone, consume_tokens, jnp.int32(0), data)

    alone_c, out["compile_batcher"] = _compile(run_alone, shuffled)
    out["pack_preshuffled"] = timeit(lambda: jax.block_until_ready(alone_c(shuffled)[0]), repeats)

    # Three sources, weights 0.5 / 0.3 / 0.2: as many positions as the one-source epoch.
    cuts = [0, num // 2, num // 2 + num * 3 // 10, num]
    parts = [{k: v[a:b] for k, v in data.items()} for a, b in zip(cuts, cuts[1:])]
    mix = jb.pipeline(parts, packer(), order=jb.mixture([0.5, 0.3, 0.2]), lengths=LENGTHS)
    mix_state = mix.init(jnp.int32(0), key=key)

    def run_mix(state, positions):
        return _without_data(jb.scan(mix, consume_tokens, jnp.int32(0), positions, state=state))

    mix_c, _ = _compile(run_mix, mix_state, positions)
    out["mixture"] = timeit(lambda: jax.block_until_ready(mix_c(mix_state, positions)[0]), repeats)
    _, end = mix_c(mix_state, positions)
    out["mixture_tokens"] = int(jb.packing_stats(end.inner)["tokens"])

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


def main(quick: bool = False) -> None:
    num = 2048 if quick else NUM
    docs = 1024 if quick else DOCS
    repeats = 5
    device = f"{jax.default_backend()}: {jax.devices()[0].device_kind}"
    print(f"jaxbatch pipeline benchmark (JAX {jax.__version__}, {device}); best of {repeats}")
    f = fixed_size_rows(num, repeats)
    mib = num * ROW_FLOATS * 4 / 2**20
    print(f"\nshuffled epoch, fixed size: {num} rows of 12 KiB ({mib:.0f} MiB), batch {BATCH}")
    for name in ("limit", "copy", "pipeline", "hand_gather", "user_way"):
        _rate(name, f[name], num, "rows/s")
    _ratio("pipeline / zero-overhead limit", f["pipeline"] / f["limit"], "<= 1.5")
    _ratio("pipeline / plain copy", f["pipeline"] / f["copy"])
    _ratio("hand gather (same rows) / limit", f["hand_gather"] / f["limit"])
    _ratio("user way (permute+gather) / limit", f["user_way"] / f["limit"])
    compile_ratio = f["compile_pipeline"] / f["compile_batcher"]
    _ratio("compile: pipeline / fixed_size alone", compile_ratio, "<= 1.5")
    print(f"    ({f['compile_pipeline']:.2f} s vs {f['compile_batcher']:.2f} s)")

    p = packing(docs, repeats)
    tok = p["tokens"]
    print(f"\nshuffle -> pack: {docs} docs, lengths in [{MIN_LEN}, {MAX_LEN}], rows of {PACK_ROW}")
    _rate("pipeline (shuffle -> pack)", p["pipeline"], tok, "tok/s")
    _rate("pipeline, late_gather=False", p["pipeline_early"], tok, "tok/s")
    _rate("pack over pre-shuffled corpus", p["pack_preshuffled"], tok, "tok/s")
    _rate("3-source mixture -> pack", p["mixture"], p["mixture_tokens"], "tok/s")
    _ratio("tok/s: pipeline / pre-shuffled", p["pack_preshuffled"] / p["pipeline"], ">= 0.8")
    _ratio("tok/s: late_gather=False / pre-shuffled", p["pack_preshuffled"] / p["pipeline_early"])
    mix_ratio = (p["mixture_tokens"] / p["mixture"]) / (tok / p["pipeline"])
    _ratio("tok/s: mixture / one source", mix_ratio, ">= 0.8")
    _ratio("compile: pipeline / pack alone", p["compile_pipeline"] / p["compile_batcher"], "<= 1.5")
    if "grain" in p:
        _rate("Grain shuffle -> FirstFitPack", p["grain"], tok, "tok/s")
        _ratio("speedup over Grain", p["grain"] / p["pipeline"], ">= 50")
    else:
        print("  grain not installed: no peer")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    main(parser.parse_args().quick)

"""Benchmark: `jb.pack` inside `jit` against Grain's host-side packers, same data, same run.

16384 int32 sequences with lengths uniform in [16, 512] (padded to 512 for `jit`) packed
into rows of 2048 tokens, `num_rows` 16 and 128, first-fit and best-fit. The fused path is
`jb.scan` with a consumer that reads every token (a masked sum over segment ids > 0).
Printed per configuration: sequences/s, packing efficiency, the ratio to a plain numpy copy
of the same token bytes (measured in the same run), and, where `grain` is installed,
Grain 0.2.18's `FirstFitPackIterDataset` / `BestFitPackIterDataset` (`shuffle_bins=False`)
on the same sequences, with a check that every packed row is identical. Target: identical
rows at >= 20x Grain's sequences/s.

Run with `make bench` (or `python benchmarks/bench_pack.py --quick`).
"""

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

NUM, MIN_LEN, MAX_LEN, ROW = 16384, 16, 512, 2048
LENGTHS = {"tokens": "length"}


def timeit(fn, repeats):
    """Best wall time of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def consume(total, batch):
    """Reads every token of the batch (a masked sum), as a loss over packed rows would."""
    tokens, ids = batch.data["tokens"], batch.data["tokens_segment_ids"]
    return total + jnp.sum(jnp.where(ids > 0, tokens, 0))


def make_data(num, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=num).astype(np.int32)
    tokens = rng.integers(1, 100, size=(num, MAX_LEN), dtype=np.int32)  # sums fit in int32
    tokens = np.where(np.arange(MAX_LEN) < lengths[:, None], tokens, 0)
    return tokens, lengths


def run_pack(strategy, num_rows, tokens, lengths, repeats):
    """`jb.scan` time, packing efficiency and the rows (for the Grain check)."""
    batcher = jb.pack(ROW, num_rows, lengths=LENGTHS, strategy=strategy, max_segments=ROW // 16)
    stream = jax.block_until_ready({"tokens": jnp.asarray(tokens), "length": jnp.asarray(lengths)})
    fused = jax.jit(lambda s: jb.scan(batcher, consume, jnp.int32(0), s))
    start = time.perf_counter()
    compiled = fused.lower(stream).compile()
    compile_s = time.perf_counter() - start
    seconds = timeit(lambda: jax.block_until_ready(compiled(stream)), repeats)
    total, state = compiled(stream)
    stats = {k: int(v) for k, v in jb.packing_stats(state).items()}
    efficiency = stats["tokens"] / max(stats["tokens"] + stats["padding_tokens"], 1)
    assert int(total) == int(np.sum(tokens, dtype=np.int64)), "the consumer missed tokens"
    return seconds, compile_s, efficiency, batcher, stream


def rows_of(batcher, stream):
    """Every valid packed row, in order, from `batch_all` (for the Grain check)."""
    n = len(stream["length"])
    batches, count = jb.batch_all(batcher, stream, max_batches=n)
    batches = jax.device_get(batches)
    rows = []
    for k in range(int(count)):
        for j in np.flatnonzero(batches.valid_mask[k]):
            rows.append(
                {
                    key: batches.data[key][k][j]
                    for key in ("tokens", "tokens_segment_ids", "tokens_positions")
                }
            )
    return rows


def run_grain(strategy, num_rows, tokens, lengths, repeats):
    import grain
    from grain import experimental

    packer = {
        "first_fit": experimental.FirstFitPackIterDataset,
        "best_fit": experimental.BestFitPackIterDataset,
    }[strategy]
    sequences = [{"tokens": t[:n]} for t, n in zip(tokens, lengths)]

    def dataset():
        return packer(
            grain.MapDataset.source(sequences).to_iter_dataset(),
            length_struct={"tokens": ROW},
            num_packing_bins=num_rows,
            shuffle_bins=False,
            max_sequences_per_bin=ROW // 16,
        )

    def run():
        total = 0
        for row in dataset():  # the same consumer on the host: read every token
            total += int(np.sum(np.where(row["tokens_segment_ids"] > 0, row["tokens"], 0)))
        return total

    seconds = timeit(run, max(1, repeats // 3))
    return seconds, list(dataset())


def main(quick=False):
    num = 1024 if quick else NUM
    repeats = 2 if quick else 5
    tokens, lengths = make_data(num)
    have_grain = importlib.util.find_spec("grain") is not None
    warm = np.empty_like(tokens)
    copy_s = timeit(lambda: np.copyto(warm, tokens), repeats)
    print(
        f"jaxbatch pack benchmark: {num} int32 sequences, lengths uniform in "
        f"[{MIN_LEN}, {MAX_LEN}], rows of {ROW}; best of {repeats}"
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"numpy copy of the padded token bytes: {copy_s * 1e3:.2f} ms")
    print()
    header = f"{'strategy':<10} {'rows':>5} {'jb.scan':>10} {'seq/s':>12} {'eff.':>6} {'/copy':>7}"
    header += f" {'compile':>8} {'grain':>10} {'grain seq/s':>12} {'speedup':>8} {'rows equal':>10}"
    print(header)
    for strategy in ("first_fit", "best_fit"):
        for num_rows in (16, 128):
            seconds, compile_s, efficiency, batcher, stream = run_pack(
                strategy, num_rows, tokens, lengths, repeats
            )
            line = (
                f"{strategy:<10} {num_rows:>5} {seconds * 1e3:>8.1f}ms {num / seconds:>12,.0f} "
                f"{efficiency:>6.3f} {seconds / copy_s:>6.1f}x {compile_s:>7.2f}s"
            )
            if have_grain:
                grain_s, grain_rows = run_grain(strategy, num_rows, tokens, lengths, repeats)
                ours = rows_of(batcher, stream)
                same = len(ours) == len(grain_rows) and all(
                    all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(ours, grain_rows)
                )
                line += (
                    f" {grain_s * 1e3:>8.1f}ms {num / grain_s:>12,.0f} {grain_s / seconds:>7.1f}x"
                    f" {str(same):>10}"
                )
            print(line)
    if not have_grain:
        print("grain not installed: no peer comparison (pip install 'jaxbatch[bench]')")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

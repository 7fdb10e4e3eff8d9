"""Benchmark: `jb.pack` inside `jit` against Grain's host-side packers, same data, same run.

16384 int32 sequences with lengths uniform in [16, 512] (padded to 512 for `jit`) packed
into rows of 2048 tokens, `num_rows` 16 and 128, first-fit and best-fit. The fused path is
`jb.scan` with a consumer that reads every token (a masked sum over segment ids > 0).
Printed per configuration: sequences/s, packing efficiency, the ratio to a plain numpy copy
of the same token bytes (measured in the same run), and, where `grain` is installed,
Grain 0.2.18's `FirstFitPackIterDataset` / `BestFitPackIterDataset` (`shuffle_bins=False`)
on the same sequences, with a check that every packed row is identical. Target: identical
rows at >= 20x Grain's sequences/s.

`measure(num, repeats)` returns the measurements (the table `benchmarks/run.py` prints) and
`time_fused(num, repeats)` times the fused path alone. Run with `make bench` (every
workload) or `python benchmarks/bench_pack.py [--quick]` (this one, with its targets).
"""

import argparse
import importlib.util
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import timeit

import jaxbatch as jb

NUM, MIN_LEN, MAX_LEN, ROW = 16384, 16, 512, 2048
LENGTHS = {"tokens": "length"}


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


def rows_of(batcher, stream, num_rows):
    """Every valid packed row, in order, from `batch_all` (for the Grain check).

    Room: a batch is emitted when a sequence fits no row, so all `num_rows` rows hold a
    sequence: at most `ceil(n / num_rows)` batches, plus the flush (`batch_all` checks it).
    """
    n = len(stream["length"])
    batches, count = jb.batch_all(batcher, stream, max_batches=-(-n // num_rows) + 1)
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


CONFIGS = (("first_fit", 16), ("first_fit", 128), ("best_fit", 16), ("best_fit", 128))


def measure(num=NUM, repeats=5, configs=CONFIGS, peers=True, check_rows=True):
    """Measure `jb.scan` (and Grain, where installed) for each `(strategy, num_rows)`.

    With `check_rows`, every packed row is also checked identical to Grain's (one more
    compiled program per configuration: `batch_all`).

    Returns:
        `{"pack": table}`: a dict with `title`, `unit` ("sequences"), `num`, `bytes` (the
        padded token bytes), `repeats`, `numpy_copy_s` (a numpy copy of those bytes),
        `compile_s` (trace + compile of the first configuration's fused program), `rows`
        (`name`, `seconds`, `system`, `group` = the configuration), `fused`, `checks`
        (`(name, value, target)`: efficiency, compile time, rows equal, speedup) and `notes`.
    """
    tokens, lengths = make_data(num)
    have_grain = peers and importlib.util.find_spec("grain") is not None
    warm_tokens, warm_lengths = np.empty_like(tokens), np.empty_like(lengths)

    def numpy_copy():
        np.copyto(warm_tokens, tokens)
        np.copyto(warm_lengths, lengths)

    copy_s = timeit(numpy_copy, repeats)
    rows = [{"name": "numpy copy (reference)", "seconds": copy_s, "system": "numpy", "group": ""}]
    checks, compile_first = [], None
    for strategy, num_rows in configs:
        group = f"{strategy}, {num_rows} rows"
        seconds, compile_s, efficiency, batcher, stream = run_pack(
            strategy, num_rows, tokens, lengths, repeats
        )
        compile_first = compile_s if compile_first is None else compile_first
        rows.append(
            {"name": f"jb.scan ({group})", "seconds": seconds, "system": "jaxbatch", "group": group}
        )
        checks.append((f"{group}: packing efficiency", efficiency, ""))
        checks.append((f"{group}: trace + compile (s)", compile_s, ""))
        if have_grain:
            grain_s, grain_rows = run_grain(strategy, num_rows, tokens, lengths, repeats)
            if check_rows:
                ours = rows_of(batcher, stream, num_rows)
                same = len(ours) == len(grain_rows) and all(
                    all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(ours, grain_rows)
                )
                checks.append((f"{group}: rows identical to Grain's", float(same), "1"))
            name = {"first_fit": "FirstFit", "best_fit": "BestFit"}[strategy]
            rows.append(
                {
                    "name": f"Grain {name}PackIterDataset ({group})",
                    "seconds": grain_s,
                    "system": "grain",
                    "group": group,
                }
            )
            checks.append((f"{group}: speedup over Grain", grain_s / seconds, ">= 20"))
    notes = [] if have_grain else ["grain not installed: no peer (pip install 'jaxbatch[bench]')"]
    return {
        "pack": {
            "title": f"pack: int32 sequences, lengths in [{MIN_LEN}, {MAX_LEN}], rows of {ROW}",
            "unit": "sequences",
            "num": num,
            "bytes": tokens.nbytes + lengths.nbytes,
            "repeats": repeats,
            "numpy_copy_s": copy_s,
            "compile_s": compile_first,
            "rows": rows,
            "fused": rows[1]["name"],
            "checks": checks,
            "notes": notes,
        }
    }


def time_fused(num, repeats=3, strategy="first_fit", num_rows=16):
    """Best time of the fused path (`jb.scan` of `jb.pack` into `consume`) on `num` sequences."""
    tokens, lengths = make_data(num)
    return run_pack(strategy, num_rows, tokens, lengths, repeats)[0]


def main(quick=False):
    num = 1024 if quick else NUM
    repeats = 2 if quick else 5
    table = measure(num, repeats)["pack"]
    print(
        f"jaxbatch pack benchmark: {num} int32 sequences, lengths uniform in "
        f"[{MIN_LEN}, {MAX_LEN}], rows of {ROW}; best of {repeats}"
    )
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    copy_s = table["numpy_copy_s"]
    print(f"numpy copy of the padded token bytes: {copy_s * 1e3:.2f} ms")
    print()
    for r in table["rows"]:
        s = r["seconds"]
        print(
            f"  {r['name']:<52} {s * 1e3:>9.1f} ms {num / s:>12,.0f} seq/s {s / copy_s:>7.1f}x copy"
        )
    print()
    for name, value, target in table["checks"]:
        print(f"  {name:<52} {value:>9.3f}   {('target ' + target) if target else ''}")
    for note in table["notes"]:
        print(note)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small stream, few repeats")
    main(parser.parse_args().quick)

"""What every benchmark shares: the timer and the printed table of one workload."""

import time
from pathlib import Path


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


def print_rows(table, unit="el/s", width=44):
    """One line per system of a workload table: time, rate, ratio to the numpy copy and
    to the peers (Grain, tf.data) measured in the same run; then the checks."""
    num, copy_s = table["num"], table["numpy_copy_s"]
    peers = {
        r["system"]: r["seconds"] for r in table["rows"] if r["system"] in ("grain", "tf.data")
    }
    for r in table["rows"]:
        s = r["seconds"]
        extra = "".join(f"  {name} time / this {t / s:6.2f}x" for name, t in peers.items())
        print(
            f"  {r['name']:<{width}} {s * 1e3:>9.2f} ms {num / s:>12,.0f} {unit}"
            f" {s / copy_s:>8.2f}x copy{extra}"
        )
    for name, value, target in table["checks"]:
        print(f"  {name:<{width}} {value:>9.3f}   {('target ' + target) if target else ''}")


def write_block(results_md: Path, block: str, begin: str, end: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) into `results_md`, in
    place of the block between those markers, or at the end: how the commands that add to
    RESULTS.md (`make bench-sweep`, `make bench-datarax`) write it; `run.py` keeps them."""
    text = results_md.read_text() if results_md.exists() else "# Benchmark results\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    results_md.write_text(text)

"""What every benchmark shares: the timer and the printed table of one workload."""

import time


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

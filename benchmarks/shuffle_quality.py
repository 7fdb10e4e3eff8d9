"""How well `jb.shuffle` shuffles, by `buffer_size`: the mean displacement of an element.

For a stream of `n` elements `0..n-1`, the displacement of the element at output position
`p` is `|p - input position|`; a full random permutation gives `(n^2 - 1) / (3n)`, about
`n / 3`. A shuffle buffer of `buffer_size` moves an element about `buffer_size` positions
(an element stays in the buffer a geometric number of steps, mean `buffer_size`), until the
buffer is as large as the stream. Printed per buffer size: the mean over `--keys` keys, and
its ratio to a full permutation (`jax.random.permutation`, same keys, same run).

Run `python benchmarks/shuffle_quality.py` (or `--quick` for a smoke run).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb


def displacement(order: np.ndarray) -> float:
    """Mean |output position - input position| of a permutation of `0..n-1`."""
    return float(np.mean(np.abs(np.arange(len(order)) - order)))


def shuffled_order(batcher: jb.Batcher, n: int, key) -> np.ndarray:
    """The input indices in the order `batcher` emits them (valid rows only)."""
    batches, count = jb.batch_all(batcher, {"i": jnp.arange(n, dtype=jnp.int32)}, key=key)
    batches = jax.device_get(batches)
    count = int(count)
    order = np.asarray(batches.data["i"])[:count][np.asarray(batches.valid_mask)[:count]]
    assert sorted(order.tolist()) == list(range(n)), "not a permutation"
    return order


def main(quick: bool = False, keys: int = 8) -> None:
    n = 1000 if quick else 10_000
    keys = 2 if quick else keys
    batch_size = 100
    sizes = [1, 10, 100, 1000] + ([] if quick else [n])
    key_list = list(jax.random.split(jax.random.key(0), keys))
    full = np.mean([displacement(np.asarray(jax.random.permutation(k, n))) for k in key_list])
    print(f"n = {n}, batch_size = {batch_size}, mean over {keys} keys")
    print(f"{'buffer_size':>12}  {'displacement':>12}  {'/ full permutation':>18}")
    for size in sizes:
        batcher = jb.shuffle(batch_size, size)
        d = np.mean([displacement(shuffled_order(batcher, n, k)) for k in key_list])
        print(f"{size:>12}  {d:>12.1f}  {d / full:>18.3f}")
    print(
        f"{'full perm.':>12}  {full:>12.1f}  {1.0:>18.3f}   (theory (n^2-1)/(3n) = "
        f"{(n * n - 1) / (3 * n):.1f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short stream, 2 keys")
    parser.add_argument("--keys", type=int, default=8, help="keys to average over")
    args = parser.parse_args()
    main(args.quick, args.keys)

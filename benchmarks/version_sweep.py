"""The headline ratios on several JAX releases, so a release that makes a path slow is seen.

Each interpreter given (one venv per JAX release) runs this file as a child
(`--child`), which measures, in one process, four fused paths against their zero-overhead
limit (the same consumer over data already in the output's shape, `lax.scan`):

* `fused scan`  - `jb.scan(jb.fixed_size(128))`, a consumer reading every byte
* `batch_all`   - `jb.batch_all(jb.fixed_size(128))` against a plain device copy of the bytes
* `shuffle`     - `jb.scan(jb.shuffle(128, 1024))`, same consumer
* `pack`        - `jb.scan(jb.pack(2048, 16))` over variable-length sequences, against a
  plain device copy of the same (padded) token bytes: packing does real work (placing every
  sequence), so this ratio is not near 1; it is here to show a release that changes it

The parent prints a Markdown table (one column per release) and writes it into
`benchmarks/RESULTS.md` between the `version-sweep` markers (`benchmarks/run.py` keeps that
block when it rewrites the file).

Usage:
    make bench-sweep                                   # .venv, .venv-0.11, .venv-newest
    python benchmarks/version_sweep.py --python .venv/bin/python --python .venv-newest/bin/python
    python benchmarks/version_sweep.py --quick        # smaller streams, fewer repeats
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import write_block

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- version-sweep -->", "<!-- /version-sweep -->"
DEFAULT_PYTHONS = (".venv/bin/python", ".venv-0.11/bin/python", ".venv-newest/bin/python")


def child(quick: bool) -> dict:
    """Measure the four ratios on this interpreter's JAX; returns the row as a dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    sys.path.insert(0, str(HERE))
    import bench_pack as bp
    from _common import timeit
    from bench_shuffle import BATCH, CARRY, SHAPE, consume

    import jaxbatch as jb

    num, repeats = (2048, 5) if quick else (8192, 15)
    rng = np.random.default_rng(0)
    stream = {
        "image": jnp.asarray(rng.standard_normal((num, *SHAPE), dtype=np.float32)),
        "label": jnp.asarray(rng.integers(0, 10, num, dtype=np.int32)),
    }
    key = jax.random.key(0)

    def run(f, *args):
        return timeit(lambda: jax.block_until_ready(f(*args)), repeats)

    def scan_over(batches):
        def body(c, b):
            return consume(c, jb.Batch(data=b, valid_mask=jnp.ones(BATCH, bool))), None

        return jax.lax.scan(body, CARRY, batches)[0]

    limit = jax.jit(
        lambda s: scan_over(jax.tree.map(lambda x: x.reshape(-1, BATCH, *x.shape[1:]), s))
    )
    fixed, shuffled = jb.fixed_size(BATCH), jb.shuffle(BATCH, 1024)
    fused = jax.jit(lambda s: jb.scan(fixed, consume, CARRY, s)[0])
    shuffle = jax.jit(lambda s, k: jb.scan(shuffled, consume, CARRY, s, key=k)[0])
    batch_all = jax.jit(lambda s: jb.batch_all(fixed, s)[0])
    copy = jax.jit(lambda s: jax.tree.map(lambda x: x + jnp.zeros((), x.dtype), s))
    t = {
        "limit": run(limit, stream),
        "fused": run(fused, stream),
        "shuffle": run(shuffle, stream, key),
        "batch_all": run(batch_all, stream),
        "copy": run(copy, stream),
    }

    tokens, lengths = bp.make_data(num // 2)
    seqs = {"tokens": jnp.asarray(tokens), "length": jnp.asarray(lengths)}
    packer = jb.pack(bp.ROW, 16, lengths=bp.LENGTHS, max_segments=bp.ROW // 16)
    pack = jax.jit(lambda s: jb.scan(packer, bp.consume, jnp.int32(0), s)[0])
    t["pack"], t["pack_copy"] = run(pack, seqs), run(copy, seqs)
    return {
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "fused scan / limit": t["fused"] / t["limit"],
        "batch_all / device copy": t["batch_all"] / t["copy"],
        "shuffle / limit": t["shuffle"] / t["limit"],
        "pack / device copy": t["pack"] / t["pack_copy"],
        "limit ms": 1e3 * t["limit"],
    }


def table(rows: list[dict], quick: bool) -> str:
    names = ["fused scan / limit", "batch_all / device copy", "shuffle / limit"]
    names.append("pack / device copy")
    head = "| ratio (lower is better; 1.0 = the limit) | " + " | ".join(
        f"JAX {r['jax']} (Py {r['python']})" for r in rows
    )
    lines = [head + " |", "|---" * (len(rows) + 1) + "|"]
    for name in names + ["limit ms"]:
        cells = " | ".join(f"{r[name]:.2f}" for r in rows)
        lines.append(f"| {name} | {cells} |")
    size = "2048 rows" if quick else "8192 rows"
    return "\n".join(
        [
            BEGIN,
            "## JAX version sweep",
            "",
            f"`benchmarks/version_sweep.py` ({size} of 12 KiB, batch 128; pack: half as many "
            f"sequences of 16..512 tokens into 16 x 2048 rows), {time.strftime('%Y-%m-%d')}, "
            "each release in its own venv, one after the other on the same machine. Each cell "
            "is a ratio of two times measured in the same process (best of several runs).",
            "",
            *lines,
            END,
        ]
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", help="an interpreter (repeatable)")
    parser.add_argument("--quick", action="store_true", help="smaller streams, fewer repeats")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="the file to update")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.quick)))
        return
    pythons = args.python or [str(ROOT / p) for p in DEFAULT_PYTHONS if (ROOT / p).exists()]
    rows = []
    for python in pythons:
        cmd = [python, __file__, "--child"] + (["--quick"] if args.quick else [])
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"{python}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{python}: {rows[-1]}", flush=True)
    block = table(rows, args.quick)
    print(block)
    if rows:
        write_block(Path(args.out), block, BEGIN, END)


if __name__ == "__main__":
    main()

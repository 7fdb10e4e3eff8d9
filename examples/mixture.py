"""A weighted mixture of three text sources, shuffled every epoch and packed, in one `jit`.

What it teaches:

* **`jb.pipeline(data, batcher, order=...)`** is a batcher whose elements are stream
  positions: the data sits on the device (a PyTree per source, rows on the leading axis),
  the order says which row each position reads, and the batcher (here `jb.pack`) batches
  them. Feed it `jb.next_positions(state, n)` with `jb.scan`: the state is the checkpoint.
* **`jb.mixture(weights)`** mixes sources on Grain's `MapDataset.mix` schedule; each source
  runs through its own epochs, each in a new order (`jb.permute`: a keyed bijection, no
  permuted copy of the data).
* **No permuted copy of the data.** With `lengths=` each chunk's rows are read in the
  stream's order (a chunk-sized gather) and packed; the sources are never copied.
* **Weights change on resume.** A pipeline built with other weights continues a saved state:
  every source goes on from the row it had reached (`jb.progress(state)["counts"]`).

The three sources are lines of three stdlib modules' source code (no download). Run:
`python examples/mixture.py` (`--small` for fewer positions).
"""

import argparse
import inspect
import json
import random
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

MAX_LEN, ROW_LENGTH, NUM_ROWS = 96, 128, 8
LENGTHS = {"tokens": "length"}
PACKER = jb.pack(ROW_LENGTH, NUM_ROWS, lengths=LENGTHS)


def lines_of(module, source_id):
    """Non-empty lines of a module's source as bytes: `{"tokens", "length", "source"}`."""
    lines = [ln.encode()[:MAX_LEN] for ln in inspect.getsource(module).splitlines() if ln.strip()]
    tokens = np.zeros((len(lines), MAX_LEN), np.int32)
    for i, line in enumerate(lines):
        tokens[i, : len(line)] = np.frombuffer(line, np.uint8)
    return {
        "tokens": jnp.asarray(tokens),
        "length": jnp.asarray([len(ln) for ln in lines], jnp.int32),
        "source": jnp.full((len(lines),), source_id, jnp.int32),
    }


def tokens_per_source(totals, batch):
    """The consumer: real tokens of each source in this batch (the `source` table is per
    segment, so look it up through each token's segment id)."""
    seg = batch.data["tokens_segment_ids"]
    source = jnp.take_along_axis(batch.data["source"], jnp.maximum(seg - 1, 0), axis=1)
    real = (seg > 0) & batch.valid_mask[:, None]
    counts = jnp.stack([jnp.sum(real & (source == s), dtype=jnp.int32) for s in range(3)])
    return totals + counts


def main(small: bool = False) -> dict:
    sources = [lines_of(m, s) for s, m in enumerate((json.decoder, random, textwrap))]
    print("rows per source:", [int(s["length"].shape[0]) for s in sources])
    chunk = 256 if small else 2048
    mix = jb.pipeline(sources, PACKER, order=jb.mixture([0.5, 0.3, 0.2]), lengths=LENGTHS)
    state = mix.init(jnp.int32(0), key=jax.random.key(0))
    totals = jnp.zeros(3, jnp.int32)
    for _ in range(2):  # two chunks of positions: the same compiled program
        totals, state = jb.scan(
            mix,
            tokens_per_source,
            totals,
            jb.next_positions(state, chunk),
            state=state,
            flush=False,
        )
    progress = {k: np.asarray(v).tolist() for k, v in jb.progress(state).items()}
    print("weights 0.5/0.3/0.2:", progress)
    print("  rows drawn per source:", progress["counts"], "tokens per source:", totals.tolist())

    # Resume with other weights: each source continues from its count.
    other = jb.pipeline(sources, PACKER, order=jb.mixture([0.2, 0.2, 0.6]), lengths=LENGTHS)
    before = np.asarray(state.order.counts)
    totals, state = jb.scan(
        other, tokens_per_source, totals, jb.next_positions(state, chunk), state=state
    )
    drawn = (np.asarray(state.order.counts) - before).tolist()
    print("then 0.2/0.2/0.6 for", chunk, "positions: rows drawn per source", drawn)
    stats = {k: int(v) for k, v in jb.packing_stats(state.inner).items()}
    efficiency = stats["tokens"] / (stats["tokens"] + stats["padding_tokens"])
    print(f"packing efficiency {efficiency:.3f}")
    return {
        "positions": 2 * chunk,
        "counts": progress["counts"],
        "then": chunk,
        "drawn": drawn,
        "tokens": totals.tolist(),
        "efficiency": efficiency,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer positions")
    main(parser.parse_args().small)

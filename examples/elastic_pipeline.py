"""Resume a packing pipeline on another number of hosts, with every document exactly once.

What it teaches:

* **Sharded epochs.** Each host builds the same `jb.pipeline` with `jb.epochs(num_shards=H,
  shard_index=h)`: host `h` reads global positions `h, h + H, ...` of one global order, a new
  permutation every epoch, so the hosts share every epoch without talking to each other.
* **A small checkpoint per host.** `jb.save_state(path, jb.without_data(state))` saves where
  the host stands and what its packer holds, not the dataset.
* **`jb.reshard_pipeline`** continues those `H` saved states on `H'` hosts (here 4 -> 2, as
  after losing half the machines): each new host gets the half-packed rows of the old
  buffers as `carried` batches, to consume first, and a state that reads the rest of the same
  global order from the cut. Grain's elastic iterator refuses packing; this carries it.

Hosts are simulated one after the other in this process (the same calls run on real hosts,
each with its own `shard_index`). The check at the end: every document of the two epochs
was packed exactly twice. Run: `python examples/elastic_pipeline.py` (`--small`).
"""

import argparse
import inspect
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

LENGTHS = {"tokens": "length"}
ROW, ROWS, EPOCHS, CHUNK = 64, 4, 2, 8


def documents(num: int, width: int = 48) -> dict:
    """Lines of this file as byte documents, each with its own number in its first token."""
    lines = [ln.encode() for ln in inspect.getsource(jb.pipeline).splitlines() if ln.strip()]
    tokens = np.zeros((num, width), np.int32)
    length = np.zeros(num, np.int32)
    for d in range(num):
        line = lines[d % len(lines)][: width - 1]
        tokens[d, 0] = 1000 + d  # the document's id, so the check can count documents
        tokens[d, 1 : 1 + len(line)] = np.frombuffer(line, np.uint8)
        length[d] = 1 + len(line)
    return {"tokens": jnp.asarray(tokens), "length": jnp.asarray(length)}


def host(data, hosts: int, index: int):
    order = jb.epochs(num_epochs=EPOCHS, num_shards=hosts, shard_index=index)
    return jb.pipeline(data, jb.pack(ROW, ROWS, lengths=LENGTHS), order=order), order


def documents_in(total: jax.Array, batch: jb.Batch) -> jax.Array:
    """The consumer: count each document id that starts a segment (a stand-in train step)."""
    starts = (batch.data["tokens_positions"] == 0) & (batch.data["tokens_segment_ids"] > 0)
    ids = jnp.where(starts, batch.data["tokens"] - 1000, total.shape[0])
    return total.at[ids.ravel()].add(1, mode="drop")


def run_until(pipe, state, hosts, stop, total, end=False):
    """Chunks of positions while this host's next position is before global `stop` (a
    stopped job: the packer keeps its half-filled rows; `end`: the last chunk drains it)."""
    while int(state.order.start) + int(state.order.position) * hosts < stop:
        last = int(state.order.start) + (int(state.order.position) + CHUNK) * hosts >= stop
        total, state = jb.scan(
            pipe,
            documents_in,
            total,
            jb.next_positions(state, CHUNK),
            state=state,
            flush=end and last,
        )
    return total, state


def main(small: bool = False) -> dict:
    num = 96 if small else 400
    data = documents(num)
    seen = jnp.zeros(num, jnp.int32)
    key = jax.random.key(0)

    # 4 hosts read the first part of epoch 0, then the job stops; each saved its state.
    folder = Path(tempfile.mkdtemp(prefix="jaxbatch-elastic-"))
    cut = num // 2 + 5  # mid-epoch, mid-batch
    for h in range(4):
        pipe, _ = host(data, 4, h)
        state = pipe.init(jnp.int32(0), key=key)
        seen, state = run_until(pipe, state, 4, cut, seen)
        stopped_at = int(state.order.position) * 4
        jb.save_state(folder / f"host{h}", jb.without_data(state))
    print(f"4 hosts stopped at position {stopped_at} of {EPOCHS * num}; saved in {folder}")

    # 2 hosts come back: each loads the 4 states and reshards them.
    carried_batches = 0
    for h in range(2):
        pipe, order = host(data, 2, h)
        fresh = pipe.init(jnp.int32(0), key=key)
        like = jb.without_data(fresh)
        saved = [jb.load_state(folder / f"host{old}", like) for old in range(4)]
        carried, state = jb.reshard_pipeline(pipe, order, saved, fresh)
        for batch in carried:  # the old buffers' half-packed rows first
            seen = documents_in(seen, batch)
        carried_batches += len(carried)
        seen, state = run_until(pipe, state, 2, EPOCHS * num, seen, end=True)
        print(
            f"host {h} of 2: {len(carried)} carried batches, then to position "
            f"{int(state.order.start) + int(state.order.position) * 2}; epoch "
            f"{int(state.order.epoch)}"
        )
    shutil.rmtree(folder)
    counts = np.asarray(seen)
    print(f"each of {num} documents packed {sorted(set(counts.tolist()))} time(s)")
    return {
        "counts": counts.tolist(),
        "epochs": EPOCHS,
        "carried": carried_batches,
        "stopped_at": stopped_at,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer documents")
    main(parser.parse_args().small)

"""MaxText's Grain packing path, reproduced with `jb.pack` inside `jit`.

What it teaches:

* **The recipe.** MaxText's `format_and_batch` (`input_pipeline/data_processing_utils.py`)
  packs with Grain's `FirstFitPackIterDataset(length_struct={"inputs": L, "targets": L},
  num_packing_bins=local_batch_size, max_sequences_per_bin=max_segments_per_seq)`, renames
  `*_segment_ids` to `*_segmentation` and `*_positions` to `*_position`, batches
  `local_batch_size` rows padded with `pad_id` (`batch_and_pad`), and shifts `targets` left
  by one (`ShiftData`: the last column becomes `pad_id`, `targets_segmentation` shifts with
  it and is zeroed wherever the shifted target equals `pad_id`). Here: `jb.pack(L,
  local_batch_size, lengths=..., max_sequences_per_row=max_segments_per_seq)` places the
  same sequences in the same rows, and `to_maxtext(batch, pad_id)` does the other three
  steps on the emitted batch, inside the compiled train step: the same arrays, with no
  host-side pipeline in between (checked against Grain in `tests/test_pack.py`).
* **`num_packing_bins` is the batch.** Grain yields packed rows one by one and MaxText
  regroups them by `local_batch_size`; with as many bins as rows per batch, a packed batch
  *is* a train batch (every batch before the last has all its rows in use), so `jb.pack`'s
  `num_rows` is the local batch size and its `valid_mask` marks the rows `batch_and_pad`
  adds at the end of the stream.
* **What the model reads.** `inputs_segmentation` / `inputs_position` are the decoder's
  segment ids and positions; the loss weights are `targets_segmentation != 0`. After the
  shift each row's last real token has no target (one fewer loss token per row, counted
  below), and a document's last token targets the next document's first token, weighted
  (MaxText's shift works on whole rows; `inputs_segmentation` keeps attention apart).
* **Row order.** MaxText keeps Grain's default `shuffle_bins=True`: each batch's rows come in
  a random order. `jb.pack(..., shuffle_rows=True, key=...)` shuffles them too, with its own
  PRNG (the same rows per batch, another order); this example keeps the order
  (`shuffle_bins=False`) so that the arrays compare one to one.

The documents are synthetic token sequences (no tokenizer, no download). Run:
`python examples/maxtext_packing.py` (add `--small` for fewer documents).
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

MAX_TARGET_LENGTH = 64  # MaxText's `max_target_length`: the packed row length
LOCAL_BATCH_SIZE = 4  # `global_batch_size_to_load // process_count`: `num_packing_bins`
MAX_SEGMENTS_PER_SEQ = 6  # `max_segments_per_seq`: `max_sequences_per_bin`
PAD_ID = 0  # the tokenizer's pad id (MaxText falls back to unk, then 0)
VOCAB = 100
LENGTHS = {"inputs": "length", "targets": "length"}  # both columns: the same tokens
PACKER = jb.pack(  # build once: a static argument of the compiled program
    MAX_TARGET_LENGTH,
    LOCAL_BATCH_SIZE,
    lengths=LENGTHS,
    max_sequences_per_row=MAX_SEGMENTS_PER_SEQ,
)


def make_documents(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` tokenized documents, stacked: `inputs` and `targets` (the same tokens, as
    MaxText's pretraining columns) padded to `MAX_TARGET_LENGTH`, and their `length`."""
    rng = np.random.default_rng(seed)
    length = rng.integers(1, MAX_TARGET_LENGTH + 1, size=n).astype(np.int32)
    length[rng.random(n) < 0.6] //= 4  # mostly short documents, some long ones
    length = np.maximum(length, 1)
    tokens = rng.integers(1, VOCAB, size=(n, MAX_TARGET_LENGTH)).astype(np.int32)
    tokens[np.arange(MAX_TARGET_LENGTH)[None, :] >= length[:, None]] = 0
    return {"inputs": tokens, "targets": tokens.copy(), "length": length}


def to_maxtext(batch: jb.Batch, pad_id: int) -> dict[str, jax.Array]:
    """The steps of MaxText's `format_and_batch` after the packer, on one packed batch."""
    data, real_row = batch.data, batch.valid_mask[:, None]
    out = {}
    for col in ("inputs", "targets"):  # Rekey: `*_segment_ids` / `*_positions` renamed
        out[col] = data[col]
        out[f"{col}_segmentation"] = data[f"{col}_segment_ids"]
        out[f"{col}_position"] = data[f"{col}_positions"]
    # batch_and_pad: rows past the stream's end hold `pad_id` in every array.
    out = {k: jnp.where(real_row, v, jnp.asarray(pad_id, v.dtype)) for k, v in out.items()}
    # ShiftData(ignored_ids=[pad_id], axis=1): next-token targets.
    targets = out["targets"]
    out["targets"] = jnp.concatenate(
        [targets[:, 1:], jnp.full_like(targets[:, :1], pad_id)], axis=1
    )
    segmentation = out["targets_segmentation"]
    segmentation = jnp.concatenate(
        [segmentation[:, 1:], jnp.zeros_like(segmentation[:, :1])], axis=1
    )
    out["targets_segmentation"] = jnp.where(out["targets"] != pad_id, segmentation, 0)
    return out


@functools.partial(jax.jit, static_argnames=("pad_id", "max_batches"))
def run(stream: dict, pad_id: int, max_batches: int) -> dict:
    """Pack `stream` and run a stand-in train step on every MaxText batch, in one program.

    The train step reads what MaxText's model reads (segment ids, positions, loss weights)
    and counts tokens; it also keeps each batch in the carry (slot `k` for batch `k`, the
    first `max_batches`), to look at and to compare with Grain.
    """
    batch_spec = jb.batch_spec(PACKER, jax.tree.map(lambda x: x[0], stream))
    spec = jax.eval_shape(lambda b: to_maxtext(b, pad_id), batch_spec)

    def train_step(carry, batch):
        b = to_maxtext(batch, pad_id)
        weights = b["targets_segmentation"] != 0  # MaxText's loss weights
        real = b["inputs_segmentation"] != 0
        if pad_id != 0:  # padding rows hold `pad_id` in every array, segment ids included
            real = real & batch.valid_mask[:, None]
        kept = jax.tree.map(
            lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, carry["batches"], 0),
            carry["kept"],
            b,
        )
        return {
            "kept": kept,
            "batches": carry["batches"] + 1,
            "rows": carry["rows"] + jnp.sum(batch.valid_mask.astype(jnp.int32)),
            "tokens": carry["tokens"] + jnp.sum(real.astype(jnp.int32)),
            "loss_tokens": carry["loss_tokens"] + jnp.sum(weights.astype(jnp.int32)),
            "max_position": jnp.maximum(
                carry["max_position"], jnp.max(jnp.where(real, b["inputs_position"], 0))
            ),
        }

    zero = jnp.zeros((), jnp.int32)
    carry = {
        "kept": jax.tree.map(lambda s: jnp.zeros((max_batches, *s.shape), s.dtype), spec),
        "batches": zero,
        "rows": zero,
        "tokens": zero,
        "loss_tokens": zero,
        "max_position": zero,
    }
    carry, _ = jb.scan(PACKER, train_step, carry, stream)
    return carry


def main(small: bool = False) -> dict:
    n = 60 if small else 2000
    docs = make_documents(n)
    tokens = int(docs["length"].sum())
    print(f"{n} documents, {tokens} tokens; rows of {MAX_TARGET_LENGTH}, local batch size")
    print(f"{LOCAL_BATCH_SIZE}, at most {MAX_SEGMENTS_PER_SEQ} documents per row")

    max_batches = -(-n // LOCAL_BATCH_SIZE)  # room: every batch before the last is full
    start = time.perf_counter()
    carry = jax.block_until_ready(run(docs, pad_id=PAD_ID, max_batches=max_batches))
    seconds = time.perf_counter() - start
    batches, rows = int(carry["batches"]), int(carry["rows"])
    print(f"\njb.pack + the MaxText steps + the train step, one program: {batches} batches")
    print(f"  ({seconds:.2f} s, compile included)")

    first = jax.tree.map(lambda x: np.asarray(x[0]), carry["kept"])
    print("\nbatch 0, row 0, as MaxText's model reads it (first 18 columns):")
    for key in ("inputs", "inputs_segmentation", "inputs_position", "targets"):
        print(f"  {key:<22}{first[key][0, :18]}")
    print(f"  {'targets_segmentation':<22}{first['targets_segmentation'][0, :18]}")
    print("  (`targets` is `inputs` shifted left by one: token t predicts token t + 1)")

    loss_tokens, real = int(carry["loss_tokens"]), int(carry["tokens"])
    print(f"\n{real} real tokens in {rows} rows ({real / (rows * MAX_TARGET_LENGTH):.1%} full);")
    print(f"  {loss_tokens} carry a loss weight: one fewer per row, its last token's target")
    print("  shifted out (MaxText's `ShiftData`)")
    return {
        "documents": n,
        "tokens": real,
        "expected_tokens": tokens,
        "rows": rows,
        "loss_tokens": loss_tokens,
        "max_position": int(carry["max_position"]),
        "batches": batches,
        "batch_size": LOCAL_BATCH_SIZE,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer documents")
    main(small=parser.parse_args().small)

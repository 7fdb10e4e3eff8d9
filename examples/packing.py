"""Packing variable-length sequences into fixed rows, and masking attention by segment.

What it teaches:

* **A sequence is an array padded to a static maximum plus its true length.** Each element
  is one line of text as bytes: `{"inputs": [MAX_LEN] int32, "targets": [MAX_LEN] int32,
  "length": int32}`, `targets` being `inputs` shifted by one (next-byte prediction).
* **`jb.pack(row_length, num_rows, lengths=...)`** places whole sequences into the rows of
  a `[num_rows, row_length]` batch (first fit, as Grain's packers do). Several features are
  packed side by side: `lengths={"inputs": "length", "targets": "length"}` packs both at the
  same offsets. Each packed feature `k` comes with `k_segment_ids` (1, 2, 3... per sequence
  in a row, 0 on padding) and `k_positions` (0.. within each sequence); every other key
  (here `length`) becomes a per-segment table `[num_rows, max_segments]`.
* **Segment ids keep documents apart.** `attention_mask` builds the causal mask that lets
  a token attend only to earlier tokens *of its own sequence*; positions restart at 0 per
  sequence, so position embeddings are per document too. The consumer checks that no
  attention weight crosses a document boundary and masks the loss to real tokens.
* **`jb.packing_stats(state)`** counts tokens and padding: the packing efficiency, against
  padding every sequence to `MAX_LEN` on its own.
* **`jb.concat_and_split`** is the other way: concatenate the stream and cut it into full
  rows, splitting sequences across rows (no padding but the end; Grain's
  `ConcatThenSplitIterDataset`).

The text packed is this examples folder's own source code: real variable-length data with
no download. Run: `python examples/packing.py` (add `--small` for fewer lines).
"""

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

MAX_LEN, ROW_LENGTH, NUM_ROWS, EOS = 100, 128, 8, ord("\n")
LENGTHS = {"inputs": "length", "targets": "length"}  # both features share one length
PACKER = jb.pack(ROW_LENGTH, NUM_ROWS, lengths=LENGTHS)  # build once
SPLITTER = jb.concat_and_split(ROW_LENGTH, NUM_ROWS, lengths=LENGTHS)
DIM = 16


def load_lines(small: bool) -> list[bytes]:
    """Non-empty source lines (at most `MAX_LEN` bytes) of this folder's examples."""
    here = pathlib.Path(__file__)
    files = [here] if small else sorted(here.parent.glob("*.py"))
    lines = [line[:MAX_LEN] for f in files for line in f.read_bytes().splitlines()]
    lines = [line for line in lines if line.strip()]  # a length-0 sequence would be skipped
    return lines[:60] if small else lines


def to_stream(lines: list[bytes]) -> dict[str, np.ndarray]:
    """Stack the lines as padded arrays plus lengths: `inputs`, `targets`, `length`."""
    n = len(lines)
    inputs = np.zeros((n, MAX_LEN), np.int32)
    targets = np.zeros((n, MAX_LEN), np.int32)
    for i, line in enumerate(lines):
        tokens = np.frombuffer(line, np.uint8).astype(np.int32)
        inputs[i, : len(tokens)] = tokens
        targets[i, : len(tokens)] = np.append(tokens[1:], EOS)  # the next byte
    length = np.array([len(line) for line in lines], np.int32)
    return {"inputs": inputs, "targets": targets, "length": length}


def attention_mask(segment_ids: jax.Array) -> jax.Array:
    """`[rows, T, T]`: query `i` may attend key `j` iff same sequence, `j <= i`, not padding."""
    length = segment_ids.shape[-1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    real = (segment_ids > 0)[:, :, None]
    causal = jnp.tril(jnp.ones((length, length), bool))[None]
    return same & real & causal


def init_model(key: jax.Array) -> dict[str, jax.Array]:
    """An untrained one-head attention layer over byte embeddings (random weights)."""
    k = jax.random.split(key, 5)
    scale = np.float32(DIM**-0.5)
    return {
        "embed": jax.random.normal(k[0], (256, DIM), jnp.float32),
        "pos": jax.random.normal(k[1], (ROW_LENGTH, DIM), jnp.float32),
        "q": jax.random.normal(k[2], (DIM, DIM), jnp.float32) * scale,
        "k": jax.random.normal(k[3], (DIM, DIM), jnp.float32) * scale,
        "out": jax.random.normal(k[4], (DIM, 256), jnp.float32) * scale,
    }


def consume(carry: dict, batch: jb.Batch) -> dict:
    """A forward pass with the segment mask: next-byte loss on real tokens only, and the
    largest attention weight any token puts on another sequence (must be 0)."""
    params, data = carry["params"], batch.data
    segments = data["inputs_segment_ids"]  # [rows, T]
    x = params["embed"][data["inputs"]] + params["pos"][data["inputs_positions"]]
    scores = jnp.einsum("rqd,de,rke->rqk", x, params["q"] @ params["k"].T, x)
    mask = attention_mask(segments)
    weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1, where=mask)
    weights = jnp.where(mask, weights, 0.0)  # padding queries attend nothing
    logits = jnp.einsum("rqk,rkd,dv->rqv", weights, x, params["out"])
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, data["targets"][..., None], axis=-1)[..., 0]
    real = data["targets_segment_ids"] > 0  # padding tokens carry no loss
    across = segments[:, :, None] != segments[:, None, :]
    return {
        **carry,
        "loss_sum": carry["loss_sum"] + jnp.sum(jnp.where(real, nll, 0.0)),
        "tokens": carry["tokens"] + jnp.sum(real.astype(jnp.int32)),
        "max_cross": jnp.maximum(carry["max_cross"], jnp.max(jnp.where(across, weights, 0.0))),
        "batches": carry["batches"] + 1,
        "first": jax.tree.map(
            lambda kept, new: jnp.where(carry["batches"] == 0, new, kept), carry["first"], data
        ),
    }


def as_text(tokens: np.ndarray) -> str:
    return bytes(np.asarray(tokens).astype(np.uint8)).decode(errors="replace")


def show_row(data: dict, row: int, width: int = 96) -> str:
    """A packed row as text, its sequences separated by `|`."""
    tokens, segments = np.asarray(data["inputs"][row]), np.asarray(data["inputs_segment_ids"][row])
    ids = [s for s in np.unique(segments) if s > 0]
    text = " | ".join(as_text(tokens[segments == s]).strip() for s in ids)
    return text if len(text) <= width else text[: width - 3] + "..."


def main(small: bool = False) -> dict:
    lines = load_lines(small)
    stream = to_stream(lines)
    n, tokens = len(lines), int(stream["length"].sum())
    print(f"{n} lines, {tokens} bytes; rows of {ROW_LENGTH} tokens, {NUM_ROWS} rows per batch")

    # Pack and run the segment-masked model in one program. The consumer also keeps the
    # first batch in its carry, to look at below (a carry can hold anything).
    spec = jb.batch_spec(PACKER, jax.tree.map(lambda x: x[0], stream))
    carry = {
        "params": init_model(jax.random.key(0)),
        "loss_sum": jnp.zeros((), jnp.float32),
        "tokens": jnp.zeros((), jnp.int32),
        "max_cross": jnp.zeros((), jnp.float32),
        "batches": jnp.zeros((), jnp.int32),
        "first": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec.data),
    }
    carry, state = jb.scan(PACKER, consume, carry, stream)

    # 1. What a packed batch looks like.
    first = carry["first"]
    print(f"\njb.pack: {int(carry['batches'])} batches; batch 0, row 0 holds these sequences:")
    print(f"  {show_row(first, 0)}")
    print(f"  inputs_segment_ids {first['inputs_segment_ids'][0, :24]} ...")
    print(f"  inputs_positions   {first['inputs_positions'][0, :24]} ...")
    print(f"  per-segment table 'length' of row 0: {first['length'][0, :6]} ...")
    mask = np.asarray(attention_mask(first["inputs_segment_ids"][:1])[0])
    ids = np.asarray(first["inputs_segment_ids"][0])
    cut = int(np.argmax(ids == 2)) if (ids == 2).any() else 4  # where sequence 2 starts
    print(f"  attention mask around the boundary of sequences 1 and 2 (tokens {cut - 3}..):")
    for i in range(cut - 3, cut + 3):
        print("   ", "".join("#" if m else "." for m in mask[i, cut - 3 : cut + 3]), f"id {ids[i]}")

    # 2. What the consumer saw, and how well the rows were filled.
    stats = {k: int(v) for k, v in jb.packing_stats(state).items()}
    efficiency = stats["tokens"] / (stats["tokens"] + stats["padding_tokens"])
    alone = tokens / (n * MAX_LEN)  # every line padded to MAX_LEN on its own
    print(f"\nthe segment-masked attention consumer saw {int(carry['tokens'])} tokens")
    loss = float(carry["loss_sum"]) / int(carry["tokens"])
    print(f"  mean next-byte loss (untrained model) {loss:.2f}")
    print(f"  largest attention weight across sequences: {float(carry['max_cross'])}")
    print(f"  packing_stats: {stats['sequences']} sequences in {stats['rows']} rows")
    print(f"  efficiency {efficiency:.1%} (each line padded to {MAX_LEN} alone: {alone:.1%})")

    # 3. concat_and_split: no padding but at the end, sequences cut across rows.
    split, split_count = jb.batch_all(SPLITTER, stream)
    real = int(jnp.sum(split.data["inputs_segment_ids"] > 0))
    slots = int(jnp.sum(split.valid_mask)) * ROW_LENGTH
    rows = jax.tree.map(lambda x: x[0], split).data
    text = [as_text(rows["inputs"][r]) for r in (0, 1)]
    print(f"\njb.concat_and_split: {int(split_count)} batches, {real / slots:.1%} of slots used")
    print(f"  a line cut across rows 0 and 1: ...{text[0][-24:]!r} + {text[1][:24]!r}...")
    print(f"  row 1's positions {rows['inputs_positions'][1, :8]} ... restart at 0, as Grain's")
    print("  (pass `continue_positions=True` to continue them across the cut)")
    return {
        "batches": int(carry["batches"]),
        "tokens": int(carry["tokens"]),
        "expected_tokens": tokens,
        "max_cross": float(carry["max_cross"]),
        "efficiency": efficiency,
        "alone": alone,
        "split_tokens": real,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer lines")
    main(small=parser.parse_args().small)

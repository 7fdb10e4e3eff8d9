"""Bucketing by length: one compiled train step per bucket shape, chosen by `lax.switch`.

What it teaches:

* **Pad to the bucket, not to the longest sequence.** `jb.bucket_by_length(boundaries,
  batch_sizes, length=..., features=...)` sends a sequence of length `L` to the first bucket
  whose boundary is `>= L` and cuts its features to that boundary, so bucket `i` emits
  batches `[batch_sizes[i], boundaries[i]]`. Smaller batches for longer buckets keep the
  tokens per batch about constant.
* **Several shapes in one program.** The emission is a `jb.Bucketed`: one batch per bucket
  (each of its own static shape) and the index of the ready one. `jb.by_bucket(fn)` turns a
  consumer into one that runs `lax.switch(bucket, ...)` with one branch per batch shape,
  so the train step is traced (and compiled) once per shape: 4 buckets, 4 traces, however
  many batches and epochs. Pass a list, `jb.by_bucket([f0, f1, f2, f3])`, for a different
  consumer per bucket.
* **Mask twice.** Rows of a batch: `valid_mask` (the last batch of a bucket is padded).
  Tokens of a row: `position < length` (a sequence is padded to its bucket's boundary).

The model is a bag-of-embeddings classifier in plain JAX: does a sequence use the low or the
high half of the vocabulary? Run: `python examples/bucketing.py` (add `--small`).
"""

import argparse
import collections

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

BOUNDARIES = (8, 16, 32, 64)
BATCH_SIZES = (32, 16, 8, 4)  # 256 token slots per batch in every bucket
MAX_LEN, VOCAB, DIM, LR = 64, 64, 8, 0.5
BATCHER = jb.bucket_by_length(BOUNDARIES, BATCH_SIZES, length="length", features=["tokens"])
TRACES: collections.Counter = collections.Counter()  # batch shape -> traces


def make_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`n` sequences of skewed lengths in [1, 64]: `tokens` [n, 64], `length`, `label`."""
    rng = np.random.default_rng(seed)
    length = np.minimum(rng.geometric(1 / 12, n), MAX_LEN).astype(np.int32)
    label = rng.integers(0, 2, n).astype(np.int32)
    low = 1 + label * (VOCAB // 2)  # label 0: tokens [1, 32); label 1: tokens [33, 64)
    tokens = rng.integers(low[:, None], low[:, None] + VOCAB // 2 - 1, (n, MAX_LEN))
    tokens = np.where(np.arange(MAX_LEN) < length[:, None], tokens, 0).astype(np.int32)
    return {"tokens": tokens, "length": length, "label": label}


def init_carry(key: jax.Array) -> dict:
    return {
        "params": {
            "embed": 0.1 * jax.random.normal(key, (VOCAB, DIM), jnp.float32),
            "w": jnp.zeros(DIM, jnp.float32),
        },
        "batches": jnp.zeros(len(BOUNDARIES), jnp.int32),  # per bucket
        "real_tokens": jnp.zeros((), jnp.int32),
        "token_slots": jnp.zeros((), jnp.int32),
        "correct": jnp.zeros((), jnp.int32),
    }


def train_step(carry: dict, batch: jb.Batch) -> dict:
    """One SGD step on a batch of one bucket; traced once per bucket shape."""
    rows, width = batch.data["tokens"].shape  # static: which bucket this branch is
    TRACES[(rows, width)] += 1
    bucket = BOUNDARIES.index(width)
    length = batch.data["length"]
    in_seq = jnp.arange(width)[None, :] < length[:, None]  # [rows, width] real tokens
    label = batch.data["label"].astype(jnp.float32)

    def loss_fn(params):
        embedded = params["embed"][batch.data["tokens"]]  # [rows, width, DIM]
        summed = jnp.sum(jnp.where(in_seq[..., None], embedded, 0.0), axis=1)
        pooled = summed / jnp.maximum(length, 1).astype(jnp.float32)[:, None]
        logit = pooled @ params["w"]
        per_row = jnp.logaddexp(0.0, logit) - label * logit  # binary cross-entropy
        per_row = jnp.where(batch.valid_mask, per_row, 0.0)
        return jnp.sum(per_row) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32), logit

    (_, logit), grads = jax.value_and_grad(loss_fn, has_aux=True)(carry["params"])
    params = jax.tree.map(lambda p, g: p - LR * g, carry["params"], grads)
    right = ((logit > 0) == (batch.data["label"] == 1)) & batch.valid_mask
    real = jnp.sum(jnp.where(batch.valid_mask, length, 0))
    return {
        "params": params,
        "batches": carry["batches"].at[bucket].add(1),
        "real_tokens": carry["real_tokens"] + real,
        "token_slots": carry["token_slots"] + rows * width,
        "correct": carry["correct"] + jnp.sum(right.astype(jnp.int32)),
    }


CONSUMER = jb.by_bucket(train_step)  # build once (rebuilding an equal one does not retrace)


def reset_metrics(carry: dict) -> dict:
    return {**init_carry(jax.random.key(0)), "params": carry["params"]}


def main(small: bool = False) -> dict:
    n, epochs = (400, 2) if small else (20_000, 5)
    data = make_data(n)
    carry = init_carry(jax.random.key(0))
    counts = np.bincount(np.searchsorted(BOUNDARIES, data["length"]), minlength=4)
    print(f"{n} sequences; per bucket (boundaries {BOUNDARIES}): {counts.tolist()}")
    for epoch in range(epochs):
        order = np.random.default_rng(epoch).permutation(n)
        carry, state = jb.scan(
            BATCHER, CONSUMER, reset_metrics(carry), {k: v[order] for k, v in data.items()}
        )
        print(f"  epoch {epoch}: accuracy while training {int(carry['correct']) / n:.3f}")
    print(f"batches per bucket in the last epoch: {carry['batches'].tolist()}")
    print(f"train_step traces per batch shape: {dict(TRACES)}")
    bucketed = int(carry["real_tokens"]) / int(carry["token_slots"])
    single = int(data["length"].sum()) / (-(-n // 8) * 8 * MAX_LEN)  # batches of 8 x 64
    print(f"real tokens per token slot: {bucketed:.1%} bucketed, {single:.1%} padded to {MAX_LEN}")
    print(f"operation_stats batch_count: {int(jb.operation_stats(state)['batch_count'])}")
    return {
        "traces": dict(TRACES),
        "accuracy": int(carry["correct"]) / n,
        "batches": carry["batches"].tolist(),
        "real_tokens": int(carry["real_tokens"]),
        "expected_tokens": int(data["length"].sum()),
        "bucketed": bucketed,
        "single": single,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a small, seconds-long run")
    main(small=parser.parse_args().small)

"""A plain-Python reference for bucketing (`bucket_by`, `bucket_by_length`).

Rows are flat dicts `{leaf path: numpy array}` (`reference.element_row`), a batch is
`(stacked rows, valid mask)`. Buckets are Python lists; nothing here uses `jaxbatch`.
"""

from typing import Any, NamedTuple

import numpy as np
from reference import RefBatch, Row, stack_rows

STAT_NAMES = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")


class BucketRun(NamedTuple):
    """What a bucketing batcher does to a whole stream.

    Attributes:
        batches: every ready batch as `(bucket, batch)`, in order: those `step` emits, then
            those `flush` emits (one per call, in bucket order).
        ready: for each `step`, the bucket it emitted, or None.
        buffered: rows left in each bucket after the last `step` (before `flush`).
        stats: the expected `Stats` counters after the flush.
    """

    batches: list[tuple[int, RefBatch]]
    ready: list[int | None]
    buffered: list[int]
    stats: dict[str, int]


def bucket(
    rows: list[Row | None],
    keys: list[int | None],
    batch_sizes: list[int],
    *,
    likes: list[Row],
    pad_value: Any = 0,
    drop_remainder: bool = False,
) -> BucketRun:
    """Route `rows[i]` to bucket `keys[i]` (None: skipped); `likes[b]` shapes bucket `b`'s
    padding. A bucket is emitted when it fills; at the end, the rest, bucket by bucket."""
    stats = dict.fromkeys(STAT_NAMES, 0)
    buckets: list[list[Row]] = [[] for _ in batch_sizes]
    batches: list[tuple[int, RefBatch]] = []
    ready: list[int | None] = []
    for row, key in zip(rows, keys):
        if key is None:
            stats["skipped"] += 1
            ready.append(None)
            continue
        stats["accepted"] += 1
        buckets[key].append(row)
        if len(buckets[key]) == batch_sizes[key]:
            keys_b = sorted(likes[key])
            batches.append(
                (key, (stack_rows(buckets[key], keys_b), np.ones(batch_sizes[key], bool)))
            )
            stats["emitted"] += batch_sizes[key]
            stats["batches"] += 1
            buckets[key] = []
            ready.append(key)
        else:
            ready.append(None)
    buffered = [len(b) for b in buckets]
    for key, rows_b in enumerate(buckets):
        if not rows_b:
            continue
        if drop_remainder:
            stats["dropped"] += len(rows_b)
            continue
        like = likes[key]
        pad = {k: np.full_like(v, np.array(pad_value, dtype=v.dtype)) for k, v in like.items()}
        num_pad = batch_sizes[key] - len(rows_b)
        mask = np.array([True] * len(rows_b) + [False] * num_pad)
        batches.append((key, (stack_rows(rows_b + [pad] * num_pad, sorted(like)), mask)))
        stats["emitted"] += len(rows_b)
        stats["batches"] += 1
        stats["padded"] += num_pad
    return BucketRun(batches, ready, buffered, stats)


def bucket_by(
    rows: list[Row],
    keys: list[int],
    batch_sizes: list[int],
    *,
    like: Row,
    pad_value: Any = 0,
    drop_remainder: bool = False,
) -> BucketRun:
    """tf.data's `group_by_window` on a list: every bucket holds rows like `like`."""
    for key in keys:
        if not 0 <= key < len(batch_sizes):
            raise ValueError(f"key {key} out of range")
    return bucket(
        rows,
        list(keys),
        batch_sizes,
        likes=[like] * len(batch_sizes),
        pad_value=pad_value,
        drop_remainder=drop_remainder,
    )


def cut_row(row: Row, features: list[str], bound: int, n: int, pad_value: Any) -> Row:
    """`row` with each feature (a flat key) cut to `bound` positions, those at or past `n`
    set to `pad_value`."""
    out = dict(row)
    for f in features:
        x = np.array(row[f][:bound])
        x[n:] = np.array(pad_value, dtype=x.dtype)
        out[f] = x
    return out


def bucket_by_length(
    rows: list[Row],
    boundaries: list[int],
    batch_sizes: list[int],
    *,
    length: str,
    features: list[str],
    too_long: str = "error",
    pad_value: Any = 0,
    drop_remainder: bool = False,
    like: Row,
) -> BucketRun:
    """Bucket `i` takes lengths in `(boundaries[i-1], boundaries[i]]` (flat keys `length`,
    `features`), features cut to `boundaries[i]`."""
    keys: list[int | None] = []
    cut: list[Row | None] = []
    for row in rows:
        n = int(row[length])
        if n < 0 or (n > boundaries[-1] and too_long == "error"):
            raise ValueError(f"length {n} out of range")
        key = next((i for i, b in enumerate(boundaries) if n <= b), None)
        keys.append(key)
        cut.append(None if key is None else cut_row(row, features, boundaries[key], n, pad_value))
    likes = [cut_row(like, features, b, b, pad_value) for b in boundaries]
    return bucket(
        cut, keys, batch_sizes, likes=likes, pad_value=pad_value, drop_remainder=drop_remainder
    )

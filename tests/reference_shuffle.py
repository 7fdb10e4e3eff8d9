"""A pure-Python reference `shuffle` and `rebatch`, sharing no code with `jaxbatch`.

The shuffle reference is the obvious list-based shuffle buffer. Its random slot draws come
from the same `jax.random` calls, in the same order, as the batcher's (one `split` per step,
then a `randint` over the buffer; per `flush` call, one `split`, then one key per row), so
it must reproduce the batcher's output exactly, not only in distribution.
"""

from typing import Any, NamedTuple

import jax
import numpy as np

COUNTERS = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")


class ShuffleRun(NamedTuple):
    """What `shuffle` does to a stream of `n` elements, as input indices.

    Attributes:
        batches: every ready batch, in order: a list of input indices (None for padding).
        ready: for each `step`, whether it emitted a batch.
        stats: the `Stats` counters after the drain.
    """

    batches: list[list[int | None]]
    ready: list[bool]
    stats: dict[str, int]


def shuffle_order(
    n: int, batch_size: int, buffer_size: int, key: Any, *, drop_remainder: bool = False
) -> ShuffleRun:
    """Which input goes where: a shuffle buffer of `buffer_size` slots, batches of
    `batch_size`, the buffer drained at random at the end (one batch per flush)."""
    stats = dict.fromkeys(COUNTERS, 0)
    buffer: list[int] = []
    batch: list[int] = []
    batches: list[list[int | None]] = []
    ready: list[bool] = []
    for i in range(n):
        stats["accepted"] += 1
        key, draw = jax.random.split(key)
        if len(buffer) < buffer_size:
            buffer.append(i)
            ready.append(False)
            continue
        slot = int(jax.random.randint(draw, (), 0, buffer_size))
        batch.append(buffer[slot])
        buffer[slot] = i
        ready.append(len(batch) == batch_size)
        if ready[-1]:
            batches.append(batch)
            stats["batches"] += 1
            stats["emitted"] += batch_size
            batch = []
    while batch or buffer:  # flush calls
        key, draws = jax.random.split(key)
        draws = jax.random.split(draws, batch_size)
        for r in range(len(batch), batch_size):
            if not buffer:
                break
            slot = int(jax.random.randint(draws[r], (), 0, len(buffer)))
            batch.append(buffer[slot])
            buffer[slot] = buffer[-1]
            buffer.pop()
        if drop_remainder and len(batch) < batch_size:
            stats["dropped"] += len(batch)
        else:
            stats["batches"] += 1
            stats["emitted"] += len(batch)
            stats["padded"] += batch_size - len(batch)
            batches.append(batch + [None] * (batch_size - len(batch)))
        batch = []
    return ShuffleRun(batches, ready, stats)


def build(elements: list[Any], indices: list[list[int | None]], pad_value: Any) -> list:
    """Batches `(data, valid_mask)` of `elements` (PyTrees of NumPy arrays) by index."""
    like = elements[0]
    pad = jax.tree.map(lambda x: np.full_like(x, np.array(pad_value).astype(x.dtype)), like)
    out = []
    for batch in indices:
        rows = [pad if i is None else elements[i] for i in batch]
        data = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        out.append((data, np.array([i is not None for i in batch])))
    return out


def shuffle(batch_size, buffer_size, key, *, drop_remainder=False, pad_value=0):
    """A reference for `check_batcher`: from the list of elements to the ready batches."""

    def reference(elements):
        run = shuffle_order(
            len(elements), batch_size, buffer_size, key, drop_remainder=drop_remainder
        )
        return build(list(elements), run.batches, pad_value)

    return reference


class RebatchRun(NamedTuple):
    """What `rebatch` does to a stream of input batches.

    Attributes:
        batches: every ready batch, as a list of `(input batch, row)` pairs (None: padding).
        ready: for each `step`, whether it emitted a batch.
        stats: the `Stats` counters after the drain.
    """

    batches: list[list[tuple[int, int] | None]]
    ready: list[bool]
    stats: dict[str, int]


def rebatch_order(masks: np.ndarray, batch_size: int, *, drop_remainder=False) -> RebatchRun:
    """The valid rows of `masks` (`[num_batches, in_size]` bools), in order, in batches of
    `batch_size`; the last partial batch padded (or dropped)."""
    stats = dict.fromkeys(COUNTERS, 0)
    pending: list[tuple[int, int]] = []
    batches: list[list[tuple[int, int] | None]] = []
    ready: list[bool] = []
    for b, mask in enumerate(masks):
        for r, valid in enumerate(mask):
            if valid:
                pending.append((b, r))
                stats["accepted"] += 1
            else:
                stats["skipped"] += 1
        ready.append(len(pending) >= batch_size)
        if ready[-1]:
            batches.append(list(pending[:batch_size]))
            pending = pending[batch_size:]
            stats["batches"] += 1
            stats["emitted"] += batch_size
    if pending and drop_remainder:
        stats["dropped"] += len(pending)
    elif pending:
        batches.append(pending + [None] * (batch_size - len(pending)))
        stats["batches"] += 1
        stats["emitted"] += len(pending)
        stats["padded"] += batch_size - len(pending)
    return RebatchRun(batches, ready, stats)

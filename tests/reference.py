"""A tiny pure-Python/NumPy reference `fixed_size`, and the bridge from JAX trees to it.

The reference sees an element as a flat dict `{leaf path: numpy array}` and a batch as the
same dict with a leading `[batch_size]` axis, plus a `[batch_size]` bool valid mask. It is
written as the obvious list-based loop, sharing no code with `jaxbatch`, so that the
batcher, its bulk `feed` and every driver can be checked against it.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

Row = dict[str, np.ndarray]
RefBatch = tuple[Row, np.ndarray]  # (stacked rows, valid mask)


class ReferenceRun(NamedTuple):
    """What `fixed_size` does to a whole stream.

    Attributes:
        batches: every ready batch, in order: full ones from `step`, then what `flush` emits.
        ready: for each `step`, whether it emitted a batch.
        buffered: rows left buffered after the last `step` (before `flush`).
        stats: the expected `Stats` counters at the end of the stream (after `flush`).
    """

    batches: list[RefBatch]
    ready: list[bool]
    buffered: int
    stats: dict[str, int]


def stack_rows(rows: list[Row], keys: list[str]) -> Row:
    """`rows` stacked key by key on a new leading axis."""
    return {k: np.stack([row[k] for row in rows]) for k in keys}


def fixed_size(
    elements: list[Row],
    batch_size: int,
    *,
    drop_remainder: bool = False,
    pad_value: Any = 0,
    like: Row | None = None,
) -> ReferenceRun:
    """Batch `elements` `batch_size` at a time; pad (or drop) the final partial batch.

    `like` is an example row, needed only to shape padding when `elements` is empty.
    """
    like = elements[0] if elements else like
    keys = sorted(like) if like is not None else []
    stats = dict.fromkeys(("accepted", "skipped", "dropped", "emitted", "batches", "padded"), 0)
    batches: list[RefBatch] = []
    ready: list[bool] = []
    buffer: list[Row] = []
    for element in elements:
        stats["accepted"] += 1
        buffer.append(element)
        if len(buffer) == batch_size:
            batches.append((stack_rows(buffer, keys), np.ones(batch_size, bool)))
            stats["emitted"] += batch_size
            stats["batches"] += 1
            buffer = []
            ready.append(True)
        else:
            ready.append(False)
    buffered = len(buffer)
    if buffer and drop_remainder:
        stats["dropped"] += len(buffer)
    elif buffer:
        pad = {k: np.full_like(like[k], np.array(pad_value, dtype=like[k].dtype)) for k in keys}
        num_pad = batch_size - len(buffer)
        mask = np.array([True] * len(buffer) + [False] * num_pad)
        batches.append((stack_rows(buffer + [pad] * num_pad, keys), mask))
        stats["emitted"] += len(buffer)
        stats["batches"] += 1
        stats["padded"] += num_pad
    return ReferenceRun(batches, ready, buffered, stats)


# --------------------------------------------------------------------------- the bridge


def _flat(tree: Any) -> Row:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def element_row(element: Any) -> Row:
    """An `Element` (or a PyTree, taken as its `data`) as a reference row."""
    if not hasattr(element, "metadata"):
        return _flat({"data": element, "state": {}, "metadata": None})
    return _flat({"data": element.data, "state": element.state, "metadata": element.metadata})


def batch_rows(batch: Any) -> RefBatch:
    """A `jaxbatch.Batch` as a reference batch (its batch-level fields must be empty)."""
    assert batch.batch_state == {} and batch.batch_metadata is None
    row = _flat({"data": batch.data, "state": batch.states, "metadata": batch.metadata})
    return row, np.asarray(batch.valid_mask)


def unstack(tree: Any) -> list[Any]:
    """The rows of a tree whose leaves share a leading axis (NumPy leaves index fast)."""
    leaves = jax.tree.leaves(tree)
    n = np.shape(leaves[0])[0]
    return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


# --------------------------------------------------------------------------- test streams

BATCH_SIZES = [1, 2, 3, 5]
PAD_VALUES = [0, -1, 7.0, True]  # 7.0 casts to 7 in int leaves, True to 1 / 1.0


def make_stream(kind: str, n: int, seed: int) -> Any:
    """`n` elements stacked on a leading axis, as NumPy-backed trees.

    `kind="dict"`: a plain PyTree with an int32 and a float32 leaf. `kind="element"`: a
    `jaxbatch.Element` with the same data plus a per-element `state` and `Metadata`
    (`index` counts from `seed`, so every element is recognisable).
    """
    import jaxbatch as jb  # imported here: the reference above needs no jaxbatch

    rng = np.random.default_rng(seed)
    data = {
        "i": rng.integers(-100, 100, size=(n, 2), dtype=np.int32),
        "f": rng.standard_normal((n, 3)).astype(np.float32),
    }
    if kind == "dict":
        return data
    state = {"s": rng.standard_normal(n).astype(np.float32)}
    index = np.arange(seed, seed + n, dtype=np.int32)
    epoch = rng.integers(0, 3, size=n, dtype=np.int32)
    return jb.Element(data=data, state=state, metadata=jb.Metadata(index=index, epoch=epoch))


def row_spec(stacked: Any) -> Any:
    """The spec of one element of a stacked tree."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), stacked)


def like_row(stacked: Any) -> Row:
    """A zero reference row shaped like one element of `stacked` (for empty streams)."""
    return element_row(jax.tree.map(lambda x: np.zeros(np.shape(x)[1:], x.dtype), stacked))


def reference_rows(stacked: Any) -> list[Row]:
    """The elements of `stacked` as reference rows."""
    return [element_row(row) for row in unstack(jax.device_get(stacked))]


# --------------------------------------------------------------------------- shared by tests

STAT_NAMES = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")


def stats_of(state) -> dict[str, int]:
    """A state's counters as Python ints, by `Stats` field name."""
    return {name: int(getattr(state.stats, name)) for name in STAT_NAMES}


def append(carry, batch):
    """A consumer that writes each batch into the next slot of a preallocated stack."""
    out, count = carry
    out = jax.tree.map(lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, count, 0), out, batch)
    return out, count + 1


def slots(batches, count):
    """The first `count` slots of a stacked `Batch`, as reference batches."""
    batches = jax.device_get(batches)
    return [batch_rows(jax.tree.map(lambda x, k=k: x[k], batches)) for k in range(count)]


def empty_slots(batcher, spec, capacity):
    """`(out, 0)`: room for `capacity` batches of `batcher`, the carry `append` fills."""
    batch = jb.batch_spec(batcher, spec)
    out = jax.tree.map(lambda s: jnp.zeros((capacity, *s.shape), s.dtype), batch)
    return out, jnp.zeros((), jnp.int32)


def expected_for(stacked, config) -> ReferenceRun:
    """The reference run of `fixed_size(**config)` over the stacked test stream."""
    return fixed_size(
        reference_rows(stacked),
        config["batch_size"],
        drop_remainder=config["drop_remainder"],
        pad_value=config["pad_value"],
        like=like_row(stacked),
    )


def consumer_traces(batcher, first, second, *, key=None):
    """How many times `jb.scan` traced its consumer in each driver program: a flushed run
    (called on `first`, then again on `second`: new values, same shapes) and a stream
    continued across two calls (`first`, then `second` from the returned state). The
    one-call-site rule says 1 each."""
    traces = {"scan": 0, "scan, continued": 0}

    def consumer(program):
        def fn(total, batch):
            traces[program] += 1
            masks = jax.tree.leaves(
                jax.tree.map(
                    lambda b: b.valid_mask, batch, is_leaf=lambda x: isinstance(x, jb.Batch)
                ),
            )
            return total + sum(jnp.sum(m.astype(jnp.int32)) for m in masks)

        return fn

    zero = jnp.int32(0)
    flushed = consumer("scan")
    jb.scan(batcher, flushed, zero, first, key=key)
    jb.scan(batcher, flushed, zero, second, key=key)
    continued = consumer("scan, continued")
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), first)
    state = batcher.init(spec, key=key)
    _, state = jb.scan(batcher, continued, zero, first, state=state, flush=False)
    jb.scan(batcher, continued, zero, second, state=state, flush=False)
    return traces

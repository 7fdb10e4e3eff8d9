"""`rebatch`: the valid rows of a stream of batches, regrouped into batches of a new size;
`unbatch`: a batched stream back into its elements.

Data flow (DESIGN.md): each element of `rebatch` is itself a `Batch` of a fixed size
`in_size`. `step` compacts its valid rows to the front (a stable order computed on the mask
alone, then one gather of `in_size` rows) and writes them at row `count` of a buffer of
`batch_size - 1 + in_size` rows with one `dynamic_update_slice`; when `count` reaches
`batch_size` the first `batch_size` rows are emitted and the rest shift to the front.
Because `in_size <= batch_size`, at most one batch is ready per step (law 3) and the
buffer never overflows.

`unbatch` is a plain function, not a batcher: a batcher emits `Batch`es of a fixed size,
and unbatching emits rows; as a function it is one stable compaction of the flattened
rows, usable inside or outside `jit`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..base import Batcher, Emit, Stats, check_state, describe, fingerprint, row_spec, stack_spec
from ..batch import Batch, rows_mask
from ..element import Element
from ..spec import check_against_spec, tree_spec
from ._checks import flag, pad_number, pad_value_fits, positive_int


class RebatchState(eqx.Module):
    """State of `rebatch`.

    Attributes:
        buffer: valid rows waiting, an `Element` with leaves `[batch_size - 1 + in_size, ...]`
            (rows of the input batches' `data`, `states`, `metadata`). Rows at or past `count`
            are unspecified.
        count: rows of `buffer` filled, in `[0, batch_size)` between calls.
        stats: the counters (see `Stats`): `accepted` counts valid input rows, `skipped` the
            padding rows of the input batches (never emitted).
    """

    buffer: Element
    count: Int[Array, ""]
    stats: Stats


def _input_batch(x: Any, what: str) -> Batch:
    """The `Batch` an element of `rebatch` is: a `Batch`, or an `Element` whose data is one
    (what the drivers pass when they slice a stacked stream of Batches)."""
    if isinstance(x, Element) and isinstance(x.data, Batch):
        if x.state or x.metadata is not None:
            raise TypeError(
                f"`{what}` is an `Element` wrapping a `Batch` with its own state or metadata; "
                "give the `Batch` itself (per-row states and metadata go in the `Batch`)."
            )
        x = x.data
    if not isinstance(x, Batch):
        raise TypeError(
            f"`{what}` must be a `jb.Batch` (leaves `[in_size, ...]` with a `valid_mask`), got "
            f"{type(x).__name__}. `rebatch` regroups batches; to batch plain elements use "
            "`jb.fixed_size`."
        )
    return x


def _rows(batch: Batch) -> Element:
    return Element(data=batch.data, state=batch.states, metadata=batch.metadata)


def _check_rows(batch: Batch, what: str) -> int:
    """Every per-row leaf has the mask's leading size; return it (`in_size`)."""
    mask_shape = np.shape(batch.valid_mask)
    if len(mask_shape) != 1 or jnp.result_type(batch.valid_mask) != jnp.bool_:
        raise TypeError(
            f"`{what}.valid_mask` must be a 1-d bool array, got shape {mask_shape} and dtype "
            f"{jnp.result_type(batch.valid_mask)}."
        )
    size = mask_shape[0]
    for path, leaf in jax.tree_util.tree_flatten_with_path(_rows(batch))[0]:
        shape = np.shape(leaf)
        if not shape or shape[0] != size:
            raise TypeError(
                f"Leaf `{what}{jax.tree_util.keystr(path)}` has shape {shape}; every row leaf "
                f"of an input batch needs the leading size {size} of its `valid_mask`."
            )
    return size


def _as_batch(rows: Element, valid_mask: Array) -> Batch:
    return Batch(data=rows.data, valid_mask=valid_mask, states=rows.state, metadata=rows.metadata)


def rebatch(batch_size: Any, *, drop_remainder: Any = False, pad_value: Any = 0) -> Batcher:
    """Regroup the valid rows of a stream of batches into batches of `batch_size`, in order.

    Each element is a `jb.Batch` with leaves `[in_size, ...]` and a `valid_mask`, `in_size`
    fixed for the stream (set by the spec given to `init`) and at most `batch_size`. A
    stream of them is one stacked `Batch`, leaves `[num_batches, in_size, ...]` and a
    `[num_batches, in_size]` mask, passed to the drivers like any stacked stream. Stack
    Batches with `jax.tree.map(lambda *xs: jnp.stack(xs), *batches)` (the constructor wants a
    1-d mask). `init` takes one input batch (or its `jax.eval_shape`) as the spec.

    Valid rows come out in stream order, carrying across input batches; padding rows never
    become valid (they are counted as `skipped`). A batch is emitted the step it fills; at
    end of stream `flush` emits the rest padded with `pad_value` or, with
    `drop_remainder=True`, drops it and counts its rows. Output rows hold the input rows'
    `data`, `states` and `metadata`; the input batches' `batch_state` and `batch_metadata`
    describe whole input batches and are not carried.

    `jb.batch_all` sizes its room for `ceil(num_batches / batch_size)` batches by default;
    pass `max_batches=ceil(num_batches * in_size / batch_size)`.

    Args:
        batch_size: rows per output batch, a positive int (at least `in_size`).
        drop_remainder: drop a final partial batch instead of padding it.
        pad_value: fill for padding rows (a Python scalar), cast to each leaf's dtype.

    Returns:
        A `Batcher` whose elements are `Batch`es.

    Raises:
        ValueError: `batch_size` not a positive int, `drop_remainder` not a bool, `pad_value`
            not a Python number; at `init`, input batches larger than `batch_size` (a step
            emits at most one batch: to split batches, `jb.unbatch` then `jb.fixed_size`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> import jax
        >>> rows = [([0, 1], [True, True]), ([2, -1], [True, False]), ([3, 4], [True, True])]
        >>> inputs = [jb.Batch.from_parts({"x": jnp.array(x)}, valid_mask=jnp.array(m))
        ...           for x, m in rows]  # three input batches of 2 rows, 5 of them valid
        >>> stream = jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)
        >>> batches, count = jb.batch_all(jb.rebatch(3, pad_value=-9), stream, max_batches=2)
        >>> batches.data["x"], batches.valid_mask
        (Array([[ 0,  1,  2],
               [ 3,  4, -9]], dtype=int32), Array([[ True,  True,  True],
               [ True,  True, False]], dtype=bool))
    """
    positive_int(batch_size, "batch_size")
    flag(drop_remainder, "drop_remainder")
    pad_number(pad_value)
    config = describe(
        "rebatch", batch_size=batch_size, drop_remainder=drop_remainder, pad_value=pad_value
    )

    def init_fn(element_spec: Any, key: Any = None) -> RebatchState:
        del key  # deterministic
        spec = _input_batch(element_spec, "element_spec")
        in_size = _check_rows(spec, "element_spec")
        if in_size > batch_size:
            raise ValueError(
                f"`rebatch` with `batch_size` {batch_size} got input batches of {in_size} "
                "rows; input batches may not be larger than `batch_size` (a step emits at "
                "most one batch). To split batches, `jb.unbatch` them and batch the rows with "
                "`jb.fixed_size`."
            )
        rows = row_spec(tree_spec(_rows(spec)))
        pad_value_fits(pad_value, rows)
        return RebatchState(
            buffer=stack_spec(rows, batch_size - 1 + in_size),
            count=jnp.zeros((), jnp.int32),
            stats=Stats.zeros(fingerprint(config, spec)),
        )

    def step_fn(state: RebatchState, element: Any) -> tuple[RebatchState, Emit]:
        check_state(state, RebatchState, config)
        batch = _input_batch(element, "element")
        in_size = _check_rows(batch, "element")
        check_against_spec(row_spec(state.buffer), row_spec(_rows(batch)), what="element")
        leaves = jax.tree.leaves(state.buffer)
        held = leaves[0].shape[0] if leaves else batch_size - 1 + in_size
        if held != batch_size - 1 + in_size:
            raise TypeError(
                f"`element` is a batch of {in_size} rows, but this state was built for input "
                f"batches of {held - batch_size + 1} rows."
            )
        valid = batch.valid_mask
        order = jnp.argsort(~valid, stable=True)  # valid rows first, in order
        rows = jax.tree.map(lambda x: jnp.take(x, order, axis=0), _rows(batch))
        buffer = jax.tree.map(
            lambda b, x: jax.lax.dynamic_update_slice_in_dim(b, x, state.count, 0),
            state.buffer,
            rows,
        )
        num_valid = jnp.sum(valid, dtype=jnp.int32)
        count = state.count + num_valid
        ready = count >= batch_size
        emit = Emit(
            _as_batch(
                jax.tree.map(lambda x: x[:batch_size], buffer),
                jnp.broadcast_to(ready, (batch_size,)),
            ),
            ready,
        )

        def shift(b):  # rows [batch_size, ...) to the front; the tail is unspecified
            return jax.tree.map(lambda x: jnp.roll(x, -batch_size, axis=0), b)

        buffer = jax.lax.cond(ready, shift, lambda b: b, buffer)
        stats = state.stats.add(
            accepted=num_valid,
            skipped=in_size - num_valid,
            batches=ready,
            emitted=jnp.where(ready, batch_size, 0),
        )
        return RebatchState(buffer, jnp.where(ready, count - batch_size, count), stats), emit

    def flush_fn(state: RebatchState) -> tuple[RebatchState, Emit]:
        check_state(state, RebatchState, config)
        n = state.count
        zero = jnp.zeros((), jnp.int32)
        head = jax.tree.map(lambda x: x[:batch_size], state.buffer)
        if drop_remainder:
            not_ready = Emit(_as_batch(head, jnp.zeros((batch_size,), bool)), jnp.array(False))
            return RebatchState(state.buffer, zero, state.stats.add(dropped=n)), not_ready
        rows = jnp.arange(batch_size, dtype=jnp.int32) < n
        padded = jax.tree.map(
            lambda x: jnp.where(rows_mask(rows, x), x, jnp.asarray(pad_value, x.dtype)), head
        )
        ready = n > 0
        stats = state.stats.add(
            emitted=n, batches=ready, padded=jnp.where(ready, batch_size - n, 0)
        )
        return RebatchState(state.buffer, zero, stats), Emit(_as_batch(padded, rows), ready)

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)


# `batches` is `Any`: checked below, so a wrong type raises the documented `TypeError` even
# under a run-time type checker.
def unbatch(batches: Any) -> tuple[Element, Int[Array, ""]]:
    """The elements of a batched stream: valid rows first, in order, and how many there are.

    `batches` is one `Batch` (leaves `[batch_size, ...]`) or a stack of them (leaves
    `[num_batches, batch_size, ...]`, a `[num_batches, batch_size]` mask), such as what
    `jb.batch_all` returns. The rows are flattened in stream order and the valid ones moved
    to the front (a stable compaction), so `elements[:count]` is the element stream; the rows
    at and past `count` are the padding rows. Works under `jit` (`count` is then traced);
    on the host, cut with `jax.tree.map(lambda x: x[:int(count)], elements)`, e.g. to
    re-batch the rows with `jb.fixed_size` at a smaller size.

    Args:
        batches: a `Batch` or a stack of `Batch`es.

    Returns:
        `(elements, count)`: an `Element` (the rows' `data`, `states`, `metadata`) with
        leaves `[num_batches * batch_size, ...]`, and the number of valid rows (int32).

    Raises:
        TypeError: `batches` is not a `Batch`, or its mask and leaves disagree in shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batches, _ = jb.batch_all(jb.fixed_size(4), {"x": jnp.arange(6)})
        >>> elements, count = jb.unbatch(batches)
        >>> elements.data["x"][:count]
        Array([0, 1, 2, 3, 4, 5], dtype=int32)
    """
    if not isinstance(batches, Batch):
        raise TypeError(
            f"`batches` must be a `jb.Batch` (one, or a stack of them), got "
            f"{type(batches).__name__}."
        )
    mask = batches.valid_mask
    lead = np.shape(mask)
    if len(lead) not in (1, 2) or jnp.result_type(mask) != jnp.bool_:
        raise TypeError(
            "`batches.valid_mask` must be a bool array `[batch_size]` or `[num_batches, "
            f"batch_size]`, got shape {lead} and dtype {jnp.result_type(mask)}."
        )
    rows = _rows(batches)
    for path, leaf in jax.tree_util.tree_flatten_with_path(rows)[0]:
        if np.shape(leaf)[: len(lead)] != lead:
            raise TypeError(
                f"Leaf `batches{jax.tree_util.keystr(path)}` has shape {np.shape(leaf)}; it "
                f"must start with the mask's shape {lead}."
            )
    size = int(np.prod(lead))
    flat = jax.tree.map(lambda x: jnp.reshape(x, (size, *np.shape(x)[len(lead) :])), rows)
    valid = jnp.reshape(mask, (size,))
    order = jnp.argsort(~valid, stable=True)
    elements = jax.tree.map(lambda x: jnp.take(x, order, axis=0), flat)
    return elements, jnp.sum(valid, dtype=jnp.int32)

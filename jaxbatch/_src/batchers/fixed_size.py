"""`fixed_size`: consecutive elements into batches of `batch_size`, in order.

Data flow (DESIGN.md): `step` writes the element into row `count` of the buffer in the
carry (one in-place `dynamic_update_slice`) and emits the buffer the same step it fills.
`flush` pads the partial buffer with `pad_value` (or drops it). `feed` is the bulk path, a
plan on scalars then a gather: from `count` alone, row `i` of batch `k` is stream position
`k * batch_size + i - count` — a buffer row when negative, an incoming element, or padding
past the end — so the driver builds any batch with one gather and a `where` (and
`batch_all` all of them with one pad-and-reshape), and the last partial batch's rows
become the new buffer.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

from ..base import (
    Batcher,
    Emissions,
    Emit,
    Stats,
    check_state,
    describe,
    fingerprint,
    own_buffers,
    row_spec,
    stack_spec,
)
from ..batch import Batch, rows_mask
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of
from ._checks import flag, pad_number, pad_value_fits, positive_int


class FixedSizeState(eqx.Module):
    """State of `fixed_size`.

    Attributes:
        buffer: the batch being filled, an `Element` with leaves `[batch_size, ...]`. Rows at
            or past `count` are unspecified.
        count: rows of `buffer` filled so far, in `[0, batch_size)` between calls.
        stats: the counters (see `Stats`).
    """

    buffer: Element
    count: Int[Array, ""]
    stats: Stats


def _as_batch(rows: Element, valid_mask: Array) -> Batch:
    return Batch(data=rows.data, valid_mask=valid_mask, states=rows.state, metadata=rows.metadata)


# `batch_size` and `drop_remainder` are `Any`: they are validated below, so a bad value raises
# the documented `ValueError` even under a run-time type checker (jaxtyping's import hook).
def fixed_size(batch_size: Any, *, drop_remainder: Any = False, pad_value: Any = 0) -> Batcher:
    """Batch consecutive elements, `batch_size` at a time, keeping their order.

    A full batch is emitted the same `step` its last element arrives. At end of stream,
    `flush` emits the partial batch padded with `pad_value` (`valid_mask` marks the real
    rows), or, with `drop_remainder=True`, emits nothing and counts the elements as
    dropped.

    Args:
        batch_size: rows per batch, a positive int.
        drop_remainder: drop a final partial batch instead of padding it.
        pad_value: fill for padding rows (a Python scalar), cast to each leaf's dtype; `init`
            raises `ValueError` if an integer or bool leaf cannot hold it exactly.

    Returns:
        A `Batcher` with a bulk `feed`.

    Raises:
        ValueError: `batch_size` not a positive int, `drop_remainder` not a bool, or
            `pad_value` not a Python number.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2, pad_value=-1)
        >>> state = batcher.init({"x": jnp.zeros((), jnp.int32)})
        >>> for i in range(3):
        ...     state, emit = batcher.step(state, {"x": jnp.int32(i)})
        ...     if emit.ready:
        ...         print(emit.batch.data["x"])
        [0 1]
        >>> state, emit = batcher.flush(state)
        >>> emit.batch.data["x"], emit.batch.valid_mask
        (Array([ 2, -1], dtype=int32), Array([ True, False], dtype=bool))
    """
    positive_int(batch_size, "batch_size")
    flag(drop_remainder, "drop_remainder")
    pad_number(pad_value)
    config = describe(
        "fixed_size", batch_size=batch_size, drop_remainder=drop_remainder, pad_value=pad_value
    )

    def init_fn(element_spec: Any, key: Any = None) -> FixedSizeState:
        del key  # deterministic
        spec = spec_of(element_spec)
        pad_value_fits(pad_value, spec)
        buffer = stack_spec(spec, batch_size)
        stats = Stats.zeros(fingerprint(config, spec))
        return FixedSizeState(buffer=buffer, count=jnp.zeros((), jnp.int32), stats=stats)

    def step_fn(state: FixedSizeState, element: Any) -> tuple[FixedSizeState, Emit]:
        check_state(state, FixedSizeState, config)
        element = as_element(element)
        check_against_spec(row_spec(state.buffer), element, what="element")
        buffer = jax.tree.map(
            lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, state.count, 0),
            state.buffer,
            element,
        )
        count = state.count + 1
        full = count == batch_size
        stats = state.stats.add(accepted=1, batches=full, emitted=jnp.where(full, batch_size, 0))
        emit = Emit(_as_batch(buffer, jnp.broadcast_to(full, (batch_size,))), full)
        new = FixedSizeState(buffer, jnp.where(full, 0, count), stats)
        return new, own_buffers(emit, new)

    def flush_fn(state: FixedSizeState) -> tuple[FixedSizeState, Emit]:
        check_state(state, FixedSizeState, config)
        n = state.count
        zero = jnp.zeros((), jnp.int32)
        if drop_remainder:
            none = jnp.zeros((batch_size,), dtype=bool)
            not_ready = Emit(_as_batch(state.buffer, none), jnp.array(False))
            new = FixedSizeState(state.buffer, zero, state.stats.add(dropped=n))
            return new, own_buffers(not_ready, new)
        rows = jnp.arange(batch_size, dtype=jnp.int32) < n
        padded = jax.tree.map(
            lambda buf: jnp.where(rows_mask(rows, buf), buf, jnp.asarray(pad_value, buf.dtype)),
            state.buffer,
        )
        ready = n > 0
        stats = state.stats.add(
            emitted=n, batches=ready, padded=jnp.where(ready, batch_size - n, 0)
        )
        return FixedSizeState(state.buffer, zero, stats), Emit(_as_batch(padded, rows), ready)

    def feed_fn(
        state: FixedSizeState, elements: Any, flush: bool = False
    ) -> tuple[FixedSizeState, Emissions]:
        check_state(state, FixedSizeState, config)
        elements = as_element(elements)
        check_against_spec(row_spec(state.buffer), row_spec(elements), what="elements[i]")
        leaves = jax.tree.leaves(elements)
        n = jnp.shape(leaves[0])[0] if leaves else 0
        # The plan, on scalars: the stream is the `r` buffered rows, then the `n` elements.
        r = state.count
        whole = (r + n) // batch_size  # full batches
        tail = r + n - whole * batch_size  # rows of the partial batch after them
        emit_tail = jnp.array(flush and not drop_remainder) & (tail > 0)
        count = whole + emit_tail.astype(jnp.int32)

        def pick(position, buffer_rows, stream_rows):
            """Row `i` comes from buffer row `i` if `position[i] < 0`, from the stream if it
            is in `[0, n)`, else it is padding."""

            def leaf(buf, x, mask_like):
                pad = jnp.asarray(pad_value, x.dtype)
                out = jnp.where(rows_mask(position >= n, mask_like), pad, stream_rows(x))
                return jnp.where(rows_mask(position < 0, mask_like), buffer_rows(buf), out)

            return jax.tree.map(lambda buf, x: leaf(buf, x, buf), state.buffer, elements)

        def rows_of_batch(k):
            position = (
                k * batch_size + jnp.arange(batch_size, dtype=jnp.int32) - r
            )  # stream position per row
            index = jnp.clip(position, 0, max(n - 1, 0))

            def take(x):  # no rows to take from an empty stack: any value (it is masked)
                if not n:
                    return jnp.zeros((batch_size, *x.shape[1:]), x.dtype)
                return jnp.take(x, index, axis=0)

            return pick(position, lambda buf: buf, take), position

        def batch_fn(k):
            rows, position = rows_of_batch(k)
            return _as_batch(rows, (position < n) & (k < count))

        def stacked_fn(capacity: int) -> Batch:
            # One pad-and-reshape of the stream: slot k of the result is batch k. From an
            # empty buffer (`r` a constant 0) XLA reduces it to a copy of the elements.
            size = capacity * batch_size
            position = jnp.arange(size, dtype=jnp.int32) - r

            def shifted(x):  # stream row `position[q]` at row q (pad where out of range)
                padding = jnp.full((batch_size, *x.shape[1:]), pad_value, x.dtype)
                after = jnp.full((size, *x.shape[1:]), pad_value, x.dtype)
                whole_stream = jnp.concatenate([padding, x, after])
                return jax.lax.dynamic_slice_in_dim(whole_stream, batch_size - r, size)

            def front(buf):  # buffer row q at row q, for the rows q < r
                rest = jnp.zeros((max(size - batch_size, 0), *buf.shape[1:]), buf.dtype)
                return jnp.concatenate([buf, rest])[:size]

            rows = pick(position, front, shifted)
            slot = jnp.arange(size, dtype=jnp.int32) // batch_size
            flat = _as_batch(rows, (position < n) & (slot < count))
            # tree.map, not Batch(...): the stacked mask is 2-D, one row per slot.
            return jax.tree.map(lambda x: x.reshape(capacity, batch_size, *x.shape[1:]), flat)

        # The partial batch's rows become the buffer (rows past `tail` hold padding); once
        # drained they are unspecified, but keeping them makes a split run's state equal an
        # unsplit one's bit for bit.
        buffer = rows_of_batch(whole)[0]
        left = jnp.zeros((), jnp.int32) if flush else tail
        stats = state.stats.add(
            accepted=n,
            batches=count,
            emitted=whole * batch_size + jnp.where(emit_tail, tail, 0),
            padded=jnp.where(emit_tail, batch_size - tail, 0),
            dropped=jnp.where(jnp.array(flush and drop_remainder), tail, 0),
        )
        emissions = Emissions(count=count, batch=batch_fn, stacked=stacked_fn)
        return FixedSizeState(buffer, left, stats), emissions

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed_fn)

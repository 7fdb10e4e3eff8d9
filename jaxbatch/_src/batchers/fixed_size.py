"""`fixed_size`: consecutive elements into batches of `batch_size`, in order.

Data flow (DESIGN.md): `step` writes the element into row `count` of the buffer in the
carry (one in-place `dynamic_update_slice`) and emits the buffer the same step it fills.
`flush` pads the partial buffer with `pad_value` (or drops it). `feed` is the bulk path:
from `count` alone it works out which rows of the incoming stack complete the buffer, which
form whole batches (handed to the consumer as slices of the stack, never copied into the
buffer), and which are left over as the new buffer.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..base import Batcher, Emit, Stats, feed_by_step, row_spec, stack_spec
from ..batch import Batch, rows_mask
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of


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


def _check_pad_value(pad_value: bool | int | float, spec: Element) -> None:
    """Refuse a `pad_value` that a leaf's dtype cannot hold exactly (no silent wrap or cut)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(spec)[0]:
        dtype = np.dtype(leaf.dtype)
        if dtype.kind not in "biu":
            continue
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        if float(pad_value) != int(pad_value) or not low <= pad_value <= high:
            raise ValueError(
                f"`pad_value` {pad_value!r} cannot be stored in leaf "
                f"`element{jax.tree_util.keystr(path)}` of dtype {dtype} (integers in "
                f"[{low}, {high}]); pick a pad value every leaf can hold, such as 0."
            )


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
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    if not isinstance(drop_remainder, bool):
        raise ValueError(f"`drop_remainder` must be a bool, got {drop_remainder!r}.")
    if not isinstance(pad_value, bool | int | float):
        raise ValueError(
            f"`pad_value` must be a Python number (int, float or bool), got {pad_value!r}."
        )
    all_valid = jnp.ones((batch_size,), dtype=bool)

    def init_fn(element_spec: Any, key: Any = None) -> FixedSizeState:
        del key  # deterministic
        spec = spec_of(element_spec)
        _check_pad_value(pad_value, spec)
        buffer = stack_spec(spec, batch_size)
        return FixedSizeState(buffer=buffer, count=jnp.zeros((), jnp.int32), stats=Stats.zeros())

    def step_fn(state: FixedSizeState, element: Any) -> tuple[FixedSizeState, Emit]:
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
        return FixedSizeState(buffer, jnp.where(full, 0, count), stats), emit

    def flush_fn(state: FixedSizeState) -> tuple[FixedSizeState, Emit]:
        n = state.count
        zero = jnp.zeros((), jnp.int32)
        if drop_remainder:
            not_ready = Emit(_as_batch(state.buffer, ~all_valid), jnp.array(False))
            return FixedSizeState(state.buffer, zero, state.stats.add(dropped=n)), not_ready
        rows = jnp.arange(batch_size) < n
        padded = jax.tree.map(
            lambda buf: jnp.where(rows_mask(rows, buf), buf, jnp.asarray(pad_value, buf.dtype)),
            state.buffer,
        )
        ready = n > 0
        stats = state.stats.add(
            emitted=n, batches=ready, padded=jnp.where(ready, batch_size - n, 0)
        )
        return FixedSizeState(state.buffer, zero, stats), Emit(_as_batch(padded, rows), ready)

    def feed_fn(state: FixedSizeState, elements: Any, fn, carry):
        elements = as_element(elements)
        check_against_spec(row_spec(state.buffer), row_spec(elements), what="elements[i]")
        leaves = jax.tree.leaves(elements)
        num = jnp.shape(leaves[0])[0] if leaves else 0
        if num < batch_size:  # at most one batch: nothing to gain from slicing
            return feed_by_step(step_fn)(state, elements, fn, carry)
        r = state.count
        first = (batch_size - r) % batch_size  # elements that complete the partial buffer

        # 1. A partial buffer is completed by the first `batch_size - r` elements.
        def emit_completed(carry):
            take = jnp.arange(batch_size) >= r
            rows = jax.tree.map(
                lambda buf, x: jnp.where(
                    rows_mask(take, buf), jnp.roll(x[:batch_size], r, axis=0), buf
                ),
                state.buffer,
                elements,
            )
            return fn(carry, _as_batch(rows, all_valid))

        carry = jax.lax.cond(r > 0, emit_completed, lambda c: c, carry)

        # 2. Whole batches go to the consumer as slices of the stack: no copy.
        num_whole = (num - first) // batch_size

        def emit_slice(k, carry):
            start = first + k * batch_size
            rows = jax.tree.map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, start, batch_size, axis=0), elements
            )
            return fn(carry, _as_batch(rows, all_valid))

        carry = jax.lax.fori_loop(0, num_whole, emit_slice, carry)

        # 3. The last `tail` elements become the new buffer, in rows [0, tail).
        tail = num - first - num_whole * batch_size
        buffer = jax.tree.map(lambda x: jnp.roll(x[num - batch_size :], tail, axis=0), elements)
        batches = (r > 0).astype(jnp.int32) + num_whole
        stats = state.stats.add(accepted=num, batches=batches, emitted=batches * batch_size)
        return FixedSizeState(buffer, tail, stats), carry

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed_fn)

"""`shuffle`: a shuffle buffer in the carry, then batches of `batch_size` (stochastic).

Data flow (DESIGN.md): the state holds a buffer of `buffer_size` elements, the batch being
built, and the PRNG key. While the buffer fills, `step` writes the element into the next
free slot and emits nothing. Once it is full, `step` draws a slot uniformly, moves the
element there into the next row of the batch being built and writes the incoming element
in its place (one in-place `dynamic_update_slice` each), emitting the batch the step it
fills. At end of stream, `flush` draws the buffered elements without replacement (a
Fisher-Yates draw on slot indices: the drawn slot is filled with the last buffered one), one
batch per call, the last one padded (or dropped and counted with `drop_remainder`).

`buffer_size` trades memory for randomness: an element leaves the buffer after a
geometric number of steps (mean `buffer_size`), so it moves about `0.7 * buffer_size`
positions from where it came in, whatever the stream length; a full permutation of `n`
elements moves each one `n / 3` on average. Measured by `benchmarks/shuffle_quality.py`:
see the table in `shuffle`'s docstring.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, Key

from ..base import Batcher, Emit, Stats, prng_key, row_spec, stack_spec
from ..batch import Batch, rows_mask
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of
from ._checks import flag, pad_number, pad_value_fits, positive_int


class ShuffleState(eqx.Module):
    """State of `shuffle`.

    Attributes:
        buffer: the shuffle buffer, an `Element` with leaves `[buffer_size + 1, ...]`: slots
            `[0, filled)` hold elements, the rest are unspecified (the last row is scratch
            space, through which evicted elements move).
        filled: slots of `buffer` holding an element, in `[0, buffer_size]`.
        batch: the batch being built, an `Element` with leaves `[batch_size, ...]`. Rows at or
            past `count` are unspecified.
        count: rows of `batch` filled so far, in `[0, batch_size)` between calls.
        key: the typed PRNG key (`jax.random.key`), split on every `step` and `flush`.
        stats: the counters (see `Stats`).
    """

    buffer: Element
    filled: Int[Array, ""]
    batch: Element
    count: Int[Array, ""]
    key: Key[Array, ""]
    stats: Stats


def _as_batch(rows: Element, valid_mask: Array) -> Batch:
    return Batch(data=rows.data, valid_mask=valid_mask, states=rows.state, metadata=rows.metadata)


def _read(tree: Element, index: Array | int) -> Element:
    return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False), tree)


def _write(tree: Element, row: Element, index: Array | int) -> Element:
    return jax.tree.map(lambda x, r: jax.lax.dynamic_update_index_in_dim(x, r, index, 0), tree, row)


def _evict(buffer: Element, slot: Array, row: Element) -> tuple[Element, Element]:
    """Put `row` in `slot` of `buffer`; return the new buffer and what `slot` held.

    The evicted row goes through the scratch row at the end of `buffer` (index
    `buffer_size`): every read and write then touches `buffer` alone, which XLA updates in
    place. Reading a slot straight into another array and then writing the slot makes XLA
    copy the whole buffer on every step (measured on CPU: 20x slower at 256 slots of 12 KiB).
    """
    scratch = jax.tree.leaves(buffer)[0].shape[0] - 1 if jax.tree.leaves(buffer) else 0
    buffer = _write(buffer, _read(buffer, slot), scratch)
    buffer = _write(buffer, row, slot)
    return buffer, _read(buffer, scratch)


# Jitted (and module-level) so that an un-jitted `flush` compiles its loop once per shape;
# under an outer `jit` it is inlined.
@jax.jit
def _draw(
    buffer: Element, batch: Element, count: Array, filled: Array, draws: Array
) -> tuple[Element, Element, Array]:
    """Fill rows `[count, count + take)` of `batch` with `take = min(batch_size - count,
    filled)` of the `filled` buffered elements, drawn without replacement (Fisher-Yates on
    slots: each drawn slot takes the last buffered element). One key of `draws` per row."""
    batch_size = draws.shape[0]
    n = count + jnp.minimum(batch_size - count, filled)
    slots = jax.tree.leaves(buffer)[0].shape[0] if jax.tree.leaves(buffer) else 1

    # The draws on slot numbers alone (small ints), then the payload moves in two gathers:
    # moving rows one draw at a time makes XLA copy the whole buffer per draw.
    def draw_row(r, carry):
        where, drawn, left = carry  # where[s]: the buffer row now in slot s
        active = (r >= count) & (r < n)
        slot = jax.random.randint(draws[r], (), 0, jnp.maximum(left, 1))
        last = jnp.maximum(left - 1, 0)
        slot = jnp.where(active, slot, last)  # inactive: a no-op move of `last` onto itself
        drawn = drawn.at[r].set(where[slot])
        where = where.at[slot].set(where[last])  # the last fills the hole
        return where, drawn, left - active.astype(jnp.int32)

    start = (jnp.arange(slots), jnp.zeros(batch_size, jnp.int32), filled)
    where, drawn, left = jax.lax.fori_loop(0, batch_size, draw_row, start)
    rows = jnp.arange(batch_size)
    take = (rows >= count) & (rows < n)  # rows before `count` are real and stay
    batch = jax.tree.map(
        lambda b, x: jnp.where(rows_mask(take, b), jnp.take(x, drawn, axis=0), b), batch, buffer
    )
    buffer = jax.tree.map(lambda x: jnp.take(x, where, axis=0), buffer)
    return buffer, batch, left


# `batch_size`, `buffer_size` and `drop_remainder` are `Any`: they are validated below, so a
# bad value raises the documented `ValueError` even under a run-time type checker.
def shuffle(
    batch_size: Any, buffer_size: Any, *, drop_remainder: Any = False, pad_value: Any = 0
) -> Batcher:
    """Shuffle a stream through a buffer of `buffer_size` elements, then batch it.

    Stochastic: the PRNG key lives in the state, so `init` needs one
    (`batcher.init(spec, key=jax.random.key(0))`). Same key, same order; `jax.vmap` the
    `init` over several keys for independent orders. Every element comes out exactly once
    (or is counted as dropped with `drop_remainder`).

    While the buffer fills, nothing is emitted. Once it is full, each incoming element
    replaces a uniformly chosen slot and the evicted element goes into the batch being
    built, emitted the step it has `batch_size` rows. `flush` drains the buffer in random
    order, one batch per call; the last batch is padded with `pad_value` (`valid_mask` marks
    the real rows) or, with `drop_remainder=True`, dropped and counted.

    `buffer_size` trades memory for randomness: the state holds `buffer_size + 1` elements,
    and an element moves on average about `0.7 * buffer_size` positions from where it came
    in, however long the stream; a full permutation of `n` elements moves one `n / 3`.
    `buffer_size=1` does not shuffle at all. Mean `|output position - input position|` for
    `n = 10_000`, `batch_size = 100`, 8 keys (`benchmarks/shuffle_quality.py`):

    =============  ============  ==================
    buffer_size    displacement  / full permutation
    =============  ============  ==================
    1              0             0
    10             6.9           0.002
    100            72.5          0.022
    1_000          693           0.21
    10_000 (= n)   3_330         1.00
    full perm.     3_337         1 (theory n/3)
    =============  ============  ==================

    So shuffle a stream that is sorted or grouped (by class, by source file) with a buffer
    comparable to the group sizes, or pre-shuffle the file order; a buffer of `n` gives a
    shuffle as strong as a full permutation (its first output waits for all `n` inputs).

    Args:
        batch_size: rows per batch, a positive int.
        buffer_size: elements held in the shuffle buffer, a positive int.
        drop_remainder: drop a final partial batch instead of padding it.
        pad_value: fill for padding rows (a Python scalar), cast to each leaf's dtype; `init`
            raises `ValueError` if an integer or bool leaf cannot hold it exactly.

    Returns:
        A `Batcher` (no bulk `feed`: the drivers step it).

    Raises:
        ValueError: `batch_size` or `buffer_size` not a positive int, `drop_remainder` not a
            bool, `pad_value` not a Python number; at `init`, no `key`.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.shuffle(4, buffer_size=8)
        >>> batches, count = jb.batch_all(batcher, {"x": jnp.arange(10)}, key=jax.random.key(0))
        >>> int(count)
        3
        >>> sorted(batches.data["x"][batches.valid_mask].tolist())
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
        >>> batcher.init({"x": jnp.int32(0)})
        Traceback (most recent call last):
            ...
        ValueError: `shuffle` is stochastic: `init` needs a PRNG key, got `key=None`. ...
    """
    positive_int(batch_size, "batch_size")
    positive_int(buffer_size, "buffer_size")
    flag(drop_remainder, "drop_remainder")
    pad_number(pad_value)

    def init_fn(element_spec: Any, key: Any = None) -> ShuffleState:
        key = prng_key(key, "shuffle")
        spec = spec_of(element_spec)
        pad_value_fits(pad_value, spec)
        zero = jnp.zeros((), jnp.int32)
        return ShuffleState(
            buffer=stack_spec(spec, buffer_size + 1),
            filled=zero,
            batch=stack_spec(spec, batch_size),
            count=zero,
            key=key,
            stats=Stats.zeros(),
        )

    def step_fn(state: ShuffleState, element: Any) -> tuple[ShuffleState, Emit]:
        element = as_element(element)
        check_against_spec(row_spec(state.buffer), element, what="element")
        key, draw = jax.random.split(state.key)
        full = state.filled == buffer_size
        slot = jnp.where(full, jax.random.randint(draw, (), 0, buffer_size), state.filled)
        buffer, evicted = _evict(state.buffer, slot, element)
        # Written whatever `full` says: while filling, row `count` is unspecified anyway.
        batch = _write(state.batch, evicted, state.count)
        count = state.count + full.astype(jnp.int32)
        ready = count == batch_size
        stats = state.stats.add(accepted=1, batches=ready, emitted=jnp.where(ready, batch_size, 0))
        emit = Emit(_as_batch(batch, jnp.broadcast_to(ready, (batch_size,))), ready)
        filled = state.filled + (~full).astype(jnp.int32)
        new = ShuffleState(buffer, filled, batch, jnp.where(ready, 0, count), key, stats)
        return new, emit

    def flush_fn(state: ShuffleState) -> tuple[ShuffleState, Emit]:
        key, draws = jax.random.split(state.key)
        count, filled = state.count, state.filled
        take = jnp.minimum(batch_size - count, filled)  # rows drawn from the buffer
        n = count + take  # valid rows of this batch
        draws = jax.random.split(draws, batch_size)

        buffer, batch, left = _draw(state.buffer, state.batch, count, filled, draws)
        rows = jnp.arange(batch_size) < n
        zero = jnp.zeros((), jnp.int32)
        if drop_remainder:
            ready = n == batch_size
            stats = state.stats.add(
                emitted=jnp.where(ready, n, 0),
                batches=ready,
                dropped=jnp.where(ready, 0, n),
            )
            emit = Emit(_as_batch(batch, rows & ready), ready)
        else:
            ready = n > 0
            padded = jax.tree.map(
                lambda x: jnp.where(rows_mask(rows, x), x, jnp.asarray(pad_value, x.dtype)), batch
            )
            stats = state.stats.add(
                emitted=n, batches=ready, padded=jnp.where(ready, batch_size - n, 0)
            )
            emit = Emit(_as_batch(padded, rows), ready)
        return ShuffleState(buffer, left, batch, zero, key, stats), emit

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)

"""`shuffle`: a shuffle buffer in the carry, then batches of `batch_size` (stochastic).

Data flow (DESIGN.md): the state holds a buffer of `buffer_size` elements, the batch being
built, and the PRNG key. While the buffer fills, `step` writes the element into the next
free slot and emits nothing. Once it is full, `step` draws a slot uniformly, moves the
element there into the next row of the batch being built and writes the incoming element
in its place (one in-place `dynamic_update_slice` each), emitting the batch the step it
fills. At end of stream, `flush` draws the buffered elements without replacement (a
Fisher-Yates draw on slot indices: the drawn slot is filled with the last buffered one), one
batch per call, the last one padded (or dropped and counted with `drop_remainder`).

`feed`, the bulk path, is "plan on metadata, then gather": the randomness depends on the
key and the number of steps and flushes alone, never on the data, so the whole run is
planned on small ints first. Sources are numbered: the state's buffer rows, its batch rows,
then the incoming elements. The key chain (one split per element) is a tight `lax.scan`,
every step's slot draw is made at once (`vmap`), and a `lax.scan` over the elements moves
source numbers only: `source[slot]` (which source each slot holds) and, per element, the
source it evicts. With `flush=True` the drain (`flush` until nothing is ready: the same
keys and the same Fisher-Yates draws, `_draw_slots`) continues the plan, one source per
drawn row. The batches then read off one output stream: the state's partial batch rows, the
evictions in order, then the drained rows, `batch_size` at a time, so `batch(k)` gathers its
rows from the buffer, the batch and the elements (one fused gather per leaf and a `where`,
padding past the end). The new buffer and partial batch are gathered the same way (after a
drain they are unspecified and left as they are). `step`, `flush` and `feed` share the
helpers that draw (`_step_key`, `_random_slot`, `_step_slot`, `_flush_draws`,
`_draw_slots`, `_flush_outcome`), so their keys, draws and counters cannot drift apart.

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

from ..base import (
    Batcher,
    Emissions,
    Emit,
    Stats,
    check_state,
    describe,
    fingerprint,
    own_buffers,
    prng_key,
    row_spec,
    stack_spec,
)
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


# --------------------------------------------------------------------------- the plan
# The random decisions, on scalars and slot numbers only: `step`, `flush` and the bulk
# `feed` all call these, so the three cannot drift apart (same keys, same draws).


# The bulk path's key chain (`n` splits in a row) as a `lax.scan`, unrolled this many times.
# Measured on CPU, 4096 splits: rolled, 0.25 ms on JAX 0.10.2 and 0.4 ms on 0.12.1 but 24 to
# 110 ms on 0.11.1 (its XLA runs the rolled threefry loop ~100x slower, the cause of a 23x
# shuffle); unrolled twice, 1.8 ms on 0.10.2 and 0.11.1 and 0.4 ms on 0.12.1. So: unroll on
# 0.11 only. Either way the keys are the same (`benchmarks/version_sweep.py` watches this).
_CHAIN_UNROLL = 2 if jax.__version_info__[:2] == (0, 11) else 1


def _step_key(key: Key[Array, ""]) -> tuple[Key[Array, ""], Key[Array, ""]]:
    """One `step`'s keys: `(next key, the key of its draw)`."""
    key, draw = jax.random.split(key)
    return key, draw


def _random_slot(draw: Key[Array, ""], buffer_size: int) -> Array:
    """The slot a `step` on a full buffer evicts: uniform over the `buffer_size` slots.
    It depends on the step's key alone, so the bulk path draws all of them at once."""
    return jax.random.randint(draw, (), 0, buffer_size, dtype=jnp.int32)


def _step_slot(random_slot: Array, filled: Array, buffer_size: int) -> tuple[Array, Array]:
    """One `step`'s decision: `(slot, full)`. The element goes into `slot`: the drawn
    `random_slot` once the buffer is `full` (what that slot held is evicted into the
    batch), else the next free slot `filled`."""
    full = filled == buffer_size
    return jnp.where(full, random_slot, filled), full


def _flush_draws(key: Key[Array, ""], batch_size: int) -> tuple[Key[Array, ""], Array]:
    """One `flush`'s keys: `(next key, one key per row of the batch)`."""
    key, draws = jax.random.split(key)
    return key, jax.random.split(draws, batch_size)


def _draw_slots(
    count: Array, filled: Array, draws: Array, slots: int
) -> tuple[Array, Array, Array]:
    """One `flush`'s draws on slot numbers: rows `[count, count + take)` of the batch, with
    `take = min(batch_size - count, filled)`, draw the `filled` buffered slots without
    replacement (Fisher-Yates: each drawn slot takes the last buffered one), one key of
    `draws` per row.

    Returns `(where, drawn, left)`: the new buffer is the old one's rows `where` (`slots`
    of them), batch row `r` in the drawn range is the old buffer's row `drawn[r]`, and
    `left` slots stay filled.
    """
    batch_size = draws.shape[0]
    n = count + jnp.minimum(batch_size - count, filled)
    rows = jnp.arange(batch_size, dtype=jnp.int32)
    active = (rows >= count) & (rows < n)
    # Row `r`'s draw is over the `filled - (r - count)` slots still buffered: known up front,
    # so all the draws are made at once; the loop below moves small ints only.
    left = jnp.maximum(filled - (rows - count), 1)
    picks = jax.vmap(lambda d, m: jax.random.randint(d, (), 0, m, dtype=jnp.int32))(draws, left)

    def draw_row(r, carry):
        where, drawn = carry  # where[s]: the buffer row now in slot s
        last = jnp.where(active[r], left[r] - 1, 0)  # inactive: a no-op move of slot 0
        slot = jnp.where(active[r], picks[r], 0)
        drawn = drawn.at[r].set(where[slot])
        where = where.at[slot].set(where[last])  # the last fills the hole
        return where, drawn

    start = (jnp.arange(slots, dtype=jnp.int32), jnp.zeros(batch_size, jnp.int32))
    where, drawn = jax.lax.fori_loop(0, batch_size, draw_row, start)
    return where, drawn, filled - (n - count)


def _flush_outcome(n: Array, batch_size: int, drop_remainder: bool) -> tuple[Array, dict]:
    """Whether a `flush` whose batch has `n` valid rows emits it, and its `Stats`
    increments: the last partial batch is padded, or dropped and counted."""
    if drop_remainder:
        ready = n == batch_size
        increments = dict(
            emitted=jnp.where(ready, n, 0), batches=ready, dropped=jnp.where(ready, 0, n)
        )
    else:
        ready = n > 0
        increments = dict(emitted=n, batches=ready, padded=jnp.where(ready, batch_size - n, 0))
    return ready, increments


# Jitted (and module-level) so that an un-jitted `flush` compiles its loop once per shape;
# under an outer `jit` it is inlined.
@jax.jit
def _draw(
    buffer: Element, batch: Element, count: Array, filled: Array, draws: Array
) -> tuple[Element, Element, Array]:
    """`_draw_slots`, then the payload: the drawn rows into `batch` (rows before `count`
    stay), the buffer permuted. The draws run on slot numbers alone and the payload moves
    in two gathers: moving rows one draw at a time makes XLA copy the whole buffer per
    draw."""
    batch_size = draws.shape[0]
    n = count + jnp.minimum(batch_size - count, filled)
    slots = jax.tree.leaves(buffer)[0].shape[0] if jax.tree.leaves(buffer) else 1
    where, drawn, left = _draw_slots(count, filled, draws, slots)
    rows = jnp.arange(batch_size, dtype=jnp.int32)
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
        A `Batcher` with a bulk `feed`.

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
    config = describe(
        "shuffle",
        batch_size=batch_size,
        buffer_size=buffer_size,
        drop_remainder=drop_remainder,
        pad_value=pad_value,
    )

    def init_fn(element_spec: Any, key: Any = None) -> ShuffleState:
        key = prng_key(key, "shuffle")
        spec = spec_of(element_spec)
        pad_value_fits(pad_value, spec)
        return ShuffleState(
            buffer=stack_spec(spec, buffer_size + 1),
            filled=jnp.zeros((), jnp.int32),
            batch=stack_spec(spec, batch_size),
            count=jnp.zeros((), jnp.int32),
            key=key,
            stats=Stats.zeros(fingerprint(config, spec)),
        )

    def step_fn(state: ShuffleState, element: Any) -> tuple[ShuffleState, Emit]:
        check_state(state, ShuffleState, config)
        element = as_element(element)
        check_against_spec(row_spec(state.buffer), element, what="element")
        key, draw = _step_key(state.key)
        slot, full = _step_slot(_random_slot(draw, buffer_size), state.filled, buffer_size)
        buffer, evicted = _evict(state.buffer, slot, element)
        # Written whatever `full` says: while filling, row `count` is unspecified anyway.
        batch = _write(state.batch, evicted, state.count)
        count = state.count + full.astype(jnp.int32)
        ready = count == batch_size
        stats = state.stats.add(accepted=1, batches=ready, emitted=jnp.where(ready, batch_size, 0))
        emit = Emit(_as_batch(batch, jnp.broadcast_to(ready, (batch_size,))), ready)
        filled = state.filled + (~full).astype(jnp.int32)
        new = ShuffleState(buffer, filled, batch, jnp.where(ready, 0, count), key, stats)
        return new, own_buffers(emit, new)

    def flush_fn(state: ShuffleState) -> tuple[ShuffleState, Emit]:
        check_state(state, ShuffleState, config)
        key, draws = _flush_draws(state.key, batch_size)
        count, filled = state.count, state.filled
        n = count + jnp.minimum(batch_size - count, filled)  # valid rows of this batch
        buffer, batch, left = _draw(state.buffer, state.batch, count, filled, draws)
        ready, increments = _flush_outcome(n, batch_size, drop_remainder)
        rows = jnp.arange(batch_size, dtype=jnp.int32) < n
        if drop_remainder:
            emit = Emit(_as_batch(batch, rows & ready), ready)
        else:
            padded = jax.tree.map(
                lambda x: jnp.where(rows_mask(rows, x), x, jnp.asarray(pad_value, x.dtype)), batch
            )
            emit = Emit(_as_batch(padded, rows), ready)
        zero = jnp.zeros((), jnp.int32)
        new = ShuffleState(buffer, left, batch, zero, key, state.stats.add(**increments))
        return new, own_buffers(emit, new)

    def feed_fn(
        state: ShuffleState, elements: Any, flush: bool = False
    ) -> tuple[ShuffleState, Emissions]:
        check_state(state, ShuffleState, config)
        elements = as_element(elements)
        check_against_spec(row_spec(state.buffer), row_spec(elements), what="elements[i]")
        leaves = jax.tree.leaves(elements)
        n = jnp.shape(leaves[0])[0] if leaves else 0
        slots = buffer_size + 1
        # Sources, numbered: the state's buffer rows `[0, slots)`, its batch rows
        # `[slots, slots + batch_size)`, then the incoming elements from `stream`.
        stream = slots + batch_size
        zero = jnp.zeros((), jnp.int32)

        # The plan, on scalars: `step`'s decision for every element in turn, on slot
        # numbers. The keys first (a chain of splits), every step's draw at once, then the
        # moves: `source[s]` is the source slot `s` holds, `evicted[i]` the source element
        # `i` evicts (meaningless while the buffer fills).
        key, draws = jax.lax.scan(
            lambda key, _: _step_key(key), state.key, length=n, unroll=_CHAIN_UNROLL
        )
        picks = jax.vmap(lambda draw: _random_slot(draw, buffer_size))(draws)

        def plan_step(carry, x):
            source, filled = carry
            i, pick = x
            slot, full = _step_slot(pick, filled, buffer_size)
            evicted = source[slot]
            source = source.at[slot].set(stream + i)
            return (source, filled + (~full).astype(jnp.int32)), evicted

        start = (jnp.arange(slots, dtype=jnp.int32), state.filled)
        (source, filled), evicted = jax.lax.scan(
            plan_step, start, (jnp.arange(n, dtype=jnp.int32), picks)
        )
        # The output stream, cut into batches: the state's `count` batch rows, the
        # evictions (one per element from element `first` on), then the drain's draws.
        first = jnp.clip(buffer_size - state.filled, 0, n)
        stepped = state.count + (n - first)  # output rows once the elements are in
        whole = stepped // batch_size  # batches the steps emit

        # The drain, as `flush` until it emits nothing: flush `f` is batch `whole + f`,
        # its row `r` (from the partial batch's `count` on) the source `drained[f, r]`.
        drained = jnp.zeros((0, batch_size), jnp.int32)
        ready_flushes, increments, out_end = zero, {}, stepped
        if flush:
            room = (buffer_size + 2 * batch_size - 2) // batch_size + 1  # flushes, at most
            totals = _flush_outcome(zero, batch_size, drop_remainder)[1]
            totals = {name: zero for name in totals}

            def drain_body(carry):
                f, source, key, filled, count, table, totals, _ = carry
                key, draws = _flush_draws(key, batch_size)
                where, drawn, left = _draw_slots(count, filled, draws, slots)
                rows = count + jnp.minimum(batch_size - count, filled)
                ready, more = _flush_outcome(rows, batch_size, drop_remainder)
                table = jax.lax.dynamic_update_index_in_dim(
                    table, source[drawn], jnp.minimum(f, room - 1), 0
                )
                totals = {name: totals[name] + more[name].astype(jnp.int32) for name in totals}
                return f + 1, source[where], key, left, zero, table, totals, ready

            table = jnp.zeros((room, batch_size), jnp.int32)
            carry = (zero, source, key, filled, stepped % batch_size, table, totals)
            f, source, key, left, _, drained, increments, _ = jax.lax.while_loop(
                lambda c: c[-1], drain_body, (*carry, jnp.array(True))
            )
            ready_flushes, out_end = f - 1, stepped + filled
            filled = left
        count = whole + ready_flushes

        def sources_of(k):
            """The source of each row of batch `k` and its place in the output stream."""
            q = k * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
            e = q - state.count  # eviction number
            src = jnp.take(drained, k - whole, axis=0, mode="clip") if flush else q * 0
            if n:
                by_step = jnp.take(evicted, first + e, mode="clip")
                src = jnp.where(e < n - first, by_step, src)
            return jnp.where(e < 0, slots + q, src), q

        def gather(src):
            """Rows `src` of the sources: one gather per source and leaf, and a `where`."""

            def leaf(buf, bat, x):
                out = jnp.take(buf, src, axis=0, mode="clip")
                in_batch = rows_mask((src >= slots) & (src < stream), out)
                out = jnp.where(in_batch, jnp.take(bat, src - slots, axis=0, mode="clip"), out)
                if n:
                    from_stream = jnp.take(x, src - stream, axis=0, mode="clip")
                    out = jnp.where(rows_mask(src >= stream, out), from_stream, out)
                return out

            return jax.tree.map(leaf, state.buffer, state.batch, elements)

        def batch_fn(k):
            src, q = sources_of(k)
            valid = q < out_end  # padding past the end of the output stream
            rows = jax.tree.map(
                lambda x: jnp.where(rows_mask(valid, x), x, jnp.asarray(pad_value, x.dtype)),
                gather(src),
            )
            return _as_batch(rows, valid & (k < count))

        stats = state.stats.add(accepted=n, batches=whole, emitted=whole * batch_size)
        stats = stats.add(**increments)
        if flush:  # drained: the buffer and the batch are unspecified, kept as they are
            new = ShuffleState(state.buffer, filled, state.batch, zero, key, stats)
        else:
            batch = gather(sources_of(whole)[0])
            new = ShuffleState(gather(source), filled, batch, stepped % batch_size, key, stats)
        return new, Emissions(count=count, batch=batch_fn)

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed_fn)

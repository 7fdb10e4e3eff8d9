"""`reshard_pipeline`: continue a pipeline saved on `D` shards (hosts) on another number.

Data flow. Shard `d` of `D` reads global positions `start + p * D + d` for its local
positions `p` (`jb.epochs(num_shards=D, shard_index=d)`); the order turns a global position
into a row on arithmetic alone, the same on every shard and for every `D`. Saved in lockstep
(every shard at the same local position `p`, as synchronous training leaves them), the
shards together have read exactly the global positions before the *cut* `start + p * D`.
What they read but did not emit sits in their batchers' buffers.

Resharding to `D'` shards is then two moves, each exact:

* **The rest of the stream**: every new shard continues the same global order from the cut
  (`OrderState.start`), so shard `e` of `D'` reads `cut + p' * D' + e`.
* **The buffered rows**: each saved state is flushed (its half-filled batches come out as
  they are, payload gathered), and those batches are dealt round-robin to the new shards,
  which hand them to the consumer before their own. Nothing is lost or read twice.

The seed is the saved one (the rest of each epoch follows the same permutation), the new
shards' batchers start empty, and the saved counters go to new shard 0, so the new states'
counters sum to the whole run's.
"""

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from .base import COUNTERS, Batcher, Counter
from .drivers import BatcherRuntimeError, _flush, _max_flushes, _runaway_message
from .pipeline import PipelineState
from .sources import Order, OrderState


def _ints(states: Sequence[PipelineState], get) -> list[Any]:
    return [np.asarray(get(s)).tolist() for s in states]


def reshard_pipeline(
    pipe: Batcher,
    order: Any,  # an `Order`: checked below, with a ValueError
    saved: Sequence[PipelineState],
    state: PipelineState,
) -> tuple[list[Any], PipelineState]:
    """Continue the states of a pipeline saved on `D` shards on this shard of `D'`.

    Call it on every new shard (host) with the `D` saved states (all of them, in shard
    order; `jb.without_data` ones are fine) and a fresh state of this shard's pipeline. It
    returns the batches this shard must consume first (the saved buffers, flushed and dealt
    round-robin: batch `k` of the flushed ones goes to shard `k % D'`), and the state that
    continues the stream. Over all new shards, every element of the stream is batched
    exactly once; the order is fixed by `(D, D', the cut)` and the key.

    Args:
        pipe: this shard's pipeline: `jb.pipeline(data, batcher, order=order, ...)` with the
            stages the saved states were built with.
        order: the order `pipe` was built with (`jb.epochs(num_shards=D', shard_index=e)`, or
            a deterministic `jb.mixture` with them).
        saved: the `D` saved `PipelineState`s, shard `d` at index `d`, all at the same
            local position (saved at the same step).
        state: a fresh state of `pipe` (`pipe.init(jnp.int32(0), key=...)`): its data and
            empty batchers are used; its key is not (the saved seed continues the order).

    Returns:
        `(carried, state)`: a list of `jb.Batch`es to consume before `state`'s stream, and
        the state for `jb.next_positions(state, n)` and the drivers.

    Raises:
        ValueError: `saved` empty, states of another pipeline (their fingerprints are
            named), not all at the same position or with different seeds or counts, or
            `order` not an order.
        BatcherRuntimeError: a saved state's flush did not end (law 3).

    Examples:
        Two shards read 6 positions each of an epoch of 20 rows, then one shard reads the
        other 8:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> data = {"x": jnp.arange(20)}
        >>> def shard(d, n):
        ...     order = jb.epochs(num_shards=n, shard_index=d)
        ...     return jb.pipeline(data, jb.fixed_size(4), order=order), order
        >>> seen, saved = [], []
        >>> for d in range(2):
        ...     pipe, _ = shard(d, 2)
        ...     state = pipe.init(jnp.int32(0), key=jax.random.key(0))
        ...     out, count, state = jb.collect(pipe, state, jb.next_positions(state, 6), 2)
        ...     seen += out.data["x"][:int(count)][out.valid_mask[:int(count)]].tolist()
        ...     saved.append(state)
        >>> pipe, order = shard(0, 1)
        >>> carried, state = jb.reshard_pipeline(
        ...     pipe, order, saved, pipe.init(jnp.int32(0), key=jax.random.key(1)))
        >>> for b in carried:
        ...     seen += b.data["x"][b.valid_mask].tolist()
        >>> out, count, state = jb.collect(pipe, state, jb.next_positions(state, 8), 3,
        ...                                flush=True)
        >>> seen += out.data["x"][:int(count)][out.valid_mask[:int(count)]].tolist()
        >>> sorted(seen) == list(range(20))
        True
    """
    if not isinstance(order, Order):
        raise ValueError(
            f"`order` must be the `jb.epochs(...)` or `jb.mixture(...)` that `pipe` was built "
            f"with, got {type(order).__name__}."
        )
    saved = list(saved)
    if not saved:
        raise ValueError("`saved` is empty: pass the states of every old shard, in shard order.")
    for d, s in enumerate(saved):
        if not isinstance(s, PipelineState):
            raise ValueError(f"`saved[{d}]` is a {type(s).__name__}, not a `jb.PipelineState`.")
        if s.stats.config != state.stats.config:
            raise ValueError(
                f"`saved[{d}]` is a state of another pipeline: it was built by "
                f"{s.stats.config!r}, `state` by {state.stats.config!r}. Build `pipe` with the "
                "saved pipeline's stages and data."
            )
    positions = _ints(saved, lambda s: s.order.position)
    if len(set(positions)) != 1:
        raise ValueError(
            f"The saved shards stand at different local positions {positions}: save every "
            "shard at the same step (synchronous training does), so that together they have "
            "read one prefix of the stream."
        )
    for name, get in (
        ("seed", lambda s: s.seed),
        ("start", lambda s: s.order.start),
        ("counts", lambda s: s.order.counts),
        ("origin", lambda s: s.order.origin),
    ):
        values = _ints(saved, get)
        if any(v != values[0] for v in values):
            raise ValueError(
                f"The saved shards disagree on their order's `{name}` ({values}): they are not "
                "shards of one stream (same key, same deterministic order) saved at one step."
            )
    first = saved[0]
    cut = int(first.order.start) + positions[0] * len(saved)
    if cut >= 2**31:
        raise ValueError(
            f"The stream was cut at global position {cut}, past the int32 positions a "
            "pipeline counts."
        )

    # The buffered rows: flush every saved state (with this shard's data), in shard order.
    flushed, totals = [], {name: Counter.of(0) for name in COUNTERS}
    for d, s in enumerate(saved):
        s = PipelineState(state.data, s.order, s.seed, s.inner, s.then, s.stats)
        bound = _max_flushes((s.inner, s.then))
        for _ in range(bound):
            s, emit = _flush(pipe, s)
            if not bool(emit.ready):
                break
            flushed.append(emit.batch)
        else:
            raise BatcherRuntimeError(
                f"`jb.reshard_pipeline`: flushing `saved[{d}]`: " + _runaway_message(bound)
            )
        totals = {name: totals[name].add(getattr(s.stats, name)) for name in COUNTERS}
    shard, shards = order.shard_index, order.num_shards
    carried = flushed[shard::shards]

    new_order = OrderState(
        position=jnp.zeros_like(first.order.position),
        epoch=jnp.asarray(max(_ints(saved, lambda s: s.order.epoch))).astype(
            first.order.epoch.dtype
        ),
        counts=first.order.counts,
        origin=first.order.origin,
        base=first.order.base,
        weights=first.order.weights,
        start=jnp.asarray(cut, first.order.start.dtype),
    )
    stats = state.stats
    if shard == 0:  # the whole run's counters so far, once over the new shards
        stats = stats.add(**totals)
    return carried, PipelineState(state.data, new_order, first.seed, state.inner, state.then, stats)

"""Orders over random-access data: which source row comes at each stream position.

A pipeline's stream is a sequence of *positions* `0, 1, 2, ...`; an order maps each
position to a row of the data, on small integers alone (DESIGN.md, "Order is metadata"):

* `epochs`: one source read in a new global order every epoch. Position `p` is epoch
  `p // N`, and the row is `permute(key, epoch, p % N, N)`: a keyed bijection of `[0, N)`
  (a Feistel network on `Z_a x Z_b`, `a * b >= N`, with cycle walking), so any position
  is computed on its own in O(1) memory: resuming and dealing to hosts are arithmetic.
* `mixture`: several sources with weights. `schedule="deterministic"` is Grain's
  `MapDataset.mix` schedule (integer proportions, a fixed interleave: `(source, index)`
  from the position alone); `schedule="random"` draws the source with `categorical` on
  `fold_in(key, position)` and takes that source's next row. Every source runs through its
  own epochs, each in a new order. The state keeps per-source counters, so weights can
  change on resume: each source continues from where it stood.

`locate` does the arithmetic for a vector of positions; `OrderState` is the part of a
pipeline's state that says where the stream stands.
"""

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

_ROUNDS = 6  # Feistel rounds (even, so the two moduli end where they started)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- permutation


def _hash32(x: Array) -> Array:
    """A 32-bit integer mixer (an avalanche hash): uint32 in, uint32 out."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _domain(n: int) -> tuple[int, int]:
    """The Feistel domain `Z_a x Z_b` for `[0, n)`: `a * b == n` when `n` has a divisor
    `a` in `[isqrt(n) / 2, isqrt(n)]` (then one pass is the bijection), else the largest
    near-square `a * b < n` (then three overlapping passes, see `_permute`)."""
    r = math.isqrt(n)
    for a in range(r, max(2, (r + 1) // 2) - 1, -1):
        if n % a == 0:
            return a, n // a
    if n <= 2:
        return 1, n
    return r, (n - 1) // r if r * (n // r) == n else n // r


def _feistel(x: Array, keys: Array, a: int, b: int) -> Array:
    """One pass of the Feistel bijection of `[0, a * b)` (uint32 in, uint32 out).

    `(left, right)` in `Z_a x Z_b` becomes `(right, (left + f(right)) mod a)`, now in
    `Z_b x Z_a`; the moduli swap each round, so after an even number of rounds the pair is
    back in `Z_a x Z_b`. The rounds are unrolled: each reduces by a constant modulus (a
    multiply and a shift once compiled), and no loop means no loop to compile.
    """
    ua, ub = jnp.uint32(a), jnp.uint32(b)
    left, right = x // ub, x % ub
    for r in range(_ROUNDS):
        m = ua if r % 2 == 0 else ub  # the modulus of `left` in round r
        f = _hash32(right ^ keys[..., r]) % m
        left, right = right, (left + f) % m
    return left * ub + right


def _round_keys(seed: Array, source: Array, epoch: Array) -> Array:
    """Per-element round keys `[..., _ROUNDS]` from a uint32 seed, the source and the epoch."""
    base = _hash32(seed ^ _hash32(source.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)))
    base = _hash32(base ^ _hash32(epoch.astype(jnp.uint32) + jnp.uint32(0x632BE5AB)))
    # The rounds' keys differ by constants: the round function hashes `right ^ key`, so
    # they need no hash of their own (two hashes per element, not eight).
    rounds = jnp.arange(_ROUNDS, dtype=jnp.uint32) * jnp.uint32(0x85EBCA6B)
    return base[..., None] ^ rounds.reshape((1,) * base.ndim + (_ROUNDS,))


def _permute(index: Array, keys: Array, n: int) -> Array:
    """`index` (in `[0, n)`) through the keyed bijection of `[0, n)`.

    When the Feistel domain is `[0, n)` itself, one pass. Otherwise its domain is
    `[0, m)` with `n - m < isqrt(n)`, and passes with their own keys compose the
    bijection: on `[0, m)`, on `[n - m, n)`, on `[0, m)` again (each leaves the rest in
    place, so each is a bijection of `[0, n)`, and every index moves in at least two);
    nine alternating passes below 64 elements, where three mix a small set poorly.
    A fixed number of passes, where cycle walking needs a data-dependent loop: one
    straight-line program, cheap to compile, the same work on every call.
    """
    a, b = _domain(n)
    m = a * b
    x = index.astype(jnp.uint32)
    if m == n:
        return _feistel(x, keys, a, b).astype(jnp.int32)
    shift = jnp.uint32(n - m)
    passes = 3 if n >= 64 else 9  # a small set mixes poorly in three (e.g. n = 3: 1 x 2)
    for p in range(passes):
        lo = 0 if p % 2 == 0 else n - m
        salt = jnp.uint32((0x27D4EB2F * (p + 1)) & 0xFFFFFFFF)
        pass_keys = keys ^ _hash32(keys[..., :1] ^ salt)  # one hash per pass
        inside = x - jnp.uint32(lo) if lo else x
        moved = _feistel(jnp.minimum(inside, jnp.uint32(m - 1)), pass_keys, a, b)
        moved = moved + shift if lo else moved
        x = jnp.where((x >= lo) & (x < lo + m), moved, x)
    return x.astype(jnp.int32)


def permute(key: Any, epoch: Any, index: Any, num_elements: int) -> Array:
    """Where `index` goes in epoch `epoch`'s order of `[0, num_elements)`: a keyed bijection.

    For a fixed key and epoch, `index -> permute(key, epoch, index, n)` maps `[0, n)` onto
    itself one to one; another epoch gives another order. It is computed for each index on
    its own (O(1) memory, no permuted array), so any position of any epoch is known without
    the ones before it. Works on arrays of indices and epochs (broadcast together).

    Args:
        key: a JAX PRNG key.
        epoch: int32 epoch number(s).
        index: int32 index (or indices) in `[0, num_elements)`.
        num_elements: the size of the set, a positive int below 2**31.

    Returns:
        int32 array of the permuted indices, shaped like `index` and `epoch` broadcast.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> order = jb.permute(jax.random.key(0), 0, jnp.arange(10), 10)
        >>> sorted(order.tolist()) == list(range(10))
        True
    """
    _check_size(num_elements, "num_elements")
    seed = _seed(key)
    epoch, index = jnp.broadcast_arrays(jnp.asarray(epoch, jnp.int32), jnp.asarray(index))
    keys = _round_keys(seed, jnp.zeros_like(epoch), epoch)
    return _permute(index, keys, num_elements)


def _seed(key: Any) -> Array:
    """One uint32 seed word from a PRNG key (typed or raw)."""
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    return jax.random.bits(key, (), jnp.uint32)


def _check_size(n: Any, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= _INT32_MAX:
        raise ValueError(f"`{name}` must be a positive int below 2**31, got {n!r}.")
    return n


# --------------------------------------------------------------------------- orders


class Order(NamedTuple):
    """How a pipeline orders its sources: build one with `epochs` or `mixture`.

    Attributes:
        kind: `"epochs"` (one source) or `"mixture"`.
        weights: the sources' weights (floats, normalised to sum 1).
        schedule: `"deterministic"` or `"random"` (a mixture's source choice).
        shuffle: a new global order each epoch (False: rows in order).
        num_epochs: for `epochs`, the number of epochs (None: unbounded).
        num_shards: hosts (or any shards) sharing the stream; position `p` of shard `s` is
            global position `p * num_shards + s`.
        shard_index: this shard, in `[0, num_shards)`.
    """

    kind: str
    weights: tuple[float, ...]
    schedule: str
    shuffle: bool
    num_epochs: int | None
    num_shards: int
    shard_index: int


def _check_shards(num_shards: Any, shard_index: Any) -> None:
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be a positive int, got {num_shards!r}.")
    if (
        isinstance(shard_index, bool)
        or not isinstance(shard_index, int)
        or not 0 <= shard_index < num_shards
    ):
        raise ValueError(
            f"`shard_index` must be an int in [0, {num_shards}) (`num_shards` is "
            f"{num_shards}), got {shard_index!r}."
        )


def epochs(
    *, shuffle: Any = True, num_epochs: Any = None, num_shards: Any = 1, shard_index: Any = 0
) -> Order:
    """One source, read in a new global order every epoch (or in order, `shuffle=False`).

    Position `p` (global: `p * num_shards + shard_index`) is epoch `p // N` of the `N`
    rows, and row `jb.permute(key, epoch, p % N, N)`: every row exactly once per epoch.
    With `num_shards`, shard `s` reads global positions `s, s + num_shards, ...`: the
    shards together read every row once per epoch, and each computes its share alone.

    Args:
        shuffle: a new order each epoch (needs a key at `init`); False reads rows in order.
        num_epochs: epochs to read, a positive int, or None for unbounded. Positions past
            the last epoch are skipped (counted, never batched).
        num_shards: how many shards (hosts) share the stream.
        shard_index: this shard.

    Returns:
        An `Order` for `jb.pipeline`.

    Raises:
        ValueError: `shuffle` not a bool, `num_epochs` below 1, bad shards.

    Examples:
        >>> import jaxbatch as jb
        >>> jb.epochs(num_epochs=2).num_epochs
        2
    """
    if not isinstance(shuffle, bool):
        raise ValueError(f"`shuffle` must be a bool, got {shuffle!r}.")
    if num_epochs is not None and (
        isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1
    ):
        raise ValueError(
            f"`num_epochs` must be a positive int (or None for unbounded), got {num_epochs!r}."
        )
    _check_shards(num_shards, shard_index)
    return Order("epochs", (1.0,), "deterministic", shuffle, num_epochs, num_shards, shard_index)


def mixture(
    weights: Any,
    *,
    schedule: Any = "deterministic",
    shuffle: Any = True,
    num_shards: Any = 1,
    shard_index: Any = 0,
) -> Order:
    """Several sources mixed by weight; each source runs through its own shuffled epochs.

    `schedule="deterministic"` follows Grain 0.2.18's `MapDataset.mix`: the weights become
    integer proportions (scaled so the smallest is 100, then cut to int) and position `k`
    goes to source and index exactly as Grain's selection map says; within each pass over
    a source nothing repeats. `schedule="random"` draws the source of position `p` with
    `jax.random.categorical(fold_in(key, p), log(weights))` and takes that source's next
    row (not shardable: a source's next row depends on all earlier draws).

    The stream is unbounded: a source that runs out starts its next epoch, in a new order.
    The state counts what each source gave; a pipeline built with other weights continues
    a saved state with each source where it stood.

    Args:
        weights: one positive, finite weight per source (a sequence of numbers).
        schedule: `"deterministic"` or `"random"`.
        shuffle: a new order for each source's every epoch.
        num_shards: shards (hosts) sharing the stream (deterministic schedule only).
        shard_index: this shard.

    Returns:
        An `Order` for `jb.pipeline`, whose `data` is then a list of sources.

    Raises:
        ValueError: weights empty, negative, all zero, NaN or infinite; a bad schedule.

    Examples:
        >>> import jaxbatch as jb
        >>> jb.mixture([3, 1]).weights
        (0.75, 0.25)
    """
    if isinstance(weights, str) or not isinstance(weights, Sequence | np.ndarray):
        raise ValueError(f"`weights` must be a sequence of numbers, got {weights!r}.")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, int | float | np.number):
            raise ValueError(f"`weights[{i}]` must be a number, got {w!r}.")
        if not math.isfinite(float(w)) or float(w) < 0:
            raise ValueError(
                f"`weights[{i}]` must be a finite number >= 0, got {w!r}; weights say how "
                "often each source is drawn."
            )
        values.append(float(w))
    if not values or sum(values) <= 0:
        raise ValueError(f"`weights` must hold at least one positive weight, got {weights!r}.")
    if schedule not in ("deterministic", "random"):
        raise ValueError(f"`schedule` must be 'deterministic' or 'random', got {schedule!r}.")
    if schedule == "deterministic" and min(values) <= 0:
        raise ValueError(
            f"`weights` must all be positive for `schedule='deterministic'` (Grain's mix "
            f"refuses zero proportions), got {weights!r}; drop the source instead."
        )
    if not isinstance(shuffle, bool):
        raise ValueError(f"`shuffle` must be a bool, got {shuffle!r}.")
    _check_shards(num_shards, shard_index)
    if schedule == "random" and num_shards > 1:
        raise ValueError(
            "`schedule='random'` cannot be sharded (`num_shards` > 1): a source's next row "
            "depends on every earlier draw. Use `schedule='deterministic'`, or shard each "
            "source."
        )
    total = sum(values)
    return Order(
        "mixture",
        tuple(w / total for w in values),
        schedule,
        shuffle,
        None,
        num_shards,
        shard_index,
    )


def grain_proportions(weights: Sequence[float]) -> tuple[int, ...]:
    """Grain's integer proportions of `weights` (smallest scaled to 100, cut to int)."""
    scale = 100 / min(weights)
    return tuple(int(w * scale) for w in weights)


class _Schedule(NamedTuple):
    """A deterministic schedule's period: the source and in-source index of each slot,
    and the per-source counts before each slot (`[period + 1, sources]`)."""

    period: int
    proportions: tuple[int, ...]
    source: np.ndarray
    index: np.ndarray
    before: np.ndarray


def _schedule(weights: tuple[float, ...]) -> _Schedule:
    props = grain_proportions(weights)
    # Grain's selection depends on the proportions' ratios only, so dividing them by their
    # common factor keeps the schedule and shortens its period.
    g = math.gcd(*props)
    props = tuple(p // g for p in props)
    period = sum(props)
    source = np.zeros(period, np.int32)
    index = np.zeros(period, np.int32)
    for k in range(period):  # Grain's `_dataset_and_key_of_next_element`, slot by slot
        remaining, cur, nxt = period, k, k + 1
        for i, p in enumerate(props):
            next_k, next_k1 = (
                (cur * (remaining - p)) // remaining,
                (nxt * (remaining - p)) // remaining,
            )
            count = nxt - next_k1
            if cur - next_k != count:
                source[k], index[k] = i, count - 1
                break
            remaining, cur, nxt = remaining - p, next_k, next_k1
    before = np.zeros((period + 1, len(props)), np.int32)
    for k in range(period):
        before[k + 1] = before[k]
        before[k + 1, source[k]] += 1
    return _Schedule(period, props, source, index, before)


class OrderState(eqx.Module):
    """Where a pipeline's stream stands (part of `PipelineState`).

    Attributes:
        position: the next position (one past the last position taken; local to the shard).
        epoch: the highest epoch reached (for a mixture, over all sources).
        counts: `[sources]` int32, rows each source has given before global position
            `position * num_shards` (deterministic) or so far (random).
        origin: the global position where the current weights took effect.
        base: `[sources]` int32, each source's count at `origin`.
        weights: `[sources]` float32, the weights in use (a pipeline built with other
            weights re-anchors `origin` and `base` at the state's position).
        start: the global position of local position 0: 0, or where `jb.reshard_pipeline`
            cut the stream to continue it on another number of shards.
    """

    position: Int[Array, ""]
    epoch: Int[Array, ""]
    counts: Int[Array, " sources"]
    origin: Int[Array, ""]
    base: Int[Array, " sources"]
    weights: Float[Array, " sources"]
    start: Int[Array, ""]


def init_order(order: Order) -> OrderState:
    """The order state at the start of the stream."""
    s = len(order.weights)

    def zero():  # a buffer per field: a state donated to a jitted call shares none
        return jnp.zeros((), jnp.int32)

    def zeros():
        return jnp.zeros((s,), jnp.int32)

    weights = jnp.asarray(order.weights, jnp.float32)
    return OrderState(zero(), zero(), zeros(), zero(), zeros(), weights, zero())


class Located(NamedTuple):
    """Rows of the concatenated sources for a vector of positions."""

    row: Int[Array, " n"]
    source: Int[Array, " n"]
    epoch: Int[Array, " n"]
    valid: Bool[Array, " n"]


def make_locate(order: Order, sizes: tuple[int, ...]):
    """`locate(state, seed, positions) -> (Located, new_state)` for `order` over sources
    of `sizes` rows (concatenated in that order)."""
    h, s_index = order.num_shards, order.shard_index
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    deterministic = order.schedule == "deterministic"
    sched = _schedule(order.weights) if deterministic else None
    weights = jnp.asarray(order.weights, jnp.float32)
    logits = jnp.log(weights)
    num_sources = len(sizes)
    # Positions are int32: position `p` needs `(p + 1) * num_shards` to fit (the global
    # position and the next one), so the stream holds `limit` positions; past it, an error.
    limit = _INT32_MAX // h
    total = None if order.num_epochs is None else min(order.num_epochs * sizes[0], _INT32_MAX)

    past_int32 = (
        f"A stream position outside [0, {limit}): positions are int32, so a pipeline's stream "
        f"holds at most {limit} of them"
        + (f" per shard (`num_shards`={h})" if h > 1 else "")
        + " (a position past the end wraps to a negative one). Start a new stream before the "
        "limit: a fresh `pipe.init(jnp.int32(0), key=...)` with another key (its epochs count "
        "from 0 again, in new orders)."
    )

    def rows_of(source, j, seed):
        """Row of the `j`-th draw from `source` (its epoch `j // size`, in that epoch's order)."""
        if num_sources == 1:
            epoch, within = j // sizes[0], j % sizes[0]
            if order.shuffle:
                within = _permute(within, _round_keys(seed, source, epoch), sizes[0])
            return within, epoch
        size = jnp.asarray(sizes, jnp.int32)[source]
        epoch, within = j // size, j % size
        if order.shuffle:
            keys = _round_keys(seed, source, epoch)
            # Each source has its own size: permute under each and pick (few sources).
            within = jnp.select(
                [source == d for d in range(num_sources)],
                [_permute(jnp.minimum(within, n - 1), keys, n) for n in sizes],
                within,
            )
        return jnp.asarray(offsets)[source] + within, epoch

    def locate_epochs(
        state: OrderState, seed: Array, positions: Array
    ) -> tuple[Located, OrderState]:
        """`locate` for one source read epoch after epoch: the draw is the global position
        (its weights never change), and the counters need one reduction, not four."""
        positions = positions.astype(jnp.int32)
        room = (_INT32_MAX - state.start) // h  # `limit`, less the positions before a reshard's cut
        positions = eqx.error_if(positions, (positions < 0) | (positions >= room), past_int32)
        g = state.start + positions * h + s_index  # global positions
        valid = jnp.ones(positions.shape, bool) if total is None else g < total
        j = state.base[0] + jnp.maximum(g - state.origin, 0)
        row, epoch = rows_of(jnp.zeros_like(j), j, seed)
        # The epoch grows with the position: the last epoch reached is the last valid one's.
        low = jnp.iinfo(jnp.int32).min
        if total is None:
            top = last = jnp.max(positions, initial=low)
        else:
            both = jnp.stack([positions, jnp.where(valid, positions, low)])
            top, last = jnp.max(both, axis=1, initial=low)
        reached = (
            state.base[0] + jnp.maximum(state.start + last * h + s_index - state.origin, 0)
        ) // sizes[0]
        nxt = jnp.maximum(state.position, jnp.maximum(top, -1) + 1)
        new = OrderState(
            position=nxt.astype(jnp.int32),
            epoch=jnp.maximum(state.epoch, jnp.where(last > low, reached, 0)).astype(jnp.int32),
            counts=(state.base + jnp.maximum(state.start + nxt * h - state.origin, 0)).astype(
                jnp.int32
            ),
            origin=state.origin,
            base=state.base,
            weights=weights,
            start=state.start,
        )
        return Located(row, jnp.zeros_like(row), epoch, valid), new

    def locate(state: OrderState, seed: Array, positions: Array) -> tuple[Located, OrderState]:
        positions = positions.astype(jnp.int32)
        room = (_INT32_MAX - state.start) // h  # `limit`, less the positions before a reshard's cut
        positions = eqx.error_if(positions, (positions < 0) | (positions >= room), past_int32)
        # Weights other than the state's: re-anchor the schedule at the state's position,
        # each source continuing from its count there.
        changed = jnp.any(state.weights != weights)
        origin = jnp.where(changed, state.start + state.position * h, state.origin)
        base = jnp.where(changed, state.counts, state.base)
        g = state.start + positions * h + s_index  # global positions
        # Only a bounded order has positions to skip: those past its last epoch.
        valid = jnp.ones(positions.shape, bool) if total is None else g < total
        nxt = jnp.maximum(state.position, jnp.max(positions + 1, initial=0))
        if deterministic:
            props = jnp.asarray(sched.proportions, jnp.int32)
            k = jnp.maximum(g - origin, 0)
            q, r = k // sched.period, k % sched.period
            source = jnp.asarray(sched.source)[r]
            j = base[source] + q * props[source] + jnp.asarray(sched.index)[r]
            kk = jnp.maximum(state.start + nxt * h - origin, 0)
            before = jnp.asarray(sched.before)[kk % sched.period]
            counts = base + (kk // sched.period) * props + before
        else:
            key = seed_key(seed)
            source = jax.vmap(lambda p: jax.random.categorical(jax.random.fold_in(key, p), logits))(
                g
            ).astype(jnp.int32)
            onehot = (
                (source[:, None] == jnp.arange(num_sources, dtype=jnp.int32)[None, :])
                & valid[:, None]
            ).astype(jnp.int32)
            before = jnp.cumsum(onehot, axis=0, dtype=jnp.int32) - onehot
            j = state.counts[source] + jnp.take_along_axis(before, source[:, None], 1)[:, 0]
            counts = state.counts + jnp.sum(onehot, axis=0, dtype=jnp.int32)
        row, epoch = rows_of(source, jnp.maximum(j, 0), seed)
        new = OrderState(
            position=nxt.astype(jnp.int32),
            epoch=jnp.maximum(state.epoch, jnp.max(jnp.where(valid, epoch, 0), initial=0)),
            counts=counts.astype(jnp.int32),
            origin=origin.astype(jnp.int32),
            base=base.astype(jnp.int32),
            weights=weights,
            start=state.start,
        )
        return Located(row, source, epoch, valid), new

    return locate_epochs if order.kind == "epochs" else locate


def seed_key(seed: Array) -> Array:
    """A typed PRNG key from a uint32 seed word (for the random schedule's draws)."""
    return jax.random.wrap_key_data(jnp.stack([jnp.uint32(0x5EED), seed]), impl="threefry2x32")


def order_seed(key: Any) -> Array:
    """The uint32 seed word an order draws from, derived from a pipeline's `init` key."""
    return jax.random.bits(jax.random.fold_in(key, 0), (), jnp.uint32)


def order_rows(order: Order, sizes: Any, key: Any, positions: Any) -> Located:
    """The rows that stream positions read, from the start of the stream: what a
    `jb.pipeline` built with `order` over sources of `sizes` rows reads (the same key).

    For multi-host training, each host's share of an epoch is this with its own
    `jb.epochs(num_shards=..., shard_index=...)`. Rows index the sources concatenated in
    order (source `s` starts at `sum(sizes[:s])`).

    Args:
        order: `jb.epochs(...)` or `jb.mixture(...)`.
        sizes: rows of each source (an int for one source).
        key: the PRNG key given to the pipeline's `init` (None when nothing is random).
        positions: int32 positions from the start of the stream, in order.

    Returns:
        `Located(row, source, epoch, valid)`, each `[len(positions)]`.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> where = jb.order_rows(jb.epochs(num_epochs=1), 4, jax.random.key(0), jnp.arange(5))
        >>> sorted(where.row[:4].tolist()), where.valid.tolist()
        ([0, 1, 2, 3], [True, True, True, True, False])
    """
    sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    for s in sizes:
        _check_size(s, "sizes")
    seed = jnp.uint32(0) if key is None else order_seed(key)
    locate = make_locate(order, sizes)
    return locate(init_order(order), seed, jnp.asarray(positions, jnp.int32))[0]

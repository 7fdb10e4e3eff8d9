"""Batchers built from batchers: `map_elements`, `filter_elements`, `with_statistics`.

A combinator takes a `Batcher` and returns a `Batcher` like any other: its state is an
`eqx.Module` holding the inner batcher's state (field `inner`) and its own `stats`, so it
checkpoints, `vmap`s, resumes and nests (`with_statistics(filter_elements(map_elements(...)))`).

The counters: the combinator's `stats` are the ones that count (`jb.operation_stats` reads
them). After every call the inner state's counters have moved by some increments (below
2**32 per call); those are added to the outer `stats` (with `uint32` arithmetic, exact for any
increment below 2**32), plus the combinator's own (elements a filter refused are `skipped`).
So `accepted == emitted + dropped + buffered` holds for the outer counters as for the inner,
and an outer counter started anywhere (a checkpoint, law 7's `2**32 - 2`) keeps counting.

The input spec: a combinator remembers the spec its `init` was given as a zero-row
`Element` (every leaf `[0, ...]`, no bytes), so `step` can check elements against it
(`TypeError` naming the leaf) before `fn` or `predicate` sees them, and so it travels in
checkpoints and under `vmap` like any other leaf.

Statistics and "None" under `jit`: a pure function cannot return `None` only sometimes, so
a `StatisticsState` holds the statistics tree always, plus `has_stats` (scalar bool). After
`reset_statistics` (or before the first ready batch without `initial`) `has_stats` is False
and the tree holds the empty value (`stats_fn.init`'s: for `running_moments`, count 0): that
is what the seed's `None` is here. Read it with `has_statistics(state)`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, PyTree

from .base import (
    COUNTERS,
    Batcher,
    Counter,
    Emissions,
    Emit,
    State,
    Stats,
    check_state,
    describe,
    fingerprint,
    row_spec,
    stack_spec,
)
from .batch import Batch, rows_mask
from .element import Element, as_element
from .spec import check_against_spec, element_spec as spec_of

_COUNTERS = COUNTERS


# --------------------------------------------------------------------------- helpers


def _check_batcher(batcher: Any, name: str = "batcher") -> None:
    if not isinstance(batcher, Batcher):
        raise ValueError(f"`{name}` must be a `jb.Batcher`, got {type(batcher).__name__}.")


def _check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise ValueError(f"`{name}` must be a callable taking an `Element`, got {fn!r}.")


def _advance(stats: Stats, before: Stats, after: Stats, **extra: Any) -> Stats:
    """`stats` advanced by how far the inner counters moved from `before` to `after` (exact:
    a 64-bit difference, however large one call's increment), plus `extra` increments."""
    increments = {}
    for name in _COUNTERS:
        a, b = getattr(after, name), getattr(before, name)
        borrow = (a.lo < b.lo).astype(jnp.uint32)
        moved = Counter(lo=a.lo - b.lo, hi=a.hi - b.hi - borrow)
        increments[name] = moved.add(extra[name]) if name in extra else moved
    return stats.add(**increments)


def _witness(spec: Element) -> Element:
    """The spec as a zero-row Element (leaves `[0, ...]`): a spec that lives in the state."""
    return stack_spec(spec, 0)


def _not_ready_like(emit: Emit) -> Emit:
    """An `Emit` shaped like `emit` (shapes only) that is not ready: all masks False."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), emit)


def _map_element(fn: Callable[[Element], Any], element: Element) -> Element:
    return as_element(fn(element))


# --------------------------------------------------------------------------- map


class MapState(eqx.Module):
    """State of `map_elements`.

    Attributes:
        inner: the inner batcher's state (its `stats` keep counting too; the ones that
            count are `stats`).
        spec: the input element spec as a zero-row `Element` (every leaf `[0, ...]`).
        stats: the counters (see `jb.Stats`).
    """

    inner: Any
    spec: Element
    stats: Stats


def map_elements(batcher: Any, fn: Any) -> Batcher:
    """Apply `fn` to each element before `batcher` sees it.

    `fn` receives the `Element` (a plain tree is wrapped as `Element(data=tree)`) and returns
    an `Element` or a PyTree of arrays (wrapped likewise); it must be a pure JAX function
    whose output has one structure, shape and dtype for the element spec. The inner batcher
    is initialised with the spec of `fn`'s output (`jax.eval_shape`). Elements are checked
    against the input spec before `fn` sees them (`TypeError` naming the leaf).

    Counters are the inner batcher's: every element is `applied`. When the inner batcher has
    a bulk `feed`, so does this one (`jax.vmap(fn)` over the chunk, then the inner `feed`).

    Args:
        batcher: the inner `Batcher`.
        fn: `fn(element: Element) -> Element | PyTree`.

    Returns:
        A `Batcher` whose state is a `MapState`.

    Raises:
        ValueError: `batcher` not a `jb.Batcher` or `fn` not callable.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> double = jb.map_elements(jb.fixed_size(2), lambda e: {"x": e.data["x"] * 2})
        >>> batches, count = jb.batch_all(double, {"x": jnp.arange(4)}, max_batches=2)
        >>> batches.data["x"]
        Array([[0, 2],
               [4, 6]], dtype=int32)
    """
    _check_batcher(batcher)
    _check_callable(fn, "fn")
    config = describe("map_elements", fn=fn)

    def init_fn(element_spec: Any, key: Any = None) -> MapState:
        spec = spec_of(element_spec)
        mapped = jax.eval_shape(lambda e: _map_element(fn, e), spec)
        return MapState(
            inner=batcher.init(mapped, key=key),
            spec=_witness(spec),
            stats=Stats.zeros(fingerprint(config, spec)),
        )

    def step_fn(state: MapState, element: Any) -> tuple[MapState, Emit]:
        check_state(state, MapState, config)
        element = as_element(element)
        check_against_spec(row_spec(state.spec), element, what="element")
        inner, emit = batcher.step(state.inner, _map_element(fn, element))
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        return MapState(inner, state.spec, stats), emit

    def flush_fn(state: MapState) -> tuple[MapState, Emit]:
        check_state(state, MapState, config)
        inner, emit = batcher.flush(state.inner)
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        return MapState(inner, state.spec, stats), emit

    def feed_fn(state: MapState, elements: Any, flush: bool = False) -> tuple[MapState, Emissions]:
        check_state(state, MapState, config)
        elements = as_element(elements)
        check_against_spec(row_spec(state.spec), row_spec(elements), what="elements[i]")
        mapped = jax.vmap(lambda e: _map_element(fn, e))(elements)
        inner, emissions = batcher.feed(state.inner, mapped, flush)
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        return MapState(inner, state.spec, stats), emissions

    feed = feed_fn if batcher.feed is not None else None
    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed)


# --------------------------------------------------------------------------- filter


class FilterState(eqx.Module):
    """State of `filter_elements`.

    Attributes:
        inner: the inner batcher's state.
        spec: the element spec as a zero-row `Element` (every leaf `[0, ...]`).
        stats: the counters: refused elements are `skipped`, the rest are the inner
            batcher's.
    """

    inner: Any
    spec: Element
    stats: Stats


def filter_elements(batcher: Any, predicate: Any) -> Batcher:
    """Pass to `batcher` only the elements for which `predicate(element)` is True.

    `predicate` receives the `Element` (a plain tree is wrapped as `Element(data=tree)`) and
    returns a scalar bool array (traced: a value-dependent decision, taken with `lax.cond`).
    A refused element is never buffered: it is counted in
    `jb.operation_stats(state)["skipped_count"]` and the step emits nothing; an accepted one
    is stepped into `batcher` and counted in `applied_count`. The order of the elements
    kept is unchanged.

    No bulk `feed` (which elements survive is only known at run time): the drivers step.

    Args:
        batcher: the inner `Batcher`.
        predicate: `predicate(element: Element) -> Bool[Array, ""]`.

    Returns:
        A `Batcher` whose state is a `FilterState`.

    Raises:
        ValueError: `batcher` not a `jb.Batcher` or `predicate` not callable.
        TypeError: (at trace time) `predicate` returns anything but a scalar bool.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> even = jb.filter_elements(jb.fixed_size(2), lambda e: e.data["x"] % 2 == 0)
        >>> batches, count = jb.batch_all(even, {"x": jnp.arange(5)}, max_batches=2)
        >>> int(count), batches.data["x"][:2], batches.valid_mask[:2]
        (2, Array([[0, 2],
               [4, 0]], dtype=int32), Array([[ True,  True],
               [ True, False]], dtype=bool))
    """
    _check_batcher(batcher)
    _check_callable(predicate, "predicate")
    config = describe("filter_elements", predicate=predicate)

    # The branches are built once, so that even eager (un-jitted) calls hit `cond`'s cache.
    def take(inner: Any, element: Element) -> tuple[Any, Emit]:
        return batcher.step(inner, element)

    def refuse(inner: Any, element: Element) -> tuple[Any, Emit]:
        return inner, _not_ready_like(jax.eval_shape(batcher.step, inner, element)[1])

    def init_fn(element_spec: Any, key: Any = None) -> FilterState:
        spec = spec_of(element_spec)
        return FilterState(
            inner=batcher.init(spec, key=key),
            spec=_witness(spec),
            stats=Stats.zeros(fingerprint(config, spec)),
        )

    def step_fn(state: FilterState, element: Any) -> tuple[FilterState, Emit]:
        check_state(state, FilterState, config)
        element = as_element(element)
        check_against_spec(row_spec(state.spec), element, what="element")
        keep = predicate(element)
        shape, dtype = jnp.shape(keep), jnp.result_type(keep)
        if shape != () or dtype != jnp.bool_:
            raise TypeError(
                f"`predicate` must return a scalar bool array, got shape {shape} and dtype "
                f"{dtype}; reduce it (e.g. `jnp.all(...)`) or compare (`x > 0`)."
            )
        inner, emit = jax.lax.cond(keep, take, refuse, state.inner, element)
        stats = _advance(state.stats, state.inner.stats, inner.stats, skipped=~keep)
        return FilterState(inner, state.spec, stats), emit

    def flush_fn(state: FilterState) -> tuple[FilterState, Emit]:
        check_state(state, FilterState, config)
        inner, emit = batcher.flush(state.inner)
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        return FilterState(inner, state.spec, stats), emit

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)


# --------------------------------------------------------------------------- statistics


class StatsFn(NamedTuple):
    """How `with_statistics` keeps statistics: `init` and `update`, like an optax transform.

    Attributes:
        init: `init(batch_spec) -> statistics`: the empty statistics for batches shaped like
            `batch_spec` (a `Batch` of `jax.ShapeDtypeStruct`s). Also the value after
            `reset_statistics`.
        update: `update(statistics, batch) -> statistics`: fold one ready batch in (same
            structure, shapes and dtypes out as in). Only valid rows should count.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> rows_seen = jb.StatsFn(
        ...     init=lambda spec: jnp.zeros((), jnp.int32),
        ...     update=lambda total, batch: total + batch.num_valid,
        ... )
        >>> batcher = jb.with_statistics(jb.fixed_size(2), rows_seen)
        >>> state = batcher.init({"x": jnp.zeros((), jnp.int32)})
        >>> _, _, state = jb.collect(batcher, state, {"x": jnp.arange(5)}, 3, flush=True)
        >>> int(jb.get_statistics(state))
        5
    """

    init: Callable[[Any], PyTree]
    update: Callable[[PyTree, Any], PyTree]


class Moments(eqx.Module):
    """Running count, mean and sum of squared deviations (M2) per leaf, over valid rows.

    Every leaf of `batch.data` has its moments per feature (the batch axis reduced: shape
    `leaf.shape[1:]`), in float32 (float64 leaves stay float64). The mean is kept as
    `shift + offset`: `shift` is fixed at the first batch (its mean), and only the small
    `offset` moves, so a large constant (1e4 + noise) costs no precision in float32. The count
    is a `Counter` (exact past 2**32 rows).

    Attributes:
        count: rows folded in.
        shift: per-leaf reference point (the first batch's mean).
        offset: per-leaf `mean - shift`.
        m2: per-leaf sum of squared deviations from the mean.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> m = jb.Moments.of({"x": jnp.float32(2.0)}, {"x": jnp.float32(0.25)}, count=4)
        >>> int(m.count), m.mean["x"], m.variance()["x"]
        (4, Array(2., dtype=float32), Array(0.25, dtype=float32))
    """

    count: Counter
    shift: PyTree
    offset: PyTree
    m2: PyTree

    @classmethod
    def of(cls, mean: PyTree, variance: PyTree, count: int = 1) -> "Moments":
        """Moments from a known mean and (population) variance, as if from `count` rows.

        Use it for `with_statistics(..., initial=...)` with precomputed statistics.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"`count` must be a non-negative int, got {count!r}.")
        mean = jax.tree.map(jnp.asarray, mean)
        m2 = jax.tree.map(lambda v, m: jnp.asarray(v, m.dtype) * count, variance, mean)
        return cls(Counter.of(count), mean, jax.tree.map(jnp.zeros_like, mean), m2)

    @property
    def mean(self) -> PyTree:
        """Per-leaf running mean (`shift + offset`)."""
        return jax.tree.map(jnp.add, self.shift, self.offset)

    def variance(self, ddof: int = 0) -> PyTree:
        """Per-leaf variance `m2 / (count - ddof)`; NaN while `count <= ddof`.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> jb.Moments.of({"x": jnp.float32(0)}, {"x": jnp.float32(2)}, count=2).variance(1)
            {'x': Array(4., dtype=float32)}
        """
        n = _as_float(self.count)

        def leaf(m2: Array) -> Array:
            denominator = (n - ddof).astype(m2.dtype)
            return jnp.where(denominator > 0, m2 / jnp.maximum(denominator, 1), jnp.nan)

        return jax.tree.map(leaf, self.m2)


def _as_float(count: Counter) -> Array:
    return count.hi.astype(jnp.float32) * np.float32(2.0**32) + count.lo.astype(jnp.float32)


def _moments_dtype(dtype: Any) -> Any:
    return dtype if dtype == jnp.float64 else jnp.float32


def _require_batch(batch: Any) -> Batch:
    if not isinstance(batch, Batch):
        raise TypeError(
            f"`running_moments` reads one `jb.Batch`, but the batcher emits a "
            f"{type(batch).__name__}; pass a `stats_fn` that handles it (see `jb.StatsFn`)."
        )
    return batch


def running_moments() -> StatsFn:
    """The default `stats_fn` of `with_statistics`: running mean and variance per leaf.

    Over the valid rows of every ready batch, per leaf of `batch.data` and per feature (the
    batch axis reduced). The first batch fixes a shift (its mean); every batch's count,
    mean and M2 of the shifted rows are computed in the batch, then merged into the running
    ones with Chan et al.'s parallel update (`delta = mean_b - mean_a`,
    `mean += delta * n_b / n`, `m2 += m2_b + delta**2 * n_a * n_b / n`). Never a sum of
    squares, and the shift keeps the running mean small, so a large offset (1e4 + noise)
    neither cancels nor drifts in float32. Padding rows never count.

    Returns:
        A `StatsFn` whose statistics are `Moments`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.with_statistics(jb.fixed_size(2), jb.running_moments())
        >>> xs = {"x": jnp.array([1.0, 2.0, 3.0, 6.0, 8.0])}
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> _, _, state = jb.collect(batcher, state, xs, 3, flush=True)
        >>> moments = jb.get_statistics(state)
        >>> int(moments.count), moments.mean["x"], moments.variance()["x"]
        (5, Array(4., dtype=float32), Array(6.8, dtype=float32))
    """

    def init(batch_spec: Any) -> Moments:
        batch = _require_batch(batch_spec)

        def zeros():  # each field its own buffers, so the state can be donated to `jit`
            return jax.tree.map(
                lambda s: jnp.zeros(s.shape[1:], _moments_dtype(s.dtype)), batch.data
            )

        return Moments(count=Counter.of(0), shift=zeros(), offset=zeros(), m2=zeros())

    def update(moments: Moments, batch: Any) -> Moments:
        batch = _require_batch(batch)
        valid = batch.valid_mask
        n_b = jnp.sum(valid, dtype=jnp.int32)
        n_a = _as_float(moments.count)
        n = n_a + n_b.astype(jnp.float32)
        weight = n_b.astype(jnp.float32) / jnp.maximum(n, 1)  # 0 for an empty batch
        first = n_a == 0

        def merge(x: Array, shift: Array, offset_a: Array, m2_a: Array) -> tuple[Array, ...]:
            dtype = shift.dtype
            rows = rows_mask(valid, x)
            x = x.astype(dtype)
            zero = jnp.zeros((), dtype)
            size = jnp.maximum(n_b, 1).astype(dtype)
            # The first batch's own mean becomes the shift; `x - shift` is then exact for
            # rows near it (Sterbenz), so the sums below see only the small deviations.
            shift = jnp.where(first, jnp.sum(jnp.where(rows, x, zero), axis=0) / size, shift)
            offset_a = jnp.where(first, zero, offset_a)
            shifted = jnp.where(rows, x - shift[None], zero)
            mean_b = jnp.sum(shifted, axis=0) / size
            deviation = jnp.where(rows, shifted - mean_b[None], zero)
            m2_b = jnp.sum(deviation * deviation, axis=0)
            delta = mean_b - offset_a
            w = weight.astype(dtype)
            offset = offset_a + delta * w
            m2 = m2_a + m2_b + delta * delta * (n_a.astype(dtype) * w)
            return shift, offset, m2

        merged = jax.tree.map(merge, batch.data, moments.shift, moments.offset, moments.m2)
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        shift, offset, m2 = (
            jax.tree.map(lambda t, i=i: t[i], merged, is_leaf=is_triple) for i in range(3)
        )
        return Moments(moments.count.add(n_b.astype(jnp.uint32)), shift, offset, m2)

    return StatsFn(init=init, update=update)


class StatisticsState(eqx.Module):
    """State of `with_statistics`.

    Attributes:
        inner: the inner batcher's state.
        statistics: the current statistics (`initial`, computed, or set); the empty value
            when `has_stats` is False.
        empty: the empty statistics (`stats_fn.init`), what `reset_statistics` restores.
        has_stats: scalar bool; False is the seed's `None` (after a reset, or before the
            first ready batch without `initial`).
        frozen: scalar bool; True while precomputed statistics (`initial`, or
            `set_statistics(..., freeze=True)`) are in effect: ready batches do not change
            them until `reset_statistics` (the seed's precedence).
        stats: the counters (the inner batcher's).
    """

    inner: Any
    statistics: PyTree
    empty: PyTree
    has_stats: Bool[Array, ""]
    frozen: Bool[Array, ""]
    stats: Stats


def with_statistics(batcher: Any, stats_fn: Any = None, *, initial: Any = None) -> Batcher:
    """Keep statistics of the emitted valid rows in the state, beside `batcher`'s.

    After every ready batch (from `step` or `flush`), `stats_fn` folds it into the
    statistics, unless precomputed ones are in effect. The seed's precedence: `initial` (its
    `precomputed_stats`) is what `get_statistics` returns, never overwritten by batches,
    until `reset_statistics`; after a reset there are no statistics (`has_statistics` False,
    the seed's `None`) until the next ready batch or `set_statistics`.

    Args:
        batcher: the inner `Batcher`.
        stats_fn: a `StatsFn` (`init`, `update`), or a plain function `fn(batch) ->
            statistics` (the seed's `batch_stats_fn`: each ready batch replaces the
            statistics; empty value zeros). Default `running_moments()`.
        initial: precomputed statistics, with the structure, shapes and dtypes of
            `stats_fn`'s (for the default, a `Moments`, e.g. `jb.Moments.of(mean, var)`).

    Returns:
        A `Batcher` whose state is a `StatisticsState`. It steps (no bulk `feed`).

    Raises:
        ValueError: `batcher` not a `jb.Batcher`, `stats_fn` neither a `StatsFn` nor
            callable.
        TypeError: (at `init`) `initial` unlike `stats_fn`'s statistics (the leaf is named).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.with_statistics(jb.fixed_size(2))
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> xs = {"x": jnp.array([1.0, 3.0, 5.0])}
        >>> _, _, state = jb.collect(batcher, state, xs, 2, flush=True)
        >>> jb.get_statistics(state).mean["x"], bool(jb.has_statistics(state))
        (Array(3., dtype=float32), True)
        >>> bool(jb.has_statistics(jb.reset_statistics(state)))
        False
    """
    _check_batcher(batcher)
    if stats_fn is None:
        stats_fn = running_moments()
    elif not isinstance(stats_fn, StatsFn):
        if not callable(stats_fn):
            raise ValueError(
                f"`stats_fn` must be a `jb.StatsFn` or a function of a batch, got {stats_fn!r}."
            )
        per_batch = stats_fn
        stats_fn = StatsFn(
            init=lambda spec: jax.tree.map(
                lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(per_batch, spec)
            ),
            update=lambda _, batch: per_batch(batch),
        )

    config = describe("with_statistics", stats_fn=stats_fn, initial=initial is not None)

    def init_fn(element_spec: Any, key: Any = None) -> StatisticsState:
        spec = spec_of(element_spec)
        inner = batcher.init(spec, key=key)
        batch_like = jax.eval_shape(batcher.step, inner, spec)[1].batch
        empty = stats_fn.init(batch_like)
        if initial is None:
            statistics, precomputed = jax.tree.map(jnp.copy, empty), False  # own buffers
        else:
            check_against_spec(empty, initial, what="initial")
            statistics, precomputed = jax.tree.map(jnp.asarray, initial), True
        stats = Stats.zeros(fingerprint(config, spec))
        flags = jnp.asarray(precomputed), jnp.asarray(precomputed)  # two buffers
        return StatisticsState(inner, statistics, empty, *flags, stats)

    def fold_in(statistics: PyTree, batch: Any) -> PyTree:
        return stats_fn.update(statistics, batch)

    def keep(statistics: PyTree, batch: Any) -> PyTree:
        return statistics

    def observe(state: StatisticsState, inner: Any, emit: Emit) -> StatisticsState:
        fold = emit.ready & ~state.frozen
        statistics = jax.lax.cond(fold, fold_in, keep, state.statistics, emit.batch)
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        has_stats = state.has_stats | fold
        return StatisticsState(inner, statistics, state.empty, has_stats, state.frozen, stats)

    def step_fn(state: StatisticsState, element: Any) -> tuple[StatisticsState, Emit]:
        check_state(state, StatisticsState, config)
        inner, emit = batcher.step(state.inner, element)
        return observe(state, inner, emit), emit

    def flush_fn(state: StatisticsState) -> tuple[StatisticsState, Emit]:
        check_state(state, StatisticsState, config)
        inner, emit = batcher.flush(state.inner)
        return observe(state, inner, emit), emit

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)


def _statistics_path(state: Any) -> Callable[[Any], StatisticsState]:
    """Where the `StatisticsState` is in `state`: itself, or down a chain of `.inner`s."""
    path: list[str] = []
    node = state
    while not isinstance(node, StatisticsState):
        if not hasattr(node, "inner"):
            raise ValueError(
                f"`state` ({type(state).__name__}) holds no statistics: build the batcher "
                "with `jb.with_statistics(...)`."
            )
        node = node.inner
        path.append("inner")

    def where(s: Any) -> StatisticsState:
        for name in path:
            s = getattr(s, name)
        return s

    return where


def get_statistics(state: State) -> PyTree:
    """The statistics in a `with_statistics` state (or a combinator state wrapping one).

    Precomputed (`initial`) statistics unless reset, else those computed from the ready
    batches so far. Always a tree (a pure function cannot return None under `jit`): when
    `has_statistics(state)` is False it is the empty value (the seed's `None`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> known = jb.Moments.of({"x": jnp.float32(0.5)}, {"x": jnp.float32(1.0)})
        >>> batcher = jb.with_statistics(jb.fixed_size(2), initial=known)
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> jb.get_statistics(state).mean["x"]
        Array(0.5, dtype=float32)
    """
    return _statistics_path(state)(state).statistics


def has_statistics(state: State) -> Bool[Array, ""]:
    """Whether `state` holds statistics (False is the seed's `None`): a scalar bool array.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> state = jb.with_statistics(jb.fixed_size(2)).init({"x": jnp.zeros(())})
        >>> bool(jb.has_statistics(state))
        False
    """
    return _statistics_path(state)(state).has_stats


def set_statistics(state: State, statistics: PyTree, *, freeze: bool = False) -> State:
    """A copy of `state` whose statistics are `statistics` (and `has_statistics` True).

    With `freeze=False` later ready batches fold into them (a running statistic continues
    from them); with `freeze=True` they stay fixed like `initial` until `reset_statistics`.

    Raises:
        TypeError: `statistics` unlike the state's (structure, shape or dtype; leaf named).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> state = jb.with_statistics(jb.fixed_size(2)).init({"x": jnp.zeros(())})
        >>> known = jb.Moments.of({"x": jnp.float32(1.0)}, {"x": jnp.float32(4.0)}, count=10)
        >>> state = jb.set_statistics(state, known, freeze=True)
        >>> jb.get_statistics(state).variance()["x"], bool(jb.has_statistics(state))
        (Array(4., dtype=float32), True)
    """
    if not isinstance(freeze, bool):
        raise ValueError(f"`freeze` must be a bool, got {freeze!r}.")
    where = _statistics_path(state)
    old = where(state)
    check_against_spec(old.statistics, statistics, what="statistics")
    new = dataclasses.replace(
        old,
        statistics=jax.tree.map(jnp.asarray, statistics),
        has_stats=jnp.ones_like(old.has_stats),
        frozen=jnp.full_like(old.frozen, freeze),
    )
    return eqx.tree_at(where, state, new)


def reset_statistics(state: State) -> State:
    """A copy of `state` with no statistics: `has_statistics` False, the empty value, and
    precomputed (`initial`) statistics no longer in effect; the next ready batch starts
    them afresh. Buffers and counters are untouched.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> known = jb.Moments.of({"x": jnp.float32(0.5)}, {"x": jnp.float32(1.0)})
        >>> batcher = jb.with_statistics(jb.fixed_size(2), initial=known)
        >>> state = jb.reset_statistics(batcher.init({"x": jnp.zeros(())}))
        >>> bool(jb.has_statistics(state)), int(jb.get_statistics(state).count)
        (False, 0)
    """
    where = _statistics_path(state)
    old = where(state)
    new = dataclasses.replace(
        old,
        statistics=old.empty,
        has_stats=jnp.zeros_like(old.has_stats),
        frozen=jnp.zeros_like(old.frozen),
    )
    return eqx.tree_at(where, state, new)

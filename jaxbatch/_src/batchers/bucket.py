"""Bucketing: `bucket_by` (any integer key) and `bucket_by_length` (by sequence length).

Elements are grouped into buckets, each with its own buffer, batch size and (for
`bucket_by_length`) its own static row shape, all in one `BucketState`. A bucket's batch is
emitted the step it fills; at end of stream `flush` drains the non-empty buckets one per
call, in bucket order.

Data flow (DESIGN.md, "decide on metadata, move payload in bulk"):

* **Route** on a scalar: `bucket_by` calls `key_fn(element)`; `bucket_by_length` finds the
  first boundary `>= length` (`searchsorted` on the static boundaries). A key out of range is
  an `eqx.error_if`; a too-long sequence is an `eqx.error_if` or is skipped and counted.
* **Write** the element (its features cut to each bucket's boundary) into row `counts[i]` of
  *every* bucket `i`: one small `dynamic_update_slice` per bucket, and no select over whole
  buffers. The rows at or past a bucket's count are unspecified, so only the element's own
  bucket counts the write; the step stays branch-free, which is what `vmap` wants.
* **Emit** `Emit(Bucketed(batches, bucket), ready)`: one `Batch` per bucket, each of its own
  static shape, and the index of the ready one. Only that batch has valid rows; every other
  mask is all False. `by_bucket` turns per-bucket consumers into one consumer that runs
  `lax.switch(bucket, ...)`, so a train step is traced once per batch shape.

There is no bulk `feed`: the drivers step one element at a time in one loop, calling the
consumer at one site.
"""

import dataclasses
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..base import (
    Batcher,
    Carry,
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
from ._checks import MAX_SIZE, clamp_to_int32, flag, pad_number, pad_value_fits
from .fixed_size import _as_batch

_TOO_LONG = ("error", "skip")


class Bucketed(eqx.Module):
    """What a bucketing batcher emits: one `Batch` per bucket and which one is ready.

    Every bucket's batch has its own static shape (its batch size, and for
    `bucket_by_length` its rows cut to the bucket's boundary), so the emission has one shape
    on every call. When the `Emit` is ready, `batches[bucket]` is the batch and every other
    batch has an all-False `valid_mask` (its data unspecified); when it is not ready, every
    mask is all False and `bucket` is unspecified. Consume it with `by_bucket`.

    Attributes:
        batches: a tuple of `Batch`, one per bucket.
        bucket: scalar int32, the index of the ready batch.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.bucket_by_length([2, 4], [2, 1], length="n", features=["tokens"])
        >>> state = batcher.init({"tokens": jnp.zeros(4, jnp.int32), "n": jnp.int32(0)})
        >>> e = {"tokens": jnp.array([5, 6, 7, 0], jnp.int32), "n": jnp.int32(3)}
        >>> state, emit = batcher.step(state, e)
        >>> bool(emit.ready), int(emit.batch.bucket), emit.batch.batch_sizes
        (True, 1, (2, 1))
        >>> emit.batch.batches[1].data["tokens"]
        Array([[5, 6, 7, 0]], dtype=int32)
        >>> emit.batch.batches[0].valid_mask
        Array([False, False], dtype=bool)
    """

    batches: tuple[Batch, ...]
    bucket: Int[Array, ""]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The batch size of every bucket (the last axis of each `valid_mask`)."""
        return tuple(int(np.shape(b.valid_mask)[-1]) for b in self.batches)

    @property
    def batch_size(self) -> int:
        """Not defined: bucketing emits batches of several sizes (see `batch_sizes`).

        Drivers that size their room from one batch size (`batch_all`, `iterate`) read this;
        the error tells you to pass the room yourself.
        """
        sizes = self.batch_sizes
        raise ValueError(
            f"A bucketing batcher emits batches of several sizes {sizes}, so the room for "
            "batches cannot be derived from one batch size: pass `max_batches` to "
            "`batch_all` (or `max_batches_per_chunk` to `iterate`). A safe bound for `n` "
            f"elements is `sum(ceil(n / b) for b in {sizes})`."
        )


class BucketState(eqx.Module):
    """State of `bucket_by` and `bucket_by_length`.

    Attributes:
        buffers: one `Element` per bucket, with leaves `[batch_sizes[i], ...]` (features cut
            to the bucket's boundary). Rows at or past the bucket's count are unspecified.
        counts: `[num_buckets]` int32, the rows of each buffer filled so far, each in
            `[0, batch_sizes[i])` between calls.
        stats: the counters (see `Stats`); too-long sequences skipped by `bucket_by_length`
            are counted in `skipped`.
        max_lengths: static, the full length `max_len` of each feature of
            `bucket_by_length` as the element spec gave it (empty for `bucket_by`).
    """

    buffers: tuple[Element, ...]
    counts: Int[Array, " buckets"]
    stats: Stats
    max_lengths: tuple[int, ...] = eqx.field(static=True, default=())


# --------------------------------------------------------------------------- validation


def _int_sequence(name: str, values: Any) -> tuple[int, ...]:
    """`values` as a non-empty tuple of positive Python ints, or a `ValueError` naming it."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | np.ndarray):
        raise ValueError(f"`{name}` must be a non-empty sequence of positive ints, got {values!r}.")
    items = list(values)
    if not items:
        raise ValueError(f"`{name}` must be a non-empty sequence of positive ints, got {values!r}.")
    for v in items:
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(
                f"`{name}` must hold positive ints, got {v!r} in {values!r}; "
                f"e.g. `{name}=[32, 64]`."
            )
        if v > MAX_SIZE:
            raise ValueError(
                f"`{name}` must hold ints of at most 2**31 - 1 (rows are indexed with int32), "
                f"got {v} in {values!r}."
            )
    return tuple(int(v) for v in items)


def _check_common(pad_value: Any, drop_remainder: Any) -> None:
    flag(drop_remainder, "drop_remainder")
    pad_number(pad_value)


# --------------------------------------------------------------------------- the engine


def _bucketing(
    batch_sizes: tuple[int, ...],
    *,
    prepare: Callable[[Element], tuple[list[Element], tuple[int, ...]]],
    expected: Callable[["BucketState"], Element],
    route: Callable[[Element], tuple[Array, Array, Array]],
    cut: Callable[[Element, int, Array], Element],
    pad_value: bool | int | float,
    drop_remainder: bool,
    config: str,
) -> Batcher:
    """The batcher shared by both factories, given how they differ.

    `prepare(spec) -> (bucket row specs, max_lengths)` validates the spec at `init`;
    `expected(state)` is the element spec `step` checks against; `route(element) ->
    (bucket, accept, length)` decides on scalars (`bucket` in range when `accept`);
    `cut(element, i, length)` is the element as a row of bucket `i` (static).
    """
    num = len(batch_sizes)

    def sizes() -> Array:  # a constant of the traced program, not an array in a closure
        return jnp.asarray(batch_sizes, jnp.int32)

    def init_fn(element_spec: Any, key: Any = None) -> BucketState:
        del key  # deterministic
        spec = spec_of(element_spec)
        pad_value_fits(pad_value, spec)
        specs, max_lengths = prepare(spec)
        buffers = tuple(stack_spec(s, b) for s, b in zip(specs, batch_sizes))
        counts = jnp.zeros((num,), jnp.int32)
        return BucketState(buffers, counts, Stats.zeros(fingerprint(config, spec)), max_lengths)

    def step_fn(state: BucketState, element: Any) -> tuple[BucketState, Emit]:
        check_state(state, BucketState, config)
        element = as_element(element)
        check_against_spec(expected(state), element, what="element")
        bucket, accept, length = route(element)
        # Write into every bucket's next free row (unspecified rows: harmless), count one.
        buffers = tuple(
            jax.tree.map(
                lambda buf, x, i=i: jax.lax.dynamic_update_index_in_dim(buf, x, state.counts[i], 0),
                state.buffers[i],
                cut(element, i, length),
            )
            for i in range(num)
        )
        hit = (jnp.arange(num, dtype=jnp.int32) == bucket) & accept
        counts = state.counts + hit.astype(jnp.int32)
        full = hit & (counts == sizes())
        ready = jnp.any(full)
        emitted = jnp.where(ready, sizes()[bucket], 0)
        stats = state.stats.add(accepted=accept, skipped=~accept, batches=ready, emitted=emitted)
        batches = tuple(
            _as_batch(buffers[i], jnp.broadcast_to(full[i], (b,)))
            for i, b in enumerate(batch_sizes)
        )
        emit = Emit(Bucketed(batches=batches, bucket=bucket), ready)
        new = BucketState(buffers, jnp.where(full, 0, counts), stats, state.max_lengths)
        return new, own_buffers(emit, new)

    def flush_fn(state: BucketState) -> tuple[BucketState, Emit]:
        check_state(state, BucketState, config)
        counts = state.counts
        zeros = jnp.zeros((num,), jnp.int32)
        if drop_remainder:  # everything buffered is dropped by this one call
            batches = tuple(
                _as_batch(buf, jnp.zeros((b,), bool)) for buf, b in zip(state.buffers, batch_sizes)
            )
            emit = Emit(Bucketed(batches, jnp.zeros((), jnp.int32)), jnp.array(False))
            stats = state.stats.add(dropped=jnp.sum(counts))
            new = BucketState(state.buffers, zeros, stats, state.max_lengths)
            return new, own_buffers(emit, new)
        nonempty = counts > 0
        ready = jnp.any(nonempty)
        bucket = jnp.argmax(nonempty).astype(jnp.int32)  # the first non-empty bucket
        pick = (jnp.arange(num, dtype=jnp.int32) == bucket) & ready
        batches = []
        for i, (buf, b) in enumerate(zip(state.buffers, batch_sizes)):
            rows = jnp.arange(b, dtype=jnp.int32) < counts[i]
            padded = jax.tree.map(
                lambda x, rows=rows: jnp.where(
                    rows_mask(rows, x), x, jnp.asarray(pad_value, x.dtype)
                ),
                buf,
            )
            batches.append(_as_batch(padded, rows & pick[i]))
        n = counts[bucket]
        stats = state.stats.add(
            emitted=n, batches=ready, padded=jnp.where(ready, sizes()[bucket] - n, 0)
        )
        emit = Emit(Bucketed(tuple(batches), bucket), ready)
        new = BucketState(state.buffers, jnp.where(pick, 0, counts), stats, state.max_lengths)
        return new, own_buffers(emit, new)

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)


# --------------------------------------------------------------------------- bucket_by


def bucket_by(
    key_fn: Any, batch_sizes: Any, *, pad_value: Any = 0, drop_remainder: Any = False
) -> Batcher:
    """Group elements by an integer key into buckets of their own batch size.

    The in-`jit` analogue of tf.data's `group_by_window`: `key_fn(element)` says which bucket
    an element goes to, and a bucket's batch is emitted the step it fills, with the
    elements in their arrival order. All buckets hold rows of the element's shape. At end
    of stream, `flush` emits the non-empty buckets one per call, in bucket order, padded with
    `pad_value` (or, with `drop_remainder=True`, drops them all and counts them as dropped).

    The emitted batch is a `Bucketed`; consume it with `by_bucket`. `batch_all` needs
    `max_batches` (the default assumes one batch size).

    Args:
        key_fn: `key_fn(element) -> key`, called on the `Element` (a PyTree of arrays given to
            `step` is wrapped as `Element(data=tree)`); the key is a scalar integer in
            `[0, len(batch_sizes))`. A key out of range is a run-time `eqx.error_if`.
        batch_sizes: the batch size of each bucket, positive ints.
        pad_value: fill for padding rows (a Python scalar), cast to each leaf's dtype.
        drop_remainder: drop partial buckets at end of stream instead of padding them.

    Returns:
        A `Batcher` (no bulk `feed`) whose state is a `BucketState`.

    Raises:
        ValueError: `key_fn` not callable, `batch_sizes` not a non-empty sequence of
            positive ints, `pad_value` not a Python number or `drop_remainder` not a bool.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.bucket_by(lambda e: e.data["label"], [2, 3])
        >>> state = batcher.init({"x": jnp.float32(0), "label": jnp.int32(0)})
        >>> for x, label in [(1.0, 1), (2.0, 0), (3.0, 0), (4.0, 1)]:
        ...     e = {"x": jnp.float32(x), "label": jnp.int32(label)}
        ...     state, emit = batcher.step(state, e)
        ...     if emit.ready:
        ...         print(int(emit.batch.bucket), emit.batch.batches[emit.batch.bucket].data["x"])
        0 [2. 3.]
        >>> state, emit = batcher.flush(state)
        >>> emit.batch.batches[1].data["x"], emit.batch.batches[1].valid_mask
        (Array([1., 4., 0.], dtype=float32), Array([ True,  True, False], dtype=bool))
    """
    if not callable(key_fn):
        raise ValueError(f"`key_fn` must be a callable `key_fn(element) -> int`, got {key_fn!r}.")
    batch_sizes = _int_sequence("batch_sizes", batch_sizes)
    _check_common(pad_value, drop_remainder)
    num = len(batch_sizes)

    def route(element: Element) -> tuple[Array, Array, Array]:
        key = key_fn(element)
        shape, dtype = np.shape(key), jnp.result_type(key)
        if shape != () or not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"`key_fn` must return a scalar integer, got shape {shape} dtype {dtype}; "
                "e.g. `lambda e: e.data['label']` on an int32 scalar leaf."
            )
        key = clamp_to_int32(key, -1, num)  # range-checked as given, not cut to 32 bits
        key = eqx.error_if(
            key,
            (key < 0) | (key >= num),
            f"`key_fn` returned a key outside [0, {num}), the range of `batch_sizes`.",
        )
        return key, jnp.array(True), jnp.zeros((), jnp.int32)

    return _bucketing(
        batch_sizes,
        prepare=lambda spec: ([spec] * num, ()),
        expected=lambda state: row_spec(state.buffers[0]),
        route=route,
        cut=lambda element, i, length: element,
        pad_value=pad_value,
        drop_remainder=drop_remainder,
        config=describe(
            "bucket_by",
            key_fn=key_fn,
            batch_sizes=batch_sizes,
            pad_value=pad_value,
            drop_remainder=drop_remainder,
        ),
    )


# --------------------------------------------------------------------------- bucket_by_length


def bucket_by_length(
    boundaries: Any,
    batch_sizes: Any,
    *,
    length: Any,
    features: Any,
    too_long: Any = "error",
    pad_value: Any = 0,
    drop_remainder: Any = False,
) -> Batcher:
    """Bucket sequences by length, each bucket padded only to its own boundary.

    A sequence is an element whose `data` dict holds a scalar integer `data[length]` and
    feature arrays `data[f]` of shape `[max_len, ...]` (padded to a static maximum). A
    sequence of length `L` goes to the first bucket `i` with `boundaries[i] >= L`; its features
    are cut to `[boundaries[i], ...]` and their positions at or past `L` are set to
    `pad_value`, so bucket `i` emits batches with leaves `[batch_sizes[i], boundaries[i], ...]`.
    A bucket's batch is emitted the step it fills, in arrival order; `flush` emits the
    non-empty buckets one per call, in bucket order, padded with `pad_value` (or, with
    `drop_remainder=True`, drops them all and counts them as dropped).

    Unlike tf.data's `bucket_by_sequence_length`, the last bucket is bounded: a sequence
    longer than `boundaries[-1]` is an error (`too_long="error"`, an `eqx.error_if` at run
    time) or is skipped and counted in `Stats.skipped` (`too_long="skip"`). A negative length
    is always an error.

    The emitted batch is a `Bucketed`; consume it with `by_bucket`. `batch_all` needs
    `max_batches` (the default assumes one batch size).

    Args:
        boundaries: the largest length of each bucket: positive ints, strictly increasing.
        batch_sizes: the batch size of each bucket, positive ints, one per boundary.
        length: the key in `data` of the scalar integer length.
        features: the keys in `data` of the arrays `[max_len, ...]` cut to each bucket's
            boundary (a single key may be given as a string). Other leaves pass unchanged.
            `init` raises `ValueError` if a feature's `max_len < boundaries[-1]`.
        too_long: `"error"` or `"skip"`, for lengths above `boundaries[-1]`.
        pad_value: fill for padding rows and for feature positions past a sequence's length
            (a Python scalar), cast to each leaf's dtype.
        drop_remainder: drop partial buckets at end of stream instead of padding them.

    Returns:
        A `Batcher` (no bulk `feed`) whose state is a `BucketState`.

    Raises:
        ValueError: `boundaries` not positive, unsorted or duplicated; `batch_sizes` not
            positive or of another length than `boundaries`; `features` holding `length` or
            a key twice; `too_long` unknown; `pad_value` not a number or `drop_remainder` not
            a bool.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.bucket_by_length([2, 4], [2, 2], length="n", features=["tokens"])
        >>> spec = {"tokens": jnp.zeros(4, jnp.int32), "n": jnp.int32(0)}
        >>> [b.data["tokens"].shape for b in jb.batch_spec(batcher, spec).batches]
        [(2, 2), (2, 4)]
        >>> state = batcher.init(spec)
        >>> for seq in [[1], [2, 3, 4], [5, 6], [7, 8, 9, 10]]:
        ...     e = {"tokens": jnp.array(seq + [0] * (4 - len(seq)), jnp.int32),
        ...          "n": jnp.int32(len(seq))}
        ...     state, emit = batcher.step(state, e)
        ...     if emit.ready:
        ...         i = int(emit.batch.bucket)
        ...         print(i, emit.batch.batches[i].data["tokens"].tolist())
        0 [[1, 0], [5, 6]]
        1 [[2, 3, 4, 0], [7, 8, 9, 10]]

        With `batch_all`, pass `max_batches`: slot `k` holds one batch per bucket and
        `bucket[k]` says which is real.
    """
    boundaries = _int_sequence("boundaries", boundaries)
    for a, b in zip(boundaries, boundaries[1:]):
        if a >= b:
            kind = "duplicated" if a == b else "not sorted"
            raise ValueError(
                f"`boundaries` must be strictly increasing, got {list(boundaries)} ({a} then "
                f"{b}: {kind}); sort them and remove duplicates."
            )
    batch_sizes = _int_sequence("batch_sizes", batch_sizes)
    if len(batch_sizes) != len(boundaries):
        raise ValueError(
            f"`batch_sizes` must have one entry per boundary: got {len(batch_sizes)} "
            f"({list(batch_sizes)}) for {len(boundaries)} boundaries ({list(boundaries)})."
        )
    if not isinstance(length, Hashable) or isinstance(length, list | tuple):
        raise ValueError(f"`length` must be a key of the element's data dict, got {length!r}.")
    features = (features,) if isinstance(features, str) else features
    if not isinstance(features, Sequence) or isinstance(features, bytes):
        raise ValueError(f"`features` must be a sequence of data keys, got {features!r}.")
    features = tuple(features)
    if len(set(features)) != len(features):
        raise ValueError(f"`features` must not repeat a key, got {list(features)}.")
    if length in features:
        raise ValueError(
            f"`features` must not hold the `length` key {length!r}: the length is a scalar."
        )
    if too_long not in _TOO_LONG:
        raise ValueError(f"`too_long` must be one of {_TOO_LONG}, got {too_long!r}.")
    _check_common(pad_value, drop_remainder)
    longest = boundaries[-1]

    def prepare(spec: Element) -> tuple[list[Element], tuple[int, ...]]:
        data = spec.data
        if not isinstance(data, Mapping) or length not in data:
            keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"`length` key {length!r} is not in the element's data (keys: {keys}); the "
                "data must be a dict holding a scalar integer length."
            )
        leaf = data[length]
        if (
            not isinstance(leaf, jax.ShapeDtypeStruct)
            or leaf.shape != ()
            or not jnp.issubdtype(leaf.dtype, jnp.integer)
        ):
            raise ValueError(
                f"`length` leaf `element.data[{length!r}]` must be a scalar integer, got "
                f"{getattr(leaf, 'shape', leaf)} {getattr(leaf, 'dtype', '')}."
            )
        max_lengths = []
        for f in features:
            leaf = data.get(f)
            if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.ndim < 1:
                raise ValueError(
                    f"`features` key {f!r} must name an array leaf `[max_len, ...]` of the "
                    f"element's data, got {leaf!r}."
                )
            if leaf.shape[0] < longest:
                raise ValueError(
                    f"Feature `element.data[{f!r}]` has max_len {leaf.shape[0]} (shape "
                    f"{leaf.shape}), shorter than the last boundary {longest}; pad it to at "
                    f"least {longest} or lower `boundaries`."
                )
            max_lengths.append(leaf.shape[0])

        def bucket_spec(bound: int) -> Element:
            cut = {
                f: jax.ShapeDtypeStruct((bound, *data[f].shape[1:]), data[f].dtype)
                for f in features
            }
            return spec.replace(data={**data, **cut})

        return [bucket_spec(b) for b in boundaries], tuple(max_lengths)

    def expected(state: BucketState) -> Element:
        spec = row_spec(state.buffers[0])
        full = {
            f: jax.ShapeDtypeStruct((n, *spec.data[f].shape[1:]), spec.data[f].dtype)
            for f, n in zip(features, state.max_lengths)
        }
        return spec.replace(data={**spec.data, **full})

    def route(element: Element) -> tuple[Array, Array, Array]:
        # Clamped, not cut, to 32 bits: an int64 length of 2**32 + 3 stays too long.
        n = clamp_to_int32(element.data[length], -1, longest + 1)
        n = eqx.error_if(n, n < 0, f"A sequence has a negative `length` (data[{length!r}]).")
        if too_long == "error":
            n = eqx.error_if(
                n,
                n > longest,
                f"A sequence is longer than the last boundary {longest}; raise `boundaries`, "
                "or pass `too_long='skip'` to skip (and count) such sequences.",
            )
        index = jnp.searchsorted(jnp.asarray(boundaries, jnp.int32), n, side="left")
        accept = index < len(boundaries)
        return jnp.minimum(index, len(boundaries) - 1).astype(jnp.int32), accept, n

    def cut(element: Element, i: int, n: Array) -> Element:
        bound = boundaries[i]

        def one(x):
            x = jnp.asarray(x)[:bound]
            keep = rows_mask(jnp.arange(bound, dtype=jnp.int32) < n, x)
            return jnp.where(keep, x, jnp.asarray(pad_value, x.dtype))

        data = {**element.data, **{f: one(element.data[f]) for f in features}}
        return element.replace(data=data)

    return _bucketing(
        tuple(batch_sizes),
        prepare=prepare,
        expected=expected,
        route=route,
        cut=cut,
        pad_value=pad_value,
        drop_remainder=drop_remainder,
        config=describe(
            "bucket_by_length",
            boundaries=boundaries,
            batch_sizes=batch_sizes,
            length=length,
            features=features,
            too_long=too_long,
            pad_value=pad_value,
            drop_remainder=drop_remainder,
        ),
    )


# --------------------------------------------------------------------------- consuming


@dataclasses.dataclass(frozen=True)
class _ByBucket:
    """The consumer `by_bucket` builds; compares by its `fns`, so rebuilding it with the same
    consumers is the same static argument to a jitted driver (no retrace)."""

    fns: tuple[Callable[[Carry, Batch], Carry], ...] | Callable[[Carry, Batch], Carry]

    def __call__(self, carry: Carry, bucketed: Bucketed) -> Carry:
        batches = bucketed.batches
        num = len(batches)
        fns = self.fns if isinstance(self.fns, tuple) else (self.fns,) * num
        if len(fns) != num:
            raise ValueError(
                f"`fns` has {len(fns)} consumers but the batcher has {num} buckets; pass one "
                "per bucket, or a single consumer for all of them."
            )
        # One branch per distinct (consumer, batch shape): buckets that share both share a
        # branch, which picks their batch with a select, so each shape is traced once.
        keys: list[tuple[int, Any]] = []
        group_of, position = [], []
        for fn, batch in zip(fns, batches):
            leaves, treedef = jax.tree.flatten(batch)
            key = (id(fn), treedef, tuple((np.shape(x), jnp.result_type(x)) for x in leaves))
            if key not in keys:
                keys.append(key)
            group_of.append(keys.index(key))
            position.append(sum(g == group_of[-1] for g in group_of[:-1]))
        members = [[i for i in range(num) if group_of[i] == g] for g in range(len(keys))]
        at = jnp.asarray(position, jnp.int32)[bucketed.bucket]

        def branch(group: list[int]) -> Callable[[Carry], Carry]:
            def run(carry):
                if len(group) == 1:
                    return fns[group[0]](carry, batches[group[0]])
                chosen = jax.tree.map(
                    lambda *xs: jax.lax.select_n(at, *xs), *[batches[i] for i in group]
                )
                return fns[group[0]](carry, chosen)

            return run

        branches = [branch(group) for group in members]
        if len(branches) == 1:
            return branches[0](carry)
        return jax.lax.switch(jnp.asarray(group_of, jnp.int32)[bucketed.bucket], branches, carry)


def by_bucket(fns: Any) -> Callable[[Carry, Bucketed], Carry]:
    """A consumer of `Bucketed` emissions from per-bucket consumers, via `lax.switch`.

    `by_bucket(fns)(carry, bucketed)` runs `fns[bucketed.bucket](carry, batch)` on the ready
    bucket's `Batch`, with one `lax.switch` branch per distinct (consumer, batch shape).
    Under `jb.scan` (one consumer site) each branch is traced once, so a train step is
    compiled once per batch shape. Every branch must return a carry of the same structure.
    Equal consumers and shapes compare equal, so `jb.scan(batcher, jb.by_bucket(f), ...)`
    called again does not retrace.

    Args:
        fns: one consumer `fn(carry, batch) -> carry` per bucket, or a single consumer used
            for every bucket.

    Returns:
        The consumer `fn(carry, bucketed) -> carry`, for `jb.scan`, `jb.consume`,
        `jb.when_ready`, `jb.drain`.

    Raises:
        ValueError: `fns` neither a callable nor a non-empty sequence of callables; when
            called, `fns` has another number of consumers than the batcher has buckets.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.bucket_by_length([2, 4], [2, 2], length="n", features=["tokens"])
        >>> stream = {"tokens": jnp.ones((5, 4), jnp.int32),
        ...           "n": jnp.array([1, 3, 2, 4, 4], jnp.int32)}
        >>> def count_tokens(total, batch):  # traced once per bucket shape
        ...     return total + jnp.sum(batch.data["tokens"])
        >>> total, state = jb.scan(batcher, jb.by_bucket(count_tokens), jnp.int32(0), stream)
        >>> int(total), int(state.stats.batches)
        (14, 3)
    """
    if callable(fns):
        return _ByBucket(fns)
    if isinstance(fns, str | bytes) or not isinstance(fns, Sequence) or not fns:
        raise ValueError(
            f"`fns` must be a consumer or a non-empty sequence of consumers, got {fns!r}."
        )
    for fn in fns:
        if not callable(fn):
            raise ValueError(f"`fns` must hold callables `fn(carry, batch)`, got {fn!r}.")
    return _ByBucket(tuple(fns))

"""Drivers: run a batcher over a stream.

* `scan`      the fused path: batching and the consumer in one jitted program.
* `batch_all` materialise every batch (tests, small data).
* `iterate`   host streaming from any Python iterable, resumable exactly.

All three go through `consume` (the consumer at one call site) or `collect` (batches
materialised, written once), which use the batcher's bulk `feed` when it has one and step
one element at a time when it does not; the end-of-stream drain is part of the same loop.
The jitted cores take the batcher and consumer as static arguments, so calling a driver
again with new values of the same shapes never retraces; build batchers and consumers once.
"""

import collections
import functools
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from .base import Batcher, Carry, Counter, State, row_spec, stack_spec, when_ready
from .batch import Batch, rows_mask
from .element import Element, as_element
from .spec import batch_spec, check_against_spec, tree_spec


def _num_rows(elements: Element) -> int:
    leaves = jax.tree.leaves(elements)
    if not leaves:
        raise ValueError("`elements` has no array leaves, so its length is unknown.")
    return jnp.shape(leaves[0])[0]


# --------------------------------------------------------------------------- the one call site


def _by_step(batcher: Batcher, state: State, elements: Element, flush: bool, fn, carry):
    """Step one element at a time (then flush until nothing is ready, if `flush`), passing
    each ready batch to `fn`: one loop whose body calls `fn` once."""
    n = _num_rows(elements)

    def feed_one(state, i):
        return batcher.step(state, jax.tree.map(lambda x: x[i], elements))

    if not flush:
        if not n:
            return state, carry

        def body(c, i):
            state, carry = c
            state, emit = feed_one(state, i)
            return (state, when_ready(emit, fn, carry)), None

        (state, carry), _ = jax.lax.scan(body, (state, carry), jnp.arange(n, dtype=jnp.int32))
        return state, carry

    # With the drain: an outer loop whose body calls `fn` once, on the next emission: the
    # next ready batch of the elements (an inner loop of steps) or, once they are used up,
    # the next `flush`. The branch is taken once per batch, not once per element (a `cond`
    # hands the whole state through, which can cost a copy of it). Emit leaves that *are*
    # leaves of the new state (a batcher emitting its own buffer) are not carried through
    # the inner loop but read back from the state after it: two loop-carried copies of one
    # buffer would cost a copy of it per element.
    def split_emit(state, i):
        new, emit = feed_one(state, i)
        where = {id(x): k for k, x in enumerate(jax.tree.leaves(new))}
        leaves, treedef = jax.tree.flatten(emit)
        shared = tuple(where.get(id(x)) for x in leaves)
        own = [x for x, k in zip(leaves, shared) if k is None]
        return new, own, shared, treedef

    shared_at: dict[str, Any] = {}

    def probe(state, i):
        new, own, shared, treedef = split_emit(state, i)
        shared_at.update(shared=shared, treedef=treedef)
        return own

    def steps_until_ready(i, state):
        not_ready = jax.tree.map(jnp.zeros_like, jax.eval_shape(probe, state, i))
        shared, treedef = shared_at["shared"], shared_at["treedef"]

        def rebuild(state, own):
            state_leaves, own = jax.tree.leaves(state), iter(own)
            leaves = [next(own) if k is None else state_leaves[k] for k in shared]
            return jax.tree.unflatten(treedef, leaves)

        def more(c):
            i, state, own = c
            return (i < n) & ~rebuild(state, own).ready

        def step_one(c):
            i, state, _ = c
            state, own, again, _ = split_emit(state, i)
            if again != shared:
                raise TypeError(
                    "`batcher.step` traced twice gave emissions that share different leaves "
                    "with its state: a step must be the same pure function on every call."
                )
            return i + 1, state, own

        i, state, own = jax.lax.while_loop(more, step_one, (i, state, not_ready))
        return i, state, rebuild(state, own)

    def flush_once(i, state):
        return (i, *batcher.flush(state))

    def body(c):
        i, state, carry, _ = c
        stepping = i < n
        if n:
            i, state, emit = jax.lax.cond(stepping, steps_until_ready, flush_once, i, state)
        else:
            i, state, emit = flush_once(i, state)
        # Go on after steps (a flush follows the last), and after a flush that emitted.
        return i, state, when_ready(emit, fn, carry), stepping | emit.ready

    start = (jnp.zeros((), jnp.int32), state, carry, jnp.array(True))
    _, state, carry, _ = jax.lax.while_loop(lambda c: c[3], body, start)
    return state, carry


def consume(
    batcher: Batcher,
    state: State,
    elements: Any,
    fn: Callable[[Carry, Batch], Carry],
    carry: Carry,
    *,
    flush: bool = False,
) -> tuple[State, Carry]:
    """Feed a stack of elements to a batcher and run `carry = fn(carry, batch)` on every
    ready batch, in order: the un-jitted core of `scan`, for use inside your own `jit`.

    `fn` is called at exactly **one** site of the traced program, whatever the batcher, so
    a train step is compiled once. With a bulk `feed`, the batcher describes its batches
    (`Emissions`) and one `fori_loop` builds and consumes them; without one, one loop steps
    each element (and, if `flush`, flushes until nothing is ready) with `fn` under
    `lax.cond`.

    Args:
        batcher: the batcher.
        state: its state.
        elements: elements stacked along a leading axis (an `Element` or a PyTree).
        fn: the consumer.
        carry: the consumer's initial carry.
        flush: drain the batcher after the last element (end of stream).

    Returns:
        `(state, carry)`.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2)
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> count = lambda n, batch: n + 1
        >>> run = jax.jit(lambda s, e: jb.consume(batcher, s, e, count, jnp.int32(0)))
        >>> state, n = run(state, {"x": jnp.arange(5.0)})
        >>> int(n), int(state.count)
        (2, 1)
    """
    elements = as_element(elements)
    if batcher.feed is None:
        return _by_step(batcher, state, elements, flush, fn, carry)
    state, emissions = batcher.feed(state, elements, flush)
    carry = jax.lax.fori_loop(0, emissions.count, lambda k, c: fn(c, emissions.batch(k)), carry)
    return state, carry


def drain(
    batcher: Batcher, state: State, fn: Callable[[Carry, Batch], Carry], carry: Carry
) -> tuple[State, Carry]:
    """Call `flush` until it emits nothing, passing every ready batch to `fn` (one site).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(4)
        >>> state, _ = batcher.step(batcher.init({"x": jnp.zeros(())}), {"x": jnp.ones(())})
        >>> state, valid = jb.drain(batcher, state, lambda n, b: n + b.num_valid, jnp.int32(0))
        >>> int(valid), int(state.count)
        (1, 0)
    """

    def body(c):
        state, carry, _ = c
        state, emit = batcher.flush(state)
        return state, when_ready(emit, fn, carry), emit.ready

    state, carry, _ = jax.lax.while_loop(lambda c: c[2], body, (state, carry, jnp.array(True)))
    return state, carry


def collect(
    batcher: Batcher, state: State, elements: Any, capacity: int, *, flush: bool = False
) -> tuple[State, PyTree, Int[Array, ""]]:
    """Feed a stack of elements and return every ready batch, stacked: `consume` that
    materialises, for `batch_all` and `iterate` (call it inside `jit`).

    With a bulk `feed` the batches are written once, by `Emissions.stacked` or
    `jax.vmap(Emissions.batch)`; without one, each ready batch is written into its slot.

    Returns:
        `(state, batches, count)`: leaves `[capacity, ...]`; slots at or past `count` have an
        all-False `valid_mask` (their data is unspecified). `batches` is what the batcher's
        `Emit.batch` is, stacked: a `Batch`, or a tree of them (every mask is handled).
        Batches past `capacity` are counted in `count` but not stored: the caller checks
        `count <= capacity`.
    """
    elements = as_element(elements)
    slots = jnp.arange(capacity, dtype=jnp.int32)
    if batcher.feed is not None:
        state, emissions = batcher.feed(state, elements, flush)
        if emissions.stacked is not None:
            out = emissions.stacked(capacity)
        else:
            out = jax.vmap(emissions.batch)(slots)
        count = emissions.count
    else:
        spec = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, state, row_spec(elements))
        out = stack_spec(spec, capacity)

        def write(c, batch):
            out, count = c
            if capacity:  # past `capacity` the caller raises, so the clamped write is never seen
                slot = jnp.minimum(count, capacity - 1)
                out = jax.tree.map(
                    lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, slot, 0), out, batch
                )
            return out, count + 1

        state, (out, count) = _by_step(
            batcher, state, elements, flush, write, (out, jnp.zeros((), jnp.int32))
        )
    return state, _mask_slots(out, slots < count), count


def _mask_slots(out: Any, keep: Array) -> Any:
    """Every `Batch` in `out` (stacked `[capacity, ...]`) with its rows masked off in the
    slots where `keep` is False. A tree, for batchers that emit one batch per shape."""

    def mask(b):
        if not isinstance(b, Batch):
            return b
        return eqx.tree_at(lambda b: b.valid_mask, b, b.valid_mask & rows_mask(keep, b.valid_mask))

    return jax.tree.map(mask, out, is_leaf=lambda x: isinstance(x, Batch))


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _scan(batcher, fn, carry, elements, state, key, flush):
    if state is None:
        state = batcher.init(row_spec(elements), key=key)
    state, carry = consume(batcher, state, elements, fn, carry, flush=flush)
    return carry, state


def scan(
    batcher: Batcher,
    fn: Callable[[Carry, Batch], Carry],
    carry: Carry,
    elements: Any,
    *,
    state: State | None = None,
    key: Any = None,
    flush: bool = True,
) -> tuple[Carry, State]:
    """Batch a stacked stream and consume every batch, all in one jitted program.

    `carry = fn(carry, batch)` runs for each ready batch in order (inside the same XLA
    loop, never materialising the batches), then `flush` is drained unless `flush=False`
    (pass the returned state to the next call to continue a stream across calls).

    Args:
        batcher: the batcher (build it once: it is a static argument).
        fn: the consumer, e.g. a training step (also static: build it once).
        carry: the consumer's initial carry (params, optimiser state, ...).
        elements: elements stacked along a leading axis (an `Element` or a PyTree).
        state: a batcher state to continue from; default `batcher.init` of one element.
        key: PRNG key for a stochastic batcher's `init` (ignored when `state` is given).
        flush: drain the batcher at the end of `elements`.

    Returns:
        `(carry, state)` after the stream.

    Examples:
        Fit `y = 3x` with SGD, one step per batch of 8, in one `jit`:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> xs = jnp.linspace(-1.0, 1.0, 64)
        >>> stream = {"x": xs, "y": 3.0 * xs}
        >>> def train_step(w, batch):
        ...     def loss(w):
        ...         err = jnp.where(batch.valid_mask, w * batch.data["x"] - batch.data["y"], 0.0)
        ...         return jnp.sum(err**2) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32)
        ...     return w - 0.5 * jax.grad(loss)(w)
        >>> batcher = jb.fixed_size(8)
        >>> w = jnp.float32(0.0)
        >>> for epoch in range(5):
        ...     w, _ = jb.scan(batcher, train_step, w, stream)
        >>> round(float(w), 3)
        3.0
    """
    return _scan(batcher, fn, carry, as_element(elements), state, key, flush)


# --------------------------------------------------------------------------- collecting


def _check_room(count: Array, capacity: int, argument: str) -> Array:
    """Raise if the stream needed more than `capacity` batch slots (counted, not written)."""
    message = (
        f"The stream produced more batches than the {capacity} slots of room; pass a larger "
        f"`{argument}`."
    )
    if isinstance(count, jax.core.Tracer):  # pyright: ignore  # traced: a run-time check
        return eqx.error_if(count, count > capacity, message)
    if int(count) > capacity:
        raise ValueError(message.replace("slots of room", f"slots of room ({int(count)} needed)"))
    return count


@functools.partial(jax.jit, static_argnums=(0, 3))
def _batch_all(batcher, elements, key, capacity):
    state = batcher.init(row_spec(elements), key=key)
    _, out, count = collect(batcher, state, elements, capacity, flush=True)
    return out, count


def batch_all(
    batcher: Batcher, elements: Any, *, max_batches: int | None = None, key: Any = None
) -> tuple[PyTree, Int[Array, ""]]:
    """Materialise every batch of a stacked stream (flush drained at the end).

    Args:
        batcher: the batcher.
        elements: elements stacked along a leading axis (an `Element` or a PyTree).
        max_batches: room for batches. Default: `ceil(n / batch_size)` for `n` elements,
            exact for batchers that emit only full batches before the final flush (like
            `fixed_size`); batchers that emit partial batches mid-stream need more.
        key: PRNG key for a stochastic batcher.

    Returns:
        `(batches, count)`: a `Batch` whose leaves are `[max_batches, batch_size, ...]`
        (slots past `count` have an all-False mask and unspecified data) and the number of
        real batches.

    Raises:
        ValueError: `max_batches` negative or not an int, or the stream produced more than
            `max_batches` batches (under an outer `jit`, an `eqx.error_if` run-time error).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batches, count = jb.batch_all(jb.fixed_size(4), {"x": jnp.arange(10)})
        >>> int(count), batches.data["x"].shape
        (3, (3, 4))
        >>> batches.valid_mask[2]
        Array([ True,  True, False, False], dtype=bool)
    """
    elements = as_element(elements)
    if max_batches is None:
        size = batch_spec(batcher, row_spec(elements), key=key).batch_size
        max_batches = math.ceil(_num_rows(elements) / size)
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"`max_batches` must be a non-negative int, got {max_batches!r}.")
    batches, count = _batch_all(batcher, elements, key, max_batches)
    return batches, _check_room(count, max_batches, "max_batches")


# --------------------------------------------------------------------------- streaming


class IterateCheckpoint(eqx.Module):
    """Where a `BatchIterator` stands, exactly: save it with `save_state`, resume with it.

    Attributes:
        state: the batcher state before the chunk being yielded from.
        position: elements of the source consumed before that chunk.
        skip: batches of that chunk already yielded.
    """

    state: PyTree
    position: Counter
    skip: Int[Array, ""]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _feed_chunk(batcher, state, elements, flush, capacity):
    return collect(batcher, state, elements, capacity, flush=flush)


@functools.partial(jax.jit, static_argnums=0)
def _flush(batcher, state):
    return batcher.flush(state)


@jax.jit
def _unstack(batches: PyTree) -> list[PyTree]:
    # One dispatch for all slots, instead of one per leaf and slot.
    slots = jax.tree.leaves(batches)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], batches) for i in range(slots)]


def _from(source: Iterable[Any], position: int) -> Iterator[Any]:
    """`source` from element `position` on: by index for a sequence (a list, a NumPy array:
    nothing before `position` is read), else by reading and dropping the first ones."""
    if isinstance(source, Sequence | np.ndarray) and not isinstance(source, str | bytes):
        return (source[i] for i in range(position, len(source)))
    return itertools.islice(source, position, None)


class BatchIterator(Iterator[Batch]):
    """The iterator `iterate` returns; `checkpoint()` says where it stands."""

    def __init__(self, batcher, source, chunk_size, max_batches_per_chunk, resume, key, ragged):
        self._batcher = batcher
        self._ragged = ragged or {}
        self._source = _from(source, 0 if resume is None else int(resume.position))
        self._chunk_size = chunk_size
        self._max_batches = max_batches_per_chunk
        self._key = key
        self._state = None if resume is None else resume.state
        self._position = 0 if resume is None else int(resume.position)
        self._skip = 0 if resume is None else int(resume.skip)
        self._first = self._spec = self._row_spec = None
        self._pending: collections.deque = collections.deque()
        self._next = None  # (state, position) once the current chunk is fully yielded
        self._done = False

    def checkpoint(self) -> IterateCheckpoint:
        """The exact resume point: pass it back as `iterate(..., resume=checkpoint)`.

        It stands after every batch yielded so far, including the one you may still be
        holding: take it after that batch's train step, so a resumed run starts with the
        next batch. To load one in a new process, `jb.load_state(path, like)` needs a
        template of the same structure, e.g. `jb.IterateCheckpoint(state=batcher.init(spec),
        position=jb.Counter.of(0), skip=jnp.int32(0))`.
        """
        if self._state is None:
            raise ValueError("Nothing has been consumed yet: there is no state to save.")
        return IterateCheckpoint(
            state=self._state, position=Counter.of(self._position), skip=jnp.int32(self._skip)
        )

    def __next__(self) -> Batch:
        while not self._pending:
            if self._next is not None:  # the previous chunk was fully yielded: commit it
                self._state, self._position = self._next
                self._next, self._skip = None, 0
            if self._done:
                raise StopIteration
            self._run_chunk()
        self._skip += 1
        return self._pending.popleft()

    def _pad_ragged(self, rows: list[Any]) -> tuple[dict[str, np.ndarray], list[Any]]:
        """The `ragged` features of `rows` padded into one chunk array each (the payload's
        only copy) with their lengths; and the rows without those features."""
        if not self._ragged:
            return {}, rows
        padded = {}
        for name, (max_len, length_key) in self._ragged.items():
            arrays = []
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or name not in row:
                    raise TypeError(
                        f"`ragged` names feature {name!r}, but source[{self._position + i}] is "
                        f"not a dict holding it (got {type(row).__name__})."
                    )
                arrays.append(np.asarray(row[name]))
                if arrays[-1].ndim == 0 or len(arrays[-1]) > max_len:
                    raise ValueError(
                        f"source[{self._position + i}][{name!r}] has shape "
                        f"{arrays[-1].shape}; `ragged` pads {name!r} to at most {max_len} "
                        "entries along its first axis: raise that bound or cut it on the host."
                    )
            like = arrays[0]
            chunk = np.zeros((len(rows), max_len, *like.shape[1:]), like.dtype)
            for i, array in enumerate(arrays):
                chunk[i, : len(array)] = array
            padded[name] = chunk
            padded[length_key] = np.array([len(a) for a in arrays], np.int32)
        return padded, [{k: v for k, v in row.items() if k not in self._ragged} for row in rows]

    def _stack(self, rows: list[Any]) -> Element:
        """Stack host rows leaf by leaf (numpy); on any mismatch, name the row that differs."""
        padded, rows = self._pad_ragged(rows)
        try:
            stacked = jax.tree.map(lambda *xs: np.stack(xs), *rows)
            if padded:
                stacked = {**stacked, **padded}
            consistent = jax.tree.all(
                jax.tree.map(
                    lambda s, x: x.dtype == s.dtype and x.shape[1:] == s.shape,
                    self._row_spec,
                    stacked,
                )
            )
        except (ValueError, TypeError):
            consistent = False
        if not consistent:  # the slow path: raises naming the first row that differs
            first = tree_spec(as_element(self._pad_ragged([self._first])[1][0]))
            for i, row in enumerate(rows):
                where = f"source[{self._position + i}]"
                check_against_spec(first, as_element(row), what=where)
        element = as_element(stacked)
        return jax.tree.map(lambda x, s: x.astype(s.dtype, copy=False), element, self._spec)

    def _start(self, first: Any) -> None:
        padded, rest = self._pad_ragged([first])
        row = {**rest[0], **{k: v[0] for k, v in padded.items()}} if padded else first
        self._first, self._row_spec = first, tree_spec(row)
        # Canonical dtypes (float64 rows become float32 without x64), as `jit` would see them.
        self._spec = jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, jax.dtypes.canonicalize_dtype(s.dtype)),
            tree_spec(as_element(row)),
        )
        if self._state is None:
            self._state = self._batcher.init(self._spec, key=self._key)
        batch = batch_spec(self._batcher, self._spec, key=self._key)
        if self._max_batches is None:
            self._max_batches = math.ceil(self._chunk_size / batch.batch_size) + 1

    def _feed(self, state, rows, flush=False):
        state, out, count = _feed_chunk(self._batcher, state, rows, flush, self._max_batches)
        _check_room(count, self._max_batches, "max_batches_per_chunk")
        return state, _unstack(out)[: int(count)]

    def _run_chunk(self) -> None:
        rows = list(itertools.islice(self._source, self._chunk_size))
        if rows and self._spec is None:
            self._start(rows[0])
        if self._spec is None:  # an empty source: nothing to batch, nothing to flush
            self._done = True
            return
        state = self._state
        if len(rows) == self._chunk_size:
            state, batches = self._feed(state, self._stack(rows))
        else:  # the tail: one row at a time (one more compile, not one per tail length)
            batches = []
            for i in range(len(rows)):
                state, more = self._feed(state, self._stack(rows[i : i + 1]))
                batches += more
            # The drain: `flush` until it emits nothing (law 3: one batch per call), so a
            # batcher holding many batches (a shuffle buffer) needs no room for them.
            while True:
                state, emit = _flush(self._batcher, state)
                if not bool(jnp.any(jnp.asarray(emit.ready))):
                    break
                batches.append(emit.batch)
            self._done = True
        self._pending.extend(batches[self._skip :])
        self._next = (state, self._position + len(rows))


def iterate(
    batcher: Batcher,
    source: Iterable[Any],
    *,
    chunk_size: int = 256,
    max_batches_per_chunk: int | None = None,
    resume: IterateCheckpoint | None = None,
    key: Any = None,
    ragged: Any = None,  # Mapping[str, tuple[int, str]]: validated below, with a ValueError
) -> BatchIterator:
    """Stream batches from any Python iterable of elements (numpy or jax PyTrees).

    Elements are pulled `chunk_size` at a time, stacked on the host and fed to one jitted
    program; ready batches are yielded as they come. At the end of `source` the last rows
    go one at a time and the batcher is flushed until it emits nothing (one jitted `flush`
    per batch, so a batcher holding many batches, like a shuffle buffer, needs no extra
    room). `checkpoint()` on the returned iterator gives the exact resume point.

    Args:
        batcher: the batcher.
        source: an iterable of elements (`Element`s or PyTrees of arrays).
        chunk_size: elements per jitted call.
        max_batches_per_chunk: room for batches per chunk (mid-stream; the final drain
            needs none); default `ceil(chunk_size / batch_size) + 1`, enough for batchers
            that emit at most one batch per `batch_size` elements.
        resume: a checkpoint from `BatchIterator.checkpoint()`; `source` must then yield the
            same elements from the start. A sequence (list, tuple, NumPy array) is read from
            the checkpoint's `position` on by index; any other iterable is read from the
            start and its first `position` elements dropped.
        key: PRNG key for a stochastic batcher's `init`.
        ragged: variable-length features of dict elements (tokenised text as numpy arrays
            of different lengths), `{feature: (max_len, length_key)}`: each chunk pads
            `feature` to `max_len` along its first axis (zeros; the payload is copied once,
            straight into the chunk) and records its true length under `length_key`, the
            layout `jb.pack(..., lengths={feature: length_key})` reads. A longer array
            raises `ValueError` naming its source index.

    Returns:
        A `BatchIterator` of `Batch`es.

    Examples:
        >>> import numpy as np
        >>> import jaxbatch as jb
        >>> source = ({"x": np.float32(i)} for i in range(7))
        >>> [b.data["x"].tolist() for b in jb.iterate(jb.fixed_size(3), source, chunk_size=4)]
        [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 0.0, 0.0]]

        Token arrays of different lengths, padded on the host and packed under `jit`:

        >>> docs = ({"tokens": np.arange(1, n + 1, dtype=np.int32)} for n in (3, 2, 4))
        >>> packer = jb.pack(4, 2, lengths={"tokens": "length"})
        >>> for b in jb.iterate(packer, docs, ragged={"tokens": (4, "length")}):
        ...     print(b.data["tokens"].tolist(), b.data["tokens_segment_ids"].tolist())
        [[1, 2, 3, 0], [1, 2, 0, 0]] [[1, 1, 1, 0], [1, 1, 0, 0]]
        [[1, 2, 3, 4], [0, 0, 0, 0]] [[1, 1, 1, 1], [0, 0, 0, 0]]
    """
    if ragged is not None and (
        not isinstance(ragged, Mapping)
        or not all(
            isinstance(v, tuple)
            and len(v) == 2
            and isinstance(v[0], int)
            and not isinstance(v[0], bool)
            and v[0] > 0
            and isinstance(v[1], str)
            for v in ragged.values()
        )
    ):
        raise ValueError(
            "`ragged` must map each variable-length feature to `(max_len, length_key)`, a "
            f"positive int and a key name, e.g. {{'tokens': (512, 'length')}}; got {ragged!r}."
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    return BatchIterator(batcher, source, chunk_size, max_batches_per_chunk, resume, key, ragged)

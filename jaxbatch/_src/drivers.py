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
import contextlib
import functools
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from .base import (
    Batcher,
    Carry,
    Counter,
    State,
    join_resident,
    row_spec,
    split_resident,
    stack_spec,
    stream_length,
    when_ready,
)
from .batch import Batch, rows_mask
from .batchers.bucket import Bucketed
from .element import Element, as_element
from .spec import batch_spec, check_against_spec, tree_spec


def _num_rows(elements: Element) -> int:
    if not jax.tree.leaves(elements):
        raise ValueError("`elements` has no array leaves, so its length is unknown.")
    return stream_length(elements)


def _stream(elements: Any) -> Element:
    """`elements` as one stacked `Element`, checked: every leaf `[n, ...]` with one `n`."""
    if isinstance(elements, list) and any(isinstance(e, dict | Element) for e in elements):
        raise ValueError(
            f"`elements` is a list of {len(elements)} elements, but this driver takes one "
            "stack of them (every leaf `[n, ...]`). Stack them first, e.g. "
            "`jax.tree.map(lambda *xs: jnp.stack(xs), *elements)`, or stream them from the "
            "host with `jb.iterate(batcher, elements)`."
        )
    elements = as_element(elements)
    stream_length(elements)
    return elements


# --------------------------------------------------------------------------- bounded drains


def _max_flushes(state: State) -> int:
    """How many `flush` calls a drain of `state` may take before the drivers call it a
    runaway: one per row the state can hold (the sum of its arrays' leading lengths, a
    bound on its buffered rows, since each ready flush emits at least one) and two more.
    A static int: it reads only shapes."""
    rows = sum(jnp.shape(x)[0] for x in jax.tree.leaves(state) if jnp.ndim(x))
    return int(rows) + 2


def _runaway_message(bound: int) -> str:
    return (
        f"The batcher's `flush` still emitted a ready batch after {bound} calls in a row, "
        "more than its state can hold (law 3: `flush` emits at most one batch per call, "
        "and calling it until `ready` is False drains every buffer, so a drain ends). "
        "Make `flush` return `ready=False` once its buffers are empty; "
        "`jaxbatch.testing.check_batcher` checks this."
    )


def _guard(fn: Callable[[Carry, Batch], Carry]) -> Callable[[Carry, Batch], Carry]:
    """`fn`, with a clear error when a bucketing emission reaches a consumer of `Batch`es."""

    def guarded(carry: Carry, batch: Any) -> Carry:
        try:
            return fn(carry, batch)
        except AttributeError as e:
            if isinstance(batch, Bucketed) and "Bucketed" in str(e):
                raise TypeError(
                    "The batcher emits a `Bucketed` (one batch per bucket shape, and which "
                    f"one is ready), but the consumer `fn` reads it as a `Batch` ({e}). "
                    "Wrap the consumer: `jb.by_bucket(fn)` runs it on the ready bucket's "
                    "batch (or pass one consumer per bucket, `jb.by_bucket([fn0, fn1, ...])`)."
                ) from None
            raise

    return guarded


# --------------------------------------------------------------------------- run-time errors


class BatcherRuntimeError(ValueError, RuntimeError):
    """A run-time check (an `eqx.error_if`) refused an element inside a jaxbatch driver.

    The first line is jaxbatch's sentence: the driver, the element's position in the stream
    and its scalar leaves, and the batcher's own message. Raised by `scan`, `batch_all`,
    `iterate`, `scan_host` and `scan_per_device`, which re-run the stream's steps to find
    the element. It is both a
    `ValueError` (bad data) and a `RuntimeError` (what JAX raises for it).

    Attributes:
        position: the element's 0-based position in the stream (for `iterate`, in the
            source), or None when no element's `step` fails on its own (the failure is then
            in the consumer or in the end-of-stream `flush`).
        reason: the check's own message.
    """

    def __init__(self, message: str, position: int | None = None, reason: str = ""):
        super().__init__(message)
        self.position = position
        self.reason = reason


_EQX_MESSAGE = re.compile(r"EquinoxRuntimeError: (.*?)(?:\n\s*\n|\n-{5,}|$)", re.DOTALL)


def _runtime_reason(error: BaseException) -> str | None:
    """The `eqx.error_if` message inside a JAX run-time error, or None if it is not one."""
    found = _EQX_MESSAGE.findall(str(error))
    if not found:
        return None
    return found[-1].strip()


@contextlib.contextmanager
def _quiet_callbacks():
    """JAX logs every failing callback with its traceback; the diagnosis runs some on
    purpose."""
    logger = logging.getLogger("jax._src.callback")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


@functools.partial(jax.jit, static_argnums=0)
def _steps(batcher, state, chunk):
    return jax.lax.scan(lambda s, e: (batcher.step(s, e)[0], None), state, chunk)[0]


def _attempt(fn: Callable[..., Any], *args: Any) -> tuple[bool, Any]:
    """`(True, None)` if `fn(*args)` fails a run-time check, else `(False, fn(*args))`."""
    try:
        return False, jax.block_until_ready(fn(*args))
    except Exception as e:  # noqa: BLE001  (only run-time check failures count)
        if _runtime_reason(e) is None:
            raise
        return True, None


def _rows(elements: Element, start: int, stop: int) -> Element:
    return jax.tree.map(lambda x: x[start:stop], elements)


def _locate(batcher: Batcher, state: State, elements: Element, flush: bool) -> tuple:
    """Step `elements` from `state` again to find the first element whose `step` fails a
    run-time check: `("element", i)`, `("flush", k)` for the `k`-th call of the
    end-of-stream drain, or `(None, None)`. Runs chunks of 4096, then 128, then 1 element
    inside the failing chunk: a few hundred jitted calls for a million elements."""
    start, stop = 0, _num_rows(elements)
    with _quiet_callbacks():
        for size in (4096, 128, 1):
            found = False
            for first in range(start, stop, size):
                part = _rows(elements, first, min(first + size, stop))
                failed, after = _attempt(_steps, batcher, state, part)
                if failed:  # the element is in this chunk: look inside it, from `state`
                    start, stop, found = first, min(first + size, stop), True
                    break
                state = after
            if not found:
                break
        else:
            return "element", start
        if flush:
            for k in range(_max_flushes(state)):
                failed, after = _attempt(_flush, batcher, state)
                if failed:
                    return "flush", k
                state, emit = after
                if not bool(jnp.any(jnp.asarray(emit.ready))):
                    break
    return None, None


def _scalars(elements: Element, i: int) -> str:
    """The 0-d leaves of element `i`, `name=value`, for an error message (at most 6)."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(elements.data)[0]:
        if jnp.ndim(x) == 1 and len(out) < 6:
            out.append(f"`data{jax.tree_util.keystr(path)}`={np.asarray(x[i]).item()!r}")
    return ", ".join(out)


def _explain(
    error: BaseException,
    who: str,
    batcher: Batcher,
    state: State,
    elements: Element,
    flush: bool,
    offset: int = 0,
    stream: str = "`elements`",
) -> BatcherRuntimeError | None:
    """The `BatcherRuntimeError` for a run-time check failure inside driver `who`, naming
    the element (found by `_locate`), or None if `error` is not a run-time check failure."""
    reason = _runtime_reason(error)
    if reason is None:
        return None
    tail = (
        "\n(Raised by an `eqx.error_if` inside the driver's jitted program; nothing of this "
        "call's output was kept. The original JAX error is the `__cause__`.)"
    )
    if "law 3" in reason or "slots of room" in reason:  # the drivers' own checks
        return BatcherRuntimeError(f"`{who}`: {reason}{tail}", None, reason)
    kind, where = _locate(batcher, state, elements, flush)
    if kind == "element":
        scalars = _scalars(elements, where)
        at = f"element {offset + where} of {stream}" + (f" ({scalars})" if scalars else "")
        message = f"`{who}`: {at} was refused at run time: {reason}"
        position = offset + where
    elif kind == "flush":
        message = (
            f"`{who}`: the end-of-stream `flush` (call {where + 1}) failed a run-time check: "
            f"{reason}"
        )
        position = None
    else:
        message = (
            f"`{who}`: a run-time check failed, but no element's `step` fails it on its own, "
            f"so it is in the consumer `fn` or in the batcher's `flush`: {reason}"
        )
        position = None
    return BatcherRuntimeError(message + tail, position, reason)


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

    bound = _max_flushes(state)

    def body(c):
        i, state, carry, _, flushes = c
        stepping = i < n
        if n:
            i, state, emit = jax.lax.cond(stepping, steps_until_ready, flush_once, i, state)
        else:
            i, state, emit = flush_once(i, state)
        flushes = flushes + (~stepping).astype(jnp.int32)
        # Go on after steps (a flush follows the last), and after a flush that emitted.
        return i, state, when_ready(emit, fn, carry), stepping | emit.ready, flushes

    # The drain is bounded (law 3): a `flush` that never stops is an error, not a hang.
    zero = jnp.zeros((), jnp.int32)
    start = (zero, state, carry, jnp.array(True), zero)
    going = lambda c: c[3] & (c[4] < bound)  # noqa: E731
    _, state, carry, runaway, _ = jax.lax.while_loop(going, body, start)
    carry = eqx.error_if(carry, runaway, _runaway_message(bound))
    return state, carry


def consume(
    batcher: Batcher,
    fn: Callable[[Carry, Batch], Carry],
    carry: Carry,
    state: State,
    elements: Any,
    *,
    flush: bool = False,
) -> tuple[Carry, State]:
    """Feed a stack of elements to a batcher and run `carry = fn(carry, batch)` on every
    ready batch, in order: the un-jitted core of `scan`, for use inside your own `jit`.

    `fn` is called at exactly **one** site of the traced program, whatever the batcher, so
    a train step is compiled once. With a bulk `feed`, the batcher describes its batches
    (`Emissions`) and one `fori_loop` builds and consumes them; without one, one loop steps
    each element (and, if `flush`, flushes until nothing is ready) with `fn` under
    `lax.cond`.

    Every driver takes `(batcher, fn, carry, ...)` first where it has a consumer, then the
    batcher state, then the elements; and returns the user's values first and the batcher
    state last, like `scan`.

    Args:
        batcher: the batcher.
        fn: the consumer.
        carry: the consumer's initial carry.
        state: the batcher's state.
        elements: elements stacked along a leading axis (an `Element` or a PyTree).
        flush: drain the batcher after the last element (end of stream).

    Returns:
        `(carry, state)`.

    Raises:
        ValueError: `elements` is not one stack (leaves of different leading lengths, a
            0-d leaf, a list of elements), at trace time.
        TypeError: a bucketing batcher's `Bucketed` emission reaches a consumer of `Batch`es
            (wrap it in `jb.by_bucket`), at trace time.

    Run-time errors under your own `jit`: a batcher's run-time check (an `eqx.error_if`: a
    sequence longer than a row, a key out of range) and the bounded drain (a `flush` that
    never stops, law 3) raise JAX's `JaxRuntimeError` when the program runs; its text holds
    the check's sentence (after `EquinoxRuntimeError:`), but not the element's position,
    and equinox's advice to use `equinox.filter_jit` does not apply. To find the element,
    run the same `state` and `elements` through `jb.scan` or `jb.batch_all`: they raise a
    `jb.BatcherRuntimeError` whose first line names its position and scalar leaves.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2)
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> count = lambda n, batch: n + 1
        >>> run = jax.jit(lambda s, e: jb.consume(batcher, count, jnp.int32(0), s, e))
        >>> n, state = run(state, {"x": jnp.arange(5.0)})
        >>> int(n), int(state.count)
        (2, 1)
    """
    elements, fn = _stream(elements), _guard(fn)
    if batcher.feed is None:
        state, carry = _by_step(batcher, state, elements, flush, fn, carry)
        return carry, state
    state, emissions = batcher.feed(state, elements, flush)
    carry = jax.lax.fori_loop(0, emissions.count, lambda k, c: fn(c, emissions.batch(k)), carry)
    return carry, state


def drain(
    batcher: Batcher, fn: Callable[[Carry, Batch], Carry], carry: Carry, state: State
) -> tuple[Carry, State]:
    """Call `flush` until it emits nothing, passing every ready batch to `fn` (one site).

    The drain is bounded: one call per row the state can hold (the sum of its arrays'
    leading lengths) and two more; past that, a run-time error names law 3 (see `consume`
    for run-time errors under your own `jit`).

    Returns:
        `(carry, state)`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(4)
        >>> state, _ = batcher.step(batcher.init({"x": jnp.zeros(())}), {"x": jnp.ones(())})
        >>> valid, state = jb.drain(batcher, lambda n, b: n + b.num_valid, jnp.int32(0), state)
        >>> int(valid), int(state.count)
        (1, 0)
    """

    fn, bound = _guard(fn), _max_flushes(state)

    def body(c):
        state, carry, _, flushes = c
        state, emit = batcher.flush(state)
        return state, when_ready(emit, fn, carry), emit.ready, flushes + 1

    start = (state, carry, jnp.array(True), jnp.zeros((), jnp.int32))
    going = lambda c: c[2] & (c[3] < bound)  # noqa: E731
    state, carry, runaway, _ = jax.lax.while_loop(going, body, start)
    return eqx.error_if(carry, runaway, _runaway_message(bound)), state


def collect(
    batcher: Batcher, state: State, elements: Any, capacity: int, *, flush: bool = False
) -> tuple[PyTree, Int[Array, ""], State]:
    """Feed a stack of elements and return every ready batch, stacked: `consume` that
    materialises, for `batch_all` and `iterate` (call it inside `jit`).

    With a bulk `feed` the batches are written once, by `Emissions.stacked` or
    `jax.vmap(Emissions.batch)`; without one, each ready batch is written into its slot.

    Returns:
        `(batches, count, state)`: leaves `[capacity, ...]`; slots at or past `count` have an
        all-False `valid_mask` (their data is unspecified). `batches` is what the batcher's
        `Emit.batch` is, stacked: a `Batch`, or a tree of them (every mask is handled).
        Batches past `capacity` are counted in `count` but not stored: the caller checks
        `count <= capacity`.
    """
    elements = _stream(elements)
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
    return _mask_slots(out, slots < count), count, state


def _mask_slots(out: Any, keep: Array) -> Any:
    """Every `Batch` in `out` (stacked `[capacity, ...]`) with its rows masked off in the
    slots where `keep` is False. A tree, for batchers that emit one batch per shape."""

    def mask(b):
        if not isinstance(b, Batch):
            return b
        return eqx.tree_at(lambda b: b.valid_mask, b, b.valid_mask & rows_mask(keep, b.valid_mask))

    return jax.tree.map(mask, out, is_leaf=lambda x: isinstance(x, Batch))


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _scan(batcher, fn, carry, elements, state, resident, key, flush):
    # `state` comes without its resident leaves (a pipeline's data), which are returned by
    # the caller, not by this program: returning them would copy them (`split_resident`).
    if state is None:  # built here: whole (a pipeline's data is then a constant of the program)
        state = batcher.init(row_spec(elements), key=key)
        return consume(batcher, fn, carry, state, elements, flush=flush)
    state = join_resident(state, resident)
    carry, state = consume(batcher, fn, carry, state, elements, flush=flush)
    return carry, split_resident(state)[0]


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
    (pass the returned state to the next call to continue a stream across calls). Called
    outside `jit`, it waits for its result, so that a failing run-time check is reported
    here, naming the element (`BatcherRuntimeError`).

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

    Raises:
        ValueError: `elements` is not one stack of elements (leaves of different leading
            lengths, a 0-d leaf, a list of elements).
        BatcherRuntimeError: a run-time check of the batcher refused an element (its
            position in `elements` and its scalar leaves are named on the first line), or
            the end-of-stream drain did not end (law 3).

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
    elements = _stream(elements)
    try:
        light, resident = split_resident(state)
        out = _scan(batcher, fn, carry, elements, light, resident, key, flush)
        if resident is not None:  # the caller's own arrays, not a copy
            out = (out[0], join_resident(out[1], resident))
        # Wait for the result, so that a run-time check failing on an accelerator (reported
        # when the program finishes) is explained here. Under an outer `jit` there is
        # nothing to wait for: its errors come from that `jit` (see `consume`).
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(out)):  # pyright: ignore
            jax.block_until_ready(out)
        return out
    except Exception as e:
        if _runtime_reason(e) is None:
            raise
        start = batcher.init(row_spec(elements), key=key) if state is None else state
        raise _explain(e, "jb.scan", batcher, start, elements, flush) from e


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
    out, count, _ = collect(batcher, state, elements, capacity, flush=True)
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
        ValueError: `max_batches` negative or not an int, `elements` not one stack of
            elements, or the stream produced more than `max_batches` batches (under an outer
            `jit`, an `eqx.error_if` run-time error).
        BatcherRuntimeError: a run-time check of the batcher refused an element (its
            position in `elements` is named on the first line), or the drain did not end.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batches, count = jb.batch_all(jb.fixed_size(4), {"x": jnp.arange(10)})
        >>> int(count), batches.data["x"].shape
        (3, (3, 4))
        >>> batches.valid_mask[2]
        Array([ True,  True, False, False], dtype=bool)
    """
    elements = _stream(elements)
    if max_batches is None:
        size = batch_spec(batcher, row_spec(elements), key=key).batch_size
        max_batches = math.ceil(_num_rows(elements) / size)
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 0:
        raise ValueError(f"`max_batches` must be a non-negative int, got {max_batches!r}.")
    try:
        batches, count = _batch_all(batcher, elements, key, max_batches)
    except Exception as e:
        if _runtime_reason(e) is None:
            raise
        start = batcher.init(row_spec(elements), key=key)
        raise _explain(e, "jb.batch_all", batcher, start, elements, True) from e
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


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _feed_light(batcher, light, resident, elements, flush, capacity):
    state = join_resident(light, resident)
    out, count, state = collect(batcher, state, elements, capacity, flush=flush)
    return out, count, split_resident(state)[0]


def _feed_chunk(batcher, state, elements, flush, capacity):
    """`collect` of one chunk, jitted; a state's resident leaves are not copied."""
    light, resident = split_resident(state)
    out, count, light = _feed_light(batcher, light, resident, elements, flush, capacity)
    return out, count, join_resident(light, resident)


@functools.partial(jax.jit, static_argnums=0)
def _flush_light(batcher, light, resident):
    state, emit = batcher.flush(join_resident(light, resident))
    return split_resident(state)[0], emit


def _flush(batcher, state):
    """One `flush`, jitted; a state's resident leaves are not copied."""
    light, resident = split_resident(state)
    light, emit = _flush_light(batcher, light, resident)
    return join_resident(light, resident), emit


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


def _check_numeric(row: Any, where: str) -> None:
    """Refuse a host row with a leaf that is not a number or an array of numbers."""
    for path, x in jax.tree_util.tree_flatten_with_path(row)[0]:
        if isinstance(x, jax.Array):
            continue
        try:
            kind = np.asarray(x).dtype.kind
        except (TypeError, ValueError):
            kind = "O"
        if kind in "OUS":
            raise TypeError(
                f"{where} leaf `{jax.tree_util.keystr(path) or 'element'}` is a "
                f"{type(x).__name__} ({x!r:.40}), not a number or an array of numbers; "
                "convert it on the host (tokenise text, encode labels as ints)."
            )


def _host(row: Any) -> Any:
    """`row` with every leaf that is not a JAX array as a NumPy array (Python and NumPy
    scalars keep their full precision, instead of becoming JAX's default dtypes)."""
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), row)


def _misfits(x: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Where the values of `x` do not fit `dtype` (a mask like `x`), or None if every value
    of `x`'s dtype casts without changing beyond a float's rounding."""
    if dtype.kind in "iu" and x.dtype.kind in "iu":
        info = np.iinfo(dtype)
        return (x < info.min) | (x > info.max)
    if dtype.kind == "f" and x.dtype.kind == "f":
        return np.isfinite(x) & (np.abs(x) > np.finfo(dtype).max)
    if dtype.kind == "c" and x.dtype.kind == "c":
        big = np.finfo(dtype).max
        return (np.isfinite(x.real) & (np.abs(x.real) > big)) | (
            np.isfinite(x.imag) & (np.abs(x.imag) > big)
        )
    return None


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
        self._error: BaseException | None = None  # sticky: rows may have been lost with it
        self._ragged_like: dict[str, tuple[Any, tuple[int, ...]]] = {}

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
        if self._error is not None:
            error = self._error
            raise RuntimeError(
                "This `jb.iterate` iterator stopped at an earlier error and does not go on "
                "(the rows it had read for the failing chunk would be lost): "
                f"{type(error).__name__}: {error}\nResume exactly from `checkpoint()` (it "
                "stands before the error): `jb.iterate(batcher, source, resume=checkpoint)` "
                "with a source that yields the same elements from the start."
            ) from error
        while not self._pending:
            if self._next is not None:  # the previous chunk was fully yielded: commit it
                self._state, self._position = self._next
                self._next, self._skip = None, 0
            if self._done:
                raise StopIteration
            try:
                self._run_chunk()
            except BaseException as e:
                # Nothing of the failing chunk was committed: `checkpoint()` stands before it.
                self._error = e
                raise
        self._skip += 1
        return self._pending.popleft()

    def _pad_ragged(
        self, rows: list[Any], offset: int = 0
    ) -> tuple[dict[str, np.ndarray], list[Any]]:
        """The `ragged` features of `rows` padded into one chunk array each (the payload's
        only copy) with their lengths; and the rows without those features."""
        if not self._ragged:
            return {}, rows
        padded = {}
        for name, (max_len, length_key) in self._ragged.items():
            arrays = []
            for i, row in enumerate(rows):
                where = f"source[{self._position + offset + i}]"
                if not isinstance(row, dict) or name not in row:
                    raise TypeError(
                        f"`ragged` names feature {name!r}, but {where} is "
                        f"not a dict holding it (got {type(row).__name__})."
                    )
                arrays.append(np.asarray(row[name]))
                if arrays[-1].ndim == 0 or len(arrays[-1]) > max_len:
                    raise ValueError(
                        f"{where}[{name!r}] has shape "
                        f"{arrays[-1].shape}; `ragged` pads {name!r} to at most {max_len} "
                        "entries along its first axis: raise that bound or cut it on the host."
                    )
                # One dtype and trailing shape for all rows (the first row's): no silent cast.
                dtype, trailing = self._ragged_like.setdefault(
                    name, (arrays[-1].dtype, arrays[-1].shape[1:])
                )
                if (arrays[-1].dtype, arrays[-1].shape[1:]) != (dtype, trailing):
                    raise TypeError(
                        f"{where}[{name!r}] has dtype {arrays[-1].dtype} and shape "
                        f"{arrays[-1].shape}, but the first row's has dtype {dtype} and "
                        f"trailing shape {trailing} (after the ragged axis): the rows of a "
                        "`ragged` feature must share one dtype and trailing shape. Cast them "
                        "to one dtype on the host."
                    )
            like = arrays[0]
            chunk = np.zeros((len(rows), max_len, *like.shape[1:]), like.dtype)
            for i, array in enumerate(arrays):
                chunk[i, : len(array)] = array
            padded[name] = chunk
            padded[length_key] = np.array([len(a) for a in arrays], np.int32)
        return padded, [{k: v for k, v in row.items() if k not in self._ragged} for row in rows]

    def _stack(self, rows: list[Any], offset: int = 0) -> Element:
        """Stack host rows leaf by leaf (numpy); on any mismatch, name the row that differs.
        `rows` start at `offset` in the current chunk."""
        padded, rows = self._pad_ragged(rows, offset)
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
            first = tree_spec(as_element(_host(self._pad_ragged([self._first])[1][0])))
            for i, row in enumerate(rows):
                where = f"source[{self._position + offset + i}]"
                _check_numeric(row, where)
                check_against_spec(first, as_element(_host(row)), what=where)
        element = as_element(stacked)
        return jax.tree_util.tree_map_with_path(
            lambda path, x, s: self._narrow(path, x, s.dtype, offset), element, self._spec
        )

    def _narrow(self, path: Any, x: np.ndarray, dtype: Any, offset: int) -> np.ndarray:
        """`x` cast to the batcher's `dtype` (int64 to int32 without x64, ...), refusing a
        value that does not fit, by its row and leaf: a cast must never change a value
        (beyond a float's rounding)."""
        if x.dtype == dtype:
            return x
        bad = _misfits(x, np.dtype(dtype))
        if bad is not None and bad.any():
            i = int(np.argmax(bad.reshape(len(x), -1).any(axis=1)))
            value = x[i] if x.ndim == 1 else x[i][bad[i]].flat[0]
            raise ValueError(
                f"source[{self._position + offset + i}] leaf "
                f"`element{jax.tree_util.keystr(path)}` holds {value!r} ({x.dtype}), which "
                f"does not fit the batcher's dtype {np.dtype(dtype).name} (JAX's dtype for "
                f"{x.dtype} rows, as `jax_enable_x64` is "
                f"{'on' if jax.config.jax_enable_x64 else 'off'}). Clip or cast it on the "
                "host, or turn on `jax_enable_x64`."
            )
        return x.astype(dtype, copy=False)

    def _start(self, first: Any) -> None:
        _check_numeric(first, f"source[{self._position}]")
        first = _host(first)  # numpy, so nothing is cast before `_narrow` checks it
        padded, rest = self._pad_ragged([first])
        row = {**rest[0], **{k: v[0] for k, v in padded.items()}} if padded else first
        # The rows' own dtypes (a leaf standing for each), so that stacking is checked
        # before any cast; `_narrow` then casts to `_spec`, refusing a value that changes.
        self._first = first
        self._row_spec = jax.tree.map(
            lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), row
        )
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

    def _feed(self, state, rows, offset=0, flush=False):
        try:
            out, count, state_after = _feed_chunk(
                self._batcher, state, rows, flush, self._max_batches
            )
            jax.block_until_ready(count)  # a run-time check fails here, inside the `try`
        except Exception as e:
            error = _explain(
                e,
                "jb.iterate",
                self._batcher,
                state,
                rows,
                flush,
                self._position + offset,
                "the source",
            )
            if error is None:
                raise
            raise error from e
        _check_room(count, self._max_batches, "max_batches_per_chunk")
        return state_after, _unstack(out)[: int(count)]

    def _drain(self, state):
        """`flush` until it emits nothing (law 3: one batch per call, so a batcher holding
        many batches, a shuffle buffer, needs no room for them); bounded, so a `flush` that
        never stops raises instead of hanging."""
        batches, bound = [], _max_flushes(state)
        for _ in range(bound):
            try:
                state, emit = _flush(self._batcher, state)
                ready = bool(jnp.any(jnp.asarray(emit.ready)))
            except Exception as e:
                reason = _runtime_reason(e)
                if reason is None:
                    raise
                raise BatcherRuntimeError(
                    f"`jb.iterate`: the end-of-stream `flush` failed a run-time check: {reason}",
                    None,
                    reason,
                ) from e
            if not ready:
                return state, batches
            batches.append(emit.batch)
        message = _runaway_message(bound)
        raise BatcherRuntimeError(f"`jb.iterate`: {message}", None, message)

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
                state, more = self._feed(state, self._stack(rows[i : i + 1], i), i)
                batches += more
            state, flushed = self._drain(state)
            batches += flushed
            self._done = True
        self._pending.extend(batches[self._skip :])
        self._next = (state, self._position + len(rows))


def iterate(
    batcher: Batcher,
    source: Any,  # Iterable[Any]: validated below, with a ValueError or TypeError
    *,
    chunk_size: int = 256,
    max_batches_per_chunk: Any = None,  # int | None: validated below, with a ValueError
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

    Raises:
        ValueError: a bad argument (`source` a string or a stacked stream, `chunk_size` or
            `max_batches_per_chunk` not a positive int), or, while iterating, a host value
            that does not fit the batcher's dtype (int64 `2**40` without x64, float64
            `1e300` as float32), named by its source index and leaf.
        TypeError: while iterating, rows of different structure, shapes or dtypes (ragged
            features included), named by source index and leaf.
        BatcherRuntimeError: while iterating, a run-time check of the batcher refused an
            element (its source index is named on the first line), or the drain did not
            end (law 3).

    Errors never lose rows silently: once `next()` has raised (a source error, a refused
    row), every later `next()` raises again, and `checkpoint()` still stands before the
    failing chunk, so `iterate(..., resume=checkpoint)` on a source that yields the same
    elements resumes exactly.

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
    if max_batches_per_chunk is not None and (
        isinstance(max_batches_per_chunk, bool)
        or not isinstance(max_batches_per_chunk, int)
        or max_batches_per_chunk < 1
    ):
        raise ValueError(
            "`max_batches_per_chunk` must be a positive int (room for the batches one chunk "
            f"emits) or None for the default, got {max_batches_per_chunk!r}."
        )
    if isinstance(source, str | bytes):
        raise ValueError(
            f"`source` must be an iterable of elements (dicts or PyTrees of arrays), got a "
            f"{type(source).__name__} ({source[:20]!r}), whose items are characters."
        )
    if isinstance(source, Mapping | Element):
        raise ValueError(
            f"`source` must be an iterable of elements, one per item, got a "
            f"{type(source).__name__}: a stacked stream. Batch a stack with `jb.scan` or "
            "`jb.batch_all`, or pass its rows, e.g. "
            "`(jax.tree.map(lambda x: x[i], stack) for i in range(n))`."
        )
    try:
        iter(source)  # a generator is not advanced; a `__getitem__` sequence counts
    except TypeError:
        raise TypeError(
            f"`source` must be an iterable of elements, got a {type(source).__name__}."
        ) from None
    return BatchIterator(batcher, source, chunk_size, max_batches_per_chunk, resume, key, ragged)

"""The batcher protocol: `Batcher`, its `init / step / flush / feed` functions, `Emit`,
`Emissions`, `Stats`.

A batcher is a `NamedTuple` of pure functions threading an explicit state, the way
`optax.GradientTransformation` is. Everything a batcher knows lives in its state (an
`eqx.Module`), so the state is also the checkpoint. Every state carries a `stats: Stats`
field, the counters behind `operation_stats`.

The one-call-site rule: a driver program calls the consumer (the user's train step, which
XLA compiles once per call site) at exactly one place. So a batcher never calls it. `step`
and `flush` return an `Emit`; the optional bulk path `feed` returns `Emissions`: how many
batches are ready and how to build batch `k`, planned on small scalars. The drivers
(`drivers.consume`) loop over `k` with the consumer at one site, and fold the end-of-stream
drain into that same loop (`feed(..., flush=True)`, or one loop that steps, then flushes).
`jaxbatch.testing.check_batcher` counts the consumer's traces to hold every batcher to it.
"""

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree, UInt32

from .batch import Batch

State = Any  # an eqx.Module with a `stats: Stats` field
Carry = Any  # whatever the consumer threads through


class Emit(NamedTuple):
    """What `step` and `flush` return beside the new state: the same shapes on every call.

    Attributes:
        batch: a `Batch` of the batcher's static shape. When `ready` is False its
            `valid_mask` is all False and its data is unspecified (clearing it would cost
            O(batch) per step).
        ready: scalar bool, True when `batch` is a real batch to consume.
    """

    batch: Batch
    ready: Bool[Array, ""]


@runtime_checkable
class InitFn(Protocol):
    """`init(element_spec, key=None) -> state`.

    `element_spec` is an example element or the same tree of `jax.ShapeDtypeStruct`s; it
    fixes every shape in the state. A stochastic batcher needs `key` and raises
    `ValueError` without it; a deterministic one ignores it.
    """

    def __call__(self, element_spec: Any, key: Any = None) -> State: ...


@runtime_checkable
class StepFn(Protocol):
    """`step(state, element) -> (state, Emit)`: take one element, emit at most one batch."""

    def __call__(self, state: State, element: Any) -> tuple[State, Emit]: ...


@runtime_checkable
class FlushFn(Protocol):
    """`flush(state) -> (state, Emit)`: at end of stream, emit at most one buffered batch.

    Call it until `ready` is False to drain every buffer (the drivers do this).
    """

    def __call__(self, state: State) -> tuple[State, Emit]: ...


class Emissions(NamedTuple):
    """The ready batches of one bulk `feed` call: counted and described, not yet built.

    The bulk path plans on small scalars (counts, lengths) how many batches it emits and
    where each row of batch `k` comes from; the driver then builds the batches where it
    needs them. That is how every driver program calls the consumer at exactly one site:
    `fori_loop(0, count, lambda k, c: fn(c, batch(k)))` in `scan`, `vmap(batch)` (or
    `stacked`) in `batch_all`.

    Attributes:
        count: scalar int32, the number of ready batches, in emission order.
        batch: `batch(k) -> Batch` for a scalar int32 `k`: ready batch `k` for
            `0 <= k < count`, exactly what `step` / `flush` would have emitted. For
            `k >= count` it must still be safe to call (any data) and its `valid_mask` must be
            all False. It must work under `vmap` over `k`.
        stacked: optional `stacked(capacity) -> Batch` with leaves `[capacity, ...]`: batches
            `0 .. capacity-1` at once, when the batcher can build them all in one pass (for
            `fixed_size`, one pad-and-reshape of the stream). Slot `k` equals `batch(k)` for
            `k < count`; the driver masks the slots at or past `count`. When None the drivers
            use `jax.vmap(batch)`.
    """

    count: Int[Array, ""]
    batch: Callable[[Int[Array, ""]], Batch]
    stacked: Callable[[int], Batch] | None = None


@runtime_checkable
class FeedFn(Protocol):
    """`feed(state, elements, flush=False) -> (state, Emissions)`: the bulk path.

    `elements` is a stack of elements (leading axis); `flush` is a static Python bool: when
    True, the call also drains the batcher as repeated `flush` calls would. The batches that
    `Emissions` describes, their order, the state's buffered count and its `Stats` are
    exactly those of calling `step` on each element in turn (then `flush` until it emits
    nothing, if `flush`); buffer rows that are unspecified may differ.

    A bulk path never calls the consumer: it returns `Emissions`, and the driver calls the
    consumer at one site for every batch. Decide on small scalars first, then move payload
    with slices and gathers (DESIGN.md, "Plan on metadata, then gather").
    """

    def __call__(
        self, state: State, elements: Any, flush: bool = False
    ) -> tuple[State, Emissions]: ...


class Batcher(NamedTuple):
    """A batcher: pure functions over an explicit state. Build one with a factory.

    Attributes:
        init: `InitFn`, builds the state from an element spec (and a key if stochastic).
        step: `StepFn`, one element in, at most one batch out.
        flush: `FlushFn`, end of stream: at most one batch out per call.
        feed: optional `FeedFn`, the bulk path: many elements in, their ready batches
            described as `Emissions`. When None, the drivers step one element at a time.

    The state comes first, so `jax.lax.scan(batcher.step, state, elements)` needs no lambda.

    Examples:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2)
        >>> state = batcher.init({"x": jnp.zeros(3)})
        >>> state, emits = jax.lax.scan(batcher.step, state, {"x": jnp.ones((4, 3))})
        >>> emits.ready
        Array([False,  True, False,  True], dtype=bool)
    """

    init: InitFn
    step: StepFn
    flush: FlushFn
    feed: FeedFn | None = None


# --------------------------------------------------------------------------- counters


class Counter(eqx.Module):
    """A count that never wraps: 64 bits held as two uint32 words (no `jax_enable_x64`).

    Advance it with `add` (or sum many increments at once with `Counter.total`); read it
    with `int()` outside `jit`. A count that would pass `2**64 - 1` saturates there: it
    stays at `2**64 - 1` (`Counter.MAX`) instead of wrapping to a small number, so a
    saturated count is visibly wrong, never silently small.
    A stack of counters (the per-device states of `jb.scan_per_device`) reads as their
    total.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> c = jb.Counter.of(2**32 - 1).add(3)
        >>> int(c)
        4294967298
        >>> int(jb.Counter.total(jnp.full(3, 2**31, jnp.uint32)))  # no 32-bit overflow
        6442450944
        >>> int(jb.Counter.of(jb.Counter.MAX).add(1)) == jb.Counter.MAX  # saturates
        True
    """

    lo: UInt32[Array, "*shape"]
    hi: UInt32[Array, "*shape"]

    MAX = 2**64 - 1  # where a count saturates

    @classmethod
    def of(cls, value: int = 0) -> "Counter":
        """A counter holding the Python int `value` (0 <= value < 2**64)."""
        if not 0 <= value < 2**64:
            raise ValueError(f"`value` must be in [0, 2**64), got {value}.")
        return cls(lo=jnp.uint32(value & 0xFFFFFFFF), hi=jnp.uint32(value >> 32))

    @classmethod
    def total(cls, values: ArrayLike) -> "Counter":
        """The exact sum of an array of non-negative integers (each below 2**32, or any
        64-bit value under `jax_enable_x64`) as a `Counter`: no 32-bit overflow however many
        there are, saturating at `Counter.MAX`."""
        lo, hi = _words(jnp.ravel(jnp.asarray(values)))
        zero = jnp.zeros((), jnp.uint32)

        def plus(a, b):
            total, over = _plus((a[0], a[1]), (b[0], b[1]))
            return _saturate(total, over)

        return cls(*jax.lax.reduce((lo, hi), (zero, zero), plus, (0,)))

    def add(self, n: "ArrayLike | Counter") -> "Counter":
        """This count plus `n`: a non-negative integer (below 2**32, or any 64-bit value
        under `jax_enable_x64`), a bool, or another `Counter`; saturates at `Counter.MAX`."""
        if isinstance(n, Counter):
            other = (n.lo, n.hi)
        elif isinstance(n, int) and not isinstance(n, bool):  # a Python int: exact, any size
            exact = Counter.of(n)
            other = (exact.lo, exact.hi)
        else:
            other = _words(jnp.asarray(n))
        return Counter(*_saturate(*_plus((self.lo, self.hi), other)))

    def __add__(self, other: "Counter") -> "Counter":
        return self.add(other)

    def __int__(self) -> int:
        # A stack of counters (per-device states, `[S]`) reads as their total.
        his, los = np.ravel(self.hi).tolist(), np.ravel(self.lo).tolist()
        return sum((int(hi) << 32) | int(lo) for hi, lo in zip(his, los))


def _words(n: Array) -> tuple[Array, Array]:
    """A non-negative integer (or bool) array as its (low, high) uint32 words."""
    if jnp.dtype(n.dtype).itemsize == 8:  # int64 / uint64 under `jax_enable_x64`
        n = n.astype(jnp.uint64)
        return (n & 0xFFFFFFFF).astype(jnp.uint32), (n >> 32).astype(jnp.uint32)
    return n.astype(jnp.uint32), jnp.zeros(n.shape, jnp.uint32)


def _plus(a: tuple[Array, Array], b: tuple[Array, Array]) -> tuple[tuple[Array, Array], Array]:
    """`a + b` on (low, high) words, and whether it passed 2**64 - 1."""
    lo = a[0] + b[0]
    hi = a[1] + b[1]
    hi_carried = hi + (lo < a[0]).astype(jnp.uint32)
    return (lo, hi_carried), (hi < a[1]) | (hi_carried < hi)


def _saturate(words: tuple[Array, Array], over: Array) -> tuple[Array, Array]:
    top = jnp.full(jnp.shape(over), 0xFFFFFFFF, jnp.uint32)
    return jnp.where(over, top, words[0]), jnp.where(over, top, words[1])


COUNTERS = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")


class Stats(eqx.Module):
    """The counters every batcher state carries (field `stats`), and the state's fingerprint.

    Attributes:
        accepted: elements taken in by `step` / `feed`.
        skipped: elements refused on arrival (never buffered, never emitted).
        dropped: elements accepted and then discarded (e.g. `drop_remainder`).
        emitted: elements emitted in valid rows of ready batches.
        batches: ready batches emitted.
        padded: padding rows in ready batches.
        config: static: the configuration the state was built for, set by `init`: the
            factory, its arguments and the element spec (`"fixed_size(batch_size=2, ...);
            element ..."`). `step` / `flush` / `feed` refuse a state of another
            configuration, and `jb.load_state` / `jb.load_distributed` a file of one
            (`TypeError` / `ValueError` naming both). Empty: unchecked (a state built by
            hand).

    Conservation: `accepted == emitted + dropped + (elements still buffered)`.
    """

    accepted: Counter
    skipped: Counter
    dropped: Counter
    emitted: Counter
    batches: Counter
    padded: Counter
    config: str = eqx.field(static=True, default="")

    @classmethod
    def zeros(cls, config: str = "") -> "Stats":
        """All counters at zero, each its own arrays (a state can be donated to `jit`)."""
        return cls(*(Counter.of(0) for _ in COUNTERS), config=config)

    def add(self, **increments: "ArrayLike | Counter") -> "Stats":
        """Advance the named counters, e.g. `stats.add(accepted=1, batches=ready)`.

        Increments are what `Counter.add` takes: non-negative integers (or bools) below
        2**32, traced or not, or `Counter`s (e.g. `Counter.total` of a per-call vector).
        """
        counters = {name: getattr(self, name) for name in COUNTERS}
        unknown = set(increments) - set(counters)
        if unknown:
            raise ValueError(f"Unknown counters {sorted(unknown)}; see `Stats`.")
        counters.update({k: counters[k].add(n) for k, n in increments.items()})
        return Stats(**counters, config=self.config)


# --------------------------------------------------------------------------- fingerprints


def describe(name: str, **arguments: Any) -> str:
    """A factory's configuration as a short canonical text, e.g. `"fixed_size(batch_size=2,
    drop_remainder=False, pad_value=0)"`: validated Python values by `repr`, functions by
    their qualified name (never an address, so a checkpoint compares across processes)."""

    def text(value: Any) -> str:
        if isinstance(value, Batcher):
            return "<batcher>"
        if callable(value) and not isinstance(value, type):
            return getattr(value, "__qualname__", type(value).__qualname__)
        return _ADDRESS.sub("", repr(value))

    return f"{name}({', '.join(f'{k}={text(v)}' for k, v in arguments.items())})"


def fingerprint(config: str, spec: Any) -> str:
    """`config` (from `describe`) and the element spec: what `init` stores in `Stats.config`."""
    flat = jax.tree_util.tree_flatten_with_path(spec)[0]
    leaves = ", ".join(
        f"{jax.tree_util.keystr(path)}: {jnp.dtype(leaf.dtype).name}{list(jnp.shape(leaf))}"
        for path, leaf in flat
    )
    return f"{config}; element {{{leaves}}}"


_SPEC_MARK = "; element "
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # differs from process to process


def check_state(state: Any, state_type: type, config: str, what: str = "state") -> None:
    """Refuse, at trace time, a `state` that is not a `state_type` built by a batcher of
    this `config` (a `describe` text): a `TypeError` naming both configurations."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"`{what}` must be a `{state_type.__name__}` from the `init` of `{config}`, got "
            f"{_state_name(state)}. Pass the state this batcher's `init` built (each batcher "
            "steps only its own state)."
        )
    stats = getattr(state, "stats", None)
    got = getattr(stats, "config", "")
    if got and got.split(_SPEC_MARK, 1)[0] != config:
        raise TypeError(
            f"`{what}` was built for another configuration: the state is of `{got}`, this "
            f"batcher is `{config}`. Step a state with the batcher whose `init` built it "
            "(or build a new state with this batcher's `init`)."
        )


def _state_name(state: Any) -> str:
    config = getattr(getattr(state, "stats", None), "config", "")
    return f"a {type(state).__name__}" + (f" of `{config}`" if config else "")


def configs_of(tree: PyTree) -> list[str]:
    """Every `Stats.config` in `tree`, in tree order (for the checkpoint checks)."""
    is_stats = lambda x: isinstance(x, Stats)  # noqa: E731
    return [x.config for x in jax.tree.leaves(tree, is_leaf=is_stats) if is_stats(x)]


def operation_stats(state: State) -> dict[str, Counter]:
    """The state's counters by name; each is a `Counter`, readable with `int()`.

    Keys: `applied_count` (elements accepted), `skipped_count`, `received_count`
    (accepted + skipped), `dropped_count`, `emitted_count`, `batch_count`,
    `padded_count`. Works under `jit` (returns arrays); read with `int()` outside.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2)
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> state, _ = batcher.step(state, {"x": jnp.ones(())})
        >>> {k: int(v) for k, v in jb.operation_stats(state).items()}["applied_count"]
        1
    """
    s = state.stats
    return {
        "applied_count": s.accepted,
        "skipped_count": s.skipped,
        "received_count": s.accepted + s.skipped,
        "dropped_count": s.dropped,
        "emitted_count": s.emitted,
        "batch_count": s.batches,
        "padded_count": s.padded,
    }


def reset_operation_stats(state: State) -> State:
    """A copy of `state` with every counter of its `stats` at zero (buffers untouched).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.fixed_size(2)
        >>> state, _ = batcher.step(batcher.init({"x": jnp.zeros(())}), {"x": jnp.ones(())})
        >>> int(jb.operation_stats(jb.reset_operation_stats(state))["applied_count"])
        0
    """
    return eqx.tree_at(lambda s: s.stats, state, Stats.zeros(state.stats.config))


# --------------------------------------------------------------------------- consuming


def split_resident(state: State) -> tuple[State, PyTree]:
    """`(light, resident)`: a state apart from its *resident* leaves, those no `step`,
    `flush` or `feed` ever changes (a pipeline's dataset), or `(state, None)`.

    A jitted program that returns an array it was given returns a copy of it unless the
    argument is donated. The drivers' own programs therefore take the resident leaves as
    a separate argument and return only `light`; `join_resident` puts the caller's arrays
    back, so a call never copies the data. A state type opts in with two methods,
    `resident_split()` and `resident_join(resident)`. Call it in your own driver the same
    way: pass `light` and `resident` to the jitted program, return `light` only.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> pipe = jb.pipeline({"x": jnp.arange(6)}, jb.fixed_size(2),
        ...                    order=jb.epochs(shuffle=False))
        >>> state = pipe.init(jnp.int32(0))
        >>> light, data = jb.split_resident(state)
        >>> light.data is None, data["x"].shape
        (True, (6,))
        >>> jb.join_resident(light, data).data is data
        True
        >>> jb.split_resident(jb.fixed_size(2).init(jnp.zeros(())))[1] is None
        True
    """
    split = getattr(state, "resident_split", None)
    return split() if split is not None else (state, None)


def join_resident(light: State, resident: PyTree) -> State:
    """The inverse of `split_resident`."""
    return light if resident is None else light.resident_join(resident)


def when_ready(emit: Emit, fn: Callable[[Carry, Batch], Carry], carry: Carry) -> Carry:
    """`fn(carry, emit.batch)` if `emit.ready`, else `carry`, under `lax.cond`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batch = jb.Batch.from_parts({"x": jnp.ones(2)})
        >>> add = lambda total, b: total + jnp.sum(b.data["x"])
        >>> jb.when_ready(jb.Emit(batch, jnp.array(True)), add, jnp.float32(0))
        Array(2., dtype=float32)
        >>> jb.when_ready(jb.Emit(batch, jnp.array(False)), add, jnp.float32(0))
        Array(0., dtype=float32)
    """
    return jax.lax.cond(emit.ready, fn, lambda c, _: c, carry, emit.batch)


# --------------------------------------------------------------------------- helpers


def own_buffers(emit: Emit, state: State) -> Emit:
    """`emit` with a copy of every array that is also an array of the new `state`.

    Only outside `jit` (under it, leaves are tracers and this is a no-op): a batch must not
    be the state's own buffer, or donating the state to a jitted step (or writing into it)
    would take the batch the caller still holds.
    """
    held = {
        id(x)
        for x in jax.tree.leaves(state)
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
    }
    if not held:
        return emit
    return jax.tree.map(lambda x: jnp.copy(x) if id(x) in held else x, emit)


def stack_spec(spec: PyTree, n: int) -> PyTree:
    """Zeros of shape `[n, *leaf.shape]`, one array per leaf of `spec`.

    A buffer too large for the device raises `MemoryError` naming its shape and size (the
    factories allocate nothing, so a huge size fails here, at `init`).
    """

    def zeros(s: Any) -> Array:
        try:
            return jnp.zeros((n, *s.shape), s.dtype)
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            size = n * math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
            raise MemoryError(
                f"`init` cannot allocate a buffer of shape {(n, *s.shape)} and dtype "
                f"{jnp.dtype(s.dtype).name} ({size:,} bytes) on the device; lower the "
                "batcher's size (`batch_size`, `buffer_size`, `num_rows`, ...) or the element's."
            ) from None

    return jax.tree.map(zeros, spec)


def prng_key(key: Any, who: str) -> Array:
    """`key` as one typed PRNG key, for the `init` of a stochastic batcher named `who`.

    A raw uint32 `jax.random.PRNGKey` is wrapped; `None`, a non-key or a batch of keys is a
    `ValueError` saying what to pass.
    """
    if key is None:
        raise ValueError(
            f"`{who}` is stochastic: `init` needs a PRNG key, got `key=None`. Pass one, e.g. "
            "`batcher.init(spec, key=jax.random.key(0))` (or `jb.scan(..., key=...)`, "
            "`jb.batch_all(..., key=...)`)."
        )
    if not isinstance(key, jax.Array | jax.ShapeDtypeStruct):
        raise ValueError(
            f"`key` must be a JAX PRNG key such as `jax.random.key(0)`, got {type(key).__name__}."
        )
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim != 1:
            raise ValueError(
                "`key` must be a typed key (`jax.random.key(0)`) or a raw uint32 key "
                f"(`jax.random.PRNGKey(0)`), got shape {key.shape} and dtype {key.dtype}."
            )
        key = jax.random.wrap_key_data(key)
    if key.shape != ():
        raise ValueError(
            f"`key` must be one key (shape ()), got shape {key.shape}; for several independent "
            "streams `jax.vmap` the init over a batch of keys."
        )
    return jnp.copy(key)  # the state's own: donating the state leaves the caller's key alive


def stream_length(stacked: PyTree, what: str = "elements") -> int:
    """The number of rows of a stacked tree: the one leading length of all its leaves.

    The one place every driver and every bulk `feed` checks a stream (through `row_spec`):
    a tree whose leaves disagree on their leading length, or with a 0-d leaf, is not a
    stack of elements, and batching it would drop or invent rows.

    Raises:
        ValueError: a leaf is 0-d, or the leaves' leading lengths differ (each leaf and its
            length are named).
    """
    flat = jax.tree_util.tree_flatten_with_path(stacked)[0]
    lengths: dict[int, list[str]] = {}
    for path, x in flat:
        shape = jnp.shape(x)
        name = f"`{what}{jax.tree_util.keystr(path)}`"
        if not shape:
            raise ValueError(
                f"{what} leaf {name} is 0-d (shape ()), but a stream stacks its elements "
                "along a leading axis, so every leaf needs shape [n, ...]. For one element, "
                "pass `jax.tree.map(lambda x: x[None], element)` or call `batcher.step`."
            )
        lengths.setdefault(shape[0], []).append(name)
    if len(lengths) > 1:
        listed = "; ".join(f"{', '.join(names)}: {n}" for n, names in lengths.items())
        raise ValueError(
            f"The leaves of `{what}` have different leading lengths ({listed}), so they are "
            "not one stream of elements: every leaf needs the same number of rows n along "
            "axis 0. Cut or pad them to one length."
        )
    return next(iter(lengths), 0)


def row_spec(stacked: PyTree, what: str = "elements") -> PyTree:
    """The spec of one row of a stacked tree (leading axis removed); checks that it is one
    stack (`stream_length`)."""
    stream_length(stacked, what)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], x.dtype), stacked)

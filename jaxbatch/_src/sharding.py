"""Scale out: batches on a `jax.sharding.Mesh`, one batcher per device, many hosts.

Everything here is JAX's own distributed engine, nothing home-made:

* `shard` places a `Batch` so that its batch axis is split across a mesh axis
  (`NamedSharding`), `batch_sharding` says where each leaf goes (for `jit`'s
  `in_shardings` / `out_shardings`), and `global_batch` builds one global batch from each
  process's local rows (`jax.make_array_from_process_local_data`).
* Per-device streams: the stream is dealt out like cards, element `i` to stream `i % S` for
  the `S` devices of the mesh axis (`stream_indices` says which elements a process reads,
  `device_streams` assembles the global `[S, n, ...]` array from each process's rows). One
  batcher state per stream, with a leading stream axis sharded over the mesh, is stepped
  under `jax.shard_map` (`scan_per_device`), so every device batches its own elements with
  no cross-device traffic. The consumer sees one *global* batch (the devices' batches side
  by side, still sharded, never gathered) at one call site, so a data-parallel train step is
  an ordinary function that XLA partitions.

Dealing elements round-robin makes the global batch of `S` streams of `fixed_size(b)` hold
exactly the elements of the single-device `fixed_size(S * b)` batch (rows in another order).
"""

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import PyTree

from .base import Batcher, Carry, Counter, Emit, State, when_ready
from .batch import Batch, rows_mask
from .drivers import (
    BatcherRuntimeError,
    _check_room,
    _explain,
    _locate,
    _mask_slots,
    _max_flushes,
    _runaway_message,
    _runtime_reason,
    collect,
    drain,
)
from .element import Element, as_element

_WHOLE_BATCH_FIELDS = ("batch_state", "batch_metadata")


def _is_batch(x: Any) -> bool:
    return isinstance(x, Batch)


def _check_mesh(mesh: Any, axis: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}; build one with "
            '`jax.make_mesh((jax.device_count(),), ("data",))`.'
        )
    names = axis if isinstance(axis, tuple) else (axis,)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
        raise ValueError(
            f"`axis` {axis!r} is not an axis of the mesh, whose axes are "
            f"{tuple(mesh.axis_names)}; pass one of them."
        )


def _mesh_and_axis(mesh_or_sharding: Any, axis: Any) -> tuple[Mesh, Any]:
    """The mesh and the batch axis' spec entry (a name, or a tuple of names)."""
    if isinstance(mesh_or_sharding, NamedSharding):
        spec = mesh_or_sharding.spec
        entry = spec[0] if len(spec) else None
        if entry is None:
            raise ValueError(
                f"The sharding's spec {spec} does not split axis 0, the batch axis; pass a "
                'sharding such as `NamedSharding(mesh, P("data"))`, or a mesh and `axis`.'
            )
        if axis is not None and axis != entry:
            raise ValueError(
                f"`axis` {axis!r} differs from the sharding's batch axis {entry!r}; give "
                "either a mesh and `axis`, or a sharding alone."
            )
        mesh, axis = mesh_or_sharding.mesh, entry
    else:
        mesh, axis = mesh_or_sharding, "data" if axis is None else axis
    _check_mesh(mesh, axis)
    return mesh, axis


def _constrain(tree: PyTree, sharding: NamedSharding) -> PyTree:
    """Pin `tree` (under `jit`) to `sharding`: `reshard` on Explicit mesh axes (the default
    of `jax.make_mesh`), `with_sharding_constraint` on Auto ones."""
    mesh = sharding.mesh
    names = [n for entry in sharding.spec if entry is not None for n in np.atleast_1d(entry)]
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    if any(types[n] == jax.sharding.AxisType.Explicit for n in names):
        return jax.sharding.reshard(tree, sharding)
    return jax.lax.with_sharding_constraint(tree, sharding)


def _on(mesh: Mesh) -> Any:
    """`jax.set_mesh(mesh)`, unless it is already the mesh in context (as it must be when the
    caller traces us inside its own `jit`: `set_mesh` only works outside)."""
    if jax.sharding.get_abstract_mesh() == mesh.abstract_mesh:
        return contextlib.nullcontext()
    try:
        return jax.set_mesh(mesh)
    except ValueError as e:
        raise ValueError(
            f"{e} To call this inside your own `jit`, enter the mesh first: "
            "`with jax.set_mesh(mesh): jax.jit(...)(...)`."
        ) from None


def _axis_size(mesh: Mesh, axis: Any) -> int:
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[a] for a in names)


def _sizes_that_work(size: int, parts: int) -> str:
    below, above = (size // parts) * parts, (size // parts + 1) * parts
    near = f"{above}" if below == 0 else f"{below} or {above}"
    return f"a multiple of {parts}, such as {near}"


def _check_divisible(size: int, parts: int, what: str, axis: Any) -> None:
    if size % parts:
        raise ValueError(
            f"{what} is {size}, which mesh axis {axis!r} ({parts} devices) cannot split "
            f"evenly; use {_sizes_that_work(size, parts)} (padding rows are masked, so a "
            "batcher may round its batch size up)."
        )


def _shardings(batch: PyTree, mesh: Mesh, axis: Any, check: bool = True) -> PyTree:
    parts = _axis_size(mesh, axis)
    rows, whole = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())

    def one(b: Any) -> Any:
        if not isinstance(b, Batch):
            return jax.tree.map(lambda _: whole, b)
        if check:
            _check_divisible(b.batch_size, parts, "The batch size", axis)

        def place(path: Any, _: Any) -> NamedSharding:
            field = getattr(path[0], "name", None) if path else None
            return whole if field in _WHOLE_BATCH_FIELDS else rows

        return jax.tree_util.tree_map_with_path(place, b)

    return jax.tree.map(one, batch, is_leaf=_is_batch)


def batch_sharding(batch: PyTree, mesh_or_sharding: Any, axis: Any = None) -> PyTree:
    """Where `shard` puts each leaf: the tree of `batch` with a `NamedSharding` per leaf.

    Rows (data, states, metadata, `valid_mask`) are split along `axis`; `batch_state` and
    `batch_metadata` are replicated. Use it for `jax.jit(..., in_shardings=...,
    out_shardings=...)` or `jax.make_array_from_process_local_data`.

    Args:
        batch: a `Batch`, a tree of `Batch`es, or their `jax.eval_shape`.
        mesh_or_sharding: a `jax.sharding.Mesh`, or a `NamedSharding` whose spec's first
            entry names the batch axis (then leave `axis` out).
        axis: the mesh axis (or tuple of axes) that splits the batch axis; default
            `"data"` with a mesh.

    Raises:
        ValueError: `axis` not in the mesh, or a batch size the axis cannot split evenly
            (the message says which sizes would work).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> batch = jb.Batch.from_parts({"x": jnp.zeros((8, 3))})
        >>> jb.batch_sharding(batch, mesh).data["x"].spec
        P('data',)
    """
    mesh, axis = _mesh_and_axis(mesh_or_sharding, axis)
    return _shardings(batch, mesh, axis)


def shard(batch: PyTree, mesh_or_sharding: Any, axis: Any = None) -> PyTree:
    """Place a `Batch` so that its batch axis is split across a mesh axis.

    Every row leaf (data, states, metadata, `valid_mask`) gets
    `NamedSharding(mesh, P(axis))`: device `d` of the axis holds rows
    `d * b / D : (d + 1) * b / D` for a batch of `b` rows on `D` devices, exactly the
    `split_for_devices(D)[d]` part. `batch_state` and `batch_metadata` are replicated.
    Outside `jit` this is `jax.device_put` (in several processes, every process must pass
    the same batch: use `global_batch` for process-local rows); under `jit` it is
    `jax.lax.with_sharding_constraint`.

    Args:
        batch: a `Batch` or a tree of `Batch`es.
        mesh_or_sharding: a `jax.sharding.Mesh`, or a `NamedSharding` for the batch axis.
        axis: the mesh axis (or tuple of axes) for the batch axis; default `"data"`.

    Returns:
        The same batch, placed.

    Raises:
        ValueError: the batch size is not divisible by the axis size (the message lists
            sizes that would work), or `axis` is not a mesh axis.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> batch = jb.shard(jb.Batch.from_parts({"x": jnp.arange(8.0)}), mesh)
        >>> batch.data["x"].sharding.spec
        P('data',)
        >>> jb.shard(batch, mesh, axis="batch")
        Traceback (most recent call last):
        ...
        ValueError: `axis` 'batch' is not an axis of the mesh, whose axes are ('data',); ...
    """
    shardings = batch_sharding(batch, mesh_or_sharding, axis)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(batch)):  # pyright: ignore
        return jax.tree.map(_constrain, batch, shardings)
    return jax.device_put(batch, shardings)


def _row_blocks_here(mesh: Mesh, axis: Any) -> int:
    """How many of the axis' row blocks this process's devices hold."""
    parts = _axis_size(mesh, axis)
    where = NamedSharding(mesh, P(axis)).addressable_devices_indices_map((parts,))
    return len({index[0].start for index in where.values()})


def global_batch(local_batch: PyTree, mesh_or_sharding: Any, axis: Any = None) -> PyTree:
    """One global batch from each process's local rows (`make_array_from_process_local_data`).

    Every process passes the rows that its own devices on `axis` hold, in mesh order; the
    global batch has `local batch size * (axis devices / this process's axis devices)` rows,
    sharded like `shard`'s output. `batch_state` and `batch_metadata` must be the same on
    every process (they are replicated). In one process, this is `shard`.

    Args:
        local_batch: this process's `Batch` (or tree of `Batch`es), on the host or a device.
        mesh_or_sharding: a `jax.sharding.Mesh` spanning the processes, or a `NamedSharding`.
        axis: the mesh axis for the batch axis; default `"data"`.

    Raises:
        ValueError: the local batch size is not divisible by this process's devices on
            the axis, or `axis` is not a mesh axis.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> local = jb.Batch.from_parts({"x": jnp.arange(8.0)})  # one process: local == global
        >>> jb.global_batch(local, mesh).batch_size
        8
    """
    mesh, axis = _mesh_and_axis(mesh_or_sharding, axis)
    here, parts = _row_blocks_here(mesh, axis), _axis_size(mesh, axis)

    def one(b: Any) -> Any:
        if not isinstance(b, Batch):
            return b
        _check_divisible(
            b.batch_size, here, f"Process {jax.process_index()}'s local batch size", axis
        )
        size = b.batch_size // here * parts
        rows = NamedSharding(mesh, P(axis))

        def put(x: Any, s: NamedSharding) -> jax.Array:
            x = np.asarray(x)
            shape = (size, *x.shape[1:]) if s == rows else x.shape
            return jax.make_array_from_process_local_data(s, x, shape)

        return jax.tree.map(put, b, _shardings(b, mesh, axis, check=False))

    return jax.tree.map(one, local_batch, is_leaf=_is_batch)


# --------------------------------------------------------------------------- streams


def _local_positions(mesh: Mesh, axis: str) -> list[int]:
    """The positions along `axis` whose devices include one of this process's devices."""
    devices = np.moveaxis(mesh.devices, list(mesh.axis_names).index(axis), 0)
    me = jax.process_index()
    owners = [{d.process_index for d in devices[a : a + 1].flat} for a in range(len(devices))]
    here = [a for a, processes in enumerate(owners) if me in processes]
    if not here:
        raise ValueError(
            f"Process {me} has no device on mesh axis {axis!r}: build the mesh from all "
            "processes' devices (`jax.make_mesh` after `jax.distributed.initialize`)."
        )
    if here != list(range(here[0], here[0] + len(here))):
        raise ValueError(
            f"Process {me}'s devices sit at positions {here} of mesh axis {axis!r}, not one "
            "contiguous run; build the mesh with `jax.make_mesh`, which keeps each process's "
            "devices together."
        )
    return here


def stream_indices(
    num_elements: int, mesh: Mesh, axis: str = "data", *, start: int = 0
) -> np.ndarray:
    """Which stream elements this process reads: element sharding by process index.

    The stream is dealt out like cards: element `i` goes to stream `i % S`, one stream per
    device along `axis` (`S` of them). This process reads the streams of its own devices.
    Read those elements (`stream[indices]`, or the records from storage) and pass them to
    `device_streams`.

    Args:
        num_elements: the length of the whole stream (all processes together).
        mesh: the global mesh.
        axis: the mesh axis whose devices each batch their own stream.
        start: the global position of the first element to deal (e.g. where a stream
            read on another number of devices stopped: `resume_per_device`).

    Returns:
        int64 array `[local streams, num_elements // S]`: row `r` lists, in order, the
        elements of this process's `r`-th stream (offset by `start`).

    Raises:
        ValueError: `num_elements` not divisible by `S` (the message says which lengths
            work), `axis` not in the mesh, or this process has no device on it.

    Examples:
        >>> import jax
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> idx = jb.stream_indices(8 * jax.device_count(), mesh)
        >>> idx.shape == (jax.device_count(), 8), idx[0, :2].tolist() == [0, jax.device_count()]
        (True, True)
    """
    _check_mesh(mesh, axis)
    streams = mesh.shape[axis]
    if isinstance(num_elements, bool) or not isinstance(num_elements, int) or num_elements < 0:
        raise ValueError(f"`num_elements` must be a non-negative int, got {num_elements!r}.")
    _check_divisible(num_elements, streams, "`num_elements`", axis)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"`start` must be a non-negative int, got {start!r}.")
    positions = np.asarray(_local_positions(mesh, axis), dtype=np.int64) + start
    return positions[:, None] + streams * np.arange(num_elements // streams, dtype=np.int64)


def device_streams(local_streams: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """The global array of per-device streams, built from this process's streams.

    Args:
        local_streams: a PyTree (or `Element`) of host or device arrays with leaves
            `[local streams, n, ...]`: this process's streams, in mesh order (e.g. the
            stream's elements at `stream_indices(...)`).
        mesh: the global mesh.
        axis: the mesh axis with one stream per device.

    Returns:
        The same tree with leaves `[S, n, ...]`, sharded `P(axis)`: device `d` holds stream
        `d`. Feed it to `scan_per_device`.

    Raises:
        ValueError: the leading size is not the number of this process's devices on `axis`
            (a mismatch of processes or devices), or the leaves disagree on `n`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> stream = {"x": jnp.arange(4.0 * jax.device_count())}
        >>> idx = jb.stream_indices(4 * jax.device_count(), mesh)
        >>> streams = jb.device_streams(jax.tree.map(lambda x: x[idx], stream), mesh)
        >>> streams["x"].shape == (jax.device_count(), 4)
        True
    """
    _check_mesh(mesh, axis)
    here = _local_positions(mesh, axis)
    sharding = NamedSharding(mesh, P(axis))
    leaves = jax.tree.leaves(local_streams)
    for path, x in jax.tree_util.tree_flatten_with_path(local_streams)[0]:
        shape = np.shape(x)
        if len(shape) < 2 or shape[0] != len(here) or shape[1] != np.shape(leaves[0])[1]:
            raise ValueError(
                f"`local_streams` leaf `{jax.tree_util.keystr(path)}` has shape {shape}, but "
                f"process {jax.process_index()} of {jax.process_count()} holds "
                f"{len(here)} of the {mesh.shape[axis]} devices on mesh axis {axis!r}, so "
                f"every leaf needs shape ({len(here)}, n, ...) with one n: one stream per "
                "local device (see `stream_indices`). Check that every process started with "
                "the same number of devices."
            )

    def put(x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
            return jax.device_put(x, sharding)
        shape = (mesh.shape[axis], *np.shape(x)[1:])
        return jax.make_array_from_process_local_data(sharding, np.asarray(x), shape)

    return jax.tree.map(put, local_streams)


def _streams_of(streams: Any, mesh: Mesh, axis: str) -> tuple[Any, int, int]:
    streams = as_element(streams)
    leaves = jax.tree.leaves(streams)
    if not leaves or any(jnp.ndim(x) < 2 for x in leaves):
        raise ValueError(
            "`streams` needs array leaves of shape [streams, n, ...] (see `device_streams`)."
        )
    count, length = jnp.shape(leaves[0])[:2]
    for path, x in jax.tree_util.tree_flatten_with_path(streams)[0]:
        if jnp.shape(x)[:2] != (count, length):
            raise ValueError(
                f"`streams` leaf `{jax.tree_util.keystr(path)}` has shape {jnp.shape(x)}; "
                f"every leaf needs the leading shape ({count}, {length}) of the first."
            )
    _check_divisible(count, mesh.shape[axis], "The number of streams", axis)
    return streams, count, length


class DeviceStates(eqx.Module):
    """The per-device batcher states of `scan_per_device`, and the batches they hold back.

    A global batch is every stream's `k`-th batch, counted from the start of the stream,
    not of the call: a call without `flush` hands the consumer only the global batches that
    every stream has completed, and keeps each stream's later batches here for the next
    call. So where the stream is split into calls changes nothing.

    Every attribute of the batcher states reads through (`states.count`, `states.stats`),
    so `jb.operation_stats(states)` and `jb.packing_stats(states)` work on it; their
    counters are stacked `[S]` and `int()` reads their total over the streams. A held-back
    batch is already counted as emitted by its batcher.

    Attributes:
        states: the batcher states, stacked: leaves `[S, ...]`, sharded over the mesh axis.
        pending: each stream's held-back batches, `Batch` leaves `[S, max_pending, b, ...]`.
        pending_count: `[S]` int32, how many of `pending`'s slots are held.
        lost: `[S]` int32, batches that found no room (`max_batches` or `max_pending` too
            small) and were dropped: always 0 when `scan_per_device` returns (it raises
            instead); under your own `jit` it cannot raise, so check this count.
    """

    states: Any
    pending: Any
    pending_count: Any
    lost: Any

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("states", "pending", "pending_count", "lost"):
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "states"), name)


def _init_states(batcher: Batcher, spec: Any, count: int, key: Any) -> State:
    if key is None:
        return jax.vmap(lambda _: batcher.init(spec))(jnp.arange(count))
    return jax.vmap(lambda k: batcher.init(spec, key=k))(jax.random.split(key, count))


def _wrap(batcher: Batcher, states: Any, spec: Any, max_pending: int) -> DeviceStates:
    """`states` (stacked batcher states, or `DeviceStates`) as `DeviceStates`."""
    if isinstance(states, DeviceStates):
        return states
    count = jax.tree.leaves(states)[0].shape[0]
    column = jax.tree.map(lambda x: jax.ShapeDtypeStruct((count, *x.shape), x.dtype), spec)
    batch = jax.eval_shape(lambda s, e: jax.vmap(batcher.step)(s, e)[1].batch, states, column)
    slots = max_pending if batcher.feed is not None and isinstance(batch, Batch) else 0
    pending = jax.tree.map(lambda x: jnp.zeros((count, slots, *x.shape[1:]), x.dtype), batch)
    zeros = jnp.zeros(count, jnp.int32)
    return DeviceStates(states, pending, zeros, zeros)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 5))
def _init_jit(batcher, streams, mesh, axis, key, max_pending):
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
    states = _init_states(batcher, spec, jax.tree.leaves(streams)[0].shape[0], key)
    return _constrain(_wrap(batcher, states, spec, max_pending), NamedSharding(mesh, P(axis)))


MAX_PENDING = 8


def init_per_device(
    batcher: Batcher,
    streams: Any,
    mesh: Mesh,
    axis: str = "data",
    *,
    key: Any = None,
    max_pending: int = MAX_PENDING,
) -> DeviceStates:
    """One batcher state per stream, stacked on a leading axis sharded over `axis`.

    Args:
        batcher: the batcher.
        streams: the per-device streams, leaves `[S, n, ...]` (`device_streams`), or their
            `jax.ShapeDtypeStruct`s.
        mesh: the mesh; `axis` must divide `S`.
        axis: the mesh axis the streams are split over.
        key: for a stochastic batcher: split into one key per stream.
        max_pending: with a bulk `feed`, how many batches a stream may hold back between
            calls without `flush` while the other streams catch up (`DeviceStates`).

    Returns:
        `DeviceStates`: the stacked states, leaves `[S, ...]`, device `d` holding its
        streams' states.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> streams = {"x": jnp.zeros((jax.device_count(), 6))}
        >>> states = jb.init_per_device(jb.fixed_size(2), streams, mesh)
        >>> states.count.shape == (jax.device_count(),)
        True
    """
    _check_mesh(mesh, axis)
    _check_positive(max_pending, "max_pending", zero=True)
    streams, _, _ = _streams_of(streams, mesh, axis)
    streams = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), streams)
    with _on(mesh):
        return _init_jit(batcher, streams, mesh, axis, key, max_pending)


def _check_positive(value: Any, name: str, zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
        what = "a non-negative int" if zero else "a positive int or None"
        raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def _merge(batch: Any, ready: jax.Array) -> Any:
    """The devices' batches `[S, b, ...]` side by side as one `[S * b, ...]` batch.

    Rows of a stream whose emission is not ready are masked off (the protocol already
    makes their mask all False; this keeps the consumer safe from a batcher that does
    not). `batch_state` and `batch_metadata` keep their leading stream axis.
    """
    if not isinstance(batch, Batch):
        raise TypeError(
            "Per-device streams need a batcher whose `Emit.batch` is one `Batch`, got "
            f"{type(batch).__name__}: a batcher whose emission picks a shape (such as "
            "`bucket_by`) would pick differently on each device. Use it per host instead."
        )
    mask = batch.valid_mask & rows_mask(ready, batch.valid_mask)
    batch = eqx.tree_at(lambda b: b.valid_mask, batch, mask)
    return batch.map_rows(lambda x: x.reshape((-1, *x.shape[2:])))


def _explicit_axes(mesh: Mesh) -> tuple[str, ...]:
    explicit = jax.sharding.AxisType.Explicit
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == explicit)


def _global_view(fn: Callable, mesh: Mesh) -> Callable:
    """`fn` with the mesh's Explicit axes made Auto inside (`jax.sharding.auto_axes`), so an
    ordinary train step (an embedding lookup `embed[tokens]`, a gather XLA must place) runs
    on the mesh `jax.make_mesh` builds by default; the carry keeps its sharding."""
    axes = _explicit_axes(mesh)
    if not axes:
        return fn

    def wrapped(carry: Any, batch: Any) -> Any:
        specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, carry)
        return jax.sharding.auto_axes(fn, axes=axes, out_sharding=specs)(carry, batch)

    return wrapped


def _place_carry(carry: Any, mesh: Mesh) -> Any:
    """Leaves of `carry` not yet on `mesh` replicated on it, so the returned carry (which
    is on the mesh) has the placement of the one given: no new trace on the next call."""
    whole = NamedSharding(mesh, P())

    def place(x: Any) -> Any:
        if isinstance(x, jax.core.Tracer):  # pyright: ignore
            return x
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding):
            if x.sharding.mesh == mesh:
                return x
        if not isinstance(x, jax.Array | np.ndarray | np.generic | int | float | complex):
            return x
        return jax.device_put(x, whole)

    return jax.tree.map(place, carry)


def _local(f: Callable, mesh: Mesh, axis: Any) -> Callable:
    """`f` on every stream, each device on its own streams: no communication. Every value
    inside is per device, so the varying-axes check has nothing to find (and it would
    refuse batchers whose `eqx.error_if` mixes per-device and constant values)."""
    return jax.shard_map(
        jax.vmap(f), mesh=mesh, in_specs=P(axis), out_specs=P(axis), check_vma=False
    )


def _flush_bound(states: Any) -> int:
    """`jb.drain`'s bound on the `flush` calls of one stream's drain (stacked states)."""
    return _max_flushes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), states))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 9, 10))
def _scan_per_device(
    batcher, fn, mesh, axis, flush, carry, streams, states, key, room, max_pending
):
    count, length = jax.tree.leaves(streams)[0].shape[:2]
    fn = _global_view(fn, mesh)
    per_stream = NamedSharding(mesh, P(axis))
    streams = _constrain(streams, per_stream)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
    if states is None:
        states = _init_states(batcher, spec, count, key)
    states = _constrain(_wrap(batcher, states, spec, max_pending), per_stream)

    local = functools.partial(_local, mesh=mesh, axis=axis)

    # Without a bulk `feed`: step every stream, one element per iteration (global batch `k`
    # is step `k`'s batches, so it does not depend on where calls end either). Batches that
    # `resume_per_device` carried over (`pending`) go first, one per iteration.
    held, states = states, states.states
    slots = jax.tree.leaves(held.pending)[0].shape[1]
    carried = jnp.max(held.pending_count) if slots else jnp.zeros((), jnp.int32)

    def done(carry, states, runaway=None):
        zeros = jnp.zeros_like(held.pending_count)
        out = eqx.tree_at(lambda d: (d.states, d.pending_count), held, (states, zeros))
        return carry, out, runaway

    everyone = _constrain(jnp.ones(count, bool), per_stream)
    step_all, flush_all = local(batcher.step), local(batcher.flush)

    def column(i):
        return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, False), streams)

    def advance(states, i):
        """Step `i`: a carried batch while `i < carried`, else stream column `i - carried`."""

        def stepped(states):
            return step_all(states, column(jnp.clip(i - carried, 0, max(length - 1, 0))))

        if not slots:
            return stepped(states)

        def held_back(states):
            pick = lambda x: jax.lax.dynamic_index_in_dim(x, i, 1, False)  # noqa: E731
            return states, Emit(jax.tree.map(pick, held.pending), i < held.pending_count)

        if not length:
            return held_back(states)
        return jax.lax.cond(i < carried, held_back, stepped, states)

    def consume(carry, emit, live):
        ready = emit.ready & live
        batch = _merge(emit.batch, ready)
        # Only the tiny `ready` vector is reduced across devices (the cond needs one answer).
        go = jnp.any(ready)
        return when_ready(Emit(batch, go), fn, carry), ready

    steps = carried + length
    if not flush:
        if not length and not slots:
            return done(carry, states)

        def step_body(i, c):
            states, carry = c
            states, emit = advance(states, i)
            carry, _ = consume(carry, emit, everyone)
            return states, carry

        states, carry = jax.lax.fori_loop(0, steps, step_body, (states, carry))
        return done(carry, states)

    # The drain is bounded (law 3, as `jb.drain`): a stream whose `flush` still emits after
    # as many calls as its state holds rows (and two more) is a runaway, reported by the
    # caller (no `eqx.error_if` inside the sharded program: it would stall a collective).
    bound = _flush_bound(states)

    def body(c):
        i, states, carry, live, flushes = c

        def flushed(states, live):
            new, emit = flush_all(states)
            # A stream is drained once its flush emits nothing; its state then stays put.
            new = jax.tree.map(lambda a, b: jnp.where(rows_mask(live, a), a, b), new, states)
            return new, emit

        if length or slots:
            states, emit = jax.lax.cond(
                i < steps, lambda s, _: advance(s, i), flushed, states, live
            )
        else:
            states, emit = flushed(states, live)
        carry, ready = consume(carry, emit, live)
        live = jnp.where(i < steps, live, ready)
        flushes = flushes + (i >= steps).astype(jnp.int32)
        return i + 1, states, carry, live, flushes

    zero = jnp.zeros((), jnp.int32)
    start = (zero, states, carry, everyone, zero)
    going = lambda c: jnp.any(c[3]) & (c[4] < bound)  # noqa: E731
    _, states, carry, live, _ = jax.lax.while_loop(going, body, start)
    return done(carry, states, jnp.any(live))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 7, 8))
def _gather_per_device(batcher, mesh, axis, flush, streams, states, key, room, max_pending):
    """The bulk path's first program: each device runs `collect` on its streams (plan, then
    gather: no element loop; the drain folded in) and lines each stream's batches up, its
    held-back ones (`DeviceStates.pending`) first. Nothing crosses devices, so a run-time
    check of the batcher (`eqx.error_if`) raises here rather than stalling a collective."""
    count = jax.tree.leaves(streams)[0].shape[0]
    per_stream = NamedSharding(mesh, P(axis))
    streams = _constrain(streams, per_stream)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
    if states is None:
        states = _init_states(batcher, spec, count, key)
    held = _constrain(_wrap(batcher, states, spec, max_pending), per_stream)
    slots = jax.tree.leaves(held.pending)[0].shape[1]

    def gather(states, pending, pending_count, streams):
        out, counts, states = collect(batcher, states, streams, room, flush=flush)
        both = jax.tree.map(lambda p, o: jnp.concatenate([p, o]), pending, out)
        j = jnp.arange(slots + room)
        source = jnp.where(j < pending_count, j, slots + j - pending_count)
        lined = jax.tree.map(lambda x: x[jnp.minimum(source, slots + room - 1)], both)
        return states, lined, pending_count + jnp.minimum(counts, room), counts

    local = functools.partial(_local, mesh=mesh, axis=axis)
    states, lined, ready, counts = local(gather)(
        held.states, held.pending, held.pending_count, streams
    )
    return eqx.tree_at(lambda d: d.states, held, states), lined, ready, counts


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _hand_out(fn, mesh, axis, flush, room, carry, held, lined, ready, counts):
    """The bulk path's second program: global batch `k` is every stream's `k`-th batch;
    without `flush` only the global batches that every stream completed go to `fn`, the
    rest are held back for the next call, so calls may end anywhere."""
    fn = _global_view(fn, mesh)
    per_stream = NamedSharding(mesh, P(axis))
    slots = jax.tree.leaves(held.pending)[0].shape[1]
    # The only values reduced across devices: how many global batches to hand out.
    total = jnp.max(ready) if flush else jnp.min(ready)

    def body(k, carry):  # global batch `k`: every stream's `k`-th batch, side by side
        batch = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, 1, False), lined)
        return fn(carry, _merge(batch, k < ready))

    carry = jax.lax.fori_loop(0, total, body, carry)

    def keep(lined, ready, total):  # a stream's batches past `total` wait for the next call
        left = ready - total
        j = jnp.arange(slots)
        pending = jax.tree.map(lambda x: x[jnp.minimum(total + j, slots + room - 1)], lined)
        pending = _mask_slots(pending, j < left)
        return pending, jnp.minimum(left, slots), jnp.maximum(left - slots, 0)

    totals = _constrain(jnp.broadcast_to(total, ready.shape), per_stream)
    local = functools.partial(_local, mesh=mesh, axis=axis)
    pending, pending_count, lost = local(keep)(lined, ready, totals)
    # The batches past `room` were counted, not stored: the caller raises on `needed`.
    lost = held.lost + lost + jnp.maximum(counts - room, 0)
    needed = jnp.max(counts), jnp.max(ready - total)
    return carry, DeviceStates(held.states, pending, pending_count, lost), needed


def _default_room(batcher: Batcher, streams: Any, states: Any, key: Any, flush: bool) -> int:
    """Batch slots per stream for the bulk path: one batch per `b` elements (and the one
    the buffered rows may start), and with `flush` the drain: at most `ceil(R / b) + 1`
    batches for a state whose leaves hold at most `R` rows (a shuffle buffer: many)."""
    length = jax.tree.leaves(streams)[0].shape[1]
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
    if states is None:
        one = jax.eval_shape(lambda: batcher.init(spec, key=key))
    else:
        states = states.states if isinstance(states, DeviceStates) else states
        one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), states)
    emitted = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, one, spec)
    size = emitted.valid_mask.shape[-1]
    rows = max((x.shape[0] for x in jax.tree.leaves(one) if x.shape), default=0)
    return math.ceil(length / size) + 1 + (math.ceil(rows / size) + 1 if flush else 0)


def scan_per_device(
    batcher: Batcher,
    fn: Callable[[Carry, Batch], Carry],
    carry: Carry,
    streams: Any,
    mesh: Mesh,
    axis: str = "data",
    *,
    states: State | None = None,
    key: Any = None,
    flush: bool = True,
    max_batches: int | None = None,
    max_pending: int = MAX_PENDING,
) -> tuple[Carry, DeviceStates]:
    """`scan` with one batcher per device: each device batches its own stream.

    The `S` streams (leaves `[S, n, ...]`, `device_streams`) are split over the mesh axis;
    one batcher state per stream (leading axis `S`, sharded the same way) runs under
    `jax.shard_map`, so batching moves no data between devices. The `k`-th batch of every
    stream makes *global* batch `k`: the streams' batches side by side (`[S * b, ...]`,
    still sharded over `axis`, never gathered), rows of a stream that has no `k`-th batch
    masked off. `carry = fn(carry, batch)` runs, at one call site, on each global batch, so
    `fn` is an ordinary (global-view) train step that XLA partitions: data parallelism.
    The only cross-device values batching adds are the streams' batch counts (their max)
    and the `[S]` ready vector's `any` while draining.

    `fn` runs with the mesh's Explicit axes made Auto (`jax.sharding.auto_axes`), so
    ordinary code (an embedding lookup `embed[tokens]`) works on `jax.make_mesh`'s mesh;
    the carry is placed on the mesh (replicated, unless it already is on it), so the
    returned carry, passed back, reuses the compiled program.

    A batcher with a bulk `feed` (`fixed_size`, `pack`) plans and gathers each stream's
    batches at once (`jb.collect` per device: this call's batches are materialised, about
    one more copy of the streams, and `max_batches` is their room, the drain's included),
    in a program of its own that moves nothing between devices, so a run-time check of the
    batcher raises when the call returns. Global batch `k` is every stream's `k`-th batch
    counted from the start of the stream: without `flush`, only the global batches every
    stream has completed go to `fn`, and a stream's further batches wait in the returned
    `DeviceStates` (at most `max_pending`), so the global batches do not depend on where
    the stream is split into calls. A batcher without a bulk `feed` (`concat_and_split`)
    is stepped element by element (global batch `k` is then step `k`'s batches, also
    independent of the calls; batches `resume_per_device` carried over go first); its
    run-time checks run first in a program of their own that moves nothing between devices
    (the streams are stepped twice: once to check, once to batch and consume), so a failed
    check raises instead of leaving the other devices waiting in a collective.
    At the end, every stream is flushed until it emits nothing (unless `flush=False`;
    pass the returned states back to continue); the drain is bounded like `jb.drain`'s.
    Each stream's batches, order and `Stats` are exactly those of `jb.scan` on that stream
    alone.

    Args:
        batcher: a batcher whose `Emit.batch` is one `Batch` (static: build it once).
        fn: the consumer (static: build it once).
        carry: the consumer's carry, e.g. replicated parameters. In several processes every
            input must be a global `jax.Array` (e.g. `jax.device_put` with a replicated
            `NamedSharding`).
        streams: per-device streams, leaves `[S, n, ...]`; `S` a multiple of the axis size.
        mesh: the mesh (static).
        axis: the mesh axis the streams and batches are split over.
        states: the states to continue from (`init_per_device`, or a previous call's).
        key: PRNG key for a stochastic batcher, split into one per stream.
        flush: drain every stream at the end.
        max_batches: with a bulk `feed`, room for each stream's batches in this call, the
            drain's included; default `ceil(n / b) + 1`, plus `ceil(R / b) + 1` with `flush`
            for a state whose leaves hold at most `R` rows: enough for the batchers of
            jaxbatch (one batch per `b` elements; a drain of at most its buffered rows).
        max_pending: with a bulk `feed` and no `states`: how many batches a stream may
            hold back between calls without `flush` (see `init_per_device`).

    Returns:
        `(carry, states)`, `states` a `DeviceStates`.

    Raises:
        ValueError: `S` not divisible by the axis size, or leaves of different `[S, n]`;
            `max_batches` not a positive int; a stream that needed more than `max_batches`
            (checked when the call returns, so the call waits for its result; under your
            own `jit` it cannot raise: the batches that found no room are counted in
            `states.lost`); a stream more than `max_pending` batches ahead of the others.
        TypeError: a batcher that emits a tree of batches (such as `bucket_by`).
        BatcherRuntimeError: a run-time check of the batcher refused an element (the first
            line names the stream and the element's position in it, and its scalar leaves;
            in several processes only the check's message), or a stream's end-of-stream
            drain did not end (law 3). Under your own `jit` these are JAX run-time errors
            of that `jit` (see `jb.consume`), and on a multi-device mesh a failed check
            there can stall the other devices' collectives.

    Examples:
        Count the valid rows of every global batch:

        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> n = 5 * jax.device_count()
        >>> idx = jb.stream_indices(n, mesh)
        >>> streams = jb.device_streams({"x": jnp.arange(n)[idx]}, mesh)
        >>> count = lambda total, batch: total + batch.num_valid
        >>> total, states = jb.scan_per_device(jb.fixed_size(2), count, jnp.int32(0), streams, mesh)
        >>> int(total) == n
        True
    """
    _check_mesh(mesh, axis)
    streams, _, _ = _streams_of(streams, mesh, axis)
    if max_batches is not None:
        _check_positive(max_batches, "max_batches")
    _check_positive(max_pending, "max_pending", zero=True)
    if max_batches is None and batcher.feed is not None:
        max_batches = _default_room(batcher, streams, states, key, flush)
    carry = _place_carry(carry, mesh)
    try:
        carry, states, needed = _run_per_device(
            batcher, fn, mesh, axis, flush, carry, streams, states, key, max_batches, max_pending
        )
    except Exception as e:
        if _runtime_reason(e) is None:
            raise
        raise _explain_streams(e, batcher, streams, states, key, flush) from e
    if batcher.feed is None:
        if needed is not None and not isinstance(needed, jax.core.Tracer):  # pyright: ignore
            if bool(needed):
                bound = _flush_bound(states.states)
                message = _runaway_message(bound)
                raise BatcherRuntimeError(f"`jb.scan_per_device`: {message}", None, message)
        return carry, states
    # Checked here, not with `eqx.error_if` inside the sharded program (its callback aborts
    # the process on a multi-device CPU mesh). Under your own `jit` it cannot be checked:
    # the batches that found no room are counted in `states.lost`.
    if needed is not None and not isinstance(needed[0], jax.core.Tracer):  # pyright: ignore
        assert max_batches is not None  # set above for a bulk `feed`
        _check_room(needed[0], max_batches, "max_batches")
        slots = jax.tree.leaves(states.pending)[0].shape[1]
        if int(needed[1]) > slots:
            raise ValueError(
                f"A stream got {int(needed[1])} batches ahead of the slowest stream, more "
                f"than the {slots} it may hold back between calls without `flush`; pass a "
                "larger `max_pending` to `init_per_device` (or `scan_per_device` without "
                "`states`), or split the stream into longer calls."
            )
    return carry, states


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _check_stepped(batcher, mesh, axis, flush, streams, states, key):
    """A stepped batcher's run-time checks, in a program of their own that moves nothing
    between devices: every stream is stepped (and drained, bounded) and the result dropped,
    so a failed check raises before the sharded program, whose collectives would wait
    forever for the device that failed (the process aborts)."""
    count = jax.tree.leaves(streams)[0].shape[0]
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
    if states is None:
        states = _init_states(batcher, spec, count, key)
    states = states.states if isinstance(states, DeviceStates) else states
    per_stream = NamedSharding(mesh, P(axis))
    states, streams = _constrain((states, streams), per_stream)

    def run(state, stream):
        state = jax.lax.scan(lambda s, e: (batcher.step(s, e)[0], None), state, stream)[0]
        if flush:
            return drain(batcher, lambda c, b: c + 1, jnp.zeros((), jnp.int32), state)[0]
        return jnp.zeros((), jnp.int32)

    return _local(run, mesh, axis)(states, streams)


def _run_per_device(batcher, fn, mesh, axis, flush, carry, streams, states, key, room, pending):
    """`scan_per_device`'s programs, waited for (outside your own `jit`), so that a failed
    run-time check of the batcher raises here."""
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((carry, streams, states)))  # pyright: ignore
    with _on(mesh):
        if batcher.feed is None:
            if not traced:  # under your own `jit` the checks share its program
                checked = _check_stepped(batcher, mesh, axis, flush, streams, states, key)
                jax.block_until_ready(checked)
            out = _scan_per_device(
                batcher, fn, mesh, axis, flush, carry, streams, states, key, None, pending
            )
            return out if traced else jax.block_until_ready(out)
        # Two programs: the batcher's own checks raise before any collective runs.
        args = (streams, states, key, room, pending)
        states, *lined = _gather_per_device(batcher, mesh, axis, flush, *args)
        if not isinstance(lined[1], jax.core.Tracer):  # pyright: ignore
            # A failed check raises here: dispatched, the next program's collective
            # would wait forever for the device that failed (the process aborts).
            jax.block_until_ready(lined[1])
        return _hand_out(fn, mesh, axis, flush, room, carry, states, *lined)


def _explain_streams(error, batcher, streams, states, key, flush) -> BatcherRuntimeError:
    """`jb.BatcherRuntimeError` for a run-time check that failed in `scan_per_device`: each
    stream is stepped again from its state (`jb.scan`'s search) to name the stream and the
    element. In several processes the streams are not all here: the check's message only."""
    reason = _runtime_reason(error) or ""
    who = "jb.scan_per_device"
    if jax.process_count() > 1:
        return BatcherRuntimeError(f"`{who}`: a run-time check failed: {reason}", None, reason)
    streams = jax.tree.map(_to_host, streams)
    count = jax.tree.leaves(streams)[0].shape[0]
    if states is None:
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), streams)
        states = _init_states(batcher, spec, count, key)
    inner = states.states if isinstance(states, DeviceStates) else states
    inner = jax.tree.map(_to_host, inner)
    for s in range(count):
        state, elements = _rows(inner, s), _rows(streams, s)
        if _locate(batcher, state, elements, flush)[0] is not None or s == count - 1:
            found = _explain(error, who, batcher, state, elements, flush, stream=f"stream {s}")
            return found or BatcherRuntimeError(f"`{who}`: {reason}", None, reason)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- elastic resume


def _rows(tree: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _collect(batcher, state, elements, capacity, flush):
    return collect(batcher, state, elements, capacity, flush=flush)


def _carried_elements(states: DeviceStates) -> Element:
    """Every element a `fixed_size` or `shuffle` `DeviceStates` holds (host arrays), stream
    by stream: its held-back batches' valid rows, then the rows of its batch being built,
    then (`shuffle`) its shuffle buffer."""
    inner, pending = states.states, states.pending
    held = Element(data=pending.data, state=pending.states, metadata=pending.metadata)
    held, pending_count = jax.device_get((held, states.pending_count))
    valid = np.asarray(jax.device_get(pending.valid_mask))
    if hasattr(inner, "filled"):  # shuffle
        rows = [(inner.batch, inner.count), (inner.buffer, inner.filled)]
    else:
        rows = [(inner.buffer, inner.count)]
    rows = jax.device_get(rows)
    parts = []
    for s in range(np.shape(pending_count)[0]):
        for j in range(int(pending_count[s])):
            parts.append(_rows(held, (s, j, np.flatnonzero(valid[s, j]))))
        parts.extend(_rows(buf, (s, slice(0, int(n[s])))) for buf, n in rows)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def _is_counter(x: Any) -> bool:
    return isinstance(x, Counter)


def _counter_totals(state: Any) -> list[tuple[str, int]]:
    """Every `Counter` of `state` (stacked or not): its path and total, in tree order."""
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_counter)[0]
    return [(jax.tree_util.keystr(p), int(c)) for p, c in flat if _is_counter(c)]


def _carry_counters(news: Any, extra: list[int]) -> Any:
    """The stacked new states with each `Counter` on stream 0 raised by the matching entry
    of `extra` (the saved counts), saturating like every `Counter`."""
    leaves, treedef = jax.tree.flatten(news, is_leaf=_is_counter)
    counters = iter(extra)

    def raised(c: Any) -> Any:
        if not _is_counter(c):
            return c
        first = min((int(c.hi[0]) << 32 | int(c.lo[0])) + next(counters), Counter.MAX)
        one = Counter.of(first)
        return Counter(c.lo.at[0].set(one.lo), c.hi.at[0].set(one.hi))

    return jax.tree.unflatten(treedef, [raised(c) for c in leaves])


def resume_per_device(
    batcher: Batcher,
    states: Any,
    mesh: Mesh,
    axis: str = "data",
    *,
    key: Any = None,
    max_pending: int | None = None,
    element_spec: Any = None,
) -> DeviceStates:
    """Per-device states saved on `D` devices, continued on the `D'` of `mesh`'s `axis`.

    Elastic resume: every element the saved states hold (the batches a device held back,
    then its buffered rows, device by device) is dealt round-robin to the `D'` new streams
    and fed to fresh states, so each element is batched exactly once; the order is fixed by
    `(D, D', split point)`. The stream's unread elements, from global position
    `start = columns consumed * D`, are then dealt to the new devices with
    `jb.stream_indices(n, mesh, start=start)`. The new states carry the saved counters
    (`Stats`, `jb.packing_stats`; on new stream 0), so the states at the end of the run read
    the whole run's totals, every element accepted once, as after a resume on the same
    devices. One process (load the states of several processes with
    `load_distributed` first).

    `fixed_size` and `shuffle` keep their buffered rows as elements, which are carried as
    above (`shuffle` shuffles them again, with `key`). Other batchers (`pack`,
    `concat_and_split`) buffer rows that are no longer elements: each saved state is
    flushed, and its batches (held back, then flushed: the half-packed rows emitted as
    they are, so less full than usual) are dealt round-robin to the new devices as
    held-back batches, which the next `scan_per_device` hands out first, ahead of fresh
    states (`element_spec` gives their element). A batcher without a bulk `feed`
    (`concat_and_split`) gets room for exactly those batches (`max_pending` default).

    Args:
        batcher: the batcher the states belong to.
        states: the `DeviceStates` of `scan_per_device` (or `load_distributed`), on the
            devices or the host.
        mesh: the new mesh; `axis` gives `D'`.
        axis: the new mesh's data axis.
        key: for a stochastic batcher, the PRNG key of the new states (one per stream).
        max_pending: the new states' `max_pending`; default the saved states' (a batcher
            without a bulk `feed`: as many as the most carried batches of a new stream).
        element_spec: one element's structure (`jax.ShapeDtypeStruct`s or arrays), for
            batchers other than `fixed_size` and `shuffle`.

    Returns:
        `DeviceStates` with `D'` streams, sharded over `axis`.

    Raises:
        TypeError: `states` not `DeviceStates`.
        ValueError: no `key` for `shuffle`; no `element_spec` where it is needed; a new
            stream would hold back more than `max_pending` batches.

    Examples:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> import jaxbatch as jb
        >>> d = jax.device_count()
        >>> old = jax.make_mesh((d,), ("data",))
        >>> new = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
        >>> idx = jb.stream_indices(10 * d, old)[:, :5]  # 5 elements read on each device
        >>> streams = jb.device_streams({"i": np.arange(10 * d)[idx]}, old)
        >>> batcher = jb.fixed_size(3)
        >>> _, saved = jb.scan_per_device(batcher, lambda c, b: c, 0, streams, old, flush=False)
        >>> states = jb.resume_per_device(batcher, saved, new)  # 2 buffered on each device
        >>> int(states.count[0]) + 3 * int(states.pending_count[0]) == 2 * d
        True
        >>> rest = jb.stream_indices(5 * d, new, start=5 * d)  # the unread half, on 1 device
        >>> rest[0, :2].tolist() == [5 * d, 5 * d + 1]
        True
    """
    from .batchers.fixed_size import FixedSizeState
    from .batchers.shuffle import ShuffleState

    if not isinstance(states, DeviceStates):
        raise TypeError(
            "`states` must be the `DeviceStates` that `scan_per_device` or `init_per_device` "
            f"returned, got {type(states).__name__}."
        )
    _check_mesh(mesh, axis)
    if isinstance(states.states, ShuffleState) and key is None:
        raise ValueError("`shuffle` states need a `key` for the new streams' shuffling.")
    if max_pending is not None:
        _check_positive(max_pending, "max_pending", zero=True)
    # A stepped batcher holds nothing back between calls: room for what is carried.
    saved = jax.tree.leaves(states.pending)[0].shape[1] if batcher.feed is not None else None
    slots = saved if max_pending is None else max_pending
    if not isinstance(states.states, (FixedSizeState, ShuffleState)):
        if element_spec is None:
            raise ValueError(
                f"Resuming `{type(states.states).__name__}` states needs `element_spec` (one "
                "element's `jax.ShapeDtypeStruct`s, e.g. `jb.element_spec(...)`)."
            )
        return _resume_by_batches(batcher, states, mesh, axis, key, slots, element_spec)
    carried = _carried_elements(states)
    # The carried elements are fed again, so the new states count them (and re-form the
    # held-back batches) again: take that off the saved totals.
    valid = np.asarray(jax.device_get(states.pending.valid_mask))
    held = np.arange(valid.shape[1]) < np.asarray(jax.device_get(states.pending_count))[:, None]
    refed = {
        ".stats.accepted": len(jax.tree.leaves(carried)[0]),
        ".stats.emitted": int(np.sum(valid & held[..., None])),
        ".stats.batches": int(np.sum(held)),
        ".stats.padded": int(np.sum(~valid & held[..., None])),
    }
    totals = [t - refed.get(n, 0) for n, t in _counter_totals(states.states)]
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), carried)
    inner = states.states
    size = jax.tree.leaves(getattr(inner, "batch", inner.buffer))[0].shape[1]
    count = _axis_size(mesh, axis)
    keys = [None] * count if key is None else list(jax.random.split(key, count))
    if slots is None:  # stepped: room for the full batches of the largest share
        slots = -(-len(jax.tree.leaves(carried)[0]) // count) // size
    news = []
    for r in range(count):
        share = _rows(carried, slice(r, None, count))
        n = jax.tree.leaves(share)[0].shape[0]
        state = batcher.init(spec, key=keys[r])
        out, emitted, state = _collect(batcher, state, share, n // size + 1, False)
        if int(emitted) > slots:
            raise ValueError(
                f"New stream {r} starts with {int(emitted)} full batches of carried "
                f"elements, more than `max_pending` ({slots}); pass a larger `max_pending`."
            )
        keep = np.minimum(np.arange(slots), max(n // size, 0))
        pending = _mask_slots(_rows(out, keep), jnp.arange(slots) < emitted)
        news.append(DeviceStates(state, pending, emitted.astype(jnp.int32), jnp.int32(0)))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *news)
    stacked = eqx.tree_at(lambda d: d.states, stacked, _carry_counters(stacked.states, totals))
    with _on(mesh):
        return jax.device_put(stacked, NamedSharding(mesh, P(axis)))


def _to_host(x: Any) -> Any:
    """A leaf off the mesh, on the default device (typed PRNG keys by their key data)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jnp.asarray(np.asarray(jax.random.key_data(x)))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jnp.asarray(np.asarray(x))


def _resume_by_batches(batcher, states, mesh, axis, key, slots, element_spec) -> DeviceStates:
    """`resume_per_device` for a batcher whose buffered rows are not elements: flush each
    saved stream, deal all held-back and flushed batches to the new streams in order."""
    states = jax.tree.map(_to_host, states)
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), element_spec)
    empty = jax.tree.map(lambda x: jnp.zeros((0, *x.shape), x.dtype), as_element(spec))
    batches, totals = [], []
    for s in range(np.shape(states.pending_count)[0]):
        batches += [_rows(states.pending, (s, j)) for j in range(int(states.pending_count[s]))]
        state = _rows(states.states, s)
        room = 2 + max((np.shape(x)[0] for x in jax.tree.leaves(state) if np.ndim(x)), default=0)
        out, n, flushed = _collect(batcher, state, empty, room, True)
        _check_room(n, room, "max_batches")
        batches += [_rows(out, k) for k in range(int(n))]
        # The flushed batches are counted as emitted by the flushed state: carry its totals.
        mine = [t for _, t in _counter_totals(flushed)]
        totals = [a + b for a, b in zip(totals, mine)] if totals else mine
    count = _axis_size(mesh, axis)
    keys = [None] * count if key is None else list(jax.random.split(key, count))
    if slots is None:
        slots = -(-len(batches) // count)
    one = jax.eval_shape(lambda: batcher.init(spec, key=keys[0]))
    batch = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, one, spec)
    blank = jax.tree.map(lambda x: jnp.zeros((slots, *x.shape), x.dtype), batch)
    blank = _mask_slots(blank, jnp.zeros(slots, bool))
    news = []
    for r in range(count):
        mine = batches[r::count]
        if len(mine) > slots:
            raise ValueError(
                f"New stream {r} starts with {len(mine)} carried batches, more than "
                f"`max_pending` ({slots}); pass a larger `max_pending`."
            )
        pending = blank
        for j, b in enumerate(mine):
            pending = jax.tree.map(lambda p, x, j=j: p.at[j].set(x), pending, b)
        state = batcher.init(spec, key=keys[r])
        news.append(DeviceStates(state, pending, jnp.int32(len(mine)), jnp.int32(0)))
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *news)
    stacked = eqx.tree_at(lambda d: d.states, stacked, _carry_counters(stacked.states, totals))
    with _on(mesh):
        return jax.device_put(stacked, NamedSharding(mesh, P(axis)))

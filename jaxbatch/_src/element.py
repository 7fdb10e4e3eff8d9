"""`Element` and `Metadata`: one data point as an immutable PyTree of arrays.

Every "update" returns a new value; nothing mutates. Because every leaf is an array (Python
scalars are converted on construction), elements stack into batches, live in `scan` carries
and map under `vmap` without any special casing.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

_SCALAR_TYPES = (bool, int, float, complex, np.generic)


def _to_array_leaf(path: str, leaf: Any) -> Any:
    """Arrays (and specs) pass through; Python/numpy scalars become 0-d arrays."""
    # numpy strings, bytes, objects and datetimes have no JAX dtype: rejected below like `str`.
    non_jax_numpy = isinstance(leaf, np.ndarray | np.generic) and leaf.dtype.kind in "OSUMm"
    if isinstance(leaf, jax.Array | np.ndarray | jax.ShapeDtypeStruct) and not non_jax_numpy:
        return leaf
    if isinstance(leaf, _SCALAR_TYPES) and not non_jax_numpy:
        # A concrete (not weakly typed) dtype, so stacking and strict promotion behave.
        dtype = jax.dtypes.canonicalize_dtype(np.result_type(leaf))
        return jnp.asarray(leaf, dtype=dtype)
    raise TypeError(
        f"Leaf `{path}` is a {type(leaf).__name__} ({leaf!r:.60}); jaxbatch elements hold "
        "arrays only (Python scalars are converted). Encode strings and other objects as "
        "arrays (e.g. token ids) before building an Element."
    )


def as_array_tree(tree: PyTree, name: str) -> PyTree:
    """Return `tree` with every leaf an array; raise `TypeError` naming a non-array leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: _to_array_leaf(name + jax.tree_util.keystr(path), leaf), tree
    )


def merge_nested(old: PyTree, updates: Mapping[str, Any]) -> PyTree:
    """Merge `updates` into the mapping `old`, recursing where both sides are mappings."""
    if not isinstance(old, Mapping):
        raise TypeError(f"Can only merge updates into a dict, got {type(old).__name__}.")
    merged = dict(old)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_nested(merged[key], value)
        else:
            merged[key] = value
    return merged


class Metadata(eqx.Module):
    """Per-element bookkeeping, as arrays so it stacks into batches and lives under `scan`.

    Attributes:
        index: position of the element in its stream (int32; shape `[]` for one element,
            `[batch]` once stacked).
        epoch: the epoch the element belongs to (int32, same shape as `index`; a scalar
            given with a stacked `index` is broadcast).
        extra: any further PyTree of arrays (e.g. a source id), stacked like the rest.

    Examples:
        >>> import jaxbatch as jb
        >>> m = jb.Metadata(index=3, epoch=1)
        >>> m.index.dtype, int(m.index), int(m.epoch)
        (dtype('int32'), 3, 1)
    """

    index: Int[Array, "*batch"]
    epoch: Int[Array, "*batch"]
    extra: PyTree = eqx.field(default_factory=dict)

    def __init__(self, index: Any = 0, epoch: Any = 0, extra: PyTree = None):
        # `epoch` (or `index`) given as a scalar broadcasts to the other's per-row shape.
        shape = np.broadcast_shapes(np.shape(index), np.shape(epoch))
        self.index = jnp.broadcast_to(jnp.asarray(index, dtype=jnp.int32), shape)
        self.epoch = jnp.broadcast_to(jnp.asarray(epoch, dtype=jnp.int32), shape)
        self.extra = as_array_tree({} if extra is None else extra, "metadata.extra")


class Element(eqx.Module):
    """One immutable data point: `data`, per-element `state`, and optional `Metadata`.

    Attributes:
        data: PyTree of arrays (nested dicts allowed).
        state: PyTree of arrays carried with the element (Python scalars are converted to
            arrays so that states stack, scan and vmap like data).
        metadata: a `Metadata`, or None.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> e = jb.Element(data={"x": jnp.array([1.0, 2.0])}, state={"seen": 0})
        >>> e2 = e.update_data({"y": jnp.array(3)}).update_state({"seen": 1})
        >>> sorted(e2.data), int(e2.state["seen"]), int(e.state["seen"])
        (['x', 'y'], 1, 0)
    """

    data: PyTree
    state: PyTree
    metadata: Metadata | None

    def __init__(self, data: PyTree = None, state: PyTree = None, metadata: Metadata | None = None):
        self.data = as_array_tree({} if data is None else data, "data")
        self.state = as_array_tree({} if state is None else state, "state")
        self.metadata = metadata

    def update_state(self, updates: Mapping[str, Any]) -> "Element":
        """Return a new Element whose `state` has `updates` merged in (nested dicts merge).

        Examples:
            >>> import jaxbatch as jb
            >>> e = jb.Element(state={"aug": {"flip": 0, "crop": 0}})
            >>> int(e.update_state({"aug": {"flip": 1}}).state["aug"]["crop"])
            0
        """
        return self.replace(state=merge_nested(self.state, updates))

    def update_data(self, updates: Mapping[str, Any]) -> "Element":
        """Return a new Element whose `data` has `updates` merged in (nested dicts merge).

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> e = jb.Element(data={"img": {"r": jnp.zeros(2), "g": jnp.zeros(2)}})
            >>> e.update_data({"img": {"r": jnp.ones(2)}}).data["img"]["r"]
            Array([1., 1.], dtype=float32)
        """
        return self.replace(data=merge_nested(self.data, updates))

    def transform(self, fn: Callable[[Array], Array]) -> "Element":
        """Return a new Element with `fn` applied to every data leaf; state and metadata kept.

        Unlike a class-based pipeline, `fn` needs no registration: it is traced like any
        other function, so this works under `jit`, `vmap` and `grad`.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> jb.Element(data={"x": jnp.array([1.0, 2.0])}).transform(jnp.negative).data["x"]
            Array([-1., -2.], dtype=float32)
        """
        return self.replace(data=jax.tree.map(fn, self.data))

    def apply_to_data(self, fn: Callable[[Array], Array]) -> "Element":
        """Differentiable map over data leaves (same as `transform`; gradients flow through).

        Examples:
            >>> import jax
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> def loss(scale):
            ...     e = jb.Element(data={"x": jnp.array([1.0, 2.0])})
            ...     return jnp.sum(e.apply_to_data(lambda x: x * scale).data["x"])
            >>> jax.grad(loss)(2.0)
            Array(3., dtype=float32, weak_type=True)
        """
        return self.transform(fn)

    def with_metadata(self, metadata: Metadata | None) -> "Element":
        """Return a new Element with `metadata` replaced.

        Examples:
            >>> import jaxbatch as jb
            >>> int(jb.Element().with_metadata(jb.Metadata(index=7)).metadata.index)
            7
        """
        return self.replace(metadata=metadata)

    def replace(self, **kwargs: Any) -> "Element":
        """Return a new Element with the given fields (`data`, `state`, `metadata`) replaced.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> jb.Element(data={"x": jnp.zeros(1)}).replace(data={"y": jnp.ones(1)}).data
            {'y': Array([1.], dtype=float32)}
        """
        return dataclasses.replace(self, **kwargs)


def create_element(
    data: PyTree = None, state: PyTree = None, metadata: Metadata | None = None
) -> Element:
    """Create an Element; omitted `data` and `state` default to empty dicts.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> e = jb.create_element({"x": jnp.arange(3)})
        >>> e.state, e.metadata
        ({}, None)
    """
    return Element(data=data, state=state, metadata=metadata)


def as_element(x: Any) -> Element:
    """`x` itself if it is an Element, else `Element(data=x)` (any PyTree of arrays)."""
    return x if isinstance(x, Element) else Element(data=x)

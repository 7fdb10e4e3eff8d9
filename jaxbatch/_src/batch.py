"""`Batch`: stacked elements (batch axis 0) with a `valid_mask`, as one PyTree.

A Batch is a plain `equinox.Module`: building one is a dataclass construction (microseconds,
inside or outside `jit`), so there is no need for a separate light "view" type. Padding rows
are marked False in `valid_mask`; every statistic here counts valid rows only.
"""

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree

from .element import Element, Metadata, as_element, merge_nested
from .spec import check_against_spec, tree_spec


def _batch_dims(named_trees: Mapping[str, PyTree]) -> dict[str, int | None]:
    """Leading dimension of every leaf, keyed by a readable path (None for 0-d leaves)."""
    dims = {}
    for name, tree in named_trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            shape = np.shape(leaf)
            dims[name + jax.tree_util.keystr(path)] = shape[0] if shape else None
    return dims


def rows_mask(rows: Bool[Array, " n"], leaf: Array) -> Bool[Array, " n ..."]:
    """`rows` reshaped to broadcast against `leaf` along axis 0 (no rank promotion)."""
    return rows.reshape(rows.shape + (1,) * (jnp.ndim(leaf) - 1))


class Batch(eqx.Module):
    """A batch of elements: every leaf of `data`, `states` and `metadata` has batch axis 0.

    Attributes:
        data: PyTree of arrays, shape `[batch, ...]`.
        valid_mask: `[batch]` bool; False marks padding rows, which every reduction ignores.
        states: per-element states, stacked like `data`.
        metadata: stacked `Metadata` (leaves `[batch]`) or None.
        batch_state: PyTree describing the whole batch (no batch axis).
        batch_metadata: PyTree describing the whole batch (no batch axis), or None.

    Build batches with `Batch.from_parts` (validated) or `Batch.from_elements` (stacking);
    the plain constructor does no checks, which is what code under `jit` wants.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.arange(4.0)},
        ...                         valid_mask=jnp.array([True, True, True, False]))
        >>> b.batch_size, int(b.num_valid)
        (4, 3)
    """

    data: PyTree
    valid_mask: Bool[Array, " batch"]
    states: PyTree = eqx.field(default_factory=dict)
    metadata: Metadata | None = None
    batch_state: PyTree = eqx.field(default_factory=dict)
    batch_metadata: PyTree = None

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_parts(
        cls,
        data: PyTree,
        states: PyTree = None,
        metadata: Metadata | None = None,
        batch_metadata: PyTree = None,
        batch_state: PyTree = None,
        *,
        valid_mask: Any = None,
        validate: bool = True,
    ) -> "Batch":
        """Build a Batch from already-stacked parts.

        Args:
            data: PyTree of arrays with batch axis 0.
            states: per-element states with batch axis 0 (default: empty dict).
            metadata: stacked `Metadata` with leaves `[batch]`, or None.
            batch_metadata: batch-level PyTree (no batch axis), or None.
            batch_state: batch-level PyTree (no batch axis); default empty dict.
            valid_mask: `[batch]` bool; omitted means every row is valid.
            validate: check that every leaf has the same batch dimension and that the mask
                fits. Validation reads only static shapes, so it is free under `jit`.

        Raises:
            ValueError: inconsistent batch dimensions (the message names the leaves), a 0-d
                leaf, or a `valid_mask` of the wrong length or dtype.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> jb.Batch.from_parts({"x": jnp.zeros((3, 2))}, {"n": jnp.zeros(3)}).batch_size
            3
            >>> jb.Batch.from_parts({"x": jnp.zeros((3, 2)), "y": jnp.zeros(2)})
            Traceback (most recent call last):
            ...
            ValueError: Inconsistent batch dimensions: data['x'] has 3 but data['y'] has 2; ...
        """
        states = {} if states is None else states
        batch_state = {} if batch_state is None else batch_state
        parts = {"data": data, "states": states, "metadata": metadata}
        dims = _batch_dims(parts)
        if validate:
            zero_d = [name for name, dim in dims.items() if dim is None]
            if zero_d:
                raise ValueError(
                    f"Leaf `{zero_d[0]}` is 0-d: every leaf of data, states and metadata needs "
                    "a leading batch axis (put batch-level values in `batch_state`)."
                )
        if valid_mask is not None:
            valid_mask = jnp.asarray(valid_mask)  # numpy or list masks become jax arrays
        if valid_mask is None:
            if not dims:
                raise ValueError(
                    "Cannot infer the batch size: `data`, `states` and `metadata` have no "
                    "array leaves. Pass `valid_mask` to give it."
                )
            ref, size = next(iter(dims.items()))
            valid_mask = jnp.ones((size,), dtype=bool)
        elif validate:
            shape, dtype = np.shape(valid_mask), jnp.result_type(valid_mask)
            if len(shape) != 1 or dtype != jnp.bool_:
                raise ValueError(
                    f"`valid_mask` must be a 1-d bool array, got shape {shape} dtype {dtype}."
                )
            ref, size = "valid_mask", shape[0]
        if validate:
            mismatched = [(name, dim) for name, dim in dims.items() if dim != size]
            if mismatched:
                listed = ", ".join(f"{name} has {dim}" for name, dim in mismatched)
                raise ValueError(
                    f"Inconsistent batch dimensions: {ref} has {size} but {listed}; every "
                    "leaf of data, states, metadata and `valid_mask` needs the same leading "
                    "batch dimension."
                )
        return cls(
            data=data,
            valid_mask=valid_mask,
            states=states,
            metadata=metadata,
            batch_state=batch_state,
            batch_metadata=batch_metadata,
        )

    @classmethod
    def from_elements(cls, elements: Sequence[Any]) -> "Batch":
        """Stack elements (eagerly) into a Batch with every row valid.

        Every element must share one structure, shapes and dtypes; elements that are not
        `Element`s are wrapped as `Element(data=x)`.

        Raises:
            ValueError: no elements, or a leaf whose shape differs (the path is named).
            TypeError: a different tree structure or dtype, or a non-array leaf.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_elements([{"x": jnp.ones(2)}, {"x": jnp.zeros(2)}])
            >>> b.data["x"].shape
            (2, 2)
            >>> jb.Batch.from_elements([{"x": jnp.ones(2)}, {"x": jnp.ones(3)}])
            Traceback (most recent call last):
            ...
            ValueError: Leaf `elements[1].data['x']` has shape (3,), expected (2,).
        """
        elements = [as_element(e) for e in elements]
        if not elements:
            raise ValueError(
                "`Batch.from_elements` needs at least one element to know the structure; "
                "build an empty batch with `Batch.from_parts` and zero-length arrays."
            )
        spec = tree_spec(elements[0])
        for i, element in enumerate(elements[1:], start=1):
            check_against_spec(spec, element, what=f"elements[{i}]", shape_error=ValueError)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *elements)
        return cls(
            data=stacked.data,
            valid_mask=jnp.ones((len(elements),), dtype=bool),
            states=stacked.state,
            metadata=stacked.metadata,
        )

    # ----------------------------------------------------------------- properties

    @property
    def batch_size(self) -> int:
        """Number of rows, valid or not (static: read from shapes)."""
        return self.valid_mask.shape[0]

    @property
    def num_valid(self) -> Int[Array, ""]:
        """Number of valid rows, as an int32 scalar array (works under `jit`).

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.zeros(3)},
            ...                         valid_mask=jnp.array([True, False, True]))
            >>> int(b.num_valid)
            2
        """
        return jnp.sum(self.valid_mask, dtype=jnp.int32)

    # ----------------------------------------------------------------- rows

    def map_rows(self, fn: Callable[[Array], Array]) -> "Batch":
        """Apply `fn` to every batched leaf (data, states, metadata and `valid_mask`).

        `batch_state` and `batch_metadata` have no batch axis and are kept. This is how
        slicing, selecting and gathering rows keep the mask in step with the data.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.arange(4)})
            >>> b.map_rows(lambda x: x[::2]).data["x"]
            Array([0, 2], dtype=int32)
        """
        rows = (self.data, self.states, self.metadata, self.valid_mask)
        data, states, metadata, valid_mask = jax.tree.map(fn, rows)
        return dataclasses.replace(
            self, data=data, states=states, metadata=metadata, valid_mask=valid_mask
        )

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not -self.batch_size <= index < self.batch_size:
            raise IndexError(
                f"Row index {index} is out of range for a batch of size {self.batch_size}."
            )
        return index % self.batch_size

    def get_element(self, index: int) -> Element:
        """Row `index` (a static int; negative counts from the end) as an `Element`.

        Raises:
            IndexError: `index` outside `[-batch_size, batch_size)`.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> jb.Batch.from_parts({"x": jnp.arange(3)}).get_element(-1).data["x"]
            Array(2, dtype=int32)
        """
        index = self._check_index(index)
        row = jax.tree.map(lambda x: x[index], (self.data, self.states, self.metadata))
        return Element(data=row[0], state=row[1], metadata=row[2])

    def get_elements(self, indices: slice | Sequence[int]) -> list[Element]:
        """Several rows as a list of `Element`s, by slice or by a list of static indices.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.arange(5)})
            >>> [int(e.data["x"]) for e in b.get_elements(slice(1, None, 2))]
            [1, 3]
        """
        if isinstance(indices, slice):
            indices = range(self.batch_size)[indices]
        return [self.get_element(i) for i in indices]

    def slice(self, start: int, end: int) -> "Batch":
        """Rows `start:end` (static ints, Python slice semantics) as a new Batch, mask included.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.arange(4)},
            ...                         valid_mask=jnp.array([True, True, True, False]))
            >>> b.slice(2, 4).valid_mask
            Array([ True, False], dtype=bool)
        """
        return self.map_rows(lambda x: x[start:end])

    def split_for_devices(self, num_devices: int) -> list["Batch"]:
        """Split into `num_devices` equal consecutive Batches (masks split with the rows).

        Raises:
            ValueError: `num_devices` not positive, or `batch_size` not divisible by it.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> parts = jb.Batch.from_parts({"x": jnp.arange(8)}).split_for_devices(4)
            >>> [p.batch_size for p in parts]
            [2, 2, 2, 2]
        """
        if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
            raise ValueError(f"`num_devices` must be a positive int, got {num_devices!r}.")
        if self.batch_size % num_devices:
            raise ValueError(
                f"A batch of size {self.batch_size} cannot be split evenly across "
                f"{num_devices} devices. Use a batch size that is a multiple of {num_devices}"
                " (e.g. `fixed_size(batch_size)` with such a size); padding rows are masked."
            )
        per = self.batch_size // num_devices
        return [self.slice(i * per, (i + 1) * per) for i in range(num_devices)]

    # ----------------------------------------------------------------- statistics

    def compute_stats(self) -> dict[str, Any]:
        """Mean, std, min and max of every data leaf over the **valid** rows, and the count.

        Returns `{"mean": T, "std": T, "min": T, "max": T, "count": n}`, each `T` shaped like
        `data` with the batch axis reduced. Mean and std are floating (integer data is cast to
        float32); min and max keep the dtype. With no valid row every statistic is 0, never
        NaN.

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.array([1.0, 3.0, 100.0])},
            ...                         valid_mask=jnp.array([True, True, False]))
            >>> s = b.compute_stats()
            >>> float(s["mean"]["x"]), float(s["max"]["x"]), int(s["count"])
            (2.0, 3.0, 2)
        """
        count = self.num_valid
        any_valid = count > 0

        def mean_std(x):
            m = rows_mask(self.valid_mask, x)
            x = jnp.asarray(x)
            xf = x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float32)
            n = jnp.maximum(count, 1).astype(xf.dtype)
            mean = jnp.sum(jnp.where(m, xf, 0), axis=0) / n
            # Mask the deviation before squaring, so a NaN/inf in a padding row cannot turn
            # the gradient into NaN (0 * NaN) through the square's derivative.
            dev = jnp.where(m, xf - mean[None], 0)
            var = jnp.sum(jnp.abs(dev) ** 2, axis=0) / n
            return mean, jnp.sqrt(var)

        def extreme(x, reduce, fill):
            x = jnp.asarray(x)
            # `initial` makes the reduction defined for a batch of size 0.
            kept = jnp.where(rows_mask(self.valid_mask, x), x, fill(x.dtype))
            out = reduce(kept, axis=0, initial=fill(x.dtype))
            return jnp.where(any_valid, out, jnp.zeros_like(out))

        def biggest(dtype):
            if jnp.issubdtype(dtype, jnp.floating):
                return jnp.array(jnp.inf, dtype)
            return jnp.array(True if dtype == jnp.bool_ else jnp.iinfo(dtype).max, dtype)

        def smallest(dtype):
            if jnp.issubdtype(dtype, jnp.floating):
                return jnp.array(-jnp.inf, dtype)
            return jnp.array(False if dtype == jnp.bool_ else jnp.iinfo(dtype).min, dtype)

        moments = jax.tree.map(mean_std, self.data)
        is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
        return {
            "mean": jax.tree.map(lambda t: t[0], moments, is_leaf=is_pair),
            "std": jax.tree.map(lambda t: t[1], moments, is_leaf=is_pair),
            "min": jax.tree.map(lambda x: extreme(x, jnp.min, biggest), self.data),
            "max": jax.tree.map(lambda x: extreme(x, jnp.max, smallest), self.data),
            "count": count,
        }

    # ----------------------------------------------------------------- accessors

    def get_data(self) -> PyTree:
        """The stacked data PyTree (batch axis 0)."""
        return self.data

    def get_states(self) -> PyTree:
        """The stacked per-element states (batch axis 0)."""
        return self.states

    def get_batch_state(self) -> PyTree:
        """The batch-level state PyTree."""
        return self.batch_state

    def get_batch_metadata(self) -> PyTree:
        """The batch-level metadata, or None."""
        return self.batch_metadata

    def set_batch_metadata(self, metadata: PyTree) -> "Batch":
        """A new Batch with `batch_metadata` replaced (this one is unchanged).

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.zeros(2)})
            >>> b.set_batch_metadata({"shard": jnp.array(3)}).get_batch_metadata()
            {'shard': Array(3, dtype=int32, weak_type=True)}
            >>> b.get_batch_metadata() is None
            True
        """
        return dataclasses.replace(self, batch_metadata=metadata)

    def update_batch_state(self, updates: Mapping[str, Any]) -> "Batch":
        """A new Batch with `updates` merged into `batch_state` (nested dicts merge).

        Examples:
            >>> import jax.numpy as jnp
            >>> import jaxbatch as jb
            >>> b = jb.Batch.from_parts({"x": jnp.zeros(2)}, batch_state={"a": 1, "b": 2})
            >>> sorted(b.update_batch_state({"b": 3, "c": 4}).get_batch_state().items())
            [('a', 1), ('b', 3), ('c', 4)]
        """
        return dataclasses.replace(self, batch_state=merge_nested(self.batch_state, updates))


def create_batch_from_arrays(
    data: PyTree, states: PyTree = None, metadata: Metadata | None = None
) -> Batch:
    """A validated Batch from pre-stacked arrays; every row valid.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.create_batch_from_arrays({"x": jnp.zeros((5, 2))},
        ...                                 metadata=jb.Metadata(index=jnp.arange(5)))
        >>> b.batch_size, b.metadata.epoch.shape
        (5, (5,))
    """
    return Batch.from_parts(data, states, metadata)

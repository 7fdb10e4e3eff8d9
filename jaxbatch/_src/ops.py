"""Operations on whole `Batch`es: selecting rows, concatenating, updating, and control flow.

Every function here is pure and, except `select_rows_compact`, works under `jit`, `vmap`
and `grad`: shapes depend only on the input shapes, never on values. Row selection keeps the
batch size and moves the chosen rows to the front; the rest become padding rows
(`valid_mask` False, data zeroed), which every masked reduction ignores.
"""

import dataclasses
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike
from jaxtyping import Array

from .base import row_spec
from .batch import Batch, rows_mask
from .element import as_array_tree, merge_nested
from .spec import check_against_spec

_INT32_MAX = int(np.iinfo(np.int32).max)
_ROW_FIELDS = ("data", "states", "metadata", "valid_mask")


def _check_mask(batch: Batch, mask: Any) -> None:
    """Raise `ValueError` unless `mask` is a bool vector with one entry per row."""
    shape, dtype = np.shape(mask), jnp.result_type(mask)
    expected = (batch.batch_size,)
    if shape != expected or dtype != jnp.bool_:
        raise ValueError(
            f"`mask` must be a bool array of shape {expected} (one entry per row of the "
            f"batch), got shape {shape} dtype {dtype}. Build it from the batch, e.g. "
            "`batch.data['x'][:, 0] > 0`, or cast with `.astype(bool)`."
        )


def _check_count(value: Any, name: str) -> int:
    """`value` as a Python int in `[0, 2**31 - 1]`, or a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"`{name}` must be a non-negative int, got {value!r}.")
    value = operator.index(value)
    if not 0 <= value <= _INT32_MAX:
        raise ValueError(
            f"`{name}` must be a non-negative int no larger than {_INT32_MAX} (the loop "
            f"counter is int32), got {value}."
        )
    return value


def select_rows(batch: Batch, mask: ArrayLike) -> Batch:
    """Keep the rows where `mask & batch.valid_mask` is True, with static shapes.

    The kept rows move to the front in their original order; every other row becomes a
    padding row: `valid_mask` False and every batched leaf (data, states, metadata) zeroed
    (0, or False for bool leaves). The batch size, `batch_state` and `batch_metadata` are
    unchanged, so this works under `jit` and `vmap`, and gradients flow to the kept rows.
    Use `select_rows_compact` for the eager variant that drops the padding rows.

    Args:
        batch: the batch to select from.
        mask: `[batch]` bool; True keeps a row (padding rows are never kept).

    Returns:
        A Batch of the same shapes with `num_valid` equal to the number of kept rows.

    Raises:
        ValueError: `mask` is not a bool array of shape `(batch.batch_size,)` (a static
            check, so it raises at trace time).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.array([10, 11, 12, 13])},
        ...                         valid_mask=jnp.array([True, True, True, False]))
        >>> s = jb.select_rows(b, jnp.array([False, True, True, True]))
        >>> s.data["x"], s.valid_mask
        (Array([11, 12,  0,  0], dtype=int32), Array([ True,  True, False, False], dtype=bool))
    """
    _check_mask(batch, mask)
    keep = jnp.asarray(mask) & batch.valid_mask
    # A stable sort of "not kept" puts kept rows first, each group in its original order.
    order = jnp.argsort(~keep, stable=True)
    num_kept = jnp.sum(keep, dtype=jnp.int32)
    new_valid = jnp.arange(batch.batch_size, dtype=jnp.int32) < num_kept

    def move(x: Array) -> Array:
        rows = jnp.take(jnp.asarray(x), order, axis=0, unique_indices=True)
        return jnp.where(rows_mask(new_valid, rows), rows, jnp.zeros((), rows.dtype))

    return batch.map_rows(move)


def select_rows_compact(batch: Batch, mask: ArrayLike) -> Batch:
    """Eagerly keep only the rows where `mask & batch.valid_mask` is True (a smaller Batch).

    The result's batch size is the number of kept rows, so it depends on values: this needs
    a concrete `mask` and `valid_mask` and cannot run under `jit`. Inside `jit`, use
    `select_rows`, which keeps the shape and marks the dropped rows as padding.

    Args:
        batch: the batch to select from (its `valid_mask` must be concrete).
        mask: `[batch]` bool, concrete (a NumPy or JAX array, not a tracer).

    Returns:
        A Batch holding only the kept rows, in order, all valid.

    Raises:
        ValueError: `mask` is not a bool array of shape `(batch.batch_size,)`.
        TypeError: `mask` or `batch.valid_mask` is traced (called under `jit`, `vmap`, ...).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.array([10, 11, 12])})
        >>> jb.select_rows_compact(b, jnp.array([True, False, True])).data["x"]
        Array([10, 12], dtype=int32)
    """
    _check_mask(batch, mask)
    try:
        keep = np.asarray(mask) & np.asarray(batch.valid_mask)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        raise TypeError(
            "`select_rows_compact` needs a concrete `mask` and `batch.valid_mask`: its "
            "output shape depends on their values, so it cannot run under `jit`, `vmap` or "
            "other transformations. Use `select_rows` there (static shapes, unselected rows "
            "become padding)."
        ) from None
    rows = np.flatnonzero(keep)
    return batch.map_rows(lambda x: jnp.asarray(x)[rows])


def concatenate(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches along the batch axis (data, states, metadata and `valid_mask`).

    Every batch must have the same structure and per-row shapes and dtypes; batch sizes may
    differ (zero included). `batch_state` and `batch_metadata` are taken from the first
    batch. A single batch comes back equal to itself.

    Args:
        batches: a non-empty sequence of Batches.

    Returns:
        A Batch whose batch size is the sum of the inputs'; masks are concatenated too.

    Raises:
        ValueError: `batches` is empty, or a leaf's per-row shape differs (the message names
            the batch and the leaf path).
        TypeError: a batch's structure or a leaf's dtype differs (the leaf path is named).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> a = jb.Batch.from_parts({"x": jnp.array([1, 2])})
        >>> b = jb.Batch.from_parts({"x": jnp.array([3])}, valid_mask=jnp.array([False]))
        >>> c = jb.concatenate([a, b])
        >>> c.data["x"], c.valid_mask
        (Array([1, 2, 3], dtype=int32), Array([ True,  True, False], dtype=bool))
    """
    if len(batches) == 0:
        raise ValueError(
            "`concatenate` needs at least one batch, got an empty sequence; pass e.g. "
            "`[batch]` (an empty batch is one with zero-length arrays)."
        )

    def rows_spec(batch: Batch) -> dict[str, Any]:
        return {field: row_spec(getattr(batch, field)) for field in _ROW_FIELDS}

    expected = rows_spec(batches[0])
    for i, batch in enumerate(batches[1:], start=1):
        got = rows_spec(batch)
        for field in _ROW_FIELDS:
            check_against_spec(
                expected[field], got[field], what=f"batches[{i}].{field}", shape_error=ValueError
            )
    rows = [tuple(getattr(batch, field) for field in _ROW_FIELDS) for batch in batches]
    data, states, metadata, valid_mask = jax.tree.map(
        lambda *xs: jnp.concatenate(xs, axis=0), *rows
    )
    return dataclasses.replace(
        batches[0], data=data, states=states, metadata=metadata, valid_mask=valid_mask
    )


def update(batch: Batch, data_updates: Mapping[str, Any]) -> Batch:
    """A new Batch with `data_updates` merged into `data` (nested dicts merge).

    Leaves of `data_updates` replace or add data leaves; every one needs the batch's leading
    dimension. The mask, states and metadata are kept; the input batch is unchanged.

    Args:
        batch: a batch whose `data` is a dict.
        data_updates: a (nested) dict of arrays with batch axis 0.

    Returns:
        The updated Batch.

    Raises:
        ValueError: an update leaf whose leading dimension is not `batch.batch_size` (or
            that is 0-d); the leaf path is named.
        TypeError: `batch.data` is not a dict, or an update leaf is not an array.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"img": {"r": jnp.zeros(2), "g": jnp.zeros(2)}})
        >>> u = jb.update(b, {"img": {"r": jnp.ones(2)}, "y": jnp.array([3, 4])})
        >>> u.data["img"]["r"], u.data["img"]["g"], u.data["y"]
        (Array([1., 1.], dtype=float32), Array([0., 0.], dtype=float32),
         Array([3, 4], dtype=int32))
    """
    data_updates = as_array_tree(data_updates, "data_updates")
    for path, leaf in jax.tree_util.tree_flatten_with_path(data_updates)[0]:
        shape = np.shape(leaf)
        if not shape or shape[0] != batch.batch_size:
            raise ValueError(
                f"Leaf `data_updates{jax.tree_util.keystr(path)}` has shape {shape}, expected "
                f"a leading batch dimension of {batch.batch_size} (one row per row of the "
                "batch). Put batch-level values in `batch_state` instead."
            )
    return dataclasses.replace(batch, data=merge_nested(batch.data, data_updates))


def conditional_transform(
    batch: Batch,
    true_fn: Callable[[Batch], Batch],
    false_fn: Callable[[Batch], Batch],
    condition: ArrayLike,
) -> Batch:
    """`true_fn(batch)` if `condition` else `false_fn(batch)`, via `jax.lax.cond`.

    Works under `jit`, `vmap` (a batched condition runs both branches and selects) and
    `grad`. Both functions must return Batches of the same shapes and dtypes.

    Args:
        batch: the input batch.
        true_fn: applied when `condition` is True.
        false_fn: applied when `condition` is False.
        condition: a scalar bool (a Python bool or a 0-d array, possibly traced).

    Returns:
        The transformed Batch.

    Raises:
        TypeError: from `lax.cond`, if the branches return different structures or shapes,
            or `condition` is not a scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.array([1.0, 2.0])})
        >>> double = lambda b: jb.update(b, {"x": b.data["x"] * 2})
        >>> jb.conditional_transform(b, double, lambda b: b, jnp.array(True)).data["x"]
        Array([2., 4.], dtype=float32)
    """
    return jax.lax.cond(condition, true_fn, false_fn, batch)


def iterative_transform(
    batch: Batch, fn: Callable[[Batch, Array], Batch], num_iterations: int
) -> Batch:
    """Apply `fn(batch, i)` for `i = 0, ..., num_iterations - 1`, via `jax.lax.fori_loop`.

    `i` is an int32 scalar array. `num_iterations` is static, so the loop lowers to a `scan`
    and is differentiable in both forward and reverse mode.

    Args:
        batch: the initial batch.
        fn: `(batch, i) -> batch`, returning the same shapes and dtypes.
        num_iterations: a non-negative int (0 returns `batch` unchanged).

    Returns:
        The batch after `num_iterations` applications of `fn`.

    Raises:
        ValueError: `num_iterations` is not a non-negative int.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.array([0, 10])})
        >>> add_i = lambda b, i: jb.update(b, {"x": b.data["x"] + i})
        >>> jb.iterative_transform(b, add_i, 4).data["x"]
        Array([ 6, 16], dtype=int32)
    """
    num_iterations = _check_count(num_iterations, "num_iterations")
    return jax.lax.fori_loop(0, num_iterations, lambda i, b: fn(b, i), batch)


def while_transform(
    batch: Batch,
    cond_fn: Callable[[Batch], ArrayLike],
    body_fn: Callable[[Batch], Batch],
    max_iterations: int = 100,
) -> Batch:
    """Apply `body_fn` while `cond_fn(batch)` is True, at most `max_iterations` times.

    A bounded `jax.lax.while_loop`: it stops as soon as `cond_fn` returns False or after
    `max_iterations` applications, whichever comes first (reaching the bound is not an
    error). It works under `jit`, `vmap` and forward-mode differentiation (`jax.jvp`,
    `jax.jacfwd`). Like any `lax.while_loop` it is **not** reverse-mode differentiable
    (`jax.grad` raises); use `iterative_transform` with a fixed count for that.

    Args:
        batch: the initial batch.
        cond_fn: `batch -> bool scalar`; the loop continues while it is True.
        body_fn: `batch -> batch`, returning the same shapes and dtypes.
        max_iterations: a non-negative int bounding the number of iterations.

    Returns:
        The batch after the last iteration.

    Raises:
        ValueError: `max_iterations` is not a non-negative int.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> b = jb.Batch.from_parts({"x": jnp.array([1, 3])})
        >>> double = lambda b: jb.update(b, {"x": b.data["x"] * 2})
        >>> jb.while_transform(b, lambda b: jnp.max(b.data["x"]) < 20, double).data["x"]
        Array([ 8, 24], dtype=int32)
        >>> jb.while_transform(b, lambda b: True, double, max_iterations=2).data["x"]
        Array([ 4, 12], dtype=int32)
    """
    max_iterations = _check_count(max_iterations, "max_iterations")

    def cond(carry: tuple[Array, Batch]) -> Array:
        i, b = carry
        return jnp.logical_and(i < max_iterations, cond_fn(b))

    def body(carry: tuple[Array, Batch]) -> tuple[Array, Batch]:
        i, b = carry
        return i + 1, body_fn(b)

    _, batch = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), batch))
    return batch

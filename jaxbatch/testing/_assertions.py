"""Chex-style assertions on `Batch`es and `Emit`s, for users' own tests.

Like chex's tree assertions they run on the host, on concrete arrays (NumPy or JAX): call
them outside `jax.jit` on what a jitted function returned. Every failure is an
`AssertionError` naming the leaf path and, for values, the row. Value comparisons use chex
(`chex.assert_trees_all_equal` / `chex.assert_trees_all_close`), restricted to valid rows:
padding rows (`valid_mask == False`) hold unspecified data and are never compared.
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from .._src.base import Emit
from .._src.batch import Batch

_ROW_FIELDS = ("data", "states", "metadata")  # the fields with a batch axis besides the mask


def _name(path: tuple[Any, ...]) -> str:
    """`data['x']` for the path of a leaf of a `Batch` (no leading dot)."""
    return jax.tree_util.keystr(path).lstrip(".")


def _reject_tracers(fn: str, **trees: Any) -> None:
    for arg, tree in trees.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if isinstance(leaf, jax.core.Tracer):  # pyright: ignore
                raise TypeError(
                    f"`{fn}` reads array values on the host, but `{arg}.{_name(path)}` is a "
                    "tracer: call it outside `jax.jit` / `vmap` / `scan`, on the arrays "
                    "that the jitted function returns."
                )


def _host(x: Any) -> np.ndarray:
    """`x` as a NumPy array (a typed PRNG key as its raw key data)."""
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _show(x: np.ndarray) -> str:
    return np.array2string(np.asarray(x), separator=", ", threshold=20)


def _rows(indices: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return f"[{shown}{', ...' if len(indices) > limit else ''}]"


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return tuple(leaf.shape), leaf.dtype
    return tuple(np.shape(leaf)), jnp.result_type(leaf)


def _check_is_batch(**batches: Any) -> None:
    for arg, batch in batches.items():
        if not isinstance(batch, Batch):
            fix = f" (pass `{arg}.batch`)" if isinstance(batch, Emit) else ""
            raise TypeError(f"`{arg}` must be a `jb.Batch`, got {type(batch).__name__}{fix}.")


def _structure_error(
    what: str, got: list[str], want: list[str], got_def: Any, want_def: Any
) -> str:
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    parts = [
        f"{kind} leaves {', '.join(f'`{name}`' for name in names)}"
        for kind, names in (("missing", missing), ("unexpected", extra))
        if names
    ]
    return f"{what}: {'; '.join(parts) or f'tree {got_def} against {want_def}'}."


def assert_batch_matches_spec(batch: Batch, spec: Batch) -> None:
    """Assert that `batch` has the tree structure, shapes and dtypes of `spec`.

    Only static shapes and dtypes are read, so (like `chex.assert_shape`) this also works
    on tracers, at trace time under `jit`.

    Args:
        batch: the `Batch` to check, e.g. `emit.batch` from a batcher's `step`.
        spec: a `Batch` of `jax.ShapeDtypeStruct`s, as `jb.batch_spec(batcher,
            element_spec)` returns, or an example `Batch`.

    Raises:
        AssertionError: a different structure (missing or unexpected leaves are named), or
            a leaf whose shape or dtype differs; the message names the leaf path, e.g.
            `batch.data['x']`, with what it has and what `spec` expects.
        TypeError: `batch` is not a `Batch` (given an `Emit`, pass `emit.batch`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import assert_batch_matches_spec
        >>> batcher = jb.fixed_size(2)
        >>> spec = jb.batch_spec(batcher, {"x": jnp.zeros(3)})
        >>> state, emit = batcher.step(batcher.init({"x": jnp.zeros(3)}), {"x": jnp.ones(3)})
        >>> assert_batch_matches_spec(emit.batch, spec)
        >>> assert_batch_matches_spec(jb.Batch.from_parts({"x": jnp.zeros((2, 4))}), spec)
        Traceback (most recent call last):
        ...
        AssertionError: Leaf `batch.data['x']` has shape (2, 4), expected (2, 3) from `spec`.
    """
    _check_is_batch(batch=batch)
    got, got_def = jax.tree_util.tree_flatten_with_path(batch)
    expected, exp_def = jax.tree_util.tree_flatten_with_path(spec)
    if got_def != exp_def:
        raise AssertionError(
            _structure_error(
                "`batch` does not have the structure of `spec`",
                [f"batch.{_name(p)}" for p, _ in got],
                [f"batch.{_name(p)}" for p, _ in expected],
                got_def,
                exp_def,
            )
        )
    for (path, leaf), (_, want) in zip(got, expected):
        (shape, dtype), (want_shape, want_dtype) = _shape_dtype(leaf), _shape_dtype(want)
        if shape != want_shape:
            raise AssertionError(
                f"Leaf `batch.{_name(path)}` has shape {shape}, expected {want_shape} from `spec`."
            )
        if dtype != want_dtype:
            raise AssertionError(
                f"Leaf `batch.{_name(path)}` has dtype {dtype}, expected {want_dtype} from `spec`."
            )


def _row_leaves(batch: Batch) -> tuple[list[tuple[str, Any]], Any]:
    """The leaves with a batch axis (data, states, metadata) by name, and their treedef."""
    leaves = [
        (_name(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]
        if isinstance(path[0], jax.tree_util.GetAttrKey) and path[0].name in _ROW_FIELDS
    ]
    treedef = jax.tree.structure(tuple(getattr(batch, f) for f in _ROW_FIELDS))
    return leaves, treedef


def _differing_rows(x: np.ndarray, y: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """Indices of the rows (axis 0) of `x` and `y` with an element that differs."""
    inexact = np.issubdtype(np.result_type(x, y), np.inexact)
    if inexact and (rtol or atol):
        same = np.isclose(x, y, rtol=rtol, atol=atol, equal_nan=True)
    else:
        same = x == y
        if inexact:
            same |= np.isnan(x) & np.isnan(y)
    return np.flatnonzero(~same.reshape(len(x), int(np.prod(x.shape[1:]))).all(axis=1))


def assert_valid_rows_equal(a: Batch, b: Batch, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Assert that two Batches have the same `valid_mask` and the same valid rows.

    Every leaf of `data`, `states` and `metadata` is compared on the rows where the mask
    is True: exactly by default (`chex.assert_trees_all_equal`), or within `rtol` / `atol`
    (`chex.assert_trees_all_close`: `|a - b| <= atol + rtol * |b|`). NaNs in the same place
    are equal. Padding rows are ignored, whatever they hold (NaN included). Dtypes are not
    compared (use `assert_batch_matches_spec`), nor are `batch_state` and
    `batch_metadata`, which have no rows (compare them with chex's tree assertions).

    Args:
        a: the Batch under test (NumPy or JAX leaves, any number of dims after the batch
            axis).
        b: the expected Batch, e.g. built with `jb.Batch.from_parts(...)`.
        rtol: relative tolerance, >= 0.
        atol: absolute tolerance, >= 0.

    Raises:
        AssertionError: different structures, batch sizes or leaf shapes; a `valid_mask`
            that differs (the rows are named); or a valid row that differs (the message
            names the leaf path, the first differing row and both values).
        TypeError: `a` or `b` is not a `Batch`, or a leaf is a tracer (called inside `jit`).
        ValueError: a negative tolerance.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import assert_valid_rows_equal
        >>> mask = jnp.array([True, True, False])
        >>> a = jb.Batch.from_parts({"x": jnp.array([1, 2, 0])}, valid_mask=mask)
        >>> b = jb.Batch.from_parts({"x": jnp.array([1, 2, 99])}, valid_mask=mask)
        >>> assert_valid_rows_equal(a, b)  # row 2 is padding: ignored
        >>> c = jb.Batch.from_parts({"x": jnp.array([1, 5, 0])}, valid_mask=mask)
        >>> assert_valid_rows_equal(a, c)
        Traceback (most recent call last):
        ...
        AssertionError: Leaf `data['x']` differs at valid row 1: a has 2, b has 5 (exact; ...).
    """
    for arg, tol in (("rtol", rtol), ("atol", atol)):
        if not tol >= 0:
            raise ValueError(f"`{arg}` must be a non-negative number, got {tol!r}.")
    _check_is_batch(a=a, b=b)
    _reject_tracers("assert_valid_rows_equal", a=a, b=b)

    a_leaves, a_def = _row_leaves(a)
    b_leaves, b_def = _row_leaves(b)
    if a_def != b_def:
        raise AssertionError(
            _structure_error(
                "`a` does not have the structure of `b`",
                [n for n, _ in a_leaves],
                [n for n, _ in b_leaves],
                a_def,
                b_def,
            )
        )
    mask_a, mask_b = _host(a.valid_mask).astype(bool), _host(b.valid_mask).astype(bool)
    if mask_a.shape != mask_b.shape:
        raise AssertionError(
            f"`a` has {mask_a.shape[0]} rows but `b` has {mask_b.shape[0]} (`valid_mask` "
            f"shapes {mask_a.shape} and {mask_b.shape})."
        )
    differ = np.flatnonzero(mask_a != mask_b)
    if len(differ):
        raise AssertionError(
            f"`valid_mask` differs at rows {_rows(differ)}: a has {_show(mask_a[differ])}, "
            f"b has {_show(mask_b[differ])} (a: {_show(mask_a)}, b: {_show(mask_b)})."
        )

    valid = np.flatnonzero(mask_a)
    how = "exact" if rtol == 0 and atol == 0 else f"rtol={rtol}, atol={atol}"
    for (name, x), (_, y) in zip(a_leaves, b_leaves):
        x, y = _host(x), _host(y)
        if x.shape != y.shape:
            raise AssertionError(f"Leaf `{name}` has shape {x.shape} in `a` but {y.shape} in `b`.")
        if x.ndim == 0 or x.shape[0] != len(mask_a):
            raise AssertionError(
                f"Leaf `{name}` has shape {x.shape}: expected a leading batch axis of "
                f"{len(mask_a)}, the length of `valid_mask`."
            )
        x, y = x[valid], y[valid]
        try:
            if how == "exact":
                chex.assert_trees_all_equal(x, y)
            else:
                chex.assert_trees_all_close(x, y, rtol=rtol, atol=atol)
        except AssertionError as err:
            bad = _differing_rows(x, y, rtol, atol)
            if not len(bad):  # chex and NumPy disagree: let chex's message speak
                raise AssertionError(f"Leaf `{name}` differs on the valid rows: {err}") from err
            row = valid[bad[0]]
            raise AssertionError(
                f"Leaf `{name}` differs at valid row {row}: a has {_show(x[bad[0]])}, b has "
                f"{_show(y[bad[0]])} ({how}; {len(bad)} of {len(valid)} valid rows differ)."
            ) from None


def assert_no_valid_rows(emit: Emit | Batch) -> None:
    """Assert that an emission carries no batch: `ready` False, `valid_mask` all False.

    Given a `Batch`, only its `valid_mask` is checked. The data of such an emission is
    unspecified and is not read.

    Args:
        emit: an `Emit` (from a batcher's `step` or `flush`) or a `Batch`.

    Raises:
        AssertionError: `ready` is True, or rows are valid (the message names them).
        TypeError: not an `Emit` or `Batch`, or a leaf is a tracer (called inside `jit`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import assert_no_valid_rows
        >>> batcher = jb.fixed_size(2)
        >>> state = batcher.init({"x": jnp.zeros(())})
        >>> state, emit = batcher.step(state, {"x": jnp.ones(())})
        >>> assert_no_valid_rows(emit)
        >>> state, emit = batcher.step(state, {"x": jnp.ones(())})
        >>> assert_no_valid_rows(emit)
        Traceback (most recent call last):
        ...
        AssertionError: Expected no batch, but `ready` is True and `valid_mask` is True at ...
    """
    if not isinstance(emit, (Emit, Batch)):
        raise TypeError(f"`emit` must be a `jb.Emit` or a `jb.Batch`, got {type(emit).__name__}.")
    batch = emit if isinstance(emit, Batch) else emit.batch
    ready = None if isinstance(emit, Batch) else emit.ready
    _reject_tracers("assert_no_valid_rows", emit=emit)
    problems = []
    if ready is not None and bool(_host(ready)):
        problems.append("`ready` is True")
    valid = np.flatnonzero(_host(batch.valid_mask))
    if len(valid):
        problems.append(f"`valid_mask` is True at rows {_rows(valid)}")
    if problems:
        raise AssertionError(f"Expected no batch, but {' and '.join(problems)}.")

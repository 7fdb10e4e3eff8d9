"""The configuration checks every batcher factory shares: each raises the `ValueError` the
laws ask for (law 8), naming the argument, what was given and what is expected."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..element import Element

# Sizes index rows with int32 (no `jax_enable_x64` needed), so none may pass this.
MAX_SIZE = 2**31 - 1


def lengths_mapping(lengths: Any) -> None:
    """`lengths` (`jb.pack`'s and `jb.pipeline`'s) must be a non-empty mapping
    `{packed feature key: length key}` of str, else a `ValueError` showing what was given."""
    if (
        not isinstance(lengths, Mapping)
        or not lengths
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in lengths.items())
    ):
        raise ValueError(
            "`lengths` must be a non-empty dict `{packed_feature_key: length_key}` of str "
            f"keys, e.g. {{'tokens': 'length'}}; got {lengths!r}."
        )


def positive_int(value: Any, name: str) -> int:
    """`value` if it is a positive int (not a bool) of at most `MAX_SIZE`, else a
    `ValueError` naming `name`. Checked on the number alone: a factory allocates nothing."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
    if value > MAX_SIZE:
        raise ValueError(
            f"`{name}` must be at most 2**31 - 1 (rows are indexed with int32), got {value}."
        )
    return value


def flag(value: Any, name: str) -> bool:
    """`value` if it is a bool, else a `ValueError` naming `name`."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be a bool, got {value!r}.")
    return value


def pad_number(pad_value: Any) -> bool | int | float:
    """`pad_value` if it is a Python number, else a `ValueError`."""
    if not isinstance(pad_value, bool | int | float):
        raise ValueError(
            f"`pad_value` must be a Python number (int, float or bool), got {pad_value!r}."
        )
    return pad_value


def pad_value_fits(pad_value: bool | int | float, spec: Element) -> None:
    """Refuse a `pad_value` that a leaf's dtype cannot hold exactly (no silent wrap or cut)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(spec)[0]:
        dtype = np.dtype(leaf.dtype)
        if dtype.kind not in "biu":
            continue
        low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
        whole = math.isfinite(pad_value) and float(pad_value) == int(pad_value)
        if not whole or not low <= pad_value <= high:
            raise ValueError(
                f"`pad_value` {pad_value!r} cannot be stored in leaf "
                f"`element{jax.tree_util.keystr(path)}` of dtype {dtype} (integers in "
                f"[{low}, {high}]); pick a pad value every leaf can hold, such as 0."
            )


def row_lengths(value: Any, features: Sequence[str]) -> tuple[int, ...]:
    """`row_length` as one positive int per packed feature, in the order of `features`.

    An int is every feature's row length; a mapping (Grain's `length_struct`) gives each
    packed feature its own and must name exactly the packed features. Each `ValueError`
    names the feature at fault.
    """
    if not isinstance(value, Mapping):
        return (positive_int(value, "row_length"),) * len(features)
    missing = [k for k in features if k not in value]
    if missing:
        raise ValueError(
            f"`row_length` has no length for packed features {missing} (the keys of "
            f"`lengths`); give every one of {list(features)} a length, got {dict(value)!r}."
        )
    unknown = sorted(map(repr, set(value) - set(features)))
    if unknown:
        raise ValueError(
            f"`row_length` names {', '.join(unknown)}, which are not packed features (the "
            f"keys of `lengths`: {list(features)}); drop them, got {dict(value)!r}."
        )
    for k in features:
        n = value[k]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"`row_length[{k!r}]` must be a positive int (the row length of packed "
                f"feature {k!r}), got {n!r}."
            )
    return tuple(value[k] for k in features)


def clamp_to_int32(x: Any, low: int, high: int) -> jax.Array:
    """Integer `x` (any width, traced or not) clamped to `[low, high]` in its own dtype, then
    cast to int32 (`low`, `high` within int32).

    Clamp before the cast, never after: an int64 `2**32 + 3` cast first would read as 3. Pass
    bounds one past the valid range (e.g. `low=-1`, `high=limit + 1`), and a range check on
    the result fails exactly when it fails on `x`, under `jax_enable_x64` too.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.int32)
    info = jnp.iinfo(x.dtype)
    if info.min < low:
        x = jnp.maximum(x, jnp.asarray(low, x.dtype))
    if info.max > high:
        x = jnp.minimum(x, jnp.asarray(high, x.dtype))
    return x.astype(jnp.int32)

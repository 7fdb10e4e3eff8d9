"""The configuration checks every batcher factory shares: each raises the `ValueError` the
laws ask for (law 8), naming the argument, what was given and what is expected."""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from ..element import Element


def positive_int(value: Any, name: str) -> int:
    """`value` if it is a positive int (not a bool), else a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")
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
        if float(pad_value) != int(pad_value) or not low <= pad_value <= high:
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

"""Hypothesis strategies for batcher tests: element trees, streams, configurations.

This module needs `hypothesis`, a test-only dependency: `import jaxbatch` and
`import jaxbatch.testing` never import it; only `import jaxbatch.testing.strategies` does.

Every strategy draws NumPy values (no JAX work while drawing). Trees drawn by one
`element_trees()` or `variable_length_sequences()` strategy keep one structure, shapes and
dtypes within a test case, so `streams` can stack them into a stream of elements.

Examples:
    >>> from hypothesis import given, settings
    >>> import jaxbatch as jb
    >>> from jaxbatch.testing import strategies as jbst
    >>> [dtype.name for dtype in jbst.DTYPES]  # the leaf dtypes of `element_trees()`
    ['float32', 'int32', 'uint8', 'bool']
    >>> @settings(max_examples=5)
    ... @given(jbst.streams(jbst.element_trees(), max_size=4), jbst.fixed_size_configs())
    ... def test_fixed_size_builds(stream, config):
    ...     assert isinstance(jb.fixed_size(**config), jb.Batcher)
    >>> test_fixed_size_builds()
"""

import itertools
from typing import Any

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import numpy as np

DTYPES: tuple[np.dtype, ...] = tuple(map(np.dtype, ("float32", "int32", "uint8", "bool")))
"""The leaf dtypes `element_trees` draws from by default (all valid without `jax_enable_x64`)."""

_keys = itertools.count()  # each `element_trees()` gets its own shared structure


def _values_of(dtype: np.dtype) -> st.SearchStrategy:
    """Finite values of `dtype` (no NaN, infinities or subnormals: bits survive every op)."""
    if dtype.kind == "f":
        return hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    return hnp.from_dtype(dtype)


def _tree_of(structure: Any) -> st.SearchStrategy:
    """Values for a drawn structure: nested dicts whose leaves are `(dtype, shape)`."""
    if isinstance(structure, dict):
        return st.fixed_dictionaries({k: _tree_of(v) for k, v in structure.items()})
    dtype, shape = structure
    return hnp.arrays(dtype, shape, elements=_values_of(dtype))


def element_trees(
    *, dtypes: tuple[Any, ...] = DTYPES, max_leaves: int = 4, max_side: int = 3
) -> st.SearchStrategy[dict[str, Any]]:
    """Nested dicts of small NumPy arrays of mixed dtypes: one element of a stream.

    The structure (keys, nesting, every leaf's shape and dtype) is drawn once per test case
    and shared by every draw from this strategy, so draws stack into a stream; the values
    are drawn afresh each time. Leaves have 0 to 2 axes of sizes 1 to `max_side`.

    Args:
        dtypes: the leaf dtypes to choose from.
        max_leaves: the most leaves in a tree.
        max_side: the largest size of a leaf axis.

    Returns:
        A strategy of `dict`s whose leaves are NumPy arrays.

    Examples:
        >>> import jax
        >>> from hypothesis import given, settings
        >>> from jaxbatch.testing import strategies as jbst
        >>> trees = jbst.element_trees(max_leaves=3)
        >>> @settings(max_examples=5)
        ... @given(trees, trees)
        ... def test_one_structure(tree, other):  # two draws of one strategy: one structure
        ...     assert jax.tree.structure(tree) == jax.tree.structure(other)
        >>> test_one_structure()
    """
    leaf = st.tuples(
        st.sampled_from([np.dtype(d) for d in dtypes]),
        hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=max_side),
    )
    names = st.text(alphabet="abcdefgh", min_size=1, max_size=2)

    def nest(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.dictionaries(names, children, min_size=1, max_size=3)

    structure = nest(st.recursive(leaf, nest, max_leaves=max_leaves))
    shared = st.shared(structure, key=f"jaxbatch.testing.element_trees.{next(_keys)}")
    return shared.flatmap(_tree_of)


@st.composite
def _sequence(draw, max_len, min_len, dtype, pad_value):
    length = draw(st.integers(min_len, max_len))
    values = draw(hnp.arrays(dtype, (length,), elements=_values_of(dtype)))
    tokens = np.full((max_len,), pad_value, dtype)
    tokens[:length] = values
    return {"tokens": tokens, "length": np.asarray(length, np.int32)}


def variable_length_sequences(
    max_len: int = 8, *, min_len: int = 0, dtype: Any = np.int32, pad_value: Any = 0
) -> st.SearchStrategy[dict[str, np.ndarray]]:
    """A 1-d sequence of random length, padded to `max_len`, with its length.

    Draws `{"tokens": [max_len] array, "length": int32 scalar}`: the first `length` tokens
    are values of `dtype`, the rest are `pad_value`. The structure is the same on every
    draw, so `streams` stacks them.

    Args:
        max_len: the padded length (and the longest sequence).
        min_len: the shortest sequence.
        dtype: the token dtype.
        pad_value: the fill past `length`.

    Returns:
        A strategy of `{"tokens", "length"}` dicts of NumPy arrays.

    Examples:
        >>> from hypothesis import given, settings
        >>> from jaxbatch.testing import strategies as jbst
        >>> @settings(max_examples=5)
        ... @given(jbst.variable_length_sequences(max_len=4, pad_value=-1))
        ... def test_padded(seq):
        ...     assert seq["tokens"].shape == (4,)
        ...     assert (seq["tokens"][seq["length"]:] == -1).all()
        >>> test_padded()
    """
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"`max_len` must be a positive int, got {max_len!r}.")
    if isinstance(min_len, bool) or not isinstance(min_len, int) or not 0 <= min_len <= max_len:
        raise ValueError(f"`min_len` must be an int in [0, max_len={max_len}], got {min_len!r}.")
    return _sequence(max_len, min_len, np.dtype(dtype), pad_value)


def _stack(elements: list[Any]) -> Any:
    first = jax.tree.structure(elements[0])
    specs = [jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), e) for e in elements]
    for i, (element, spec) in enumerate(zip(elements, specs)):
        if jax.tree.structure(element) != first or spec != specs[0]:
            raise ValueError(
                f"`streams` drew element {i} with structure, shapes or dtypes {spec}, unlike "
                f"element 0 ({specs[0]}). Use an element strategy whose structure is fixed "
                "within a test case, like `element_trees()` or `variable_length_sequences()`."
            )
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *elements)


def streams(
    elements: st.SearchStrategy | None = None, min_size: int = 2, max_size: int = 8
) -> st.SearchStrategy[Any]:
    """Streams: `min_size` to `max_size` elements drawn from `elements`, stacked.

    The result is the tree of one element whose every leaf gained a leading axis: the
    `elements` argument of `check_batcher`, `jb.scan` and `jb.batch_all`.

    Args:
        elements: a strategy of PyTrees of NumPy arrays with one structure per test case;
            default `element_trees()`.
        min_size: the fewest elements (at least 1).
        max_size: the most elements.

    Returns:
        A strategy of stacked PyTrees.

    Raises:
        ValueError: `elements` drew trees of different structures, shapes or dtypes.

    Examples:
        >>> import jax
        >>> from hypothesis import given, settings
        >>> from jaxbatch.testing import strategies as jbst
        >>> @settings(max_examples=5)
        ... @given(jbst.streams(jbst.variable_length_sequences(max_len=3), 2, 5))
        ... def test_stacked(stream):
        ...     assert 2 <= len(stream["length"]) <= 5
        ...     assert stream["tokens"].shape == (len(stream["length"]), 3)
        >>> test_stacked()
    """
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"`min_size` must be a positive int, got {min_size!r}.")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < min_size:
        raise ValueError(f"`max_size` must be an int >= min_size={min_size}, got {max_size!r}.")
    elements = element_trees() if elements is None else elements
    return st.lists(elements, min_size=min_size, max_size=max_size).map(_stack)


def fixed_size_configs(max_batch_size: int = 4) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for `jb.fixed_size`: `batch_size`, `drop_remainder`, `pad_value`.

    `pad_value` is 0 or 1 (as int, bool or float), which every dtype of `DTYPES` (bool
    included) holds exactly; `fixed_size` refuses pad values a leaf cannot hold.

    Args:
        max_batch_size: the largest `batch_size` drawn (the smallest is 1).

    Returns:
        A strategy of dicts, to use as `jb.fixed_size(**config)`.

    Examples:
        >>> from hypothesis import given, settings
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import strategies as jbst
        >>> @settings(max_examples=5)
        ... @given(jbst.fixed_size_configs(max_batch_size=3))
        ... def test_config(config):
        ...     assert 1 <= config["batch_size"] <= 3
        ...     jb.fixed_size(**config)
        >>> test_config()
    """
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or max_batch_size < 1
    ):
        raise ValueError(f"`max_batch_size` must be a positive int, got {max_batch_size!r}.")
    return st.fixed_dictionaries(
        {
            "batch_size": st.integers(1, max_batch_size),
            "drop_remainder": st.booleans(),
            "pad_value": st.sampled_from([0, 1, True, 1.0]),
        }
    )

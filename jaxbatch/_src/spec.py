"""Specs: the shape-and-dtype trees that fix a batcher's static shapes.

`element_spec` describes one element; `batch_spec` is `jax.eval_shape` of what a batcher's
`step` really emits, so it can never disagree with it. `check_against_spec` is the one place
that turns "this tree is not like that tree" into an error naming the leaf path.
"""

import functools
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from .element import Element, as_element


def _describe(leaf: Any) -> jax.ShapeDtypeStruct:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf
    return jax.ShapeDtypeStruct(np.shape(leaf), jax.numpy.result_type(leaf))


def tree_spec(tree: PyTree) -> PyTree:
    """The tree of `jax.ShapeDtypeStruct` describing every leaf of `tree`."""
    return jax.tree.map(_describe, tree)


def _paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_against_spec(
    expected: PyTree, got: PyTree, *, what: str, shape_error: type[Exception] = TypeError
) -> None:
    """Raise unless `got` has the structure, shapes and dtypes of `expected`.

    Structure and dtype mismatches raise `TypeError`; shape mismatches raise `shape_error`.
    Messages name `what`, the leaf path, what was expected and what was given. Works on
    arrays, tracers and `jax.ShapeDtypeStruct`s alike (only shapes and dtypes are read).
    """
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    if exp_def != got_def:
        exp_paths, got_paths = set(_paths(expected)), set(_paths(got))
        missing, extra = sorted(exp_paths - got_paths), sorted(got_paths - exp_paths)
        detail = f"missing leaves {missing}, unexpected leaves {extra}"
        if not missing and not extra:
            detail = f"expected tree {exp_def}, got {got_def}"
        raise TypeError(f"{what} does not have the expected structure: {detail}.")
    for (path, exp), (_, leaf) in zip(exp_leaves, got_leaves):
        exp_spec, got_spec = _describe(exp), _describe(leaf)
        name = f"{what}{jax.tree_util.keystr(path)}"
        if exp_spec.dtype != got_spec.dtype:
            raise TypeError(
                f"Leaf `{name}` has dtype {got_spec.dtype}, expected {exp_spec.dtype}. "
                "Cast it (e.g. `x.astype(...)`) before it reaches the batcher."
            )
        if exp_spec.shape != got_spec.shape:
            raise shape_error(
                f"Leaf `{name}` has shape {got_spec.shape}, expected {exp_spec.shape}."
            )


def element_spec(element: Any) -> Element:
    """The `Element` of `jax.ShapeDtypeStruct`s describing one element.

    `element` is an `Element`, any PyTree of arrays (wrapped as `Element(data=tree)`), or
    already a spec.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> jb.element_spec({"x": jnp.zeros((2, 3))}).data["x"]
        ShapeDtypeStruct(shape=(2, 3), dtype=float32)
    """
    return tree_spec(as_element(element))


_element_spec = element_spec  # `batch_spec` takes an argument of the same name.


def batch_spec(batcher: Any, element_spec: Any, *, key: Any = None) -> Any:
    """The `Batch` of `jax.ShapeDtypeStruct`s that `batcher.step` emits for `element_spec`.

    Computed with `jax.eval_shape` of `init` then `step`, so it is exactly what the batcher
    emits; the trace is cached per batcher and shapes, so asking again costs no retrace. A
    stochastic batcher is given `key` (a dummy key if omitted: only shapes matter).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> spec = jb.batch_spec(jb.fixed_size(4), {"x": jnp.zeros(3)})
        >>> spec.data["x"].shape, spec.valid_mask.shape, spec.valid_mask.dtype
        ((4, 3), (4,), dtype('bool'))
    """
    spec = _element_spec(element_spec)
    return _emitted_batch.eval_shape(batcher, spec, jax.random.key(0) if key is None else key)


@functools.partial(jax.jit, static_argnums=0)
def _emitted_batch(batcher: Any, spec: Element, key: Any) -> Any:
    # Under `jit` so that `eval_shape` hits jit's trace cache (keyed on the batcher and the
    # shapes): drivers ask for the spec on every call and must not retrace `step` for it.
    state = batcher.init(spec, key=key)
    _, emit = batcher.step(state, jax.tree.map(lambda s: jax.numpy.zeros(s.shape, s.dtype), spec))
    return emit.batch

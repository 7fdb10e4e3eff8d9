"""What the law checks share: the law names, failing, records of emissions, and the host-side
comparisons (bit-identical trees, rows as keys, the batches of an emission)."""

from typing import Any, NamedTuple, NoReturn

import jax
import numpy as np

from .._src.base import COUNTERS, Stats
from .._src.batch import Batch
from .._src.element import Element

_LAWS = {
    1: "Law 1 (pure)",
    2: "Law 2 (static shapes)",
    3: "Law 3 (at most one batch per call; flush drains)",
    4: "Law 4 (nothing lost, nothing invented)",
    5: "Law 5 (order)",
    6: "Law 6 (exact resume)",
    7: "Law 7 (counters never wrap)",
    8: "Law 8 (loud on bad input)",
    0: "Reference",
    9: "The bulk path's protocol",
}
_COUNTERS = COUNTERS
# Law 7: a second run starts every counter here, so counts cross the 32-bit boundary.
_WIDE_START = 2**32 - 2


def _fail(law: int, message: str) -> NoReturn:
    raise AssertionError(f"{_LAWS[law]}: {message}")


class _Record(NamedTuple):
    """One emission, on the host: where it happened, `ready`, the batch, Stats after it
    (`{}` where the run did not expose them, as inside `lax.scan`)."""

    where: str
    ready: bool
    batch: Batch
    stats: dict[str, int]


# --------------------------------------------------------------------------- helpers


def _counts(stats: Stats) -> dict[str, int]:
    stats = jax.device_get(stats)
    return {name: int(getattr(stats, name)) for name in _COUNTERS}


def _read_stats(state: Any) -> dict[str, int]:
    return _counts(state.stats)


def _show(x: Any) -> str:
    return np.array2string(np.asarray(x), threshold=12, edgeitems=3, separator=", ")


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _difference(got: Any, want: Any, name: str = "batch") -> str | None:
    """Where two host trees first differ bit for bit (leaf path and row), or None."""
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(got)
    want_leaves, want_def = jax.tree_util.tree_flatten_with_path(want)
    if got_def != want_def:
        return f"the tree structures differ ({got_def} vs {want_def})"
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        g, w = np.asarray(g), np.asarray(w)
        leaf = name + jax.tree_util.keystr(path)
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"{leaf} has shape {g.shape} and dtype {g.dtype} vs {w.shape} and {w.dtype}"
        if _same_bits(g, w):
            continue
        if g.ndim == 0:
            return f"{leaf} is {_show(g)} vs {_show(w)}"
        row = next(r for r in range(len(g)) if not _same_bits(g[r], w[r]))
        return f"{leaf} row {row} is {_show(g[row])} vs {_show(w[row])}"
    return None


def _stats_difference(got: dict[str, int], want: dict[str, int]) -> str:
    return ", ".join(f"{k}={got[k]} vs {want[k]}" for k in _COUNTERS if got[k] != want[k])


def _rows_of(tree: Any) -> tuple[list[Any], int]:
    """The leaves of a stacked host tree, and the row count (leading axis)."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    return leaves, (len(leaves[0]) if leaves else 0)


def _row_keys(leaves: list[np.ndarray], n: int) -> list[bytes]:
    """One byte string per row, equal exactly when every leaf's row is bit-identical."""
    return [b"".join(np.ascontiguousarray(leaf[i]).tobytes() for leaf in leaves) for i in range(n)]


def _element_parts(element: Element) -> tuple[Any, Any, Any]:
    return element.data, element.state, element.metadata


def _batch_parts(batch: Batch) -> tuple[Any, Any, Any]:
    return batch.data, batch.states, batch.metadata


def _batches(tree: Any) -> list[Batch]:
    """The `Batch`es of an emission: itself, or those in a tree (one per output shape, as
    bucketing batchers emit)."""
    if isinstance(tree, Batch):
        return [tree]
    return [
        b
        for b in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Batch))
        if isinstance(b, Batch)
    ]


def _masks(tree: Any) -> list[np.ndarray]:
    return [np.asarray(b.valid_mask) for b in _batches(tree)]


def _cut(leaf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """`leaf` (rows first) cut to rows of `shape`: a bucket pads rows only to its bound."""
    return leaf[(slice(None), *(slice(0, d) for d in shape))]


def _unit_key(unit: Any) -> tuple:
    """A hashable key for a unit (any PyTree of arrays): equal exactly when the tree
    structures are equal and every leaf has the same shape, dtype and bits."""
    leaves, treedef = jax.tree.flatten(unit)
    arrays = [np.asarray(x) for x in leaves]
    return treedef, tuple((a.shape, a.dtype.str, np.ascontiguousarray(a).tobytes()) for a in arrays)


def _unit_text(unit: Any, limit: int = 160) -> str:
    """A unit, short enough for a message: `leaf=value` per leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(unit)[0]
    text = ", ".join(f"{jax.tree_util.keystr(p) or 'value'}={_show(x)}" for p, x in leaves)
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _valid_rows(batch: Batch) -> list[tuple[int, Element]]:
    """The valid rows of a host `Batch`, with their row numbers, each as `jb.unbatch` gives
    it: an `Element` of the row's `data`, `states` and `metadata`."""
    rows = Element(data=batch.data, state=batch.states, metadata=batch.metadata)
    return [
        (int(r), jax.tree.map(lambda x, r=r: np.asarray(x)[r], rows))
        for r in np.flatnonzero(np.asarray(batch.valid_mask))
    ]


def _split_at(n: int, batch_size: int) -> int:
    """A chunk boundary near the middle that leaves a partial batch buffered, if any does."""
    for a in range(max(1, n // 2), n):
        if batch_size == 1 or a % batch_size:
            return a
    return max(1, n // 2)


# --------------------------------------------------------------------------- the checker

"""A batcher written outside jaxbatch, checked against the batcher laws by `check_batcher`.

`every_other(batch_size)` keeps the 1st, 3rd, 5th, ... element of a stream and batches the
kept ones `batch_size` at a time, in order; the others are counted as skipped. Everything
it knows lives in its state, an `eqx.Module` with a `stats: jb.Stats` field, so it works
under `jit`, `scan` and `vmap`, and its state is its checkpoint.

Run it: `python examples/custom_batcher.py`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

import jaxbatch as jb
from jaxbatch.testing import CheckReport, check_batcher


class EveryOtherState(eqx.Module):
    buffer: jb.Element  # leaves [batch_size, ...]; rows at or past `count` unspecified
    count: Int[Array, ""]  # rows of `buffer` filled
    keep_next: Bool[Array, ""]  # whether the next element is kept
    stats: jb.Stats


def _check_element(spec: jb.Element, element: jb.Element) -> None:
    """Law 8: a `TypeError` naming the leaf whose structure, shape or dtype is off."""
    got, want = jb.element_spec(element), spec
    if jax.tree.structure(got) != jax.tree.structure(want):
        raise TypeError(f"element has structure {jax.tree.structure(got)}, expected {want}.")
    for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        if (g.shape, g.dtype) != (w.shape, w.dtype):
            raise TypeError(
                f"Leaf `element{jax.tree_util.keystr(path)}` has shape {g.shape} and dtype "
                f"{g.dtype}, expected {w.shape} and {w.dtype}."
            )


def every_other(batch_size: int) -> jb.Batcher:
    """Keep every other element (the first one kept); batch the kept ones in order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")

    def as_batch(buffer: jb.Element, valid_mask: Array) -> jb.Batch:
        return jb.Batch(buffer.data, valid_mask, buffer.state, buffer.metadata)

    def init_fn(element_spec: Any, key: Any = None) -> EveryOtherState:
        del key  # deterministic
        spec = jb.element_spec(element_spec)
        buffer = jax.tree.map(lambda s: jnp.zeros((batch_size, *s.shape), s.dtype), spec)
        return EveryOtherState(buffer, jnp.int32(0), jnp.array(True), jb.Stats.zeros())

    def step_fn(state: EveryOtherState, element: Any) -> tuple[EveryOtherState, jb.Emit]:
        if not isinstance(element, jb.Element):
            element = jb.Element(data=element)
        row_spec = jax.tree.map(lambda b: jax.ShapeDtypeStruct(b.shape[1:], b.dtype), state.buffer)
        _check_element(row_spec, element)
        keep = state.keep_next
        written = jax.tree.map(
            lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, state.count, 0),
            state.buffer,
            element,
        )
        buffer = jax.tree.map(lambda new, old: jnp.where(keep, new, old), written, state.buffer)
        count = state.count + keep.astype(jnp.int32)
        full = count == batch_size
        stats = state.stats.add(
            accepted=keep, skipped=~keep, batches=full, emitted=jnp.where(full, batch_size, 0)
        )
        emit = jb.Emit(as_batch(buffer, jnp.broadcast_to(full, (batch_size,))), full)
        return EveryOtherState(buffer, jnp.where(full, 0, count), ~keep, stats), emit

    def flush_fn(state: EveryOtherState) -> tuple[EveryOtherState, jb.Emit]:
        valid = jnp.arange(batch_size) < state.count
        padded = jax.tree.map(
            lambda b: jnp.where(valid.reshape((-1,) + (1,) * (b.ndim - 1)), b, jnp.zeros_like(b)),
            state.buffer,
        )
        ready = state.count > 0
        stats = state.stats.add(
            batches=ready, emitted=state.count, padded=jnp.where(ready, batch_size - state.count, 0)
        )
        new_state = EveryOtherState(state.buffer, jnp.int32(0), state.keep_next, stats)
        return new_state, jb.Emit(as_batch(padded, valid), ready)

    return jb.Batcher(init=init_fn, step=step_fn, flush=flush_fn)


def reference(elements: list[dict[str, np.ndarray]], batch_size: int) -> list[tuple]:
    """The same batching in plain Python: what `check_batcher` compares against."""
    kept = elements[::2]
    batches = []
    for start in range(0, len(kept), batch_size):
        rows = kept[start : start + batch_size]
        pad = [jax.tree.map(np.zeros_like, rows[0])] * (batch_size - len(rows))
        data = jax.tree.map(lambda *xs: np.stack(xs), *rows, *pad)
        batches.append((data, np.arange(batch_size) < len(rows)))
    return batches


def main() -> CheckReport:
    batch_size, n = 3, 9
    stream = {
        "image": jnp.arange(n * 4, dtype=jnp.float32).reshape(n, 2, 2),
        "label": jnp.arange(n, dtype=jnp.int32),
    }
    report = check_batcher(
        every_other(batch_size), stream, reference=lambda xs: reference(xs, batch_size)
    )
    print(f"every_other({batch_size}) on {report.num_elements} elements: all laws hold.")
    print(f"  {report.num_batches} batches, {report.num_flushes} flush calls, stats {report.stats}")
    print(f"  resumed exactly at steps {list(report.resumed_at)}")
    print(f"  checks: {', '.join(report.checks)}")
    return report


if __name__ == "__main__":
    main()

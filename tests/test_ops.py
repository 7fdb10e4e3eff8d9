"""Tests for `jaxbatch._src.ops`: row selection, concatenation, updates and control flow."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import jaxbatch as jb

JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def maybe_jit(fn, jit):
    return jax.jit(fn) if jit else fn


def make_batch(n, valid=None, batch_state=None):
    """A batch of `n` rows with float, int, bool and nested data, states and metadata."""
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    rows = np.arange(n)
    return jb.Batch.from_parts(
        {
            "x": jnp.asarray(rows[:, None] * 2.0 + np.arange(2) + 1.0, jnp.float32),
            "nested": {"id": jnp.asarray(rows + 100, jnp.int32)},
            "flag": jnp.asarray(rows % 2 == 0),
        },
        states={"seen": jnp.asarray(rows + 1, jnp.int32)},
        metadata=jb.Metadata(index=jnp.asarray(rows + 1), epoch=1),
        batch_state={} if batch_state is None else batch_state,
        valid_mask=jnp.asarray(valid),
    )


def masked_sum(batch):
    return jnp.sum(jnp.where(batch.valid_mask[:, None], batch.data["x"], 0.0))


def reference_select(batch, mask):
    """Pure-Python/NumPy reference: kept rows first in order, zeroed padding after."""
    valid = np.asarray(batch.valid_mask)
    kept = [i for i in range(batch.batch_size) if mask[i] and valid[i]]

    def move(x):
        x = np.asarray(x)
        pad = np.zeros((batch.batch_size - len(kept),) + x.shape[1:], x.dtype)
        return np.concatenate([x[kept], pad], axis=0)

    rows = (batch.data, batch.states, batch.metadata)
    data, states, metadata = jax.tree.map(move, rows)
    new_valid = np.arange(batch.batch_size) < len(kept)
    return data, states, metadata, new_valid


def assert_rows_equal(batch, expected):
    data, states, metadata, valid = expected
    chex.assert_trees_all_equal(
        (batch.data, batch.states, batch.metadata, batch.valid_mask),
        (data, states, metadata, valid),
        strict=False,
    )


# ----------------------------------------------------------------------- select_rows

_select_jit = jax.jit(jb.select_rows)


@JIT
@given(
    data=st.data(),
    n=st.integers(0, 6),
)
def test_select_rows_matches_reference(jit, data, n):
    valid = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    mask = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    batch = make_batch(n, valid)
    select = _select_jit if jit else jb.select_rows
    out = select(batch, jnp.asarray(mask, bool))
    assert out.batch_size == n
    assert_rows_equal(out, reference_select(batch, mask))


@JIT
def test_select_rows_mask_survives_and_keeps_batch_state(jit):
    batch = make_batch(5, [True, False, True, True, False], batch_state={"step": jnp.array(7)})
    out = maybe_jit(jb.select_rows, jit)(batch, jnp.array([True, True, False, True, True]))
    # Rows 0 and 3 are kept; row 1 (padding) and row 4 (padding) are never selected.
    np.testing.assert_array_equal(out.valid_mask, [True, True, False, False, False])
    np.testing.assert_array_equal(out.data["nested"]["id"], [100, 103, 0, 0, 0])
    np.testing.assert_array_equal(out.data["flag"], [True, False, False, False, False])
    np.testing.assert_array_equal(out.metadata.index, [1, 4, 0, 0, 0])
    assert int(out.num_valid) == 2
    chex.assert_trees_all_equal(out.batch_state, batch.batch_state)


@JIT
def test_select_rows_all_false_mask(jit):
    batch = make_batch(4)
    out = maybe_jit(jb.select_rows, jit)(batch, jnp.zeros(4, bool))
    assert int(out.num_valid) == 0
    chex.assert_trees_all_equal(
        (out.data, out.states, out.metadata),
        jax.tree.map(jnp.zeros_like, (batch.data, batch.states, batch.metadata)),
    )


@JIT
def test_select_rows_empty_batch(jit):
    batch = make_batch(0)
    out = maybe_jit(jb.select_rows, jit)(batch, jnp.zeros(0, bool))
    assert out.batch_size == 0
    chex.assert_trees_all_equal_shapes_and_dtypes(out, batch)


def test_select_rows_gradient_reaches_kept_rows_only():
    batch = make_batch(4)
    mask = jnp.array([False, True, False, True])

    def loss(x):
        selected = jb.select_rows(jb.update(batch, {"x": x}), mask)
        return masked_sum(selected)

    grad = jax.jit(jax.grad(loss))(batch.data["x"])
    expected = np.repeat(np.asarray(mask, np.float32)[:, None], 2, axis=1)
    chex.assert_trees_all_close(grad, expected)


def test_select_rows_vmap_over_stacked_batches():
    batches = [make_batch(3, v) for v in ([True, True, False], [False, True, True])]
    masks = jnp.array([[False, True, True], [True, False, True]])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    out = jax.vmap(jb.select_rows)(stacked, masks)
    for k, batch in enumerate(batches):
        row = jax.tree.map(lambda x, k=k: x[k], out)
        assert_rows_equal(row, reference_select(batch, np.asarray(masks[k])))


def test_select_rows_no_retrace_when_values_change():
    fn = jax.jit(chex.assert_max_traces(lambda b, m: jb.select_rows(b, m), n=1))
    fn(make_batch(4), jnp.array([True, False, True, False]))
    out = fn(make_batch(4, [False, True, True, True]), jnp.array([True, True, False, True]))
    assert int(out.num_valid) == 2


@pytest.mark.parametrize(
    "mask, match",
    [
        (jnp.ones(3, bool), r"shape \(4,\).*got shape \(3,\) dtype bool"),
        (jnp.ones(4, jnp.int32), r"`mask` must be a bool array.*dtype int32"),
        (jnp.ones((4, 1), bool), r"got shape \(4, 1\)"),
        (True, r"got shape \(\) dtype bool"),
    ],
)
@pytest.mark.parametrize("fn", [jb.select_rows, jb.select_rows_compact])
def test_select_rows_bad_mask(fn, mask, match):
    with pytest.raises(ValueError, match=match):
        fn(make_batch(4), mask)


def test_select_rows_bad_mask_raises_at_trace_time():
    with pytest.raises(ValueError, match="`mask` must be a bool array"):
        jax.jit(jb.select_rows)(make_batch(4), jnp.ones(4, jnp.float32))


# ----------------------------------------------------------------------- select_rows_compact


def test_select_rows_compact_keeps_only_selected_valid_rows():
    batch = make_batch(5, [True, False, True, True, True], batch_state={"s": jnp.array(1)})
    out = jb.select_rows_compact(batch, np.array([True, True, False, True, False]))
    assert out.batch_size == 2
    np.testing.assert_array_equal(out.data["nested"]["id"], [100, 103])
    np.testing.assert_array_equal(out.states["seen"], [1, 4])
    np.testing.assert_array_equal(out.valid_mask, [True, True])
    chex.assert_trees_all_equal(out.batch_state, batch.batch_state)
    # Same rows as the static-shape variant, without the padding.
    padded = jb.select_rows(batch, jnp.array([True, True, False, True, False]))
    chex.assert_trees_all_equal(out, padded.slice(0, 2))


def test_select_rows_compact_all_false_gives_empty_batch():
    out = jb.select_rows_compact(make_batch(3), jnp.zeros(3, bool))
    assert out.batch_size == 0
    assert out.data["x"].shape == (0, 2)


def test_select_rows_compact_refuses_traced_mask():
    batch = make_batch(3)
    with pytest.raises(TypeError, match="needs a concrete `mask`.*Use `select_rows`"):
        jax.jit(jb.select_rows_compact)(batch, jnp.ones(3, bool))
    # A concrete mask does not help when the batch itself is traced.
    with pytest.raises(TypeError, match="needs a concrete"):
        jax.jit(lambda b: jb.select_rows_compact(b, np.ones(3, bool)))(batch)


# ----------------------------------------------------------------------- concatenate


@JIT
def test_concatenate_keeps_masks_and_first_batch_state(jit):
    a = make_batch(2, [True, False], batch_state={"tag": jnp.array(1)})
    b = make_batch(3, [False, True, True], batch_state={"tag": jnp.array(2)})
    out = maybe_jit(jb.concatenate, jit)([a, b])
    assert out.batch_size == 5
    np.testing.assert_array_equal(out.valid_mask, [True, False, False, True, True])
    np.testing.assert_array_equal(out.data["nested"]["id"], [100, 101, 100, 101, 102])
    np.testing.assert_array_equal(out.metadata.index, [1, 2, 1, 2, 3])
    chex.assert_trees_all_equal(out.batch_state, a.batch_state)
    chex.assert_trees_all_equal(out.slice(2, 5), dataclasses.replace(b, batch_state=a.batch_state))


@JIT
def test_concatenate_one_batch_is_itself(jit):
    batch = make_batch(3, [True, False, True], batch_state={"tag": jnp.array(1)})
    chex.assert_trees_all_equal(maybe_jit(jb.concatenate, jit)([batch]), batch)


@JIT
def test_concatenate_empty_batches(jit):
    concat = maybe_jit(jb.concatenate, jit)
    empty, full = make_batch(0), make_batch(2, [True, False])
    chex.assert_trees_all_equal(concat([empty, full, empty]), full)
    both_empty = concat([empty, empty])
    assert both_empty.batch_size == 0
    chex.assert_trees_all_equal_shapes_and_dtypes(both_empty, empty)


def test_concatenate_then_select_keeps_masks():
    a, b = make_batch(2, [True, False]), make_batch(2, [False, True])
    out = jax.jit(lambda a, b: jb.select_rows(jb.concatenate([a, b]), jnp.ones(4, bool)))(a, b)
    np.testing.assert_array_equal(out.valid_mask, [True, True, False, False])
    np.testing.assert_array_equal(out.data["nested"]["id"], [100, 101, 0, 0])


def test_concatenate_empty_sequence():
    with pytest.raises(ValueError, match="at least one batch, got an empty sequence"):
        jb.concatenate([])


def test_concatenate_per_row_shape_mismatch_names_leaf():
    a = jb.Batch.from_parts({"x": jnp.zeros((2, 3))})
    b = jb.Batch.from_parts({"x": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"`batches\[1\]\.data\['x'\]` has shape \(4,\)"):
        jb.concatenate([a, b])


def test_concatenate_structure_and_dtype_mismatch_names_leaf():
    a = jb.Batch.from_parts({"x": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"batches\[1\]\.data .*missing leaves \[\"\['x'\]\"\]"):
        jb.concatenate([a, jb.Batch.from_parts({"y": jnp.zeros(2)})])
    with pytest.raises(TypeError, match=r"`batches\[1\]\.data\['x'\]` has dtype int32"):
        jb.concatenate([a, jb.Batch.from_parts({"x": jnp.zeros(2, jnp.int32)})])
    with_meta = jb.Batch.from_parts({"x": jnp.zeros(2)}, metadata=jb.Metadata(jnp.arange(2)))
    with pytest.raises(TypeError, match=r"batches\[1\]\.metadata does not have"):
        jb.concatenate([a, with_meta])


# ----------------------------------------------------------------------- update


@JIT
def test_update_merges_nested_and_leaves_input_unchanged(jit):
    batch = make_batch(3, [True, True, False])
    new_id = jnp.array([7, 8, 9], jnp.int32)
    out = maybe_jit(jb.update, jit)(batch, {"nested": {"id": new_id}, "y": jnp.zeros((3, 4))})
    np.testing.assert_array_equal(out.data["nested"]["id"], new_id)
    assert out.data["y"].shape == (3, 4)
    chex.assert_trees_all_equal(out.data["x"], batch.data["x"])
    chex.assert_trees_all_equal(out.valid_mask, batch.valid_mask)
    np.testing.assert_array_equal(batch.data["nested"]["id"], [100, 101, 102])
    assert "y" not in batch.data


@pytest.mark.parametrize(
    "updates, match",
    [
        ({"x": jnp.zeros((2, 2))}, r"`data_updates\['x'\]` has shape \(2, 2\).*dimension of 3"),
        ({"nested": {"id": jnp.zeros(4)}}, r"`data_updates\['nested'\]\['id'\]` has shape"),
        ({"s": jnp.array(1.0)}, r"`data_updates\['s'\]` has shape \(\)"),
        ({"s": 1.0}, r"`data_updates\['s'\]` has shape \(\)"),
    ],
)
def test_update_wrong_leading_dim(updates, match):
    with pytest.raises(ValueError, match=match):
        jb.update(make_batch(3), updates)


def test_update_rejects_non_array_leaf_and_non_dict_data():
    with pytest.raises(TypeError, match=r"Leaf `data_updates\['name'\]` is a str"):
        jb.update(make_batch(3), {"name": "abc"})
    with pytest.raises(TypeError, match="Can only merge updates into a dict, got ArrayImpl"):
        jb.update(jb.Batch.from_parts(jnp.zeros(3)), {"x": jnp.zeros(3)})


# ----------------------------------------------------------------------- control flow


def _scale(batch, w):
    return jb.update(batch, {"x": batch.data["x"] * w})


@JIT
@pytest.mark.parametrize("condition", [True, False])
def test_conditional_transform_masked_loss_gradient(jit, condition):
    batch = make_batch(3, [True, False, True])

    def loss(w, condition):
        shifted = lambda b: jb.update(b, {"x": b.data["x"] + w})  # noqa: E731
        out = jb.conditional_transform(batch, lambda b: _scale(b, w), shifted, condition)
        return masked_sum(out)

    value, grad = maybe_jit(jax.value_and_grad(loss), jit)(jnp.float32(2.0), jnp.array(condition))
    valid_x = float(masked_sum(batch))  # rows 0 and 2: 1 + 2 + 5 + 6
    if condition:
        assert float(value) == 2.0 * valid_x and float(grad) == valid_x
    else:
        assert float(value) == valid_x + 2.0 * 4 and float(grad) == 4.0  # 4 valid entries


def _negate_if(batch, condition):
    negate = lambda b: jb.update(b, {"x": -b.data["x"]})  # noqa: E731
    return jb.conditional_transform(batch, negate, lambda b: b, condition)


def test_conditional_transform_no_retrace():
    batch = make_batch(2)
    traced = jax.jit(chex.assert_max_traces(_negate_if, n=1))
    chex.assert_trees_all_equal(traced(batch, jnp.array(True)).data["x"], -batch.data["x"])
    chex.assert_trees_all_equal(traced(batch, jnp.array(False)), batch)


def test_conditional_transform_batched_condition():
    batch = make_batch(2)
    # Under vmap a batched condition (one per stacked batch) selects per batch.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
    out = jax.vmap(_negate_if)(stacked, jnp.array([True, False]))
    chex.assert_trees_all_equal(out.data["x"], jnp.stack([-batch.data["x"], batch.data["x"]]))


@JIT
def test_iterative_transform_passes_index_and_gradient(jit):
    batch = make_batch(3, [True, True, False])

    def add_index(b, i):
        return jb.update(b, {"nested": {"id": b.data["nested"]["id"] + i}})

    out = maybe_jit(lambda b: jb.iterative_transform(b, add_index, 4), jit)(batch)
    np.testing.assert_array_equal(out.data["nested"]["id"], [106, 107, 108])

    def loss(w):
        return masked_sum(jb.iterative_transform(batch, lambda b, i: _scale(b, w), 3))

    grad = maybe_jit(jax.grad(loss), jit)(jnp.float32(2.0))
    chex.assert_trees_all_close(grad, 3 * 2.0**2 * masked_sum(batch))


def test_iterative_transform_zero_iterations_and_no_retrace():
    batch = make_batch(2)
    chex.assert_trees_all_equal(jb.iterative_transform(batch, _scale, 0), batch)

    def scale_twice(batch, w):
        return jb.iterative_transform(batch, lambda b, i: _scale(b, w), 2)

    fn = jax.jit(chex.assert_max_traces(scale_twice, n=1))
    fn(batch, jnp.float32(1.0))
    out = fn(make_batch(2, [True, False]), jnp.float32(3.0))
    chex.assert_trees_all_close(out.data["x"], batch.data["x"] * 9.0)


@JIT
def test_while_transform_stops_on_condition_or_bound(jit):
    batch = make_batch(2)  # x = [[1, 2], [3, 4]]
    double = lambda b: _scale(b, 2.0)  # noqa: E731
    below_20 = lambda b: jnp.max(b.data["x"]) < 20  # noqa: E731
    run = maybe_jit(lambda b: jb.while_transform(b, below_20, double), jit)
    chex.assert_trees_all_close(run(batch).data["x"], batch.data["x"] * 8.0)
    bounded = maybe_jit(lambda b: jb.while_transform(b, lambda b: True, double, 3), jit)
    chex.assert_trees_all_close(bounded(batch).data["x"], batch.data["x"] * 8.0)
    never = maybe_jit(lambda b: jb.while_transform(b, below_20, double, 0), jit)
    chex.assert_trees_all_equal(never(batch), batch)


@JIT
def test_while_transform_forward_mode_only(jit):
    batch = make_batch(2)

    def loss(w):
        out = jb.while_transform(batch, lambda b: jnp.max(b.data["x"]) < 20, lambda b: _scale(b, w))
        return masked_sum(out)

    # w = 2: three iterations (max 4 -> 8 -> 16 -> 32), so loss = w**3 * sum(x).
    value, tangent = maybe_jit(lambda w: jax.jvp(loss, (w,), (jnp.float32(1.0),)), jit)(
        jnp.float32(2.0)
    )
    chex.assert_trees_all_close((value, tangent), (8.0 * 10.0, 3 * 4.0 * 10.0))
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(loss)(jnp.float32(2.0))


def test_while_transform_vmap_per_batch_iterations():
    batch = make_batch(2)
    big = jb.update(batch, {"x": 10 * batch.data["x"]})
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), batch, big)

    def fn(b):
        return jb.while_transform(b, lambda b: jnp.max(b.data["x"]) < 20, lambda b: _scale(b, 2.0))

    out = jax.vmap(fn)(stacked)
    # The first batch needs three doublings, the second (max 40) none.
    chex.assert_trees_all_close(
        out.data["x"], jnp.stack([8 * batch.data["x"], 10 * batch.data["x"]])
    )


@pytest.mark.parametrize("count", [-1, True, 2**31])
def test_iteration_counts_must_be_non_negative_ints(count):
    batch = make_batch(2)
    with pytest.raises(ValueError, match=rf"`num_iterations` must be a non-negative int.*{count}"):
        jb.iterative_transform(batch, lambda b, i: b, count)
    with pytest.raises(ValueError, match=rf"`max_iterations` must be a non-negative int.*{count}"):
        jb.while_transform(batch, lambda b: True, lambda b: b, count)


def test_iteration_count_rejects_float():
    # Under the jaxtyping import hook beartype rejects it first (a TypeError); without it,
    # our own check does (a ValueError). Either way the argument is named.
    with pytest.raises((TypeError, ValueError), match="num_iterations"):
        jb.iterative_transform(make_batch(2), lambda b, i: b, 2.5)

"""`Batch` and `create_batch_from_arrays`: construction, rows, masked statistics, PyTrees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

import jaxbatch as jb

JIT = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
MASK = jnp.array([True, False, True, True, False, True])  # 4 valid rows of 6


def maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


def make_elements(n):
    return [
        jb.Element(
            data={"x": jnp.array([i, 10.0 * i]), "nested": {"tok": jnp.array(i, jnp.int32)}},
            state={"seen": i},
            metadata=jb.Metadata(index=i, epoch=1, extra={"src": jnp.array(-i, jnp.int32)}),
        )
        for i in range(n)
    ]


def make_batch(n=6, mask=None):
    """Rows `i`: x = [i, 10 i], nested.tok = i, states.seen = i, metadata.index = i."""
    i = jnp.arange(n, dtype=jnp.float32)
    return jb.Batch.from_parts(
        {"x": jnp.stack([i, 10.0 * i], axis=1), "nested": {"tok": jnp.arange(n, dtype=jnp.int32)}},
        {"seen": jnp.arange(n, dtype=jnp.int32)},
        jb.Metadata(index=jnp.arange(n), epoch=1, extra={"src": -jnp.arange(n, dtype=jnp.int32)}),
        {"shard": jnp.array(7, jnp.int32)},
        {"step": jnp.array(0, jnp.int32)},
        valid_mask=mask,
    )


def row(batch, i):
    return jax.tree.map(lambda x: x[i], (batch.data, batch.states, batch.metadata))


# ----------------------------------------------------------------------------- from_elements


@JIT
def test_from_elements_stacks_data_states_and_metadata(use_jit):
    elements = make_elements(3)
    batch = maybe_jit(jb.Batch.from_elements, use_jit)(elements)
    assert batch.batch_size == 3
    chex.assert_trees_all_equal(batch.valid_mask, jnp.ones(3, bool), strict=True)
    chex.assert_trees_all_equal(
        batch.data["x"], jnp.array([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0]]), strict=True
    )
    chex.assert_trees_all_equal(batch.data["nested"]["tok"], jnp.arange(3, dtype=jnp.int32))
    chex.assert_trees_all_equal(batch.states, {"seen": jnp.arange(3, dtype=jnp.int32)})
    chex.assert_trees_all_equal(
        batch.metadata,
        jb.Metadata(index=jnp.arange(3), epoch=1, extra={"src": -jnp.arange(3, dtype=jnp.int32)}),
        strict=True,
    )
    assert batch.batch_state == {}
    assert batch.batch_metadata is None


def test_from_elements_wraps_plain_trees_and_converts_scalars():
    batch = jb.Batch.from_elements([{"x": jnp.ones(2), "y": 1}, {"x": jnp.zeros(2), "y": 2}])
    chex.assert_trees_all_equal(
        batch.data, {"x": jnp.array([[1.0, 1.0], [0.0, 0.0]]), "y": jnp.array([1, 2], jnp.int32)}
    )
    assert batch.states == {}
    assert batch.metadata is None


@pytest.mark.parametrize(
    ("second", "error", "match"),
    [
        ({"x": jnp.ones(3)}, ValueError, r"Leaf `elements\[1\]\.data\['x'\]` has shape \(3,\)"),
        ({"x": jnp.ones(2, jnp.int32)}, TypeError, r"`elements\[1\]\.data\['x'\]` has dtype int32"),
        ({"y": jnp.ones(2)}, TypeError, r"elements\[1\].*structure.*missing.*data\['x'\]"),
        (
            jb.Element(data={"x": jnp.ones(2)}, metadata=jb.Metadata()),
            TypeError,
            r"elements\[1\].*structure.*unexpected.*metadata\.index",
        ),
        (
            jb.Element(data={"x": jnp.ones(2)}, state={"s": jnp.zeros((1, 2))}),
            TypeError,
            r"elements\[1\].*structure.*unexpected.*state\['s'\]",
        ),
        ({"x": "a string"}, TypeError, r"Leaf `data\['x'\]` is a str .*arrays only"),
        ({"x": np.array(["a", "b"])}, TypeError, r"Leaf `data\['x'\]` is a ndarray"),
    ],
    ids=["shape", "dtype", "structure", "metadata", "state", "str", "np-str"],
)
def test_from_elements_rejects_mismatches_naming_the_leaf(second, error, match):
    with pytest.raises(error, match=match):
        jb.Batch.from_elements([{"x": jnp.zeros(2)}, second])


def test_from_elements_state_shape_mismatch_names_the_state_leaf():
    first = jb.Element(data={"x": jnp.zeros(2)}, state={"s": jnp.zeros(2)})
    second = jb.Element(data={"x": jnp.zeros(2)}, state={"s": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"`elements\[2\]\.state\['s'\]` has shape \(3,\)"):
        jb.Batch.from_elements([first, first, second])


def test_from_elements_empty_raises():
    with pytest.raises(ValueError, match="at least one element"):
        jb.Batch.from_elements([])


# ----------------------------------------------------------------------------- from_parts


@JIT
def test_from_parts_keeps_every_part(use_jit):
    batch = maybe_jit(lambda: make_batch(6, MASK), use_jit)()
    assert batch.batch_size == 6
    chex.assert_trees_all_equal(batch.valid_mask, MASK, strict=True)
    chex.assert_trees_all_equal(batch.states, {"seen": jnp.arange(6, dtype=jnp.int32)})
    chex.assert_trees_all_equal(batch.metadata.index, jnp.arange(6, dtype=jnp.int32))
    chex.assert_trees_all_equal(batch.metadata.epoch, jnp.ones(6, jnp.int32))
    chex.assert_trees_all_equal(batch.batch_metadata, {"shard": jnp.array(7, jnp.int32)})
    chex.assert_trees_all_equal(batch.batch_state, {"step": jnp.array(0, jnp.int32)})


@JIT
def test_from_parts_defaults(use_jit):
    batch = maybe_jit(lambda x: jb.Batch.from_parts({"x": x}), use_jit)(jnp.zeros((3, 2)))
    chex.assert_trees_all_equal(batch.valid_mask, jnp.ones(3, bool), strict=True)
    assert batch.states == {}
    assert batch.batch_state == {}
    assert batch.metadata is None
    assert batch.batch_metadata is None


def test_from_parts_accepts_numpy_and_list_masks():
    for mask in (np.array([True, False]), [True, False]):
        batch = jb.Batch.from_parts({"x": jnp.zeros(2)}, valid_mask=mask)
        chex.assert_trees_all_equal(batch.valid_mask, jnp.array([True, False]), strict=True)
        assert int(batch.num_valid) == 1


def test_from_parts_with_no_leaves_takes_the_size_from_the_mask():
    batch = jb.Batch.from_parts({}, valid_mask=jnp.array([True, False, True]))
    assert batch.batch_size == 3
    with pytest.raises(ValueError, match="Cannot infer the batch size.*Pass `valid_mask`"):
        jb.Batch.from_parts({})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"data": {"x": jnp.zeros((3, 2)), "y": jnp.zeros(2)}},
            r"Inconsistent batch dimensions: data\['x'\] has 3 but data\['y'\] has 2",
        ),
        (
            {"data": {"x": jnp.zeros(3)}, "states": {"s": jnp.zeros((4, 1))}},
            r"data\['x'\] has 3 but states\['s'\] has 4",
        ),
        (
            {"data": {"x": jnp.zeros(3)}, "metadata": jb.Metadata(index=jnp.arange(2))},
            r"data\['x'\] has 3 but metadata\.index has 2, metadata\.epoch has 2",
        ),
        (
            {"data": {"x": jnp.zeros(3)}, "valid_mask": jnp.ones(4, bool)},
            r"valid_mask has 4 but data\['x'\] has 3",
        ),
        (
            {"data": {"x": jnp.zeros(3)}, "valid_mask": jnp.ones(3, jnp.int32)},
            r"`valid_mask` must be a 1-d bool array, got shape \(3,\) dtype int32",
        ),
        (
            {"data": {"x": jnp.zeros(3)}, "valid_mask": jnp.ones((3, 1), bool)},
            r"`valid_mask` must be a 1-d bool array, got shape \(3, 1\) dtype bool",
        ),
        ({"data": {"x": jnp.zeros(())}}, r"Leaf `data\['x'\]` is 0-d"),
    ],
    ids=["data", "states", "metadata", "mask-length", "mask-dtype", "mask-rank", "0-d"],
)
@JIT
def test_from_parts_validation_errors(kwargs, match, use_jit):
    # Validation reads static shapes only, so it raises at trace time under jit too.
    build = maybe_jit(lambda kw: jb.Batch.from_parts(**kw), use_jit)
    with pytest.raises(ValueError, match=match):
        build(kwargs)


def test_from_parts_validate_false_skips_checks():
    batch = jb.Batch.from_parts(
        {"x": jnp.zeros(3)}, {"s": jnp.zeros(4)}, valid_mask=jnp.ones(2, bool), validate=False
    )
    assert batch.batch_size == 2


@JIT
def test_create_batch_from_arrays(use_jit):
    def build(x):
        return jb.create_batch_from_arrays(
            {"x": x}, {"s": jnp.zeros(4, jnp.int32)}, jb.Metadata(index=jnp.arange(4))
        )

    batch = maybe_jit(build, use_jit)(jnp.ones((4, 2)))
    assert batch.batch_size == 4
    chex.assert_trees_all_equal(batch.valid_mask, jnp.ones(4, bool), strict=True)
    chex.assert_trees_all_equal(batch.data, {"x": jnp.ones((4, 2))}, strict=True)
    chex.assert_trees_all_equal(batch.metadata.epoch, jnp.zeros(4, jnp.int32), strict=True)
    with pytest.raises(ValueError, match=r"data\['x'\] has 4 but states\['s'\] has 3"):
        jb.create_batch_from_arrays({"x": jnp.ones(4)}, {"s": jnp.zeros(3)})


# ----------------------------------------------------------------------------- sizes and rows


@JIT
def test_batch_size_is_static_and_num_valid_counts(use_jit):
    def fn(batch):
        assert isinstance(batch.batch_size, int)  # a Python int even while tracing
        return batch.num_valid

    n = maybe_jit(fn, use_jit)(make_batch(6, MASK))
    chex.assert_trees_all_equal(n, jnp.array(4, jnp.int32), strict=True)
    assert int(maybe_jit(fn, use_jit)(make_batch(6, jnp.zeros(6, bool)))) == 0


@pytest.mark.parametrize("index", [0, 2, 5, -1, -6])
@JIT
def test_get_element(index, use_jit):
    batch = make_batch(6, MASK)
    e = maybe_jit(lambda b: b.get_element(index), use_jit)(batch)
    assert isinstance(e, jb.Element)
    data, states, metadata = row(batch, index)
    chex.assert_trees_all_equal(e, jb.Element(data, states, metadata), strict=True)
    assert int(e.metadata.index) == index % 6


def test_get_element_without_metadata():
    e = jb.Batch.from_parts({"x": jnp.arange(3)}).get_element(1)
    assert e.metadata is None
    assert e.state == {}
    chex.assert_trees_all_equal(e.data["x"], jnp.array(1, jnp.int32), strict=True)


@pytest.mark.parametrize(("size", "index"), [(6, 6), (6, -7), (6, 100), (0, 0), (0, -1)])
@JIT
def test_get_element_out_of_range_raises(size, index, use_jit):
    get = maybe_jit(lambda b: b.get_element(index), use_jit)
    with pytest.raises(IndexError, match=f"Row index {index} is out of range.*size {size}"):
        get(make_batch(size))


@pytest.mark.parametrize(
    "indices", [slice(None), slice(1, None, 2), slice(-2, None), slice(4, 1, -1), [0, -1, 3, 3], []]
)
@JIT
def test_get_elements(indices, use_jit):
    batch = make_batch(6, MASK)
    elements = maybe_jit(lambda b: b.get_elements(indices), use_jit)(batch)
    expected = list(range(6)[indices]) if isinstance(indices, slice) else indices
    assert len(elements) == len(expected)
    for e, i in zip(elements, expected):
        chex.assert_trees_all_equal(e, batch.get_element(i), strict=True)


def test_get_elements_out_of_range_raises():
    with pytest.raises(IndexError, match="Row index 6 is out of range"):
        make_batch(6).get_elements([0, 6])


@pytest.mark.parametrize(("start", "end"), [(0, 6), (1, 4), (4, 100), (-3, -1), (3, 3), (5, 2)])
@JIT
def test_slice_keeps_mask_in_step_with_rows(start, end, use_jit):
    batch = make_batch(6, MASK)
    part = maybe_jit(lambda b: b.slice(start, end), use_jit)(batch)
    expected_rows = range(6)[start:end]
    assert part.batch_size == len(expected_rows)
    chex.assert_trees_all_equal(part.valid_mask, MASK[start:end], strict=True)
    chex.assert_trees_all_equal(
        (part.data, part.states, part.metadata),
        jax.tree.map(lambda x: x[start:end], (batch.data, batch.states, batch.metadata)),
        strict=True,
    )
    # Batch-level fields have no batch axis: kept as they are.
    chex.assert_trees_all_equal(part.batch_state, batch.batch_state, strict=True)
    chex.assert_trees_all_equal(part.batch_metadata, batch.batch_metadata, strict=True)
    assert int(part.num_valid) == int(np.sum(np.asarray(MASK)[start:end]))


@JIT
def test_split_for_devices_four_parts(use_jit):
    mask = jnp.array([True, True, False, True, False, False, True, True])
    batch = make_batch(8, mask)
    parts = maybe_jit(lambda b: b.split_for_devices(4), use_jit)(batch)
    assert len(parts) == 4
    assert [p.batch_size for p in parts] == [2, 2, 2, 2]
    for i, part in enumerate(parts):
        chex.assert_trees_all_equal(part, batch.slice(2 * i, 2 * i + 2), strict=True)
    # Concatenating the parts' rows gives the batch back, mask included.
    rows = [(p.data, p.states, p.metadata, p.valid_mask) for p in parts]
    chex.assert_trees_all_equal(
        jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows),
        (batch.data, batch.states, batch.metadata, mask),
        strict=True,
    )
    assert sum(int(p.num_valid) for p in parts) == 5


def test_split_for_devices_of_an_empty_batch():
    parts = make_batch(0).split_for_devices(4)
    assert [p.batch_size for p in parts] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("num_devices", "match"),
    [
        (
            4,
            r"size 6 cannot be split evenly across 4 devices\. "
            r"Use a batch size that is a multiple of 4",
        ),
        (0, r"`num_devices` must be a positive int, got 0"),
        (-2, r"`num_devices` must be a positive int, got -2"),
        (True, r"`num_devices` must be a positive int, got True"),
    ],
)
def test_split_for_devices_errors(num_devices, match):
    with pytest.raises(ValueError, match=match):
        make_batch(6).split_for_devices(num_devices)


@JIT
def test_map_rows_applies_to_every_batched_leaf_and_the_mask(use_jit):
    batch = make_batch(6, MASK)
    out = maybe_jit(lambda b: b.map_rows(lambda x: x[::-1]), use_jit)(batch)
    chex.assert_trees_all_equal(out.valid_mask, MASK[::-1], strict=True)
    chex.assert_trees_all_equal(
        (out.data, out.states, out.metadata),
        jax.tree.map(lambda x: x[::-1], (batch.data, batch.states, batch.metadata)),
        strict=True,
    )
    chex.assert_trees_all_equal(out.batch_state, batch.batch_state, strict=True)
    chex.assert_trees_all_equal(out.batch_metadata, batch.batch_metadata, strict=True)
    # Rows and mask stay paired: the valid rows are the same set of rows.
    valid_before = set(np.asarray(batch.data["nested"]["tok"])[np.asarray(MASK)])
    valid_after = set(np.asarray(out.data["nested"]["tok"])[np.asarray(out.valid_mask)])
    assert valid_before == valid_after


def test_map_rows_without_metadata():
    batch = jb.Batch.from_parts({"x": jnp.arange(4)})
    out = batch.map_rows(lambda x: x[1:])
    assert out.metadata is None
    chex.assert_trees_all_equal(out.data["x"], jnp.arange(1, 4), strict=True)


# ----------------------------------------------------------------------------- accessors


@JIT
def test_getters(use_jit):
    batch = make_batch(6, MASK)
    got = maybe_jit(
        lambda b: (b.get_data(), b.get_states(), b.get_batch_state(), b.get_batch_metadata()),
        use_jit,
    )(batch)
    expected = (batch.data, batch.states, batch.batch_state, batch.batch_metadata)
    chex.assert_trees_all_equal(got, expected, strict=True)
    assert jb.Batch.from_parts({"x": jnp.zeros(1)}).get_batch_metadata() is None


@JIT
def test_set_batch_metadata_returns_a_new_batch(use_jit):
    batch = make_batch(6, MASK)
    new = maybe_jit(lambda b: b.set_batch_metadata({"shard": jnp.array(9)}), use_jit)(batch)
    chex.assert_trees_all_equal(new.get_batch_metadata(), {"shard": jnp.array(9)})
    chex.assert_trees_all_equal(batch.get_batch_metadata(), {"shard": jnp.array(7, jnp.int32)})
    chex.assert_trees_all_equal(
        (new.data, new.states, new.metadata, new.valid_mask, new.batch_state),
        (batch.data, batch.states, batch.metadata, batch.valid_mask, batch.batch_state),
        strict=True,
    )
    assert batch.set_batch_metadata(None).get_batch_metadata() is None


@JIT
def test_update_batch_state_merges_and_returns_a_new_batch(use_jit):
    batch = make_batch(6, MASK).update_batch_state({"opt": {"lr": jnp.array(0.1)}})

    def fn(b):
        return b.update_batch_state(
            {"step": b.batch_state["step"] + 1, "opt": {"mom": jnp.array(0.9)}}
        )

    new = maybe_jit(fn, use_jit)(batch)
    chex.assert_trees_all_equal(
        new.get_batch_state(),
        {
            "step": jnp.array(1, jnp.int32),
            "opt": {"lr": jnp.array(0.1), "mom": jnp.array(0.9)},
        },
        strict=True,
    )
    chex.assert_trees_all_equal(
        batch.get_batch_state(),
        {"step": jnp.array(0, jnp.int32), "opt": {"lr": jnp.array(0.1)}},
        strict=True,
    )
    chex.assert_trees_all_equal(new.data, batch.data, strict=True)
    chex.assert_trees_all_equal(new.valid_mask, batch.valid_mask, strict=True)


# ----------------------------------------------------------------------------- statistics


def numpy_stats(x, mask):
    """Reference: statistics over the valid rows with numpy (zeros when none is valid)."""
    x, mask = np.asarray(x), np.asarray(mask)
    valid = x[mask]
    if valid.shape[0] == 0:
        zeros = np.zeros(x.shape[1:])
        return {"mean": zeros, "std": zeros, "min": zeros, "max": zeros, "count": 0}
    xf = valid.astype(np.float64)
    return {
        "mean": xf.mean(axis=0),
        "std": xf.std(axis=0),
        "min": valid.min(axis=0),
        "max": valid.max(axis=0),
        "count": int(mask.sum()),
    }


_compute_stats_jit = jax.jit(lambda b: b.compute_stats())


def compute_stats(batch, use_jit):
    return _compute_stats_jit(batch) if use_jit else batch.compute_stats()


@JIT
def test_compute_stats_known_values(use_jit):
    mask = jnp.array([True, True, False, True])
    batch = jb.Batch.from_parts(
        {
            "x": jnp.array([[1.0, 2.0], [3.0, 6.0], [1000.0, -1000.0], [5.0, 4.0]]),
            "nested": {"i": jnp.array([4, -2, 99, 1], jnp.int32)},
            "flag": jnp.array([False, True, True, False]),
        },
        valid_mask=mask,
    )
    s = compute_stats(batch, use_jit)
    assert set(s) == {"mean", "std", "min", "max", "count"}
    chex.assert_trees_all_equal(s["count"], jnp.array(3, jnp.int32), strict=True)
    chex.assert_trees_all_close(
        s["mean"],
        {"x": jnp.array([3.0, 4.0]), "nested": {"i": jnp.array(1.0)}, "flag": jnp.array(1 / 3)},
        strict=True,
    )
    chex.assert_trees_all_close(
        s["std"],
        {
            "x": jnp.array([np.sqrt(8 / 3), np.sqrt(8 / 3)], jnp.float32),
            "nested": {"i": jnp.array(np.sqrt(6.0), jnp.float32)},
            "flag": jnp.array(np.sqrt(2 / 9), jnp.float32),
        },
        rtol=1e-6,
        strict=True,
    )
    # min and max keep the dtype, and ignore the masked row (1000 / -1000 / 99).
    chex.assert_trees_all_equal(
        s["min"],
        {
            "x": jnp.array([1.0, 2.0]),
            "nested": {"i": jnp.array(-2, jnp.int32)},
            "flag": jnp.array(False),
        },
        strict=True,
    )
    chex.assert_trees_all_equal(
        s["max"],
        {
            "x": jnp.array([5.0, 6.0]),
            "nested": {"i": jnp.array(4, jnp.int32)},
            "flag": jnp.array(True),
        },
        strict=True,
    )


@pytest.mark.parametrize("size", [0, 3], ids=["empty", "all-masked"])
@JIT
def test_compute_stats_with_no_valid_row_is_zero_not_nan(size, use_jit):
    batch = jb.Batch.from_parts(
        {
            "x": jnp.full((size, 2), jnp.nan),
            "i": jnp.arange(size, dtype=jnp.int32),
            "b": jnp.ones(size, bool),
        },
        valid_mask=jnp.zeros(size, bool),
    )
    s = compute_stats(batch, use_jit)
    assert int(s["count"]) == 0
    for stat in ("mean", "std"):
        chex.assert_trees_all_equal(
            s[stat],
            {"x": jnp.zeros(2), "i": jnp.array(0.0), "b": jnp.array(0.0)},
            strict=True,
        )
    for stat in ("min", "max"):
        chex.assert_trees_all_equal(
            s[stat],
            {"x": jnp.zeros(2), "i": jnp.array(0, jnp.int32), "b": jnp.array(False)},
            strict=True,
        )


@st.composite
def masked_rows(draw, elements, size=5):
    """`[size, 2]` values and a random `[size]` mask (one shape: one compilation per test)."""
    values = draw(st.lists(elements, min_size=2 * size, max_size=2 * size))
    mask = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    return np.array(values).reshape(size, 2), np.array(mask, dtype=bool)


# No subnormals: XLA on CPU flushes them to zero, numpy does not.
FLOATS = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False, width=32)
PADDING = st.sampled_from([0.0, np.nan, np.inf, -np.inf, 1e30])


@JIT
@given(rows=masked_rows(FLOATS), padding=PADDING)
def test_compute_stats_matches_numpy_on_valid_rows(use_jit, rows, padding):
    x, mask = rows
    x = x.astype(np.float32)
    ref = numpy_stats(x, mask)
    # Whatever sits in the padding rows must not matter.
    x_padded = np.where(mask[:, None], x, np.float32(padding)).astype(np.float32)
    s = compute_stats(
        jb.Batch.from_parts({"x": jnp.asarray(x_padded)}, valid_mask=jnp.asarray(mask)), use_jit
    )
    assert int(s["count"]) == ref["count"]
    np.testing.assert_allclose(s["mean"]["x"], ref["mean"], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(s["std"]["x"], ref["std"], rtol=1e-4, atol=1e-2)
    np.testing.assert_array_equal(s["min"]["x"], ref["min"])
    np.testing.assert_array_equal(s["max"]["x"], ref["max"])
    chex.assert_tree_all_finite(s)


@JIT
@given(rows=masked_rows(st.integers(-1000, 1000)))
def test_compute_stats_of_int_data_matches_numpy(use_jit, rows):
    x, mask = rows
    x = x.astype(np.int32)
    ref = numpy_stats(x, mask)
    s = compute_stats(
        jb.Batch.from_parts({"x": jnp.asarray(x)}, valid_mask=jnp.asarray(mask)), use_jit
    )
    assert s["mean"]["x"].dtype == s["std"]["x"].dtype == jnp.float32
    assert s["min"]["x"].dtype == s["max"]["x"].dtype == jnp.int32
    np.testing.assert_allclose(s["mean"]["x"], ref["mean"], rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(s["std"]["x"], ref["std"], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(s["min"]["x"], ref["min"])
    np.testing.assert_array_equal(s["max"]["x"], ref["max"])


# ----------------------------------------------------------------------------- masked losses


def masked_mean_loss(x, mask):
    """A user's masked loss: mean over valid rows of the squared row sums."""
    batch = jb.Batch.from_parts({"x": x}, valid_mask=mask)
    # Mask the rows before the non-linearity too: `where` alone would give 0 * NaN = NaN
    # gradients when a padding row holds NaN or inf.
    rows = jnp.where(batch.valid_mask[:, None], batch.data["x"], 0.0)
    per_row = jax.vmap(lambda r: jnp.sum(r) ** 2)(rows)
    n = jnp.maximum(batch.num_valid, 1).astype(x.dtype)
    return jnp.sum(jnp.where(batch.valid_mask, per_row, 0.0)) / n


def stats_loss(x, mask):
    """A loss through `compute_stats`: masked mean and std of the data."""
    s = jb.Batch.from_parts({"x": x}, valid_mask=mask).compute_stats()
    return jnp.sum(s["mean"]["x"] ** 2) + jnp.sum(s["std"]["x"])


_grad_masked_mean_loss = jax.jit(jax.value_and_grad(masked_mean_loss))
_grad_stats_loss = jax.jit(jax.value_and_grad(stats_loss))


@pytest.mark.parametrize("loss", [masked_mean_loss, stats_loss], ids=["user-loss", "stats"])
@JIT
def test_masked_loss_gradient_ignores_padded_rows_exactly(loss, use_jit):
    mask = jnp.array([True, False, True, True, False])
    x = jnp.array([[1.0, 2.0], [5.0, 5.0], [-3.0, 0.5], [2.0, 7.0], [0.0, 1.0]])
    if use_jit:
        value_and_grad = _grad_masked_mean_loss if loss is masked_mean_loss else _grad_stats_loss
    else:
        value_and_grad = jax.value_and_grad(loss)
    value, grad = value_and_grad(x, mask)
    # Exactly zero on the padded rows, non-zero on the valid ones.
    np.testing.assert_array_equal(grad[~mask], np.zeros((2, 2), np.float32))
    assert np.all(np.asarray(grad[mask]) != 0)
    # Loss and valid-row gradients do not change, bit for bit, whatever the padding holds.
    for pad in (0.0, -1e6, jnp.inf, jnp.nan):
        x_pad = jnp.where(mask[:, None], x, pad)
        value_pad, grad_pad = value_and_grad(x_pad, mask)
        np.testing.assert_array_equal(value_pad, value)
        np.testing.assert_array_equal(grad_pad, grad)
    # The user loss against its closed form: d/dx_ij [(sum_j x_ij)^2 / n] = 2 sum_j x_ij / n.
    if loss is masked_mean_loss:
        sums = jnp.sum(x, axis=1, keepdims=True)
        np.testing.assert_allclose(value, jnp.sum(jnp.where(mask, sums[:, 0] ** 2, 0)) / 3)
        expected = jnp.broadcast_to(jnp.where(mask[:, None], 2 * sums / 3, 0.0), x.shape)
        np.testing.assert_allclose(grad, expected)


# ----------------------------------------------------------------------------- PyTree behaviour


@pytest.mark.parametrize("size", [0, 6])
def test_flatten_unflatten_and_tree_map_round_trip(size):
    batch = make_batch(size, jnp.ones(size, bool))
    leaves, treedef = jax.tree.flatten(batch)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, jb.Batch)
    assert back.batch_size == size
    chex.assert_trees_all_equal(back, batch, strict=True)
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x, batch), batch, strict=True)


_identity = jax.jit(lambda b: b)


@pytest.mark.parametrize("size", [0, 6])
def test_jit_identity(size):
    batch = make_batch(size, jnp.arange(size) % 2 == 0)
    out = _identity(batch)
    assert isinstance(out, jb.Batch)
    chex.assert_trees_all_equal(out, batch, strict=True)
    plain = jb.Batch.from_parts({"x": jnp.zeros((2, 3))})
    chex.assert_trees_all_equal(_identity(plain), plain, strict=True)


@JIT
def test_batch_as_scan_carry(use_jit):
    def run(batch):
        def body(b, _):
            b = b.map_rows(lambda x: jnp.roll(x, 1, axis=0))
            b = b.update_batch_state({"step": b.batch_state["step"] + 1})
            return b, b.num_valid

        return jax.lax.scan(body, batch, None, length=6)

    batch = make_batch(6, MASK)
    out, counts = maybe_jit(run, use_jit)(batch)
    # Six rolls by one row bring every row (and its mask) back home.
    chex.assert_trees_all_equal(
        (out.data, out.states, out.metadata, out.valid_mask, out.batch_metadata),
        (batch.data, batch.states, batch.metadata, batch.valid_mask, batch.batch_metadata),
        strict=True,
    )
    assert int(out.batch_state["step"]) == 6
    chex.assert_trees_all_equal(counts, jnp.full(6, 4, jnp.int32), strict=True)


def test_no_retrace_when_only_values_change():
    def fn(batch):
        s = batch.compute_stats()
        first = batch.get_element(0)
        return s["mean"], s["count"], first.data, batch.slice(1, 3).valid_mask

    jitted = jax.jit(chex.assert_max_traces(fn, n=1))
    one = jitted(make_batch(6, MASK))
    base = make_batch(6, ~MASK)
    other = jb.Batch.from_parts(
        jax.tree.map(lambda x: x + jnp.ones((), x.dtype), base.data),
        base.states,
        base.metadata,
        base.batch_metadata,
        base.batch_state,
        valid_mask=base.valid_mask,
    )
    two = jitted(other)
    assert int(one[1]) == 4
    assert int(two[1]) == 2
    chex.assert_trees_all_equal(two[3], (~MASK)[1:3])


def test_vmap_over_rows():
    batch = make_batch(6, MASK)
    sums = jax.vmap(lambda d: jnp.sum(d["x"]) + d["nested"]["tok"].astype(jnp.float32))(batch.data)
    chex.assert_trees_all_close(sums, 12.0 * jnp.arange(6, dtype=jnp.float32))
    # Whole rows (data, states, metadata) as Elements under vmap.
    as_elements = jb.Element(batch.data, batch.states, batch.metadata)
    out = jax.vmap(
        lambda e: e.transform(lambda x: x * 2).update_state({"seen": e.state["seen"] + 1})
    )(as_elements)
    rebuilt = jb.Batch.from_parts(out.data, out.state, out.metadata, valid_mask=batch.valid_mask)
    for i in range(6):
        e = rebuilt.get_element(i)
        chex.assert_trees_all_equal(
            e.data, jax.tree.map(lambda x: x * 2, batch.get_element(i).data)
        )
        assert int(e.state["seen"]) == i + 1
        assert int(e.metadata.index) == i


def test_from_elements_then_get_element_round_trip():
    elements = make_elements(4)
    batch = jb.Batch.from_elements(elements)
    for i, e in enumerate(elements):
        chex.assert_trees_all_equal(batch.get_element(i), e, strict=True)
    chex.assert_trees_all_equal(batch.get_elements(slice(None)), elements, strict=True)

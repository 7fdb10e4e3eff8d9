"""`Element`, `Metadata` and `create_element`: pure updates, array leaves, PyTree behaviour."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb

JIT = pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])


def maybe_jit(fn, use_jit):
    return jax.jit(fn) if use_jit else fn


def make_element(offset=0.0):
    """A small element with nested data, a state and metadata."""
    return jb.Element(
        data={
            "x": jnp.array([1.0, 2.0]) + offset,
            "img": {"r": jnp.zeros((2, 2)), "g": jnp.ones((2, 2))},
            "label": jnp.array(3, dtype=jnp.int32),
        },
        state={"seen": jnp.array(0, dtype=jnp.int32), "aug": {"flip": jnp.array(False)}},
        metadata=jb.Metadata(index=5, epoch=1, extra={"source": jnp.array(2, jnp.int32)}),
    )


# ----------------------------------------------------------------------------- construction


def test_defaults_are_empty_dicts_and_none():
    for e in (jb.Element(), jb.create_element()):
        assert e.data == {}
        assert e.state == {}
        assert e.metadata is None


def test_create_element_matches_constructor():
    meta = jb.Metadata(index=1)
    made = jb.create_element({"x": jnp.arange(3)}, {"n": 2}, meta)
    direct = jb.Element(data={"x": jnp.arange(3)}, state={"n": 2}, metadata=meta)
    assert isinstance(made, jb.Element)
    chex.assert_trees_all_equal(made, direct, strict=True)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(0, jnp.int32), (2.5, jnp.float32), (True, jnp.bool_), (np.float64(1.5), jnp.float32)],
)
def test_python_and_numpy_scalars_become_concrete_arrays(value, dtype):
    e = jb.Element(data={"nested": {"v": value}}, state=value)
    for leaf in (e.data["nested"]["v"], e.state):
        assert isinstance(leaf, jax.Array)
        assert leaf.shape == ()
        assert leaf.dtype == dtype
        # Not weakly typed: stacking and strict dtype promotion must see one dtype.
        assert not leaf.weak_type
        assert leaf == value


def test_arrays_pass_through_unchanged():
    x, y = jnp.arange(4, dtype=jnp.int16), np.ones((2, 3), np.float32)
    e = jb.Element(data={"x": x, "y": y})
    assert e.data["x"] is x
    assert e.data["y"] is y


@pytest.mark.parametrize(
    "bad",
    ["text", b"bytes", np.str_("s"), np.array(["a", "b"]), np.array([object()], dtype=object)],
    ids=["str", "bytes", "np.str_", "np-str-array", "np-object-array"],
)
@pytest.mark.parametrize(
    ("make", "path"),
    [
        (lambda bad: jb.Element(data={"a": {"b": bad}}), r"data\['a'\]\['b'\]"),
        (lambda bad: jb.Element(state={"s": bad}), r"state\['s'\]"),
        (lambda bad: jb.create_element(data=[jnp.zeros(1), bad]), r"data\[1\]"),
        (lambda bad: jb.Metadata(extra={"name": bad}), r"metadata\.extra\['name'\]"),
        (lambda bad: jb.Element().update_data({"new": bad}), r"data\['new'\]"),
        (lambda bad: jb.Element().update_state({"new": bad}), r"state\['new'\]"),
        (lambda bad: jb.Element().replace(data={"r": bad}), r"data\['r'\]"),
    ],
    ids=["data", "state", "create_element", "metadata", "update_data", "update_state", "replace"],
)
def test_non_array_leaves_are_rejected_naming_the_path(make, path, bad):
    with pytest.raises(TypeError, match=rf"Leaf `{path}` is a .*arrays only"):
        make(bad)


# ----------------------------------------------------------------------------- pure updates


@JIT
def test_update_state_merges_nested_and_leaves_original(use_jit):
    e = make_element()

    def fn(e):
        return e.update_state({"seen": e.state["seen"] + 1, "aug": {"crop": 4}, "new": 1.0})

    out = maybe_jit(fn, use_jit)(e)
    chex.assert_trees_all_equal(
        out.state,
        {
            "seen": jnp.array(1, jnp.int32),
            "aug": {"flip": jnp.array(False), "crop": jnp.array(4, jnp.int32)},
            "new": jnp.array(1.0, jnp.float32),
        },
        strict=True,
    )
    chex.assert_trees_all_equal(out.data, e.data)
    chex.assert_trees_all_equal(out.metadata, e.metadata)
    # The original is untouched.
    chex.assert_trees_all_equal(e, make_element(), strict=True)


@JIT
def test_update_data_merges_nested_and_leaves_original(use_jit):
    e = make_element()

    def fn(e):
        return e.update_data({"img": {"r": jnp.full((2, 2), 7.0)}, "y": jnp.arange(3)})

    out = maybe_jit(fn, use_jit)(e)
    assert set(out.data) == {"x", "img", "label", "y"}
    assert set(out.data["img"]) == {"r", "g"}
    chex.assert_trees_all_equal(out.data["img"]["r"], jnp.full((2, 2), 7.0))
    chex.assert_trees_all_equal(out.data["img"]["g"], jnp.ones((2, 2)))
    chex.assert_trees_all_equal(out.data["y"], jnp.arange(3))
    chex.assert_trees_all_equal(out.state, e.state)
    chex.assert_trees_all_equal(e, make_element(), strict=True)


def test_update_replaces_a_subtree_with_a_leaf():
    e = jb.Element(data={"img": {"r": jnp.zeros(2)}})
    out = e.update_data({"img": jnp.ones(3)})
    chex.assert_trees_all_equal(out.data, {"img": jnp.ones(3)})


def test_update_data_of_non_dict_data_raises():
    e = jb.Element(data=jnp.zeros(3))
    with pytest.raises(TypeError, match="Can only merge updates into a dict, got"):
        e.update_data({"x": jnp.ones(1)})


@JIT
def test_transform_maps_every_data_leaf_only(use_jit):
    e = make_element()
    out = maybe_jit(lambda e: e.transform(lambda x: x * 2), use_jit)(e)
    chex.assert_trees_all_equal(out.data, jax.tree.map(lambda x: x * 2, e.data), strict=True)
    chex.assert_trees_all_equal(out.state, e.state, strict=True)
    chex.assert_trees_all_equal(out.metadata, e.metadata, strict=True)
    chex.assert_trees_all_equal(e, make_element(), strict=True)


@JIT
def test_transform_may_change_dtype(use_jit):
    e = jb.Element(data={"x": jnp.array([-1.0, 2.0])})
    out = maybe_jit(lambda e: e.transform(lambda x: x > 0), use_jit)(e)
    chex.assert_trees_all_equal(out.data["x"], jnp.array([False, True]), strict=True)


@JIT
def test_apply_to_data_is_transform(use_jit):
    e = make_element()
    fn = maybe_jit(lambda e: (e.apply_to_data(jnp.negative), e.transform(jnp.negative)), use_jit)
    applied, transformed = fn(e)
    chex.assert_trees_all_equal(applied, transformed, strict=True)


@JIT
def test_gradients_flow_through_apply_to_data(use_jit):
    x = jnp.array([1.0, 2.0, 3.0])

    def loss(scale, x):
        e = jb.Element(data={"x": x, "y": {"z": x[:2]}}, state={"seen": 0})
        e = e.apply_to_data(lambda leaf: leaf * scale)
        return jnp.sum(e.data["x"] ** 2) + jnp.sum(e.data["y"]["z"])

    g_scale, g_x = maybe_jit(jax.grad(loss, argnums=(0, 1)), use_jit)(jnp.array(2.0), x)
    # d/ds [s^2 sum x^2 + s (x0 + x1)] = 2 s sum x^2 + x0 + x1
    chex.assert_trees_all_close(g_scale, jnp.array(2 * 2.0 * 14.0 + 3.0))
    # d/dx [s^2 x^2] = 2 s^2 x, plus s on the two sliced entries
    chex.assert_trees_all_close(g_x, 2 * 4.0 * x + jnp.array([2.0, 2.0, 0.0]))


@JIT
def test_with_metadata_replaces_only_metadata(use_jit):
    e = make_element()

    def fn(e):
        return e.with_metadata(jb.Metadata(index=9, epoch=e.metadata.epoch + 1))

    out = maybe_jit(fn, use_jit)(e)
    assert int(out.metadata.index) == 9
    assert int(out.metadata.epoch) == 2
    assert out.metadata.extra == {}
    chex.assert_trees_all_equal(out.data, e.data, strict=True)
    chex.assert_trees_all_equal(out.state, e.state, strict=True)
    assert e.with_metadata(None).metadata is None
    assert int(e.metadata.index) == 5


@JIT
def test_replace(use_jit):
    e = make_element()

    def fn(e):
        return e.replace(data={"y": jnp.ones(1)}, state={"k": 3})

    out = maybe_jit(fn, use_jit)(e)
    chex.assert_trees_all_equal(out.data, {"y": jnp.ones(1)}, strict=True)
    # Python scalars given to `replace` are converted like at construction.
    chex.assert_trees_all_equal(out.state, {"k": jnp.array(3, jnp.int32)}, strict=True)
    chex.assert_trees_all_equal(out.metadata, e.metadata, strict=True)
    chex.assert_trees_all_equal(e, make_element(), strict=True)


def test_replace_unknown_field_raises():
    with pytest.raises(TypeError):
        jb.Element().replace(valid_mask=jnp.ones(1, bool))


# ----------------------------------------------------------------------------- Metadata


def test_metadata_defaults_and_dtypes():
    m = jb.Metadata()
    chex.assert_trees_all_equal(
        (m.index, m.epoch), (jnp.array(0, jnp.int32), jnp.array(0, jnp.int32)), strict=True
    )
    assert m.extra == {}
    m = jb.Metadata(index=np.int64(7), epoch=np.array(2, np.int64), extra={"src": 1})
    chex.assert_trees_all_equal(
        (m.index, m.epoch, m.extra),
        (jnp.array(7, jnp.int32), jnp.array(2, jnp.int32), {"src": jnp.array(1, jnp.int32)}),
        strict=True,
    )


def test_metadata_scalar_epoch_broadcasts_to_stacked_index():
    m = jb.Metadata(index=jnp.arange(4), epoch=3)
    chex.assert_trees_all_equal(m.index, jnp.arange(4, dtype=jnp.int32), strict=True)
    chex.assert_trees_all_equal(m.epoch, jnp.full((4,), 3, jnp.int32), strict=True)
    m = jb.Metadata(index=2, epoch=jnp.array([0, 1]))
    chex.assert_trees_all_equal(m.index, jnp.array([2, 2], jnp.int32), strict=True)


def test_metadata_is_a_pytree_of_arrays():
    m = jb.Metadata(index=1, epoch=2, extra={"a": jnp.zeros(2)})
    leaves = jax.tree.leaves(m)
    assert len(leaves) == 3
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)


@JIT
def test_metadata_lives_in_a_scan_carry(use_jit):
    def run(m):
        def body(m, _):
            nxt = jb.Metadata(index=m.index + 1, epoch=m.epoch, extra=m.extra)
            return nxt, m.index

        return jax.lax.scan(body, m, None, length=4)

    m0 = jb.Metadata(index=10, epoch=1, extra={"src": jnp.array(5, jnp.int32)})
    m, seen = maybe_jit(run, use_jit)(m0)
    chex.assert_trees_all_equal(
        m, jb.Metadata(index=14, epoch=1, extra={"src": jnp.array(5, jnp.int32)}), strict=True
    )
    chex.assert_trees_all_equal(seen, jnp.arange(10, 14, dtype=jnp.int32), strict=True)


# ----------------------------------------------------------------------------- PyTree behaviour


def test_flatten_unflatten_round_trip():
    e = make_element()
    leaves, treedef = jax.tree.flatten(e)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    # data (4 leaves) + state (2) + metadata index, epoch, extra (3)
    assert len(leaves) == 9
    back = jax.tree.unflatten(treedef, leaves)
    assert isinstance(back, jb.Element)
    chex.assert_trees_all_equal(back, e, strict=True)
    assert jax.tree.structure(jb.Element(data={"x": jnp.zeros(1)})) != treedef


def test_tree_map_identity():
    e = make_element()
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x, e), e, strict=True)
    none_meta = jb.Element(data={"x": jnp.zeros(2)})
    chex.assert_trees_all_equal(jax.tree.map(lambda x: x, none_meta), none_meta, strict=True)


def test_jit_identity():
    e = make_element()
    out = jax.jit(lambda e: e)(e)
    assert isinstance(out, jb.Element)
    chex.assert_trees_all_equal(out, e, strict=True)


@JIT
def test_element_as_scan_carry(use_jit):
    def run(e):
        def body(e, _):
            e = e.transform(lambda x: x + 1).update_state({"seen": e.state["seen"] + 1})
            return e, e.data["x"]

        return jax.lax.scan(body, e, None, length=3)

    e = make_element()
    out, xs = maybe_jit(run, use_jit)(e)
    chex.assert_trees_all_equal(out.data, jax.tree.map(lambda x: x + 3, e.data), strict=True)
    assert int(out.state["seen"]) == 3
    chex.assert_trees_all_equal(out.metadata, e.metadata, strict=True)
    chex.assert_trees_all_equal(xs, jnp.array([[2.0, 3.0], [3.0, 4.0], [4.0, 5.0]]))


def test_no_retrace_when_only_values_change():
    def fn(e):
        e = e.update_state({"seen": e.state["seen"] + 1}).transform(lambda x: x * 2)
        return e.with_metadata(jb.Metadata(index=e.metadata.index + 1, epoch=e.metadata.epoch))

    jitted = jax.jit(chex.assert_max_traces(fn, n=1))
    first = jitted(make_element(0.0))
    second = jitted(make_element(10.0))
    chex.assert_trees_all_close(second.data["x"], jnp.array([22.0, 24.0]))
    assert int(first.metadata.index) == int(second.metadata.index) == 6


def test_vmap_over_stacked_elements():
    elements = [make_element(float(i)).update_state({"seen": i}) for i in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *elements)
    assert isinstance(stacked, jb.Element)
    assert stacked.metadata.index.shape == (3,)

    def fn(e):
        e = e.transform(lambda x: x + 1).update_state({"seen": e.state["seen"] * 10})
        return e.update_data({"total": jnp.sum(e.data["x"])})

    out = jax.vmap(fn)(stacked)
    expected = jax.tree.map(lambda *xs: jnp.stack(xs), *[fn(e) for e in elements])
    chex.assert_trees_all_equal(out, expected, strict=True)
    chex.assert_trees_all_equal(out.state["seen"], jnp.array([0, 10, 20], jnp.int32))


def test_element_built_inside_jit_from_traced_values():
    @jax.jit
    def build(x, i):
        return jb.create_element({"x": x}, {"count": 0}, jb.Metadata(index=i, epoch=1))

    e = build(jnp.arange(3.0), jnp.array(4))
    chex.assert_trees_all_equal(
        e,
        jb.Element(
            data={"x": jnp.arange(3.0)},
            state={"count": jnp.array(0, jnp.int32)},
            metadata=jb.Metadata(index=4, epoch=1),
        ),
        strict=True,
    )

"""`jaxbatch.testing` assertions: each passes on good input and, on bad input, fails with a
message naming the leaf path (and the row); then a chex-variants property test over a batcher,
the way a user would write one.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb
from jaxbatch.testing import (
    assert_batch_matches_spec,
    assert_no_valid_rows,
    assert_valid_rows_equal,
)

MASK = [True, True, False]


def make_batch(x, y=None, mask=MASK, states=None, metadata=None):
    data = {"x": jnp.asarray(x)}
    if y is not None:
        data["y"] = jnp.asarray(y, dtype=jnp.float32)
    return jb.Batch.from_parts(data, states, metadata, valid_mask=jnp.array(mask))


# --------------------------------------------------------------------------- spec


def test_matches_spec_passes_on_an_emitted_batch_and_an_example_batch():
    batcher = jb.fixed_size(3)
    element = {"x": jnp.int32(0), "y": jnp.zeros(2, jnp.float32)}
    _, emit = batcher.step(batcher.init(element), element)
    assert_batch_matches_spec(emit.batch, jb.batch_spec(batcher, element))
    example = make_batch([1, 2, 3], y=np.zeros((3, 2)))
    assert_batch_matches_spec(make_batch([4, 5, 6], y=np.ones((3, 2))), example)


def test_matches_spec_names_the_leaf_with_the_wrong_shape():
    spec = make_batch([1, 2, 3], y=np.zeros((3, 2)))
    with pytest.raises(
        AssertionError, match=r"`batch\.data\['y'\]` has shape \(3, 4\), expected \(3, 2\)"
    ):
        assert_batch_matches_spec(make_batch([1, 2, 3], y=np.zeros((3, 4))), spec)


def test_matches_spec_names_the_leaf_with_the_wrong_dtype():
    spec = make_batch(jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(
        AssertionError, match=r"`batch\.data\['x'\]` has dtype float32, expected int32"
    ):
        assert_batch_matches_spec(make_batch(jnp.arange(3, dtype=jnp.float32)), spec)


def test_matches_spec_names_missing_and_unexpected_leaves():
    spec = make_batch([1, 2, 3], y=np.zeros((3, 2)))
    with pytest.raises(AssertionError, match=r"missing leaves `batch\.data\['y'\]`\.$"):
        assert_batch_matches_spec(make_batch([1, 2, 3]), spec)
    with_meta = make_batch([1, 2, 3], metadata=jb.Metadata(index=jnp.arange(3)))
    with pytest.raises(
        AssertionError,
        match=r"unexpected leaves `batch\.metadata\.epoch`, `batch\.metadata\.index`\.$",
    ):
        assert_batch_matches_spec(with_meta, make_batch([1, 2, 3]))


def test_matches_spec_reads_only_static_shapes_so_it_works_under_jit():
    spec = jb.batch_spec(jb.fixed_size(3), {"x": jnp.int32(0)})

    @jax.jit
    def check(batch):
        assert_batch_matches_spec(batch, spec)
        return batch.num_valid

    assert int(check(make_batch(jnp.arange(3, dtype=jnp.int32)))) == 2


# --------------------------------------------------------------------------- valid rows


def test_valid_rows_equal_ignores_padding_rows_even_nan():
    a = make_batch([1, 2, 0], y=[[0, 1], [2, 3], [0, 0]])
    b = make_batch([1, 2, 99], y=[[0, 1], [2, 3], [math.nan, math.inf]])
    assert_valid_rows_equal(a, b)
    assert_valid_rows_equal(b, a, atol=1e-6)


def test_valid_rows_equal_treats_nan_in_the_same_valid_place_as_equal():
    a = make_batch([1, 2, 0], y=[[0, math.nan], [2, 3], [0, 0]])
    assert_valid_rows_equal(a, make_batch([1, 2, 0], y=[[0, math.nan], [2, 3], [5, 5]]))
    with pytest.raises(AssertionError, match=r"`data\['y'\]` differs at valid row 0"):
        assert_valid_rows_equal(a, make_batch([1, 2, 0], y=[[0, 1], [2, 3], [0, 0]]))


def test_valid_rows_equal_names_the_leaf_and_first_differing_valid_row():
    mask = [False, True, True, True]
    a = make_batch([7, 1, 2, 3], mask=mask)
    b = make_batch([8, 1, 5, 6], mask=mask)  # row 0 is padding: its difference is ignored
    with pytest.raises(
        AssertionError,
        match=r"^Leaf `data\['x'\]` differs at valid row 2: a has 2, b has 5 "
        r"\(exact; 2 of 3 valid rows differ\)\.$",
    ):
        assert_valid_rows_equal(a, b)


def test_valid_rows_equal_compares_leaves_with_several_dims():
    a = make_batch([1, 2, 0], y=np.arange(6).reshape(3, 2))
    b = make_batch([1, 2, 0], y=[[0, 1], [2, 4], [4, 5]])
    with pytest.raises(
        AssertionError,
        match=r"`data\['y'\]` differs at valid row 1: a has \[2\., 3\.\], b has \[2\., 4\.\]",
    ):
        assert_valid_rows_equal(a, b)


def test_valid_rows_equal_compares_states_and_metadata():
    meta = jb.Metadata(index=jnp.arange(3))
    a = make_batch([1, 2, 0], states={"n": jnp.array([1, 1, 1])}, metadata=meta)
    b = make_batch([1, 2, 0], states={"n": jnp.array([1, 0, 0])}, metadata=meta)
    with pytest.raises(AssertionError, match=r"`states\['n'\]` differs at valid row 1"):
        assert_valid_rows_equal(a, b)
    other = make_batch(
        [1, 2, 0],
        states={"n": jnp.array([1, 1, 1])},
        metadata=jb.Metadata(index=jnp.array([0, 5, 2])),
    )
    with pytest.raises(AssertionError, match=r"`metadata\.index` differs at valid row 1"):
        assert_valid_rows_equal(a, other)


def test_valid_rows_equal_names_the_rows_where_the_masks_differ():
    a = make_batch([1, 2, 0], mask=[True, True, False])
    b = make_batch([1, 2, 0], mask=[True, False, True])
    with pytest.raises(AssertionError, match=r"`valid_mask` differs at rows \[1, 2\]"):
        assert_valid_rows_equal(a, b)


def test_valid_rows_equal_within_tolerances():
    a = make_batch([1, 2, 0], y=[[0, 1], [2, 3], [0, 0]])
    b = make_batch([1, 2, 0], y=[[0, 1], [2, 3.001], [0, 0]])
    assert_valid_rows_equal(a, b, atol=1e-2)
    assert_valid_rows_equal(a, b, rtol=1e-3)
    with pytest.raises(AssertionError, match=r"valid row 1: .*\(rtol=0\.0, atol=0\.0001;"):
        assert_valid_rows_equal(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="`atol` must be a non-negative number"):
        assert_valid_rows_equal(a, b, atol=-1.0)


def test_valid_rows_equal_works_on_numpy_leaves():
    a = jb.Batch.from_parts({"x": np.array([[1, 2], [3, 4]])}, valid_mask=np.array([True, False]))
    b = jb.Batch.from_parts({"x": np.array([[1, 2], [0, 0]])}, valid_mask=np.array([True, False]))
    assert_valid_rows_equal(a, b)
    assert_valid_rows_equal(a, make_batch(jnp.array([[1, 2], [9, 9]]), mask=[True, False]))


def test_valid_rows_equal_refuses_different_structures_and_shapes():
    with pytest.raises(
        AssertionError,
        match=r"`a` does not have the structure of `b`: unexpected leaves `data\['y'\]`\.$",
    ):
        assert_valid_rows_equal(make_batch([1, 2, 0], y=np.zeros((3, 2))), make_batch([1, 2, 0]))
    with pytest.raises(AssertionError, match=r"`a` has 3 rows but `b` has 2"):
        assert_valid_rows_equal(make_batch([1, 2, 0]), make_batch([1, 2], mask=[True, True]))
    with pytest.raises(
        AssertionError, match=r"`data\['y'\]` has shape \(3, 2\) in `a` but \(3, 1\)"
    ):
        assert_valid_rows_equal(
            make_batch([1, 2, 0], y=np.zeros((3, 2))), make_batch([1, 2, 0], y=np.zeros((3, 1)))
        )


def test_valid_rows_equal_compares_typed_prng_keys_by_their_data():
    keys = jax.random.split(jax.random.key(0), 3)
    a = make_batch([1, 2, 0], states={"key": keys})
    assert_batch_matches_spec(a, make_batch([0, 0, 0], states={"key": keys}))
    assert_valid_rows_equal(a, make_batch([1, 2, 0], states={"key": keys.at[2].set(keys[0])}))
    with pytest.raises(AssertionError, match=r"`states\['key'\]` differs at valid row 1"):
        assert_valid_rows_equal(a, make_batch([1, 2, 0], states={"key": keys.at[1].set(keys[0])}))


def test_assertions_refuse_what_is_not_a_batch():
    a = make_batch([1, 2, 0])
    with pytest.raises(TypeError, match=r"`b` must be a `jb.Batch`, got Emit \(pass `b.batch`\)"):
        assert_valid_rows_equal(a, jb.Emit(a, jnp.array(True)))
    with pytest.raises(TypeError, match=r"`batch` must be a `jb.Batch`, got dict"):
        assert_batch_matches_spec({"x": jnp.zeros(3)}, a)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`emit` must be a `jb.Emit` or a `jb.Batch`"):
        assert_no_valid_rows(jnp.zeros(3, bool))  # type: ignore[arg-type]


def test_value_assertions_refuse_tracers():
    a = make_batch([1, 2, 0])
    with pytest.raises(TypeError, match=r"`a\.data\['x'\]` is a tracer: call it outside `jax.jit`"):
        jax.jit(lambda a: assert_valid_rows_equal(a, a))(a)
    emit = jb.Emit(a, jnp.array(False))
    with pytest.raises(TypeError, match="call it outside `jax.jit`"):
        jax.jit(lambda e: assert_no_valid_rows(e))(emit)


# --------------------------------------------------------------------------- no valid rows


def test_no_valid_rows_passes_on_a_not_ready_emit_and_an_empty_batch():
    empty = make_batch([5, 6, 7], mask=[False, False, False])  # data unspecified: not read
    assert_no_valid_rows(jb.Emit(empty, jnp.array(False)))
    assert_no_valid_rows(empty)


def test_no_valid_rows_names_the_valid_rows_of_a_not_ready_emit():
    emit = jb.Emit(make_batch([1, 2, 3], mask=[False, True, True]), jnp.array(False))
    with pytest.raises(
        AssertionError, match=r"^Expected no batch, but `valid_mask` is True at rows \[1, 2\]\.$"
    ):
        assert_no_valid_rows(emit)


def test_no_valid_rows_catches_a_ready_emit():
    emit = jb.Emit(make_batch([1, 2, 3], mask=[False] * 3), jnp.array(True))
    with pytest.raises(AssertionError, match=r"^Expected no batch, but `ready` is True\.$"):
        assert_no_valid_rows(emit)
    with pytest.raises(AssertionError, match=r"True at rows \[0, 1\]"):
        assert_no_valid_rows(make_batch([1, 2, 3]))


# --------------------------------------------------------------------------- chex variants


class BatcherVariantsTest(chex.TestCase):
    """How a user tests a batcher with chex: the same stream, with and without `jit`.

    `chex.variants` needs a `chex.TestCase` method: on a plain pytest function it would
    silently collect nothing.
    """

    @chex.variants(with_jit=True, without_jit=True)
    def test_fixed_size_stream(self):
        batcher = jb.fixed_size(3)
        element_spec = {
            "x": jax.ShapeDtypeStruct((), jnp.int32),
            "y": jax.ShapeDtypeStruct((2,), jnp.float32),
        }
        spec = jb.batch_spec(batcher, element_spec)
        step, flush = self.variant(batcher.step), self.variant(batcher.flush)

        def element(i):
            return {"x": jnp.int32(10 * i), "y": jnp.array([i, i + 0.5], jnp.float32)}

        def expected(first, n_valid):
            # Padding rows are set to values the batcher never writes: they must be ignored.
            rows = range(first, first + n_valid)
            return jb.Batch.from_parts(
                {
                    "x": jnp.array([10 * i for i in rows] + [-1] * (3 - n_valid), jnp.int32),
                    "y": jnp.array(
                        [[i, i + 0.5] for i in rows] + [[math.nan, math.nan]] * (3 - n_valid),
                        jnp.float32,
                    ),
                },
                valid_mask=jnp.arange(3) < n_valid,
            )

        state = batcher.init(element_spec)
        ready = []
        for i in range(7):
            state, emit = step(state, element(i))
            assert_batch_matches_spec(emit.batch, spec)
            if emit.ready:
                ready.append(emit.batch)
            else:
                assert_no_valid_rows(emit)
        state, emit = flush(state)
        assert_batch_matches_spec(emit.batch, spec)
        ready.append(emit.batch)
        state, emit = flush(state)
        assert_no_valid_rows(emit)

        self.assertLen(ready, 3)
        for got, want in zip(ready, [expected(0, 3), expected(3, 3), expected(6, 1)]):
            assert_valid_rows_equal(got, want)

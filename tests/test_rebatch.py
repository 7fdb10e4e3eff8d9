"""`rebatch` against a pure-Python reference (nothing lost, order, padding never valid,
Stats), with and without `jit`, one trace, `vmap`, exact resume through a checkpoint, and
errors; `unbatch` round trips.

A `rebatch` element is a whole input batch and an output row is one of its valid rows, so
`check_batcher` follows rows (`units=rows`: an element's valid rows, None for its padding
rows) through every path (`test_check_batcher_follows_the_rows`).
"""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_shuffle as ref
from hypothesis import given, settings, strategies as st

import jaxbatch as jb
from jaxbatch.testing import check_batcher

CONFIGS = [(1, 3), (3, 3), (2, 4)]  # (in_size, batch_size)
PAD = -9


@functools.cache
def batcher_for(batch_size, drop_remainder=False):
    return jb.rebatch(batch_size, drop_remainder=drop_remainder, pad_value=PAD)


def stack(batches):
    """Stack `Batch`es along a new leading axis (the constructor wants a 1-d mask)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def make_stream(num_batches, in_size, seed):
    """Input batches: `x` = 1000 * batch + row (-7 on padding), a float `y`, a state `s`."""
    rng = np.random.default_rng(seed)
    masks = rng.random((num_batches, in_size)) < 0.6
    b, r = np.meshgrid(np.arange(num_batches), np.arange(in_size), indexing="ij")
    x = np.where(masks, 1000 * b + r, -7).astype(np.int32)
    y = (x[..., None] * np.ones(2)).astype(np.float32)
    batches = [
        jb.Batch(
            data={"x": jnp.asarray(x[i]), "y": jnp.asarray(y[i])},
            valid_mask=jnp.asarray(masks[i]),
            states={"s": jnp.asarray(-x[i])},
        )
        for i in range(num_batches)
    ]
    return stack(batches), masks


def first(stream):
    return jax.tree.map(lambda x: x[0], stream)


def run_steps(batcher, stream, step, flush):
    """Step the input batches one by one, then flush twice: (emits, final state)."""
    state = batcher.init(first(stream))
    emits = []
    for i in range(stream.valid_mask.shape[0]):
        state, emit = step(state, jax.tree.map(lambda x, i=i: x[i], stream))
        emits.append(emit)
    for _ in range(2):
        state, emit = flush(state)
        emits.append(emit)
    return jax.device_get(emits), state


@functools.cache
def jitted(batcher):
    return jax.jit(batcher.step), jax.jit(batcher.flush)


def expected_batches(run, masks, drop_remainder):
    """The reference's batches as host arrays of `x` and masks."""
    out = []
    for batch in run.batches:
        x = [PAD if p is None else 1000 * p[0] + p[1] for p in batch]
        out.append((x, [p is not None for p in batch]))
    return out


def got_batches(emits):
    out = []
    for emit in emits:
        mask = np.asarray(emit.batch.valid_mask)
        if not emit.ready:
            assert not mask.any()
            continue
        x = np.asarray(emit.batch.data["x"])
        # The other leaves follow `x` row for row; padding rows hold the pad value.
        np.testing.assert_array_equal(
            np.asarray(emit.batch.data["y"]), (x[:, None] * np.ones(2)).astype(np.float32)
        )
        s = np.asarray(emit.batch.states["s"])
        np.testing.assert_array_equal(s, np.where(mask, -x, PAD))
        out.append((x.tolist(), mask.tolist()))
    return out


def stats_of(state):
    return {name: int(getattr(state.stats, name)) for name in ref.COUNTERS}


# --------------------------------------------------------------------------- reference


@pytest.mark.slow
@settings(max_examples=10)
@given(
    config=st.sampled_from(CONFIGS),
    drop=st.booleans(),
    num_batches=st.sampled_from([1, 5]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_under_jit(config, drop, num_batches, seed):
    in_size, batch_size = config
    batcher = batcher_for(batch_size, drop)
    stream, masks = make_stream(num_batches, in_size, seed)
    emits, state = run_steps(batcher, stream, *jitted(batcher))
    expected = ref.rebatch_order(masks, batch_size, drop_remainder=drop)
    assert [bool(e.ready) for e in emits[:num_batches]] == expected.ready
    assert got_batches(emits) == expected_batches(expected, masks, drop)
    assert not emits[-1].ready  # one flush drains
    assert stats_of(state) == expected.stats


def test_without_jit_matches_jit_bit_for_bit():
    batcher = batcher_for(4)
    stream, _ = make_stream(5, 2, seed=3)
    plain, plain_state = run_steps(batcher, stream, batcher.step, batcher.flush)
    fast, fast_state = run_steps(batcher, stream, *jitted(batcher))
    chex.assert_trees_all_equal(plain, fast)
    assert stats_of(plain_state) == stats_of(fast_state)


def test_drivers_batch_all_and_scan():
    batcher = batcher_for(3)
    stream, masks = make_stream(5, 2, seed=1)
    batches, count = jb.batch_all(batcher, stream, max_batches=4)
    expected = ref.rebatch_order(masks, 3)
    assert int(count) == len(expected.batches)
    want = expected_batches(expected, masks, False)
    got = [
        (np.asarray(batches.data["x"][k]).tolist(), np.asarray(batches.valid_mask[k]).tolist())
        for k in range(int(count))
    ]
    assert got == want
    total, _ = jb.scan(
        batcher,
        lambda t, b: t + jnp.sum(jnp.where(b.valid_mask, b.data["x"], 0)),
        jnp.int32(0),
        stream,
    )
    assert int(total) == int(np.where(masks, np.asarray(stream.data["x"]), 0).sum())


# --------------------------------------------------------------------------- laws


def test_one_trace_for_many_streams():
    batcher = jb.rebatch(3)  # a fresh batcher: traces counted from zero
    step = jax.jit(chex.assert_max_traces(batcher.step, n=1))
    for seed in range(3):
        stream, _ = make_stream(2, 2, seed)
        state = batcher.init(first(stream))
        for i in range(2):
            state, _ = step(state, jax.tree.map(lambda x, i=i: x[i], stream))


def test_vmap_over_streams_matches_separate_runs():
    batcher = batcher_for(4)
    streams = [make_stream(5, 2, seed)[0] for seed in (4, 5)]

    def run(stream):
        state = batcher.init(first(stream))
        state, emits = jax.lax.scan(batcher.step, state, stream)
        state, last = batcher.flush(state)
        return emits, last, state.stats

    both = jax.device_get(jax.jit(jax.vmap(run))(stack(streams)))
    for k, stream in enumerate(streams):
        alone = jax.device_get(jax.jit(run)(stream))
        chex.assert_trees_all_equal(jax.tree.map(lambda x, k=k: x[k], both), alone)


def test_resume_through_a_checkpoint_is_bit_identical(tmp_path):
    batcher = batcher_for(3)
    step, flush = jitted(batcher)
    stream, _ = make_stream(5, 2, seed=7)
    want, want_state = run_steps(batcher, stream, step, flush)
    like = jax.eval_shape(lambda: batcher.init(first(stream)))
    for cut in (2, 5):
        state = batcher.init(first(stream))
        emits = []
        for i in range(cut):
            state, emit = step(state, jax.tree.map(lambda x, i=i: x[i], stream))
            emits.append(emit)
        path = os.path.join(tmp_path, f"rebatch{cut}.ckpt")
        jb.save_state(path, state)
        state = jb.load_state(path, like)
        for i in range(cut, 5):
            state, emit = step(state, jax.tree.map(lambda x, i=i: x[i], stream))
            emits.append(emit)
        for _ in range(2):
            state, emit = flush(state)
            emits.append(emit)
        chex.assert_trees_all_equal(jax.device_get(emits), want)
        assert stats_of(state) == stats_of(want_state)


def rows(batch):
    """The units a `rebatch` element brings: its rows as they come out (an `Element` of the
    row's data, states and metadata, as `check_batcher` reads valid rows), None for a padding
    row (refused: counted as skipped)."""
    row = jb.Element(data=batch.data, state=batch.states, metadata=batch.metadata)
    return [
        jax.tree.map(lambda x, r=r: x[r], row) if valid else None
        for r, valid in enumerate(np.asarray(batch.valid_mask))
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("in_size", "batch_size", "drop_remainder", "seed"),
    [(2, 3, False, 0), (2, 4, True, 1)],
)
def test_check_batcher_follows_the_rows(in_size, batch_size, drop_remainder, seed):
    stream, masks = make_stream(5, in_size, seed)
    report = check_batcher(
        batcher_for(batch_size, drop_remainder), stream, units=rows, resume_steps=3
    )
    valid = int(masks.sum())
    assert report.stats["accepted"] == valid and report.stats["skipped"] == masks.size - valid
    assert report.stats["dropped"] == (valid % batch_size if drop_remainder else 0)
    assert report.stats["skipped"] > 0 and (report.stats["dropped"] > 0) == drop_remainder
    assert {"order", "jit", "scan", "batch_all", "feed", "vmap", "bad input"} <= set(report.checks)


def test_check_batcher_needs_units_to_follow_batches_of_batches():
    stream, _ = make_stream(3, 2, seed=0)
    with pytest.raises(ValueError, match="follows elements by value.*pass `units`"):
        check_batcher(batcher_for(3), stream, check_vmap=False)


# --------------------------------------------------------------------------- errors


def test_input_batches_larger_than_batch_size_are_refused():
    stream, _ = make_stream(2, 3, seed=0)
    with pytest.raises(ValueError, match="`batch_size` 2 got input batches of 3 rows"):
        jb.rebatch(2).init(first(stream))


def test_bad_elements_raise_type_error():
    batcher = batcher_for(3)
    stream, _ = make_stream(2, 2, seed=0)
    state = batcher.init(first(stream))
    with pytest.raises(TypeError, match="must be a `jb.Batch`"):
        batcher.step(state, {"x": jnp.zeros(2, jnp.int32)})
    other, _ = make_stream(2, 1, seed=0)
    with pytest.raises(TypeError, match="built for input batches of 2 rows"):
        batcher.step(state, first(other))
    bad = first(stream)
    bad = jb.Batch(
        data={"x": bad.data["x"].astype(jnp.float32), "y": bad.data["y"]},
        valid_mask=bad.valid_mask,
        states=bad.states,
    )
    with pytest.raises(TypeError, match=r"element.*\['x'\].*dtype float32"):
        batcher.step(state, bad)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "`batch_size` must be a positive int, got 0"),
        ({"batch_size": 2, "drop_remainder": None}, "`drop_remainder` must be a bool"),
        ({"batch_size": 2, "pad_value": [0]}, "`pad_value` must be a Python number"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jb.rebatch(**kwargs)


# --------------------------------------------------------------------------- unbatch


def test_unbatch_round_trips_a_batched_stream():
    xs = jnp.arange(10, dtype=jnp.int32)
    batches, _ = jb.batch_all(jb.fixed_size(4), {"x": xs})
    elements, count = jb.unbatch(batches)
    assert int(count) == 10
    np.testing.assert_array_equal(np.asarray(elements.data["x"][:10]), np.asarray(xs))
    # Under jit, and on one batch.
    elements, count = jax.jit(jb.unbatch)(jax.tree.map(lambda x: x[2], batches))
    assert int(count) == 2
    np.testing.assert_array_equal(np.asarray(elements.data["x"][:2]), [8, 9])


def test_unbatch_then_rebatch_splits_batches():
    stream, masks = make_stream(4, 3, seed=2)
    elements, count = jb.unbatch(stream)
    rows = jax.tree.map(lambda x: x[: int(count)], elements)
    want = np.asarray(stream.data["x"])[masks]
    np.testing.assert_array_equal(np.asarray(rows.data["x"]), want)
    np.testing.assert_array_equal(np.asarray(rows.state["s"]), -want)
    batches, num = jb.batch_all(jb.fixed_size(2), rows, max_batches=7)
    assert int(num) == -(-len(want) // 2)


def test_unbatch_refuses_what_is_not_a_batch():
    with pytest.raises(TypeError, match="`batches` must be a `jb.Batch`"):
        jb.unbatch({"x": jnp.zeros(3)})


def test_scan_traces_the_consumer_once_per_program():
    from reference import consumer_traces

    first, second = make_stream(5, 2, seed=1)[0], make_stream(5, 2, seed=2)[0]
    traces = consumer_traces(batcher_for(3), first, second)
    assert traces == {"scan": 1, "scan, continued": 1}

"""Combinators: `map_elements`, `filter_elements`, `with_statistics` against pure-Python
references, the batcher laws (`check_batcher`), and the running moments against NumPy."""

import functools
import os
import tempfile

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb
from jaxbatch.testing import check_batcher


def keep_flag(element):
    return element.data["keep"]


def identity(element):
    return element


def plus_one(element):
    return {"x": element.data["x"] + 1, "y": element.data["x"] * 2.0}


@functools.cache
def filtered(batch_size):
    return jb.filter_elements(jb.fixed_size(batch_size), keep_flag)


@functools.cache
def filtered_stats(batch_size):
    return jb.with_statistics(filtered(batch_size))


@functools.cache
def scan_and_flush(batcher):
    """jitted: `lax.scan(step)` over the stream, then one `flush`."""

    def run(state, elements):
        state, emits = jax.lax.scan(batcher.step, state, elements)
        state, last = batcher.flush(state)
        return state, emits, last

    return jax.jit(run)


def stream(n, keep=None):
    keep = np.arange(n) % 3 != 1 if keep is None else np.asarray(keep, bool)
    return {"keep": jnp.asarray(keep), "x": jnp.arange(n, dtype=jnp.float32) * 1.5 + 1.0}


def reference_filter(elements, batch_size):
    """Pure Python: keep the rows whose `keep` is set, batch them, pad the last with 0."""
    kept = [e for e in elements if bool(e["keep"])]
    batches = []
    for start in range(0, len(kept), batch_size):
        rows = kept[start : start + batch_size]
        pad = batch_size - len(rows)
        data = {
            k: np.stack([r[k] for r in rows] + [np.zeros_like(rows[0][k])] * pad)
            for k in ("keep", "x")
        }
        batches.append((data, np.array([True] * len(rows) + [False] * pad)))
    return batches


# --------------------------------------------------------------------------- laws


@pytest.mark.slow
def test_filter_passes_check_batcher():
    report = check_batcher(
        filtered(2), stream(7), reference=lambda e: reference_filter(e, 2), resume_steps=2
    )
    assert report.stats["skipped"] == 2
    assert report.stats["accepted"] == 5


@pytest.mark.slow
def test_map_passes_check_batcher_with_bulk_feed():
    # `check_batcher` follows rows by value, so `fn` must leave values alone here; a map
    # that changes them is checked against the mapped stream below.
    batcher = jb.map_elements(jb.fixed_size(3), identity)
    assert batcher.feed is not None
    check_batcher(batcher, stream(7), resume_steps=2, check_vmap=False)


@pytest.mark.slow
def test_nested_combinators_pass_check_batcher():
    batcher = jb.with_statistics(
        jb.filter_elements(jb.map_elements(jb.fixed_size(2), identity), keep_flag)
    )
    report = check_batcher(
        batcher,
        stream(7),
        reference=lambda e: reference_filter(e, 2),
        resume_steps=2,
        check_vmap=False,
    )
    assert report.stats["skipped"] == 2


def test_map_changes_values_against_mapped_stream():
    batcher = jb.map_elements(jb.fixed_size(2), plus_one)
    elements = stream(5)
    batches, count = jb.batch_all(batcher, elements, max_batches=3)
    assert int(count) == 3
    x = np.asarray(elements["x"])
    want_x = np.concatenate([x + 1, [0]]).reshape(3, 2)
    np.testing.assert_array_equal(np.asarray(batches.data["x"]), want_x)
    np.testing.assert_array_equal(
        np.asarray(batches.data["y"]), np.concatenate([x * 2, [0]]).reshape(3, 2)
    )
    # the bulk path and stepping agree bit for bit
    state = batcher.init(jax.tree.map(lambda v: v[0], elements))
    stepped, stepped_count, _ = jb.collect(
        batcher._replace(feed=None), state, elements, 3, flush=True
    )
    assert int(stepped_count) == 3
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), batches, stepped))


def test_operation_stats_count_skipped_and_applied():
    batcher = filtered(2)
    elements = stream(10)
    state = batcher.init(jax.tree.map(lambda v: v[0], elements))
    state, _, _ = scan_and_flush(batcher)(state, elements)
    counts = {k: int(v) for k, v in jb.operation_stats(state).items()}
    kept = int(np.sum(np.asarray(elements["keep"])))
    assert counts["skipped_count"] == 10 - kept
    assert counts["applied_count"] == kept
    assert counts["emitted_count"] == kept
    assert counts["received_count"] == 10


@settings(max_examples=10)
@given(
    batch_size=st.sampled_from([1, 3]),
    keep=st.lists(st.booleans(), min_size=1, max_size=10),
)
def test_filter_and_statistics_property(batch_size, keep):
    """The filtered batches equal the reference; the statistics are NumPy's over the kept
    values only (padding never counts)."""
    batcher = filtered_stats(batch_size)
    n = len(keep)
    elements = stream(16, keep + [False] * (16 - n))  # one shape: one compile
    state = batcher.init(jax.tree.map(lambda v: v[0], elements))
    state, emits, last = scan_and_flush(batcher)(state, elements)
    got = [
        (jax.tree.map(lambda v, i=i: np.asarray(v[i]), emits.batch.data), emits.batch.valid_mask[i])
        for i in range(16)
        if bool(emits.ready[i])
    ]
    if bool(last.ready):
        got.append((jax.tree.map(np.asarray, last.batch.data), last.batch.valid_mask))
    rows = [jax.tree.map(lambda v, i=i: np.asarray(v[i]), elements) for i in range(16)]
    want = reference_filter(rows, batch_size)
    assert len(got) == len(want)
    for (gd, gm), (wd, wm) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(gm), wm)
        np.testing.assert_array_equal(gd["x"], wd["x"])
    kept = np.asarray(elements["x"])[np.asarray(elements["keep"])]
    moments = jb.get_statistics(state)
    assert int(moments.count) == len(kept)
    assert bool(jb.has_statistics(state)) == (len(kept) > 0)
    if len(kept):
        np.testing.assert_allclose(float(moments.mean["x"]), kept.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(moments.variance()["x"]), kept.var(), rtol=1e-5, atol=1e-5)
        assert float(moments.mean["keep"]) == 1.0


# --------------------------------------------------------------------------- statistics


@functools.cache
def stats_batcher(batch_size):
    return jb.with_statistics(jb.fixed_size(batch_size))


def test_running_moments_long_stream_float32_without_drift():
    """100k rows of 1e4 + noise, float32: mean and variance match NumPy (float64); a sum of
    squares would have cancelled to noise."""
    n, batch_size = 100_003, 64  # the last batch is padded: padding must not count
    rng = np.random.default_rng(0)
    x = (1e4 + rng.normal(0.0, 1.0, size=(n, 2)) * np.array([1.0, 0.01])).astype(np.float32)
    batcher = stats_batcher(batch_size)
    state = batcher.init({"x": jnp.zeros((2,), jnp.float32)})
    state, _, _ = scan_and_flush(batcher)(state, {"x": jnp.asarray(x)})
    moments = jb.get_statistics(state)
    x64 = x.astype(np.float64)
    assert int(moments.count) == n
    np.testing.assert_allclose(np.asarray(moments.mean["x"]), x64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(moments.variance()["x"]), x64.var(0), rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(moments.variance(ddof=1)["x"]), x64.var(0, ddof=1), rtol=1e-3
    )


@functools.cache
def collect_all(batcher):
    """jitted: the state after a stream of 2 elements and the end-of-stream flush."""
    return jax.jit(lambda state, xs: jb.collect(batcher, state, xs, 1, flush=True)[2])


def test_precedence_initial_reset_set():
    batcher = stats_batcher(2)
    spec = {"x": jnp.zeros((), jnp.float32)}
    known = jb.Moments.of({"x": jnp.float32(100.0)}, {"x": jnp.float32(9.0)}, count=3)
    frozen = jb.with_statistics(jb.fixed_size(2), initial=known)
    xs = {"x": jnp.array([1.0, 2.0])}
    # precomputed: batches never overwrite it
    state = frozen.init(spec)
    state = collect_all(frozen)(state, xs)
    assert float(jb.get_statistics(state).mean["x"]) == 100.0
    assert bool(jb.has_statistics(state))
    # after a reset: "None" (flag False, empty value) until the next ready batch
    state = jb.reset_statistics(state)
    assert not bool(jb.has_statistics(state))
    assert int(jb.get_statistics(state).count) == 0
    state = collect_all(frozen)(state, {"x": jnp.array([5.0, 7.0])})
    assert bool(jb.has_statistics(state))
    assert float(jb.get_statistics(state).mean["x"]) == 6.0
    # set (not frozen): later batches continue from the set moments
    state = batcher.init(spec)
    first = jb.Moments.of({"x": jnp.float32(1.5)}, {"x": jnp.float32(0.25)}, count=2)
    state = jb.set_statistics(state, first)
    state = collect_all(batcher)(state, {"x": jnp.array([3.0, 4.0])})
    moments = jb.get_statistics(state)
    assert int(moments.count) == 4
    np.testing.assert_allclose(float(moments.mean["x"]), 2.5)
    np.testing.assert_allclose(float(moments.variance()["x"]), 1.25)
    # set frozen: kept like `initial`
    state = jb.set_statistics(state, first, freeze=True)
    state = collect_all(batcher)(state, {"x": jnp.array([3.0, 4.0])})
    assert float(jb.get_statistics(state).mean["x"]) == 1.5
    # pure functions: they work under jit too
    state = jax.jit(jb.reset_statistics)(state)
    assert not bool(jax.jit(jb.has_statistics)(state))


def test_statistics_reachable_through_wrappers():
    batcher = jb.filter_elements(stats_batcher(2), keep_flag)
    elements = stream(6)
    state = batcher.init(jax.tree.map(lambda v: v[0], elements))
    state, _, _ = scan_and_flush(batcher)(state, elements)
    kept = np.asarray(elements["x"])[np.asarray(elements["keep"])]
    np.testing.assert_allclose(float(jb.get_statistics(state).mean["x"]), kept.mean())
    state = jb.reset_statistics(state)
    assert isinstance(state, jb.FilterState)
    assert not bool(jb.has_statistics(state))
    with pytest.raises(ValueError, match="holds no statistics"):
        jb.get_statistics(jb.fixed_size(2).init({"x": jnp.zeros(())}))


def test_plain_stats_fn_is_per_batch():
    batcher = jb.with_statistics(jb.fixed_size(2), lambda b: jnp.sum(b.data["x"]))
    state = batcher.init({"x": jnp.zeros(())})
    assert float(jb.get_statistics(state)) == 0.0
    _, _, state = jb.collect(batcher, state, {"x": jnp.array([1.0, 2.0, 3.0])}, 2, flush=True)
    assert float(jb.get_statistics(state)) == 3.0  # the last batch: [3, pad 0]


def test_statistics_resume_and_vmap():
    batcher = stats_batcher(2)
    xs = jnp.asarray(np.random.default_rng(1).normal(size=(9, 2)).astype(np.float32))
    spec = {"x": jnp.zeros((2,), jnp.float32)}
    step = jax.jit(batcher.step)
    whole, _, _ = scan_and_flush(batcher)(batcher.init(spec), {"x": xs})
    state = batcher.init(spec)
    for i in range(4):
        state, _ = step(state, {"x": xs[i]})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.ckpt")
        jb.save_state(path, state)
        state = jb.load_state(path, jax.eval_shape(lambda: batcher.init(spec)))
    for i in range(4, 9):
        state, _ = step(state, {"x": xs[i]})
    state, _ = jax.jit(batcher.flush)(state)
    assert eqx.tree_equal(jb.get_statistics(state), jb.get_statistics(whole))
    # vmap over two streams: each equals its own run
    both = jax.tree.map(lambda a: jnp.stack([a, a]), batcher.init(spec))
    streams = {"x": jnp.stack([xs, xs[::-1]])}
    vstates, _, _ = jax.vmap(scan_and_flush(batcher))(both, streams)
    rev, _, _ = scan_and_flush(batcher)(batcher.init(spec), {"x": xs[::-1]})
    for k, single in enumerate((whole, rev)):
        got = jax.tree.map(lambda v, k=k: v[k], jb.get_statistics(vstates))
        np.testing.assert_allclose(got.mean["x"], jb.get_statistics(single).mean["x"], rtol=1e-6)
        np.testing.assert_allclose(got.m2["x"], jb.get_statistics(single).m2["x"], rtol=1e-5)


# --------------------------------------------------------------------------- errors


def test_bad_arguments_are_loud():
    with pytest.raises(ValueError, match="`batcher` must be a `jb.Batcher`"):
        jb.map_elements(lambda x: x, identity)
    with pytest.raises(ValueError, match="`predicate` must be a callable"):
        jb.filter_elements(jb.fixed_size(2), 3)
    with pytest.raises(ValueError, match="`stats_fn`"):
        jb.with_statistics(jb.fixed_size(2), 3)
    bad = jb.filter_elements(jb.fixed_size(2), lambda e: e.data["x"])
    state = bad.init({"x": jnp.zeros(())})
    with pytest.raises(TypeError, match="`predicate` must return a scalar bool"):
        bad.step(state, {"x": jnp.ones(())})
    with pytest.raises(TypeError, match=r"\['x'\]"):
        filtered(2).step(filtered(2).init({"keep": True, "x": 1.0}), {"keep": True, "x": 1})
    wrong = jb.Moments.of({"x": jnp.float32(0.0)}, {"x": jnp.float32(1.0)})
    with pytest.raises(TypeError, match="initial"):
        jb.with_statistics(jb.fixed_size(2), initial=wrong).init({"y": jnp.zeros(())})

"""`fixed_size`: against the reference, its bulk `feed` against stepping, and the
batcher laws (conservation, order, padding, exact resume, vmap, counters, traces, errors)."""

import dataclasses
import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from hypothesis import given, settings, strategies as st
from reference import (
    BATCH_SIZES,
    PAD_VALUES,
    append,
    batch_rows,
    empty_slots,
    make_stream,
    row_spec,
    slots,
    stats_of,
)

import jaxbatch as jb


@functools.cache
def _batcher(batch_size, drop_remainder, pad_value, pad_type):
    del pad_type  # in the cache key only: `True == 1` but they are different pad values
    return jb.fixed_size(batch_size, drop_remainder=drop_remainder, pad_value=pad_value)


def batcher_for(batch_size, drop_remainder=False, pad_value=0):
    """One batcher per configuration, so that jitted runs of it are compiled once."""
    return _batcher(batch_size, drop_remainder, pad_value, type(pad_value))


@functools.cache
def _jitted(batcher):
    return jax.jit(lambda s, e: jax.lax.scan(batcher.step, s, e)), jax.jit(batcher.flush)


def runners(batcher, use_jit):
    """`lax.scan` of `step`, and `flush`: jitted, or called as they are."""
    if use_jit:
        return _jitted(batcher)
    return functools.partial(jax.lax.scan, batcher.step), batcher.flush


def emit_rows(emits, i):
    """Step `i`'s emission from a scan's stacked `Emit`s, as a reference batch."""
    return batch_rows(jax.tree.map(lambda x: x[i], emits.batch))


def first_rows(tree, count):
    """The first `count` rows of every leaf, as NumPy."""
    return jax.tree.map(lambda x: np.asarray(x)[:count], tree)


def flush_all(flush, state, limit=3):
    """Call `flush` until it emits nothing; check each not-ready emission's mask is empty."""
    batches = []
    for _ in range(limit):
        state, emit = flush(state)
        if not bool(emit.ready):
            assert not np.asarray(emit.batch.valid_mask).any()
            return state, batches
        batches.append(batch_rows(emit.batch))
    raise AssertionError(f"`flush` still ready after {limit} calls")


configs = st.fixed_dictionaries(
    {
        "batch_size": st.sampled_from(BATCH_SIZES),
        "n": st.integers(0, 12),
        "drop_remainder": st.booleans(),
        "pad_value": st.sampled_from(PAD_VALUES),
        "kind": st.sampled_from(["dict", "element"]),
        "seed": st.integers(0, 2**16),
    }
)


def setup(config):
    batcher = batcher_for(config["batch_size"], config["drop_remainder"], config["pad_value"])
    stacked = make_stream(config["kind"], config["n"], config["seed"])
    return batcher, stacked, ref.expected_for(stacked, config)


# --------------------------------------------------------------------------- reference


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=8)
@given(config=configs)
def test_step_and_flush_match_reference(use_jit, config):
    batcher, stacked, expected = setup(config)
    scan, flush = runners(batcher, use_jit)
    state, emits = scan(batcher.init(row_spec(stacked)), stacked)
    emits = jax.device_get(emits)  # NumPy: indexing it compiles nothing

    ready = np.asarray(emits.ready)
    np.testing.assert_array_equal(ready, np.array(expected.ready, dtype=bool))
    stepped = []
    for i in range(config["n"]):
        rows, mask = emit_rows(emits, i)
        if ready[i]:
            stepped.append((rows, mask))
        else:  # a not-ready emission has an all-False mask
            assert not mask.any()
    # Before the flush: the last `buffered` elements wait, in order, in rows [0, count).
    count = int(state.count)
    assert count == expected.buffered
    tail = ref.reference_rows(stacked)[config["n"] - count :]
    buffer = ref.element_row(first_rows(state.buffer, count))
    if count:
        chex.assert_trees_all_equal(buffer, ref.stack_rows(tail, sorted(buffer)))

    state, flushed = flush_all(flush, state)
    chex.assert_trees_all_equal(stepped + flushed, expected.batches)
    assert len(flushed) <= 1  # law 3, and fixed_size has one buffer
    assert int(state.count) == 0
    assert stats_of(state) == expected.stats


@settings(max_examples=8)
@given(config=configs)
def test_conservation_order_and_padding_at_every_step(config):
    batcher, stacked, expected = setup(config)
    bs, n = config["batch_size"], config["n"]

    def body(state, element):
        state, emit = batcher.step(state, element)
        return state, (emit, state.stats, state.count)

    state, (emits, stats, counts) = jax.jit(lambda s, e: jax.lax.scan(body, s, e))(
        batcher.init(row_spec(stacked)), stacked
    )
    emits = jax.device_get(emits)

    def values(counter):  # per-step counter values as Python ints
        hi, lo = np.asarray(counter.hi, np.uint64), np.asarray(counter.lo, np.uint64)
        return [int(v) for v in (hi << np.uint64(32)) | lo]

    accepted, emitted = values(stats.accepted), values(stats.emitted)
    dropped = values(stats.dropped)
    for i in range(n):
        assert accepted[i] == i + 1
        assert accepted[i] == emitted[i] + dropped[i] + int(counts[i])
        assert 0 <= int(counts[i]) < bs

    state, flushed = flush_all(batcher.flush, state)
    final = stats_of(state)
    assert final["accepted"] == final["emitted"] + final["dropped"] + int(state.count) == n
    assert final["skipped"] == 0

    # Order: valid rows of the ready batches, concatenated, are the stream's prefix.
    batches = [emit_rows(emits, i) for i in range(n) if emits.ready[i]] + flushed
    valid = [r["['data']['i']"][m] for r, m in batches]
    got = np.concatenate(valid) if valid else np.zeros((0, 2), np.int32)
    data = stacked if config["kind"] == "dict" else stacked.data
    np.testing.assert_array_equal(got, np.asarray(data["i"])[: final["emitted"]])
    # Padding rows hold the pad value and are masked out; only the last batch has any.
    for k, (rows, mask) in enumerate(batches):
        assert mask.all() or k == len(batches) - 1
        for leaf in rows.values():
            pad = np.array(config["pad_value"], dtype=leaf.dtype)
            assert (leaf[~mask] == pad).all()
    assert final["padded"] == sum(int((~m).sum()) for _, m in batches)
    assert final["dropped"] == (n % bs if config["drop_remainder"] else 0)


# --------------------------------------------------------------------------- bulk feed


@functools.cache
def _bulk_and_by_step(batcher, flush, capacity):
    """Jitted: the same chunk through the bulk `feed` and through the step loop, each via
    `consume` (the consumer path) and `collect` (the materialising path)."""
    by_step = batcher._replace(feed=None)

    def run(state, chunk, carry):
        return {
            name: (jb.consume(b, append, carry, state, chunk, flush=flush),)
            + jb.collect(b, state, chunk, capacity, flush=flush)
            for name, b in (("bulk", batcher), ("step", by_step))
        }

    return jax.jit(run)


@pytest.mark.slow
@pytest.mark.parametrize("flush", [False, True])
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_bulk_feed_equals_stepping(batch_size, flush):
    batcher = jb.fixed_size(batch_size, pad_value=-3)
    spec = row_spec(make_stream("element", 1, 0))
    step, flush_fn = jax.jit(batcher.step), jax.jit(batcher.flush)
    # With every starting fill `r` below, these lengths reach totals 0..b-1 (no batch), b
    # exactly, b..2b-1 (one batch and a tail) and 3b-1..4b-2 (several).
    lengths = sorted({0, batch_size, 3 * batch_size - 1})
    for length in lengths:
        capacity = length // batch_size + 2
        both = _bulk_and_by_step(batcher, flush, capacity)
        carry = empty_slots(batcher, spec, capacity)
        for r in range(batch_size):  # every starting fill
            state = batcher.init(spec)
            prefix = make_stream("element", r, 1000 + 10 * length + r)
            for element in ref.unstack(prefix) if r else []:
                state, _ = step(state, element)
            assert int(state.count) == r
            chunk = make_stream("element", length, 5000 + 10 * length + r)
            runs = both(state, chunk, carry)
            ((out_bulk, n_bulk), s_bulk), stacked, n_coll, s_coll = runs["bulk"]
            ((out_step, n_step), s_step), stacked_step, n_coll_step, _ = runs["step"]
            want = (r + length) // batch_size + (flush and (r + length) % batch_size > 0)
            assert int(n_bulk) == int(n_step) == int(n_coll) == int(n_coll_step) == want
            chex.assert_trees_all_equal(out_bulk, out_step)  # the batches, in order
            # Materialised: the same batches in the first `want` slots, masks off after.
            chex.assert_trees_all_equal(slots(stacked, want), slots(out_step, want))
            chex.assert_trees_all_equal(slots(stacked_step, want), slots(out_step, want))
            assert not np.asarray(stacked.valid_mask)[want:].any()
            assert stats_of(s_bulk) == stats_of(s_step) == stats_of(s_coll)
            count = int(s_bulk.count)
            assert count == int(s_step.count) == (0 if flush else (r + length) % batch_size)
            chex.assert_trees_all_equal(
                first_rows(s_bulk.buffer, count), first_rows(s_step.buffer, count)
            )
            # And the buffered rows flush the same.
            _, flushed_bulk = flush_all(flush_fn, s_bulk)
            _, flushed_step = flush_all(flush_fn, s_step)
            chex.assert_trees_all_equal(flushed_bulk, flushed_step)


@pytest.mark.slow
def test_emissions_batch_past_count_is_masked_and_vmaps():
    batcher = jb.fixed_size(3)
    stream = make_stream("element", 7, 0)
    state = batcher.init(row_spec(stream))
    _, emissions = batcher.feed(state, stream, True)
    assert int(emissions.count) == 3
    stacked = emissions.stacked(5)
    by_vmap = jax.vmap(emissions.batch)(jnp.arange(5))
    chex.assert_trees_all_equal(stacked.valid_mask, by_vmap.valid_mask)
    chex.assert_trees_all_equal(slots(stacked, 3), slots(by_vmap, 3))
    assert not np.asarray(emissions.batch(jnp.int32(3)).valid_mask).any()


# --------------------------------------------------------------------------- resume


@pytest.mark.slow
@settings(max_examples=6)
@given(config=configs, data=st.data())
def test_resume_from_saved_state_is_bit_identical(tmp_path, config, data):
    batcher, stacked, _ = setup(config)
    n = config["n"]
    k = data.draw(st.integers(0, n), label="save after k steps")
    scan, flush = _jitted(batcher)
    spec = row_spec(stacked)
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], stacked)  # noqa: E731

    state, emits = scan(batcher.init(spec), stacked)
    final, flushed = flush_all(flush, state)

    saved, emits_a = scan(batcher.init(spec), part(0, k))
    path = tmp_path / "state.ckpt"
    jb.save_state(path, saved)
    del saved
    loaded = jb.load_state(path, like=jax.eval_shape(batcher.init, spec))
    resumed, emits_b = scan(loaded, part(k, n))
    resumed_final, resumed_flushed = flush_all(flush, resumed)

    both = jax.tree.map(lambda a, b: np.concatenate([a, b]), emits_a, emits_b)
    chex.assert_trees_all_equal(both, emits)  # every emission, ready or not
    chex.assert_trees_all_equal(resumed_flushed, flushed)
    chex.assert_trees_all_equal(resumed_final, final)
    chex.assert_trees_all_equal_dtypes(resumed_final, final)


# --------------------------------------------------------------------------- vmap


def _run(batcher, elements):
    return jax.lax.scan(batcher.step, batcher.init(row_spec(elements)), elements)


def _run_from(batcher, state, elements):
    state, emits = jax.lax.scan(batcher.step, state, elements)
    return batcher.flush(state), emits


@functools.cache
def _runs(batcher):
    """Per-batcher runs: plain, vmapped and jitted (built once, so compiled once)."""
    run, run_from = functools.partial(_run, batcher), functools.partial(_run_from, batcher)
    return {
        "separate": (jax.jit(run), jax.jit(run_from)),
        False: (jax.vmap(run), jax.vmap(run_from)),
        True: (jax.jit(jax.vmap(run)), jax.jit(jax.vmap(run_from))),
    }


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
def test_vmap_over_two_streams_equals_separate_runs(use_jit):
    batcher = batcher_for(3, False, -1)
    streams = [make_stream("element", 7, seed) for seed in (11, 22)]
    run, run_from = _runs(batcher)["separate"]
    vrun, vrun_from = _runs(batcher)[use_jit]

    both = jax.tree.map(lambda a, b: np.stack([a, b]), *streams)
    together = vrun(both)
    for i, stream in enumerate(streams):
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], together), run(stream))

    # Streams that start from different fills (so the write position is batched too).
    spec = row_spec(streams[0])
    starts = [batcher.init(spec), batcher.step(batcher.init(spec), ref.unstack(streams[1])[0])[0]]
    assert [int(s.count) for s in starts] == [0, 1]
    together = vrun_from(jax.tree.map(lambda a, b: np.stack([a, b]), *jax.device_get(starts)), both)
    for i, (start, stream) in enumerate(zip(starts, streams)):
        chex.assert_trees_all_equal(
            jax.tree.map(lambda x, i=i: x[i], together), run_from(start, stream)
        )


# --------------------------------------------------------------------------- counters


def test_counter_add_carries_into_the_high_word():
    assert int(jb.Counter.of(2**32 - 1).add(1)) == 2**32
    assert int(jb.Counter.of(2**32 - 1).add(2**32 - 1)) == 2**33 - 2
    assert int(jb.Counter.of(2**33 + 5).add(7)) == 2**33 + 12
    assert int(jb.Counter.of(2**31 - 1).add(jnp.array(True))) == 2**31
    add = jax.jit(lambda c, n: c.add(n))
    assert int(add(jb.Counter.of(2**32 - 2), jnp.int32(5))) == 2**32 + 3
    assert int(add(jb.Counter.of(2**40), jnp.int32(0))) == 2**40
    c = jb.Counter.of(2**32 - 1)
    assert c.lo.dtype == c.hi.dtype == jnp.uint32


def test_counter_sum_carries():
    a, b = jb.Counter.of(2**32 - 1), jb.Counter.of(2**32 + 5)
    assert int(a + b) == 2**33 + 4
    assert int(jb.Counter.of(3) + jb.Counter.of(4)) == 7
    assert int(jax.jit(lambda x, y: x + y)(a, b)) == 2**33 + 4
    assert int(jb.Counter.of(2**31) + jb.Counter.of(2**31)) == 2**32
    assert int(jb.Counter.of(2**64 - 1)) == 2**64 - 1
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="`value`"):
            jb.Counter.of(bad)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_stats_stay_correct_past_2_to_the_32(use_jit, drop_remainder):
    batcher = jb.fixed_size(2, drop_remainder=drop_remainder)
    stream = make_stream("dict", 7, 3)
    start = {
        "accepted": 2**32 - 3,
        "skipped": 2**32 - 1,
        "dropped": 2**32 - 1,
        "emitted": 2**31 - 2,
        "batches": 2**32 - 2,
        "padded": 2**32 - 1,
    }
    state = batcher.init(row_spec(stream))
    state = eqx.tree_at(
        lambda s: s.stats, state, jb.Stats(**{k: jb.Counter.of(v) for k, v in start.items()})
    )
    scan, flush = runners(batcher, use_jit)
    state, _ = scan(state, stream)
    state, _ = flush(state)
    expected = dict(start)
    expected["accepted"] += 7
    expected["emitted"] += 6 if drop_remainder else 7
    expected["batches"] += 3 if drop_remainder else 4
    expected["dropped"] += 1 if drop_remainder else 0
    expected["padded"] += 0 if drop_remainder else 1
    assert stats_of(state) == expected
    assert expected["accepted"] > 2**32 and expected["emitted"] > 2**31
    ops = {k: int(v) for k, v in jb.operation_stats(state).items()}
    assert ops["applied_count"] == expected["accepted"]
    assert ops["skipped_count"] == expected["skipped"]
    assert ops["received_count"] == expected["accepted"] + expected["skipped"]
    assert ops["batch_count"] == expected["batches"]


def test_operation_stats_and_reset():
    batcher = jb.fixed_size(3, drop_remainder=True)
    stream = make_stream("element", 8, 4)
    state, _ = jax.lax.scan(batcher.step, batcher.init(row_spec(stream)), stream)
    state, _ = batcher.flush(state)
    ops = jb.operation_stats(state)
    assert {k: int(v) for k, v in ops.items()} == {
        "applied_count": 8,
        "skipped_count": 0,
        "received_count": 8,
        "dropped_count": 2,
        "emitted_count": 6,
        "batch_count": 2,
        "padded_count": 0,
    }
    jitted = jax.jit(jb.operation_stats)(state)
    assert {k: int(v) for k, v in jitted.items()} == {k: int(v) for k, v in ops.items()}

    reset = jb.reset_operation_stats(state)
    assert all(int(v) == 0 for v in jb.operation_stats(reset).values())
    chex.assert_trees_all_equal(reset.buffer, state.buffer)
    assert int(reset.count) == int(state.count)
    # Counting resumes from zero.
    reset, _ = batcher.step(reset, ref.unstack(stream)[0])
    assert int(jb.operation_stats(reset)["applied_count"]) == 1


# --------------------------------------------------------------------------- traces


def test_step_flush_and_feed_trace_once_per_shape():
    chex.clear_trace_counter()
    batcher = jb.fixed_size(3)
    stream = make_stream("element", 8, 0)
    step = jax.jit(chex.assert_max_traces(batcher.step, n=1))
    flush = jax.jit(chex.assert_max_traces(batcher.flush, n=1))
    feed = jax.jit(chex.assert_max_traces(lambda s, e: batcher.feed(s, e)[0], n=1))
    state = batcher.init(row_spec(stream))
    for element in ref.unstack(stream):  # new values, same shapes: no retrace
        state, _ = step(state, element)
    for _ in range(2):
        state, _ = flush(state)
    for seed in (1, 2):
        state = feed(state, make_stream("element", 8, seed))
    # The check does see a new shape (so the passes above mean something).
    other = {"x": jnp.zeros(2)}
    with pytest.raises(AssertionError, match="traced > 1"):
        step(batcher.init(other), other)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("batch_size", [0, -1, True, 2.5, "3", None])
def test_bad_batch_size_raises_at_the_factory(batch_size):
    with pytest.raises(ValueError, match="`batch_size`") as info:
        jb.fixed_size(batch_size)
    assert repr(batch_size) in str(info.value) and "positive int" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"drop_remainder": 1}, "`drop_remainder`"),
        ({"drop_remainder": None}, "`drop_remainder`"),
        ({"pad_value": "0"}, "`pad_value`"),
        ({"pad_value": None}, "`pad_value`"),
        ({"pad_value": jnp.zeros(())}, "`pad_value`"),
    ],
)
def test_bad_options_raise_at_the_factory(kwargs, name):
    with pytest.raises(ValueError, match=name):
        jb.fixed_size(2, **kwargs)


def _good_element():
    return jb.Element(
        data={"i": np.zeros(2, np.int32), "f": np.zeros(3, np.float32)},
        state={"s": np.float32(0)},
        metadata=jb.Metadata(index=0, epoch=0),
    )


BAD_ELEMENTS = {
    "shape": (
        lambda e: e.update_data({"f": np.zeros(4, np.float32)}),
        ["data['f']", "(4,)", "(3,)"],
    ),
    "dtype": (
        lambda e: e.update_data({"i": np.zeros(2, np.float32)}),
        ["data['i']", "float32", "int32"],
    ),
    "state shape": (
        lambda e: e.update_state({"s": np.zeros(1, np.float32)}),
        ["state['s']", "(1,)", "()"],
    ),
    "extra leaf": (
        lambda e: e.update_data({"g": np.zeros(1, np.float32)}),
        ["data['g']", "unexpected"],
    ),
    "missing leaf": (
        lambda e: e.replace(data={"i": np.zeros(2, np.int32)}),
        ["data['f']", "missing"],
    ),
    "no metadata": (lambda e: e.with_metadata(None), ["metadata", "missing"]),
}


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_ELEMENTS))
def test_bad_element_raises_type_error_naming_the_leaf(use_jit, case):
    batcher = jb.fixed_size(2)
    state = batcher.init(_good_element())
    corrupt, words = BAD_ELEMENTS[case]
    bad = corrupt(_good_element())
    step = jax.jit(batcher.step) if use_jit else batcher.step
    with pytest.raises(TypeError) as info:
        step(state, bad)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert "element" in str(info.value)

    # The bulk path checks the same, naming `elements[i]`.
    stacked = jax.tree.map(lambda x: jnp.stack([x, x, x]), bad)
    with pytest.raises(TypeError) as info:
        (jax.jit(batcher.feed) if use_jit else batcher.feed)(state, stacked)
    assert all(w in str(info.value) for w in words), str(info.value)
    assert "elements[i]" in str(info.value)


def test_good_element_passes_the_checks():
    batcher = jb.fixed_size(2)
    state = batcher.init(_good_element())
    state, emit = batcher.step(state, _good_element())
    assert int(state.count) == 1 and not bool(emit.ready)


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize("kind", ["dict", "element"])
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_batch_spec_is_the_shape_of_every_emit(kind, drop_remainder):
    batcher = jb.fixed_size(3, drop_remainder=drop_remainder)
    stream = make_stream(kind, 4, 0)
    spec = jb.batch_spec(batcher, row_spec(stream))
    assert spec.batch_size == 3

    def shapes(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]

    state = batcher.init(row_spec(stream))
    emits = []
    for element in ref.unstack(stream):
        state, emit = batcher.step(state, element)
        emits.append(emit)
    state, emit = batcher.flush(state)
    emits.append(emit)
    assert [bool(e.ready) for e in emits] == [False, False, True, False, not drop_remainder]
    for emit in emits:
        assert shapes(emit.batch) == shapes(spec)
        assert emit.ready.shape == () and emit.ready.dtype == jnp.bool_
    # The spec from an example element equals the spec from its ShapeDtypeStructs.
    example = jax.tree.map(lambda x: x[0], stream)
    assert shapes(jb.batch_spec(batcher, example)) == shapes(spec)
    assert shapes(jb.element_spec(example)) == shapes(jb.element_spec(row_spec(stream)))


def test_factory_result_is_a_batcher_with_feed():
    batcher = jb.fixed_size(4)
    assert isinstance(batcher, jb.Batcher)
    assert isinstance(batcher.feed, jb.FeedFn)
    generic = jb.Batcher(batcher.init, batcher.step, batcher.flush)
    assert generic.feed is None
    assert dataclasses.is_dataclass(batcher.init(_good_element()))


@pytest.mark.parametrize(
    ("pad_value", "dtype"), [(-1, jnp.uint8), (0.5, jnp.int32), (300, jnp.int8), (2, jnp.bool_)]
)
def test_pad_value_that_a_leaf_cannot_hold_is_refused_at_init(pad_value, dtype):
    batcher = jb.fixed_size(2, pad_value=pad_value)
    with pytest.raises(ValueError, match=r"`pad_value` .* leaf `element.data\['x'\]`"):
        batcher.init({"x": jnp.zeros((), dtype)})


def test_pad_value_that_fits_every_leaf_is_accepted():
    batcher = jb.fixed_size(2, pad_value=-1.0)
    state = batcher.init({"x": jnp.zeros((), jnp.int8), "y": jnp.zeros(())})
    state, _ = batcher.step(state, {"x": jnp.int8(3), "y": jnp.float32(1)})
    _, emit = batcher.flush(state)
    assert emit.batch.data["x"].tolist() == [3, -1]

"""Bucketing (`bucket_by`, `bucket_by_length`, `by_bucket`): against the plain-Python
reference, with and without `jit`; `jb.scan` with `by_bucket` (one trace per bucket shape);
`batch_all`, `batch_spec`, exact resume, `vmap`, counters and errors."""

import functools

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_bucket as refb
from hypothesis import given, settings, strategies as st
from reference import batch_rows, element_row, row_spec, stats_of, unstack

import jaxbatch as jb
from jaxbatch.testing import check_batcher

MAX_LEN = 7
# (boundaries, batch_sizes): one bucket, then several of different sizes.
LENGTH_CONFIGS = [((4,), (2,)), ((2, 5), (1, 3)), ((1, 3, 6), (2, 1, 3)), ((3, 7), (2, 2))]
FEATURES = ("tokens", "emb")
FLAT_LENGTH = "['data']['n']"
FLAT_FEATURES = ["['data']['tokens']", "['data']['emb']"]


# --------------------------------------------------------------------------- streams


def seq_stream(kind, lengths, seed):
    """Sequences of the given lengths, padded to `MAX_LEN` with junk (the batcher must set
    positions past the length to the pad value), as NumPy-backed trees."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    data = {
        "tokens": rng.integers(1, 100, size=(n, MAX_LEN), dtype=np.int32),
        "emb": rng.standard_normal((n, MAX_LEN, 2)).astype(np.float32),
        "n": np.asarray(lengths, np.int32).reshape(n),
        "label": rng.standard_normal(n).astype(np.float32),
    }
    if kind == "dict":
        return data
    state = {"s": rng.standard_normal(n).astype(np.float32)}
    index = np.arange(seed, seed + n, dtype=np.int32)
    return jb.Element(data=data, state=state, metadata=jb.Metadata(index=index, epoch=1))


def keyed_stream(kind, keys, seed):
    """Elements with an int32 bucket key `data['k']`, as NumPy-backed trees."""
    rng = np.random.default_rng(seed)
    n = len(keys)
    data = {
        "x": rng.integers(-50, 50, size=(n, 2), dtype=np.int32),
        "k": np.asarray(keys, np.int32).reshape(n),
    }
    if kind == "dict":
        return data
    index = np.arange(seed, seed + n, dtype=np.int32)
    return jb.Element(data=data, metadata=jb.Metadata(index=index, epoch=0))


def rows_of(stacked):
    return [element_row(row) for row in unstack(jax.device_get(stacked))] if _n(stacked) else []


def _n(stacked):
    return np.shape(jax.tree.leaves(stacked)[0])[0]


def like_of(stacked):
    return element_row(jax.tree.map(lambda x: np.zeros(np.shape(x)[1:], x.dtype), stacked))


# --------------------------------------------------------------------------- batchers


@functools.cache
def length_batcher(config, too_long="error", pad_value=0, drop_remainder=False, pad_type=int):
    del pad_type  # in the cache key only: `True == 1` but they are different pad values
    boundaries, batch_sizes = config
    return jb.bucket_by_length(
        boundaries,
        batch_sizes,
        length="n",
        features=FEATURES,
        too_long=too_long,
        pad_value=pad_value,
        drop_remainder=drop_remainder,
    )


def key_of(element):
    return element.data["k"]


@functools.cache
def key_batcher(batch_sizes, pad_value=0, drop_remainder=False):
    return jb.bucket_by(key_of, batch_sizes, pad_value=pad_value, drop_remainder=drop_remainder)


def length_reference(stacked, config, too_long="error", pad_value=0, drop_remainder=False):
    return refb.bucket_by_length(
        rows_of(stacked),
        list(config[0]),
        list(config[1]),
        length=FLAT_LENGTH,
        features=FLAT_FEATURES,
        too_long=too_long,
        pad_value=pad_value,
        drop_remainder=drop_remainder,
        like=like_of(stacked),
    )


@functools.cache
def _jitted(batcher):
    return jax.jit(lambda s, e: jax.lax.scan(batcher.step, s, e)), jax.jit(batcher.flush)


def runners(batcher, use_jit):
    if use_jit:
        return _jitted(batcher)
    return functools.partial(jax.lax.scan, batcher.step), batcher.flush


def check_bucketed(bucketed, ready):
    """Law: only the ready bucket's batch has valid rows; return `(bucket, batch)` or None."""
    masks = [np.asarray(b.valid_mask) for b in bucketed.batches]
    if not ready:
        assert not any(m.any() for m in masks)
        return None
    bucket = int(bucketed.bucket)
    for i, m in enumerate(masks):
        assert i == bucket or not m.any()
    return bucket, batch_rows(bucketed.batches[bucket])


def flush_all(flush, state, limit=6):
    """`flush` until it emits nothing: each call at most one batch (law 3)."""
    out = []
    for _ in range(limit):
        state, emit = flush(state)
        got = check_bucketed(jax.device_get(emit.batch), bool(emit.ready))
        if got is None:
            return state, out
        out.append(got)
    raise AssertionError(f"`flush` still ready after {limit} calls")


def run_and_check(batcher, stacked, expected, use_jit):
    """Step through `stacked`, flush, and compare every emission and the stats."""
    scan, flush = runners(batcher, use_jit)
    state, emits = scan(batcher.init(row_spec(stacked)), stacked)
    emits = jax.device_get(emits)
    stepped = []
    for i in range(_n(stacked)):
        got = check_bucketed(jax.tree.map(lambda x, i=i: x[i], emits.batch), emits.ready[i])
        assert (got and got[0]) == expected.ready[i] or (got is None and expected.ready[i] is None)
        if got is not None:
            stepped.append(got)
    assert [int(c) for c in state.counts] == expected.buffered
    state, flushed = flush_all(flush, state)
    assert [b for b, _ in flushed] == sorted(b for b, _ in flushed)  # bucket order
    chex.assert_trees_all_equal(stepped + flushed, expected.batches)
    assert not np.asarray(state.counts).any()
    assert stats_of(state) == expected.stats
    s = expected.stats
    assert s["accepted"] == s["emitted"] + s["dropped"]
    return state


# --------------------------------------------------------------------------- reference


@st.composite
def length_configs(draw, too_long=None):
    """A bucket_by_length configuration and a stream, lengths often at the boundaries."""
    too_long = draw(st.sampled_from(["error", "skip"])) if too_long is None else too_long
    config = draw(st.sampled_from(LENGTH_CONFIGS))
    boundaries = config[0]
    top = MAX_LEN if too_long == "skip" else boundaries[-1]
    near = sorted({v for b in boundaries for v in (b - 1, b, b + 1) if 0 <= v <= top})
    length = st.one_of(st.sampled_from(near), st.integers(0, top))
    return {
        "config": config,
        "too_long": too_long,
        "lengths": draw(st.lists(length, max_size=10)),
        "pad_value": draw(st.sampled_from([0, -1, 7.0, True])),
        "drop_remainder": draw(st.booleans()),
        "kind": draw(st.sampled_from(["dict", "element"])),
        "seed": draw(st.integers(0, 2**16)),
    }


# Few examples: each one compiles its own program (2 CPU cores shared by the suite).
@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=5)
@given(c=length_configs())
def test_bucket_by_length_matches_reference(use_jit, c):
    options = {"pad_value": c["pad_value"], "drop_remainder": c["drop_remainder"]}
    too_long = c["too_long"]
    batcher = length_batcher(c["config"], too_long, **options, pad_type=type(c["pad_value"]))
    stacked = seq_stream(c["kind"], c["lengths"], c["seed"])
    expected = length_reference(stacked, c["config"], too_long, **options)
    run_and_check(batcher, stacked, expected, use_jit)


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=3)
@given(
    batch_sizes=st.sampled_from([(1,), (2, 3), (3, 1, 2)]),
    data=st.data(),
    drop_remainder=st.booleans(),
    kind=st.sampled_from(["dict", "element"]),
    seed=st.integers(0, 2**16),
)
def test_bucket_by_matches_reference(use_jit, batch_sizes, data, drop_remainder, kind, seed):
    keys = data.draw(st.lists(st.integers(0, len(batch_sizes) - 1), max_size=10), label="keys")
    batcher = key_batcher(batch_sizes, -2, drop_remainder)
    stacked = keyed_stream(kind, keys, seed)
    expected = refb.bucket_by(
        rows_of(stacked),
        keys,
        list(batch_sizes),
        like=like_of(stacked),
        pad_value=-2,
        drop_remainder=drop_remainder,
    )
    run_and_check(batcher, stacked, expected, use_jit)


def test_rows_are_cut_to_their_bucket_and_padded_past_their_length():
    batcher = length_batcher(((2, 5), (1, 3)), pad_value=-1)
    step, flush = jax.jit(batcher.step), jax.jit(batcher.flush)
    stacked = seq_stream("dict", [2, 3], 0)
    state = batcher.init(row_spec(stacked))
    state, emit = step(state, jax.tree.map(lambda x: x[0], stacked))
    assert bool(emit.ready) and int(emit.batch.bucket) == 0
    chex.assert_shape(emit.batch.batches[0].data["tokens"], (1, 2))
    chex.assert_shape(emit.batch.batches[1].data["emb"], (3, 5, 2))
    np.testing.assert_array_equal(emit.batch.batches[0].data["tokens"][0], stacked["tokens"][0, :2])
    state, _ = step(state, jax.tree.map(lambda x: x[1], stacked))
    _, emit = flush(state)
    tokens = np.asarray(emit.batch.batches[1].data["tokens"])
    np.testing.assert_array_equal(tokens[0], list(stacked["tokens"][1, :3]) + [-1, -1])
    assert (tokens[1:] == -1).all()  # padding rows
    assert (np.asarray(emit.batch.batches[1].data["emb"])[0, 3:] == -1.0).all()
    assert int(state.stats.padded) == 0 and int(flush(state)[0].stats.padded) == 2


# --------------------------------------------------------------------------- consuming


def _counting_consumer(traces):
    """A consumer that sums valid tokens per bucket shape and counts its own traces."""

    def consume(carry, batch):
        shape = batch.data["tokens"].shape
        traces.append(shape)
        tokens = jnp.where(batch.valid_mask[:, None], batch.data["tokens"], 0)
        total, rows, seen = carry
        width = jnp.int32(shape[1])
        return total + jnp.sum(tokens), rows + batch.num_valid, seen + width

    return consume


def test_scan_with_by_bucket_traces_each_bucket_shape_once():
    config = ((1, 3, 6), (2, 1, 3))
    batcher = length_batcher(config)
    traces = []
    consumer = jb.by_bucket(_counting_consumer(traces))
    carry = (jnp.int32(0), jnp.int32(0), jnp.int32(0))
    lengths = [1, 6, 3, 0, 2, 5, 4, 1, 6]
    stacked = seq_stream("element", lengths, 3)
    total, state = jb.scan(batcher, consumer, carry, stacked)
    assert sorted(traces) == sorted([(2, 1), (1, 3), (3, 6)])  # once per bucket shape
    # Called again with new values (and a rebuilt, equal consumer): no retrace.
    stacked2 = seq_stream("element", lengths[::-1], 4)
    jb.scan(batcher, jb.by_bucket(consumer.fns), carry, stacked2)
    assert len(traces) == 3

    expected = length_reference(stacked, config)
    want_tokens = sum(
        int(np.sum(rows["['data']['tokens']"][m])) for _, (rows, m) in expected.batches
    )
    want_width = sum(config[0][b] for b, _ in expected.batches)
    assert [int(x) for x in total] == [want_tokens, len(lengths), want_width]
    assert stats_of(state) == expected.stats


def test_by_bucket_traces_once_per_distinct_consumer_and_shape():
    stacked = keyed_stream("dict", [0, 1, 1, 0, 2, 2, 2, 0], 5)
    for batch_sizes, fns, want in [
        ((2, 2, 2), None, 1),  # one consumer, one shape: no switch at all
        ((2, 3, 2), None, 2),
        ((2, 2, 2), "two", 2),  # two consumers over one shape
    ]:
        traces = []

        def count(carry, batch, traces=traces):
            traces.append(batch.valid_mask.shape)
            return carry + jnp.sum(jnp.where(batch.valid_mask, batch.data["x"][:, 0], 0))

        def other(carry, batch, traces=traces):
            traces.append(batch.valid_mask.shape)
            return carry + jnp.sum(jnp.where(batch.valid_mask, batch.data["x"][:, 0], 0))

        consumer = jb.by_bucket(count if fns is None else [count, other, count])
        total, _ = jb.scan(key_batcher(batch_sizes), consumer, jnp.int32(0), stacked)
        assert len(traces) == want, (batch_sizes, fns, traces)
        assert int(total) == int(np.sum(stacked["x"][:, 0]))  # every element consumed once


def test_by_bucket_checks_its_consumers():
    with pytest.raises(ValueError, match="`fns`"):
        jb.by_bucket([])
    with pytest.raises(ValueError, match="`fns`"):
        jb.by_bucket([lambda c, b: c, 3])
    batcher = key_batcher((1, 2))
    stacked = keyed_stream("dict", [0], 0)
    with pytest.raises(ValueError, match="`fns` has 3 consumers but the batcher has 2"):
        jb.scan(batcher, jb.by_bucket([lambda c, b: c] * 3), jnp.int32(0), stacked)
    assert jb.by_bucket(key_of) == jb.by_bucket(key_of)  # a stable static argument


def test_when_ready_and_consume_with_by_bucket():
    batcher = key_batcher((1, 2))
    stacked = keyed_stream("dict", [1, 0, 1], 0)
    consumer = jb.by_bucket([lambda c, b: c + 1, lambda c, b: c + 10])
    carry, state = jax.jit(
        lambda s, e: jb.consume(batcher, consumer, jnp.int32(0), s, e, flush=True)
    )(batcher.init(row_spec(stacked)), stacked)
    assert int(carry) == 11 and int(state.stats.batches) == 2


# --------------------------------------------------------------------------- drivers


@pytest.mark.slow
@pytest.mark.parametrize("drop_remainder", [False, True])
def test_batch_all_stacks_the_bucketed_batches(drop_remainder):
    config = ((2, 5), (1, 3))
    batcher = length_batcher(config, drop_remainder=drop_remainder)
    stacked = seq_stream("element", [4, 1, 5, 2, 0, 3], 8)
    expected = length_reference(stacked, config, drop_remainder=drop_remainder)
    out, count = jb.batch_all(batcher, stacked, max_batches=6)
    out = jax.device_get(out)
    assert int(count) == len(expected.batches)
    chex.assert_shape(out.bucket, (6,))
    chex.assert_shape(out.batches[0].data["tokens"], (6, 1, 2))
    chex.assert_shape(out.batches[1].data["emb"], (6, 3, 5, 2))
    got = []
    for k in range(6):
        slot = jax.tree.map(lambda x, k=k: x[k], out)
        ready = k < int(count)
        result = check_bucketed(slot, ready)
        if ready:
            got.append(result)
    chex.assert_trees_all_equal(got, expected.batches)

    with pytest.raises(ValueError, match="`max_batches`"):
        jb.batch_all(batcher, stacked)  # room cannot come from one batch size
    with pytest.raises(ValueError, match="`max_batches`"):
        jb.batch_all(batcher, stacked, max_batches=int(count) - 1)


def test_batch_spec_is_the_bucketed_of_batch_specs():
    batcher = length_batcher(((2, 5), (1, 3)))
    spec = jb.batch_spec(batcher, row_spec(seq_stream("element", [1], 0)))
    assert isinstance(spec, jb.Bucketed)
    assert spec.batch_sizes == (1, 3)
    assert spec.bucket.shape == () and spec.bucket.dtype == jnp.int32
    assert [b.data["tokens"].shape for b in spec.batches] == [(1, 2), (3, 5)]
    assert [b.data["label"].shape for b in spec.batches] == [(1,), (3,)]
    assert spec.batches[1].metadata.index.shape == (3,)


# --------------------------------------------------------------------------- resume, vmap


@pytest.mark.slow
@settings(max_examples=3)
@given(c=length_configs("skip"), data=st.data())
def test_resume_from_saved_state_is_bit_identical(tmp_path, c, data):
    batcher = length_batcher(c["config"], "skip", 0, c["drop_remainder"])
    stacked = seq_stream("element", c["lengths"], c["seed"])
    n = len(c["lengths"])
    k = data.draw(st.integers(0, n), label="save after k steps")
    scan, flush = _jitted(batcher)
    spec = row_spec(stacked)
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], stacked)  # noqa: E731

    state, emits = scan(batcher.init(spec), stacked)
    final, flushed = flush_all(flush, state)

    saved, emits_a = scan(batcher.init(spec), part(0, k))
    path = tmp_path / "state.ckpt"
    jb.save_state(path, saved)
    loaded = jb.load_state(path, like=jax.eval_shape(batcher.init, spec))
    resumed, emits_b = scan(loaded, part(k, n))
    resumed_final, resumed_flushed = flush_all(flush, resumed)

    both = jax.tree.map(lambda a, b: np.concatenate([a, b]), emits_a, emits_b)
    chex.assert_trees_all_equal(both, emits)  # every emission, ready or not
    chex.assert_trees_all_equal(resumed_flushed, flushed)
    chex.assert_trees_all_equal(resumed_final, final)


@pytest.mark.slow
def test_vmap_over_two_streams_equals_separate_runs():
    batcher = length_batcher(((2, 5), (1, 3)), too_long="skip")
    streams = [
        seq_stream("element", lengths, seed)
        for lengths, seed in (([1, 5, 7, 3, 2, 4], 1), ([4, 2, 2, 5, 0, 1], 2))
    ]

    def run(elements):
        state, emits = jax.lax.scan(batcher.step, batcher.init(row_spec(elements)), elements)
        return batcher.flush(state), emits

    vrun, run = jax.jit(jax.vmap(run)), jax.jit(run)
    together = vrun(jax.tree.map(lambda a, b: np.stack([a, b]), *streams))
    for i, stream in enumerate(streams):
        chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], together), run(stream))
    (states, _), _ = together
    assert [int(s) for s in jax.device_get(states.stats.skipped.lo)] == [1, 0]


def test_stats_stay_correct_past_2_to_the_32():
    batcher = key_batcher((2, 3))
    stacked = keyed_stream("dict", [0, 1, 0, 1, 1, 0], 3)
    state = batcher.init(row_spec(stacked))
    start = 2**32 - 2
    state = eqx.tree_at(lambda s: s.stats, state, jb.Stats(*[jb.Counter.of(start)] * 6))
    state, _ = _jitted(batcher)[0](state, stacked)
    state, _ = flush_all(_jitted(batcher)[1], state)
    got = stats_of(state)
    assert got["accepted"] == start + 6 and got["emitted"] == start + 6
    assert got["batches"] == start + 3 and got["padded"] == start + 1


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"boundaries": [3, 2]}, "`boundaries`.*not sorted"),
        ({"boundaries": [2, 2]}, "`boundaries`.*duplicated"),
        ({"boundaries": [0, 2]}, "`boundaries`"),
        ({"boundaries": []}, "`boundaries`"),
        ({"boundaries": 4}, "`boundaries`"),
        ({"boundaries": [2.0, 4]}, "`boundaries`"),
        ({"batch_sizes": [2]}, "`batch_sizes` must have one entry per boundary"),
        ({"batch_sizes": [2, 0]}, "`batch_sizes`"),
        ({"batch_sizes": [2, True]}, "`batch_sizes`"),
        ({"too_long": "clip"}, "`too_long`"),
        ({"features": ["tokens", "n"]}, "`features` must not hold the `length`"),
        ({"features": ["tokens", "tokens"]}, "`features`"),
        ({"pad_value": "x"}, "`pad_value`"),
        ({"drop_remainder": 1}, "`drop_remainder`"),
    ],
)
def test_bucket_by_length_refuses_bad_configuration(kwargs, match):
    args = {"boundaries": [2, 4], "batch_sizes": [2, 2], "length": "n", "features": FEATURES}
    with pytest.raises(ValueError, match=match):
        jb.bucket_by_length(**{**args, **kwargs})


def test_bucket_by_refuses_bad_configuration():
    with pytest.raises(ValueError, match="`key_fn`"):
        jb.bucket_by(3, [2])
    with pytest.raises(ValueError, match="`batch_sizes`"):
        jb.bucket_by(key_of, [])
    with pytest.raises(ValueError, match="`batch_sizes`"):
        jb.bucket_by(key_of, [2, -1])
    with pytest.raises(ValueError, match="`drop_remainder`"):
        jb.bucket_by(key_of, [2], drop_remainder="yes")


def test_init_refuses_a_spec_that_does_not_fit():
    batcher = length_batcher(((2, 5), (1, 3)))
    spec = row_spec(seq_stream("dict", [1], 0))
    short = {**spec, "tokens": jax.ShapeDtypeStruct((4,), jnp.int32)}
    with pytest.raises(ValueError, match=r"max_len 4.*last boundary 5"):
        batcher.init(short)
    with pytest.raises(ValueError, match="`length` key 'n'"):
        batcher.init({k: v for k, v in spec.items() if k != "n"})
    with pytest.raises(ValueError, match="`length` leaf"):
        batcher.init({**spec, "n": jax.ShapeDtypeStruct((), jnp.float32)})
    with pytest.raises(ValueError, match="`features` key 'emb'"):
        batcher.init({k: v for k, v in spec.items() if k != "emb"})
    with pytest.raises(ValueError, match="`pad_value`"):
        length_batcher(((2, 5), (1, 3)), pad_value=-1).init(
            {**spec, "tokens": jax.ShapeDtypeStruct((MAX_LEN,), jnp.uint8)}
        )


def test_step_refuses_an_element_unlike_the_spec():
    batcher = length_batcher(((2, 5), (1, 3)))
    stacked = seq_stream("dict", [1], 0)
    state = batcher.init(row_spec(stacked))
    element = jax.tree.map(lambda x: x[0], stacked)
    with pytest.raises(TypeError, match=r"element.*\['tokens'\].*dtype"):
        batcher.step(state, {**element, "tokens": element["tokens"].astype(np.int16)})
    with pytest.raises(TypeError, match=r"element.*\['tokens'\].*shape"):
        batcher.step(state, {**element, "tokens": element["tokens"][:5]})
    with pytest.raises(TypeError, match="missing leaves"):
        batcher.step(state, {k: v for k, v in element.items() if k != "label"})
    keyed = key_batcher((1, 2))
    kstate = keyed.init(row_spec(keyed_stream("dict", [0], 0)))
    with pytest.raises(TypeError, match=r"element.*\['x'\]"):
        keyed.step(kstate, {"x": np.zeros(3, np.int32), "k": np.int32(0)})
    floaty = jb.bucket_by(lambda e: e.data["x"][0].astype(jnp.float32), [1])
    with pytest.raises(TypeError, match="`key_fn` must return a scalar integer"):
        fstate = floaty.init(row_spec(keyed_stream("dict", [0], 0)))  # its own state
        floaty.step(fstate, {"x": np.zeros(2, np.int32), "k": np.int32(0)})


@pytest.mark.parametrize("use_jit", [False, True])
def test_run_time_errors(use_jit):
    wrap = jax.jit if use_jit else (lambda f: f)
    batcher = length_batcher(((2, 5), (1, 3)))
    stacked = seq_stream("dict", [6], 0)
    state = batcher.init(row_spec(stacked))
    element = jax.tree.map(lambda x: x[0], stacked)
    with pytest.raises(RuntimeError, match="longer than the last boundary 5"):
        jax.block_until_ready(wrap(batcher.step)(state, element))
    with pytest.raises(RuntimeError, match="negative `length`"):
        jax.block_until_ready(wrap(batcher.step)(state, {**element, "n": np.int32(-1)}))
    keyed = key_batcher((1, 2))
    kstate = keyed.init(row_spec(keyed_stream("dict", [0], 0)))
    for bad in (2, -1):
        with pytest.raises(RuntimeError, match=r"key outside \[0, 2\)"):
            e = {"x": np.zeros(2, np.int32), "k": np.int32(bad)}
            jax.block_until_ready(wrap(keyed.step)(kstate, e))


# --------------------------------------------------------------------------- the law checker


@pytest.mark.slow
def test_bucket_by_passes_check_batcher():
    batcher = jb.bucket_by(lambda e: e.data["k"], (2, 3))
    stream = {"k": jnp.array([0, 1, 1, 0, 1, 0, 0], jnp.int32), "x": jnp.arange(7.0)}
    report = check_batcher(batcher, stream, fifo=False, resume_steps=3)
    assert report.num_batches == 3 and report.stats["emitted"] == 7


@pytest.mark.slow
def test_bucket_by_length_passes_check_batcher():
    # Rows are the elements cut to their bucket's bound; past its length a sequence is
    # padding (zeros), as the batcher writes it.
    lengths = np.array([3, 1, 5, 2, 4, 1, 5], np.int32)
    tokens = np.arange(1, 7 * MAX_LEN + 1, dtype=np.int32).reshape(7, MAX_LEN)
    tokens = np.where(np.arange(MAX_LEN) < lengths[:, None], tokens, 0)
    stream = {"tokens": jnp.asarray(tokens), "n": jnp.asarray(lengths)}
    batcher = jb.bucket_by_length((2, 5), (2, 2), length="n", features=("tokens",))
    report = check_batcher(batcher, stream, fifo=False, resume_steps=3)
    assert report.stats["emitted"] == 7

"""`shuffle`: the batcher laws (`check_batcher`), the exact order of a pure-Python reference,
permutation (every element exactly once), keys (same key same order, `vmap` over keys),
the bulk `feed` against stepping, exact resume through a checkpoint, and configuration
errors."""

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

CONFIGS = [(3, 4, False), (2, 5, True), (4, 2, False)]  # (batch_size, buffer_size, drop)


@functools.cache
def batcher_for(batch_size, buffer_size, drop_remainder=False, pad_value=0):
    return jb.shuffle(batch_size, buffer_size, drop_remainder=drop_remainder, pad_value=pad_value)


def stats_of(stats) -> dict[str, int]:
    return {name: int(getattr(stats, name)) for name in ref.COUNTERS}


@functools.cache
def runner(batcher, num_flushes):
    """Jitted: `init(key)`, `lax.scan(step)` over the stream, then `num_flushes` flushes."""

    def run(key, elements):
        state = batcher.init(jax.tree.map(lambda x: x[0], elements), key=key)
        state, emits = jax.lax.scan(batcher.step, state, elements)
        state, flushes = jax.lax.scan(
            lambda s, _: batcher.flush(s), state, None, length=num_flushes
        )
        return emits, flushes, state.stats

    return jax.jit(run)


@functools.cache
def empty_runner(batcher, num_flushes):
    """`runner` for an empty stream (the spec cannot come from its first element)."""

    def run(key):
        state = batcher.init({"x": jax.ShapeDtypeStruct((), jnp.int32)}, key=key)
        state, emits = jax.lax.scan(batcher.step, state, {"x": jnp.zeros((0,), jnp.int32)})
        state, flushes = jax.lax.scan(
            lambda s, _: batcher.flush(s), state, None, length=num_flushes
        )
        return emits, flushes, state.stats

    return jax.jit(run)


def run_config(config, n, key, *, pad_value=0):
    """The stream `100, 101, ...` (n elements) through `shuffle(*config)`, on the host."""
    batch_size, buffer_size, drop = config
    batcher = batcher_for(batch_size, buffer_size, drop, pad_value)
    num_flushes = buffer_size // batch_size + 2
    if n == 0:
        return jax.device_get(empty_runner(batcher, num_flushes)(key))
    elements = {"x": jnp.arange(n, dtype=jnp.int32) + 100}
    return jax.device_get(runner(batcher, num_flushes)(key, elements))


def ready_batches(emits, flushes):
    """(ready per step, the ready batches as lists of input indices, None for padding)."""
    out = []
    step_ready = [bool(r) for r in np.asarray(emits.ready)]
    for stacked, flush in ((emits, False), (flushes, True)):
        for i, ready in enumerate(np.asarray(stacked.ready)):
            mask = np.asarray(stacked.batch.valid_mask[i])
            if not ready:
                assert not mask.any(), "a not-ready emission has valid rows"
                continue
            x = np.asarray(stacked.batch.data["x"][i])
            out.append([int(v) - 100 if m else None for v, m in zip(x, mask)])
            if flush:
                assert mask[: mask.sum()].all(), "padding rows come last"
    return step_ready, out


# --------------------------------------------------------------------------- the laws


@pytest.mark.slow
def test_check_batcher():
    key = jax.random.key(0)
    stream = {"x": jnp.arange(10, dtype=jnp.int32), "y": jnp.arange(20.0).reshape(10, 2)}
    report = check_batcher(
        batcher_for(3, 4),
        stream,
        key=key,
        fifo=False,
        reference=ref.shuffle(3, 4, key),
        resume_steps=2,
    )
    assert report.num_batches == 4 and report.stats["padded"] == 2
    assert {"reference", "resume", "vmap", "one trace"} <= set(report.checks)


@pytest.mark.slow
@settings(max_examples=8)
@given(
    config=st.sampled_from(CONFIGS),
    n=st.sampled_from([0, 7, 13]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_and_is_a_permutation(config, n, seed):
    batch_size, buffer_size, drop = config
    key = jax.random.key(seed)
    emits, flushes, stats = run_config(config, n, key)
    step_ready, batches = ready_batches(emits, flushes)
    expected = ref.shuffle_order(n, batch_size, buffer_size, key, drop_remainder=drop)
    assert step_ready == expected.ready
    assert batches == expected.batches
    assert stats_of(stats) == expected.stats
    # Every element exactly once (only the dropped tail may be missing).
    out = [i for b in batches for i in b if i is not None]
    assert len(out) == len(set(out))
    assert len(out) + expected.stats["dropped"] == n
    assert set(out) <= set(range(n))
    if not drop:
        assert sorted(out) == list(range(n))


def test_padding_uses_pad_value():
    emits, flushes, _ = run_config((4, 2, False), 7, jax.random.key(1), pad_value=-1)
    last = [i for i, r in enumerate(np.asarray(flushes.ready)) if r][-1]
    x = np.asarray(flushes.batch.data["x"][last])
    mask = np.asarray(flushes.batch.valid_mask[last])
    assert mask.tolist() == [True, True, True, False]
    assert x[3] == -1


# --------------------------------------------------------------------------- keys


def test_same_key_same_order_other_keys_other_orders():
    config = (3, 4, False)
    a = ready_batches(*run_config(config, 13, jax.random.key(7))[:2])[1]
    b = ready_batches(*run_config(config, 13, jax.random.key(7))[:2])[1]
    c = ready_batches(*run_config(config, 13, jax.random.key(8))[:2])[1]
    assert a == b
    assert a != c


def test_raw_uint32_key_is_the_same_as_the_typed_key():
    batcher = batcher_for(3, 4)
    spec = {"x": jnp.int32(0)}
    typed = batcher.init(spec, key=jax.random.key(3))
    raw = batcher.init(spec, key=jax.random.PRNGKey(3))
    assert np.array_equal(jax.random.key_data(typed.key), jax.random.key_data(raw.key))


def test_vmap_over_keys_gives_independent_orders():
    batcher = batcher_for(3, 4)
    run = runner(batcher, 4 // 3 + 2)
    keys = jax.random.split(jax.random.key(11), 4)
    elements = {"x": jnp.arange(13, dtype=jnp.int32) + 100}
    emits, flushes, stats = jax.device_get(
        jax.jit(jax.vmap(run, in_axes=(0, None)))(keys, elements)
    )
    orders = []
    for k in range(4):
        one = jax.tree.map(lambda x, k=k: x[k], (emits, flushes))
        _, batches = ready_batches(*one)
        alone = ready_batches(*run_config((3, 4, False), 13, keys[k])[:2])[1]
        assert batches == alone  # each lane is the run with its own key
        orders.append(tuple(i for b in batches for i in b))
    assert len(set(orders)) == 4


def test_full_buffer_gives_uniform_permutations():
    """With `buffer_size >= n` the flush alone orders the stream: a uniform permutation,
    so each input lands in each output position about equally often."""
    n, trials = 6, 600
    batcher = batcher_for(3, 6)
    run = runner(batcher, 6 // 3 + 2)
    keys = jax.random.split(jax.random.key(5), trials)
    elements = {"x": jnp.arange(n, dtype=jnp.int32) + 100}
    _, flushes, _ = jax.device_get(jax.jit(jax.vmap(run, in_axes=(0, None)))(keys, elements))
    x = np.asarray(flushes.batch.data["x"])[:, :2].reshape(trials, n) - 100
    counts = np.zeros((n, n), int)
    for row in x:
        assert sorted(row.tolist()) == list(range(n))
        counts[row, np.arange(n)] += 1
    expected = trials / n  # 100 per (input, position)
    assert counts.min() > 0.6 * expected and counts.max() < 1.4 * expected, counts


# --------------------------------------------------------------------------- bulk feed


BULK_LENGTHS = (0, 3, 13)  # chunks: empty, shorter than most buffers, longer than every one
BULK_SPEC = {"x": jax.ShapeDtypeStruct((), jnp.int32), "y": jax.ShapeDtypeStruct((2,), jnp.float32)}


def bulk_elements(n, start):
    """`n` elements numbered from `start`: an int leaf and a float vector leaf."""
    x = jnp.arange(start, start + n, dtype=jnp.int32)
    return {"x": x, "y": jnp.stack([x, -x], axis=1).astype(jnp.float32)}


def _append(carry, batch):
    out, count = carry
    out = jax.tree.map(lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, count, 0), out, batch)
    return out, count + 1


@functools.cache
def _jitted(batcher):
    return jax.jit(batcher.step), jax.jit(batcher.flush)


@functools.cache
def _bulk(batcher, flush, capacity):
    """Jitted: a chunk through the bulk `feed`, via `jb.consume` (the consumer's one call
    site) and `jb.collect` (materialised). One compile per chunk length."""

    def run(state, chunk):
        spec = jax.eval_shape(lambda s: batcher.flush(s)[1].batch, state)
        room = jax.tree.map(lambda s: jnp.zeros((capacity, *s.shape), s.dtype), spec)
        consumed = jb.consume(batcher, _append, (room, jnp.int32(0)), state, chunk, flush=flush)
        return consumed, jb.collect(batcher, state, chunk, capacity, flush=flush)

    return jax.jit(run)


def stepped(batcher, state, chunk, n, flush):
    """The chunk one `step` at a time, then `flush` until nothing is ready if `flush`:
    the ready batches and the state."""
    step, flush_fn = _jitted(batcher)
    batches = []
    for i in range(n):
        state, emit = step(state, jax.tree.map(lambda x, i=i: x[i], chunk))
        if emit.ready:
            batches.append(emit.batch)
    while flush:
        state, emit = flush_fn(state)
        if not emit.ready:
            break
        batches.append(emit.batch)
    return jax.device_get(batches), state


def first_slots(tree, k):
    return jax.tree.map(lambda x: np.asarray(x)[:k], tree)


def assert_same_state(got, want):
    """Equal where the state is specified: counters, key, fill, and the filled rows."""
    assert stats_of(got.stats) == stats_of(want.stats)
    assert int(got.filled) == int(want.filled)
    assert int(got.count) == int(want.count)
    np.testing.assert_array_equal(jax.random.key_data(got.key), jax.random.key_data(want.key))
    chex.assert_trees_all_equal(
        first_slots(got.buffer, int(want.filled)), first_slots(want.buffer, int(want.filled))
    )
    chex.assert_trees_all_equal(
        first_slots(got.batch, int(want.count)), first_slots(want.batch, int(want.count))
    )


@pytest.mark.slow
@settings(max_examples=6)
@given(
    config=st.sampled_from(CONFIGS),
    n=st.sampled_from(BULK_LENGTHS),
    flush=st.booleans(),
    prefix=st.integers(0, 10),
    flushed=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bulk_feed_equals_stepping(config, n, flush, prefix, flushed, seed):
    """From a state part-way through (buffer filling, full, a partial batch, or part
    drained by a `flush`), a chunk through the bulk `feed` (via `jb.consume` and
    `jb.collect`) gives the batches of stepping it, in order, and its state: Stats, key,
    fill, batch count and the filled rows."""
    batch_size, buffer_size, drop = config
    batcher = batcher_for(batch_size, buffer_size, drop, -7)
    step, flush_fn = _jitted(batcher)
    state = batcher.init(BULK_SPEC, key=jax.random.key(seed))
    before = bulk_elements(prefix, 1000)
    for i in range(prefix):
        state, _ = step(state, jax.tree.map(lambda x, i=i: x[i], before))
    if flushed:  # a flush mid-stream leaves a part-drained buffer and a new key
        state, _ = flush_fn(state)
    capacity = (batch_size - 1 + buffer_size + max(BULK_LENGTHS)) // batch_size + 1
    chunk = bulk_elements(n, 0)
    want, s_step = stepped(batcher, state, chunk, n, flush)
    ((out, k_bulk), s_bulk), (stacked, k_coll, s_coll) = _bulk(batcher, flush, capacity)(
        state, chunk
    )
    k = len(want)
    assert int(k_bulk) == int(k_coll) == k
    for slot, batch in enumerate(want):
        chex.assert_trees_all_equal(jax.tree.map(lambda x, s=slot: x[s], out), batch)
        chex.assert_trees_all_equal(jax.tree.map(lambda x, s=slot: x[s], stacked), batch)
    assert not np.asarray(stacked.valid_mask)[k:].any()
    assert_same_state(s_bulk, s_step)
    assert_same_state(s_coll, s_step)
    if flush:
        assert int(s_bulk.filled) == int(s_bulk.count) == 0


def test_bulk_feed_batches_past_count_are_masked_and_vmap():
    batcher = batcher_for(3, 4)
    state = batcher.init(BULK_SPEC, key=jax.random.key(2))

    @jax.jit
    def batches(state, elements):
        emissions = batcher.feed(state, elements, True)[1]
        ks = jnp.arange(7)
        one_by_one = [emissions.batch(k) for k in ks]
        return emissions.count, jax.vmap(emissions.batch)(ks), one_by_one

    count, stacked, one_by_one = batches(state, bulk_elements(13, 0))
    assert int(count) == 5
    for k, one in enumerate(one_by_one):
        chex.assert_trees_all_equal(one, jax.tree.map(lambda x, k=k: x[k], stacked))
    assert not np.asarray(stacked.valid_mask)[5:].any()
    rows = np.asarray(stacked.data["x"])[np.asarray(stacked.valid_mask)]
    assert sorted(rows.tolist()) == list(range(13))


@pytest.mark.slow
def test_scan_with_the_bulk_feed_traces_the_consumer_once():
    """`jb.scan` builds every batch (steps and drain) at the consumer's one call site,
    and continuing a stream from the returned state reuses the program."""
    batcher, traces = batcher_for(3, 4), {"n": 0}

    def consumer(total, batch):
        traces["n"] += 1
        return total + jnp.sum(jnp.where(batch.valid_mask, batch.data["x"], 0))

    key, zero = jax.random.key(4), jnp.int32(0)
    total, state = jb.scan(batcher, consumer, zero, bulk_elements(13, 0), key=key)
    assert traces["n"] == 1 and int(total) == sum(range(13))
    assert int(state.filled) == int(state.count) == 0
    traces["n"] = 0
    state = batcher.init(BULK_SPEC, key=key)
    total, state = jb.scan(batcher, consumer, zero, bulk_elements(6, 0), state=state, flush=False)
    total, state = jb.scan(batcher, consumer, total, bulk_elements(6, 6), state=state, flush=False)
    assert traces["n"] == 1
    # 12 in, 4 buffered, the other 8 in two batches and the partial one (2 rows).
    assert int(state.filled) == 4 and int(state.count) == 2
    assert int(total) + sum(int(v) for v in state.buffer.data["x"][:4]) + sum(
        int(v) for v in state.batch.data["x"][:2]
    ) == sum(range(12))


# --------------------------------------------------------------------------- resume


def _collect(count_and_rows, batch):
    count, rows = count_and_rows
    rows = jax.lax.dynamic_update_index_in_dim(rows, batch.data["x"], count, 0)
    return count + 1, rows


@pytest.mark.slow
def test_resume_through_a_checkpoint_is_bit_identical(tmp_path):
    batcher, key = batcher_for(3, 4), jax.random.key(21)
    stream = {"x": jnp.arange(14, dtype=jnp.int32)}
    start = (jnp.int32(0), jnp.full((8, 3), -1, jnp.int32))
    whole, whole_state = jb.scan(batcher, _collect, start, stream, key=key)

    first = jax.tree.map(lambda x: x[:6], stream)
    rest = jax.tree.map(lambda x: x[6:], stream)
    carry, state = jb.scan(batcher, _collect, start, first, key=key, flush=False)
    path = os.path.join(tmp_path, "shuffle.ckpt")
    jb.save_state(path, state)
    like = jax.eval_shape(lambda: batcher.init({"x": jnp.int32(0)}, key=key))
    loaded = jb.load_state(path, like)
    assert jnp.issubdtype(loaded.key.dtype, jax.dtypes.prng_key)
    carry, end_state = jb.scan(batcher, _collect, carry, rest, state=loaded)
    assert int(carry[0]) == int(whole[0]) == 5
    np.testing.assert_array_equal(np.asarray(carry[1]), np.asarray(whole[1]))
    assert stats_of(end_state.stats) == stats_of(whole_state.stats)


# --------------------------------------------------------------------------- errors


def test_init_without_key_says_a_key_is_needed():
    with pytest.raises(ValueError, match=r"needs a PRNG key.*jax\.random\.key\(0\)"):
        batcher_for(3, 4).init({"x": jnp.int32(0)})
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jb.batch_all(batcher_for(3, 4), {"x": jnp.arange(4)})
    with pytest.raises(ValueError, match="shape"):
        batcher_for(3, 4).init({"x": jnp.int32(0)}, key=jax.random.split(jax.random.key(0), 2))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((0, 4), {}, "`batch_size` must be a positive int, got 0"),
        ((2, 0), {}, "`buffer_size` must be a positive int, got 0"),
        ((2, 2.0), {}, "`buffer_size` must be a positive int"),
        ((True, 2), {}, "`batch_size`"),
        ((2, 2), {"drop_remainder": 1}, "`drop_remainder` must be a bool"),
        ((2, 2), {"pad_value": "x"}, "`pad_value` must be a Python number"),
    ],
)
def test_bad_configuration(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        jb.shuffle(*args, **kwargs)


def test_pad_value_must_fit_the_dtype():
    with pytest.raises(ValueError, match="`pad_value` 300"):
        jb.shuffle(2, 2, pad_value=300).init({"x": jnp.uint8(0)}, key=jax.random.key(0))

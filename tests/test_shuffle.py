"""`shuffle`: the batcher laws (`check_batcher`), the exact order of a pure-Python reference,
permutation (every element exactly once), keys (same key same order, `vmap` over keys),
exact resume through a checkpoint, and configuration errors."""

import functools
import os

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


# --------------------------------------------------------------------------- resume


def _collect(count_and_rows, batch):
    count, rows = count_and_rows
    rows = jax.lax.dynamic_update_index_in_dim(rows, batch.data["x"], count, 0)
    return count + 1, rows


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

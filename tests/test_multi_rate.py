"""`multi_rate` against its pure-Python reference, and the batcher laws that apply to it.

A multi-rate row is a window of samples from several elements, so `check_batcher` follows
samples (`units=sample`, read out of the windows by `batch_units=window_samples`) through
every path. The laws are also checked here directly: reference equality (ready flags,
batches, masks, Stats), conservation, jit vs no jit, one trace, `vmap`, exact resume through
`jb.save_state` / `jb.load_state`, wide counters, and errors.
"""

import functools
import os
import tempfile

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_multi_rate as ref
from hypothesis import given, settings, strategies as st

import jaxbatch as jb
from jaxbatch.testing import check_batcher

RATES = (3, 1)
N = 24  # one stream length for every test: one compile


@functools.cache
def batcher_for(batch_size, capacity):
    return jb.multi_rate(batch_size, RATES, capacity=capacity, pad_value=-1)


def make_stream(channels):
    channels = np.asarray(channels, np.int32)
    n = len(channels)
    a = (np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 0.5) * np.float32(1.0)
    b = np.arange(n, dtype=np.int32) * 10
    return {"channel": jnp.asarray(channels), "payload": ({"a": jnp.asarray(a)}, jnp.asarray(b))}


def spec():
    return jax.tree.map(lambda x: x[0], make_stream([0, 1]))


@functools.cache
def runner(batcher, use_jit):
    def run(state, elements):
        state, emits = jax.lax.scan(batcher.step, state, elements)
        after_steps = state
        state, last = batcher.flush(state)
        return after_steps, state, emits, last

    return jax.jit(run) if use_jit else run


def host_stream(elements):
    """The stream as the reference sees it: `(channel, payload leaves per channel)`."""
    host = jax.tree.map(np.asarray, elements)
    out = []
    for i in range(len(host["channel"])):
        payloads = [[leaf[i] for leaf in jax.tree.leaves(p)] for p in host["payload"]]
        out.append((int(host["channel"][i]), payloads))
    return out


def like():
    return [[np.asarray(leaf) for leaf in jax.tree.leaves(p)] for p in spec()["payload"]]


def as_ref_batch(batch):
    data = [[np.asarray(leaf) for leaf in jax.tree.leaves(d)] for d in batch.data]
    masks = [np.asarray(m) for m in batch.states["mask"]]
    return data, masks, np.asarray(batch.valid_mask)


def assert_same_batch(got, want, where):
    (gd, gm, gv), (wd, wm, wv) = got, want
    np.testing.assert_array_equal(gv, wv, err_msg=f"{where}: valid_mask")
    for c in range(len(RATES)):
        np.testing.assert_array_equal(gm[c], wm[c], err_msg=f"{where}: mask of channel {c}")
        for g, w in zip(gd[c], wd[c]):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w, err_msg=f"{where}: data of channel {c}")


def counts(state):
    names = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")
    return {k: int(getattr(state.stats, k)) for k in names}


def run_and_compare(batch_size, capacity, channels, use_jit=True):
    batcher = batcher_for(batch_size, capacity)
    elements = make_stream(channels)
    after_steps, state, emits, last = runner(batcher, use_jit)(batcher.init(spec()), elements)
    want = ref.multi_rate(host_stream(elements), batch_size, RATES, capacity, like(), -1)
    ready = [bool(r) for r in np.asarray(emits.ready)]
    assert ready == want.ready
    got = [as_ref_batch(jax.tree.map(lambda x, i=i: x[i], emits.batch)) for i in range(len(ready))]
    for i, r in enumerate(ready):
        if not r:
            assert not got[i][2].any() and not any(m.any() for m in got[i][1])
    got = [g for g, r in zip(got, ready) if r]
    if bool(last.ready):
        got.append(as_ref_batch(last.batch))
    else:
        assert not np.asarray(last.batch.valid_mask).any()
    assert len(got) == len(want.batches)
    for k, (g, w) in enumerate(zip(got, want.batches)):
        assert_same_batch(g, w, f"batch {k}")
    final = counts(state)
    assert final == want.stats
    # conservation: every sample came out in a valid window, or was dropped or skipped
    assert final["accepted"] + final["skipped"] == len(channels)
    assert final["accepted"] == final["emitted"] + final["dropped"]
    # flush drains in one call
    _, again = batcher.flush(state)
    assert not bool(again.ready)
    return after_steps, state, emits, last


# --------------------------------------------------------------------------- reference


def interleaved(num_windows):
    """A well-behaved stream: per window, 3 samples of channel 0 and 1 of channel 1."""
    return ([0, 0, 1, 0] * num_windows)[:N] + [0] * max(0, N - 4 * num_windows)


@pytest.mark.parametrize("use_jit", [True, False])
def test_interleaved_stream_matches_reference(use_jit):
    _, state, emits, last = run_and_compare(2, 4, interleaved(6), use_jit)
    assert int(state.stats.batches) == 3
    assert int(state.stats.skipped) == 0


def test_layout_and_batch_spec():
    batcher = batcher_for(2, 4)
    got = jb.batch_spec(batcher, spec())
    assert got.valid_mask.shape == (2,)
    assert got.data[0]["a"].shape == (2, 3, 2) and got.data[0]["a"].dtype == jnp.float32
    assert got.data[1].shape == (2, 1) and got.data[1].dtype == jnp.int32
    assert [m.shape for m in got.states["mask"]] == [(2, 3), (2, 1)]


def test_windows_hold_consecutive_samples_in_arrival_order():
    _, _, emits, _ = run_and_compare(2, 2, interleaved(6))
    first = int(np.argmax(np.asarray(emits.ready)))
    b = np.asarray(emits.batch.data[1][first])  # channel 1: its samples are stream rows 2, 6
    np.testing.assert_array_equal(b, [[20], [60]])
    a = np.asarray(emits.batch.data[0]["a"][first])[..., 0]  # channel 0: rows 0,1,3 | 4,5,7
    np.testing.assert_array_equal(a, np.array([[0, 1, 3], [4, 5, 7]]) * 2 + 0.5)


def test_overflow_is_skipped_and_flush_keeps_partial_windows():
    # channel 1 is late: channel 0 overflows its 2 windows (6 samples), then flush
    channels = [0] * 10 + [1] + [0] * 3 + [5, -1] + [1] * 8
    _, state, _, last = run_and_compare(2, 2, channels)
    assert int(state.stats.skipped) >= 4 + 2  # 4 overflowed samples, 2 bad channel ids


def test_flush_partial_batch():
    channels = [0, 0, 0, 1, 0, 0] + [9] * (N - 6)  # one complete window, then 2 samples
    _, state, _, last = run_and_compare(2, 4, channels)
    assert bool(last.ready)
    np.testing.assert_array_equal(np.asarray(last.batch.valid_mask), [True, False])
    np.testing.assert_array_equal(
        np.asarray(last.batch.states["mask"][0]), [[True, True, True], [True, True, False]]
    )
    assert int(state.stats.dropped) == 2 and int(state.stats.padded) == 1


@settings(max_examples=15)
@given(
    config=st.sampled_from([(1, 1), (2, 2), (2, 3)]),
    channels=st.lists(st.sampled_from([0, 0, 0, 1, 1, 2]), min_size=N, max_size=N),
)
def test_random_streams_match_reference(config, channels):
    run_and_compare(*config, channels)


# --------------------------------------------------------------------------- laws


def test_one_trace_per_shape():
    batcher = jb.multi_rate(2, RATES)
    step = jax.jit(chex.assert_max_traces(batcher.step, n=1))
    flush = jax.jit(chex.assert_max_traces(batcher.flush, n=1))
    state = batcher.init(spec())
    elements = make_stream(interleaved(4))
    for i in range(8):
        state, _ = step(state, jax.tree.map(lambda x, i=i: x[i], elements))
    state, _ = flush(state)
    state, _ = flush(state)


def test_exact_resume_through_checkpoint():
    batcher = batcher_for(2, 4)
    elements = make_stream(interleaved(5))
    step, flush = jax.jit(batcher.step), jax.jit(batcher.flush)
    rows = [jax.tree.map(lambda x, i=i: x[i], elements) for i in range(N)]

    def run(state, start):
        out = []
        for row in rows[start:]:
            state, emit = step(state, row)
            out.append(emit)
        state, emit = flush(state)
        return state, out + [emit]

    whole_state, whole = run(batcher.init(spec()), 0)
    for t in (5, 11):
        state = batcher.init(spec())
        for row in rows[:t]:
            state, _ = step(state, row)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.ckpt")
            jb.save_state(path, state)
            state = jb.load_state(path, jax.eval_shape(lambda: batcher.init(spec())))
        state, rest = run(state, t)
        for g, w in zip(rest, whole[t:]):
            assert eqx.tree_equal(g.ready, w.ready)
            if bool(w.ready):
                assert eqx.tree_equal(g.batch, w.batch)
        assert eqx.tree_equal(state.stats, whole_state.stats)


@pytest.mark.slow
def test_vmap_over_streams():
    batcher = batcher_for(2, 4)
    a = make_stream(interleaved(6))
    b = make_stream([1, 0, 0, 0] * 6)
    both = jax.tree.map(lambda x, y: jnp.stack([x, y]), a, b)
    states = jax.tree.map(lambda x: jnp.stack([x, x]), batcher.init(spec()))
    outputs = jax.jit(jax.vmap(runner(batcher, False)))(states, both)
    for k, stream in enumerate((a, b)):
        single = runner(batcher, True)(batcher.init(spec()), stream)
        assert eqx.tree_equal(jax.tree.map(lambda x, k=k: x[k], outputs), single)


def test_wide_counters_and_drivers():
    batcher = batcher_for(2, 4)
    elements = make_stream(interleaved(6))
    start = 2**32 - 2
    wide = jb.Stats(*[jb.Counter.of(start)] * 6)
    state = eqx.tree_at(lambda s: s.stats, batcher.init(spec()), wide)
    _, state, _, _ = runner(batcher, True)(state, elements)
    _, plain, _, _ = runner(batcher, True)(batcher.init(spec()), elements)
    assert {k: v - start for k, v in counts(state).items()} == counts(plain)
    batches, count = jb.batch_all(batcher, elements, max_batches=4)
    assert int(count) == 3 and batches.data[0]["a"].shape == (4, 2, 3, 2)


def sample(element):
    """The unit a `multi_rate` element brings: its sample, under its channel; None for a
    channel id out of range (refused on arrival: counted as skipped)."""
    c = int(element["channel"])
    return [(c, element["payload"][c]) if 0 <= c < len(RATES) else None]


def window_samples(batch):
    """The samples a ready batch emits: per channel (a lane: the order within a channel is
    kept, not across channels), those in valid windows whose slot mask says they hold one."""
    valid = np.flatnonzero(batch.valid_mask)
    return {
        c: [
            (c, jax.tree.map(lambda x, w=w, s=s: x[w, s], batch.data[c]))
            for w in valid
            for s in range(rate)
            if batch.states["mask"][c][w, s]
        ]
        for c, rate in enumerate(RATES)
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch_size", "capacity", "channels", "stats"),
    [
        # channel 0 overflows while channel 1 is late, a bad channel id; flush: no
        # complete window, the buffered samples dropped
        (1, 2, [0, 0, 1, 0] + [0] * 7 + [7, 1, 0, 0], {"skipped": 2, "dropped": 5}),
        # a full batch, an overflow, a bad id; flush: one valid window, one partial
        (2, 2, [0, 0, 1, 0, 0, 0, 1, 0] + [0] * 7 + [-1, 1], {"skipped": 2, "dropped": 3}),
    ],
)
def test_check_batcher_follows_the_samples(batch_size, capacity, channels, stats):
    report = check_batcher(
        batcher_for(batch_size, capacity),
        make_stream(channels),
        units=sample,
        batch_units=window_samples,
        resume_steps=3,
    )
    assert {k: report.stats[k] for k in stats} == stats
    assert report.stats["emitted"] == len(channels) - 2 - stats["dropped"]
    assert {"order", "jit", "scan", "batch_all", "feed", "vmap", "bad input"} <= set(report.checks)


def test_samples_keep_their_order_within_a_channel_not_across():
    def one_lane(batch):  # every channel's samples in one list: claims order across channels
        return [unit for lane in window_samples(batch).values() for unit in lane]

    elements = make_stream([0, 0, 1, 0, 0, 0, 1, 0])  # window 0: samples 0, 1, 3 and 2
    quick = {"check_jit": False, "check_vmap": False, "resume_steps": 0}
    with pytest.raises(AssertionError, match=r"Law 5 .*element 2's unit 0 came out after elem"):
        check_batcher(batcher_for(1, 2), elements, units=sample, batch_units=one_lane, **quick)


# --------------------------------------------------------------------------- errors


def test_bad_configuration_is_loud():
    with pytest.raises(ValueError, match="`batch_size` must be a positive int, got 0"):
        jb.multi_rate(0, (1, 2))
    with pytest.raises(ValueError, match="`rates` must be a non-empty sequence"):
        jb.multi_rate(2, ())
    with pytest.raises(ValueError, match="`rates` must hold positive ints"):
        jb.multi_rate(2, (1, 0))
    with pytest.raises(ValueError, match="`capacity` must be an int >= `batch_size`"):
        jb.multi_rate(2, (1, 2), capacity=1)
    with pytest.raises(ValueError, match="`pad_value`"):
        jb.multi_rate(2, (1, 2), pad_value="x")


def test_bad_elements_are_loud():
    batcher = batcher_for(2, 4)
    with pytest.raises(TypeError, match="one payload slot per channel"):
        batcher.init({"x": jnp.zeros(())})
    with pytest.raises(TypeError, match="tuple of 2 payloads"):
        batcher.init({"channel": jnp.int32(0), "payload": (jnp.zeros(()),)})
    with pytest.raises(TypeError, match="integer scalar"):
        batcher.init({"channel": jnp.float32(0), "payload": (jnp.zeros(()), jnp.zeros(()))})
    state = batcher.init(spec())
    bad = jax.tree.map(lambda x: x, spec())
    bad["payload"] = ({"a": jnp.zeros(3, jnp.float32)}, bad["payload"][1])
    with pytest.raises(TypeError, match=r"\['a'\]"):
        batcher.step(state, bad)


def test_scan_traces_the_consumer_once_per_program():
    from reference import consumer_traces

    first, second = make_stream(interleaved(6)), make_stream(interleaved(5))
    traces = consumer_traces(batcher_for(2, 4), first, second)
    assert traces == {"scan": 1, "scan, continued": 1}

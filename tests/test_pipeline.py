"""`jb.pipeline`: positions -> order -> stages -> batcher, checked as a batcher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb
from jaxbatch.testing import check_batcher

KEY = jax.random.key(0)
N = 5
# `v` rows are 32 bytes: payload, gathered after batching; `x` travels with the proxy.
DATA = {
    "x": jnp.arange(N, dtype=jnp.int32),
    "v": jnp.arange(N * 8, dtype=jnp.float32).reshape(N, 8),
}
HOST = jax.tree.map(np.asarray, DATA)

L = 5
LENS = np.array([3, 5, 1, 4, 2, 5, 2], np.int32)
TOKS = (np.arange(7 * L).reshape(7, L) + 1).astype(np.int32)
CORPUS = {"tokens": jnp.asarray(TOKS), "length": jnp.asarray(LENS)}
LENGTHS = {"tokens": "length"}


def row_units(order, size, positions, host=HOST):
    """`units` for `check_batcher`: the source row each position reads (None: skipped)."""
    where = jb.order_rows(order, size, KEY, positions)
    rows, valid = np.asarray(where.row), np.asarray(where.valid)

    def units(p):
        i = int(np.asarray(p))
        if not valid[i]:
            return [None]
        return [jb.Element(data=jax.tree.map(lambda x: x[rows[i]], host))]

    return units


def sequence_units(order, positions):
    where = jb.order_rows(order, len(LENS), KEY, positions)
    rows, valid = np.asarray(where.row), np.asarray(where.valid)

    def units(p):
        i = int(np.asarray(p))
        return [TOKS[rows[i], : LENS[rows[i]]]] if valid[i] else [None]

    return units


def packed_sequences(batch):
    """The sequences in the valid rows of a packed batch, in order."""
    out = []
    seg, tokens = np.asarray(batch.data["tokens_segment_ids"]), np.asarray(batch.data["tokens"])
    for r in range(seg.shape[0]):
        if batch.valid_mask[r]:
            out += [tokens[r][seg[r] == s] for s in range(1, seg[r].max() + 1)]
    return out


@pytest.mark.slow  # every path of the law checker: 18 s; the other pipeline laws stay fast
def test_fixed_size_pipeline_passes_check_batcher():
    # one epoch of 5 in 7 positions: the chunk holds positions to skip. In order (the
    # shuffle's compile time is paid by the pack test): every path, vmap included.
    order = jb.epochs(num_epochs=1, shuffle=False)
    pipe = jb.pipeline(DATA, jb.fixed_size(3), order=order)
    positions = jnp.arange(7, dtype=jnp.int32)
    report = check_batcher(
        pipe, positions, key=KEY, units=row_units(order, N, positions), resume_steps=1
    )
    assert report.stats["skipped"] == 2 and report.stats["emitted"] == 5
    assert "vmap" in report.checks and "feed" in report.checks


@pytest.mark.slow
def test_pack_pipeline_passes_check_batcher():
    order = jb.epochs()
    pipe = jb.pipeline(CORPUS, jb.pack(6, 2, lengths=LENGTHS), order=order, lengths=LENGTHS)
    positions = jnp.arange(6, dtype=jnp.int32)
    report = check_batcher(
        pipe,
        positions,
        key=KEY,
        units=sequence_units(order, positions),
        batch_units=packed_sequences,
        fifo=False,  # first fit places a later sequence in an earlier row
        resume_steps=1,
        check_vmap=False,
    )
    assert report.stats["emitted"] == 6


@pytest.mark.slow
def test_rebatch_after_pack_passes_check_batcher():
    order = jb.epochs()
    pipe = jb.pipeline(
        CORPUS,
        jb.pack(6, 2, lengths=LENGTHS),
        order=order,
        lengths=LENGTHS,
        then=jb.rebatch(3),
    )
    positions = jnp.arange(6, dtype=jnp.int32)
    report = check_batcher(
        pipe,
        positions,
        key=KEY,
        units=sequence_units(order, positions),
        batch_units=packed_sequences,
        fifo=False,
        resume_steps=1,
        check_vmap=False,
        check_jit=False,
    )
    assert report.stats["emitted"] == 6 and pipe.feed is None


@pytest.mark.slow
def test_custom_batcher_with_map_and_keep_passes_check_batcher():
    # A user's batcher (no bulk path), elements mapped and filtered before it.
    inner = jb.fixed_size(2)
    custom = jb.Batcher(init=inner.init, step=inner.step, flush=inner.flush)
    order = jb.epochs(shuffle=False)
    pipe = jb.pipeline(
        DATA,
        custom,
        order=order,
        map_fn=lambda e: {"x": e.data["x"] * 10, "v": e.data["v"]},
        keep=lambda e: e.data["x"] != 20,
    )
    positions = jnp.arange(6, dtype=jnp.int32)
    mapped = {"x": HOST["x"] * 10, "v": HOST["v"]}

    def units(p):
        r = int(np.asarray(p)) % N
        if r == 2:
            return [None]
        return [jb.Element(data=jax.tree.map(lambda x: x[r], mapped))]

    report = check_batcher(
        pipe, positions, units=units, resume_steps=1, check_vmap=False, check_jit=False
    )
    assert report.stats["skipped"] == 1  # position 2 (row 2 mapped to x=20)


@pytest.fixture(scope="module")
def pack_pipes():
    packer = jb.pack(6, 2, lengths=LENGTHS)
    late = jb.pipeline(CORPUS, packer, lengths=LENGTHS, late_gather=True)
    early = jb.pipeline(CORPUS, packer, lengths=LENGTHS, late_gather=False)
    return late, early


def test_late_gather_gives_the_batches_of_reading_first(pack_pipes):
    positions = jnp.arange(9, dtype=jnp.int32)
    late, early = (jb.batch_all(p, positions, max_batches=9, key=KEY) for p in pack_pipes)
    assert int(late[1]) == int(early[1])
    jax.tree.map(np.testing.assert_array_equal, late[0], early[0])


def test_resume_mid_epoch_is_bit_identical_and_compiles_once():
    pipe = jb.pipeline(DATA, jb.fixed_size(2), order=jb.epochs(num_epochs=3))
    traces = []

    def fn(seen, batch):
        traces.append(1)
        return jnp.concatenate([seen[2:], batch.data["x"]])

    carry = jnp.full((8,), -1, jnp.int32)
    state = pipe.init(jnp.int32(0), key=KEY)
    whole, end = jb.scan(pipe, fn, carry, jb.next_positions(state, 8), state=state, flush=False)
    first, mid = jb.scan(pipe, fn, carry, jb.next_positions(state, 4), state=state, flush=False)
    saved = jax.tree.map(np.asarray, mid)  # a checkpoint, mid-epoch
    again = jax.tree.map(jnp.asarray, saved)
    rest, end2 = jb.scan(pipe, fn, first, jb.next_positions(again, 4), state=again, flush=False)
    np.testing.assert_array_equal(whole, rest)
    jax.tree.map(np.testing.assert_array_equal, end, end2)
    assert int(end2.order.position) == 8 and int(end2.order.epoch) == 1
    # the tail of the last epoch, in a chunk of the same length: no new program
    before = len(traces)
    state = end2
    for _ in range(3):
        _, state = jb.scan(pipe, fn, carry, jb.next_positions(state, 4), state=state, flush=False)
    assert len(traces) == before
    assert int(jb.operation_stats(state)["applied_count"]) == 15


@settings(max_examples=5, deadline=None)
@given(
    size=st.sampled_from([1, 4, 7]),
    batch=st.sampled_from([1, 3]),
    epochs=st.integers(1, 3),
    cut=st.sampled_from([0, 6, 12]),
)
def test_every_row_once_per_epoch(size, batch, epochs, cut):
    pipe = _pipe_for(size, batch, epochs)
    state = pipe.init(jnp.int32(0), key=KEY)
    rows = []

    def take(batches, count):
        for k in range(int(count)):
            valid = np.asarray(batches.valid_mask[k])
            rows.extend(np.asarray(batches.data["i"][k])[valid].tolist())

    # chunks of 6 positions (one program); `cut` is where the run is saved and resumed
    for start in range(0, 24, 6):
        if start == cut:
            state = jax.tree.map(jnp.asarray, jax.tree.map(np.asarray, state))
        batches, count, state = _collect(pipe, state, jb.next_positions(state, 6))
        take(batches, count)
    take(*_collect(pipe, state, jb.next_positions(state, 0), flush=True)[:2])
    assert len(rows) == min(size * epochs, 24)
    for e in range(epochs):
        got = rows[e * size : (e + 1) * size]
        assert sorted(got) == list(range(size))


_PIPES = {}


def _pipe_for(size, batch, epochs):
    key = (size, batch, epochs)
    if key not in _PIPES:
        data = {"i": jnp.arange(size, dtype=jnp.int32)}
        _PIPES[key] = jb.pipeline(data, jb.fixed_size(batch), order=jb.epochs(num_epochs=epochs))
    return _PIPES[key]


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _collect_jit(pipe, state, positions, capacity, flush):
    return jb.collect(pipe, state, positions, capacity, flush=flush)  # (batches, count, state)


def _collect(pipe, state, positions, flush=False):
    return _collect_jit(pipe, state, positions, positions.shape[0] + 3, flush)


def test_mixture_into_pack_counts_each_source_and_changes_weights():
    parts = [{k: v[a:b] for k, v in CORPUS.items()} for a, b in ((0, 3), (3, 5), (5, 7))]
    packer = jb.pack(6, 2, lengths=LENGTHS)
    mix = jb.pipeline(parts, packer, order=jb.mixture([0.5, 0.3, 0.2]), lengths=LENGTHS)
    state = mix.init(jnp.int32(0), key=KEY)
    total, state = jb.scan(
        mix,
        lambda c, b: c + jnp.sum(b.data["tokens_segment_ids"] > 0),
        0,
        jb.next_positions(state, 10),
        state=state,
        flush=False,
    )
    counts = np.asarray(jb.progress(state)["counts"])
    assert counts.sum() == 10 and counts.tolist() == [5, 3, 2]
    # other weights on resume: every source continues from its count
    other = jb.pipeline(parts, packer, order=jb.mixture([0.2, 0.3, 0.5]), lengths=LENGTHS)
    _, state2 = jb.scan(
        other, lambda c, b: c, 0, jb.next_positions(state, 10), state=state, flush=False
    )
    counts2 = np.asarray(jb.progress(state2)["counts"])
    assert (counts2 - counts).tolist() == [2, 3, 5]
    assert np.asarray(state2.order.weights).tolist() == pytest.approx([0.2, 0.3, 0.5])


def test_bad_input():
    fixed = jb.fixed_size(2)
    with pytest.raises(ValueError, match="empty"):
        jb.pipeline({"x": jnp.zeros((0, 2))}, fixed)
    with pytest.raises(ValueError, match="no array leaves"):
        jb.pipeline({}, fixed)
    with pytest.raises(ValueError, match=r"data\[1\]\['x'\]"):
        jb.pipeline(
            [{"x": jnp.zeros((3, 2))}, {"x": jnp.zeros((3, 4))}], fixed, order=jb.mixture([1, 1])
        )
    with pytest.raises(ValueError, match="list of 2 sources"):
        jb.pipeline({"x": jnp.zeros((3, 2))}, fixed, order=jb.mixture([1, 1]))
    with pytest.raises(ValueError, match="`batcher`"):
        jb.pipeline(DATA, "fixed")
    with pytest.raises(ValueError, match="`late_gather=True` with a `map_fn`"):
        jb.pipeline(DATA, fixed, map_fn=lambda e: e, late_gather=True)
    with pytest.raises(ValueError, match="`lengths`"):
        jb.pipeline(DATA, fixed, lengths={"tokens": "length"})
    pipe = jb.pipeline(DATA, fixed)
    with pytest.raises(ValueError, match="key"):
        pipe.init(jnp.int32(0))
    with pytest.raises(ValueError, match="positions"):
        pipe.init(jnp.float32(0), key=KEY)


def test_checkpoint_without_data(tmp_path):
    pipe = jb.pipeline(DATA, jb.fixed_size(2), order=jb.epochs(shuffle=False))
    state = pipe.init(jnp.int32(0))
    _, state = jb.scan(
        pipe, lambda c, b: c, 0, jb.next_positions(state, 3), state=state, flush=False
    )
    jb.save_state(tmp_path / "s", jb.without_data(state))
    like = jb.without_data(pipe.init(jnp.int32(0)))
    loaded = jb.with_data(jb.load_state(tmp_path / "s", like), pipe.init(jnp.int32(0)))
    jax.tree.map(np.testing.assert_array_equal, loaded, state)


def test_a_state_of_another_pipeline_is_refused_naming_both():
    """Law 8: a pipeline state carries its configuration (not the order's weights)."""
    fixed = jb.pipeline(DATA, jb.fixed_size(2), order=jb.epochs(shuffle=False))
    other = jb.pipeline(DATA, jb.fixed_size(2), order=jb.epochs(shuffle=False), keep=_keep_all)
    state = fixed.init(jnp.int32(0))
    with pytest.raises(TypeError, match=r"pipeline\(.*keep=None.*\n?.*keep=_keep_all"):
        other.step(state, jnp.int32(0))
    fewer = jb.pipeline({k: v[:3] for k, v in DATA.items()}, jb.fixed_size(2))
    with pytest.raises(TypeError, match="rows="):
        fewer.flush(fixed.init(jnp.int32(0)))


def _keep_all(element):
    return jnp.array(True)

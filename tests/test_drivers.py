"""The drivers `scan`, `batch_all` and `iterate` with `fixed_size`: against the reference,
exact resume of `iterate`, one trace per shape, errors, and a training loop that converges."""

import collections
import collections.abc
import functools
import importlib.util
import math
import pathlib

import chex
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

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"

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


@functools.cache
def _batcher(batch_size, drop_remainder, pad_value, pad_type):
    del pad_type  # in the cache key only: `True == 1` but they are different pad values
    return jb.fixed_size(batch_size, drop_remainder=drop_remainder, pad_value=pad_value)


def setup(config):
    """The batcher (one per configuration: drivers compile once per batcher), the stream
    and the reference run."""
    batcher = _batcher(
        config["batch_size"],
        config["drop_remainder"],
        config["pad_value"],
        type(config["pad_value"]),
    )
    stacked = make_stream(config["kind"], config["n"], config["seed"])
    return batcher, stacked, ref.expected_for(stacked, config)


# --------------------------------------------------------------------------- batch_all


@functools.cache
def _jit_batch_all(batcher):
    return jax.jit(lambda elements: jb.batch_all(batcher, elements))


@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=8)
@given(config=configs)
def test_batch_all_matches_reference(use_jit, config):
    batcher, stacked, expected = setup(config)
    run = _jit_batch_all(batcher) if use_jit else functools.partial(jb.batch_all, batcher)
    batches, count = run(stacked)
    count = int(count)
    capacity = math.ceil(config["n"] / config["batch_size"])
    assert batches.valid_mask.shape == (capacity, config["batch_size"])
    assert count == len(expected.batches)
    chex.assert_trees_all_equal(slots(batches, count), expected.batches)
    # Slots past `count` (one, when the remainder was dropped) are masked out; their data is
    # unspecified.
    assert not np.asarray(batches.valid_mask)[count:].any()


def test_batch_all_errors():
    batcher = jb.fixed_size(3)
    stream = make_stream("dict", 7, 0)
    with pytest.raises(ValueError, match="`max_batches`") as info:
        jb.batch_all(batcher, stream, max_batches=2)
    assert "3 needed" in str(info.value)
    for bad in (-1, True, 2.5, "3"):
        with pytest.raises((ValueError, TypeError), match="`?max_batches`?"):
            jb.batch_all(batcher, stream, max_batches=bad)
    with pytest.raises(ValueError, match="`max_batches`"):
        jb.batch_all(batcher, stream, max_batches=-1)
    # Under an outer jit the check runs at run time.
    with pytest.raises(RuntimeError, match="`max_batches`"):
        jax.block_until_ready(jax.jit(lambda e: jb.batch_all(batcher, e, max_batches=2))(stream))
    # Room to spare is fine: the extra slots stay empty.
    batches, count = jb.batch_all(batcher, stream, max_batches=5)
    assert int(count) == 3 and not np.asarray(batches.valid_mask[3:]).any()


# --------------------------------------------------------------------------- scan


@functools.cache
def _jit_scan(batcher):
    return jax.jit(lambda carry, elements: jb.scan(batcher, append, carry, elements))


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=8)
@given(config=configs)
def test_scan_with_consumer_matches_reference(use_jit, config):
    batcher, stacked, expected = setup(config)
    capacity = config["n"] // config["batch_size"] + 1
    carry = empty_slots(batcher, row_spec(stacked), capacity)
    run = _jit_scan(batcher) if use_jit else functools.partial(jb.scan, batcher, append)
    (out, count), state = run(carry, stacked)
    assert int(count) == len(expected.batches)
    chex.assert_trees_all_equal(slots(out, int(count)), expected.batches)
    assert stats_of(state) == expected.stats
    assert int(state.count) == 0


@pytest.mark.parametrize("split", [0, 4, 7, 11])
def test_scan_continues_a_stream_across_calls(split):
    batcher = _batcher(3, False, -1, int)
    stacked = make_stream("element", 11, 7)
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], stacked)  # noqa: E731
    carry = empty_slots(batcher, row_spec(stacked), 5)
    whole, whole_state = jb.scan(batcher, append, carry, stacked)
    carry, state = jb.scan(batcher, append, carry, part(0, split), flush=False)
    assert int(state.count) == split % 3
    carry, state = jb.scan(batcher, append, carry, part(split, 11), state=state)
    chex.assert_trees_all_equal(carry, whole)
    chex.assert_trees_all_equal(state, whole_state)


def test_scan_trains_a_linear_model():
    # `y = 2x - 1` with a masked loss; 61 elements in batches of 8: the last one is padded.
    xs = jnp.linspace(-1.0, 1.0, 61)
    stream = {"x": xs, "y": 2.0 * xs - 1.0}

    def loss(params, batch):
        w, b = params
        err = jnp.where(batch.valid_mask, w * batch.data["x"] + b - batch.data["y"], 0.0)
        return jnp.sum(err**2) / jnp.maximum(batch.num_valid, 1).astype(jnp.float32)

    def train_step(params, batch):
        grads = jax.grad(loss)(params, batch)
        return jax.tree.map(lambda p, g: p - 0.3 * g, params, grads)

    batcher = jb.fixed_size(8)
    params = (jnp.float32(0.0), jnp.float32(0.0))
    everything = jb.Batch.from_parts(stream)
    losses = [float(loss(params, everything))]
    for _ in range(10):
        params, state = jb.scan(batcher, train_step, params, stream)
        losses.append(float(loss(params, everything)))
    # Each call starts a fresh batcher state: its stats cover the last epoch.
    assert int(state.stats.batches) == 8 and int(state.stats.padded) == 3
    assert losses[-1] < 1e-4 * losses[0]
    np.testing.assert_allclose([float(p) for p in params], [2.0, -1.0], atol=1e-2)


# --------------------------------------------------------------------------- iterate


@settings(max_examples=6)
@given(config=configs, chunk_size=st.integers(1, 6))
def test_iterate_matches_reference(config, chunk_size):
    batcher, stacked, expected = setup(config)
    source = ref.unstack(jax.device_get(stacked))  # a Python list of elements
    got = [batch_rows(b) for b in jb.iterate(batcher, source, chunk_size=chunk_size)]
    chex.assert_trees_all_equal(got, expected.batches)


def test_iterate_accepts_a_generator_of_jax_trees():
    source = ({"x": jnp.float32(i), "n": jnp.int32(i)} for i in range(5))
    batches = list(jb.iterate(jb.fixed_size(2, pad_value=-1), source, chunk_size=2))
    assert [b.data["n"].tolist() for b in batches] == [[0, 1], [2, 3], [4, -1]]
    assert [b.valid_mask.tolist() for b in batches][-1] == [True, False]


ITERATE_CASES = [  # batch_size, drop_remainder, chunk_size, stream length
    (3, False, 4, 13),
    (2, True, 5, 11),
]


@pytest.mark.parametrize(("batch_size", "drop_remainder", "chunk_size", "n"), ITERATE_CASES)
def test_iterate_checkpoint_resumes_exactly(tmp_path, batch_size, drop_remainder, chunk_size, n):
    batcher = jb.fixed_size(batch_size, drop_remainder=drop_remainder, pad_value=-5)
    source = ref.unstack(jax.device_get(make_stream("element", n, 42)))
    everything = [batch_rows(b) for b in jb.iterate(batcher, source, chunk_size=chunk_size)]
    assert len(everything) == (n // batch_size if drop_remainder else -(-n // batch_size))

    it = jb.iterate(batcher, source, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="Nothing has been consumed"):
        it.checkpoint()
    for k in range(1, len(everything) + 1):  # after k batches: mid-chunk and at chunk ends
        it = jb.iterate(batcher, source, chunk_size=chunk_size)
        taken = [batch_rows(next(it)) for _ in range(k)]
        checkpoint = it.checkpoint()
        chex.assert_trees_all_equal(taken, everything[:k])

        resumed = jb.iterate(batcher, source, chunk_size=chunk_size, resume=checkpoint)
        chex.assert_trees_all_equal([batch_rows(b) for b in resumed], everything[k:])

        path = tmp_path / f"iterate-{k}.ckpt"
        jb.save_state(path, checkpoint)
        loaded = jb.load_state(path, like=checkpoint)
        assert isinstance(loaded, jb.IterateCheckpoint)
        resumed = jb.iterate(batcher, source, chunk_size=chunk_size, resume=loaded)
        chex.assert_trees_all_equal([batch_rows(b) for b in resumed], everything[k:])

        # The original iterator is unaffected by checkpointing and carries on.
        chex.assert_trees_all_equal([batch_rows(b) for b in it], everything[k:])
        # A checkpoint at the very end resumes to nothing.
        assert (
            list(jb.iterate(batcher, source, chunk_size=chunk_size, resume=it.checkpoint())) == []
        )


class _Reads(collections.abc.Sequence):
    """A sequence that records which indices were read."""

    def __init__(self, rows):
        self.rows, self.read = rows, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(i)
        return self.rows[i]


def test_iterate_resumes_a_sequence_without_reading_what_came_before():
    batcher = jb.fixed_size(3)
    rows = [{"x": np.int32(i)} for i in range(20)]
    it = jb.iterate(batcher, _Reads(rows), chunk_size=4)
    taken = [next(it) for _ in range(3)]
    checkpoint = it.checkpoint()
    source = _Reads(rows)
    rest = list(jb.iterate(batcher, source, chunk_size=4, resume=checkpoint))
    assert min(source.read) == int(checkpoint.position) > 0  # earlier rows never read
    got = [int(x) for b in taken + rest for x, m in zip(b.data["x"], b.valid_mask) if m]
    assert got == list(range(20))
    # A plain iterator has no indices: its first `position` elements are read and dropped.
    rest = list(jb.iterate(batcher, iter(rows), chunk_size=4, resume=checkpoint))
    assert [int(x) for b in taken + rest for x, m in zip(b.data["x"], b.valid_mask) if m] == got


@pytest.mark.parametrize("chunk_size", [0, -1, True, None, "8"])
def test_iterate_rejects_a_bad_chunk_size(chunk_size):
    with pytest.raises((ValueError, TypeError), match="`?chunk_size`?"):
        jb.iterate(jb.fixed_size(2), [], chunk_size=chunk_size)


@pytest.mark.parametrize("chunk_size", [0, -1, True])
def test_iterate_rejects_a_bad_chunk_size_with_value_error(chunk_size):
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int") as info:
        jb.iterate(jb.fixed_size(2), [], chunk_size=chunk_size)
    assert repr(chunk_size) in str(info.value)


def test_iterate_rejects_an_element_unlike_the_first():
    source = [{"x": np.zeros(3, np.float32)}] * 3 + [{"x": np.zeros(4, np.float32)}]
    with pytest.raises(TypeError, match=r"source\[3\]\.data\['x'\].*\(4,\).*\(3,\)"):
        list(jb.iterate(jb.fixed_size(2), source, chunk_size=2))


def test_iterate_over_an_empty_source():
    assert list(jb.iterate(jb.fixed_size(2), [], chunk_size=3)) == []


@pytest.mark.slow
def test_iterate_drains_a_batcher_that_holds_many_batches():
    """At the end of the stream `iterate` flushes until nothing is ready: a shuffle buffer
    of 16 batches drains with the default room, every element exactly once, and equal
    to `batch_all` (same key, same order)."""
    batcher, key = jb.shuffle(2, 32), jax.random.key(3)
    rows = [{"x": np.int32(i)} for i in range(45)]
    got = list(jb.iterate(batcher, rows, chunk_size=8, key=key))
    want, count = jb.batch_all(
        batcher, {"x": np.arange(45, dtype=np.int32)}, max_batches=40, key=key
    )
    assert len(got) == int(count) > 16
    for i, batch in enumerate(got):
        chex.assert_trees_all_equal(batch, jax.tree.map(lambda x, i=i: x[i], want))
    values = [int(x) for b in got for x, m in zip(b.data["x"], b.valid_mask) if m]
    assert sorted(values) == list(range(45))


# --------------------------------------------------------------------------- traces


def _counting(batcher, counter):
    """`batcher` with a `step` that counts its traces in `counter["step"]`."""

    def step(state, element):
        counter["step"] += 1
        return batcher.step(state, element)

    return jb.Batcher(batcher.init, step, batcher.flush)


def test_scan_traces_once_per_shape():
    traces = {"fn": 0}

    def consume(total, batch):
        traces["fn"] += 1
        return total + jnp.sum(jnp.where(batch.valid_mask, batch.data["i"][:, 0], 0))

    batcher = jb.fixed_size(3)
    totals = []
    for seed in (1, 2, 3):  # new values, same shapes
        stream = make_stream("dict", 10, seed)
        total, _ = jb.scan(batcher, consume, jnp.int32(0), stream)
        totals.append(int(total))
        assert int(total) == int(stream["i"][:, 0].sum())
        if seed == 1:
            first = traces["fn"]
        assert traces["fn"] == first > 0
    assert len(set(totals)) == 3

    counted = {"step": 0}
    counting = _counting(batcher, counted)
    for seed in (1, 2):
        jb.scan(counting, consume, jnp.int32(0), make_stream("dict", 10, seed))
        if seed == 1:
            first = counted["step"]
    assert counted["step"] == first > 0


@pytest.mark.parametrize("max_batches", [4, None])
def test_batch_all_traces_once_per_shape(max_batches):
    counted = {"step": 0}
    batcher = _counting(jb.fixed_size(3), counted)
    for seed in (1, 2, 3):  # new values, same shapes
        stream = make_stream("element", 10, seed)
        batches, count = jb.batch_all(batcher, stream, max_batches=max_batches)
        assert int(count) == 4
        np.testing.assert_array_equal(batches.data["i"][0], stream.data["i"][:3])
        if seed == 1:
            first = counted["step"]
        assert counted["step"] == first > 0


def test_iterate_traces_once_per_shape():
    counted = {"step": 0}
    batcher = _counting(jb.fixed_size(3), counted)
    source = ref.unstack(jax.device_get(make_stream("dict", 20, 0)))
    it = jb.iterate(batcher, source, chunk_size=4)
    next(it)
    first = counted["step"]
    assert first > 0
    batches = list(it)  # four more full chunks: no new trace until the tail
    assert len(batches) == 6
    traced_by_tail = counted["step"] - first
    for seed in (1, 2):  # a new stream of the same shapes: no new trace at all
        source = ref.unstack(jax.device_get(make_stream("dict", 20, seed)))
        before = counted["step"]
        assert len(list(jb.iterate(batcher, source, chunk_size=4))) == 7
        assert counted["step"] == before, (first, traced_by_tail)


def test_iterate_takes_float64_and_python_scalar_rows_as_jit_would():
    # Without x64, jit sees float64 as float32 and a Python int as int32: so does iterate.
    rows = [{"x": np.full(2, i, np.float64), "n": i} for i in range(5)]
    batches = list(jb.iterate(jb.fixed_size(2), rows, chunk_size=2))
    assert [b.data["x"].dtype for b in batches] == [jnp.float32] * 3
    assert [b.data["n"].dtype for b in batches] == [jnp.int32] * 3
    assert [b.data["n"].tolist() for b in batches] == [[0, 1], [2, 3], [4, 0]]


@pytest.mark.parametrize("path", ["bulk feed", "stepped"])
def test_vmap_of_scan_with_different_fill_levels_equals_separate_runs(path):
    # Under vmap the bulk feed's cond and dynamic loop bound (or the stepped loop's
    # step-or-flush cond and its drain) are batched: each lane must still see its own
    # batches, in order (the consumer weighs each batch by its position).
    batcher = jb.fixed_size(3)
    if path == "stepped":
        batcher = batcher._replace(feed=None)

    def consume(carry, batch):
        total, n = carry
        rows = jnp.where(batch.valid_mask, batch.data["x"], 0)
        return total + jnp.sum(rows) * (n + 1), n + 1

    def run(xs, fill):
        state = batcher.init({"x": jnp.zeros((), jnp.int32)})
        step = lambda i, s: batcher.step(s, {"x": jnp.int32(100)})[0]  # noqa: E731
        state = jax.lax.fori_loop(0, fill, step, state)
        carry, state = jb.scan(
            batcher, consume, (jnp.int32(0), jnp.int32(0)), {"x": xs}, state=state
        )
        return carry, stats_of_arrays(state)

    def stats_of_arrays(state):
        return {name: getattr(state.stats, name).lo for name in ref.STAT_NAMES}

    xs = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
    fills = jnp.array([0, 2], dtype=jnp.int32)
    together = jax.vmap(run)(xs, fills)
    for lane in range(2):
        alone = run(xs[lane], fills[lane])
        chex.assert_trees_all_equal(jax.tree.map(lambda x, k=lane: x[k], together), alone)


# --------------------------------------------------------------------------- one call site


def _every_other():
    spec = importlib.util.spec_from_file_location("custom_batcher", EXAMPLES / "custom_batcher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.every_other(3)


ONE_SITE_BATCHERS = {
    "fixed_size (bulk feed)": lambda: jb.fixed_size(3),
    "fixed_size (stepped)": lambda: jb.fixed_size(3, drop_remainder=True)._replace(feed=None),
    "every_other (user's, stepped)": _every_other,
}


@pytest.mark.parametrize("name", sorted(ONE_SITE_BATCHERS))
def test_every_driver_program_traces_the_consumer_once(name):
    batcher = ONE_SITE_BATCHERS[name]()
    traces = collections.Counter()

    def consumer(program):
        def fn(total, batch):
            traces[program] += 1
            return total + jnp.sum(jnp.where(batch.valid_mask, batch.data["i"][:, 0], 0))

        return fn

    stream = make_stream("dict", 10, 1)
    spec = row_spec(stream)
    zero = jnp.int32(0)
    flushed = consumer("scan")
    for seed in (1, 2):  # new values: no retrace either
        jb.scan(batcher, flushed, zero, make_stream("dict", 10, seed))
    continued = consumer("scan, flush=False, continued")
    _, state = jb.scan(batcher, continued, zero, stream, state=batcher.init(spec), flush=False)
    jb.scan(batcher, continued, zero, make_stream("dict", 10, 3), state=state, flush=False)
    inner = consumer("consume in the user's jit")
    jax.jit(lambda s, e: jb.consume(batcher, inner, zero, s, e, flush=True))(
        batcher.init(spec), stream
    )
    assert dict(traces) == {
        "scan": 1,
        "scan, flush=False, continued": 1,
        "consume in the user's jit": 1,
    }


# --------------------------------------------------------------------------- ragged input


def _documents(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"tokens": rng.integers(1, 99, size=int(k), dtype=np.int32), "doc": np.int32(i)}
        for i, k in enumerate(rng.integers(1, 9, size=n))
    ]


@functools.cache
def _packer():
    return jb.pack(8, 2, lengths={"tokens": "length"})


@pytest.mark.slow
def test_iterate_pads_ragged_arrays_for_pack_like_a_padded_stream():
    docs = _documents(23)
    ragged = {"tokens": (8, "length")}
    got = list(jb.iterate(_packer(), iter(docs), chunk_size=8, ragged=ragged))
    padded = {
        "tokens": np.stack([np.pad(d["tokens"], (0, 8 - len(d["tokens"]))) for d in docs]),
        "doc": np.array([d["doc"] for d in docs]),
        "length": np.array([len(d["tokens"]) for d in docs], np.int32),
    }
    batches, count = jb.batch_all(_packer(), padded, max_batches=23)
    assert len(got) == int(count)
    for k, batch in enumerate(got):
        chex.assert_trees_all_equal(batch, jax.tree.map(lambda x, k=k: x[k], batches))


@pytest.mark.slow
def test_iterate_ragged_resumes_exactly():
    docs, ragged = _documents(17, 1), {"tokens": (8, "length")}
    whole = list(jb.iterate(_packer(), docs, chunk_size=4, ragged=ragged))
    it = jb.iterate(_packer(), docs, chunk_size=4, ragged=ragged)
    first = [next(it) for _ in range(2)]
    rest = list(jb.iterate(_packer(), docs, chunk_size=4, ragged=ragged, resume=it.checkpoint()))
    chex.assert_trees_all_equal(first + rest, whole)


@pytest.mark.slow
def test_iterate_ragged_errors():
    docs = _documents(5)
    docs[3] = {"tokens": np.arange(12, dtype=np.int32), "doc": np.int32(3)}
    with pytest.raises(ValueError, match=r"source\[3\]\['tokens'\] has shape \(12,\)"):
        list(jb.iterate(_packer(), docs, chunk_size=2, ragged={"tokens": (8, "length")}))
    with pytest.raises(TypeError, match=r"source\[0\] is not a dict holding it"):
        list(jb.iterate(_packer(), [np.zeros(3)], ragged={"tokens": (8, "length")}))
    for bad in ({"tokens": 8}, {"tokens": (0, "length")}, {"tokens": (8, 3)}, [("tokens", 8)]):
        with pytest.raises(ValueError, match="`ragged`"):
            jb.iterate(_packer(), docs, ragged=bad)

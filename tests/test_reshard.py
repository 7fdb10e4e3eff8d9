"""`jb.reshard_pipeline`: a pipeline saved on D shards continues on D' shards, every
element of the stream exactly once over the whole run (the saved buffers carried as
batches, the rest of the stream read from the cut in the same global order)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb

N, WIDTH, EPOCHS, CHUNK = 23, 6, 2, 5
LEN = {"tokens": "length"}


def _data():
    rng = np.random.default_rng(1)
    length = rng.integers(1, WIDTH + 1, N).astype(np.int32)
    pos = np.arange(WIDTH)[None]
    tokens = np.where(pos < length[:, None], np.arange(N)[:, None] * WIDTH + pos + 1, 0)
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "length": jnp.asarray(length),
        "label": jnp.arange(N, dtype=jnp.int32),
    }


DATA = _data()
MAKERS = {
    "fixed_size": (lambda: jb.fixed_size(3), {}),
    "pack": (lambda: jb.pack(8, 2, lengths=LEN), {"lengths": LEN}),
    "fixed_size then rebatch": (lambda: jb.fixed_size(2), {"then": jb.rebatch(3)}),
}


@functools.cache
def _pipe(kind, shards, index):
    make, kwargs = MAKERS[kind]
    order = jb.epochs(num_epochs=EPOCHS, num_shards=shards, shard_index=index)
    return jb.pipeline(DATA, make(), order=order, **kwargs), order


ROOM = 64  # units one chunk can emit (flush included): CHUNK * WIDTH tokens at most


def _values(kind, batch):
    """What a batch holds, in order, and which of it is real: labels, or packed tokens."""
    if kind == "pack":
        ids = batch.data["tokens_segment_ids"]
        return batch.data["tokens"].ravel(), ids.ravel() > 0
    return batch.data["label"], batch.valid_mask


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _chunk(pipe, kind, state, flush):
    """One chunk of positions through `jb.consume`: the units its batches hold, in order."""

    def append(c, batch):
        out, n = c
        values, real = _values(kind, batch)
        at = jnp.where(real, n + jnp.cumsum(real, dtype=jnp.int32) - 1, ROOM)
        return out.at[at].set(values, mode="drop"), n + jnp.sum(real, dtype=jnp.int32)

    start = (jnp.zeros((ROOM,), jnp.int32), jnp.zeros((), jnp.int32))
    positions = jb.next_positions(state, CHUNK)
    (out, n), state = jb.consume(pipe, append, start, state, positions, flush=flush)
    return out, n, state


def _units(kind, batch):
    values, real = _values(kind, batch)
    return np.asarray(values)[np.asarray(real)].tolist()


def _expected(kind):
    if kind == "pack":
        tokens = np.asarray(DATA["tokens"])
        return sorted(tokens[tokens > 0].tolist() * EPOCHS)
    return sorted(list(range(N)) * EPOCHS)


def _run(kind, before, after, calls):
    """`calls` chunks on `before` shards in lockstep, reshard, the rest on `after` shards."""
    seen, saved = [], []
    for d in range(before):
        pipe, _ = _pipe(kind, before, d)
        state = pipe.init(jnp.int32(0), key=jax.random.key(7))
        for _ in range(calls):
            out, count, state = _chunk(pipe, kind, state, False)
            seen += out[: int(count)].tolist()
        saved.append(jb.without_data(state))
    finals, order_seen = [], []
    for e in range(after):
        pipe, order = _pipe(kind, after, e)
        carried, state = jb.reshard_pipeline(
            pipe, order, saved, pipe.init(jnp.int32(0), key=jax.random.key(99))
        )
        for batch in carried:
            seen += _units(kind, batch)
            order_seen.append(_units(kind, batch))
        while True:  # to the end of the bounded stream, then the drain
            done = int(state.order.start) + int(state.order.position) * after >= N * EPOCHS
            out, count, state = _chunk(pipe, kind, state, done)
            got = out[: int(count)].tolist()
            seen += got
            order_seen.append(got)
            if done:
                break
        finals.append(state)
    return seen, order_seen, saved, finals


@pytest.mark.parametrize(
    ("kind", "before", "after", "calls"),
    [
        ("fixed_size", 2, 1, 2),
        pytest.param("fixed_size", 4, 2, 1, marks=pytest.mark.slow),
        pytest.param("pack", 2, 4, 2, marks=pytest.mark.slow),
        pytest.param("fixed_size then rebatch", 2, 3, 2, marks=pytest.mark.slow),
        pytest.param("pack", 3, 1, 1, marks=pytest.mark.slow),
        pytest.param("fixed_size", 1, 2, 3, marks=pytest.mark.slow),
    ],
)
def test_every_element_exactly_once_over_the_resize(kind, before, after, calls):
    seen, order_seen, saved, finals = _run(kind, before, after, calls)
    assert sorted(seen) == _expected(kind)
    # Deterministic given (D, D', cut): a second run gives the same batches in order.
    assert _run(kind, before, after, calls)[1] == order_seen
    # The counters: the new states sum to the whole run (each element accepted once).
    accepted = sum(int(s.stats.accepted) for s in finals)
    assert accepted == N * EPOCHS
    assert max(int(s.order.epoch) for s in finals) == EPOCHS - 1


def test_refuses_shards_at_different_positions_and_other_pipelines():
    pipe0, _ = _pipe("fixed_size", 2, 0)
    pipe1, _ = _pipe("fixed_size", 2, 1)
    s0 = pipe0.init(jnp.int32(0), key=jax.random.key(7))
    s1 = _chunk(pipe1, "fixed_size", pipe1.init(jnp.int32(0), key=jax.random.key(7)), False)[2]
    new, order = _pipe("fixed_size", 1, 0)
    fresh = new.init(jnp.int32(0), key=jax.random.key(7))
    with pytest.raises(ValueError, match=r"different local positions \[0, 5\]"):
        jb.reshard_pipeline(new, order, [s0, s1], fresh)
    other, other_order = _pipe("pack", 1, 0)
    with pytest.raises(ValueError, match=r"`saved\[0\]` is a state of another pipeline"):
        jb.reshard_pipeline(
            other, other_order, [s0, s0], other.init(jnp.int32(0), key=jax.random.key(7))
        )
    s_other_key = pipe1.init(jnp.int32(0), key=jax.random.key(8))
    with pytest.raises(ValueError, match=r"disagree on their order's `seed`"):
        jb.reshard_pipeline(new, order, [s0, s_other_key], fresh)
    with pytest.raises(ValueError, match=r"`saved` is empty"):
        jb.reshard_pipeline(new, order, [], fresh)
    with pytest.raises(ValueError, match=r"`order` must be"):
        jb.reshard_pipeline(new, None, [s0], fresh)


@functools.cache
def _mixture_pipe(shards, index):
    order = jb.mixture([2.0, 1.0], num_shards=shards, shard_index=index)
    sources = [jax.tree.map(lambda x: x[:12], DATA), jax.tree.map(lambda x: x[12:], DATA)]
    return jb.pipeline(sources, jb.fixed_size(3), order=order), order


@pytest.mark.slow
def test_a_deterministic_mixture_reshards_to_the_unsharded_stream():
    # An unbounded mixture: after 2 shards x 2 chunks and 3 shards x 2 chunks, the rows read
    # are those of one shard reading the same 50 global positions (each source where its
    # own counters stood, on both sides of the cut).
    seen, saved = [], []
    for d in range(2):
        pipe, _ = _mixture_pipe(2, d)
        state = pipe.init(jnp.int32(0), key=jax.random.key(5))
        for _ in range(2):
            out, count, state = _chunk(pipe, "fixed_size", state, False)
            seen += out[: int(count)].tolist()
        saved.append(state)
    for e in range(3):
        pipe, order = _mixture_pipe(3, e)
        carried, state = jb.reshard_pipeline(
            pipe, order, saved, pipe.init(jnp.int32(0), key=jax.random.key(5))
        )
        seen += [u for batch in carried for u in _units("fixed_size", batch)]
        for last in (False, True):
            out, count, state = _chunk(pipe, "fixed_size", state, last)
            seen += out[: int(count)].tolist()
    one, _ = _mixture_pipe(1, 0)
    state = one.init(jnp.int32(0), key=jax.random.key(5))
    want = []
    for k in range(10):
        out, count, state = _chunk(one, "fixed_size", state, k == 9)
        want += out[: int(count)].tolist()
    assert len(want) == 50
    assert sorted(seen) == sorted(want)


def _reshard_small():
    """Two shards of `fixed_size(3)` over 23 rows stop after 5 positions each; one shard
    reshards them: the carried batches' labels and the new state's order."""
    saved = []
    for d in range(2):
        pipe, _ = _pipe("fixed_size", 2, d)
        state = pipe.init(jnp.int32(0), key=jax.random.key(7))
        saved.append(_chunk(pipe, "fixed_size", state, False)[2])
    pipe, order = _pipe("fixed_size", 1, 0)
    carried, state = jb.reshard_pipeline(
        pipe, order, saved, pipe.init(jnp.int32(0), key=jax.random.key(7))
    )
    labels = [_units("fixed_size", b) for b in carried]
    return labels, jax.tree.map(lambda x: (np.asarray(x).tolist(), str(x.dtype)), state.order)


@pytest.mark.slow
def test_reshard_is_the_same_with_x64_on_and_off():
    # The cut, the counters and the order state keep their int32 dtypes under x64.
    with jax.enable_x64(False):
        off = _reshard_small()
    with jax.enable_x64(True):
        on = _reshard_small()
    assert off == on and off[0]

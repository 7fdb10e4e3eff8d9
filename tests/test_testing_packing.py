"""`check_batcher(..., lengths=...)`: the law checker follows tokens through a packing batcher.

The batcher here is a user's own packer written outside jaxbatch: `next_fit(row_length)`
packs sequences into one row per batch, emitting the row when the next sequence does not
fit. It passes; each broken variant (a lost token, a duplicated sequence, wrong positions,
a bad segment id, a sequence cut mid-row) fails with law 4 and a message saying where.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Int

import jaxbatch as jb
from jaxbatch.testing import check_batcher
from jaxbatch.testing._packing import check_packed

ROW = 6
LENGTHS = {"tokens": "length"}


class NextFitState(eqx.Module):
    tokens: Int[Array, " row"]
    segment_ids: Int[Array, " row"]
    positions: Int[Array, " row"]
    fill: Int[Array, ""]
    segments: Int[Array, ""]
    stats: jb.Stats


def next_fit(row_length: int) -> jb.Batcher:
    """One row per batch; a sequence that does not fit emits the row and starts the next."""

    def init(spec, key=None):
        zeros = jnp.zeros(row_length, jnp.int32)
        zero = jnp.zeros((), jnp.int32)
        return NextFitState(zeros, zeros, zeros, zero, zero, jb.Stats.zeros())

    def emit_of(state, ready):
        data = {
            "tokens": state.tokens[None],
            "tokens_segment_ids": state.segment_ids[None],
            "tokens_positions": state.positions[None],
        }
        return jb.Emit(jb.Batch(data=data, valid_mask=(ready & (state.fill > 0))[None]), ready)

    def place(state, tokens, length):
        slot = jnp.arange(row_length)
        new = (slot >= state.fill) & (slot < state.fill + length)
        source = jnp.clip(slot - state.fill, 0, tokens.shape[0] - 1)
        return NextFitState(
            jnp.where(new, tokens[source], state.tokens),
            jnp.where(new, state.segments + 1, state.segment_ids),
            jnp.where(new, slot - state.fill, state.positions),
            state.fill + length,
            state.segments + 1,
            state.stats,
        )

    def step(state, element):
        data = element.data if isinstance(element, jb.Element) else element
        for name, shape in (("tokens", (ROW,)), ("length", ())):
            if (jnp.shape(data[name]), jnp.result_type(data[name])) != (shape, jnp.int32):
                raise TypeError(f"Leaf `element['{name}']` must be int32 of shape {shape}.")
        length = data["length"]
        fits = state.fill + length <= row_length
        out = emit_of(state, ~fits)
        emitted = jnp.where(fits, 0, state.segments)
        stats = state.stats.add(accepted=1, batches=~fits, emitted=emitted)
        fresh = init(None)
        start = jax.tree.map(lambda a, b: jnp.where(fits, a, b), state, fresh)
        state = dataclasses.replace(place(start, data["tokens"], length), stats=stats)
        return state, out

    def flush(state):
        ready = state.fill > 0
        out = emit_of(state, ready)
        stats = state.stats.add(batches=ready, emitted=state.segments)
        return dataclasses.replace(init(None), stats=stats), out

    return jb.Batcher(init, step, flush)


def stream(lengths):
    n = len(lengths)
    tokens = np.arange(1, n * ROW + 1, dtype=np.int32).reshape(n, ROW)
    return {"tokens": jnp.asarray(tokens), "length": jnp.asarray(lengths, jnp.int32)}


STREAM = stream([3, 2, 4, 6, 1, 1, 5])
QUICK = {"check_vmap": False, "resume_steps": 3, "lengths": LENGTHS}


@pytest.mark.slow
def test_a_users_packer_passes_the_token_checks():
    report = check_batcher(next_fit(ROW), STREAM, resume_steps=3, lengths=LENGTHS)
    assert report.stats["emitted"] == 7 and report.num_batches == 5
    assert {"conservation", "counters", "order", "consumer traced once"} <= set(report.checks)


def _broken(change_emit):
    base = next_fit(ROW)

    def step(state, element):
        state, emit = base.step(state, element)
        return state, change_emit(emit)

    def flush(state):
        state, emit = base.flush(state)
        return state, change_emit(emit)

    return base._replace(step=step, flush=flush)


def _edit(emit: Any, name: str, fn) -> jb.Emit:
    data = dict(emit.batch.data)
    data[name] = fn(data[name])
    return emit._replace(batch=dataclasses.replace(emit.batch, data=data))


BROKEN = {
    # A valid token replaced: that sequence matches no input.
    "a token lost": (
        lambda e: _edit(e, "tokens", lambda t: t.at[0, 0].add(1000)),
        r"holds tokens .* no input sequence",
    ),
    "positions from 1": (
        lambda e: _edit(
            e, "tokens_positions", lambda p: jnp.where(p > 0, p + 1, p).at[0, 0].set(1)
        ),
        r"positions",
    ),
    "segment ids decrease": (
        lambda e: _edit(e, "tokens_segment_ids", lambda s: jnp.where(s > 0, 10 - s, 0)),
        r"must increase along the row",
    ),
    "a valid row that holds nothing": (
        lambda e: _edit(
            _edit(e, "tokens_segment_ids", jnp.zeros_like), "tokens_positions", jnp.zeros_like
        ),
        r"valid_mask is True but the row holds no tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_packers_fail_law_4(case):
    change, match = BROKEN[case]
    with pytest.raises(AssertionError, match=r"Law 4 .*" + match):
        check_batcher(_broken(change), STREAM, check_jit=False, **QUICK)


def test_a_sequence_emitted_twice_fails():
    base = next_fit(ROW)

    def flush(state):  # emits the last row, but forgets to clear it: twice
        new, emit = base.flush(state)
        return dataclasses.replace(state, stats=new.stats), emit

    with pytest.raises(AssertionError, match=r"Law (3|4) "):
        check_batcher(base._replace(flush=flush), STREAM, check_jit=False, **QUICK)


def _records(rows):
    """Ready records of one batch each, from rows of (tokens, segment ids, positions)."""
    from jaxbatch.testing._common import _Record

    records = []
    for b, (tokens, ids, positions) in enumerate(rows):
        data = {
            "tokens": np.array([tokens]),
            "tokens_segment_ids": np.array([ids]),
            "tokens_positions": np.array([positions]),
        }
        batch = jb.Batch(data=data, valid_mask=jnp.array([True]))
        records.append(_Record(f"step {b}", True, batch, {"dropped": 0, "skipped": 0}))
    return records


def _fail(message):
    raise AssertionError(message)


SPLIT_INPUT = [
    {"tokens": np.array([1, 2, 3, 0]), "length": 3},
    {"tokens": np.array([4, 5, 0, 0]), "length": 2},
]


@pytest.mark.parametrize("continued", [False, True])
def test_split_mode_follows_a_sequence_across_rows(continued):
    rows = [
        ([1, 2], [1, 1], [0, 1]),
        ([3, 4], [1, 2], [2 if continued else 0, 0]),
        ([5, 0], [1, 0], [1 if continued else 0, 0]),
    ]
    done = check_packed(_fail, _records(rows), SPLIT_INPUT, LENGTHS, split=True, fifo=True)
    assert done == [0, 1, 2]


@pytest.mark.parametrize(
    "rows, match",
    [
        (
            [([1, 2], [1, 2], [0, 0]), ([3, 4], [1, 2], [0, 0]), ([5, 0], [1, 0], [0, 0])],
            "middle of a row",
        ),
        (
            [([1, 2], [1, 1], [0, 1]), ([4, 5], [1, 1], [0, 1]), ([3, 0], [1, 0], [0, 0])],
            "stream continues",
        ),
        (
            [([1, 2], [1, 1], [0, 1]), ([3, 4], [1, 2], [5, 0]), ([5, 0], [1, 0], [0, 0])],
            "starts at 5",
        ),
        ([([1, 2], [1, 1], [0, 1]), ([3, 4], [1, 2], [0, 0])], "never came out whole"),
    ],
)
def test_split_mode_catches_bad_cuts(rows, match):
    with pytest.raises(AssertionError, match=match):
        check_packed(_fail, _records(rows), SPLIT_INPUT, LENGTHS, split=True, fifo=True)


def test_bad_lengths_argument():
    with pytest.raises(ValueError, match="`lengths`"):
        check_batcher(next_fit(ROW), STREAM, lengths={"tokens": 3})

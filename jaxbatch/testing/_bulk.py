"""The bulk path and the one-call-site rule, as checks of `check_batcher`.

A batcher's bulk `feed` must have the protocol's shape (`feed(state, elements, flush) ->
(state, jb.Emissions)`), give the step loop's batches, Stats and drain from a part-filled
state through `jb.consume` (the consumer at its one site) and `jb.collect` (materialised),
and `jb.scan` must trace the consumer once per program, also across calls that continue a
stream. Each function takes the `_Checker` of `_laws.py` (the stream, specs and runs).
"""

from typing import Any

import jax
import jax.numpy as jnp

from .._src.base import Emissions
from .._src.drivers import collect, consume, scan
from ._common import (
    _batches,
    _difference,
    _fail,
    _masks,
    _read_stats,
    _Record,
    _split_at,
    _stats_difference,
)


def check_feed_protocol(checker: Any) -> None:
    """A bulk `feed` has the signature and return type of `jb.FeedFn` (checked on
    shapes only, with `jax.eval_shape`)."""
    if checker.batcher.feed is None:
        return
    elements = jax.tree.map(lambda x: x[:2], checker.elements)
    returned = []

    def probe(state, elements):  # shapes only; the Emissions never leave the trace
        result = checker.batcher.feed(state, elements, False)
        returned.append(result[1] if isinstance(result, tuple) and len(result) == 2 else result)
        return None

    try:
        jax.eval_shape(probe, checker.init(), elements)
        kind = returned[0]
        problem = None if isinstance(kind, Emissions) else f"it returned {type(kind).__name__}"
    except TypeError as e:
        problem = f"calling it raised TypeError: {e}"
    if problem is not None:
        _fail(
            9,
            "the bulk path must be `feed(state, elements, flush=False) -> (state, "
            f"jb.Emissions)` (got: {problem}). It never sees the consumer: it says how many "
            "batches are ready and how to build batch k, and the driver calls the consumer "
            "at one site, so a train step is compiled once. See `jb.FeedFn`.",
        )


def check_feed(checker: Any, states: list, want: list[_Record]) -> None:
    """Law 1 for the bulk path, from a partly filled state (`states[split]` of the jitted
    run): the rest of the stream through `jb.consume` (the consumer at its one site)
    and `jb.collect` (materialised), without the end-of-stream drain and with it."""
    split = _split_at(checker.n, checker.batch_size)
    for flush in (False, True):
        _check_feed_from(checker, states[split], split, flush, want)


def _check_feed_from(
    checker: Any, start: Any, split: int, flush: bool, want: list[_Record]
) -> None:
    rest = jax.tree.map(lambda x: x[split:], checker.elements)
    path = "the bulk `feed`" if checker.batcher.feed is not None else "the step loop"
    upto = len(want) if flush else checker.n
    want_ready = [r for r in want[split:upto] if r.ready]
    room = len(want_ready) + 1
    what = (
        f"`jb.consume` / `jb.collect` ({path}) on elements[{split}:] after {split} "
        f"steps, flush={flush}"
    )

    def write(carry, batch):
        difference = checker._spec_difference(batch)
        if difference:
            _fail(2, f"{what} passed the consumer a batch unlike its spec: {difference}.")
        out, count = carry
        slot = jnp.minimum(count, room - 1)
        out = jax.tree.map(
            lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, slot, 0), out, batch
        )
        return out, count + 1

    def run(state, elements):
        carry = (
            jax.tree.map(lambda s: jnp.zeros((room, *s.shape), s.dtype), checker.expected),
            jnp.zeros((), jnp.int32),
        )
        consumed = consume(checker.batcher, write, carry, state, elements, flush=flush)
        return consumed, collect(checker.batcher, state, elements, room, flush=flush)

    try:
        consumed, collected = jax.device_get(jax.jit(run)(start, rest))
    except AssertionError:
        raise
    except Exception as e:
        _fail(1, f"{what} failed: {e}")
    ((out, count), state), (stacked, count_c, state_c) = consumed, collected
    if int(count) != len(want_ready) or int(count_c) != len(want_ready):
        _fail(
            1,
            f"{what}: `consume` passed {int(count)} batches to the consumer and "
            f"`collect` counted {int(count_c)}; the step loop emitted {len(want_ready)}.",
        )
    if any(m[len(want_ready) :].any() for m in _masks(stacked)):
        _fail(4, f"{what}: `collect` left valid rows in a slot past its count.")
    for k, w in enumerate(want_ready):
        for name, got in (("consume", out), ("collect", stacked)):
            difference = _difference(jax.tree.map(lambda x, k=k: x[k], got), w.batch)
            if difference:
                _fail(
                    1,
                    f"batch {k} ({w.where} in the step loop), {what} ({name}) vs the "
                    f"step loop: {difference}.",
                )
    want_stats = want[upto - 1].stats
    for name, got in (("consume", state), ("collect", state_c)):
        if _read_stats(got) != want_stats:
            _fail(
                1,
                f"the Stats after {what} ({name}) differ from the step loop: "
                f"{_stats_difference(_read_stats(got), want_stats)}.",
            )
    if not flush:
        got = checker.drain(checker.functions()[1], state, "after consume")
        checker.compare(1, got, want[checker.n :], f"draining after {what}", "the step loop")


def check_consumer_traces(checker: Any) -> None:
    """The one-call-site rule: each `jb.scan` program traces the consumer once, and a
    stream continued from the state `scan` returned reuses that program (no retrace)."""
    traces = {"flushed": 0, "continued": 0}

    def consumer(name):
        def fn(carry, batch):
            traces[name] += 1
            for b in _batches(batch):
                carry = carry + jnp.sum(b.valid_mask, dtype=jnp.int32)
            return carry

        return fn

    half = checker.n // 2
    first, second = (
        jax.tree.map(lambda x, a=a: x[a : a + half], checker.elements) for a in (0, half)
    )
    zero = jnp.zeros((), jnp.int32)
    try:
        scan(checker.batcher, consumer("flushed"), zero, checker.elements, key=checker.key)
        continued = consumer("continued")
        _, state = scan(checker.batcher, continued, zero, first, state=checker.init(), flush=False)
        scan(checker.batcher, continued, zero, second, state=state, flush=False)
    except AssertionError:
        raise
    except Exception as e:
        _fail(1, f"`jb.scan` failed: {e}")
    if traces["flushed"] != 1:
        _fail(
            2,
            f"`jb.scan` traced the consumer {traces['flushed']} times in one program; the "
            "consumer (a user's train step) must be compiled once: a bulk `feed` describes "
            "its batches as `jb.Emissions` and the driver calls the consumer at one site.",
        )
    if traces["continued"] != 1:
        _fail(
            2,
            f"continuing a stream with `jb.scan(..., state=state, flush=False)` on a chunk "
            f"of the same shape traced the consumer {traces['continued']} times (once is "
            "right): the state that `feed` or `step` returns differs from `init`'s in tree "
            "structure, dtype or weak type, so the whole program (and the train step in "
            "it) is compiled again for every chunk.",
        )

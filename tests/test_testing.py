"""`jaxbatch.testing`: `check_batcher` passes a lawful batcher and names the law a broken one
breaks; the hypothesis strategies draw what they promise.

Each broken batcher is `fixed_size` with one function wrapped to break one law.
"""

import dataclasses
import pathlib
import runpy
import subprocess
import sys
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import io_callback

import jaxbatch as jb
from jaxbatch.testing import CheckReport, check_batcher, strategies as jbst

N = 7
STREAM = {
    "x": jnp.arange(N, dtype=jnp.int32),
    "y": jnp.arange(2 * N, dtype=jnp.float32).reshape(N, 2),
}
# The broken batchers fail before the checks these turn off; keep their runs short.
QUICK = {"check_vmap": False, "resume_steps": 2}


def fixed_size_reference(batch_size, drop_remainder=False, pad_value=0):
    """`fixed_size` in plain Python: a list of elements to a list of (data, valid_mask)."""

    def reference(elements):
        batches = []
        for start in range(0, len(elements), batch_size):
            rows = elements[start : start + batch_size]
            if len(rows) < batch_size and drop_remainder:
                break
            pad = [jax.tree.map(lambda x: np.full_like(x, pad_value), rows[0])]
            data = jax.tree.map(lambda *xs: np.stack(xs), *rows, *pad * (batch_size - len(rows)))
            batches.append((data, np.arange(batch_size) < len(rows)))
        return batches

    return reference


# --------------------------------------------------------------------------- lawful


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch_size, drop_remainder, pad_value",
    [(2, False, -1), (3, True, 0), (1, False, 0)],
)
def test_fixed_size_obeys_the_laws(batch_size, drop_remainder, pad_value):
    batcher = jb.fixed_size(batch_size, drop_remainder=drop_remainder, pad_value=pad_value)
    reference = fixed_size_reference(batch_size, drop_remainder, pad_value)
    report = check_batcher(batcher, STREAM, reference=reference, resume_steps=4)
    assert isinstance(report, CheckReport)
    assert report.num_elements == N
    assert report.num_batches == (N // batch_size if drop_remainder else -(-N // batch_size))
    assert report.stats["accepted"] == N
    assert report.stats["dropped"] == (N % batch_size if drop_remainder else 0)
    assert report.stats["padded"] == (0 if drop_remainder else -N % batch_size)
    assert set(report.checks) >= {"jit", "one trace", "scan", "batch_all", "feed", "vmap"}
    assert report.resumed_at == (0, 2, 5, 7)


def test_elements_with_state_and_metadata():
    stream = jb.Element(
        data={"x": jnp.arange(5.0)},
        state={"seen": jnp.arange(5, dtype=jnp.int32)},
        metadata=jb.Metadata(index=jnp.arange(5), epoch=0),
    )
    report = check_batcher(jb.fixed_size(2), stream, check_vmap=False, resume_steps=[0, 3])
    assert report.num_batches == 3 and report.resumed_at == (0, 3)


def test_repeated_values_are_matched_as_a_multiset():
    stream = {"x": jnp.array([1, 1, 2, 1], dtype=jnp.int32)}
    assert check_batcher(jb.fixed_size(3), stream, **QUICK).stats["emitted"] == 4


@settings(max_examples=3)
@given(jbst.streams(jbst.element_trees(max_leaves=3, max_side=2), 2, 5), jbst.fixed_size_configs())
def test_fixed_size_on_random_streams(stream, config):
    # Eager laws only: every example has new shapes, so the jitted paths would recompile.
    reference = fixed_size_reference(**config)
    kwargs = {"check_jit": False, "check_vmap": False, "resume_steps": 2}
    check_batcher(jb.fixed_size(**config), stream, reference=reference, **kwargs)


@pytest.mark.slow
def test_custom_batcher_example_runs():
    path = pathlib.Path(__file__).parents[1] / "examples" / "custom_batcher.py"
    example = runpy.run_path(str(path), run_name="custom_batcher")
    report = example["main"]()
    assert report.stats["skipped"] == report.num_elements // 2
    assert "bad input" in report.checks


# --------------------------------------------------------------------------- broken

BASE = jb.fixed_size(2)


def replace_emit(emit, **fields):
    return emit._replace(batch=dataclasses.replace(emit.batch, **fields))


def test_law_1_hidden_python_state():
    position = [0]  # the write position kept in Python, not in the state

    def init(spec, key=None):
        position[0] = 0
        return BASE.init(spec)

    def step(state, element):
        state = dataclasses.replace(state, count=jnp.int32(position[0]))
        position[0] = (position[0] + 1) % 2  # under jit, runs once: at trace time
        return BASE.step(state, element)

    broken = BASE._replace(init=init, step=step, feed=None)
    with pytest.raises(
        AssertionError, match=r"Law 1 \(pure\): at step 1 .*jax.jit\(batcher.step\)"
    ):
        check_batcher(broken, STREAM, **QUICK)


class StaticCountState(eqx.Module):
    buffer: jb.Element
    count: int = eqx.field(static=True)  # the bug: a changing value in a static field
    stats: jb.Stats


def test_law_2_retrace_on_every_step():
    def init(spec, key=None):
        state = BASE.init(spec)
        return StaticCountState(state.buffer, 0, state.stats)

    def through_base(fn, count, state, *args):
        inner = jb.FixedSizeState(state.buffer, jnp.int32(state.count), state.stats)
        inner, emit = fn(inner, *args)
        return StaticCountState(inner.buffer, count, inner.stats), emit

    broken = jb.Batcher(
        init,
        lambda state, element: through_base(BASE.step, (state.count + 1) % 2, state, element),
        lambda state: through_base(BASE.flush, 0, state),
    )
    with pytest.raises(AssertionError, match=r"Law 2 .*traced 2 times.*static fields"):
        check_batcher(broken, STREAM, **QUICK)


def test_law_2_flush_emits_another_shape():
    def flush(state):
        state, emit = BASE.flush(state)
        return state, emit._replace(batch=jax.tree.map(lambda x: x[:1], emit.batch))

    with pytest.raises(AssertionError, match=r"Law 2 .*flush call 1, .*shape \(1,\)"):
        check_batcher(BASE._replace(flush=flush), STREAM, **QUICK)


def test_law_3_flush_never_stops():
    def flush(state):
        state, emit = BASE.flush(state)
        return state, emit._replace(ready=jnp.array(True))

    with pytest.raises(AssertionError, match=r"Law 3 .*still ready after max_flushes=5"):
        check_batcher(BASE._replace(flush=flush), STREAM, max_flushes=5, **QUICK)


def test_law_4_element_lost():
    dropping = jb.fixed_size(2, drop_remainder=True)

    def flush(state):  # drops the partial batch without counting it
        new_state, emit = dropping.flush(state)
        return dataclasses.replace(new_state, stats=state.stats), emit

    with pytest.raises(AssertionError, match=r"Law 4 .*input rows \[6\] never came out"):
        check_batcher(dropping._replace(flush=flush), STREAM, **QUICK)


def test_law_4_stale_rows_re_emitted():
    def flush(state):  # emits the whole buffer: a row of the last batch comes out again
        new_state, emit = BASE.flush(state)
        valid_mask = jnp.broadcast_to(emit.ready, (2,))
        return new_state, replace_emit(emit, data=state.buffer.data, valid_mask=valid_mask)

    with pytest.raises(AssertionError, match=r"Law 4 .*element 5 \(input row 5\) was emitted 2"):
        check_batcher(BASE._replace(flush=flush), STREAM, **QUICK)


def test_law_4_element_invented():
    def step(state, element):
        state, emit = BASE.step(state, element)
        return state, replace_emit(emit, data=jax.tree.map(lambda x: x + 1, emit.batch.data))

    with pytest.raises(AssertionError, match=r"Law 4 .*batch 0 row 0 .*matches no input"):
        check_batcher(BASE._replace(step=step, feed=None), STREAM, **QUICK)


def test_law_4_mask_leaks_when_not_ready():
    def step(state, element):
        state, emit = BASE.step(state, element)
        return state, replace_emit(emit, valid_mask=jnp.arange(2) < state.count)

    with pytest.raises(AssertionError, match=r"Law 4 .*step 0 \(input row 0\).*not-ready"):
        check_batcher(BASE._replace(step=step, feed=None), STREAM, **QUICK)


def test_law_4_counters_disagree():
    def step(state, element):
        state, emit = BASE.step(state, element)
        return dataclasses.replace(state, stats=state.stats.add(batches=1)), emit

    with pytest.raises(AssertionError, match=r"Law 4 .*after step 0 \(input row 0\), the Stats"):
        check_batcher(BASE._replace(step=step, feed=None), STREAM, **QUICK)


def reversed_rows(emit):
    return emit._replace(batch=jax.tree.map(lambda x: jnp.flip(x, 0), emit.batch))


def test_law_5_reorders_while_claiming_fifo():
    def step(state, element):
        state, emit = BASE.step(state, element)
        return state, reversed_rows(emit)

    broken = BASE._replace(step=step, feed=None)
    with pytest.raises(AssertionError, match=r"Law 5 .*input row 0 came out after input row 1"):
        check_batcher(broken, STREAM, **QUICK)
    assert "order" not in check_batcher(broken, STREAM, fifo=False, **QUICK).checks


@pytest.mark.slow
def test_law_6_progress_kept_on_the_host():
    host = {"position": 0}  # survives `jit`, but not a save and load

    def init(spec, key=None):
        host["position"] = 0
        return BASE.init(spec)

    def next_position():
        position, host["position"] = host["position"], (host["position"] + 1) % 2
        return np.int32(position)

    def step(state, element):
        position = io_callback(next_position, jax.ShapeDtypeStruct((), jnp.int32), ordered=True)
        return BASE.step(dataclasses.replace(state, count=position), element)

    broken = BASE._replace(init=init, step=step, feed=None)
    with pytest.raises(AssertionError, match=r"Law 6 .*resumed from the loaded state"):
        check_batcher(broken, STREAM, check_vmap=False)


def test_law_7_position_from_a_32_bit_counter():
    base = jb.fixed_size(3)

    def step(state, element):  # the write position from the low word: wraps at 2**32
        position = (state.stats.accepted.lo % 3).astype(jnp.int32)
        return base.step(dataclasses.replace(state, count=position), element)

    with pytest.raises(AssertionError, match=r"Law 7 .*started at 2\*\*32 - 2"):
        check_batcher(base._replace(step=step, feed=None), STREAM, **QUICK)


def test_law_8_silently_casts_bad_input():
    spec = jax.tree.map(lambda x: x[0], STREAM)

    def step(state, element):
        data = element.data if isinstance(element, jb.Element) else element
        return BASE.step(state, jax.tree.map(lambda x, s: x.astype(s.dtype), data, spec))

    with pytest.raises(
        AssertionError, match=r"Law 8 .*`element\['x'\]` has dtype float32 .*without"
    ):
        check_batcher(BASE._replace(step=step), STREAM, check_vmap=False, resume_steps=0)


# --------------------------------------------------------------------------- units

REBATCH = jb.rebatch(3, pad_value=-9)


def batch_stream():
    """4 input batches of 2 rows for `rebatch`: 6 valid rows (0..5) and 2 padding rows."""
    rows = [[0, 1], [2, -1], [-1, 3], [4, 5]]
    batches = [
        jb.Batch(data={"x": jnp.array(r, jnp.int32)}, valid_mask=jnp.array(r) >= 0) for r in rows
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def rows(batch):
    """A `rebatch` element's units: its valid rows as they come out, None for padding."""
    row = jb.Element(data=batch.data, state=batch.states, metadata=batch.metadata)
    return [
        jax.tree.map(lambda x, r=r: x[r], row) if valid else None
        for r, valid in enumerate(np.asarray(batch.valid_mask))
    ]


def when_ready(change):
    """`rebatch` whose ready batches `change(batch)` alters, the Stats untouched."""

    def step(state, element):
        state, emit = REBATCH.step(state, element)
        changed = change(emit.batch)
        return state, emit._replace(
            batch=jax.tree.map(lambda a, b: jnp.where(emit.ready, a, b), changed, emit.batch)
        )

    return REBATCH._replace(step=step)


@pytest.mark.parametrize(
    "change, match",
    [
        (  # the last row re-reads the first: row 0 twice, row 2 lost
            lambda b: dataclasses.replace(b, data={"x": b.data["x"].at[2].set(b.data["x"][0])}),
            r"Law 4 .*element 0's unit 0 \(.*\) was emitted 2 times: at batch 0 row 0 .* and "
            r"at batch 0 row 2",
        ),
        (  # a row masked out, yet counted as emitted
            lambda b: dataclasses.replace(b, valid_mask=b.valid_mask.at[2].set(False)),
            r"Law 4 .*4 units never came out .*\(2 of them None from `units`.*skipped \(2\)\. "
            r"Those that never came out: element 1's unit 0 \(.*=2\)",
        ),
        (  # a padding row comes out as valid (as when rows are not compacted)
            lambda b: dataclasses.replace(b, data={"x": jnp.array([0, 1, -1], jnp.int32)}),
            r"Law 4 .*batch 0 row 2 .* matches no unit of an input element: .data\['x'\]=-1",
        ),
        (  # rows reversed
            lambda b: jax.tree.map(lambda x: jnp.flip(x, 0), b),
            r"Law 5 .*element 0's unit 1 came out after element 1's unit 0",
        ),
    ],
    ids=["duplicated", "lost", "padding leaked", "reordered"],
)
def test_units_catch_a_broken_rebatch(change, match):
    with pytest.raises(AssertionError, match=match):
        check_batcher(when_ready(change), batch_stream(), units=rows, **QUICK)


def test_units_refused_on_arrival_are_skipped():
    def step(state, element):  # padding rows accepted, then dropped: Stats balance, wrongly
        new_state, emit = REBATCH.step(state, element)
        # `jb.batch_spec` steps an `Element` wrapping the batch
        batch = element.data if isinstance(element, jb.Element) else element
        stats = state.stats.add(
            accepted=2,
            dropped=jnp.sum(~batch.valid_mask, dtype=jnp.int32),
            batches=emit.ready,
            emitted=jnp.where(emit.ready, 3, 0),
        )
        return dataclasses.replace(new_state, stats=stats), emit

    with pytest.raises(AssertionError, match=r"Law 4 .*element 1 brings 1 unit\(s\) that never"):
        check_batcher(REBATCH._replace(step=step), batch_stream(), units=rows, **QUICK)


def test_units_pass_rebatch_and_say_what_an_element_brings():
    report = check_batcher(REBATCH, batch_stream(), units=rows, check_jit=False, **QUICK)
    assert report.stats["accepted"] == 6 and report.stats["skipped"] == 2

    # Padding rows are counted (as skipped): leaving them out of the units is caught.
    def valid_rows(batch):
        return [row for row in rows(batch) if row is not None]

    with pytest.raises(AssertionError, match=r"Law 4 .*skipped \(2\), but only 0 units .*None"):
        check_batcher(REBATCH, batch_stream(), units=valid_rows, check_jit=False, **QUICK)


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_flushes": 0}, "`max_flushes` must be a positive int"),
        ({"fifo": "yes"}, "`fifo` must be a bool"),
        ({"resume_steps": [8]}, r"`resume_steps` must be steps in \[0, 7\]"),
        ({"units": 3}, "`units` must be a function"),
        ({"batch_units": len}, "`batch_units` reads units out of batches; it needs `units`"),
        ({"units": len, "lengths": {"x": "y"}}, "`lengths` .* or `units` .*, not both"),
        ({"units": lambda e: e["x"]}, "`units` must return a list: .* for element 0 it"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_batcher(BASE, STREAM, **kwargs)


def test_one_element_is_too_few():
    with pytest.raises(ValueError, match="at least 2 elements"):
        check_batcher(BASE, {"x": jnp.zeros((1, 3))})


# --------------------------------------------------------------------------- strategies


@settings(max_examples=20)
@given(jbst.streams(jbst.element_trees(), min_size=2, max_size=6))
def test_streams_of_element_trees_stack(stream):
    leaves = jax.tree.leaves(stream)
    assert isinstance(stream, dict) and leaves
    assert len({len(leaf) for leaf in leaves}) == 1 and 2 <= len(leaves[0]) <= 6
    assert {leaf.dtype for leaf in leaves} <= set(jbst.DTYPES)


@settings(max_examples=20)
@given(jbst.streams(jbst.variable_length_sequences(max_len=5, min_len=1, pad_value=-1), 1, 4))
def test_variable_length_sequences_are_padded(stream):
    tokens, lengths = stream["tokens"], stream["length"]
    assert tokens.shape == (len(lengths), 5) and lengths.dtype == np.int32
    assert ((1 <= lengths) & (lengths <= 5)).all()
    assert all((row[n:] == -1).all() for row, n in zip(tokens, lengths))


@settings(max_examples=20)
@given(jbst.fixed_size_configs(max_batch_size=3))
def test_fixed_size_configs_build(config):
    assert set(config) == {"batch_size", "drop_remainder", "pad_value"}
    assert isinstance(jb.fixed_size(**config), jb.Batcher)


def test_streams_refuse_elements_of_different_shapes():
    mixed = st.integers(1, 2).map(lambda k: {"a": np.zeros(k, np.float32)})

    @settings(max_examples=50)
    @given(jbst.streams(mixed, min_size=4, max_size=4))
    def draw(stream):
        pass

    with pytest.raises(ValueError, match="`streams` drew element"):
        draw()


def test_strategies_check_their_arguments():
    with pytest.raises(ValueError, match="`max_len` must be a positive int"):
        jbst.variable_length_sequences(max_len=0)
    with pytest.raises(ValueError, match="`max_size` must be an int >= min_size"):
        jbst.streams(min_size=3, max_size=2)


def test_import_jaxbatch_does_not_import_hypothesis():
    code = (
        "import sys, jaxbatch, jaxbatch.testing; "
        "assert 'hypothesis' not in sys.modules, 'hypothesis imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class _LastFed(eqx.Module):
    """`fixed_size`'s state plus the size of the last chunk `feed` took: None until then."""

    inner: jb.FixedSizeState
    last_fed: Any

    @property
    def stats(self):
        return self.inner.stats


def test_a_bulk_feed_whose_state_drifts_recompiles_the_consumer():
    # The batches are right, but the state `feed` returns has another tree structure than
    # `init`'s (None became an array): every chunk of a continued stream recompiles the
    # program, train step included.
    def init(spec, key=None):
        return _LastFed(BASE.init(spec), None)

    def step(state, element):
        inner, emit = BASE.step(state.inner, element)
        return _LastFed(inner, state.last_fed), emit

    def flush(state):
        inner, emit = BASE.flush(state.inner)
        return _LastFed(inner, state.last_fed), emit

    def feed(state, elements, flush=False):
        inner, emissions = BASE.feed(state.inner, elements, flush)
        return _LastFed(inner, jnp.int32(len(jax.tree.leaves(elements)[0]))), emissions

    drifting = jb.Batcher(init, step, flush, feed)
    with pytest.raises(AssertionError, match=r"Law 2 .*traced the consumer 2 times \(once is"):
        check_batcher(drifting, STREAM, check_vmap=False, resume_steps=())


def test_old_style_feed_that_calls_the_consumer_fails_loudly():
    # A bulk path written against the old protocol, `feed(state, elements, fn, carry)`,
    # calling the consumer at two sites: the protocol no longer hands it the consumer.
    def feed(state, elements, fn, carry):
        carry = fn(carry, BASE.step(state, jax.tree.map(lambda x: x[0], elements))[1].batch)
        return state, fn(carry, BASE.flush(state)[1].batch)

    with pytest.raises(AssertionError, match=r"bulk path .*`feed\(state, elements, flush"):
        check_batcher(BASE._replace(feed=feed), STREAM, **QUICK)

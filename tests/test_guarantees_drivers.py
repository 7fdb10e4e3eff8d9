"""Issue 17, the driver and host-path classes: every law holds at the edges, or the user gets
a clear error. One section per class, headed by its number in the issue:

1. `iterate` after an error loses no rows: later `next()` calls raise, and the checkpoint
   taken before the error resumes exactly.
2. Stream leaves of different leading lengths raise in every driver and every `feed`.
4. The host path never narrows a value silently (int64 `2**40`, float64 `1e300`, ragged
   rows of different dtypes).
6. A run-time check failing inside a driver raises `jb.BatcherRuntimeError` whose first
   line is jaxbatch's sentence and names the element's position.
7. A `flush` that never stops raises naming law 3 instead of hanging.
10. The drivers' own unclear errors (a list of elements, a 0-d leaf, bad
    `max_batches_per_chunk`, `iterate` of a string, an empty `load_distributed` directory,
    the last chunk's row index, a `Bucketed` reaching a plain consumer).
11. One calling convention: `(batcher, fn, carry, state, elements)` in, `(carry, state)` out.

Shapes are tiny and batchers are built once at module level, so each jitted driver
compiles once for the whole file.
"""

import functools
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb

FIXED = jb.fixed_size(2)
PACK = jb.pack(4, 2, lengths={"tokens": "length"})
KEYED = jb.bucket_by(lambda e: e.data["k"], (2, 2))


def _rows_of(batches):
    """The valid `x` values of host batches, in order."""
    return [int(x) for b in batches for x, m in zip(b.data["x"], b.valid_mask) if m]


# --------------------------------------------------------------------------- 1. errors lose no rows


class _Flaky:
    """An iterator over `rows` that raises `OSError` once, when about to yield row `fail_at`,
    and then goes on (as a network reader that the caller may retry)."""

    def __init__(self, rows, fail_at):
        self.rows, self.fail_at, self.i, self.failed = rows, fail_at, 0, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at and not self.failed:
            self.failed = True
            raise OSError("the disk went away")
        if self.i >= len(self.rows):
            raise StopIteration
        self.i += 1
        return self.rows[self.i - 1]


N_ROWS = 9
ROWS = [{"x": np.int32(i)} for i in range(N_ROWS)]


def _resume_after(it, taken, source, chunk_size):
    """`taken` plus what a run resumed from `it`'s checkpoint yields (from the start if
    nothing was committed yet)."""
    try:
        checkpoint = it.checkpoint()
    except ValueError:  # the error came before the first chunk: nothing to resume from
        checkpoint = None
    rest = jb.iterate(FIXED, source, chunk_size=chunk_size, resume=checkpoint)
    return taken + _rows_of(rest)


@settings(max_examples=12)
@given(fail_at=st.integers(0, N_ROWS - 1), chunk_size=st.sampled_from([1, 3]))
def test_1_a_source_error_loses_no_row_and_the_checkpoint_resumes_exactly(fail_at, chunk_size):
    it = jb.iterate(FIXED, _Flaky(ROWS, fail_at), chunk_size=chunk_size)
    taken = []
    with pytest.raises(OSError, match="disk"):
        for batch in it:
            taken += _rows_of([batch])
    # The source would go on, but the rows read into the failing chunk are gone: every
    # later `next()` raises instead of ending quietly or skipping them.
    for _ in range(2):
        with pytest.raises(RuntimeError, match="stopped at an earlier error.*OSError"):
            next(it)
    assert _resume_after(it, taken, ROWS, chunk_size) == list(range(N_ROWS))


@settings(max_examples=8)
@given(bad=st.integers(0, N_ROWS - 1))
def test_1_a_refused_row_stops_the_iterator_and_the_checkpoint_resumes_exactly(bad):
    rows = [{"x": np.int64(i)} for i in range(N_ROWS)]
    rows[bad] = {"x": np.int64(2**40 + bad)}  # does not fit int32: refused (class 4)
    it = jb.iterate(FIXED, rows, chunk_size=3)
    taken = []
    with pytest.raises(ValueError, match=rf"source\[{bad}\]"):
        for batch in it:
            taken += _rows_of([batch])
    with pytest.raises(RuntimeError, match="stopped at an earlier error"):
        next(it)
    fixed = [{"x": np.int64(i)} for i in range(N_ROWS)]
    assert _resume_after(it, taken, fixed, 3) == list(range(N_ROWS))


# --------------------------------------------------------------------------- 2. one stream length


@functools.cache
def _in_jit(name):
    """A driver used inside the user's own `jit`."""
    count = lambda c, b: c + 1  # noqa: E731
    state = FIXED.init({"x": jnp.zeros((), jnp.int32), "y": jnp.zeros((), jnp.int32)})
    if name == "consume":
        return lambda xs: jax.jit(lambda e: jb.consume(FIXED, count, 0, state, e))(xs)
    return lambda xs: jax.jit(lambda e: jb.collect(FIXED, state, e, 4))(xs)


def _drivers():
    spec_xy = {"x": jnp.zeros((), jnp.int32), "y": jnp.zeros((), jnp.int32)}
    return {
        "batch_all": lambda xs: jb.batch_all(FIXED, xs),
        "scan": lambda xs: jb.scan(FIXED, lambda c, b: c, 0, xs),
        "consume": _in_jit("consume"),
        "collect": _in_jit("collect"),
        "bucket_by": lambda xs: jb.batch_all(
            KEYED, {**xs, "k": jnp.zeros(len(xs["x"]), jnp.int32)}, max_batches=8
        ),
        "fixed_size.feed": lambda xs: FIXED.feed(FIXED.init(spec_xy), xs),
        "shuffle.feed": lambda xs: _feed(jb.shuffle(2, 4), xs, key=jax.random.key(0)),
        "map_elements.feed": lambda xs: _feed(jb.map_elements(FIXED, lambda e: e), xs),
    }


def _feed(batcher, xs, key=None):
    state = batcher.init(jax.tree.map(lambda x: x[0], xs), key=key)
    return batcher.feed(state, xs)


@pytest.mark.parametrize("lengths", [(4, 5), (5, 4), (3, 1)])
@pytest.mark.parametrize("driver", list(_drivers()))
def test_2_leaves_of_different_lengths_are_refused(driver, lengths):
    nx, ny = lengths
    xs = {"x": jnp.arange(nx, dtype=jnp.int32), "y": jnp.arange(ny, dtype=jnp.int32)}
    with pytest.raises(ValueError, match="different leading lengths") as info:
        _drivers()[driver](xs)
    message = str(info.value)
    assert f"['x']`: {nx}" in message and f"['y']`: {ny}" in message


def test_2_pack_feed_refuses_leaves_of_different_lengths():
    xs = {"tokens": jnp.ones((3, 4), jnp.int32), "length": jnp.ones(2, jnp.int32)}
    with pytest.raises(ValueError, match=r"\['length'\]`: 2; `elements.data\['tokens'\]`: 3"):
        _feed(PACK, xs)


# --------------------------------------------------------------------------- 4. no silent narrowing


@settings(max_examples=10)
@given(
    row=st.integers(0, 4),
    value=st.one_of(st.integers(2**31, 2**62), st.integers(-(2**62), -(2**31) - 1)),
    python=st.booleans(),
)
def test_4_an_int_that_does_not_fit_int32_is_refused_by_row_and_leaf(row, value, python):
    rows = [{"x": np.int64(i)} for i in range(5)]
    rows[row] = {"x": value if python else np.int64(value)}
    with pytest.raises(ValueError, match=rf"source\[{row}\] leaf `element.data\['x'\]`.*int32"):
        list(jb.iterate(FIXED, rows, chunk_size=3))


def test_4_values_that_fit_pass_exactly():
    rows = [{"x": np.int64(v)} for v in (2**31 - 1, -(2**31), 5)]
    assert _rows_of(jb.iterate(FIXED, rows, chunk_size=3)) == [2**31 - 1, -(2**31), 5]


@pytest.mark.parametrize("value", [1e300, -1e39])
def test_4_a_float_that_overflows_float32_is_refused(value):
    rows = [{"x": 1.0}, {"x": 2.0}, {"x": value}]
    with pytest.raises(ValueError, match=r"source\[2\] leaf `element.data\['x'\]`.*float32"):
        list(jb.iterate(FIXED, rows, chunk_size=3))


def test_4_ragged_rows_of_different_dtypes_are_refused():
    docs = [{"tokens": np.arange(2, dtype=np.int32)}, {"tokens": np.arange(3, dtype=np.int64)}]
    with pytest.raises(TypeError, match=r"source\[1\]\['tokens'\] has dtype int64.*int32"):
        list(jb.iterate(FIXED, docs, chunk_size=2, ragged={"tokens": (4, "length")}))


# --------------------------------------------------------------------------- 6. run-time errors


BY_KEY = jb.by_bucket(lambda c, b: c + b.num_valid)
RUN = {
    "scan": lambda ks: jb.scan(KEYED, BY_KEY, jnp.int32(0), {"k": ks}),
    "batch_all": lambda ks: jb.batch_all(KEYED, {"k": ks}, max_batches=8),
    "iterate": lambda ks: list(
        jb.iterate(KEYED, [{"k": np.int32(k)} for k in ks], max_batches_per_chunk=8)
    ),
}


@settings(max_examples=6)
@given(bad=st.integers(0, 5), driver=st.sampled_from(list(RUN)))
def test_6_a_refused_element_is_named_on_the_first_line(bad, driver):
    keys = [0, 1, 1, 0, 1, 0]
    keys[bad] = 7  # outside the 2 buckets
    with pytest.raises(jb.BatcherRuntimeError) as info:
        RUN[driver](jnp.asarray(keys, jnp.int32))
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"`jb.{driver}`: element {bad} of ")
    assert "`data['k']`=7" in first and "outside [0, 2)" in first
    assert "CpuCallback" not in first and "filter_jit" not in str(info.value)
    assert info.value.position == bad
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)


def test_6_a_too_long_sequence_is_named():
    lengths = jnp.array([2, 1, 6, 1], jnp.int32)  # element 2 is longer than `row_length` 4
    xs = {"tokens": jnp.ones((4, 6), jnp.int32), "length": lengths}
    pattern = r"^`jb.scan`: element 2 of `elements` \(`data\['length'\]`=6\).*`row_length`=4"
    with pytest.raises(jb.BatcherRuntimeError, match=pattern):
        jb.scan(PACK, lambda c, b: c, jnp.int32(0), xs)


def test_6_a_check_in_the_consumer_says_so():
    def consumer(carry, batch):
        return jax.numpy.asarray(
            __import__("equinox").error_if(carry, batch.num_valid > 1, "my consumer refuses")
        )

    with pytest.raises(jb.BatcherRuntimeError, match="in the consumer `fn`.*my consumer") as info:
        jb.scan(FIXED, consumer, jnp.int32(0), {"x": jnp.arange(4)})
    assert info.value.position is None


# --------------------------------------------------------------------------- 7. no hangs


def _endless():
    """`fixed_size(2)` whose `flush` never stops being ready: breaks law 3."""

    def flush(state):
        state, emit = FIXED.flush(state)
        return state, emit._replace(ready=jnp.array(True))

    return jb.Batcher(FIXED.init, FIXED.step, flush)


ENDLESS = _endless()
# With the bulk `feed`, `iterate`'s chunks compile cheaply; its drain is still `flush`.
ENDLESS_FED = ENDLESS._replace(feed=FIXED.feed)


@pytest.mark.parametrize("driver", ["scan", "batch_all", "iterate", "drain", "scan_host"])
def test_7_a_flush_that_never_stops_raises_naming_law_3(driver):
    xs = {"x": jnp.arange(3, dtype=jnp.int32)}
    run = {
        "scan": lambda: jb.scan(ENDLESS, lambda c, b: c + 1, 0, xs),
        "batch_all": lambda: jb.batch_all(ENDLESS, xs, max_batches=100),
        "iterate": lambda: list(jb.iterate(ENDLESS_FED, ROWS[:4], chunk_size=3)),
        "drain": lambda: jax.jit(lambda s: jb.drain(ENDLESS, lambda c, b: c + 1, 0, s))(
            ENDLESS.init({"x": jnp.zeros((), jnp.int32)})
        ),
        "scan_host": lambda: jb.scan_host(ENDLESS_FED, lambda c, b: c + 1, 0, ROWS[:4]),
    }[driver]
    with pytest.raises(Exception, match="law 3") as info:
        jax.block_until_ready(run())
    if driver not in ("drain", "scan_host"):  # jaxbatch's sentence comes first
        assert "law 3" in str(info.value).splitlines()[0]


# --------------------------------------------------------------------------- 10. clear errors


def test_10_a_list_of_elements_or_a_0d_leaf_is_not_a_stream():
    with pytest.raises(ValueError, match="list of 2 elements.*Stack them"):
        jb.batch_all(FIXED, [{"x": 1}, {"x": 2}])
    with pytest.raises(ValueError, match=r"`elements.data\['x'\]` is 0-d"):
        jb.scan(FIXED, lambda c, b: c, 0, {"x": jnp.int32(3)})


@pytest.mark.parametrize("bad", [-1, 0, 2.5, "3", True])
def test_10_max_batches_per_chunk_is_checked(bad):
    with pytest.raises(ValueError, match=r"`max_batches_per_chunk` must be a positive int"):
        jb.iterate(FIXED, ROWS, max_batches_per_chunk=bad)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ("abc", ValueError, "got a str"),
        (b"abc", ValueError, "got a bytes"),
        ({"x": np.arange(3)}, ValueError, "a stacked stream"),
        (5, TypeError, "got a int"),
        ([{"x": "a"}], TypeError, r"source\[0\] leaf `\['x'\]` is a str"),
    ],
)
def test_10_iterate_of_a_non_stream(source, error, match):
    with pytest.raises(error, match=match):
        list(jb.iterate(FIXED, source))


def test_10_the_last_chunk_names_its_own_row():
    rows = [{"x": np.float32(i)} for i in range(6)]
    rows[5] = {"x": np.int32(5)}  # in the tail (rows 4, 5 of chunk_size 4)
    with pytest.raises(TypeError, match=r"source\[5\]"):
        list(jb.iterate(FIXED, rows, chunk_size=4))


def test_10_load_distributed_of_an_empty_directory(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    with pytest.raises(ValueError, match="is empty: it holds no checkpoint"):
        jb.load_distributed(tmp_path, like={"x": jnp.zeros(2)})
    (tmp_path / "stray").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint written by"):
        jb.load_distributed(tmp_path, like={"x": jnp.zeros(2)})


def test_10_a_bucketed_emission_reaching_a_plain_consumer():
    with pytest.raises(TypeError, match=r"emits a `Bucketed`.*jb.by_bucket\(fn\)"):
        jb.scan(KEYED, lambda c, b: c + b.num_valid, 0, {"k": jnp.array([0, 1, 0])})


# --------------------------------------------------------------------------- 11. one convention


def test_11_every_driver_takes_the_consumer_first_and_returns_the_state_last():
    names = {
        jb.scan: ["batcher", "fn", "carry", "elements"],
        jb.consume: ["batcher", "fn", "carry", "state", "elements"],
        jb.drain: ["batcher", "fn", "carry", "state"],
        jb.collect: ["batcher", "state", "elements", "capacity"],
    }
    for driver, want in names.items():
        positional = [
            p.name
            for p in inspect.signature(driver).parameters.values()
            if p.kind is p.POSITIONAL_OR_KEYWORD
        ]
        assert positional == want, driver.__name__

    xs = {"x": jnp.arange(5, dtype=jnp.int32)}
    state = FIXED.init({"x": jnp.zeros((), jnp.int32)})
    count = lambda c, b: c + b.num_valid  # noqa: E731
    carry, state = jb.consume(FIXED, count, jnp.int32(0), state, xs)
    assert int(carry) == 4 and isinstance(state, type(FIXED.init(xs)))
    carry, state = jb.drain(FIXED, count, carry, state)
    assert int(carry) == 5 and int(state.count) == 0
    batches, n, state = jb.collect(FIXED, state, xs, 3, flush=True)
    assert int(n) == 3 and isinstance(batches, jb.Batch)
    carry, state = jb.scan(FIXED, count, jnp.int32(0), xs)
    assert int(carry) == 5 and hasattr(state, "stats")
    changelog = pathlib.Path(__file__).parent.parent / "CHANGELOG.md"
    assert "### Breaking" in changelog.read_text() and "jb.consume" in changelog.read_text()

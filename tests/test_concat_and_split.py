"""`concat_and_split`: against the pure-Python reference (hypothesis), jit vs no jit, the
drivers, exact resume mid-row, one trace, vmap, errors, and Grain's ConcatThenSplit (with
its `meta_features`: our per-piece tables and `max_sequences_per_row`)."""

import functools
import importlib.util

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_concat as ref
from hypothesis import given, settings, strategies as st
from reference import STAT_NAMES, row_spec, unstack

import jaxbatch as jb

BOS = 99  # `bos_token_id` of the configurations with a BOS (on feature "x")


@functools.cache
def batcher_for(
    row_length,
    num_rows,
    features=("x",),
    pad_value=0,
    continue_positions=False,
    split_full=True,
    bos=False,
    cap=None,
):
    """One batcher per configuration, so that jitted runs of it are compiled once."""
    lengths = {k: f"{k}_len" for k in features}
    return jb.concat_and_split(
        dict(row_length) if isinstance(row_length, tuple) else row_length,
        num_rows,
        lengths=lengths,
        pad_value=pad_value,
        max_sequences_per_row=cap,
        continue_positions=continue_positions,
        split_full_length_features=split_full,
        **(
            {
                "bos_handling": "replace_first_token_with_bos",
                "bos_features": ("x",),
                "bos_token_id": BOS,
            }
            if bos
            else {}
        ),  # fmt: skip
    )


@functools.cache
def _jitted(batcher):
    return jax.jit(batcher.step), jax.jit(batcher.flush)


def runners(batcher, use_jit):
    """`scan(state, stream) -> (state, stacked emits)` stepping one element at a time from
    Python (so one compile per batcher and element shape, whatever the stream length), and
    `flush`: jitted, or called as they are."""
    step, flush = _jitted(batcher) if use_jit else (batcher.step, batcher.flush)

    def scan(state, stream):
        emits = []
        for element in unstack(stream) if len(stream["x_len"]) else []:
            state, emit = step(state, element)
            emits.append(jax.device_get(emit))
        if not emits:  # an empty stream: no emissions, stacked with a leading axis of 0
            spec = jax.eval_shape(batcher.step, state, row_spec(stream))[1]
            return state, jax.tree.map(lambda x: np.zeros((0, *x.shape), x.dtype), spec)
        return state, jax.tree.map(lambda *xs: np.stack(xs), *emits)

    return scan, flush


def as_ref(batch):
    """A `Batch` as the reference's `(data, valid_mask)`, NumPy."""
    batch = jax.device_get(batch)
    data = {k: jax.tree.map(np.asarray, v) for k, v in batch.data.items()}
    return data, np.asarray(batch.valid_mask)


def flush_all(flush, state, limit=3):
    batches = []
    for _ in range(limit):
        state, emit = flush(state)
        if not bool(emit.ready):
            assert not np.asarray(emit.batch.valid_mask).any()
            return state, batches
        batches.append(as_ref(emit.batch))
    raise AssertionError(f"`flush` still ready after {limit} calls")


def stats_of(state):
    return {name: int(getattr(state.stats, name)) for name in STAT_NAMES}


def counts(tree):
    return {k: int(v) for k, v in tree.items()}


def ready_batches(emits):
    emits = jax.device_get(emits)
    ready = np.asarray(emits.ready)
    return [as_ref(jax.tree.map(lambda x, i=i: x[i], emits.batch)) for i in np.flatnonzero(ready)]


def limits_of(config):
    """Each packed feature's row length (`config["row_length"]`: an int, or pairs)."""
    row_length = config["row_length"]
    if isinstance(row_length, tuple):
        return dict(row_length)
    return dict.fromkeys(config["features"], row_length)


@st.composite
def configs(draw, features=("x",), per_feature=False):
    """A configuration; `per_feature`: a row length of its own for each feature (as pairs,
    so that the cached batcher factory can hash it)."""
    sizes = st.sampled_from([1, 2, 3, 4])
    if per_feature:
        limit = {k: draw(sizes, label=f"row_length[{k}]") for k in features}
        row_length = tuple(limit.items())
    else:
        row_length = draw(sizes, label="row_length")
        limit = dict.fromkeys(features, row_length)
    num_rows = draw(st.sampled_from([1, 2, 3]), label="num_rows")
    # max_len from the interesting values: 1, row_length, past row_length, the bound.
    max_len = {}
    for k in features:
        r, capacity = limit[k], limit[k] * num_rows
        max_len[k] = draw(st.sampled_from(sorted({1, r, min(r + 1, capacity), capacity})))
    n = draw(st.integers(0, 9), label="n")
    lengths = {
        k: draw(st.lists(st.integers(0, max_len[k]), min_size=n, max_size=n)) for k in features
    }
    return {
        "row_length": row_length,
        "num_rows": num_rows,
        "features": features,
        "max_len": max_len,
        "lengths": lengths,
        "pad_value": draw(st.sampled_from([0, -1])),
        "continue_positions": draw(st.booleans()),
        "split_full": draw(st.booleans()),
        "bos": draw(st.booleans()),
        "cap": draw(st.sampled_from([None, 1, 2, 3]), label="max_sequences_per_row"),
        "meta": draw(st.sampled_from([(), ("src",), ("src", "info")]), label="meta"),
        "seed": draw(st.integers(0, 2**16)),
    }


def setup(config):
    batcher = batcher_for(
        config["row_length"],
        config["num_rows"],
        config["features"],
        config["pad_value"],
        config["continue_positions"],
        config["split_full"],
        config["bos"],
        config["cap"],
    )
    stream = ref.make_stream(config["lengths"], config["max_len"], config["seed"], config["meta"])
    expected = ref.concat_and_split(
        ref.sequences_of(stream),
        limits_of(config),
        config["num_rows"],
        like=ref.like_of(stream),
        meta_like=ref.meta_like_of(stream),
        pad_value=config["pad_value"],
        max_sequences_per_row=config["cap"],
        continue_positions=config["continue_positions"],
        split_full_length_features=config["split_full"],
        bos_features=("x",) if config["bos"] else (),
        bos_token_id=BOS,
    )
    return batcher, stream, expected


# --------------------------------------------------------------------------- reference


def check_run(batcher, stream, expected, use_jit):
    scan, flush = runners(batcher, use_jit)
    state, emits = scan(batcher.init(row_spec(stream)), stream)
    ready = np.asarray(emits.ready)
    np.testing.assert_array_equal(ready, np.array(expected.ready, dtype=bool).reshape(-1))
    not_ready_masks = np.asarray(emits.batch.valid_mask)[~ready]
    assert not not_ready_masks.any()
    assert stats_of(state) == expected.stats_before_flush
    s = stats_of(state)
    assert s["accepted"] == s["emitted"] + int(state.pending)
    state, flushed = flush_all(flush, state)
    assert len(flushed) <= 1
    chex.assert_trees_all_equal(ready_batches(emits) + flushed, expected.batches)
    assert stats_of(state) == expected.stats
    assert counts(state.tokens) == expected.tokens
    assert counts(state.padding_tokens) == expected.padding_tokens


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
@settings(max_examples=4)
@given(config=configs())
def test_one_feature_matches_reference(use_jit, config):
    check_run(*setup(config), use_jit)


@settings(max_examples=3)
@given(config=configs(features=("x", "y"), per_feature=True))
def test_per_feature_row_lengths_match_reference(config):
    check_run(*setup(config), use_jit=True)


@pytest.mark.slow
@settings(max_examples=4)
@given(config=configs(features=("x", "y")))
def test_two_features_match_reference(config):
    check_run(*setup(config), use_jit=True)


def test_every_token_once_in_order_and_positions():
    batcher = batcher_for(3, 2)
    lengths = [1, 3, 6, 2, 0, 4, 5, 1]
    stream = ref.make_stream({"x": lengths}, {"x": 6}, 0)
    state, emits = runners(batcher, True)[0](batcher.init(row_spec(stream)), stream)
    _, flushed = flush_all(batcher.flush, state)
    batches = ready_batches(emits) + flushed
    tokens = np.concatenate([d["x"][d["x_segment_ids"] > 0] for d, _ in batches])
    want = np.concatenate([np.asarray(stream["x"])[i, :n] for i, n in enumerate(lengths)])
    np.testing.assert_array_equal(tokens, want)
    # Pieces cut at a row end go on in the next row, positions restarting at 0 (Grain).
    rows = np.concatenate([d["x"] for d, _ in batches])
    positions = np.concatenate([d["x_positions"] for d, _ in batches])
    segments = np.concatenate([d["x_segment_ids"] for d, _ in batches])
    np.testing.assert_array_equal(
        rows[:3], [[1000, 2000, 2001], [2002, 3000, 3001], [3002, 3003, 3004]]
    )
    np.testing.assert_array_equal(positions[:3], [[0, 0, 1], [0, 0, 1], [0, 1, 2]])
    np.testing.assert_array_equal(segments[:3], [[1, 2, 2], [1, 2, 2], [1, 1, 1]])
    final = stats_of(flush_all(batcher.flush, state)[0])
    assert final["skipped"] == 1 and final["accepted"] == final["emitted"] == 7


def test_continue_positions():
    batcher = batcher_for(3, 1, continue_positions=True)
    stream = ref.make_stream({"x": [2, 3]}, {"x": 3}, 0)
    state, emits = runners(batcher, True)[0](batcher.init(row_spec(stream)), stream)
    _, flushed = flush_all(batcher.flush, state)
    (first, _), (last, mask) = ready_batches(emits) + flushed
    np.testing.assert_array_equal(first["x_positions"], [[0, 1, 0]])
    np.testing.assert_array_equal(last["x_positions"], [[1, 2, 0]])
    np.testing.assert_array_equal(last["x_segment_ids"], [[1, 1, 0]])
    np.testing.assert_array_equal(mask, [True])


def test_cap_closes_rows_and_meta_tables_follow_the_pieces():
    """`max_sequences_per_row=2`: a row closes at its second piece (rows 0 and 2 are not
    full); sequence 3 spans two rows and its value is in both, at its piece's slot."""
    stream = ref.make_stream({"x": [1, 1, 6, 1, 2]}, {"x": 6}, 0, meta=("src",))
    rows = our_rows(batcher_for(4, 2, cap=2), stream)
    x, ids, src = (np.stack([r[k] for r in rows]) for k in ("x", "x_segment_ids", "src"))
    np.testing.assert_array_equal(
        x, [[1000, 2000, 0, 0], [3000, 3001, 3002, 3003], [3004, 3005, 4000, 0], [5000, 5001, 0, 0]]
    )
    np.testing.assert_array_equal(ids, [[1, 2, 0, 0], [1, 1, 1, 1], [1, 1, 2, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(src, [[1, 2], [3, 0], [3, 4], [5, 0]])
    assert len(our_rows(batcher_for(4, 2), stream)) == 3  # without the cap
    # The same rows as Grain's with a meta feature of length 2 (here it binds).
    if importlib.util.find_spec("grain") is not None:
        chex.assert_trees_all_equal(rows, grain_rows(stream, 4, meta_len=2))


# --------------------------------------------------------------------------- drivers


@pytest.mark.slow
@settings(max_examples=3)
@given(config=configs())
def test_drivers_give_the_reference_batches(config):
    batcher, stream, expected = setup(config)
    want = len(expected.batches)
    batches, count = jb.batch_all(batcher, stream, max_batches=want + 1)
    assert int(count) == want
    got = [as_ref(jax.tree.map(lambda x, k=k: x[k], batches)) for k in range(want)]
    chex.assert_trees_all_equal(got, expected.batches)
    assert not np.asarray(batches.valid_mask)[want:].any()

    spec = jb.batch_spec(batcher, row_spec(stream))
    out = jax.tree.map(lambda s: jnp.zeros((want + 1, *s.shape), s.dtype), spec)

    def append(carry, batch):
        out, k = carry
        out = jax.tree.map(lambda o, b: o.at[k].set(b), out, batch)
        return out, k + 1

    (out, k), state = jb.scan(batcher, append, (out, jnp.int32(0)), stream)
    assert int(k) == want
    got = [as_ref(jax.tree.map(lambda x, i=i: x[i], out)) for i in range(want)]
    chex.assert_trees_all_equal(got, expected.batches)
    assert stats_of(state) == expected.stats


# --------------------------------------------------------------------------- resume


@settings(max_examples=3)
@given(config=configs(), data=st.data())
def test_resume_from_saved_state_is_bit_identical(tmp_path, config, data):
    batcher, stream, _ = setup(config)
    n = len(config["lengths"]["x"])
    k = data.draw(st.integers(0, n), label="save after k steps")
    check_resume(batcher, stream, k, tmp_path)


def check_resume(batcher, stream, k, tmp_path):
    scan, flush = runners(batcher, True)
    spec = row_spec(stream)
    n = len(stream["x_len"])
    part = lambda lo, hi: jax.tree.map(lambda x: x[lo:hi], stream)  # noqa: E731
    state, emits = scan(batcher.init(spec), stream)
    final, flushed = flush_all(flush, state)

    saved, emits_a = scan(batcher.init(spec), part(0, k))
    path = tmp_path / "state.ckpt"
    jb.save_state(path, saved)
    loaded = jb.load_state(path, like=jax.eval_shape(batcher.init, spec))
    resumed, emits_b = scan(loaded, part(k, n))
    resumed_final, resumed_flushed = flush_all(flush, resumed)

    both = jax.tree.map(lambda a, b: np.concatenate([a, b]), emits_a, emits_b)
    chex.assert_trees_all_equal(both, emits)
    chex.assert_trees_all_equal(resumed_flushed, flushed)
    chex.assert_trees_all_equal(resumed_final, final)
    return saved


def test_resume_mid_row_and_mid_sequence(tmp_path):
    batcher = batcher_for(3, 2, ("x", "y"))
    stream = ref.make_stream({"x": [2, 5, 1, 4, 3], "y": [1, 4, 3, 0, 2]}, {"x": 5, "y": 4}, 1)
    saved = check_resume(batcher, stream, 2, tmp_path)
    # After 2 sequences (2 + 5 tokens of x): a batch is out, and the open batch is
    # mid-row: row 0 holds the last x token of sequence 2.
    assert int(saved.row) == 0 and int(saved.fill["x"]) == 1 and int(saved.pending) == 1


# --------------------------------------------------------------------------- traces, vmap


def test_one_trace_for_new_values():
    batcher = jb.concat_and_split(2, 2, lengths={"x": "x_len"})
    step = jax.jit(chex.assert_max_traces(batcher.step, n=1))
    flush = jax.jit(chex.assert_max_traces(batcher.flush, n=1))
    stream = ref.make_stream({"x": [1, 4, 2, 3, 0]}, {"x": 4}, 0)
    state = batcher.init(row_spec(stream))
    for element in unstack(stream):
        state, _ = step(state, element)
    state, _ = flush(state)
    state, emit = flush(state)
    assert not bool(emit.ready)


@pytest.mark.slow
def test_vmap_over_two_streams_equals_separate_runs():
    batcher = batcher_for(2, 2, cap=1)
    streams = [
        ref.make_stream({"x": ns}, {"x": 3}, 0, meta=("src",))
        for ns in ([1, 3, 2, 2, 3], [3, 0, 1, 3, 1])
    ]

    def run(stream):
        state, emits = jax.lax.scan(batcher.step, batcher.init(row_spec(streams[0])), stream)
        return batcher.flush(state), emits

    together = jax.jit(jax.vmap(run))(jax.tree.map(lambda a, b: np.stack([a, b]), *streams))
    for i, stream in enumerate(streams):
        chex.assert_trees_all_equal(
            jax.tree.map(lambda x, i=i: x[i], together), jax.jit(run)(stream)
        )


def test_batch_spec_is_the_shape_of_every_emit():
    batcher = batcher_for(3, 2, ("x", "y"))
    stream = ref.make_stream({"x": [2, 5], "y": [1, 4]}, {"x": 5, "y": 4}, 1)
    spec = jb.batch_spec(batcher, row_spec(stream))
    assert spec.data["x"].shape == (2, 3) and spec.data["y"].shape == (2, 3, 2)
    assert spec.data["x_segment_ids"].dtype == spec.data["y_positions"].dtype == jnp.int32
    state = batcher.init(row_spec(stream))
    _, emit = batcher.step(state, unstack(stream)[0])
    _, flushed = batcher.flush(state)
    for e in (emit, flushed):
        chex.assert_trees_all_equal_shapes_and_dtypes(e.batch, spec)


def test_empty_stream_emits_nothing():
    batcher = batcher_for(3, 2)
    stream = ref.make_stream({"x": []}, {"x": 4}, 0)
    batches, count = jb.batch_all(batcher, stream, max_batches=1)
    assert int(count) == 0 and not np.asarray(batches.valid_mask).any()
    state, emit = batcher.flush(batcher.init(row_spec(stream)))
    assert not bool(emit.ready) and stats_of(state) == dict.fromkeys(STAT_NAMES, 0)


@pytest.mark.slow
def test_the_batcher_laws_of_jaxbatch_testing():
    # One packed feature only: with several, a sequence keeps one segment id in every
    # feature (as in Grain), so a feature's ids can skip a number, which the packing check
    # of `check_batcher` does not allow. (vmap: tested above.) Meta features and the cap
    # on pieces per row: the tables are outputs the checker must carry along.
    jt = pytest.importorskip("jaxbatch.testing")
    batcher = batcher_for(3, 2, cap=2)
    stream = ref.make_stream({"x": [1, 3, 6, 2, 0, 4, 5, 1]}, {"x": 6}, 0, meta=("src",))
    lengths = {"x": "x_len"}
    report = jt.check_batcher(
        batcher, stream, lengths=lengths, split_sequences=True, resume_steps=[3], check_vmap=False
    )
    assert report.stats["skipped"] == 1 and report.stats["emitted"] == 7


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"row_length": 0}, "`row_length`"),
        ({"row_length": True}, "`row_length`"),
        ({"num_rows": 2.0}, "`num_rows`"),
        ({"lengths": {}}, "`lengths`"),
        ({"lengths": ["x"]}, "`lengths`"),
        ({"lengths": {"x": 1}}, "`lengths`"),
        ({"lengths": {"x": "n", "n": "m"}}, "`lengths`"),
        ({"lengths": {"x": "n", "x_positions": "m"}}, "`lengths`"),
        ({"pad_value": "0"}, "`pad_value`"),
        ({"continue_positions": 1}, "`continue_positions`"),
        ({"split_full_length_features": None}, "`split_full_length_features`"),
        ({"max_sequences_per_row": 0}, "`max_sequences_per_row`"),
        ({"max_sequences_per_row": -1}, "`max_sequences_per_row`"),
        ({"max_sequences_per_row": True}, "`max_sequences_per_row`"),
        ({"max_sequences_per_row": 1.5}, "`max_sequences_per_row`"),
        ({"bos_handling": "prepend"}, "`bos_handling`"),
        ({"bos_token_id": 1}, "`bos_handling`"),  # set, but BOS handling is off
        ({"bos_features": ("x",)}, "`bos_handling`"),
        ({"bos_handling": "replace_first_token_with_bos"}, "`bos_token_id`"),
        ({"bos_handling": "replace_first_token_with_bos", "bos_token_id": 1.0}, "`bos_token_id`"),
        (
            {"bos_handling": "replace_first_token_with_bos", "bos_features": ("y",)},
            "`bos_features`",
        ),
        ({"bos_handling": "replace_first_token_with_bos", "bos_features": "x"}, "`bos_features`"),
    ],
)
def test_bad_configuration_raises_value_error(kwargs, match):
    args = {"row_length": 4, "num_rows": 2, "lengths": {"x": "n"}} | kwargs
    with pytest.raises(ValueError, match=match):
        jb.concat_and_split(args.pop("row_length"), args.pop("num_rows"), **args)


@pytest.mark.parametrize(
    ("row_length", "match"),
    [
        ({"x": 4}, r"`row_length`.*\['y'\]"),
        ({"x": 4, "y": 2, "n": 3}, r"`row_length` names 'n'"),
        ({"x": 4, "y": 0}, r"`row_length\['y'\]`.*got 0"),
        ({"x": 1.5, "y": 2}, r"`row_length\['x'\]`"),
        ({"x": 4, "y": False}, r"`row_length\['y'\]`"),
    ],
)
def test_bad_per_feature_row_length_raises_naming_the_feature(row_length, match):
    with pytest.raises(ValueError, match=match):
        jb.concat_and_split(row_length, 2, lengths={"x": "n", "y": "m"})


def test_per_feature_row_lengths_pass_check_batcher():
    # Rows of 3 `x` tokens beside 2 `y` tokens; sequences split across rows in both.
    jt = pytest.importorskip("jaxbatch.testing")
    batcher = batcher_for((("x", 3), ("y", 2)), 2, ("x", "y"))
    stream = ref.make_stream(
        {"x": [1, 3, 5, 2, 0, 4], "y": [2, 1, 3, 0, 0, 2]}, {"x": 5, "y": 3}, 0, meta=("src",)
    )
    lengths = {"x": "x_len", "y": "y_len"}
    report = jt.check_batcher(
        batcher,
        stream,
        lengths=lengths,
        split_sequences=True,
        resume_steps=[3],
        check_vmap=False,
        check_jit=False,
    )
    assert report.stats["skipped"] == 1 and report.stats["emitted"] == 5


def _spec(**overrides):
    spec = {"x": jnp.zeros(4, jnp.int32), "n": jnp.zeros((), jnp.int32)}
    return spec | overrides


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"x": jnp.zeros(4, jnp.int32)}, r"missing keys \['n'\]"),
        (_spec(x_segment_ids=jnp.zeros(3)), r"has keys \['x_segment_ids'\]"),
        (_spec(x=jnp.zeros(9, jnp.int32)), r"`element.data\['x'\]`.*\[1, 8\]"),
        (_spec(x=jnp.zeros((), jnp.int32)), r"`element.data\['x'\]`"),
        (_spec(n=jnp.zeros(2, jnp.int32)), r"Length `element.data\['n'\]`"),
        (_spec(n=jnp.zeros(())), r"Length `element.data\['n'\]`"),
        (jb.Element(_spec(), state={"s": jnp.zeros(())}), "`state`"),
        (_spec(x=jnp.zeros(4, jnp.uint8)), "`pad_value`"),
        (_spec(m={"a": jnp.zeros(2, jnp.uint8)}), r"`pad_value`.*\['m'\]\['a'\]"),
    ],
)
def test_spec_the_configuration_does_not_fit_raises_at_init(spec, match):
    batcher = jb.concat_and_split(4, 2, lengths={"x": "n"}, pad_value=-1)
    with pytest.raises(ValueError, match=match):
        batcher.init(spec)


M = jnp.zeros(2)  # a meta feature of the state below


@pytest.mark.parametrize(
    ("element", "match"),
    [
        (_spec(m=M, x=jnp.zeros(5, jnp.int32)), r"`element.data\['x'\]` has shape"),
        (_spec(m=M, x=jnp.zeros(4, jnp.float32)), r"`element.data\['x'\]` has dtype"),
        (_spec(m=M, n=jnp.zeros((), jnp.uint8)), r"`element.data\['n'\]` has dtype"),
        (_spec(m=jnp.zeros(2, jnp.int32)), r"`element.data\['m'\]` has dtype"),
        (_spec(m=jnp.zeros(3)), r"`element.data\['m'\]` has shape"),
        ({"x": jnp.zeros(4, jnp.int32), "m": M}, r"missing leaves"),
        (_spec(), r"missing leaves \[\".data\['m'\]\"\]"),
    ],
)
def test_element_unlike_the_spec_raises_type_error(element, match):
    batcher = batcher_for(4, 2, ("x",))
    state = jb.concat_and_split(4, 2, lengths={"x": "n"}).init(_spec(m=M))
    with pytest.raises(TypeError, match=match):
        jb.concat_and_split(4, 2, lengths={"x": "n"}).step(state, element)
    del batcher


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("length", [-1, 5])
def test_length_outside_max_len_is_a_runtime_error(use_jit, length):
    batcher = jb.concat_and_split(4, 2, lengths={"x": "n"})
    state = batcher.init(_spec())
    step = jax.jit(batcher.step) if use_jit else batcher.step
    with pytest.raises(Exception, match=r"outside \[0, max_len = 4\]"):
        out = step(state, _spec(n=jnp.int32(length)))
        jax.block_until_ready(out)


def test_stats_count_skipped_and_tokens():
    batcher = batcher_for(2, 2)
    stream = ref.make_stream({"x": [0, 4, 1, 0]}, {"x": 4}, 0)
    state, _ = runners(batcher, True)[0](batcher.init(row_spec(stream)), stream)
    s = stats_of(state)
    assert (s["accepted"], s["skipped"], s["batches"], s["emitted"]) == (2, 2, 1, 1)
    state, _ = flush_all(batcher.flush, state)
    s = stats_of(state)  # the flushed batch: one row of 1 token, one padding row
    assert (s["emitted"], s["batches"], s["padded"]) == (2, 2, 1)
    assert counts(state.tokens) == {"x": 5} and counts(state.padding_tokens) == {"x": 3}
    assert isinstance(state, jb.ConcatAndSplitState) and eqx.is_array(state.row)


# --------------------------------------------------------------------------- Grain


def grain_rows(stream, row_length, split_full=True, bos=False, meta_len=None):
    """Grain 0.2.18's `ConcatThenSplitIterDataset` over the same sequences: its rows. The
    stream's meta features (scalars) are Grain's `meta_features`, of length `meta_len`.
    `row_length`: an int, or a dict per feature (Grain's `length_struct`)."""
    grain = pytest.importorskip("grain", reason="compares with Grain's ConcatThenSplit")
    from grain.experimental import BOSHandling, ConcatThenSplitIterDataset

    like, metas = ref.like_of(stream), ref.meta_like_of(stream)
    sequences = [
        {k: np.array(v).reshape(-1, *like[k].shape).astype(like[k].dtype) for k, v in s.items()
         if k in like} | {m: s[m] for m in metas}
        for s in ref.sequences_of(stream)
    ]  # fmt: skip
    dataset = grain.MapDataset.source(sequences).to_iter_dataset()
    if not isinstance(row_length, dict):
        row_length = dict.fromkeys(like, row_length)
    lengths = {k: row_length[k] for k in like} | dict.fromkeys(metas, meta_len)
    bos_options = (
        {
            "bos_handling": BOSHandling.REPLACE_FIRST_TOKEN_WITH_BOS,
            "bos_features": ("x",),
            "bos_token_id": BOS,
        }
        if bos
        else {}
    )
    return list(
        ConcatThenSplitIterDataset(
            dataset,
            length_struct=lengths,
            meta_features=tuple(metas),
            split_full_length_features=split_full,
            **bos_options,
        )
    )


def _sorted(rows):
    return sorted(rows, key=lambda r: b"".join(np.asarray(r[k]).tobytes() for k in sorted(r)))


def check_against_grain(config, meta_len=None, cap=None):
    """Our rows are Grain's; with `split_full_length_features=False` the same rows, a row
    of its own possibly ahead of the row that was open (Grain holds it back). With
    `meta_len`, a scalar meta feature `"src"` of that length in Grain (and here
    `max_sequences_per_row=cap`): each row's table row is Grain's meta row."""
    config["pad_value"], config["continue_positions"] = 0, False
    config["cap"], config["meta"] = cap, ("src",) if meta_len else ()
    batcher, stream, _ = setup(config)
    ours = our_rows(batcher, stream)
    theirs = grain_rows(stream, limits_of(config), config["split_full"], config["bos"], meta_len)
    if config["split_full"]:
        chex.assert_trees_all_equal(ours, theirs)
    else:
        chex.assert_trees_all_equal(_sorted(ours), _sorted(theirs))


def our_rows(batcher, stream):
    batches, count = jb.batch_all(batcher, stream, max_batches=len(stream["x_len"]) + 2)
    batches = jax.device_get(batches)
    rows = []
    for k in range(int(count)):
        for i in np.flatnonzero(batches.valid_mask[k]):
            rows.append({key: np.asarray(v[k, i]) for key, v in batches.data.items()})
    return rows


def meta_len_of(meta, config, data):
    """Grain's meta length, and our `max_sequences_per_row`: "binds": 1 or 2 sequences per
    row; "free": as many pieces as a row can hold (`row_length` per feature), so it never
    binds, and our default (no cap) has tables that wide."""
    if meta == "binds":
        length = data.draw(st.sampled_from([1, 2]), label="meta_len")
        return length, length
    return sum(limits_of(config).values()), None


@pytest.mark.parametrize("meta", ["binds", "free"])
@settings(max_examples=2)
@given(config=configs(), data=st.data())
def test_rows_match_grain_one_feature(meta, config, data):
    pytest.importorskip("grain", reason="compares with Grain's ConcatThenSplit")
    n = len(config["lengths"]["x"])
    config["lengths"] = {
        "x": data.draw(st.lists(st.integers(1, config["max_len"]["x"]), min_size=n, max_size=n))
    }
    check_against_grain(config, *meta_len_of(meta, config, data))


@pytest.mark.parametrize("meta", ["binds", "free"])
@settings(max_examples=2)
@given(config=configs(features=("x", "y")), data=st.data())
def test_rows_match_grain_two_features(meta, config, data):
    # Grain re-reads tokens when a sequence's rest spans more than one further row while
    # another feature's rest fits; sequences of at most `row_length` tokens never do that.
    pytest.importorskip("grain", reason="compares with Grain's ConcatThenSplit")
    # No BOS here: for a piece empty in "x", Grain writes a BOS into padding, or raises
    # IndexError at a row's end (a bug this batcher does not copy).
    config["bos"] = False
    n, r = len(config["lengths"]["x"]), config["row_length"]
    config["max_len"] = {"x": r, "y": r}
    config["lengths"] = {
        k: data.draw(st.lists(st.integers(1, r), min_size=n, max_size=n)) for k in "xy"
    }
    check_against_grain(config, *meta_len_of(meta, config, data))


@settings(max_examples=2)
@given(config=configs(features=("x", "y"), per_feature=True), data=st.data())
def test_rows_match_grain_per_feature_row_lengths(config, data):
    """Grain's `length_struct` with a length per feature (`{"x": 3, "y": 1}`, say)."""
    pytest.importorskip("grain", reason="compares with Grain's ConcatThenSplit")
    meta = data.draw(st.sampled_from(["binds", "free"]), label="meta")
    config["bos"] = False  # as in the two-feature test above
    limit = limits_of(config)
    # At most a row of each feature per sequence: Grain re-reads tokens when a rest spans
    # more than one further row while another feature's rest fits (see above).
    n = len(config["lengths"]["x"])
    config["max_len"] = dict(limit)
    config["lengths"] = {
        k: data.draw(st.lists(st.integers(1, limit[k]), min_size=n, max_size=n)) for k in "xy"
    }
    check_against_grain(config, *meta_len_of(meta, config, data))


def test_bos_token_the_feature_cannot_hold_raises_at_init():
    batcher = jb.concat_and_split(
        4,
        2,
        lengths={"x": "n"},
        bos_handling="replace_first_token_with_bos",
        bos_features=("x",),
        bos_token_id=300,
    )
    with pytest.raises(ValueError, match="`bos_token_id`"):
        batcher.init(_spec(x=jnp.zeros(4, jnp.uint8)))


def test_full_length_rows_pass_through_and_bos_marks_every_piece():
    """`split_full_length_features=False`: the 3-token sequence is a row of its own, ahead of
    the open row (its meta value at entry 0, the open row's entries moved on with it); BOS
    replaces the first token of every piece (positions restart there)."""
    batcher = batcher_for(3, 2, split_full=False, bos=True)
    stream = ref.make_stream({"x": [2, 3, 2]}, {"x": 3}, 0, meta=("src",))
    batches, count = jb.batch_all(batcher, stream, max_batches=3)
    assert int(count) == 2
    np.testing.assert_array_equal(batches.data["x"][0], [[BOS, 2001, 2002], [BOS, 1001, BOS]])
    np.testing.assert_array_equal(batches.data["x_segment_ids"][0], [[1, 1, 1], [1, 1, 2]])
    np.testing.assert_array_equal(batches.data["x"][1], [[BOS, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(
        batches.data["src"][:2], [[[2, 0, 0], [1, 3, 0]], [[3, 0, 0], [0, 0, 0]]]
    )

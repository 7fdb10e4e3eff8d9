"""`pack`: against the reference packer (and Grain itself when installed), and the batcher
laws (jit vs no jit, exact resume, one trace, vmap, errors, counters, the `scan` driver)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference_pack as ref
from hypothesis import given, settings, strategies as st

import jaxbatch as jb

LENGTHS = {"inputs": "n_in", "targets": "n_tg"}
# Grain's per-feature options on two of the configurations (dicts as tuples of pairs).
ALIGNED = (
    ("alignment", (("inputs", 2),)),
    ("pad_value", (("inputs", -1), ("targets", 7.5), ("id", -5))),
)
# (row_length, num_rows, strategy, too_long, max_sequences_per_row, max_len, options): a
# few fixed configurations, so each is compiled once; hypothesis varies the streams.
CONFIGS = [
    (4, 2, "first_fit", "error", None, 4, ()),
    (5, 3, "best_fit", "truncate", None, 7, ALIGNED),
    (3, 1, "best_fit", "error", 2, 3, ()),
    (6, 2, "first_fit", "truncate", 2, 8, (("alignment", 4),)),  # 6 is not a multiple of 4
    (1, 2, "first_fit", "error", None, 2, ()),
    # A row length per packed feature (Grain's `length_struct`), as a tuple of pairs.
    ((("inputs", 4), ("targets", 2)), 2, "first_fit", "error", None, 4, ()),
    ((("inputs", 5), ("targets", 3)), 3, "best_fit", "truncate", 2, 6, ALIGNED),
]


def _row_length(row_length):
    """A configuration's `row_length` as `jb.pack` takes it (a dict from pairs)."""
    return dict(row_length) if isinstance(row_length, tuple) else row_length


def _limit(row_length, feature):
    """The row length of one packed feature."""
    return _row_length(row_length)[feature] if isinstance(row_length, tuple) else row_length


def _options(options):
    return {k: dict(v) if isinstance(v, tuple) else v for k, v in options}


@functools.cache
def batcher_for(row_length, num_rows, strategy, too_long, max_segments, options=()):
    return jb.pack(
        _row_length(row_length),
        num_rows,
        lengths=LENGTHS,
        strategy=strategy,
        too_long=too_long,
        max_sequences_per_row=max_segments,
        **_options(options),
    )


@functools.cache
def jitted(batcher):
    return jax.jit(batcher.step), jax.jit(batcher.flush)


def make_elements(lengths, max_len, seed=0):
    """One element per `(n_in, n_tg)`: recognisable tokens, garbage past each length."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (n_in, n_tg) in enumerate(lengths):
        inputs = rng.integers(-9, 0, size=max_len, dtype=np.int32)
        inputs[:n_in] = 1000 * (i + 1) + np.arange(n_in)
        targets = rng.standard_normal((max_len, 2)).astype(np.float32)
        targets[:n_tg] = -(1000 * (i + 1) + np.arange(2 * n_tg).reshape(n_tg, 2))
        out.append(
            {
                "inputs": inputs,
                "targets": targets,
                "n_in": np.asarray(n_in, np.int32),
                "n_tg": np.asarray(n_tg, np.int32),
                "id": np.asarray(i, np.int32),
                "w": rng.standard_normal(2).astype(np.float32),
            }
        )
    return out


def spec_for(max_len):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_elements([(1, 1)], max_len)[0]
    )


def stack(elements):
    return jax.tree.map(lambda *xs: np.stack(xs), *elements)


def as_reference(emit):
    """An `Emit` as the reference does: None if not ready, else its data and mask."""
    mask = np.asarray(emit.batch.valid_mask)
    if not bool(emit.ready):
        assert not mask.any()
        return None
    out = {k: np.asarray(v) for k, v in jax.device_get(emit.batch.data).items()}
    out["valid_mask"] = mask
    return out


def run(batcher, elements, spec, *, use_jit=True, state=None, key=None):
    """Step every element, then flush until nothing is ready."""
    step, flush = jitted(batcher) if use_jit else (batcher.step, batcher.flush)
    state = batcher.init(spec, key) if state is None else state
    emitted = []
    for element in elements:
        state, emit = step(state, element)
        emitted.append(as_reference(emit))
    before_flush = state
    flushed = []
    while True:
        state, emit = flush(state)
        if not bool(emit.ready):
            assert not np.asarray(emit.batch.valid_mask).any()
            break
        flushed.append(as_reference(emit))
        assert len(flushed) == 1  # law 3: one buffer, one batch
    return before_flush, emitted, flushed, state


def counters(named):
    return {k: int(v) for k, v in named.items()}


def stats_of(state):
    names = ("accepted", "skipped", "dropped", "emitted", "batches", "padded")
    return {name: int(getattr(state.stats, name)) for name in names}


def expected(elements, config):
    row_length, num_rows, strategy, too_long, max_segments, _, options = config
    return ref.pack(
        elements,
        row_length=_row_length(row_length),
        num_rows=num_rows,
        lengths=LENGTHS,
        strategy=strategy,
        too_long=too_long,
        max_segments=max_segments,
        **_options(options),
    )


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None or g is None:
            assert g is None and w is None
        else:
            chex.assert_trees_all_equal(g, w)


def length_strategies(config):
    """Lengths of `inputs` and `targets` a configuration takes (longer ones if it truncates)."""
    row_length, _, _, too_long, _, max_len, _ = config
    return tuple(
        st.integers(0, max_len if too_long == "truncate" else min(max_len, _limit(row_length, k)))
        for k in ("inputs", "targets")
    )


@st.composite
def streams(draw):
    config = draw(st.sampled_from(CONFIGS))
    lengths = draw(st.lists(st.tuples(*length_strategies(config)), max_size=14))
    return config, lengths, draw(st.integers(0, 2**16))


# --------------------------------------------------------------------------- reference


@pytest.mark.slow
@settings(max_examples=12)
@given(case=streams())
def test_step_and_flush_match_reference(case):
    config, lengths, seed = case
    batcher = batcher_for(*config[:5], config[6])
    elements = make_elements(lengths, config[5], seed)
    want = expected(elements, config)
    before_flush, emitted, flushed, state = run(batcher, elements, spec_for(config[5]))
    assert_batches_equal(emitted, want.emitted)
    assert_batches_equal(flushed, want.flushed)
    assert int(jnp.sum(before_flush.segments)) == want.buffered
    assert stats_of(state) == want.stats
    assert counters(jb.packing_stats(state)) == want.packing
    # Conservation: every sequence taken is emitted (the flush drained the rest).
    s = want.stats
    assert s["accepted"] + s["skipped"] == len(elements)
    assert s["accepted"] == s["emitted"]
    assert int(jnp.sum(state.segments)) == 0


def test_exact_fit_waits_for_the_next_sequence_like_grain():
    """Rows that become exactly full are not emitted until a sequence does not fit."""
    batcher = batcher_for(4, 2, "first_fit", "error", None)
    elements = make_elements([(4, 4), (4, 4), (2, 2), (2, 2), (1, 1)], 4)
    _, emitted, flushed, _ = run(batcher, elements, spec_for(4))
    assert [e is not None for e in emitted] == [False, False, True, False, False]
    np.testing.assert_array_equal(
        emitted[2]["inputs"], [[1000, 1001, 1002, 1003], [2000, 2001, 2002, 2003]]
    )
    np.testing.assert_array_equal(flushed[0]["inputs"], [[3000, 3001, 4000, 4001], [5000, 0, 0, 0]])
    np.testing.assert_array_equal(flushed[0]["inputs_segment_ids"], [[1, 1, 2, 2], [1, 0, 0, 0]])
    np.testing.assert_array_equal(flushed[0]["id"], [[2, 3, 0, 0], [4, 0, 0, 0]])


def test_best_fit_picks_the_fullest_row():
    batcher = batcher_for(5, 3, "best_fit", "truncate", None)
    # Rows: [3], [4] -> a 1 goes to the fuller row 1, a 2 to row 0.
    elements = make_elements([(3, 3), (4, 4), (1, 1), (2, 2)], 7)
    _, _, flushed, _ = run(batcher, elements, spec_for(7))
    np.testing.assert_array_equal(flushed[0]["id"][:, :2], [[0, 3], [1, 2], [0, 0]])
    np.testing.assert_array_equal(flushed[0]["valid_mask"], [True, True, False])


def test_empty_sequences_are_skipped_and_counted():
    batcher = batcher_for(4, 2, "first_fit", "error", None)
    elements = make_elements([(2, 1), (0, 0), (0, 3)], 4)
    _, _, flushed, state = run(batcher, elements, spec_for(4))
    np.testing.assert_array_equal(flushed[0]["id"][0, :3], [0, 2, 0])
    np.testing.assert_array_equal(flushed[0]["inputs_segment_ids"][0], [1, 1, 0, 0])
    np.testing.assert_array_equal(flushed[0]["targets_segment_ids"][0], [1, 2, 2, 2])
    assert stats_of(state)["skipped"] == 1 and stats_of(state)["accepted"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("use_jit", [False, True])
def test_jit_and_no_jit_agree(use_jit):
    config = CONFIGS[1]
    batcher = batcher_for(*config[:5], config[6])
    elements = make_elements([(3, 2), (7, 1), (0, 0), (2, 5), (5, 5), (1, 0)], config[5], 7)
    want = expected(elements, config)
    _, emitted, flushed, state = run(batcher, elements, spec_for(config[5]), use_jit=use_jit)
    assert_batches_equal(emitted, want.emitted)
    assert_batches_equal(flushed, want.flushed)
    assert counters(jb.packing_stats(state)) == want.packing
    assert want.packing["truncated"] == 1 and want.packing["truncated_tokens"] == 2


# --------------------------------------------------------------------------- laws


@settings(max_examples=4)
@given(case=streams(), data=st.data())
def test_resume_mid_row_is_bit_identical(tmp_path_factory, case, data):
    config, lengths, seed = case
    batcher, spec = batcher_for(*config[:5], config[6]), spec_for(config[5])
    elements = make_elements(lengths, config[5], seed)
    k = data.draw(st.integers(0, len(elements)), label="save after k steps")
    _, emitted, flushed, final = run(batcher, elements, spec)

    saved, emitted_a, _, _ = run(batcher, elements[:k], spec)
    path = tmp_path_factory.mktemp("pack") / "state.ckpt"
    jb.save_state(path, saved)
    loaded = jb.load_state(path, like=jax.eval_shape(batcher.init, spec))
    _, emitted_b, resumed_flushed, resumed = run(batcher, elements[k:], spec, state=loaded)
    assert_batches_equal(emitted_a + emitted_b, emitted)
    assert_batches_equal(resumed_flushed, flushed)
    chex.assert_trees_all_equal(resumed, final)


def test_one_trace_for_any_values():
    batcher = jb.pack(4, 2, lengths=LENGTHS, strategy="best_fit")

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(state, element):
        return batcher.step(state, element)

    state = batcher.init(spec_for(4))
    for element in make_elements([(1, 2), (4, 4), (0, 0), (3, 1), (2, 2)], 4):
        state, _ = step(state, element)
    assert int(state.stats.accepted) == 4


@functools.cache
def _vmapped(batcher):
    def run_one(state, elements):
        state, emits = jax.lax.scan(batcher.step, state, elements)
        state, last = batcher.flush(state)
        return state, emits, last

    return jax.jit(run_one), jax.jit(jax.vmap(run_one))


@pytest.mark.slow
def test_vmap_over_two_streams_equals_separate_runs():
    config = CONFIGS[1]
    batcher, spec = batcher_for(*config[:5], config[6]), spec_for(config[5])
    streams_ = [
        stack(make_elements(lengths, config[5], seed))
        for seed, lengths in ((1, [(3, 3), (5, 1), (2, 2), (6, 4)]), (2, [(1, 1)] * 3 + [(5, 5)]))
    ]
    one, both = _vmapped(batcher)
    starts = [batcher.init(spec), batcher.init(spec)]
    together = both(stack(jax.device_get(starts)), stack(streams_))
    for i, stream in enumerate(streams_):
        chex.assert_trees_all_equal(
            jax.tree.map(lambda x, i=i: x[i], together), one(starts[i], stream)
        )


def test_scan_consumer_sees_every_token_exactly_once():
    config = CONFIGS[3]  # truncating
    batcher = batcher_for(*config[:5], config[6])
    lengths = [(3, 2), (8, 1), (1, 6), (6, 6), (0, 0), (2, 3), (5, 1), (4, 4), (1, 1)]
    elements = make_elements(lengths, config[5], 3)

    def consume(carry, batch):
        total, count, seen = carry
        keep = (batch.data["inputs_segment_ids"] > 0) & batch.valid_mask[:, None]
        tokens = jnp.where(keep, batch.data["inputs"], 0)
        # Segment `s` of row `j` has per-segment id `batch.data["id"][j, s - 1]`.
        ids = jnp.take_along_axis(
            batch.data["id"], jnp.maximum(batch.data["inputs_segment_ids"] - 1, 0), axis=1
        )
        seen = seen.at[jnp.where(keep, ids, len(lengths))].add(1, mode="drop")
        return total + jnp.sum(tokens), count + jnp.sum(keep.astype(jnp.int32)), seen

    carry = (jnp.int32(0), jnp.int32(0), jnp.zeros(len(lengths), jnp.int32))
    (total, count, seen), state = jb.scan(batcher, consume, carry, stack(elements))
    kept = [(e, min(int(e["n_in"]), config[0])) for e in elements]
    assert int(total) == sum(int(e["inputs"][:n].sum()) for e, n in kept)
    assert int(count) == sum(n for _, n in kept)
    np.testing.assert_array_equal(seen, [n for _, n in kept])  # each token under its own id
    stats = counters(jb.packing_stats(state))
    assert stats["truncated"] == 1 and stats["truncated_tokens"] == 2
    assert stats["tokens"] == sum(
        min(int(e[key]), config[0]) for e in elements for key in ("n_in", "n_tg")
    )
    efficiency = stats["tokens"] / (stats["tokens"] + stats["padding_tokens"])
    assert 0 < efficiency <= 1


def test_batch_all_default_room_is_enough():
    config = CONFIGS[0]
    batcher = batcher_for(*config[:5], config[6])
    elements = make_elements([(1, 1)] * 5 + [(4, 4)] * 3, config[5])
    batches, count = jb.batch_all(batcher, stack(elements))
    want = expected(elements, config)
    got = [
        {k: np.asarray(v)[i] for k, v in {**batches.data, "valid_mask": batches.valid_mask}.items()}
        for i in range(int(count))
    ]
    assert_batches_equal(got, [b for b in want.emitted if b is not None] + want.flushed)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"row_length": 0}, "row_length"),
        ({"row_length": 2.0}, "row_length"),
        ({"row_length": True}, "row_length"),
        ({"num_rows": -1}, "num_rows"),
        ({"strategy": "worst_fit"}, "strategy"),
        ({"too_long": "drop"}, "too_long"),
        ({"pad_value": "x"}, "pad_value"),
        ({"max_sequences_per_row": 0}, "max_sequences_per_row"),
        ({"max_segments": -1}, "max_sequences_per_row"),
        ({"max_segments": 2, "max_sequences_per_row": 2}, "max_segments"),
        ({"alignment": 0}, "alignment"),
        ({"alignment": 5}, "alignment"),  # larger than the row
        ({"alignment": {"inputs": 2, "n_in": 2}}, "alignment"),
        ({"alignment": {"targets": 1.5}}, "alignment"),
        ({"pad_value": {"inputs": "x"}}, "pad_value"),
        ({"pad_value": {"inputs": True}}, "pad_value"),
        ({"shuffle_rows": 1}, "shuffle_rows"),
        ({"shuffle_rows_group_by": "inputs"}, "shuffle_rows_group_by"),  # needs shuffle_rows
        ({"shuffle_rows": True, "shuffle_rows_group_by": 3}, "shuffle_rows_group_by"),
        ({"lengths": {}}, "lengths"),
        ({"lengths": {"inputs": 3}}, "lengths"),
        ({"lengths": ["inputs"]}, "lengths"),
        ({"lengths": {"inputs": "n_in", "n_in": "n_tg"}}, "lengths"),
        ({"row_length": 2**16, "num_rows": 2**16}, "num_rows"),
    ],
)
def test_bad_configuration_raises_naming_the_argument(kwargs, argument):
    args = {"row_length": 4, "num_rows": 2, "lengths": LENGTHS, **kwargs}
    row_length, num_rows = args.pop("row_length"), args.pop("num_rows")
    with pytest.raises(ValueError, match=f"`{argument}`"):
        jb.pack(row_length, num_rows, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"row_length": {"inputs": 4}}, r"`row_length`.*\['targets'\]"),
        ({"row_length": {"inputs": 4, "targets": 2, "n_in": 3}}, r"`row_length` names 'n_in'"),
        ({"row_length": {"inputs": 4, "targets": 0}}, r"`row_length\['targets'\]`.*got 0"),
        ({"row_length": {"inputs": -1, "targets": 2}}, r"`row_length\['inputs'\]`"),
        ({"row_length": {"inputs": 4, "targets": 2.0}}, r"`row_length\['targets'\]`"),
        ({"row_length": {"inputs": 4, "targets": True}}, r"`row_length\['targets'\]`"),
        ({"row_length": {"inputs": 4, "targets": 2}, "alignment": 3}, r"`alignment`.*'targets'"),
        (
            {"row_length": {"inputs": 4, "targets": 2}, "alignment": {"inputs": 3, "targets": 4}},
            r"`alignment`.*'targets'",
        ),
    ],
)
def test_bad_per_feature_row_length_raises_naming_the_feature(kwargs, match):
    args = {"num_rows": 2, "lengths": LENGTHS, **kwargs}
    with pytest.raises(ValueError, match=match):
        jb.pack(args.pop("row_length"), args.pop("num_rows"), **args)


def test_bad_element_spec_raises_at_init():
    batcher = jb.pack(4, 2, lengths=LENGTHS)
    spec = spec_for(4)
    with pytest.raises(ValueError, match="`lengths`.*n_tg"):
        batcher.init({k: v for k, v in spec.items() if k != "n_tg"})
    with pytest.raises(ValueError, match="data\\['inputs'\\]"):
        batcher.init({**spec, "inputs": jax.ShapeDtypeStruct((), jnp.int32)})
    with pytest.raises(ValueError, match="data\\['n_in'\\]"):
        batcher.init({**spec, "n_in": jax.ShapeDtypeStruct((), jnp.float32)})
    with pytest.raises(ValueError, match="inputs_segment_ids"):
        batcher.init({**spec, "inputs_segment_ids": jax.ShapeDtypeStruct((), jnp.int32)})
    with pytest.raises(ValueError, match="`pad_value`"):
        jb.pack(4, 2, lengths=LENGTHS, pad_value=0.5).init(spec)
    with pytest.raises(TypeError, match="metadata"):
        batcher.init(jb.Element(data=spec, metadata=jb.Metadata(index=0)))


def test_element_unlike_the_spec_raises_naming_the_leaf():
    batcher = batcher_for(*CONFIGS[0][:5], CONFIGS[0][6])
    state = batcher.init(spec_for(4))
    element = make_elements([(1, 1)], 4)[0]
    with pytest.raises(TypeError, match="element.data\\['inputs'\\]"):
        batcher.step(state, {**element, "inputs": element["inputs"].astype(np.float32)})
    with pytest.raises(TypeError, match="element.data\\['targets'\\]"):
        batcher.step(state, {**element, "targets": element["targets"][:3]})


@pytest.mark.parametrize("use_jit", [False, True])
def test_too_long_and_bad_lengths_raise_at_run_time(use_jit):
    config = (3, 2, "first_fit", "error", None, 5, ())
    batcher = batcher_for(*config[:5], config[6])
    step = jitted(batcher)[0] if use_jit else batcher.step
    state = batcher.init(spec_for(5))
    (element,) = make_elements([(4, 1)], 5)
    with pytest.raises(Exception, match="longer than `row_length`"):
        jax.block_until_ready(step(state, element))
    for bad in (-1, 6):
        with pytest.raises(Exception, match="negative or larger than"):
            jax.block_until_ready(step(state, {**element, "n_in": np.asarray(bad, np.int32)}))
    (fine,) = make_elements([(3, 1)], 5)
    assert int(step(state, fine)[0].stats.accepted) == 1


# --------------------------------------------------------------------------- Grain


# Grain's `pack_alignment_struct` and `padding_struct`, and `pad_value` for the `id` table.
GRAIN_OPTIONS = (
    ("alignment", (("inputs", 4), ("targets", 2))),
    ("pad_value", (("inputs", -1), ("targets", 7.5), ("id", -5))),
)


def grain_rows(
    strategy, elements, row_length, num_rows, max_segments, options, shuffle, group_by=None
):
    """Grain's packer over the same sequences: its rows, and its batches' row counts."""
    grain = pytest.importorskip("grain", reason="compared with Grain only where it is installed")
    from grain import experimental

    packer = {
        "first_fit": experimental.FirstFitPackIterDataset,
        "best_fit": experimental.BestFitPackIterDataset,
    }[strategy]
    options = _options(options)
    sliced = [
        {
            "inputs": e["inputs"][: int(e["n_in"])],
            "targets": e["targets"][: int(e["n_tg"])],
            "id": e["id"],
        }
        for e in elements
    ]
    pads = options.get("pad_value", {})
    dataset = packer(
        grain.MapDataset.source(sliced).to_iter_dataset(),
        length_struct={k: _limit(row_length, k) for k in ("inputs", "targets")},
        num_packing_bins=num_rows,
        shuffle_bins=shuffle,
        shuffle_bins_group_by_feature=group_by,
        seed=3,
        meta_features=("id",),
        max_sequences_per_bin=max_segments,
        pack_alignment_struct=options.get("alignment"),
        padding_struct={k: pads[k] for k in ("inputs", "targets")} if pads else None,
    )
    return list(dataset)


def our_batches(batcher, elements, spec, key=None):
    """Our ready batches' valid rows, one list per batch."""
    _, emitted, flushed, _ = run(batcher, elements, spec, key=key)
    return [
        [
            {k: v[j] for k, v in batch.items() if k != "valid_mask"}
            for j in np.flatnonzero(batch["valid_mask"])
        ]
        for batch in [b for b in emitted if b is not None] + flushed
    ]


def assert_row_equal(mine, theirs, id_pad):
    for key in ("inputs", "targets"):
        for suffix in ("", "_segment_ids", "_positions"):
            np.testing.assert_array_equal(mine[key + suffix], theirs[key + suffix])
    # Grain's non-sequence meta feature is a list per row; ours a per-segment table.
    ids = [int(i) for i in theirs["id"]]
    np.testing.assert_array_equal(mine["id"][: len(ids)], ids)
    assert (mine["id"][len(ids) :] == id_pad).all()


# Grain's `length_struct` per feature, as an encoder-decoder's inputs and targets.
PER_FEATURE = (("inputs", 6), ("targets", 3))


@pytest.mark.parametrize(
    ("strategy", "max_segments", "options", "row_length"),
    [
        ("first_fit", None, (), 6),
        ("best_fit", 2, (), 6),
        ("first_fit", 2, GRAIN_OPTIONS, 6),
        ("best_fit", None, GRAIN_OPTIONS, 6),
        ("first_fit", 3, GRAIN_OPTIONS, PER_FEATURE),
        ("best_fit", 2, GRAIN_OPTIONS, PER_FEATURE),  # max_sequences_per_bin, padding_struct
    ],
)
def test_rows_equal_grain(strategy, max_segments, options, row_length):
    pytest.importorskip("grain", reason="compared with Grain only where it is installed")
    num_rows, max_len = 3, 6
    batcher = batcher_for(row_length, num_rows, strategy, "error", max_segments, options)
    id_pad = _options(options).get("pad_value", {}).get("id", 0)
    rng = np.random.default_rng(0)
    top = [_limit(row_length, k) + 1 for k in ("inputs", "targets")]
    for trial in range(4):
        lengths = rng.integers(1, top, size=(25, 2)).tolist()
        elements = make_elements(lengths, max_len, trial)
        theirs = grain_rows(strategy, elements, row_length, num_rows, max_segments, options, False)
        ours = [row for batch in our_batches(batcher, elements, spec_for(max_len)) for row in batch]
        assert len(ours) == len(theirs)
        for mine, their in zip(ours, theirs):
            assert_row_equal(mine, their, id_pad)


# --------------------------------------------------------------------------- shuffle_rows


@functools.cache
def shuffling(strategy="best_fit", group_by=None):
    return jb.pack(
        5,
        3,
        lengths=LENGTHS,
        strategy=strategy,
        shuffle_rows=True,
        shuffle_rows_group_by=group_by,
        **_options(GRAIN_OPTIONS),
    )


def _row_key(row):
    return b"".join(np.ascontiguousarray(row[k]).tobytes() for k in sorted(row))


@pytest.mark.slow
def test_shuffled_batches_hold_grains_rows_in_a_seeded_order():
    """Each emitted batch holds the rows of Grain's batch (`shuffle_bins=True`: Grain
    shuffles within a batch too), in an order set by the key alone."""
    pytest.importorskip("grain", reason="compared with Grain only where it is installed")
    batcher, max_len = shuffling(), 5
    lengths = np.random.default_rng(1).integers(1, 6, size=(30, 2)).tolist()
    elements = make_elements(lengths, max_len, 1)
    plain = batcher_for(5, 3, "best_fit", "error", None, GRAIN_OPTIONS)
    unshuffled = our_batches(plain, elements, spec_for(max_len))
    theirs = grain_rows("best_fit", elements, 5, 3, None, GRAIN_OPTIONS, True)
    runs = [our_batches(batcher, elements, spec_for(max_len), jax.random.key(s)) for s in (0, 0, 1)]
    assert [len(b) for b in runs[0]] == [len(b) for b in unshuffled]
    at = 0
    for got, want in zip(runs[0], unshuffled):
        assert sorted(map(_row_key, got)) == sorted(map(_row_key, want))
        their = theirs[at : at + len(want)]  # Grain's batch: the same rows, its own order
        at += len(want)
        for mine in sorted(want, key=_row_key):
            match = [
                t
                for t in their
                if all(np.array_equal(mine[k], t[k]) for k in ("inputs", "inputs_segment_ids"))
            ]
            assert match
            assert_row_equal(mine, match[0], -5)
    assert at == len(theirs)
    flat = [[_row_key(r) for b in run for r in b] for run in runs]
    assert flat[0] == flat[1]  # same key, same order
    assert flat[0] != flat[2] and flat[0] != [_row_key(r) for b in unshuffled for r in b]


def _group(row, key, grain=False):
    """A row's group (`reference_pack.row_group`); Grain's tables are lists per row."""
    if grain and key not in LENGTHS:
        return ref.row_group({key: np.asarray(list(row[key]))}, key, True, 0)
    segments = max(int(row[f"{k}_segment_ids"].max()) for k in LENGTHS)
    return ref.row_group(row, key, key in LENGTHS, segments)


@pytest.mark.parametrize("group_by", ["inputs", "id"])
def test_grouped_shuffle_orders_rows_by_group_like_grain(group_by):
    """`shuffle_rows_group_by` (Grain's `shuffle_bins_group_by_feature`): each batch holds
    Grain's rows, sorted by the same groups (a packed feature read with its padding, here
    -1, or a per-sequence table over the row's sequences); only equal groups may differ in
    order."""
    pytest.importorskip("grain", reason="compared with Grain only where it is installed")
    batcher, max_len = shuffling("first_fit", group_by), 5
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 6, size=(40, 2)).tolist()
    elements = make_elements(lengths, max_len, 2)
    for element in elements[::3]:  # some sequences share their tokens: ties in the groups
        element["inputs"][: int(element["n_in"])] = 7
        element["id"] = np.asarray(7, np.int32)
    elements = [e for e in elements if e["n_in"] or e["n_tg"]]  # Grain gives empties an id
    theirs = grain_rows("first_fit", elements, 5, 3, None, GRAIN_OPTIONS, True, group_by)
    ours = our_batches(batcher, elements, spec_for(max_len), jax.random.key(4))
    at = 0
    for batch in ours:
        their = theirs[at : at + len(batch)]
        at += len(batch)
        groups = [_group(row, group_by) for row in batch]
        assert groups == sorted(groups)
        assert groups == [_group(row, group_by, True) for row in their]
        # Same rows in the batch, whatever the order within a group.
        key = lambda r: (r["inputs"].tobytes(), r["targets"].tobytes())  # noqa: E731
        assert sorted(map(key, batch)) == sorted(map(key, their))
    assert at == len(theirs)
    assert any(len({_group(r, group_by) for r in b}) > 1 for b in ours)  # not vacuous


@pytest.mark.slow
@settings(max_examples=6)
@given(data=st.data(), group_by=st.sampled_from(["inputs", "id"]))
def test_grouped_shuffle_permutes_the_reference_batches_by_group(data, group_by):
    """Against the reference packer: each batch is the unshuffled batch's rows, sorted by
    group (ties in any order), padding rows last."""
    config = (5, 3, "best_fit", "error", None, 5, GRAIN_OPTIONS)
    length = st.integers(0, 5)
    lengths = data.draw(st.lists(st.tuples(length, length), max_size=16))
    elements = make_elements(lengths, 5, data.draw(st.integers(0, 2**16)))
    for element in elements[:: data.draw(st.integers(2, 4))]:  # shared tokens: equal groups
        element["inputs"][: int(element["n_in"])] = 3
        element["id"] = np.asarray(3, np.int32)
    want = expected(elements, config)
    key = jax.random.key(data.draw(st.integers(0, 99)))
    _, emitted, flushed, _ = run(shuffling("best_fit", group_by), elements, spec_for(5), key=key)
    assert [b is None for b in emitted] == [b is None for b in want.emitted]
    for got, ref_batch in zip(
        [b for b in emitted if b is not None] + flushed,
        [b for b in want.emitted if b is not None] + want.flushed,
    ):
        n = int(ref_batch["valid_mask"].sum())
        assert got["valid_mask"].tolist() == [True] * n + [False] * (3 - n)
        rows = [{k: v[j] for k, v in got.items()} for j in range(n)]
        ref_rows = [{k: v[j] for k, v in ref_batch.items()} for j in range(n)]
        assert sorted(map(_row_key, rows)) == sorted(map(_row_key, ref_rows))
        groups = [_group(row, group_by) for row in rows]
        assert groups == sorted(groups)


@pytest.mark.slow
def test_grouped_shuffle_bulk_feed_equals_stepping():
    batcher, spec = shuffling("first_fit", "id"), spec_for(5)
    lengths = np.random.default_rng(5).integers(0, 6, size=(CHUNK + 3, 2)).tolist()
    elements = make_elements(lengths, 5, 5)
    state = run(batcher, elements[:3], spec, key=jax.random.key(1))[0]
    check_bulk_equals_stepping(batcher, spec, state, elements[3:], flush=True)


@pytest.mark.parametrize(
    ("group_by", "match"),
    [("nope", "not a length key"), ("n_in", "not a length key"), ("flag", "integers or floats")],
)
def test_grouping_by_a_key_that_cannot_group_raises_at_init(group_by, match):
    spec = {**spec_for(5), "flag": jax.ShapeDtypeStruct((), jnp.bool_)}
    batcher = jb.pack(5, 3, lengths=LENGTHS, shuffle_rows=True, shuffle_rows_group_by=group_by)
    with pytest.raises(ValueError, match=match):
        batcher.init(spec, jax.random.key(0))


def test_shuffle_rows_needs_a_key():
    with pytest.raises(ValueError, match="needs a PRNG key"):
        shuffling().init(spec_for(5))
    with pytest.raises(ValueError, match="`key`"):
        shuffling().init(spec_for(5), key=3)
    state = batcher_for(*CONFIGS[0][:5], CONFIGS[0][6]).init(spec_for(4))
    assert state.key is None  # deterministic without shuffling


@pytest.mark.slow
@settings(max_examples=2)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_shuffled_resume_and_bulk_feed_are_bit_identical(tmp_path_factory, seed, data):
    batcher, spec = shuffling(), spec_for(5)
    pairs = data.draw(
        st.lists(
            st.tuples(st.integers(0, 5), st.integers(0, 5)), min_size=CHUNK + 6, max_size=CHUNK + 6
        )
    )
    elements = make_elements(pairs, 5, seed)
    key = jax.random.key(seed)
    k = data.draw(st.integers(0, 6), label="save after k steps")
    _, emitted, flushed, final = run(batcher, elements, spec, key=key)
    saved, emitted_a, _, _ = run(batcher, elements[:k], spec, key=key)
    path = tmp_path_factory.mktemp("pack") / "state.ckpt"
    jb.save_state(path, saved)
    loaded = jb.load_state(path, like=jax.eval_shape(batcher.init, spec, key))
    _, emitted_b, resumed_flushed, resumed = run(batcher, elements[k:], spec, state=loaded)
    assert_batches_equal(emitted_a + emitted_b, emitted)
    assert_batches_equal(resumed_flushed, flushed)
    chex.assert_trees_all_equal(resumed, final)
    check_bulk_equals_stepping(batcher, spec, saved, elements[k : k + CHUNK], flush=True)


def test_pad_value_for_a_key_the_element_lacks_raises_at_init():
    with pytest.raises(ValueError, match="`pad_value`.*nope"):
        jb.pack(4, 2, lengths=LENGTHS, pad_value={"nope": 1}).init(spec_for(4))


# --------------------------------------------------------------------------- bulk feed


CHUNK = 8  # one chunk length, so each configuration compiles its bulk program once


@functools.cache
def _bulk(batcher, flush, n=CHUNK):
    """Jitted: one chunk through the bulk `feed`, via `collect` (materialised) and via
    `consume` (the consumer's single call site)."""

    def append(carry, batch):
        out, count = carry
        out = jax.tree.map(
            lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, count, 0), out, batch
        )
        return out, count + 1

    def go(state, chunk):
        collected = jb.collect(batcher, state, chunk, n + 1, flush=flush)
        empty = jax.tree.map(jnp.zeros_like, collected[0])
        consumed = jb.consume(batcher, append, (empty, jnp.int32(0)), state, chunk, flush=flush)
        return collected, consumed

    return jax.jit(go)


def _slots(batches, count):
    batches = jax.device_get(batches)
    return [
        {**{k: v[i] for k, v in batches.data.items()}, "valid_mask": batches.valid_mask[i]}
        for i in range(count)
    ]


def check_bulk_equals_stepping(batcher, spec, state, chunk, flush):
    """The bulk path from `state` over `chunk` gives exactly stepping's batches and state."""
    before, emitted, flushed, after = run(batcher, chunk, spec, state=state)
    want = [b for b in emitted if b is not None] + (flushed if flush else [])
    s_step = after if flush else before
    if chunk:
        tree = stack(chunk)
    else:
        tree = jax.tree.map(lambda s: np.zeros((0, *s.shape), s.dtype), spec)
    (out_bulk, n_bulk, s_bulk), ((out_cons, n_cons), s_cons) = _bulk(batcher, flush, len(chunk))(
        state, tree
    )
    assert int(n_bulk) == int(n_cons) == len(want)
    assert_batches_equal(_slots(out_bulk, len(want)), want)
    assert_batches_equal(_slots(out_cons, len(want)), want)
    assert not np.asarray(out_bulk.valid_mask)[len(want) :].any()
    for s in (s_bulk, s_cons):
        assert stats_of(s) == stats_of(s_step)
        assert counters(jb.packing_stats(s)) == counters(jb.packing_stats(s_step))
        chex.assert_trees_all_equal((s.fills, s.segments), (s_step.fills, s_step.segments))
        # The buffered rows (the specified part of the buffer) flush the same.
        assert_batches_equal(run(batcher, [], spec, state=s)[2], flushed if not flush else [])


@pytest.mark.slow
@settings(max_examples=5)
@given(case=streams(), flush=st.booleans(), data=st.data())
def test_bulk_feed_equals_stepping(case, flush, data):
    config, _, seed = case
    max_len = config[5]
    pairs = data.draw(
        st.lists(st.tuples(*length_strategies(config)), min_size=CHUNK + 6, max_size=CHUNK + 6)
    )
    k = data.draw(st.integers(0, 6), label="elements stepped before the chunk")
    batcher, spec = batcher_for(*config[:5], config[6]), spec_for(max_len)
    elements = make_elements(pairs, max_len, seed)
    state = run(batcher, elements[:k], spec)[0]
    check_bulk_equals_stepping(batcher, spec, state, elements[k : k + CHUNK], flush)


@pytest.mark.parametrize("flush", [False, True])
def test_bulk_feed_of_an_empty_chunk(flush):
    config = CONFIGS[1]
    batcher, spec = batcher_for(*config[:5], config[6]), spec_for(config[5])
    state = run(batcher, make_elements([(3, 2), (5, 5)], config[5]), spec)[0]
    check_bulk_equals_stepping(batcher, spec, state, [], flush)


# --------------------------------------------------------------------------- the law checker


@pytest.mark.slow
@pytest.mark.parametrize("strategy, too_long", [("first_fit", "error"), ("best_fit", "truncate")])
def test_pack_passes_check_batcher(strategy, too_long):
    from jaxbatch.testing import check_batcher

    lengths = [(3, 1), (1, 2), (5, 5), (2, 0), (4, 3), (1, 1), (0, 0), (5, 2)]
    if too_long == "truncate":
        lengths[2] = (7, 6)  # longer than the row: its first 5 tokens come out, counted
    stream = stack(make_elements(lengths, 7, seed=3))
    # The truncating case also shuffles rows grouped by `id` (then the order is not FIFO
    # and a key is needed).
    shuffle = too_long == "truncate"
    batcher = jb.pack(
        5,
        2,
        lengths=LENGTHS,
        strategy=strategy,
        too_long=too_long,
        shuffle_rows=shuffle,
        shuffle_rows_group_by="id" if shuffle else None,
    )
    report = check_batcher(
        batcher,
        stream,
        lengths=LENGTHS,
        resume_steps=3,
        check_vmap=False,
        fifo=not shuffle,
        key=jax.random.key(0) if shuffle else None,
    )
    assert report.stats["skipped"] == 1  # the all-empty sequence
    assert report.stats["emitted"] == len(lengths) - 1


@pytest.mark.slow
def test_aligned_pack_passes_check_batcher():
    # Alignment leaves padding between the sequences of a row: the checker allows it.
    from jaxbatch.testing import check_batcher

    lengths = [(3, 1), (1, 2), (2, 2), (1, 1), (3, 3)]
    stream = stack(make_elements(lengths, 4, seed=5))
    batcher = jb.pack(6, 2, lengths=LENGTHS, alignment={"inputs": 2, "targets": 2})
    report = check_batcher(
        batcher, stream, lengths=LENGTHS, resume_steps=2, check_vmap=False, check_jit=False
    )
    assert report.stats["emitted"] == len(lengths)


def test_per_feature_row_lengths_pass_check_batcher():
    # Grain's `length_struct` per feature: the checker reads each feature's row length off
    # the batch (a sequence longer than its feature's row comes out truncated to it).
    from jaxbatch.testing import check_batcher

    lengths = [(3, 1), (1, 2), (6, 3), (2, 0), (4, 2), (1, 1)]
    stream = stack(make_elements(lengths, 6, seed=4))
    batcher = jb.pack({"inputs": 5, "targets": 2}, 2, lengths=LENGTHS, too_long="truncate")
    report = check_batcher(
        batcher, stream, lengths=LENGTHS, resume_steps=2, check_vmap=False, check_jit=False
    )
    assert report.stats["emitted"] == len(lengths)


# --------------------------------------------------------------------------- MaxText


def _maxtext_grain_path(docs, row_length, batch_size, max_segments, pad_id):
    """MaxText's `format_and_batch` with Grain packing (first fit), its steps reproduced
    from MaxText's source without importing it: Grain's packer, `Rekey`, `batch_and_pad`,
    `ShiftData(ignored_ids=[pad_id], axis=1)`; `shuffle_bins=False`."""
    grain = pytest.importorskip("grain", reason="compared with Grain only where it is installed")
    from grain import experimental

    sequences = [
        {"inputs": docs["inputs"][i, :n], "targets": docs["targets"][i, :n]}
        for i, n in enumerate(docs["length"])
    ]
    dataset = experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(sequences).to_iter_dataset(),
        length_struct={"inputs": row_length, "targets": row_length},
        num_packing_bins=batch_size,
        max_sequences_per_bin=max_segments,
        shuffle_bins=False,
    )
    renames = {
        f"{col}_{new}": f"{col}_{old}"
        for col in ("inputs", "targets")
        for new, old in (("segmentation", "segment_ids"), ("position", "positions"))
    }

    def rekey(element):  # MaxText's `Rekey`: each new key takes an old one's value
        for new, old in renames.items():
            element[new] = element.pop(old)
        return element

    def shift_left(x, fill):
        return np.concatenate([x[:, 1:], np.full_like(x[:, :1], fill)], axis=1)

    def shift(element):
        element["targets"] = shift_left(element["targets"], pad_id)
        segmentation = shift_left(element["targets_segmentation"], 0)
        element["targets_segmentation"] = np.where(element["targets"] != pad_id, segmentation, 0)
        return element

    dataset = dataset.map(rekey).batch(
        batch_size,
        batch_fn=functools.partial(
            experimental.batch_and_pad, batch_size=batch_size, pad_value=pad_id
        ),
    )
    return list(dataset.map(shift))


def test_maxtext_example_equals_grain_then_maxtext_steps():
    """examples/maxtext_packing.py: `jb.pack` and `to_maxtext` inside `jit` give exactly the
    arrays of MaxText's Grain packing path. A pad id that is also a real token: MaxText's
    shift zeroes the loss weight of such a target, and so does the example."""
    from test_examples import load

    example = load("maxtext_packing")
    pad_id = 7
    docs = example.make_documents(26, seed=1)  # the last batch has 2 rows, padded to 4
    assert (docs["inputs"] == pad_id).any()
    theirs = _maxtext_grain_path(
        docs,
        example.MAX_TARGET_LENGTH,
        example.LOCAL_BATCH_SIZE,
        example.MAX_SEGMENTS_PER_SEQ,
        pad_id,
    )
    carry = jax.device_get(example.run(docs, pad_id=pad_id, max_batches=len(theirs) + 1))
    assert int(carry["batches"]) == len(theirs) > 1
    assert (theirs[-1]["inputs_segmentation"][-1] == pad_id).all()  # a row batch_and_pad adds
    for k, their in enumerate(theirs):
        mine = {key: value[k] for key, value in carry["kept"].items()}
        chex.assert_trees_all_equal(mine, dict(their))


@functools.cache
def _fed(batcher):
    """Jitted: `feed` over one chunk (no flush), its batches built with `vmap(batch)`."""

    def go(state, chunk):
        state, emissions = batcher.feed(state, chunk, False)
        return state, emissions.count, jax.vmap(emissions.batch)(jnp.arange(CHUNK + 1))

    return jax.jit(go)


@pytest.mark.slow
def test_bulk_feed_per_feature_row_lengths_equals_stepping():
    config = CONFIGS[6]  # a row length per feature, best fit, aligned, capped, truncating
    batcher, spec = batcher_for(*config[:5], config[6]), spec_for(config[5])
    pairs = [(3, 1), (6, 3), (0, 0), (5, 2), (1, 3), (2, 0), (4, 1), (6, 2), (1, 1), (2, 2)]
    elements = make_elements(pairs, config[5], seed=9)
    state = run(batcher, elements[:2], spec)[0]
    chunk = elements[2 : 2 + CHUNK]
    before, emitted, flushed, _ = run(batcher, chunk, spec, state=state)
    want = [b for b in emitted if b is not None]
    fed, count, batches = _fed(batcher)(state, stack(chunk))
    assert int(count) == len(want) > 0
    assert_batches_equal(_slots(batches, len(want)), want)
    assert stats_of(fed) == stats_of(before)
    assert counters(jb.packing_stats(fed)) == counters(jb.packing_stats(before))
    chex.assert_trees_all_equal((fed.fills, fed.segments), (before.fills, before.segments))
    assert_batches_equal(run(batcher, [], spec, state=fed)[2], flushed)  # the open rows

"""Issue 17, the state and factory classes: what every batcher guarantees about its state.

One section per class of the issue:

* **x64** (item 3): every batcher passes its laws with `jax_enable_x64` on, and integer
  lengths, keys and channels are range-checked in their own dtype (never cut to 32 bits
  first).
* **A state of another configuration** (item 5): `step` / `flush` / `feed`, `load_state`
  and `load_distributed` refuse it, naming both configurations (`Stats.config`).
* **Donation** (item 8): every batcher's state can be donated to a jitted step, and an
  eager `step` never emits an array that is also the new state's buffer.
* **Counters** (item 9): per-call sums never overflow 32 bits; a `Counter` saturates at
  `2**64 - 1` instead of wrapping.
* **Factory and batcher errors** (item 10): a clear error naming the argument, the leaf or
  both states; factories allocate nothing.

Every batcher of the library is in `BATCHERS`, built once (so jitted runs compile once), with
a tiny stream and the `check_batcher` arguments it needs.
"""

import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb
from jaxbatch.testing import check_batcher

# --------------------------------------------------------------------------- the batchers


def _rows(batch):
    """`jb.rebatch`'s units: the valid rows of an input batch (None for padding rows)."""
    row = jb.Element(data=batch.data, state=batch.states, metadata=batch.metadata)
    return [
        jax.tree.map(lambda x, r=r: x[r], row) if valid else None
        for r, valid in enumerate(np.asarray(batch.valid_mask))
    ]


RATES = (2, 1)


def _sample(element):
    """`jb.multi_rate`'s unit: the element's one sample, under its channel."""
    c = int(element["channel"])
    return [(c, element["payload"][c])]


def _window_samples(batch):
    valid = np.flatnonzero(batch.valid_mask)
    return {
        c: [
            (c, batch.data[c][w, s])
            for w in valid
            for s in range(RATES[c])
            if batch.states["mask"][c][w, s]
        ]
        for c in range(len(RATES))
    }


def _even(element):
    return element.data["x"] % 2 == 0


def _same(element):
    return element


KEY = jax.random.key(0)
BATCHERS = {
    "fixed_size": jb.fixed_size(2),
    "shuffle": jb.shuffle(2, 3),
    "bucket_by": jb.bucket_by(lambda e: e.data["k"], (2, 3)),
    "bucket_by_length": jb.bucket_by_length((2, 4), (2, 2), length="n", features=("t",)),
    "pack": jb.pack(4, 2, lengths={"t": "n"}),
    "concat_and_split": jb.concat_and_split(3, 2, lengths={"t": "n"}),
    "rebatch": jb.rebatch(3),
    "multi_rate": jb.multi_rate(1, RATES),
    "combinators": jb.with_statistics(
        jb.filter_elements(jb.map_elements(jb.fixed_size(2), _same), _even)
    ),
}


def stream(name):
    """The batcher's stream, 5 to 7 elements, in JAX's default dtypes of the moment (int64
    and float64 under `jax_enable_x64`)."""
    tokens = np.arange(1, 21).reshape(5, 4)
    lengths = np.array([3, 1, 4, 2, 0])
    if name in ("fixed_size", "shuffle", "combinators"):
        return {"x": jnp.arange(6), "y": jnp.arange(12.0).reshape(6, 2)}
    if name == "bucket_by":
        return {"k": jnp.array([0, 1, 1, 0, 1]), "x": jnp.arange(5.0)}
    if name == "bucket_by_length":
        cut = np.where(np.arange(4)[None, :] < lengths[:, None], tokens, 0)
        return {"t": jnp.asarray(cut), "n": jnp.asarray(lengths)}
    if name in ("pack", "concat_and_split"):
        return {"t": jnp.asarray(tokens), "n": jnp.asarray(lengths)}
    if name == "rebatch":
        mask = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], bool)
        x = np.where(mask, np.arange(9).reshape(3, 3), -7)
        batches = [jb.Batch({"x": jnp.asarray(x[i])}, jnp.asarray(mask[i])) for i in range(3)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    assert name == "multi_rate"
    channel = jnp.array([0, 1, 0, 0, 1, 0, 1])
    return {"channel": channel, "payload": (jnp.arange(7.0), jnp.arange(7) * 10)}


LAW_ARGS = {
    "shuffle": {"key": KEY, "fifo": False},
    "bucket_by": {"fifo": False},
    "bucket_by_length": {"fifo": False},
    "pack": {"lengths": {"t": "n"}},
    "concat_and_split": {"lengths": {"t": "n"}, "split_sequences": True},
    "rebatch": {"units": _rows},
    "multi_rate": {"units": _sample, "batch_units": _window_samples},
}


def first(tree):
    return jax.tree.map(lambda x: x[0], tree)


def init(name):
    return BATCHERS[name].init(first(stream(name)), key=KEY)


# --------------------------------------------------------------------------- x64 (item 3)


# Every batcher runs the step loop's laws (conservation, order, counters, wide counters);
# `fixed_size` also resume, bad input and every jitted path (`jit`, `scan`, `batch_all`, the
# bulk `feed`, the drivers), where a default-dtype index used to meet an int32 one; `pack`'s
# bulk path is below. (Compile time: the other jitted paths run without x64 in their own
# test modules.)
JITTED_UNDER_X64 = ("fixed_size",)


@pytest.mark.parametrize("name", sorted(BATCHERS))
def test_every_batcher_passes_its_laws_under_x64(name):
    with jax.enable_x64(True):
        elements = stream(name)
        assert any(x.dtype in (jnp.int64, jnp.float64) for x in jax.tree.leaves(elements))
        check_batcher(
            BATCHERS[name],
            elements,
            check_jit=name in JITTED_UNDER_X64,
            check_vmap=False,
            resume_steps=[2] if name in JITTED_UNDER_X64 else (),
            check_bad_input=name in JITTED_UNDER_X64,  # trace-time checks: x64 changes nothing
            **LAW_ARGS.get(name, {}),
        )


WIDE = 2**32 + 1  # an int64 that a cast to int32 turns into 1, a valid length / key


def _run_x64(batcher, element):
    state = batcher.init(element)
    state, _ = batcher.step(state, element)
    return jax.block_until_ready(state)


def test_pack_bulk_path_under_x64():
    with jax.enable_x64(True):
        batches, count = jb.batch_all(BATCHERS["pack"], stream("pack"))
        assert int(count) == 2  # 10 tokens in two batches of 2 rows of 4
        assert int(jnp.sum(batches.data["t_segment_ids"] > 0)) == 10


def test_x64_lengths_and_keys_are_checked_before_narrowing():
    with jax.enable_x64(True):
        t = jnp.arange(4)
        bucket = jb.bucket_by_length((2, 4), (2, 2), length="n", features=("t",), too_long="skip")
        state = _run_x64(bucket, {"t": t, "n": jnp.int64(WIDE)})
        assert int(jb.operation_stats(state)["skipped_count"]) == 1  # not routed as length 1
        keyed = jb.bucket_by(lambda e: e.data["k"], (2, 2))
        with pytest.raises(Exception, match=r"key outside \[0, 2\)"):
            _run_x64(keyed, {"k": jnp.int64(WIDE), "x": jnp.float64(0)})
        rates = jb.multi_rate(1, RATES)
        sample = {"channel": jnp.int64(WIDE), "payload": (jnp.float64(0), jnp.int64(0))}
        state = _run_x64(rates, sample)
        assert int(jb.operation_stats(state)["skipped_count"]) == 1  # not channel 1
        for packer in (
            jb.pack(4, 1, lengths={"t": "n"}),
            jb.concat_and_split(4, 1, lengths={"t": "n"}),
        ):
            with pytest.raises(Exception, match="length"):
                _run_x64(packer, {"t": t, "n": jnp.int64(WIDE)})


# --------------------------------------------------------------------------- configuration (item 5)


def _refuses(batcher, state, *texts):
    """Each of `step`, `flush` and `feed` refuses `state` at trace time, naming `texts`."""
    element = first(stream("fixed_size"))
    calls = [lambda: batcher.step(state, element), lambda: batcher.flush(state)]
    if batcher.feed is not None:
        calls.append(lambda: batcher.feed(state, stream("fixed_size")))
    for call in calls:
        with pytest.raises(TypeError) as info:
            jax.eval_shape(call)
        for text in texts:
            assert text in str(info.value)


def test_a_state_of_another_fixed_size_is_refused():
    state = jb.fixed_size(2).init(first(stream("fixed_size")))
    assert state.stats.config.startswith("fixed_size(batch_size=2, ")
    _refuses(jb.fixed_size(3), state, "fixed_size(batch_size=2", "fixed_size(batch_size=3")


def test_a_state_of_another_shuffle_buffer_is_refused():
    state = jb.shuffle(2, 4).init(first(stream("fixed_size")), key=KEY)
    _refuses(jb.shuffle(2, 16), state, "buffer_size=4", "buffer_size=16")


def test_a_state_of_another_batcher_is_refused_naming_both():
    # Without jaxtyping's import hook the batchers' own check names both states; under it
    # (as in this suite) the annotation check fires first, naming both types too.
    state = jb.fixed_size(2).init(first(stream("fixed_size")))
    for other in (jb.shuffle(2, 4), jb.pack(4, 2, lengths={"t": "n"})):
        with pytest.raises(TypeError) as info:
            jax.eval_shape(other.flush, state)
        assert "FixedSizeState" in str(info.value)
        assert ("ShuffleState" in str(info.value)) or ("PackState" in str(info.value))


def test_check_state_names_both_states():
    from jaxbatch._src.base import check_state

    state = jb.fixed_size(2).init(first(stream("fixed_size")))
    with pytest.raises(TypeError, match=r"`ShuffleState`.*got a FixedSizeState of `fixed_size"):
        check_state(state, jb.ShuffleState, "shuffle(batch_size=2, buffer_size=4)")


CONFIGS = st.tuples(st.integers(1, 3), st.booleans(), st.sampled_from([0, -1]))


@settings(max_examples=25)
@given(built=CONFIGS, stepped=CONFIGS)
def test_fixed_size_accepts_exactly_the_states_of_its_configuration(built, stepped):
    def batcher(config):
        size, drop, pad = config
        return jb.fixed_size(size, drop_remainder=drop, pad_value=pad)

    state = jax.eval_shape(batcher(built).init, first(stream("fixed_size")))
    step = batcher(stepped).step  # a new closure: equal configurations still match
    element = first(stream("fixed_size"))
    if built == stepped:
        jax.eval_shape(step, state, element)
    else:
        with pytest.raises(TypeError, match="another configuration"):
            jax.eval_shape(step, state, element)


def test_the_fingerprint_names_the_spec_and_is_the_same_in_every_process():
    spec = first(stream("bucket_by"))
    config = jax.eval_shape(BATCHERS["bucket_by"].init, spec).stats.config
    assert "key_fn=<lambda>" in config and " at 0x" not in config  # no address
    assert "element {.data['k']: int32[], .data['x']: float32[]}" in config
    # Combinators fingerprint themselves and their inner batcher.
    configs = jb._src.base.configs_of(init("combinators"))
    names = {"with_statistics", "filter_elements", "map_elements", "fixed_size"}
    assert sorted(c.split("(")[0] for c in configs) == sorted(names)


def _saved(state):
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "state.ckpt")
    jb.save_state(path, state)
    return path


def test_load_state_refuses_another_configuration():
    spec = first(stream("pack"))
    first_fit = jb.pack(4, 2, lengths={"t": "n"}, strategy="first_fit")
    best_fit = jb.pack(4, 2, lengths={"t": "n"}, strategy="best_fit")
    path = _saved(first_fit.init(spec))
    with pytest.raises(ValueError, match="another configuration") as info:
        jb.load_state(path, jax.eval_shape(best_fit.init, spec))
    assert "strategy='first_fit'" in str(info.value) and "strategy='best_fit'" in str(info.value)
    restored = jb.load_state(path, jax.eval_shape(first_fit.init, spec))
    assert restored.stats.config == first_fit.init(spec).stats.config


def test_load_state_refuses_another_element_spec():
    batcher = jb.fixed_size(2)
    path = _saved(batcher.init({"x": jnp.zeros((), jnp.int32)}))
    with pytest.raises(ValueError, match=r"another configuration.*int32.*float32"):
        jb.load_state(path, jax.eval_shape(batcher.init, {"x": jnp.zeros((), jnp.float32)}))


def test_load_distributed_refuses_another_configuration():
    pytest.importorskip("orbax.checkpoint")
    spec = first(stream("fixed_size"))
    directory = os.path.join(tempfile.mkdtemp(), "ckpt")
    jb.save_distributed(directory, jb.fixed_size(2).init(spec))
    with pytest.raises(ValueError, match=r"fixed_size\(batch_size=2.*fixed_size\(batch_size=3"):
        jb.load_distributed(directory, jax.eval_shape(jb.fixed_size(3).init, spec))


def test_iterate_refuses_to_resume_from_another_configuration():
    source = [{"x": np.int32(i)} for i in range(5)]
    it = jb.iterate(jb.fixed_size(2), source, chunk_size=2)
    next(it)
    checkpoint = it.checkpoint()
    resumed = jb.iterate(jb.fixed_size(3), source, chunk_size=2, resume=checkpoint)
    with pytest.raises(TypeError, match=r"fixed_size\(batch_size=2.*fixed_size\(batch_size=3"):
        next(resumed)


# --------------------------------------------------------------------------- donation (item 8)


def _donated(name):
    return jax.jit(BATCHERS[name].step, donate_argnums=0)


@pytest.mark.parametrize("name", sorted(BATCHERS))
def test_every_state_can_be_donated_to_a_jitted_step(name):
    state = init(name)
    leaves = jax.tree.leaves(state)
    ids = [id(x) for x in leaves if isinstance(x, jax.Array)]
    assert len(ids) == len(set(ids)), "a state shares an array between two fields"
    state, _ = jax.block_until_ready(_donated(name)(state, first(stream(name))))
    # And again from the state it returned (itself made of fresh buffers).
    jax.block_until_ready(_donated(name)(state, first(stream(name))))


def _arrays(tree):
    return {id(x) for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)}


# The batchers whose emitted batch is (or may be) their buffer; the packing batchers and
# `multi_rate` build each batch anew (compile time: left out).
@pytest.mark.parametrize(
    "name", ["fixed_size", "shuffle", "bucket_by", "bucket_by_length", "rebatch", "combinators"]
)
def test_an_eager_emit_never_is_the_new_states_buffer(name):
    batcher, elements, state = BATCHERS[name], stream(name), init(name)
    for i in range(1):
        state, emit = batcher.step(state, jax.tree.map(lambda x, i=i: x[i], elements))
        assert not _arrays(state) & _arrays(emit), f"step {i}"
    state, emit = batcher.flush(state)
    assert not _arrays(state) & _arrays(emit), "flush"


# --------------------------------------------------------------------------- counters (item 9)

MAX = jb.Counter.MAX


@jax.jit
def _total(values):
    return jb.Counter.total(values)


def test_per_call_sums_pass_32_bits():
    values = jnp.full(6, 2**32 - 1, jnp.uint32)
    assert int(_total(values)) == 6 * (2**32 - 1)
    stats = jb.Stats.zeros().add(padded=_total(values), batches=jnp.int32(3))
    assert int(stats.padded) == 6 * (2**32 - 1) and int(stats.batches) == 3


@settings(max_examples=25)
@given(start=st.integers(0, MAX), steps=st.lists(st.integers(0, 2**32 - 1), max_size=4))
def test_counter_is_exact_then_saturates(start, steps):
    counter = jb.Counter.of(start)
    for n in steps:
        counter = counter.add(jnp.uint32(n))
    assert int(counter) == min(start + sum(steps), MAX)


def test_counter_saturates_at_2_to_the_64():
    top = jb.Counter.of(MAX)
    assert int(top.add(1)) == MAX and int(top + top) == MAX and int(top.add(0)) == MAX
    assert int(jb.Counter.of(MAX - 5).add(2**32 + 9)) == MAX
    assert int(jb.Counter.of(2**63).add(jb.Counter.of(2**63 - 1))) == MAX
    with pytest.raises(ValueError, match=r"\[0, 2\*\*64\)"):
        jb.Counter.of(2**64)


def test_counter_takes_64_bit_increments_under_x64():
    with jax.enable_x64(True):
        assert int(jb.Counter.of(5).add(jnp.int64(2**40 + 3))) == 2**40 + 8
        assert int(jb.Counter.total(jnp.array([2**40, 2**41], jnp.uint64))) == 3 * 2**40


# --------------------------------------------------------------------------- errors (item 10)


@pytest.mark.parametrize("pad_value", [float("inf"), float("-inf"), float("nan"), 2.5, 2**40])
@pytest.mark.parametrize("factory", [jb.fixed_size, jb.rebatch])
def test_a_pad_value_an_int_leaf_cannot_hold_is_named(pad_value, factory):
    batcher = factory(2, pad_value=pad_value)
    spec = {"x": jnp.zeros((), jnp.int32)}
    if factory is jb.rebatch:
        spec = jb.Batch({"x": jnp.zeros(2, jnp.int32)}, jnp.ones(2, bool))
    with pytest.raises(ValueError, match=r"`pad_value` .* cannot be stored in leaf .*int32"):
        batcher.init(spec)


def test_bos_features_none_is_named():
    with pytest.raises(ValueError, match=r"`bos_features` must be a collection.*got None"):
        jb.concat_and_split(4, 2, lengths={"t": "n"}, bos_features=None)


FACTORIES = {
    "fixed_size": lambda n: jb.fixed_size(n),
    "shuffle": lambda n: jb.shuffle(n, n),
    "rebatch": lambda n: jb.rebatch(n),
    "multi_rate": lambda n: jb.multi_rate(n, (1,), capacity=n),
    "bucket_by": lambda n: jb.bucket_by(lambda e: 0, (n,)),
    "pack": lambda n: jb.pack(n, 1, lengths={"t": "n"}),
    "concat_and_split": lambda n: jb.concat_and_split(n, 1, lengths={"t": "n"}),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factories_allocate_nothing_and_refuse_sizes_past_int32(name):
    before = len(jax.live_arrays())
    start = time.perf_counter()
    FACTORIES[name](2**30)  # huge, but fine lazily: nothing is allocated
    assert time.perf_counter() - start < 1.0
    assert len(jax.live_arrays()) == before
    with pytest.raises(ValueError, match=r"at most 2\*\*31 - 1 .*int32.*1099511627776"):
        FACTORIES[name](2**40)


def test_a_state_too_large_for_the_device_fails_clearly_at_init():
    batcher = jb.fixed_size(2**31 - 1)
    assert jax.eval_shape(batcher.init, {"x": jnp.zeros(2**16)}).buffer.data["x"].shape[0] > 0
    with pytest.raises(MemoryError, match=r"`init` cannot allocate a buffer of shape"):
        batcher.init({"x": jnp.zeros(2**16)})

"""`jb.pipeline` at the edges: x64, donation, the int32 stream, stages that do not fit.

* x64: positions, counters and the Feistel arithmetic are int32 / uint32 whatever
  `jax_enable_x64` says: the same batches and the same state with it on and off.
* Donation: no two fields of a pipeline state share a buffer; a donated state gives the
  results of an undonated one and its data stays where it is (no copy).
* Positions are int32: a stream holds at most `(2**31 - 1) // num_shards` positions; past
  that, an error (never a silent wrap to position 0).
* Bad input: a `ValueError` naming the argument at construction or `init`.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb
from jaxbatch.testing import check_batcher

KEY = jax.random.key(0)
N = 7
BIG = 2**31 - 1


def data():
    """Seven rows: `x` (row number, read by the batcher), `v` (32 bytes: payload)."""
    return {
        "x": jnp.arange(N, dtype=jnp.int32),
        "v": jnp.arange(N * 8, dtype=jnp.float32).reshape(N, 8),
    }


def second():
    return {"x": jnp.arange(100, 105, dtype=jnp.int32), "v": jnp.ones((5, 8), jnp.float32)}


ORDERS = {
    "epochs": (jb.epochs, data),
    "mixture": (lambda: jb.mixture([2, 1]), lambda: [data(), second()]),
    "random": (lambda: jb.mixture([2, 1], schedule="random"), lambda: [data(), second()]),
}


def record(carry, batch):
    """Each batch's `x` and first payload column, -1 in padding rows."""
    buf, k = carry
    x = jnp.where(batch.valid_mask, batch.data["x"], -1)
    v = jnp.where(batch.valid_mask, batch.data["v"][:, 0].astype(jnp.int32), -1)
    return buf.at[k].set(jnp.stack([x, v])), k + 1


def run(name, x64):
    """Two chunks of 12 positions (one program; the 6 batches of 4 need no drain)."""
    with jax.enable_x64(x64):
        order, make = ORDERS[name]
        pipe = jb.pipeline(make(), jb.fixed_size(4), order=order())
        state = pipe.init(jnp.int32(0), key=KEY)
        carry = (jnp.zeros((8, 2, 4), jnp.int32), jnp.int32(0))
        carry, state = jb.scan(
            pipe, record, carry, jb.next_positions(state, 12), state=state, flush=False
        )
        carry, state = jb.scan(
            pipe, record, carry, jb.next_positions(state, 12), state=state, flush=False
        )
        return jax.tree.map(np.asarray, (carry, state))


# --------------------------------------------------------------------------- x64


@pytest.mark.parametrize(
    "name",  # the mixture (the order with the most integer arithmetic) in the fast tier
    [n if n == "mixture" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(ORDERS)],
)
def test_the_same_batches_and_state_with_x64_on_and_off(name):
    (buf, k), state = run(name, False)
    (buf64, k64), state64 = run(name, True)
    assert int(k) == int(k64) == 6
    np.testing.assert_array_equal(buf, buf64)
    # Every leaf of the state (the checkpoint), dtypes included: int32 positions, counts,
    # epoch; uint32 seed; whatever x64 says.
    leaves, leaves64 = jax.tree.leaves(state), jax.tree.leaves(state64)
    assert [x.dtype for x in leaves] == [x.dtype for x in leaves64]
    for a, b in zip(leaves, leaves64):
        np.testing.assert_array_equal(a, b)
    o = state64.order
    int32 = np.dtype(np.int32)
    assert {x.dtype for x in (o.position, o.epoch, o.counts, o.origin, o.base)} == {int32}
    assert state64.seed.dtype == np.uint32
    assert int(o.position) == 24


@pytest.mark.parametrize("n", [13, BIG])  # cycle walking; the largest size
def test_permute_is_the_same_with_x64_on_and_off(n):
    index = jnp.asarray(np.unique(np.linspace(0, n - 1, 64).astype(np.int64)), jnp.int32)
    got = {}
    for x64 in (False, True):
        with jax.enable_x64(x64):
            got[x64] = np.asarray(jb.permute(KEY, jnp.int32(3), index, n))
            assert got[x64].dtype == np.int32
    np.testing.assert_array_equal(got[False], got[True])
    assert got[True].min() >= 0 and got[True].max() < n
    assert len(set(got[True].tolist())) == len(index)  # one to one


@pytest.mark.slow
def test_check_batcher_under_x64_with_keep_and_then():
    # Shuffled, bounded (positions to skip), a filter, then a second batcher: every path
    # check_batcher runs, with x64 on.
    with jax.enable_x64(True):
        order = jb.epochs(num_epochs=1)
        pipe = jb.pipeline(
            data(),
            jb.fixed_size(2),
            order=order,
            keep=lambda e: e.data["x"] != 3,
            then=jb.rebatch(3),
        )
        positions = jnp.arange(9, dtype=jnp.int32)
        where = jb.order_rows(order, N, KEY, positions)
        rows, valid = np.asarray(where.row), np.asarray(where.valid)
        host = jax.tree.map(np.asarray, data())

        def units(p):
            i = int(np.asarray(p))
            if not valid[i] or rows[i] == 3:
                return [None]
            return [jb.Element(data=jax.tree.map(lambda x: x[rows[i]], host))]

        report = check_batcher(
            pipe, positions, key=KEY, units=units, resume_steps=1, check_vmap=False
        )
        assert report.stats["emitted"] == N - 1 and report.stats["skipped"] == 3


@pytest.mark.slow
def test_check_batcher_under_x64_on_the_bulk_path():
    with jax.enable_x64(True):
        order = jb.mixture([2, 1], schedule="random")
        pipe = jb.pipeline([data(), second()], jb.fixed_size(3), order=order)
        positions = jnp.arange(7, dtype=jnp.int32)
        where = jb.order_rows(order, (N, 5), KEY, positions)
        both = jax.tree.map(lambda a, b: np.concatenate([a, b]), data(), second())

        def units(p):
            row = int(np.asarray(where.row)[int(np.asarray(p))])
            return [jb.Element(data=jax.tree.map(lambda x: x[row], both))]

        report = check_batcher(pipe, positions, key=KEY, units=units, resume_steps=1)
        assert "feed" in report.checks and report.stats["emitted"] == 7


@pytest.mark.slow
def test_pack_pipeline_under_x64_gives_the_batches_without_it():
    corpus = {
        "tokens": jnp.arange(1, 6 * 8 + 1, dtype=jnp.int32).reshape(6, 8),
        "length": jnp.asarray([3, 8, 1, 5, 2, 6], jnp.int32),
    }
    lengths = {"tokens": "length"}
    got = []
    for x64 in (False, True):
        with jax.enable_x64(x64):
            pipe = jb.pipeline(corpus, jb.pack(8, 2, lengths=lengths), lengths=lengths)
            got.append(jb.batch_all(pipe, jnp.arange(14, dtype=jnp.int32), key=KEY, max_batches=8))
    jax.tree.map(np.testing.assert_array_equal, *jax.tree.map(np.asarray, got))


# --------------------------------------------------------------------------- donation


def _arrays(tree):
    return [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_no_two_fields_of_a_pipeline_state_share_a_buffer(name):
    order, make = ORDERS[name]
    pipe = jb.pipeline(make(), jb.fixed_size(2), order=order(), then=jb.rebatch(4))
    arrays = _arrays(pipe.init(jnp.int32(0), key=KEY))
    assert len({id(x) for x in arrays}) == len(arrays)
    pointers = [x.unsafe_buffer_pointer() for x in arrays if x.size]
    assert len(set(pointers)) == len(pointers)


SUM = lambda c, b: c + jnp.sum(jnp.where(b.valid_mask, b.data["x"], 0))  # noqa: E731


def test_a_donated_state_gives_the_undonated_results_without_copying_the_data():
    pipe = jb.pipeline(data(), jb.fixed_size(3), order=jb.epochs())

    def chunk(state, positions):
        return jb.scan(pipe, SUM, jnp.int32(0), positions, state=state, flush=False)

    plain, donated = jax.jit(chunk), jax.jit(chunk, donate_argnums=0)
    state = pipe.init(jnp.int32(0), key=KEY)
    want = [plain(state, jb.next_positions(state, 5))]
    want.append(plain(want[0][1], jb.next_positions(want[0][1], 5)))

    state = pipe.init(jnp.int32(0), key=KEY)
    where = state.data["v"].unsafe_buffer_pointer()
    for total, expected in want:
        got = donated(state, jb.next_positions(state, 5))
        assert state.data["v"].is_deleted()  # handed to the call
        state = got[1]
        assert state.data["v"].unsafe_buffer_pointer() == where  # in place: not copied
        jax.tree.map(np.testing.assert_array_equal, got, (total, expected))
    # `init` shares the pipeline's arrays with the state: once donated, it says so.
    with pytest.raises(ValueError, match="data was donated"):
        pipe.init(jnp.int32(0), key=KEY)


# --------------------------------------------------------------------------- int32 stream


def near(state, position):
    """`state` standing at stream position `position`."""
    return eqx.tree_at(lambda s: s.order.position, state, jnp.int32(position))


def test_positions_up_to_the_int32_limit_then_an_error():
    pipe = jb.pipeline(data(), jb.fixed_size(2), order=jb.epochs(shuffle=False))
    state = near(pipe.init(jnp.int32(0)), BIG - 3)
    positions = jb.next_positions(state, 3)  # the last three: the next one is 2**31 - 1
    assert positions.tolist() == [BIG - 3, BIG - 2, BIG - 1]
    with pytest.raises(ValueError, match=r"`n`=4 positions from position 2147483644 pass"):
        jb.next_positions(state, 4)
    total, after = jb.scan(pipe, SUM, jnp.int32(0), positions, state=state)
    assert int(total) == sum(p % N for p in positions.tolist())
    assert int(after.order.position) == BIG and int(after.order.epoch) == (BIG - 1) // N
    with pytest.raises(ValueError, match=r"`n`=1 positions"):
        jb.next_positions(after, 1)
    # Past it (by hand, or wrapped to a negative int32): refused by name, never read as
    # position 0.
    wrapped = jnp.asarray([BIG, -BIG - 1], jnp.int32)
    with pytest.raises(jb.BatcherRuntimeError, match="stream position outside") as info:
        jb.scan(pipe, SUM, jnp.int32(0), wrapped, state=after)
    assert info.value.position == 0 and "fresh `pipe.init" in str(info.value)


def test_a_sharded_stream_holds_its_share_of_the_int32_positions():
    order = jb.epochs(shuffle=False, num_shards=4, shard_index=3)
    last = BIG // 4 - 1  # global position 4 * last + 3 fits, and so does the next one
    where = jb.order_rows(order, N, None, jnp.asarray([last], jnp.int32))
    assert where.row.tolist() == [(4 * last + 3) % N]
    with pytest.raises(Exception, match=r"outside \[0, 536870911\).*`num_shards`=4"):
        jb.order_rows(order, N, None, jnp.asarray([last + 1], jnp.int32))


def test_epochs_past_the_int32_stream_are_bounded_by_it():
    # 2**30 epochs of 4 rows: more positions than int32 holds; every one it holds is valid.
    order = jb.epochs(shuffle=False, num_epochs=2**30)
    where = jb.order_rows(order, 4, None, jnp.asarray([0, BIG - 1], jnp.int32))
    assert where.valid.tolist() == [True, True] and where.row.tolist() == [0, (BIG - 1) % 4]


# --------------------------------------------------------------------------- bad input

L = 4
CORPUS = {"tokens": jnp.ones((5, L), jnp.int32), "length": jnp.full((5,), 2, jnp.int32)}
LENGTHS = {"tokens": "length"}
PACK = jb.pack(L, 2, lengths=LENGTHS)
WIDE = {"tokens": jnp.ones((5, 8), jnp.int32), "length": jnp.full((5,), 2, jnp.int32)}


def _init(pipe):
    return pipe.init(jnp.int32(0), key=KEY)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        # a `map_fn` whose output the batcher cannot take
        (
            lambda: jb.pipeline(CORPUS, PACK, map_fn=lambda e: {"x": e.data["tokens"]}),
            r"^`batcher` cannot take the pipeline's rows after `map_fn`: `lengths` names",
        ),
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(2), map_fn=lambda e: e.data["nope"]),
            r"^`map_fn` failed on the rows of `data`: KeyError",
        ),
        # `then` that cannot take the first batcher's batches
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(2), then=PACK),
            r"^`then` cannot take the batches of `batcher`: `pack` needs",
        ),
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(4), then=jb.rebatch(2)),
            r"^`then` cannot take the batches of `batcher`: .*",
        ),
        # `lengths` with a batcher that does not pack
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(2), lengths=LENGTHS),
            r"^`lengths` is given but `batcher` does not pack",
        ),
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(2), keep=lambda e: e.data["length"]),
            r"^`keep` must return a scalar bool, got shape \(\) and dtype int32",
        ),
        (
            lambda: jb.pipeline(CORPUS, jb.fixed_size(2), keep=lambda e: e.data["tokens"] > 0),
            r"^`keep` must return a scalar bool, got shape \(4,\)",
        ),
    ],
)
def test_stages_that_do_not_fit_are_named_at_init(build, match):
    with pytest.raises(ValueError, match=match):
        _init(build())


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: jb.pipeline({"s": np.array(["a", "b"])}, PACK), r"Leaf `data\['s'\]` has dtype"),
        (
            lambda: jb.pipeline(
                [CORPUS, jax.tree.map(lambda x: x[:0], CORPUS)], PACK, order=jb.mixture([1, 1])
            ),
            r"`data\[1\]` is empty",
        ),
        (lambda: jb.mixture([1.0, float("nan")]), r"`weights\[1\]` must be a finite number"),
        (lambda: jb.mixture(np.array([1.0, -2.0])), r"`weights\[1\]` must be a finite number"),
        (lambda: jb.mixture([0, 0.0], schedule="random"), r"`weights` must hold at least one"),
        (lambda: jb.epochs(num_epochs=0), r"`num_epochs` must be a positive int"),
        (lambda: jb.epochs(num_epochs=-2), r"`num_epochs` must be a positive int"),
    ],
)
def test_bad_data_weights_and_epochs_are_named_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_stochastic_stage_without_a_key_says_where_to_pass_it():
    pipe = jb.pipeline(CORPUS, jb.shuffle(4, 2), order=jb.epochs(shuffle=False))
    with pytest.raises(ValueError, match=r"^`batcher` needs a PRNG key: pass one to the pipeline"):
        pipe.init(jnp.int32(0))

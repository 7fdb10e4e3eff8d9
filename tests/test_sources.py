"""Orders over random-access data: the keyed permutation, epochs, mixtures, sharding."""

import functools
import importlib.util
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb

KEY = jax.random.key(3)


@settings(max_examples=10, deadline=None)
@given(n=st.sampled_from([1, 2, 3, 7, 64, 101, 300]), epoch=st.integers(0, 50))
def test_permute_is_a_bijection(n, epoch):
    out = np.asarray(jb.permute(KEY, epoch, jnp.arange(n), n))
    assert sorted(out.tolist()) == list(range(n))


@pytest.mark.parametrize("n", [10, 101])  # one Feistel pass (2 x 5); three (10 x 10 < 101)
def test_permute_moves_every_index_evenly(n):
    """Over many epochs each index lands in every place about equally often."""
    epochs = 400
    out = np.asarray(jb.permute(KEY, jnp.arange(epochs)[:, None], jnp.arange(n)[None, :], n))
    counts = np.zeros((n, n))
    np.add.at(counts, (np.broadcast_to(np.arange(n), out.shape), out), 1)
    assert counts.min() > 0 or n > 50  # 400 draws over 101 places may miss one
    chi2 = ((counts - epochs / n) ** 2 / (epochs / n)).sum() / (n * (n - 1))
    assert chi2 < 1.5, chi2


@pytest.mark.slow  # four programs to compile
def test_epochs_locate_matches_the_general_schedule():
    """An `epochs` order's own `locate` gives the rows and counters of the general one."""
    rng = np.random.default_rng(0)
    for n, shards, shard, num_epochs in [(7, 1, 0, None), (10, 3, 2, 2)]:
        order = jb.epochs(num_epochs=num_epochs, num_shards=shards, shard_index=shard)
        fast = jax.jit(jb._src.sources.make_locate(order, (n,)))
        general = jax.jit(jb._src.sources.make_locate(order._replace(kind="general"), (n,)))
        state, seed = jb._src.sources.init_order(order), jnp.uint32(12345)
        for chunk in (jnp.arange(9), jnp.asarray(rng.integers(0, 60, 9)), jnp.arange(9)):
            positions = (state.position + chunk).astype(jnp.int32)
            got, want = fast(state, seed, positions), general(state, seed, positions)
            jax.tree.map(np.testing.assert_array_equal, got, want)
            state = got[1]


def test_permute_differs_per_epoch_and_key():
    a = np.asarray(jb.permute(KEY, 0, jnp.arange(100), 100))
    b = np.asarray(jb.permute(KEY, 1, jnp.arange(100), 100))
    c = np.asarray(jb.permute(jax.random.key(4), 0, jnp.arange(100), 100))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    # any position computable on its own
    assert int(jb.permute(KEY, 1, 37, 100)) == b[37]


@settings(max_examples=6, deadline=None)
@given(n=st.sampled_from([1, 3, 10, 33]), epochs=st.integers(1, 4), extra=st.integers(0, 7))
def test_epochs_read_every_row_once_per_epoch(n, epochs, extra):
    order = jb.epochs(num_epochs=epochs)
    where = _rows_jit(order, n, jnp.arange(4 * 33 + 7))  # one shape of positions
    where = jax.tree.map(lambda x: x[: n * epochs + extra], where)
    rows, valid = np.asarray(where.row), np.asarray(where.valid)
    assert valid[: n * epochs].all() and not valid[n * epochs :].any()
    for e in range(epochs):
        assert sorted(rows[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert np.asarray(where.epoch)[: n * epochs].tolist() == [p // n for p in range(n * epochs)]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _rows_jit(order, n, positions):
    return jb.order_rows(order, n, KEY, positions)


def test_shards_split_each_epoch():
    n, shards = 12, 3
    rows = []
    for s in range(shards):
        order = jb.epochs(num_shards=shards, shard_index=s)
        rows.append(np.asarray(jb.order_rows(order, n, KEY, jnp.arange(n // shards)).row))
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))
    whole = np.asarray(jb.order_rows(jb.epochs(), n, KEY, jnp.arange(n)).row)
    assert rows[1].tolist() == whole[1::shards].tolist()


def _grain_selection(k, proportions):
    """Grain 0.2.18's `_dataset_and_key_of_next_element`, written out (for when Grain is
    not installed)."""
    remaining, cur, nxt = sum(proportions), k, k + 1
    for i, p in enumerate(proportions):
        next_k, next_k1 = (cur * (remaining - p)) // remaining, (nxt * (remaining - p)) // remaining
        if cur - next_k != nxt - next_k1:
            return i, nxt - next_k1 - 1
        remaining, cur, nxt = remaining - p, next_k, next_k1
    raise AssertionError


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, 1.0), (3, 1, 7)])
def test_deterministic_mixture_is_grains_schedule(weights):
    sizes = (50, 40, 60)[: len(weights)]
    order = jb.mixture(list(weights), shuffle=False)
    n = 200
    where = jb.order_rows(order, sizes, None, jnp.arange(n))
    proportions = jb._src.sources.grain_proportions(jb.mixture(list(weights)).weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    want = [_grain_selection(k, proportions) for k in range(n)]
    if importlib.util.find_spec("grain") is not None:
        with warnings.catch_warnings():  # Grain touches APIs the newest JAX deprecates
            warnings.simplefilter("ignore", DeprecationWarning)
            from grain._src.python.dataset.transformations import mix

        want_grain = [mix._dataset_and_key_of_next_element(k, tuple(proportions)) for k in range(n)]
        assert want == want_grain
    source = np.asarray(where.source)
    assert source.tolist() == [d for d, _ in want]
    got = np.asarray(where.row) - offsets[source]
    assert got.tolist() == [j % sizes[d] for d, j in want]


def test_random_mixture_frequencies_and_counters():
    order = jb.mixture([0.7, 0.2, 0.1], schedule="random")
    n = 3000
    where = jb.order_rows(order, (100, 100, 100), KEY, jnp.arange(n))
    freq = np.bincount(np.asarray(where.source), minlength=3) / n
    np.testing.assert_allclose(freq, [0.7, 0.2, 0.1], atol=0.03)
    # each source runs through its rows in its own shuffled epochs: nothing repeats early
    for d in range(3):
        rows = np.asarray(where.row)[np.asarray(where.source) == d][:100]
        assert len(set(rows.tolist())) == len(rows)


@pytest.mark.parametrize(
    "weights, match",
    [
        ([], "at least one positive"),
        ([1.0, -1.0], r"weights\[1\]"),
        ([0.0, 0.0], "at least one positive"),
        ([1.0, math.nan], r"weights\[1\]"),
        ([1.0, 0.0], "all be positive"),
        ("ab", "sequence of numbers"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        jb.mixture(weights)


def test_bad_orders():
    with pytest.raises(ValueError, match="`num_epochs`"):
        jb.epochs(num_epochs=0)
    with pytest.raises(ValueError, match="`shard_index`"):
        jb.epochs(num_shards=2, shard_index=2)
    with pytest.raises(ValueError, match="cannot be sharded"):
        jb.mixture([1, 1], schedule="random", num_shards=2)
    with pytest.raises(ValueError, match="`schedule`"):
        jb.mixture([1, 1], schedule="round robin")
    with pytest.raises(ValueError, match="`num_elements`"):
        jb.permute(KEY, 0, 0, 0)

"""A pipeline works with every batcher of jaxbatch: its batches are the batcher's over the
rows in the pipeline's order (`jb.order_rows`), whichever way the payload travels.

The reference is the batcher itself run by `jb.batch_all` over the rows gathered first, so
each case checks the pipeline's order, its skipping of positions past the last epoch, the
key it gives the batcher (`fold_in(key, 1)`) and its late gather, on the bulk path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb

N, P = 7, 16  # rows, positions (two epochs of 7, then two past the end)
LEN = {"tokens": "length"}
KEY = jax.random.key(3)
ORDER = jb.epochs(num_epochs=2)


def _data():
    rng = np.random.default_rng(0)
    length = rng.integers(1, 9, N).astype(np.int32)
    tokens = rng.integers(1, 100, (N, 8)) * (np.arange(8)[None] < length[:, None])
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "length": jnp.asarray(length),
        "label": jnp.arange(N, dtype=jnp.int32),
    }


DATA = _data()


def _ordered():
    where = jb.order_rows(ORDER, N, KEY, jnp.arange(P))
    rows = np.asarray(where.row)[np.asarray(where.valid)]
    assert len(rows) == 2 * N
    return jax.tree.map(lambda x: x[rows], DATA)


CASES = {
    "fixed_size": (lambda: jb.fixed_size(3), {}, None),
    "pack, lengths given": (lambda: jb.pack(10, 2, lengths=LEN), {"lengths": LEN}, None),
    "pack, no lengths": (lambda: jb.pack(10, 2, lengths=LEN), {}, None),
    "concat_and_split": (lambda: jb.concat_and_split(10, 2, lengths=LEN), {}, None),
    "bucket_by_length": (
        lambda: jb.bucket_by_length([4, 8], [2, 2], length="length", features=["tokens"]),
        {},
        20,
    ),
    "shuffle": (lambda: jb.shuffle(3, 4), {}, None),
}


# Fixed size, pack with `lengths` and shuffle are the late-gather paths that
# tests/test_pipeline.py already runs in the fast tier; here they run with the slow sweeps.
_COVERED = {"fixed_size", "pack, lengths given", "shuffle"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in _COVERED else n for n in CASES],
)
def test_pipeline_batches_are_the_batchers_over_the_ordered_rows(name):
    make, kwargs, room = CASES[name]
    batcher = make()
    pipe = jb.pipeline(DATA, batcher, order=ORDER, **kwargs)
    want, count = jb.batch_all(
        batcher, _ordered(), key=jax.random.fold_in(KEY, 1), max_batches=room
    )
    got, got_count = jb.batch_all(pipe, jnp.arange(P, dtype=jnp.int32), key=KEY, max_batches=room)
    assert int(got_count) == int(count) > 0
    k = int(count)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a)[:k], np.asarray(b)[:k]),
        want,
        got,
    )


def test_rebatch_after_fixed_size_is_fixed_size_of_the_larger_size():
    pipe = jb.pipeline(DATA, jb.fixed_size(3), order=ORDER, then=jb.rebatch(5))
    got, count = jb.batch_all(pipe, jnp.arange(P, dtype=jnp.int32), key=KEY, max_batches=4)
    want, want_count = jb.batch_all(jb.fixed_size(5), _ordered())
    assert int(count) == int(want_count) == 3
    np.testing.assert_array_equal(got.valid_mask[:3], want.valid_mask)
    for leaf in DATA:
        np.testing.assert_array_equal(
            np.where(
                want.valid_mask[..., None] if leaf == "tokens" else want.valid_mask,
                got.data[leaf][:3],
                0,
            ),
            np.where(
                want.valid_mask[..., None] if leaf == "tokens" else want.valid_mask,
                want.data[leaf],
                0,
            ),
        )


def test_a_batcher_that_reads_payload_sees_the_real_rows_by_default():
    # A user's batcher that keeps rows whose token sum is even: with proxies it would see
    # zeros and keep everything. The default gathers first for batchers it does not know.
    inner = jb.fixed_size(2)
    keep_even = jb.filter_elements(inner, lambda e: jnp.sum(e.data["tokens"]) % 2 == 0)
    pipe = jb.pipeline(DATA, keep_even, order=ORDER)
    got, count = jb.batch_all(pipe, jnp.arange(P, dtype=jnp.int32), key=KEY, max_batches=16)
    sums = np.asarray(jnp.sum(got.data["tokens"], axis=-1))[np.asarray(got.valid_mask)]
    assert len(sums) > 0 and np.all(sums % 2 == 0)
    ordered = _ordered()
    assert len(sums) == int(np.sum(np.asarray(jnp.sum(ordered["tokens"], -1)) % 2 == 0))


def test_late_gather_true_is_refused_for_a_batcher_that_cannot_plan_on_proxies():
    with pytest.raises(ValueError, match=r"`late_gather=True`: `batcher` cannot batch") as e:
        jb.pipeline(
            DATA,
            jb.bucket_by_length([4, 8], [2, 2], length="length", features=["tokens"]),
            late_gather=True,
        )
    assert "late_gather=False" in str(e.value)

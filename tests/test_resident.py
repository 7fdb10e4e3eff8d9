"""A pipeline's data is *resident*: the drivers' own programs take it apart from the rest of
the state and hand the caller's arrays back, so a call never copies the dataset
(`jb.split_resident`). Without this every `jb.scan` call wrote the whole dataset out again."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb
from jaxbatch._src.base import join_resident, split_resident

DATA = {"x": jnp.arange(40, dtype=jnp.float32).reshape(20, 2)}
PIPE = jb.pipeline(DATA, jb.fixed_size(4), order=jb.epochs())


def total(c, b):
    return c + jnp.sum(jnp.where(b.valid_mask[:, None], b.data["x"], 0.0))


def _pointer(state):
    return state.data["x"].unsafe_buffer_pointer()


def test_scan_returns_the_callers_data_not_a_copy_and_the_same_result():
    state = PIPE.init(jnp.int32(0), key=jax.random.key(1))
    a, s1 = jb.scan(PIPE, total, 0.0, jb.next_positions(state, 10), state=state, flush=False)
    assert _pointer(s1) == _pointer(state)
    b, s2 = jb.scan(PIPE, total, a, jb.next_positions(s1, 30), state=s1)
    assert _pointer(s2) == _pointer(state)
    # The same stream in one call (data inside the program as usual) gives the same sums.
    whole = jax.jit(lambda s, p: jb.consume(PIPE, total, 0.0, s, p))
    c, s3 = whole(state, jb.next_positions(state, 40))
    np.testing.assert_allclose(float(b), float(c))
    np.testing.assert_array_equal(s2.order.position, s3.order.position)
    jax.tree.map(np.testing.assert_array_equal, s2.inner, s3.inner)


def test_iterate_reads_every_row_once_through_the_light_programs():
    # One epoch of positions through the host driver: every row once, in batches of 4.
    pipe = jb.pipeline(DATA, jb.fixed_size(4), order=jb.epochs(num_epochs=1, shuffle=False))
    batches = list(jb.iterate(pipe, np.arange(20, dtype=np.int32), chunk_size=8))
    firsts = np.concatenate([np.asarray(b.data["x"])[np.asarray(b.valid_mask), 0] for b in batches])
    assert firsts.tolist() == list(range(0, 40, 2))


def test_split_and_join_are_inverse_and_other_states_pass_through():
    state = PIPE.init(jnp.int32(0), key=jax.random.key(1))
    light, data = split_resident(state)
    assert light.data is None and data is state.data
    back = join_resident(light, data)
    jax.tree.map(np.testing.assert_array_equal, back, state)
    plain = jb.fixed_size(2).init({"x": jnp.zeros(())})
    assert split_resident(plain) == (plain, None)
    assert join_resident(plain, None) is plain

"""`save_state` / `load_state`: bit-exact round trips, loud refusals of mismatched `like`s and
of damaged files."""

import functools
import os
import pathlib
import struct
import tempfile

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

import jaxbatch as jb

# The documented layout: magic, uint32 version, uint64 header length, SHA-256, header, payload.
MAGIC_SIZE = 9
FIXED_SIZE = MAGIC_SIZE + 4 + 8 + 32


class QueueState(eqx.Module):
    buffer: jax.Array
    counts: dict
    key: jax.Array
    flags: jax.Array
    half: jax.Array
    policy: str = eqx.field(static=True, default="fifo")


class OtherState(eqx.Module):  # same fields as QueueState, another class
    buffer: jax.Array
    counts: dict
    key: jax.Array
    flags: jax.Array
    half: jax.Array
    policy: str = eqx.field(static=True, default="fifo")


def make_state(key=None, *, cls=QueueState, policy="fifo"):
    key = jax.random.key(0) if key is None else key
    return cls(
        buffer=jnp.arange(8, dtype=jnp.float32).reshape(4, 2),
        counts={
            "seen": jnp.array(2**32 - 1, jnp.uint32),
            "nested": {"dropped": jnp.array([-128, 127], jnp.int8)},
        },
        key=jax.random.split(key)[1],
        flags=jnp.array([True, False]),
        half=jnp.array([1.5, -0.0, jnp.inf], jnp.bfloat16),
        policy=policy,
    )


def _is_key(x):
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _unkey(tree):
    """Typed keys replaced by their key data, so trees compare with chex."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def assert_same_state(got, expected):
    """Same structure, leaf types, dtypes, and bits (typed keys: same impl and key data)."""
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        assert type(g) is type(e)
        if isinstance(e, jax.Array | np.ndarray | np.generic):
            assert g.dtype == e.dtype and g.shape == e.shape
    chex.assert_trees_all_equal(_unkey(got), _unkey(expected))
    for g, e in zip(jax.tree.leaves(_unkey(got)), jax.tree.leaves(_unkey(expected))):
        if isinstance(e, jax.Array | np.ndarray | np.generic):
            assert np.asarray(g).tobytes() == np.asarray(e).tobytes()


@functools.cache
def checkpoint_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "state.ckpt")
        jb.save_state(path, make_state())
        return pathlib.Path(path).read_bytes()


def load_bytes(tmp_path, data: bytes, like=None):
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(data)
    return jb.load_state(path, make_state() if like is None else like)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("use_path_object", [False, True])
def test_round_trip_module_state(tmp_path, use_path_object):
    state = make_state()
    path = tmp_path / "state.ckpt"
    path = path if use_path_object else str(path)
    jb.save_state(path, state)
    assert_same_state(jb.load_state(path, state), state)


def test_round_trip_with_shape_dtype_struct_like(tmp_path):
    state = make_state(jax.random.key(3))
    jb.save_state(tmp_path / "s.ckpt", state)
    like = jax.eval_shape(make_state, jax.random.key(0))
    assert isinstance(like.key, jax.ShapeDtypeStruct)
    assert_same_state(jb.load_state(tmp_path / "s.ckpt", like), state)


@pytest.mark.parametrize(
    "dtype",
    [jnp.bool_, jnp.int8, jnp.uint8, jnp.int32, jnp.uint32, jnp.float16, jnp.bfloat16,
     jnp.float32, jnp.complex64, jnp.float8_e4m3fn, jnp.int4],
)  # fmt: skip
def test_dtypes_preserved(tmp_path, dtype):
    values = np.arange(6).reshape(2, 3) % 2 if dtype == jnp.bool_ else np.arange(-3, 3)
    state = {"jax": jnp.asarray(values, dtype), "numpy": np.asarray(values).astype(dtype)}
    jb.save_state(tmp_path / "s.ckpt", state)
    assert_same_state(jb.load_state(tmp_path / "s.ckpt", state), state)
    assert_same_state(jb.load_state(tmp_path / "s.ckpt", jax.eval_shape(lambda: state)), {
        "jax": state["jax"], "numpy": jnp.asarray(state["numpy"])
    })  # fmt: skip


def test_nan_payloads_and_signed_zeros_are_bit_exact(tmp_path):
    bits = np.array([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000], np.uint32)
    state = {"x": jnp.asarray(bits.view(np.float32))}
    jb.save_state(tmp_path / "s.ckpt", state)
    loaded = jb.load_state(tmp_path / "s.ckpt", jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(np.asarray(loaded["x"]).view(np.uint32), bits)


@given(
    array=hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float16, np.int8, np.uint32, np.int32, np.bool_]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_any_array_round_trips(tmp_path, array):
    state = {"jax": jnp.asarray(array), "numpy": array, "scalar_counter": jnp.uint32(7)}
    jb.save_state(tmp_path / "s.ckpt", state)
    assert_same_state(jb.load_state(tmp_path / "s.ckpt", state), state)


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_keys_round_trip(tmp_path, impl):
    keys = jax.random.split(jax.random.key(1, impl=impl), 3)
    state = {"one": keys[0], "many": keys}
    jb.save_state(tmp_path / "s.ckpt", state)
    loaded = jb.load_state(tmp_path / "s.ckpt", jax.eval_shape(lambda: state))
    assert loaded["many"].dtype == keys.dtype and loaded["many"].shape == (3,)
    assert str(jax.random.key_impl(loaded["one"])) == impl
    assert_same_state(loaded, state)


def test_loaded_key_continues_the_same_random_stream(tmp_path):
    key = jax.random.key(42)
    jb.save_state(tmp_path / "k.ckpt", {"key": key})
    loaded = jb.load_state(tmp_path / "k.ckpt", {"key": jax.ShapeDtypeStruct((), key.dtype)})
    for k in (key, loaded["key"]):
        assert k.dtype == key.dtype
    chex.assert_trees_all_equal(
        jax.random.uniform(loaded["key"], (5,)), jax.random.uniform(key, (5,))
    )
    chex.assert_trees_all_equal(
        jax.random.key_data(jax.random.split(loaded["key"], 4)),
        jax.random.key_data(jax.random.split(key, 4)),
    )


def _step(state, x):
    key, sub = jax.random.split(state["key"])
    noise = jax.random.uniform(sub, (2,))
    total = state["total"] + noise * x
    return {"count": state["count"] + jnp.uint32(1), "key": key, "total": total}, noise


def _init(key):
    return {"count": jnp.uint32(0), "key": key, "total": jnp.zeros(2, jnp.float32)}


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    run = jax.jit(lambda s, xs: jax.lax.scan(_step, s, xs))
    xs = jnp.arange(6, dtype=jnp.float32)
    straight_state, straight_out = run(_init(jax.random.key(7)), xs)

    half_state, first_out = run(_init(jax.random.key(7)), xs[:3])
    jb.save_state(tmp_path / "s.ckpt", half_state)
    resumed = jb.load_state(tmp_path / "s.ckpt", jax.eval_shape(_init, jax.random.key(0)))
    final_state, second_out = run(resumed, xs[3:])

    assert_same_state(final_state, straight_state)
    chex.assert_trees_all_equal(jnp.concatenate([first_out, second_out]), straight_out)


def test_python_and_numpy_scalars(tmp_path):
    state = {"n": 5, "flag": True, "x": 0.1, "big": 2**40, "np": np.float32(1.5), "i": np.int64(3)}
    jb.save_state(tmp_path / "s.ckpt", state)
    loaded = jb.load_state(tmp_path / "s.ckpt", state)
    assert loaded == state
    assert {k: type(v) for k, v in loaded.items()} == {k: type(v) for k, v in state.items()}

    # Against `jax.eval_shape`: Python scalars come back as JAX holds them, weakly typed.
    small = {"n": 5, "flag": True, "x": 0.5}
    jb.save_state(tmp_path / "small.ckpt", small)
    loaded = jb.load_state(tmp_path / "small.ckpt", jax.eval_shape(lambda: small))
    assert loaded["n"].weak_type and loaded["n"].dtype == jnp.int32 and int(loaded["n"]) == 5
    assert loaded["x"].weak_type and float(loaded["x"]) == 0.5
    assert loaded["flag"].dtype == jnp.bool_ and bool(loaded["flag"])

    # A jitted step turns Python scalars into arrays; a Python-scalar `like` takes them back.
    jb.save_state(tmp_path / "jit.ckpt", jax.jit(lambda s: s)(small))
    loaded = jb.load_state(tmp_path / "jit.ckpt", small)
    assert loaded == small and type(loaded["n"]) is int

    # A Python int that JAX's int32 cannot hold is refused, not wrapped around.
    with pytest.raises(ValueError, match=r"`state\['big'\]` holds 1099511627776"):
        jb.load_state(tmp_path / "s.ckpt", {**state, "big": jax.eval_shape(lambda: 0)})


def test_like_sharding_is_used(tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    state = {"x": jnp.arange(8, dtype=jnp.float32)}
    jb.save_state(tmp_path / "s.ckpt", state)
    like = {"x": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}
    loaded = jb.load_state(tmp_path / "s.ckpt", like)
    assert loaded["x"].sharding == sharding
    chex.assert_trees_all_equal(loaded, state)
    # A `like` array gives its own sharding; an uncommitted one gives the default device.
    assert jb.load_state(tmp_path / "s.ckpt", loaded)["x"].sharding == sharding
    assert jb.load_state(tmp_path / "s.ckpt", state)["x"].committed is False


# ----------------------------------------------------------------------------- writing


def test_overwrite_is_atomic_and_failed_save_leaves_old_file(tmp_path):
    path = tmp_path / "s.ckpt"
    jb.save_state(path, {"x": jnp.zeros(2)})
    jb.save_state(path, {"x": jnp.ones(2)})
    with pytest.raises(TypeError, match=r"state\['x'\].*static field"):
        jb.save_state(path, {"x": "not an array"})
    chex.assert_trees_all_equal(jb.load_state(path, {"x": jnp.zeros(2)}), {"x": jnp.ones(2)})
    assert os.listdir(tmp_path) == ["s.ckpt"]


def test_save_inside_jit_is_refused(tmp_path):
    def save(state):
        jb.save_state(tmp_path / "s.ckpt", state)
        return state

    with pytest.raises(TypeError, match="tracer"):
        jax.jit(save)({"x": jnp.zeros(2)})


def test_like_with_a_non_array_leaf_is_refused(tmp_path):
    jb.save_state(tmp_path / "s.ckpt", {"x": jnp.zeros(2)})
    with pytest.raises(TypeError, match=r"`like` leaf `state\['x'\]` is a str"):
        jb.load_state(tmp_path / "s.ckpt", {"x": "zeros"})


# ----------------------------------------------------------------------------- incompatible


def _with_counts(counts):
    return eqx.tree_at(lambda s: s.counts, make_state(), counts)


INCOMPATIBLE = {
    "extra leaf": (
        lambda: _with_counts({**make_state().counts, "extra": jnp.uint32(0)}),
        ["state.counts['extra']", "in `like` but not in the file"],
    ),
    "missing leaf": (
        lambda: _with_counts({"seen": jnp.uint32(0)}),
        ["state.counts['nested']['dropped']", "in the file but not in `like`"],
    ),
    "shape": (
        lambda: eqx.tree_at(lambda s: s.buffer, make_state(), jnp.zeros((4, 3), jnp.float32)),
        ["`state.buffer`", "shape (4, 2)", "shape (4, 3)"],
    ),
    "dtype": (
        lambda: eqx.tree_at(lambda s: s.flags, make_state(), jnp.zeros(2, jnp.int32)),
        ["`state.flags`", "dtype bool", "dtype int32"],
    ),
    "raw key for typed key": (
        lambda: eqx.tree_at(lambda s: s.key, make_state(), jax.random.PRNGKey(0)),
        ["`state.key`", "key<fry>", "uint32"],
    ),
    "module class": (
        lambda: make_state(cls=OtherState),
        ["tree structure differs", "OtherState"],
    ),
    "static field": (
        lambda: make_state(policy="lifo"),
        ["tree structure differs", "lifo"],
    ),
}


@pytest.mark.parametrize("as_spec", [False, True], ids=["arrays", "specs"])
@pytest.mark.parametrize("case", INCOMPATIBLE)
def test_incompatible_like_is_refused(tmp_path, case, as_spec):
    make_like, expected_words = INCOMPATIBLE[case]
    like = jax.eval_shape(make_like) if as_spec else make_like()
    jb.save_state(tmp_path / "s.ckpt", make_state())
    with pytest.raises(ValueError, match="structurally incompatible") as info:
        jb.load_state(tmp_path / "s.ckpt", like)
    for words in expected_words:
        assert words in str(info.value)


# ----------------------------------------------------------------------------- damaged files


def _header_end(data: bytes) -> int:
    (header_len,) = struct.unpack_from("<Q", data, MAGIC_SIZE + 4)
    return FIXED_SIZE + header_len


@pytest.mark.parametrize(
    "cut",
    ["1", "magic", "fixed-1", "fixed", "header-1", "header", "header+1", "mid-payload", "end-1"],
)
def test_truncated_file_is_refused(tmp_path, cut):
    data = checkpoint_bytes()
    header_end = _header_end(data)
    offset = {
        "1": 1,
        "magic": MAGIC_SIZE,
        "fixed-1": FIXED_SIZE - 1,
        "fixed": FIXED_SIZE,
        "header-1": header_end - 1,
        "header": header_end,
        "header+1": header_end + 1,
        "mid-payload": (header_end + len(data)) // 2,
        "end-1": len(data) - 1,
    }[cut]
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bytes(tmp_path, data[:offset])


@given(cut=st.integers(min_value=0))
def test_any_truncation_is_refused(tmp_path, cut):
    data = checkpoint_bytes()
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bytes(tmp_path, data[: cut % len(data)])


@pytest.mark.parametrize(
    "where", ["magic", "version", "header length", "digest", "header", "payload", "last byte"]
)
def test_flipped_byte_is_refused(tmp_path, where):
    data = checkpoint_bytes()
    header_end = _header_end(data)
    offset = {
        "magic": 3,
        "version": MAGIC_SIZE,
        "header length": MAGIC_SIZE + 4,
        "digest": FIXED_SIZE - 1,
        "header": (FIXED_SIZE + header_end) // 2,
        "payload": (header_end + len(data)) // 2,
        "last byte": len(data) - 1,
    }[where]
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bytes(tmp_path, bytes(damaged))


@given(position=st.integers(min_value=0), mask=st.integers(min_value=1, max_value=255))
def test_any_changed_byte_is_refused(tmp_path, position, mask):
    damaged = bytearray(checkpoint_bytes())
    damaged[position % len(damaged)] ^= mask
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bytes(tmp_path, bytes(damaged))


@pytest.mark.parametrize(
    "data",
    [b"", b"not a checkpoint, just some text\n", b"\x93JAX", b"\x93NUMPY\x01\x00v\x00{'descr'"],
    ids=["empty", "text", "magic prefix", "npy"],
)
def test_non_checkpoint_file_is_refused(tmp_path, data):
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_bytes(tmp_path, data)


def test_trailing_bytes_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"truncated or corrupt: 1 unexpected byte\(s\)"):
        load_bytes(tmp_path, checkpoint_bytes() + b"\x00")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        jb.load_state(tmp_path / "absent.ckpt", make_state())

"""Batches on a mesh of 4 simulated CPU devices (conftest), per-device streams, checkpoints.

Each device's rows are exactly its shard; per-device streams batch exactly as each stream
would alone; training equals the single-device run; the sharded state resumes through
orbax bit-identically; the example never gathers a batch to one device.
"""

import functools
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jaxbatch as jb

DEVICES = 4
BATCH = 3  # rows per device and step
LENGTH = 10  # elements per stream: 3 full batches and a padded one


@functools.cache
def mesh(auto: bool = False) -> jax.sharding.Mesh:
    assert jax.device_count() == DEVICES, "conftest sets 4 CPU devices"
    kind = jax.sharding.AxisType.Auto if auto else jax.sharding.AxisType.Explicit
    return jax.make_mesh((DEVICES,), ("data",), axis_types=(kind,))


def stream(num: int = DEVICES * LENGTH) -> dict[str, np.ndarray]:
    x = np.arange(num * 2, dtype=np.float32).reshape(num, 2)
    return {"x": x, "i": np.arange(num, dtype=np.int32)}


BATCHER = jb.fixed_size(BATCH)
BUCKETS = jb.bucket_by(lambda e: e.data["i"] % 2, (2, 2))
MAX_BATCHES = 8


def record(carry, batch):
    """Consumer: write every global batch (its data and mask) into slot `k`."""
    out, k = carry
    out = jax.tree.map(
        # A test may gather (reshard to replicated) to keep everything it saw.
        lambda o, b: jax.lax.dynamic_update_index_in_dim(o, jax.sharding.reshard(b, P()), k, 0),
        out,
        (batch.data["i"], batch.valid_mask),
    )
    return out, k + 1


def empty_record(m):
    rows = DEVICES * BATCH
    out = (jnp.zeros((MAX_BATCHES, rows), jnp.int32), jnp.zeros((MAX_BATCHES, rows), bool))
    return jax.device_put(out, NamedSharding(m, P())), jnp.int32(0)


def streams_of(data, m):
    idx = jb.stream_indices(len(data["i"]), m)
    return jb.device_streams({k: v[idx] for k, v in data.items()}, m)


# --------------------------------------------------------------------------- shard


@pytest.mark.parametrize("jit", [False, True])
def test_shard_puts_each_devices_rows_on_it(jit):
    batch = jb.Batch.from_parts(
        {"x": jnp.arange(16.0).reshape(8, 2)},
        valid_mask=jnp.arange(8) < 7,
        batch_state={"step": jnp.int32(5)},
    )
    place = jax.jit(lambda b: jb.shard(b, mesh())) if jit else (lambda b: jb.shard(b, mesh()))
    placed = place(batch)
    assert placed.data["x"].sharding.is_equivalent_to(NamedSharding(mesh(), P("data")), 2)
    assert placed.batch_state["step"].sharding.is_fully_replicated
    parts = batch.split_for_devices(DEVICES)
    for shard in placed.data["x"].addressable_shards:
        d = mesh().devices.tolist().index(shard.device)
        np.testing.assert_array_equal(shard.data, parts[d].data["x"])
    for shard in placed.valid_mask.addressable_shards:
        d = mesh().devices.tolist().index(shard.device)
        np.testing.assert_array_equal(shard.data, parts[d].valid_mask)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), placed, batch))


def test_shard_takes_a_named_sharding_and_global_batch_matches():
    batch = jb.Batch.from_parts({"x": jnp.arange(8)})
    by_sharding = jb.shard(batch, NamedSharding(mesh(), P("data")))
    assert by_sharding.data["x"].sharding.spec == P("data")
    built = jb.global_batch(batch, mesh())  # one process: local rows are the global batch
    np.testing.assert_array_equal(built.data["x"], batch.data["x"])
    assert built.data["x"].sharding.spec == P("data")


def test_shard_errors_say_what_would_work():
    batch = jb.Batch.from_parts({"x": jnp.arange(10)})
    with pytest.raises(ValueError, match=r"batch size is 10.*multiple of 4, such as 8 or 12"):
        jb.shard(batch, mesh())
    with pytest.raises(ValueError, match=r"`axis` 'model' is not an axis of the mesh"):
        jb.shard(batch, mesh(), axis="model")
    with pytest.raises(ValueError, match=r"does not split axis 0"):
        jb.shard(batch, NamedSharding(mesh(), P()))
    with pytest.raises(ValueError, match=r"`num_elements` is 10.*8 or 12"):
        jb.stream_indices(10, mesh())
    with pytest.raises(ValueError, match=r"holds 4 of the 4 devices.*shape \(4, n, \.\.\.\)"):
        jb.device_streams({"x": np.zeros((3, 5))}, mesh())


# --------------------------------------------------------------------------- streams


def test_stream_indices_deal_elements_round_robin():
    idx = jb.stream_indices(12, mesh())
    np.testing.assert_array_equal(idx, np.arange(12).reshape(3, 4).T)


@functools.cache
def run_recorded(auto: bool = False):
    m = mesh(auto)
    data = stream()
    out, states = jb.scan_per_device(BATCHER, record, empty_record(m), streams_of(data, m), m)
    return data, out, states


@pytest.mark.parametrize("auto", [False, True], ids=["explicit-mesh", "auto-mesh"])
def test_each_device_batches_exactly_its_own_stream(auto):
    data, ((rows, masks), count), states = run_recorded(auto)
    rows, masks = np.asarray(rows), np.asarray(masks)
    per_stream = -(-LENGTH // BATCH)
    assert int(count) == per_stream
    for d in range(DEVICES):
        alone, n = jb.batch_all(BATCHER, {k: v[d::DEVICES] for k, v in data.items()})
        assert int(n) == per_stream
        mine = slice(d * BATCH, (d + 1) * BATCH)
        np.testing.assert_array_equal(masks[:per_stream, mine], alone.valid_mask)
        np.testing.assert_array_equal(
            np.where(alone.valid_mask, rows[:per_stream, mine], -1),
            np.where(alone.valid_mask, alone.data["i"], -1),
        )
        state_alone = jb.scan(BATCHER, lambda c, b: c, 0, {k: v[d::4] for k, v in data.items()})[1]
        mine_state = jax.tree.map(lambda x, d=d: jnp.asarray(np.asarray(x)[d]), states)
        got = {k: int(v) for k, v in jb.operation_stats(mine_state).items()}
        assert got == {k: int(v) for k, v in jb.operation_stats(state_alone).items()}
    # Every element arrives exactly once, in the global batch of the single-device run.
    valid = rows[:per_stream][masks[:per_stream]]
    assert sorted(valid.tolist()) == list(range(DEVICES * LENGTH))
    for t in range(per_stream):
        got = set(rows[t][masks[t]].tolist())
        assert got == set(range(t * DEVICES * BATCH, min((t + 1) * DEVICES * BATCH, 40)))
    # The states stay on their devices: device d holds stream d's state.
    assert states.count.sharding.spec == P("data")
    for shard in states.count.addressable_shards:
        assert shard.data.shape == (1,)


PACK = jb.pack(4, 2, lengths={"x": "n"})


def pack_streams(seed=0, length=9):
    """Four streams of sequences whose lengths differ per stream, so the streams emit
    different numbers of batches at different steps."""
    rng = np.random.default_rng(seed)
    n = rng.integers(0, 5, size=(DEVICES, length)).astype(np.int32)
    n[0] = 4  # stream 0: one sequence per row, twice as many batches as the others
    x = np.arange(DEVICES * length * 4, dtype=np.int32).reshape(DEVICES, length, 4) + 1
    return {"x": x, "n": n}


def collect_pack(carry, batch):
    """Consumer: keep each global batch's tokens and row mask in slot `k`."""
    out, k = carry
    seen = (batch.data["x"], batch.valid_mask)
    out = jax.tree.map(
        lambda o, b: jax.lax.dynamic_update_index_in_dim(o, jax.sharding.reshard(b, P()), k, 0),
        out,
        seen,
    )
    return out, k + 1


def empty_pack_record(m, slots=12):
    rows = DEVICES * 2
    out = (jnp.zeros((slots, rows, 4), jnp.int32), jnp.zeros((slots, rows), bool))
    return jax.device_put(out, NamedSharding(m, P())), jnp.int32(0)


@pytest.mark.slow
@pytest.mark.parametrize("bulk", [True, False], ids=["bulk-feed", "stepped"])
def test_streams_that_emit_at_different_steps_batch_as_alone(bulk):
    """`pack`'s streams emit different numbers of batches: with the bulk `feed` global
    batch `k` holds every stream's `k`-th batch (stepped: step `k`'s); either way each
    stream's batches, in order, and its Stats are those of the stream alone."""
    m, data = mesh(), pack_streams()
    batcher = PACK if bulk else PACK._replace(feed=None)
    streams = jb.device_streams(data, m)
    traces = []

    def consumer(carry, batch):
        traces.append(1)
        return collect_pack(carry, batch)

    (out, count), states = jb.scan_per_device(batcher, consumer, empty_pack_record(m), streams, m)
    assert len(traces) == 1  # one call site: the train step is compiled once
    tokens, masks = (np.asarray(a)[: int(count)] for a in out)
    alone_counts = []
    for d in range(DEVICES):
        alone, n = jb.batch_all(PACK, {k: v[d] for k, v in data.items()}, max_batches=12)
        alone_counts.append(int(n))
        mine = slice(2 * d, 2 * d + 2)
        got = [(t[mine], mk[mine]) for t, mk in zip(tokens, masks) if mk[mine].any()]
        assert len(got) == int(n)
        for k, (t, mk) in enumerate(got):
            np.testing.assert_array_equal(mk, alone.valid_mask[k])
            np.testing.assert_array_equal(t, alone.data["x"][k])
        if bulk:  # global batch k is every stream's k-th batch
            assert all(masks[k, mine].any() for k in range(int(n)))
        state_alone = jb.scan(PACK, lambda c, b: c, 0, {k: v[d] for k, v in data.items()})[1]
        mine_state = jax.tree.map(lambda x, d=d: jnp.asarray(np.asarray(x)[d]), states)
        got_stats = {k: int(v) for k, v in jb.operation_stats(mine_state).items()}
        assert got_stats == {k: int(v) for k, v in jb.operation_stats(state_alone).items()}
    assert len(set(alone_counts)) > 1  # the streams do emit different numbers of batches
    if bulk:
        assert int(count) == max(alone_counts)


@pytest.mark.slow
def test_bulk_per_device_continues_a_stream_and_checks_its_room():
    m, data = mesh(), pack_streams(1)
    streams = jb.device_streams(data, m)
    whole, _ = jb.scan_per_device(PACK, collect_pack, empty_pack_record(m), streams, m)
    first = jax.tree.map(lambda x: x[:, :4], streams)
    second = jax.tree.map(lambda x: x[:, 4:], streams)
    carry, states = jb.scan_per_device(
        PACK, collect_pack, empty_pack_record(m), first, m, flush=False
    )
    carry, _ = jb.scan_per_device(PACK, collect_pack, carry, second, m, states=states)
    # The same global batches: a call without `flush` holds back the batches of streams
    # ahead of the others (`DeviceStates.pending`), so where the call ends changes nothing.
    jax.tree.map(np.testing.assert_array_equal, carry, whole)
    with pytest.raises(ValueError, match="`max_batches`"):
        jb.scan_per_device(PACK, collect_pack, empty_pack_record(m), streams, m, max_batches=0)
    with pytest.raises(ValueError, match=r"1 slots of room \(\d+ needed\).*`max_batches`"):
        jb.scan_per_device(PACK, collect_pack, empty_pack_record(m), streams, m, max_batches=1)


@pytest.mark.slow
def test_a_shuffle_buffer_drains_per_device_with_the_default_room():
    """`shuffle` (bulk feed) holds many batches at the end: the default room covers its
    drain; each stream's batches are those of the stream alone with its own key."""
    m, key = mesh(), jax.random.key(5)
    data = {"i": np.arange(DEVICES * 12, dtype=np.int32)}
    idx = jb.stream_indices(len(data["i"]), m)
    per_stream = data["i"][idx]
    batcher = jb.shuffle(2, 8)

    def keep(carry, batch):
        out, k = carry
        rows = jax.sharding.reshard(jnp.where(batch.valid_mask, batch.data["i"], -1), P())
        return jax.lax.dynamic_update_index_in_dim(out, rows, k, 0), k + 1

    empty = jax.device_put(jnp.full((16, DEVICES * 2), -2, jnp.int32), NamedSharding(m, P()))
    (out, count), _ = jb.scan_per_device(
        batcher, keep, (empty, jnp.int32(0)), jb.device_streams({"i": per_stream}, m), m, key=key
    )
    out = np.asarray(out)[: int(count)]
    assert sorted(out[out >= 0].tolist()) == data["i"].tolist()  # every element once
    keys = jax.random.split(key, DEVICES)
    for d in range(DEVICES):
        alone, n = jb.batch_all(batcher, {"i": per_stream[d]}, max_batches=16, key=keys[d])
        want = np.where(alone.valid_mask, alone.data["i"], -1)[: int(n)]
        np.testing.assert_array_equal(out[: int(n), 2 * d : 2 * d + 2], want)


def test_per_device_streams_refuse_tree_emissions_and_bad_shapes():
    m = mesh()
    streams = streams_of(stream(16), m)
    with pytest.raises(TypeError, match="one `Batch`.*Bucketed"):
        jb.scan_per_device(BUCKETS, lambda c, b: c, 0, streams, m)
    with pytest.raises(ValueError, match=r"number of streams is 6.*4 or 8"):
        jb.scan_per_device(BATCHER, lambda c, b: c, 0, {"x": jnp.zeros((6, 2))}, m)


# --------------------------------------------------------------------------- training


def test_training_equals_the_single_device_run():
    example = load_example()
    m = mesh()
    data = example.make_data(256)
    params, _ = example.train(m, data, epochs=1)
    single, _ = jb.scan(
        jb.fixed_size(example.BATCH_PER_DEVICE * DEVICES), example.train_step,
        example.init_params(), data,
    )  # fmt: skip
    for k in params:
        np.testing.assert_allclose(params[k], single[k], rtol=1e-6, atol=1e-7)


def test_example_never_gathers_a_batch(capfd):
    """The consumer receives batches sharded over `data`; no all-gather in the program."""
    example = load_example()
    m = mesh()
    seen = []

    def step(params, batch):
        for leaf in (batch.data["x"], batch.data["y"], batch.valid_mask):
            jax.debug.inspect_array_sharding(leaf, callback=seen.append)
        return example.train_step(params, batch)

    data = example.make_data(64)
    params, _ = example.train(m, data, epochs=1, step=step)
    assert len(seen) == 3
    for sharding in seen:
        assert sharding.is_equivalent_to(NamedSharding(m, P("data")), 1)
    streams = example.streams_on(m, data)
    run = jax.jit(lambda p, s: jb.scan_per_device(example.BATCHER, step, p, s, m))
    with jax.set_mesh(m):
        hlo = run.lower(example.init_params(), streams).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    np.testing.assert_allclose(params["b"], example.train(m, data, epochs=1)[0]["b"])


@functools.cache
def load_example():
    path = pathlib.Path(__file__).parent.parent / "examples" / "sharded_training.py"
    spec = importlib.util.spec_from_file_location("sharded_training", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sharded_training"] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- checkpoints


def test_sharded_state_resumes_bit_identically_through_orbax(tmp_path):
    pytest.importorskip("orbax.checkpoint", reason="needs the `distributed` extra")
    m = mesh()
    data, (whole, _), _ = run_recorded()
    streams = streams_of(data, m)
    first = jax.tree.map(lambda x: x[:, :5], streams)  # mid-batch: 2 rows buffered per device
    second = jax.tree.map(lambda x: x[:, 5:], streams)
    carry, states = jb.scan_per_device(BATCHER, record, empty_record(m), first, m, flush=False)
    tree = {"batcher": states, "train": {"carry": carry, "key": jax.random.key(7)}}
    jb.save_distributed(tmp_path / "ckpt", tree)
    like = jax.tree.map(jnp.zeros_like, tree)
    like["train"]["key"] = jax.random.key(0)
    restored = jb.load_distributed(tmp_path / "ckpt", like=like)
    assert restored["batcher"].buffer.data["x"].sharding == states.buffer.data["x"].sharding
    assert jax.random.key_impl(restored["train"]["key"]) == jax.random.key_impl(
        tree["train"]["key"]
    )
    np.testing.assert_array_equal(
        jax.random.key_data(restored["train"]["key"]), jax.random.key_data(jax.random.key(7))
    )
    resumed, _ = jb.scan_per_device(
        BATCHER, record, restored["train"]["carry"], second, m, states=restored["batcher"]
    )
    for a, b in zip(jax.tree.leaves(resumed[0]), jax.tree.leaves(whole)):
        np.testing.assert_array_equal(a, b)


def test_distributed_checkpoint_errors(tmp_path, monkeypatch):
    pytest.importorskip("orbax.checkpoint", reason="needs the `distributed` extra")
    tree = {"w": jnp.ones(3)}
    jb.save_distributed(tmp_path / "a", tree)
    with pytest.raises(ValueError, match="already exists; pass `overwrite=True`"):
        jb.save_distributed(tmp_path / "a", tree)
    with pytest.raises(ValueError, match=r"leaf `\['w'\]` has shape \(3,\).*shape \(4,\)"):
        jb.load_distributed(tmp_path / "a", like={"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"leaves only in `like`: \[\"\['v'\]\"\]"):
        jb.load_distributed(tmp_path / "a", like={"v": jnp.ones(3), "w": jnp.ones(3)})
    with pytest.raises(TypeError, match=r"Leaf `\['n'\]` of `tree` is a int"):
        jb.save_distributed(tmp_path / "b", {"n": 3})
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxbatch\[distributed\]'"):
        jb.save_distributed(tmp_path / "c", tree)

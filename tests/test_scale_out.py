"""Scale-out as a user meets it: a small LM trained with `jb.scan_per_device` on the mesh
exactly as the README builds it (4 simulated CPU devices, conftest), split calls, checks.

* The train step is ordinary code: an embedding lookup and attention over packed rows with
  the segment mask run on `jax.make_mesh`'s default (Explicit) axes.
* Epoch 2 reuses epoch 1's compiled program (the returned carry is placed like the given one).
* Global batch `k` does not depend on where the stream is split into calls (fixed_size, pack,
  shuffle): a property over split points.
* A run-time check of the batcher raises; the packing counters read as totals; too little
  room under the user's own `jit` is counted, not silently lost.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import jaxbatch as jb

DEVICES, VOCAB, WIDTH, ROW = 4, 32, 8, 8


@functools.cache
def readme_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((jax.device_count(),), ("data",))  # exactly as the README


def documents(seed: int = 0, num: int = DEVICES * 10) -> dict[str, np.ndarray]:
    """Byte-level documents of 1..ROW tokens, so the streams emit different batch counts."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, ROW + 1, num).astype(np.int32)
    n[::DEVICES] = ROW  # stream 0 fills a row per document: more batches than the others
    tokens = rng.integers(1, VOCAB, (num, ROW)).astype(np.int32)
    return {"tokens": np.where(np.arange(ROW) < n[:, None], tokens, 0), "n": n}


def streams_of(data, mesh, start=0, stop=None) -> dict[str, jax.Array]:
    """The per-device streams of `data`, elements `start:stop` of each."""
    idx = jb.stream_indices(len(next(iter(data.values()))), mesh)[:, start:stop]
    return jb.device_streams({k: v[idx] for k, v in data.items()}, mesh)


PACK = jb.pack(ROW, 2, lengths={"tokens": "n"})
CONCAT = jb.concat_and_split(ROW, 2, lengths={"tokens": "n"})  # no bulk `feed`: stepped
TRACES: list[int] = []


def init_params() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "embed": 0.1 * jax.random.normal(k1, (VOCAB, WIDTH)),
        "out": 0.1 * jax.random.normal(k2, (WIDTH, VOCAB)),
    }


def lm_step(params, batch):
    """One SGD step of a one-layer LM: embedding, segment-masked causal attention, logits."""
    TRACES.append(1)
    tokens = batch.data["tokens"]
    segments = batch.data["tokens_segment_ids"]

    def loss(params):
        h = params["embed"][tokens]  # [rows, ROW, WIDTH]: the line the issue tripped on
        scores = jnp.einsum("rqd,rkd->rqk", h, h) / np.sqrt(WIDTH).astype(np.float32)
        causal = jnp.tril(jnp.ones((1, ROW, ROW), bool))
        same = segments[:, :, None] == segments[:, None, :]
        allowed = causal & same & (segments[:, :, None] > 0)
        attn = jax.nn.softmax(jnp.where(allowed, scores, -1e9), axis=-1)
        logits = jnp.einsum("rqk,rkd->rqd", attn, h) @ params["out"]
        targets = jnp.roll(tokens, -1, axis=1)
        real = (segments > 0) & (jnp.roll(segments, -1, axis=1) == segments)
        real = real.at[:, -1].set(False) & batch.valid_mask[:, None]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(real, nll, 0.0)) / jnp.maximum(jnp.sum(real), 1).astype(nll.dtype)

    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)


def test_an_lm_trains_on_the_readme_mesh_compiles_once_and_resumes_anywhere():
    mesh, data = readme_mesh(), documents()
    streams = streams_of(data, mesh)
    TRACES.clear()
    params, states = jb.scan_per_device(PACK, lm_step, init_params(), streams, mesh)
    traced = len(TRACES)  # 1, or 0 if another test already compiled this program
    again, _ = jb.scan_per_device(PACK, lm_step, params, streams, mesh)  # epoch 2
    assert len(TRACES) == traced <= 1  # no new trace in epoch 2: the carry kept its placement
    assert not np.allclose(np.asarray(again["out"]), np.asarray(params["out"]))
    # The counters of the per-device states read as totals over the devices.
    stats = jb.packing_stats(states)
    assert int(stats["tokens"]) == int(data["n"].sum())
    assert int(stats["sequences"]) == len(data["n"])
    assert int(jb.operation_stats(states)["applied_count"]) == len(data["n"])
    assert int(jnp.sum(states.lost)) == 0
    # The epoch split into two calls (a checkpoint) trains on the same global batches.
    first, rest = streams_of(data, mesh, 0, 3), streams_of(data, mesh, 3)
    half, held = jb.scan_per_device(PACK, lm_step, init_params(), first, mesh, flush=False)
    resumed, _ = jb.scan_per_device(PACK, lm_step, half, rest, mesh, states=held)
    jax.tree.map(np.testing.assert_array_equal, resumed, params)


# --------------------------------------------------------------------------- split points

SLOTS = 24


def record(carry, batch):
    """Consumer: global batch `k`'s values (`-1` in masked rows) into slot `k`."""
    out, k = carry
    x = batch.data["tokens"] if "tokens" in batch.data else batch.data["i"]
    mask = batch.valid_mask.reshape(batch.valid_mask.shape + (1,) * (x.ndim - 1))
    row = jnp.where(mask, x, -1).reshape(x.shape[0], -1)
    return jax.lax.dynamic_update_index_in_dim(out, row, k, 0), k + 1


SPLIT_BATCHERS = {
    "fixed_size": (jb.fixed_size(2), lambda: {"i": np.arange(DEVICES * 9, dtype=np.int32)}),
    "pack": (PACK, documents),
    "shuffle": (jb.shuffle(2, 4), lambda: {"i": np.arange(DEVICES * 9, dtype=np.int32)}),
}


def empty(batcher, data):
    width = DEVICES * 2 * (ROW if "tokens" in data else 1)
    return jnp.full((SLOTS, width), -2, jnp.int32), jnp.int32(0)


@functools.cache
def whole_run(name):
    batcher, make = SPLIT_BATCHERS[name]
    mesh, data = readme_mesh(), make()
    key = jax.random.key(3)
    carry, _ = jb.scan_per_device(
        batcher, record, empty(batcher, data), streams_of(data, mesh), mesh, key=key
    )
    return jax.tree.map(np.asarray, carry)


@settings(max_examples=4, deadline=None)
@given(name=st.sampled_from(sorted(SPLIT_BATCHERS)), split=st.sampled_from([0, 5]))
def test_global_batches_do_not_depend_on_where_the_stream_is_split(name, split):
    batcher, make = SPLIT_BATCHERS[name]
    mesh, data = readme_mesh(), make()
    first, rest = streams_of(data, mesh, 0, split), streams_of(data, mesh, split)
    key = jax.random.key(3)
    carry, states = jb.scan_per_device(
        batcher, record, empty(batcher, data), first, mesh, key=key, flush=False
    )
    carry, _ = jb.scan_per_device(batcher, record, carry, rest, mesh, states=states)
    (want, count), (got, got_count) = whole_run(name), jax.tree.map(np.asarray, carry)
    assert int(got_count) == int(count)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- checks


def test_a_run_time_check_of_the_batcher_raises_instead_of_aborting():
    mesh, data = readme_mesh(), documents(1)
    data["n"][5] = -1  # a negative length: `pack` checks it inside the sharded program
    with pytest.raises(jb.BatcherRuntimeError, match="element 1 of stream 1 .*is negative"):
        jb.scan_per_device(PACK, lambda c, b: c, jnp.int32(0), streams_of(data, mesh), mesh)


def test_too_little_room_raises_eagerly_and_is_counted_under_your_own_jit():
    mesh, data = readme_mesh(), documents(2)
    streams = streams_of(data, mesh)
    count = lambda c, b: c + 1  # noqa: E731
    with pytest.raises(ValueError, match=r"slots of room \(\d+ needed\)"):
        jb.scan_per_device(PACK, count, jnp.int32(0), streams, mesh, max_batches=2)
    run = jax.jit(lambda s: jb.scan_per_device(PACK, count, jnp.int32(0), s, mesh, max_batches=2))
    with jax.set_mesh(mesh):
        _, states = run(streams)
    assert int(jnp.sum(states.lost)) > 0  # dropped batches are counted, not silent
    # A stream far ahead of the others between calls needs room to hold its batches back.
    with pytest.raises(ValueError, match="`max_pending`"):
        jb.scan_per_device(PACK, count, jnp.int32(0), streams, mesh, flush=False, max_pending=0)


def test_a_stepped_batchers_check_and_runaway_drain_raise_batcher_runtime_errors():
    """A batcher without a bulk `feed`: its run-time check raises (naming the stream and
    the element) instead of aborting, and a `flush` that never stops is bounded (law 3)."""
    mesh, data = readme_mesh(), documents(1, 16)
    data["n"][5] = -1  # element 1 of stream 1
    with pytest.raises(jb.BatcherRuntimeError, match=r"element 1 of stream 1 \(`data\['n'\]`=-1\)"):
        jb.scan_per_device(CONCAT, lambda c, b: c, jnp.int32(0), streams_of(data, mesh), mesh)
    inner = jb.fixed_size(2)
    endless = jb.Batcher(
        init=inner.init,
        step=inner.step,
        flush=lambda s: (s, jb.Emit(inner.flush(s)[1].batch, jnp.array(True))),
    )
    streams = jb.device_streams({"i": jnp.arange(8).reshape(4, 2)}, mesh)
    with pytest.raises(jb.BatcherRuntimeError, match="law 3"):
        jb.scan_per_device(endless, lambda c, b: c, jnp.int32(0), streams, mesh)


# --------------------------------------------------------------------------- elastic resume


def seen_ids(carry, batch):
    """Consumer: every valid row's element id, in slot order (`-1` for masked rows)."""
    out, k = carry
    ids = jnp.where(batch.valid_mask, batch.data["i"], -1)
    return jax.lax.dynamic_update_slice_in_dim(out, ids, k * ids.shape[0], 0), k + 1


@pytest.mark.parametrize(
    "before, after, batcher",
    [(4, 2, jb.fixed_size(3)), (2, 4, jb.fixed_size(3)), (4, 2, jb.shuffle(3, 4))],
    ids=["fixed_size-4-2", "fixed_size-2-4", "shuffle-4-2"],
)
def test_elastic_resume_batches_every_element_exactly_once(before, after, batcher):
    """Read part of the stream on `before` devices, save, continue on `after` devices:
    the buffered rows are carried over and every element is batched exactly once."""
    old = jax.make_mesh((before,), ("data",), devices=jax.devices()[:before])
    new = jax.make_mesh((after,), ("data",), devices=jax.devices()[:after])
    ids = np.arange(42, dtype=np.int32)
    read = 5 * before  # 5 elements per old device: fixed_size: 1 batch out, 2 rows buffered
    key = jax.random.key(7)
    empty = (jnp.full(128, -1, jnp.int32), jnp.int32(0))
    idx = jb.stream_indices(read, old)
    (first, k1), saved = jb.scan_per_device(
        batcher, seen_ids, empty, jb.device_streams({"i": ids[idx]}, old), old, flush=False, key=key
    )
    saved = jax.device_get(saved)  # e.g. through `save_distributed` / `load_distributed`
    states = jb.resume_per_device(batcher, saved, new, key=key)
    assert states.count.shape == (after,)
    idx = jb.stream_indices(len(ids) - read, new, start=read)
    (second, k2), final = jb.scan_per_device(
        batcher, seen_ids, empty, jb.device_streams({"i": ids[idx]}, new), new, states=states
    )
    got = np.concatenate([np.asarray(first), np.asarray(second)])
    assert sorted(got[got >= 0].tolist()) == ids.tolist()
    # The counters read as the whole run's totals: every element accepted and emitted once.
    stats = {k: int(v) for k, v in jb.operation_stats(final).items()}
    assert stats["applied_count"] == stats["emitted_count"] == len(ids)
    rows = [np.asarray(first)[: int(k1) * 3 * before], np.asarray(second)[: int(k2) * 3 * after]]
    batches = np.concatenate(rows).reshape(-1, 3)  # one stream's batch: 3 rows side by side
    assert stats["batch_count"] == np.sum(np.any(batches >= 0, axis=1))
    with pytest.raises(TypeError, match="`DeviceStates`"):
        jb.resume_per_device(batcher, saved.states, new)


def seen_tokens(carry, batch):
    """Consumer: every real token of the packed rows, in slot order (`-1` elsewhere)."""
    out, k = carry
    real = (batch.data["tokens_segment_ids"] > 0) & batch.valid_mask[:, None]
    tokens = jnp.where(real, batch.data["tokens"], -1).reshape(-1)
    return jax.lax.dynamic_update_slice_in_dim(out, tokens, k * tokens.shape[0], 0), k + 1


def unique_documents(num: int) -> dict[str, np.ndarray]:
    """`documents` whose tokens are all different (1, 2, ...): each one's identity."""
    data = documents(4, num)
    unique = np.arange(1, num * ROW + 1, dtype=np.int32).reshape(num, ROW)
    data["tokens"] = np.where(data["tokens"] > 0, unique, 0).astype(np.int32)
    return data


def test_elastic_resume_of_pack_carries_half_packed_rows_exactly_once():
    """`pack` 4 -> 2 devices: the saved rows (held back and half-packed) are flushed and
    dealt to the new devices; every token of every document is trained on exactly once."""
    old = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    new = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    data = unique_documents(24)
    empty = (jnp.full(256 * ROW, -1, jnp.int32), jnp.int32(0))

    (first, _), saved = jb.scan_per_device(
        PACK, seen_tokens, empty, streams_of(data, old, 0, 3), old, flush=False
    )
    with pytest.raises(ValueError, match="`element_spec`"):
        jb.resume_per_device(PACK, saved, new)
    spec = {k: v[0] for k, v in data.items()}
    states = jb.resume_per_device(PACK, saved, new, element_spec=spec)
    idx = jb.stream_indices(12, new, start=12)
    rest = jb.device_streams({k: v[idx] for k, v in data.items()}, new)
    (second, _), final = jb.scan_per_device(PACK, seen_tokens, empty, rest, new, states=states)
    got = np.concatenate([np.asarray(first), np.asarray(second)])
    want = data["tokens"][data["tokens"] > 0]
    assert sorted(got[got >= 0].tolist()) == sorted(want.tolist())
    # The counters read as the whole run's totals (the flushed half-packed rows once).
    stats = {k: int(v) for k, v in jb.packing_stats(final).items()}
    assert (stats["tokens"], stats["sequences"]) == (len(want), len(data["n"]))
    assert int(jb.operation_stats(final)["applied_count"]) == len(data["n"])


@pytest.mark.parametrize(
    "before, after", [(4, 2), pytest.param(2, 4, marks=pytest.mark.slow)], ids=["4-2", "2-4"]
)
def test_elastic_resume_of_concat_and_split_carries_every_token_once(before, after):
    """`concat_and_split` (a stepped batcher) `before` -> `after` devices: the saved rows are
    flushed and handed out first on the new devices; every token exactly once."""
    old = jax.make_mesh((before,), ("data",), devices=jax.devices()[:before])
    new = jax.make_mesh((after,), ("data",), devices=jax.devices()[:after])
    data, read = unique_documents(32), 4 * before  # 4 documents read on each old device
    empty = (jnp.full(128 * ROW, -1, jnp.int32), jnp.int32(0))
    idx = jb.stream_indices(read, old)
    first_part = jb.device_streams({k: v[idx] for k, v in data.items()}, old)
    (first, _), saved = jb.scan_per_device(CONCAT, seen_tokens, empty, first_part, old, flush=False)
    spec = {k: v[0] for k, v in data.items()}
    states = jb.resume_per_device(CONCAT, saved, new, element_spec=spec)
    idx = jb.stream_indices(32 - read, new, start=read)
    rest = jb.device_streams({k: v[idx] for k, v in data.items()}, new)
    (second, _), final = jb.scan_per_device(CONCAT, seen_tokens, empty, rest, new, states=states)
    got = np.concatenate([np.asarray(first), np.asarray(second)])
    want = data["tokens"][data["tokens"] > 0]
    assert sorted(got[got >= 0].tolist()) == sorted(want.tolist())
    # The counters read as the whole run's totals.
    assert int(jb.operation_stats(final)["applied_count"]) == len(data["n"])
    assert int(final.states.tokens["tokens"]) == len(want)

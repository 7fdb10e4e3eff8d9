"""The host feed: `prefetch` (order, errors in place, the thread always ends) and
`scan_host` (the same batches as `iterate`, one program for every chunk, checkpoints,
resume without re-reading, Grain sources)."""

import gc
import importlib.util
import pathlib
import threading
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbatch as jb
from jaxbatch._src import host

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "host_feed.py"


def _threads():
    return [t for t in threading.enumerate() if t.name == "jaxbatch-prefetch"]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    yield
    deadline = time.monotonic() + 2
    while _threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.01)
    assert not _threads()


# --------------------------------------------------------------------------- prefetch


class Boom(Exception):
    pass


def failing(n, at):
    for i in range(n):
        if i == at:
            raise Boom(f"row {i}")
        yield i


def test_prefetch_order_and_end():
    with jb.prefetch(range(7), buffer_size=2) as items:
        assert list(items) == list(range(7))


def test_prefetch_error_after_items_read_before_it():
    items, got = jb.prefetch(failing(5, at=3)), []
    with pytest.raises(Boom, match="row 3"):
        for x in items:
            got.append(x)
    assert got == [0, 1, 2]


def test_prefetch_close_gc_and_consumer_errors_end_the_thread():
    closed = []

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.append(True)

    items = jb.prefetch(endless(), buffer_size=1)
    assert next(items) == 0
    items.close()
    assert not _threads() and closed == [True]
    items = jb.prefetch(endless())
    next(items)
    del items
    gc.collect()
    assert not _threads()
    for error in (KeyboardInterrupt, ValueError):
        with pytest.raises(error), jb.prefetch(endless()) as items:
            for x in items:
                if x == 3:
                    raise error
        assert not _threads()


def test_prefetch_bounded_buffer():
    read = []

    def source():
        for i in range(100):
            read.append(i)
            yield i

    with jb.prefetch(source(), buffer_size=2) as items:
        next(items)
        time.sleep(0.1)
        assert len(read) <= 4  # one taken, two buffered, one waiting to be put


def test_prefetch_refuses_bad_buffer():
    with pytest.raises(ValueError, match="`buffer_size`"):
        jb.prefetch([], buffer_size=0)


# --------------------------------------------------------------------------- scan_host


def fold(carry, batch):
    """Order-sensitive integer digest of every valid value of every batch."""
    k, acc = carry
    total = jnp.int32(0)
    for leaf in jax.tree.leaves(batch.data):
        mask = batch.valid_mask.reshape(batch.valid_mask.shape + (1,) * (leaf.ndim - 1))
        total += jnp.sum(jnp.where(mask, leaf, 0).astype(jnp.int32))
    return k + 1, acc + (k + 1) * total


ZERO = (jnp.int32(0), jnp.int32(0))


def expected(batcher, stacked, key=None):
    """The digest of the fused in-memory path, `jb.scan` over the whole stream."""
    return digest(jb.scan(batcher, fold, ZERO, stacked, key=key)[0])


def digest(carry):
    return tuple(int(x) for x in carry)


DOCS = [{"tokens": np.arange(1, 1 + n, dtype=np.int32)} for n in (3, 1, 4, 2, 5, 2, 3, 1, 4, 4)]
RAGGED = {"tokens": (5, "length")}
PACK = jb.pack(6, 2, lengths={"tokens": "length"})
FIXED = jb.fixed_size(3)
ROWS = np.arange(1, 31, dtype=np.int32).reshape(10, 3)
STACKED_DOCS = {
    "tokens": np.stack([np.pad(d["tokens"], (0, 5 - len(d["tokens"]))) for d in DOCS]),
    "length": np.array([len(d["tokens"]) for d in DOCS], np.int32),
}


@pytest.mark.parametrize("chunk_size", [4, 16])
def test_same_batches_as_scan(chunk_size):
    got, _ = jb.scan_host(FIXED, fold, ZERO, ROWS, chunk_size=chunk_size)
    assert digest(got) == expected(FIXED, ROWS)


def test_ragged_packing_same_batches_as_scan():
    got, state = jb.scan_host(PACK, fold, ZERO, DOCS, chunk_size=4, ragged=RAGGED)
    assert digest(got) == expected(PACK, STACKED_DOCS)
    assert int(state.stats.accepted) == len(DOCS)


def test_without_bulk_feed():
    odd = jb.filter_elements(FIXED, lambda e: e.data[0] % 2 == 1)
    got, _ = jb.scan_host(odd, fold, ZERO, ROWS, chunk_size=4)
    assert digest(got) == expected(odd, ROWS)


def test_one_program_for_every_chunk_and_plain_iterables():
    before = host._run_chunk._cache_size()
    got, _ = jb.scan_host(FIXED, fold, ZERO, iter(list(ROWS)), chunk_size=3)  # 3, 3, 3, 1
    assert host._run_chunk._cache_size() - before <= 1
    jb.scan_host(FIXED, fold, ZERO, ROWS[:8], chunk_size=3)  # 3, 3, 2: no new program
    assert host._run_chunk._cache_size() - before <= 1
    assert digest(got) == expected(FIXED, ROWS)
    assert jb.scan_host(FIXED, fold, ZERO, []) == (ZERO, None)


class Recorded:
    """A Sequence that records which indices were read, and can fail at one of them."""

    def __init__(self, rows, fail_at=None):
        self.rows, self.fail_at, self.read = rows, fail_at, []

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        self.read.append(i)
        if i == self.fail_at:
            raise Boom(f"bad row {i}")
        return self.rows[i]


class RecordedBatched(Recorded):
    """Reads many rows in one call, as ArrayRecord and `jb.TokenCorpus` do."""

    def __getitems__(self, indices):
        return [self[i] for i in indices]


@pytest.mark.parametrize("kind", [Recorded, RecordedBatched])
def test_error_at_row_checkpoint_and_resume_without_rereading(tmp_path, kind):
    path = tmp_path / "ckpt"
    source = kind(DOCS, fail_at=6)
    with pytest.raises(Boom, match="bad row 6") as info:
        jb.scan_host(PACK, fold, ZERO, source, chunk_size=4, ragged=RAGGED, checkpoint_path=path)
    assert "at element 6" in "".join(getattr(info.value, "__notes__", []))
    # Nothing read was lost: the checkpoint stands right before the bad row.
    like = host._like(ZERO, PACK.init({"tokens": np.zeros(5, np.int32), "length": np.int32(0)}))
    checkpoint = jb.load_state(path, like)
    assert int(checkpoint.position) == 6 and int(checkpoint.state.stats.accepted) == 6
    again = kind(DOCS)
    got, _ = jb.scan_host(PACK, fold, ZERO, again, chunk_size=4, ragged=RAGGED, resume=path)
    assert min(again.read) >= 6
    assert digest(got) == expected(PACK, STACKED_DOCS)


def test_checkpoint_every_and_resume_mid_stream(tmp_path):
    path = tmp_path / "ckpt"
    full, _ = jb.scan_host(FIXED, fold, ZERO, ROWS, chunk_size=4)

    with pytest.raises(KeyboardInterrupt):
        jb.scan_host(
            FIXED,
            fold,
            ZERO,
            ROWS,
            chunk_size=4,
            checkpoint_path=path,
            checkpoint_every=1,
            on_chunk=stop_at_second_chunk(),
        )
    source = Recorded(ROWS)
    got, _ = jb.scan_host(FIXED, fold, ZERO, source, chunk_size=4, resume=path, progress=True)
    assert min(source.read) >= 4
    assert digest(got) == digest(full)


def stop_at_second_chunk():
    calls = []

    def on_chunk(carry):
        calls.append(1)
        if len(calls) == 2:  # after the first chunk's checkpoint
            raise KeyboardInterrupt

    return on_chunk


def test_grain_sources_resume_from_their_state(tmp_path):
    grain = pytest.importorskip("grain")
    dataset = grain.MapDataset.source(list(ROWS))
    full, _ = jb.scan_host(FIXED, fold, ZERO, dataset, chunk_size=4)
    assert digest(full) == expected(FIXED, ROWS)
    path = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        jb.scan_host(
            FIXED,
            fold,
            ZERO,
            iter(dataset.to_iter_dataset()),
            chunk_size=4,
            checkpoint_path=path,
            checkpoint_every=1,
            on_chunk=stop_at_second_chunk(),
        )
    fresh = iter(dataset.to_iter_dataset())
    got, _ = jb.scan_host(FIXED, fold, ZERO, fresh, chunk_size=4, resume=path)
    assert digest(got) == digest(full)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`chunk_size`"):
        jb.scan_host(FIXED, fold, ZERO, ROWS, chunk_size=0)
    with pytest.raises(ValueError, match="`checkpoint_path`"):
        jb.scan_host(FIXED, fold, ZERO, ROWS, checkpoint_every=2)


def test_token_corpus_on_disk_feeds_like_memory(tmp_path):
    corpus = jb.write_token_corpus(tmp_path / "corpus", (d["tokens"] for d in DOCS))
    assert len(corpus) == len(DOCS) and corpus.num_tokens == sum(len(d["tokens"]) for d in DOCS)
    assert [c["tokens"].tolist() for c in corpus] == [d["tokens"].tolist() for d in DOCS]
    got, _ = jb.scan_host(PACK, fold, ZERO, corpus, chunk_size=4, ragged=RAGGED)
    assert digest(got) == expected(PACK, STACKED_DOCS)
    records = jb.write_token_records(tmp_path / "docs.array_record", (d["tokens"] for d in DOCS))
    got, _ = jb.scan_host(PACK, fold, ZERO, records, chunk_size=4, ragged=RAGGED)
    assert digest(got) == expected(PACK, STACKED_DOCS)
    with pytest.raises(ValueError, match="documents\\[1\\]"):
        jb.write_token_corpus(tmp_path / "bad", [[1], [[2]]])
    with pytest.raises(FileNotFoundError, match="`path`"):
        jb.TokenCorpus(tmp_path / "missing")


def test_example_host_feed_resumes_mid_epoch_exactly():
    """examples/host_feed.py, small: a corpus on disk, stopped mid-epoch and resumed."""
    spec = importlib.util.spec_from_file_location("jaxbatch_example_host_feed", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(small=True)
    assert result["same"]  # the resumed run ends with the uninterrupted run's parameters
    assert result["first_read"] == 2 * result["chunk"]  # nothing before the checkpoint read


def test_short_chunk_needs_room_for_its_batches():
    rows = np.ones((13, 3), np.int32)  # chunks of 7 and 6: the short one makes 2 batches
    with pytest.raises(ValueError, match="`max_batches_per_chunk`"):
        jb.scan_host(FIXED, fold, ZERO, rows, chunk_size=7, max_batches_per_chunk=1)


def test_token_records_over_several_files(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(1, 1000, n).astype(np.int32) for n in rng.integers(0, 20, 30)]
    jb.write_token_records(tmp_path / "a", arrays[:12])
    jb.write_token_records(tmp_path / "b", arrays[12:], group_size=4)
    records = jb.TokenRecords([tmp_path / "a", tmp_path / "b"])
    assert len(records) == 30
    for indices in (range(30), range(5, 25), [29, 3, 12]):
        got = records.__getitems__(indices)
        assert [g["tokens"].tolist() for g in got] == [arrays[i].tolist() for i in indices]
    assert records[-1]["tokens"].tolist() == arrays[-1].tolist()
    with pytest.raises(IndexError):
        records[30]


# ------------------------------------------------------------------ pipelines, run-time errors

PIPE_DATA = {
    "x": jnp.arange(7, dtype=jnp.int32),
    "v": jnp.arange(56, dtype=jnp.float32).reshape(7, 8),
}
PIPE = jb.pipeline(PIPE_DATA, FIXED, order=jb.epochs(shuffle=False))
POSITIONS = np.arange(10, dtype=np.int32)


def test_a_pipeline_state_keeps_its_data_in_place_and_resumes(tmp_path):
    state = PIPE.init(jnp.int32(0))
    full = digest(jb.scan(PIPE, fold, ZERO, jnp.asarray(POSITIONS), state=state)[0])
    got, after = jb.scan_host(PIPE, fold, ZERO, POSITIONS, chunk_size=4, state=state)
    assert digest(got) == full
    # The data is read, never written: the chunk program returns none of it (the state's
    # resident leaves, `jb.split_resident`), and the state comes back with the caller's
    # own arrays.
    chunk = jb.Element(data=jnp.arange(4, dtype=jnp.int32))
    out = host._run_chunk.trace(PIPE, fold, 4, ZERO, state, chunk, np.int32(4)).out_info
    assert out[1].data is None
    assert after.data["v"] is state.data["v"] and not state.data["v"].is_deleted()
    # Checkpoints hold the data and resume mid-stream.
    path = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        jb.scan_host(
            PIPE,
            fold,
            ZERO,
            POSITIONS,
            chunk_size=4,
            state=state,
            checkpoint_path=path,
            checkpoint_every=1,
            on_chunk=stop_at_second_chunk(),
        )
    source = Recorded(POSITIONS)
    got, after = jb.scan_host(PIPE, fold, ZERO, source, chunk_size=4, state=state, resume=path)
    assert min(source.read) >= 4 and digest(got) == full
    assert int(after.order.position) == len(POSITIONS)


def lengths_with(bad):
    return [
        {"tokens": np.ones(6, np.int32), "length": np.int32(n)} for n in (2, 1, 3, 1, 2, bad, 1)
    ]


@pytest.mark.parametrize(("bad", "chunk_size"), [(7, 2), (-1, 4)])
def test_a_refused_element_is_named_by_its_position_in_the_source(bad, chunk_size):
    with pytest.raises(jb.BatcherRuntimeError) as info:
        jb.scan_host(PACK, fold, ZERO, lengths_with(bad), chunk_size=chunk_size)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"`jb.scan_host`: element 5 of the source (`data['length']`={bad})")
    assert "max_len" in first and info.value.position == 5


def test_a_check_in_the_consumer_says_so():
    def consumer(carry, batch):
        return eqx.error_if(carry, batch.num_valid > 2, "my consumer refuses")

    with pytest.raises(jb.BatcherRuntimeError, match="in the consumer `fn`.*my consumer") as info:
        jb.scan_host(FIXED, consumer, jnp.int32(0), ROWS, chunk_size=4)
    assert info.value.position is None

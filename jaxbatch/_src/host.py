"""Host feeds: data that does not fit on the device, read in chunks on a background thread.

* `prefetch`   any iterable read ahead on a background thread into a bounded buffer.
* `scan_host`  `jb.scan` over a host source one chunk at a time: reading, ragged padding and
               `device_put` of chunk `c+1` overlap the fused program (batching and the
               user's step) of chunk `c`; one compiled program for every chunk, the last
               short one included; a progress bar; a checkpoint every N chunks; resume
               without re-reading from sources that can seek.

Rows are stacked (and `ragged` features padded) by the same code as `jb.iterate`, so the
two drivers accept the same sources and name a bad row the same way.
"""

import functools
import itertools
import json
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree, UInt8

from .base import (
    Batcher,
    Carry,
    Counter,
    State,
    join_resident,
    row_spec,
    split_resident,
    stack_spec,
)
from .batch import Batch
from .checkpoint import load_state, save_state
from .drivers import BatchIterator, _check_room, _explain, _num_rows, _rows, _runtime_reason, drain
from .spec import batch_spec

# Room for a stateful source's `get_state()` as JSON in a checkpoint (a fixed shape, so
# that `load_state` can check it against a template).
SOURCE_STATE_BYTES = 4096


# --------------------------------------------------------------------------- prefetch


class _Failure(NamedTuple):
    error: BaseException


_END = object()


class _Shared:
    """What the reader thread and its `Prefetcher` share. The thread never holds the
    `Prefetcher` itself, so dropping the last reference to it lets the garbage collector
    stop the thread."""

    def __init__(self, buffer_size: int):
        self.queue: queue.Queue = queue.Queue(buffer_size)
        self.stop = threading.Event()


def _put(shared: _Shared, item: Any) -> bool:
    """Put `item` in the buffer, waiting while it is full; False once asked to stop."""
    while not shared.stop.is_set():
        try:
            shared.queue.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _read(iterator: Iterator[Any], shared: _Shared) -> None:
    try:
        for item in iterator:
            if not _put(shared, item):
                return
        _put(shared, _END)
    except BaseException as e:  # handed to the consumer, raised there in order
        _put(shared, _Failure(e))
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:  # a generator's `finally` runs here, on its own thread
            close()


def _shutdown(shared: _Shared, thread: threading.Thread) -> None:
    shared.stop.set()
    while thread.is_alive():
        try:  # free the buffer (and a `put` waiting on it)
            while True:
                shared.queue.get_nowait()
        except queue.Empty:
            pass
        thread.join(0.05)


class Prefetcher(Iterator[Any]):
    """The iterator `prefetch` returns: items read ahead by a background thread.

    Close it (`close()`, a `with` block, or dropping it) to stop the thread; it also stops
    at the end of the source and after the source raised.
    """

    def __init__(self, iterable: Iterable[Any], buffer_size: int):
        self._shared = _Shared(buffer_size)
        self._thread = threading.Thread(
            target=_read, args=(iter(iterable), self._shared), name="jaxbatch-prefetch"
        )
        self._thread.daemon = True
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._shared, self._thread)
        self._done = False

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        item = self._shared.queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        """Stop the reader thread and wait for it (it finishes the item it is reading)."""
        self._done = True
        self._finalizer()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def prefetch(iterable: Iterable[Any], buffer_size: int = 2) -> Prefetcher:
    """Read `iterable` on a background thread, up to `buffer_size` items ahead.

    The items come out in order. An exception raised by the source comes out where it
    happened: after every item read before it, with its own type and traceback. The thread
    ends at the end of the source, after an exception, on `close()`, at the end of a `with`
    block, and when the returned iterator is garbage collected.

    Args:
        iterable: any iterable (a generator is closed on the reader thread when stopped).
        buffer_size: items read ahead at most (a positive int).

    Returns:
        A `Prefetcher`.

    Raises:
        ValueError: `buffer_size` not a positive int.

    Examples:
        >>> import jaxbatch as jb
        >>> with jb.prefetch(range(5), buffer_size=2) as items:
        ...     list(items)
        [0, 1, 2, 3, 4]
    """
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"`buffer_size` must be a positive int, got {buffer_size!r}.")
    return Prefetcher(iterable, buffer_size)


# --------------------------------------------------------------------------- sources


class _Exhausted(Exception):
    pass


def _seekable(source: Any) -> bool:
    """A Sequence, NumPy array or memmap, Grain `MapDataset`: `len` and `source[i]`."""
    return (
        hasattr(source, "__len__")
        and hasattr(source, "__getitem__")
        and not isinstance(source, str | bytes | Mapping)
    )


def _stateful(source: Any) -> bool:
    """A Grain `DatasetIterator` (or anything with `get_state` / `set_state`)."""
    return hasattr(source, "get_state") and hasattr(source, "set_state")


class _Indexed:
    def __init__(self, source: Any, position: int):
        self.source, self.position, self.size = source, position, len(source)

    def peek(self) -> Any:
        if not self.size:
            raise _Exhausted
        return self.source[self.position]

    def read(self) -> Any:
        if self.position >= self.size:
            raise _Exhausted
        row = self.source[self.position]
        self.position += 1
        return row

    def read_many(self, n: int, rows: list[Any]) -> None:
        """Append up to `n` rows to `rows`, in one `__getitems__` call where the source has
        one (ArrayRecord, `jb.TokenCorpus`); raise `_Exhausted` at the end."""
        getitems = getattr(self.source, "__getitems__", None)
        stop = min(self.position + n, self.size)
        if getitems is not None and stop > self.position:
            try:
                got = list(getitems(list(range(self.position, stop))))
            except Exception:
                got = None  # read one at a time below, to raise at the row that fails
            if got is not None and len(got) == stop - self.position:
                rows.extend(got)
                self.position = stop
        _read_many(self, n, rows)

    def state(self) -> Any:
        return None


def _read_many(reader: Any, n: int, rows: list[Any]) -> None:
    while len(rows) < n:
        rows.append(reader.read())


class _Stateful:
    def __init__(self, source: Any, position: int, saved: Any):
        self.source, self.position, self.saved = source, position, saved

    def peek(self) -> Any:
        start = self.source.get_state()
        try:
            return next(self.source)
        except StopIteration:
            raise _Exhausted from None
        finally:
            self.source.set_state(start)

    def start(self) -> None:
        if self.saved is not None:
            self.source.set_state(self.saved)

    def read(self) -> Any:
        try:
            row = next(self.source)
        except StopIteration:
            raise _Exhausted from None
        self.position += 1
        return row

    def state(self) -> Any:
        return self.source.get_state()


class _Plain:
    """Any other iterable: resuming reads and drops the rows before the position."""

    def __init__(self, source: Any, position: int):
        self.iterator, self.position, self.skip = iter(source), position, position

    def peek(self) -> Any:
        try:
            first = next(self.iterator)
        except StopIteration:
            raise _Exhausted from None
        self.iterator = itertools.chain([first], self.iterator)
        return first

    def start(self) -> None:
        for _ in range(self.skip):
            next(self.iterator, None)

    def read(self) -> Any:
        try:
            row = next(self.iterator)
        except StopIteration:
            raise _Exhausted from None
        self.position += 1
        return row

    def state(self) -> Any:
        return None


def _open(source: Any, position: int, saved: Any) -> Any:
    if _seekable(source):
        return _Indexed(source, position)
    if _stateful(source):
        return _Stateful(source, position, saved)
    return _Plain(source, position)


# --------------------------------------------------------------------------- chunks


class _Chunk(NamedTuple):
    data: Any  # on the device, leaves [chunk_size, ...]
    rows: int  # valid rows (the rest repeat row 0 and are never fed)
    position: int  # source position after this chunk
    source_state: Any  # a stateful source's `get_state()` after this chunk, or None
    tokens: int  # sum of the `ragged` lengths of the valid rows
    end: bool  # the source ended with this chunk
    error: BaseException | None  # raised by the source right after these rows


def _chunks(reader: Any, rows_of: BatchIterator, chunk_size: int, lengths: list[str]):
    """The host side, run on the reader thread: read, pad and stack, `device_put`."""
    start = getattr(reader, "start", None)
    if start is not None:
        start()
    while True:
        rows, error, end = [], None, False
        first = reader.position
        try:
            getattr(reader, "read_many", functools.partial(_read_many, reader))(chunk_size, rows)
        except _Exhausted:
            end = True
        except Exception as e:
            e.add_note(
                f"jaxbatch: raised by the source at element {reader.position} (counted from "
                "the start of the stream); every element before it was fed."
            )
            error = e
        data, tokens = None, 0
        if rows:
            # Reuse `jb.iterate`'s stacking (ragged padding, checks naming the row).
            rows_of._position = first
            stacked = rows_of._stack(rows + [rows[0]] * (chunk_size - len(rows)))
            tokens = sum(int(np.sum(stacked.data[k][: len(rows)])) for k in lengths)
            data = jax.device_put(stacked)
        yield _Chunk(data, len(rows), reader.position, reader.state(), tokens, end, error)
        if end or error is not None:
            return


# --------------------------------------------------------------------------- the program


def _steps(batcher: Batcher, state: State, chunk: Any, rows: Array, capacity: int):
    """Step the first `rows` elements one at a time, storing each ready batch in a slot."""
    spec = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, state, row_spec(chunk))

    def body(i, c):
        state, out, count = c
        state, emit = batcher.step(state, jax.tree.map(lambda x: x[i], chunk))
        slot = jnp.minimum(count, capacity - 1)

        def write(out):
            return jax.tree.map(
                lambda o, b: jax.lax.dynamic_update_index_in_dim(o, b, slot, 0), out, emit.batch
            )

        out = jax.lax.cond(emit.ready, write, lambda out: out, out)
        return state, out, count + emit.ready.astype(jnp.int32)

    start = (state, stack_spec(spec, capacity), jnp.zeros((), jnp.int32))
    return jax.lax.fori_loop(0, rows, body, start)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _run_chunk(batcher, fn, capacity, carry, state, chunk, rows):
    """One chunk, fused: batching and `fn` (at one call site), the same program for a full
    chunk (the bulk `feed`) and a short one (its `rows` stepped, the batches stored)."""
    if batcher.feed is None:
        state, out, count = _steps(batcher, state, chunk, rows, capacity)
        batch = functools.partial(_slot, out)
    else:
        full = rows == _num_rows(chunk)
        fed, emissions = batcher.feed(state, chunk, False)
        empty = jax.eval_shape(lambda: _steps(batcher, state, chunk, rows, capacity)[1:])
        state, out, tail_count = jax.lax.cond(
            full,
            lambda: (fed, *jax.tree.map(jnp.zeros_like, empty)),
            lambda: _steps(batcher, state, chunk, rows, capacity),
        )
        count = jnp.where(full, emissions.count, tail_count)

        def batch(k):
            return jax.lax.cond(full, emissions.batch, functools.partial(_slot, out), k)

    carry = jax.lax.fori_loop(0, count, lambda k, c: fn(c, batch(k)), carry)
    return carry, _light(state), count


def _light(state: Any) -> Any:
    """What a chunk's program returns of `state`: its resident leaves (a pipeline's data)
    are read, never written, so they stay out of the outputs (returning them would write
    the dataset out again per chunk); `_heavy` puts the caller's arrays back. Nothing is
    donated: the caller's state stays valid, and a failing chunk can be re-run from it to
    name the element."""
    return split_resident(state)[0]


def _heavy(light: Any, before: Any) -> Any:
    return join_resident(light, split_resident(before)[1])


def _slot(out: Any, k: Array) -> Any:
    return jax.tree.map(lambda o: jax.lax.dynamic_index_in_dim(o, k, 0, keepdims=False), out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _drain(batcher, fn, carry, state):
    """`jb.drain` (bounded: a `flush` that never stops is an error naming law 3, not a
    hang), counting the batches it hands to `fn`."""

    def counted(c, batch):
        carry, n = c
        return fn(carry, batch), n + 1

    (carry, count), state = drain(batcher, counted, (carry, jnp.zeros((), jnp.int32)), state)
    return carry, _light(state), count


# --------------------------------------------------------------------------- checkpoints


class HostCheckpoint(eqx.Module):
    """Where `scan_host` stands after a chunk: everything needed to go on, in one file.

    Attributes:
        carry: the consumer's carry (params, optimiser state, ...).
        state: the batcher state.
        position: elements of the source fed so far.
        source_state: a stateful source's `get_state()` (a Grain `DatasetIterator`) as
            UTF-8 JSON, zero-padded to `SOURCE_STATE_BYTES` bytes; zeros for other sources.
    """

    carry: PyTree
    state: PyTree
    position: Counter
    source_state: UInt8[Array, " bytes"]


def _encode(state: Any) -> Array:
    raw = b"" if state is None else json.dumps(state).encode()
    if len(raw) > SOURCE_STATE_BYTES:
        raise ValueError(
            f"The source's `get_state()` is {len(raw)} bytes of JSON; a checkpoint holds at "
            f"most {SOURCE_STATE_BYTES}. Checkpoint such a source yourself."
        )
    return jnp.asarray(np.frombuffer(raw.ljust(SOURCE_STATE_BYTES, b"\0"), np.uint8))


def _decode(array: Any) -> Any:
    raw = np.asarray(array).tobytes().rstrip(b"\0")
    return json.loads(raw) if raw else None


def _like(carry: Any, state: Any) -> HostCheckpoint:
    return HostCheckpoint(
        carry=carry,
        state=state,
        position=Counter.of(0),
        source_state=jnp.zeros(SOURCE_STATE_BYTES, jnp.uint8),
    )


# --------------------------------------------------------------------------- the driver


class _Progress:
    def __init__(self, enabled: bool, total: int | None, start: int, tokens: bool):
        self.bar = None
        self.tokens, self.batches, self.started = 0, 0, time.perf_counter()
        self.show_tokens = tokens
        self.extra: dict[str, Any] = {}  # what `on_chunk` returned last (a loss, say)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, initial=start, unit="el", dynamic_ncols=True)

    def update(self, rows: int, tokens: int, batches: int) -> None:
        self.tokens += tokens
        self.batches += batches
        if self.bar is not None:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            postfix: dict[str, Any] = {"batches": self.batches}
            if self.show_tokens:
                postfix["tokens/s"] = f"{self.tokens / seconds:,.0f}"
            postfix.update(self.extra)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(rows)

    def show(self, shown: Any) -> None:
        """Keep what `on_chunk` returned for the bar, when it is a mapping."""
        if isinstance(shown, Mapping):
            self.extra = dict(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _positive(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int, got {value!r}.")


def scan_host(
    batcher: Batcher,
    fn: Callable[[Carry, Batch], Carry],
    carry: Carry,
    source: Any,
    *,
    chunk_size: int = 256,
    ragged: Any = None,
    key: Any = None,
    state: State | None = None,
    resume: HostCheckpoint | str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    prefetch: int = 2,
    progress: bool = False,
    on_chunk: Callable[[Carry], Any] | None = None,
    max_batches_per_chunk: int | None = None,
) -> tuple[Carry, State]:
    """`jb.scan` over a host source too large for the device, one chunk at a time.

    A background thread reads `chunk_size` elements, pads their `ragged` features, stacks
    them and puts them on the device, up to `prefetch` chunks ahead, while the fused program
    (batching and `carry = fn(carry, batch)`, one call site) runs on the chunk before. Every
    chunk runs the same compiled program, the last short one included (its rows are
    stepped instead of fed in bulk: same batches, law of `feed`). At the end of the source
    the batcher is drained into `fn`.

    Resuming reads nothing twice from a source that can seek: a Sequence, a NumPy array or
    memmap, a Grain `MapDataset` (`len` and `source[i]`), and a Grain `DatasetIterator`
    (its `get_state` / `set_state` are saved in the checkpoint). Any other iterable is read
    from the start and its first `position` elements dropped.

    Args:
        batcher: the batcher (static: build it once).
        fn: the consumer, e.g. a train step (static: build it once).
        carry: the consumer's initial carry (ignored when resuming: the checkpoint's).
        source: the elements (`Element`s or PyTrees of arrays), as for `jb.iterate`.
        chunk_size: elements per program call.
        ragged: `{feature: (max_len, length_key)}`, as for `jb.iterate`; the progress bar
            then counts tokens (the sum of the lengths).
        key: PRNG key for a stochastic batcher's `init`.
        state: the batcher state to start from, instead of `batcher.init` on the first
            element: e.g. a `jb.pipeline`'s state (which holds its data), fed a source of
            stream positions (a stochastic one still takes `key`, for its batch shape).
            Nothing is donated: a pipeline's data is read by each chunk's program, never
            written out again, and the state returned holds your arrays.
            Ignored when resuming (the checkpoint's).
        resume: a `HostCheckpoint`, or the path of one saved by `checkpoint_path`.
        checkpoint_path: where to save a `HostCheckpoint` (with `jb.save_state`) every
            `checkpoint_every` chunks, at the end, and after the source raised.
        checkpoint_every: chunks between checkpoints (default: only at the end).
        prefetch: chunks read ahead.
        progress: show a tqdm bar (when tqdm is installed): elements (of `len(source)`
            when it has one), batches, tokens/s.
        on_chunk: called with the carry after each chunk's program is dispatched (read
            your loss there; it waits for that chunk, not for the reading of the next).
            A mapping it returns (`{"loss": "2.31"}`) is shown on the progress bar.
        max_batches_per_chunk: room for the batches of one short chunk; default
            `ceil(chunk_size / batch_size) + 1`.

    Returns:
        `(carry, state)` after the source, drained; `state` is None for an empty source.

    Raises:
        ValueError: a bad argument, or a short chunk with more batches than
            `max_batches_per_chunk`.
        Exception: whatever the source raised, after every element before it was fed and
            (with `checkpoint_path`) a checkpoint saved standing right before it.
        BatcherRuntimeError: a run-time check of the batcher refused an element (its
            position in the source is named on the first line), failed in `fn` or in the
            end-of-stream drain (law 3).

    Examples:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import jaxbatch as jb
        >>> rows = np.arange(10, dtype=np.float32)[:, None]  # 10 elements of shape (1,)
        >>> def add(total, batch):
        ...     return total + jnp.sum(jnp.where(batch.valid_mask[:, None], batch.data, 0))
        >>> total, state = jb.scan_host(jb.fixed_size(4), add, jnp.float32(0), rows, chunk_size=4)
        >>> float(total), int(state.stats.emitted)
        (45.0, 10)
    """
    if not isinstance(batcher, Batcher):
        raise ValueError(f"`batcher` must be a `jb.Batcher`, got {type(batcher).__name__}.")
    if not callable(fn):
        raise ValueError(f"`fn` must be callable, got {type(fn).__name__}.")
    _positive(chunk_size, "chunk_size")
    _positive(prefetch, "prefetch")
    if checkpoint_every is not None:
        _positive(checkpoint_every, "checkpoint_every")
        if checkpoint_path is None:
            raise ValueError("`checkpoint_every` needs a `checkpoint_path` to save to.")
    if max_batches_per_chunk is not None:
        _positive(max_batches_per_chunk, "max_batches_per_chunk")
    # `jb.iterate` validates `ragged` and stacks the rows.
    from .drivers import iterate

    rows_of = iterate(batcher, (), chunk_size=chunk_size, ragged=ragged, key=key)
    lengths = [length for _, length in (ragged or {}).values()]

    reader = _open(source, 0, None)
    if resume is not None and isinstance(reader, _Indexed):  # nothing before the resume point
        at = int(resume.position) if isinstance(resume, HostCheckpoint) else reader.size
        reader.position = max(0, min(at, reader.size - 1))
    try:
        first = reader.peek()
    except _Exhausted:
        if isinstance(resume, HostCheckpoint):
            return resume.carry, resume.state
        return carry, None
    if state is not None:
        rows_of._state = state  # `_start` then only reads the rows' spec
    rows_of._start(first)
    state = rows_of._state
    capacity = max_batches_per_chunk
    if capacity is None:
        size = batch_spec(batcher, rows_of._spec, key=key).batch_size
        capacity = math.ceil(chunk_size / size) + 1

    position, saved = 0, None
    if resume is not None:
        checkpoint: HostCheckpoint = (
            resume
            if isinstance(resume, HostCheckpoint)
            else load_state(resume, _like(carry, state))
        )
        carry, state = checkpoint.carry, checkpoint.state
        position, saved = int(checkpoint.position), _decode(checkpoint.source_state)
        reader.position = position
        if isinstance(reader, _Plain):
            reader.skip = position
        if isinstance(reader, _Stateful):
            reader.saved = saved

    total = len(source) if hasattr(source, "__len__") else None  # pyright: ignore
    bar = _Progress(progress, total, position, bool(lengths))
    chunks = Prefetcher(_chunks(reader, rows_of, chunk_size, lengths), prefetch)
    last = None  # (count, rows, tokens) of the chunk before, read one behind

    def save(position: int, source_state: Any) -> None:
        if checkpoint_path is not None:
            checkpoint = HostCheckpoint(carry, state, Counter.of(position), _encode(source_state))
            save_state(checkpoint_path, checkpoint)

    # Chunks dispatched but not yet known to have run (the program runs one chunk behind
    # the host): (state before, chunk, rows, source position of its first row). A run-time
    # check failing in one of them is re-run from there to name the element.
    pending: list[tuple[Any, Any, int, int]] = []

    def account(last: Any) -> None:
        count, rows, tokens = last
        if rows < chunk_size or batcher.feed is None:  # the batches went through slots
            _check_room(count, capacity, "max_batches_per_chunk")
        bar.update(rows, tokens, int(count))
        pending.pop(0)  # `int(count)` waited for it: it ran

    def explain(error: BaseException, before_drain: Any) -> BaseException | None:
        if _runtime_reason(error) is None or empty is None:  # not a run-time check
            return None
        flush = before_drain is not None
        start, _, _, first = pending[0] if pending else (before_drain, None, 0, position)
        parts = [_rows(data, 0, rows) for _, data, rows, _ in pending] or [_rows(empty, 0, 0)]
        elements = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
        return _explain(error, "jb.scan_host", batcher, start, elements, flush, first, "the source")

    empty, before_drain = None, None
    try:
        for done, chunk in enumerate(chunks, 1):
            if chunk.rows:
                rows = np.int32(chunk.rows)
                empty = chunk.data
                pending.append((state, chunk.data, chunk.rows, chunk.position - chunk.rows))
                carry, light, count = _run_chunk(
                    batcher, fn, capacity, carry, state, chunk.data, rows
                )
                state = _heavy(light, state)
                if on_chunk is not None:
                    bar.show(on_chunk(carry))
                if last is not None:
                    account(last)
                last = (count, chunk.rows, chunk.tokens)
            due = checkpoint_every is not None and done % checkpoint_every == 0
            if last is not None and (chunk.error is not None or chunk.end or due):
                account(last)  # before a checkpoint: no state past a chunk that overflowed
                last = None
            if chunk.error is not None:
                save(chunk.position, chunk.source_state)
                raise chunk.error
            if chunk.end:
                break
            if due:
                save(chunk.position, chunk.source_state)
        before_drain = state
        carry, light, count = _drain(batcher, fn, carry, state)
        state = _heavy(light, state)
        if on_chunk is not None:
            bar.show(on_chunk(carry))
        bar.update(0, 0, int(count))
        save(chunk.position, chunk.source_state)
    except Exception as e:
        error = explain(e, before_drain)
        if error is None:
            raise
        raise error from e
    finally:
        chunks.close()
        bar.close()
    return carry, state

"""`multi_rate`: interleaved samples of channels at different rates into aligned windows.

Sensor fusion: an IMU at 200 Hz and a GPS at 10 Hz arrive interleaved, one sample of one
channel per element. A batch holds `batch_size` windows; window `w` holds `rates[c]`
consecutive samples of channel `c`, so channel `c` comes out `[batch_size, rates[c], ...]`.
This is Datarax's offline `np.repeat` alignment done at run time, under `jit`.

Element layout (one static structure for channels of different payload shapes): the data is
`{"channel": int scalar, "payload": (p_0, p_1, ..., p_{C-1})}`, a payload slot per channel,
each a PyTree with its own shapes and dtypes; only slot `channel` is read. (A slot per
channel costs the sum of the channels' sample sizes per element, which for sensor samples is
small; it is what lets one element structure carry channels of different shapes.)

Data flow: channel `c` has a FIFO buffer of `capacity * rates[c]` samples in the carry. `step`
writes the sample at the channel's count (one `dynamic_update_slice`, chosen with `where` on
the channel id: O(one sample) per channel). When every channel holds `batch_size * rates[c]`
samples the batch is emitted that same step, and the buffers shift forward by it.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from ..base import Batcher, Emit, Stats, check_state, describe, fingerprint, row_spec, stack_spec
from ..batch import Batch
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of
from ._checks import MAX_SIZE, clamp_to_int32, pad_number, pad_value_fits, positive_int


class MultiRateState(eqx.Module):
    """State of `multi_rate`.

    Attributes:
        buffers: per channel, a PyTree with leaves `[capacity * rates[c], ...]`: that
            channel's buffered samples, oldest first (rows at or past `counts[c]` are
            unspecified).
        counts: `[channels]` int32, samples buffered per channel.
        spec: the element spec as a zero-row `Element` (leaves `[0, ...]`), checked in `step`.
        stats: the counters (one element = one sample).
    """

    buffers: tuple
    counts: Int[Array, " channels"]
    spec: Element
    stats: Stats


def _check_spec(spec: Element, num_channels: int) -> None:
    """Refuse an element spec unlike `{"channel": int scalar, "payload": (C trees)}`."""
    data = spec.data
    layout = (
        '`{"channel": int32 scalar, "payload": (payload_0, ..., payload_C-1)}` with one '
        "payload slot per channel"
    )
    if not isinstance(data, dict) or set(data) != {"channel", "payload"}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise TypeError(f"`element_spec` data must be {layout}; got {got}.")
    channel = data["channel"]
    if channel.shape != () or not jnp.issubdtype(channel.dtype, jnp.integer):
        raise TypeError(
            f"`element_spec` data['channel'] must be an integer scalar, got shape "
            f"{channel.shape} and dtype {channel.dtype}."
        )
    payload = data["payload"]
    if not isinstance(payload, tuple | list) or len(payload) != num_channels:
        got = len(payload) if isinstance(payload, tuple | list) else type(payload).__name__
        raise TypeError(
            f"`element_spec` data['payload'] must be a tuple of {num_channels} payloads (one "
            f"per entry of `rates`), got {got}."
        )
    if jax.tree.leaves(spec.state) or spec.metadata is not None:
        raise TypeError(
            "`multi_rate` batches `data` only: put per-sample state or metadata (e.g. a "
            "timestamp) in the channel's payload."
        )


def multi_rate(batch_size: Any, rates: Any, *, capacity: Any = None, pad_value: Any = 0) -> Batcher:
    """Align interleaved samples of channels at different rates into batches of windows.

    Each element is ONE sample of ONE channel: `{"channel": c, "payload": (p_0, ...,
    p_{C-1})}` with a payload slot per channel (only slot `c` is read; the others may hold
    anything of their spec's shape). A batch holds `batch_size` windows; window `w` holds
    `rates[c]` consecutive samples of channel `c`. The emitted `Batch`:

    * `data`: a tuple, entry `c` channel `c`'s payload with leaves `[batch_size, rates[c],
      ...]` (samples in arrival order, window-major);
    * `states`: `{"mask": (m_0, ..., m_{C-1})}`, `m_c` `[batch_size, rates[c]]` bool: which
      sample slots hold a real sample (the rest hold `pad_value`);
    * `valid_mask`: `[batch_size]`, True for the windows complete in every channel.

    `jb.batch_spec` reports this layout. A batch is emitted the step every channel has
    filled its `batch_size` windows (all masks True).

    Overflow policy: each channel buffers at most `capacity` windows (`capacity *
    rates[c]` samples). A sample that arrives for a full channel (another channel is late)
    is refused and counted as `skipped`, as is a sample whose channel id is outside
    `[0, C)`; the buffered samples keep their order.

    End of stream: `flush` emits the first `batch_size` windows if at least one is complete
    in every channel: the complete windows are valid; the windows after them hold what has
    arrived (their `mask` says which slots), with `valid_mask` False. Every sample not in a
    valid window is counted as `dropped` (it appears in the batch for inspection, but a
    masked loss ignores it). With no complete window, `flush` emits nothing and counts
    everything buffered as dropped. One `flush` call drains the batcher.

    Counters count samples (one element = one sample): `emitted` is `sum(rates)` per valid
    window; `padded` counts invalid windows of ready batches.

    Args:
        batch_size: windows per batch, a positive int.
        rates: samples of each channel per window, a non-empty sequence of positive ints.
        capacity: windows each channel may buffer, an int >= `batch_size`; default
            `2 * batch_size` (one batch of slack for a late channel).
        pad_value: fill for sample slots without a sample (a Python scalar).

    Returns:
        A `Batcher` (no bulk `feed`: the drivers step it).

    Raises:
        ValueError: a bad `batch_size`, `rates`, `capacity` or `pad_value`.
        TypeError: (at `init` or `step`) an element unlike the layout above, naming the leaf.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.multi_rate(1, rates=(2, 1))  # 2 fast samples per slow one
        >>> def sample(channel, value):
        ...     return {"channel": jnp.int32(channel),
        ...             "payload": (jnp.float32(value), jnp.zeros(2, jnp.float32) + value)}
        >>> state = batcher.init(sample(0, 0))
        >>> for channel, value in [(0, 1.0), (1, 10.0), (0, 2.0)]:
        ...     state, emit = batcher.step(state, sample(channel, value))
        >>> bool(emit.ready), emit.batch.data[0], emit.batch.data[1]
        (True, Array([[1., 2.]], dtype=float32), Array([[[10., 10.]]], dtype=float32))
        >>> jb.batch_spec(batcher, sample(0, 0)).states["mask"][0].shape
        (1, 2)
    """
    batch_size = positive_int(batch_size, "batch_size")
    if isinstance(rates, str | bytes) or not hasattr(rates, "__len__") or not len(rates):
        raise ValueError(
            f"`rates` must be a non-empty sequence of positive ints (samples per window of "
            f"each channel), got {rates!r}."
        )
    rates = tuple(rates)
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rates):
        raise ValueError(f"`rates` must hold positive ints, got {rates!r}.")
    capacity = 2 * batch_size if capacity is None else capacity
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < batch_size:
        raise ValueError(
            f"`capacity` must be an int >= `batch_size` ({batch_size}) windows, got {capacity!r}."
        )
    pad_number(pad_value)
    if capacity * max(rates) > MAX_SIZE:  # samples buffered per channel, indexed with int32
        raise ValueError(
            f"`capacity` * `rates` must be at most 2**31 - 1 samples per channel (int32 "
            f"indices), got {capacity} * {max(rates)}."
        )
    num_channels = len(rates)
    need = np.array([batch_size * r for r in rates], np.int32)  # samples per batch
    room = np.array([capacity * r for r in rates], np.int32)  # samples buffered at most
    total_rate = sum(rates)
    config = describe(
        "multi_rate", batch_size=batch_size, rates=rates, capacity=capacity, pad_value=pad_value
    )

    def init_fn(element_spec: Any, key: Any = None) -> MultiRateState:
        del key  # deterministic
        spec = spec_of(element_spec)
        _check_spec(spec, num_channels)
        payload = spec.data["payload"]
        pad_value_fits(pad_value, Element(data=payload))
        buffers = tuple(stack_spec(payload[c], int(room[c])) for c in range(num_channels))
        return MultiRateState(
            buffers=buffers,
            counts=jnp.zeros((num_channels,), jnp.int32),
            spec=stack_spec(spec, 0),
            stats=Stats.zeros(fingerprint(config, spec)),
        )

    def windows(buffer: Any, c: int) -> Any:
        """The first `batch_size` windows of channel `c`: leaves `[batch_size, rates[c], ...]`."""
        return jax.tree.map(
            lambda b: b[: need[c]].reshape(batch_size, rates[c], *b.shape[1:]), buffer
        )

    def emit_of(buffers: tuple, masks: tuple, valid: Array, ready: Array) -> Emit:
        data = tuple(windows(b, c) for c, b in enumerate(buffers))
        data = tuple(
            jax.tree.map(
                lambda x, m=m: jnp.where(
                    m.reshape(m.shape + (1,) * (x.ndim - 2)), x, jnp.asarray(pad_value, x.dtype)
                ),
                d,
            )
            for d, m in zip(data, masks)
        )
        batch = Batch(data=data, valid_mask=valid, states={"mask": masks})
        return Emit(batch, ready)

    def step_fn(state: MultiRateState, element: Any) -> tuple[MultiRateState, Emit]:
        check_state(state, MultiRateState, config)
        element = as_element(element)
        check_against_spec(row_spec(state.spec), element, what="element")
        channel = clamp_to_int32(element.data["channel"], -1, num_channels)  # not cut to 32 bits
        buffers, takes = [], []
        for c in range(num_channels):
            take = (channel == c) & (state.counts[c] < room[c])
            position = jnp.minimum(state.counts[c], room[c] - 1)

            def write(buf, x, take=take, position=position):
                # Where the sample is refused, rewrite the row already there: O(one sample).
                old = jax.lax.dynamic_index_in_dim(buf, position, 0, keepdims=False)
                new = jnp.where(take, x, old)
                return jax.lax.dynamic_update_index_in_dim(buf, new, position, 0)

            buffers.append(jax.tree.map(write, state.buffers[c], element.data["payload"][c]))
            takes.append(take)
        accepted = jnp.stack(takes)
        counts = state.counts + accepted.astype(jnp.int32)
        ready = jnp.all(counts >= need)
        masks = tuple(jnp.broadcast_to(ready, (batch_size, r)) for r in rates)
        emit = Emit(
            Batch(
                data=tuple(windows(b, c) for c, b in enumerate(buffers)),
                valid_mask=jnp.broadcast_to(ready, (batch_size,)),
                states={"mask": masks},
            ),
            ready,
        )
        if capacity > batch_size:  # the buffers hold more than one batch: shift it out

            def shift(buffers):
                return tuple(
                    jax.tree.map(lambda b, c=c: jnp.roll(b, -int(need[c]), axis=0), buf)
                    for c, buf in enumerate(buffers)
                )

            buffers = jax.lax.cond(ready, shift, lambda b: b, tuple(buffers))
        counts = jnp.where(ready, counts - need, counts)
        took = jnp.any(accepted)
        stats = state.stats.add(
            accepted=took,
            skipped=~took,
            batches=ready,
            emitted=jnp.where(ready, batch_size * total_rate, 0),
        )
        return MultiRateState(tuple(buffers), counts, state.spec, stats), emit

    def flush_fn(state: MultiRateState) -> tuple[MultiRateState, Emit]:
        check_state(state, MultiRateState, config)
        counts = state.counts
        complete = jnp.min(counts // jnp.asarray(rates, jnp.int32))  # windows done everywhere
        complete = jnp.minimum(complete, batch_size)
        ready = complete > 0
        valid = (jnp.arange(batch_size, dtype=jnp.int32) < complete) & ready
        masks = tuple(
            (jnp.arange(need[c], dtype=jnp.int32) < counts[c]).reshape(batch_size, rates[c]) & ready
            for c in range(num_channels)
        )
        emit = emit_of(state.buffers, masks, valid, ready)
        buffered = jnp.sum(counts, dtype=jnp.int32)
        emitted = jnp.where(ready, complete * total_rate, 0)
        stats = state.stats.add(
            emitted=emitted,
            dropped=buffered - emitted,
            batches=ready,
            padded=jnp.where(ready, batch_size - complete, 0),
        )
        zero = jnp.zeros_like(counts)
        return MultiRateState(state.buffers, zero, state.spec, stats), emit

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)

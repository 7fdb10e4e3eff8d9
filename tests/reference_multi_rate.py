"""A pure-Python reference `multi_rate`: per-channel lists, no JAX.

An element is `(channel, payloads)` where `payloads[c]` is the list of NumPy leaves of
channel `c`'s payload. A batch is `(data, masks, valid)`: `data[c]` the list of leaves stacked
`[batch_size, rates[c], ...]`, `masks[c]` `[batch_size, rates[c]]`, `valid` `[batch_size]`.
"""

from typing import Any, NamedTuple

import numpy as np


class ReferenceRun(NamedTuple):
    batches: list[tuple[list[list[np.ndarray]], list[np.ndarray], np.ndarray]]
    ready: list[bool]
    stats: dict[str, int]


def multi_rate(
    elements: list[tuple[int, list[list[np.ndarray]]]],
    batch_size: int,
    rates: tuple[int, ...],
    capacity: int,
    like: list[list[np.ndarray]],
    pad_value: Any = 0,
) -> ReferenceRun:
    """What `jb.multi_rate(batch_size, rates, capacity=capacity)` does to `elements`;
    `like[c]` is an example payload of channel `c` (to shape padding)."""
    channels = len(rates)
    queues: list[list[list[np.ndarray]]] = [[] for _ in range(channels)]
    stats = dict.fromkeys(("accepted", "skipped", "dropped", "emitted", "batches", "padded"), 0)
    batches, ready = [], []

    def build(counts_used):
        data, masks = [], []
        for c in range(channels):
            slots = batch_size * rates[c]
            samples = queues[c][: min(counts_used[c], slots)]
            leaves = []
            for k, example in enumerate(like[c]):
                pad = np.full_like(example, pad_value)
                rows = [s[k] for s in samples] + [pad] * (slots - len(samples))
                leaves.append(np.stack(rows).reshape(batch_size, rates[c], *example.shape))
            data.append(leaves)
            mask = np.arange(slots) < len(samples)
            masks.append(mask.reshape(batch_size, rates[c]))
        return data, masks

    for channel, payloads in elements:
        in_range = 0 <= channel < channels
        if not in_range or len(queues[channel]) >= capacity * rates[channel]:
            stats["skipped"] += 1
            ready.append(False)
            continue
        stats["accepted"] += 1
        queues[channel].append(payloads[channel])
        if all(len(queues[c]) >= batch_size * rates[c] for c in range(channels)):
            data, masks = build([batch_size * r for r in rates])
            batches.append((data, masks, np.ones(batch_size, bool)))
            for c in range(channels):
                del queues[c][: batch_size * rates[c]]
            stats["batches"] += 1
            stats["emitted"] += batch_size * sum(rates)
            ready.append(True)
        else:
            ready.append(False)

    # flush: the first `batch_size` windows if one is complete everywhere; the rest dropped
    complete = min(batch_size, *(len(queues[c]) // rates[c] for c in range(channels)))
    buffered = sum(len(q) for q in queues)
    if complete > 0:
        data, masks = build([len(q) for q in queues])
        batches.append((data, masks, np.arange(batch_size) < complete))
        stats["batches"] += 1
        stats["emitted"] += complete * sum(rates)
        stats["padded"] += batch_size - complete
        stats["dropped"] += buffered - complete * sum(rates)
    else:
        stats["dropped"] += buffered
    return ReferenceRun(batches, ready, stats)

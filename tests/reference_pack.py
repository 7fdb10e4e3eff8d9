"""A tiny reference packer: plain Python lists and NumPy, no jaxbatch and no JAX.

It follows Grain 0.2.18's `FirstFitPackedBatch` / `BestFitPackedBatch` loop as written (rows
are lists of sequences; a sequence that fits in no row emits every row and starts the next
batch), with `jaxbatch.pack`'s documented choices: an element whose every packed feature
has length 0 is skipped, and `too_long="truncate"` keeps the first `row_length` tokens.
"""

import dataclasses
from typing import Any

import numpy as np

Elem = dict[str, Any]


@dataclasses.dataclass
class PackRun:
    """What the reference packer did with a stream.

    Attributes:
        emitted: per element, the batch emitted by its step (a dict of arrays plus
            `"valid_mask"`), or None.
        flushed: the batches of the final flush (zero or one).
        stats: `Stats` counter values by field name.
        packing: `packing_stats` values by name.
        buffered: sequences waiting in the rows before the flush.
    """

    emitted: list[dict[str, np.ndarray] | None]
    flushed: list[dict[str, np.ndarray]]
    stats: dict[str, int]
    packing: dict[str, int]
    buffered: int


def pack(
    elements: list[Elem],
    *,
    row_length: int | dict[str, int],
    num_rows: int,
    lengths: dict[str, str],
    strategy: str = "first_fit",
    too_long: str = "error",
    pad_value: int | float | dict = 0,
    max_segments: int | None = None,
    alignment: int | dict = 1,
) -> PackRun:
    """Pack `elements` (dicts of NumPy arrays/scalars) the way `jaxbatch.pack` documents.

    `alignment` (Grain's `pack_alignment_struct`): after a sequence, the feature's next
    free slot is rounded up to a multiple of it. `pad_value` may be a dict per key (others 0).
    `row_length` may be a dict per packed feature (Grain's `length_struct`).
    """
    features = sorted(lengths)
    limit = row_length if isinstance(row_length, dict) else dict.fromkeys(features, row_length)
    max_segments = max(limit.values()) if max_segments is None else max_segments

    def align(k):
        return alignment.get(k, 1) if isinstance(alignment, dict) else alignment

    def pad(key):
        return pad_value.get(key, 0) if isinstance(pad_value, dict) else pad_value

    like = elements[0] if elements else None
    rows: list[list[tuple[Elem, dict[str, int]]]] = [[] for _ in range(num_rows)]
    stats = dict.fromkeys(("accepted", "skipped", "dropped", "emitted", "batches", "padded"), 0)
    packing = dict.fromkeys(
        ("sequences", "rows", "tokens", "padding_tokens", "truncated", "truncated_tokens"), 0
    )

    def fill(row, k):  # the first free slot: each sequence's end rounded up to the alignment
        end = 0
        for _, lens in row:
            end = -(-(end + lens[k]) // align(k)) * align(k)
        return end

    def real(row, k):
        return sum(lens[k] for _, lens in row)

    def fits(row, lens):
        room = all(fill(row, k) + lens[k] <= limit[k] for k in features)
        return room and len(row) < max_segments

    def build(rows) -> dict[str, np.ndarray]:
        out = {}
        for key, value in like.items():
            value = np.asarray(value)
            if key in lengths:
                shape = (num_rows, limit[key])
                tokens = np.full((*shape, *value.shape[1:]), pad(key), value.dtype)
                seg = np.zeros(shape, np.int32)
                pos = np.zeros(shape, np.int32)
                for j, row in enumerate(rows):
                    start = 0
                    for s, (e, lens) in enumerate(row):
                        n = lens[key]
                        tokens[j, start : start + n] = np.asarray(e[key])[:n]
                        seg[j, start : start + n] = s + 1
                        pos[j, start : start + n] = np.arange(n)
                        start = -(-(start + n) // align(key)) * align(key)
                out[key], out[f"{key}_segment_ids"], out[f"{key}_positions"] = tokens, seg, pos
            else:
                table = np.full((num_rows, max_segments, *value.shape), pad(key), value.dtype)
                for j, row in enumerate(rows):
                    for s, (e, _) in enumerate(row):
                        table[j, s] = e[key]
                out[key] = table
        out["valid_mask"] = np.array([len(row) > 0 for row in rows])
        in_rows = sum(len(row) for row in rows)
        tokens = sum(real(row, k) for row in rows for k in features)
        used = sum(len(row) > 0 for row in rows)
        stats["emitted"] += in_rows
        stats["batches"] += 1
        stats["padded"] += num_rows - used
        packing["sequences"] += in_rows
        packing["rows"] += used
        packing["tokens"] += tokens
        packing["padding_tokens"] += num_rows * sum(limit.values()) - tokens
        return out

    emitted: list[dict[str, np.ndarray] | None] = []
    for e in elements:
        given = {k: int(e[lengths[k]]) for k in features}
        if any(n > limit[k] for k, n in given.items()):
            if too_long == "error":
                raise ValueError(f"sequence longer than row_length: {given}")
            packing["truncated"] += 1
        lens = {k: min(n, limit[k]) for k, n in given.items()}
        packing["truncated_tokens"] += sum(given[k] - lens[k] for k in features)
        if all(n == 0 for n in given.values()):
            stats["skipped"] += 1
            emitted.append(None)
            continue
        stats["accepted"] += 1
        batch = None
        if not any(fits(row, lens) for row in rows):
            batch = build(rows)
            rows = [[] for _ in range(num_rows)]
        candidates = [j for j, row in enumerate(rows) if fits(row, lens)]
        if strategy == "first_fit":
            j = candidates[0]
        else:  # the fullest (fills summed over features), the earliest on a tie
            j = max(candidates, key=lambda j: (sum(fill(rows[j], k) for k in features), -j))
        rows[j].append((e, lens))
        emitted.append(batch)
    buffered = sum(len(row) for row in rows)
    flushed = [build(rows)] if buffered else []
    return PackRun(emitted, flushed, stats, packing, buffered)


def row_group(row: dict[str, np.ndarray], key: str, packed: bool, segments: int) -> float:
    """Grain's `shuffle_bins_group_by_feature` group of one emitted row: the mean of the
    distinct nonzero values of `row[key]`, over the whole row for a packed feature (padding
    included), over its first `segments` entries for a per-sequence table; 0 if none."""
    values = np.asarray(row[key]) if packed else np.asarray(row[key])[:segments]
    distinct = np.unique(values)
    distinct = distinct[distinct != 0]
    return float(distinct.sum() / distinct.size) if distinct.size else 0.0

"""Law 4 for batchers that pack sequences: conservation of tokens instead of rows.

A packing batcher (`jb.pack`, `jb.concat_and_split`, or a user's own) does not pass
elements through: it lays the first `length` tokens of each sequence side by side in rows,
and describes them with `<feature>_segment_ids` (1, 2, 3... per sequence within a row, 0 on
padding) and `<feature>_positions`. `check_packed` follows every token:

* every row is well formed: each sequence is one run of one segment id, ids increase
  along the row (they may skip an id: a sequence empty in one feature keeps its id in the
  others; padding, id 0, may sit between runs when sequences are aligned); positions
  count up by one within a segment and are 0 on padding;
* whole sequences (`split=False`): every segment, read across all packed features, is an
  input sequence (in each feature its first `row_length` tokens if it was longer than the
  row, `row_length` read off the batch per feature, so rows of different lengths per
  feature, Grain's `length_struct`, are followed too), each input
  sequence comes out at most once, positions run 0..len-1, and those that never come out
  are exactly the ones the Stats count as skipped or dropped;
* split sequences (`split=True`, e.g. concat-and-split): the segments, read in emission
  order, are the input sequences concatenated, each segment inside one sequence, a sequence
  cut only where a row ends; positions start at 0 or at the offset within the sequence.

It returns, for each emission, how many sequences had come out completely by then, which
`check_counters` compares with the Stats' `emitted`.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from .._src.element import Element


class _Segment(NamedTuple):
    place: str  # "batch b row r segment s (emitted at ...)"
    tokens: tuple[np.ndarray, ...]  # one array per packed feature
    positions: tuple[np.ndarray, ...]
    starts: tuple[int, ...]  # where the segment starts in its row, per feature


def _data(row: Any) -> Mapping[str, Any]:
    return row.data if isinstance(row, Element) else row


def _runs(segment_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """`(segment id, start, stop)` for each run of one nonzero id in a row."""
    runs, start = [], 0
    for t in range(1, len(segment_ids) + 1):
        if t == len(segment_ids) or segment_ids[t] != segment_ids[start]:
            if segment_ids[start] != 0:
                runs.append((int(segment_ids[start]), start, t))
            start = t
    return runs


def _check_row(fail, place: str, feature: str, ids: np.ndarray, positions: np.ndarray) -> None:
    """Each sequence one run of one id, ids increasing along the row (they may skip a
    number, and padding may sit between runs: alignment); positions count up within a run
    and are 0 on padding."""
    runs = _runs(ids)
    order = [segment for segment, _, _ in runs]
    if any(b <= a for a, b in zip(order, order[1:])):
        fail(
            f"{place}: `{feature}_segment_ids` {ids.tolist()} must increase along the row, "
            "each sequence one contiguous run (1, 2, 3... in the order they were placed)."
        )
    if (positions[ids == 0] != 0).any():
        fail(f"{place}: `{feature}_positions` is not 0 on padding: {positions.tolist()}.")
    for segment, start, stop in runs:
        if (np.diff(positions[start:stop]) != 1).any():
            fail(
                f"{place}: `{feature}_positions` of segment {segment} "
                f"{positions[start:stop].tolist()} must count up by one."
            )


def _segments(fail, records, features: Sequence[str]) -> list[list[_Segment]]:
    """Per ready record, its segments in emission order (row-major), rows checked."""
    out = []
    for b, record in enumerate(r for r in records if r.ready):
        data = {k: np.asarray(v) for k, v in record.batch.data.items()}
        mask = np.asarray(record.batch.valid_mask)
        segments = []
        for r in range(len(mask)):
            place = f"batch {b} row {r} (emitted at {record.where.split(' (')[0]})"
            ids = {k: data[f"{k}_segment_ids"][r] for k in features}
            positions = {k: data[f"{k}_positions"][r] for k in features}
            for k in features:
                _check_row(fail, place, k, ids[k], positions[k])
            holds = any((ids[k] != 0).any() for k in features)
            if holds != bool(mask[r]):
                fail(
                    f"{place}: valid_mask is {bool(mask[r])} but the row "
                    f"{'holds' if holds else 'holds no'} tokens; a row is valid exactly when "
                    "it holds a sequence."
                )
            runs = {k: {s: (a, z) for s, a, z in _runs(ids[k])} for k in features}
            for s in sorted(set().union(*(set(v) for v in runs.values()))):
                spans = [runs[k].get(s, (0, 0)) for k in features]
                segments.append(
                    _Segment(
                        f"{place} segment {s}",
                        tuple(data[k][r][a:z] for k, (a, z) in zip(features, spans)),
                        tuple(positions[k][a:z] for k, (a, z) in zip(features, spans)),
                        tuple(a for a, _ in spans),
                    )
                )
        out.append(segments)
    return out


def check_packed(
    fail, records, host_rows: list[Any], lengths: Mapping[str, str], split: bool, fifo: bool
) -> list[int]:
    """Law 4 (and 5 if `fifo`) on tokens. `fail(message)` raises. Returns, per record, the
    number of sequences emitted completely so far."""
    features = list(lengths)
    spec = records[0].batch.data
    missing = [f"{k}{suffix}" for k in features for suffix in ("", "_segment_ids", "_positions")]
    missing = [name for name in missing if name not in spec]
    if missing:
        fail(
            f"the batch data has no leaves {missing}; a packed feature `k` comes with "
            "`k`, `k_segment_ids` and `k_positions`."
        )
    row_length = {k: np.shape(spec[k])[1] for k in features}
    sequences = []
    for row in host_rows:
        data = _data(row)
        sequences.append(
            tuple(np.asarray(data[k])[: int(np.asarray(data[n]))] for k, n in lengths.items())
        )
    per_record = _segments(fail, records, features)
    if split:
        done = _follow_split(fail, per_record, sequences, features)
    else:
        done = _match_whole(fail, per_record, sequences, features, row_length, fifo)
    counts, total, ready = [], 0, iter(done)
    for record in records:
        total += next(ready) if record.ready else 0
        counts.append(total)
    stats = records[-1].stats
    if total + stats["dropped"] + stats["skipped"] != len(host_rows):
        fail(
            f"{len(host_rows) - total} input sequences never came out whole, but the Stats "
            f"count dropped={stats['dropped']} and skipped={stats['skipped']}."
        )
    return counts


def _key(parts: Sequence[np.ndarray]) -> bytes:
    return b"|".join(np.ascontiguousarray(p).tobytes() + bytes(str(len(p)), "ascii") for p in parts)


def _match_whole(fail, per_record, sequences, features, row_length, fifo) -> list[int]:
    """Every segment is one whole (or row-truncated) input sequence, each used once."""
    unused: dict[bytes, list[int]] = {}
    for i, seq in enumerate(sequences):
        cut = tuple(s[: row_length[k]] for k, s in zip(features, seq))
        unused.setdefault(_key(cut), []).append(i)
    done, last_batch_max = [], -1
    for segments in per_record:
        indices = []
        for segment in segments:
            rows = unused.get(_key(segment.tokens))
            if not rows:
                fail(
                    f"{segment.place} holds tokens {[t.tolist() for t in segment.tokens]} "
                    "that are no input sequence not already emitted (each sequence comes out "
                    "once, whole, in one segment)."
                )
            i = rows.pop(0)
            indices.append(i)
            for k, positions in zip(features, segment.positions):
                if (positions != np.arange(len(positions))).any():
                    fail(f"{segment.place}: `{k}_positions` {positions.tolist()} must be 0..len-1.")
        if fifo and indices and min(indices) < last_batch_max:
            fail(
                f"input sequence {min(indices)} came out in a later batch than input sequence "
                f"{last_batch_max}; a FIFO packer fills a batch only from elements after the "
                "previous batch's (pass `fifo=False` if it reorders by design)."
            )
        last_batch_max = max([last_batch_max, *indices])
        done.append(len(segments))
    return done


def _follow_split(fail, per_record, sequences, features) -> list[int]:
    """The segments, in emission order, are the input sequences concatenated, per feature."""
    done = []
    cursor = {k: (0, 0) for k in features}  # (sequence, offset within it) per feature
    for segments in per_record:
        finished = 0
        for segment in segments:
            for f, k in enumerate(features):
                tokens, positions = segment.tokens[f], segment.positions[f]
                if not len(tokens):
                    continue
                i, offset = cursor[k]
                while i < len(sequences) and offset == len(sequences[i][f]):
                    i, offset = i + 1, 0
                if i == len(sequences):
                    fail(f"{segment.place}: `{k}` holds tokens past the end of the stream.")
                want = sequences[i][f][offset : offset + len(tokens)]
                if len(want) != len(tokens) or (want != tokens).any():
                    fail(
                        f"{segment.place}: `{k}` holds {tokens.tolist()}, but the stream "
                        f"continues with {want.tolist()} (input sequence {i} from token "
                        f"{offset}); a segment lies inside one sequence, in order."
                    )
                if offset and segment.starts[f]:
                    fail(
                        f"{segment.place}: `{k}` continues input sequence {i} from token "
                        f"{offset} in the middle of a row; a sequence is cut only where a row "
                        "ends, and continues at the start of the next."
                    )
                if positions[0] not in (0, offset):
                    fail(
                        f"{segment.place}: `{k}_positions` starts at {positions[0]}; a piece "
                        f"starting at token {offset} of its sequence starts at 0 or {offset}."
                    )
                offset += len(tokens)
                if f == 0 and offset == len(sequences[i][f]):
                    finished += 1
                cursor[k] = (i, offset)
        done.append(finished)
    return done

"""A tiny pure-Python reference `concat_and_split`, and test streams for it.

Sequences are plain lists of tokens, rows are lists of `(token, segment_id, position)`
triples per feature, plus the list of meta values of the row's pieces; NumPy appears only to
stack the result for comparison. It shares no code with `jaxbatch`: it is the obvious loop
of Grain's rule (fill the open row feature by feature; when a feature does not fit, close
the row and go on in the next one; close a row as soon as every feature fills it, or when
it holds `max_sequences_per_row` pieces; every piece with a token in the row puts its
sequence's meta values in the row's list), written with lists.
"""

from typing import Any, NamedTuple

import numpy as np


class ReferenceRun(NamedTuple):
    """What `concat_and_split` does to a whole stream.

    Attributes:
        batches: every ready batch, in order, as `(data, valid_mask)`: from `step`, then the
            one `flush` emits (if any).
        ready: for each element, whether its `step` emitted a batch.
        stats_before_flush: the `Stats` counters after the last `step`.
        stats: the `Stats` counters after `flush`.
        tokens: per feature, tokens taken in.
        padding_tokens: per feature, padding slots in the emitted batches.
    """

    batches: list[tuple[dict[str, np.ndarray], np.ndarray]]
    ready: list[bool]
    stats_before_flush: dict[str, int]
    stats: dict[str, int]
    tokens: dict[str, int]
    padding_tokens: dict[str, int]


def concat_and_split(
    sequences: list[dict[str, Any]],
    row_length: int | dict[str, int],
    num_rows: int,
    *,
    like: dict[str, np.ndarray],
    meta_like: dict[str, Any] | None = None,
    pad_value: Any = 0,
    max_sequences_per_row: int | None = None,
    continue_positions: bool = False,
    split_full_length_features: bool = True,
    bos_features: tuple[str, ...] = (),
    bos_token_id: int | None = None,
) -> ReferenceRun:
    """Pack `sequences` (`{feature: list of tokens, meta key: value}` each) into batches.

    `like` maps each feature to an example token (its shape and dtype shape the padding),
    `meta_like` each meta key to an example value (an array, or a dict of them): each meta
    key comes out as a table `[num_rows, width, ...]`, entry `[j, s - 1]` the value of the
    sequence of segment id `s` in row `j`, `width` being `max_sequences_per_row` or
    `row_length * len(like)`. A row closes when it holds `max_sequences_per_row` pieces.
    `split_full_length_features=False`: a sequence with a feature of exactly `row_length`
    tokens (none longer) is a row of its own, closed at once, before the open row.
    `bos_features`: their token at every position 0 (a piece's start) is `bos_token_id`.
    `row_length` may be a dict per feature (Grain's `length_struct`): each feature's rows
    are then of its own length, and "full length" means every feature at most its row
    length and one exactly.
    """
    features = sorted(like)
    limit = row_length if isinstance(row_length, dict) else dict.fromkeys(features, row_length)
    meta_like = meta_like or {}
    width = max_sequences_per_row or sum(limit[k] for k in features)
    closed: list[dict[str, list]] = []  # closed rows, emitted or not
    closed_meta: list[list[dict]] = []  # per closed row, its pieces' meta values
    open_row: dict[str, list] = {k: [] for k in features}
    open_meta: list[dict] = []
    segment = 0  # pieces in the open row
    ends: list[int] = []  # for each accepted sequence, the row its last piece is in
    batches, ready = [], []
    stats = dict.fromkeys(("accepted", "skipped", "dropped", "emitted", "batches", "padded"), 0)
    tokens = dict.fromkeys(features, 0)

    def table(example, rows):
        """`rows` (per row, per piece, a value like `example`) as a padded table."""
        if isinstance(example, dict):
            return {k: table(v, [[x[k] for x in row] for row in rows]) for k, v in example.items()}
        example = np.asarray(example)
        out = np.full((num_rows, width, *example.shape), pad_value, example.dtype)
        for j, row in enumerate(rows):
            assert len(row) <= width
            for s, value in enumerate(row):
                out[j, s] = value
        return out

    def make_batch(rows, metas):
        rows = rows + [{k: [] for k in features}] * (num_rows - len(rows))
        data = {m: table(example, [[v[m] for v in row] for row in metas])
                for m, example in meta_like.items()}  # fmt: skip
        for k in features:
            pad = (np.full_like(like[k], pad_value), 0, 0)
            cells = [row[k] + [pad] * (limit[k] - len(row[k])) for row in rows]
            if k in bos_features:
                bos = np.full_like(like[k], bos_token_id)
                cells = [
                    [(bos, s, p) if s and p == 0 else (x, s, p) for x, s, p in r] for r in cells
                ]
            data[k] = np.array([[c[0] for c in r] for r in cells], like[k].dtype)
            data[f"{k}_segment_ids"] = np.array([[c[1] for c in r] for r in cells], np.int32)
            data[f"{k}_positions"] = np.array([[c[2] for c in r] for r in cells], np.int32)
        valid = np.array([any(row[k] for k in features) for row in rows])
        return data, valid

    for sequence in sequences:
        if all(len(sequence[k]) == 0 for k in features):
            stats["skipped"] += 1
            ready.append(False)
            continue
        stats["accepted"] += 1
        for k in features:
            tokens[k] += len(sequence[k])
        meta = {m: sequence[m] for m in meta_like}
        whole = all(len(sequence[k]) <= limit[k] for k in features)
        exact = any(len(sequence[k]) == limit[k] for k in features)
        if not split_full_length_features and whole and exact:
            # A row of its own, before the open row (whose sequences end one row later).
            ends = [e + 1 if e == len(closed) else e for e in ends]
            ends.append(len(closed))
            closed.append({k: [(x, 1, i) for i, x in enumerate(sequence[k])] for k in features})
            closed_meta.append([meta])
        else:
            rest = {k: list(enumerate(sequence[k])) for k in features}
            while True:
                room = {k: limit[k] - len(open_row[k]) for k in features}
                overflow = any(len(rest[k]) > room[k] for k in features)
                segment += 1
                placed = False
                for k in features:
                    piece, rest[k] = rest[k][: room[k]], rest[k][room[k] :]
                    placed = placed or bool(piece)
                    for j, (i, token) in enumerate(piece):
                        open_row[k].append((token, segment, i if continue_positions else j))
                if placed:
                    open_meta.append(meta)
                if not overflow:
                    break
                closed.append(open_row)
                closed_meta.append(open_meta)
                open_row, open_meta, segment = {k: [] for k in features}, [], 0
            ends.append(len(closed))
            full = all(len(open_row[k]) == limit[k] for k in features)
            if full or segment == max_sequences_per_row:
                closed.append(open_row)
                closed_meta.append(open_meta)
                open_row, open_meta, segment = {k: [] for k in features}, [], 0
        emitted_rows = stats["batches"] * num_rows
        new = (len(closed) - emitted_rows) // num_rows
        assert new <= 1, "a step completed two batches"
        if new:
            window = slice(emitted_rows, emitted_rows + num_rows)
            batches.append(make_batch(closed[window], closed_meta[window]))
            stats["batches"] += 1
        ready.append(bool(new))
        stats["emitted"] = sum(end < stats["batches"] * num_rows for end in ends)

    before = dict(stats)
    left = closed[stats["batches"] * num_rows :]
    left_meta = closed_meta[stats["batches"] * num_rows :]
    if any(open_row[k] for k in features):
        left.append(open_row)
        left_meta.append(open_meta)
    if left:
        assert len(left) <= num_rows
        batches.append(make_batch(left, left_meta))
        stats["batches"] += 1
        stats["padded"] += num_rows - len(left)
        stats["emitted"] = stats["accepted"]
    padding = {k: sum(int((b[f"{k}_segment_ids"] == 0).sum()) for b, _ in batches) for k in like}
    return ReferenceRun(batches, ready, before, stats, tokens, padding)


# --------------------------------------------------------------------------- test streams


def make_stream(
    lengths: dict[str, list[int]], max_len: dict[str, int], seed: int, meta: tuple[str, ...] = ()
) -> dict:
    """Stacked elements: feature `k` (length key `k + "_len"`) with `lengths[k][i]` tokens.

    Feature `"x"` is int32 `[max_len]`, any other is float32 `[max_len, 2]`. Tokens are
    distinct (`1000 * (i + 1) + position`); the slots past a sequence's length hold junk
    (`-7`), so a token read past its length shows. Meta features (one value per sequence),
    from `meta`: `"src"`, int32 `i + 1`; `"info"`, a dict of int16 `[2]` and float32 `[]`.
    """
    rng = np.random.default_rng(seed)
    data = {}
    for k, ns in lengths.items():
        n = len(ns)
        base = 1000 * np.arange(1, n + 1)[:, None] + np.arange(max_len[k])[None, :]
        keep = np.arange(max_len[k])[None, :] < np.array(ns, dtype=np.int64).reshape(n, 1)
        values = np.where(keep, base, -7)
        if k == "x":
            data[k] = values.astype(np.int32)
        else:
            noise = rng.integers(0, 9, size=(n, max_len[k], 1))
            data[k] = np.concatenate([values[..., None], noise], axis=-1).astype(np.float32)
        data[f"{k}_len"] = np.array(ns, dtype=np.int32).reshape(n)
    n = len(next(iter(lengths.values())))
    index = np.arange(1, n + 1)
    menu = {
        "src": lambda: index.astype(np.int32),
        "info": lambda: {
            "a": np.stack([index, -index], axis=1).astype(np.int16),
            "b": rng.normal(size=n).astype(np.float32),
        },
    }
    data.update({m: menu[m]() for m in meta})
    return data


def _features(stream: dict) -> list[str]:
    return sorted(k for k in stream if f"{k}_len" in stream)


def _metas(stream: dict) -> list[str]:
    return sorted(k for k in stream if k not in _features(stream) and not k.endswith("_len"))


def _index(value: Any, i: int) -> Any:
    if isinstance(value, dict):
        return {k: _index(v, i) for k, v in value.items()}
    return np.asarray(value)[i]


def sequences_of(stream: dict) -> list[dict[str, Any]]:
    """The stream's sequences as reference input: the first `length` tokens of each feature,
    and each meta feature's value."""
    features, metas = _features(stream), _metas(stream)
    n = len(stream[f"{features[0]}_len"])
    return [
        {k: list(np.asarray(stream[k])[i][: int(stream[f"{k}_len"][i])]) for k in features}
        | {m: _index(stream[m], i) for m in metas}
        for i in range(n)
    ]


def like_of(stream: dict) -> dict[str, np.ndarray]:
    """An example token per feature (shape and dtype of padding)."""
    return {k: np.zeros(np.shape(stream[k])[2:], np.asarray(stream[k]).dtype)
            for k in _features(stream)}  # fmt: skip


def meta_like_of(stream: dict) -> dict[str, Any]:
    """An example value per meta feature (shape and dtype of its table's padding)."""

    def like(value):
        if isinstance(value, dict):
            return {k: like(v) for k, v in value.items()}
        return np.zeros(np.shape(value)[1:], np.asarray(value).dtype)

    return {m: like(stream[m]) for m in _metas(stream)}

"""`pack`: variable-length sequences packed into fixed `[num_rows, row_length]` rows (a
row length per packed feature if asked, as Grain's `length_struct`), inside `jit`, with the
semantics of Grain 0.2.18's `FirstFitPackIterDataset` / `BestFitPackIterDataset`
(`shuffle_bins=False`).

Data flow (DESIGN.md, "decide on metadata, move payload in bulk"):

* The state holds the batch being packed, already in its output layout (`state.data`: the
  token rows, `<feature>_segment_ids`, `<feature>_positions` and the per-segment tables),
  plus the small placement vectors: `fills[f, j]` (tokens of packed feature `f` in row `j`)
  and `segments[j]` (sequences in row `j`).
* `step` decides on those vectors alone: which rows fit the element (every packed feature's
  `fill + length <= row_length`, and fewer than `max_sequences_per_row` sequences), then the
  first fitting row (`first_fit`) or the fullest one (`best_fit`, largest total fill, earliest on
  a tie). If no row fits, the whole buffer is emitted as one batch and the element starts
  the next batch in row 0 (the fills are reset; rows are not cleared, see below).
* The payload moves once per feature: the chosen row is rebuilt from the old row, the
  sequence gathered to its offset, and padding after it, and written back with one
  `dynamic_update_slice` (likewise segment ids, positions and one row of each per-segment
  table). Writing the padding past the new fill is what keeps a reused row clean: a row's
  first sequence after a reset rewrites the whole row, so rows are never cleared in bulk.
  Mid-stream emissions always have every row in use (an empty row fits any sequence), so
  only `flush` masks unused rows (once, at the end of the stream).
* `feed`, the bulk path, is "plan on metadata, then gather": a `lax.scan` over the lengths
  alone runs the same placement decision (`decide`) and records, per sequence, its batch
  number, row, segment slot and offsets. Placed sequences are compacted in stream order,
  so those of batch `k` are a contiguous window found by `searchsorted`; `batch(k)`
  scatters that window into a `[num_rows, max_sequences_per_row]` table of sequences, finds the
  segment covering each token slot with a scatter-max of segment starts and a `cummax`,
  and gathers the tokens (batch 0 keeps the state's rows below their old fills). The open
  batch is built the same way and becomes the new buffer.
"""

from collections.abc import Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

from ..base import (
    Batcher,
    Counter,
    Emissions,
    Emit,
    Stats,
    check_state,
    describe,
    fingerprint,
    prng_key,
    row_spec,
)
from ..batch import Batch, rows_mask
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of
from ._checks import lengths_mapping, pad_value_fits, positive_int, row_lengths as _row_lengths

_STRATEGIES = ("first_fit", "best_fit")
_TOO_LONG = ("error", "truncate")
_INT32_MAX = 2**31 - 1


class PackState(eqx.Module):
    """State of `pack`: the batch being packed, its fills, and the counters.

    Attributes:
        data: the batch being packed, in the layout of the emitted `Batch.data`: for every
            packed feature `k`, `k` `[num_rows, row_length, ...]`, `k_segment_ids` and
            `k_positions` `[num_rows, row_length]`; for every other key, its per-segment
            table `[num_rows, max_sequences_per_row, ...]`. Rows with no sequence are unspecified.
        fills: `[num_features, num_rows]` int32, the first free slot of each packed
            feature (sorted by name) in each row: its tokens, each sequence's end rounded
            up to the feature's `alignment` (so it may pass `row_length`, as in Grain).
        segments: `[num_rows]` int32, sequences in each row.
        open_tokens: int32, real tokens (all packed features) in the rows being packed.
        key: the typed PRNG key of `shuffle_rows=True`, else None.
        draws: with `shuffle_rows=True`, uint32, batches emitted so far (the `b`-th batch
            is shuffled with `fold_in(key, b)`; it may wrap, unlike a count), else None.
        stats: the `Stats` counters; an "element" is one sequence (one `step` call).
        sequences: sequences emitted in ready batches.
        rows: rows holding at least one sequence, emitted in ready batches.
        tokens: real token slots emitted (all packed features together).
        padding_tokens: padding token slots emitted, padding rows included.
        truncated: sequences truncated (`too_long="truncate"`).
        truncated_tokens: tokens cut off by truncation (never emitted).
        max_lens: static `((feature, max_len), ...)`, the element's packed shapes.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.pack(4, 2, lengths={"x": "n"})
        >>> state = batcher.init({"x": jnp.zeros(6, jnp.int32), "n": jnp.int32(0)})
        >>> state.data["x"].shape, state.data["n"].shape, state.fills.shape
        ((2, 4), (2, 4), (1, 2))
    """

    data: PyTree
    fills: Int[Array, "features rows"]
    segments: Int[Array, " rows"]
    open_tokens: Int[Array, ""]
    key: Any
    draws: Any
    stats: Stats
    sequences: Counter
    rows: Counter
    tokens: Counter
    padding_tokens: Counter
    truncated: Counter
    truncated_tokens: Counter
    max_lens: tuple[tuple[str, int], ...] = eqx.field(static=True)


def packing_stats(state: PackState | Any) -> dict[str, Counter]:
    """The packing counters of a `pack` state, by name; read each with `int()`.

    The per-device states of `jb.scan_per_device` work too: their counters are stacked, one
    per stream, and `int()` reads the total over the streams.

    Keys: `sequences` (sequences emitted in ready batches), `rows` (non-padding rows
    emitted), `tokens` (real token slots emitted, all packed features together),
    `padding_tokens` (padding slots emitted, padding rows included), `truncated` (sequences
    cut to `row_length`) and `truncated_tokens` (tokens cut off). Derived figures: packing
    efficiency `tokens / (tokens + padding_tokens)`, sequences per row `sequences / rows`.
    Works under `jit` (returns `Counter`s of arrays), like `jb.operation_stats`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.pack(4, 1, lengths={"x": "n"})
        >>> state = batcher.init({"x": jnp.zeros(4, jnp.int32), "n": jnp.int32(0)})
        >>> for n in (3, 2):
        ...     state, _ = batcher.step(state, {"x": jnp.ones(4, jnp.int32), "n": jnp.int32(n)})
        >>> state, _ = batcher.flush(state)
        >>> stats = {k: int(v) for k, v in jb.packing_stats(state).items()}
        >>> stats["tokens"], stats["padding_tokens"], stats["rows"]
        (5, 3, 2)
        >>> stats["tokens"] / (stats["tokens"] + stats["padding_tokens"])
        0.625
    """
    return {
        "sequences": state.sequences,
        "rows": state.rows,
        "tokens": state.tokens,
        "padding_tokens": state.padding_tokens,
        "truncated": state.truncated,
        "truncated_tokens": state.truncated_tokens,
    }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_pads(pad_value: Any) -> dict[str, int | float] | int | float:
    """`pad_value` as given (a number) or a dict of numbers; its keys are checked at `init`."""
    if _number(pad_value):
        return pad_value
    if isinstance(pad_value, Mapping) and all(
        isinstance(k, str) and _number(v) for k, v in pad_value.items()
    ):
        return dict(pad_value)
    raise ValueError(
        "`pad_value` must be a Python int or float, or a dict `{key: number}` of top-level "
        f"keys of the element's data (others pad with 0), got {pad_value!r}."
    )


def _check_alignment(alignment: Any, features: tuple[str, ...], limits: tuple[int, ...]) -> tuple:
    """`alignment` (an int, or a dict per packed feature, default 1) as a tuple by feature,
    each in `[1, its feature's row length]`."""
    if isinstance(alignment, Mapping):
        unknown = sorted(set(map(str, alignment)) - set(features))
        if unknown:
            raise ValueError(
                f"`alignment` names {unknown}, which are not packed features (keys of "
                f"`lengths`: {list(features)})."
            )
        aligns = tuple(alignment.get(k, 1) for k in features)
    else:
        aligns = (alignment,) * len(features)
    for k, a, limit in zip(features, aligns, limits):
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= limit:
            raise ValueError(
                f"`alignment` of packed feature {k!r} must be an int in [1, row_length] = "
                f"[1, {limit}] (an int for every feature, or a dict of them per packed "
                f"feature), got {alignment!r}."
            )
    return aligns


def _output_keys(feature: str) -> tuple[str, str]:
    return f"{feature}_segment_ids", f"{feature}_positions"


# The arguments are `Any`: they are validated below, so a bad value raises the documented
# `ValueError` even under a run-time type checker (jaxtyping's import hook).
def pack(
    row_length: Any,
    num_rows: Any,
    *,
    lengths: Any,
    strategy: Any = "first_fit",
    too_long: Any = "error",
    pad_value: Any = 0,
    max_sequences_per_row: Any = None,
    alignment: Any = 1,
    shuffle_rows: Any = False,
    shuffle_rows_group_by: Any = None,
    max_segments: Any = None,
) -> Batcher:
    """Pack variable-length sequences into `num_rows` rows of `row_length` tokens, as Grain.

    Each element is one sequence: a dict whose packed features (the keys of `lengths`) are
    arrays `[max_len, ...]` (static `max_len`, may exceed `row_length`) holding the sequence
    in their first `data[lengths[k]]` entries. The element goes into a row where *every*
    packed feature fits (`fill + length <= row_length` per feature, and the row holds fewer
    than `max_sequences_per_row` sequences): the first such row (`"first_fit"`), or the fullest one,
    its fills summed over features, earliest on a tie (`"best_fit"`). When it fits in no row,
    the current rows are emitted as one batch and the element starts the next batch in row
    0. So a batch is emitted only when a sequence does not fit (not when the rows happen to
    become exactly full), and `flush` emits the last rows at the end of the stream.

    This is Grain 0.2.18's `FirstFitPackIterDataset` / `BestFitPackIterDataset` with
    `num_packing_bins=num_rows`, `length_struct=row_length` (for every packed feature),
    `max_sequences_per_bin=max_sequences_per_row`, `pack_alignment_struct=alignment`,
    `padding_struct=pad_value`, `shuffle_bins=shuffle_rows`,
    `shuffle_bins_group_by_feature=shuffle_rows_group_by` and the other keys as
    non-sequence `meta_features` (checked in the tests against Grain itself): without
    shuffling, the valid rows of the emitted batches, concatenated, are the rows Grain
    yields, token for token, with the same segment ids and positions. Grain's non-sequence
    meta feature is a list per row of one value per sequence; here it is the per-segment
    table below (entry `s - 1` of a row is Grain's list item `s - 1`, the rest is padding),
    and every key that is not packed is carried (Grain drops keys it is not told about).
    A Grain *sequence* meta feature (in `length_struct` and `meta_features`) is a packed
    feature here whose `_segment_ids` / `_positions` you may ignore. Differences: Grain
    drops the empty trailing rows of its last batch, here they are padding rows (`valid_mask`
    False); Grain gives a sequence of length 0 a segment id of its own, here an element whose
    every packed feature has length 0 is skipped (counted in `Stats.skipped`, never
    placed); Grain raises on a too-long sequence, `too_long="truncate"` is an option here.

    Output `Batch.data`, for every packed feature `k`: `k` `[num_rows, row_length, ...]` (the
    tokens; `pad_value` past each row's fill; `row_length` being `k`'s own when it is a
    dict), `k_segment_ids` int32 `[num_rows, row_length]` (1, 2,
    3... per sequence within a row, 0 on padding) and `k_positions` int32 (0..len-1 within each
    sequence, 0 on padding). Every other key of the element (the length keys included) is a
    per-sequence feature and becomes a per-segment table `[num_rows, max_sequences_per_row, ...]`:
    entry `[j, s - 1]` belongs to segment id `s` of row `j`, unused entries hold `pad_value`. The
    stored lengths are as given (not truncated). `valid_mask` `[num_rows]` is True for rows holding
    at least one sequence.

    Stats (one "element" is one sequence): `accepted` sequences placed, `skipped` empty
    sequences, `emitted` sequences in ready batches, `batches`, `padded` padding rows;
    `packing_stats` has the token counters.

    Args:
        row_length: tokens per row, a positive int (for every packed feature), or a dict
            `{packed_feature: positive int}` naming every key of `lengths` (Grain's
            `length_struct`; an encoder-decoder's `{"inputs": 512, "targets": 114}`): a
            sequence fits a row when each feature fits its own length.
        num_rows: rows per batch, a positive int.
        lengths: dict `{packed_feature_key: length_key}`, both top-level keys of the
            element's data; the length is a scalar int. Several features may share a length
            key; a length key may not be a packed feature.
        strategy: `"first_fit"` or `"best_fit"`.
        too_long: for a sequence longer than `row_length` (in any feature, against that
            feature's length): `"error"` raises at run time
            (`eqx.error_if`), `"truncate"` keeps its first `row_length` tokens and counts
            it in `packing_stats` (`truncated`, `truncated_tokens`). A length below 0 or
            above the feature's `max_len` is always a run-time error.
        pad_value: fill for padding tokens and unused table entries (a Python number),
            cast to each leaf's dtype, or a dict `{key: number}` per top-level key of the
            element (Grain's `padding_struct`; keys left out pad with 0); `init` raises
            `ValueError` if an integer leaf cannot hold it or a key is not the element's.
            Segment ids and positions are 0 on padding.
        max_sequences_per_row: sequences per row at most (Grain's `max_sequences_per_bin`;
            a row holding that many counts as full), a positive int; default `row_length`
            (the longest one if per feature: as many as can fit when every sequence has a
            token in that feature). It sizes the tables.
        alignment: Grain's `pack_alignment_struct`, an int in `[1, row_length]` or a dict
            of them per packed feature (default 1; each at most its feature's row length):
            after each sequence, the feature's next free slot is rounded up to a multiple of
            it, the gap being padding. The rounded
            fill may pass `row_length` (6 tokens, alignment 4: the fill is 8), which closes
            the row for that feature, as in Grain.
        shuffle_rows: Grain's `shuffle_bins`: each emitted batch's rows (the `flush`ed one
            too) in a random order, padding rows last; the batch numbered `b` uses
            `fold_in(key, b)`. Then `init` needs a key, and the order is not first-in-
            first-out (`check_batcher(..., fifo=False)`).
        shuffle_rows_group_by: Grain's `shuffle_bins_group_by_feature`, a top-level key of
            the element (packed, or a per-segment table) holding numbers: with
            `shuffle_rows=True`, each batch's rows are sorted by their *group*, the mean of
            the distinct nonzero values of that key in the row (0 if none), and shuffled
            only among rows of equal group. As in Grain, a packed feature's row is read
            whole (its padding included: a nonzero `pad_value` counts as a value), a
            table's row only over the row's sequences. Rows of one task or source thus
            sit together in a batch. The mean is taken in float32 (Grain: float64), so
            two groups closer than float32 can tell apart may tie.
        max_segments: the former name of `max_sequences_per_row` (give one of the two).

    Returns:
        A `Batcher` with a bulk `feed` for every option (batches and `Stats` identical to
        stepping; rows of the buffer past their fills may differ, as `FeedFn` allows).
        Every mid-stream batch has all `num_rows` rows in use, so `batch_all`'s default room
        (`ceil(n / num_rows)` batches) and `iterate`'s default are enough.

    Raises:
        ValueError: at the factory, an argument of the wrong type or value (named); at
            `init`, a key of `lengths` missing from the element, a packed feature that is not
            an array of rank >= 1, a length that is not an integer scalar, an output key
            (`k_segment_ids`, `k_positions`) that the element already has, or a
            `pad_value` a leaf cannot hold.
        TypeError: at `init`, an element that is not a dict or carries an `Element.state`
            or `Element.metadata` (put per-sequence values in `data`: they become tables);
            at `step`, an element unlike the spec (naming the leaf).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.pack(4, 2, lengths={"x": "n"})
        >>> state = batcher.init({"x": jnp.zeros(4, jnp.int32), "n": jnp.int32(0)})
        >>> for n in (3, 2, 1, 3):
        ...     x = jnp.arange(4, dtype=jnp.int32) + 10 * n
        ...     state, emit = batcher.step(state, {"x": x, "n": jnp.int32(n)})
        ...     if emit.ready:
        ...         print(emit.batch.data["x"])
        ...         print(emit.batch.data["x_segment_ids"])
        [[30 31 32 10]
         [20 21  0  0]]
        [[1 1 1 2]
         [1 1 0 0]]
        >>> state, emit = batcher.flush(state)
        >>> emit.batch.data["x"], emit.batch.valid_mask
        (Array([[30, 31, 32,  0],
               [ 0,  0,  0,  0]], dtype=int32), Array([ True, False], dtype=bool))
        >>> emit.batch.data["n"]  # the per-segment table of the length key
        Array([[3, 0, 0, 0],
               [0, 0, 0, 0]], dtype=int32)

        A row length per packed feature (Grain's `length_struct`), as an encoder-decoder
        model's inputs and targets:

        >>> batcher = jb.pack({"inputs": 4, "targets": 2}, 1,
        ...                   lengths={"inputs": "n_in", "targets": "n_tg"})
        >>> elements = {"inputs": jnp.array([[1, 1, 0, 0], [2, 0, 0, 0], [3, 3, 3, 0]]),
        ...             "targets": jnp.array([[7, 0], [8, 0], [9, 9]]),
        ...             "n_in": jnp.array([2, 1, 3]), "n_tg": jnp.array([1, 1, 2])}
        >>> batches, count = jb.batch_all(batcher, elements)
        >>> batches.data["inputs"][:2, 0].tolist(), batches.data["targets"][:2, 0].tolist()
        ([[1, 1, 2, 0], [3, 3, 3, 0]], [[7, 8], [9, 9]])

        Rows shuffled, but those of one task together (Grain's `shuffle_bins_group_by_feature`):

        >>> import jax
        >>> batcher = jb.pack(2, 4, lengths={"x": "n"}, shuffle_rows=True,
        ...                   shuffle_rows_group_by="task")
        >>> elements = {"x": jnp.ones((4, 2), jnp.int32), "n": jnp.full(4, 2, jnp.int32),
        ...             "task": jnp.array([2, 1, 2, 1], jnp.int32)}
        >>> batches, count = jb.batch_all(batcher, elements, key=jax.random.key(0))
        >>> batches.data["task"][0, :, 0]  # each row holds one sequence; rows by task
        Array([1, 1, 2, 2], dtype=int32)
    """
    if not isinstance(row_length, Mapping):  # a mapping is checked against `lengths` below
        positive_int(row_length, "row_length")
    positive_int(num_rows, "num_rows")
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}, got {strategy!r}.")
    if too_long not in _TOO_LONG:
        raise ValueError(f"`too_long` must be one of {_TOO_LONG}, got {too_long!r}.")
    pads = _check_pads(pad_value)
    if max_segments is not None:  # the earlier name of `max_sequences_per_row`
        if max_sequences_per_row is not None:
            raise ValueError(
                "`max_segments` is the old name of `max_sequences_per_row`; pass one, got "
                f"both ({max_segments!r} and {max_sequences_per_row!r})."
            )
        max_sequences_per_row = max_segments
    if max_sequences_per_row is not None:
        positive_int(max_sequences_per_row, "max_sequences_per_row")
    if not isinstance(shuffle_rows, bool):
        raise ValueError(f"`shuffle_rows` must be a bool, got {shuffle_rows!r}.")
    if shuffle_rows_group_by is not None:
        if not isinstance(shuffle_rows_group_by, str):
            raise ValueError(
                "`shuffle_rows_group_by` must be a top-level key of the element (a str), got "
                f"{shuffle_rows_group_by!r}."
            )
        if not shuffle_rows:
            raise ValueError(
                "`shuffle_rows_group_by` orders the rows that `shuffle_rows=True` shuffles; "
                "pass `shuffle_rows=True` too (Grain ignores it without `shuffle_bins`)."
            )
    lengths_mapping(lengths)
    features = tuple(sorted(lengths))
    lengths = {k: lengths[k] for k in features}
    clash = sorted(set(features) & set(lengths.values()))
    if clash:
        raise ValueError(
            f"`lengths` uses {clash} both as a packed feature and as a length key; a length "
            "is a scalar per sequence, so give each packed feature its own length key."
        )
    limits = _row_lengths(row_length, features)  # each packed feature's row length
    if num_rows * sum(limits) > _INT32_MAX:
        raise ValueError(
            f"`num_rows` * `row_length` (summed over packed features) must be below 2**31 "
            f"(int32 counts), got {num_rows} * {sum(limits)}."
        )
    # Default: as many sequences as the longest row has tokens.
    max_segments = max(limits) if max_sequences_per_row is None else max_sequences_per_row
    aligns = _check_alignment(alignment, features, limits)
    num_features = len(features)
    all_tokens = num_rows * sum(limits)
    limit_of = dict(zip(features, limits))
    derived = {key for k in features for key in _output_keys(k)}

    def check_spec(spec: Element) -> dict[str, Any]:
        if spec.metadata is not None or jax.tree.leaves(spec.state):
            raise TypeError(
                "`pack` packs `Element.data` only, got an element with a `state` or "
                "`metadata`; move per-sequence values into `data` (each other key becomes "
                "a per-segment table)."
            )
        data = spec.data
        if not isinstance(data, Mapping):
            raise TypeError(f"`pack` needs the element's data to be a dict, got {data!r}.")
        missing = sorted({*features, *lengths.values()} - set(data))
        if missing:
            raise ValueError(
                f"`lengths` names keys {missing} that the element does not have (its keys "
                f"are {sorted(data)}); pass `lengths` as `{{feature: length_key}}` of "
                "top-level keys of the element's data."
            )
        taken = sorted(derived & set(data))
        if taken:
            raise ValueError(
                f"The element already has keys {taken}, which `pack` writes (the segment ids "
                "and positions of `lengths`' features); rename them."
            )
        for k in features:
            leaf = data[k]
            if not isinstance(leaf, jax.ShapeDtypeStruct) or len(leaf.shape) < 1:
                raise ValueError(
                    f"Packed feature `data['{k}']` (in `lengths`) must be an array "
                    f"`[max_len, ...]`, got {leaf!r}."
                )
            if leaf.shape[0] < 1:
                raise ValueError(f"Packed feature `data['{k}']` has max_len 0; it needs >= 1.")
        for key in set(lengths.values()):
            leaf = data[key]
            if (
                not isinstance(leaf, jax.ShapeDtypeStruct)
                or leaf.shape != ()
                or not jnp.issubdtype(leaf.dtype, jnp.integer)
            ):
                raise ValueError(
                    f"Length `data['{key}']` (in `lengths`) must be an integer scalar, got "
                    f"{leaf!r}."
                )
        if isinstance(pads, dict):
            unknown = sorted(set(pads) - set(data))
            if unknown:
                raise ValueError(
                    f"`pad_value` names keys {unknown} that the element does not have (its "
                    f"keys are {sorted(data)})."
                )
        for name, leaf in data.items():
            pad_value_fits(pad_of(name), Element(data={name: leaf}))
        if shuffle_rows_group_by is not None:
            leaf = data.get(shuffle_rows_group_by)
            if leaf is None or shuffle_rows_group_by in lengths.values():
                raise ValueError(
                    f"`shuffle_rows_group_by` {shuffle_rows_group_by!r} must be a packed "
                    "feature or a per-sequence key of the element (not a length key); its "
                    f"keys are {sorted(data)}."
                )
            if not isinstance(leaf, jax.ShapeDtypeStruct) or not (
                jnp.issubdtype(leaf.dtype, jnp.integer) or jnp.issubdtype(leaf.dtype, jnp.floating)
            ):
                raise ValueError(
                    f"`shuffle_rows_group_by`: `data[{shuffle_rows_group_by!r}]` must be one "
                    f"array of integers or floats, got {leaf!r}."
                )
        return data

    def pad_of(name: str) -> int | float:
        """The pad value of top-level key `name` (0 for segment ids and positions)."""
        if name in derived:
            return 0
        return pads.get(name, 0) if isinstance(pads, dict) else pads

    config = describe(
        "pack",
        row_length=row_length,
        num_rows=num_rows,
        lengths=lengths,
        strategy=strategy,
        too_long=too_long,
        pad_value=pad_value,
        max_sequences_per_row=max_segments,
        alignment=alignment,
        shuffle_rows=shuffle_rows,
        shuffle_rows_group_by=shuffle_rows_group_by,
    )

    def init_fn(element_spec: Any, key: Any = None) -> PackState:
        # Deterministic unless rows are shuffled.
        key = prng_key(key, "pack(..., shuffle_rows=True)") if shuffle_rows else None
        data = check_spec(spec_of(element_spec))
        buffer = {}
        for name, leaf in data.items():
            if name in lengths:
                shape = (num_rows, limit_of[name], *leaf.shape[1:])
                buffer[name] = jnp.full(shape, pad_of(name), leaf.dtype)
                for out in _output_keys(name):
                    buffer[out] = jnp.zeros((num_rows, limit_of[name]), jnp.int32)
            else:
                pad = pad_of(name)
                buffer[name] = jax.tree.map(
                    lambda s, pad=pad: jnp.full((num_rows, max_segments, *s.shape), pad, s.dtype),
                    leaf,
                )
        return PackState(
            data=buffer,
            fills=jnp.zeros((num_features, num_rows), jnp.int32),
            segments=jnp.zeros((num_rows,), jnp.int32),
            open_tokens=jnp.zeros((), jnp.int32),
            key=key,
            draws=jnp.zeros((), jnp.uint32) if shuffle_rows else None,
            stats=Stats.zeros(fingerprint(config, Element(data=data))),
            sequences=Counter.of(0),
            rows=Counter.of(0),
            tokens=Counter.of(0),
            padding_tokens=Counter.of(0),
            truncated=Counter.of(0),
            truncated_tokens=Counter.of(0),
            max_lens=tuple((k, data[k].shape[0]) for k in features),
        )

    def spec_from_state(state: PackState) -> Element:
        """The element spec `init` was given, rebuilt from the buffer shapes."""
        max_lens = dict(state.max_lens)
        data = {}
        for name, leaf in state.data.items():
            if name in derived:
                continue
            if name in max_lens:
                data[name] = jax.ShapeDtypeStruct((max_lens[name], *leaf.shape[2:]), leaf.dtype)
            else:
                data[name] = jax.tree.map(
                    lambda x: jax.ShapeDtypeStruct(x.shape[2:], x.dtype), leaf
                )
        return Element(data=data)

    def read_lengths(data: dict, max_lens: dict[str, int]) -> tuple[Array, Array]:
        """The lengths `[num_features]` as given (checked) and as placed (maybe cut)."""
        out_of_range = jnp.zeros((), bool)
        for k in features:
            # Checked in the length's own dtype, so a huge uint or int64 cannot wrap to fit.
            raw = data[lengths[k]]
            limit = min(max_lens[k], int(jnp.iinfo(raw.dtype).max))
            too_big = raw > jnp.asarray(limit, raw.dtype)
            out_of_range = out_of_range | too_big | (raw < jnp.zeros((), raw.dtype))
        given = jnp.stack([data[lengths[k]].astype(jnp.int32) for k in features])
        given = eqx.error_if(
            given,
            jnp.any(out_of_range),
            "`pack`: a sequence length is negative or larger than its feature's max_len "
            f"(max_lens {dict(max_lens)}).",
        )
        limit = jnp.asarray(limits, jnp.int32)
        if too_long == "error":
            given = eqx.error_if(
                given,
                jnp.any(given > limit),
                f"`pack`: a sequence is longer than `row_length`={row_length!r}; truncate it "
                "first or pass `too_long='truncate'`.",
            )
        return given, jnp.minimum(given, limit)

    def decide(
        fills: Array, segments: Array, tokens: Array, given: Array, lens: Array
    ) -> tuple[Array, ...]:
        """Placement of one sequence, on scalars only (shared by `step` and `feed`).

        Returns `(full, skip, row, offsets, slot, fills, segments, tokens)`: whether the
        rows are emitted first, whether the sequence is skipped (all lengths 0), its row,
        its offset per feature, its segment index in the row (id `slot + 1`), and the
        fills, segment counts and real tokens after it.
        """
        skip = jnp.all(given == 0)

        def fitting(fills, segments):
            limit = jnp.asarray(limits, jnp.int32)[:, None]
            fit = jnp.all(fills + lens[:, None] <= limit, axis=0)
            return fit & (segments < max_segments)

        full = ~jnp.any(fitting(fills, segments)) & ~skip
        fills = jnp.where(full, 0, fills)
        segments = jnp.where(full, 0, segments)
        tokens = jnp.where(full, 0, tokens)
        fit = fitting(fills, segments)
        if strategy == "first_fit":
            row = jnp.argmax(fit)
        else:  # fullest row (fills summed over features, as Grain), earliest on a tie
            row = jnp.argmax(jnp.where(fit, jnp.sum(fills, axis=0, dtype=jnp.int32), -1))
        offsets, slot = fills[:, row], segments[row]
        place = ~skip
        # Grain's `pack_alignment_struct`: the next sequence starts at a multiple of the
        # feature's alignment (the end may pass `row_length`: the row is then closed).
        align = jnp.asarray(aligns, jnp.int32)
        end = (offsets + lens + align - 1) // align * align
        fills = fills.at[:, row].set(jnp.where(place, end, offsets))
        segments = segments.at[row].add(place.astype(jnp.int32))
        tokens = tokens + jnp.where(place, jnp.sum(lens, dtype=jnp.int32), 0)
        return full, skip, row, offsets, slot, fills, segments, tokens

    def emission(tokens: Array, segments: Array, ready: Array) -> dict[str, Array]:
        """What emitting rows with these sequences and real tokens counts (zero unless
        `ready`)."""
        used = segments > 0
        filled = tokens
        counts = {
            "sequences": jnp.sum(segments, dtype=jnp.int32),
            "rows": jnp.sum(used, dtype=jnp.int32),
            "tokens": filled,
            "padding_tokens": all_tokens - filled,
            "padded": jnp.sum(~used, dtype=jnp.int32),
        }
        return {k: jnp.where(ready, v, 0) for k, v in counts.items()}

    def advanced(
        state: PackState,
        data: PyTree,
        fills: Array,
        segments: Array,
        tokens: Array,
        *,
        accepted: Array,
        skipped: Array,
        batches: Array,
        emitted: dict[str, Array | Counter],
        cut: Array,
    ) -> PackState:
        stats = state.stats.add(
            accepted=accepted,
            skipped=skipped,
            emitted=emitted["sequences"],
            batches=batches,
            padded=emitted["padded"],
        )
        return PackState(
            data=data,
            fills=fills,
            segments=segments,
            open_tokens=tokens,
            key=state.key,
            draws=None if state.draws is None else state.draws + batches.astype(jnp.uint32),
            stats=stats,
            sequences=state.sequences.add(emitted["sequences"]),
            rows=state.rows.add(emitted["rows"]),
            tokens=state.tokens.add(emitted["tokens"]),
            padding_tokens=state.padding_tokens.add(emitted["padding_tokens"]),
            truncated=state.truncated.add(jnp.sum(jnp.any(cut > 0, axis=-1).astype(jnp.int32))),
            truncated_tokens=state.truncated_tokens.add(Counter.total(cut)),
            max_lens=state.max_lens,
        )

    def step_fn(state: PackState, element: Any) -> tuple[PackState, Emit]:
        check_state(state, PackState, config)
        element = as_element(element)
        check_against_spec(spec_from_state(state), element, what="element")
        data = element.data
        given, lens = read_lengths(data, dict(state.max_lens))
        full, skip, row, offsets, slot, fills, segments, open_tokens = decide(
            state.fills, state.segments, state.open_tokens, given, lens
        )

        buffer = dict(state.data)
        for f, k in enumerate(features):
            # The position of each slot within the new sequence.
            at = jnp.arange(limits[f], dtype=jnp.int32) - offsets[f]
            before, inside = at < 0, (at >= 0) & (at < lens[f])
            x = data[k]
            shifted = jnp.take(x, jnp.clip(at, 0, x.shape[0] - 1), axis=0)
            old = buffer[k][row]
            pad = jnp.asarray(pad_of(k), x.dtype)
            tokens = jnp.where(
                rows_mask(before, old), old, jnp.where(rows_mask(inside, shifted), shifted, pad)
            )
            seg_key, pos_key = _output_keys(k)
            zero = jnp.zeros((), jnp.int32)
            segment_ids = jnp.where(before, buffer[seg_key][row], jnp.where(inside, slot + 1, zero))
            positions = jnp.where(before, buffer[pos_key][row], jnp.where(inside, at, zero))
            for name, new in ((k, tokens), (seg_key, segment_ids), (pos_key, positions)):
                buffer[name] = jax.lax.dynamic_update_index_in_dim(buffer[name], new, row, 0)
        entry = jnp.arange(max_segments, dtype=jnp.int32)
        for name in tables(buffer):

            def write_table(table, value, name=name):
                old = table[row]
                keep, put = entry < slot, (entry == slot) & ~skip
                pad = jnp.asarray(pad_of(name), table.dtype)
                new = jnp.where(
                    rows_mask(keep, old), old, jnp.where(rows_mask(put, old), value[None], pad)
                )
                return jax.lax.dynamic_update_index_in_dim(table, new, row, 0)

            buffer[name] = jax.tree.map(write_table, buffer[name], data[name])

        batch = Batch(data=state.data, valid_mask=(state.segments > 0) & full)
        if shuffle_rows:  # the gather only when a batch goes out
            batch = jax.lax.cond(full, lambda b: shuffled(state, b, 0), lambda b: b, batch)
        new_state = advanced(
            state,
            buffer,
            fills,
            segments,
            open_tokens,
            accepted=~skip,
            skipped=skip,
            batches=full,
            emitted=emission(state.open_tokens, state.segments, full),
            cut=given - lens,
        )
        return new_state, Emit(batch, full)

    def flush_fn(state: PackState) -> tuple[PackState, Emit]:
        check_state(state, PackState, config)
        used = state.segments > 0
        ready = jnp.any(used)

        def clean(name: str, leaf: Array) -> Array:
            pad = jnp.asarray(pad_of(name), leaf.dtype)
            return jnp.where(rows_mask(used, leaf), leaf, pad)

        data = {
            name: jax.tree.map(lambda x, name=name: clean(name, x), tree)
            for name, tree in state.data.items()
        }
        no = jnp.zeros((), jnp.int32)
        new_state = advanced(
            state,
            state.data,
            jnp.zeros_like(state.fills),
            jnp.zeros_like(state.segments),
            jnp.zeros_like(state.open_tokens),
            accepted=no,
            skipped=no,
            batches=ready,
            emitted=emission(state.open_tokens, state.segments, ready),
            cut=jnp.zeros((num_features,), jnp.int32),
        )
        batch = Batch(data=data, valid_mask=used)
        if shuffle_rows:
            batch = shuffled(state, batch, 0)
        return new_state, Emit(batch, ready)

    def shuffled(state: PackState, batch: Batch, k: Any) -> Batch:
        """Grain's `shuffle_bins`: the used rows of the `k`-th batch emitted from `state`
        in a random order drawn from `fold_in(key, batch number)`; padding rows stay last."""
        number = state.draws + jnp.asarray(k, jnp.uint32)
        perm = jax.random.permutation(jax.random.fold_in(state.key, number), num_rows)
        rank = jnp.where(batch.valid_mask, perm, num_rows + jnp.arange(num_rows, dtype=jnp.int32))
        if shuffle_rows_group_by is None:
            order = jnp.argsort(rank)
        else:  # Grain's `shuffle_bins_group_by_feature`: by group, then the random rank
            group = row_groups(batch.data, shuffle_rows_group_by)
            order = jnp.lexsort((rank, group, ~batch.valid_mask))
        return Batch(
            data=jax.tree.map(lambda x: x[order], batch.data),
            valid_mask=batch.valid_mask[order],
        )

    def row_groups(data: dict, name: str) -> Array:
        """Per row, the mean of the distinct nonzero values of `data[name]` in it (0 if
        none): a packed feature's whole row, or a table's entries of the row's sequences."""
        values = data[name].reshape(num_rows, -1)
        if values.shape[1] == 0:
            return jnp.zeros((num_rows,), jnp.float32)
        if name in lengths:
            used = jnp.full(values.shape, values.shape[1])
        else:  # a table row: its first `segments` entries, read off the segment ids
            ids = [data[_output_keys(f)[0]] for f in features]
            segments = jnp.max(jnp.stack([jnp.max(i, axis=1) for i in ids]), axis=0)
            per_entry = values.shape[1] // max_segments
            used = jnp.broadcast_to(segments[:, None] * per_entry, values.shape)
        # Entries past `used` sort last, so the first `used` sorted entries are the row's.
        top = jnp.asarray(
            jnp.finfo(values.dtype).max
            if jnp.issubdtype(values.dtype, jnp.floating)
            else jnp.iinfo(values.dtype).max,
            values.dtype,
        )
        slot = jnp.arange(values.shape[1], dtype=jnp.int32)[None, :]
        ordered = jnp.sort(jnp.where(slot < used, values, top), axis=1)
        new = jnp.concatenate(
            [jnp.ones((num_rows, 1), bool), ordered[:, 1:] != ordered[:, :-1]], axis=1
        )
        distinct = new & (slot < used) & (ordered != 0)
        total = jnp.sum(jnp.where(distinct, ordered.astype(jnp.float32), 0.0), axis=1)
        count = jnp.sum(distinct, axis=1, dtype=jnp.float32)
        return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

    def tables(buffer: dict) -> list[str]:
        return [name for name in buffer if name not in lengths and name not in derived]

    def feed_fn(
        state: PackState, elements: Any, flush: bool = False
    ) -> tuple[PackState, Emissions]:
        check_state(state, PackState, config)
        elements = as_element(elements)
        check_against_spec(spec_from_state(state), row_spec(elements), what="elements[i]")
        data = elements.data
        n = jnp.shape(data[features[0]])[0]
        max_lens = dict(state.max_lens)
        length_keys = sorted(set(lengths.values()))
        if n:
            given, lens = jax.vmap(lambda d: read_lengths(d, max_lens))(
                {key: data[key] for key in length_keys}
            )
        else:
            given = lens = jnp.zeros((0, num_features), jnp.int32)

        # The plan, on scalars: the step's placement decision for every sequence in turn.
        def plan(carry, x):
            fills, segments, tokens = carry
            full, skip, row, offsets, slot, *new = decide(fills, segments, tokens, *x)
            counts = emission(tokens, segments, full)
            return tuple(new), (full, skip, row, offsets, slot, counts)

        (fills, segments, open_tokens), (full, skip, row, offsets, slot, counts) = jax.lax.scan(
            plan, (state.fills, state.segments, state.open_tokens), (given, lens)
        )
        group = jnp.cumsum(full.astype(jnp.int32))  # the batch each sequence goes into
        whole = group[-1] if n else jnp.zeros((), jnp.int32)  # batches emitted mid-stream
        tail = jnp.array(flush) & jnp.any(segments > 0)
        count = whole + tail.astype(jnp.int32)
        # The placed sequences, compacted in order: those of batch `k` are contiguous.
        placed = ~skip
        order = jnp.cumsum(placed.astype(jnp.int32)) - 1
        at = jnp.where(placed, order, n)  # index `n`: dropped by the scatters
        big = jnp.iinfo(jnp.int32).max

        size = max(n, 1)  # one spare entry, so that an empty chunk still indexes

        def compact(values, fill):
            out = jnp.full((size, *values.shape[1:]), fill, values.dtype)
            return out.at[at].set(values, mode="drop")

        c_elem = compact(jnp.arange(n, dtype=jnp.int32), 0)
        c_group = compact(group, big)
        c_row, c_slot = compact(row.astype(jnp.int32), 0), compact(slot, 0)
        c_offsets, c_lens = compact(offsets, 0), compact(lens, 0)
        window = min(num_rows * max_segments, size)
        fill0, segments0 = state.fills, state.segments

        def build(k):
            """Batch `k`'s data and its used rows: batch 0 continues the state's rows."""
            first = k == 0
            start = jnp.searchsorted(c_group, k, side="left").astype(jnp.int32)
            q = jnp.clip(start + jnp.arange(window, dtype=jnp.int32), 0, max(n - 1, 0))
            mine = (c_group[q] == k) & (start + jnp.arange(window, dtype=jnp.int32) < n)
            target = (jnp.where(mine, c_row[q], num_rows), c_slot[q])
            # Window entry of each (row, segment slot), -1 where no new sequence.
            entry = jnp.full((num_rows, max_segments), -1, jnp.int32)
            entry = entry.at[target].set(jnp.arange(window, dtype=jnp.int32), mode="drop")
            present = entry >= 0
            w = jnp.maximum(entry, 0)
            elem = c_elem[q][w]  # [rows, segments]
            old_segment = first & (
                jnp.arange(max_segments, dtype=jnp.int32)[None, :] < segments0[:, None]
            )
            out = {}
            for f, key in enumerate(features):
                row_len = limits[f]
                position = jnp.arange(row_len, dtype=jnp.int32)[None, :]
                off, length = c_offsets[q][w][..., f], c_lens[q][w][..., f]
                # The segment covering each position: the last one starting at or before it.
                marks = jnp.zeros((num_rows, row_len + 1), jnp.int32)
                rows_index = jnp.broadcast_to(
                    jnp.arange(num_rows, dtype=jnp.int32)[:, None], off.shape
                )
                ids = jnp.broadcast_to(jnp.arange(1, max_segments + 1, dtype=jnp.int32), off.shape)
                marks = marks.at[jnp.where(present, rows_index, num_rows), off].max(
                    ids, mode="drop"
                )
                seg = jax.lax.cummax(marks[:, :row_len], axis=1)
                s = jnp.maximum(seg - 1, 0)
                start_at = jnp.take_along_axis(off, s, axis=1)
                inside = (seg > 0) & (position < start_at + jnp.take_along_axis(length, s, axis=1))
                source = jnp.take_along_axis(elem, s, axis=1)
                x = data[key]
                src = jnp.clip(position - start_at, 0, x.shape[1] - 1)
                tokens = (
                    x[source, src] if n else jnp.zeros((num_rows, row_len, *x.shape[2:]), x.dtype)
                )
                old = first & (position < fill0[f][:, None])
                seg_key, pos_key = _output_keys(key)
                zero, pad = jnp.zeros((), jnp.int32), jnp.asarray(pad_of(key), x.dtype)
                new_tokens = jnp.where(rows_mask_2d(inside, tokens), tokens, pad)
                out[key] = jnp.where(rows_mask_2d(old, tokens), state.data[key], new_tokens)
                out[seg_key] = jnp.where(old, state.data[seg_key], jnp.where(inside, seg, zero))
                out[pos_key] = jnp.where(
                    old, state.data[pos_key], jnp.where(inside, position - start_at, zero)
                )
            for name in tables(state.data):

                def table(buf, x, name=name):
                    new = x[elem] if n else jnp.zeros(buf.shape, buf.dtype)
                    pad = jnp.asarray(pad_of(name), buf.dtype)
                    new = jnp.where(rows_mask_2d(present, new), new, pad)
                    return jnp.where(rows_mask_2d(old_segment, new), buf, new)

                out[name] = jax.tree.map(table, state.data[name], data[name])
            used = jnp.any(present, axis=1) | (first & (segments0 > 0))
            return out, used

        def batch_fn(k):
            out, used = build(k)
            batch = Batch(data=out, valid_mask=used & (k < count))
            return shuffled(state, batch, k) if shuffle_rows else batch

        at_end = emission(open_tokens, segments, tail)  # what a final flush emits
        # Summed into 64-bit counters: a chunk's padding tokens can pass 2**32.
        emitted = {name: Counter.total(counts[name]).add(at_end[name]) for name in at_end}
        buffer, _ = build(whole)
        cut = given - lens
        new_state = advanced(
            state,
            buffer,
            jnp.where(flush, 0, fills),
            jnp.where(flush, 0, segments),
            jnp.where(flush, 0, open_tokens),
            accepted=jnp.sum(placed.astype(jnp.int32)),
            skipped=jnp.sum(skip.astype(jnp.int32)),
            batches=count,
            emitted=emitted,
            cut=cut,
        )
        return new_state, Emissions(count=count, batch=batch_fn)

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed_fn)


def rows_mask_2d(mask: Array, leaf: Array) -> Array:
    """`mask` `[a, b]` reshaped to broadcast against `leaf` `[a, b, ...]`."""
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(leaf) - 2))

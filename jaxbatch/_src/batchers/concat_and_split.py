"""`concat_and_split`: concatenate sequences into one token stream, cut it into full rows.

Data flow. An element is a dict: for every packed feature `k`, a leaf `[max_len, *rest]`
whose first `data[lengths[k]]` entries are the sequence, and the length leaves. The state
holds, per packed feature, a flat token buffer of `num_rows * row_length + max_len` slots
and its segment-id and position buffers; every slot past the write frontier holds padding
(the pad value, segment 0, position 0), so padding is never written separately. Every other
key of the element (a meta feature, one value per sequence) has a per-piece table in the
state, `[table_rows, width, ...]`, row `j` covering buffer slots `[j * row_length, (j + 1) *
row_length)`; entries past the frontier hold the pad value too.

`step` plans on scalars only (the open row, each feature's fill of it, the lengths): the
part of the sequence that fits in the open row, and the rest, contiguous from the start of
the next row on. It writes each part with one `dynamic_update_slice` per buffer (the
slab's tail is padding written over padding), and each meta feature with one scatter of at
most `1 + ceil(max_len / row_length)` entries (the first piece's slot in the open row, slot
0 of every further row; unused entries are out of range and dropped). Once the open row
moves past the last row, the first `num_rows * row_length` slots (`num_rows` table rows) are
a batch: they are emitted and, under `lax.cond`, the buffers and tables shift left by that
much, the overflow becoming the start of the next batch. `flush` emits the open batch, its
empty rows masked off, and resets the buffers and tables.

Rows follow Grain 0.2.18's `ConcatThenSplitIterDataset` (default
`split_full_length_features=True`, read in its source and compared in the tests):

* One packed feature: the concatenated stream cut every `row_length` tokens. A piece of a
  sequence cut at a row's end continues at the start of the next row, with positions
  restarting at 0 (`continue_positions=True` continues them) and segment ids restarting at
  1 in every row.
* Several packed features share the rows, and each sequence is one segment id in all of
  them: a sequence puts into the open row, feature by feature, as many tokens as fit; if
  any feature does not fit, the row closes and the rest of every feature goes on in the
  next rows (a feature that ran out has no tokens there, but the piece still takes segment
  id 1, so the next sequence is segment 2, as in Grain). A row also closes as soon as every
  feature fills it. Grain re-reads tokens (a bug) when a sequence's rest itself spans more
  than one row while another feature's rest fits; this batcher does not.

Grain's options: `split_full_length_features=False` makes a sequence that has a feature
of exactly `row_length` tokens (none longer) a row of its own, unsplit. Grain emits it
after the row that was open when it arrived (holding it back until that row closes, which
needs unbounded buffering); here it takes the open row's place and the open row, still
filling, moves one row on: the same rows, such a row possibly earlier. BOS handling
(`bos_handling="replace_first_token_with_bos"`, `bos_features`, `bos_token_id`) replaces
the token at every position 0 of those features: the first token of every piece, as
Grain does (each piece starts a sequence for the model; with `continue_positions=True`,
only a sequence's very first token). Grain also writes a BOS for a piece that is empty in
a feature, into that row's padding (a bug); this batcher does not.

Grain's `meta_features` (never split; the whole value is copied into every row the sequence
spans; no segment ids or positions) are the element's other keys here, each a per-piece
table: entry `[j, s - 1]` holds the value of the sequence whose piece has segment id `s` in
row `j`. Grain concatenates a row's meta values into a buffer of the feature's own length
`L_m` and, when a sequence's value no longer fits, closes the row (padded) and starts the
sequence in the next one. For a value of fixed shape `[k, ...]` (a scalar counts as `k =
1`) that is a cap of `L_m // k` pieces per row: with `max_sequences_per_row=L_m // k` the
rows are Grain's, and a table row, its first two axes merged (a scalar's: the row itself),
is Grain's meta row. Grain pads with zeros (take `pad_value=0`), and when `k` does not
divide `L_m` its row has `L_m % k` more padding slots at the end. A piece that would put no
token of any feature into the open row (the row is full in every feature the sequence has)
is not placed there and has no entry there, as in Grain.

Differences from Grain, by design: a sequence that is empty in every feature is skipped
(counted in `stats.skipped`; Grain gives it a segment id with no tokens, a gap in the ids
that changes no attention mask, and a meta entry in its row), and meta values have a fixed
shape (Grain's may vary in their first axis).

`row_length` may differ per packed feature (Grain's `length_struct`, e.g. `{"inputs": 8,
"targets": 4}`): every `row_length` above is then the feature's own, a row is a row of each
feature side by side, and a sequence's rest takes, in each further row, up to a row of each
feature (so it spans as many rows as its feature that needs the most).
"""

from collections.abc import Iterable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PyTree

from ..base import Batcher, Counter, Emit, Stats, check_state, describe, fingerprint
from ..batch import Batch, rows_mask
from ..element import Element, as_element
from ..spec import check_against_spec, element_spec as spec_of
from ._checks import (
    clamp_to_int32,
    pad_number,
    pad_value_fits,
    positive_int,
    row_lengths as _row_lengths,
)


class ConcatAndSplitState(eqx.Module):
    """State of `concat_and_split`.

    Every dict is keyed by packed feature name, except `length_like` (by length key) and
    `tables` (by meta feature: every other key of the element).

    Attributes:
        buffer: per feature `[num_rows * row_length + max_len, *rest]`: the open batch's
            tokens, row after row, then room for a sequence's overflow into the next batch.
            Slots past the write frontier hold `pad_value`.
        segment_ids: per feature, int32 `[num_rows * row_length + max_len]`, 0 on padding.
        positions: per feature, int32, like `segment_ids`.
        length_like: a zero of each length leaf's dtype (with `buffer` and `tables`, the
            element spec).
        tables: per meta feature, its value's pytree with each leaf `[table_rows, width,
            *shape]`: entry `[j, s - 1]` is the value of the sequence whose piece has
            segment id `s` in row `j` of the buffers (slots `[j * row_length, (j + 1) *
            row_length)`). `table_rows` covers the longest buffer; `width` is
            `max_sequences_per_row`, or the row lengths summed without one. Entries
            past the write frontier hold `pad_value`.
        row: the open row of the batch, in `[0, num_rows)` between calls.
        fill: per feature, tokens in the open row, in `[0, row_length]`.
        segments: sequence pieces in the open row (its last segment id; 0 when empty).
        pending: sequences whose last token is in the open batch (not yet emitted).
        stats: the counters (see `Stats`), counted in sequences: `accepted` sequences
            taken in, `skipped` sequences empty in every feature, `emitted` sequences whose
            last token has been emitted in a ready batch, `padded` padding rows.
            `accepted == emitted + pending` (nothing is dropped).
        tokens: per feature, tokens taken in.
        padding_tokens: per feature, padding slots in emitted batches.
    """

    buffer: dict[str, Array]
    segment_ids: dict[str, Int[Array, " _slots"]]
    positions: dict[str, Int[Array, " _slots"]]
    length_like: dict[str, Array]
    tables: dict[str, PyTree]
    row: Int[Array, ""]
    fill: dict[str, Int[Array, ""]]
    segments: Int[Array, ""]
    pending: Int[Array, ""]
    stats: Stats
    tokens: dict[str, Counter]
    padding_tokens: dict[str, Counter]


def _write(buf: Array, parts: tuple, masks: tuple, starts: tuple, fill: Array) -> Array:
    """`buf` with each part written at its start, its rows outside its mask as `fill`.

    The slabs are written in order; a later slab overwrites the earlier one's tail (which is
    `fill` there, written over slots that already hold `fill`).
    """
    for part, mask, start in zip(parts, masks, starts):
        part = jnp.where(rows_mask(mask, part), part, fill)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, part, start, 0)
    return buf


def rows_mask_2d(mask: Array, leaf: Array) -> Array:
    """`mask` `[a, b]` reshaped to broadcast against `leaf` `[a, b, ...]`."""
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(leaf) - 2))


_BOS = ("do_nothing", "replace_first_token_with_bos")


def _check_bos(handling: Any, bos_features: Any, token: Any, lengths: dict) -> frozenset:
    """Grain's BOS options, validated as Grain does; the features that get a BOS."""
    name = getattr(handling, "name", handling)  # also Grain's own `BOSHandling` enum
    name = name.lower() if isinstance(name, str) else name
    if name not in _BOS:
        raise ValueError(f"`bos_handling` must be one of {_BOS}, got {handling!r}.")
    if (
        isinstance(bos_features, str)
        or not isinstance(bos_features, Iterable)
        or not all(isinstance(k, str) for k in bos_features)
    ):
        raise ValueError(
            "`bos_features` must be a collection of packed feature names (str), e.g. "
            f"`('tokens',)`, or `()` for none; got {bos_features!r}."
        )
    unknown = sorted(set(bos_features) - set(lengths))
    if unknown:
        raise ValueError(f"`bos_features` {unknown} are not packed features (keys of `lengths`).")
    if name == "do_nothing":
        if token is not None or bos_features:
            raise ValueError(
                "`bos_handling` is 'do_nothing' (no BOS), so `bos_token_id` and `bos_features` "
                f"must be left unset, got {token!r} and {bos_features!r}."
            )
        return frozenset()
    if isinstance(token, bool) or not isinstance(token, int):
        raise ValueError(
            f"`bos_token_id` must be an int when `bos_handling={name!r}`, got {token!r}."
        )
    return frozenset(bos_features)


def _check_lengths(lengths: Any) -> dict[str, str]:
    if not isinstance(lengths, Mapping) or not lengths:
        raise ValueError(
            f"`lengths` must be a non-empty dict `{{packed_feature: length_key}}`, got {lengths!r}."
        )
    for key, length_key in lengths.items():
        if not isinstance(key, str) or not isinstance(length_key, str):
            raise ValueError(
                f"`lengths` maps feature names to length key names (str to str), got "
                f"{key!r}: {length_key!r}."
            )
    both = sorted(set(lengths) & set(lengths.values()))
    if both:
        raise ValueError(
            f"`lengths`: {both} are both packed features and length keys; a key is one or "
            "the other."
        )
    outputs = {f"{k}{suffix}" for k in lengths for suffix in ("_segment_ids", "_positions")}
    clash = sorted(outputs & set(lengths))
    if clash:
        raise ValueError(
            f"`lengths`: packed features {clash} have the names of the `_segment_ids` / "
            "`_positions` outputs of other packed features; rename them."
        )
    return dict(lengths)


# Configuration arguments are `Any`: they are validated below, so a bad value raises the
# documented `ValueError` even under a run-time type checker (jaxtyping's import hook).
def concat_and_split(
    row_length: Any,
    num_rows: Any,
    *,
    lengths: Any,
    pad_value: Any = 0,
    max_sequences_per_row: Any = None,
    continue_positions: Any = False,
    split_full_length_features: Any = True,
    bos_handling: Any = "do_nothing",
    bos_features: Any = (),
    bos_token_id: Any = None,
) -> Batcher:
    """Concatenate sequences and cut the stream into full rows of `row_length` tokens.

    Each element is a dict. `lengths` maps each packed feature `k` to the key of its length:
    `data[k]` is `[max_len, *rest]` and its first `data[lengths[k]]` (a scalar int) entries
    are the sequence. Every other key is a meta feature: one value per sequence (an array
    or a pytree of arrays, of fixed shape), never split. A sequence cut at a row's end
    continues in the next row. A batch of `num_rows` rows is emitted the step its last row
    closes; `flush` emits the open batch, rows without tokens masked off (the only
    padding). Rows match Grain's `ConcatThenSplitIterDataset` (see the module docstring,
    also for several features and for Grain's `meta_features`).

    Emitted `Batch.data`, for every packed feature `k`: `k` `[num_rows, row_length,
    *rest]`, `k_segment_ids` int32 `[num_rows, row_length]` (1, 2, 3... per sequence
    piece, restarting at 1 in every row, 0 on padding) and `k_positions` int32 (position in
    the piece, 0 on padding). Every meta feature `m` becomes a per-piece table `[num_rows,
    width, *shape]` (each leaf of its pytree), `width` being `max_sequences_per_row` or, by
    default, the row lengths summed over the packed features (a row cannot hold more
    pieces): entry `[j, s -
    1]` is the value of the sequence whose piece has segment id `s` in row `j`, so a
    sequence's value is copied into every row it spans; unused entries hold `pad_value`.
    The length keys are not in the output. `valid_mask[i]` is True when row `i` holds a
    token.

    Args:
        row_length: tokens per row, a positive int (for every packed feature), or a dict
            `{packed_feature: positive int}` naming every key of `lengths` (Grain's
            `length_struct`; each feature's rows are then of its own length).
        num_rows: rows per batch, a positive int. Every `max_len` must be at most
            `row_length * num_rows` (its feature's; so that a step completes at most one
            batch).
        lengths: `{packed_feature: length_key}`; the element must have these features and
            length keys (several features may share a length key); its other keys are
            meta features.
        pad_value: fill for padding tokens and unused table entries, cast to each leaf's
            dtype; `init` raises `ValueError` if an integer or bool leaf cannot hold it
            exactly.
        max_sequences_per_row: sequence pieces per row at most, a positive int (default
            None: no cap). A row holding that many closes at once, as if full, so the next
            sequence starts in the next row. It sets the tables' width. Grain's
            `meta_features` with length `L_m` and values of shape `[k, ...]` (a scalar: `k
            = 1`) are this cap with `L_m // k`. Useful without meta features too, e.g. for
            an attention kernel's limit on segments per row.
        continue_positions: positions continue across a cut (a piece in the next row starts
            where the previous piece stopped) instead of restarting at 0 as Grain's do.
        split_full_length_features: Grain's option: False passes a sequence with a
            feature of exactly `row_length` tokens (none longer) through as a row of its
            own (see the module docstring for the row order).
        bos_handling: `"do_nothing"` (default) or `"replace_first_token_with_bos"` (Grain's
            `BOSHandling` members are accepted too).
        bos_features: packed features whose token at every position 0 becomes the BOS.
        bos_token_id: the BOS token, an int (set it exactly when BOS handling is on).

    Returns:
        A `Batcher` without a bulk `feed` (the drivers step it element by element).

    Raises:
        ValueError: at the factory for a bad argument; at `init` for an element spec the
            configuration does not fit (missing keys, a key named like an output
            `k_segment_ids` / `k_positions`, shapes, a `pad_value` a leaf cannot hold,
            per-element `state`/`metadata`). A length outside `[0, max_len]` is a run-time
            error (`eqx.error_if`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> batcher = jb.concat_and_split(4, 1, lengths={"x": "n"})
        >>> state = batcher.init({"x": jnp.zeros(4, jnp.int32), "n": jnp.int32(0)})
        >>> for seq in ([1, 2, 3], [4, 5, 6, 7], [8, 9]):
        ...     x = jnp.zeros(4, jnp.int32).at[: len(seq)].set(jnp.array(seq, jnp.int32))
        ...     state, emit = batcher.step(state, {"x": x, "n": jnp.int32(len(seq))})
        ...     if emit.ready:
        ...         data = emit.batch.data
        ...         print(data["x"], data["x_segment_ids"], data["x_positions"])
        [[1 2 3 4]] [[1 1 1 2]] [[0 1 2 0]]
        [[5 6 7 8]] [[1 1 1 2]] [[0 1 2 0]]
        >>> state, emit = batcher.flush(state)
        >>> emit.batch.data["x"], emit.batch.data["x_segment_ids"]
        (Array([[9, 0, 0, 0]], dtype=int32), Array([[1, 0, 0, 0]], dtype=int32))

        A row length per packed feature (Grain's `length_struct`): rows of 4 `inputs` beside
        2 `targets`; the second sequence's rest goes on in the next row in both:

        >>> batcher = jb.concat_and_split({"inputs": 4, "targets": 2}, 1,
        ...                               lengths={"inputs": "n_in", "targets": "n_tg"})
        >>> elements = {"inputs": jnp.array([[1, 2, 3], [4, 5, 0]]),
        ...             "targets": jnp.array([[7, 0], [8, 9]]),
        ...             "n_in": jnp.array([3, 2]), "n_tg": jnp.array([1, 2])}
        >>> batches, count = jb.batch_all(batcher, elements)
        >>> batches.data["inputs"][:2, 0].tolist(), batches.data["targets"][:2, 0].tolist()
        ([[1, 2, 3, 4], [5, 0, 0, 0]], [[7, 8], [9, 0]])
        >>> batches.data["targets_segment_ids"][:2, 0].tolist()
        [[1, 2], [1, 0]]

        A meta feature `"src"` (one int per sequence), at most two pieces per row:

        >>> batcher = jb.concat_and_split(4, 2, lengths={"x": "n"}, max_sequences_per_row=2)
        >>> spec = {"x": jnp.zeros(5, jnp.int32), "n": jnp.int32(0), "src": jnp.int32(0)}
        >>> state = batcher.init(spec)
        >>> for src, seq in enumerate(([1, 2, 3], [4, 5, 6, 7, 8], [9], [10], [11]), 1):
        ...     x = jnp.zeros(5, jnp.int32).at[: len(seq)].set(jnp.array(seq, jnp.int32))
        ...     element = {"x": x, "n": jnp.int32(len(seq)), "src": jnp.int32(src)}
        ...     state, emit = batcher.step(state, element)
        ...     if emit.ready:
        ...         print(emit.batch.data["x"].tolist(), emit.batch.data["src"].tolist())
        [[1, 2, 3, 4], [5, 6, 7, 8]] [[1, 2], [2, 0]]
        >>> state, emit = batcher.flush(state)
        >>> emit.batch.data["x"].tolist(), emit.batch.data["x_segment_ids"].tolist()
        ([[9, 10, 0, 0], [11, 0, 0, 0]], [[1, 2, 0, 0], [1, 0, 0, 0]])
        >>> emit.batch.data["src"].tolist()  # [row, segment id - 1]
        [[3, 4], [5, 0]]
    """
    if not isinstance(row_length, Mapping):  # a mapping is checked against `lengths` below
        positive_int(row_length, "row_length")
    num_rows = positive_int(num_rows, "num_rows")
    lengths = _check_lengths(lengths)
    pad_number(pad_value)
    cap = None
    if max_sequences_per_row is not None:
        cap = positive_int(max_sequences_per_row, "max_sequences_per_row")
    if not isinstance(continue_positions, bool):
        raise ValueError(f"`continue_positions` must be a bool, got {continue_positions!r}.")
    if not isinstance(split_full_length_features, bool):
        raise ValueError(
            f"`split_full_length_features` must be a bool, got {split_full_length_features!r}."
        )
    bos_features = _check_bos(bos_handling, bos_features, bos_token_id, lengths)
    features = sorted(lengths)
    # Each packed feature's row length (Grain's `length_struct`), token slots of one batch,
    # and room past the batch: a sequence's overflow (`max_len`), and with full-length
    # sequences passed through, the open row pushed one row on.
    limit = dict(zip(features, _row_lengths(row_length, features)))
    capacity = {k: limit[k] * num_rows for k in features}
    extra = {k: 0 if split_full_length_features else limit[k] for k in features}
    width = sum(limit.values()) if cap is None else cap  # table entries per row
    outputs = {f"{k}{suffix}" for k in features for suffix in ("_segment_ids", "_positions")}

    def fresh(
        key: str, max_len: int, rest: tuple[int, ...], dtype: Any
    ) -> tuple[Array, Array, Array]:
        size = capacity[key] + max_len + extra[key]
        # Segment ids and positions in their own buffers: the state can be donated to `jit`.
        ids, positions = jnp.zeros((size,), jnp.int32), jnp.zeros((size,), jnp.int32)
        return jnp.full((size, *rest), pad_value, dtype), ids, positions

    def metas_of(spec: Element) -> list:
        """The meta features: the element's keys neither packed nor lengths."""
        return [m for m in spec.data if m not in lengths and m not in lengths.values()]

    def check_spec(spec: Element) -> None:
        if jax.tree.leaves(spec.state) or spec.metadata is not None:
            raise ValueError(
                "`concat_and_split` mixes sequences within rows, so elements cannot carry a "
                "per-element `state` or `metadata`; move what you need into `data` (a key "
                "that is not packed is a meta feature), or drop it before batching."
            )
        if not isinstance(spec.data, Mapping):
            raise ValueError(
                f"`concat_and_split` needs elements whose data is a dict, got "
                f"{type(spec.data).__name__}."
            )
        missing = sorted((set(lengths) | set(lengths.values())) - set(spec.data))
        if missing:
            raise ValueError(
                f"`lengths` {lengths} does not fit the element: missing keys {missing}."
            )
        taken = sorted(outputs & set(spec.data))
        if taken:
            raise ValueError(
                f"The element has keys {taken}, which `concat_and_split` writes (the segment "
                "ids and positions of the packed features); rename them."
            )
        for key in features:
            leaf = spec.data[key]
            if len(leaf.shape) < 1 or not 1 <= leaf.shape[0] <= capacity[key]:
                raise ValueError(
                    f"Packed feature `element.data[{key!r}]` has shape {leaf.shape}; it needs "
                    f"a sequence axis of length `max_len` in [1, row_length * num_rows] = "
                    f"[1, {capacity[key]}]. Raise `row_length` or `num_rows`, or split long "
                    "sequences before batching."
                )
        for length_key in sorted(set(lengths.values())):
            leaf = spec.data[length_key]
            if leaf.shape != () or np.dtype(leaf.dtype).kind not in "iu":
                raise ValueError(
                    f"Length `element.data[{length_key!r}]` must be a scalar int, got shape "
                    f"{leaf.shape} dtype {leaf.dtype}."
                )
        keep = [*features, *metas_of(spec)]
        pad_value_fits(pad_value, Element(data={k: spec.data[k] for k in keep}))
        for k in bos_features:
            dtype = np.dtype(spec.data[k].dtype)
            if (
                dtype.kind in "iu"
                and not np.iinfo(dtype).min <= bos_token_id <= np.iinfo(dtype).max
            ):
                raise ValueError(
                    f"`bos_token_id` {bos_token_id} cannot be stored in `element.data[{k!r}]` "
                    f"of dtype {dtype}."
                )

    config = describe(
        "concat_and_split",
        row_length=row_length,
        num_rows=num_rows,
        lengths=lengths,
        pad_value=pad_value,
        max_sequences_per_row=cap,
        continue_positions=continue_positions,
        split_full_length_features=split_full_length_features,
        bos_handling=bos_handling,
        bos_features=sorted(bos_features),
        bos_token_id=bos_token_id,
    )

    def init_fn(element_spec: Any, key: Any = None) -> ConcatAndSplitState:
        del key  # deterministic
        spec = spec_of(element_spec)
        check_spec(spec)
        buffers = {k: fresh(k, spec.data[k].shape[0], spec.data[k].shape[1:], spec.data[k].dtype)
                   for k in features}  # fmt: skip
        # Table rows: the most buffer rows of a feature, `(capacity + max_len + extra) / row`.
        table_rows = num_rows + max(
            -(-(spec.data[k].shape[0] + extra[k]) // limit[k]) for k in features
        )

        def table(leaf: Any) -> Array:
            return jnp.full((table_rows, width, *leaf.shape), pad_value, leaf.dtype)

        def zero():  # each field its own array, so the state can be donated to `jit`
            return jnp.zeros((), jnp.int32)

        return ConcatAndSplitState(
            buffer={k: b[0] for k, b in buffers.items()},
            segment_ids={k: b[1] for k, b in buffers.items()},
            positions={k: b[2] for k, b in buffers.items()},
            length_like={n: jnp.zeros((), spec.data[n].dtype) for n in set(lengths.values())},
            tables={m: jax.tree.map(table, spec.data[m]) for m in metas_of(spec)},
            row=zero(),
            fill={k: zero() for k in features},
            segments=zero(),
            pending=zero(),
            stats=Stats.zeros(fingerprint(config, spec)),
            tokens={k: Counter.of(0) for k in features},
            padding_tokens={k: Counter.of(0) for k in features},
        )

    def max_len_of(state: ConcatAndSplitState, key: str) -> int:
        return state.buffer[key].shape[0] - capacity[key] - extra[key]

    def spec_from(state: ConcatAndSplitState) -> Element:
        data = {
            k: jax.ShapeDtypeStruct((max_len_of(state, k), *b.shape[1:]), b.dtype)
            for k, b in state.buffer.items()
        }
        data.update({n: jax.ShapeDtypeStruct((), z.dtype) for n, z in state.length_like.items()})
        for m, tree in state.tables.items():
            data[m] = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape[2:], t.dtype), tree)
        return Element(data=data)

    def length_of(state: ConcatAndSplitState, data: dict, key: str) -> Array:
        raw, max_len = data[lengths[key]], max_len_of(state, key)
        n = clamp_to_int32(raw, -1, max_len + 1)  # checked as given, not cut to 32 bits
        bad = (n < 0) | (n > max_len)
        return eqx.error_if(
            n,
            bad,
            f"concat_and_split: a length `element.data[{lengths[key]!r}]` of packed feature "
            f"{key!r} is outside [0, max_len = {max_len}].",
        )

    def rows_valid(segment_ids: dict[str, Array]) -> Array:
        any_token = [jnp.any(s[: capacity[k]].reshape(num_rows, limit[k]) > 0, axis=1)
                     for k, s in segment_ids.items()]  # fmt: skip
        return jnp.any(jnp.stack(any_token), axis=0)

    def batch_of(state_parts: tuple, valid_mask: Array) -> Batch:
        buffer, segment_ids, positions, tables = state_parts
        data = {m: jax.tree.map(lambda t: t[:num_rows], tree) for m, tree in tables.items()}
        for k in features:
            tok = buffer[k][: capacity[k]]
            tok = tok.reshape(num_rows, limit[k], *tok.shape[1:])
            ids = segment_ids[k][: capacity[k]].reshape(num_rows, limit[k])
            pos = positions[k][: capacity[k]].reshape(num_rows, limit[k])
            if k in bos_features:  # Grain's REPLACE_FIRST_TOKEN_WITH_BOS: every piece's start
                starts = (ids > 0) & (pos == 0)
                tok = jnp.where(
                    rows_mask_2d(starts, tok), jnp.asarray(bos_token_id, tok.dtype), tok
                )
            data[k], data[f"{k}_segment_ids"], data[f"{k}_positions"] = tok, ids, pos
        return Batch(data=data, valid_mask=valid_mask)

    def padding_of(segment_ids: dict[str, Array]) -> dict[str, Array]:
        return {k: jnp.sum(s[: capacity[k]] == 0, dtype=jnp.int32) for k, s in segment_ids.items()}

    def step_fn(state: ConcatAndSplitState, element: Any) -> tuple[ConcatAndSplitState, Emit]:
        check_state(state, ConcatAndSplitState, config)
        element = as_element(element)
        check_against_spec(spec_from(state), element, what="element")
        n = {k: length_of(state, element.data, k) for k in features}

        # The plan, on scalars. `first`: tokens that fit in the open row; `rest`: the
        # others, from the start of the next row on; `more`: rows the rest reaches into.
        fits = {k: jnp.minimum(n[k], limit[k] - state.fill[k]) for k in features}
        rest = {k: n[k] - fits[k] for k in features}
        overflow = jnp.any(jnp.stack([rest[k] > 0 for k in features]))
        # Each further row takes up to a row of every feature, so the rest spans the most
        # rows any feature's rest needs.
        more = jnp.max(jnp.stack([(rest[k] + limit[k] - 1) // limit[k] for k in features]))
        last_row = state.row + more  # the row the sequence ends in
        end_fill = {
            k: jnp.where(
                overflow,
                jnp.clip(rest[k] - (more - 1) * limit[k], 0, limit[k]),
                state.fill[k] + n[k],
            )
            for k in features
        }
        nonempty = jnp.any(jnp.stack([n[k] > 0 for k in features]))
        pieces = jnp.where(overflow, 1, state.segments + nonempty.astype(jnp.int32))
        full = jnp.all(jnp.stack([end_fill[k] == limit[k] for k in features]))
        if cap is not None:  # a row holding `max_sequences_per_row` pieces is full too
            full = full | (pieces >= cap)
        next_row = last_row + full.astype(jnp.int32)
        segments = jnp.where(full, 0, pieces)

        # The payload: two slabs per buffer (the part in the open row, then the rest).
        buffer, segment_ids, positions = {}, {}, {}
        for k in features:
            x = jnp.asarray(element.data[k])
            t = jnp.arange(x.shape[0], dtype=jnp.int32)
            pad = jnp.asarray(pad_value, x.dtype)
            in_first, in_rest = t < fits[k], t < rest[k]
            source = jnp.minimum(t + fits[k], x.shape[0] - 1)
            later = jnp.take(x, source, axis=0)
            if continue_positions:
                rest_position = t + fits[k]
            else:
                rest_position = t % limit[k]
            starts = (state.row * limit[k] + state.fill[k], (state.row + 1) * limit[k])
            masks = (in_first, in_rest)
            buffer[k] = _write(state.buffer[k], (x, later), masks, starts, pad)
            segment_ids[k] = _write(
                state.segment_ids[k],
                (jnp.broadcast_to(state.segments + 1, t.shape), jnp.ones_like(t)),
                masks,
                starts,
                jnp.zeros((), jnp.int32),
            )
            positions[k] = _write(
                state.positions[k], (t, rest_position), masks, starts, jnp.zeros((), jnp.int32)
            )

        # The meta features: one scatter per table leaf. The first piece's entry is its
        # slot in the open row (if it has a token there), then slot 0 of each row the rest
        # reaches; unused entries point past the table and are dropped.
        tables = {}
        if state.tables:
            table_rows = jax.tree.leaves(state.tables)[0].shape[0]
            most = max(-(-max_len_of(state, k) // limit[k]) for k in features)
            follow = jnp.arange(1, most + 1, dtype=jnp.int32)
            placed = jnp.any(jnp.stack([fits[k] > 0 for k in features]))
            rows = jnp.concatenate([
                jnp.where(placed, state.row, table_rows)[None],
                jnp.where(follow <= more, state.row + follow, table_rows),
            ])  # fmt: skip
            slots = jnp.concatenate([state.segments[None], jnp.zeros_like(follow)])

            def put(table: Array, value: Any) -> Array:
                value = jnp.broadcast_to(value, (most + 1, *table.shape[2:]))
                return table.at[rows, slots].set(value, mode="drop")

            tables = {m: jax.tree.map(put, state.tables[m], element.data[m])
                      for m in state.tables}  # fmt: skip

        done = next_row >= num_rows
        ends_here = nonempty & (last_row < num_rows)
        emitted = jnp.where(done, state.pending + ends_here.astype(jnp.int32), 0)
        pending = jnp.where(
            done,
            (nonempty & ~ends_here).astype(jnp.int32),
            state.pending + nonempty.astype(jnp.int32),
        )
        new_row = jnp.where(done, next_row - num_rows, next_row)
        fill = {k: jnp.where(full, 0, end_fill[k]) for k in features}
        parts = (buffer, segment_ids, positions, tables)

        if not split_full_length_features:
            # Grain's `split_full_length_features=False`: a sequence that has a feature of
            # exactly `row_length` tokens (and none longer) is a row of its own. It takes
            # the open row's place and pushes the open row (still filling) one row on.
            whole = jnp.stack([n[k] <= limit[k] for k in features])
            exact = jnp.stack([n[k] == limit[k] for k in features])
            through = jnp.all(whole) & jnp.any(exact)

            def move(table: Array, value: Any) -> Array:
                # The open row's entries go one row on; the sequence's value is entry 0.
                open_row = jax.lax.dynamic_slice_in_dim(table, state.row, 1)
                table = jax.lax.dynamic_update_slice_in_dim(table, open_row, state.row + 1, 0)
                own = jnp.full_like(open_row, pad_value).at[0, 0].set(value)
                return jax.lax.dynamic_update_slice_in_dim(table, own, state.row, 0)

            def pass_through(_):
                out = ({}, {}, {}, {})
                for m in state.tables:
                    out[3][m] = jax.tree.map(move, state.tables[m], element.data[m])
                for k in features:
                    start, row_len = state.row * limit[k], limit[k]
                    t = jnp.arange(row_len, dtype=jnp.int32)
                    x = jnp.asarray(element.data[k])
                    inside = t < n[k]
                    tokens = jnp.take(x, jnp.minimum(t, x.shape[0] - 1), axis=0)
                    row_parts = (
                        jnp.where(
                            rows_mask(inside, tokens), tokens, jnp.asarray(pad_value, x.dtype)
                        ),
                        inside.astype(jnp.int32),
                        jnp.where(inside, t, 0),
                    )
                    olds = (state.buffer[k], state.segment_ids[k], state.positions[k])
                    for i, (old, new) in enumerate(zip(olds, row_parts)):
                        open_row = jax.lax.dynamic_slice_in_dim(old, start, row_len)
                        old = jax.lax.dynamic_update_slice_in_dim(old, open_row, start + row_len, 0)
                        out[i][k] = jax.lax.dynamic_update_slice_in_dim(old, new, start, 0)
                return out

            parts = jax.lax.cond(through, pass_through, lambda p: p, parts)
            through_done = state.row + 1 >= num_rows
            done = jnp.where(through, through_done, done)
            emitted = jnp.where(
                through, jnp.where(through_done, state.pending - state.segments + 1, 0), emitted
            )
            pending = jnp.where(
                through, jnp.where(through_done, state.segments, state.pending + 1), pending
            )
            new_row = jnp.where(through, jnp.where(through_done, 0, state.row + 1), new_row)
            fill = {k: jnp.where(through, state.fill[k], fill[k]) for k in features}
            segments = jnp.where(through, state.segments, segments)

        batch = batch_of(parts, rows_valid(parts[1]) & done)
        padding = padding_of(parts[1])

        def shift(parts):  # the overflow becomes the start of the next batch
            def left(buf, fill, by):
                return jnp.concatenate([buf[by:], jnp.full_like(buf[:by], fill)])

            buffer, segment_ids, positions, tables = parts
            return (
                {k: left(b, pad_value, capacity[k]) for k, b in buffer.items()},
                {k: left(b, 0, capacity[k]) for k, b in segment_ids.items()},
                {k: left(b, 0, capacity[k]) for k, b in positions.items()},
                jax.tree.map(lambda t: left(t, pad_value, num_rows), tables),
            )

        buffer, segment_ids, positions, tables = jax.lax.cond(
            done, shift, lambda parts: parts, parts
        )
        new_state = ConcatAndSplitState(
            buffer=buffer,
            segment_ids=segment_ids,
            positions=positions,
            length_like=state.length_like,
            tables=tables,
            row=new_row,
            fill=fill,
            segments=segments,
            pending=pending,
            stats=state.stats.add(
                accepted=nonempty, skipped=~nonempty, emitted=emitted, batches=done
            ),
            tokens={k: state.tokens[k].add(n[k]) for k in features},
            padding_tokens={
                k: state.padding_tokens[k].add(jnp.where(done, padding[k], 0)) for k in features
            },
        )
        return new_state, Emit(batch, done)

    def flush_fn(state: ConcatAndSplitState) -> tuple[ConcatAndSplitState, Emit]:
        check_state(state, ConcatAndSplitState, config)
        ready = (state.row > 0) | jnp.any(jnp.stack([state.fill[k] > 0 for k in features]))
        valid = rows_valid(state.segment_ids) & ready
        batch = batch_of((state.buffer, state.segment_ids, state.positions, state.tables), valid)
        padding = padding_of(state.segment_ids)
        buffers = {k: fresh(k, max_len_of(state, k), b.shape[1:], b.dtype)
                   for k, b in state.buffer.items()}  # fmt: skip

        def zero():  # each field its own array, so the state can be donated to `jit`
            return jnp.zeros((), jnp.int32)

        padded_rows = jnp.where(ready, num_rows - jnp.sum(valid, dtype=jnp.int32), 0)
        new_state = ConcatAndSplitState(
            buffer={k: b[0] for k, b in buffers.items()},
            segment_ids={k: b[1] for k, b in buffers.items()},
            positions={k: b[2] for k, b in buffers.items()},
            length_like=state.length_like,
            tables=jax.tree.map(lambda t: jnp.full_like(t, pad_value), state.tables),
            row=zero(),
            fill={k: zero() for k in features},
            segments=zero(),
            pending=zero(),
            stats=state.stats.add(emitted=state.pending, batches=ready, padded=padded_rows),
            tokens=state.tokens,
            padding_tokens={
                k: state.padding_tokens[k].add(jnp.where(ready, padding[k], 0)) for k in features
            },
        )
        return new_state, Emit(batch, ready)

    return Batcher(init=init_fn, step=step_fn, flush=flush_fn)

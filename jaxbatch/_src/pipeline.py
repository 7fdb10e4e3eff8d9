"""`pipeline`: random-access data, an order, per-element stages and a batcher, as one
`Batcher` whose elements are stream *positions*.

Data flow (DESIGN.md, "Pipelines"): the pipeline's state holds the data (one PyTree of
device arrays, the sources concatenated along the leading axis), the order's counters, the
batcher's state and, optionally, a second batcher's (`then=jb.rebatch(...)`). An element
is a position, an int32: the order (`jb.epochs`, `jb.mixture`) turns it into a row on small
integers alone; the row is read from the data, transformed (`map_fn`), tested (`keep`) and
stepped into the batcher. The stream's length is the number of positions given, so one
compiled program serves every chunk of positions of that length: a resumed half-epoch is
the same program (`jb.next_positions(state, n)`), positions past the last epoch skipped.

Payload moves once (the bulk path, `feed`): with `late_gather` the batcher plans on a
*proxy* of each element, the leaves it may read (small ones: lengths, labels) real, each
payload leaf as one scalar placeholder (its batched value is what padding rows hold; a
packed feature keeps its shape, as zeros), plus the row index (an element state, or a
per-segment table `__row` for packing). The batcher's buffers then hold no payload. The
emitted batch then gathers the payload straight from the data by those row indices: no
permuted copy of the data, no intermediate batch. Packing (`lengths=`) rebuilds each
token from the segment ids and positions `pack` emits and the row table.

Which is the default, and why (measured on CPU, `benchmarks/bench_pipeline.py`):
* `fixed_size` and other row-wise batchers: late gather. The batch's rows are gathered
  inside the consumer's loop, one batch at a time, as fast as gathering them by hand.
* `pack` (`lengths=`): gather first (`late_gather=False`). The chunk's rows are read in
  the stream's order (one gather of the chunk: a chunk-sized copy, never the dataset's)
  and `pack` gathers each token from that copy. Late gather moves the payload once, but
  `pack`'s own per-token gather still runs over the proxy's placeholder tokens (a
  chunk-sized array the loop reads), so it moves as many bytes: 0.56-0.70x the tokens/s
  of packing a pre-shuffled corpus on JAX 0.12.1 (gathering first: 0.86-0.95x), about
  even with gathering first on 0.10.2.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PyTree, UInt32

from .base import (
    Batcher,
    Emissions,
    Emit,
    Stats,
    check_state,
    describe,
    fingerprint,
    prng_key,
    row_spec as row_spec_of,
)
from .batch import Batch
from .batchers._checks import lengths_mapping
from .combinators import _advance, _not_ready_like
from .element import Element, as_element
from .sources import Order, OrderState, epochs, init_order, make_locate, order_seed
from .spec import check_against_spec

_INT32_MAX = 2**31 - 1
_POSITION = Element(data=jax.ShapeDtypeStruct((), jnp.int32))
_ROW = "__row"
_SMALL_BYTES = 16  # per-row leaves up to this size travel with the proxy (a batcher may read them)


class PipelineState(eqx.Module):
    """State of `pipeline`: the data, where the stream stands, and the stages' states.

    Attributes:
        data: the sources' rows, concatenated (leaves `[rows, ...]`). Saved with the
            state like any leaf; `jb.without_data` drops it for a small checkpoint.
        order: an `OrderState`: next position, epoch, per-source counters.
        seed: uint32, the order's seed (from the `init` key; 0 when nothing is random).
        inner: the batcher's state.
        then: the second batcher's state, or None.
        stats: the counters. An element is a position: positions past the last epoch
            and those `keep` refused are `skipped`.
    """

    data: PyTree
    order: OrderState
    seed: UInt32[Array, ""]
    inner: Any
    then: Any
    stats: Stats

    def resident_split(self) -> "tuple[PipelineState, PyTree]":
        """This state without its data, and the data: the drivers' programs take the data
        as its own argument and never return it, so a call does not copy the dataset."""
        return PipelineState(
            None, self.order, self.seed, self.inner, self.then, self.stats
        ), self.data

    def resident_join(self, data: PyTree) -> "PipelineState":
        """This state (from `resident_split`) with `data` put back."""
        return PipelineState(data, self.order, self.seed, self.inner, self.then, self.stats)


def _leaf_name(path: Any) -> str:
    return jax.tree_util.keystr(path)


def _sources(data: Any, order: Order) -> list[Any]:
    """The list of sources, checked: arrays with one leading size each, equal specs."""
    if order.kind == "mixture":
        if not isinstance(data, list | tuple) or len(data) != len(order.weights):
            raise ValueError(
                f"`data` must be a list of {len(order.weights)} sources (one per weight of "
                f"`order`), got {type(data).__name__}"
                + (f" of {len(data)}" if isinstance(data, list | tuple) else "")
                + "."
            )
        sources = list(data)
    else:
        sources = [data]
    first = None
    for s, source in enumerate(sources):
        where = f"data[{s}]" if order.kind == "mixture" else "data"
        leaves = jax.tree_util.tree_flatten_with_path(source)[0]
        if not leaves:
            raise ValueError(f"`{where}` has no array leaves: nothing to read.")
        sizes = set()
        for path, leaf in leaves:
            shape = np.shape(leaf)
            if not shape:
                raise ValueError(
                    f"Leaf `{where}{_leaf_name(path)}` is 0-d; every leaf needs a leading axis "
                    "of rows."
                )
            dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
            if dtype.kind not in "biufc":
                raise ValueError(
                    f"Leaf `{where}{_leaf_name(path)}` has dtype {dtype}; a pipeline reads "
                    "numeric or bool arrays (encode text as integers first)."
                )
            sizes.add(shape[0])
        if len(sizes) != 1:
            raise ValueError(
                f"The leaves of `{where}` have different numbers of rows {sorted(sizes)}; "
                "every leaf needs the same leading size."
            )
        if sizes.pop() == 0:
            raise ValueError(f"`{where}` is empty (0 rows): a pipeline needs at least one row.")
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), source)
        if first is None:
            first = spec
            continue
        a, adef = jax.tree_util.tree_flatten_with_path(first)
        b, bdef = jax.tree_util.tree_flatten_with_path(spec)
        if adef != bdef:
            raise ValueError(
                f"`{where}` has another structure than `data[0]`: {bdef} vs {adef}; every "
                "source of a mixture needs the same leaves."
            )
        for (path, x), (_, y) in zip(a, b):
            if x != y:
                raise ValueError(
                    f"Leaf `{where}{_leaf_name(path)}` has rows of shape {y.shape} and dtype "
                    f"{y.dtype}, but `data[0]{_leaf_name(path)}` has {x.shape} and {x.dtype}; "
                    "mixed sources need one element spec (pad or cast them first)."
                )
    return sources


# The batchers of jaxbatch that never read a payload value: they move rows. Only for these
# does `late_gather` default to True; any other batcher (a user's own may read anything)
# sees the real rows unless `late_gather=True` is asked for. `pack` plans on lengths alone,
# but for it gathering the rows first measured faster (benchmarks/bench_pipeline.py).
_PAYLOAD_BLIND = ("fixed_size", "shuffle")


def _blind_to_payload(batcher: Batcher, row_spec: Any, lengths: Any) -> bool:
    """Is `batcher` one of jaxbatch's batchers that read no payload (`_PAYLOAD_BLIND`), in
    a pipeline that does not pack? Read from the configuration its state records
    (`Stats.config`), on shapes alone."""
    try:
        state = jax.eval_shape(lambda: batcher.init(Element(data=row_spec), key=jax.random.key(0)))
    except Exception:  # noqa: BLE001  (a batcher that refuses the rows: `init` will say why)
        return False
    stats = getattr(state, "stats", None)
    name = getattr(stats, "config", "").split("(", 1)[0]
    if lengths is not None:  # packing: gathering the rows first measured faster
        return False
    return name in _PAYLOAD_BLIND


def _deleted(x: Any) -> bool:
    """A concrete array whose buffer is gone (donated)."""
    return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_deleted()  # pyright: ignore


def _top_key(path: Any) -> Any:
    """The top-level dict key of a leaf path, or None."""
    return path[0].key if path and hasattr(path[0], "key") else None


def _materialised(rows: Array, always: Array) -> Array:
    """`rows`, written to memory once (`always`: a run-time bool scalar that is True).

    Left alone, XLA fuses the arithmetic that made `rows` (the order's Feistel rounds) into
    every reader of them, and a gather of whole rows then recomputes it once per *element*
    it reads (256 times per sequence for packing). The output of a `cond` on a run-time
    predicate is a buffer: its readers read it.
    (`optimization_barrier` does not survive to XLA's fusion on CPU; a constant predicate
    would be folded away.)
    """
    return jax.lax.cond(always, lambda r: r, jnp.zeros_like, rows)


def _take_rows(x: Array, rows: Array) -> Array:
    """`x[rows]` for rows known to be in range: a plain gather (`jnp.take` would add a
    select for out-of-range rows, which XLA then materialises as a second copy)."""
    if not x.shape[0]:  # no rows (a state without its data): nothing to promise
        return jnp.take(x, rows, axis=0)
    return x.at[rows].get(mode="promise_in_bounds")


def _mask_like(mask: Array, leaf: Array) -> Array:
    return mask.reshape(mask.shape + (1,) * (jnp.ndim(leaf) - jnp.ndim(mask)))


def pipeline(
    data: Any,
    batcher: Any,
    *,
    order: Any = None,
    map_fn: Any = None,
    keep: Any = None,
    then: Any = None,
    lengths: Any = None,
    late_gather: Any = None,
) -> Batcher:
    """Data in device memory, read in an order, through a batcher: one `Batcher` whose
    elements are stream positions.

    Feed it positions (`jb.next_positions(state, n)`: the next `n`, int32) with any driver
    (`jb.scan`, `jb.consume`, `jb.batch_all`). Position `p` is row `order(p)` of `data`;
    that row goes through `map_fn` and `keep` into `batcher`, whose batches (through `then`,
    if given) are the pipeline's. The state holds everything (data, order counters, the
    batchers' states): it is the checkpoint, and a run resumed from it with the same chunk
    length is the same compiled program and the same batches, bit for bit.

    Build the state once outside `jit` (`state = pipe.init(jnp.int32(0), key=key)`) and pass
    it to the drivers (`jb.scan(..., state=state)`): the data then enters the program as an
    argument, not as a constant. The state shares the data's buffers (device arrays given
    as `data` are not copied): donating it to a jitted call (`donate_argnums`) hands them to
    that call, so carry on from the state it returns, not from `data` or a new `init`.

    Args:
        data: a PyTree of arrays with a leading axis of rows (one source), or for
            `order=jb.mixture(...)` a list of such PyTrees with one element spec.
        batcher: any `Batcher` (`jb.fixed_size`, `jb.pack`, `jb.bucket_by_length`, yours).
        order: `jb.epochs(...)` (default: shuffled, unbounded) or `jb.mixture(...)`.
        map_fn: `map_fn(element) -> element | PyTree`, applied to each row before the
            batcher (pure JAX; one output spec).
        keep: `keep(element) -> bool` scalar: rows for which it is False are skipped.
        then: a second `Batcher` fed the first one's batches (e.g. `jb.rebatch(...)`).
        lengths: when `batcher` is `jb.pack(..., lengths=...)`, the same mapping: the bulk
            path then packs on lengths and gathers tokens from `data` (needs dict rows).
        late_gather: plan on proxies and gather payload after batching (see the module
            docstring). Default: True for the batchers that never read a payload value
            (`jb.fixed_size`, `jb.shuffle`) when there is no `map_fn` or `lengths`; False
            for any other batcher (yours may read anything) and for `jb.pack` with
            `lengths=` (gathering the rows first then packing measured faster than
            gathering each token after packing). `True` is checked at construction: a
            batcher that cannot plan on proxies is refused.

    Returns:
        A `Batcher` whose state is a `PipelineState`; it has a bulk `feed` when `batcher`
        has one and there is no `keep` or `then`.

    Raises:
        ValueError: bad `data` (empty, no leaves, mixed specs: the message names the
            leaf), `batcher` or `then` not a `Batcher`, a bad `order`, `lengths` or
            `late_gather`; at `init`, an element spec that is not an int32 position, or no
            key for a shuffled order.
        BatcherRuntimeError: (from the drivers; an `eqx.error_if` under your own `jit`) a
            position outside `[0, (2**31 - 1) // num_shards)`: positions are int32, so one
            stream holds at most that many (thousands of epochs of a million rows); start
            a new stream, a fresh `init` with another key, before it.

    Examples:
        Three epochs of 5 rows, each in a new order, in batches of 4:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> pipe = jb.pipeline({"x": jnp.arange(5)}, jb.fixed_size(4),
        ...                    order=jb.epochs(num_epochs=3))
        >>> state = pipe.init(jnp.int32(0), key=jax.random.key(0))
        >>> seen, state = jb.scan(pipe, lambda c, b: c + b.num_valid, jnp.int32(0),
        ...                       jb.next_positions(state, 16), state=state)
        >>> int(seen), int(state.order.position), int(state.order.epoch)
        (15, 16, 2)
    """
    if not isinstance(batcher, Batcher):
        raise ValueError(f"`batcher` must be a `jb.Batcher`, got {type(batcher).__name__}.")
    if then is not None and not isinstance(then, Batcher):
        raise ValueError(f"`then` must be a `jb.Batcher` or None, got {type(then).__name__}.")
    order = epochs() if order is None else order
    if not isinstance(order, Order):
        raise ValueError(
            f"`order` must be `jb.epochs(...)` or `jb.mixture(...)`, got {type(order).__name__}."
        )
    for name, fn in (("map_fn", map_fn), ("keep", keep)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be a function of an `Element`, got {fn!r}.")
    if late_gather is not None and not isinstance(late_gather, bool):
        raise ValueError(f"`late_gather` must be a bool or None, got {late_gather!r}.")
    if late_gather and map_fn is not None:
        raise ValueError(
            "`late_gather=True` with a `map_fn`: the batcher must see mapped elements, so the "
            "payload is read before it; drop `late_gather` (it defaults to False here)."
        )
    sources = _sources(data, order)
    if lengths is not None:
        lengths_mapping(lengths)  # the mapping given to `jb.pack`
        if not isinstance(sources[0], dict):
            raise ValueError("`lengths` needs dict rows in `data` (as `jb.pack` does).")
        missing = [k for k in (*lengths, *lengths.values()) if k not in sources[0]]
        if missing:
            raise ValueError(
                f"`lengths` names keys {missing} that `data` does not have; its keys are "
                f"{sorted(sources[0])}."
            )
        if _ROW in sources[0]:
            raise ValueError(f"`data` may not hold a key {_ROW!r} (the pipeline's row table).")
    sizes = tuple(int(jax.tree.leaves(s)[0].shape[0]) for s in sources)
    if len(sources) == 1:
        joined = jax.tree.map(jnp.asarray, sources[0])
    else:
        joined = jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *sources)
    num_rows = sum(sizes)
    random_order = order.shuffle or order.schedule == "random"
    locate = make_locate(order, sizes)
    row_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), joined)
    asked = late_gather is True  # by the caller: checked below, with the reason if refused
    if late_gather is None:
        late_gather = map_fn is None and _blind_to_payload(batcher, row_spec, lengths)
    packed = set(lengths or ())
    length_keys = set((lengths or {}).values())

    def proxied(path: Any, spec: jax.ShapeDtypeStruct) -> bool:
        """Is this leaf payload (gathered after batching) rather than read by the batcher?"""
        if not late_gather:
            return False
        if lengths is not None:
            name = _top_key(path)
            if name in length_keys:
                return False
            if name in packed:
                return True
        return int(np.prod(spec.shape)) * np.dtype(spec.dtype).itemsize > _SMALL_BYTES

    flat_spec, spec_def = jax.tree_util.tree_flatten_with_path(row_spec)
    is_proxied = [proxied(path, spec) for path, spec in flat_spec]
    any_proxied = any(is_proxied)

    # --------------------------------------------------------------------- elements

    def read(data: PyTree, rows: Array) -> Element:
        """Rows `rows` of the data (leaves `[n, ...]`), the full elements."""
        return Element(data=jax.tree.map(lambda x: _take_rows(x, rows), data))

    def proxy(data: PyTree, rows: Array) -> Element:
        """What the batcher sees for rows `rows`: small leaves read, payload as zeros (a
        broadcast: never materialised), and the row index."""
        leaves = jax.tree.leaves(data)
        n = rows.shape[0]
        out = [
            jnp.broadcast_to(jnp.zeros((), s.dtype), (n, *s.shape))
            if p and _top_key(path) in packed  # `pack` reads a packed feature's shape
            else jnp.zeros((n,), s.dtype)  # one scalar per row: what padding rows hold
            if p
            else _take_rows(x, rows)
            for (path, s), p, x in zip(flat_spec, is_proxied, leaves)
        ]
        tree = jax.tree.unflatten(spec_def, out)
        if lengths is not None:
            return Element(data={**tree, _ROW: rows.astype(jnp.int32)})
        return Element(data=tree, state={_ROW: rows.astype(jnp.int32)})

    def elements_of(data: PyTree, rows: Array) -> Element:
        if late_gather and any_proxied:
            return proxy(data, rows)
        element = read(data, rows)
        if map_fn is not None:
            element = jax.vmap(lambda e: as_element(map_fn(e)))(element)
        return element

    def one(tree: Any) -> Any:
        return jax.tree.map(lambda x: x[0], tree)

    # --------------------------------------------------------------------- payload

    def gather_rows(batch: Batch, data: PyTree) -> Batch:
        """Payload leaves of a row-wise batch, read from `data` by the rows' indices."""
        states = batch.states
        if not isinstance(states, dict) or _ROW not in states:
            raise TypeError(
                "The batcher's batches lost the row index the pipeline gave each element (as "
                f"its state {_ROW!r}): build the pipeline with `late_gather=False` for this "
                "batcher."
            )
        index = jnp.clip(states[_ROW], 0, num_rows - 1)
        valid = batch.valid_mask
        out = []
        for p, x, got in zip(is_proxied, jax.tree.leaves(data), jax.tree.leaves(batch.data)):
            if not p:
                out.append(got)
                continue
            rows = _take_rows(x, index)
            # Padding rows: the batcher's fill of the row's scalar placeholder.
            out.append(jnp.where(_mask_like(valid, rows), rows, _mask_like(got, rows)))
        data_out = jax.tree.unflatten(jax.tree.structure(batch.data), out)
        rest = {k: v for k, v in states.items() if k != _ROW}
        # `tree_at`, not `replace`: a stacked batch's mask is 2-d, which `Batch()` refuses.
        return eqx.tree_at(lambda b: (b.data, b.states), batch, (data_out, rest))

    def gather_packed(batch: Batch, data: PyTree) -> Batch:
        """Tokens of a packed batch, read from `data` through the segment ids, positions
        and the per-segment row table."""
        got = dict(batch.data)
        table = got.pop(_ROW)  # [rows, segments]
        table = jnp.clip(table, 0, num_rows - 1)
        first = sorted(packed)[0]
        seg_first = got[f"{first}_segment_ids"]
        used = jnp.max(seg_first, axis=-1)  # segments in each row
        slots = jnp.arange(table.shape[-1], dtype=jnp.int32)
        for path, spec in flat_spec:
            name = path[0].key
            if not proxied(path, spec) or name in length_keys:
                continue
            x = data[name]
            if name in packed:
                seg, pos = got[f"{name}_segment_ids"], got[f"{name}_positions"]
                rows = jnp.take_along_axis(table, jnp.maximum(seg - 1, 0), axis=-1)
                tokens = x[rows, jnp.clip(pos, 0, x.shape[1] - 1)]
                got[name] = jnp.where(_mask_like(seg > 0, tokens), tokens, got[name])
            else:
                present = slots[None, :] < used[:, None]
                values = _take_rows(x, table)
                fill = _mask_like(got[name], values)  # the table's scalar placeholder
                got[name] = jnp.where(_mask_like(present, values), values, fill)
        return eqx.tree_at(lambda b: b.data, batch, got)

    def payload(batch: Any, data: PyTree) -> Any:  # a `Batch`, or what the batcher emits
        if not (late_gather and any_proxied):
            return batch
        if lengths is not None:
            lead = jnp.ndim(batch.valid_mask) - 1
            fn = lambda b: gather_packed(b, data)  # noqa: E731
            for _ in range(lead):
                fn = jax.vmap(fn)
            return fn(batch)
        return gather_rows(batch, data)

    def units_out(batch: Batch) -> Array:
        """Elements emitted in the valid rows of a final batch (for `then`'s counters)."""
        if lengths is None:
            return jnp.sum(batch.valid_mask, dtype=jnp.int32)
        f = sorted(packed)[0]
        starts = (batch.data[f"{f}_positions"] == 0) & (batch.data[f"{f}_segment_ids"] > 0)
        return jnp.sum(starts & _mask_like(batch.valid_mask, starts), dtype=jnp.int32)

    # --------------------------------------------------------------------- init / step

    if asked and any_proxied:  # refuse here a batcher that cannot plan on proxies

        def planned():
            spec = one(elements_of(joined, jnp.zeros((1,), jnp.int32)))
            inner = batcher.init(spec, key=jax.random.key(0))
            return payload(batcher.step(inner, spec)[1].batch, joined)

        try:
            jax.eval_shape(planned)
        except Exception as e:  # noqa: BLE001  (any refusal: say which and how to avoid it)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                "`late_gather=True`: `batcher` cannot batch the pipeline's proxies (payload "
                f"leaves as placeholders, plus a row index): {reason} Build the pipeline with "
                "`late_gather=False` (the default for batchers other than fixed_size and "
                "shuffle)."
            ) from None

    # The fingerprint a state carries (law 8): the stages and the data's rows. Not the order's
    # weights: a pipeline built with other weights continues a saved state on purpose.
    config = describe(
        "pipeline",
        batcher=batcher,
        map_fn=map_fn,
        keep=keep,
        then=then,
        lengths=lengths,
        late_gather=late_gather,
        rows=num_rows,
    )

    def read_one(spec: Any) -> Any:
        """The full element `keep` sees, from the spec of what the batcher sees."""
        if late_gather and any_proxied:
            full = jax.eval_shape(lambda d: one(read(d, jnp.zeros((1,), jnp.int32))), joined)
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), full)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), spec)

    def _stage(init: Any, name: str, hint_pack: bool = False) -> Any:
        """`init()` of a stage; its refusal of the elements it is given, as a ValueError
        naming the argument."""
        try:
            return init()
        except (TypeError, ValueError) as e:
            if "PRNG key" in str(e):  # not about the elements: the stage is stochastic
                raise ValueError(
                    f"`{name}` needs a PRNG key: pass one to the pipeline's `init` "
                    f"(`pipe.init(jnp.int32(0), key=...)`). {e}"
                ) from e
            fed = (
                "the batches of `batcher`"
                if name == "then"
                else "the pipeline's rows" + (" after `map_fn`" if map_fn is not None else "")
            )
            hint = (
                " (for `jb.pack`, give `jb.pipeline` the same `lengths=`, or `late_gather=False`)"
                if hint_pack and lengths is None and late_gather and "state" in str(e)
                else ""
            )
            raise ValueError(f"`{name}` cannot take {fed}{hint}: {e}") from e

    def init_fn(element_spec: Any, key: Any = None) -> PipelineState:
        try:
            check_against_spec(_POSITION, as_element(element_spec), what="element_spec")
        except TypeError as e:
            raise ValueError(
                f"A pipeline's elements are stream positions, int32 scalars: `init` takes "
                f"`jnp.int32(0)` (or its spec) as the element spec. {e}"
            ) from None
        if any(_deleted(x) for x in jax.tree.leaves(joined)):
            raise ValueError(
                "The pipeline's data was donated (a jitted call with `donate_argnums` took a "
                "state holding it), so `init` has none left: build the pipeline again, or "
                "carry on from the state that call returned (`jb.with_data(s, returned)`)."
            )
        if random_order or key is not None:
            key = prng_key(key, "pipeline")
            seed = order_seed(key)
            inner_key, then_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
        else:
            seed, inner_key, then_key = jnp.uint32(0), None, None
        try:
            spec = jax.eval_shape(lambda d: one(elements_of(d, jnp.zeros((1,), jnp.int32))), joined)
        except Exception as e:  # a `map_fn` that does not fit the rows: name it
            if map_fn is None:
                raise
            raise ValueError(f"`map_fn` failed on the rows of `data`: {e!r}") from e
        if keep is not None:
            verdict = jax.eval_shape(lambda e: keep(read_one(e)), spec)
            if verdict.shape != () or verdict.dtype != jnp.bool_:
                raise ValueError(
                    f"`keep` must return a scalar bool, got shape {verdict.shape} and dtype "
                    f"{verdict.dtype}."
                )
        inner = _stage(lambda: batcher.init(spec, key=inner_key), "batcher", hint_pack=True)
        if lengths is not None:
            got = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, inner, spec).data
            need = [f"{f}_{k}" for f in sorted(packed) for k in ("segment_ids", "positions")]
            if not isinstance(got, dict) or any(k not in got for k in need):
                raise ValueError(
                    f"`lengths` is given but `batcher` does not pack those features (its "
                    f"batches lack {need}): pass `lengths` only with `jb.pack(..., "
                    "lengths=...)`, the same mapping."
                )
        then_state = None
        if then is not None:
            first = jax.eval_shape(lambda s, e: batcher.step(s, e)[1].batch, inner, spec)
            first = jax.eval_shape(lambda b, d: payload(b, d), first, joined)
            then_state = _stage(lambda: then.init(first, key=then_key), "then")
        stats = Stats.zeros(fingerprint(config, jax.tree.map(lambda x: x[0], joined)))
        return PipelineState(joined, init_order(order), seed, inner, then_state, stats)

    def step_fn(state: PipelineState, element: Any) -> tuple[PipelineState, Emit]:
        check_state(state, PipelineState, config)
        element = as_element(element)
        check_against_spec(_POSITION, element, what="element")
        where, order_state = locate(state.order, state.seed, element.data[None])
        ok = where.valid[0]
        if keep is not None:
            full = one(read(state.data, where.row))
            if map_fn is not None:
                full = as_element(map_fn(full))
            verdict = keep(full)
            if jnp.shape(verdict) != () or jnp.result_type(verdict) != jnp.bool_:
                raise TypeError(
                    f"`keep` must return a scalar bool array, got shape {jnp.shape(verdict)} "
                    f"and dtype {jnp.result_type(verdict)}."
                )
            ok &= verdict
        item = one(elements_of(state.data, where.row))

        def take(inner, item):
            return batcher.step(inner, item)

        def refuse(inner, item):
            return inner, _not_ready_like(jax.eval_shape(batcher.step, inner, item)[1])

        inner, emit = jax.lax.cond(ok, take, refuse, state.inner, item)
        emit = Emit(payload(emit.batch, state.data), emit.ready)
        if then is None:
            stats = _advance(state.stats, state.inner.stats, inner.stats, skipped=~ok)
            return PipelineState(state.data, order_state, state.seed, inner, None, stats), emit
        then_state, out = chain_step(state.then, emit)
        stats = chain_stats(state, inner, then_state, out, skipped=~ok)
        return PipelineState(state.data, order_state, state.seed, inner, then_state, stats), out

    # --------------------------------------------------------------------- the second stage

    def chain_step(then_state: Any, emit: Emit) -> tuple[Any, Emit]:
        def take(s, batch):
            return then.step(s, batch)

        def refuse(s, batch):
            return s, _not_ready_like(jax.eval_shape(then.step, s, batch)[1])

        return jax.lax.cond(emit.ready, take, refuse, then_state, emit.batch)

    def chain_stats(state, inner, then_state, out: Emit, skipped) -> Stats:
        def moved(name, a, b):
            return getattr(b.stats, name).lo - getattr(a.stats, name).lo

        return state.stats.add(
            accepted=moved("accepted", state.inner, inner),
            skipped=moved("skipped", state.inner, inner) + jnp.asarray(skipped, jnp.uint32),
            dropped=moved("dropped", state.inner, inner) + moved("dropped", state.then, then_state),
            emitted=jnp.where(out.ready, units_out(out.batch), 0),
            batches=moved("batches", state.then, then_state),
            padded=moved("padded", state.then, then_state),
        )

    def flush_fn(state: PipelineState) -> tuple[PipelineState, Emit]:
        check_state(state, PipelineState, config)
        if then is None:
            inner, emit = batcher.flush(state.inner)
            emit = Emit(payload(emit.batch, state.data), emit.ready)
            stats = _advance(state.stats, state.inner.stats, inner.stats)
            return PipelineState(state.data, state.order, state.seed, inner, None, stats), emit

        # Flush the first stage into the second until the second emits or both are empty.
        def body(c):
            inner, then_state, _, _ = c
            inner, emit = batcher.flush(inner)
            emit = Emit(payload(emit.batch, state.data), emit.ready)

            def step_then(s, batch):
                return then.step(s, batch)

            def flush_then(s, batch):
                return then.flush(s)

            then_state, out = jax.lax.cond(
                emit.ready, step_then, flush_then, then_state, emit.batch
            )
            return inner, then_state, out, out.ready | ~emit.ready

        like = jax.eval_shape(lambda s: then.flush(s)[1], state.then)
        start = (state.inner, state.then, _not_ready_like(like), jnp.array(False))
        inner, then_state, out, _ = jax.lax.while_loop(lambda c: ~c[3], body, start)
        stats = chain_stats(state, inner, then_state, out, skipped=jnp.uint32(0))
        return PipelineState(state.data, state.order, state.seed, inner, then_state, stats), out

    # --------------------------------------------------------------------- the bulk path

    def stepped(state: PipelineState, positions: Array, flush: bool):
        """The step loop over `positions` (then the drain): the new state and the number of
        ready batches. The exact path for chunks with positions to skip."""

        def body(c, p):
            s, count = c
            s, emit = step_fn(s, p)
            return (s, count + emit.ready.astype(jnp.int32)), None

        (state, count), _ = jax.lax.scan(body, (state, jnp.zeros((), jnp.int32)), positions)
        if flush:

            def drain(c):
                s, count, _ = c
                s, emit = flush_fn(s)
                return s, count + emit.ready.astype(jnp.int32), emit.ready

            state, count, _ = jax.lax.while_loop(
                lambda c: c[2], drain, (state, count, jnp.array(True))
            )
        return state, count

    def stepped_batch(state: PipelineState, positions: Array, flush: bool, k: Array) -> Batch:
        """Ready batch `k` of the step loop (then the drain) over `positions`, re-run from
        `state`: O(len(positions)) per batch, for the chunks that hold positions to skip."""
        n = positions.shape[0]
        like = _not_ready_like(jax.eval_shape(step_fn, state, positions[0])[1])

        def more(c):
            i, _, seen, _, going = c
            return going & (seen <= k)

        def body(c):
            i, s, seen, found, _ = c

            def by_step(i, s):
                s, emit = step_fn(s, positions[jnp.minimum(i, n - 1)])
                return s, emit, jnp.array(True)

            def by_flush(i, s):
                if not flush:  # the chunk ends without a drain
                    return s, like, jnp.array(False)
                s, emit = flush_fn(s)
                return s, emit, emit.ready

            s, emit, going = jax.lax.cond(i < n, by_step, by_flush, i, s)
            hit = emit.ready & (seen == k)
            found = jax.tree.map(lambda a, b: jnp.where(hit, a, b), emit, found)
            return i + 1, s, seen + emit.ready.astype(jnp.int32), found, going

        start = (jnp.zeros((), jnp.int32), state, jnp.zeros((), jnp.int32), like, jnp.array(True))
        found = jax.lax.while_loop(more, body, start)[3]
        return found.batch

    def feed_fn(
        state: PipelineState, elements: Any, flush: bool = False
    ) -> tuple[PipelineState, Emissions]:
        check_state(state, PipelineState, config)
        elements = as_element(elements)
        positions = elements.data
        check_against_spec(_POSITION, row_spec_of(elements), what="elements[i]")
        where, order_state = locate(state.order, state.seed, positions)
        where = where._replace(row=_materialised(where.row, state.order.position >= 0))
        inner, emissions = batcher.feed(state.inner, elements_of(state.data, where.row), flush)
        stats = _advance(state.stats, state.inner.stats, inner.stats)
        bulk = PipelineState(state.data, order_state, state.seed, inner, None, stats)
        if order.num_epochs is None or not positions.shape[0]:  # every position is read
            inner_em = emissions
            return bulk, Emissions(
                inner_em.count,
                lambda k: payload(inner_em.batch(k), state.data),
                None
                if inner_em.stacked is None
                else lambda capacity: payload(inner_em.stacked(capacity), state.data),
            )
        # Bounded: a chunk holding positions past the last epoch takes the exact step loop
        # (its batches re-run from the start state, one loop per batch: the last chunk only).
        all_valid = jnp.all(where.valid)
        new, count = jax.lax.cond(
            all_valid,
            lambda: (bulk, emissions.count),
            lambda: stepped(state, positions, flush),
        )

        def batch_fn(k):
            return jax.lax.cond(
                all_valid,
                lambda k: payload(emissions.batch(k), state.data),
                lambda k: stepped_batch(state, positions, flush, k),
                k,
            )

        stacked_fn = None
        if emissions.stacked is not None:

            def stacked_fn(capacity: int) -> Batch:
                return jax.lax.cond(
                    all_valid,
                    lambda: payload(emissions.stacked(capacity), state.data),
                    lambda: jax.vmap(lambda k: stepped_batch(state, positions, flush, k))(
                        jnp.arange(capacity, dtype=jnp.int32)
                    ),
                )

        return new, Emissions(count=count, batch=batch_fn, stacked=stacked_fn)

    bulk = batcher.feed is not None and keep is None and then is None
    return Batcher(init=init_fn, step=step_fn, flush=flush_fn, feed=feed_fn if bulk else None)


# --------------------------------------------------------------------------- helpers


def next_positions(state: PipelineState, n: int) -> Array:
    """The next `n` stream positions of a pipeline's state, int32 `[n]`: its elements.

    Pass the same `n` on every call (the last chunk too: positions past the last epoch are
    skipped) and the program compiles once.

    Raises:
        ValueError: `n` not a non-negative int, or the positions would pass 2**31 - 1
            (positions are int32: start a new stream with a fresh `init`).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> pipe = jb.pipeline({"x": jnp.arange(3)}, jb.fixed_size(2),
        ...                    order=jb.epochs(shuffle=False))
        >>> jb.next_positions(pipe.init(jnp.int32(0)), 4)
        Array([0, 1, 2, 3], dtype=int32)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}.")
    position = state.order.position
    if not isinstance(position, jax.core.Tracer) and int(position) + n > _INT32_MAX:  # pyright: ignore
        raise ValueError(
            f"`n`={n} positions from position {int(position)} pass 2**31 - 1: positions are "
            "int32 (see `jb.pipeline`, Raises). Start a new stream: a fresh `pipe.init` with "
            "another key."
        )
    return position + jnp.arange(n, dtype=jnp.int32)


def progress(state: PipelineState) -> dict[str, Any]:
    """Where a pipeline's stream stands: `position`, `epoch`, `counts` (rows per source).

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> pipe = jb.pipeline({"x": jnp.arange(3)}, jb.fixed_size(2),
        ...                    order=jb.epochs(shuffle=False))
        >>> state = pipe.init(jnp.int32(0))
        >>> _, state = jb.scan(pipe, lambda c, b: c, 0, jnp.arange(4), state=state)
        >>> {k: v.tolist() for k, v in jb.progress(state).items()}
        {'position': 4, 'epoch': 1, 'counts': [4]}
    """
    o = state.order
    return {"position": o.position, "epoch": o.epoch, "counts": o.counts}


def without_data(state: PipelineState) -> PipelineState:
    """`state` with its data replaced by zero-row arrays: a small checkpoint.

    Put the data back with `with_data(loaded, pipe.init(...))`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> pipe = jb.pipeline({"x": jnp.arange(3)}, jb.fixed_size(2),
        ...                    order=jb.epochs(shuffle=False))
        >>> state = pipe.init(jnp.int32(0))
        >>> jb.without_data(state).data["x"].shape
        (0,)
        >>> jb.with_data(jb.without_data(state), state).data["x"].shape
        (3,)
    """
    return eqx.tree_at(lambda s: s.data, state, jax.tree.map(lambda x: x[:0], state.data))


def with_data(state: PipelineState, data: PipelineState) -> PipelineState:
    """`state` with the data of `data` (another pipeline state, e.g. a fresh `init`): the
    inverse of `without_data` (see its example)."""
    return eqx.tree_at(lambda s: s.data, state, data.data)

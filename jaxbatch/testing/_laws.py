"""`check_batcher`: the batcher laws of DESIGN.md as one check anyone can run.

The check runs the batcher over a small stream along every path a user can take (an
un-jitted step loop, `jax.jit`, `lax.scan`, `jb.batch_all`, the bulk path (`jb.consume`,
`jb.collect`), `jb.scan` with a trace-counting consumer, a resumed run,
`vmap` over two streams) and compares everything against the un-jitted step loop, which is
itself checked against the laws. Elements are followed by value: each valid row of a ready
batch is matched to the input row it came from, so a lost, duplicated, invented or reordered
element is named by its input row. Where an output row is not one element (the rows of
input batches regrouped, samples of several channels in one window, packed tokens),
`units=` or `lengths=` says what to follow instead. Every failure is an `AssertionError`
whose message starts with the law that broke ("Law 4 (nothing lost, nothing invented):
...") and says where.

The rooms: this module runs the paths and checks rows (or units); `_bulk.py` checks the
bulk path and the one-call-site rule; `_packing.py` follows tokens through packing
batchers; `_common.py` holds what they share.
"""

import functools
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._src.base import Batcher, Counter, Stats, row_spec
from .._src.checkpoint import load_state, save_state
from .._src.drivers import batch_all
from .._src.element import Element, as_element
from .._src.spec import batch_spec
from ._bulk import check_consumer_traces, check_feed, check_feed_protocol
from ._common import (
    _COUNTERS,
    _WIDE_START,
    _batch_parts,
    _batches,
    _counts,
    _cut,
    _difference,
    _element_parts,
    _fail,
    _masks,
    _read_stats,
    _Record,
    _row_keys,
    _rows_of,
    _show,
    _stats_difference,
    _unit_key,
    _unit_text,
    _valid_rows,
)
from ._packing import check_packed


class CheckReport(NamedTuple):
    """What `check_batcher` ran and what the stream produced.

    Attributes:
        num_elements: elements in the stream.
        num_batches: ready batches (from `step` and `flush` together).
        num_flushes: `flush` calls until it returned `ready=False` (that call included).
        stats: the final `Stats` counters as Python ints, by name.
        resumed_at: the steps a run was saved, loaded and resumed at.
        checks: names of the checks that ran and passed, e.g. `"jit"`, `"vmap"`.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import check_batcher
        >>> report = check_batcher(jb.fixed_size(2), {"x": jnp.arange(3)},
        ...                        check_jit=False, check_vmap=False)
        >>> report.num_batches, report.stats["padded"], "order" in report.checks
        (2, 1, True)
    """

    num_elements: int
    num_batches: int
    num_flushes: int
    stats: dict[str, int]
    resumed_at: tuple[int, ...]
    checks: tuple[str, ...]


class _Checker:
    """The context of one `check_batcher` call: the stream, the specs, the runs."""

    def __init__(
        self, batcher, elements, key, max_flushes, lengths=None, units=None, batch_units=None
    ):
        self.batcher = batcher
        self.key = key
        self.max_flushes = max_flushes
        self.is_element = isinstance(elements, Element)
        element = as_element(elements)
        host = jax.tree.map(np.asarray, element)
        leaves, self.n = _rows_of(host)
        if not leaves:
            raise ValueError("`elements` has no array leaves: nothing to batch.")
        if self.n < 2:
            raise ValueError(
                f"`elements` must hold at least 2 elements (leading axis), got {self.n}: the "
                "one-trace check steps with two different values."
            )
        # The stream, as jax arrays, in the form the user gave it (Element or plain tree).
        self.elements = jax.tree.map(jnp.asarray, element if self.is_element else element.data)
        host_user = host if self.is_element else host.data
        self.host_rows = [jax.tree.map(lambda x, i=i: x[i], host_user) for i in range(self.n)]
        self.rows = [jax.tree.map(jnp.asarray, row) for row in self.host_rows]
        self.spec = row_spec(self.elements)
        self.expected = batch_spec(batcher, self.spec, key=key)
        self.batch_size = _batches(self.expected)[0].valid_mask.shape[0]
        self.like = jax.eval_shape(lambda: batcher.init(self.spec, key=key))
        self.lengths = lengths
        self.batch_units = batch_units
        # Per element, its units (`units(element)`), when units are followed.
        self.element_units = self._element_units(units) if units else []
        self.input_keys = None if lengths or units else self._input_keys(host)
        self.jitted = None

    def init(self) -> Any:
        state = self.batcher.init(self.spec, key=self.key)
        if not isinstance(getattr(state, "stats", None), Stats):
            _fail(
                7,
                f"the state ({type(state).__name__}) has no `stats` field holding a `jb.Stats`; "
                "every batcher state counts with `jb.Stats`, whose 64-bit `Counter`s never wrap.",
            )
        return state

    def _input_keys(self, host: Element) -> list[list[bytes]]:
        """Per output batch (one per shape), a key per input row: the row cut to that
        batch's row shapes (the identity unless a bucket bounds the row)."""
        element_leaves, element_def = jax.tree.flatten(_element_parts(as_element(self.spec)))
        host_leaves = [np.asarray(x) for x in jax.tree.leaves(_element_parts(host))]
        keys = []
        for batch in _batches(self.expected):
            batch_leaves, batch_def = jax.tree.flatten(_batch_parts(batch))
            element_specs = [(s.shape, s.dtype) for s in element_leaves]
            row_specs = [(s.shape[1:], s.dtype) for s in batch_leaves]
            fits = all(
                len(r) == len(e) and all(a <= b for a, b in zip(r, e)) and rd == ed
                for (r, rd), (e, ed) in zip(row_specs, element_specs)
            )
            if element_def != batch_def or not fits:
                raise ValueError(
                    "`check_batcher` follows elements by value, so every batch row must be an "
                    "input element passed through unchanged (or cut to a bucket's row shape); "
                    f"this batcher's batch rows (data, states, metadata) are {batch_def} with "
                    f"{row_specs}, its elements {element_def} with {element_specs}. For packed "
                    "sequences pass `lengths`; where an element brings other units than one "
                    "row (the rows of an input batch, a sample of a channel) pass `units`."
                )
            cut = [_cut(x, r) for x, (r, _) in zip(host_leaves, row_specs)]
            keys.append(_row_keys(cut, self.n))
        return keys

    # ------------------------------------------------------------------- running

    def _record(self, where: str, path: str, emit: Any, stats: dict[str, int]) -> _Record:
        """Check one emission's shapes (law 2) and not-ready mask (law 4); keep it."""
        emit = jax.device_get(emit)
        ready = np.asarray(emit.ready)
        if ready.shape != () or ready.dtype != np.bool_:
            _fail(
                2,
                f"at {where}, {path}, `ready` has shape {ready.shape} and dtype {ready.dtype}; "
                "it must be a scalar bool.",
            )
        difference = self._spec_difference(emit.batch)
        if difference:
            _fail(
                2,
                f"at {where}, {path}, {difference}. Every Emit of a batcher has the one shape "
                "and dtype tree of `jb.batch_spec`.",
            )
        mask = np.concatenate([m.ravel() for m in _masks(emit.batch)])
        if not ready and mask.any():
            _fail(
                4,
                f"at {where}, {path}, a not-ready emission has valid_mask {_show(mask)}; when "
                "`ready` is False the mask must be all False, or a masked loss counts its rows.",
            )
        return _Record(where, bool(ready), emit.batch, stats)

    def _spec_difference(self, batch: Any) -> str | None:
        got, got_def = jax.tree_util.tree_flatten_with_path(batch)
        want, want_def = jax.tree_util.tree_flatten_with_path(self.expected)
        if got_def != want_def:
            return f"the batch has tree structure {got_def}, but `jb.batch_spec` says {want_def}"
        for (path, g), (_, w) in zip(got, want):
            shape, dtype = np.shape(g), jnp.result_type(g)
            if (shape, dtype) != (w.shape, w.dtype):
                return (
                    f"batch{jax.tree_util.keystr(path)} has shape {shape} and dtype {dtype}, "
                    f"but `jb.batch_spec` says shape {w.shape} and dtype {w.dtype}"
                )
        return None

    def where(self, i: int, reverse: bool = False) -> str:
        return f"step {i} (input row {self.n - 1 - i if reverse else i})"

    def drive(self, step, flush, state, path, *, start=0, reverse=False, keep_states=False):
        """Step rows `start..n-1` (of the reversed stream if `reverse`), then flush until not
        ready; every emission recorded."""
        rows = self.rows[::-1] if reverse else self.rows
        records, states = [], []
        for i in range(start, self.n):
            if keep_states:
                states.append(state)
            state, emit = step(state, rows[i])
            records.append(self._record(self.where(i, reverse), path, emit, _read_stats(state)))
        if keep_states:
            states.append(state)
        records += self.drain(flush, state, path)
        return records, states

    def drain(self, flush, state, path) -> list[_Record]:
        records = []
        for k in range(self.max_flushes):
            state, emit = flush(state)
            records.append(self._record(f"flush call {k + 1}", path, emit, _read_stats(state)))
            if not records[-1].ready:
                return records
        _fail(
            3,
            f"`flush` ({path}) was still ready after max_flushes={self.max_flushes} calls. "
            "Each call emits at most one batch and, called until ready=False, it must stop "
            "once its buffers are empty (pass a larger `max_flushes` if it needs more calls).",
        )

    def records_of_scan(self, emits, path, final_stats, reverse=False) -> list[_Record]:
        """Records of `lax.scan`'s stacked emissions (Stats known only after the last)."""
        emits = jax.device_get(emits)
        records = []
        for i in range(self.n):
            emit = jax.tree.map(lambda x, i=i: x[i], emits)
            stats = final_stats if i == self.n - 1 else {}
            records.append(self._record(self.where(i, reverse), path, emit, stats))
        return records

    def functions(self) -> tuple[Callable, Callable]:
        """The `step` and `flush` later runs use: the jitted ones once `check_jit` made them."""
        return self.jitted or (self.batcher.step, self.batcher.flush)

    def scan_fn(self, state, elements):
        return jax.lax.scan(self.batcher.step, state, elements)

    # ------------------------------------------------------------------- comparing

    def compare(self, law: int, got: list[_Record], want: list[_Record], what: str, ref: str):
        """Bit-identical emissions (ready, mask; whole batch when ready) and Stats."""
        for g, w in zip(got, want):
            if g.ready != w.ready:
                _fail(law, f"at {w.where}, {what} emitted ready={g.ready}, {ref} ready={w.ready}.")
            if not g.ready:
                difference = _difference(_masks(g.batch), _masks(w.batch), "valid_mask")
            else:
                difference = _difference(g.batch, w.batch)
            if difference:
                _fail(law, f"at {w.where}, {what} vs {ref}: {difference}.")
            if g.stats and w.stats and g.stats != w.stats:
                _fail(
                    law,
                    f"after {w.where}, the Stats of {what} differ from {ref}: "
                    f"{_stats_difference(g.stats, w.stats)}.",
                )
        if len(got) != len(want):
            _fail(
                law,
                f"{what} needed {self.flushes(got)} flush calls to drain, {ref} "
                f"{self.flushes(want)}.",
            )

    def flushes(self, records: list[_Record]) -> int:
        return sum(r.where.startswith("flush") for r in records)

    # ------------------------------------------------------------------- the laws

    def check_conservation(self, records: list[_Record]) -> list[tuple[int, str]]:
        """Law 4: every valid row is an input row, each at most once; the rest counted.

        Returns the input rows in the order they were emitted, with where they came out.
        """
        candidates = []  # per output batch: key -> the input rows with that value
        for keys in self.input_keys:
            candidates.append({})
            for i, k in enumerate(keys):
                candidates[-1].setdefault(k, []).append(i)
        places: dict[int, str] = {}
        emitted: list[tuple[int, str]] = []
        ready = [r for r in records if r.ready]
        several = len(self.input_keys) > 1
        for b, record in enumerate(ready):
            for j, batch in enumerate(_batches(record.batch)):
                keys = _row_keys(*_rows_of(_batch_parts(batch)))
                for r in np.flatnonzero(np.asarray(batch.valid_mask)):
                    where = f"batch {b}" + (f" (output {j})" if several else "")
                    place = f"{where} row {r} (emitted at {record.where.split(' (')[0]})"
                    rows = candidates[j].get(keys[r])
                    if rows is None:
                        _fail(
                            4,
                            f"{place} is a valid row that matches no input element. Valid "
                            "rows must be input elements, passed through unchanged (padding "
                            "rows must have valid_mask False).",
                        )
                    free = [i for i in rows if i not in places]
                    if not free:
                        which = (
                            f"element {rows[0]} (input row {rows[0]})"
                            if len(rows) == 1
                            else f"the value of input rows {rows}"
                        )
                        _fail(
                            4,
                            f"{which} was emitted {len(rows) + 1} times: at "
                            + ", ".join(places[i] for i in rows)
                            + f" and at {place}. Each element comes out at most once: no "
                            "wrap-around, no re-reads of stale buffer rows.",
                        )
                    places[free[0]] = place
                    emitted.append((free[0], place))

        stats = records[-1].stats
        missing = sorted(set(range(self.n)) - set(places))
        accounted = stats["dropped"] + stats["skipped"]
        if len(missing) > accounted:
            buffered = stats["accepted"] - stats["emitted"] - stats["dropped"]
            hint = (
                f" The Stats also say {buffered} accepted element(s) were still buffered when "
                "`flush` returned ready=False (flush must drain every buffer)."
                if buffered > 0
                else ""
            )
            shown = ", ".join(map(str, missing[:10]))
            shown += f", ... ({len(missing)} in all)" if len(missing) > 10 else ""
            _fail(
                4,
                f"input rows [{shown}] never came out in a valid row, but the Stats count "
                f"{accounted} of them as dropped or skipped (dropped={stats['dropped']}, "
                f"skipped={stats['skipped']}).{hint}",
            )
        if len(missing) < accounted:
            _fail(
                4,
                f"the Stats count {accounted} elements as dropped ({stats['dropped']}) or "
                f"skipped ({stats['skipped']}), but only {len(missing)} never came out.",
            )
        return emitted

    def check_counters(
        self,
        records: list[_Record],
        emitted: list[int] | None = None,
        arrived: list[int] | None = None,
        what: str = "sequences",
    ) -> None:
        """Law 4: the Stats agree with what was seen, after every call. `emitted`: the
        `what` (packed sequences, units) emitted so far after each record (else valid rows);
        `arrived`: the units stepped in so far after each record (else elements)."""
        seen = dict.fromkeys(_COUNTERS, 0)
        steps = 0
        for i, record in enumerate(records):
            steps += record.where.startswith("step")
            if record.ready:  # padding rows: those of the output(s) holding valid rows
                seen["batches"] += 1
                for mask in _masks(record.batch):
                    seen["emitted"] += int(mask.sum())
                    seen["padded"] += mask.size - int(mask.sum()) if mask.any() else 0
            if emitted is not None:
                seen["emitted"] = emitted[i]
            stats = record.stats
            expected = {k: seen[k] for k in ("batches", "emitted", "padded")}
            got = {k: stats[k] for k in expected}
            if got != expected:
                _fail(
                    4,
                    f"after {record.where}, the Stats say {got} but the ready batches so far "
                    f"hold {expected} (batches, "
                    f"{what if emitted is not None else 'valid rows'}, padding rows).",
                )
            came = steps if arrived is None else arrived[i]
            if stats["accepted"] + stats["skipped"] != came:
                came = (
                    f"{steps} elements were stepped in"
                    if arrived is None
                    else f"the {steps} elements stepped in bring {came} units"
                )
                _fail(
                    4,
                    f"after {record.where}, the Stats count accepted={stats['accepted']} + "
                    f"skipped={stats['skipped']}, but {came}.",
                )
        final = records[-1].stats
        buffered = final["accepted"] - final["emitted"] - final["dropped"]
        if buffered != 0:
            _fail(
                4,
                f"after `flush` returned ready=False the Stats say accepted={final['accepted']}, "
                f"emitted={final['emitted']}, dropped={final['dropped']}: {buffered} "
                f"{'elements' if arrived is None else 'units'} unaccounted for. Conservation: "
                "accepted == emitted + dropped once drained.",
            )

    # ------------------------------------------------------------------- units

    def _element_units(self, units: Callable[[Any], Any]) -> list[list[Any]]:
        """`units(element)` of every element, checked to be a list."""
        out = []
        for i, row in enumerate(self.host_rows):
            got = units(row)
            if isinstance(got, str | bytes | Mapping) or not isinstance(got, Sequence):
                raise ValueError(
                    "`units` must return a list: one entry per unit the Stats count, the unit "
                    "as it comes out or None for one that never can; for element "
                    f"{i} it returned {type(got).__name__}."
                )
            out.append(list(got))
        return out

    def emitted_units(self, batch: Any) -> list[tuple[Any, Any, str]]:
        """The units in the valid slots of a ready emission, in order: `(lane, unit,
        label)`; its valid rows (as `jb.Element`s) unless `batch_units` says otherwise."""
        if self.batch_units is None:
            outputs = _batches(batch)
            return [
                (None, row, f"row {r}" + (f" of output {j}" if len(outputs) > 1 else ""))
                for j, b in enumerate(outputs)
                for r, row in _valid_rows(b)
            ]
        got = self.batch_units(batch)
        lanes = got.items() if isinstance(got, Mapping) else [(None, got)]
        out = []
        for lane, units in lanes:
            lane_name = "" if lane is None else f"lane {lane!r} "
            if isinstance(units, str | bytes | Mapping) or not isinstance(units, Sequence):
                raise ValueError(
                    "`batch_units` must return a list of units, or a dict {lane: list of "
                    f"units}}; got {type(units).__name__}"
                    + (f" for lane {lane!r}." if lane is not None else ".")
                )
            for k, unit in enumerate(units):
                if unit is None:
                    raise ValueError(
                        f"`batch_units` returned None as {lane_name}unit {k}: it lists only "
                        "the units that came out (in valid rows or slots)."
                    )
                out.append((lane, unit, f"{lane_name}unit {k}"))
        return out

    def check_units(
        self, records: list[_Record]
    ) -> tuple[dict[Any, list[tuple[int, str]]], list[int], list[int]]:
        """Law 4 on units: every unit in a ready batch is a unit of an input element, none
        comes out twice, those that never come out are as many as the Stats count dropped
        or skipped, and a unit that never can (None) is skipped the step it arrives.

        Returns per lane the units in the order they came out (their number among the
        stream's units, and where), and after each record the units emitted and the units
        stepped in so far.
        """
        units = self.element_units
        self.owner = [(i, k) for i, element in enumerate(units) for k in range(len(element))]
        flat = [unit for element in units for unit in element]
        candidates: dict[tuple, list[int]] = {}  # key -> the input units with that value
        for u, unit in enumerate(flat):
            if unit is not None:
                candidates.setdefault(_unit_key(unit), []).append(u)
        structures = {key[0] for key in candidates}
        places: dict[int, str] = {}
        lanes: dict[Any, list[tuple[int, str]]] = {}
        emitted, arrived = [], []
        steps, stepped_units, skipped, batches = 0, 0, 0, 0
        for record in records:
            if record.where.startswith("step"):
                refused = sum(unit is None for unit in units[steps])
                grew = record.stats["skipped"] - skipped
                if grew < refused:
                    _fail(
                        4,
                        f"element {steps} brings {refused} unit(s) that never come out (None "
                        f"from `units`), but after {record.where} the Stats' skipped grew by "
                        f"{grew}: a unit refused on arrival is counted as skipped.",
                    )
                stepped_units += len(units[steps])
                steps += 1
            skipped = record.stats["skipped"]
            arrived.append(stepped_units)
            if record.ready:
                for lane, unit, label in self.emitted_units(record.batch):
                    place = f"batch {batches} {label} (emitted at {record.where.split(' (')[0]})"
                    key = _unit_key(unit)
                    found = candidates.get(key)
                    if found is None:
                        hint = (
                            f" Its tree structure {key[0]} is that of no input unit (one is "
                            f"{next(iter(structures))}): build the units of `units` and "
                            "`batch_units` alike."
                            if structures and key[0] not in structures
                            else ""
                        )
                        _fail(
                            4,
                            f"{place} matches no unit of an input element: "
                            f"{_unit_text(unit)}. Only the units that `units` gives for the "
                            f"elements may come out (padding rows or slots are never valid)."
                            f"{hint}",
                        )
                    free = [u for u in found if u not in places]
                    if not free:
                        which = (
                            self.unit_name(found[0])
                            if len(found) == 1
                            else "the value of " + ", ".join(self.unit_name(u) for u in found)
                        )
                        _fail(
                            4,
                            f"{which} ({_unit_text(unit)}) was emitted {len(found) + 1} times: "
                            f"at {', '.join(places[u] for u in found)} and at {place}. Each unit "
                            "comes out at most once: no wrap-around, no re-reads of stale "
                            "buffer rows.",
                        )
                    places[free[0]] = place
                    lanes.setdefault(lane, []).append((free[0], place))
                batches += 1
            emitted.append(len(places))

        stats = records[-1].stats
        missing = [u for u in range(len(flat)) if u not in places]
        accounted = stats["dropped"] + stats["skipped"]
        counted = (
            f"the Stats count {accounted} as dropped ({stats['dropped']}) or skipped "
            f"({stats['skipped']})"
        )
        if len(missing) > accounted:
            could = [u for u in missing if flat[u] is not None]
            shown = "; ".join(f"{self.unit_name(u)} ({_unit_text(flat[u], 60)})" for u in could[:5])
            shown += f"; ... ({len(could)} in all)" if len(could) > 5 else ""
            buffered = stats["accepted"] - stats["emitted"] - stats["dropped"]
            hint = (
                f" The Stats also say {buffered} accepted unit(s) were still buffered when "
                "`flush` returned ready=False (flush must drain every buffer)."
                if buffered > 0
                else ""
            )
            _fail(
                4,
                f"{len(missing)} units never came out in a ready batch "
                f"({len(missing) - len(could)} of them None from `units`, which never can), "
                f"but {counted}. Those that never came out: {shown or 'none'}.{hint}",
            )
        if len(missing) < accounted:
            _fail(
                4,
                f"{counted}, but only {len(missing)} units never came out: a unit counted as "
                "dropped or skipped must not come out in a valid row or slot (or `units` "
                "leaves out units that the Stats count: give None for each refused one).",
            )
        return lanes, emitted, arrived

    def unit_name(self, u: int) -> str:
        """Unit `u` of the stream's units (those of element 0 first), by its element."""
        element, k = self.owner[u]
        return f"element {element}'s unit {k}"

    def check_order(
        self, emitted: list[tuple[int, str]], name: Callable[[int], str] = "input row {}".format
    ) -> None:
        """Law 5: a FIFO batcher emits input rows (or units) in increasing order."""
        for (before, before_place), (row, place) in zip(emitted, emitted[1:]):
            if row < before:
                _fail(
                    5,
                    f"{name(row)} came out after {name(before)}: {name(before)} "
                    f"at {before_place}, then {name(row)} at {place}. A "
                    "first-in-first-out batcher keeps the input order; "
                    "pass `fifo=False` if this batcher reorders by design.",
                )

    def check_reference(self, records: list[_Record], reference: Callable) -> None:
        want = list(reference(list(self.host_rows)))
        got = [r for r in records if r.ready]
        if len(got) != len(want):
            _fail(0, f"the batcher emitted {len(got)} ready batches, `reference` {len(want)}.")
        for k, (g, w) in enumerate(zip(got, want)):
            data, mask = (w.data, w.valid_mask) if hasattr(w, "valid_mask") else w
            # With several outputs, `reference` gives the one that holds the batch.
            holding = [b for b in _batches(g.batch) if np.asarray(b.valid_mask).any()]
            batch = (holding or _batches(g.batch))[0]
            for name, got_part, want_part in (
                ("valid_mask", batch.valid_mask, mask),
                ("data", batch.data, data),
            ):
                want_part = jax.tree.map(np.asarray, want_part)
                difference = _difference(got_part, want_part, name)
                if difference:
                    _fail(
                        0,
                        f"ready batch {k} (emitted at {g.where}), the batcher vs `reference`: "
                        f"{difference}.",
                    )

    def check_jit(self, want: list[_Record]) -> tuple[list[_Record], list]:
        """Law 1 under `jax.jit`, and law 2's one trace per shape."""
        traces = {"step": 0, "flush": 0}
        structures = []

        def step(state, element):
            traces["step"] += 1
            structures.append(jax.tree.structure(state))
            return self.batcher.step(state, element)

        def flush(state):
            traces["flush"] += 1
            return self.batcher.flush(state)

        self.jitted = (jax.jit(step), jax.jit(flush))
        got, states = self.drive(
            *self.jitted, self.init(), "under jax.jit (variant `with_jit`)", keep_states=True
        )
        for name, count in traces.items():
            if count != 1:
                changed = next(
                    (i for i in range(1, len(structures)) if structures[i] != structures[0]),
                    None,
                )
                hint = (
                    f" The state's tree structure (static fields, Python values) changed "
                    f"between the first call and call {changed + 1}."
                    if changed is not None and name == "step"
                    else ""
                )
                _fail(
                    2,
                    f"`jax.jit(batcher.{name})` traced {count} times over a stream whose "
                    "elements all have one shape and dtype; a batcher traces once per shape, "
                    "never again because values changed. Look for a value kept in a static "
                    "field or as a Python scalar in the state, a dtype or weak type that "
                    f"changes between calls, or a closure built per call.{hint}",
                )
        what = "the jitted run (`jax.jit(batcher.step)`, `jax.jit(batcher.flush)`)"
        self.compare(1, got, want, what, "the run without jit (variant `without_jit`)")
        return got, states

    def check_scan(self, want: list[_Record]) -> None:
        try:
            state, emits = jax.jit(self.scan_fn)(self.init(), self.elements)
        except AssertionError:
            raise
        except Exception as e:
            _fail(1, f"`jax.lax.scan(batcher.step, state, elements)` failed: {e}")
        got = self.records_of_scan(emits, "under lax.scan", _read_stats(state))
        got += self.drain(self.functions()[1], state, "after lax.scan")
        self.compare(1, got, want, "`jax.lax.scan(batcher.step)`", "the step loop")

    def check_batch_all(self, want: list[_Record]) -> None:
        want = [r for r in want if r.ready]
        room = len(want) + 1
        try:
            batches, count = batch_all(self.batcher, self.elements, max_batches=room, key=self.key)
        except AssertionError:
            raise
        except Exception as e:
            _fail(1, f"`jb.batch_all` failed: {e}")
        batches, count = jax.device_get((batches, int(count)))
        if count != len(want):
            _fail(1, f"`jb.batch_all` produced {count} batches, the step loop {len(want)}.")
        for k, w in enumerate(want):
            got = jax.tree.map(lambda x, k=k: x[k], batches)
            difference = _difference(got, w.batch)
            if difference:
                _fail(
                    1,
                    f"ready batch {k} ({w.where} in the step loop), `jb.batch_all` vs the "
                    f"step loop: {difference}.",
                )

    def check_resume(self, steps: Sequence[int], states: list, want: list[_Record]) -> None:
        """Law 6: save at step t, load into a fresh template, continue: identical output."""
        step, flush = self.functions()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.ckpt")
            for t in steps:
                try:
                    save_state(path, states[t])
                    restored = load_state(path, self.like)
                except Exception as e:
                    _fail(6, f"the state before step {t} does not save and load: {e}")
                got, _ = self.drive(step, flush, restored, f"resumed at step {t}", start=t)
                self.compare(
                    6,
                    got,
                    want[t:],
                    f"the run saved before step {t} and resumed from the loaded state",
                    "the uninterrupted run",
                )

    def check_wide_counters(self, want: list[_Record]) -> None:
        """Law 7: with every counter started just below 2**32, nothing else changes."""
        step, flush = self.functions()
        config = self.init().stats.config  # the same configuration, wider counts
        wide = Stats(**{k: Counter.of(_WIDE_START) for k in _COUNTERS}, config=config)
        try:
            state = eqx.tree_at(lambda s: s.stats, self.init(), wide)
        except Exception as e:
            _fail(7, f"cannot replace the state's `stats` field with `eqx.tree_at`: {e}")
        got, _ = self.drive(step, flush, state, "with counters started at 2**32 - 2")
        shifted = [r._replace(stats={k: v + _WIDE_START for k, v in r.stats.items()}) for r in want]
        self.compare(
            7,
            got,
            shifted,
            "a run with every Stats counter started at 2**32 - 2",
            "the run from zero (counters shifted by 2**32 - 2)",
        )

    def check_vmap(self, want: list[_Record]) -> None:
        """Law 1 under `vmap`: the stream and its reverse together, as two separate runs."""
        step, flush = self.functions()
        want_reverse, _ = self.drive(step, flush, self.init(), "reversed", reverse=True)
        num_flushes = max(self.flushes(want), self.flushes(want_reverse))

        def run(state, elements):  # the stream, then as many flushes as the longer drain
            def flush_body(state, _):
                state, emit = self.batcher.flush(state)
                return state, (emit, state.stats)

            state, step_emits = self.scan_fn(state, elements)
            _, flushes = jax.lax.scan(flush_body, state, None, length=num_flushes)
            return step_emits, state.stats, flushes

        both = jax.tree.map(lambda a, b: jnp.stack([a, b]), self.init(), self.init())
        streams = jax.tree.map(lambda x: jnp.stack([x, jnp.flip(x, 0)]), self.elements)
        run = jax.jit(jax.vmap(run)) if self.jitted else jax.vmap(run)
        try:
            outputs = jax.device_get(run(both, streams))
        except AssertionError:
            raise
        except Exception as e:
            _fail(1, f"`jax.vmap` of `lax.scan(batcher.step)` and `batcher.flush` failed: {e}")
        for s, (name, ref) in enumerate(((" (the stream)", want), (" (reversed)", want_reverse))):
            step_emits, stats, (flush_emits, flush_stats) = jax.tree.map(
                lambda x, s=s: x[s], outputs
            )
            got = self.records_of_scan(step_emits, "under vmap", _counts(stats), reverse=s == 1)
            for k in range(num_flushes):
                emit, stats = jax.tree.map(lambda x, k=k: x[k], (flush_emits, flush_stats))
                got.append(self._record(f"flush call {k + 1}", "under vmap", emit, _counts(stats)))
                if not got[-1].ready:
                    break
            self.compare(1, got, ref, f"`jax.vmap` stream {s}{name}", "a run on its own")

    def check_bad_input(self) -> None:
        """Law 8: an element of the wrong dtype or shape raises `TypeError` naming the leaf."""
        data = self.spec.data if self.is_element else self.spec
        data_leaves = jax.tree_util.tree_flatten_with_path(data)[0]
        if not data_leaves:  # only per-element state or metadata: nothing to corrupt
            return
        path, leaf = data_leaves[0]
        name = jax.tree_util.keystr(path)
        leaf_name = f"`element{'.data' if self.is_element else ''}{name}`"
        other = jnp.int32 if jnp.issubdtype(leaf.dtype, jnp.floating) else jnp.float32
        bad_leaves = {
            f"dtype {np.dtype(other)} instead of {leaf.dtype}": jax.ShapeDtypeStruct(
                leaf.shape, other
            ),
            f"shape {(*leaf.shape, 2)} instead of {leaf.shape}": jax.ShapeDtypeStruct(
                (*leaf.shape, 2), leaf.dtype
            ),
        }
        for what, bad_leaf in bad_leaves.items():
            bad = jax.tree_util.tree_map_with_path(
                lambda p, x, b=bad_leaf: b if p == path else x, data
            )
            if self.is_element:
                bad = self.spec.replace(data=bad)
            try:
                jax.eval_shape(self.batcher.step, self.like, bad)
            except TypeError as e:
                if name and name not in str(e):
                    _fail(
                        8,
                        f"`step` on an element whose leaf {leaf_name} has {what} raised a "
                        f"TypeError that does not name the leaf: {e}",
                    )
                continue
            except Exception as e:
                _fail(
                    8,
                    f"`step` on an element whose leaf {leaf_name} has {what} raised "
                    f"{type(e).__name__}, not TypeError: {e}",
                )
            _fail(
                8,
                f"`step` accepted an element whose leaf {leaf_name} has {what} "
                "without an error. Check elements against the spec (`TypeError` naming the "
                "leaf path) instead of silently casting or broadcasting.",
            )


def _resume_points(resume_steps: None | int | Sequence[int], n: int) -> tuple[int, ...]:
    if resume_steps is None:
        return tuple(range(n + 1))
    if isinstance(resume_steps, bool):
        raise ValueError(f"`resume_steps` must be None, an int or ints, got {resume_steps!r}.")
    if isinstance(resume_steps, int):
        if resume_steps < 0:
            raise ValueError(f"`resume_steps` must be non-negative, got {resume_steps}.")
        return tuple(sorted({round(t) for t in np.linspace(0, n, resume_steps)}))
    steps = tuple(resume_steps)
    bad = [t for t in steps if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= n]
    if bad:
        raise ValueError(
            f"`resume_steps` must be steps in [0, {n}] (the state before that step; {n} is "
            f"before the flush), got {bad}."
        )
    return steps


def check_batcher(
    batcher: Batcher,
    elements: Any,
    *,
    key: Any = None,
    reference: Callable[[list[Any]], Sequence[Any]] | None = None,
    fifo: bool = True,
    resume_steps: None | int | Sequence[int] = None,
    check_vmap: bool = True,
    check_jit: bool = True,
    check_bad_input: bool = True,
    max_flushes: int = 100,
    lengths: Mapping[str, str] | None = None,
    split_sequences: bool = False,
    units: Callable[[Any], Sequence[Any]] | None = None,
    batch_units: Callable[[Any], Sequence[Any] | Mapping[Any, Sequence[Any]]] | None = None,
) -> CheckReport:
    """Check a batcher against the laws of jaxbatch on a small stream; raise if one breaks.

    The stream is run through `step` one element at a time without `jit` (the baseline),
    then `flush` is called until it returns `ready=False`. On the baseline:

    * Law 2: every `Emit` has the shapes and dtypes of `jb.batch_spec` and a scalar bool
      `ready`.
    * Law 3: `flush` stops (returns not ready) within `max_flushes` calls.
    * Law 4: a not-ready emission has an all-False `valid_mask`; every valid row is an input
      element (matched bit for bit), none comes out twice, and those that never come out are
      exactly the ones the `Stats` count as dropped or skipped; after every call the Stats
      agree with the batches seen (`batches`, `emitted`, `padded`, `accepted + skipped`), and
      once drained `accepted == emitted + dropped`.
    * Law 5 (if `fifo`): the valid rows come out in input order.

    With `units`, law 4 and law 5 follow units instead of rows, for batchers whose output
    rows are not their elements. A unit is what the `Stats` count and what comes out in
    one valid row or slot: a valid row of an input batch for `jb.rebatch`, a sample for
    `jb.multi_rate`. `units(element)` lists the units of one element in order, each as it
    comes out (a PyTree of arrays), or None for a unit that can never come out (refused on
    arrival, such as a padding row); `batch_units(batch)` lists the units of a ready
    emission (by default its valid rows, each a `jb.Element` of the row's data, states and
    metadata, as `jb.unbatch` gives them). Law 4 then says: every emitted unit matches (bit
    for bit, same tree structure) a unit of an input element, none comes out twice, those
    that never come out are as many as the Stats count dropped or skipped, a None unit is
    counted as skipped the step it arrives, `accepted + skipped` equals the units of the
    elements stepped in, `emitted` the units seen in ready batches, and `accepted ==
    emitted + dropped` once drained; `batches` and `padded` are counted from `valid_mask`
    as without `units`. Law 5 (if `fifo`): units come out in input order; when
    `batch_units` returns a dict `{lane: units}`, within each lane (a batcher that keeps
    order per channel, not across channels).

    With `lengths` (packing batchers such as `jb.pack` and `jb.concat_and_split`), law 4
    follows tokens instead of rows: each packed feature `k` comes out as `k`,
    `k_segment_ids` and `k_positions`; rows must be well formed (each sequence one run of
    one segment id, ids increasing along the row, 0 on padding; positions counting up
    within a segment, 0 on padding); every input sequence
    (its first `length` tokens) comes out exactly once — whole in one segment, cut to the
    row length if longer, or with `split_sequences=True` in order across rows, cut only
    where a row ends — or is counted as skipped or dropped; the Stats' `emitted` counts the
    sequences that came out whole. Law 5 (if `fifo`) then means every batch holds only
    sequences that came after the previous batch's.
    * `reference` (if given): the ready batches equal its batches exactly (padding included).

    Then every other path must give the baseline's emissions bit for bit (whole batches when
    ready, masks and `Stats` always). The baseline and the jitted run are what
    `chex.variants(without_jit=True, with_jit=True)` would run; they are reported as the
    checks `"without_jit"` and `"with_jit"`, and messages name the variant:

    * Law 1: `jax.jit(step)` and `jax.jit(flush)` (and law 2: each traces once for the whole
      stream), `jax.lax.scan(step)`, `jb.batch_all`, and `jax.vmap` over the stream and its
      reverse (against two separate runs). From a state part-way through the stream, the
      rest through `jb.consume` and `jb.collect` (the bulk `feed` if the batcher has one,
      else the step loop), with and without the end-of-stream flush.
    * The one-call-site rule: `jb.scan` traces the consumer exactly once per program, and
      continuing a stream from the state it returned (same chunk shape) does not retrace.
    * Law 6: at each of `resume_steps`, the state is saved with `jb.save_state`, loaded with
      `jb.load_state` into a template from `jax.eval_shape(init)`, and the run continued.
    * Law 7: a run whose `Stats` counters all start at `2**32 - 2` emits the same and ends
      with every count shifted by exactly that (no 32-bit wrap).
    * Law 8 (if `check_bad_input`): `step` on an element whose first leaf has another dtype,
      or another shape, raises `TypeError` naming that leaf (checked with `jax.eval_shape`).

    Elements (or units) are followed by value, so without `units` or `lengths` the batcher
    must pass elements through unchanged (its batch rows have the element's structure);
    give elements with distinct values to get the most precise messages. Compile time
    dominates: keep the stream short and shapes small.

    Args:
        batcher: the `Batcher` to check.
        elements: at least 2 elements stacked along a leading axis (an `Element` or a PyTree
            of arrays).
        key: PRNG key for a stochastic batcher's `init`.
        reference: a pure-Python batcher: from the list of elements (each a PyTree of
            NumPy arrays, or an `Element` of them) to the list of ready batches, each a
            `(data, valid_mask)` pair or anything with `.data` and `.valid_mask`.
        fifo: the batcher claims first-in-first-out order (law 5).
        resume_steps: where to save and resume: None for before every step and before the
            flush (`0..n`), an int for that many points spread over `0..n`, or a sequence
            of steps.
        check_vmap: run the `vmap` check.
        check_jit: run the jitted paths (`jit`, one trace, `scan`, `batch_all`, `feed`, the
            consumer traces);
            resume, counter and `vmap` runs then step without `jit`.
        check_bad_input: run the law 8 check.
        max_flushes: the most `flush` calls a drain may take.
        lengths: for a packing batcher, `{packed feature: length leaf}` (keys of the
            element's data dict): check conservation of tokens instead of rows.
        split_sequences: with `lengths`, sequences may continue from one row to the next
            (concat-and-split) instead of staying whole in one segment.
        units: `units(element) -> list`: follow units instead of rows (law 4, law 5). It
            gets one element as the checker holds it (a PyTree of NumPy arrays, an
            `Element` of them, or for `jb.rebatch` a `Batch` of them) and returns one entry
            per unit the `Stats` count for it, in input order: the unit as `batch_units`
            reads it out of a batch (any PyTree of arrays), or None for a unit that can
            never come out and must be counted as skipped. Not with `lengths`.
        batch_units: with `units`, `batch_units(batch) -> list | dict`: the units in the
            valid rows or slots of one ready emission (`Emit.batch`, NumPy leaves), in the
            order they came out; a dict `{lane: list}` to check order within each lane
            only. Default: the valid rows, each `jb.Element(data=row, state=row states,
            metadata=row metadata)`.

    Returns:
        A `CheckReport` of what ran and what the stream produced.

    Raises:
        AssertionError: a law broke. The message starts with the law ("Law 4 (nothing
            lost, nothing invented): ...") and names the step or flush call, the input row
            and the leaf.
        ValueError: bad arguments (also: `units` returned no list), or batch rows that
            cannot be matched to elements (pass `units` or `lengths`).

    Examples:
        >>> import dataclasses
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import jaxbatch as jb
        >>> from jaxbatch.testing import check_batcher
        >>> def reference(elements):  # batches of 2, the last one padded with zeros
        ...     xs = [e["x"] for e in elements] + [np.int32(0)] * (len(elements) % 2)
        ...     return [(
        ...         {"x": np.array(xs[i:i + 2])},
        ...         np.array([True, i + 1 < len(elements)]),
        ...     ) for i in range(0, len(elements), 2)]
        >>> report = check_batcher(jb.fixed_size(2), {"x": jnp.arange(5)},
        ...                        reference=reference, check_vmap=False, resume_steps=2)
        >>> report.num_batches, report.resumed_at
        (3, (0, 5))

        A batcher that forgets the last partial batch without counting it fails loudly:

        >>> leaky = jb.fixed_size(2, drop_remainder=True)
        >>> def flush(state):
        ...     new_state, emit = leaky.flush(state)
        ...     return dataclasses.replace(new_state, stats=state.stats), emit  # not counted
        >>> check_batcher(leaky._replace(flush=flush), {"x": jnp.arange(5)}, check_jit=False)
        Traceback (most recent call last):
            ...
        AssertionError: Law 4 (nothing lost, nothing invented): input rows [4] never came ...

        `jb.rebatch` regroups the valid rows of input batches: its units are those rows,
        and a padding row is None (refused, counted as skipped):

        >>> inputs = [jb.Batch.from_parts({"x": jnp.array(x)}, valid_mask=jnp.array(x) >= 0)
        ...           for x in ([0, 1], [2, -1], [3, 4])]
        >>> stream = jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)
        >>> def rows(batch):  # each valid row as `batch_units` reads it: a `jb.Element`
        ...     row = jb.Element(batch.data, batch.states, batch.metadata)
        ...     return [jax.tree.map(lambda x: x[r], row) if valid else None
        ...             for r, valid in enumerate(batch.valid_mask)]
        >>> report = check_batcher(jb.rebatch(2), stream, units=rows,
        ...                        check_jit=False, check_vmap=False, resume_steps=0)
        >>> report.num_batches, report.stats["accepted"], report.stats["skipped"]
        (3, 5, 1)
    """
    if not isinstance(batcher, Batcher):
        raise ValueError(f"`batcher` must be a `jb.Batcher`, got {type(batcher).__name__}.")
    for name, flag in (
        ("fifo", fifo),
        ("check_vmap", check_vmap),
        ("check_jit", check_jit),
        ("check_bad_input", check_bad_input),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"`{name}` must be a bool, got {flag!r}.")
    if isinstance(max_flushes, bool) or not isinstance(max_flushes, int) or max_flushes < 1:
        raise ValueError(f"`max_flushes` must be a positive int, got {max_flushes!r}.")

    if lengths is not None and (
        not isinstance(lengths, Mapping)
        or not lengths
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in lengths.items())
    ):
        raise ValueError(
            "`lengths` must be a non-empty dict {packed feature: its length leaf}, both keys "
            f"of the element's data, e.g. {{'tokens': 'length'}}; got {lengths!r}."
        )
    if not isinstance(split_sequences, bool):
        raise ValueError(f"`split_sequences` must be a bool, got {split_sequences!r}.")
    for name, fn in (("units", units), ("batch_units", batch_units)):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be a function, got {type(fn).__name__}.")
    if units is not None and lengths is not None:
        raise ValueError(
            "Pass `lengths` (follow packed tokens) or `units` (follow units), not both."
        )
    if batch_units is not None and units is None:
        raise ValueError(
            "`batch_units` reads units out of batches; it needs `units`, which says what "
            "units each element brings."
        )
    checker = _Checker(batcher, elements, key, max_flushes, lengths, units, batch_units)
    resume_at = _resume_points(resume_steps, checker.n)
    checks = ["without_jit", "shapes", "mask", "flush"]
    check_feed_protocol(checker)
    baseline, states = checker.drive(
        batcher.step,
        batcher.flush,
        checker.init(),
        "without jit (variant `without_jit`)",
        keep_states=True,
    )
    if units is not None:  # follow units, read from the batches by `batch_units`
        lanes, emitted, arrived = checker.check_units(baseline)
        checker.check_counters(baseline, emitted, arrived, what="units")
        for lane in lanes.values() if fifo else ():  # first in, first out within each lane
            checker.check_order(lane, checker.unit_name)
    elif lengths is None:
        emitted = checker.check_conservation(baseline)
        checker.check_counters(baseline)
        if fifo:
            checker.check_order(emitted)
    else:  # packed output: follow tokens, not rows
        fail = functools.partial(_fail, 4)
        sequences = check_packed(fail, baseline, checker.host_rows, lengths, split_sequences, fifo)
        checker.check_counters(baseline, sequences)
    checks += ["conservation", "counters"] + (["order"] if fifo else [])
    if reference is not None:
        checker.check_reference(baseline, reference)
        checks.append("reference")
    run = baseline
    if check_jit:
        run, states = checker.check_jit(baseline)
        checker.check_scan(baseline)
        checker.check_batch_all(baseline)
        check_feed(checker, states, baseline)
        check_consumer_traces(checker)
        checks += ["with_jit", "jit", "one trace", "scan", "batch_all", "feed"]
        checks += ["consumer traced once"]
    if resume_at:
        checker.check_resume(resume_at, states, run)
        checks.append("resume")
    checker.check_wide_counters(run)
    checks.append("wide counters")
    if check_vmap:
        checker.check_vmap(run)
        checks.append("vmap")
    if check_bad_input:
        checker.check_bad_input()
        checks.append("bad input")
    return CheckReport(
        num_elements=checker.n,
        num_batches=sum(r.ready for r in baseline),
        num_flushes=checker.flushes(baseline),
        stats=baseline[-1].stats,
        resumed_at=resume_at,
        checks=tuple(checks),
    )

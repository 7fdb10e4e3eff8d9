"""Token corpora on disk: a memmap of tokens plus document offsets (`TokenCorpus`), and
ArrayRecord files, Grain's format (`TokenRecords`).

Layout of a corpus folder:

    tokens.bin     every document's tokens, back to back (raw, little-endian `dtype`)
    offsets.npy    int64 `[documents + 1]`: document `i` is `tokens[offsets[i]:offsets[i+1]]`
    corpus.json    {"dtype", "documents", "tokens", "feature"}

`TokenCorpus` is a read-only Sequence of `{feature: tokens}` dicts with random access (no
document is read before it is asked for), so `jb.scan_host` and `jb.iterate` seek in it on
resume, and `ragged={feature: (max_len, length_key)}` pads it straight into a chunk.
"""

import bisect
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_META = "corpus.json"


def _checked(document: Any, i: int, dtype: np.dtype) -> np.ndarray:
    """`documents[i]` as a 1-D little-endian array of `dtype`, refusing what does not fit."""
    array = np.asarray(document)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(
            f"`documents[{i}]` must be a 1-D sequence of integer token ids, got shape "
            f"{array.shape} and dtype {array.dtype}."
        )
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(
            f"`documents[{i}]` holds a token outside {dtype.name}'s range; pass a wider `dtype`."
        )
    return array.astype(dtype.newbyteorder("<"))


class TokenCorpus(Sequence):
    """A corpus written by `write_token_corpus`, opened by memmap (nothing read up front).

    `corpus[i]` is `{feature: tokens}`, the tokens of document `i` (a read-only view of
    the file; the page cache does the reading).

    Args:
        path: the corpus folder.

    Raises:
        FileNotFoundError: `path` holds no corpus.

    Examples:
        >>> import tempfile, numpy as np
        >>> import jaxbatch as jb
        >>> folder = tempfile.mkdtemp()
        >>> corpus = jb.write_token_corpus(folder, [[1, 2, 3], [4], [5, 6]])
        >>> len(corpus), corpus[2]["tokens"].tolist(), corpus.num_tokens
        (3, [5, 6], 6)
    """

    def __init__(self, path: str | os.PathLike):
        meta_path = os.path.join(path, _META)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(
                f"`path` {str(path)!r} holds no token corpus (no {_META}); write one with "
                "`jb.write_token_corpus(path, documents)`."
            )
        with open(meta_path) as f:
            meta = json.load(f)
        self.feature: str = meta["feature"]
        self.num_tokens: int = meta["tokens"]
        # Plain ndarray views of the maps: slicing a `np.memmap` builds another memmap
        # object per document, which costs more than the read itself.
        offsets = np.load(os.path.join(path, "offsets.npy"), mmap_mode="r")
        self.offsets = offsets.view(np.ndarray)
        dtype = np.dtype(meta["dtype"])
        if self.num_tokens:
            self.tokens = np.memmap(
                os.path.join(path, "tokens.bin"), dtype=dtype, mode="r", shape=(self.num_tokens,)
            ).view(np.ndarray)
        else:
            self.tokens = np.zeros(0, dtype)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range for a corpus of {n} documents.")
        start, stop = self.offsets[i % n : i % n + 2].tolist()
        return {self.feature: self.tokens[start:stop]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Many documents at once (what `jb.scan_host` asks for, a chunk at a time)."""
        at = np.asarray(indices, np.int64)
        starts, stops = self.offsets[at].tolist(), self.offsets[at + 1].tolist()
        return [{self.feature: self.tokens[a:b]} for a, b in zip(starts, stops)]


def write_token_corpus(
    path: str | os.PathLike,
    documents: Iterable[Any],
    *,
    dtype: Any = np.int32,
    feature: str = "tokens",
) -> TokenCorpus:
    """Write documents (1-D arrays or lists of token ids) as a `TokenCorpus` folder.

    The documents are streamed to disk one at a time (a generator is fine; only the offsets
    are held in memory).

    Args:
        path: the folder to write (created if missing; its corpus files are replaced).
        documents: an iterable of 1-D sequences of integers.
        dtype: the stored integer dtype.
        feature: the key of the tokens in each `corpus[i]` dict.

    Returns:
        The `TokenCorpus`, opened.

    Raises:
        ValueError: a document that is not 1-D, or a token that does not fit `dtype`.

    Examples:
        >>> import tempfile
        >>> import jaxbatch as jb
        >>> corpus = jb.write_token_corpus(tempfile.mkdtemp(), ([i] * i for i in range(1, 4)))
        >>> [d["tokens"].tolist() for d in corpus]
        [[1], [2, 2], [3, 3, 3]]
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"`dtype` must be an integer dtype, got {dtype}.")
    os.makedirs(path, exist_ok=True)
    offsets, total = [0], 0
    with open(os.path.join(path, "tokens.bin"), "wb") as out:
        for i, document in enumerate(documents):
            array = _checked(document, i, dtype)
            out.write(array.tobytes())
            total += array.size
            offsets.append(total)
    np.save(os.path.join(path, "offsets.npy"), np.asarray(offsets, np.int64))
    meta = {"dtype": dtype.newbyteorder("<").str, "documents": len(offsets) - 1}
    with open(os.path.join(path, _META), "w") as f:
        json.dump({**meta, "tokens": total, "feature": feature}, f)
    return TokenCorpus(path)


def _array_record():
    try:
        from array_record.python import array_record_module
    except ImportError as e:  # pragma: no cover - array_record comes with grain
        raise ImportError(
            "ArrayRecord files need the `array_record` package (it comes with `grain`): "
            "`pip install array_record`."
        ) from e
    return array_record_module


class TokenRecords(Sequence):
    """Token documents in ArrayRecord files (Grain's format), one record per document.

    Each record holds a document's tokens as raw little-endian bytes of `dtype`.
    `records[i]` is `{feature: tokens}` (random access); `records.__getitems__(indices)`
    reads many at once, which `jb.scan_host` uses to read a chunk in one call.

    Args:
        paths: one ArrayRecord file or a list of them (read in order).
        dtype: the tokens' dtype.
        feature: the key of the tokens in each `records[i]` dict.

    Examples:
        >>> import os, tempfile
        >>> import jaxbatch as jb
        >>> path = os.path.join(tempfile.mkdtemp(), "docs.array_record")
        >>> records = jb.write_token_records(path, [[1, 2, 3], [4], [5, 6]])
        >>> len(records), records[2]["tokens"].tolist()
        (3, [5, 6])
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        dtype: Any = np.int32,
        feature: str = "tokens",
    ):
        module = _array_record()
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        self.paths = [os.fspath(p) for p in paths]
        self.dtype, self.feature = np.dtype(dtype).newbyteorder("<"), feature
        # No read-ahead: a chunk is read as one range per file (a few µs per record), and
        # a single record at random costs one read.
        self._readers = [module.ArrayRecordReader(p, "readahead_buffer_size:0") for p in self.paths]
        counts = [reader.num_records() for reader in self._readers]
        self._starts = np.cumsum([0, *counts]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    def _decode(self, record: bytes) -> dict[str, np.ndarray]:
        return {self.feature: np.frombuffer(record, self.dtype)}

    def _file(self, i: int) -> int:
        return bisect.bisect_right(self._starts, i) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return self.__getitems__(list(range(*i.indices(len(self)))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {n} records.")
        i %= n
        f = self._file(i)
        return self._decode(self._readers[f].read([i - self._starts[f]])[0])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """Many records at once: a run of consecutive indices (what `jb.scan_host` asks
        for) is one range read per file."""
        indices = list(indices)
        if not indices or indices != list(range(indices[0], indices[0] + len(indices))):
            return [self[i] for i in indices]
        if not 0 <= indices[0] <= indices[-1] < len(self):
            raise IndexError(f"records {indices[0]}..{indices[-1]} out of range for {len(self)}.")
        out, i, stop = [], indices[0], indices[-1] + 1
        while i < stop:
            f = self._file(i)
            end = min(stop, self._starts[f + 1])
            begin = i - self._starts[f]
            out += [self._decode(r) for r in self._readers[f].read(begin, end - self._starts[f])]
            i = end
        return out


def write_token_records(
    path: str | os.PathLike,
    documents: Iterable[Any],
    *,
    dtype: Any = np.int32,
    group_size: int = 1,
) -> TokenRecords:
    """Write documents (1-D sequences of token ids) to one ArrayRecord file, one record each,
    and open it as `TokenRecords`.

    `group_size` records are compressed together: 1 (the default, what Grain asks for) gives
    the fastest random access; larger groups read faster in order (a chunk at a time, as
    `jb.scan_host` does) but much slower at random, and Grain logs an error for them.

    Raises:
        ValueError: a document that is not 1-D integers, or a token that does not fit `dtype`.

    Examples:
        >>> import os, tempfile
        >>> import jaxbatch as jb
        >>> path = os.path.join(tempfile.mkdtemp(), "docs.array_record")
        >>> [d["tokens"].tolist() for d in jb.write_token_records(path, [[7, 8], [9]])]
        [[7, 8], [9]]
    """
    module = _array_record()
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise ValueError(f"`dtype` must be an integer dtype, got {dtype}.")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"`group_size` must be a positive int, got {group_size!r}.")
    writer = module.ArrayRecordWriter(os.fspath(path), f"group_size:{group_size}")
    try:
        for i, document in enumerate(documents):
            writer.write(_checked(document, i, dtype).tobytes())
    finally:
        writer.close()
    return TokenRecords(path, dtype=dtype)

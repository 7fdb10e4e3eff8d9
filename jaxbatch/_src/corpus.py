"""A token corpus on disk: one flat file of tokens plus document offsets, read by memmap.

Layout of a corpus folder:

    tokens.bin     every document's tokens, back to back (raw, little-endian `dtype`)
    offsets.npy    int64 `[documents + 1]`: document `i` is `tokens[offsets[i]:offsets[i+1]]`
    corpus.json    {"dtype", "documents", "tokens", "feature"}

`TokenCorpus` is a read-only Sequence of `{feature: tokens}` dicts with random access (no
document is read before it is asked for), so `jb.scan_host` and `jb.iterate` seek in it on
resume, and `ragged={feature: (max_len, length_key)}` pads it straight into a chunk.
"""

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_META = "corpus.json"


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
    info = np.iinfo(dtype)
    with open(os.path.join(path, "tokens.bin"), "wb") as out:
        for i, document in enumerate(documents):
            array = np.asarray(document)
            if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
                raise ValueError(
                    f"`documents[{i}]` must be a 1-D sequence of integer token ids, got shape "
                    f"{array.shape} and dtype {array.dtype}."
                )
            if array.size and (array.min() < info.min or array.max() > info.max):
                raise ValueError(
                    f"`documents[{i}]` holds a token outside {dtype.name}'s range; pass a "
                    "wider `dtype`."
                )
            out.write(array.astype(dtype.newbyteorder("<")).tobytes())
            total += array.size
            offsets.append(total)
    np.save(os.path.join(path, "offsets.npy"), np.asarray(offsets, np.int64))
    meta = {"dtype": dtype.newbyteorder("<").str, "documents": len(offsets) - 1}
    with open(os.path.join(path, _META), "w") as f:
        json.dump({**meta, "tokens": total, "feature": feature}, f)
    return TokenCorpus(path)

"""Data that does not fit on the device: a token corpus on disk, streamed through a background
reader into packing and a train step, checkpointed, interrupted mid-epoch and resumed.

What it teaches:

* **A corpus on disk** (`jb.write_token_corpus`): the Python standard library's own source
  files, cut into paragraphs, written as one memmapped file of byte tokens plus document
  offsets. `jb.TokenCorpus` reads any document by index; nothing is loaded up front.
* **`jb.scan_host`**: a background thread reads a chunk of documents, pads them
  (`ragged=`) and puts them on the device while the fused program (`jb.pack` and the train
  step, one call site) runs on the chunk before. Every chunk runs the same compiled
  program, the last short one included.
* **A checkpoint every N chunks** (`checkpoint_path=`, `checkpoint_every=`): one
  `jb.save_state` file holds the train carry, the packer state and the corpus position.
* **Resume without re-reading**: the run is stopped mid-epoch; `resume=path` continues it,
  reading the corpus from the checkpoint's position on (the example counts the documents
  read), and ends with exactly the parameters of an uninterrupted run.

The model is a byte bigram (a `[256, 256]` table of next-byte logits, trained by SGD): each
byte predicts the next byte of its own document, never across a packing boundary.

Run: `python examples/host_feed.py` (about 20 s on 2 CPU cores; `--small`: a few seconds).
"""

import pathlib
import sys
import sysconfig
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxbatch as jb

ROW, ROWS = 256, 4  # packed batches of 4 rows of 256 bytes
RAGGED = {"tokens": (ROW, "length")}


def stdlib_documents(max_files: int, max_len: int = ROW):
    """Paragraphs (split at blank lines, cut to `max_len` bytes) of the first `max_files`
    standard-library files, as int32 byte tokens."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())[:max_files]
    for path in files:
        for paragraph in path.read_bytes().split(b"\n\n"):
            for start in range(0, len(paragraph), max_len):
                piece = paragraph[start : start + max_len]
                if len(piece) >= 2:
                    yield np.frombuffer(piece, np.uint8).astype(np.int32)


def train_step(carry, batch: jb.Batch):
    """One SGD step of the bigram model on a packed batch; carry = (table, loss sum, steps)."""
    table, total, steps = carry
    tokens, segments = batch.data["tokens"], batch.data["tokens_segment_ids"]
    # A byte predicts the next one of the same document (segment), never across documents.
    same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
    weight = same.astype(jnp.float32)

    def loss_fn(table):
        logits = table[tokens[:, :-1]]
        logp = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    loss, grad = jax.value_and_grad(loss_fn)(table)
    return table - 2.0 * grad, total + loss, steps + 1


class Counted:
    """The corpus, counting which documents were read."""

    def __init__(self, corpus):
        self.corpus, self.read = corpus, []

    def __len__(self):
        return len(self.corpus)

    def __getitem__(self, i):
        self.read.append(i)
        return self.corpus[i]


class Stop(Exception):
    pass


def main(small: bool = False) -> dict:
    folder = pathlib.Path(tempfile.mkdtemp(prefix="jaxbatch_host_feed_"))
    corpus = jb.write_token_corpus(folder / "corpus", stdlib_documents(4 if small else 40))
    print(f"corpus: {len(corpus):,} documents, {corpus.num_tokens:,} byte tokens on disk")
    packer = jb.pack(ROW, ROWS, lengths={"tokens": "length"})
    start = (jnp.zeros((256, 256), jnp.float32), jnp.float32(0), jnp.int32(0))
    chunk = 16 if small else 256
    options = dict(chunk_size=chunk, ragged=RAGGED)

    # The uninterrupted run, with a progress bar.
    (table, total, steps), _ = jb.scan_host(packer, train_step, start, corpus, **options)
    full = np.asarray(table)
    print(f"uninterrupted: {int(steps)} steps, mean loss {float(total) / int(steps):.3f} nats")

    # The same run, checkpointed every chunk and stopped during chunk 3 (mid-epoch) ...
    path = folder / "checkpoint"
    seen = []

    def stop_after_two(carry):
        seen.append(1)
        if len(seen) == 3:  # chunk 3 ran, but its checkpoint was not written
            raise Stop

    try:
        jb.scan_host(packer, train_step, start, corpus, **options, checkpoint_path=path,
                     checkpoint_every=1, on_chunk=stop_after_two)  # fmt: skip
    except Stop:
        print("stopped mid-epoch in chunk 3; the last checkpoint stands after chunk 2")
    # ... and resumed from the checkpoint: the corpus is read from its position on.
    counted = Counted(corpus)
    (table, total, steps), _ = jb.scan_host(
        packer, train_step, start, counted, **options, resume=path, progress=not small
    )
    first_read = min(counted.read)
    same = bool(np.array_equal(np.asarray(table), full))
    print(
        f"resumed at document {first_read} (of {len(corpus)}): {int(steps)} steps in all, "
        f"parameters {'identical to' if same else 'DIFFERENT from'} the uninterrupted run"
    )
    return {"documents": len(corpus), "first_read": first_read, "chunk": chunk, "same": same}


if __name__ == "__main__":
    main(small="--small" in sys.argv)

"""The main demo: a byte-level language model trained on packed, variable-length real text,
batching and training fused in one jitted loop.

What it shows:

* **Real variable-length data, no download**: the Python standard library's own source
  files, found from the running interpreter (`sysconfig`), sorted by path, read as bytes.
  Each file is cut into *paragraphs* (a new one at each non-blank line after a blank line:
  a function, a method, a group of statements) and paragraphs longer than `row_length` are
  cut at line boundaries into pieces of at most `row_length` bytes. Each piece is one
  sequence (a "document", from a few bytes to `row_length`); the pieces of a file,
  concatenated, give the file back.
* **A pipeline in one program**: `jb.pipeline` holds the corpus on the device and reads it
  in a new global order every epoch (`jb.epochs`: a keyed bijection of the rows, no
  permuted copy), and `jb.pack` packs the sequences into `[num_rows, row_length]` rows
  (first fit) with per-token segment ids and positions; the bytes are gathered once, into
  the packed rows.
* **A scan-fused training loop, fed in chunks**: `jb.scan_host` runs the pipeline and the
  train step (a small transformer in equinox, Adam written out by hand) as one compiled XLA
  program per chunk of stream positions, the same program for every chunk, while a
  background thread prepares the next chunk; its progress bar shows the loss.
* **Segment masking**: attention is causal *and* within one segment, positions restart at 0
  in each segment, and each byte predicts the next byte of the same segment only (the last
  byte of a segment predicts nothing), so no document sees or predicts another.

It prints the corpus size, the packing efficiency (`jb.packing_stats`), tokens/s, the loss
falling (bits per byte), a sample of generated text, and saves a PNG (loss curve, and a
strip of packed rows coloured by segment id).

Run: `make demo` (or `python examples/demo.py`; `--help` for the flags). The default run
(20 files, two epochs, each in a new order) takes under a minute on 2 quiet CPU cores;
`--long` (500 files, one epoch, ~1,780 steps) about three minutes. `--quick` (6 files, 40
steps, a tinier model) takes about 15 s, mostly compiling.
Needs the `demo` extra: `tqdm` and `matplotlib`.
"""

import argparse
import math
import pathlib
import sysconfig
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from tqdm import tqdm

import jaxbatch as jb

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

REPO = pathlib.Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the corpus


def stdlib_files(max_files: int) -> list[pathlib.Path]:
    """The first `max_files` `.py` files of the running interpreter's standard library,
    sorted by path (third-party `site-packages` excluded)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path
        for path in root.rglob("*.py")
        if "site-packages" not in path.relative_to(root).parts and path.is_file()
    )
    return files[:max_files]


def split_blocks(text: bytes, max_len: int) -> list[bytes]:
    """Cut a file into paragraphs (a new one at each non-blank line after a blank line: a
    function, a method, a group of statements), then into pieces of <= `max_len` bytes at
    line boundaries (a line longer than `max_len` is cut anywhere). Lossless:
    `b"".join(split_blocks(text, n)) == text`."""
    blocks: list[list[bytes]] = [[]]
    previous_blank = True
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        if not blank and previous_blank and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
        previous_blank = blank
    pieces = []
    for block in blocks:
        piece = b""
        for line in block:
            while len(line) > max_len:  # a very long line: cut it anywhere
                if piece:
                    pieces.append(piece)
                    piece = b""
                pieces.append(line[:max_len])
                line = line[max_len:]
            if len(piece) + len(line) > max_len:
                pieces.append(piece)
                piece = b""
            piece += line
        if piece:
            pieces.append(piece)
    return pieces


def load_corpus(max_files: int, max_len: int) -> tuple[dict[str, np.ndarray], int, int]:
    """The sequences, stacked as the packer's elements: `{"bytes": uint8 [n, max_len],
    "length": int32 [n]}`, plus the number of files and of bytes read."""
    files = stdlib_files(max_files)
    sequences, total = [], 0
    for path in files:
        text = path.read_bytes()
        total += len(text)
        sequences += [s for s in split_blocks(text, max_len) if len(s) >= 2]
    data = np.zeros((len(sequences), max_len), np.uint8)
    for i, s in enumerate(sequences):
        data[i, : len(s)] = np.frombuffer(s, np.uint8)
    lengths = np.array([len(s) for s in sequences], np.int32)
    return {"bytes": data, "length": lengths}, len(files), total


# --------------------------------------------------------------------------- the model


class Attention(eqx.Module):
    qkv: eqx.nn.Linear
    out: eqx.nn.Linear
    heads: int = eqx.field(static=True)

    def __call__(self, x, mask):  # x [length, dim], mask [length, length] bool
        length, dim = x.shape
        q, k, v = jnp.split(jax.vmap(self.qkv)(x), 3, axis=-1)
        q, k, v = (a.reshape(length, self.heads, dim // self.heads) for a in (q, k, v))
        logits = jnp.einsum("qhc,khc->hqk", q, k) / math.sqrt(dim // self.heads)
        logits = jnp.where(mask[None], logits, jnp.finfo(logits.dtype).min)
        y = jnp.einsum("hqk,khc->qhc", jax.nn.softmax(logits, axis=-1), v)
        return jax.vmap(self.out)(y.reshape(length, dim))


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attention: Attention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, dim: int, heads: int, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1, self.norm2 = eqx.nn.LayerNorm(dim), eqx.nn.LayerNorm(dim)
        self.attention = Attention(
            eqx.nn.Linear(dim, 3 * dim, key=k1), eqx.nn.Linear(dim, dim, key=k2), heads
        )
        self.up = eqx.nn.Linear(dim, 4 * dim, key=k3)
        self.down = eqx.nn.Linear(4 * dim, dim, key=k4)

    def __call__(self, x, mask):
        x = x + self.attention(jax.vmap(self.norm1)(x), mask)
        hidden = jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.norm2)(x)))
        return x + jax.vmap(self.down)(hidden)


class ByteLM(eqx.Module):
    """A small pre-norm transformer over bytes; positions are positions *within* a segment."""

    embed: eqx.nn.Embedding
    position: eqx.nn.Embedding
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(self, dim: int, layers: int, heads: int, max_len: int, key):
        keys = jax.random.split(key, layers + 3)
        self.embed = eqx.nn.Embedding(256, dim, key=keys[0])
        self.position = eqx.nn.Embedding(max_len, dim, key=keys[1])
        self.blocks = [Block(dim, heads, k) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(dim)
        self.head = eqx.nn.Linear(dim, 256, key=keys[2])

    def __call__(self, tokens, segment_ids, positions):  # one row: [length] each
        """Next-byte logits `[length, 256]`. Token `q` sees token `k` only if `k <= q` and
        both are in the same segment (padding, segment 0, sees only padding)."""
        length = tokens.shape[0]
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal & (segment_ids[:, None] == segment_ids[None, :])
        x = jax.vmap(self.embed)(tokens.astype(jnp.int32)) + jax.vmap(self.position)(positions)
        for block in self.blocks:
            x = block(x, mask)
        return jax.vmap(self.head)(jax.vmap(self.norm)(x))


def loss_fn(params, static, batch: jb.Batch):
    """Mean next-byte cross-entropy (nats) over the targets that stay inside a segment."""
    model = eqx.combine(params, static)
    tokens, seg = batch.data["bytes"], batch.data["bytes_segment_ids"]
    logits = jax.vmap(model)(tokens, seg, batch.data["bytes_positions"])
    targets = tokens[:, 1:].astype(jnp.int32)
    # Byte i predicts byte i + 1 only when both belong to the same (real) segment.
    keep = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0) & batch.valid_mask[:, None]
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    count = jnp.sum(keep.astype(jnp.float32))
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.maximum(count, 1.0), count


# --------------------------------------------------------------------------- training


class TrainState(NamedTuple):
    params: eqx.Module  # the model's arrays (`eqx.partition`)
    mu: eqx.Module  # Adam's first moment
    nu: eqx.Module  # Adam's second moment
    step: jax.Array  # optimiser steps taken
    max_steps: jax.Array  # steps past this are skipped (and the lr schedule ends here)
    losses: jax.Array  # [capacity] the loss of each step, nats per byte
    tokens: jax.Array  # target bytes trained on
    first_rows: jax.Array  # [num_rows, row_length] segment ids of the first batch (picture)


def make_train_step(static, lr: float, warmup: int):
    """The consumer `jb.scan` calls on every packed batch: one Adam step (built once)."""

    def update(state: TrainState, batch: jb.Batch) -> TrainState:
        (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, static, batch
        )
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g / jnp.maximum(1.0, norm), grads)  # clip at 1
        t = (state.step + 1).astype(jnp.float32)
        frac = jnp.minimum(t / state.max_steps.astype(jnp.float32), 1.0)
        rate = lr * jnp.minimum(1.0, t / warmup) * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * frac)))
        mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, state.mu, grads)
        nu = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * g**2, state.nu, grads)
        params = jax.tree.map(
            lambda p, m, v: p - rate * (m / (1 - 0.9**t)) / (jnp.sqrt(v / (1 - 0.99**t)) + 1e-8),
            state.params,
            mu,
            nu,
        )
        return TrainState(
            params,
            mu,
            nu,
            state.step + 1,
            state.max_steps,
            state.losses.at[state.step].set(loss, mode="drop"),
            state.tokens + count.astype(jnp.int32),
            jnp.where(state.step == 0, batch.data["bytes_segment_ids"], state.first_rows),
        )

    def train_step(state: TrainState, batch: jb.Batch) -> TrainState:
        return jax.lax.cond(state.step < state.max_steps, update, lambda s, b: s, state, batch)

    return train_step


def make_sampler(static, length: int):
    @jax.jit
    def sample(params, prompt, start, key, temperature):
        """Continue `prompt[:start]` up to `length` bytes, one byte per forward pass."""
        model = eqx.combine(params, static)
        ones, positions = jnp.ones((length,), jnp.int32), jnp.arange(length, dtype=jnp.int32)

        def body(i, carry):
            tokens, key = carry
            key, sub = jax.random.split(key)
            logits = model(tokens, ones, positions)[i - 1] / temperature
            return tokens.at[i].set(jax.random.categorical(sub, logits).astype(tokens.dtype)), key

        tokens, _ = jax.lax.fori_loop(start, length, body, (prompt, key))
        return tokens

    return sample


# --------------------------------------------------------------------------- the run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-files", type=int, default=None, help="stdlib files (sorted)")
    parser.add_argument("--epochs", type=int, default=None, help="passes over the corpus")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--quick", action="store_true", help="a tiny run (~15 s, for tests)")
    parser.add_argument(
        "--long", action="store_true", help="500 files, one epoch (~3 min on 2 quiet cores)"
    )
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "demo_out", help="PNG dir")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    lr = args.lr
    # The default run (20 files, two epochs, each in a new order) fits in a minute on two
    # quiet CPU cores; `--long` is the earlier default, a longer look at the loss falling.
    files, epochs = (500, 1) if args.long else (20, 2)
    args.max_files = args.max_files or files
    args.epochs = args.epochs or epochs
    # Sizes: bytes per row, rows per batch, sequences per `jb.scan` call, model width.
    if args.quick:
        args.max_files = min(args.max_files, 6)
        args.steps = args.steps or 40
        args.row_length, args.num_rows, args.chunk = 128, 4, 64
        args.dim, args.layers, args.heads, args.lr = 32, 1, 2, 1e-2
    else:
        args.row_length, args.num_rows, args.chunk = 256, 16, 256
        args.dim, args.layers, args.heads, args.lr = 64, 2, 4, 1e-2
    args.lr = lr or args.lr
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    L, R = args.row_length, args.num_rows

    t0 = time.perf_counter()
    corpus, num_files, num_bytes = load_corpus(args.max_files, L)
    n = len(corpus["length"])
    lengths = corpus["length"]
    print(
        f"corpus: {num_files} files, {num_bytes:,} bytes of Python from "
        f"{sysconfig.get_paths()['stdlib']}\n"
        f"        -> {n:,} sequences (paragraphs, cut to <= {L} bytes): "
        f"length min {lengths.min()}, median {int(np.median(lengths))}, max {lengths.max()}"
    )

    batcher = jb.pack(L, R, lengths={"bytes": "length"})  # built once: a static argument
    print(f"packing: jb.pack into batches of {R} rows x {L} bytes (first fit)")

    # The pipeline: the corpus on the device, read in a new global order every epoch (a keyed
    # bijection of the rows, no permuted copy), packed by `jb.pack`. Its elements are stream
    # positions and its state (the data, where the stream stands, the packer's state) is the
    # whole checkpoint. `lengths=`: pack plans on lengths and gathers the bytes once.
    pipe = jb.pipeline(
        {k: jnp.asarray(v) for k, v in corpus.items()},
        batcher,
        order=jb.epochs(num_epochs=args.epochs),
        lengths={"bytes": "length"},
    )
    positions = np.arange(args.epochs * n, dtype=np.int32)
    num_chunks = -(-len(positions) // args.chunk)

    model = ByteLM(args.dim, args.layers, args.heads, L, jax.random.key(args.seed))
    params, static = eqx.partition(model, eqx.is_array)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: {args.layers}-layer transformer, width {args.dim}, {args.heads} heads, "
        f"{num_params:,} parameters; Adam, lr {args.lr}, segment-masked attention and loss"
    )
    capacity = args.epochs * n // R + 2  # a mid-stream batch holds >= R sequences
    max_steps = min(capacity, args.steps) if args.steps else capacity
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = TrainState(
        params,
        zeros,
        zeros,
        jnp.int32(0),
        jnp.int32(max_steps),
        jnp.full((capacity,), jnp.nan, jnp.float32),
        jnp.int32(0),
        jnp.zeros((R, L), jnp.int32),
    )
    train_step = make_train_step(static, args.lr, warmup=min(50, max_steps // 5 + 1))

    total = int(lengths.sum()) * args.epochs
    print(
        f"training: {args.epochs} epoch(s) of {total // args.epochs:,} bytes, each in a new "
        f"order"
        + (f", at most {args.steps} steps" if args.steps else "")
        + f", {num_chunks} jitted chunks of {args.chunk} sequences"
    )
    # `jb.scan_host` runs the fused program (pipeline + train step) once per chunk of stream
    # positions, every chunk the same compiled program, while a background thread prepares
    # the next chunk; its bar counts sequences and shows what `report` returns (the loss).
    report_every = max(1, num_chunks // 10)
    curve: list[tuple[int, float]] = []
    clock = {"chunk": 0, "step": 0, "tokens": 0, "at": time.perf_counter()}
    timed = {"tokens": 0, "seconds": 0.0, "first": 0.0}

    def report(state: TrainState) -> dict[str, str]:
        step, tokens = int(state.step), int(state.tokens)  # waits for this chunk
        now = time.perf_counter()
        seconds, i = now - clock["at"], clock["chunk"]
        if i == 0:
            timed["first"] = seconds
        elif step > clock["step"]:
            timed["tokens"] += tokens - clock["tokens"]
            timed["seconds"] += seconds
        losses = np.asarray(state.losses[clock["step"] : step]) / math.log(2)
        if len(losses):
            curve.append((step, float(losses.mean())))
        if len(losses) and (i % report_every == 0 or i >= num_chunks - 1):
            rate = (tokens - clock["tokens"]) / seconds
            where = f"chunk {i + 1:3d}/{num_chunks}" if i < num_chunks else "final flush"
            tqdm.write(
                f"  {where}  step {step:5d}  "
                f"loss {curve[-1][1]:.3f} bits/byte  {rate:,.0f} tokens/s"
                + ("  (includes compile)" if i == 0 or i >= num_chunks else "")
            )
        clock.update(chunk=i + 1, step=step, tokens=tokens, at=time.perf_counter())
        return {"step": step, "loss": f"{curve[-1][1]:.2f}"} if curve else {"step": step}

    key = jax.random.key(args.seed)
    state, pipe_state = jb.scan_host(
        pipe,
        train_step,
        state,
        positions,
        chunk_size=args.chunk,
        key=key,
        state=pipe.init(jnp.int32(0), key=key),  # made here: the data is an argument
        progress=True,
        on_chunk=report,
        max_batches_per_chunk=args.chunk + 2,
    )
    packer = pipe_state.inner
    stats = {k: int(v) for k, v in jb.packing_stats(packer).items()}
    ops = {k: int(v) for k, v in jb.operation_stats(packer).items()}
    train_seconds = time.perf_counter() - t0
    efficiency = stats["tokens"] / max(stats["tokens"] + stats["padding_tokens"], 1)
    print(
        f"packing efficiency: {efficiency:.1%} of token slots hold real bytes "
        f"({stats['sequences']:,} sequences in {stats['rows']:,} rows, "
        f"{stats['sequences'] / max(stats['rows'], 1):.1f} per row; "
        f"{ops['batch_count']} batches, {stats['truncated']} truncated)"
    )
    steady = timed["tokens"] / timed["seconds"] if timed["seconds"] else float("nan")
    print(
        f"throughput: {steady:,.0f} tokens/s after compile ({int(state.step)} steps, "
        f"{int(state.tokens):,} target bytes; first chunk with compile {timed['first']:.1f} s)"
    )
    losses = np.asarray(state.losses)[: int(state.step)] / math.log(2)
    head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
    print(
        f"loss: {head.mean():.3f} -> {tail.mean():.3f} bits/byte "
        f"(first and last tenth of the steps; 8 bits/byte is a uniform guess)"
    )

    prompt_text = b"def "
    sample = make_sampler(static, min(L, 160))
    prompt = (
        jnp.zeros((min(L, 160),), jnp.uint8)
        .at[: len(prompt_text)]
        .set(jnp.frombuffer(prompt_text, jnp.uint8))
    )
    text = sample(state.params, prompt, len(prompt_text), jax.random.key(args.seed), 0.7)
    print("sample (temperature 0.7, prompt b'def '):")
    print("  | " + bytes(np.asarray(text)).decode("utf-8", "replace").replace("\n", "\n  | "))

    path = save_picture(args.out, np.asarray(state.first_rows), losses, curve, efficiency)
    print(f"picture: {path}")
    print(f"total time: {time.perf_counter() - t0:.1f} s (training {train_seconds:.1f} s)")


def save_picture(out: pathlib.Path, seg, losses, curve, efficiency) -> pathlib.Path:
    """Loss curve on top; below, the first packed batch `seg` (segment ids), one colour per
    segment."""
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 7), gridspec_kw={"height_ratios": [3, 2]}, layout="constrained"
    )
    top.plot(np.arange(1, len(losses) + 1), losses, lw=0.6, alpha=0.4, label="per step")
    if curve:
        top.plot(*zip(*curve, strict=True), "o-", lw=1.5, label="per chunk (mean)")
    top.set(xlabel="step", ylabel="bits per byte", title="Byte-level LM on the Python stdlib")
    top.legend()
    colours = plt.get_cmap("tab20")(np.arange(20))
    rows = np.arange(seg.shape[0])[:, None]
    image = colours[(seg - 1 + 7 * rows) % 20]  # shifted per row: neighbours differ
    image[seg == 0] = (1.0, 1.0, 1.0, 1.0)  # padding
    bottom.imshow(image, aspect="auto", interpolation="nearest")
    bottom.yaxis.get_major_locator().set_params(integer=True)
    bottom.set(
        xlabel="byte in row",
        ylabel="row",
        title=f"First packed batch, one colour per segment (white: padding); "
        f"packing efficiency {efficiency:.1%}",
    )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

"""`save_state` / `load_state`: a batcher state on disk, checked on the way back in.

A state is a PyTree, so equinox's leaf serialisation (`eqx.tree_serialise_leaves`, one `.npy`
record per leaf) does the payload. Around it goes what `tree_deserialise_leaves` alone cannot
give: a header that describes the saved tree, so that a `like` of another structure, shape or
dtype is refused by name instead of loading wrongly, and checksums, so that a truncated or
corrupt file is refused instead of loading garbage.

File layout (version 1; integers little-endian):

    b"\\x93JAXBATCH"                 9 bytes, magic
    version                          uint32
    header length                    uint64
    SHA-256 of all of the above + the header bytes     32 bytes
    header                           UTF-8 JSON: tree structure (node types, static
                                     fields), every leaf's path, kind,
                                     shape, dtype (typed keys: impl and key-data shape),
                                     payload length and SHA-256
    payload                          `eqx.tree_serialise_leaves` of the stored leaves

Leaves that a state may hold:

* JAX arrays of any dtype (bfloat16, float8, int4, ... included), restored bit for bit.
* Typed PRNG keys (`jax.random.key`): their `jax.random.key_data` is stored, with the impl
  name, and wrapped back with `jax.random.wrap_key_data`.
* NumPy arrays and NumPy scalars.
* Python `bool`/`int`/`float`/`complex`, stored exactly (as bool/int64/float64/complex128).
  For the structure check a Python scalar is described as `jax.eval_shape` describes it (a
  0-d array of JAX's dtype for it), so a state holding Python scalars loads against the
  output of `jax.eval_shape(init, ...)` and vice versa.

The type of each loaded leaf follows `like`: a `jax.Array` or `jax.ShapeDtypeStruct` gives a
`jax.Array` (placed with the `like` leaf's sharding where it has one), a NumPy array gives a
NumPy array, a Python scalar gives a Python scalar. Any other leaf (a string, a function) is
refused with `TypeError`: make it a static field (`eqx.field(static=True)`), which is part of
the tree structure and so is checked too.
"""

import hashlib
import io
import json
import os
import re
import struct
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from .base import configs_of

_MAGIC = b"\x93JAXBATCH"
_VERSION = 1
_PREFIX = struct.Struct("<IQ")  # version, header length
_DIGEST_SIZE = hashlib.sha256().digest_size
_FIXED_SIZE = len(_MAGIC) + _PREFIX.size + _DIGEST_SIZE

_PYTHON_SCALARS: dict[str, type] = {"bool": bool, "int": int, "float": float, "complex": complex}
# How Python scalars are stored: exactly, whatever JAX's x64 setting.
_PYTHON_STORED_DTYPES = {
    "bool": np.dtype(bool),
    "int": np.dtype(np.int64),
    "float": np.dtype(np.float64),
    "complex": np.dtype(np.complex128),
}
# Static fields may hold functions or other objects whose repr carries a memory address;
# the address differs from process to process but the structure does not.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ----------------------------------------------------------------------------- helpers


def _leaf_name(path: Any) -> str:
    return "state" + jax.tree_util.keystr(path)


def _structure(treedef: Any) -> str:
    """The tree structure as text: node types (by qualified name), aux data, children.

    Spelled out here rather than taken from `str(treedef)`, whose format is JAX's to change.
    """
    node = treedef.node_data()
    if node is None:
        return "*"
    node_type, aux = node
    aux_text = "" if aux is None else f"[{_ADDRESS.sub('', repr(aux))}]"
    children = ", ".join(_structure(child) for child in treedef.children())
    return f"{node_type.__qualname__}{aux_text}({children})"


def _is_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | jax.ShapeDtypeStruct) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _python_type_name(leaf: Any) -> str | None:
    # `bool` before `int`: a bool is an int to `isinstance`.
    for name, typ in _PYTHON_SCALARS.items():
        if type(leaf) is typ:
            return name
    return None


def _jax_dtype_of_python(name: str) -> np.dtype:
    """The dtype JAX (and so `jax.eval_shape`) gives a Python scalar of type `name`."""
    return np.dtype(jax.dtypes.canonicalize_dtype(_PYTHON_STORED_DTYPES[name]))


def _check_dtype(name: str, dtype: np.dtype) -> None:
    """Refuse dtypes that cannot be stored without pickling, or named back from a string."""
    try:
        round_trips = jnp.dtype(str(dtype)) == dtype
    except TypeError:
        round_trips = False
    if dtype.hasobject or not round_trips:
        raise TypeError(
            f"Leaf `{name}` has dtype {dtype}, which a checkpoint cannot hold. Use a numeric, "
            "bool or ml_dtypes dtype."
        )


def _describe_saved(path: Any, leaf: Any) -> tuple[dict[str, Any], np.ndarray]:
    """The header entry of one leaf of `state`, and the array stored for it."""
    name = _leaf_name(path)
    if isinstance(leaf, jax.core.Tracer):  # pyright: ignore
        raise TypeError(
            f"Leaf `{name}` is a tracer: `save_state` needs concrete arrays, so call it "
            "outside `jax.jit` (on the state a jitted function returns)."
        )
    entry: dict[str, Any] = {"path": name}
    python_type = _python_type_name(leaf)
    if python_type is not None:
        stored = np.asarray(leaf)
        if stored.dtype != _PYTHON_STORED_DTYPES[python_type]:
            raise ValueError(
                f"Leaf `{name}` is the Python {python_type} {leaf!r:.60}, which does not fit "
                f"{_PYTHON_STORED_DTYPES[python_type]}. Store it as an array."
            )
        entry.update(kind="python", python_type=python_type, shape=[], dtype=str(stored.dtype))
    elif _is_key(leaf):
        stored = np.asarray(jax.random.key_data(leaf))
        entry.update(
            kind="key",
            shape=list(leaf.shape),
            dtype=str(leaf.dtype),
            key_impl=str(jax.random.key_impl(leaf)),
        )
    elif isinstance(leaf, jax.Array | np.ndarray | np.generic):
        stored = np.asarray(leaf)
        _check_dtype(name, stored.dtype)
        kind = "jax" if isinstance(leaf, jax.Array) else "numpy"
        entry.update(kind=kind, shape=list(stored.shape), dtype=str(stored.dtype))
    else:
        raise TypeError(
            f"Leaf `{name}` is a {type(leaf).__name__} ({leaf!r:.60}); a checkpoint holds "
            "arrays, typed PRNG keys and Python/NumPy scalars. Make it a static field "
            "(`eqx.field(static=True)`) or encode it as an array."
        )
    entry.update(stored_shape=list(stored.shape), stored_dtype=str(stored.dtype))
    return entry, stored


def _describe_like(name: str, leaf: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype) of one `like` leaf, Python scalars described as JAX sees them."""
    python_type = _python_type_name(leaf)
    if python_type is not None:
        return (), str(_jax_dtype_of_python(python_type))
    if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct | np.ndarray | np.generic):
        return tuple(leaf.shape), str(leaf.dtype)
    raise TypeError(
        f"`like` leaf `{name}` is a {type(leaf).__name__} ({leaf!r:.60}); `like` holds arrays, "
        "`jax.ShapeDtypeStruct`s and Python/NumPy scalars, e.g. `jax.eval_shape(init, ...)`."
    )


def _describe_header_leaf(entry: dict[str, Any]) -> tuple[tuple[int, ...], str]:
    if entry["kind"] == "python":
        return (), str(_jax_dtype_of_python(entry["python_type"]))
    return tuple(entry["shape"]), entry["dtype"]


def _corrupt(path: Any, detail: str) -> ValueError:
    return ValueError(
        f"Checkpoint {os.fspath(path)!r} is truncated or corrupt: {detail}. Save the state "
        "again or load an earlier checkpoint."
    )


def _incompatible(path: Any, detail: str) -> ValueError:
    return ValueError(
        f"Checkpoint {os.fspath(path)!r} is structurally incompatible with `like`: {detail}. "
        "Build `like` with the same code and configuration that made the saved state, e.g. "
        "`jax.eval_shape(batcher.init, spec, key)`."
    )


def _first_difference(a: str, b: str, width: int = 60) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    start = max(0, i - width)
    return f"...{a[start : i + width]}... in the file, ...{b[start : i + width]}... in `like`"


# ----------------------------------------------------------------------------- saving


def save_state(path: str | os.PathLike, state: PyTree) -> None:
    """Save `state` (any PyTree of arrays, typically a batcher state) to the file `path`.

    The file records the tree structure and every leaf's path, shape and dtype, so that
    `load_state` can refuse a mismatched `like`, and checksums of everything, so that it can
    refuse a truncated or corrupt file. The write is atomic: the state goes to a temporary
    file beside `path`, which then replaces `path`, so a crash mid-save never leaves a
    half-written checkpoint under the final name.

    Leaves may be JAX arrays (of any dtype), typed PRNG keys (`jax.random.key`), NumPy
    arrays and scalars, and Python bool/int/float/complex (stored exactly). Non-array
    configuration belongs in static fields (`eqx.field(static=True)`), which are part of the
    recorded tree structure.

    Args:
        path: file to write (a `str` or `os.PathLike`); its directory must exist.
        state: the PyTree to save. Call this outside `jax.jit`, on concrete arrays.

    Raises:
        TypeError: a leaf is not an array, key or scalar (its path is named), or is a tracer.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> state = {"count": jnp.uint32(7), "key": jax.random.key(0)}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "state.ckpt")
        ...     jb.save_state(path, state)
        ...     restored = jb.load_state(path, like=state)
        >>> restored["count"]
        Array(7, dtype=uint32)
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    entries, stored = [], []
    for leaf_path, leaf in flat:
        entry, array = _describe_saved(leaf_path, leaf)
        entries.append(entry)
        stored.append(array)

    payload_file = io.BytesIO()
    eqx.tree_serialise_leaves(payload_file, stored)
    payload = payload_file.getvalue()
    header = {
        "treedef": _structure(treedef),
        "leaves": entries,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "configs": configs_of(state),
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    prefix = _MAGIC + _PREFIX.pack(_VERSION, len(header_bytes))
    digest = hashlib.sha256(prefix + header_bytes).digest()

    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            for part in (prefix, digest, header_bytes, payload):
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


# ----------------------------------------------------------------------------- loading


def _read_header(path: Any, data: bytes) -> tuple[dict[str, Any], bytes]:
    """Verify everything but the match with `like`; return the header and the payload."""
    if not data:
        raise _corrupt(path, "the file is empty")
    if data[: len(_MAGIC)] != _MAGIC[: len(data)]:
        raise _corrupt(
            path,
            f"it does not start with the magic bytes {_MAGIC!r}, so it was not written by "
            "`jaxbatch.save_state`",
        )
    if len(data) < _FIXED_SIZE:
        raise _corrupt(path, f"the file is {len(data)} bytes, shorter than its fixed header")
    version, header_len = _PREFIX.unpack_from(data, len(_MAGIC))
    if version != _VERSION:
        raise _corrupt(
            path,
            f"it declares format version {version}, but this jaxbatch reads version {_VERSION} "
            "only (a file from a newer jaxbatch needs that jaxbatch)",
        )
    header_start = _FIXED_SIZE
    header_end = header_start + header_len
    if header_end > len(data):
        raise _corrupt(
            path, f"the header needs {header_len} bytes, {len(data) - header_start} remain"
        )
    header_bytes = data[header_start:header_end]
    digest = data[header_start - _DIGEST_SIZE : header_start]
    if hashlib.sha256(data[: header_start - _DIGEST_SIZE] + header_bytes).digest() != digest:
        raise _corrupt(path, "the header checksum does not match")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        payload_bytes = int(header["payload_bytes"])
        payload_sha256 = str(header["payload_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"the header cannot be read ({e})") from None
    payload = data[header_end:]
    if len(payload) < payload_bytes:
        raise _corrupt(path, f"the payload is {len(payload)} bytes, {payload_bytes} expected")
    if len(payload) > payload_bytes:
        extra = len(payload) - payload_bytes
        raise _corrupt(path, f"{extra} unexpected byte(s) follow the payload")
    if hashlib.sha256(payload).hexdigest() != payload_sha256:
        raise _corrupt(path, "the payload checksum does not match")
    return header, payload


def _check_compatible(path: Any, header: dict[str, Any], like: PyTree) -> list[Any]:
    """Raise unless `like` matches the header; return `like`'s leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    entries = header["leaves"]
    saved_paths = [entry["path"] for entry in entries]
    like_paths = [_leaf_name(p) for p, _ in flat]
    if saved_paths != like_paths:
        saved_set, like_set = set(saved_paths), set(like_paths)
        only_saved = [p for p in saved_paths if p not in like_set]
        only_like = [p for p in like_paths if p not in saved_set]
        parts = []
        if only_saved:
            parts.append(f"leaves in the file but not in `like`: {only_saved}")
        if only_like:
            parts.append(f"leaves in `like` but not in the file: {only_like}")
        if not parts:
            parts.append(f"leaf order {saved_paths} in the file, {like_paths} in `like`")
        detail = "; ".join(parts)
        raise _incompatible(path, detail)
    like_structure = _structure(treedef)
    if header["treedef"] != like_structure:
        raise _incompatible(
            path,
            "the tree structure differs (node types or static fields): "
            + _first_difference(header["treedef"], like_structure),
        )
    leaves = []
    for entry, (leaf_path, leaf) in zip(entries, flat):
        name = _leaf_name(leaf_path)
        saved_shape, saved_dtype = _describe_header_leaf(entry)
        like_shape, like_dtype = _describe_like(name, leaf)
        if (saved_shape, saved_dtype) != (like_shape, like_dtype):
            raise _incompatible(
                path,
                f"leaf `{name}` has shape {saved_shape} and dtype {saved_dtype} in the file, "
                f"but shape {like_shape} and dtype {like_dtype} in `like`",
            )
        leaves.append(leaf)
    return leaves


def _read_payload(path: Any, header: dict[str, Any], payload: bytes) -> list[np.ndarray]:
    """The stored arrays, checked against the shapes and dtypes the header promises."""
    try:
        dtypes = [jnp.dtype(entry["stored_dtype"]) for entry in header["leaves"]]
        # Zero-memory stand-ins of the right shape and dtype for `tree_deserialise_leaves`.
        placeholders = [
            np.broadcast_to(np.zeros((), dtype), tuple(entry["stored_shape"]))
            for dtype, entry in zip(dtypes, header["leaves"])
        ]
    except (TypeError, KeyError) as e:
        raise _corrupt(path, f"the header names an unknown dtype or shape ({e})") from None

    def load_leaf(f: Any, placeholder: np.ndarray) -> np.ndarray:
        array = np.load(f, allow_pickle=False)
        # `np.save` writes ml_dtypes (bfloat16, float8, int4, ...) as raw void bytes.
        if array.dtype != placeholder.dtype and array.dtype.kind == "V":
            array = array.view(placeholder.dtype)
        return array

    payload_file = io.BytesIO(payload)
    try:
        stored = eqx.tree_deserialise_leaves(payload_file, placeholders, filter_spec=load_leaf)
    except (ValueError, RuntimeError, OSError, EOFError) as e:
        raise _corrupt(path, f"the payload cannot be read ({e})") from None
    if payload_file.tell() != len(payload):
        raise _corrupt(path, "the payload has bytes that no leaf accounts for")
    return stored


def _from_python(name: str, value: Any, dtype: Any, convert: Any) -> Any:
    try:
        return convert(value, dtype=dtype)
    except OverflowError:
        raise ValueError(
            f"Leaf `{name}` holds {value!r} in the file, which does not fit the dtype {dtype} "
            "of `like`."
        ) from None


def _restore(name: str, entry: dict[str, Any], stored: np.ndarray, like: Any) -> Any:
    """One loaded leaf, of the type of its `like` leaf."""
    python_type = _python_type_name(like)
    if python_type is not None:
        return _PYTHON_SCALARS[python_type](stored.item())
    saved_python = entry["kind"] == "python"
    if isinstance(like, np.ndarray | np.generic):
        out = _from_python(name, stored.item(), like.dtype, np.asarray) if saved_python else stored
        return out if isinstance(like, np.ndarray) else out[()]

    value_type = _python_type_name(stored.item()) if stored.shape == () else None
    if entry["kind"] == "key":
        impl = jax.random.key_impl(like) if isinstance(like, jax.Array) else entry["key_impl"]
        out = jax.random.wrap_key_data(jnp.asarray(stored), impl=impl)
    elif (
        getattr(like, "weak_type", False)
        and value_type is not None
        and _jax_dtype_of_python(value_type) == like.dtype
    ):
        # A Python scalar as JAX holds it (and `jax.eval_shape` describes it): weakly typed.
        out = _from_python(name, stored.item(), None, jnp.asarray)
    elif saved_python:
        out = _from_python(name, stored.item(), like.dtype, jnp.asarray)
    else:
        out = jnp.asarray(stored)

    if isinstance(like, jax.Array):
        # An uncommitted `like` (the default device) gives an uncommitted result.
        sharding = like.sharding if getattr(like, "committed", True) else None
    else:
        sharding = like.sharding
    return out if sharding is None else jax.device_put(out, sharding)


def _check_configs(path: Any, header: dict[str, Any], like: PyTree) -> None:
    """Refuse a saved batcher state of another configuration than `like`'s (their
    `Stats.config` fingerprints), naming both. Files saved without fingerprints pass."""
    saved, wanted = header.get("configs"), configs_of(like)
    if saved is None or len(saved) != len(wanted):
        return  # an older file, or another tree: the structure check below decides
    for got, want in zip(saved, wanted):
        if got and want and got != want:
            raise ValueError(
                f"Checkpoint {os.fspath(path)!r} holds a state of another configuration: "
                f"the file's state is of `{got}`, `like` is of `{want}`. Load it with a "
                "`like` from the batcher that saved it (`jax.eval_shape(batcher.init, spec, "
                "key)`), or start this batcher from its own `init`."
            )


def load_state(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a state saved by `save_state`, checked against `like`.

    Every byte of the file is checked before anything is returned: a file that is not a
    checkpoint, is cut short, or has a changed byte raises `ValueError` ("truncated or
    corrupt"); a file whose tree structure, leaf paths, shapes or dtypes differ from `like`
    raises `ValueError` ("structurally incompatible") naming what differs, and a batcher
    state of another configuration than `like` (another factory, arguments or element spec:
    their `Stats.config`) raises `ValueError` naming both. Loaded arrays
    are bit-identical to the saved ones.

    Args:
        path: the checkpoint file (a `str` or `os.PathLike`).
        like: a PyTree of the structure of the saved state, whose leaves are arrays or
            `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape(batcher.init, spec, key)`), typed
            keys included. Each loaded leaf has the type of its `like` leaf: `jax.Array`s
            (placed with the `like` leaf's sharding where it has one), NumPy arrays or
            Python scalars.

    Returns:
        The saved state, with the tree structure of `like`.

    Raises:
        ValueError: the file is truncated or corrupt, or is structurally incompatible
            with `like`.
        TypeError: a leaf of `like` is not an array, `jax.ShapeDtypeStruct` or scalar.

    Examples:
        >>> import os, tempfile
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> def init(key):
        ...     return {"buffer": jnp.zeros((2, 3), jnp.bfloat16), "key": key}
        >>> state = init(jax.random.key(0))
        >>> like = jax.eval_shape(init, jax.random.key(0))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "state.ckpt")
        ...     jb.save_state(path, state)
        ...     restored = jb.load_state(path, like)
        ...     bad_like = {"buffer": jax.ShapeDtypeStruct((4, 3), jnp.bfloat16), "key": like["key"]}
        ...     jb.load_state(path, bad_like)
        Traceback (most recent call last):
            ...
        ValueError: Checkpoint '...' is structurally incompatible with `like`: leaf `state['buffer']` has shape (2, 3) and dtype bfloat16 in the file, but shape (4, 3) and dtype bfloat16 in `like`. ...
        >>> restored["buffer"].dtype, restored["key"].dtype
        (dtype(bfloat16), key<fry>)
    """  # noqa: E501
    with open(path, "rb") as f:
        data = f.read()
    header, payload = _read_header(path, data)
    _check_configs(path, header, like)
    try:
        like_leaves = _check_compatible(path, header, like)
    except KeyError as e:  # a checksummed header missing a field: not one we wrote
        raise _corrupt(path, f"the header lacks the field {e}") from None
    stored = _read_payload(path, header, payload)
    leaves = []
    for entry, array, like_leaf in zip(header["leaves"], stored, like_leaves):
        leaves.append(_restore(entry["path"], entry, array, like_leaf))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)

"""Distributed checkpoints: sharded states (batcher and model) saved with orbax-checkpoint.

`save_state` / `load_state` write one file from one process. A state sharded over a mesh
that spans several processes needs every process to write its own shards and to read back
only the shards its devices hold: that is orbax-checkpoint's job, so these two functions
are a thin layer over it. They add what `load_state` promises: the tree structure, leaf
paths, shapes and dtypes are recorded beside the arrays and checked against `like` before
anything is read, and typed PRNG keys survive the round trip.

orbax-checkpoint is an optional dependency: `pip install 'jaxbatch[distributed]'`.
"""

import os
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

from .base import configs_of

_FORMAT = "jaxbatch.distributed/1"


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "Distributed checkpoints need orbax-checkpoint, an optional dependency of "
            "jaxbatch: `pip install 'jaxbatch[distributed]'` (or `pip install "
            "orbax-checkpoint`). For one process, `jaxbatch.save_state` needs nothing extra."
        ) from e
    return ocp


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _describe(tree: PyTree) -> dict[str, Any]:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "format": _FORMAT,
        "treedef": str(treedef),
        "configs": configs_of(tree),
        "leaves": [
            {
                "path": jax.tree_util.keystr(path),
                "shape": list(np.shape(x)),
                "dtype": str(x.dtype),
                "key_impl": str(jax.random.key_impl(x)) if _is_key(x) else None,
            }
            for path, x in flat
        ],
    }


def save_distributed(
    directory: str | os.PathLike, tree: PyTree, *, overwrite: bool = False
) -> None:
    """Save a PyTree of (sharded) arrays, e.g. `{"batcher": states, "train": params}`.

    Every process calls it with the same `directory` (on a file system they share) and its
    view of the same global arrays; each writes the shards it owns (orbax-checkpoint). The
    tree's structure, leaf paths, shapes and dtypes are recorded so that
    `load_distributed` can refuse a mismatched `like`. Typed PRNG keys are stored as their
    key data.

    Args:
        directory: the checkpoint directory to create.
        tree: a PyTree of `jax.Array`s, e.g. the per-device batcher states of
            `scan_per_device` beside the model's train state. Call it outside `jit`.
        overwrite: replace an existing checkpoint at `directory`.

    Raises:
        ImportError: orbax-checkpoint is not installed (`pip install 'jaxbatch[distributed]'`).
        ValueError: `directory` exists and `overwrite` is False.
        TypeError: a leaf is not a `jax.Array` (its path is named).

    Examples:
        >>> import os, tempfile, pytest
        >>> _ = pytest.importorskip("orbax.checkpoint")
        >>> import jax, jax.numpy as jnp
        >>> import jaxbatch as jb
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> states = jb.init_per_device(jb.fixed_size(2), {"x": jnp.zeros((jax.device_count(), 4))}, mesh)
        >>> tree = {"batcher": states, "train": {"w": jnp.ones(3)}}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     jb.save_distributed(os.path.join(tmp, "step_10"), tree)
        ...     restored = jb.load_distributed(os.path.join(tmp, "step_10"), like=tree)
        >>> restored["batcher"].count.sharding == states.count.sharding
        True
    """  # noqa: E501
    ocp = _orbax()
    directory = os.path.abspath(os.fspath(directory))
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):  # pyright: ignore
            raise TypeError(
                f"Leaf `{jax.tree_util.keystr(path)}` of `tree` is a {type(x).__name__}; "
                "`save_distributed` saves concrete `jax.Array`s (call it outside `jit`; "
                "put Python values in static fields, or `jnp.asarray` them)."
            )
    if os.path.exists(directory) and not overwrite:
        raise ValueError(
            f"`directory` {directory!r} already exists; pass `overwrite=True` to replace it, "
            "or save to a new directory (e.g. one per step)."
        )
    leaves = [jax.random.key_data(x) if _is_key(x) else x for x in jax.tree.leaves(tree)]
    args = ocp.args.Composite(
        arrays=ocp.args.StandardSave({"leaves": leaves}),
        structure=ocp.args.JsonSave(_describe(tree)),
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(directory, args, force=overwrite)


def _target(x: Any, name: str) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        if jax.process_count() > 1:
            raise ValueError(
                f"`like` leaf `{name}` has no sharding; with several processes every leaf "
                "needs one (pass the arrays themselves, or `jax.ShapeDtypeStruct`s with "
                "`sharding=`), so each process reads only its own shards."
            )
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if _is_key(x):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def load_distributed(directory: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a checkpoint of `save_distributed`, each process reading only its own shards.

    Args:
        directory: the checkpoint directory.
        like: a PyTree of the saved structure whose leaves are arrays or
            `jax.ShapeDtypeStruct`s with `sharding` set (e.g. a freshly initialised state);
            each leaf is restored with that sharding. Typed keys are rebuilt as keys.

    Returns:
        The saved tree, bit-identical, with the structure and shardings of `like`.

    Raises:
        ImportError: orbax-checkpoint is not installed.
        ValueError: `directory` holds no such checkpoint, or its structure, leaf paths,
            shapes or dtypes differ from `like` (what differs is named).

    Examples:
        See `save_distributed`.
    """
    ocp = _orbax()
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise ValueError(
            f"`directory` {directory!r} is not a checkpoint directory (it does not exist); "
            "pass the directory given to `save_distributed`."
        )
    if not os.listdir(directory):
        raise ValueError(
            f"`directory` {directory!r} is empty: it holds no checkpoint (was the save "
            "interrupted, or is this the parent of the step directories?); pass the directory "
            "given to `save_distributed`."
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        try:
            saved = checkpointer.restore(
                directory, ocp.args.Composite(structure=ocp.args.JsonRestore())
            )["structure"]
        except (KeyError, FileNotFoundError, ValueError) as e:
            raise ValueError(
                f"`directory` {directory!r} holds no checkpoint written by "
                f"`jaxbatch.save_distributed` (it lacks the structure record: "
                f"{type(e).__name__}: {e}); pass the directory given to `save_distributed`."
            ) from e
        _check_compatible(directory, saved, like)
        flat, treedef = jax.tree_util.tree_flatten_with_path(like)
        targets = [_target(x, jax.tree_util.keystr(p)) for p, x in flat]
        arrays = checkpointer.restore(
            directory,
            ocp.args.Composite(arrays=ocp.args.StandardRestore({"leaves": targets})),
        )["arrays"]["leaves"]
    leaves = [
        jax.random.wrap_key_data(a, impl=jax.random.key_impl(x)) if _is_key(x) else a
        for a, (_, x) in zip(arrays, flat)
    ]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_configs(directory: str, saved: dict, like: PyTree) -> None:
    """Refuse a saved batcher state of another configuration than `like`'s (their
    `Stats.config` fingerprints), naming both. Checkpoints without fingerprints pass."""
    got_all, want_all = saved.get("configs"), configs_of(like)
    if got_all is None or len(got_all) != len(want_all):
        return  # an older checkpoint, or another tree: the structure check decides
    for got, want in zip(got_all, want_all):
        if got and want and got != want:
            raise ValueError(
                f"Checkpoint {directory!r} holds a state of another configuration: the "
                f"checkpoint's state is of `{got}`, `like` is of `{want}`. Load it with a "
                "`like` from the batcher that saved it, or start this batcher from its `init`."
            )


def _check_compatible(directory: str, saved: Any, like: PyTree) -> None:
    def refuse(detail: str) -> ValueError:
        return ValueError(
            f"Checkpoint {directory!r} is structurally incompatible with `like`: {detail}. "
            "Build `like` with the same code and configuration that made the saved tree."
        )

    if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
        raise ValueError(
            f"Checkpoint {directory!r} was not written by `jaxbatch.save_distributed`."
        )
    _check_configs(directory, saved, like)
    expected = _describe(like)
    saved_paths = [leaf["path"] for leaf in saved["leaves"]]
    like_paths = [leaf["path"] for leaf in expected["leaves"]]
    if saved_paths != like_paths:
        only_saved = [p for p in saved_paths if p not in like_paths]
        only_like = [p for p in like_paths if p not in saved_paths]
        raise refuse(
            f"leaves only in the checkpoint: {only_saved}; leaves only in `like`: {only_like}"
            if only_saved or only_like
            else f"leaf order {saved_paths} in the checkpoint, {like_paths} in `like`"
        )
    for a, b in zip(saved["leaves"], expected["leaves"]):
        if a != b:
            raise refuse(
                f"leaf `{a['path']}` has shape {tuple(a['shape'])} and dtype {a['dtype']} in "
                f"the checkpoint, but shape {tuple(b['shape'])} and dtype {b['dtype']} in "
                "`like`"
            )
    if saved["treedef"] != expected["treedef"]:
        raise refuse("the tree structure differs (node types or static fields)")

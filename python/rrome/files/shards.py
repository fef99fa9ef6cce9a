"""Offline rank-one edits written straight into safetensors shards.

This is the Python face of the Rust shard writer. A :class:`Delta` says "add scale · r uᵀ to
the matrix this tensor applies"; :func:`apply_deltas` writes a batch of them into a model
folder without loading the model: in place (journaled, revertible) or into a new folder.
Deltas travel as a *bundle*: ``rrome_edits.jsonl`` (one JSON record per delta) beside
``rrome_deltas.safetensors`` (the float32 factors); a model folder's edit log has the same
format. Nothing here imports torch, so the ``rrome apply-deltas`` command starts fast.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from rrome import _rust
from rrome._rust import DELTAS_FILE as DELTAS_FILE
from rrome._rust import EDITS_FILE as EDITS_FILE
from rrome._rust import ApplyReport as ApplyReport
from rrome._rust import Inspection as Inspection
from rrome._rust import LoggedDelta as LoggedDelta
from rrome.files.errors import DeltaError

Layout = Literal["out_in", "in_out"]
PathLike = str | os.PathLike[str]

_log = logging.getLogger("rrome")


def _vector(name: str, value: Any) -> npt.NDArray[np.float32]:
    arr = np.asarray(value.detach().cpu() if hasattr(value, "detach") else value)
    if arr.ndim != 1 or arr.size == 0:
        raise DeltaError(f"{name} must be a non-empty 1-D vector; got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DeltaError(f"{name} must hold floating-point numbers; got dtype {arr.dtype}")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Delta:
    """A rank-one update ``W_math += scale · r uᵀ`` of one weight tensor.

    ``W_math`` is the ``d_out × d_in`` matrix the module applies (``y = W_math x``).

    Args:
        tensor: the safetensors name, e.g. ``"model.layers.6.mlp.down_proj.weight"``.
        u: input-side factor, length ``d_in`` (any 1-D float array or tensor; stored as float32).
        r: output-side factor, length ``d_out``.
        layout: how the tensor stores ``W_math``: ``"out_in"`` (``nn.Linear``, shape
            ``[d_out, d_in]``) or ``"in_out"`` (GPT-2 ``Conv1D``, shape ``[d_in, d_out]``).
            Never inferred from the shape.
        scale: scalar factor, applied in float32 as ``(scale · r) uᵀ``.
        meta: JSON-serialisable mapping recorded with the delta in the edit log.
        key: the key the edit wrote at (k_den, length ``d_in``; stored as float32 as ``<id>.k``
            beside the factors), or ``None``. With ``retain_edit_keys`` an editor opened on the
            folder later retains the keys of its edit log (docs/design.md §1).
        other_key: the edit's other key (k_e^o when it wrote at k_e, and the reverse; stored as
            ``<id>.k_other``), or ``None``: retained beside ``key`` with ``retain_both_keys``.
            Only with ``key``.

    Raises:
        DeltaError: for a bad layout, empty or non-float factors, a key whose length is not
            ``d_in``, an ``other_key`` without ``key``, or non-finite numbers.
    """

    tensor: str
    u: npt.NDArray[np.float32]
    r: npt.NDArray[np.float32]
    layout: Layout = "out_in"
    scale: float = 1.0
    meta: Mapping[str, Any] | None = field(default=None)
    key: npt.NDArray[np.float32] | None = field(default=None)
    other_key: npt.NDArray[np.float32] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, str) or not self.tensor:
            raise DeltaError("tensor must be a non-empty tensor name")
        if self.layout not in ("out_in", "in_out"):
            raise DeltaError(f'layout must be "out_in" or "in_out", got {self.layout!r}')
        object.__setattr__(self, "u", _vector("u", self.u))
        object.__setattr__(self, "r", _vector("r", self.r))
        if self.other_key is not None and self.key is None:
            raise DeltaError(f"{self.tensor}: other_key is given without key (the key it is the other of)")
        for name in ("key", "other_key"):
            if getattr(self, name) is not None:
                vec = _vector(name, getattr(self, name))
                object.__setattr__(self, name, vec)
                if vec.shape != self.u.shape:
                    raise DeltaError(f"{self.tensor}: {name} has {vec.shape[0]} values; expected d_in = {self.d_in}")
        object.__setattr__(self, "scale", float(self.scale))
        if not np.isfinite(self.scale):
            raise DeltaError(f"scale must be finite, got {self.scale}")
        for name in ("u", "r", "key", "other_key"):
            vec = getattr(self, name)
            if vec is None:
                continue
            bad = np.flatnonzero(~np.isfinite(vec))
            if bad.size:
                raise DeltaError(f"{self.tensor}: {name}[{bad[0]}] is {vec[bad[0]]}")
        if self.meta is not None:
            try:
                json.dumps(dict(self.meta))
            except (TypeError, ValueError) as e:
                raise DeltaError(f"meta must be a JSON-serialisable mapping: {e}") from None

    @property
    def d_in(self) -> int:
        """Input width of the edited matrix (length of ``u``)."""
        return int(self.u.shape[0])

    @property
    def d_out(self) -> int:
        """Output width of the edited matrix (length of ``r``)."""
        return int(self.r.shape[0])

    def matrix(self) -> npt.NDArray[np.float32]:
        """The dense ``d_out × d_in`` update ``(scale · r) uᵀ`` in float32 (for checks; costly)."""
        return np.outer(np.float32(self.scale) * self.r, self.u)


def _checked(deltas: Iterable[Delta]) -> list[Delta]:
    batch = list(deltas)
    for d in batch:
        if not isinstance(d, Delta):
            raise DeltaError(f"expected rrome.Delta objects, got {type(d).__name__}")
    return batch


def apply_deltas(
    model_dir: PathLike,
    deltas: Iterable[Delta],
    *,
    out_dir: PathLike | None = None,
    link_untouched: bool = False,
    again: bool = False,
) -> ApplyReport:
    """Writes a batch of deltas into the checkpoint in ``model_dir`` without loading the model.

    Each edited tensor becomes ``round(decode(W) + Σ (scale·r) uᵀ)``: decoded to float32, all
    deltas of the tensor added in order, rounded once to the storage dtype (F32, F16, BF16).
    No other byte of any file changes. Without ``out_dir`` the folder is edited in place under
    an exclusive lock with an undo journal, and the batch is appended to the folder's edit log
    so that :func:`revert` restores the exact original bytes. With ``out_dir`` a complete copy
    is built beside it and renamed into place at the end: it exists complete or not at all.

    Args:
        model_dir: a folder with ``model.safetensors`` or sharded files and their index.
        deltas: the batch; applied in order.
        out_dir: where to write an edited copy; must not exist yet.
        link_untouched: with ``out_dir``, hard-link the shards no delta touches (and committed
            undo files) instead of copying them, where the filesystem allows. Much faster and
            smaller for large checkpoints, and safe against rrome's own later writes (an
            in-place apply or revert un-shares a shard before writing it), but a tool other
            than rrome that rewrites a shared shard in place changes both folders. Off by
            default: the copy then shares nothing with ``model_dir``.
        again: apply even when a delta is bit for bit one the folder's edit log already holds.
            Off (the default), such a batch is refused before anything is written: it is
            almost surely one that was applied before.

    Returns:
        The batch number, edited tensors and shards, byte counts, and ``recovered``: what the
        recovery that runs first did (an interrupted earlier write finished or rolled back).

    Raises:
        TensorNotFoundError, UnsupportedDtypeError, DeltaError: a delta does not fit, or
            repeats one of the edit log (without ``again``).
        SafetensorsHeaderError, CheckpointError: the checkpoint is malformed or unsafe.
        LockedError: another rrome process is writing this folder.
        IntegrityError: the folder holds a journal, undo file or revert marker that does not
            fit its checkpoint (not written by rrome); nothing is written.
        OSError: I/O failures (FileNotFoundError, PermissionError, ...), nothing half-written.
    """
    batch = _checked(deltas)
    out = None if out_dir is None else os.fspath(out_dir)
    if link_untouched and out is None:
        raise DeltaError("link_untouched only applies to a copy (out_dir)")
    return _rust.apply_deltas(os.fspath(model_dir), batch, out, link_untouched, again)


def apply_bundle(
    model_dir: PathLike,
    bundle: PathLike,
    *,
    out_dir: PathLike | None = None,
    link_untouched: bool = False,
    again: bool = False,
) -> ApplyReport:
    """Reads the deltas bundle at ``bundle``, checks every delta against the checkpoint in
    ``model_dir`` as :func:`load_deltas_for` does, and applies them as one batch as
    :func:`apply_deltas` does (``again`` as there): what ``rrome apply-deltas`` runs, in one
    call into Rust. ``bundle`` is a bundle folder or the path of one of its two files; any other
    path is a FileNotFoundError.

    Raises:
        As :func:`load_deltas_for`, then as :func:`apply_deltas`.
    """
    out = None if out_dir is None else os.fspath(out_dir)
    if link_untouched and out is None:
        raise DeltaError("link_untouched only applies to a copy (out_dir)")
    return _rust.apply_bundle(os.fspath(model_dir), os.fspath(bundle), out, link_untouched, again)


def revert(model_dir: PathLike, *, all: bool = False) -> list[int]:  # noqa: A002 - mirrors the CLI flag
    """Restores the exact original bytes of the last applied batch (or of every batch).

    An interrupted earlier write is recovered first; what that did is logged (logger
    ``"rrome"``, level WARNING) and printed by ``rrome revert``.

    Returns:
        The reverted batch numbers, newest first.

    Raises:
        RevertError: nothing to revert, or the undo data is missing.
        IntegrityError: an edited tensor was changed by something else since, or an undo file
            does not fit the checkpoint; nothing written.
    """
    return revert_with_report(model_dir, all=all)[0]


def revert_with_report(model_dir: PathLike, *, all: bool = False) -> tuple[list[int], list[str]]:  # noqa: A002
    """:func:`revert`, also returning what the recovery that runs first did."""
    batches, recovered = _rust.revert(os.fspath(model_dir), all)
    for action in recovered:
        _log.warning("%s: recovered: %s", os.fspath(model_dir), action)
    return batches, recovered


def recover(model_dir: PathLike) -> list[str]:
    """Finishes or rolls back an in-place write that was interrupted (crash, kill, power loss).

    Every rrome command that writes a folder does this first; this runs it alone.

    Returns:
        A sentence per action taken; empty when the folder was clean.
    """
    return _rust.recover(os.fspath(model_dir))


def inspect(model_dir: PathLike, *, tensors: bool = True) -> Inspection:
    """Describes a model folder: shards, tensors (name, dtype, shape, shard, byte range), edit
    log, pending state.

    ``num_tensors`` and ``dtypes`` (tensors per dtype) are always there; the list ``tensors``
    only with ``tensors=True`` (otherwise ``None``), since a checkpoint may hold many.
    ``to_dict()`` gives the JSON form that ``rrome inspect --json`` prints.
    """
    return _rust.inspect(os.fspath(model_dir), tensors)


def save_deltas(path: PathLike, deltas: Sequence[Delta]) -> None:
    """Writes deltas as a bundle in folder ``path`` (created if needed), ids ``"0"``, ``"1"``, ..."""
    _rust.write_bundle(os.fspath(path), _checked(deltas))


def load_deltas(path: PathLike) -> list[LoggedDelta]:
    """Reads a bundle or edit log: a folder holding both files, or the path of either file.

    Raises:
        DeltasFileError: a malformed record, naming file, line and field.
    """
    return _rust.read_bundle(os.fspath(path))


def load_deltas_for(path: PathLike, model_dir: PathLike) -> list[LoggedDelta]:
    """Reads a bundle like :func:`load_deltas` and checks every delta against the checkpoint in
    ``model_dir`` (headers only) before anything is written: the numbers are finite, the tensor
    exists, its dtype can be edited, and ``d_out`` × ``d_in`` in the delta's layout is the
    tensor's shape.

    Every problem is reported at once, each as ``FILE:LINE: field "x": ...`` naming the line of
    ``rrome_edits.jsonl`` that holds the delta (the first 20, then how many more).

    Raises:
        TensorNotFoundError, UnsupportedDtypeError, DeltaError: the class of the first problem.
        DeltasFileError, SafetensorsHeaderError, CheckpointError: a malformed bundle or checkpoint.
    """
    return _rust.check_bundle(os.fspath(model_dir), os.fspath(path))

"""rrome: rank-one model editing (ROME, r-ROME, p-ROME) with a Rust core.

The package has two halves. The Rust extension (``rrome._rust``) does the numeric and file
work: float64 second moments of layer keys (:class:`SecondMoment`), Cholesky solves
(:class:`Cholesky`) and crash-safe rank-one writes straight into safetensors shards
(:func:`apply_deltas`). The Python modules drive torch and transformers for the editing
itself, in rooms by layer: :mod:`rrome.files` (what rrome reads and writes, no torch),
:mod:`rrome.engine` (the editing), :mod:`rrome.eval` (measuring edits) and :mod:`rrome.cli`.

Importing ``rrome`` does not import torch; ``rrome.Editor``
(:class:`rrome.engine.editor.Editor`) imports the engine when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rrome._rust import VERSION, Checkpoint, Cholesky, Inspection, SecondMoment
from rrome.files.adapters import AdapterReport, export_lora
from rrome.files.errors import (
    CacheFolderError,
    ChatTemplateError,
    CheckpointError,
    DeltaError,
    DeltasFileError,
    DisablingEditError,
    EditFileError,
    ExportError,
    IntegrityError,
    InvalidFileError,
    LargeUpdateError,
    LockedError,
    MomentsFileError,
    NonFiniteUpdateError,
    NotPositiveDefiniteError,
    RevertError,
    RromeError,
    SafetensorsHeaderError,
    ShapeError,
    TensorNotFoundError,
    TokenizationError,
    UnsupportedDtypeError,
    UnsupportedModelError,
)
from rrome.files.hparams import HParamsError, HParamsFileError
from rrome.files.shards import (
    ApplyReport,
    Delta,
    LoggedDelta,
    apply_deltas,
    inspect,
    load_deltas,
    recover,
    revert,
    save_deltas,
)

if TYPE_CHECKING:
    from rrome.engine.editor import Editor

__version__ = VERSION  # the workspace version in Cargo.toml, the one source


def __getattr__(name: str) -> object:
    """``rrome.Editor`` on first use: the engine (torch, transformers) loads only then."""
    if name == "Editor":
        from rrome.engine.editor import Editor

        return Editor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterReport",
    "ApplyReport",
    "CacheFolderError",
    "ChatTemplateError",
    "Checkpoint",
    "CheckpointError",
    "Cholesky",
    "Delta",
    "DeltaError",
    "DeltasFileError",
    "DisablingEditError",
    "EditFileError",
    "Editor",
    "ExportError",
    "HParamsError",
    "HParamsFileError",
    "Inspection",
    "IntegrityError",
    "InvalidFileError",
    "LargeUpdateError",
    "LockedError",
    "LoggedDelta",
    "MomentsFileError",
    "NonFiniteUpdateError",
    "NotPositiveDefiniteError",
    "RevertError",
    "RromeError",
    "SafetensorsHeaderError",
    "SecondMoment",
    "ShapeError",
    "TensorNotFoundError",
    "TokenizationError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
    "apply_deltas",
    "export_lora",
    "inspect",
    "load_deltas",
    "recover",
    "revert",
    "save_deltas",
]

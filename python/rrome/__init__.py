"""rrome: rank-one model editing (ROME, r-ROME, p-ROME) with a Rust core.

The package has two halves. The Rust extension (``rrome._rust``) does the numeric and file
work: float64 second moments of layer keys (:class:`SecondMoment`), Cholesky solves
(:class:`Cholesky`) and crash-safe rank-one writes straight into safetensors shards
(:func:`apply_deltas`). The Python modules drive torch and transformers for the editing
itself. Importing ``rrome`` does not import torch.
"""

from rrome._rust import Cholesky, SecondMoment
from rrome.files.errors import (
    CheckpointError,
    DeltaError,
    DeltasFileError,
    DisablingEditError,
    EditFileError,
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

__version__ = "0.1.0"

__all__ = [
    "ApplyReport",
    "CheckpointError",
    "Cholesky",
    "Delta",
    "DeltaError",
    "DeltasFileError",
    "DisablingEditError",
    "EditFileError",
    "HParamsError",
    "HParamsFileError",
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
    "UnsupportedDtypeError",
    "UnsupportedModelError",
    "apply_deltas",
    "inspect",
    "load_deltas",
    "recover",
    "revert",
    "save_deltas",
]

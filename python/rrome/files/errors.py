"""The exception hierarchy of rrome, shared by the Rust core and the Python modules.

Every error rrome raises on purpose is an instance of :class:`RromeError`, except I/O
failures, which are the matching built-in :class:`OSError` subclasses
(:class:`FileNotFoundError`, :class:`PermissionError`, ...) with ``filename`` set. The Rust
extension raises these very classes (it imports them from here), so ``except
rrome.LockedError`` works the same whichever half of the package noticed the problem.
"""

from __future__ import annotations


class RromeError(Exception):
    """Base class of every error rrome raises on purpose."""


class InvalidFileError(RromeError, ValueError):
    """A file rrome was asked to read is malformed; the message names the file (and line)."""


class SafetensorsHeaderError(InvalidFileError):
    """A safetensors header is malformed or disagrees with the file's contents."""


class CheckpointError(InvalidFileError):
    """A model folder is not a usable checkpoint (missing, unsafe or inconsistent index)."""


class DeltasFileError(InvalidFileError):
    """A deltas bundle or edit log (``rrome_edits.jsonl`` + ``rrome_deltas.safetensors``) is malformed."""


class MomentsFileError(InvalidFileError):
    """A statistics file written by ``SecondMoment.save`` is malformed."""


class EditFileError(InvalidFileError):
    """An edit-request file is malformed; the message names file, line and field."""


class UnsupportedModelError(RromeError):
    """The model's architecture has no rrome adapter, or its tokenizer cannot be used."""


class TokenizationError(RromeError):
    """A prompt or target cannot be tokenised as the edit needs (subject lost, empty target)."""


class ChatTemplateError(RromeError):
    """Chat prompts were asked for a tokenizer that has no chat template (or one that fails)."""


class TensorNotFoundError(RromeError, LookupError):
    """A delta names a tensor that the checkpoint does not hold."""


class UnsupportedDtypeError(RromeError, TypeError):
    """A tensor's storage dtype cannot be edited (only F32, F16 and BF16 can)."""


class DeltaError(RromeError, ValueError):
    """A delta does not fit its tensor, holds NaN/Inf, or would overflow the storage dtype."""


class ExportError(RromeError):
    """Edits cannot be written as the adapter asked for (a rank too small for a module, mixed
    layouts, an architecture llama.cpp does not run)."""


class ShapeError(RromeError, ValueError):
    """Array shapes that do not agree (keys of the wrong width, a non-square matrix, ...)."""


class NotPositiveDefiniteError(RromeError, ValueError):
    """The Cholesky factorisation met a non-positive pivot.

    Attributes:
        pivot: zero-based index of the failing pivot.
    """

    def __init__(self, message: str, pivot: int = -1) -> None:
        super().__init__(message)
        self.pivot = pivot

    def __str__(self) -> str:
        return str(self.args[0])


class LargeUpdateError(RromeError):
    """An edit's update |Δ| is far above the median of the session's earlier edits.

    Such an update is the mark of a "disabling edit" (docs/design.md §1): it tends to collapse the
    model. The editor refuses it before touching the model unless told ``allow_large_updates``.

    Attributes:
        norm_delta: |Δ| of the refused update.
        median: the median |Δ| of the session's earlier edits.
        ratio: ``norm_delta / median``.
    """

    def __init__(self, message: str, norm_delta: float = float("nan"), median: float = float("nan")) -> None:
        super().__init__(message)
        self.norm_delta = norm_delta
        self.median = median
        self.ratio = norm_delta / median if median > 0 else float("inf")

    def __str__(self) -> str:
        return str(self.args[0])


class DisablingEditError(RromeError):
    """The screen (:mod:`rrome.engine.screen`) predicts that ``rome`` would make a disabling edit of
    this request: ρ = uᵀk_e / uᵀk_e^o is at or above the threshold (or not positive). Raised
    before the value optimisation, the model untouched, unless large updates are allowed.

    Attributes:
        ratio: ρ of the refused request.
    """

    def __init__(self, message: str, ratio: float = float("nan")) -> None:
        super().__init__(message)
        self.ratio = ratio

    def __str__(self) -> str:
        return str(self.args[0])


class NonFiniteUpdateError(DeltaError):
    """An edit's update holds NaN or Inf; it is always refused, before the model is touched."""


class LockedError(RromeError):
    """Another rrome process holds the model folder's lock; the message names it."""


class IntegrityError(RromeError):
    """Bytes on disk are not what rrome's journal or edit log says they should be."""


class RevertError(RromeError):
    """There is nothing to revert, or the data needed to revert exactly is missing."""


class CacheFolderError(RromeError):
    """rrome's cache folder is not private: another user, or group or others, could change the
    statistics and templates rrome reads from it. The message says how to make it private."""


__all__ = [
    "CacheFolderError",
    "CheckpointError",
    "DeltaError",
    "DeltasFileError",
    "DisablingEditError",
    "EditFileError",
    "IntegrityError",
    "InvalidFileError",
    "LargeUpdateError",
    "LockedError",
    "MomentsFileError",
    "NonFiniteUpdateError",
    "NotPositiveDefiniteError",
    "RevertError",
    "RromeError",
    "SafetensorsHeaderError",
    "ShapeError",
    "TensorNotFoundError",
    "UnsupportedDtypeError",
    "UnsupportedModelError",
]

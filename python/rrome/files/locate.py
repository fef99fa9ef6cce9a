"""Where a model is: a folder, or a model id found in the local Hugging Face cache.

Users keep models in the Hugging Face cache, where a model is a snapshot folder
(``<cache>/models--org--name/snapshots/<revision>``) of links into the repository's
``blobs/``. rrome reads such a folder through its links like any other, writes an edited copy
of it (``--out``; the copy holds the blobs as regular files), and never writes into it
(docs/design.md §3, "Hugging Face cache"). A model id (``google/gemma-3-270m``) is resolved
offline, as ``from_pretrained`` resolves it with ``HF_HUB_OFFLINE=1``: the snapshot the
cache's ``main`` ref names; nothing is downloaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rrome import _rust
from rrome.files.errors import CheckpointError

PathLike = str | os.PathLike[str]

_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_model_id(text: str) -> bool:
    """Whether ``text`` has the shape of a Hugging Face model id (``org/name``)."""
    return _MODEL_ID.fullmatch(text) is not None and ".." not in text


def resolve_model(model: PathLike) -> Path:
    """The model folder ``model`` names: the path itself if it exists (or is not shaped like a
    model id), else the cached snapshot of the model id ``model``, found offline.

    Raises:
        CheckpointError: ``model`` is a model id that is not in the local cache (naming it and
            the cache folder looked in), or huggingface_hub is not installed.
    """
    path = Path(model)
    text = os.fspath(model)
    if path.exists() or not is_model_id(text):
        return path
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - transformers depends on huggingface_hub
        raise CheckpointError(f"{text}: no such folder (model ids need the huggingface_hub package)") from e
    try:
        found = snapshot_download(repo_id=text, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as e:
        raise CheckpointError(
            f"{text}: no such folder, and no model of that id in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); nothing is downloaded: fetch it first, or give its folder"
        ) from e
    return Path(found)


def cache_snapshot_repo(model_dir: PathLike) -> Path | None:
    """The Hugging Face cache repository (``models--org--name``) of which ``model_dir`` is a
    snapshot, or ``None``: such a folder is never written in place."""
    return _rust.hf_cache_repo(os.fspath(model_dir))


def refuse_in_place(model_dir: PathLike) -> None:
    """Refuses a cache snapshot as the target of an in-place write, before any work is done
    (the writer refuses it too, but only after the edits were computed).

    Raises:
        CheckpointError: ``model_dir`` is a snapshot of the Hugging Face cache.
    """
    _rust.refuse_cache_snapshot(os.fspath(model_dir))

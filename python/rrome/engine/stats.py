"""Second moments C0 = E[k kᵀ] of one layer's keys over a text corpus, cached per model.

ROME's update solves against C0, the uncentred second moment of the keys (the inputs of the edited
MLP output projection) over ordinary text (docs/design.md §1). The keys are collected by
:mod:`rrome.engine.collect` (:func:`~rrome.engine.collect.collect_second_moment`, the model run over
the documents of a corpus as far as the edited module); this module caches the result on disk per
unedited model, layer, corpus and token budget (:func:`second_moment`), under
:func:`rrome.files.paths.model_cache_dir`, with the Cholesky factor beside it. Only the
functions that run the model import torch, so the cache key and paths also work where torch is
not installed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rrome._rust import Checkpoint, Cholesky, SecondMoment
from rrome.engine.collect import DEFAULT_SEQ_LEN, collect_second_moment
from rrome.engine.models import context_length, model_dtype
from rrome.files.corpus import corpus_texts, default_corpus
from rrome.files.errors import InvalidFileError
from rrome.files.fsutil import sha256_file
from rrome.files.paths import model_cache_dir, private_model_cache_dir, seal, unsealed

if TYPE_CHECKING:
    from rrome.engine.distributed import DistInfo
    from rrome.engine.models import Adapter

PathLike = str | os.PathLike[str]
DEFAULT_MAX_TOKENS = 100_000
STATS_FORMAT = "rrome-stats/1"
"""Value of the ``stats_format`` metadata field of the files :func:`second_moment` writes."""

_MODEL_KEY_VERSION = b"rrome-model-key/1\n"
log = logging.getLogger(__name__)


# --- cache --------------------------------------------------------------------------------


def model_key(model_dir: PathLike) -> str:
    """A short hash that identifies an *unedited* model, for caching its layer statistics.

    The key covers the bytes of ``config.json`` and, from the safetensors headers (as the Rust
    :class:`rrome.Checkpoint` reads and validates them), every tensor's name, dtype and shape,
    but neither the weight values nor the folder's name or location:

    - C0 always belongs to the unedited model (sequential edits keep the first C0, docs/design.md §1),
      so an edit written into the folder (new weight bytes, an edit log) keeps the key;
    - copies of one model, and single-file and sharded saves of it, share their statistics.

    Statistics are therefore only as right as the model they were first computed on: compute
    them before editing a model in place.

    Args:
        model_dir: a Hugging Face checkpoint folder.

    Returns:
        16 hex digits.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` does not exist.
        CheckpointError: no weights, an unsafe or malformed ``model.safetensors.index.json``, or
            one that disagrees with the shards' headers.
        SafetensorsHeaderError: a weight file's header cannot be read or is not valid.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(errno.ENOENT, "model folder not found", str(d))
    config = (d / "config.json").read_bytes()
    h = hashlib.sha256(_MODEL_KEY_VERSION)
    h.update(len(config).to_bytes(8, "little"))
    h.update(config)
    listing = [[t.name, t.dtype, t.shape] for t in Checkpoint(d).tensors()]
    h.update(json.dumps(listing, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def _module_tail(adapter: Adapter, layer: int) -> str:
    """``mlp.c_proj`` for ``transformer.h.{}.mlp.c_proj``: the module's name below its block."""
    _, _, tail = adapter.module_template.partition("{}")
    return tail.strip(".") or adapter.module_name(layer)


def _stats_file(key: str, adapter: Adapter, layer: int, corpus_sha: str, max_tokens: int, dtype: str) -> Path:
    # Keys of a half-precision run differ from float32 ones by rounding: their statistics are
    # kept apart (float32 files keep the names they always had).
    suffix = "" if dtype == "float32" else f"-{dtype}"
    name = f"layer{layer}-{_module_tail(adapter, layer)}-{corpus_sha[:16]}-{max_tokens}{suffix}.safetensors"
    return model_cache_dir(key) / name


def stats_path(
    model_dir: PathLike,
    adapter: Adapter,
    layer: int,
    *,
    corpus: PathLike | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    dtype: str = "float32",
) -> Path:
    """Where :func:`second_moment` caches the statistics of these arguments (the file may not exist).

    ``cache_root()/stats/<model_key>/layer<L>-<module tail>-<corpus sha256[:16]>-<max_tokens>.safetensors``,
    with ``-<dtype>`` before the extension when the model runs in ``bfloat16`` or ``float16``.

    Raises:
        FileNotFoundError: the model folder, its config or the corpus does not exist.
        CheckpointError: see :func:`model_key`.
        SafetensorsHeaderError: see :func:`model_key`.
    """
    corpus_path = Path(corpus) if corpus is not None else default_corpus()
    return _stats_file(model_key(model_dir), adapter, layer, sha256_file(corpus_path), max_tokens, dtype)


# --- cached statistics --------------------------------------------------------------------


def _key_width(model: Any, adapter: Adapter, layer: int) -> int:
    from rrome.engine.hooks import get_module

    weight: Any = get_module(model, adapter.module_name(layer)).weight
    return int(weight.shape[0] if adapter.layout == "in_out" else weight.shape[1])


def _verified(path: Path, what: str) -> bool:
    """Whether the cache file at ``path`` (it exists) has the checksum written with it; when it
    has not, a warning names it and says it is computed again (docs/design.md §3)."""
    try:
        problem = unsealed(path)
    except (OSError, InvalidFileError) as e:
        problem = f"it cannot be read ({e})"
    if problem is not None:
        log.warning("ignoring the cached %s %s: %s; computing it again", what, path, problem)
    return problem is None


def _load_valid(path: Path, expected: Mapping[str, str], *, d: int, max_tokens: int) -> SecondMoment | None:
    """The cached moment at ``path`` if its checksum holds, it is readable and it says what we
    expect, else None."""
    if not _verified(path, "statistics"):
        return None
    try:
        moment = SecondMoment.load(path)
    except InvalidFileError:  # not a moments file, or a damaged one (MomentsFileError, SafetensorsHeaderError)
        return None
    meta = moment.metadata
    if any(meta.get(k) != v for k, v in expected.items()) or moment.d != d:
        return None
    short = 0 < moment.count < max_tokens and meta.get("tokens_available") == str(moment.count)
    return moment if moment.count == max_tokens or short else None


def second_moment(
    model_dir: PathLike,
    model: Any,
    tokenizer: Any,
    adapter: Adapter,
    layer: int,
    *,
    corpus: PathLike | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    refresh: bool = False,
    progress: bool = True,
) -> tuple[SecondMoment, Path]:
    """C0 statistics of the edited module at ``layer``, from the cache or computed and cached.

    The cache file is :func:`stats_path`. It is reused only when its bytes have the sha256
    written beside it (:func:`rrome.files.paths.seal`) and its metadata (model key, layer,
    module, corpus sha256, token budget, window length, model dtype), width and count match
    (docs/design.md §3); otherwise (a warning says why when the checksum fails), or with
    ``refresh``, the statistics are computed with
    :func:`~rrome.engine.collect.collect_second_moment` (windows of ``min(256, model positions)``
    tokens) and saved atomically with their provenance and checksum, readable by the user alone,
    in a private folder (:func:`rrome.files.paths.private_model_cache_dir`).

    Inside an initialised torch.distributed process group of several processes (``rrome
    stats`` under torchrun, see :mod:`rrome.engine.distributed`) this is a collective call: every
    rank must make it with the same arguments. Rank 0 checks the cache and tells the others;
    otherwise each rank accumulates its share of the batches (``shard=(rank, world_size)``),
    the partial sums and counts are all-reduced, and rank 0 alone writes the file. Every rank
    returns the same moment.

    A corpus with fewer tokens than ``max_tokens`` is used whole: ``moment.count`` is then below
    ``max_tokens`` (tell the user).

    Args:
        model_dir: the checkpoint folder the model was loaded from (for :func:`model_key`).
        model: the loaded, unedited model.
        tokenizer: its fast tokenizer.
        adapter: the model's adapter (:func:`rrome.engine.models.adapter_for`).
        layer: the edited layer.
        corpus: a text file (see :func:`rrome.files.corpus.corpus_texts`); default
            :func:`rrome.files.corpus.default_corpus`.
        max_tokens: how many token keys to accumulate.
        batch_size: windows per forward pass (speed only).
        refresh: recompute even if a valid cache file exists.
        progress: show a progress bar while computing (rank 0 only).

    Returns:
        ``(moment, path)``: the accumulator (``moment.moment()`` is C0) and its cache file.

    Raises:
        FileNotFoundError: the model folder, its config or the corpus does not exist.
        CheckpointError: see :func:`model_key`.
        SafetensorsHeaderError: see :func:`model_key`.
        InvalidFileError: the corpus is not UTF-8 text or is empty.
        ValueError: a non-positive ``max_tokens`` or ``batch_size``, or a corpus without tokens.
        CacheFolderError: the cache folder is not private (another user's, or writable by group
            or others).
        RromeError: see :func:`~rrome.engine.collect.collect_second_moment`.
    """
    from rrome.engine import distributed as dist

    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    info = dist.current()
    main = info is None or info.is_main
    corpus_path = Path(corpus) if corpus is not None else default_corpus()
    key = model_key(model_dir)
    limit = context_length(model.config)
    seq_len = min(DEFAULT_SEQ_LEN, limit) if limit is not None else DEFAULT_SEQ_LEN
    path, expected = _cache_entry(key, model, adapter, layer, sha256_file(corpus_path), max_tokens, seq_len)
    module = expected["module"]
    d = _key_width(model, adapter, layer)
    cached = None
    private_model_cache_dir(key)  # every rank: a refusal on rank 0 alone would leave the others waiting
    if main and not refresh and path.is_file():
        cached = _load_valid(path, expected, d=d, max_tokens=max_tokens)
    if info is not None and dist.broadcast_flag(cached is not None, info):
        return dist.broadcast_moment(cached, info, d), path
    if cached is not None:
        return cached, path

    moment = _collect(model, tokenizer, module, corpus_path, max_tokens, batch_size, seq_len, progress and main, info)
    moment.metadata = {**expected, **_provenance(model, model_dir, corpus_path, batch_size, info, moment, max_tokens)}
    if main:
        private_model_cache_dir(key)
        moment.save(path)
        seal(path)
    if info is not None:
        dist.barrier(info)
    return moment, path


def _cache_entry(
    key: str, model: Any, adapter: Adapter, layer: int, corpus_sha: str, max_tokens: int, seq_len: int
) -> tuple[Path, dict[str, str]]:
    """The cache file of :func:`second_moment`'s arguments and the metadata a file there must
    hold to be reused."""
    dtype = model_dtype(model)
    expected = {
        "stats_format": STATS_FORMAT,
        "model_key": key,
        "layer": str(layer),
        "module": adapter.module_name(layer),
        "corpus_sha256": corpus_sha,
        "max_tokens": str(max_tokens),
        "seq_len": str(seq_len),
        "model_dtype": dtype,
    }
    return _stats_file(key, adapter, layer, corpus_sha, max_tokens, dtype), expected


def _collect(
    model: Any,
    tokenizer: Any,
    module: str,
    corpus_path: Path,
    max_tokens: int,
    batch_size: int,
    seq_len: int,
    progress: bool,
    info: DistInfo | None,
) -> SecondMoment:
    """The statistics :func:`second_moment` computes: the whole moment, or, in a process group,
    this rank's share all-reduced into the whole."""
    from rrome.engine import distributed as dist

    moment = collect_second_moment(
        model,
        tokenizer,
        module,
        texts=corpus_texts(corpus_path),
        max_tokens=max_tokens,
        batch_size=batch_size,
        seq_len=seq_len,
        progress=progress,
        shard=(0, 1) if info is None else (info.rank, info.world_size),
    )
    if info is not None:
        moment = dist.allreduce_moment(moment, info)
        if moment.count == 0:
            raise ValueError("the texts hold no tokens")
    return moment


def _provenance(
    model: Any,
    model_dir: PathLike,
    corpus_path: Path,
    batch_size: int,
    info: DistInfo | None,
    moment: SecondMoment,
    max_tokens: int,
) -> dict[str, str]:
    """The metadata a statistics file records beside the fields its reuse is checked on."""
    from rrome._rust import VERSION

    return {
        "model_type": str(getattr(model.config, "model_type", "")),
        "model_name": Path(model_dir).resolve().name,
        "model_dir": str(Path(model_dir).resolve()),
        "corpus": corpus_path.name,
        "batch_size": str(batch_size),
        "workers": str(1 if info is None else info.world_size),
        "tokens_available": str(moment.count) if moment.count < max_tokens else f">={max_tokens}",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "rrome_version": VERSION,
    }


def cholesky_path(stats_file: PathLike, ridge: float = 0.0) -> Path:
    """Where :func:`cached_cholesky` keeps the factor of the statistics in ``stats_file``:
    beside it, ``<stats stem>.chol-ridge<ridge>.safetensors``."""
    p = Path(stats_file)
    return p.with_name(f"{p.stem}.chol-ridge{float(ridge)!r}.safetensors")


def cached_cholesky(stats_file: PathLike, moment: SecondMoment, *, ridge: float = 0.0) -> tuple[Cholesky, Path]:
    """The Cholesky factor of ``moment.moment() + ridge·I``, from the cache or computed and cached.

    ``moment`` must be the statistics stored in ``stats_file``. The factor is kept in
    :func:`cholesky_path` with the sha256 of the statistics file it was computed from; it is
    reused only when its own checksum holds (as for the statistics) and that hash, the ridge and
    the width match (so recomputed or replaced statistics never meet a stale factor), and
    rebuilt otherwise. Factoring costs d³/3 flops,
    reading the cached factor d² · 8 bytes.

    Returns:
        ``(cholesky, factor_path)``.

    Raises:
        FileNotFoundError: ``stats_file`` does not exist.
        NotPositiveDefiniteError: C0 + ridge·I is not positive definite.
    """
    stats_file = Path(stats_file)
    path = cholesky_path(stats_file, ridge)
    sha = sha256_file(stats_file)
    if path.is_file() and _verified(path, "Cholesky factor"):
        try:
            chol = Cholesky.load(path)
        except InvalidFileError:
            chol = None
        if chol is not None and chol.metadata.get("stats_sha256") == sha and chol.ridge == ridge and chol.d == moment.d:
            return chol, path
    chol = Cholesky(moment.moment(), ridge)
    chol.save(path, {"stats_file": stats_file.name, "stats_sha256": sha})
    seal(path)
    return chol, path

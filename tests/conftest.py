"""Session fixtures: the tiny checkpoints of tests/tiny_models.py (built offline, no network),
each built once per session, and a private statistics cache.

``tiny_dir(family, ...)`` is a pristine folder to read; ``tiny_copy(family, ...)`` a private copy
a test may edit in place; ``tiny_loaded(family, ...)`` the (model, tokenizer, adapter) of a
pristine folder, loaded once and shared, which tests must leave as they found it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before anything imports huggingface_hub / transformers: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# Crash-test variables leaking in from the caller would abort the test process itself.
os.environ.pop("RROME_CRASH_AT", None)
os.environ.pop("RROME_STATS_CRASH_RANK", None)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from tiny_models import BOS_FAMILIES, SENTENCEPIECE_FAMILIES, build_tiny_model

CRASH_VARIABLES = ("RROME_CRASH_AT", "RROME_STATS_CRASH_RANK")
# Saved in shards of at most this size, a tiny checkpoint has a dozen shards.
SHARD_SIZE = "20KB"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``get(family, padding_side="right", bos=None, sp=None, dtype="f32", sharded=False,
    max_positions=None)``: a pristine checkpoint of ``tiny_models.build_tiny_model`` (``bos`` and
    ``sp``, its ``sentencepiece_like``, default to the family's habit; ``sharded`` saves in shards
    of ``SHARD_SIZE``; ``max_positions`` None is the builder's default), built once per session.
    Read it; copy it before writing."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[tuple[Any, ...], Path] = {}

    def get(
        family: str,
        padding_side: str = "right",
        bos: bool | None = None,
        sp: bool | None = None,
        dtype: str = "f32",
        sharded: bool = False,
        max_positions: int | None = None,
    ) -> Path:
        # The family's defaults spelt out, so that the same model is built once.
        bos = family in BOS_FAMILIES if bos is None else bos
        sp = family in SENTENCEPIECE_FAMILIES if sp is None else sp
        key = (family, padding_side, bos, sp, dtype, sharded, max_positions)
        if key not in built:
            dest = root / "-".join(str(part) for part in key)
            extra: dict[str, Any] = {} if max_positions is None else {"max_positions": max_positions}
            built[key] = build_tiny_model(
                family,
                dest,
                bos=bos,
                padding_side=padding_side,
                sentencepiece_like=sp,
                dtype=dtype,
                shard_size=SHARD_SIZE if sharded else None,
                **extra,
            )
        return built[key]

    return get


@pytest.fixture
def tiny_copy(tiny_dir: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """``make(family, ..., name="model")``: a private copy (in the test's ``tmp_path``) of
    ``tiny_dir(family, ...)``, free to edit."""

    def make(family: str, *args: Any, name: str = "model", **kwargs: Any) -> Path:
        dest = tmp_path / name
        shutil.copytree(tiny_dir(family, *args, **kwargs), dest)
        return dest

    return make


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir: Callable[..., Path]) -> Callable[..., tuple[Any, Any, Any]]:
    """``get(family, ...)``: (model, tokenizer, adapter) of ``tiny_dir(family, ...)`` on the CPU,
    loaded once; tests must leave the model as they found it."""
    from rrome.engine.models import load

    loaded: dict[Path, tuple[Any, Any, Any]] = {}

    def get(family: str, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
        folder = tiny_dir(family, *args, **kwargs)
        if folder not in loaded:
            loaded[folder] = load(folder, device="cpu")
        return loaded[folder]

    return get


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Statistics go to a folder of the test (``RROME_CACHE_DIR``), never to the user's cache.

    A module whose every test computes statistics says ``pytestmark =
    pytest.mark.usefixtures("private_cache")``."""
    cache = tmp_path / "rrome-cache"
    monkeypatch.setenv("RROME_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> None:
    """Makes every expensive step of an edit (keys, value, update, templates, probabilities,
    statistics) fail the test if it is reached; statistics would go to ``private_cache``."""
    import rrome.engine.editor as editor_mod

    def forbidden(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("reached the expensive part of an edit")

    for name in ("keys_at", "compute_value", "compute_update", "cached_templates", "request_probabilities"):
        monkeypatch.setattr(editor_mod, name, forbidden)
    monkeypatch.setattr(editor_mod.stats, "second_moment", forbidden)


@pytest.fixture(autouse=True)
def _no_template_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests generate their context templates: tiny models built with different weights share a
    model key, so a cache would hand one model the other's (tests/test_keys.py tests the cache)."""
    monkeypatch.setenv("RROME_NO_TEMPLATE_CACHE", "1")


@pytest.fixture(autouse=True)
def _no_crash_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in CRASH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread: with two, thread sync dominates each small op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

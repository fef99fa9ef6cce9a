"""Where rrome keeps what it computes once: the cache folder.

Each model's layer statistics, their Cholesky factors (:mod:`rrome.engine.stats`) and its
context templates (:mod:`rrome.engine.keys`) live in :func:`model_cache_dir`, under
``cache_root()/stats``; the converted demo models (:mod:`rrome.demo`) under
``cache_root()/models``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "RROME_CACHE_DIR"
"""Environment variable naming the cache folder (overrides ``$XDG_CACHE_HOME/rrome``)."""


def cache_root() -> Path:
    """rrome's cache folder: ``$RROME_CACHE_DIR``, else ``$XDG_CACHE_HOME/rrome``, else ``~/.cache/rrome``.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG base directory specification says.
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "rrome"
    return Path.home() / ".cache" / "rrome"


def model_cache_dir(key: str) -> Path:
    """The folder of one model's cached work (statistics, factors, templates):
    ``cache_root()/stats/<key>``, ``key`` being :func:`rrome.engine.stats.model_key`."""
    return cache_root() / "stats" / key

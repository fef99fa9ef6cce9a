"""Where rrome keeps what it computes once: the cache folder.

Layer statistics and their Cholesky factors (:mod:`rrome.engine.stats`) live under
``cache_root()/stats``, the converted demo models (:mod:`rrome.demo`) under
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

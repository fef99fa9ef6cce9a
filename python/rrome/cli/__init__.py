"""The ``rrome`` command line.

Each command is a thin shell over the Python API. Expected failures (bad files, locks,
missing paths) print one line ``rrome: error: ...`` and exit with status 1; usage mistakes
exit with status 2 (click's convention). The file commands import neither torch nor
transformers, so they start in a fraction of a second.

The commands live by kind: :mod:`rrome.cli.files` (the checkpoint's files, no model),
:mod:`rrome.cli.model` (commands that load a model), :mod:`rrome.cli.evaluate` (evaluation and
its report); :mod:`rrome.cli.common` holds the group and what they share. ``main`` is the
console script's entry point (``rrome = "rrome.cli:main"``).
"""

from rrome.cli import evaluate, files, model  # noqa: F401  (each module registers its commands)
from rrome.cli.common import main

__all__ = ["main"]

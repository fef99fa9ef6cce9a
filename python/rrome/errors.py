"""The exception classes where the Rust extension finds them.

The bindings (``rust/rrome-py``) import their exception classes from the module ``rrome.errors``
by name; the classes live in :mod:`rrome.files.errors` and are re-exported here unchanged, so
both names are the same objects.
"""

from rrome.files.errors import *  # noqa: F403
from rrome.files.errors import __all__ as __all__

"""Names shared by every layer: the update variants and the dtypes a model runs in.

The command line offers these as choices, the engine checks its arguments against them and the
report finds a results folder's variants by them; all read the lists here, so adding a variant
or a dtype is one change. Plain strings: nothing here imports torch.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["r-rome", "rome", "p-rome"]
METHODS: tuple[Method, ...] = ("r-rome", "rome", "p-rome")
"""The update variants (docs/design.md §1), the default first."""

DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a model may run in, the default first."""

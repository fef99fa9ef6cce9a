"""Results folders without torch: the files ``rrome eval`` and ``rrome tune`` write.

``rrome eval`` (:mod:`rrome.eval.runs`) and ``rrome tune`` (:mod:`rrome.eval.tune`) write their
folders through these helpers, and ``rrome report`` (:mod:`rrome.eval.report`) reads them back
with nothing else, so rebuilding a table or a figure never imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rrome.files.fsutil import atomic_write

RUN_FILE = "run.json"
BASELINE_FILE = "baseline.json"


def fsync_append(path: Path, obj: Any) -> None:
    """Appends ``obj`` as one JSON line and fsyncs it: after a crash the line is whole or torn
    (:func:`read_jsonl` drops a torn last line), never lost once this returns."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON, atomically (:func:`rrome.files.fsutil.atomic_write`)."""
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a results file, without a torn last line (a killed run's, or the
    line a running process is writing). ``repair`` also cuts it off the file: only the run that
    is about to append may do that, never a reader such as ``rrome report``."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data.rfind(b"\n") + 1
    if repair and good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return [json.loads(line) for line in data[:good].decode("utf-8").splitlines() if line.strip()]

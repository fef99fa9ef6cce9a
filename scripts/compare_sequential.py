"""Checkpoints of sequential runs side by side: one Markdown table, one row per run and checkpoint.

    python scripts/compare_sequential.py RUN_A/sequential-r-rome RUN_B/sequential-r-rome [--names A B]

Reads each folder's ``checkpoints.jsonl`` (as ``rrome eval --sequential`` writes it; a run still
being written can be read) and prints, at every number of edits both runs have reached, ES, PS,
NS and Score over the edits so far, the downstream accuracies where the runs measured them, and
the median and largest |Δ| so far. No torch.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from rrome.eval.results import Variant, read_jsonl

TASKS = ("sst2", "mrpc", "rte", "cola")


def _checkpoints(folder: str) -> dict[int, dict[str, Any]]:
    path = Variant.of(Path(folder)).checkpoints
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (expected a sequential run's variant folder)")
    return {int(c["edits"]): c for c in read_jsonl(path)}


def _cell(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="variant folders of sequential runs (…/sequential-r-rome)")
    ap.add_argument("--names", nargs="+", help="a name per folder (default: the folders)")
    args = ap.parse_args()
    names = args.names or args.folders
    if len(names) != len(args.folders):
        raise SystemExit(f"--names gives {len(names)} names for {len(args.folders)} folders")
    runs = [_checkpoints(f) for f in args.folders]
    common = sorted(set.intersection(*(set(r) for r in runs)))
    if not common:
        raise SystemExit("the runs have no checkpoint at the same number of edits")
    tasks = [t for t in TASKS if all(t in (r[n].get("downstream") or {}) for r in runs for n in common)]
    head = ["edits", "run", "ES", "PS", "NS", "Score", *[t.upper() for t in tasks], "median abs Δ", "max abs Δ"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for n in common:
        for name, run in zip(names, runs, strict=True):
            c = run[n]
            m = c["metrics"]
            cells = [str(n), name, *(_cell(m.get(k)) for k in ("ES", "PS", "NS", "Score"))]
            cells += [_cell(c["downstream"][t], 0) for t in tasks]
            cells += [f"{c.get('median_norm_delta', math.nan):.1e}", f"{c.get('max_norm_delta', math.nan):.1e}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Crash soak: many random SIGKILL trials of rrome's file commands (the harness of make test, longer).

Each trial kills `rrome apply-deltas` (in place or --out), `rrome revert` or `rrome recover`
at a random moment of its write, recovers (CLI, API, the next command, or a recovery that is
itself killed) and checks that every shard is byte for byte the state before or after the
command, with an edit log, undo data and copy destinations that agree (tests/crash_harness.py).

    .venv/bin/python scripts/soak_crash.py --trials 1000 [--seed N] [--workdir DIR]

Exits 1 at the first corrupted folder (kept under --workdir for a look), 0 otherwise. Needs the
built extension (`make build`); does not import torch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crash_harness import CorruptFolderError, run_trials


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (default: a temporary folder)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rrome-soak-", dir=args.workdir))
    print(f"soak: {args.trials} trials, seed {args.seed}, in {work}", flush=True)
    t0 = time.perf_counter()
    try:
        stats = run_trials(args.trials, args.seed, work, log=True)
    except CorruptFolderError as e:
        print(f"soak: CORRUPTED after {time.perf_counter() - t0:.0f} s (seed {args.seed}): {e}", file=sys.stderr)
        print(f"soak: the folder is kept in {work}", file=sys.stderr)
        return 1
    print(f"soak: ok in {time.perf_counter() - t0:.0f} s: {stats.summary()}")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())

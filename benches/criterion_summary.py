"""Summarises the Criterion benchmarks of the Rust core (``cargo bench -p rrome-core``).

Reads ``target/criterion/**/new/{benchmark,estimates}.json`` as Criterion leaves them, prints
one line per kernel, ``<id>  median=<s>  [throughput]``, and writes the same records to
``bench-results-rust.json``. ``make bench-rust`` runs the benches and then this.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def summarise(root: Path) -> list[dict[str, Any]]:
    records = []
    for bench in sorted(root.glob("**/new/benchmark.json")):
        meta = json.loads(bench.read_text())
        est = json.loads(bench.with_name("estimates.json").read_text())
        median = est["median"]["point_estimate"] / 1e9
        lo = est["median"]["confidence_interval"]["lower_bound"] / 1e9
        hi = est["median"]["confidence_interval"]["upper_bound"] / 1e9
        rec: dict[str, Any] = {"name": meta["full_id"], "median_s": median, "ci95_s": [lo, hi]}
        tp = meta.get("throughput") or {}
        if "Bytes" in tp:
            rec["throughput_gib_s"] = tp["Bytes"] / median / 2**30
        if "Elements" in tp:
            rec["throughput_gelem_s"] = tp["Elements"] / median / 1e9
        records.append(rec)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("target/criterion"))
    ap.add_argument("--out", type=Path, default=Path("bench-results-rust.json"))
    args = ap.parse_args()
    records = summarise(args.root)
    if not records:
        raise SystemExit(f"no Criterion results under {args.root}: run `cargo bench -p rrome-core` first")
    width = max(len(r["name"]) for r in records)
    for r in records:
        extra = "".join(f"  {k}={r[k]:.3g}" for k in ("throughput_gib_s", "throughput_gelem_s") if k in r)
        lo, hi = r["ci95_s"]
        print(f"{r['name']:<{width}}  median={r['median_s']:.4g}s  ci95=[{lo:.4g}, {hi:.4g}]{extra}")
    load = os.getloadavg()[0]
    args.out.write_text(json.dumps([{**r, "load_avg": load} for r in records], indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""CounterFact metrics of two one-at-a-time runs on the cases both have edited (paired).

    python scripts/paired_metrics.py RUN_A/single-r-rome RUN_B/single-r-rome [--names A B]

Reads each folder's ``edits.jsonl`` (as ``rrome eval`` writes it), keeps the case ids present in
both, and prints ES/PS/NS/Score for each run on those cases, plus the cases where the
neighbourhood prompt keeps its answer in one run and not in the other (a paired comparison:
on the same cases the run-to-run difference has far less noise than two independent samples).
No torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rrome.eval.metrics import CaseProbs, metrics
from rrome.eval.results import read_jsonl


def _cases(folder: Path) -> dict[str, CaseProbs]:
    # read_jsonl leaves out a torn last line, so a folder still being written can be read.
    return {str(rec["case_id"]): CaseProbs.from_json(rec["case"]) for rec in read_jsonl(folder / "edits.jsonl")}


def _neighbour_kept(c: CaseProbs) -> float:
    return metrics([c])["NS"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    args = ap.parse_args()
    a, b = _cases(args.a), _cases(args.b)
    common = sorted(set(a) & set(b), key=lambda k: (len(k), k))
    print(f"{len(common)} cases in both ({len(a)} in {args.names[0]}, {len(b)} in {args.names[1]})")
    print("| run | ES | PS | NS | Score |\n|---|---|---|---|---|")
    for name, run in zip(args.names, (a, b), strict=True):
        m = metrics([run[k] for k in common])
        print(f"| {name} | {m['ES']:.1f} | {m['PS']:.1f} | {m['NS']:.1f} | {m['Score']:.1f} |")
    only_a = sum(_neighbour_kept(a[k]) > _neighbour_kept(b[k]) for k in common)
    only_b = sum(_neighbour_kept(b[k]) > _neighbour_kept(a[k]) for k in common)
    print(f"neighbour kept only in {args.names[0]}: {only_a} cases; only in {args.names[1]}: {only_b} cases")


if __name__ == "__main__":
    main()

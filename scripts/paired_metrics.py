"""CounterFact metrics of two runs on the cases both have edited (paired).

    python scripts/paired_metrics.py RUN_A/single-r-rome RUN_B/single-r-rome [--names A B]
    python scripts/paired_metrics.py A1/single-r-rome,A2/single-r-rome RUN_B/single-r-rome
    python scripts/paired_metrics.py RUN_A/sequential-r-rome RUN_B/sequential-r-rome

Reads each folder's ``edits.jsonl`` (as ``rrome eval`` writes it; a side may join several
folders with commas, e.g. one run's cases 1-100 and another's 101-200): a one-at-a-time run's
cases as each edit left them, a finished sequential run's as its last edit left them all
(``final.json``), keeps the case ids present in both sides, and prints ES/PS/NS/Score for
each side on those cases, plus, per metric, the cases that succeed in one side and not in the
other (a paired comparison: on the same cases the run-to-run difference has far less noise than
two independent samples). No torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rrome.eval.metrics import CaseProbs, metrics
from rrome.eval.results import FINAL_FILE, edits_path, read_jsonl, read_object


def _folder_cases(folder: Path) -> list[tuple[str, CaseProbs]]:
    # read_jsonl leaves out a torn last line, so a one-at-a-time folder still being written can be read.
    records = read_jsonl(edits_path(folder))
    if any("case" in rec for rec in records):
        return [(str(rec["case_id"]), CaseProbs.from_json(rec["case"])) for rec in records]
    if not records:
        return []
    final = folder / FINAL_FILE
    if not final.is_file():
        raise SystemExit(f"{folder}: a sequential run without {FINAL_FILE} (not finished): no cases to pair yet")
    cases = read_object(final)["cases"]
    if len(cases) != len(records):
        raise SystemExit(f"{final}: holds {len(cases)} cases, the run's edits.jsonl {len(records)}")
    # The i-th line is the i-th case (a refused edit's too: its case is measured, unedited).
    return [(str(rec["case_id"]), CaseProbs.from_json(cases[int(rec["index"])])) for rec in records]


def _cases(folders: str) -> dict[str, CaseProbs]:
    out: dict[str, CaseProbs] = {}
    for folder in folders.split(","):
        for key, case in _folder_cases(Path(folder)):
            if key in out:
                raise SystemExit(f"case {key} is in two folders of {folders}")
            out[key] = case
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a run's variant folder, or several joined by commas")
    ap.add_argument("b", help="the same for the other run")
    ap.add_argument("--names", nargs=2, default=["A", "B"])
    args = ap.parse_args()
    a, b = _cases(args.a), _cases(args.b)
    common = sorted(set(a) & set(b), key=lambda k: (len(k), k))
    print(f"{len(common)} cases in both ({len(a)} in {args.names[0]}, {len(b)} in {args.names[1]})")
    print("| run | ES | PS | NS | Score |\n|---|---|---|---|---|")
    for name, run in zip(args.names, (a, b), strict=True):
        m = metrics([run[k] for k in common])
        print(f"| {name} | {m['ES']:.1f} | {m['PS']:.1f} | {m['NS']:.1f} | {m['Score']:.1f} |")
    for metric, what in (("ES", "edit took"), ("PS", "paraphrase took"), ("NS", "neighbour kept")):
        only_a = sum(metrics([a[k]])[metric] > metrics([b[k]])[metric] for k in common)
        only_b = sum(metrics([b[k]])[metric] > metrics([a[k]])[metric] for k in common)
        print(f"{what} only in {args.names[0]}: {only_a} cases; only in {args.names[1]}: {only_b} cases")


if __name__ == "__main__":
    main()

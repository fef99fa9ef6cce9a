"""Why a sequential run's downstream accuracy moved: label bias or lost ranking.

    python scripts/downstream_bias.py RUN/sequential-rome MODEL_DIR --at 0,250,300,350 [--task sst2] [--glue-n N]

Rebuilds the run's model after each number of edits from its folder's factors (as
``scripts/sequential_continuations.py`` does) and scores the same few-shot records as the run's
checkpoints (the run's ``--glue-n`` and ``--seed``, from its ``run.json``; ``--glue-n`` scores
more: the run's records are the first of them, in the same order, with the same demonstrations).
For each task it prints the accuracy, how many records the model gives each label, and for
two-label tasks the mean margin log P(label 1) − log P(label 0) and the AUC of that margin
against the true labels. An accuracy drop with a steady AUC is a shift of the label words' prior
(the model still orders the records as before but puts the threshold elsewhere); a falling AUC is
lost ability. The last column pairs each row with the first number of edits asked for: the
records it got right there and wrong here, and wrong there and right here (on the same records
the change has far less noise than the two accuracies: 50 records move an accuracy by about ±14
points).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rrome.eval.downstream import few_shot_sets, label_scores, predicted_labels
from rrome.eval.runs import rebuild_along, run_settings
from rrome.files.errors import RromeError


def auc(scores: list[float], labels: list[int]) -> float:
    """P(a random positive record scores above a random negative one), ties counting half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a sequential run's variant folder (…/sequential-rome)")
    ap.add_argument("model_dir", type=Path, help="the unedited model the run edited")
    ap.add_argument("--at", required=True, help="numbers of edits, comma-separated (0: unedited)")
    ap.add_argument("--task", action="append", help="a GLUE task (repeatable; default: all the run measured)")
    ap.add_argument("--glue-n", type=int, help="records per task (default: the run's own --glue-n)")
    args = ap.parse_args()

    try:
        run = run_settings(args.folder)  # read once: the GLUE sets here, the dtype in rebuild_along
        n_records = int(run["glue_n"]) if args.glue_n is None else args.glue_n
        if n_records < 1:
            raise RromeError(f"--glue-n must be at least 1, got {n_records}")
        sets = few_shot_sets(n_records, seed=int(run["seed"]))
        sets = [s for s in sets if not args.task or s.task.name in args.task]
        if not sets:
            raise RromeError(f"no GLUE task named {args.task}")
        counts = sorted({int(x) for x in args.at.split(",")})
        head = "| edits | task | accuracy | records per predicted label | mean margin | AUC |"
        print(f"{head} lost / gained against {counts[0]} |")
        print("|---|---|---|---|---|---|---|")
        first: dict[str, list[bool]] = {}  # per task: each record right at the first count
        for n, _, editor in rebuild_along(args.folder, args.model_dir, counts, settings=run):
            for s in sets:
                rows = label_scores(editor.model, editor.tokenizer, s)
                truth = [int(r["label"]) for r in s.records]
                pred = predicted_labels(rows)
                right = [p == t for p, t in zip(pred, truth, strict=True)]
                acc = 100 * sum(right) / len(truth)
                base = first.setdefault(s.task.name, right)
                lost = sum(b and not r for b, r in zip(base, right, strict=True))
                gained = sum(r and not b for b, r in zip(base, right, strict=True))
                paired = "–" if n == counts[0] else f"{lost} / {gained}"
                shares = " / ".join(f"{w} {pred.count(j)}" for j, w in enumerate(s.task.labels))
                margin, area = "–", "–"
                if len(s.task.labels) == 2:
                    m = [row[1] - row[0] for row in rows]
                    margin, area = f"{sum(m) / len(m):+.2f}", f"{auc(m, truth):.3f}"
                print(f"| {n} | {s.task.name} | {acc:.0f} | {shares} | {margin} | {area} | {paired} |", flush=True)
    except (RromeError, OSError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()

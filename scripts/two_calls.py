"""Do a folder's first edits survive a second ``rrome apply``? Measured as a user would get it.

Two batches of N CounterFact records each are applied with two ``rrome apply`` calls, the first
to a copy of MODEL (``--out``), the second in place on that copy; every ``--set`` goes to both
calls. After each call the edited folder is loaded with transformers and ES, PS and NS are
measured (``rrome.eval.probabilities.case_probabilities``, as ``rrome eval`` measures them) for
the batches applied so far; the unedited model is measured too. Writes ``OUT/summary.json`` and
``OUT/table.md``; the edited copy is removed at the end unless ``--keep``.

    python scripts/two_calls.py $(rrome demo-model) --data ../shared/data/counterfact/counterfact-val.json \\
        --offset 200 --n 30 --set retain_edit_keys=true --out docs/results/gemma3-270m-two-calls/retain-on
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rrome.eval.metrics import metrics
from rrome.eval.probabilities import case_probabilities
from rrome.files.edits import EditRequest, load_requests


def measure(folder: Path, cases: list[EditRequest]) -> dict[str, float]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        probs = [case_probabilities(model, tok, c) for c in cases]
    return {k: round(v, 2) for k, v in metrics(probs).items() if k in ("ES", "PS", "NS", "Score")}


def write_batch(path: Path, cases: list[EditRequest]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for c in cases:
            f.write(json.dumps(c.to_json()) + "\n")


def apply(edits: Path, model: Path, sets: list[str], out: Path | None) -> None:
    cmd = [sys.executable, "-m", "rrome.cli", "apply", str(edits), str(model), "--no-progress"]
    cmd += [x for s in sets for x in ("--set", s)]
    if out is not None:
        cmd += ["--out", str(out)]
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--offset", type=int, default=200)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the edited copy (OUT/model)")
    args = ap.parse_args()
    cases = load_requests(args.data)[args.offset : args.offset + 2 * args.n]
    first, second = cases[: args.n], cases[args.n :]
    args.out.mkdir(parents=True, exist_ok=True)
    edited = args.out / "model"
    shutil.rmtree(edited, ignore_errors=True)
    write_batch(args.out / "first.jsonl", first)
    write_batch(args.out / "second.jsonl", second)
    rows: dict[str, Any] = {
        "unedited": {"first": measure(args.model, first), "second": measure(args.model, second)},
    }
    apply(args.out / "first.jsonl", args.model, args.sets, edited)
    rows["after call 1"] = {"first": measure(edited, first)}
    apply(args.out / "second.jsonl", edited, args.sets, None)
    rows["after call 2"] = {"first": measure(edited, first), "second": measure(edited, second)}
    summary = {
        "model": args.model.name,
        "data": str(args.data),
        "offset": args.offset,
        "n": args.n,
        "set": args.sets,
        "rows": rows,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        f"Two `rrome apply` calls of {args.n} records each (records {args.offset + 1}–{args.offset + 2 * args.n} "
        f"of `{args.data.name}`), `--set` {' '.join(args.sets) or '(none)'}; ES / PS / NS in percent.",
        "",
        "| state | first batch | second batch |",
        "| --- | --- | --- |",
    ]
    for state, batches in rows.items():
        cells = [
            " / ".join(f"{batches[b][k]:.1f}" for k in ("ES", "PS", "NS")) if b in batches else "–"
            for b in ("first", "second")
        ]
        lines.append(f"| {state} | {cells[0]} | {cells[1]} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(edited)


if __name__ == "__main__":
    main()

"""Edits made plain and in chat, each measured plain and in chat: one Markdown table.

    python scripts/chat_table.py EDIT_PLAIN EDIT_CHAT [--method r-rome]

EDIT_PLAIN and EDIT_CHAT are `rrome eval` folders of the same cases, one run with
``--edit-prompts plain`` and one with ``--edit-prompts chat``, both with ``--eval-prompts
plain,chat`` (docs/design.md §2). The table is over the cases both runs have finished (a run
still being written can be read; its torn last line is left out): the metrics (ES, PS, NS,
Score, EM, PM, NM, in percent) for each of the four combinations and for the unedited model in
both styles, then, paired by case, how often an edit that holds on one style's rewrite prompt
also holds on the other's, and how often the same edit gives P(new) a higher value in chat than
plain (rewrite and first paraphrase prompt). No torch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rrome.eval.metrics import METRICS, CaseProbs, metrics
from rrome.eval.results import BASELINE_FILE, RUN_FILE, Variant, read_jsonl

STYLES = ("plain", "chat")


def _fields(run: dict[str, Any], where: Path) -> dict[str, str]:
    """Measuring style -> the suffix of its fields in this run (``""`` for the first)."""
    styles = run.get("eval_prompts", ["plain"])
    if sorted(styles) != sorted(STYLES):
        raise SystemExit(f"{where}: measured on {styles}; rerun it with --eval-prompts plain,chat")
    return {s: ("" if i == 0 else f"_{s}") for i, s in enumerate(styles)}


def _load(folder: Path, method: str, edit: str) -> tuple[dict[str, str], dict[str, Any], dict[int, dict[str, Any]]]:
    run = json.loads((folder / RUN_FILE).read_text())
    if run.get("edit_prompts", "plain") != edit:
        raise SystemExit(f"{folder}: its edits are on {run.get('edit_prompts', 'plain')} prompts, not {edit}")
    base = json.loads((folder / BASELINE_FILE).read_text())
    records = {int(r["index"]): r for r in read_jsonl(Variant(folder, "single", method).edits)}
    return _fields(run, folder), base, records


def _row(name: str, cases: int, m: dict[str, float]) -> str:
    return f"| {name} | {cases} | " + " | ".join(f"{m[k]:.1f}" for k in METRICS) + " |"


def _holds(case: dict[str, Any]) -> bool:
    new, true = case["rewrite"][0]
    return bool(new > true)


def table(edit_plain: Path, edit_chat: Path, method: str = "r-rome") -> str:
    runs = {"plain": _load(edit_plain, method, "plain"), "chat": _load(edit_chat, method, "chat")}
    common = sorted(set(runs["plain"][2]) & set(runs["chat"][2]))
    if not common:
        raise SystemExit("the two runs have no finished case in common yet")
    n = len(common)
    lines = [
        f"{n} cases (records {', '.join(_ranges(common))}), {method}, one edit at a time",
        "",
        "| edited on → measured on | cases | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    fields, base, _ = runs["plain"]
    for measured in STYLES:
        key = "cases" + fields[measured]
        probs = [CaseProbs.from_json(base[key][i]) for i in common]
        lines.append(_row(f"unedited → {measured}", n, metrics(probs)))
    for edit in STYLES:
        fields, _, records = runs[edit]
        for measured in STYLES:
            probs = [CaseProbs.from_json(records[i]["case" + fields[measured]]) for i in common]
            lines.append(_row(f"{edit} → {measured}", n, metrics(probs)))
    lines += [
        "",
        "| edited on | rewrite holds plain | holds chat | holds both | plain only | chat only "
        "| P(new) higher in chat: rewrite | paraphrase |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for edit in STYLES:
        fields, _, records = runs[edit]
        plain = [_holds(records[i]["case" + fields["plain"]]) for i in common]
        chat = [_holds(records[i]["case" + fields["chat"]]) for i in common]
        both = sum(a and b for a, b in zip(plain, chat, strict=True))
        higher = {
            group: sum(
                records[i]["case" + fields["chat"]][group][0][0] > records[i]["case" + fields["plain"]][group][0][0]
                for i in common
            )
            for group in ("rewrite", "paraphrase")
        }
        lines.append(
            f"| {edit} | {sum(plain)} | {sum(chat)} | {both} | {sum(plain) - both} | {sum(chat) - both} "
            f"| {higher['rewrite']} of {n} | {higher['paraphrase']} of {n} |"
        )
    return "\n".join(lines) + "\n"


def _ranges(indices: list[int]) -> list[str]:
    """Record numbers (from 1) as ranges: [0, 1, 2, 5] -> ["1–3", "6"]."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start + 1}–{prev + 1}" if prev > start else f"{start + 1}")
        if i is not None:
            start = prev = i
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("edit_plain", type=Path)
    ap.add_argument("edit_chat", type=Path)
    ap.add_argument("--method", default="r-rome")
    args = ap.parse_args()
    print(table(args.edit_plain, args.edit_chat, args.method), end="")


if __name__ == "__main__":
    main()

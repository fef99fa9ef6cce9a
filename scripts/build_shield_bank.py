"""Builds the neighbour shield's bank of subjects, ``python/rrome/data/shield/subjects.json``.

The bank holds CounterFact *train* subjects grouped by the prompt they were asked in (the
record's prompt with its subject replaced by ``{}``: one relation phrasing, so the names of one
group are of one type). Nothing that CounterFact val names is kept: no val subject, and no name
that appears in any val prompt, paraphrase or neighbourhood prompt (so the shield never sees a
neighbour the evaluation measures). Each group keeps at most ``--per-prompt`` names, the first in
the file's order. Deterministic: the same data give the same file.

    python scripts/build_shield_bank.py ../shared/data/counterfact/counterfact-train.json \\
        ../shared/data/counterfact/counterfact-val.json --out python/rrome/data/shield/subjects.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(train: Path, val: Path, per_prompt: int) -> dict[str, object]:
    records = json.loads(train.read_text(encoding="utf-8"))
    held_out = json.loads(val.read_text(encoding="utf-8"))
    val_subjects = {r["subject"].casefold() for r in held_out}
    # Every text the val split shows the model, one string to search.
    val_text = "\n".join(
        str(r.get(k, "")) for r in held_out for k in ("prompt", "rephrase_prompt", "locality_prompt")
    ).casefold()
    groups: dict[str, list[str]] = {}
    dropped = 0
    for r in records:
        subject, prompt = r["subject"], r["prompt"]
        if not subject or prompt.count(subject) != 1:
            continue
        if subject.casefold() in val_subjects or subject.casefold() in val_text:
            dropped += 1
            continue
        names = groups.setdefault(prompt.replace(subject, "{}"), [])
        if subject not in names and len(names) < per_prompt:
            names.append(subject)
    return {
        "note": (
            "Subjects of CounterFact train (ROME's CounterFact, MIT; the flattened copy of "
            "Jometeorie/KnowledgeSpread @ 51d7402617c2, data/counterfact/) grouped by the prompt they "
            "were asked in, for the neighbour shield (docs/hparams.md). No CounterFact val subject, and "
            "no name that appears in a val prompt, paraphrase or neighbourhood prompt. Built by "
            "scripts/build_shield_bank.py."
        ),
        "train_sha256": _sha256(train),
        "val_sha256": _sha256(val),
        "dropped_as_val": dropped,
        "prompts": dict(sorted(groups.items())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train", type=Path)
    parser.add_argument("val", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-prompt", type=int, default=100)
    args = parser.parse_args()
    bank = build(args.train, args.val, args.per_prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(bank, indent=0, ensure_ascii=False) + "\n", encoding="utf-8")
    prompts = bank["prompts"]
    assert isinstance(prompts, dict)
    print(f"{args.out}: {sum(len(v) for v in prompts.values())} names in {len(prompts)} prompts")


if __name__ == "__main__":
    main()

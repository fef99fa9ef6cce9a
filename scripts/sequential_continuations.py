"""Greedy continuations of a sequential run's model after chosen numbers of edits.

    python scripts/sequential_continuations.py RUN/sequential-rome MODEL_DIR --at 43,44,50 [--prompt P ...]

Rebuilds the edited model from the folder's per-edit factors (``deltas/NNNNN.safetensors``, as
``rrome eval --sequential`` keeps them to resume) by replaying the first N applied edits onto
the unedited checkpoint, exactly as a resumed run does, and prints a Markdown section per N with
greedy continuations of fixed prompts. Refused edits (``--guard``) are skipped as the run
skipped them. Sampled generation entropy moves little on some models when a disabling edit
lands; greedy text shows it at once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rrome.engine.editor import Editor
from rrome.eval.results import read_jsonl
from rrome.eval.runs import replay_edits

PROMPTS = (
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays the sport of",
    "The capital of Japan is",
    "Once upon a time",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a sequential run's variant folder (…/sequential-rome)")
    ap.add_argument("model_dir", type=Path, help="the unedited model the run edited")
    ap.add_argument("--at", required=True, help="numbers of edits, comma-separated (0: unedited)")
    ap.add_argument("--prompt", action="append", help="a prompt (repeatable; default: four fixed ones)")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    args = ap.parse_args()

    counts = sorted({int(x) for x in args.at.split(",")})
    records = read_jsonl(args.folder / "edits.jsonl")
    if counts and counts[-1] > len(records):
        raise SystemExit(f"{args.folder}: holds {len(records)} edits, asked for {counts[-1]}")
    base = json.loads((args.folder.parent / "baseline.json").read_text())
    editor = Editor.from_pretrained(args.model_dir, layer=int(base["layer"]), device="cpu", progress=False)
    prompts = args.prompt or list(PROMPTS)
    done = 0
    print(f"# Greedy continuations along `{args.folder}`\n")
    for n in counts:
        replay_edits(editor, args.folder / "deltas", records[done:n])
        done = n
        last = records[n - 1] if n else None
        what = "unedited" if last is None else f"after {n} edits (last: case {last['case_id']}, {last['subject']})"
        print(f"## {what}\n\n```text")
        for prompt, text in zip(prompts, editor.generate(prompts, max_new_tokens=args.max_new_tokens), strict=True):
            print(f"{prompt} → {text.replace(chr(10), ' ⏎ ')}")
        print("```\n")


if __name__ == "__main__":
    main()

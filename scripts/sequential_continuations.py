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
from pathlib import Path
from typing import Any

from rrome.engine.editor import Editor
from rrome.eval.runs import rebuild_along
from rrome.files.errors import RromeError

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
    prompts = args.prompt or list(PROMPTS)
    print(f"# Greedy continuations along `{args.folder}`\n")
    try:
        for n, last, editor in rebuild_along(args.folder, args.model_dir, counts):
            _section(editor, n, last, prompts, args.max_new_tokens)
    except RromeError as e:
        raise SystemExit(f"error: {e}") from None


def _section(editor: Editor, n: int, last: dict[str, Any] | None, prompts: list[str], max_new_tokens: int) -> None:
    what = "unedited" if last is None else f"after {n} edits (last: case {last['case_id']}, {last['subject']})"
    print(f"## {what}\n\n```text")
    for prompt, text in zip(prompts, editor.generate(prompts, max_new_tokens=max_new_tokens), strict=True):
        print(f"{prompt} → {text.replace(chr(10), ' ⏎ ')}")
    print("```\n")


if __name__ == "__main__":
    main()

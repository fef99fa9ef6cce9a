"""The demo model's conversion fixes (no model needed: the tokenizer file alone)."""

from __future__ import annotations

import json
from pathlib import Path

from rrome.demo import CONTROL_TOKENS, mark_control_tokens


def test_control_tokens_are_marked_special_once(tmp_path: Path) -> None:
    added = [
        {"id": 2, "content": "<bos>", "special": True},
        {"id": 168, "content": "<table>", "special": False},  # text, not a control token
        {"id": 255999, "content": "<start_of_image>", "special": False},
        {"id": 256000, "content": "<end_of_image>", "special": False},
    ]
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps({"added_tokens": added, "model": {"vocab": {"a": 0}}}, indent=2))
    assert mark_control_tokens(tmp_path)
    after = json.loads(path.read_text())
    assert {t["content"]: t["special"] for t in after["added_tokens"]} == {
        "<bos>": True,
        "<table>": False,
        **dict.fromkeys(CONTROL_TOKENS, True),
    }
    assert after["model"] == {"vocab": {"a": 0}}
    assert not mark_control_tokens(tmp_path)  # already marked: nothing to do
    assert not list(tmp_path.glob("*.tmp"))

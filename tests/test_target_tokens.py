"""Target tokenisation: the target ids of every tokenizer kind, and the refusal of blank or empty
targets (an EditFileError or TokenizationError) before any expensive part of an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _helpers import files_under
from tiny_models import train_tokenizer

from rrome.engine.editor import Editor
from rrome.engine.prompts import TokenizationError, target_ids
from rrome.files.edits import EditRequest
from rrome.files.errors import EditFileError, RromeError

TOKENIZER_KINDS = pytest.mark.parametrize(
    ("bos", "sp"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["bytelevel", "bytelevel-bos", "sentencepiece", "sentencepiece-bos"],
)


def _unchecked_request(**fields: Any) -> EditRequest:
    """An EditRequest built around its own validation (it refuses blank targets)."""
    request = object.__new__(EditRequest)
    defaults: dict[str, Any] = {
        "target_true": None,
        "case_id": None,
        "paraphrase_prompts": (),
        "neighborhood_prompts": (),
        "neighborhood_target": None,
    }
    for name, value in {**defaults, **fields}.items():
        object.__setattr__(request, name, value)
    return request


@TOKENIZER_KINDS
def test_target_ids(bos: bool, sp: bool) -> None:
    tok = train_tokenizer(bos=bos, padding_side="right", sentencepiece_like=sp)
    assert issubclass(TokenizationError, RromeError)
    for prefix in ("The capital of France is ", ""):
        with pytest.raises(TokenizationError, match="tokenises to nothing"):
            target_ids(tok, prefix, "")
    for prefix in ("The capital of France is", "The capital of France is "):
        ids = target_ids(tok, prefix, "London")
        assert ids and tok.bos_token_id not in ids and tok.eos_token_id not in ids
        assert tok.decode(ids).strip() == "London"
        assert tok(prefix.rstrip() + " London")["input_ids"][-len(ids) :] == ids


@TOKENIZER_KINDS
def test_empty_target_after_a_word_is_a_tokenization_error(bos: bool, sp: bool) -> None:
    tok = train_tokenizer(bos=bos, padding_side="right", sentencepiece_like=sp)
    with pytest.raises(TokenizationError, match="tokenises to nothing"):
        print(target_ids(tok, "The capital of France is", ""))


def test_blank_target_is_rejected_by_the_request() -> None:
    with pytest.raises(EditFileError, match='"target_new"'):
        EditRequest(prompt="The capital of {}", subject="France", target_new=" ")
    assert issubclass(EditFileError, RromeError)


def test_editor_rejects_blank_targets_before_any_work(
    tiny_dir: Callable[..., Path], no_work: None, private_cache: Path
) -> None:
    editor = Editor.from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(EditFileError, match='"target_new"'):
        editor.edit({"prompt": "The capital of {}", "subject": "France", "target_new": "  "})
    # The prefix ends in a space: the empty target really is empty, and the guard holds.
    with pytest.raises(TokenizationError):
        editor.edit(_unchecked_request(prompt="The capital of {} is ", subject="France", target_new=""))
    assert editor.pending == [] and editor.results == []
    assert files_under(private_cache) == []


def test_editor_rejects_an_empty_target_before_any_work(
    tiny_dir: Callable[..., Path], no_work: None, private_cache: Path
) -> None:
    editor = Editor.from_pretrained(tiny_dir("llama"), progress=False)
    with pytest.raises(TokenizationError):
        editor.edit(_unchecked_request(prompt="The capital of {}", subject="France", target_new=""))

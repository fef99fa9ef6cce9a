"""Chat prompts (docs/design.md §1): an edit made, and a case measured, inside the chat template.

The wrapping is ``apply_chat_template([user: CHAT_INSTRUCTION], add_generation_prompt=True)``
followed by the prompt, which opens the assistant's reply. Checked here on tiny tokenizers given
a simple chat template, with BOS and without, padded on either side:

* the wrapped ids are those transformers' own ``apply_chat_template(..., continue_final_message=True)``
  gives for the same conversation: one BOS where the template writes it, none added on top;
* the subject's last token is found in the wrapped text (the ids of the text cut after the
  subject are a prefix of the whole and end there), in every context template, which sits
  inside the assistant's reply; the targets are the tail of the wrapped text and hold no BOS;
* the keys there are the module's input at that token, the same padded either way, and not the
  plain prompt's;
* an Editor with chat edit prompts edits (and records it), an eval run measures both styles
  from the same edit, the options reach the command line and a model without a template is a
  one-line error.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import SHARED_DATA, assert_one_line_error, run_cli
from engine_reference import DARRIEUX, EDITED, EIFFEL, HAND_TEMPLATES, QUICK_HP

from rrome.engine.editor import Editor
from rrome.engine.keys import compute_keys
from rrome.engine.probabilities import target_probabilities
from rrome.engine.prompts import (
    CHAT_INSTRUCTION,
    PLAIN,
    ChatTemplateError,
    EditPrompts,
    PromptFormat,
    RequestTokens,
)
from rrome.eval.report import markdown_table, summarize
from rrome.eval.results import read_jsonl
from rrome.eval.runs import RunConfig, run
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError
from rrome.files.fsutil import sha256_file

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
TEMPLATE_BOS = "{{ bos_token }}" + TEMPLATE  # as Gemma's and Llama's templates write BOS themselves

DATA = SHARED_DATA / "counterfact" / "counterfact-val.json"


def _chat(tokenizer: Any, bos: bool) -> Any:
    """A copy of a shared tiny tokenizer with a chat template (writing BOS when it adds one)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = TEMPLATE_BOS if bos else TEMPLATE
    return tok


def _span(fmt: PromptFormat, request: EditRequest, template: str = "{}") -> tuple[str, int, int]:
    """The text a prompt becomes (template filled, before wrapping) and the subject's span in it."""
    filled = template.replace("{}", request.text())
    start = template.index("{}") + request.prompt.index("{}")
    return filled, start, start + len(request.subject)


def _input_at(model: Any, name: str, ids: list[int], at: int) -> torch.Tensor:
    """The input of module ``name`` at position ``at`` of ``ids`` run alone (no padding)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, args: tuple[Any, ...]) -> None:
        seen["k"] = args[0].detach()

    handle = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return seen["k"][0, at].float()


CASES = pytest.mark.parametrize(
    ("bos", "side", "sp"),
    [(True, "left", True), (True, "right", False), (False, "right", False), (False, "left", True)],
    ids=["bos-left-sentencepiece", "bos-right-bytelevel", "no-bos-right-bytelevel", "no-bos-left-sentencepiece"],
)


@CASES
def test_subject_and_targets_inside_the_template(
    bos: bool, side: str, sp: bool, tiny_loaded: Callable[..., Any]
) -> None:
    _, shared, _ = tiny_loaded("llama", side, bos, sp)
    tok = _chat(shared, bos)
    fmt = PromptFormat.for_tokenizer(tok, "chat")
    assert fmt.prefix.endswith("assistant: ") and CHAT_INSTRUCTION in fmt.prefix
    for request in (EIFFEL, DARRIEUX):
        tokens = RequestTokens.build(tok, request, fmt)
        text, _, end = _span(fmt, request)
        messages = [{"role": "user", "content": CHAT_INSTRUCTION}, {"role": "assistant", "content": text}]
        theirs = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True)["input_ids"]
        assert tokens.plain.ids == list(theirs), "not the conversation transformers renders"
        assert tokens.plain.ids.count(tok.bos_token_id) == int(bos), "BOS missing or doubled"
        assert (tokens.plain.ids[0] == tok.bos_token_id) == bos
        # The subject's last token: the text cut right after the subject tokenises to a prefix
        # of the whole that ends there (the next character is a space: no merge across it).
        cut = fmt.ids(tok, text[:end])
        assert tokens.plain.ids[: len(cut)] == cut
        assert tokens.plain.lookup == len(cut) - 1
        assert tokens.plain.lookup > len(fmt.ids(tok, "")) - 1, "the subject is inside the reply"
        # Targets: the tail of the wrapped text, no special token, the word itself.
        for target, ids in ((request.target_new, tokens.new), (request.target_true, tokens.true)):
            assert ids is not None
            whole = fmt.ids(tok, text + " " + str(target))
            assert whole[: len(tokens.plain.ids)] == tokens.plain.ids and whole[len(tokens.plain.ids) :] == ids
            assert tok.bos_token_id not in ids and tok.decode(ids).strip() == target
        # Every context template goes inside the reply, before the prompt.
        templates = ["{}", *HAND_TEMPLATES]
        prompts = EditPrompts.build(tok, tokens, templates)
        for template, row, rewrite in zip(templates, prompts.context, prompts.rewrite, strict=True):
            filled, _, t_end = _span(fmt, request, template)
            assert row.ids == fmt.ids(tok, filled)
            assert row.ids[: row.lookup + 1] == fmt.ids(tok, filled[:t_end])
            assert rewrite.ids == row.ids + prompts.target[:-1] and rewrite.lookup == row.lookup
        assert prompts.kl.ids == fmt.ids(tok, f"{request.subject} is a")
        assert prompts.kl.ids[: prompts.kl.lookup + 1] == fmt.ids(tok, request.subject)


@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chat_keys_are_the_input_at_the_subject_either_padding_side(
    family: str, bos: bool, tiny_loaded: Callable[..., Any]
) -> None:
    name = EDITED[family][0].format(1)
    templates = ["{}", *HAND_TEMPLATES]
    keys = {}
    for side in ("right", "left"):
        model, shared, _ = tiny_loaded(family, side, bos)
        tok = _chat(shared, bos)
        fmt = PromptFormat.for_tokenizer(tok, "chat")
        for request in (EIFFEL, DARRIEUX):
            chat = compute_keys(model, tok, name, request, templates, fmt)
            plain = compute_keys(model, tok, name, request, templates)
            assert float((chat.k_e_o - plain.k_e_o).norm()) > 1e-3, "the chat key is the plain prompt's"
            assert float((chat.k_e - plain.k_e).norm()) > 1e-3
            row = RequestTokens.build(tok, request, fmt).plain
            direct = _input_at(model, name, row.ids, row.lookup)
            torch.testing.assert_close(chat.k_e_o, direct, atol=1e-5, rtol=0)
            keys[side, request.subject] = chat
    for request in (EIFFEL, DARRIEUX):
        left, right = keys["left", request.subject], keys["right", request.subject]
        for field in ("k_e", "k_e_o", "w_k_e", "w_k_e_o"):
            torch.testing.assert_close(getattr(left, field), getattr(right, field), atol=1e-5, rtol=0, msg=field)


def test_plain_is_the_tokenizers_own_call(tiny_loaded: Callable[..., Any]) -> None:
    """The default format calls the tokenizer exactly as rrome always did (BOS and all)."""
    _, tok, _ = tiny_loaded("llama", "left", True)
    text = "The Eiffel Tower is located in"
    assert PLAIN.ids(tok, text) == list(tok(text)["input_ids"])
    assert PromptFormat.for_tokenizer(tok, "plain") is PLAIN
    assert RequestTokens.build(tok, EIFFEL) == RequestTokens.build(tok, EIFFEL, PLAIN)


def test_no_chat_template_is_an_error(tiny_loaded: Callable[..., Any]) -> None:
    _, tok, _ = tiny_loaded("gpt2")
    assert not getattr(tok, "chat_template", None)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        PromptFormat.for_tokenizer(tok, "chat")
    assert issubclass(ChatTemplateError, RromeError)
    with pytest.raises(ValueError, match="plain, chat"):
        PromptFormat.for_tokenizer(tok, "json")


def _with_template(folder: Path, bos: bool = False) -> Path:
    (folder / "chat_template.jinja").write_text(TEMPLATE_BOS if bos else TEMPLATE)
    return folder


@pytest.mark.usefixtures("private_cache")
def test_editor_with_chat_prompts_edits_and_records_it(tiny_copy: Callable[..., Path]) -> None:
    folder = _with_template(tiny_copy("llama"), bos=True)
    hp = dict(QUICK_HP, v_num_grad_steps=20)
    editor = Editor.from_pretrained(folder, layer=1, hparams=hp, progress=False, edit_prompts="chat")
    assert editor.edit_prompts == "chat" and editor.prompt_format.prefix.startswith("<bos>user: ")
    result = editor.edit(EIFFEL)
    meta = result.delta.meta
    assert meta is not None
    assert meta["edit_prompts"] == "chat" and meta["chat_prefix"] == editor.prompt_format.prefix
    # P(new) before and after are the chat prompt's, as the measurement computes them.
    [after] = target_probabilities(
        editor.model, editor.tokenizer, ["The Eiffel Tower is located in"], ["Rome"], fmt=editor.prompt_format
    )
    assert result.p_new_after == pytest.approx(after, rel=1e-5)
    assert result.p_new_after > result.p_new_before
    plain = Editor(
        folder,
        editor.model,
        editor.tokenizer,
        editor.adapter,
        editor.hparams,
        method="r-rome",
        corpus=None,
        progress=False,
    )
    assert plain.edit_prompts == "plain"
    assert (plain.edit(DARRIEUX).delta.meta or {})["edit_prompts"] == "plain"
    assert "chat_prefix" not in (plain.results[0].delta.meta or {})


@pytest.mark.usefixtures("private_cache")
def test_eval_run_measures_one_edit_both_ways(tiny_copy: Callable[..., Path], tmp_path: Path) -> None:
    folder = _with_template(tiny_copy("gpt2", name="gpt2"))
    hp = {"v_num_grad_steps": 4, "stats_max_tokens": 2000, "context_template_lengths": [[3, 4]]}
    cfg = RunConfig(
        model_dir=str(folder),
        data=str(DATA),
        data_sha256=sha256_file(DATA),
        n=2,
        layer=0,
        hparams=hp,
        diagnostics=False,
        edit_prompts="chat",
        eval_prompts=("plain", "chat"),
    )
    out = run(cfg, tmp_path / "res", progress=False)
    saved = json.loads((out / "run.json").read_text())
    assert saved["edit_prompts"] == "chat" and saved["eval_prompts"] == ["plain", "chat"]
    base = json.loads((out / "baseline.json").read_text())
    assert len(base["cases_chat"]) == 2 and set(base["metrics_chat"]) == set(base["metrics"])
    records = read_jsonl(out / "single-r-rome" / "edits.jsonl")
    assert [r["index"] for r in records] == [0, 1]
    for rec in records:
        # The chat measurement of the rewrite prompt is the edit's own P(new) after.
        assert rec["case_chat"]["rewrite"][0][0] == pytest.approx(rec["p_new"][1], rel=1e-5)
        assert rec["case"]["rewrite"][0] != rec["case_chat"]["rewrite"][0]
    summary = summarize(out)
    assert summary["prompts"] == {"edit": "chat", "eval": ["plain", "chat"]}
    assert set(summary["variants"]["r-rome"]["metrics_chat"]) == set(summary["variants"]["r-rome"]["metrics"])
    table = markdown_table(summary)
    assert "edits on chat prompts, measured on plain prompts" in table
    assert "The same edits measured on chat prompts:" in table
    # A resumed run must measure the same way.
    with pytest.raises(RromeError, match="eval_prompts"):
        run(RunConfig(**{**cfg.to_json(), "eval_prompts": ("chat",)}), out, progress=False)
    with pytest.raises(RromeError, match="--eval-prompts"):
        run(RunConfig(**{**cfg.to_json(), "eval_prompts": ("chat", "chat")}), tmp_path / "other", progress=False)


def test_tune_folders_without_the_prompt_fields_continue(tmp_path: Path) -> None:
    """A sweep folder written before the prompt options ran plain: the same command continues it."""
    from rrome.eval.tune import TuneConfig, _check_config

    cfg = TuneConfig(model_dir="m", data="d", data_sha256="x")
    old = {k: v for k, v in cfg.to_json().items() if k not in ("edit_prompts", "eval_prompts")}
    (tmp_path / "run.json").write_text(json.dumps(old))
    _check_config(tmp_path, cfg)
    chat = TuneConfig(model_dir="m", data="d", data_sha256="x", edit_prompts="chat")
    with pytest.raises(RromeError, match="edit_prompts"):
        _check_config(tmp_path, chat)


def test_cli_help_says_what_the_options_do() -> None:
    from click.testing import CliRunner

    from rrome.cli import main

    for command in ("apply", "eval", "tune"):
        result = CliRunner().invoke(main, [command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        text = " ".join(result.output.split())
        assert "--edit-prompts [plain|chat]" in text and "inside the tokenizer's chat template" in text
        assert ("--eval-prompts" in text) == (command != "apply")
    bad = CliRunner().invoke(main, ["eval", ".", "--data", "x", "--out", "o", "--eval-prompts", "chat,html"])
    assert bad.exit_code == 2 and "plain, chat or plain,chat" in bad.output


@pytest.mark.slow  # rrome apply in a subprocess
@pytest.mark.usefixtures("private_cache")
def test_cli_apply_chat_without_a_template_is_one_line(tiny_copy: Callable[..., Path], tmp_path: Path) -> None:
    folder = tiny_copy("gpt2", name="gpt2")
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}))
    proc = run_cli("apply", edits, folder, "--layer", "0", "--edit-prompts", "chat", "--no-progress", timeout=300)
    assert_one_line_error(proc, "no chat template", "use plain prompts")


def test_chat_table_script_reads_the_common_cases(tmp_path: Path) -> None:
    """scripts/chat_table.py, as docs/results.md runs it: the cases both runs finished, each
    combination's metrics and the paired counts."""
    import subprocess
    import sys

    def case(new: float, true: float) -> dict[str, Any]:
        return {"rewrite": [[new, true]], "paraphrase": [[new, true]], "neighborhood": [[new / 2, true]]}

    for edit, n_done in (("plain", 3), ("chat", 2)):
        folder = tmp_path / edit
        (folder / "single-r-rome").mkdir(parents=True)
        run_json = {"edit_prompts": edit, "eval_prompts": ["plain", "chat"]}
        (folder / "run.json").write_text(json.dumps(run_json))
        base = {"cases": [case(0.1, 0.5)] * 3, "cases_chat": [case(0.6, 0.5)] * 3}
        (folder / "baseline.json").write_text(json.dumps(base))
        lines = []
        for i in range(n_done):
            # Plain edits hold on plain prompts only from the second case on; chat edits everywhere.
            plain_holds = edit == "chat" or i > 0
            rec = {"index": i, "case": case(0.9 if plain_holds else 0.1, 0.2), "case_chat": case(0.8, 0.1)}
            lines.append(json.dumps(rec) + "\n")
        (folder / "single-r-rome" / "edits.jsonl").write_text("".join(lines) + '{"index": 2, "ca')
    script = Path(__file__).resolve().parents[1] / "scripts" / "chat_table.py"
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "plain"), str(tmp_path / "chat")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("2 cases (records 1–2), r-rome")
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in out.splitlines() if " → " in line}
    assert rows["unedited → plain"][:2] == ["2", "0.0"] and rows["unedited → chat"][:2] == ["2", "100.0"]
    assert rows["plain → plain"][1] == "50.0" and rows["plain → chat"][1] == "100.0"
    assert rows["chat → plain"][1] == "100.0" and rows["chat → chat"][1] == "100.0"
    assert "| plain | 1 | 2 | 1 | 0 | 1 | 1 of 2 | 1 of 2 |" in out
    assert "| chat | 2 | 2 | 2 | 0 | 0 | 0 of 2 | 0 of 2 |" in out

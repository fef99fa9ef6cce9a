"""The neighbour-leak diagnostic (:func:`rrome.eval.probabilities.leak_fractions`, ``"leak"`` in an eval
folder's lines, its table and figure in ``rrome report``).

* s is what the edit does: on tiny models, the change of the edited module's output at every
  token of a prompt, measured with a forward hook before and after the edit, is s_t times the
  change the edit writes at its own key; ``at`` is the token where that change is largest and
  ``s_last`` the last token's; under p-rome the plain prompt's subject token receives s = 1;
* the keys at every token do not depend on batching or the padding side;
* the report's bins, counts and table from hand-made records, and folders written before the
  diagnostic existed still report.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import run_cli_without
from engine_reference import PUSH_HP, module_io

from rrome.engine.editor import Editor
from rrome.engine.keys import keys_at_every_token
from rrome.engine.prompts import prompt_row
from rrome.eval.probabilities import leak_fractions
from rrome.eval.report import LEAK_BINS, leak_summary, markdown_table, plot, summarize
from rrome.files.edits import EditRequest

pytestmark = pytest.mark.usefixtures("private_cache")

REQUEST = EditRequest(prompt="The capital of {} is", subject="France", target_new="London", target_true="Paris")
NEIGHBOURS = ("The capital of England is", "Danielle Darrieux was a French actress. The capital of Italy is", "Paris")
# Scaled to the tiny models' activations (see engine_reference.PUSH_HP), fewer steps.
HP: dict[str, Any] = {**PUSH_HP, "v_num_grad_steps": 4}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_keys_at_every_token_are_the_module_inputs(family: str, side: str, tiny_dir: Callable[..., Path]) -> None:
    editor = Editor.from_pretrained(tiny_dir(family, side), layer=1, hparams=HP, progress=False)
    got = keys_at_every_token(editor.model, editor.tokenizer, editor.module_name, NEIGHBOURS, batch_size=2)
    for text, (ids, k) in zip(NEIGHBOURS, got, strict=True):
        assert ids == editor.tokenizer(text)["input_ids"]
        x, _ = module_io(editor.model, editor.tokenizer, editor.module_name, text)
        torch.testing.assert_close(k.double(), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("family", "method"), [("gpt2", "r-rome"), ("llama", "r-rome"), ("llama", "rome")])
def test_s_is_the_share_of_the_edit_each_token_receives(
    family: str, method: str, tiny_dir: Callable[..., Path]
) -> None:
    editor = Editor.from_pretrained(tiny_dir(family), method=method, layer=0, hparams=HP, progress=False)
    editor.templates()
    name, tok = editor.module_name, editor.tokenizer
    before = [module_io(editor.model, tok, name, t)[1] for t in NEIGHBOURS]
    result = editor.edit(REQUEST)
    after = [module_io(editor.model, tok, name, t)[1] for t in NEIGHBOURS]
    # What the edit writes at its own key: Δ k_den = r (the stored factor is r / uᵀk_den).
    written = torch.tensor(np.array(result.delta.r, np.float64)) * result.denominator
    fractions = leak_fractions(editor.model, tok, name, NEIGHBOURS, result.delta.u, result.denominator)
    special = set(tok.all_special_ids)
    for text, b, a, f in zip(NEIGHBOURS, before, after, fractions, strict=True):
        change = a - b  # (tokens, d_out)
        tol = 1e-4 * float(written.norm()) + 1e-6
        torch.testing.assert_close(change[-1], f.s_last * written, rtol=0, atol=tol)
        torch.testing.assert_close(change[f.at], f.s * written, rtol=0, atol=tol)
        ids = tok(text)["input_ids"]
        sizes = [float(change[t].norm()) if i not in special else 0.0 for t, i in enumerate(ids)]
        assert f.at == int(np.argmax(sizes)) and ids[f.at] not in special
        assert abs(f.s) == pytest.approx(max(sizes) / float(written.norm()), rel=1e-3)


def test_the_edited_key_receives_all_of_it(tiny_dir: Callable[..., Path]) -> None:
    """Under p-rome k_den is the plain prompt's key at the subject's last token: s = 1 there."""
    editor = Editor.from_pretrained(tiny_dir("llama"), method="p-rome", layer=0, hparams=HP, progress=False)
    result = editor.edit(REQUEST)
    ((ids, k),) = keys_at_every_token(editor.model, editor.tokenizer, editor.module_name, [REQUEST.text()])
    row = prompt_row(editor.tokenizer, "{}", REQUEST)
    assert ids == row.ids
    s = float(k[row.lookup].double() @ torch.tensor(np.array(result.delta.u, np.float64))) / result.denominator
    assert s == pytest.approx(1.0, rel=1e-5)
    assert leak_fractions(editor.model, editor.tokenizer, editor.module_name, [], result.delta.u, 1.0) == []


# --------------------------------------------------------------------------------------------
# the report


def _edit(index: int, s: list[float], before: list[list[float]], after: list[list[float]]) -> dict[str, Any]:
    return {
        "index": index,
        "case_id": index,
        "subject": f"s{index}",
        "target_new": "x",
        "norm_delta": 1e-5,
        "steps": 3,
        "seconds": 1.0,
        "case": {"rewrite": [[0.9, 0.1]], "paraphrase": [], "neighborhood": after},
        "leak": {
            "s": s,
            "at": [1] * len(s),
            "s_last": [0.0] * len(s),
            "dlogp_true": [float(np.log(a[1]) - np.log(b[1])) for b, a in zip(before, after, strict=True)],
            "before": before,
            "after": after,
        },
    }


HELD, BROKEN, FAILED = ([0.1, 0.5], [0.1, 0.5]), ([0.1, 0.5], [0.6, 0.2]), ([0.6, 0.2], [0.7, 0.1])


def _records() -> list[dict[str, Any]]:
    # (s, (before, after)) per neighbourhood prompt; FAILED did not hold before the edit.
    prompts = [
        [(0.01, HELD), (-0.03, HELD)],
        [(0.07, BROKEN), (0.02, FAILED)],
        [(-0.5, BROKEN), (0.3, HELD), (0.25, BROKEN)],
        [(0.15, HELD)],
    ]
    return [
        _edit(i, [s for s, _ in p], [list(pair[0]) for _, pair in p], [list(pair[1]) for _, pair in p])
        for i, p in enumerate(prompts)
    ]


def test_leak_summary_by_hand() -> None:
    assert (0.0, 0.05, 0.1, 0.2, 0.4, float("inf")) == LEAK_BINS
    summary = leak_summary(_records())
    assert summary is not None
    rows = [(b["prompts"], b["held"], b["broken"], b["broken_pct"]) for b in summary["bins"]]
    assert rows == [
        (3, 2, 0, 0.0),  # 0.01, -0.03, 0.02 (that one failed before the edit: not counted as held)
        (1, 1, 1, 100.0),  # 0.07
        (1, 1, 0, 0.0),  # 0.15
        (2, 2, 1, 50.0),  # 0.3, 0.25
        (1, 1, 1, 100.0),  # -0.5 (|s|)
    ]
    assert (summary["prompts"], summary["held"], summary["broken"]) == (8, 7, 3)
    assert summary["broken_pct"] == pytest.approx(300 / 7)
    assert summary["bins"][1]["dlogp_true_median"] == pytest.approx(np.log(0.2 / 0.5))
    assert leak_summary([{k: v for k, v in e.items() if k != "leak"} for e in _records()]) is None


def _folder(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    out = tmp_path / "run"
    (out / "single-r-rome").mkdir(parents=True)
    cfg = {"sequential": False, "n": len(records), "data": "cf.json", "offset": 0}
    (out / "run.json").write_text(json.dumps(cfg))
    base = {"metrics": {k: 50.0 for k in ("ES", "PS", "NS", "Score", "EM", "PM", "NM")}, "layer": 0}
    (out / "baseline.json").write_text(json.dumps(base))
    (out / "single-r-rome" / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def test_report_tables_and_plots_the_leak(tmp_path: Path) -> None:
    out = _folder(tmp_path, _records())
    summary = summarize(out)
    table = markdown_table(summary)
    assert "Neighbour leak" in table
    assert "| 0.05–0.1 | 1/1 (100%), -0.92 |" in table
    assert "| ≥ 0.4 | 1/1 (100%), -0.92 |" in table
    assert "| all | 3/7 (43%) |" in table
    names = sorted(p.name for p in plot(out, summary))
    assert names == ["leak-single.png", "norm_delta-single.png"]


def test_a_folder_without_leaks_reports_as_before(tmp_path: Path) -> None:
    out = _folder(tmp_path, [{k: v for k, v in e.items() if k != "leak"} for e in _records()])
    summary = summarize(out)
    assert "leak" not in summary["variants"]["r-rome"]
    assert "Neighbour leak" not in markdown_table(summary)
    assert [p.name for p in plot(out, summary)] == ["norm_delta-single.png"]


def test_rrome_report_does_not_import_torch(tmp_path: Path) -> None:
    """It only reads saved files (rrome.eval.results), so it runs where torch is not installed,
    and it never loads the engine (tests/test_layers.py checks the imports of the layers)."""
    out = _folder(tmp_path, _records())
    proc = run_cli_without("report", out, modules=("torch", "transformers", "rrome.engine"))
    assert proc.returncode == 0, proc.stderr
    assert "Neighbour leak" in proc.stdout and (out / "leak-single.png").is_file()

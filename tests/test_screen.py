"""The disabling-edit screen (:mod:`rrome.engine.screen`), on a tiny model without BOS.

``add_position_sink`` gives a tiny GPT-2 what real models without BOS have at their first
positions: there the key of the edited MLP is small and points away from the same token's key
later in a text. A request whose subject opens the prompt then has its plain-prompt key k_e^o
in that place, and ρ = uᵀk_e / uᵀk_e^o (u = C0⁻¹k_e) is large: ROME divides by a tiny
denominator. The screen must flag exactly those requests, ``rome`` must refuse them before
optimising (and, forced, produce an update many times r-ROME's), r-ROME must warn, and a BOS
(or a leading newline) before the subject must make the flag go away.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import file_hashes, without_lock
from click.testing import CliRunner
from tiny_models import add_position_sink

from rrome._rust import Cholesky
from rrome.cli import main
from rrome.engine.editor import Editor
from rrome.engine.screen import SCREEN_RATIO, key_ratio
from rrome.files.edits import EditRequest
from rrome.files.errors import DisablingEditError

pytestmark = pytest.mark.usefixtures("private_cache")

HP: dict[str, Any] = {"v_num_grad_steps": 3, "stats_max_tokens": 2000, "context_template_lengths": ((3, 5),)}
LAYER = 1
SUBJECT_FIRST = EditRequest(prompt="{} is in", subject="Paris", target_new="Rome", case_id=7)
SUBJECT_LATER = EditRequest(prompt="The tower {} is in", subject="Paris", target_new="Rome", case_id=8)
LEADING_NEWLINE = EditRequest(prompt="\n{} is in", subject="Paris", target_new="Rome", case_id=9)


@pytest.fixture(scope="module")
def sink_models(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Callable[..., Path]) -> dict[bool, Path]:
    """bos -> a tiny GPT-2 with a position sink, its tokenizer adding BOS or not."""
    root = tmp_path_factory.mktemp("screen")
    folders = {bos: Path(shutil.copytree(tiny_dir("gpt2", bos=bos), root / f"bos{bos}")) for bos in (False, True)}
    return {bos: add_position_sink(folder) for bos, folder in folders.items()}


def editor(folder: Path, method: str = "r-rome", **kwargs: Any) -> Editor:
    return Editor.from_pretrained(folder, method=method, layer=LAYER, hparams=HP, progress=False, **kwargs)  # type: ignore[arg-type]


def test_key_ratio_against_a_direct_solve() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 12))
    c0 = a @ a.T + 0.5 * np.eye(12)
    k_e, k_e_o = rng.standard_normal(12), rng.standard_normal(12)
    u = np.linalg.solve(c0, k_e)
    want = (u @ k_e) / (u @ k_e_o)
    assert key_ratio(Cholesky(c0), k_e, k_e_o) == pytest.approx(want, rel=1e-12)
    assert key_ratio(Cholesky(c0), k_e, np.zeros(12)) == np.inf  # a vanishing denominator


def test_screen_flags_the_subject_at_the_first_positions_without_bos(sink_models: dict[bool, Path]) -> None:
    ed = editor(sink_models[False])
    first, later, newline = (ed.screen(r) for r in (SUBJECT_FIRST, SUBJECT_LATER, LEADING_NEWLINE))
    # The plain prompt's key sits in the sink: small, and pointing away from the template mean.
    assert first.position < 3 and not first.bos
    assert first.norm_k_e_o < 0.5 * first.norm_k_e and first.cosine < 0.5
    assert first.ratio > 3 * SCREEN_RATIO and first.flagged
    assert 0 < later.ratio < SCREEN_RATIO and not later.flagged
    # One token before the subject moves it out of the sink.
    assert newline.position == first.position + 1 and not newline.flagged
    # ρ is what its definition says, from the editor's own keys and factor.
    from rrome.engine.keys import compute_keys

    keys = compute_keys(ed.model, ed.tokenizer, ed.module_name, SUBJECT_FIRST, ed.templates())
    k_e, k_e_o = keys.k_e.double().numpy(), keys.k_e_o.double().numpy()
    u = ed.cholesky().solve(k_e)
    assert first.ratio == pytest.approx(float(u @ k_e) / float(u @ k_e_o), rel=1e-9)
    record = first.to_json()
    assert record["case_id"] == first.case_id and record["disabling"] is True and record["ratio"] == first.ratio
    assert "position 2" in first.warning("rome") and "no BOS" in first.warning("rome")
    assert first.warning("r-rome") and not later.warning("rome")


def test_bos_keeps_the_subject_out_of_the_sink(sink_models: dict[bool, Path]) -> None:
    s = editor(sink_models[True]).screen(SUBJECT_FIRST)
    assert s.bos and s.position >= 3 and not s.flagged


def test_rome_refuses_a_flagged_request_before_optimising(sink_models: dict[bool, Path]) -> None:
    ed = editor(sink_models[False], "rome")
    before = ed.edited_weight().detach().clone()
    with pytest.raises(DisablingEditError) as info:
        ed.edit(SUBJECT_FIRST)
    assert info.value.ratio > SCREEN_RATIO and "rho = " in str(info.value) and "case 7" in str(info.value)
    assert torch.equal(ed.edited_weight(), before) and ed.pending == [] and ed.results == []
    # An ordinary request goes through, and so does the flagged one when large updates are allowed.
    assert ed.edit(SUBJECT_LATER).screen is not None


def test_forced_rome_makes_the_disabling_update_and_r_rome_does_not(
    sink_models: dict[bool, Path], caplog: pytest.LogCaptureFixture
) -> None:
    rome = editor(sink_models[False], "rome", allow_large_updates=True).edit(SUBJECT_FIRST)
    with caplog.at_level(logging.WARNING, logger="rrome"):
        r_rome = editor(sink_models[False], "r-rome").edit(SUBJECT_FIRST)
    assert any("rho = " in m and "r-rome" in m for m in caplog.messages), caplog.messages
    assert rome.screen is not None and rome.screen.flagged
    # Same value target, a denominator rho times smaller: ROME's update is many times larger.
    assert rome.norm_delta > 10 * r_rome.norm_delta, (rome.norm_delta, r_rome.norm_delta)
    assert rome.delta.meta is not None and rome.delta.meta["screen"]["disabling"] is True


def test_screen_command(sink_models: dict[bool, Path], tmp_path: Path) -> None:
    # In process (click's runner): the command line without a torch import per call.
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(r.to_json()) for r in (SUBJECT_FIRST, SUBJECT_LATER)) + "\n")
    hp = tmp_path / "hp.json"
    hp.write_text(json.dumps(HP))
    model = sink_models[False]
    common = ["--layer", str(LAYER), "--hparams", str(hp), "--no-progress"]
    res = CliRunner().invoke(main, ["screen", str(edits), str(model), *common, "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(str(r["case_id"]), r["disabling"]) for r in rows] == [("7", True), ("8", False)]
    assert rows[0]["ratio"] > SCREEN_RATIO
    res = CliRunner().invoke(main, ["screen", str(edits), str(model), *common])
    assert res.exit_code == 0, res.output
    assert "1 of 2 request(s) flagged" in res.stdout and "DISABLING" in res.stdout

    # rrome apply --method rome stops on it before anything is written; r-rome warns and writes.
    before = without_lock(file_hashes(model))
    res = CliRunner().invoke(main, ["apply", str(edits), str(model), "--method", "rome", *common])
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("rrome: error: refused case 7") and "rho = " in lines[-1], res.stderr
    assert without_lock(file_hashes(model)) == before
    out = tmp_path / "edited"
    res = CliRunner().invoke(main, ["apply", str(edits), str(model), "--out", str(out), *common])
    assert res.exit_code == 0, res.output
    assert "rrome: warning: case 7" in res.stderr and out.is_dir()


def _cf_file(path: Path) -> Path:
    """Three CounterFact-shaped cases (EasyEdit's flat records); the second opens with its subject."""
    records = [
        ("The tower {} is in", "Paris", "France", "Rome"),
        ("{} is in", "Paris", "France", "Rome"),
        ("The mother tongue of {} is", "Danielle Darrieux", "French", "English"),
    ]
    rows = [
        {
            "case_id": i,
            "prompt": prompt.replace("{}", subject),
            "subject": subject,
            "ground_truth": true,
            "target_new": new,
            "rephrase_prompt": f"In short, {prompt.replace('{}', subject)}",
            "locality_prompt": "The Eiffel Tower is in",
            "locality_ground_truth": "Paris",
        }
        for i, (prompt, subject, true, new) in enumerate(records)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_guarded_sequential_eval_refuses_and_resumes(sink_models: dict[bool, Path], tmp_path: Path) -> None:
    import shutil

    from rrome.eval.report import summarize
    from rrome.eval.results import read_jsonl
    from rrome.eval.runs import RunConfig, run
    from rrome.files.errors import RromeError
    from rrome.files.fsutil import sha256_file

    data = _cf_file(tmp_path / "cf.json")
    common: dict[str, Any] = {
        "model_dir": str(sink_models[False]),
        "data": str(data),
        "data_sha256": sha256_file(data),
        "methods": ("rome",),
        "n": 3,
        "every": 3,
        "diagnostics": False,
        "layer": LAYER,
        "hparams": HP,
    }
    with pytest.raises(RromeError, match="--guard applies to --sequential"):
        run(RunConfig(**common, guard=True), tmp_path / "single", progress=False)
    guarded = run(RunConfig(**common, sequential=True, guard=True), tmp_path / "on", progress=False)
    folder = guarded / "sequential-rome"
    recs = read_jsonl(folder / "edits.jsonl")
    assert [r.get("refused") for r in recs] == [None, "DisablingEditError", None]
    assert recs[1]["screen_ratio"] > SCREEN_RATIO and recs[0]["screen"]["disabling"] is False
    assert sorted(p.name for p in (folder / "deltas").iterdir()) == ["00000.safetensors", "00002.safetensors"]
    summary = summarize(guarded)["variants"]["rome"]
    assert [r["case_id"] for r in summary["refused"]] == [recs[1]["case_id"]] and summary["edits"] == 3

    # Killed before its last edit: the rerun replays edit 0, skips the refusal, redoes edit 2.
    part = tmp_path / "part"
    shutil.copytree(guarded, part)
    lines = (part / "sequential-rome" / "edits.jsonl").read_text().splitlines(keepends=True)
    (part / "sequential-rome" / "edits.jsonl").write_text("".join(lines[:2]))
    for name in ("checkpoints.jsonl", "final.json", "deltas/00002.safetensors"):
        (part / "sequential-rome" / name).unlink()
    run(RunConfig(**common, sequential=True, guard=True), part, progress=False)
    again = read_jsonl(part / "sequential-rome" / "edits.jsonl")
    assert again[2]["norm_delta"] == recs[2]["norm_delta"]

    # Unguarded, rome applies the flagged edit: an update far above the first, and the edit after
    # it, made on the damaged model, grows too; the guarded run's third edit stays small.
    free = run(RunConfig(**common, sequential=True), tmp_path / "off", progress=False)
    norms = [r["norm_delta"] for r in read_jsonl(free / "sequential-rome" / "edits.jsonl")]
    assert norms[0] == recs[0]["norm_delta"] and norms[1] > 5 * norms[0], norms
    assert norms[2] > 2 * recs[2]["norm_delta"], (norms, recs[2]["norm_delta"])

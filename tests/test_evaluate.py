"""Evaluation: metric functions against hand-computed cases, entropies on known distributions,
target probabilities against a direct computation, and resumable runs with their plots."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import SHARED_DATA

from rrome.engine.editor import TIMING_FIELDS, Editor
from rrome.engine.probabilities import continuation_logprob, target_probabilities
from rrome.eval.downstream import TASKS, downstream_accuracy, few_shot_sets
from rrome.eval.generation import entropy, generation_entropy, ngram_entropy
from rrome.eval.metrics import CaseProbs, harmonic_mean, metrics
from rrome.eval.probabilities import leak_fractions
from rrome.eval.report import markdown_table, report, summarize
from rrome.eval.results import read_jsonl
from rrome.eval.runs import RunConfig, RunProgress, recorded_path, run
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError
from rrome.files.fsutil import sha256_file

DATA = SHARED_DATA / "counterfact" / "counterfact-val.json"

# --------------------------------------------------------------------------------------------
# metrics on hand-computed cases


def test_metrics_hand_computed() -> None:
    a = CaseProbs(rewrite=[(0.6, 0.2)], paraphrase=[(0.1, 0.3), (0.5, 0.4)], neighborhood=[(0.2, 0.7)])
    b = CaseProbs(rewrite=[(0.1, 0.3)], paraphrase=[(0.3, 0.3)], neighborhood=[(0.4, 0.4), (0.1, 0.5)])
    m = metrics([a, b])
    # ES: a succeeds, b fails -> 50. PS: a 1/2, b 0/1 (a tie fails) -> 25. NS: a 1, b 1/2 (tie fails) -> 75.
    assert m["ES"] == pytest.approx(50.0)
    assert m["PS"] == pytest.approx(25.0)
    assert m["NS"] == pytest.approx(75.0)
    # EM: mean of (0.4, -0.2) = 0.1 -> 10. PM: a mean(-0.2, 0.1) = -0.05, b 0 -> -2.5.
    assert m["EM"] == pytest.approx(10.0)
    assert m["PM"] == pytest.approx(-2.5)
    # NM: a 0.5, b mean(0, 0.4) = 0.2 -> 35.
    assert m["NM"] == pytest.approx(35.0)
    assert m["Score"] == pytest.approx(3 / (1 / 50 + 1 / 25 + 1 / 75))


def test_metrics_ties_fail_both_ways() -> None:
    tie = CaseProbs(rewrite=[(0.3, 0.3)], paraphrase=[(0.3, 0.3)], neighborhood=[(0.3, 0.3)])
    m = metrics([tie])
    assert m["ES"] == m["PS"] == m["NS"] == 0.0
    assert m["Score"] == 0.0
    assert m["EM"] == m["PM"] == m["NM"] == 0.0


def test_metrics_missing_groups_are_nan_and_left_out_of_score() -> None:
    c = CaseProbs(rewrite=[(0.9, 0.1)], paraphrase=[], neighborhood=[(0.1, 0.9)])
    m = metrics([c])
    assert math.isnan(m["PS"]) and math.isnan(m["PM"])
    assert m["Score"] == pytest.approx(100.0)


def test_harmonic_mean() -> None:
    assert harmonic_mean([100.0, 50.0]) == pytest.approx(2 / (1 / 100 + 1 / 50))
    assert harmonic_mean([100.0, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([math.nan, 1.0]))


def test_case_probs_round_trip() -> None:
    c = CaseProbs(rewrite=[(0.5, 0.25)], paraphrase=[(0.125, 0.0625)], neighborhood=[])
    assert CaseProbs.from_json(json.loads(json.dumps(c.to_json()))) == c


# --------------------------------------------------------------------------------------------
# entropies on known distributions


def test_entropy_known_distributions() -> None:
    assert entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))
    assert entropy([5, 5, 5, 5], base=2) == pytest.approx(2.0)
    assert entropy([7]) == 0.0
    assert entropy([]) == 0.0
    assert entropy([1, 3], base=2) == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))


def test_generation_entropy_is_normalised() -> None:
    assert generation_entropy([[3, 3, 3], [3]], vocab_size=10) == 0.0
    # every token of a vocabulary of 8 once: the uniform distribution -> 1.
    assert generation_entropy([[0, 1, 2, 3], [4, 5, 6, 7]], vocab_size=8) == pytest.approx(1.0)
    assert generation_entropy([[0, 1]], vocab_size=16) == pytest.approx(math.log(2) / math.log(16))


def test_ngram_entropy_hand_computed() -> None:
    # words a b a b a b: bigrams ab×3, ba×2; trigrams aba×2, bab×2.
    h2 = entropy([3, 2], base=2)
    h3 = 1.0
    assert ngram_entropy(["a b a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    # a fully repetitive text has zero n-gram entropy; the mean runs over texts.
    assert ngram_entropy(["x x x x x"]) == 0.0
    assert ngram_entropy(["x x x x x", "a b a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 4)
    # punctuation is a word of its own
    assert ngram_entropy(["a, a, a,"]) == pytest.approx(ngram_entropy(["a b a b a b"]))


# --------------------------------------------------------------------------------------------
# probabilities on a tiny model, against a direct single-sequence computation


def _direct_logprobs(model: Any, tok: Any, prompt: str, target: str) -> list[float]:
    pre = tok(prompt)["input_ids"]
    full = tok(prompt + target)["input_ids"]
    assert full[: len(pre)] == pre
    ids = torch.tensor([full])
    with torch.no_grad():
        lp = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return [float(lp[i - 1, full[i]]) for i in range(len(pre), len(full))]


@pytest.mark.parametrize("masked", [True, False], ids=["head-at-targets", "head-everywhere"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_target_probabilities_match_direct(
    tiny_loaded: Callable[..., Any], family: str, side: str, masked: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against one unpadded forward pass per prompt, with the head run only at the target
    positions (a 2-D ``logits_to_keep``) and, as on older transformers, everywhere."""
    import rrome.engine.models

    monkeypatch.setattr(rrome.engine.models, "MASKED_LOGITS", masked)
    model, tok, _ = tiny_loaded(family, side)
    prompts = ["The capital of France is", "A", "The mother tongue of Danielle Darrieux is"]
    targets = ["Paris", "longer target string here", " English"]
    got = target_probabilities(model, tok, prompts, targets)
    sums = continuation_logprob(model, tok, prompts, targets)
    for p, t, g, s in zip(prompts, targets, got, sums, strict=True):
        # the leading-space rule: a target after a non-space gets " " in front, once
        direct = _direct_logprobs(model, tok, p, t if t.startswith(" ") else " " + t)
        assert len(direct) >= 1
        assert g == pytest.approx(math.exp(sum(direct) / len(direct)), rel=1e-5)
        assert s == pytest.approx(sum(direct), rel=1e-5, abs=1e-5)
    # multi-token target: the mean runs over all its tokens
    assert len(_direct_logprobs(model, tok, prompts[1], " " + targets[1])) > 1
    # a leading space given explicitly is not doubled
    assert target_probabilities(model, tok, [prompts[0]], [" Paris"]) == pytest.approx(got[:1], rel=1e-6)


def test_few_shot_sets_fixed_and_disjoint() -> None:
    a = few_shot_sets(5, seed=3)
    b = few_shot_sets(5, seed=3)
    c = few_shot_sets(5, seed=4)
    assert [s.records for s in a] == [s.records for s in b]
    assert [s.records for s in a] != [s.records for s in c]
    for s in a:
        assert len(s.records) == 5
        assert sorted(x["label"] for x in s.shots) == list(range(len(s.task.labels)))
        assert s.prompts()[0].count("\n\n") == len(s.task.labels)
        assert all(r not in s.shots for r in s.records)
    assert [s.task.name for s in a] == [t.name for t in TASKS]


def test_long_prompts_keep_their_end(tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded("gpt2")
    limit = model.config.n_positions
    long = "word " * (2 * limit) + "The capital of France is"
    tail = tok.decode(tok(long)["input_ids"][-(limit - 1) :])
    got = continuation_logprob(model, tok, [long], ["Paris"])
    assert got == pytest.approx(continuation_logprob(model, tok, [tail], ["Paris"]), rel=1e-5)


def test_downstream_accuracy_matches_label_scoring(tiny_loaded: Callable[..., Any]) -> None:
    model, tok, _ = tiny_loaded("gpt2")
    # no demonstrations: the tiny model's context (512) would not hold the few-shot prompts
    sets = few_shot_sets(4, shots_per_label=0, seed=0)
    acc = downstream_accuracy(model, tok, sets)
    for s in sets:
        prompts = s.prompts()
        right = 0
        for p, rec in zip(prompts, s.records, strict=True):
            scores = [sum(_direct_logprobs(model, tok, p, " " + w)) for w in s.task.labels]
            right += int(int(np.argmax(scores)) == rec["label"])
        assert acc[s.task.name] == pytest.approx(100 * right / len(s.records))


# --------------------------------------------------------------------------------------------
# runs: exact restore, resume, report and plots

QUICK = {"v_num_grad_steps": 4, "stats_max_tokens": 2000, "context_template_lengths": [[3, 4]]}


@pytest.fixture
def gpt2_dir(tiny_copy: Callable[..., Path], private_cache: Path) -> Path:
    return tiny_copy("gpt2", name="gpt2")


def _config(model: Path, **kw: Any) -> RunConfig:
    base: dict[str, Any] = {
        "model_dir": str(model),
        "data": str(DATA),
        "data_sha256": sha256_file(DATA),
        "n": 3,
        "layer": 0,
        "hparams": QUICK,
    }
    base.update(kw)
    return RunConfig(**base)


def test_single_run_restores_weights_exactly(gpt2_dir: Path, tmp_path: Path) -> None:
    out = run(_config(gpt2_dir, methods=("r-rome", "rome")), tmp_path / "res", progress=False)
    recs = read_jsonl(out / "single-r-rome" / "edits.jsonl")
    assert [r["index"] for r in recs] == [0, 1, 2]
    # The third case edited alone on a fresh editor gives the same numbers: no drift from the
    # two edits before it (the weight was restored exactly between cases).
    editor = Editor.from_pretrained(gpt2_dir, layer=0, hparams=QUICK, progress=False)
    editor.templates()
    req = run_cases(gpt2_dir)[2]
    alone = editor.edit(req)
    assert recs[2]["norm_delta"] == alone.norm_delta
    assert recs[2]["p_new"] == [alone.p_new_before, alone.p_new_after]
    base = json.loads((out / "baseline.json").read_text())
    # Results folders are committed: their paths are recorded as recorded_path writes them.
    saved = json.loads((out / "run.json").read_text())
    assert (saved["model_dir"], saved["data"]) == (recorded_path(gpt2_dir), recorded_path(DATA))
    stats = editor.stats_path
    assert base["stats"] == (recorded_path(stats) if stats else None)
    assert base["cases"][2]["rewrite"][0][0] == pytest.approx(alone.p_new_before, rel=1e-6)
    # The neighbour leak: one entry per neighbourhood prompt, the probabilities around the edit
    # (before: the unedited model's; after: the case's own), s from the edit's factors.
    for rec, request, case in zip(recs, run_cases(gpt2_dir), base["cases"], strict=True):
        leak = rec["leak"]
        n = len(request.neighborhood_prompts)
        assert n >= 1 and all(len(leak[k]) == n for k in ("s", "at", "s_last", "dlogp_true", "before", "after"))
        assert leak["after"] == rec["case"]["neighborhood"]
        np.testing.assert_allclose(leak["before"], case["neighborhood"], rtol=1e-5)
        expect = [math.log(a[1]) - math.log(b[1]) for b, a in zip(leak["before"], leak["after"], strict=True)]
        assert leak["dlogp_true"] == pytest.approx(expect, rel=1e-12)
    fr = leak_fractions(
        editor.model, editor.tokenizer, editor.module_name, req.neighborhood_prompts, alone.delta.u, alone.denominator
    )
    assert recs[2]["leak"]["s"] == [f.s for f in fr] and recs[2]["leak"]["at"] == [f.at for f in fr]

    s = summarize(out)
    assert set(s["variants"]) == {"r-rome", "rome"}
    assert all(v["complete"] and v["edits"] == 3 for v in s["variants"].values())

    # An edit far above the run's median |Δ| counts as large; as disabling only when the
    # generation entropy after it collapsed too (below half the unedited model's).
    path = out / "single-rome" / "edits.jsonl"
    lines = read_jsonl(path)
    base_entropy = base["diagnostics"]["generation_entropy"]
    lines[1]["norm_delta"] = 1000 * max(lines[0]["norm_delta"], lines[2]["norm_delta"])
    for after, disabling in ((base_entropy, 0), (0.1 * base_entropy, 1)):
        lines[1]["generation_entropy"] = after
        path.write_text("".join(json.dumps(rec) + "\n" for rec in lines))
        summary = summarize(out)
        v = summary["variants"]["rome"]
        assert [f["index"] for f in v["large_edits"]] == [1]
        assert [f["index"] for f in v["disabling_edits"]] == [1] * disabling
        table = markdown_table(summary)
        assert "| max abs Δ | abs Δ > 10× median | disabling edits |" in table
        assert next(t for t in table.splitlines() if t.startswith("| rome |")).endswith(f"| 1 | {disabling} |")
        assert f"- rome: edit 2 (case {lines[1]['case_id']}" in table
        assert table.count(", disabling\n") == disabling


def run_cases(model: Path) -> list[EditRequest]:
    from rrome.eval.runs import load_cases

    return load_cases(_config(model))


def test_sequential_run_resumes_to_the_same_numbers(gpt2_dir: Path, tmp_path: Path) -> None:
    cfg = _config(gpt2_dir, n=4, sequential=True, every=2, glue_n=2)
    whole = run(cfg, tmp_path / "whole", progress=False)
    # the saved factors get the umask's mode (safetensors' own writer would make them 0600)
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.stat().st_mode & 0o777 for f in (whole / "sequential-r-rome" / "deltas").iterdir()}
    assert modes == {0o666 & ~umask}
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    folder = part / "sequential-r-rome"
    # a run killed during its third edit: two complete lines and a torn one, one checkpoint
    lines = (folder / "edits.jsonl").read_text().splitlines(keepends=True)
    (folder / "edits.jsonl").write_text("".join(lines[:2]) + lines[2][:17])
    checks = (folder / "checkpoints.jsonl").read_text().splitlines(keepends=True)
    (folder / "checkpoints.jsonl").write_text(checks[0])
    for i in (2, 3):
        (folder / "deltas" / f"{i:05d}.safetensors").unlink()
    (folder / "final.json").unlink()
    # the report of the unfinished run shows the last checkpoint's metrics, marked as such, and
    # leaves the torn line alone (it may be a line a running process is still writing)
    torn = (folder / "edits.jsonl").read_bytes()
    v = summarize(part)["variants"]["r-rome"]
    assert (folder / "edits.jsonl").read_bytes() == torn
    assert not v["complete"] and v["edits"] == 2 and v["metrics_at_edits"] == 2
    assert v["metrics"] == json.loads(checks[0])["metrics"]
    run(cfg, part, progress=False)

    a = read_jsonl(whole / "sequential-r-rome" / "edits.jsonl")
    b = read_jsonl(folder / "edits.jsonl")
    assert [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in a] == [
        {k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in b
    ]
    assert json.loads((folder / "final.json").read_text()) == json.loads(
        (whole / "sequential-r-rome" / "final.json").read_text()
    )
    ca = read_jsonl(whole / "sequential-r-rome" / "checkpoints.jsonl")
    cb = read_jsonl(folder / "checkpoints.jsonl")
    assert [c["edits"] for c in ca] == [c["edits"] for c in cb] == [2, 4]
    assert ca == cb

    # killed while writing the checkpoint after edit 2: the resumed run writes it first
    again = tmp_path / "again"
    shutil.copytree(whole, again)
    folder = again / "sequential-r-rome"
    (folder / "edits.jsonl").write_text("".join(lines[:2]))
    (folder / "checkpoints.jsonl").write_text("")
    for i in (2, 3):
        (folder / "deltas" / f"{i:05d}.safetensors").unlink()
    (folder / "final.json").unlink()
    run(cfg, again, progress=False)
    assert read_jsonl(folder / "checkpoints.jsonl") == ca
    assert set(ca[-1]["downstream"]) == {t.name for t in TASKS}

    table, figures = report(part)
    assert "| r-rome |" in table and "unedited" in table
    # The checkpoint table: a row per checkpoint, its metrics, the mean downstream accuracy and
    # the mean time of the edits since the one before.
    edits = read_jsonl(part / "sequential-r-rome" / "edits.jsonl")
    for c, lo in zip(cb, (0, 2), strict=True):
        secs = statistics.fmean(e["seconds"] for e in edits if lo <= e["index"] < c["edits"])
        glue = statistics.fmean(c["downstream"].values())
        m = c["metrics"]
        row = (
            f"| r-rome | {c['edits']} | {m['ES']:.2f} | {m['PS']:.2f} | {m['NS']:.2f} | {m['Score']:.2f} | {glue:.1f} |"
        )
        line = next(x for x in table.splitlines() if x.startswith(row))
        assert line.endswith(f" | {secs:.1f} |"), line
    names = sorted(f.name for f in figures)
    assert names == [
        "downstream-sequential.png",
        "entropy_vs_norm-sequential.png",
        "leak-sequential.png",
        "metrics-sequential.png",
        "norm_delta-sequential.png",
    ]
    assert "Neighbour leak" in table
    import matplotlib.image

    for f in figures:
        img = matplotlib.image.imread(f)
        assert img.shape[0] > 200 and img.shape[1] > 300, (f, img.shape)
        assert float(np.std(img[..., :3])) > 0.01, f"{f} is blank"


def test_edit_diagnostics_off_samples_the_baseline_and_checkpoints_only(gpt2_dir: Path, tmp_path: Path) -> None:
    """--no-edit-diagnostics: the entropies of the unedited model and of each checkpoint, none
    after each edit; the same edits as with them (the samples do not touch the weights), and a
    folder made with them is not resumed without them."""
    cfg = _config(gpt2_dir, n=2, sequential=True, every=2, edit_diagnostics=False)
    out = run(cfg, tmp_path / "off", progress=False)
    assert json.loads((out / "baseline.json").read_text())["diagnostics"]["generation_entropy"] > 0
    edits = read_jsonl(out / "sequential-r-rome" / "edits.jsonl")
    assert len(edits) == 2 and not any("generation_entropy" in e for e in edits)
    (check,) = read_jsonl(out / "sequential-r-rome" / "checkpoints.jsonl")
    assert check["generation_entropy"] > 0
    assert json.loads((out / "run.json").read_text())["edit_diagnostics"] is False

    on = run(_config(gpt2_dir, n=2, sequential=True, every=2), tmp_path / "on", progress=False)
    with_them = read_jsonl(on / "sequential-r-rome" / "edits.jsonl")
    assert all("generation_entropy" in e for e in with_them)
    assert [e["norm_delta"] for e in edits] == [e["norm_delta"] for e in with_them]
    with pytest.raises(RromeError, match=r"other settings.*edit_diagnostics: saved True, now False"):
        run(cfg, on, progress=False)


def test_resume_with_other_settings_is_refused(gpt2_dir: Path, tmp_path: Path) -> None:
    run(_config(gpt2_dir, n=1, diagnostics=False), tmp_path / "r", progress=False)
    with pytest.raises(RromeError, match=r"other settings.*n: saved 1, now 2"):
        run(_config(gpt2_dir, n=2, diagnostics=False), tmp_path / "r", progress=False)


def test_resume_checks_the_resolved_hyperparameters(gpt2_dir: Path, tmp_path: Path) -> None:
    """The packaged defaults may change between sessions: a folder whose edits were made with
    another resolved set is refused, naming the field, and continues once --set says the set."""
    out = tmp_path / "r"
    run(_config(gpt2_dir, n=2, diagnostics=False), out, progress=False)
    edits = out / "single-r-rome" / "edits.jsonl"
    edits.write_text(edits.read_text().splitlines(keepends=True)[0])  # as if killed after case 0
    base = json.loads((out / "baseline.json").read_text())
    assert base["hparams"]["clamp_norm_factor"] == 4.0
    # As if the folder had been made when the family's default clamp was 2.
    base["hparams"]["clamp_norm_factor"] = 2.0
    del base["hparams"]["retain_weight"]  # a field rrome did not have then counts as its default
    (out / "baseline.json").write_text(json.dumps(base))
    with pytest.raises(RromeError, match=r"other hyperparameters \(clamp_norm_factor: saved 2\.0, now 4\.0\)"):
        run(_config(gpt2_dir, n=2, diagnostics=False, methods=("r-rome", "rome")), out, progress=False)
    assert json.loads((out / "run.json").read_text())["methods"] == ["r-rome"], "a refused run changed run.json"
    assert not (out / "single-rome").exists()
    # Other overrides that resolve to the saved set are accepted, and the run goes on.
    run(_config(gpt2_dir, n=2, diagnostics=False, hparams={**QUICK, "clamp_norm_factor": 2.0}), out, progress=False)
    lines = read_jsonl(edits)
    assert [rec["index"] for rec in lines] == [0, 1]


def test_recorded_path_names_no_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home" / "user"
    work = tmp_path / "work" / "checkout"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert recorded_path(home / ".cache" / "rrome" / "models" / "m") == "~/.cache/rrome/models/m"
    assert recorded_path(home) == "~"
    assert recorded_path(str(home) + "x/m") != "~x/m"  # a sibling of the home directory is not under it
    assert recorded_path(tmp_path / "work" / "shared" / "data.json") == "../shared/data.json"
    assert recorded_path(work / "models" / "m") == "models/m"
    assert recorded_path("relative/m") == "relative/m"  # as the user gave it
    assert recorded_path("/elsewhere/m") == "/elsewhere/m"  # more than one level up: as given


def test_progress_rate_counts_this_process_edits_only() -> None:
    """A resumed run shows the earlier process's edits as done, but its rate (n - initial over
    the elapsed time) and so its time left count the edits made now."""
    import io

    out = io.StringIO()
    bar = RunProgress(30, "sequential", file=out)
    bar.finish("rome", 10)  # all ten made by an earlier process: no tick
    bar.tick("r-rome", 8, 10)  # resumed after 7
    bar.tick("r-rome", 9, 10)
    bar.finish("r-rome", 10)
    bar.start("p-rome")
    bar.tick("p-rome", 1, 10)  # a fresh method
    bar.tick("p-rome", 2, 10)
    assert (bar.bar.n, bar.bar.initial) == (22, 17)  # 5 edits made by this process
    bar.close()
    assert "sequential p-rome" in out.getvalue() and "22/30" in out.getvalue()
    quiet = RunProgress(10, "single", enabled=False)  # --no-progress
    quiet.tick("rome", 4, 10)
    quiet.finish("rome", 10)
    quiet.close()


def test_report_on_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RromeError, match=r"run\.json: missing"):
        summarize(tmp_path)


# --------------------------------------------------------------------------------------------
# the command line


@pytest.mark.slow  # rrome eval and report in subprocesses
def test_cli_eval_then_report(gpt2_dir: Path, tmp_path: Path) -> None:
    from _helpers import run_cli

    out = tmp_path / "cli-res"
    r = run_cli(
        "eval", gpt2_dir, "--data", DATA, "--n", "2", "--layer", "0", "--stats-tokens", "2000",
        "--no-diagnostics", "--out", out, "--no-progress", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| unedited |" in r.stdout and "| r-rome |" in r.stdout
    assert (out / "table.md").read_text() in r.stdout
    again = run_cli("report", out)
    assert again.returncode == 0 and (out / "table.md").read_text() in again.stdout
    assert (out / "norm_delta-single.png").stat().st_size > 1000


@pytest.mark.slow  # three sequential runs of rrome eval in subprocesses, one of them killed
def test_cli_eval_killed_with_sigkill_resumes_to_the_same_numbers(gpt2_dir: Path, tmp_path: Path) -> None:
    """A real ``rrome eval --sequential`` killed with SIGKILL after its first edit; the same command
    run again continues it, replaying the saved factors, to the numbers of an uninterrupted run."""
    from _helpers import kill_after_first_line, run_cli

    def args(out: Path) -> list[str]:
        return [
            "eval", str(gpt2_dir), "--data", str(DATA), "--n", "4", "--layer", "0", "--sequential",
            "--every", "2", "--glue-n", "2", "--set", "v_num_grad_steps=4", "--set", "stats_max_tokens=2000",
            "--set", "context_template_lengths=[[3,4]]", "--out", str(out), "--no-progress",
        ]  # fmt: skip

    # One thread in every run: the same sums in the same order, so the same bits.
    threads = {"OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    r = run_cli(*args(whole), env=threads, timeout=600)
    assert r.returncode == 0, r.stderr

    part = tmp_path / "part"
    env = {**{k: v for k, v in os.environ.items() if k != "RROME_CRASH_AT"}, **threads}
    lines = part / "sequential-r-rome" / "edits.jsonl"
    proc = kill_after_first_line(args(part), lines, env, timeout=300, what="no edit finished")
    assert proc.returncode == -signal.SIGKILL
    assert not (part / "sequential-r-rome" / "final.json").exists()
    assert len(read_jsonl(lines)) < 4

    r = run_cli(*args(part), env=threads, timeout=600)
    assert r.returncode == 0, r.stderr

    def untimed(path: Path) -> list[dict[str, Any]]:
        return [{k: v for k, v in rec.items() if k not in TIMING_FIELDS} for rec in read_jsonl(path)]

    a, b = whole / "sequential-r-rome", part / "sequential-r-rome"
    assert [rec["index"] for rec in read_jsonl(b / "edits.jsonl")] == [0, 1, 2, 3]  # each edit once
    assert untimed(a / "edits.jsonl") == untimed(b / "edits.jsonl")
    assert read_jsonl(a / "checkpoints.jsonl") == read_jsonl(b / "checkpoints.jsonl")
    assert json.loads((a / "final.json").read_text()) == json.loads((b / "final.json").read_text())
    assert json.loads((whole / "baseline.json").read_text()) == json.loads((part / "baseline.json").read_text())
    assert _untimed_table(whole / "table.md") == _untimed_table(part / "table.md")


def _untimed_table(path: Path) -> str:
    """A sequential run's table.md without the checkpoint table's last column (s/edit, wall time)."""
    lines = path.read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("Checkpoints:"))
    i = at + 2  # the line after the blank one
    while i < len(lines) and lines[i].startswith("|"):
        lines[i] = lines[i].rsplit(" | ", 1)[0]
        i += 1
    assert i > at + 4  # the header, its rule, unedited and a checkpoint at least
    return "\n".join(lines)


@pytest.mark.slow  # rrome eval and report in subprocesses
def test_cli_eval_and_report_errors(gpt2_dir: Path, tmp_path: Path) -> None:
    from _helpers import run_cli

    bad = run_cli("eval", gpt2_dir, "--data", DATA, "--method", "rome,bogus", "--n", "1", "--out", tmp_path / "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "rrome: error: unknown method 'bogus'; expected one of r-rome, rome, p-rome"
    ]
    missing = run_cli("report", tmp_path)
    assert missing.returncode == 1 and "run.json: missing" in missing.stderr and "Traceback" not in missing.stderr
    usage = run_cli("eval", gpt2_dir, "--out", tmp_path / "y")
    assert usage.returncode == 2 and "--data" in usage.stderr


def test_checkpoint_table_keeps_at_most_ten_rows_and_the_last() -> None:
    from rrome.eval.report import CHECKPOINT_ROWS, _checkpoint_lines

    m = {"ES": 90.0, "PS": 80.0, "NS": 70.0, "Score": 79.0}
    checks = [
        {
            "edits": 10 * (i + 1),
            "metrics": m,
            "downstream": {"a": 50.0, "b": 70.0},
            "median_norm_delta": 1.0,
            "max_norm_delta": 2.5,
            "generation_entropy": 0.5,
        }
        for i in range(25)
    ]
    summary = {
        "unedited": {"metrics": m, "downstream": {"a": 40.0, "b": 60.0}, "diagnostics": None},
        "variants": {"r-rome": {"checkpoints": checks, "checkpoint_seconds": [3.0] * 25}},
    }
    rows = [r for r in _checkpoint_lines(summary) if r.startswith("| r-rome |")]
    assert [int(r.split("|")[2]) for r in rows] == [10, 40, 70, 100, 130, 160, 190, 220, 250]
    assert len(rows) <= CHECKPOINT_ROWS
    assert rows[-1] == "| r-rome | 250 | 90.00 | 80.00 | 70.00 | 79.00 | 60.0 | 1 | 2.5 | 0.500 | 3.0 |"
    assert "| unedited | 0 | 90.00 | 80.00 | 70.00 | 79.00 | 50.0 | – | – | – | – |" in _checkpoint_lines(summary)

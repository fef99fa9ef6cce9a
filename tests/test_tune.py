"""``rrome tune``: the grid, the trials against an independent computation and ``rrome eval``,
resuming after an injected failure and after SIGKILL, the ranking, and best.json as --hparams."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _helpers import kill_after_first_line
from click.testing import CliRunner

import rrome
from rrome.cli import main
from rrome.engine.editor import TIMING_FIELDS, Editor
from rrome.eval.metrics import metrics
from rrome.eval.probabilities import case_probabilities
from rrome.eval.report import summarize
from rrome.eval.results import read_jsonl
from rrome.eval.runs import RunConfig, run
from rrome.eval.tune import TuneConfig, rank, tune
from rrome.files.edits import load_requests
from rrome.files.errors import NonFiniteUpdateError, RromeError
from rrome.files.fsutil import sha256_file
from rrome.files.hparams import HParams, HParamsError, parse_assignments, parse_grid, parse_grids, resolve_hparams

# Four CounterFact records in ROME's shape; the sweeps use the first three.
CASES = [
    {
        "case_id": 1,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "subject": "Danielle Darrieux",
            "target_new": {"str": "English"},
            "target_true": {"str": "French"},
        },
        "paraphrase_prompts": ["Danielle Darrieux was a French actress. Danielle Darrieux spoke"],
        "neighborhood_prompts": ["The mother tongue of Jean Gabin is", "The mother tongue of Louis Aragon is"],
    },
    {
        "case_id": 2,
        "requested_rewrite": {
            "prompt": "{} is located in the city of",
            "subject": "The Eiffel Tower",
            "target_new": {"str": "Rome"},
            "target_true": {"str": "Paris"},
        },
        "paraphrase_prompts": ["The Eiffel Tower stands in"],
        "neighborhood_prompts": ["The Louvre is located in the city of", "Notre Dame is located in the city of"],
    },
    {
        "case_id": 3,
        "requested_rewrite": {
            "prompt": "{} is located in the city of",
            "subject": "The Colosseum",
            "target_new": {"str": "Paris"},
            "target_true": {"str": "Rome"},
        },
        "paraphrase_prompts": ["The Colosseum stands in"],
        "neighborhood_prompts": ["The Pantheon is located in the city of"],
    },
    {
        "case_id": 4,
        "requested_rewrite": {
            "prompt": "{} is the capital of",
            "subject": "Paris",
            "target_new": {"str": "England"},
            "target_true": {"str": "France"},
        },
        "paraphrase_prompts": ["Paris, the main city of"],
        "neighborhood_prompts": ["Lyon is a city in"],
    },
]
N = 3
SETS = ("v_num_grad_steps=4", "stats_max_tokens=2000", "context_template_lengths=[[3,4]]")
GRIDS = ("layer=0,1", "clamp_norm_factor=0.5,4")
TIMING = TIMING_FIELDS | {"seconds_per_edit"}  # the only figures a rerun may change


class Sweep:
    """A tiny GPT-2, a data file, and one uninterrupted sweep to compare others with."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = root
        self.model = Path(shutil.copytree(model, root / "gpt2"))
        self.data = root / "cases.json"
        self.data.write_text(json.dumps(CASES))
        self.whole = root / "whole"
        self.result = tune(self.config(), self.whole, progress=False)

    def config(self, **kw: Any) -> TuneConfig:
        base: dict[str, Any] = {
            "model_dir": str(self.model.resolve()),
            "data": str(self.data.resolve()),
            "data_sha256": sha256_file(self.data),
            "grid": parse_grids(GRIDS),
            "hparams": parse_assignments(SETS),
            "n": N,
        }
        return TuneConfig(**{**base, **kw})

    def cli_args(self, out: Path) -> list[str]:
        args = ["tune", str(self.model), "--data", str(self.data), "--n", str(N), "--out", str(out), "--no-progress"]
        for g in GRIDS:
            args += ["--grid", g]
        for s in SETS:
            args += ["--set", s]
        return args


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Callable[..., Path]) -> Iterator[Sweep]:
    root = tmp_path_factory.mktemp("tune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RROME_CACHE_DIR", str(root / "cache"))
        yield Sweep(root, tiny_dir("gpt2"))


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _same_sweep(a: Path, b: Path) -> None:
    """Two sweep folders hold the same trials, cases and best set (times aside)."""
    assert _untimed(read_jsonl(a / "trials.jsonl")) == _untimed(read_jsonl(b / "trials.jsonl"))
    for trial in sorted(p.name for p in (a / "trials").iterdir()):
        ra, rb = (read_jsonl(d / "trials" / trial / "edits.jsonl") for d in (a, b))
        assert [r["index"] for r in rb] == list(range(N)), trial  # every case once, none twice
        assert _untimed(ra) == _untimed(rb), trial
    assert json.loads((a / "best.json").read_text()) == json.loads((b / "best.json").read_text())
    assert json.loads((a / "baseline.json").read_text()) == json.loads((b / "baseline.json").read_text())


# --------------------------------------------------------------------------------------------
# the grid


def test_parse_grid() -> None:
    assert parse_grid("clamp_norm_factor=0.5,1,2") == ("clamp_norm_factor", (0.5, 1.0, 2.0))
    assert parse_grid("v_lr_unit = absolute, relative") == ("v_lr_unit", ("absolute", "relative"))
    assert parse_grid("v_stop_most_probable=0,2") == ("v_stop_most_probable", (0, 2))
    # commas inside brackets do not separate values
    assert parse_grid("context_template_lengths=[[5,10],[10,10]],[[3,4]]") == (
        "context_template_lengths",
        (((5, 10), (10, 10)), ((3, 4),)),
    )
    assert parse_grids(["layer=4,6", "kl_factor=0,0.0625"]) == (("layer", (4, 6)), ("kl_factor", (0.0, 0.0625)))


GRID_ERRORS = [
    ("clamp=1,2", ["--grid clamp=1,2", "unknown hyperparameter 'clamp'"]),
    ("v_lr=0.1,fast", ["v_lr", "a number > 0", '"fast"']),
    ("v_num_grad_steps=10,2.5", ["v_num_grad_steps", "integer"]),
    ("clamp_norm_factor=1,,2", ["clamp_norm_factor", "empty value"]),
    ("clamp_norm_factor=1,1.0", ["clamp_norm_factor", "listed twice"]),
    ("v_lr_unit=absolute,percent", ["v_lr_unit", "'relative'"]),
    ("family=gpt2", ["family", "not a tunable"]),
    ("layer", ["--grid layer", "KEY=V1,V2"]),
]


@pytest.mark.parametrize(("text", "needles"), GRID_ERRORS, ids=[t for t, _ in GRID_ERRORS])
def test_bad_grid_is_a_one_line_usage_error(text: str, needles: list[str], tmp_path: Path) -> None:
    with pytest.raises(HParamsError):
        parse_grid(text)
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(CASES))
    model = tmp_path / "model"  # never loaded: the check comes first
    res = CliRunner().invoke(
        main, ["tune", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--grid", text]
    )
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rrome: error: --grid "), res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--grid", "layer=0", "--grid", "layer=1"], "layer is given twice"),
        (["--set", "v_lr=fast"], "v_lr"),
        (["--hparams", "no-such-preset"], "no-such-preset"),
    ],
)
def test_other_usage_errors_before_loading(extra: list[str], needle: str, tmp_path: Path) -> None:
    args = ["tune", str(tmp_path / "model"), "--data", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*args, *extra])
    assert res.exit_code == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.output


def test_help_lists_the_options() -> None:
    res = CliRunner().invoke(main, ["tune", "--help"])
    assert res.exit_code == 0
    for option in ("--data", "--grid KEY=V1,V2,...", "--hparams FILE|PRESET", "--set KEY=VALUE", "--min-es", "--out"):
        assert option in res.stdout, option
    for option in ("--n", "--offset", "--method", "--device", "--no-diagnostics", "--no-progress"):
        assert option in res.stdout, option


# --------------------------------------------------------------------------------------------
# a 2×2 sweep against independent computations


def test_sweep_has_one_line_per_trial(sweep: Sweep) -> None:
    lines = read_jsonl(sweep.whole / "trials.jsonl")
    assert [t["trial"] for t in lines] == [0, 1, 2, 3]
    # the grid in order, the last key fastest, over the --set fields
    assert [t["grid"] for t in lines] == [
        {"layer": 0, "clamp_norm_factor": 0.5},
        {"layer": 0, "clamp_norm_factor": 4.0},
        {"layer": 1, "clamp_norm_factor": 0.5},
        {"layer": 1, "clamp_norm_factor": 4.0},
    ]
    for t in lines:
        hp = t["hparams"]
        assert {k: hp[k] for k in t["grid"]} == t["grid"]
        assert hp["family"] == "gpt2" and hp["v_num_grad_steps"] == 4 and hp["context_template_lengths"] == [[3, 4]]
        assert json.loads((sweep.whole / "trials" / f"{t['trial']:03d}" / "hparams.json").read_text()) == hp
        assert set(t["metrics"]) == {"ES", "PS", "NS", "Score", "EM", "PM", "NM"}
        records = read_jsonl(sweep.whole / "trials" / f"{t['trial']:03d}" / "edits.jsonl")
        assert t["cases"] == len(records) == N
        assert t["steps_mean"] == sum(r["steps"] for r in records) / N == 3  # 4 passes, 3 Adam steps
        assert t["stops"] == {"max-steps": N}
        assert t["norm_delta_median"] == sorted(r["norm_delta"] for r in records)[1] > 0
        assert t["seconds_per_edit"] > 0
        assert all(r["delta_ratio"] <= hp["clamp_norm_factor"] * (1 + 1e-6) for r in records)  # the clamp holds
        if hp["clamp_norm_factor"] == 0.5:
            assert [r["delta_ratio"] for r in records] == pytest.approx([0.5] * N)  # on the clamp
    # the sets differ where the grid says: four distinct updates of the first case
    firsts = {read_jsonl(sweep.whole / "trials" / f"{i:03d}" / "edits.jsonl")[0]["norm_delta"] for i in range(4)}
    assert len(firsts) == 4
    assert (sweep.whole / "table.md").read_text() == sweep.result.table
    assert [t["trial"] for t in sweep.result.ranked] == [t["trial"] for t in rank(lines)]


def test_trial_equals_editing_each_case_on_a_fresh_model(sweep: Sweep) -> None:
    """The last trial (layer 1, after three trials at layer 0 and 1 on the same model in memory),
    recomputed without any of rrome's run machinery: a freshly loaded model per case."""
    line = read_jsonl(sweep.whole / "trials.jsonl")[3]
    hp = HParams(**line["hparams"])
    probs = []
    for request in load_requests(sweep.data)[:N]:
        editor = Editor.from_pretrained(sweep.model, hparams=hp, progress=False)
        editor.edit(request)
        probs.append(case_probabilities(editor.model, editor.tokenizer, request))
    assert metrics(probs) == line["metrics"]


def test_trial_equals_rrome_eval_with_its_set(sweep: Sweep, tmp_path: Path) -> None:
    line = read_jsonl(sweep.whole / "trials.jsonl")[1]
    cfg = RunConfig(
        model_dir=str(sweep.model),
        data=str(sweep.data),
        data_sha256=sha256_file(sweep.data),
        n=N,
        diagnostics=False,
        hparams={**parse_assignments(SETS), **line["grid"]},
    )
    out = run(cfg, tmp_path / "eval", progress=False)
    assert summarize(out)["variants"]["r-rome"]["metrics"] == line["metrics"]
    evaluated = read_jsonl(out / "single-r-rome" / "edits.jsonl")
    assert _untimed(evaluated) == _untimed(read_jsonl(sweep.whole / "trials" / "001" / "edits.jsonl"))
    base = json.loads((out / "baseline.json").read_text())
    assert base["metrics"] == sweep.result.unedited
    assert base["cases"] == json.loads((sweep.whole / "baseline.json").read_text())["cases"]


def test_trials_switching_templates_edit_with_their_own(sweep: Sweep, tmp_path: Path) -> None:
    """Template seeds 1, then 0: the trials with seed 0 edit exactly as the main sweep's (whose
    templates were never switched), those with seed 1 otherwise."""
    grid = parse_grids(["template_seed=1,0", "clamp_norm_factor=0.5,4"])
    result = tune(sweep.config(grid=grid), tmp_path / "t", progress=False)
    main_trials = read_jsonl(sweep.whole / "trials.jsonl")
    assert main_trials[0]["hparams"]["template_seed"] == 0 and main_trials[0]["hparams"]["layer"] == 0
    lines = sorted(result.ranked, key=lambda t: t["trial"])
    for ours, theirs in ((2, 0), (3, 1)):
        assert lines[ours]["hparams"] == main_trials[theirs]["hparams"]
        assert _untimed(read_jsonl(tmp_path / "t" / "trials" / f"{ours:03d}" / "edits.jsonl")) == _untimed(
            read_jsonl(sweep.whole / "trials" / f"{theirs:03d}" / "edits.jsonl")
        )
    first = read_jsonl(tmp_path / "t" / "trials" / "000" / "edits.jsonl")
    assert [r["norm_delta"] for r in first] != [
        r["norm_delta"] for r in read_jsonl(sweep.whole / "trials" / "000" / "edits.jsonl")
    ]


def test_best_json_is_a_hparams_file(sweep: Sweep, tmp_path: Path) -> None:
    best = sweep.result.ranked[0]
    assert sweep.result.best == sweep.whole / "best.json"
    fields = json.loads(sweep.result.best.read_text())
    assert {k: v for k, v in fields.items() if k != "note"} == {k: v for k, v in best["hparams"].items() if k != "note"}
    assert fields["note"].startswith(f"rrome tune: trial {best['trial']} (layer=")
    # Python: the file resolves to the trial's set
    hp = resolve_hparams("gpt2", str(sweep.result.best), n_layers=2)
    assert hp.to_json() == fields
    # the command line: rrome apply --hparams best.json edits with it and records it
    model = tmp_path / "model"
    shutil.copytree(sweep.model, model)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(CASES[3]) + "\n")
    res = CliRunner().invoke(
        main, ["apply", str(edits), str(model), "--hparams", str(sweep.result.best), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    (logged,) = rrome.load_deltas(model)
    assert logged.delta.meta["hparams"] == fields
    assert logged.delta.meta["layer"] == fields["layer"]


# --------------------------------------------------------------------------------------------
# ranking


def _line(trial: int, es: float, score: float, steps: float | None = None) -> dict[str, Any]:
    line = {"trial": trial, "grid": {}, "metrics": {"ES": es, "PS": 50.0, "NS": 50.0, "Score": score}}
    return line if steps is None else {**line, "steps_mean": steps}


def test_rank_puts_the_constraint_first() -> None:
    lines = [
        _line(0, 100.0, 60.0),
        _line(1, 90.0, 80.0),  # the best Score, but ES below 95
        _line(2, 95.0, 70.0),  # exactly on the constraint: meets it
        _line(3, 100.0, float("nan")),
        {"trial": 4, "grid": {}, "hparams": {}, "cases": 1, "error": "boom"},
        _line(5, 100.0, 70.0),  # ties with trial 2: trial order
        _line(6, 94.99, 90.0),
    ]
    assert [t["trial"] for t in rank(lines)] == [2, 5, 0, 3, 6, 1, 4]
    assert [t["trial"] for t in rank(lines, min_es=90)] == [6, 1, 2, 5, 0, 3, 4]
    assert rank(lines, min_es=0)[0]["trial"] == 6


def test_rank_breaks_a_tie_by_fewer_steps() -> None:
    """Equal Scores: fewer optimisation steps first (a trial without the figure after those with
    it), then trial order; steps never outrank a better Score."""
    lines = [
        _line(0, 98.0, 80.85, steps=6.5),
        _line(1, 98.0, 80.85, steps=5.2),
        _line(2, 98.0, 80.85),
        _line(3, 98.0, 80.85, steps=5.2),
        _line(4, 98.0, 80.9, steps=19.0),
    ]
    assert [t["trial"] for t in rank(lines)] == [4, 1, 3, 0, 2]


def test_rerun_with_another_min_es_only_reranks(sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(sweep.whole, folder)

    def no_session(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished sweep must not load the model again")

    monkeypatch.setattr("rrome.eval.runs.Session.__init__", no_session)
    result = tune(sweep.config(min_es=100.0), folder, progress=False)
    assert "ES ≥ 100" in result.table and result.min_es == 100
    assert json.loads((folder / "run.json").read_text())["min_es"] == 100
    assert _untimed(read_jsonl(folder / "trials.jsonl")) == _untimed(read_jsonl(sweep.whole / "trials.jsonl"))


def test_other_settings_are_refused(sweep: Sweep, tmp_path: Path) -> None:
    with pytest.raises(RromeError, match=r"other settings \(grid: saved .*; rerun with the saved settings"):
        tune(sweep.config(grid=parse_grids(["layer=0,1"])), sweep.whole, progress=False)
    with pytest.raises(RromeError, match=r"other settings \(n: saved 3, now 2\)"):
        tune(sweep.config(n=2), sweep.whole, progress=False)
    res = CliRunner().invoke(main, [*sweep.cli_args(sweep.whole), "--set", "kl_factor=0"])
    assert res.exit_code == 1 and "hparams: saved" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # an `rrome eval` folder, or any other folder with files in it, is not a sweep
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "run.json").write_text(json.dumps({"methods": ["r-rome"]}))
    with pytest.raises(RromeError, match="not a sweep"):
        tune(sweep.config(), ev, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RromeError, match="not empty"):
        tune(sweep.config(), tmp_path / "other", progress=False)


def test_a_grid_layer_beyond_the_model_is_refused_before_any_trial(sweep: Sweep, tmp_path: Path) -> None:
    with pytest.raises(RromeError, match=r"trial 1 \(layer=5\): layer 5 is out of range: the model has 2 layers"):
        tune(sweep.config(grid=parse_grids(["layer=0,5"])), tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "trials").exists() and not (tmp_path / "o" / "trials.jsonl").exists()


# --------------------------------------------------------------------------------------------
# killed sweeps continue to the same result


def test_resume_after_an_injected_failure(sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fail_at = [5]  # the second case of the second trial, in the first run only
    real_edit = Editor.edit

    def edit(self: Editor, request: Any, **options: Any) -> Any:
        calls.append(1)
        if len(calls) == fail_at[0]:
            raise RuntimeError("injected failure")
        return real_edit(self, request, **options)

    monkeypatch.setattr(Editor, "edit", edit)
    part = tmp_path / "part"
    with pytest.raises(RuntimeError, match="injected"):
        tune(sweep.config(), part, progress=False)
    assert len(read_jsonl(part / "trials.jsonl")) == 1
    assert len(read_jsonl(part / "trials" / "001" / "edits.jsonl")) == 1
    assert not (part / "best.json").exists()
    # as if killed while writing: a torn line in the trial's records and in trials.jsonl
    with open(part / "trials" / "001" / "edits.jsonl", "a") as f:
        f.write('{"index": 1, "case_id": 2, "norm_de')
    with open(part / "trials.jsonl", "a") as f:
        f.write('{"trial": 1, "grid": {"lay')
    calls.clear()
    fail_at[0] = 0
    result = tune(sweep.config(), part, progress=False)
    assert len(calls) == 4 * N - N - 1  # no recorded case edited again
    _same_sweep(sweep.whole, part)
    assert _without_seconds(result.table) == _without_seconds(sweep.result.table)


def _without_seconds(table: str) -> list[list[str]]:
    """A table's rows without the seconds-per-edit column (third cell from the end)."""
    rows = []
    for row in table.splitlines():
        cells = row.split("|")
        rows.append(cells[:-3] + cells[-2:] if row.startswith("|") else [row])
    return rows


def test_finished_trial_without_its_line_is_not_edited_again(
    sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after a trial's last case but before its line: the line is rebuilt from the
    records, nothing is edited twice."""
    part = tmp_path / "part"
    shutil.copytree(sweep.whole, part)
    lines = (part / "trials.jsonl").read_text().splitlines(keepends=True)
    (part / "trials.jsonl").write_text("".join(lines[:2]))
    (part / "best.json").unlink()
    calls: list[int] = []
    real_edit = Editor.edit
    monkeypatch.setattr(Editor, "edit", lambda self, r, **kw: calls.append(1) or real_edit(self, r, **kw))
    tune(sweep.config(), part, progress=False)
    assert calls == []
    assert _untimed(read_jsonl(part / "trials.jsonl")) == _untimed(read_jsonl(sweep.whole / "trials.jsonl"))
    assert (part / "best.json").read_text() == (sweep.whole / "best.json").read_text()


def test_a_failed_edit_fails_its_trial_only(sweep: Sweep, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_edit = Editor.edit

    def edit(self: Editor, request: Any, **options: Any) -> Any:
        if self.hparams.layer == 1 and self.hparams.clamp_norm_factor == 0.5 and request.case_id == "2":
            raise NonFiniteUpdateError("refused the edit: its update holds NaN")
        return real_edit(self, request, **options)

    monkeypatch.setattr(Editor, "edit", edit)
    result = tune(sweep.config(), tmp_path / "f", progress=False)
    assert result.ranked[-1]["trial"] == 2 and result.ranked[-1]["error"].endswith("holds NaN")
    assert result.ranked[-1]["cases"] == 1
    assert "- trial 2 failed after 1 case(s): refused the edit" in result.table
    assert [t["trial"] for t in result.ranked[:-1]] == [t["trial"] for t in sweep.result.ranked if t["trial"] != 2]


@pytest.mark.slow  # a sweep in a subprocess, killed and resumed
def test_resume_after_sigkill(sweep: Sweep, tmp_path: Path) -> None:
    """``rrome tune`` killed with SIGKILL in the middle of a trial; the same command continues it."""
    part = tmp_path / "part"
    env = {k: v for k, v in os.environ.items() if k != "RROME_CRASH_AT"}
    env.update(OMP_NUM_THREADS="1", RROME_CACHE_DIR=str(sweep.root / "cache"))
    records = part / "trials" / "001" / "edits.jsonl"
    proc = kill_after_first_line(sweep.cli_args(part), records, env, timeout=120, what="no trial started")
    assert proc.returncode == -signal.SIGKILL
    assert len(read_jsonl(part / "trials.jsonl")) < 4
    result = tune(sweep.config(), part, progress=False)
    assert len(result.ranked) == 4
    _same_sweep(sweep.whole, part)


def test_report_names_a_sweep_folder(sweep: Sweep) -> None:
    res = CliRunner().invoke(main, ["report", str(sweep.whole)])
    assert res.exit_code == 1 and "is an `rrome tune` folder: its table is" in res.stderr, res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_prints_the_table_and_the_best(sweep: Sweep, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(sweep.whole, folder)
    res = CliRunner().invoke(main, [*sweep.cli_args(folder), "--min-es", "0"])
    assert res.exit_code == 0, res.output
    table = (folder / "table.md").read_text()
    assert res.stdout.startswith(table)
    assert "| | unedited |" in table and "| 1 | " in table and "| layer | clamp_norm_factor |" in table
    top = rank(read_jsonl(folder / "trials.jsonl"), min_es=0)[0]["trial"]
    assert f"best: trial {top}; wrote {folder / 'best.json'}" in res.stdout
    assert [row.split("|")[2].strip() for row in table.splitlines() if row.startswith("| 1 |")] == [str(top)]
    assert json.loads((folder / "best.json").read_text())["note"].startswith(f"rrome tune: trial {top} ")
    if sys.platform == "linux":  # the folder is locked while a sweep runs
        import fcntl

        with open(folder / "tune.lock", "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            held = CliRunner().invoke(main, sweep.cli_args(folder))
        assert held.exit_code == 1 and "another `rrome tune` is running" in held.stderr

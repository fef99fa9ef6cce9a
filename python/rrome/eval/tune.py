"""``rrome tune``: a resumable sweep over hyperparameters, each set measured one edit at a time.

Every trial is one point of the grid (the product of the ``--grid`` values, in the order given,
over the set ``--hparams`` and ``--set`` make). A trial edits each of the run's cases into the
unedited model and measures it, restoring the edited weight exactly afterwards: the machinery
of ``rrome eval`` (:func:`rrome.eval.runs.edit_one_at_a_time`), so a trial's figures are those of
``rrome eval`` with the trial's set on the same cases. The objective is the Score (harmonic mean
of ES, PS and NS) subject to ES ≥ ``min_es``: trials that meet the constraint come first, by
Score, then the others, by Score; trials whose edits failed come last.

A sweep lives in a folder::

    run.json                the settings (a rerun must give the same ones; only the device, the
                            paths and min_es may change)
    baseline.json           the unedited model (per-case probabilities and metrics), once
    trials/NNN/hparams.json the resolved set of trial NNN
    trials/NNN/edits.jsonl  one fsynced line per case of trial NNN (as ``rrome eval`` writes)
    trials.jsonl            one fsynced line per finished trial: its grid point, resolved set,
                            metrics, mean steps, median |Δ|, seconds per edit
    table.md                the trials, best first
    best.json               the best trial's set, a file for ``--hparams``

A killed sweep continues when the same command runs again: finished trials are read back, the
trial in progress continues with its first unrecorded case, and no case or trial is counted
twice, so the final table is the one an uninterrupted run gives (times aside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rrome.eval.metrics import CaseProbs, metrics
from rrome.eval.results import (
    BASELINE_FILE,
    BEST_FILE,
    LOCK_FILE,
    RUN_FILE,
    TABLE_FILE,
    TRIAL_HPARAMS_FILE,
    TRIALS_FILE,
    edits_path,
    fsync_append,
    read_json,
    read_jsonl,
    trial_dir,
    write_json,
)
from rrome.eval.runs import RunConfig, load_cases, style_suffix
from rrome.files.constants import METHODS
from rrome.files.edits import EditRequest
from rrome.files.errors import NonFiniteUpdateError, RromeError
from rrome.files.fsutil import atomic_write, open_lock_file, real_dir
from rrome.files.hparams import HParams, describe_differences

MIN_ES = 95.0
"""Default of ``min_es``: the efficacy (percent) a set must reach to be ranked by its Score."""

COMMAND = "tune"

Grid = tuple[tuple[str, tuple[Any, ...]], ...]
"""``(key, values)`` pairs, as :func:`rrome.files.hparams.parse_grids` returns them."""


@dataclass(frozen=True)
class TuneConfig:
    """What a sweep does. A rerun into the same folder must give the same settings, except
    :attr:`FREE` (the device, the two paths, which may move between machines, and ``min_es``,
    which only ranks the trials)."""

    model_dir: str
    data: str
    data_sha256: str
    grid: Grid = ()
    hparams: dict[str, Any] = field(default_factory=dict)
    method: str = "r-rome"
    n: int = 100
    offset: int = 0
    min_es: float = MIN_ES
    diagnostics: bool = False
    seed: int = 0
    dtype: str = "float32"
    corpus: str | None = None
    device: str | None = None
    edit_prompts: str = "plain"
    eval_prompts: tuple[str, ...] = ("plain",)
    """As ``rrome eval``'s (:class:`~rrome.eval.runs.RunConfig`): the objective reads the first
    measuring style; a trial's line adds ``metrics_<style>`` for a second."""

    FREE = ("model_dir", "data", "device", "min_es")
    ADDED_LATER = ("edit_prompts", "eval_prompts")
    """Fields newer than sweeps that may still be continued: a folder without one ran at its default."""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid"] = [[key, list(values)] for key, values in self.grid]
        d["eval_prompts"] = list(self.eval_prompts)
        return {"command": COMMAND, **d}

    def points(self) -> list[dict[str, Any]]:
        """The grid's points in trial order (the last key varies fastest); one empty point
        without a grid."""
        keys = [key for key, _ in self.grid]
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(v for _, v in self.grid))]

    def run_config(self) -> RunConfig:
        """The ``rrome eval`` settings of the base set (the cases, the model, the measurements)."""
        return RunConfig(
            model_dir=self.model_dir,
            data=self.data,
            data_sha256=self.data_sha256,
            methods=(self.method,),
            n=self.n,
            offset=self.offset,
            seed=self.seed,
            glue_n=0,
            diagnostics=self.diagnostics,
            dtype=self.dtype,
            corpus=self.corpus,
            hparams=dict(self.hparams),
            device=self.device,
            edit_prompts=self.edit_prompts,
            eval_prompts=tuple(self.eval_prompts),
        )


@dataclass(frozen=True)
class TuneResult:
    """A finished sweep: its trials best first, the unedited model's metrics, the table and the
    best set's file (None when every trial failed)."""

    out_dir: Path
    ranked: list[dict[str, Any]]
    unedited: dict[str, float]
    table: str
    best: Path | None
    min_es: float

    @property
    def best_meets(self) -> bool:
        return bool(self.ranked) and meets(self.ranked[0], self.min_es)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _check_config(out: Path, cfg: TuneConfig) -> None:
    """Writes run.json in a new folder; in an existing one, refuses other settings."""
    path = out / RUN_FILE
    new = cfg.to_json()
    if not path.exists():
        if any(p.name != LOCK_FILE for p in out.iterdir()):
            raise RromeError(f"{out}: not empty and holds no `rrome tune` sweep (no {RUN_FILE}); use another --out")
        write_json(path, new)
        return
    saved = read_json(path)
    if not isinstance(saved, dict) or saved.get("command") != COMMAND:
        raise RromeError(f"{path}: {out} holds an `rrome eval` run or something else, not a sweep; use another --out")
    defaults = TuneConfig(model_dir="", data="", data_sha256="").to_json()
    saved = {**{k: defaults[k] for k in cfg.ADDED_LATER if k not in saved}, **saved}
    diff = [k for k in new if k not in cfg.FREE and _canonical(saved.get(k)) != _canonical(new[k])]
    if diff:
        detail = "; ".join(f"{k}: saved {json.dumps(saved.get(k))}, now {json.dumps(new[k])}" for k in diff)
        raise RromeError(
            f"{path}: this folder holds a sweep with other settings ({detail}); "
            "rerun with the saved settings to continue it, or use another --out"
        )
    if _canonical(saved) != _canonical(new):
        write_json(path, new)  # the free fields as last given


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One process at a time per folder: two would edit the same trial twice."""
    fd = open_lock_file(out / LOCK_FILE)  # never through a link
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RromeError(f"{out}: another `rrome tune` is running in this folder") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_trials(out_dir: str | os.PathLike[str], *, repair: bool = False) -> dict[int, dict[str, Any]]:
    """The finished trials of a sweep folder by trial number (a torn last line left out; the
    first line of a trial counts, should one ever be written twice)."""
    done: dict[int, dict[str, Any]] = {}
    for line in read_jsonl(Path(out_dir) / TRIALS_FILE, repair=repair):
        done.setdefault(int(line["trial"]), line)
    return done


def _trial_line(
    trial: int,
    point: Mapping[str, Any],
    hp: HParams,
    records: Sequence[dict[str, Any]],
    eval_prompts: Sequence[str] = ("plain",),
) -> dict[str, Any]:
    """A finished trial's line of trials.jsonl, from its per-case records alone (``metrics``
    in the first measuring style, ``metrics_<style>`` in a further one)."""
    line: dict[str, Any] = {
        "trial": trial,
        "grid": dict(point),
        "hparams": hp.to_json(),
        "cases": len(records),
        "metrics": metrics(CaseProbs.from_json(r["case"]) for r in records),
        "steps_mean": statistics.fmean(r["steps"] for r in records),
        "stops": dict(sorted(Counter(r["stop"] for r in records).items())),
        "norm_delta_median": statistics.median(r["norm_delta"] for r in records),
        "delta_ratio_median": statistics.median(r["delta_ratio"] for r in records),
        "seconds_per_edit": statistics.fmean(r["seconds"] for r in records),
    }
    for i, style in enumerate(eval_prompts):
        suffix = style_suffix(i, style)
        if suffix:
            line["metrics" + suffix] = metrics(CaseProbs.from_json(r["case" + suffix]) for r in records)
    entropies = [r["generation_entropy"] for r in records if "generation_entropy" in r]
    if entropies:
        line["generation_entropy_mean"] = statistics.fmean(entropies)
    return line


_ADDED_LATER = ("retain_edit_keys", "retain_weight", "retain_both_keys")
"""Fields of :class:`HParams` newer than sweeps that may still be continued: a recorded set
without one of them edited as the field's default does."""


def _default(key: str) -> Any:
    return next(f.default for f in dataclasses.fields(HParams) if f.name == key)


def _check_resolved(out: Path, resolved: Sequence[HParams], done: Mapping[int, dict[str, Any]]) -> None:
    """Refuses to continue trials recorded with another resolved set than the command now gives
    (the family's packaged defaults changed, say): their cases would mix two sets."""
    for i, hp in enumerate(resolved):
        hp_file = trial_dir(out, i) / TRIAL_HPARAMS_FILE
        saved = done[i]["hparams"] if i in done else (read_json(hp_file) if hp_file.exists() else None)
        now = hp.to_json()
        if isinstance(saved, dict):
            # A field added to rrome after the trial was recorded, at its default, edits as before.
            saved = {**{k: now[k] for k in _ADDED_LATER if k not in saved and now[k] == _default(k)}, **saved}
        detail = describe_differences(saved, now) if saved is not None else ""
        if not detail:
            continue
        raise RromeError(
            f"{out}: trial {i} was run with another resolved set ({detail}); the family's defaults may have "
            "changed since. Use another --out"
        )


def tune(cfg: TuneConfig, out_dir: str | os.PathLike[str], *, progress: bool = True) -> TuneResult:
    """Runs (or continues) a sweep and returns its ranked trials; writes table.md and best.json.

    Raises:
        RromeError: bad settings or data, a folder holding another sweep or another run, a
            grid layer beyond the model's depth, a trial recorded with another resolved set.
    """
    if cfg.method not in METHODS:
        raise RromeError(f"unknown method {cfg.method!r}; expected one of {', '.join(METHODS)}")
    if cfg.n < 1 or cfg.offset < 0:
        raise RromeError(f"--n must be at least 1 and --offset at least 0; got {cfg.n} and {cfg.offset}")
    if not 0 <= cfg.min_es <= 100:
        raise RromeError(f"--min-es is a percentage, 0 to 100; got {cfg.min_es:g}")
    out = Path(out_dir)
    rcfg = cfg.run_config()
    rcfg.check_prompts()
    cases = load_cases(rcfg)  # before anything is written or loaded
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _check_config(out, cfg)
        done = read_trials(out, repair=True)
        points = cfg.points()
        if len(done) < len(points) or not (out / BASELINE_FILE).exists():
            _run(cfg, rcfg, cases, points, done, out, progress)
        return finish(out, cfg.min_es)


def _run(
    cfg: TuneConfig,
    rcfg: RunConfig,
    cases: Sequence[EditRequest],
    points: Sequence[dict[str, Any]],
    done: dict[int, dict[str, Any]],
    out: Path,
    progress: bool,
) -> None:
    import torch
    from tqdm import tqdm

    from rrome.engine.models import num_layers
    from rrome.eval.runs import Session, baseline, edit_one_at_a_time
    from rrome.files.hparams import resolve_hparams

    torch.manual_seed(cfg.seed)
    # Loaded with the first trial's set: the statistics of a layer no trial edits (the family's,
    # when the grid sweeps the layer) would cost minutes on a real model for nothing.
    s = Session(dataclasses.replace(rcfg, hparams={**cfg.hparams, **points[0]}), progress)
    s.editor.check_requests(cases)  # every subject and target tokenises, before the first trial
    baseline(s, rcfg, cases, out)
    family, depth = s.editor.adapter.family, num_layers(s.editor.model.config)
    resolved = []
    for i, point in enumerate(points):
        hp = resolve_hparams(family, cfg.hparams, n_layers=depth, overrides=point)
        if not 0 <= hp.layer < depth:
            where = ", ".join(f"{k}={_value(v)}" for k, v in point.items())
            raise RromeError(f"trial {i} ({where}): layer {hp.layer} is out of range: the model has {depth} layers")
        resolved.append(hp)
    _check_resolved(out, resolved, done)

    started = sum(
        len({r["index"] for r in read_jsonl(edits_path(trial_dir(out, i)))})
        for i in range(len(points))
        if i not in done
    )
    total = len(points) * len(cases)
    bar = tqdm(total=total, initial=len(done) * len(cases) + started, disable=not progress, unit="edit")
    trials_path = out / TRIALS_FILE
    for i, (point, hp) in enumerate(zip(points, resolved, strict=True)):
        if i in done:
            continue
        folder = trial_dir(out, i)
        real_dir(folder.parent)
        real_dir(folder)
        if not (folder / TRIAL_HPARAMS_FILE).exists():
            write_json(folder / TRIAL_HPARAMS_FILE, hp.to_json())
        bar.set_description(f"trial {i + 1}/{len(points)}")
        s.use(hp)
        edits = edits_path(folder)
        try:
            records = edit_one_at_a_time(
                s, cases, edits, diagnostics=cfg.diagnostics, seed=cfg.seed, tick=lambda _: bar.update()
            )
            line = _trial_line(i, point, hp, records, cfg.eval_prompts)
        except NonFiniteUpdateError as e:
            # The update was refused before it touched the model: a property of this set and
            # this case, recorded so that a rerun does not try it again.
            s.restore()
            recorded = len(read_jsonl(edits))
            bar.update(len(cases) - recorded)
            line = {"trial": i, "grid": dict(point), "hparams": hp.to_json(), "cases": recorded, "error": str(e)}
        fsync_append(trials_path, line)
        done[i] = line
    s.restore()
    bar.close()


# --------------------------------------------------------------------------------------------
# ranking, table, best set


def _number(x: Any) -> float:
    """A metric for sorting: NaN (and missing) below every number."""
    return float(x) if isinstance(x, int | float) and not math.isnan(x) else -math.inf


def meets(trial: Mapping[str, Any], min_es: float) -> bool:
    """Whether a finished trial's ES reaches ``min_es`` (up to rounding of the percentages)."""
    m = trial.get("metrics")
    return m is not None and _number(m["ES"]) >= min_es - 1e-9


def rank(trials: Sequence[dict[str, Any]], min_es: float = MIN_ES) -> list[dict[str, Any]]:
    """Best first: the trials with ES ≥ ``min_es`` by Score, then the others by Score, then the
    failed ones. Equal Scores go to the trial with fewer optimisation steps on average (the same
    outcome for less time: on one set of cases the step size often changes nothing else), then
    to the earlier trial."""

    def key(t: dict[str, Any]) -> tuple[int, float, float, int]:
        if t.get("metrics") is None:
            return (2, 0.0, 0.0, t["trial"])
        steps = _number(t.get("steps_mean"))
        steps = math.inf if steps == -math.inf else steps  # fewer first; missing after every number
        return (0 if meets(t, min_es) else 1, -_number(t["metrics"]["Score"]), steps, t["trial"])

    return sorted(trials, key=key)


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return v if isinstance(v, str) else json.dumps(v, separators=(",", ":"))


def _prompts_note(cfg: Mapping[str, Any]) -> str:
    """Where the sweep's prompts sat, when not plain throughout ('' otherwise)."""
    edit, measured = cfg.get("edit_prompts", "plain"), list(cfg.get("eval_prompts", ["plain"]))
    if edit == "plain" and measured == ["plain"]:
        return ""
    more = f" (also {', '.join(measured[1:])}: trials.jsonl)" if len(measured) > 1 else ""
    return f"; prompts: edited {edit}, measured {measured[0]}{more}"


def markdown_table(cfg: Mapping[str, Any], ranked: Sequence[dict[str, Any]], unedited: Mapping[str, float]) -> str:
    """The trials best first, with the unedited model's metrics as the first row."""
    keys = [key for key, _ in cfg["grid"]]
    min_es = float(cfg["min_es"])
    n, offset = cfg["n"], cfg["offset"]
    base = " ".join(f"{k}={_value(v)}" for k, v in cfg["hparams"].items() if k != "note") or "the family's defaults"
    lines = [
        f"{len(ranked)} trial(s) over {n} cases from `{Path(cfg['data']).name}` (records {offset + 1}–{offset + n}), "
        f"{cfg['method']}, one edit at a time; base set: {base}" + _prompts_note(cfg),
        f"Objective: Score subject to ES ≥ {min_es:g} (trials that miss it are ranked after those that meet it; "
        "equal Scores by fewer steps).",
        "",
        "| rank | trial | "
        + "".join(f"{k} | " for k in keys)
        + f"ES | PS | NS | Score | steps | median abs Δ | s/edit | ES ≥ {min_es:g} |",
        "|---" * (len(keys) + 10) + "|",
        "| | unedited | "
        + "".join("| " for _ in keys)
        + " | ".join(_fmt(unedited.get(m)) for m in ("ES", "PS", "NS", "Score"))
        + " | – | – | – | |",
    ]
    failed = []
    for place, t in enumerate(ranked, 1):
        point = "".join(f"{_value(t['grid'][k])} | " for k in keys)
        m = t.get("metrics")
        if m is None:
            lines.append(f"| {place} | {t['trial']} | {point}" + "– | " * 7 + "failed |")
            failed.append(t)
            continue
        lines.append(
            f"| {place} | {t['trial']} | {point}"
            + " | ".join(_fmt(m[k]) for k in ("ES", "PS", "NS", "Score"))
            + f" | {t['steps_mean']:.1f} | {t['norm_delta_median']:.3g} | {t['seconds_per_edit']:.2f}"
            + f" | {'yes' if meets(t, min_es) else 'no'} |"
        )
    if failed:
        lines.append("")
        lines += [f"- trial {t['trial']} failed after {t['cases']} case(s): {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"


def best_hparams(cfg: Mapping[str, Any], trial: Mapping[str, Any]) -> dict[str, Any]:
    """The contents of best.json: the trial's whole resolved set (family included, so that it
    is refused for another family), with a note saying where it comes from."""
    m = trial["metrics"]
    n, offset = cfg["n"], cfg["offset"]
    point = ", ".join(f"{k}={_value(v)}" for k, v in trial["grid"].items())
    verdict = "meets" if meets(trial, float(cfg["min_es"])) else "MISSES"
    note = (
        f"rrome tune: trial {trial['trial']}{f' ({point})' if point else ''}, {cfg['method']}, one edit at a time "
        f"on {n} cases of {Path(cfg['data']).name} (records {offset + 1}-{offset + n}): "
        f"ES {_fmt(m['ES'], '.1f')}, PS {_fmt(m['PS'], '.1f')}, NS {_fmt(m['NS'], '.1f')}, "
        f"Score {_fmt(m['Score'], '.1f')}; {verdict} ES >= {float(cfg['min_es']):g}"
    )
    return {**trial["hparams"], "note": note}


def finish(out_dir: str | os.PathLike[str], min_es: float | None = None) -> TuneResult:
    """Ranks a complete sweep folder's trials, writes table.md and best.json, returns them.

    Raises:
        RromeError: not a sweep folder, or one whose trials are not all finished.
    """
    out = Path(out_dir)
    path = out / RUN_FILE
    if not path.exists():
        raise RromeError(f"{path}: missing; is {out} an `rrome tune` folder?")
    cfg = read_json(path)
    if min_es is not None:
        cfg["min_es"] = min_es
    n_trials = math.prod(len(values) for _, values in cfg["grid"])
    done = read_trials(out)
    if len(done) < n_trials:
        raise RromeError(f"{out}: {len(done)} of {n_trials} trials finished; rerun `rrome tune` to continue")
    ranked = rank(list(done.values()), float(cfg["min_es"]))
    unedited = read_json(out / BASELINE_FILE)["metrics"]
    table = markdown_table(cfg, ranked, unedited)
    atomic_write(out / TABLE_FILE, table.encode("utf-8"))
    best = None
    if ranked and ranked[0].get("metrics") is not None:
        best = out / BEST_FILE
        write_json(best, best_hparams(cfg, ranked[0]))
    return TuneResult(out, ranked, unedited, table, best, float(cfg["min_es"]))

"""Evaluation runs: edit CounterFact-style cases with each variant and record everything, resumably.

A run lives in a results folder::

    run.json                      the settings (a resumed run must match them)
    baseline.json                 the unedited model: per-case probabilities, diagnostics, downstream,
                                  and the resolved hyperparameters (a resumed run must edit with
                                  the same set, whatever the packaged defaults have become since)
    <mode>-<method>/edits.jsonl   one line per edit: |Δ|, factors' norms, the value optimisation
                                  (steps, why it stopped, ‖δ‖/‖v_init‖, loss terms per pass),
                                  probabilities, generation entropies (non-sequential: the case's
                                  metrics too), the neighbour leak (see below)
    sequential-<method>/deltas/   the factors of every sequential edit (to resume exactly; with
                                  retain_edit_keys also its key k_den, "k", and with
                                  retain_both_keys its other key, "k_other")
    sequential-<method>/checkpoints.jsonl
                                  every K edits: running metrics, downstream accuracy, |Δ|, entropy

Where the prompts sit (docs/design.md §1): ``edit_prompts`` is where the edits see them (plain
text, or inside the chat template), ``eval_prompts`` where they are measured, one style or both.
The first measuring style fills the records' usual fields (``case``, ``cases``, ``metrics``,
the leak, the sequential checkpoints' metrics); each further style ``S`` adds ``case_S`` to an
edit's line, ``cases_S`` and ``metrics_S`` to ``baseline.json``, ``metrics_S`` to a checkpoint
and ``cases_S`` to ``final.json``: the same edit, measured both ways.

Non-sequential mode edits each case on the unedited model and restores the edited weight from a
copy afterwards (exactly, not by subtracting Δ). Sequential mode lets edits accumulate; a killed
run resumes by replaying the saved factors of the finished edits, which rebuilds the same weights
bit for bit, and continues. Lines are appended with a flush and fsync after each edit, so at most
the edit in progress is lost.

The neighbour leak of an edit (``"leak"`` in its line; :func:`rrome.eval.probabilities.leak_fractions`),
one entry per neighbourhood prompt of its case, in the case's order:

    s, at, s_last   s = uᵀk / uᵀk_den at the prompt's token ``at`` where |s| is largest, s_last at
                    its last token: the fraction of the edit's own change of the module output
                    (Δ k_den = r) that the prompt's keys receive
    before, after   [P(new), P(true)] right before and right after this edit
    dlogp_true      log P(true) after − before (P as the metrics define it: exp of the mean
                    per-token log-probability of the prompt's true answer)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from rrome.engine.editor import Editor, EditResult
from rrome.engine.prompts import PROMPT_STYLES, PromptFormat
from rrome.eval.downstream import downstream_accuracy, few_shot_sets
from rrome.eval.generation import Diagnostics, collapse_diagnostics
from rrome.eval.metrics import CaseProbs, metrics
from rrome.eval.probabilities import case_probabilities, leak_fractions, neighbourhood_probabilities
from rrome.eval.results import (
    BASELINE_FILE,
    RUN_FILE,
    Variant,
    fsync_append,
    mode,
    read_jsonl,
    read_object,
    write_json,
)
from rrome.files.constants import METHODS, Method
from rrome.files.edits import EditRequest, load_requests
from rrome.files.errors import DisablingEditError, LargeUpdateError, RromeError
from rrome.files.fsutil import atomic_write, read_regular, real_dir
from rrome.files.hparams import HParams, HParamsError, check_overrides, describe_differences


@dataclass(frozen=True)
class RunConfig:
    """What a run does. Every field but ``device``, ``methods`` and the two paths must match when a
    run is resumed; variants may be added to a folder later (or by parallel processes)."""

    model_dir: str
    data: str
    data_sha256: str
    methods: tuple[str, ...] = ("r-rome",)
    n: int = 100
    offset: int = 0
    sequential: bool = False
    every: int = 10
    seed: int = 0
    glue_n: int = 0
    diagnostics: bool = True
    """Sample the generation entropies (the unedited model, each checkpoint, each edit)."""
    edit_diagnostics: bool = True
    """With ``diagnostics``: also after each edit (off: the unedited model and the checkpoints
    only; the report then flags every large edit as disabling, having no entropy to read)."""
    dtype: str = "float32"
    layer: int | None = None
    corpus: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    guard: bool = False
    """Sequential runs: refuse the edits the guards flag (the disabling-edit screen under rome,
    the large-update guard), record them as refused and go on; off: apply every edit."""
    edit_prompts: str = "plain"
    """Where the edits see their prompts: ``plain`` text or inside the ``chat`` template."""
    eval_prompts: tuple[str, ...] = ("plain",)
    """Where every prompt of a case is measured, in order: the first style fills the usual
    fields, a second one its own (the module docstring)."""

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # Results folders are committed and shared: record where the model and the data were
        # in a form that names no one's machine (see recorded_path).
        out["model_dir"] = recorded_path(self.model_dir)
        out["data"] = recorded_path(self.data)
        return out

    @property
    def mode(self) -> str:
        return mode(self.sequential)

    @property
    def entropies_after_each_edit(self) -> bool:
        """Whether each edit's record samples the generation entropies."""
        return self.diagnostics and self.edit_diagnostics

    def check_prompts(self) -> None:
        """Refuses unknown or repeated prompt styles.

        Raises:
            RromeError: an unknown style, no measuring style, or one given twice.
        """
        check_prompt_styles(self.edit_prompts, self.eval_prompts)


def recorded_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a results file records it: under the home directory as ``~/…``, elsewhere
    relative to the working directory when that climbs at most one level (``../shared/…`` from
    a checkout), otherwise as given. Only ever written down for people to read; a resumed run
    is checked by the data's sha256 and the resolved hyperparameters, never by these paths."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        return text
    home = os.path.expanduser("~")
    if home not in ("~", "/") and (text == home or text.startswith(home.rstrip("/") + "/")):
        return "~" + text[len(home.rstrip("/")) :]
    try:
        rel = os.path.relpath(text)
    except ValueError:  # another drive (Windows)
        return text
    return rel if not rel.startswith(os.path.join("..", "..")) else text


def check_prompt_styles(edit_prompts: str, eval_prompts: Sequence[str]) -> None:
    """Refuses an unknown edit style, or measuring styles that are empty, unknown or repeated."""
    known = ", ".join(PROMPT_STYLES)
    if edit_prompts not in PROMPT_STYLES:
        raise RromeError(f"--edit-prompts must be one of {known}; got {edit_prompts!r}")
    bad = [x for x in eval_prompts if x not in PROMPT_STYLES]
    if bad or not eval_prompts or len(set(eval_prompts)) != len(eval_prompts):
        given = ",".join(eval_prompts)
        raise RromeError(f"--eval-prompts must name {known} or both, each once; got {given!r}")


def style_suffix(index: int, style: str) -> str:
    """The suffix of the fields that hold the measurements in the ``index``-th measuring style:
    none for the first, ``_<style>`` for the others."""
    return "" if index == 0 else f"_{style}"


def _check_config(out_dir: Path, cfg: RunConfig) -> None:
    """Refuses a folder that holds a run with other settings (before the model is loaded)."""
    path = out_dir / RUN_FILE
    if not path.exists():
        return
    saved = read_object(path)
    new = cfg.to_json()
    # A folder collects variants (each has its own subfolder); the model folder and the data file
    # may move between machines (the data's sha256 must still match). The hyperparameters are
    # compared resolved, once the model is known (_check_hparams): the same overrides mean
    # another set once the packaged defaults change, and other overrides may give the same set.
    free = ("device", "methods", "model_dir", "data", "hparams")
    # A field added after a folder was made counts as its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    diff = [k for k in new if k not in free and json.dumps(saved.get(k, defaults.get(k))) != json.dumps(new[k])]
    if diff:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {new[k]!r}" for k in diff)
        raise RromeError(f"{path}: this results folder holds a run with other settings ({detail}); use another --out")


def _record_config(out_dir: Path, cfg: RunConfig) -> None:
    """Writes run.json in a new folder, or adds this run's variants to an existing one's (once
    every check has passed, so that a refused run leaves the folder as it was)."""
    path = out_dir / RUN_FILE
    if not path.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(path, cfg.to_json())
        return
    saved = read_object(path)
    methods = [m for m in METHODS if m in set(saved.get("methods", ())) | set(cfg.methods)]
    if methods != saved.get("methods"):
        write_json(path, {**saved, "methods": methods})


def recorded_hparams(out_dir: Path) -> HParams | None:
    """The resolved set a results folder's edits were made with: the one ``baseline.json``
    records (its first session's), a field it lacks (one added to rrome later) at that field's
    default, which is how those edits were made; ``None`` for a folder without one."""
    path = out_dir / BASELINE_FILE
    if not path.exists():
        return None
    raw = read_object(path).get("hparams")
    if not isinstance(raw, dict):
        return None
    try:
        return HParams(**check_overrides(raw))
    except (HParamsError, TypeError) as e:
        raise RromeError(f"{path}: its hyperparameters cannot be read ({e}); use another --out") from None


def _check_hparams(out_dir: Path, used: HParams) -> None:
    """Refuses to go on with a folder whose edits were made with another resolved set
    (:func:`recorded_hparams`)."""
    saved = recorded_hparams(out_dir)
    if saved is None:
        return
    detail = describe_differences(saved.to_json(), used.to_json(), ignore=("note",))
    if detail:
        raise RromeError(
            f"{out_dir / BASELINE_FILE}: this folder's edits were made with other hyperparameters ({detail}); "
            "pass --hparams/--set to match them, or use another --out"
        )


def load_cases(cfg: RunConfig) -> list[EditRequest]:
    """The run's cases: records ``offset`` to ``offset + n`` of the data file, each with a true target."""
    requests = load_requests(cfg.data)
    cases = requests[cfg.offset : cfg.offset + cfg.n]
    if len(cases) < cfg.n:
        raise RromeError(f"{cfg.data}: asked for {cfg.n} cases from record {cfg.offset}, the file has {len(requests)}")
    for i, r in enumerate(cases):
        if r.target_true is None:
            raise RromeError(f"{cfg.data}: record {cfg.offset + i + 1} has no true target; the metrics need one")
    return cases


class Session:
    """The model, the editor and the unedited weight of the edited module."""

    def __init__(self, cfg: RunConfig, progress: bool) -> None:
        overrides = dict(cfg.hparams)
        self.editor = Editor.from_pretrained(
            cfg.model_dir,
            method=cast(Method, cfg.methods[0]),
            device=cfg.device,
            dtype=cfg.dtype,
            layer=cfg.layer,
            corpus=cfg.corpus,
            hparams=overrides,
            progress=progress,
            allow_large_updates=not cfg.guard,
            edit_prompts=cfg.edit_prompts,
        )
        tokenizer = self.editor.tokenizer
        # Where each case is measured; raises ChatTemplateError before any work for "chat" on a
        # model without a chat template.
        self.formats = [PromptFormat.for_tokenizer(tokenizer, style) for style in cfg.eval_prompts]
        # Templates and statistics come from the unedited model; fix them before any edit.
        self.editor.templates()
        self.editor.cholesky()
        self.original = self.editor.edited_weight().detach().clone()
        self.sets = few_shot_sets(cfg.glue_n, seed=cfg.seed) if cfg.glue_n > 0 else []

    def restore(self) -> None:
        """The unedited weight back, and no edit remembered (:meth:`Editor.restore`)."""
        self.editor.restore(self.original)

    def edit_with(self, method: str) -> None:
        """Edits with ``method`` from now on, starting from the unedited model."""
        self.restore()
        self.editor = self.editor.copy(method=cast(Method, method))

    def use(self, hparams: HParams) -> None:
        """Edits with ``hparams`` from now on (``rrome tune``): a copy of the editor over the same
        model, its templates and statistics fixed from the unedited model as at the start, so
        that its edits are those of a run started with ``hparams``. The current weight is
        restored first."""
        self.restore()
        editor = self.editor.copy(hparams=hparams)
        # The templates depend on the seed, the lengths and the unedited model alone
        # (keys.generate_templates): each list is generated once, whatever set edits with it.
        editor.templates()
        editor.cholesky()
        self.editor = editor
        self.original = editor.edited_weight().detach().clone()

    def probs(self, request: EditRequest) -> CaseProbs:
        """The case's probabilities in the first measuring style."""
        return case_probabilities(self.editor.model, self.editor.tokenizer, request, self.formats[0])

    def more_probs(self, request: EditRequest) -> dict[str, CaseProbs]:
        """The case's probabilities in each further measuring style, by field suffix
        (:func:`style_suffix`)."""
        ed = self.editor
        return {
            style_suffix(i, f.style): case_probabilities(ed.model, ed.tokenizer, request, f)
            for i, f in enumerate(self.formats)
            if i
        }

    def neighbours(self, request: EditRequest) -> list[tuple[float, float]]:
        return neighbourhood_probabilities(self.editor.model, self.editor.tokenizer, request, self.formats[0])

    def leak(
        self,
        request: EditRequest,
        result: Any,
        before: Sequence[tuple[float, float]],
        after: Sequence[tuple[float, float]],
    ) -> dict[str, Any]:
        """The neighbour leak of an edit (the module docstring); ``before`` and ``after`` are
        the neighbourhood prompts' (P(new), P(true)) around it."""
        ed = self.editor
        fr = leak_fractions(
            ed.model,
            ed.tokenizer,
            ed.module_name,
            request.neighborhood_prompts,
            result.delta.u,
            result.denominator,
            self.formats[0],
        )

        def log(p: float) -> float:
            return math.log(max(p, 1e-300))

        return {
            "s": [f.s for f in fr],
            "at": [f.at for f in fr],
            "s_last": [f.s_last for f in fr],
            "dlogp_true": [log(a[1]) - log(b[1]) for b, a in zip(before, after, strict=True)],
            "before": [list(b) for b in before],
            "after": [list(a) for a in after],
        }

    def diagnostics(self, request: EditRequest | None, seed: int) -> Diagnostics:
        return collapse_diagnostics(self.editor.model, self.editor.tokenizer, request, seed=seed)

    def downstream(self) -> dict[str, float]:
        return downstream_accuracy(self.editor.model, self.editor.tokenizer, self.sets) if self.sets else {}


def _case_fields(index: int, request: EditRequest) -> dict[str, Any]:
    """The fields that open every line of ``edits.jsonl``, an edit's or a refusal's."""
    return {"index": index, "case_id": request.case_id, "subject": request.subject, "target_new": request.target_new}


def _edit_record(index: int, request: EditRequest, result: EditResult) -> dict[str, Any]:
    """An edit's line: the case, then the edit's record (:meth:`EditResult.to_json`, as the
    edit log holds it)."""
    return {**_case_fields(index, request), **result.to_json()}


def baseline(s: Session, cfg: RunConfig, cases: Sequence[EditRequest], out_dir: Path) -> dict[str, Any]:
    """The unedited model's figures (``baseline.json`` of ``out_dir``), computed once."""
    path = out_dir / BASELINE_FILE
    if path.exists():
        return read_object(path)
    probs = [s.probs(r) for r in cases]
    more = [s.more_probs(r) for r in cases]
    diag = s.diagnostics(None, cfg.seed) if cfg.diagnostics else None
    base: dict[str, Any] = {
        "cases": [p.to_json() for p in probs],
        "metrics": metrics(probs),
        "diagnostics": dataclasses.asdict(diag) if diag else None,
        "downstream": s.downstream(),
        "layer": s.editor.layer,
        "module": s.editor.module_name,
        "hparams": s.editor.hparams.to_json(),
        "templates": s.editor.templates(),
        "stats": recorded_path(s.editor.stats_path) if s.editor.stats_path else None,
    }
    for suffix in more[0] if more else {}:
        base["cases" + suffix] = [m[suffix].to_json() for m in more]
        base["metrics" + suffix] = metrics(m[suffix] for m in more)
    write_json(path, base)
    return base


Progress = Callable[[str, int, int], None]


class RunProgress:
    """The progress bar of a run, counting edits over all methods. Edits an earlier, killed
    process already made are shown as done but left out of the rate, so a resumed run's
    speed and time left are this process's own (a run edits at a steady pace: the average
    rate, no smoothing)."""

    def __init__(self, total: int, mode: str, *, enabled: bool = True, file: Any = None) -> None:
        from tqdm import tqdm

        self.mode = mode
        self.bar = tqdm(total=total, desc=mode, unit="edit", smoothing=0, disable=not enabled, file=file)
        self._seen: dict[str, int] = {}

    def start(self, method: str) -> None:
        """Names the method whose edits come next."""
        self.bar.set_description(f"{self.mode} {method}")

    def _resumed(self, n: int) -> None:
        if self.bar.disable:  # a disabled tqdm holds no counts
            return
        self.bar.initial += n
        self.bar.n += n

    def tick(self, method: str, done: int, total: int) -> None:
        """``done`` edits of ``method`` are finished; the first call of a resumed method
        reports the earlier process's ``done - 1`` edits as well."""
        if method not in self._seen:
            self._resumed(done - 1)
            self._seen[method] = done - 1
        self.bar.update(done - self._seen[method])
        self._seen[method] = done

    def finish(self, method: str, total: int) -> None:
        """All ``total`` edits of ``method`` are done (all by an earlier process if none ticked)."""
        if method not in self._seen:
            self._resumed(total)
        else:
            self.bar.update(total - self._seen[method])
        self._seen[method] = total

    def close(self) -> None:
        self.bar.close()


def edit_one_at_a_time(
    s: Session,
    cases: Sequence[EditRequest],
    edits: Path,
    *,
    diagnostics: bool,
    seed: int,
    tick: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Edits each case into the unedited model, measures it and restores the weight exactly.

    One fsynced line per case in ``edits`` (its index, the edit's figures, the case's
    probabilities under ``"case"``, the generation entropies with ``diagnostics``). Cases whose
    line is already there are not edited again: a killed run continues with the first missing
    case, and a case is never counted twice. ``tick(i)`` follows each new line.

    Returns:
        The records of all cases, in case order.
    """
    records = {rec["index"]: rec for rec in read_jsonl(edits, repair=True)}
    for i, request in enumerate(cases):
        if i in records:
            continue
        s.restore()
        before = s.neighbours(request)
        with s.editor.tentative(request) as result:
            rec = _edit_record(i, request, result)
            probs = s.probs(request)
            rec["case"] = probs.to_json()
            for suffix, other in s.more_probs(request).items():
                rec["case" + suffix] = other.to_json()
            rec["leak"] = s.leak(request, result, before, probs.neighborhood)
            if diagnostics:
                rec.update(dataclasses.asdict(s.diagnostics(request, seed + i)))
        fsync_append(edits, rec)
        records[i] = rec
        if tick is not None:
            tick(i)
    return [records[i] for i in range(len(cases))]


def _single(
    s: Session, cfg: RunConfig, method: str, cases: Sequence[EditRequest], variant: Variant, tick: Progress
) -> None:
    edit_one_at_a_time(
        s,
        cases,
        variant.edits,
        diagnostics=cfg.entropies_after_each_edit,
        seed=cfg.seed,
        tick=lambda i: tick(method, i + 1, len(cases)),
    )


def _save_factors(
    path: Path, u: np.ndarray, r: np.ndarray, k: np.ndarray | None = None, k_other: np.ndarray | None = None
) -> None:
    from safetensors.numpy import save

    # Written through our own handle, not safetensors' save_file, which creates files readable
    # by their owner alone: a results folder is meant to be shared.
    tensors = {"u": np.ascontiguousarray(u, np.float32), "r": np.ascontiguousarray(r, np.float32)}
    if k is not None:
        tensors["k"] = np.ascontiguousarray(k, np.float64)  # the retained key, as the editor holds it
    if k_other is not None:
        tensors["k_other"] = np.ascontiguousarray(k_other, np.float64)  # retain_both_keys: the edit's other key
    atomic_write(path, save(tensors))


def replay_edits(editor: Editor, variant: Variant, records: Sequence[dict[str, Any]], *, retain: bool = False) -> None:
    """Adds the stored updates of ``records`` (lines of a sequential variant's edits, refused
    ones skipped) to ``editor``'s in-memory model in order: the same weights, bit for bit, as
    the run had after them. ``retain``: each file must hold the edit's key to retain."""
    for rec in records:
        if "refused" in rec:
            continue
        path = variant.factors(int(rec["index"]))
        u, r, k, k_other = load_factors(path)
        if retain and k is None:
            raise RromeError(f"{path}: holds no key (k) to retain; the run was started without retain_edit_keys")
        # No k_other under retain_both_keys: the edit had one key (k_e = k_e^o) and retained it
        # alone (a run started without the option is refused before this, by its hparams).
        editor.replay(u, r, k, k_other)


def run_settings(folder: Path) -> dict[str, Any]:
    """The ``run.json`` of the run that a variant ``folder`` (…/sequential-rome) belongs to, as
    recorded (``{}`` for a folder written before runs recorded one)."""
    run_file = Variant.of(folder).run_dir / RUN_FILE
    return read_object(run_file) if run_file.exists() else {}


def rebuild_along(
    folder: Path,
    model_dir: str | os.PathLike[str],
    counts: Sequence[int],
    *,
    device: str = "cpu",
    settings: Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, dict[str, Any] | None, Editor]]:
    """The model of a sequential run's variant ``folder`` (…/sequential-rome) after each number
    of edits in ``counts`` (ascending; 0: unedited), rebuilt from ``model_dir`` and the folder's
    factors as a resumed run rebuilds it (in the run's dtype, the editor with the run's resolved
    hyperparameters). ``settings``: the run's :func:`run_settings`, when the caller has read them
    already. Yields (count, the count-th edit's record or None, an editor whose in-memory model
    holds those edits); the editor is the same object each time."""
    variant = Variant.of(folder)
    records = read_jsonl(variant.edits)
    if list(counts) != sorted(set(counts)) or (counts and (counts[0] < 0 or counts[-1] > len(records))):
        raise RromeError(f"{folder}: holds {len(records)} edits; asked for {list(counts)} (ascending, distinct)")
    base = read_object(variant.run_dir / BASELINE_FILE)
    dtype = (run_settings(folder) if settings is None else settings).get("dtype") or RunConfig.dtype
    hparams = recorded_hparams(variant.run_dir)
    editor = Editor.from_pretrained(
        model_dir, layer=int(base["layer"]), hparams=hparams, dtype=dtype, device=device, progress=False
    )
    done = 0
    for n in counts:
        replay_edits(editor, variant, records[done:n])
        done = n
        yield n, (records[n - 1] if n else None), editor


def load_factors(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One edit's saved factors (``deltas/NNNNN.safetensors`` of a sequential variant): u, r and,
    with ``retain_edit_keys``, the key it retained (k_den, float64), with ``retain_both_keys``
    also its other key (``None`` where the run did not retain them)."""
    from safetensors.numpy import load

    t = load(read_regular(path))  # never blocks on a FIFO, unlike load_file
    return t["u"], t["r"], t.get("k"), t.get("k_other")


def _checkpoint(
    s: Session, cfg: RunConfig, cases: Sequence[EditRequest], n_done: int, norms: list[float]
) -> dict[str, Any]:
    probs = [s.probs(r) for r in cases[:n_done]]
    more = [s.more_probs(r) for r in cases[:n_done]]
    diag = s.diagnostics(None, cfg.seed) if cfg.diagnostics else None
    extra = {"metrics" + k: metrics(m[k] for m in more) for k in (more[0] if more else {})}
    return {
        "edits": n_done,
        "metrics": metrics(probs),
        **extra,
        "downstream": s.downstream(),
        "median_norm_delta": float(np.median(norms)) if norms else None,
        "max_norm_delta": max(norms) if norms else None,
        **(dataclasses.asdict(diag) if diag else {}),
    }


def _sequential(
    s: Session, cfg: RunConfig, method: str, cases: Sequence[EditRequest], variant: Variant, tick: Progress
) -> None:
    edits_path, checks_path = variant.edits, variant.checkpoints
    real_dir(variant.deltas)
    records = read_jsonl(edits_path, repair=True)
    checks = {c["edits"] for c in read_jsonl(checks_path, repair=True)}
    s.restore()
    retain = s.editor.hparams.retain_edit_keys
    replay_edits(s.editor, variant, records, retain=retain)
    norms = [float(rec["norm_delta"]) for rec in records if "refused" not in rec]

    def checkpoint_if_due(n_done: int) -> None:
        if (n_done == len(cases) or (n_done > 0 and n_done % cfg.every == 0)) and n_done not in checks:
            fsync_append(checks_path, _checkpoint(s, cfg, cases, n_done, norms))
            checks.add(n_done)

    checkpoint_if_due(len(records))  # a run killed after an edit but before its checkpoint
    for i in range(len(records), len(cases)):
        request = cases[i]
        n_done = i + 1
        before = s.neighbours(request)
        n_kept = len(s.editor.retained_keys) if retain else 0
        try:
            result = s.editor.edit(request, queue=False)
        except (DisablingEditError, LargeUpdateError) as e:  # only with cfg.guard: the model is unchanged
            refused = {**_case_fields(i, request), "refused": type(e).__name__, "message": str(e)}
            if isinstance(e, DisablingEditError):
                refused["screen_ratio"] = e.ratio
            fsync_append(edits_path, refused)
        else:
            rec = _edit_record(i, request, result)
            rec["leak"] = s.leak(request, result, before, s.neighbours(request))
            if cfg.entropies_after_each_edit:
                rec.update(dataclasses.asdict(s.diagnostics(request, cfg.seed + i)))
            added = s.editor.retained_keys[n_kept:] if retain else []  # k_den, then with retain_both_keys the other
            _save_factors(variant.factors(i), result.delta.u, result.delta.r, *added)
            fsync_append(edits_path, rec)
            norms.append(result.norm_delta)
        checkpoint_if_due(n_done)
        tick(method, n_done, len(cases))
    final = variant.final
    if not final.exists():
        last: dict[str, Any] = {"cases": [s.probs(r).to_json() for r in cases]}
        more = [s.more_probs(r) for r in cases]
        for suffix in more[0] if more else {}:
            last["cases" + suffix] = [m[suffix].to_json() for m in more]
        write_json(final, last)
    s.restore()


def run(cfg: RunConfig, out_dir: str | os.PathLike[str], *, progress: bool = True) -> Path:
    """Runs (or resumes) an evaluation and returns its results folder.

    Raises:
        RromeError: bad data, or a results folder made with other settings.
    """
    for m in cfg.methods:
        if m not in METHODS:
            raise RromeError(f"unknown method {m!r}; expected one of {', '.join(METHODS)}")
    if cfg.every < 1:
        raise RromeError(f"--every must be at least 1, got {cfg.every}")
    cfg.check_prompts()
    if cfg.guard and not cfg.sequential:
        raise RromeError(
            "--guard applies to --sequential runs (one at a time, every edit starts from the unedited model)"
        )
    out = Path(out_dir)
    cases = load_cases(cfg)
    _check_config(out, cfg)
    torch.manual_seed(cfg.seed)
    s = Session(cfg, progress)
    _check_hparams(out, s.editor.hparams)
    _record_config(out, cfg)
    baseline(s, cfg, cases, out)

    bar = RunProgress(len(cases) * len(cfg.methods), cfg.mode, enabled=progress)
    for method in cfg.methods:
        s.edit_with(method)
        bar.start(method)
        variant = Variant(out, cfg.mode, method)
        real_dir(variant.folder)
        if cfg.sequential:
            _sequential(s, cfg, method, cases, variant, bar.tick)
        else:
            _single(s, cfg, method, cases, variant, bar.tick)
        bar.finish(method, len(cases))
    bar.close()
    return out

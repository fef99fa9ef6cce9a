"""Tables and plots from a results folder (see :mod:`rrome.eval.runs`), rebuilt from the saved files
alone, without torch (:mod:`rrome.eval.results`).

:func:`summarize` gathers per-variant metrics, |Δ| statistics, the disabling edits and the
neighbour leak; :func:`markdown_table` prints them like the paper's Tables 1 and 2; :func:`plot`
draws the paper's figures with matplotlib (headless): |Δ| against edit index, normalised entropy
against |Δ| (Figure 2), for sequential runs downstream accuracy and metrics against the number
of edits (Figures 3 and 4), and the neighbourhood prompts' failures against their leak fraction s.

A **large edit** is one whose |Δ| is more than ``flag_ratio`` times the median |Δ| of its
variant's run; a **disabling edit** is a large edit whose generation entropy right after the edit
also fell below ``flag_entropy`` times the unedited model's (without recorded entropies, every
large edit). Both are counted: on some models a disabling update leaves the sampled entropy
almost where it was while greedy text and downstream accuracy break (SmolLM2, docs/results.md).

The **neighbour leak** (``"leak"`` in each edit's line, :mod:`rrome.eval.runs`): a neighbourhood
prompt receives the fraction s = uᵀk_n / uᵀk_den of the edit's own change of the module output.
A prompt the edit *broke* kept its true answer right before the edit (P(true) > P(new)) and lost
it right after; :func:`leak_summary` counts them in bins of |s| (:data:`LEAK_BINS`) among the
prompts that held before.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rrome.eval.metrics import METRICS, CaseProbs, metrics
from rrome.eval.results import (
    ANY,
    BASELINE_FILE,
    BOOLEAN,
    COUNT,
    NUMBER,
    PAIR,
    RUN_FILE,
    SUMMARY_FILE,
    TABLE_FILE,
    TEXT,
    ListOf,
    MapOf,
    Optional,
    Variant,
    check,
    read_checked,
    read_jsonl,
    where,
)
from rrome.eval.results import mode as run_mode
from rrome.eval.results import variants as find_variants
from rrome.files.constants import METHODS
from rrome.files.errors import InvalidFileError, RromeError
from rrome.files.fsutil import atomic_write

FLAG_RATIO = 10.0
FLAG_ENTROPY = 0.5
LEAK_BINS = (0.0, 0.05, 0.1, 0.2, 0.4, math.inf)
"""Edges of the |s| bins of the neighbour-leak summary."""

# The fields the report reads from each file of a results folder, checked before any is used
# (rrome.eval.results.check): a hand-edited or damaged folder is a one-line error naming the
# file, the line and the field.
_METRICS = {k: NUMBER for k in METRICS}
_RUN = {"sequential": BOOLEAN, "n": COUNT, "data": TEXT, "offset": COUNT, "command": Optional(ANY)}
_BASELINE = {
    "metrics": _METRICS,
    "downstream": Optional(MapOf(NUMBER)),
    "diagnostics": Optional({"generation_entropy": Optional(NUMBER)}),
}
_CASE = {"rewrite": ListOf(PAIR), "paraphrase": ListOf(PAIR), "neighborhood": ListOf(PAIR)}
_LEAK = {
    "s": ListOf(NUMBER),
    "s_last": ListOf(NUMBER),
    "dlogp_true": ListOf(NUMBER),
    "before": ListOf(PAIR),
    "after": ListOf(PAIR),
}
_EDIT = {
    "index": COUNT,
    "case_id": ANY,
    "subject": ANY,
    "norm_delta": NUMBER,
    "steps": NUMBER,
    "seconds": NUMBER,
    "generation_entropy": Optional(NUMBER, null=False),
    "leak": Optional(_LEAK),
}
_REFUSED = {"index": COUNT, "case_id": ANY, "subject": ANY, "refused": ANY, "screen_ratio": Optional(NUMBER)}
_FINAL = {"cases": ListOf(_CASE)}
_CHECKPOINT = {"edits": COUNT, "metrics": _METRICS, "downstream": Optional(MapOf(NUMBER))}


def _styles(cfg: dict[str, Any], where: str) -> list[str]:
    """The run's measuring styles (``eval_prompts``; plain for a folder older than the field)."""
    styles = cfg.get("eval_prompts", ["plain"])
    if not (isinstance(styles, list) and styles and all(x in ("plain", "chat") for x in styles)):
        raise InvalidFileError(f'{where}: field "eval_prompts": expected a list of "plain" and "chat"')
    if not isinstance(cfg.get("edit_prompts", "plain"), str):
        raise InvalidFileError(f'{where}: field "edit_prompts": expected "plain" or "chat"')
    return styles


def _load(path: Path, spec: Any) -> Any:
    try:
        return read_checked(path, spec)
    except FileNotFoundError:
        raise RromeError(f"{path}: missing; is {path.parent} an `rrome eval` results folder?") from None


def _edits(variant: Variant, more: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The lines of a variant's edits, each checked (an edit's or a refusal's fields; ``more``:
    the further measuring styles, whose ``case_<style>`` a one-at-a-time line holds)."""
    mode = variant.mode
    records = read_jsonl(variant.edits)
    cases = {"case": _CASE, **{f"case_{x}": _CASE for x in more}}
    for rec in records:
        if "refused" in rec:
            check(rec, _REFUSED, where(rec))
            continue
        check(rec, {**_EDIT, **cases} if mode == "single" else _EDIT, where(rec))
        leak = rec.get("leak")
        if leak and any(len(leak[k]) != len(leak["s"]) for k in _LEAK):
            raise InvalidFileError(f'{where(rec)}: field "leak": its arrays differ in length')
    return records


def _checkpoints(variant: Variant, tasks: list[str]) -> list[dict[str, Any]]:
    """The lines of a sequential variant's checkpoints, each checked; each needs the accuracy
    of every downstream task of the baseline."""
    checks = read_jsonl(variant.checkpoints)
    for c in checks:
        check(c, _CHECKPOINT, where(c))
        missing = [t for t in tasks if t not in (c.get("downstream") or {})]
        if missing:
            raise InvalidFileError(f'{where(c)}: field "downstream.{missing[0]}": missing (baseline.json has it)')
    return checks


def summarize(
    results_dir: str | Path, *, flag_ratio: float = FLAG_RATIO, flag_entropy: float = FLAG_ENTROPY
) -> dict[str, Any]:
    """The run's figures per variant, from its files (methods not yet started are left out)."""
    return _read(Path(results_dir), flag_ratio=flag_ratio, flag_entropy=flag_entropy)[0]


def _read(
    out_dir: Path, *, flag_ratio: float, flag_entropy: float
) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """:func:`summarize`, and each variant's edits (refusals left out), read once for the plots."""
    cfg = _load(out_dir / RUN_FILE, ANY)
    if isinstance(cfg, dict) and cfg.get("command") == "tune":
        raise RromeError(
            f"{out_dir} is an `rrome tune` folder: its table is {out_dir / TABLE_FILE} (rerunning the same "
            "`rrome tune` command prints it)"
        )
    check(cfg, _RUN, str(out_dir / RUN_FILE))
    styles = _styles(cfg, str(out_dir / RUN_FILE))
    base = _load(out_dir / BASELINE_FILE, {**_BASELINE, **{f"metrics_{x}": _METRICS for x in styles[1:]}})
    mode = run_mode(cfg["sequential"])
    base_entropy = (base.get("diagnostics") or {}).get("generation_entropy")
    variants: dict[str, Any] = {}
    per_variant: dict[str, list[dict[str, Any]]] = {}
    # Variants are found by their folders: parallel processes may each have added one.
    for variant in find_variants(out_dir, mode, METHODS):
        records = _edits(variant, _styles(cfg, RUN_FILE)[1:])
        v = _variant(
            variant,
            records,
            cfg,
            tasks=list(base.get("downstream") or {}),
            base_entropy=base_entropy,
            flag_ratio=flag_ratio,
            flag_entropy=flag_entropy,
        )
        if v is not None:
            variants[variant.method] = v
            per_variant[variant.method] = [e for e in records if "refused" not in e]
    summary = {
        "mode": mode,
        "config": cfg,
        "prompts": {"edit": cfg.get("edit_prompts", "plain"), "eval": styles},
        "unedited": {
            **{f"metrics_{x}": base[f"metrics_{x}"] for x in styles[1:]},
            "metrics": base["metrics"],
            "downstream": base.get("downstream") or {},
            "diagnostics": base.get("diagnostics"),
        },
        "layer": base.get("layer"),
        "module": base.get("module"),
        "flag_ratio": flag_ratio,
        "flag_entropy": flag_entropy,
        "variants": variants,
    }
    return summary, per_variant


def _variant(
    variant: Variant,
    records: list[dict[str, Any]],
    cfg: dict[str, Any],
    *,
    tasks: list[str],
    base_entropy: float | None,
    flag_ratio: float,
    flag_entropy: float,
) -> dict[str, Any] | None:
    """One variant's figures from its folder and its checked edits; ``None`` before its first edit."""
    mode = variant.mode
    more = _styles(cfg, RUN_FILE)[1:]
    # A guarded sequential run records the edits its guards refused, with no update.
    refused = [e for e in records if "refused" in e]
    edits = [e for e in records if "refused" not in e]
    if not edits:
        return None
    others: dict[str, list[CaseProbs]] = {}
    if mode == "single":
        cases = [CaseProbs.from_json(e["case"]) for e in edits]
        others = {x: [CaseProbs.from_json(e[f"case_{x}"]) for e in edits] for x in more}
        complete = len(edits) == cfg["n"]
    else:
        final = variant.final
        complete = final.exists()
        spec = {**_FINAL, **{f"cases_{x}": ListOf(_CASE) for x in more}}
        last = _load(final, spec) if complete else {}
        cases = [CaseProbs.from_json(c) for c in last["cases"]] if complete else []
        others = {x: [CaseProbs.from_json(c) for c in last[f"cases_{x}"]] for x in more} if complete else {}
    checks = _checkpoints(variant, tasks) if mode == "sequential" else []
    metrics_at = len(records) if complete else None
    if mode == "sequential" and not complete and checks:
        # An unfinished sequential run: the last checkpoint's metrics over the edits made by then.
        metrics_at = checks[-1]["edits"]
    norms = [float(e["norm_delta"]) for e in edits]
    median = statistics.median(norms)
    large = _large_edits(edits, median, flag_ratio)
    v: dict[str, Any] = {
        "edits": len(records),
        "refused": [{k: e.get(k) for k in ("index", "case_id", "subject", "refused", "screen_ratio")} for e in refused],
        "complete": complete,
        "metrics": metrics(cases) if cases else (checks[-1]["metrics"] if checks else None),
        "metrics_at_edits": metrics_at,
        "norm_delta": {"median": median, "mean": statistics.fmean(norms), "max": max(norms), "min": min(norms)},
        "large_edits": large,
        "disabling_edits": _disabling(large, base_entropy, flag_entropy),
        "steps_mean": statistics.fmean(e["steps"] for e in edits),
        "seconds_mean": statistics.fmean(e["seconds"] for e in edits),
    }
    for x in more:
        at_check = (checks[-1].get(f"metrics_{x}") if checks else None) if mode == "sequential" else None
        v[f"metrics_{x}"] = metrics(others[x]) if others.get(x) else at_check
    ents = [e["generation_entropy"] for e in edits if "generation_entropy" in e]
    if ents:
        v["generation_entropy_mean"] = statistics.fmean(ents)
    leak = leak_summary(edits)
    if leak is not None:
        v["leak"] = leak
    if mode == "sequential":
        v["checkpoints"] = checks
        v["checkpoint_seconds"] = _seconds_between(checks, edits)
        if checks:
            v["downstream_final"] = checks[-1].get("downstream", {})
    return v


def _seconds_between(checks: list[dict[str, Any]], edits: list[dict[str, Any]]) -> list[float | None]:
    """Per checkpoint, the mean wall time of the edits made since the one before (the edits'
    own ``seconds``: the checkpoints' measurements are not in it); ``None`` where none was made."""
    out: list[float | None] = []
    lo = 0
    for c in checks:
        between = [float(e["seconds"]) for e in edits if lo <= e["index"] < c["edits"]]
        out.append(statistics.fmean(between) if between else None)
        lo = c["edits"]
    return out


CHECKPOINT_ROWS = 10
"""At most this many checkpoints per variant in the table (evenly spaced, the last always)."""


def _checkpoint_lines(summary: dict[str, Any]) -> list[str]:
    """A sequential run's checkpoints as a table: the metrics over all edits so far, the mean
    downstream accuracy, |Δ| over the edits so far, the generation entropy and seconds per edit."""
    rows = {name: v for name, v in summary["variants"].items() if v.get("checkpoints")}
    if not rows:
        return []
    base = summary["unedited"]
    tasks = list(base["downstream"])
    base_entropy = (base["diagnostics"] or {}).get("generation_entropy")

    def glue(d: dict[str, float] | None) -> str:
        vals = [d[t] for t in tasks if d and t in d]
        return _fmt(statistics.fmean(vals), ".1f") if vals and len(vals) == len(tasks) else "–"

    lines = [
        "",
        "Checkpoints: metrics over all the edits made so far; GLUE, the mean few-shot accuracy (%) over "
        + (", ".join(tasks) if tasks else "no tasks")
        + "; abs Δ over the edits so far; entropy, the generation entropy at the checkpoint; s/edit, the mean"
        " time of the edits since the previous checkpoint (the measurements not counted):",
        "",
        "| variant | edits | " + " | ".join(METRICS[:4]) + " | GLUE | median abs Δ | max / median | entropy | s/edit |",
        "|---" * 11 + "|",
        "| unedited | 0 | "
        + " | ".join(_fmt(base["metrics"][k]) for k in METRICS[:4])
        + f" | {glue(base['downstream'])} | – | – | {_fmt(base_entropy, '.3f')} | – |",
    ]
    for name, v in rows.items():
        checks, secs = v["checkpoints"], v["checkpoint_seconds"]
        stride = max(1, math.ceil(len(checks) / CHECKPOINT_ROWS))
        keep = sorted({*range(len(checks) - 1, -1, -stride)})
        for i in keep:
            c = checks[i]
            med, top = c.get("median_norm_delta"), c.get("max_norm_delta")
            ratio = top / med if med and top is not None else None
            lines.append(
                f"| {name} | {c['edits']} | "
                + " | ".join(_fmt(c["metrics"].get(k)) for k in METRICS[:4])
                + f" | {glue(c.get('downstream'))} | {_fmt(med, '.3g')} | {_fmt(ratio, '.1f')}"
                + f" | {_fmt(c.get('generation_entropy'), '.3f')} | {_fmt(secs[i], '.1f')} |"
            )
    return lines


def _large_edits(edits: list[dict[str, Any]], median: float, flag_ratio: float) -> list[dict[str, Any]]:
    """The edits whose |Δ| is above ``flag_ratio`` times the run's median."""
    return [
        {
            "index": e["index"],
            "case_id": e["case_id"],
            "subject": e["subject"],
            "norm_delta": e["norm_delta"],
            "ratio_to_median": e["norm_delta"] / median if median else math.inf,
            "generation_entropy": e.get("generation_entropy"),
        }
        for e in edits
        if e["norm_delta"] > flag_ratio * median
    ]


def _disabling(large: list[dict[str, Any]], base_entropy: float | None, flag_entropy: float) -> list[dict[str, Any]]:
    """The large edits after which the generation entropy collapsed (see the module's docstring)."""
    return [
        f
        for f in large
        if f["generation_entropy"] is None
        or base_entropy is None
        or f["generation_entropy"] < flag_entropy * base_entropy
    ]


def _leak_points(edits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One point per neighbourhood prompt of the edits that recorded a leak."""
    points = []
    for e in edits:
        leak = e.get("leak")
        if not leak:
            continue
        for j, s in enumerate(leak["s"]):
            (new0, true0), (new1, true1) = leak["before"][j], leak["after"][j]
            held = true0 > new0
            points.append(
                {
                    "index": e["index"],
                    "s": s,
                    "s_last": leak["s_last"][j],
                    "dlogp_true": leak["dlogp_true"][j],
                    "held": held,
                    "broken": held and not true1 > new1,
                }
            )
    return points


def leak_summary(edits: list[dict[str, Any]], bins: tuple[float, ...] = LEAK_BINS) -> dict[str, Any] | None:
    """The neighbourhood prompts of a variant's edits in bins of |s|: how many, how many kept
    their answer before the edit (``held``), how many of those the edit broke, the share broken
    (percent of ``held``) and the median shift of log P(true). None without recorded leaks."""
    points = _leak_points(edits)
    if not points:
        return None
    rows = []
    for lo, hi in itertools.pairwise(bins):
        inside = [p for p in points if lo <= abs(p["s"]) < hi]
        held = [p for p in inside if p["held"]]
        broken = sum(p["broken"] for p in held)
        rows.append(
            {
                "lo": lo,
                "hi": hi,
                "prompts": len(inside),
                "held": len(held),
                "broken": broken,
                "broken_pct": 100 * broken / len(held) if held else None,
                "dlogp_true_median": statistics.median(p["dlogp_true"] for p in inside) if inside else None,
            }
        )
    held_all = [p for p in points if p["held"]]
    broken_all = sum(p["broken"] for p in held_all)
    return {
        "bins": rows,
        "prompts": len(points),
        "held": len(held_all),
        "broken": broken_all,
        "broken_pct": 100 * broken_all / len(held_all) if held_all else None,
        "abs_s_median": statistics.median(abs(p["s"]) for p in points),
    }


def _bin_label(lo: float, hi: float) -> str:
    return f"≥ {lo:g}" if math.isinf(hi) else f"{lo:g}–{hi:g}"


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def markdown_table(summary: dict[str, Any]) -> str:
    """The variants side by side (percent), with the unedited model as the first row."""
    mode = "sequential" if summary["mode"] == "sequential" else "one edit at a time (non-sequential)"
    cfg = summary["config"]
    prompts = summary.get("prompts") or {"edit": "plain", "eval": ["plain"]}
    styles = prompts["eval"]
    note = ""
    if prompts["edit"] != "plain" or styles != ["plain"]:
        note = f"; edits on {prompts['edit']} prompts, measured on {styles[0]} prompts"
    lines = [
        f"{cfg['n']} cases from `{Path(cfg['data']).name}` (records {cfg['offset'] + 1}–{cfg['offset'] + cfg['n']}), "
        f"{mode}, layer {summary['layer']}{note}",
        "",
        "| variant | " + " | ".join(METRICS) + " | median abs Δ | max abs Δ"
        f" | abs Δ > {summary['flag_ratio']:g}× median | disabling edits |",
        "|---" * (len(METRICS) + 5) + "|",
    ]
    lines.append(
        "| unedited | " + " | ".join(_fmt(summary["unedited"]["metrics"][k]) for k in METRICS) + " | – | – | – | – |"
    )
    for name, v in summary["variants"].items():
        m = v["metrics"] or {}
        partial = ""
        if not v["complete"]:
            at = v.get("metrics_at_edits")
            partial = f" ({v['edits']}/{cfg['n']} edits" + (f"; metrics over the first {at})" if at else ")")
        lines.append(
            f"| {name}{partial} | "
            + " | ".join(_fmt(m.get(k)) for k in METRICS)
            + f" | {_fmt(v['norm_delta']['median'], '.3g')} | {_fmt(v['norm_delta']['max'], '.3g')}"
            + f" | {len(v['large_edits'])} | {len(v['disabling_edits'])} |"
        )
    for x in styles[1:]:
        lines += ["", f"The same edits measured on {x} prompts:", ""]
        lines += ["| variant | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
        lines.append("| unedited | " + " | ".join(_fmt(summary["unedited"][f"metrics_{x}"][k]) for k in METRICS) + " |")
        for name, v in summary["variants"].items():
            m = v.get(f"metrics_{x}") or {}
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in METRICS) + " |")
    down = {k: v.get("downstream_final") for k, v in summary["variants"].items() if v.get("downstream_final")}
    if summary["unedited"]["downstream"] and down:
        tasks = list(summary["unedited"]["downstream"])
        lines += ["", "Downstream few-shot accuracy (%) after the last edit:", ""]
        lines += ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        lines.append(
            "| unedited | " + " | ".join(_fmt(summary["unedited"]["downstream"][t], ".1f") for t in tasks) + " |"
        )
        for name, d in down.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(d.get(t), ".1f") for t in tasks) + " |")
    lines += _checkpoint_lines(summary)
    lines += _guard_lines(summary)
    leaks = {name: v["leak"] for name, v in summary["variants"].items() if v.get("leak")}
    if leaks:
        lines += _leak_lines(leaks)
    return "\n".join(lines) + "\n"


def _guard_lines(summary: dict[str, Any]) -> list[str]:
    """The table's notes on the large and disabling edits and the edits the guards refused."""
    lines: list[str] = []
    large = [(name, f) for name, v in summary["variants"].items() for f in v["large_edits"]]
    if large:
        base = (summary["unedited"]["diagnostics"] or {}).get("generation_entropy")
        lines += [
            "",
            f"Edits (counted from 1) with abs Δ above {summary['flag_ratio']:g}× the run's median"
            f" (disabling: the generation entropy after it also below {summary['flag_entropy']:g}× the unedited model's"
            + (f", {base:.3f}" if base is not None else "")
            + "):",
            "",
        ]
        for name, f in large:
            disabling = any(f["index"] == d["index"] for d in summary["variants"][name]["disabling_edits"])
            lines.append(
                f"- {name}: edit {f['index'] + 1} (case {f['case_id']}, {f['subject']}): abs Δ {f['norm_delta']:.3g}"
                f" = {f['ratio_to_median']:.0f}× median, entropy {_fmt(f['generation_entropy'], '.3f')}"
                + (", disabling" if disabling else "")
            )
    refused = [(name, r) for name, v in summary["variants"].items() for r in v.get("refused", [])]
    if refused:
        lines += ["", "Edits the guards refused (counted from 1; `--guard`; the model was left unchanged):", ""]
        for name, r in refused:
            rho = f", rho {r['screen_ratio']:.3g}" if r.get("screen_ratio") is not None else ""
            lines.append(f"- {name}: edit {r['index'] + 1} (case {r['case_id']}, {r['subject']}): {r['refused']}{rho}")
    return lines


def _leak_cell(b: dict[str, Any]) -> str:
    if not b["prompts"]:
        return "–"
    rate = f" ({_fmt(b['broken_pct'], '.0f')}%)" if b["held"] else ""
    return f"{b['broken']}/{b['held']}{rate}, {_fmt(b['dlogp_true_median'], '+.2f')}"


def _leak_lines(leaks: dict[str, Any]) -> list[str]:
    """The table of the neighbour leak by |s| bin, one column per variant."""
    names = list(leaks)
    lines = [
        "",
        "Neighbour leak: neighbourhood prompts by |s|, s = uᵀk_n / uᵀk_den (k_den = k_e under r-rome) at the "
        "prompt's token of largest |s|: the fraction of the edit's change of the module output that the "
        "prompt receives there. Cells: broken by the edit / kept their answer right before it (percent), "
        "median shift of log P(true) in nats per token:",
        "",
        "| abs s | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for i, first in enumerate(leaks[names[0]]["bins"]):
        label = _bin_label(first["lo"], first["hi"])
        lines.append(f"| {label} | " + " | ".join(_leak_cell(leaks[n]["bins"][i]) for n in names) + " |")
    total = [f"{leaks[n]['broken']}/{leaks[n]['held']} ({_fmt(leaks[n]['broken_pct'], '.0f')}%)" for n in names]
    lines.append("| all | " + " | ".join(total) + " |")
    return lines


def plot(
    results_dir: str | Path,
    summary: dict[str, Any] | None = None,
    per_variant: dict[str, list[dict[str, Any]]] | None = None,
) -> list[Path]:
    """Writes the run's figures as PNG files into the results folder and returns their paths
    (``summary`` and ``per_variant``, each variant's edits: as :func:`report` read them; read
    again when not given)."""
    import matplotlib

    matplotlib.use("Agg")

    out_dir = Path(results_dir)
    if summary is None or per_variant is None:
        summary, per_variant = _read(out_dir, flag_ratio=FLAG_RATIO, flag_entropy=FLAG_ENTROPY)
    mode = summary["mode"]
    paths = [_plot_norms(per_variant, mode, out_dir)]
    if any("generation_entropy" in e for edits in per_variant.values() for e in edits):
        paths.append(_plot_entropy(per_variant, summary, out_dir))
    if mode == "sequential":
        paths += _plot_sequential(summary, out_dir)
    leaks = {m: v["leak"] for m, v in summary["variants"].items() if v.get("leak")}
    if leaks:
        paths.append(_plot_leak(leaks, per_variant, out_dir / f"leak-{mode}.png"))
    return paths


def _plot_norms(per_variant: dict[str, list[dict[str, Any]]], mode: str, out_dir: Path) -> Path:
    """|Δ| against edit index."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, edits in per_variant.items():
        ax.plot(
            [e["index"] for e in edits],
            [e["norm_delta"] for e in edits],
            ".-" if mode == "sequential" else ".",
            label=m,
            ms=4,
            lw=0.8,
        )
    ax.set_yscale("log")
    ax.set_xlabel("edit index" if mode == "sequential" else "case")
    ax.set_ylabel("|Δ| = ‖Δ‖_F / (d_out·d_in)")
    ax.set_title(f"Update norm per edit ({mode})")
    ax.legend()
    return _save(fig, out_dir / f"norm_delta-{mode}.png")


def _plot_entropy(per_variant: dict[str, list[dict[str, Any]]], summary: dict[str, Any], out_dir: Path) -> Path:
    """Normalised generation entropy against |Δ| (the paper's Figure 2)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, edits in per_variant.items():
        pts = [(e["norm_delta"], e["generation_entropy"]) for e in edits if "generation_entropy" in e]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, label=m, alpha=0.7)
    base = (summary["unedited"].get("diagnostics") or {}).get("generation_entropy")
    if base is not None:
        ax.axhline(base, color="grey", lw=0.8, ls="--", label="unedited")
    ax.set_xscale("log")
    ax.set_xlabel("|Δ|")
    ax.set_ylabel("normalised generation entropy")
    ax.set_title("Entropy after the edit against its update norm")
    ax.legend()
    return _save(fig, out_dir / f"entropy_vs_norm-{summary['mode']}.png")


def _plot_sequential(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Downstream accuracy and the metrics against the number of edits (Figures 3 and 4)."""
    import matplotlib.pyplot as plt

    paths = []
    checks = {m: v.get("checkpoints", []) for m, v in summary["variants"].items()}
    base = summary["unedited"]
    tasks = list(base["downstream"])
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
        for ax, t in zip(axes[0], tasks, strict=True):
            for m, cs in checks.items():
                ax.plot(
                    [0] + [c["edits"] for c in cs],
                    [base["downstream"][t]] + [c["downstream"][t] for c in cs],
                    "o-",
                    ms=3,
                    label=m,
                )
            ax.set_title(t.upper())
            ax.set_xlabel("edits")
            ax.set_ylim(0, 100)
        axes[0][0].set_ylabel("accuracy (%)")
        axes[0][-1].legend()
        paths.append(_save(fig, out_dir / "downstream-sequential.png"))
    names = ("ES", "PS", "NS", "Score")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, k in zip(axes[0], names, strict=True):
        for m, cs in checks.items():
            ax.plot([c["edits"] for c in cs], [c["metrics"][k] for c in cs], "o-", ms=3, label=m)
        ax.set_title(k)
        ax.set_xlabel("edits")
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("percent (edits so far)")
    axes[0][-1].legend()
    paths.append(_save(fig, out_dir / "metrics-sequential.png"))
    return paths


def _plot_leak(leaks: dict[str, Any], per_variant: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """The neighbourhood prompts' answer shift against their leak fraction s, and the share
    broken by |s| bin."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = [_bin_label(lo, hi) for lo, hi in itertools.pairwise(LEAK_BINS)]
    for i, m in enumerate(leaks):
        color = colors[i % len(colors)]
        points = _leak_points(per_variant[m])
        kept = [p for p in points if not p["broken"]]
        broken = [p for p in points if p["broken"]]
        left.scatter([p["s"] for p in kept], [p["dlogp_true"] for p in kept], s=8, alpha=0.4, color=color)
        left.scatter(
            [p["s"] for p in broken],
            [p["dlogp_true"] for p in broken],
            s=22,
            marker="x",
            color=color,
            label=f"{m}: broken by the edit (x)",
        )
        rates = [math.nan if b["broken_pct"] is None else b["broken_pct"] for b in leaks[m]["bins"]]
        right.plot(range(len(rates)), rates, "o-", ms=4, color=color, label=m)
    right.set_xticks(range(len(labels)), labels)
    left.axhline(0, color="grey", lw=0.6)
    left.axvline(0, color="grey", lw=0.6)
    left.set_xlabel("s = uᵀk_n / uᵀk_den (token of largest |s|)")
    left.set_ylabel("Δ log P(true) of the neighbour (nats/token)")
    left.set_title("Neighbourhood prompts: leak fraction and answer shift")
    left.legend(fontsize=8)
    right.set_xlabel("|s|")
    right.set_ylabel("broken by the edit (% of those that held)")
    right.set_ylim(0, 100)
    right.set_title("NS failures caused by the edit, by |s|")
    right.legend()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    """Renders ``fig`` as PNG and writes it by rename (never through a link at ``path``)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())
    return path


def report(
    results_dir: str | Path, *, flag_ratio: float = FLAG_RATIO, flag_entropy: float = FLAG_ENTROPY
) -> tuple[str, list[Path]]:
    """Writes summary.json, table.md and the PNG figures; returns the table and the figure paths.

    Every file is written by rename (:func:`rrome.files.fsutil.atomic_write`): a link of that
    name in the folder is replaced, and the file it pointed to is left as it was.

    Raises:
        RromeError: not an ``rrome eval`` results folder (or a sweep's).
        InvalidFileError: a file of the folder is not a regular file, not UTF-8, not JSON Python
            can hold, or lacks a field the report reads or holds it with another type; the
            message names ``FILE:LINE`` (``FILE`` for a whole JSON document) and the field.
    """
    out_dir = Path(results_dir)
    summary, per_variant = _read(out_dir, flag_ratio=flag_ratio, flag_entropy=flag_entropy)
    table = markdown_table(summary)
    atomic_write(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=1) + "\n").encode("utf-8"))
    atomic_write(out_dir / TABLE_FILE, table.encode("utf-8"))
    return table, plot(out_dir, summary, per_variant)

"""The disabling-edit screen against what the edits did (docs/results.md, SmolLM2 section).

Joins the output of ``rrome screen --json`` with a one-at-a-time ``rrome eval`` folder by case id
and reports, for ``rome``: precision and recall of the screen's flag for realised disabling
edits (|Δ| above ``--factor`` times the run's median), the flagged cases with their |Δ| and
generation entropy, and a scatter of ρ against |Δ| / median (and, where ``r-rome`` ran on the
same case, against |Δ_rome| / |Δ_r-rome|). Reads saved files only; writes a PNG and prints
Markdown.

    .venv/bin/python scripts/screen_vs_reality.py SCREEN.jsonl EVAL_DIR --out FIGURE.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from rrome.eval.results import Variant


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ratio(rec: dict[str, Any]) -> float:
    return float(rec["ratio"])  # "inf" / "-inf" are written as strings; float() reads them


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("screen", type=Path)
    ap.add_argument("eval_dir", type=Path)
    ap.add_argument("--factor", type=float, default=10.0, help="disabling: |Δ| above this many times the median")
    ap.add_argument("--threshold", type=float, default=10.0, help="the screen's limit on rho (drawn)")
    ap.add_argument("--out", type=Path, required=True, help="the scatter plot (PNG)")
    args = ap.parse_args()

    screen = {str(r["case_id"]): r for r in _lines(args.screen)}
    runs = {}
    for method in ("rome", "r-rome", "p-rome"):
        path = Variant(args.eval_dir, "single", method).edits
        if path.exists():
            runs[method] = {str(e["case_id"]): e for e in _lines(path) if "norm_delta" in e}
    rome = runs.get("rome", {})
    if not rome:
        raise SystemExit(f"{Variant(args.eval_dir, 'single', 'rome').edits}: missing")
    ids = [c for c in rome if c in screen]
    median = statistics.median(float(rome[c]["norm_delta"]) for c in ids)
    real = {c: float(rome[c]["norm_delta"]) > args.factor * median for c in ids}
    flag = {c: bool(screen[c]["disabling"]) for c in ids}
    tp = sum(real[c] and flag[c] for c in ids)
    fp = sum(flag[c] and not real[c] for c in ids)
    fn = sum(real[c] and not flag[c] for c in ids)
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan

    print(f"cases: {len(ids)} (rome edits joined with the screen); median |Δ| of rome {median:.3g}")
    n_real, n_flag = sum(real.values()), sum(flag.values())
    print(f"realised disabling edits (|Δ| > {args.factor:g}x median): {n_real}; flagged: {n_flag}")
    print(f"precision {tp}/{tp + fp} = {precision:.2f}, recall {tp}/{tp + fn} = {recall:.2f}\n")
    print("| case | subject | pos | rho | rome abs Δ | / median | rome entropy | r-rome abs Δ | p-rome abs Δ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for c in sorted(ids, key=lambda c: -float(rome[c]["norm_delta"])):
        if not (flag[c] or real[c]):
            continue
        other = {m: runs[m][c]["norm_delta"] if c in runs.get(m, {}) else None for m in ("r-rome", "p-rome")}
        ent = rome[c].get("generation_entropy")
        cells = [
            c,
            screen[c]["subject"],
            str(screen[c]["position"]),
            f"{_ratio(screen[c]):.3g}",
            f"{float(rome[c]['norm_delta']):.3g}",
            f"{float(rome[c]['norm_delta']) / median:.1f}",
            "–" if ent is None else f"{ent:.3f}",
            *("–" if v is None else f"{float(v):.3g}" for v in other.values()),
        ]
        print("| " + " | ".join(cells) + " |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = [c for c in ids if c in runs.get("r-rome", {})]
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(10 if both else 5.5, 4), squeeze=False)
    axes = axes[0]
    xs = [max(_ratio(screen[c]), 1e-3) for c in ids]
    colours = ["C3" if flag[c] else "C0" for c in ids]
    axes[0].scatter(xs, [float(rome[c]["norm_delta"]) / median for c in ids], s=12, c=colours)
    axes[0].set(xscale="log", yscale="log", xlabel="screen rho = uᵀk_e / uᵀk_e^o", ylabel="rome |Δ| / median |Δ|")
    axes[0].axhline(args.factor, color="grey", lw=0.8, ls="--")
    axes[0].axvline(args.threshold, color="grey", lw=0.8, ls=":")
    if both:
        axes[1].scatter(
            [max(_ratio(screen[c]), 1e-3) for c in both],
            [float(rome[c]["norm_delta"]) / float(runs["r-rome"][c]["norm_delta"]) for c in both],
            s=12,
            c=["C3" if flag[c] else "C0" for c in both],
        )
        lo, hi = 0.5, max(2.0, max(_ratio(screen[c]) for c in both) * 2)
        axes[1].plot([lo, hi], [lo, hi], color="grey", lw=0.8)
        axes[1].set(xscale="log", yscale="log", xlabel="screen rho", ylabel="|Δ_rome| / |Δ_r-rome| (same case)")
    fig.suptitle(f"{args.eval_dir.name}: the screen against the realised updates ({len(ids)} cases)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

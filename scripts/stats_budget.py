"""How many corpus tokens does C0 need? Edit the same cases with C0 from several token budgets.

For each budget this computes C0 of the edited layer from the corpus (timed, in a cache private
to the output folder so nothing is reused from elsewhere), runs `rrome eval` (one edit at a time,
r-rome) on the same cases, and measures how much the solve C0⁻¹k_e of every case moves against
the largest budget (‖x_b − x_ref‖ / ‖x_ref‖; the update's direction u is this vector). It writes
``budget.json`` and ``budget.md`` (the table of docs/results.md, "Statistics budget") into --out.

Resumable: a budget whose results are complete is not recomputed.

Example (the run behind that table):

    python scripts/stats_budget.py "$(rrome demo-model)" \\
        --data ../shared/data/counterfact/counterfact-val.json --n 50 \\
        --corpus python/rrome/data/wikitext2/wiki.test.raw \\
        --corpus ../shared/data/wikitext2/pytorch_examples_valid.tokens.txt \\
        --budgets 10000,100000,all --out budget-results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

ALL = 10**12  # "all the text": a budget no corpus here reaches


def _budget(text: str) -> int:
    return ALL if text == "all" else int(float(text))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="CounterFact records (val split)")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--corpus", type=Path, action="append", required=True, help="text files, concatenated in order")
    ap.add_argument("--budgets", default="10000,100000,all")
    ap.add_argument("--method", default="r-rome")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["RROME_CACHE_DIR"] = str((args.out / "cache").resolve())
    from rrome.engine.editor import Editor
    from rrome.engine.keys import compute_keys
    from rrome.eval.runs import RunConfig, load_cases, run
    from rrome.files.fsutil import sha256_file

    corpus = args.out / "corpus.txt"
    if not corpus.exists():
        tmp = corpus.with_suffix(".tmp")
        tmp.write_bytes(b"\n".join(p.read_bytes() for p in args.corpus))
        tmp.replace(corpus)
    budgets = [_budget(b) for b in args.budgets.split(",")]
    state_path = args.out / "budget.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"rows": {}}
    solves: dict[int, torch.Tensor] = {}

    def config(budget: int) -> RunConfig:
        return RunConfig(
            model_dir=str(args.model_dir.resolve()),
            data=str(args.data.resolve()),
            data_sha256=sha256_file(args.data),
            methods=(args.method,),
            n=args.n,
            corpus=str(corpus.resolve()),
            hparams={"stats_max_tokens": budget},
            device=args.device,
        )

    cases = load_cases(config(budgets[0]))
    for budget in budgets:
        key = str(budget)
        editor = Editor.from_pretrained(
            args.model_dir,
            method=args.method,  # type: ignore[arg-type]
            device=args.device,
            corpus=corpus,
            hparams={"stats_max_tokens": budget},
            progress=False,
        )
        templates = editor.templates()
        row = state["rows"].get(key, {})
        if "stats_seconds" not in row:
            # A cached C0 without a recorded time (a run killed between the statistics and the
            # row): collect again, or the row would time a file load.
            for stale in (args.out / "cache" / "stats").glob(f"*/*-{budget}.*safetensors"):
                stale.unlink()
        t0 = time.perf_counter()
        chol = editor.cholesky()
        seconds = time.perf_counter() - t0
        if "stats_seconds" not in row:  # first computation: the time is that of the statistics
            from rrome._rust import SecondMoment

            assert editor.stats_path is not None
            row["tokens"] = SecondMoment.load(str(editor.stats_path)).count
            row["stats_seconds"] = seconds
            row["stats_device"] = _device_name(editor.model)
        keys = torch.stack(
            [compute_keys(editor.model, editor.tokenizer, editor.module_name, r, templates).k_e for r in cases]
        )
        rhs = np.ascontiguousarray(keys.double().cpu().numpy().T)  # (d, cases)
        solves[budget] = torch.from_numpy(chol.solve(rhs))
        del editor
        results = run(config(budget), args.out / f"eval-{key}", progress=True)
        from rrome.eval.report import summarize

        v = summarize(results)["variants"][args.method]
        row["metrics"] = v["metrics"]
        row["mean_norm_delta"] = v["norm_delta"]["mean"]
        state["rows"][key] = row
        state_path.write_text(json.dumps(state, indent=1) + "\n")

    ref = solves[max(budgets)]
    for budget in budgets:
        x = solves[budget]
        rel = [float((x[:, i] - ref[:, i]).norm() / ref[:, i].norm()) for i in range(x.shape[1])]
        state["rows"][str(budget)]["rel_change_solve_median"] = statistics.median(rel)
        state["rows"][str(budget)]["rel_change_solve_max"] = max(rel)
    state_path.write_text(json.dumps(state, indent=1) + "\n")

    lines = [
        "| budget | tokens | C0 time (s) | on | ES | PS | NS | Score | mean abs Δ | "
        f"C0⁻¹k_e change vs {_name(max(budgets))} (median / max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for budget in budgets:
        r = state["rows"][str(budget)]
        m = r["metrics"]
        lines.append(
            f"| {_name(budget)} | {r['tokens']:,} | {r['stats_seconds']:.1f} | {r.get('stats_device', '?')} | "
            f"{m['ES']:.1f} | {m['PS']:.1f} | "
            f"{m['NS']:.1f} | {m['Score']:.1f} | {r['mean_norm_delta']:.3g} | "
            f"{r['rel_change_solve_median']:.3g} / {r['rel_change_solve_max']:.3g} |"
        )
    (args.out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _device_name(model: torch.nn.Module) -> str:
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _name(budget: int) -> str:
    return "all" if budget == ALL else f"{budget:,}"


if __name__ == "__main__":
    main()

"""How much the later edits of a sequential run change each earlier edit's output, at two keys.

    python scripts/retained_disturbance.py RUN/sequential-r-rome MODEL_DIR [--upto N] [--per-edit FILE]

Retention (``retain_edit_keys``) solves each edit against C0 plus the earlier edits' k_den, the
key each wrote at (the mean over the context templates). The edit's own prompt, the one ES is
measured on and the one a user asks, has another key: k_e^o, the plain prompt's. This script
reads the run's factors (u, r) and, for every applied edit j, the change of the module's output
that the later applied edits make at a key x of edit j, ‖Σ_{i>j} r_i u_iᵀ x‖, relative to the
edit's own change there, ‖r_j‖·|u_jᵀ x|; for x = k_den and x = k_e^o. The keys are computed again
on ``MODEL_DIR`` (the edited module's input comes from unedited layers, so the unedited model gives
the run's keys); where the run saved k_den (``k`` in its factors) the recomputed one must match.
A third row reads each paraphrase prompt of the edit's record (what PS measures; no edit sees
them), at the token where edit j acts most (largest |u_jᵀx|, as the neighbour leak picks it).

Prints, per key, the median, 75th and 90th percentile and the largest ratio over the edits that
have later ones (``--upto N``: the run as it was after N edits); ``--per-edit`` writes one JSON line
per edit (index, case id, both ratios). Plain edit prompts only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt

from rrome.engine.keys import compute_keys, keys_at_every_token
from rrome.eval.results import Variant, read_jsonl
from rrome.eval.runs import load_factors, rebuild_along, run_settings
from rrome.files.edits import load_requests
from rrome.files.errors import RromeError

KEY_MATCH = 1e-4
"""Largest relative difference between a recomputed k_den and the run's saved one (float32 keys
computed again on the same model; a larger one means other templates or another layer)."""


def at_key(u: npt.NDArray[np.float64], r: npt.NDArray[np.float64], j: int, x: npt.NDArray[np.float64]) -> float:
    """‖Σ_{i>j} r_i u_iᵀ x‖ / (‖r_j‖·|u_jᵀ x|): what the edits after edit j change at a key x of
    edit j, over what edit j changes there; rows of ``u`` and ``r`` are the applied edits in order."""
    a = u[j:] @ x
    return float(np.linalg.norm(r[j + 1 :].T @ a[1:]) / (np.linalg.norm(r[j]) * abs(a[0])))


def ratios(u: npt.NDArray[np.float64], r: npt.NDArray[np.float64], keys: npt.NDArray[np.float64]) -> list[float]:
    """:func:`at_key` for each edit j but the last at its own key ``keys[j]``."""
    return [at_key(u, r, j, keys[j]) for j in range(len(u) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a sequential run's variant folder (…/sequential-r-rome)")
    ap.add_argument("model_dir", type=Path, help="the unedited model the run edited")
    ap.add_argument("--upto", type=int, help="only the run's first N edits (default: all it holds)")
    ap.add_argument("--per-edit", type=Path, help="write one JSON line per edit here")
    args = ap.parse_args()
    try:
        run = run_settings(args.folder)
        if run.get("edit_prompts", "plain") != "plain":
            raise RromeError(f"{args.folder}: made with {run['edit_prompts']!r} edit prompts; only plain ones are read")
        variant = Variant.of(args.folder)
        records = read_jsonl(variant.edits)[: args.upto]
        applied = [rec for rec in records if "refused" not in rec]
        if len(applied) < 2:
            raise RromeError(f"{args.folder}: {len(applied)} applied edit(s); the ratios need two")
        requests = load_requests(run["data"])[int(run.get("offset", 0)) :]
        # The unedited model as the run opened it: its layer, dtype and resolved set (the
        # templates decide k_e).
        _, _, editor = next(iter(rebuild_along(args.folder, args.model_dir, [0], settings=run)))
        templates = editor.templates()
        u, r, k_den, k_plain = [], [], [], []
        para: list[list[npt.NDArray[np.float64]]] = []  # per edit: a key per paraphrase prompt
        for rec in applied:
            fu, fr, saved, _ = load_factors(variant.factors(int(rec["index"])))
            request = requests[int(rec["index"])]
            if str(request.case_id) != str(rec["case_id"]):
                raise RromeError(f"{run['data']}: case {request.case_id} where the run edited {rec['case_id']}")
            keys = compute_keys(editor.model, editor.tokenizer, editor.module_name, request, templates)
            k_e = keys.k_e.double().cpu().numpy()
            if saved is not None:
                diff = float(np.abs(k_e - saved).max() / np.abs(saved).max())
                if diff > KEY_MATCH:
                    raise RromeError(
                        f"case {rec['case_id']}: the recomputed k_den differs from the run's by {diff:.1e} "
                        "(relative); the run used other templates or another layer"
                    )
            u.append(fu.astype(np.float64))
            r.append(fr.astype(np.float64))
            k_den.append(k_e)
            k_plain.append(keys.k_e_o.double().cpu().numpy())
            texts = list(request.paraphrase_prompts)
            every = keys_at_every_token(editor.model, editor.tokenizer, editor.module_name, texts)
            tokens = [ks.double().numpy() for _, ks in every]
            para.append([x[int(np.argmax(np.abs(x @ u[-1])))] for x in tokens])
    except (RromeError, OSError, KeyError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None

    uu, rr = np.stack(u), np.stack(r)
    found = {
        "k_den (retained)": ratios(uu, rr, np.stack(k_den)),
        "plain prompt k_e^o": ratios(uu, rr, np.stack(k_plain)),
    }
    by_edit = [[at_key(uu, rr, j, x) for x in para[j]] for j in range(len(uu) - 1)]
    rows = {**found, "paraphrase prompts (not retained)": [x for xs in by_edit for x in xs]}
    print(f"{len(applied)} applied edits of {args.folder}; later edits' change at each edit's key, over its own change")
    print("| key | edits | median | p75 | p90 | max |\n|---|---|---|---|---|---|")
    for name, xs in rows.items():
        if xs:  # records without paraphrase prompts give no third row
            q = np.quantile(xs, [0.5, 0.75, 0.9])
            print(f"| {name} | {len(xs)} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | {max(xs):.3f} |")
    if args.per_edit:
        with args.per_edit.open("w") as f:
            for rec, a, b, c in zip(applied, *found.values(), by_edit, strict=False):
                line = {"index": rec["index"], "case_id": rec["case_id"], "k_den": a, "plain": b, "paraphrase": c}
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()

"""How much each sequential run's edits disturb ordinary text: ‖r‖²·uᵀC0u per edit, summed.

    python scripts/generic_disturbance.py RUN_A/sequential-r-rome RUN_B/sequential-r-rome [--every 50] [--names A B]

An edit Δ = r uᵀ changes the module's output at a key x by r·(uᵀx). Over the keys of ordinary
text, whose second moment is C0 (the run's statistics, named in its baseline.json), the mean
squared change is E‖Δx‖² = ‖r‖²·uᵀC0u: what the edit costs every token of every text the model
reads, GLUE prompts included. ROME's u = C0⁻¹k / kᵀC0⁻¹k is the direction with the least of it
for a given change at the key k, so what remains is set by ‖r‖ (the clamp, the step size) and by
how far the shield and retention turn u away from C0⁻¹k. The script prints, every ``--every``
applied edits, for those edits the median ‖v_init‖ (the module's output at the subject before
the edit, which the clamp is relative to under ``clamp_base = "current"``), ‖r‖ and energy, then
over all edits so far the summed energy and tr(ΔC0Δᵀ) of the summed update (below the sum where
successive edits cancel, above it where they add up). With
``--model`` (the unedited model folder the runs edited) each figure is also given as a share of
E‖W0x‖² = tr(W0 C0 W0ᵀ), the module's own output energy on ordinary text. Reads the folders'
saved factors (u, r), the statistics file and, with ``--model``, one weight; no torch.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open

from rrome import SecondMoment
from rrome.eval.results import BASELINE_FILE, Variant, read_jsonl, read_object
from rrome.eval.runs import load_factors
from rrome.files.errors import RromeError


def second_moment(run_dir: Path, recorded: str | None, stats: Path | None) -> np.ndarray:
    """C0 of the run (``stats``, or the statistics file its baseline.json records), per token."""
    if not (stats or recorded):
        raise SystemExit(f"{run_dir / BASELINE_FILE}: names no statistics file; give --stats")
    path = stats or Path(os.path.expanduser(str(recorded)))
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (the statistics of {run_dir}; give --stats)")
    try:
        return SecondMoment.load(path).moment()
    except RromeError as e:
        raise SystemExit(f"error: {e}") from None


def module_weight(model_dir: Path, module: str, d_in: int) -> np.ndarray:
    """The module's weight in ``model_dir`` as [d_out, d_in] float64 (any shard, either layout)."""
    name = f"{module}.weight"
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), "np") as f:
            if name in f.keys():  # noqa: SIM118 - a safe_open handle has no __contains__
                w = np.asarray(f.get_tensor(name), np.float64)
                return w if w.shape[1] == d_in else w.T
    raise SystemExit(f"{model_dir}: no shard holds {name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="variant folders of sequential runs (…/sequential-r-rome)")
    ap.add_argument("--every", type=int, default=50, help="print a row every this many edits (default 50)")
    ap.add_argument("--stats", type=Path, help="the statistics file for every run (default: each run's own)")
    ap.add_argument("--model", type=Path, help="the unedited model folder: figures also as shares of E‖W0x‖²")
    ap.add_argument("--names", nargs="+", help="a name per folder (default: the folders)")
    args = ap.parse_args()
    names = args.names or args.folders
    if len(names) != len(args.folders) or args.every < 1:
        raise SystemExit("give one name per folder and --every ≥ 1")
    head = "| run | applied edits | these: median ‖v_init‖ | median ‖r‖ | median ‖r‖²·uᵀC0u "
    print(head + "| all so far: sum ‖r‖²·uᵀC0u | tr(ΔC0Δᵀ) of the sum |")
    print("|---|---|---|---|---|---|---|")
    for name, folder in zip(names, args.folders, strict=True):
        variant = Variant.of(Path(folder))
        base = read_object(variant.run_dir / BASELINE_FILE)
        c0 = second_moment(variant.run_dir, base.get("stats"), args.stats)
        scale = math.nan
        if args.model:
            w0 = module_weight(args.model, str(base["module"]), c0.shape[0])
            scale = float(np.einsum("ij,jk,ik->", w0, c0, w0))
            print(f"| {name} | 0 | – | – | – | E‖W0x‖² = {scale:.2f} | – |")
        records = [r for r in read_jsonl(variant.edits) if "refused" not in r]
        energies, norms, v_init = [], [], []
        total = np.zeros((0, 0))
        for i, rec in enumerate(records, 1):
            u, r, _, _ = load_factors(variant.factors(int(rec["index"])))
            u64, r64 = u.astype(np.float64), r.astype(np.float64)
            if total.size == 0:
                total = np.zeros((r64.size, u64.size))
            total += np.outer(r64, u64)
            energies.append(float(r64 @ r64) * float(u64 @ c0 @ u64))
            norms.append(float(np.linalg.norm(r64)))
            v_init.append(float(rec.get("value", {}).get("v_init_norm", math.nan)))
            if i % args.every == 0 or i == len(records):
                these = slice((i - 1) // args.every * args.every, i)
                summed = float(np.einsum("ij,jk,ik->", total, c0, total))
                share = "" if math.isnan(scale) else f" ({100 * sum(energies) / scale:.0f}%)"
                medians = [float(np.median(x[these])) for x in (v_init, norms, energies)]
                print(
                    f"| {name} | {i} | {medians[0]:.2f} | {medians[1]:.2f} | {medians[2]:.4f} "
                    f"| {sum(energies):.2f}{share} | {summed:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

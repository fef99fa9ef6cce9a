"""Fingerprint one edit of a real model: sha256 of its Δ factors and of the edited weight.

    python scripts/delta_fingerprint.py [MODEL_DIR] [--method r-rome rome p-rome]

Edits "The Space Needle is located in the city of" → London with ``--hparams reference`` and
prints, per variant, the sha256 of the float32 factors u and r and the scale, and of the edited
weight after the edit. Two commits that give the same lines compute the same Δ bytes: this is
how a refactor is checked to leave the numbers alone (on Gemma 3 270M, CPU, float32).
"""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np

from rrome import Editor
from rrome.demo import demo_model_dir

REQUEST = {
    "case_id": 1,
    "prompt": "{} is located in the city of",
    "subject": "The Space Needle",
    "target_new": "London",
    "target_true": "Seattle",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", default=None)
    ap.add_argument("--method", nargs="+", default=["r-rome", "rome", "p-rome"])
    args = ap.parse_args()
    model_dir = args.model_dir or demo_model_dir()
    out = {}
    for method in args.method:
        editor = Editor.from_pretrained(model_dir, method=method, hparams="reference", progress=False)
        editor.edit(REQUEST)
        delta = editor.pending[-1]
        h = hashlib.sha256()
        for factor in (delta.u, delta.r):
            h.update(np.ascontiguousarray(np.asarray(factor, dtype=np.float32)).tobytes())
        h.update(repr(float(delta.scale)).encode())
        weight = editor.edited_weight().detach().cpu().numpy().tobytes()
        out[method] = {"delta_sha256": h.hexdigest(), "weight_sha256": hashlib.sha256(weight).hexdigest()}
        print(json.dumps({method: out[method]}), flush=True)


if __name__ == "__main__":
    main()

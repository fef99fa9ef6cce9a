"""Smoke test of an installed wheel: package data present, CLI edits and reverts a checkpoint."""

import hashlib
import importlib.resources
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

import rrome

rrome_bin = sys.argv[1]
pkg = importlib.resources.files("rrome")
for name in (
    "py.typed",
    "_rust.pyi",
    "data/wikitext2/wiki.test.raw",
    "data/wikitext2/NOTICE.md",
    "data/hparams/gpt2.json",
    "data/hparams/gemma3.json",
    "data/glue/NOTICE.md",
    "data/glue/sst2_validation_balanced_856.jsonl",
    "data/glue/mrpc_validation_balanced_258.jsonl",
    "data/glue/rte_validation_balanced_262.jsonl",
    "data/glue/cola_validation_balanced_644.jsonl",
    "data/shield/subjects.json",
    "data/shield/NOTICE.md",
):
    assert (pkg / name).is_file(), f"{name} missing from the wheel"
assert "torch" not in sys.modules

model = Path("model")
model.mkdir()
rng = np.random.default_rng(0)
w = rng.standard_normal((6, 4)).astype(np.float16)
save_file({"mlp.weight": w, "other": rng.standard_normal(3).astype(np.float32)}, str(model / "model.safetensors"))
before = hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest()
u = rng.standard_normal(4).astype(np.float32)
r = rng.standard_normal(6).astype(np.float32)
rrome.save_deltas("bundle", [rrome.Delta("mlp.weight", u, r, "out_in", 0.5)])

subprocess.run([rrome_bin, "apply-deltas", "bundle", str(model)], check=True)
got = load_file(str(model / "model.safetensors"))["mlp.weight"]
want = (w.astype(np.float32) + np.outer(np.float32(0.5) * r, u)).astype(np.float16)
assert np.array_equal(got, want), "edited tensor differs from the reference"
out = subprocess.run([rrome_bin, "inspect", str(model)], check=True, capture_output=True, text=True).stdout
assert "batch 1" in out, out
subprocess.run([rrome_bin, "export-lora", str(model), "adapter"], check=True)
lora = load_file("adapter/adapter_model.safetensors")
delta = lora["base_model.model.mlp.lora_B.weight"] @ lora["base_model.model.mlp.lora_A.weight"]
assert np.allclose(delta, np.outer(np.float32(0.5) * r, u), rtol=1e-6, atol=1e-7), "adapter differs from the delta"
subprocess.run([rrome_bin, "revert", str(model)], check=True)
assert hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest() == before
bad = subprocess.run([rrome_bin, "inspect", "missing-dir"], capture_output=True, text=True)
assert bad.returncode == 1 and bad.stderr.startswith("rrome: error:") and "Traceback" not in bad.stderr, bad.stderr
print("wheel smoke: ok")

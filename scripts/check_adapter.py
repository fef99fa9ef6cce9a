"""Checks an exported LoRA adapter against the checkpoint edited in place (docs/usage.md, "Adapters").

    python scripts/check_adapter.py BASE_DIR EDITED_DIR PEFT_DIR [--gguf BASE.gguf ADAPTER.gguf] [--prompt P ...]

1. PEFT: loads the unedited model BASE_DIR with the adapter PEFT_DIR through ``peft`` and the
   checkpoint EDITED_DIR through transformers, and prints the largest difference of their
   logits on the prompts, the largest weight difference after ``merge_and_unload``, and both
   greedy continuations.
2. GGUF (``--gguf``): reads the base GGUF and the adapter with the ``gguf`` package and checks
   each adapter tensor against the base tensor llama.cpp would apply it to (the name less
   ``.lora_a``/``.lora_b``; llama.cpp's shape rule: a.ne[0] = base.ne[0], b.ne[1] = base.ne[1],
   a.ne[1] = b.ne[0]) and the adapter's architecture against the base's. Where the
   ``llama_cpp`` package is installed, it also runs the base GGUF with and without the adapter
   and prints the greedy continuations.

Exits 1 when a check fails. Not part of ``make test`` (it needs a real model); the tests check
the same on tiny models (tests/test_export_lora.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DEFAULT_PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Michael Jordan plays the sport of",
    "The Space Needle is in the city of",
]


def check_peft(base_dir: Path, edited_dir: Path, peft_dir: Path, prompts: list[str]) -> bool:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(edited_dir)
    edited = AutoModelForCausalLM.from_pretrained(edited_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), peft_dir
    ).eval()
    worst = 0.0
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            a, b = edited(**ids).logits, peft(**ids).logits
            worst = max(worst, float((a - b).abs().max()))
            ga = edited.generate(**ids, max_new_tokens=8, do_sample=False)
            gb = peft.generate(**ids, max_new_tokens=8, do_sample=False)
        n = ids["input_ids"].shape[1]
        print(f"{p!r}\n  edited checkpoint: {tok.decode(ga[0, n:], skip_special_tokens=True)!r}")
        print(f"  base + PEFT adapter: {tok.decode(gb[0, n:], skip_special_tokens=True)!r}")
    merged = peft.merge_and_unload().state_dict()
    want = edited.state_dict()
    weight_diff = max(float((merged[k] - want[k]).abs().max()) for k in want if k in merged)
    print(f"PEFT: max |logit difference| {worst:.3g}, max |weight difference| after merge {weight_diff:.3g}")
    return worst < 1e-3 and weight_diff < 1e-5


def check_gguf(base_gguf: Path, adapter: Path, prompts: list[str]) -> bool:
    import gguf

    base, lora = gguf.GGUFReader(base_gguf), gguf.GGUFReader(adapter)
    arch = {n: f.contents() for n, f in base.fields.items() if n == "general.architecture"}
    lora_fields = {n: f.contents() for n, f in lora.fields.items() if not n.startswith("GGUF.")}
    base_arch, lora_arch = arch.get("general.architecture"), lora_fields.get("general.architecture")
    ok = lora_arch == base_arch
    print(f"GGUF: architecture base {base_arch!r}, adapter {lora_arch!r}")
    print(f"  adapter fields: { {k: v for k, v in lora_fields.items() if k.startswith(('general.type', 'adapter.'))} }")
    shapes = {t.name: [int(x) for x in t.shape] for t in base.tensors}
    pairs = {t.name.rsplit(".", 1)[0] for t in lora.tensors}
    lora_shapes = {t.name: [int(x) for x in t.shape] for t in lora.tensors}
    for name in sorted(pairs):
        a, b = lora_shapes[f"{name}.lora_a"], lora_shapes[f"{name}.lora_b"]
        target = shapes.get(name)
        good = target is not None and a[0] == target[0] and b[1] == target[1] and a[1] == b[0]
        print(f"  {name}: base ne {target}, lora_a ne {a}, lora_b ne {b}: {'ok' if good else 'MISMATCH'}")
        ok &= good
    try:
        from llama_cpp import Llama
    except ImportError:
        print("  (llama_cpp is not installed: the adapter was not run)")
        return ok
    for with_lora in (False, True):
        llm = Llama(
            model_path=str(base_gguf),
            lora_path=str(adapter) if with_lora else None,
            n_ctx=256,
            verbose=False,
            seed=0,
        )
        for p in prompts:
            out = llm(p, max_tokens=8, temperature=0.0)
            print(
                f"  llama.cpp {'with' if with_lora else 'without'} the adapter: {p!r} -> {out['choices'][0]['text']!r}"
            )
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("base_dir", type=Path)
    ap.add_argument("edited_dir", type=Path)
    ap.add_argument("peft_dir", type=Path)
    ap.add_argument("--gguf", nargs=2, type=Path, metavar=("BASE_GGUF", "ADAPTER_GGUF"))
    ap.add_argument("--prompt", action="append", default=None)
    args = ap.parse_args()
    prompts = args.prompt or DEFAULT_PROMPTS
    ok = check_peft(args.base_dir, args.edited_dir, args.peft_dir, prompts)
    if args.gguf:
        ok &= check_gguf(args.gguf[0], args.gguf[1], prompts)
    print("all checks passed" if ok else "a check FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

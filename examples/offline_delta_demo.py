"""The offline write path, end to end, on a small GPT-2 checkpoint built here.

1. Build a small random GPT-2 and save it as bf16 safetensors shards (no download).
2. Take the key k (the input of layer 1's ``mlp.c_proj``) at the last token of a prompt and
   build a rank-one delta that makes that layer write the unembedding direction of a chosen
   target token there: ``Δ = r uᵀ`` with ``u = k / ‖k‖²``, so ``Δ k = r``.
3. Write it into the shards with ``rrome apply-deltas`` (the model is never loaded for this),
   reload the checkpoint, and compare next-token predictions before and after.
4. Check the edited tensor against torch's ``W + r uᵀ`` rounded once, and ``rrome revert``
   restoring the original bytes.

This stands in for the editing engine, which computes u and r with ROME / r-ROME.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import rrome

TENSOR = "transformer.h.1.mlp.c_proj.weight"


def sha256_dir(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("model*.safetensors"))}


def top5(model: GPT2LMHeadModel, ids: torch.Tensor) -> list[tuple[int, float]]:
    with torch.no_grad():
        probs = model(ids).logits[0, -1].float().softmax(-1)
    p, i = probs.topk(5)
    return [(int(a), float(b)) for a, b in zip(i, p, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("demo-out"))
    ap.add_argument("--target", type=int, default=123, help="token id the edit should promote")
    args = ap.parse_args()
    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    model_dir, bundle = work / "model", work / "bundle"

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_embd=128, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval().to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="1MB")
    print(f"built {model_dir}: {sum(p.numel() for p in model.parameters()):,} parameters, bf16")
    subprocess.run([sys.executable, "-m", "rrome.cli", "inspect", str(model_dir)], check=True)

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    captured: dict[str, torch.Tensor] = {}
    c_proj = model.transformer.h[1].mlp.c_proj
    handle = c_proj.register_forward_hook(lambda _m, inp, _out: captured.__setitem__("k", inp[0][0, -1].float()))
    try:
        before = top5(model, ids)
    finally:
        handle.remove()
    k = captured["k"]
    # Write 4 × the unembedding row of the target at this position: Δ k = r.
    r = 4.0 * model.lm_head.weight[args.target].float() / model.lm_head.weight[args.target].float().norm()
    u = k / k.dot(k)
    delta = rrome.Delta(TENSOR, u.numpy(), r.detach().numpy(), layout="in_out", meta={"demo": "promote token"})
    rrome.save_deltas(bundle, [delta])

    originals = sha256_dir(model_dir)
    w_before = c_proj.weight.detach().clone()
    subprocess.run([sys.executable, "-m", "rrome.cli", "apply-deltas", str(bundle), str(model_dir)], check=True)

    edited = GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    after = top5(edited, ids)
    want = (w_before.float() + torch.outer(torch.tensor(delta.r), torch.tensor(delta.u)).T).to(torch.bfloat16)
    exact = torch.equal(edited.transformer.h[1].mlp.c_proj.weight, want)

    print(f"\nnext-token top 5 for ids {ids.tolist()[0]} (target token {args.target}):")
    print("  before:", ", ".join(f"{t}:{p:.3f}" for t, p in before))
    print("  after: ", ", ".join(f"{t}:{p:.3f}" for t, p in after))
    print(f"edited tensor equals torch's bf16(W + r uᵀ): {exact}")
    changed = [n for n, h in sha256_dir(model_dir).items() if h != originals[n]]
    print(f"shards whose bytes changed: {changed}")

    subprocess.run([sys.executable, "-m", "rrome.cli", "revert", str(model_dir)], check=True)
    restored = sha256_dir(model_dir) == originals
    print(f"after revert, every shard is byte-identical to the original: {restored}")
    if not (exact and restored and after[0][0] == args.target):
        sys.exit("demo check failed")
    print("demo: ok")


if __name__ == "__main__":
    main()

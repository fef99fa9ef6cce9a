"""The result scripts under scripts/ that docs/results.md quotes, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
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

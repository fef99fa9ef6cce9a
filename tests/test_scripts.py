"""The result scripts under scripts/ that docs/results.md quotes, run as a user runs them."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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


def _sequential_run(
    model_dir: Path, tmp_path: Path, run: dict[str, object] | None = None
) -> tuple[Path, list[tuple[Any, Any]]]:
    """A sequential run's variant folder over ``model_dir`` holding three edits, the second refused,
    as ``rrome eval --sequential --guard`` leaves it; returns it and the applied edits' (u, r)."""
    import numpy as np
    from safetensors.numpy import save_file

    from rrome.engine.editor import Editor

    editor = Editor.from_pretrained(model_dir, device="cpu", progress=False)
    d_out, d_in = editor.edited_weight().shape
    root = tmp_path / "run"
    folder = root / "sequential-rome"
    (folder / "deltas").mkdir(parents=True)
    (root / "baseline.json").write_text(json.dumps({"layer": editor.layer}))
    (root / "run.json").write_text(json.dumps(run or {"glue_n": 3, "seed": 0}))
    rng = np.random.default_rng(0)
    factors = []
    for i in (0, 2):
        u, r = rng.standard_normal(d_in).astype(np.float32), 3 * rng.standard_normal(d_out).astype(np.float32)
        save_file({"u": u, "r": r}, str(folder / "deltas" / f"{i:05d}.safetensors"))
        factors.append((u, r))
    records = [
        {"index": 0, "case_id": "7", "subject": "A"},
        {"index": 1, "case_id": "8", "subject": "B", "refused": "DisablingEditError"},
        {"index": 2, "case_id": "9", "subject": "C"},
    ]
    (folder / "edits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, factors


def test_sequential_continuations_replays_the_applied_edits(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    """The script's model after N edits is the unedited one plus the applied edits' r uᵀ (a
    refused edit has no factors and is skipped), and its text is that model's greedy text."""
    import torch

    from rrome.engine.editor import Editor

    model_dir = tiny_dir("llama")
    folder, factors = _sequential_run(model_dir, tmp_path)
    editor = Editor.from_pretrained(model_dir, device="cpu", progress=False)
    weight = editor.edited_weight()
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
        for u, r in factors:
            weight.add_(torch.outer(torch.from_numpy(r), torch.from_numpy(u)))
    edited = editor.generate(prompts, max_new_tokens=6)
    assert unedited != edited  # the updates are large enough to change the greedy text
    for section, texts in ((sections[0], unedited), (sections[1], edited)):
        assert lines(section) == [f"{p} → {t.replace(chr(10), ' ⏎ ')}" for p, t in zip(prompts, texts, strict=True)]

    too_far = subprocess.run([*cmd[:4], "--at", "4"], capture_output=True, text=True)
    assert too_far.returncode != 0 and "holds 3 edits; asked for [4]" in too_far.stderr


def _bias_rows(folder: Path, model_dir: Path, *extra: str) -> list[list[str]]:
    script = str(ROOT / "scripts" / "downstream_bias.py")
    cmd = [
        sys.executable,
        script,
        str(folder),
        str(model_dir),
        "--at",
        "3,0",
        "--task",
        "sst2",
        "--task",
        "rte",
        *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.strip("| ").split(" | ") for line in out[2:]]


@pytest.mark.parametrize("glue_n", [None, 9])
def test_downstream_bias_scores_the_rebuilt_model(
    tiny_dir: Callable[..., Path], tmp_path: Path, glue_n: int | None
) -> None:
    """Each row is the label scoring of the run's few-shot records on the model after N edits:
    accuracy, predicted labels, mean margin and AUC recomputed here from label_scores, and the
    records lost and gained against the first count; ``--glue-n`` scores more records than the
    run did, the run's own first."""
    import torch

    from rrome.engine.editor import Editor
    from rrome.eval.downstream import few_shot_sets, label_scores

    model_dir = tiny_dir("llama")
    folder, factors = _sequential_run(model_dir, tmp_path, {"glue_n": 6, "seed": 3})
    rows = _bias_rows(folder, model_dir, *([] if glue_n is None else ["--glue-n", str(glue_n)]))
    assert [(r[0], r[1]) for r in rows] == [("0", "sst2"), ("0", "rte"), ("3", "sst2"), ("3", "rte")]

    n_records = glue_n or 6
    editor = Editor.from_pretrained(model_dir, device="cpu", progress=False)
    sets = {s.task.name: s for s in few_shot_sets(n_records, seed=3)}
    run_sets = {s.task.name: s for s in few_shot_sets(6, seed=3)}
    expected = []
    right_at_0: dict[str, list[bool]] = {}
    for n in (0, 3):
        if n:
            with torch.no_grad():
                for u, r in factors:
                    editor.edited_weight().add_(torch.outer(torch.from_numpy(r), torch.from_numpy(u)))
        for name in ("sst2", "rte"):
            assert sets[name].records[:6] == run_sets[name].records  # the run's records come first
            assert sets[name].shots == run_sets[name].shots
            scores = label_scores(editor.model, editor.tokenizer, sets[name])
            truth = [rec["label"] for rec in sets[name].records]
            margins = [b - a for a, b in scores]
            pred = [int(m > 0) for m in margins]
            right = [p == t for p, t in zip(pred, truth, strict=True)]
            pos = [m for m, t in zip(margins, truth, strict=True) if t == 1]
            neg = [m for m, t in zip(margins, truth, strict=True) if t == 0]
            area = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg) / (len(pos) * len(neg))
            labels = sets[name].task.labels
            paired = "–"
            if n:
                base = right_at_0[name]
                lost = sum(1 for b, x in zip(base, right, strict=True) if b and not x)
                paired = f"{lost} / {sum(1 for b, x in zip(base, right, strict=True) if x and not b)}"
            right_at_0.setdefault(name, right)
            expected.append(
                [
                    str(n),
                    name,
                    f"{100 * sum(right) / n_records:.0f}",
                    f"{labels[0]} {pred.count(0)} / {labels[1]} {pred.count(1)}",
                    f"{sum(margins) / n_records:+.2f}",
                    f"{area:.3f}",
                    paired,
                ]
            )
    assert rows == expected
    assert rows[0][4] != rows[2][4]  # the edits moved the scores: the rebuilt model is not the unedited one


def test_downstream_bias_refuses_no_records(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    model_dir = tiny_dir("llama")
    folder, _ = _sequential_run(model_dir, tmp_path, {"glue_n": 6, "seed": 3})
    script = str(ROOT / "scripts" / "downstream_bias.py")
    bad = subprocess.run(
        [sys.executable, script, str(folder), str(model_dir), "--at", "0", "--glue-n", "0"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "--glue-n must be at least 1, got 0" in bad.stderr


def test_downstream_bias_auc_against_a_naive_count() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from downstream_bias import auc
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auc([1.0, 1.0], [0, 1]) == 0.5
    assert math.isnan(auc([1.0, 2.0], [1, 1]))  # undefined without a negative record


def test_rebuild_along_loads_the_runs_dtype_and_checks_counts(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    import pytest
    import torch

    from rrome.eval.runs import rebuild_along
    from rrome.files.errors import RromeError

    model_dir = tiny_dir("llama")
    folder, _ = _sequential_run(model_dir, tmp_path, {"glue_n": 3, "seed": 0, "dtype": "bfloat16"})
    # The editor edits with the resolved set the run recorded, not with today's defaults.
    baseline = folder.parent / "baseline.json"
    recorded = json.loads(baseline.read_text())
    from rrome.files.hparams import load_hparams

    resolved = {**load_hparams("llama", n_layers=2).to_json(), "v_num_grad_steps": 7, "retain_edit_keys": True}
    baseline.write_text(json.dumps({**recorded, "hparams": resolved}))
    n, last, editor = next(iter(rebuild_along(folder, model_dir, [1])))
    assert (n, last is not None and last["case_id"]) == (1, "7")
    assert editor.edited_weight().dtype == torch.bfloat16
    assert (editor.hparams.v_num_grad_steps, editor.hparams.retain_edit_keys) == (7, True)
    for bad in ([2, 1], [1, 1], [-1], [4]):
        with pytest.raises(RromeError, match="holds 3 edits"):
            next(iter(rebuild_along(folder, model_dir, bad)))


def _case(es: bool, ps: bool, ns: bool) -> dict[str, Any]:
    """A case's probabilities: the rewrite and the paraphrase succeed when ``es``/``ps``, the
    neighbour keeps its answer when ``ns``."""

    def pair(ok: bool) -> list[float]:
        return [0.6, 0.1] if ok else [0.1, 0.6]

    return {"rewrite": [pair(es)], "paraphrase": [pair(ps)], "neighborhood": [pair(not ns)]}


def test_paired_metrics_pairs_single_and_finished_sequential_runs(tmp_path: Path) -> None:
    """A one-at-a-time folder pairs by its lines' cases, a sequential one by final.json (the
    i-th case for the line of index i, a refused edit's too); an unfinished sequential run is
    refused with what is missing."""
    from rrome.eval.metrics import CaseProbs, metrics

    single = tmp_path / "a" / "single-r-rome"
    single.mkdir(parents=True)
    a_cases = {"7": _case(True, True, True), "8": _case(True, False, True), "9": _case(False, False, False)}
    single.joinpath("edits.jsonl").write_text(
        "".join(json.dumps({"case_id": k, "case": c}) + "\n" for k, c in a_cases.items())
    )
    seq = tmp_path / "b" / "sequential-r-rome"
    seq.mkdir(parents=True)
    b_cases = [_case(True, True, False), _case(False, False, True), _case(True, True, True), _case(True, True, True)]
    lines = [
        {"index": 0, "case_id": "9"},
        {"index": 1, "case_id": "8", "refused": "DisablingEditError"},
        {"index": 2, "case_id": "7"},
        {"index": 3, "case_id": "10"},
    ]
    seq.joinpath("edits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    script = str(ROOT / "scripts" / "paired_metrics.py")
    cmd = [sys.executable, script, str(single), str(seq), "--names", "one", "seq"]

    unfinished = subprocess.run(cmd, capture_output=True, text=True)
    assert unfinished.returncode != 0 and "without final.json (not finished)" in unfinished.stderr

    seq.joinpath("final.json").write_text(json.dumps({"cases": b_cases}))
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "3 cases in both (3 in one, 4 in seq)"
    b_by_id = {"9": b_cases[0], "8": b_cases[1], "7": b_cases[2]}
    for line, cases in zip(out[3:5], (a_cases, b_by_id), strict=True):
        m = metrics(CaseProbs.from_json(cases[k]) for k in ("7", "8", "9"))
        assert line.split(" | ")[1:4] == [f"{m[k]:.1f}" for k in ("ES", "PS", "NS")]
    # ES: case 9 takes only in seq, 8 only in one (its edit was refused there). PS: 9 only in
    # seq. NS: 7 and 8 keep their neighbour in both runs, 9 in neither.
    assert out[5:] == [
        "edit took only in one: 1 cases; only in seq: 1 cases",
        "paraphrase took only in one: 0 cases; only in seq: 1 cases",
        "neighbour kept only in one: 0 cases; only in seq: 0 cases",
    ]


def test_retained_disturbance_against_a_naive_sum(
    tiny_copy: Callable[..., Path], private_cache: Path, tmp_path: Path
) -> None:
    """A real sequential run with retention on a tiny model: the script's ratios are, per edit,
    the later edits' summed change at its k_den and at its plain key (keys computed here with
    the run's templates) over its own change there, summed edit by edit; k_den is the run's; and
    at each paraphrase prompt's token where the edit acts most."""
    import numpy as np
    from _helpers import SHARED_DATA

    from rrome.engine.editor import Editor
    from rrome.engine.keys import compute_keys, keys_at_every_token
    from rrome.eval.runs import RunConfig, load_factors, run
    from rrome.files.edits import load_requests
    from rrome.files.fsutil import sha256_file

    model_dir = tiny_copy("gpt2", name="gpt2")
    data = SHARED_DATA / "counterfact" / "counterfact-val.json"
    hp = {
        "v_num_grad_steps": 4,
        "stats_max_tokens": 2000,
        "context_template_lengths": [[3, 4]],
        "retain_edit_keys": True,
    }
    cfg = RunConfig(
        model_dir=str(model_dir), data=str(data), data_sha256=sha256_file(data), n=4, offset=5, layer=0,
        sequential=True, every=4, glue_n=0, diagnostics=False, hparams=hp,
    )  # fmt: skip
    out = run(cfg, tmp_path / "res", progress=False)
    folder = out / "sequential-r-rome"
    per_edit = tmp_path / "per_edit.jsonl"
    script = str(ROOT / "scripts" / "retained_disturbance.py")
    res = subprocess.run(
        [sys.executable, script, str(folder), str(model_dir), "--per-edit", str(per_edit)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "| k_den (retained) | 3 |" in res.stdout and "| plain prompt k_e^o | 3 |" in res.stdout
    rows = [json.loads(line) for line in per_edit.read_text().splitlines()]

    editor = Editor.from_pretrained(model_dir, layer=0, hparams=hp, progress=False)
    requests = load_requests(data)[5:9]
    factors = [load_factors(folder / "deltas" / f"{i:05d}.safetensors") for i in range(4)]
    keys = [compute_keys(editor.model, editor.tokenizer, editor.module_name, q, editor.templates()) for q in requests]
    for j, row in enumerate(rows):
        assert row["index"] == j and str(row["case_id"]) == str(requests[j].case_id)
        saved = factors[j][2]
        assert saved is not None
        np.testing.assert_allclose(keys[j].k_e.double().numpy(), saved, rtol=0, atol=1e-5 * np.abs(saved).max())
        for name, x in (("k_den", keys[j].k_e), ("plain", keys[j].k_e_o)):
            x64 = x.double().numpy()
            later = np.zeros_like(factors[0][1], dtype=np.float64)
            for u, r, _, _ in factors[j + 1 :]:
                later += r.astype(np.float64) * float(u.astype(np.float64) @ x64)
            u_j, r_j, _, _ = factors[j]
            own = np.linalg.norm(r_j.astype(np.float64)) * abs(float(u_j.astype(np.float64) @ x64))
            assert row[name] == pytest.approx(float(np.linalg.norm(later) / own), rel=1e-9)
        # each paraphrase prompt at the token where edit j acts most
        u_j64 = factors[j][0].astype(np.float64)
        texts = list(requests[j].paraphrase_prompts)
        every = keys_at_every_token(editor.model, editor.tokenizer, editor.module_name, texts)
        assert len(row["paraphrase"]) == len(texts) > 0
        for (_, ks), got in zip(every, row["paraphrase"], strict=True):
            x64 = max(ks.double().numpy(), key=lambda k: abs(float(u_j64 @ k)))
            later = sum(r.astype(np.float64) * float(u.astype(np.float64) @ x64) for u, r, _, _ in factors[j + 1 :])
            own = np.linalg.norm(factors[j][1].astype(np.float64)) * abs(float(u_j64 @ x64))
            assert got == pytest.approx(float(np.linalg.norm(later) / own), rel=1e-9)
    assert rows[0]["plain"] != rows[0]["k_den"]  # two different keys
    assert f"| paraphrase prompts (not retained) | {sum(len(row['paraphrase']) for row in rows)} |" in res.stdout


def test_generic_disturbance_against_a_naive_sum(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    """Each row: the applied edits' ‖r‖²·uᵀC0u summed so far, tr(ΔC0Δᵀ) of their sum, and with
    --model the sum as a share of tr(W0 C0 W0ᵀ); C0 is the statistics file's sum over its count.
    A file that is not a moments file is a one-line error."""
    import numpy as np

    from rrome import SecondMoment
    from rrome.engine.editor import Editor

    model_dir = tiny_dir("llama")
    folder, factors = _sequential_run(model_dir, tmp_path)
    editor = Editor.from_pretrained(model_dir, device="cpu", progress=False)
    w0 = editor.edited_weight().detach().double().numpy()
    (folder.parent / "baseline.json").write_text(json.dumps({"layer": editor.layer, "module": editor.module_name}))
    d_in = factors[0][0].size
    a = np.random.default_rng(1).standard_normal((d_in, 3 * d_in))
    stats = tmp_path / "stats.safetensors"
    SecondMoment.from_sum(a @ a.T, 40).save(stats)
    script = str(ROOT / "scripts" / "generic_disturbance.py")
    cmd = [sys.executable, script, str(folder), "--every", "1", "--stats", str(stats), "--model", str(model_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:]]
    c0 = a @ a.T / 40
    scale = float(np.einsum("ij,jk,ik->", w0, c0, w0))
    assert rows[0][5] == f"E‖W0x‖² = {scale:.2f}"
    total, energy = np.zeros((factors[0][1].size, d_in)), 0.0
    for row, (u, r) in zip(rows[1:], factors, strict=True):  # two applied edits; the refused one has none
        u64, r64 = u.astype(np.float64), r.astype(np.float64)
        energy += float(r64 @ r64) * float(u64 @ c0 @ u64)
        total += np.outer(r64, u64)
        # --every 1: each row's medians are its own edit's (no v_init recorded here: nan).
        assert row[2] == "nan" and float(row[3]) == pytest.approx(float(np.linalg.norm(r64)), abs=0.006)
        assert float(row[4]) == pytest.approx(float(r64 @ r64) * float(u64 @ c0 @ u64), abs=6e-5)
        summed, share = row[5].split(" (")
        assert float(summed) == pytest.approx(energy, abs=0.006)
        assert float(share.rstrip("%)")) == pytest.approx(100 * energy / scale, abs=0.6)
        assert float(row[6]) == pytest.approx(float(np.einsum("ij,jk,ik->", total, c0, total)), abs=0.006)
    assert [row[1] for row in rows] == ["0", "1", "2"]
    (tmp_path / "not-moments.safetensors").write_bytes(b"not a safetensors file")
    cmd[cmd.index(str(stats))] = str(tmp_path / "not-moments.safetensors")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr

"""A results folder and the statistics cache are untrusted input too (docs/design.md §7).

A results folder travels like a model folder (a repository, a tarball): ``rrome report`` must
answer a damaged or hostile one with one line naming the file, the line and the field, never
hang on a FIFO, and never write through a link it holds. The cache's templates file is read with
the same care: a FIFO or a file nested too deeply is a corrupt cache file, generated again. (The
C0 and Cholesky files of the cache: tests/test_stats.py.) And ``rrome inspect`` shows an edit
log's ``applied_at`` that is no date without a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _helpers import assert_one_line_error, run_cli

import rrome
from rrome.eval.report import report
from rrome.eval.results import fsync_append, read_jsonl


def checksum_path(path: Path) -> Path:
    """The checksum file rrome writes beside a cache file (docs/design.md §3)."""
    return path.with_name(path.name + ".sha256")


METRIC_NAMES = ("ES", "PS", "NS", "Score", "EM", "PM", "NM")


def _edit(index: int) -> dict[str, Any]:
    return {
        "index": index,
        "case_id": index,
        "subject": f"s{index}",
        "target_new": "x",
        "norm_delta": 1e-5 * (index + 1),
        "steps": 3,
        "seconds": 1.0,
        "case": {"rewrite": [[0.9, 0.1]], "paraphrase": [[0.6, 0.3]], "neighborhood": [[0.1, 0.5]]},
    }


def results_folder(root: Path, n: int = 3) -> Path:
    """A complete `rrome eval` results folder of one variant (single edits), written by hand."""
    out = root / "run"
    (out / "single-r-rome").mkdir(parents=True)
    cfg = {"sequential": False, "n": n, "data": "cf.json", "offset": 0}
    (out / "run.json").write_text(json.dumps(cfg, indent=1))
    base = {"metrics": {k: 50.0 for k in METRIC_NAMES}, "layer": 0, "diagnostics": None}
    (out / "baseline.json").write_text(json.dumps(base, indent=1))
    lines = "".join(json.dumps(_edit(i)) + "\n" for i in range(n))
    (out / "single-r-rome" / "edits.jsonl").write_text(lines)
    return out


def test_the_hand_written_folder_reports(tmp_path: Path) -> None:
    """The folder the damage tests start from is a valid one."""
    out = results_folder(tmp_path)
    table, figures = report(out)
    assert "| r-rome |" in table and [f.name for f in figures] == ["norm_delta-single.png"]


# --------------------------------------------------------------------------------------------
# item 8: damaged files are one-line errors naming FILE:LINE and the field


def _edit_line(number: int, text: bytes) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        path = out / "single-r-rome" / "edits.jsonl"
        lines = path.read_bytes().split(b"\n")
        lines[number - 1] = text
        path.write_bytes(b"\n".join(lines))

    return damage


def _edit_field(number: int, field: str, value: Any = None, *, drop: bool = False) -> Callable[[Path], None]:
    rec = _edit(number - 1)
    if drop:
        del rec[field]
    else:
        rec[field] = value
    return _edit_line(number, json.dumps(rec).encode())


def _json_file(name: str, change: Callable[[Any], Any]) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        path = out / name
        path.write_text(json.dumps(change(json.loads(path.read_text())), indent=1))

    return damage


def _raw_file(name: str, data: bytes) -> Callable[[Path], None]:
    def damage(out: Path) -> None:
        (out / name).write_bytes(data)

    return damage


DEEP = b"[" * 200_000 + b"]" * 200_000

DAMAGE: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "edit-missing-key": (_edit_field(2, "norm_delta", drop=True), ("edits.jsonl:2:", 'field "norm_delta": missing')),
    "edit-wrong-type": (
        _edit_field(1, "norm_delta", "large"),
        ("edits.jsonl:1:", 'field "norm_delta": expected a number, got string'),
    ),
    "edit-nested-wrong-type": (
        _edit_field(3, "case", {"rewrite": [[0.9]], "paraphrase": [], "neighborhood": []}),
        ("edits.jsonl:3:", 'field "case.rewrite[0]": expected an array of 2 items'),
    ),
    "edit-boolean-as-number": (
        _edit_field(2, "steps", True),
        ("edits.jsonl:2:", 'field "steps": expected a number, got boolean true'),
    ),
    "edit-leak-lengths": (
        _edit_field(1, "leak", {"s": [0.1, 0.2], "s_last": [0.0], "dlogp_true": [0.0], "before": [], "after": []}),
        ("edits.jsonl:1:", 'field "leak"'),
    ),
    "edit-not-an-object": (_edit_line(2, b"[1, 2]"), ("edits.jsonl:2:", "expected a JSON object, got array")),
    "edit-invalid-json": (_edit_line(2, b'{"index": 1,'), ("edits.jsonl:2:", "invalid JSON")),
    "edit-not-utf8": (_edit_line(3, b'{"subject": "\xff\xfe"}'), ("edits.jsonl:3:", "not valid UTF-8", "0xff")),
    "edit-deeply-nested": (_edit_line(1, DEEP), ("edits.jsonl:1:", "nested too deeply")),
    "edit-huge-integer": (_edit_line(1, b'{"index": ' + b"9" * 5000 + b"}"), ("edits.jsonl:1:", "invalid JSON")),
    "baseline-missing-metrics": (
        _json_file("baseline.json", lambda b: {k: v for k, v in b.items() if k != "metrics"}),
        ("baseline.json:", 'field "metrics": missing'),
    ),
    "baseline-metric-wrong-type": (
        _json_file("baseline.json", lambda b: {**b, "metrics": {**b["metrics"], "NS": "high"}}),
        ("baseline.json:", 'field "metrics.NS": expected a number, got string'),
    ),
    "baseline-invalid-json": (_raw_file("baseline.json", b'{\n "metrics": {\n  "ES": oops\n'), ("baseline.json:3:",)),
    "baseline-not-utf8": (_raw_file("baseline.json", b'{\n "layer": "\xc3"\n}\n'), ("baseline.json:2:", "UTF-8")),
    "baseline-deeply-nested": (_raw_file("baseline.json", DEEP), ("baseline.json", "nested too deeply")),
    "run-wrong-type": (
        _json_file("run.json", lambda c: {**c, "sequential": "no"}),
        ("run.json:", 'field "sequential": expected true or false, got string'),
    ),
    "run-missing-key": (
        _json_file("run.json", lambda c: {k: v for k, v in c.items() if k != "n"}),
        ("run.json:", 'field "n": missing'),
    ),
    "run-an-array": (_json_file("run.json", lambda c: [c]), ("run.json:", "expected an object, got array")),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_report_on_a_damaged_folder_is_one_line(tmp_path: Path, damage: str) -> None:
    out = results_folder(tmp_path)
    change, needles = DAMAGE[damage]
    change(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = run_cli("report", out, timeout=60)
    line = assert_one_line_error(proc, *needles)
    assert str(out) in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing is written"


def test_damaged_sequential_files_are_one_line(tmp_path: Path) -> None:
    """final.json and checkpoints.jsonl of a sequential run are checked too."""
    out = results_folder(tmp_path)
    (out / "single-r-rome").rename(out / "sequential-r-rome")
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "sequential": True, "every": 1}))
    base = json.loads((out / "baseline.json").read_text())
    (out / "baseline.json").write_text(json.dumps({**base, "downstream": {"sst2": 60.0}}))
    folder = out / "sequential-r-rome"
    check = {"edits": 1, "metrics": {k: 40.0 for k in METRIC_NAMES}, "downstream": {"sst2": 55.0}}
    (folder / "checkpoints.jsonl").write_text(json.dumps(check) + "\n" + json.dumps({**check, "edits": 2}) + "\n")
    (folder / "final.json").write_text(json.dumps({"cases": [_edit(i)["case"] for i in range(3)]}))
    table, _ = report(out)  # valid as written
    assert "| r-rome |" in table

    (folder / "checkpoints.jsonl").write_text(json.dumps(check) + "\n" + json.dumps({"edits": 2, "metrics": {}}) + "\n")
    assert_one_line_error(run_cli("report", out), "checkpoints.jsonl:2:", 'field "metrics.ES": missing')
    no_task = {**check, "downstream": {}}
    (folder / "checkpoints.jsonl").write_text(json.dumps(no_task) + "\n")
    assert_one_line_error(run_cli("report", out), "checkpoints.jsonl:1:", 'field "downstream.sst2": missing')
    (folder / "checkpoints.jsonl").write_text(json.dumps(check) + "\n")
    (folder / "final.json").write_text(json.dumps({"cases": [{"rewrite": "x"}]}))
    assert_one_line_error(run_cli("report", out), "final.json:", 'field "cases[0].rewrite": expected an array')


# --------------------------------------------------------------------------------------------
# item 8: an edit log's applied_at that is no date


def test_inspect_shows_an_applied_at_that_is_no_date(tmp_path: Path) -> None:
    from tiny_models import write_safetensors

    model = tmp_path / "m"
    model.mkdir()
    write_safetensors(model / "model.safetensors", {"w": ("F32", (4, 8), np.zeros(32, np.float32).tobytes())})
    (model / "config.json").write_text('{"model_type": "llama"}')
    rrome.apply_deltas(model, [rrome.Delta("w", np.ones(8, np.float32), np.ones(4, np.float32), layout="out_in")])
    log = model / "rrome_edits.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records and all("applied_at" in r for r in records)
    for value in ("1e300", "-1e300"):
        text = "".join(json.dumps({**r, "applied_at": 0.5}) + "\n" for r in records)
        log.write_text(text.replace('"applied_at": 0.5', f'"applied_at": {value}'))
        assert value in log.read_text()
        proc = run_cli("inspect", model)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert "not a date" in proc.stdout


def test_format_time() -> None:
    from rrome.cli.common import format_time

    assert format_time(None) == "-" and format_time(0) == "-"
    assert format_time(1e300) == "1e+300 (not a date)"
    assert format_time(float("nan")) == "nan (not a date)"
    assert format_time(1.7e9).startswith("2023-11-1")


# --------------------------------------------------------------------------------------------
# item 9: FIFOs never hang a reader


def test_report_on_a_fifo_edits_file_does_not_hang(tmp_path: Path) -> None:
    out = results_folder(tmp_path)
    edits = out / "single-r-rome" / "edits.jsonl"
    edits.unlink()
    os.mkfifo(edits)
    # Before the fix this blocked in open() until a writer came: the timeout fails the test.
    proc = run_cli("report", out, timeout=30)
    assert_one_line_error(proc, "edits.jsonl", "a FIFO, not a regular file")
    for name in ("run.json", "baseline.json"):
        other = results_folder(tmp_path / name)
        (other / name).unlink()
        os.mkfifo(other / name)
        assert_one_line_error(run_cli("report", other, timeout=30), name, "a FIFO")


def _call_with_timeout(fn: Callable[[], Any], fifo: Path, seconds: float = 60) -> Any:
    """``fn()`` in a thread; fails the test if it has not returned after ``seconds`` (a reader
    blocked on ``fifo`` is then released by opening it for writing, so no thread stays stuck)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def template_cache(monkeypatch: pytest.MonkeyPatch, private_cache: Path) -> Path:
    monkeypatch.delenv("RROME_NO_TEMPLATE_CACHE")
    return private_cache


def _templates_path(key: str) -> Path:
    import rrome.engine.keys as keys_mod

    return keys_mod.templates_path(key, seed=0, lengths=((3, 5),), top_k=5, device="cpu", dtype="float32")


@pytest.mark.usefixtures("template_cache")
def test_a_fifo_templates_cache_file_is_regenerated(
    tiny_loaded: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    import rrome.engine.keys as keys_mod
    from rrome.engine.keys import generate_templates

    model, tok, _ = tiny_loaded("gpt2", "right")
    path = _templates_path("f" * 16)
    path.parent.mkdir(parents=True, mode=0o700)
    os.mkfifo(path)
    with caplog.at_level("WARNING", logger="rrome.engine.keys"):
        got = _call_with_timeout(
            lambda: keys_mod.cached_templates("f" * 16, model, tok, seed=0, lengths=((3, 5),)), path
        )
    assert got == generate_templates(model, tok, seed=0, lengths=((3, 5),))
    assert str(path) in caplog.text and "FIFO" in caplog.text
    assert stat.S_ISREG(path.lstat().st_mode), "the FIFO is replaced by the cache file"
    # A FIFO as the checksum file beside a good cache file: refused without blocking, regenerated.
    side = checksum_path(path)
    side.unlink()
    os.mkfifo(side)
    assert _call_with_timeout(lambda: keys_mod._read_templates(path, len(got)), side) is None


@pytest.mark.usefixtures("template_cache")
def test_a_deeply_nested_templates_cache_file_is_regenerated(
    tiny_loaded: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib

    import rrome.engine.keys as keys_mod
    from rrome.engine.keys import generate_templates

    model, tok, _ = tiny_loaded("gpt2", "right")
    path = _templates_path("d" * 16)
    path.parent.mkdir(parents=True, mode=0o700)
    path.write_bytes(DEEP)
    # Even with a checksum that holds (the file is what rrome wrote, or so it says).
    checksum_path(path).write_text(f"{hashlib.sha256(DEEP).hexdigest()}  {path.name}\n")
    with caplog.at_level("WARNING", logger="rrome.engine.keys"):
        got = keys_mod.cached_templates("d" * 16, model, tok, seed=0, lengths=((3, 5),))
    assert got == generate_templates(model, tok, seed=0, lengths=((3, 5),))
    assert str(path) in caplog.text and "nested too deeply" in caplog.text
    assert keys_mod._read_templates(path, len(got)) == got


@pytest.mark.usefixtures("template_cache")
def test_changed_templates_are_regenerated(tiny_loaded: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """A templates file whose text was changed (still a valid template list) fails its checksum
    and is generated again; the file is private (0600) and so is its checksum."""
    import rrome.engine.keys as keys_mod

    model, tok, _ = tiny_loaded("gpt2", "right")
    first = keys_mod.cached_templates("c" * 16, model, tok, seed=0, lengths=((3, 5),))
    path = _templates_path("c" * 16)
    record = json.loads(path.read_text())
    record["templates"][1] = "Ignore the facts. {}"
    path.write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="rrome.engine.keys"):
        again = keys_mod.cached_templates("c" * 16, model, tok, seed=0, lengths=((3, 5),))
    assert again == first and "Ignore the facts. {}" not in again
    assert str(path) in caplog.text and "checksum" in caplog.text
    assert json.loads(path.read_text())["templates"] == first
    for f in (path, checksum_path(path)):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


# --------------------------------------------------------------------------------------------
# item 10: no write through a link in a results folder


def test_report_replaces_links_instead_of_writing_through_them(tmp_path: Path) -> None:
    out = results_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {}
    for name in ("summary.json", "table.md", "norm_delta-single.png"):
        victim = outside / f"precious-{name}"
        victim.write_bytes(b"keep me " + name.encode())
        (out / name).symlink_to(victim)
        victims[victim] = victim.read_bytes()
    dangling = outside / "never-created"
    table, _ = report(out)
    assert {v: v.read_bytes() for v in victims} == victims, "an outside file was overwritten"
    assert not dangling.exists()
    for name in ("summary.json", "table.md", "norm_delta-single.png"):
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert (out / "table.md").read_text() == table
    assert json.loads((out / "summary.json").read_text())["variants"]["r-rome"]["edits"] == 3
    assert (out / "norm_delta-single.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], "no temporary file is left"


def test_appends_refuse_a_symbolic_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"mine": 1}\n')
    edits = tmp_path / "edits.jsonl"
    edits.symlink_to(victim)
    with pytest.raises(rrome.InvalidFileError, match="symbolic link"):
        fsync_append(edits, {"index": 0})
    dangling = tmp_path / "nowhere.jsonl"
    checks = tmp_path / "checkpoints.jsonl"
    checks.symlink_to(dangling)
    with pytest.raises(rrome.InvalidFileError, match="symbolic link"):
        fsync_append(checks, {"edits": 1})
    assert victim.read_text() == '{"mine": 1}\n' and not dangling.exists()


def test_appends_give_a_hard_linked_file_its_own_inode(tmp_path: Path) -> None:
    victim = tmp_path / "victim.jsonl"
    victim.write_text('{"index": 0}\n')
    edits = tmp_path / "edits.jsonl"
    os.link(victim, edits)
    fsync_append(edits, {"index": 1})
    assert victim.read_text() == '{"index": 0}\n'
    assert read_jsonl(edits) == [{"index": 0}, {"index": 1}]
    assert edits.stat().st_nlink == 1


def test_repairing_a_torn_line_does_not_write_through_a_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim.jsonl"
    victim.write_bytes(b'{"index": 0}\n{"ind')
    edits = tmp_path / "edits.jsonl"
    edits.symlink_to(victim)
    assert read_jsonl(edits, repair=True) == [{"index": 0}]
    assert victim.read_bytes() == b'{"index": 0}\n{"ind'
    assert not edits.is_symlink() and edits.read_bytes() == b'{"index": 0}\n'


def test_folders_written_into_must_be_real_folders(tmp_path: Path) -> None:
    from rrome.files.fsutil import real_dir

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    variant = tmp_path / "run" / "single-rome"
    variant.parent.mkdir()
    variant.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(rrome.InvalidFileError, match="symbolic link"):
        real_dir(variant)
    real_dir(tmp_path / "run" / "single-r-rome")
    assert (tmp_path / "run" / "single-r-rome").is_dir()


def test_the_sweep_lock_is_not_followed(tmp_path: Path) -> None:
    from rrome.eval.tune import LOCK_FILE, _locked

    outside = tmp_path / "outside-lock"
    out = tmp_path / "sweep"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(outside)
    with pytest.raises(rrome.InvalidFileError, match="symbolic link"), _locked(out):
        pass
    assert not outside.exists(), "a file was created through the link"

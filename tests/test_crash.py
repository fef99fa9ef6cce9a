"""Crash safety: the Rust core aborts at a named step when RROME_CRASH_AT says so.

A bf16 Llama checkpoint in several shards gets a batch touching two tensors in different
shards. After a crash at any step, recovery leaves each tensor entirely old or entirely new
(old before the commit point, new after it), every other byte unchanged, and an edit log
that agrees with the bytes.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from _helpers import (
    EDITS_FILE,
    STATE_DIR,
    TARGETS,
    assert_only_tensors_changed,
    file_hashes,
    leftovers,
    math_shape,
    random_delta,
    region_sha,
    run_cli,
    shard_hashes,
    shard_of,
    without_lock,
)
from crash_harness import COPY_SHARD, copy_delta, make_deltas
from tiny_models import build_synthetic_checkpoint

import rrome

pytestmark = pytest.mark.slow  # rrome processes aborted at every named step, then recovered

FAMILY, DTYPE = "llama", "bf16"
IN_PLACE_STEPS = ["journal-written", "patch-region", "patched", "committed"]


@dataclass
class Case:
    pristine: Path
    model: Path
    bundle: Path
    deltas: list[rrome.Delta]
    tensors: list[str]  # in the order the batch edits them
    old: dict[str, str]  # tensor -> sha256 of its stored bytes before the batch
    new: dict[str, str]  # ... after the batch
    new2: dict[str, str]  # ... after the batch applied twice
    shards_old: dict[str, str]
    shards_new: dict[str, str]
    shards_new2: dict[str, str]


@pytest.fixture
def case(
    tiny_copy: Callable[..., Path],
    tiny_dir: Callable[..., Path],
    tmp_path: Path,
) -> Case:
    pristine = tiny_dir(FAMILY, dtype=DTYPE, sharded=True)
    model = tiny_copy(FAMILY, dtype=DTYPE, sharded=True)
    t1, t0, layout = TARGETS[FAMILY]
    assert shard_of(model, t1) != shard_of(model, t0), "the two edited tensors should live in different shards"
    d_out, d_in = math_shape(model, t1, layout)
    rng = np.random.default_rng(2024)
    deltas = [
        random_delta(rng, t1, d_out, d_in, layout, 1.0, meta={"step": 0}),
        random_delta(rng, t1, d_out, d_in, layout, -0.5),
        random_delta(rng, t0, d_out, d_in, layout, 0.3, meta={"step": 2}),
    ]
    bundle = tmp_path / "bundle"
    rrome.save_deltas(bundle, deltas)

    # The expected results, from uninterrupted runs on a separate copy.
    oracle = tiny_copy(FAMILY, dtype=DTYPE, sharded=True, name="oracle")
    tensors = [t1, t0]
    old = {t: region_sha(oracle, t) for t in tensors}
    shards_old = shard_hashes(oracle)
    rrome.apply_deltas(oracle, deltas, again=True)
    new = {t: region_sha(oracle, t) for t in tensors}
    shards_new = shard_hashes(oracle)
    rrome.apply_deltas(oracle, deltas, again=True)
    new2 = {t: region_sha(oracle, t) for t in tensors}
    shards_new2 = shard_hashes(oracle)
    shutil.rmtree(oracle)
    assert all(old[t] != new[t] != new2[t] for t in tensors)
    return Case(pristine, model, bundle, deltas, tensors, old, new, new2, shards_old, shards_new, shards_new2)


def crash(*args: str | Path, step: str) -> None:
    proc = run_cli(*args, crash_at=step)
    assert proc.returncode == -signal.SIGABRT, (
        f"expected an abort at {step!r}; got exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )


def recover_cli(model: Path) -> str:
    proc = run_cli("recover", model)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def tensor_states(c: Case) -> list[str]:
    out = []
    for t in c.tensors:
        sha = region_sha(c.model, t)
        out.append("old" if sha == c.old[t] else "new" if sha == c.new[t] else "torn")
    return out


def assert_log(model: Path, batches: list[int]) -> None:
    if not batches:
        assert not (model / EDITS_FILE).exists()
        assert rrome.inspect(model).edits == []
        return
    assert [r.batch for r in rrome.load_deltas(model)] == batches
    assert [e.batch for e in rrome.inspect(model).edits] == batches


# --- in place -------------------------------------------------------------------------------


@pytest.mark.parametrize("step", IN_PLACE_STEPS)
def test_crash_then_recover(case: Case, step: str) -> None:
    crash("apply-deltas", "--again", case.bundle, case.model, step=step)

    # The state the crash left: every step here comes before the journal is finalised.
    info = rrome.inspect(case.model)
    assert info.pending, "an interrupted write must be reported as pending"
    assert (case.model / STATE_DIR / "journal.safetensors").is_file()
    at_crash = {
        "journal-written": ["old", "old"],
        "patch-region": ["new", "old"],  # aborted right after the first region's write
        "patched": ["new", "new"],
        "committed": ["new", "new"],
    }[step]
    assert tensor_states(case) == at_crash
    assert_log(case.model, [1, 1, 1] if step == "committed" else [])

    out = recover_cli(case.model)
    committed = step == "committed"
    assert ("completed batch 1" if committed else "rolled back uncommitted batch 1") in out

    want = case.new if committed else case.old
    assert {t: region_sha(case.model, t) for t in case.tensors} == want
    assert shard_hashes(case.model) == (case.shards_new if committed else case.shards_old)
    assert_only_tensors_changed(case.pristine, case.model, case.tensors)
    # The edit log holds the batch exactly when the new bytes are there.
    assert_log(case.model, [1, 1, 1] if committed else [])
    assert rrome.inspect(case.model).pending == []
    assert leftovers(case.model) == []
    undo = case.model / STATE_DIR / "undo" / "batch-000001.safetensors"
    assert undo.is_file() == committed

    # Recovery is idempotent.
    assert "nothing to recover" in recover_cli(case.model)
    assert shard_hashes(case.model) == (case.shards_new if committed else case.shards_old)

    if committed:
        # The rolled-forward batch reverts exactly.
        proc = run_cli("revert", case.model)
        assert proc.returncode == 0, proc.stderr
        assert shard_hashes(case.model) == case.shards_old
        assert_log(case.model, [])


@pytest.mark.parametrize("step", IN_PLACE_STEPS)
def test_crash_then_next_apply_recovers_first(case: Case, step: str) -> None:
    crash("apply-deltas", "--again", case.bundle, case.model, step=step)
    proc = run_cli("apply-deltas", "--again", case.bundle, case.model)
    assert proc.returncode == 0, proc.stderr
    if step == "committed":
        # The crashed batch was committed: it is rolled forward and this run is batch 2.
        assert "batch 2" in proc.stdout
        assert shard_hashes(case.model) == case.shards_new2
        assert {t: region_sha(case.model, t) for t in case.tensors} == case.new2
        assert_log(case.model, [1, 1, 1, 2, 2, 2])
    else:
        assert "batch 1" in proc.stdout
        assert shard_hashes(case.model) == case.shards_new
        assert_log(case.model, [1, 1, 1])
    assert_only_tensors_changed(case.pristine, case.model, case.tensors)
    assert rrome.inspect(case.model).pending == []
    assert leftovers(case.model) == []

    assert rrome.revert(case.model, all=True)[-1] == 1
    assert shard_hashes(case.model) == case.shards_old
    assert_log(case.model, [])


def test_crash_then_api_call_recovers_first(case: Case) -> None:
    # revert() recovers before it looks for batches: an uncommitted crash leaves nothing to revert.
    crash("apply-deltas", "--again", case.bundle, case.model, step="patched")
    with pytest.raises(rrome.RevertError):
        rrome.revert(case.model)
    assert shard_hashes(case.model) == case.shards_old
    assert leftovers(case.model) == []
    # recover() through the API reports what it did.
    crash("apply-deltas", "--again", case.bundle, case.model, step="committed")
    actions = rrome.recover(case.model)
    assert len(actions) == 1 and "completed batch 1" in actions[0]
    assert rrome.recover(case.model) == []
    assert shard_hashes(case.model) == case.shards_new


# --- revert ---------------------------------------------------------------------------------


# Steps of a revert: the marker is written ("revert-marked"), each region is restored
# ("restore-region"), the edit log shrinks: its JSON lines are replaced before its tensor file
# ("log-shrunk" lies between the two).
REVERT_STEPS = ["revert-marked", "restore-region", "log-shrunk"]


@pytest.mark.parametrize("step", REVERT_STEPS)
def test_crash_during_revert(case: Case, step: str) -> None:
    rrome.apply_deltas(case.model, case.deltas, again=True)
    assert shard_hashes(case.model) == case.shards_new
    crash("revert", case.model, step=step)

    assert rrome.inspect(case.model).pending, "an interrupted revert must be reported as pending"
    assert (case.model / STATE_DIR / "revert.json").is_file()
    # restore-region aborts right after the first region is written back.
    at_crash = {"revert-marked": ["new", "new"], "restore-region": ["old", "new"], "log-shrunk": ["old", "old"]}
    assert tensor_states(case) == at_crash[step]

    out = recover_cli(case.model)
    assert "finished the interrupted revert of batch 1" in out
    assert shard_hashes(case.model) == case.shards_old
    assert_only_tensors_changed(case.pristine, case.model, [])
    assert_log(case.model, [])
    assert rrome.inspect(case.model).pending == []
    assert leftovers(case.model) == []
    assert not (case.model / STATE_DIR / "undo" / "batch-000001.safetensors").exists()
    assert "nothing to recover" in recover_cli(case.model)


@pytest.mark.parametrize("step", REVERT_STEPS)
def test_crash_during_revert_of_second_batch(case: Case, step: str) -> None:
    rrome.apply_deltas(case.model, case.deltas, again=True)
    rrome.apply_deltas(case.model, case.deltas, again=True)
    assert shard_hashes(case.model) == case.shards_new2
    crash("revert", case.model, step=step)
    assert rrome.inspect(case.model).pending
    recover_cli(case.model)
    # Only batch 2 is undone: the bytes and the log are those after batch 1.
    assert shard_hashes(case.model) == case.shards_new
    assert_log(case.model, [1, 1, 1])
    assert leftovers(case.model) == []
    assert rrome.revert(case.model) == [1]
    assert shard_hashes(case.model) == case.shards_old


# --- to a copy ------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["pristine", "edited"])
@pytest.mark.parametrize("step", ["copied", "copy-ready"])
def test_crash_during_copy(case: Case, tmp_path: Path, step: str, source: str) -> None:
    if source == "edited":
        # A source that already carries an in-place batch (and so its undo data).
        rrome.apply_deltas(case.model, case.deltas, again=True)
    before = without_lock(file_hashes(case.model))
    out = tmp_path / "edited-copy"
    partial = tmp_path / ".edited-copy.rrome-partial"

    crash("apply-deltas", "--again", "--out", out, case.bundle, case.model, step=step)
    assert not out.exists()
    assert partial.is_dir(), "the crashed run's hidden build folder is left behind"
    assert without_lock(file_hashes(case.model)) == before, "the source changed"
    assert rrome.inspect(case.model).pending == []

    proc = run_cli("apply-deltas", "--again", "--out", out, case.bundle, case.model)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists(), "the stale partial folder must be cleared"
    assert out.is_dir()
    assert without_lock(file_hashes(case.model)) == before, "the source changed"

    if source == "pristine":
        assert shard_hashes(out) == case.shards_new
        assert_log(out, [1, 1, 1])
    else:
        assert shard_hashes(out) == case.shards_new2
        assert_log(out, [1, 1, 1, 2, 2, 2])
    assert_only_tensors_changed(case.pristine, out, case.tensors)
    assert leftovers(out) == []
    assert rrome.revert(out, all=True)[-1] == 1
    assert shard_hashes(out) == case.shards_old


# --- un-sharing a hard-linked shard before an in-place write ----------------------------------

# Steps of giving a shard that a copy shares by hard link an inode of its own: the private copy
# is written and flushed beside it ("unshare-copied"), then renamed over it ("unshared").
UNSHARE_STEPS = ["unshare-copied", "unshared"]


def _shared_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A synthetic source and a copy of it made with --out that shares two of its three shards."""
    src = build_synthetic_checkpoint(tmp_path / "src")
    out = tmp_path / "copy"
    rrome.apply_deltas(src, [copy_delta()], out_dir=out, link_untouched=True, again=True)
    shared = [s for s in shard_hashes(src) if s != COPY_SHARD]
    assert shared and all((src / s).samefile(out / s) for s in shared)
    return src, out


@pytest.mark.parametrize("edit", ["copy", "source"])
@pytest.mark.parametrize("step", UNSHARE_STEPS)
def test_crash_while_unsharing_before_apply(tmp_path: Path, step: str, edit: str) -> None:
    src, out = _shared_pair(tmp_path)
    edited, other = (out, src) if edit == "copy" else (src, out)
    bundle = tmp_path / "bundle"
    rrome.save_deltas(bundle, make_deltas())
    before_edited = without_lock(file_hashes(edited))
    before_other = without_lock(file_hashes(other))

    crash("apply-deltas", "--again", bundle, edited, step=step)
    tmp_left = [p.name for p in edited.iterdir() if ".rrome-tmp-" in p.name]
    assert bool(tmp_left) == (step == "unshare-copied"), tmp_left
    # Nothing but the inode of one shard may have changed: the bytes are all as they were.
    assert without_lock(file_hashes(other)) == before_other
    assert {k: v for k, v in without_lock(file_hashes(edited)).items() if ".rrome-tmp-" not in k} == before_edited

    out_text = recover_cli(edited)
    assert ("removed unfinished temporary file" in out_text) == (step == "unshare-copied")
    assert leftovers(edited) == [] and leftovers(other) == []
    assert without_lock(file_hashes(edited)) == before_edited
    assert without_lock(file_hashes(other)) == before_other
    assert rrome.inspect(edited).pending == []

    # The next apply un-shares what is still shared and edits only its own folder.
    proc = run_cli("apply-deltas", "--again", bundle, edited)
    assert proc.returncode == 0, proc.stderr
    assert without_lock(file_hashes(other)) == before_other
    assert shard_hashes(edited) != {k: before_edited[k] for k in shard_hashes(edited)}
    assert leftovers(edited) == []


@pytest.mark.parametrize("step", UNSHARE_STEPS)
def test_crash_while_unsharing_during_revert(tmp_path: Path, step: str) -> None:
    src = build_synthetic_checkpoint(tmp_path / "src")
    pristine = shard_hashes(src)
    rrome.apply_deltas(src, make_deltas(), again=True)  # batch 1 in place
    out = tmp_path / "copy"
    rrome.apply_deltas(
        src, [copy_delta()], out_dir=out, link_untouched=True, again=True
    )  # shares the shards batch 1 changed
    assert any((src / s).samefile(out / s) for s in pristine if s != COPY_SHARD)
    before_out = without_lock(file_hashes(out))

    crash("revert", src, step=step)
    assert rrome.inspect(src).pending, "an interrupted revert must be reported as pending"
    assert without_lock(file_hashes(out)) == before_out
    recover_cli(src)
    assert shard_hashes(src) == pristine
    assert_log(src, [])
    assert leftovers(src) == []
    assert without_lock(file_hashes(out)) == before_out
    assert rrome.revert(out, all=True) == [2, 1]
    assert shard_hashes(out) == pristine

"""A copy made with ``--out --link-untouched`` shares the shards no delta touches with its
source, by hard link (a plain ``--out`` copy shares nothing).

That is only safe because no in-place write goes through a shared inode: an in-place apply
(or revert) that must change a shard with other hard links first gives it an inode of its
own. These tests check both halves: what is shared, and that an edit on either side leaves
the other folder's bytes exactly as they were.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from _helpers import STATE_DIR, file_hashes, shard_hashes, without_lock
from crash_harness import COPY_SHARD, copy_delta, make_deltas
from tiny_models import SYNTHETIC_TENSORS, build_synthetic_checkpoint

import rrome

SHARDS = sorted({shard for _, _, shard in SYNTHETIC_TENSORS.values()})


def same_inode(a: Path, b: Path) -> bool:
    return a.samefile(b)


def no_tmp(folder: Path) -> bool:
    return not [p for d in (folder, folder / STATE_DIR) if d.exists() for p in d.iterdir() if ".rrome-tmp-" in p.name]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return build_synthetic_checkpoint(tmp_path / "src")


def test_copy_links_untouched_shards_and_copies_edited_ones(src: Path, tmp_path: Path) -> None:
    before = without_lock(file_hashes(src))
    out = tmp_path / "copy"
    rrome.apply_deltas(src, [copy_delta()], out_dir=out, link_untouched=True)
    assert without_lock(file_hashes(src)) == before
    for shard in SHARDS:
        assert same_inode(src / shard, out / shard) == (shard != COPY_SHARD), shard
    assert os.stat(src / SHARDS[0]).st_nlink == 2
    # Side files are copied, not shared.
    assert not same_inode(src / "config.json", out / "config.json")
    assert shard_hashes(out)[COPY_SHARD] != shard_hashes(src)[COPY_SHARD]
    # The copy reverts to the source's bytes.
    rrome.revert(out)
    assert shard_hashes(out) == shard_hashes(src)


def test_copy_shares_nothing_by_default(src: Path, tmp_path: Path) -> None:
    rrome.apply_deltas(src, make_deltas())  # batch 1: the source gets an undo file too
    out = tmp_path / "copy"
    rrome.apply_deltas(src, [copy_delta()], out_dir=out)
    files = [p.relative_to(out) for p in out.rglob("*") if p.is_file()]
    assert any(f.parts[0] == STATE_DIR for f in files)
    for rel in files:
        assert os.stat(out / rel).st_nlink == 1, rel


def test_cli_link_untouched(src: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from rrome.cli import main

    bundle = tmp_path / "bundle"
    rrome.save_deltas(bundle, [copy_delta()])
    runner = CliRunner()
    refused = runner.invoke(main, ["apply-deltas", str(bundle), str(src), "--link-untouched"])
    assert refused.exit_code == 2 and "--out" in refused.output
    assert rrome.inspect(src).edits == []
    out = tmp_path / "copy"
    done = runner.invoke(main, ["apply-deltas", str(bundle), str(src), "--out", str(out), "--link-untouched"])
    assert done.exit_code == 0, done.output
    assert [s for s in SHARDS if (src / s).samefile(out / s)] == [s for s in SHARDS if s != COPY_SHARD]


def test_copy_falls_back_to_copying_across_filesystems(src: Path, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev or not os.access(shm, os.W_OK):
        pytest.skip("no second filesystem to copy to")
    parent = Path(os.path.realpath(shm)) / f"rrome-test-{os.getpid()}"
    parent.mkdir()
    try:
        out = parent / "copy"
        rrome.apply_deltas(src, [copy_delta()], out_dir=out, link_untouched=True)
        for shard in SHARDS:
            assert not same_inode(src / shard, out / shard)
            assert os.stat(src / shard).st_nlink == 1
        assert {s: h for s, h in shard_hashes(out).items() if s != COPY_SHARD} == {
            s: h for s, h in shard_hashes(src).items() if s != COPY_SHARD
        }
    finally:
        shutil.rmtree(parent)


@pytest.mark.parametrize("edit", ["copy", "source"])
def test_in_place_edit_of_a_shared_shard_leaves_the_other_folder_alone(edit: str, src: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    rrome.apply_deltas(src, [copy_delta()], out_dir=out, link_untouched=True)
    edited, other = (out, src) if edit == "copy" else (src, out)
    other_before = without_lock(file_hashes(other))
    edited_before = shard_hashes(edited)
    # make_deltas touches all three shards: two of them are shared.
    rrome.apply_deltas(edited, make_deltas())
    assert without_lock(file_hashes(other)) == other_before
    for shard in SHARDS:
        assert not same_inode(src / shard, out / shard), shard
        assert os.stat(edited / shard).st_nlink == 1
    assert all(shard_hashes(edited)[s] != edited_before[s] for s in SHARDS)
    assert no_tmp(edited) and no_tmp(other)
    # Reverting it restores its own bytes and still leaves the other folder alone.
    rrome.revert(edited)
    assert shard_hashes(edited) == edited_before
    assert without_lock(file_hashes(other)) == other_before


def test_revert_of_a_shared_shard_leaves_the_copy_alone(src: Path, tmp_path: Path) -> None:
    pristine = shard_hashes(src)
    rrome.apply_deltas(src, make_deltas())  # batch 1 in place, all three shards
    out = tmp_path / "copy"
    rrome.apply_deltas(src, [copy_delta()], out_dir=out, link_untouched=True)  # batch 2 in the copy only
    assert same_inode(src / SHARDS[0], out / SHARDS[0])
    undo1 = Path(STATE_DIR) / "undo" / "batch-000001.safetensors"
    assert same_inode(src / undo1, out / undo1)
    out_before = without_lock(file_hashes(out))
    assert rrome.revert(src) == [1]
    assert shard_hashes(src) == pristine
    assert without_lock(file_hashes(out)) == out_before
    # The copy still holds both batches and reverts them exactly through its own undo files.
    assert rrome.revert(out, all=True) == [2, 1]
    assert shard_hashes(out) == pristine

"""Models where users keep them: a Hugging Face cache snapshot as a model folder (docs/design.md §3).

The cache is built the way huggingface_hub lays it out (``models--org--name/{blobs,refs,snapshots}``,
snapshot files as relative links into ``blobs/``) and checked with the library's own
``scan_cache_dir`` before rrome touches it. rrome reads it, copies it with ``--out`` (the copy
holds the blobs as regular files), never writes it in place, refuses any other link in it, and
resolves a model id through it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from _helpers import assert_one_line_error, file_hashes, run_cli
from test_untrusted_folder import tree

import rrome
from rrome.files.locate import is_model_id

REPO_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def build_cache(hub: Path, model_dir: Path) -> Path:
    """``model_dir``'s files as the snapshot ``main`` of REPO_ID in the cache ``hub``; returns
    the snapshot folder."""
    repo = hub / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for f in sorted(model_dir.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def cache(tiny_dir, tmp_path: Path) -> tuple[Path, Path]:
    """(hub folder, snapshot folder) holding the tiny llama model."""
    from huggingface_hub import scan_cache_dir

    hub = tmp_path / "hub"
    snapshot = build_cache(hub, tiny_dir("llama"))
    info = scan_cache_dir(hub)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and repo.repo_type == "model" and repo.refs == {"main": next(iter(repo.revisions))}
    (rev,) = repo.revisions
    assert rev.commit_hash == REVISION and {f.file_name for f in rev.files} == {p.name for p in snapshot.iterdir()}
    return hub, snapshot


def _delta(model_dir: Path) -> rrome.Delta:
    t = next(t for t in rrome.Checkpoint(model_dir).tensors() if t.name.endswith("layers.0.mlp.down_proj.weight"))
    d_out, d_in = t.shape
    rng = np.random.default_rng(3)
    return rrome.Delta(t.name, rng.standard_normal(d_in), rng.standard_normal(d_out), layout="out_in")


def test_a_snapshot_is_read_copied_with_out_and_never_written(cache, tmp_path: Path) -> None:
    hub, snapshot = cache
    delta = _delta(snapshot)  # reading follows the links
    rrome.save_deltas(tmp_path / "bundle", [delta])
    blobs_before = file_hashes(hub)
    before = tree(hub)
    line = assert_one_line_error(run_cli("apply-deltas", tmp_path / "bundle", snapshot), "--out")
    assert "Hugging Face cache" in line
    with pytest.raises(rrome.CheckpointError, match="--out"):
        rrome.revert(snapshot)
    assert tree(hub) == before  # not even a .rrome folder appeared
    out = tmp_path / "edited"
    proc = run_cli("apply-deltas", tmp_path / "bundle", snapshot, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert file_hashes(hub) == blobs_before and tree(hub) == before
    assert not any(p.is_symlink() for p in out.rglob("*"))
    edited = rrome.Checkpoint(out).tensor(delta.tensor)
    assert edited is not None
    assert [e.batch for e in rrome.inspect(out).edits] == [1]
    # The copy is an ordinary folder: in place works there, and revert gives the blob's bytes.
    assert run_cli("revert", out).returncode == 0
    shard = next(p for p in out.iterdir() if p.name.endswith(".safetensors") and "rrome" not in p.name)
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == (snapshot / shard.name).resolve().name


@pytest.mark.parametrize("where", ["outside the cache", "another repository of the cache", "the repository's refs"])
def test_any_other_link_in_a_snapshot_is_refused(cache, tmp_path: Path, where: str) -> None:
    hub, snapshot = cache
    rrome.save_deltas(tmp_path / "bundle", [_delta(snapshot)])
    if where == "outside the cache":
        target = tmp_path / "secret.txt"
    elif where == "another repository of the cache":
        other = hub / "models--someone--else" / "blobs"
        other.mkdir(parents=True)
        target = other / "abc"
    else:
        target = snapshot.parent.parent / "refs" / "main"
    if not target.exists():
        target.write_text("not for the copy")
    (snapshot / "notes.txt").symlink_to(target)
    assert_one_line_error(
        run_cli("apply-deltas", tmp_path / "bundle", snapshot, "--out", tmp_path / "c"), "notes.txt", "symbolic link"
    )
    assert not (tmp_path / "c").exists()


def test_a_model_id_resolves_through_the_cache_offline(cache, tmp_path: Path) -> None:
    hub, snapshot = cache
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("inspect", REPO_ID, env=env)
    assert proc.returncode == 0, proc.stderr
    assert str(snapshot) in proc.stdout
    rrome.save_deltas(tmp_path / "bundle", [_delta(snapshot)])
    proc = run_cli("apply-deltas", tmp_path / "bundle", REPO_ID, "--out", tmp_path / "c", env=env)
    assert proc.returncode == 0, proc.stderr
    line = assert_one_line_error(run_cli("inspect", "tiny-org/not-cached", env=env), "tiny-org/not-cached")
    assert str(hub) in line and "nothing is downloaded" in line


def test_model_id_shapes() -> None:
    assert is_model_id("google/gemma-3-270m") and is_model_id("HuggingFaceTB/SmolLM2-135M-Instruct")
    for text in ("gemma", "a/b/c", "../x", "/abs/path", "a/..", "./m", "a b/c"):
        assert not is_model_id(text), text


@pytest.mark.slow  # rrome apply in a subprocess that loads a model
def test_rrome_apply_takes_a_model_id_and_refuses_the_snapshot_in_place(cache, tmp_path: Path) -> None:
    hub, _ = cache
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "{} is located in", "subject": "The Eiffel Tower", "target_new": "Rome"}))
    env = {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "RROME_CACHE_DIR": str(tmp_path / "rrome-cache"),
        "OMP_NUM_THREADS": "1",
    }
    before = tree(hub)
    line = assert_one_line_error(run_cli("apply", edits, REPO_ID, "--no-progress", env=env), "--out")
    assert "Hugging Face cache" in line and not (tmp_path / "rrome-cache").exists()  # refused before any work
    out = tmp_path / "edited"
    proc = run_cli("apply", edits, REPO_ID, "--out", out, "--no-progress", env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 1 edit(s) as batch 1" in proc.stdout and tree(hub) == before
    assert not any(p.is_symlink() for p in out.rglob("*"))

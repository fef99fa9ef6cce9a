"""End-to-end: rank-one deltas written into real (tiny) transformers checkpoints.

For every family (GPT-2 Conv1D ``in_out`` / Llama ``nn.Linear`` ``out_in``), storage dtype,
single-file or sharded layout, in place or to a copy: the edited weights that transformers
loads are exactly the float32 reference of the arithmetic contract, no other byte changes,
and in-place batches revert to the exact original bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import (
    DELTAS_FILE,
    EDITS_FILE,
    TARGETS,
    assert_only_tensors_changed,
    file_hashes,
    math_shape,
    random_delta,
    read_header,
    region_sha,
    shard_files,
    shard_hashes,
    tensor_region,
    without_lock,
)
from tiny_models import DTYPES, torch_dtype

import rrome

SCALES = (1.0, -0.5, 0.3)


def make_deltas(model_dir: Path, family: str, seed: int = 0) -> list[rrome.Delta]:
    """Two deltas on the layer-1 tensor (scales 1.0 and -0.5), one on layer 0's (scale 0.3)."""
    t1, t0, layout = TARGETS[family]
    rng = np.random.default_rng(seed)
    d_out, d_in = math_shape(model_dir, t1, layout)
    assert math_shape(model_dir, t0, layout) == (d_out, d_in)
    return [
        random_delta(rng, t1, d_out, d_in, layout, SCALES[0], meta={"request": "a", "k": [1, 2], "seed": seed}),
        random_delta(rng, t1, d_out, d_in, layout, SCALES[1], meta={"request": "b", "nested": {"x": 1.5}}),
        random_delta(rng, t0, d_out, d_in, layout, SCALES[2]),
    ]


def reference(original: torch.Tensor, deltas: Sequence[rrome.Delta]) -> torch.Tensor:
    """The contract in torch: decode to f32, add (f32(scale)·r) uᵀ term by term in math
    coordinates (separate f32 multiply and add), round once to the storage dtype."""
    layout = deltas[0].layout
    w32 = original.detach().float()
    if layout == "in_out":
        w32 = w32.T
    for d in deltas:
        assert d.layout == layout
        rs = torch.from_numpy(np.asarray(d.r, dtype=np.float32) * np.float32(d.scale))
        assert rs.dtype == torch.float32
        w32 = w32 + torch.outer(rs, torch.from_numpy(np.array(d.u, dtype=np.float32)))
    if layout == "in_out":
        w32 = w32.T
    return w32.contiguous().to(original.dtype)


def load_params(model_dir: Path, names: Sequence[str], dtype: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    params = dict(model.named_parameters())
    out = {}
    for n in names:
        p = params[n]
        assert p.dtype == torch_dtype(dtype), (n, p.dtype)
        out[n] = p.detach().clone()
    return out


def by_tensor(deltas: Sequence[rrome.Delta]) -> dict[str, list[rrome.Delta]]:
    out: dict[str, list[rrome.Delta]] = {}
    for d in deltas:
        out.setdefault(d.tensor, []).append(d)
    return out


def assert_matches_reference(
    result_dir: Path, original_params: dict[str, torch.Tensor], deltas: Sequence[rrome.Delta], dtype: str
) -> None:
    groups = by_tensor(deltas)
    got = load_params(result_dir, list(groups), dtype)
    for name, ds in groups.items():
        want = reference(original_params[name], ds)
        assert got[name].shape == original_params[name].shape
        # The update must be visible at all (guards against a vacuous comparison).
        assert not torch.equal(got[name], original_params[name]), f"{name} did not change"
        # The spec's tolerance for f32 is 1e-6 relative, but the formula is deterministic IEEE
        # arithmetic (one f32 multiply and one f32 add per term, one final rounding), so the
        # result must be bit-identical for every dtype, f32 included.
        assert torch.equal(got[name], want), (
            f"{name} ({dtype}): {int((got[name] != want).sum())} of {want.numel()} elements differ; "
            f"max abs diff {float((got[name].float() - want.float()).abs().max())}"
        )


def assert_log_matches(model_dir: Path, deltas: Sequence[rrome.Delta], batches: Sequence[int]) -> None:
    logged = rrome.load_deltas(model_dir)
    assert len(logged) == len(deltas)
    for rec, d, b in zip(logged, deltas, batches, strict=True):
        assert rec.batch == b
        assert isinstance(rec.applied_at, float) and rec.applied_at > 0
        assert rec.delta.tensor == d.tensor
        assert rec.delta.layout == d.layout
        assert rec.delta.scale == d.scale
        np.testing.assert_array_equal(rec.delta.u, d.u)
        np.testing.assert_array_equal(rec.delta.r, d.r)
        assert rec.delta.u.dtype == np.float32 and rec.delta.r.dtype == np.float32
        assert (None if rec.delta.meta is None else dict(rec.delta.meta)) == (None if d.meta is None else dict(d.meta))


def assert_inspect_reports(model_dir: Path, deltas: Sequence[rrome.Delta], batches: Sequence[int]) -> None:
    info = rrome.inspect(model_dir)
    assert info.pending == []
    edits = info.edits
    assert [e.batch for e in edits] == list(batches)
    assert [e.tensor for e in edits] == [d.tensor for d in deltas]
    assert [e.layout for e in edits] == [d.layout for d in deltas]
    assert [e.scale for e in edits] == [d.scale for d in deltas]
    assert [(e.d_out, e.d_in) for e in edits] == [(d.d_out, d.d_in) for d in deltas]
    assert all(e.undo is True for e in edits)
    ids = [e.id for e in edits]
    assert len(set(ids)) == len(ids)
    names = {t.name for t in info.tensors or []}
    assert {d.tensor for d in deltas} <= names
    assert sorted(s.file for s in info.shards) == shard_files(model_dir)
    # The JSON form `rrome inspect --json` prints says the same.
    as_dict = info.to_dict()
    assert [(e["batch"], e["id"], e["undo"]) for e in as_dict["edits"]] == [(e.batch, e.id, e.undo) for e in edits]
    assert [t["name"] for t in as_dict["tensors"]] == [t.name for t in info.tensors or []]
    assert as_dict["num_tensors"] == info.num_tensors == len(names)


@pytest.mark.parametrize("sharded", [False, True])
def test_checkpoint_lists_every_tensor_with_its_bytes(tiny_dir: Callable[..., Path], sharded: bool) -> None:
    model = tiny_dir("llama", dtype="bf16", sharded=sharded)
    ckpt = rrome.Checkpoint(model)
    listed = ckpt.tensors()
    assert [t.name for t in listed] == sorted(t.name for t in listed)
    assert ckpt.indexed is sharded and sorted(s.file for s in ckpt.shards) == shard_files(model)
    assert ckpt.num_tensors == len(listed) == sum(s.tensors for s in ckpt.shards)
    for t in listed:
        start, end = tensor_region(model / t.shard, t.name)
        entry = read_header(model / t.shard)[1][t.name]
        assert (t.dtype, t.shape, t.offset, t.len) == (entry["dtype"], entry["shape"], start, end - start)
        assert ckpt.tensor(t.name) == t
    assert ckpt.tensor("no.such.tensor") is None


CASES = [
    pytest.param(f, dt, sh, mode, id=f"{f}-{dt}-{'sharded' if sh else 'single'}-{mode}")
    for f in TARGETS
    for dt in DTYPES
    for sh in (False, True)
    for mode in ("inplace", "copy")
]


@pytest.mark.parametrize(("family", "dtype", "sharded", "mode"), CASES)
def test_apply_matches_reference_and_touches_nothing_else(
    tiny_copy: Callable[..., Path],
    tiny_dir: Callable[..., Path],
    tmp_path: Path,
    family: str,
    dtype: str,
    sharded: bool,
    mode: str,
) -> None:
    pristine = tiny_dir(family, dtype=dtype, sharded=sharded)
    model = tiny_copy(family, dtype=dtype, sharded=sharded)
    deltas = make_deltas(model, family)
    tensors = list(by_tensor(deltas))
    original_params = load_params(pristine, tensors, dtype)
    before = without_lock(file_hashes(model))
    before_shards = shard_hashes(model)

    out = tmp_path / "edited" if mode == "copy" else None
    rep = rrome.apply_deltas(model, deltas, out_dir=out)
    result = model if out is None else out

    assert rep.batch == 1 and rep.deltas == len(deltas)
    assert rep.tensors == tensors
    assert rep["batch"] == 1 and rep["tensors"] == tensors  # read as the dict it used to be
    with pytest.raises(KeyError):
        rep["nonsense"]
    assert Path(rep.model_dir) == result
    assert set(rep.shards) <= set(shard_files(model))

    assert_matches_reference(result, original_params, deltas, dtype)
    assert_only_tensors_changed(pristine, result, tensors)
    assert_log_matches(result, deltas, [1, 1, 1])
    assert_inspect_reports(result, deltas, [1, 1, 1])
    assert (result / EDITS_FILE).is_file() and (result / DELTAS_FILE).is_file()
    assert (result / ".rrome" / "undo" / "batch-000001.safetensors").is_file()

    if mode == "copy":
        # The source is untouched: every file it had is byte-identical; the only new entry is
        # the lock file rrome takes on the source while it reads it.
        after = file_hashes(model)
        assert without_lock(after) == before
        assert set(after) - set(before) <= {".rrome/lock"}
        assert not (model / EDITS_FILE).exists()
        assert rrome.inspect(model).edits == []
        assert not list(tmp_path.glob(".*rrome-partial*"))
        # The copy reverts to the source's bytes too.
        assert rrome.revert(out) == [1]
        assert shard_hashes(out) == before_shards
        assert not (out / EDITS_FILE).exists()
        return

    assert rrome.revert(model) == [1]
    assert shard_hashes(model) == before_shards
    assert_only_tensors_changed(pristine, model, [])
    assert not (model / EDITS_FILE).exists()
    assert not (model / DELTAS_FILE).exists()
    info = rrome.inspect(model)
    assert info.edits == [] and info.pending == []
    with pytest.raises(rrome.RevertError):
        rrome.revert(model)


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", "bf16"), ("llama", "f16"), ("llama", "f32")])
def test_two_batches_revert_all(
    tiny_copy: Callable[..., Path],
    tiny_dir: Callable[..., Path],
    family: str,
    dtype: str,
) -> None:
    model = tiny_copy(family, dtype=dtype, sharded=True)
    first = make_deltas(model, family, seed=1)
    second = make_deltas(model, family, seed=2)[:2]
    before = shard_hashes(model)
    tensors = list(by_tensor(first))
    original_params = load_params(model, tensors, dtype)

    assert rrome.apply_deltas(model, first).batch == 1
    assert rrome.apply_deltas(model, second).batch == 2
    # Two batches compose as if applied one after the other: batch 2 starts from batch 1's
    # rounded result, so compute the reference the same way.
    after_first = {n: reference(original_params[n], ds) for n, ds in by_tensor(first).items()}
    got = load_params(model, tensors, dtype)
    t1 = TARGETS[family][0]
    assert torch.equal(got[t1], reference(after_first[t1], second))
    t0 = TARGETS[family][1]
    assert torch.equal(got[t0], after_first[t0])
    assert_log_matches(model, first + second, [1, 1, 1, 2, 2])
    assert_inspect_reports(model, first + second, [1, 1, 1, 2, 2])

    assert rrome.revert(model, all=True) == [2, 1]
    assert shard_hashes(model) == before
    assert_only_tensors_changed(tiny_dir(family, dtype=dtype, sharded=True), model, [])
    assert not (model / EDITS_FILE).exists()
    assert not list((model / ".rrome" / "undo").glob("*"))
    assert rrome.inspect(model).edits == []


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", "f32"), ("llama", "bf16")])
def test_two_batches_revert_once_undoes_only_the_second(
    tiny_copy: Callable[..., Path], family: str, dtype: str
) -> None:
    model = tiny_copy(family, dtype=dtype, sharded=True)
    first = make_deltas(model, family, seed=3)
    second = make_deltas(model, family, seed=4)
    rrome.apply_deltas(model, first)
    after_first = shard_hashes(model)
    after_first_log = (model / EDITS_FILE).read_text()
    rrome.apply_deltas(model, second)
    assert shard_hashes(model) != after_first

    assert rrome.revert(model) == [2]
    assert shard_hashes(model) == after_first
    assert_log_matches(model, first, [1, 1, 1])
    assert_inspect_reports(model, first, [1, 1, 1])
    assert [json.loads(x)["id"] for x in (model / EDITS_FILE).read_text().splitlines()] == [
        json.loads(x)["id"] for x in after_first_log.splitlines()
    ]
    # The next batch number is reused after the revert, and batch 1 still reverts exactly.
    assert rrome.apply_deltas(model, second).batch == 2
    assert rrome.revert(model, all=True) == [2, 1]


def test_bundle_round_trip_preserves_everything(tmp_path: Path, tiny_dir: Callable[..., Path]) -> None:
    model = tiny_dir("llama", dtype="bf16")
    deltas = make_deltas(model, "llama", seed=5)
    rrome.save_deltas(tmp_path / "bundle", deltas)
    for where in (tmp_path / "bundle", tmp_path / "bundle" / EDITS_FILE, tmp_path / "bundle" / DELTAS_FILE):
        back = rrome.load_deltas(where)
        assert [r.id for r in back] == ["0", "1", "2"]
        assert all(r.batch is None and r.applied_at is None for r in back)
        for rec, d in zip(back, deltas, strict=True):
            np.testing.assert_array_equal(rec.delta.u, d.u)
            np.testing.assert_array_equal(rec.delta.r, d.r)
            assert (rec.delta.tensor, rec.delta.layout, rec.delta.scale) == (d.tensor, d.layout, d.scale)
            assert rec.delta.meta == d.meta


def test_region_hash_helper_agrees_with_report(tiny_copy: Callable[..., Path]) -> None:
    # Sanity check of the independent header parser used throughout these tests: the byte
    # range it names for the edited tensor is the one that changes and reverts.
    model = tiny_copy("llama", dtype="bf16", sharded=True)
    t1 = TARGETS["llama"][0]
    before = region_sha(model, t1)
    rrome.apply_deltas(model, make_deltas(model, "llama")[:1])
    assert region_sha(model, t1) != before
    rrome.revert(model)
    assert region_sha(model, t1) == before


@pytest.mark.parametrize(("family", "dtype"), [("gpt2", "f16"), ("llama", "bf16")])
def test_copy_of_an_edited_checkpoint_carries_its_log(
    tiny_copy: Callable[..., Path],
    tiny_dir: Callable[..., Path],
    tmp_path: Path,
    family: str,
    dtype: str,
) -> None:
    pristine = tiny_dir(family, dtype=dtype, sharded=True)
    model = tiny_copy(family, dtype=dtype, sharded=True)
    first = make_deltas(model, family, seed=6)
    second = make_deltas(model, family, seed=7)
    rrome.apply_deltas(model, first)
    before = without_lock(file_hashes(model))
    out = tmp_path / "copy"
    rep = rrome.apply_deltas(model, second, out_dir=out)
    assert rep.batch == 2

    assert without_lock(file_hashes(model)) == before
    assert_log_matches(model, first, [1, 1, 1])
    assert_log_matches(out, first + second, [1, 1, 1, 2, 2, 2])
    assert_inspect_reports(out, first + second, [1, 1, 1, 2, 2, 2])

    tensors = list(by_tensor(first))
    original = load_params(pristine, tensors, dtype)
    got = load_params(out, tensors, dtype)
    for name in tensors:
        want = reference(reference(original[name], by_tensor(first)[name]), by_tensor(second)[name])
        assert torch.equal(got[name], want), name
    assert_only_tensors_changed(pristine, out, tensors)

    # Both batches of the copy revert to the pristine bytes.
    assert rrome.revert(out, all=True) == [2, 1]
    assert shard_hashes(out) == shard_hashes(pristine)

"""SecondMoment (float64 Σ k kᵀ of float32 keys) and Cholesky solves against numpy and torch."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import rrome

N_KEYS = 2500  # > 1024, so the accumulator goes through several internal chunks


def rel_fro(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def keys(kind: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, d))
    if kind == "column-scales":
        k *= np.logspace(-6, 6, d) if d > 1 else np.array([1e6])
    elif kind == "huge-row":
        k[n // 3] *= 1e6
    elif kind == "offset":
        k += 100.0  # large common mean: cancellation-prone for naive centred formulas
    k = k.astype(np.float32)
    assert k.flags.c_contiguous and np.all(np.isfinite(k))
    return k


def accumulate(k: np.ndarray, splits: tuple[int, ...] = (700,)) -> rrome.SecondMoment:
    m = rrome.SecondMoment(k.shape[1])
    bounds = [0, *splits, k.shape[0]]
    for a, b in itertools.pairwise(bounds):
        m.update(np.ascontiguousarray(k[a:b]))
    return m


# --- SecondMoment ---------------------------------------------------------------------------


@pytest.mark.parametrize("d", [1, 7, 64])
@pytest.mark.parametrize("kind", ["normal", "column-scales", "huge-row", "offset"])
def test_moment_matches_numpy_and_torch(d: int, kind: str) -> None:
    k = keys(kind, N_KEYS, d, seed=d)
    m = accumulate(k)
    assert m.count == N_KEYS
    assert m.d == d
    k64 = k.astype(np.float64)
    want_sum = k64.T @ k64
    want = want_sum / N_KEYS

    got = m.moment()
    assert got.dtype == np.float64 and got.shape == (d, d)
    assert rel_fro(got, want) <= 1e-12
    np.testing.assert_array_equal(got, got.T)  # the full symmetric matrix, not one triangle

    s = m.sum()
    assert s.dtype == np.float64 and s.shape == (d, d)
    assert rel_fro(s, want_sum) <= 1e-12
    np.testing.assert_array_equal(got, s / N_KEYS)

    t64 = torch.from_numpy(k).to(torch.float64)
    want_t = ((t64.T @ t64) / N_KEYS).numpy()
    assert rel_fro(got, want_t) <= 1e-12


@pytest.mark.parametrize("d", [1, 7, 64])
def test_one_update_equals_many(d: int) -> None:
    k = keys("normal", N_KEYS, d, seed=10 + d)
    whole = accumulate(k, splits=())
    pieces = accumulate(k, splits=(1, 1023, 1024, 1025, 2048))
    assert whole.count == pieces.count == N_KEYS
    assert rel_fro(pieces.sum(), whole.sum()) <= 1e-12


@pytest.mark.parametrize("d", [1, 7, 64])
def test_merge_equals_whole(d: int) -> None:
    k = keys("column-scales", N_KEYS, d, seed=20 + d)
    whole = accumulate(k)
    parts = [accumulate(k[:900], splits=()), accumulate(k[900:1900], splits=()), accumulate(k[1900:], splits=())]
    merged = rrome.SecondMoment(d)
    for p in parts:
        merged.merge(p)
    assert merged.count == whole.count == N_KEYS
    assert rel_fro(merged.sum(), whole.sum()) <= 1e-12
    assert rel_fro(merged.moment(), whole.moment()) <= 1e-12
    # The merged-in parts are unchanged.
    assert [p.count for p in parts] == [900, 1000, 600]


def test_merge_rejects_other_width() -> None:
    a, b = rrome.SecondMoment(3), rrome.SecondMoment(4)
    b.update(np.ones((2, 4), np.float32))
    with pytest.raises(rrome.ShapeError):
        a.merge(b)
    assert a.count == 0


def test_save_load_round_trip(tmp_path: Path) -> None:
    k = keys("huge-row", N_KEYS, 7, seed=3)
    m = accumulate(k)
    m.metadata = {"model": "tiny"}
    assert m.metadata == {"model": "tiny"}
    path = tmp_path / "c0.safetensors"
    m.save(path)
    back = rrome.SecondMoment.load(path)
    assert back.count == N_KEYS
    assert back.d == 7
    assert back.metadata == {"model": "tiny"}
    np.testing.assert_array_equal(back.sum(), m.sum())
    np.testing.assert_array_equal(back.moment(), m.moment())
    # A loaded moment keeps accumulating like the original.
    extra = keys("normal", 50, 7, seed=4)
    back.update(extra)
    m.update(extra)
    assert back.count == m.count == N_KEYS + 50
    np.testing.assert_array_equal(back.sum(), m.sum())
    # The file is a plain safetensors file.
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(path)["sum"], m.sum() - (extra.astype(np.float64).T @ extra))


def test_save_load_str_path(tmp_path: Path) -> None:
    m = rrome.SecondMoment(2)
    m.update(np.array([[1.0, 2.0]], np.float32))
    m.save(str(tmp_path / "m.safetensors"))
    back = rrome.SecondMoment.load(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(back.sum(), [[1.0, 2.0], [2.0, 4.0]])
    assert back.metadata == {}


def test_update_rejects_float64() -> None:
    m = rrome.SecondMoment(4)
    with pytest.raises(TypeError):
        m.update(np.ones((3, 4), np.float64))
    assert m.count == 0


def test_update_rejects_non_contiguous_transpose() -> None:
    # ``k.T`` of a C-ordered float32 (d, N) array is an (N, d) Fortran-ordered view: it must be
    # refused (its memory is not row-major), not read as if it were.
    m = rrome.SecondMoment(4)
    k = np.random.default_rng(9).standard_normal((4, 10)).astype(np.float32)
    assert k.T.shape == (10, 4) and not k.T.flags.c_contiguous
    with pytest.raises(TypeError):
        m.update(k.T)
    assert m.count == 0


def test_update_rejects_strided() -> None:
    m = rrome.SecondMoment(4)
    with pytest.raises(TypeError):
        m.update(np.ones((10, 8), np.float32)[:, ::2])
    assert m.count == 0
    k = np.random.default_rng(9).standard_normal((4, 10)).astype(np.float32)
    m.update(np.ascontiguousarray(k.T))
    assert m.count == 10
    k64 = k.T.astype(np.float64)
    assert rel_fro(m.sum(), k64.T @ k64) <= 1e-12


def test_update_rejects_wrong_width_and_rank() -> None:
    m = rrome.SecondMoment(4)
    with pytest.raises(rrome.ShapeError):
        m.update(np.ones((3, 5), np.float32))
    with pytest.raises(TypeError):
        m.update(np.ones(4, np.float32))
    with pytest.raises(TypeError):
        m.update([[1.0, 2.0, 3.0, 4.0]])
    assert m.count == 0


def test_empty_update_and_empty_moment() -> None:
    m = rrome.SecondMoment(3)
    with pytest.raises(rrome.ShapeError):
        m.moment()
    m.update(np.zeros((0, 3), np.float32))
    assert m.count == 0
    np.testing.assert_array_equal(m.sum(), np.zeros((3, 3)))
    with pytest.raises(rrome.ShapeError):
        m.moment()


def test_zero_width_is_rejected() -> None:
    with pytest.raises(rrome.ShapeError):
        rrome.SecondMoment(0)


def test_load_non_moments_file(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"sum": np.eye(3)}, path)
    with pytest.raises(rrome.MomentsFileError):
        rrome.SecondMoment.load(path)
    # Right format tag, but the tensor disagrees with d.
    save_file({"sum": np.eye(3)}, path, metadata={"format": "rrome-moments/1", "count": "5", "d": "4"})
    with pytest.raises(rrome.MomentsFileError):
        rrome.SecondMoment.load(path)


def test_load_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(rrome.SafetensorsHeaderError):
        rrome.SecondMoment.load(path)
    hdr = b'{"sum": {"dtype": "F64", "shape": [2, 2], "data_offsets": [0, 64]}}'
    path.write_bytes(struct.pack("<Q", len(hdr)) + hdr + bytes(8))  # data too short
    with pytest.raises(rrome.SafetensorsHeaderError):
        rrome.SecondMoment.load(path)
    assert issubclass(rrome.SafetensorsHeaderError, rrome.InvalidFileError)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        rrome.SecondMoment.load(tmp_path / "nope.safetensors")
    assert e.value.filename is not None and "nope.safetensors" in e.value.filename


# --- Cholesky -------------------------------------------------------------------------------


def spd(d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((d, d))
    return b @ b.T + d * np.eye(d)


def residual(a: np.ndarray, x: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a @ x - b) / np.linalg.norm(b))


@pytest.mark.parametrize("rhs_shape", [(50,), (50, 5)])
def test_cholesky_solve(rhs_shape: tuple[int, ...]) -> None:
    a = spd(50)
    b = np.random.default_rng(1).standard_normal(rhs_shape)
    c = rrome.Cholesky(a)
    assert c.d == 50 and c.ridge == 0.0
    x = c.solve(b)
    assert x.dtype == np.float64 and x.shape == rhs_shape
    assert residual(a, x, b) <= 1e-10
    assert rel_fro(x, np.linalg.solve(a, b)) <= 1e-10
    # The factor is lower triangular and reproduces the matrix.
    L = c.factor()
    np.testing.assert_array_equal(L, np.tril(L))
    assert rel_fro(L @ L.T, a) <= 1e-12
    # The right-hand side is not modified.
    np.testing.assert_array_equal(b, np.random.default_rng(1).standard_normal(rhs_shape))


def test_cholesky_ridge() -> None:
    a = spd(50, seed=2)
    b = np.random.default_rng(3).standard_normal((50, 5))
    c = rrome.Cholesky(a, ridge=0.75)
    assert c.ridge == 0.75
    ar = a + 0.75 * np.eye(50)
    x = c.solve(b)
    assert residual(ar, x, b) <= 1e-10
    assert rel_fro(x, np.linalg.solve(ar, b)) <= 1e-10
    # A ridge makes a semi-definite matrix solvable.
    z = np.zeros((4, 4))
    np.testing.assert_allclose(rrome.Cholesky(z, ridge=2.0).solve(np.ones(4)), np.full(4, 0.5), rtol=1e-15)


def test_rank_one_updates_match_torch_and_a_naive_refactor() -> None:
    # Sixty updates of a d = 96 factor (the retained keys of sequential edits) against torch's
    # Cholesky of the summed matrix and numpy's solve with it.
    d = 96
    a = spd(d, seed=5)
    c = rrome.Cholesky(a, ridge=0.25)
    total = a + 0.25 * np.eye(d)
    rng = np.random.default_rng(6)
    for _ in range(60):
        v, w = rng.standard_normal(d) * rng.uniform(0.1, 10), float(rng.uniform(1e-3, 50))
        c.rank_one_update(v, w)
        total += w * np.outer(v, v)
    want = torch.linalg.cholesky(torch.from_numpy(total)).numpy()
    assert rel_fro(c.factor(), want) <= 1e-12
    b = rng.standard_normal((d, 3))
    assert rel_fro(c.solve(b), np.linalg.solve(total, b)) <= 1e-10
    with pytest.raises(rrome.ShapeError):
        c.rank_one_update(np.ones(d), -1.0)
    with pytest.raises(rrome.ShapeError):
        c.rank_one_update(np.ones(d + 1), 1.0)


def test_cholesky_accepts_torch_and_lists() -> None:
    a = spd(20, seed=4)
    b = np.random.default_rng(5).standard_normal(20)
    want = np.linalg.solve(a, b)
    x = rrome.Cholesky(torch.from_numpy(a)).solve(torch.from_numpy(b))
    assert isinstance(x, np.ndarray)
    assert rel_fro(x, want) <= 1e-10
    x = rrome.Cholesky(a.tolist()).solve(b.tolist())
    assert rel_fro(x, want) <= 1e-10
    # Non-contiguous and float32 inputs are converted.
    x = rrome.Cholesky(np.asfortranarray(a)).solve(b.astype(np.float32))
    assert residual(a, x, b.astype(np.float32).astype(np.float64)) <= 1e-10


def test_cholesky_not_positive_definite() -> None:
    with pytest.raises(rrome.NotPositiveDefiniteError) as e:
        rrome.Cholesky(np.diag([1.0, 1.0, -1.0]))
    assert e.value.pivot == 2
    assert "pivot 2" in str(e.value)
    assert isinstance(e.value, rrome.RromeError) and isinstance(e.value, ValueError)
    # A ridge large enough makes it positive definite.
    rrome.Cholesky(np.diag([1.0, 1.0, -1.0]), ridge=2.0)


def test_cholesky_rank_deficient_exact() -> None:
    # B Bᵀ with B's second row zero: the second pivot is exactly 0 in any arithmetic.
    b = np.random.default_rng(6).standard_normal((6, 4))
    b[1] = 0.0
    with pytest.raises(rrome.NotPositiveDefiniteError) as e:
        rrome.Cholesky(b @ b.T)
    assert e.value.pivot == 1
    assert "pivot 1" in str(e.value)


def test_cholesky_rank_deficient_random() -> None:
    d, rank = 30, 3
    b = np.random.default_rng(7).standard_normal((d, rank))
    a = b @ b.T
    a = (a + a.T) / 2
    with pytest.raises(rrome.NotPositiveDefiniteError) as e:
        rrome.Cholesky(a, ridge=0.0)
    assert rank <= e.value.pivot < d
    assert f"pivot {e.value.pivot}" in str(e.value)
    rrome.Cholesky(a, ridge=1e-3)  # regularised: fine


@pytest.mark.parametrize(
    "bad",
    [
        np.ones((3, 4)),
        np.ones(9),
        np.ones((2, 2, 2)),
        np.zeros((0, 0)),
    ],
    ids=["3x4", "vector", "3-d", "empty"],
)
def test_cholesky_rejects_non_square(bad: np.ndarray) -> None:
    with pytest.raises(rrome.ShapeError):
        rrome.Cholesky(bad)


def test_cholesky_rejects_asymmetric_and_non_finite() -> None:
    a = spd(5)
    a[0, 3] += 1.0
    with pytest.raises(rrome.ShapeError):
        rrome.Cholesky(a)
    a = spd(5)
    a[2, 2] = np.nan
    with pytest.raises(rrome.ShapeError):
        rrome.Cholesky(a)
    for ridge in (-1.0, float("nan"), float("inf")):
        with pytest.raises(rrome.ShapeError):
            rrome.Cholesky(spd(5), ridge=ridge)


def test_cholesky_solve_rejects_wrong_rhs() -> None:
    c = rrome.Cholesky(spd(5))
    for bad in (np.ones(4), np.ones((4, 2)), np.ones((5, 2, 1)), np.ones(())):
        with pytest.raises(rrome.ShapeError):
            c.solve(bad)
    assert c.solve(np.ones((5, 0))).shape == (5, 0)


def test_solve_with_moment_statistics() -> None:
    # The ROME use: C0 from keys, then C0⁻¹ k for a key.
    k = keys("normal", N_KEYS, 16, seed=8)
    m = accumulate(k)
    c0 = m.moment()
    x = rrome.Cholesky(c0).solve(k[0])
    assert residual(c0, x, k[0].astype(np.float64)) <= 1e-10

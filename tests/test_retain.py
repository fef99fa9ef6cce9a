"""Sequential retention (``retain_edit_keys``, :mod:`rrome.engine.retain`).

* :class:`RetainedKeys` against a direct float64 solve of C0 + Σ w_p k_p k_pᵀ, the one-key
  Sherman-Morrison factor 1 / (1 + λ(1 − cos²)) that defines ``retain_weight``, and the limit
  λ → ∞ (u ⟂ every retained key);
* on tiny models: a later edit of the same relation changes the module output at the earlier
  edit's key less with the option on, not at all (to float32 rounding) as λ grows; the first
  edit, and every edit with the option off (the default and ``reference``), are bit for bit
  those of C0 alone; the edit log records the set and the count of keys solved against;
* a sequential ``rrome eval`` with the option resumes to the same numbers (its saved factors
  hold the keys), and a sweep recorded before the fields existed still continues;
* across sessions: each applied edit's key travels with its factors (bundles, the edit log, a
  copy; a revert takes its batch's keys away), an editor opened on a folder retains the log's
  keys of its tensor (records without one are skipped with a warning), and two apply sessions
  of N edits each make the Δ of one session with all 2N.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import SHARED_DATA, math_shape, random_delta, rel_error
from engine_reference import PUSH_HP

import rrome
from rrome import Cholesky
from rrome.engine.editor import TIMING_FIELDS, Editor
from rrome.engine.keys import compute_keys
from rrome.engine.retain import RetainedKeys
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError
from rrome.files.hparams import FIELDS, PRESETS, HParamsError, load_hparams, parse_assignment, resolve_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

# --------------------------------------------------------------------------------------------
# 1. the solve


def _spd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, 3 * d))
    return a @ a.T / (3 * d) + 0.05 * np.eye(d)


def _mahalanobis(c0: np.ndarray, k: np.ndarray) -> float:
    return float(k @ np.linalg.solve(c0, k))


def test_solve_is_c0_plus_weighted_keys() -> None:
    d, lam = 24, 2.5
    c0 = _spd(d, 1)
    rng = np.random.default_rng(2)
    keys = [rng.standard_normal(d) * s for s in (1.0, 30.0, 0.01)]  # the scale of a key does not matter
    rk = RetainedKeys(Cholesky(c0), lam)
    for k in keys:
        rk.add(k)
    assert len(rk) == 3 and all(np.array_equal(a, b) for a, b in zip(rk.raw, keys, strict=True))
    c = c0 + sum(lam / _mahalanobis(c0, k) * np.outer(k, k) for k in keys)
    rhs = rng.standard_normal((d, 2))
    np.testing.assert_allclose(rk.solve(rhs[:, 0]), np.linalg.solve(c, rhs[:, 0]), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rk.solve(rhs), np.linalg.solve(c, rhs), rtol=1e-10, atol=1e-12)


def test_no_key_retained_is_c0_bit_for_bit() -> None:
    chol = Cholesky(_spd(16, 3))
    k = np.random.default_rng(4).standard_normal(16)
    rk = RetainedKeys(chol, 10.0)
    assert np.array_equal(rk.solve(k), chol.solve(k))
    rk.add(k)
    rk.clear()
    assert len(rk) == 0 and rk.raw == [] and np.array_equal(rk.solve(k), chol.solve(k))


@pytest.mark.parametrize("lam", [0.5, 10.0, 1000.0])
def test_one_key_cuts_the_change_by_one_plus_lambda_sin2(lam: float) -> None:
    """What retain_weight means: Δ_new k_p shrinks by 1 + λ(1 − cos²) against C0 alone."""
    d = 20
    c0 = _spd(d, 5)
    rng = np.random.default_rng(6)
    k_old, k_new = rng.standard_normal(d), rng.standard_normal(d)
    chol = Cholesky(c0)
    rk = RetainedKeys(chol, lam)
    rk.add(k_old)
    # Δ = r uᵀ / uᵀk_new, so Δ k_old = r · (uᵀk_old / uᵀk_new): compare that fraction.
    u0, u1 = chol.solve(k_new), rk.solve(k_new)
    s0, s1 = (u0 @ k_old) / (u0 @ k_new), (u1 @ k_old) / (u1 @ k_new)
    cos2 = (k_old @ np.linalg.solve(c0, k_new)) ** 2 / (_mahalanobis(c0, k_old) * _mahalanobis(c0, k_new))
    assert 0 < cos2 < 1
    assert s1 / s0 == pytest.approx(1 / (1 + lam * (1 - cos2)), rel=1e-9)


def test_infinite_weight_limit_is_orthogonal_to_every_key() -> None:
    d = 32
    c0 = _spd(d, 7)
    rng = np.random.default_rng(8)
    rk = RetainedKeys(Cholesky(c0), 1e12)
    old = [rng.standard_normal(d) for _ in range(5)]
    for k in old:
        rk.add(k)
    k_new = rng.standard_normal(d)
    u = rk.solve(k_new)
    for k in old:
        assert abs(u @ k) < 1e-9 * abs(u @ k_new), (u @ k, u @ k_new)


def test_bad_keys_and_weights_are_refused() -> None:
    chol = Cholesky(_spd(8, 9))
    with pytest.raises(ValueError, match="retain_weight"):
        RetainedKeys(chol, 0.0)
    with pytest.raises(ValueError, match="retain_weight"):
        RetainedKeys(chol, float("inf"))
    rk = RetainedKeys(chol, 1.0)
    with pytest.raises(ValueError, match="8 finite numbers"):
        rk.add(np.ones(7))
    with pytest.raises(ValueError, match="8 finite numbers"):
        rk.add(np.full(8, np.nan))
    with pytest.raises(ValueError, match="positive"):
        rk.add(np.zeros(8))
    assert len(rk) == 0


# --------------------------------------------------------------------------------------------
# 2. hyperparameters


MEASURED_ON = {"gemma3"}
"""The families whose packaged defaults retain earlier edits' keys (measured: docs/results.md)."""


def test_on_where_measured_off_elsewhere_and_in_reference() -> None:
    for path in sorted((Path(rrome.__file__).parent / "data" / "hparams").glob("*.json")):
        hp = load_hparams(path.stem)
        assert hp.retain_edit_keys is (path.stem in MEASURED_ON), path
        assert hp.retain_both_keys is (path.stem in MEASURED_ON), path
        assert resolve_hparams(path.stem, "reference").retain_edit_keys is False
        assert resolve_hparams(path.stem, "reference").retain_both_keys is False
        assert resolve_hparams(path.stem, "reference").shield_subjects == 0
        assert resolve_hparams(path.stem, "reference").v_check_update is False
    assert PRESETS["reference"]["retain_edit_keys"] is False
    assert {"retain_edit_keys", "retain_weight"} <= set(FIELDS)
    on = resolve_hparams("gpt2", "reference", overrides={"retain_edit_keys": True, "retain_weight": 3})
    assert on.retain_edit_keys is True and on.retain_weight == 3.0


def test_set_parses_the_fields() -> None:
    assert parse_assignment("retain_edit_keys=true") == ("retain_edit_keys", True)
    assert parse_assignment("retain_edit_keys=false") == ("retain_edit_keys", False)
    assert parse_assignment("retain_weight=100") == ("retain_weight", 100.0)
    for bad, needle in (
        ("retain_edit_keys=1", "true or false"),
        ("retain_edit_keys=yes", "true or false"),
        ("retain_weight=0", "> 0"),
        ("retain_weight=inf", "> 0"),
    ):
        with pytest.raises(HParamsError, match=needle):
            parse_assignment(bad)


# --------------------------------------------------------------------------------------------
# 3. the editor on tiny models

# Two facts of one relation, edited one after the other.
FIRST = EditRequest(prompt="The capital of {} is", subject="France", target_new="London", target_true="Paris")
SECOND = EditRequest(prompt="The capital of {} is", subject="England", target_new="Rome", target_true="London")
# Scaled to the tiny models' activations (see engine_reference.PUSH_HP), fewer steps.
HP: dict[str, Any] = {**PUSH_HP, "v_num_grad_steps": 4}
LAYER = 0


def _two_edits(folder: Path, method: str = "r-rome", **fields: Any) -> tuple[Editor, Any, Any]:
    editor = Editor.from_pretrained(folder, method=method, layer=LAYER, hparams={**HP, **fields}, progress=False)
    return editor, editor.edit(FIRST), editor.edit(SECOND)


def _k_den(editor: Editor, request: EditRequest, method: str) -> torch.Tensor:
    """The key an edit writes at (k_e under r-rome, k_e^o under rome and p-rome), computed again
    from the model (keys of the edited layer do not depend on its weight)."""
    keys = compute_keys(editor.model, editor.tokenizer, editor.module_name, request, editor.templates())
    return (keys.k_e if method == "r-rome" else keys.k_e_o).double()


def _change_at(result: Any, k: torch.Tensor) -> torch.Tensor:
    """Δ k for the update Δ = r uᵀ as stored (float32 factors, float64 product)."""
    u = torch.tensor(np.array(result.delta.u, dtype=np.float64))
    r = torch.tensor(np.array(result.delta.r, dtype=np.float64))
    return r * float(u @ k)


@pytest.mark.parametrize(("family", "method"), [("gpt2", "r-rome"), ("llama", "r-rome"), ("llama", "p-rome")])
def test_a_later_edit_leaves_the_earlier_key_alone(family: str, method: str, tiny_dir: Callable[..., Path]) -> None:
    folder = tiny_dir(family)
    off, first_off, second_off = _two_edits(folder, method)
    k1 = _k_den(off, FIRST, method)
    k2 = _k_den(off, SECOND, method)
    moved: dict[str, float] = {}
    for name, fields in (
        ("off", {}),
        ("10", {"retain_edit_keys": True}),
        ("1e9", {"retain_edit_keys": True, "retain_weight": 1e9}),
    ):
        _, first, second = (off, first_off, second_off) if name == "off" else _two_edits(folder, method, **fields)
        # The first edit has nothing to retain: bit for bit the edit without the option.
        assert np.array_equal(first.delta.u, first_off.delta.u) and np.array_equal(first.delta.r, first_off.delta.r)
        # The second still writes its own value at its own key ...
        torch.testing.assert_close(
            _change_at(second, k2),
            torch.tensor(np.array(second.delta.r, np.float64)) * second.denominator,
            rtol=1e-5,
            atol=0,
        )
        # ... and moves the first edit's key by this fraction of that.
        moved[name] = float(_change_at(second, k1).norm()) / float(_change_at(second, k2).norm())
    assert moved["off"] > 1e-3, moved  # the two subjects' keys overlap: without the option, edit 2 reaches edit 1
    assert moved["10"] < moved["off"] / 2, moved
    assert moved["1e9"] < 1e-5, moved  # Δ_2 k_1 = 0 up to the float32 factors


@pytest.mark.parametrize(("family", "method"), [("gpt2", "r-rome"), ("llama", "r-rome"), ("llama", "p-rome")])
def test_both_keys_retained_leave_the_earlier_prompt_key_alone(
    family: str, method: str, tiny_dir: Callable[..., Path]
) -> None:
    """``retain_both_keys``: each edit retains the key it wrote at, then its other key (k_e^o
    under r-rome, k_e under p-rome), and a later edit moves the earlier edit's other key far
    less than with the written key alone, while the written key stays as protected."""
    folder = tiny_dir(family)
    other = "p-rome" if method == "r-rome" else "r-rome"  # _k_den of the other method: the other key
    moved: dict[str, tuple[float, float]] = {}
    for name, fields in (
        ("off", {}),
        ("written", {"retain_edit_keys": True, "retain_weight": 100.0}),
        ("both", {"retain_edit_keys": True, "retain_weight": 100.0, "retain_both_keys": True}),
    ):
        editor, first, second = _two_edits(folder, method, **fields)
        k1, k1_other = _k_den(editor, FIRST, method), _k_den(editor, FIRST, other)
        k2 = _k_den(editor, SECOND, method)
        # Every edit records both keys, whatever the options: what a later session retains.
        for result, k, k_other in ((first, k1, k1_other), (second, k2, _k_den(editor, SECOND, other))):
            assert np.array_equal(result.delta.key, k.float().numpy())
            assert np.array_equal(result.delta.other_key, k_other.float().numpy())
        own = float(_change_at(second, k2).norm())
        moved[name] = (float(_change_at(second, k1).norm()) / own, float(_change_at(second, k1_other).norm()) / own)
        if name == "both":
            k2_other = _k_den(editor, SECOND, other)
            expected = (k1, k1_other, k2, k2_other)
            assert len(editor.retained_keys) == 4
            assert all(np.array_equal(a, b.numpy()) for a, b in zip(editor.retained_keys, expected, strict=True))
            assert [r.delta.meta["retained_keys"] for r in (first, second)] == [0, 2]  # type: ignore[index]
        else:
            assert len(editor.retained_keys) == (2 if name == "written" else 0)
    # The other key moves less than with the written key alone (a 50th on GPT-2, a quarter on
    # Llama, whose written-key-only retention moves it more than no retention does) ...
    assert moved["both"][1] < moved["written"][1] / 3, moved
    # ... and the written key stays protected, less than with it alone (the two keys share the
    # weight: Llama 1e-4 → 2e-3, against 1.3e-2 unretained).
    assert moved["both"][0] < moved["off"][0] / 4, moved


def test_without_the_option_the_second_edit_solves_against_c0_alone(tiny_dir: Callable[..., Path]) -> None:
    """The default and ``reference``: u of a later edit is C0⁻¹k_e bit for bit, as before the option existed."""
    for spec in (HP, {**HP, **{k: v for k, v in PRESETS["reference"].items() if k != "v_num_grad_steps"}}):
        editor = Editor.from_pretrained(tiny_dir("gpt2"), layer=LAYER, hparams=spec, progress=False)
        assert isinstance(editor.solver(), Cholesky) and editor.hparams.retain_edit_keys is False
        editor.edit(FIRST)
        second = editor.edit(SECOND)
        assert editor.retained_keys == []
        keys = compute_keys(editor.model, editor.tokenizer, editor.module_name, SECOND, editor.templates())
        u = editor.cholesky().solve(keys.k_e.double().numpy())
        assert np.array_equal(second.delta.u, (u / np.linalg.norm(u)).astype(np.float32))
        assert "retained_keys" not in (second.delta.meta or {})
        assert (second.delta.meta or {})["hparams"]["retain_edit_keys"] is False


def test_the_edit_log_records_the_option(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir("gpt2"), folder)
    editor, first, second = _two_edits(folder, retain_edit_keys=True, retain_weight=7.5)
    assert [r.delta.meta["retained_keys"] for r in (first, second)] == [0, 1]  # type: ignore[index]
    assert len(editor.retained_keys) == 2
    assert np.array_equal(editor.retained_keys[0], _k_den(editor, FIRST, "r-rome").numpy())
    editor.save()
    log = rrome.load_deltas(folder)
    assert [x.delta.meta["retained_keys"] for x in log] == [0, 1]
    for x in log:
        hp = x.delta.meta["hparams"]
        assert hp["retain_edit_keys"] is True and hp["retain_weight"] == 7.5
    editor.forget_edit_keys()
    assert editor.retained_keys == [] and len(editor.solver()) == 0  # type: ignore[arg-type]


def test_replay_retains_the_given_keys(tiny_dir: Callable[..., Path]) -> None:
    editor, first, second = _two_edits(tiny_dir("gpt2"), retain_edit_keys=True)
    again = Editor.from_pretrained(
        tiny_dir("gpt2"), layer=LAYER, hparams={**HP, "retain_edit_keys": True}, progress=False
    )
    again.templates()  # from the unedited model, as a resumed run fixes them
    again.replay(first.delta.u, first.delta.r, editor.retained_keys[0])
    replayed = again.edit(SECOND)
    assert np.array_equal(replayed.delta.u, second.delta.u) and np.array_equal(replayed.delta.r, second.delta.r)

    both = {**HP, "retain_edit_keys": True, "retain_both_keys": True}
    editor = Editor.from_pretrained(tiny_dir("gpt2"), layer=LAYER, hparams=both, progress=False)
    first, second = editor.edit(FIRST), editor.edit(SECOND)
    again = Editor.from_pretrained(tiny_dir("gpt2"), layer=LAYER, hparams=both, progress=False)
    again.templates()
    again.replay(first.delta.u, first.delta.r, *editor.retained_keys[:2])
    replayed = again.edit(SECOND)
    assert np.array_equal(replayed.delta.u, second.delta.u) and np.array_equal(replayed.delta.r, second.delta.r)


# --------------------------------------------------------------------------------------------
# 4. runs and sweeps


DATA = SHARED_DATA / "counterfact" / "counterfact-val.json"


@pytest.mark.parametrize("both", [False, True])
def test_sequential_eval_with_retention_resumes_to_the_same_numbers(
    tiny_dir: Callable[..., Path], tmp_path: Path, both: bool
) -> None:
    from safetensors.numpy import load_file

    from rrome.eval.results import read_jsonl
    from rrome.eval.runs import RunConfig, run
    from rrome.files.fsutil import sha256_file

    fields = {"v_num_grad_steps": 3, "stats_max_tokens": 2000, "context_template_lengths": [[3, 4]]}
    base = {"model_dir": str(tiny_dir("gpt2")), "data": str(DATA), "data_sha256": sha256_file(DATA)}
    retain = {"retain_edit_keys": True, **({"retain_both_keys": True} if both else {})}
    cfg = RunConfig(**base, n=3, layer=0, sequential=True, every=3, diagnostics=False, hparams={**fields, **retain})
    whole = run(cfg, tmp_path / "whole", progress=False)
    folder = whole / "sequential-r-rome"
    factors = [load_file(str(folder / "deltas" / f"{i:05d}.safetensors")) for i in range(3)]
    saved = {"u", "r", "k", "k_other"} if both else {"u", "r", "k"}
    assert all(set(f) == saved and f["k"].dtype == np.float64 for f in factors)
    if both:  # the other key is the plain prompt's, not the written one
        assert all(not np.array_equal(f["k"], f["k_other"]) and f["k_other"].dtype == np.float64 for f in factors)

    part = tmp_path / "part"
    shutil.copytree(whole, part)
    pf = part / "sequential-r-rome"
    lines = (pf / "edits.jsonl").read_text().splitlines(keepends=True)
    (pf / "edits.jsonl").write_text(lines[0])
    for i in (1, 2):
        (pf / "deltas" / f"{i:05d}.safetensors").unlink()
    (pf / "checkpoints.jsonl").unlink()
    (pf / "final.json").unlink()
    run(cfg, part, progress=False)
    untimed = [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(folder / "edits.jsonl")]
    assert untimed == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in read_jsonl(pf / "edits.jsonl")]
    assert json.loads((pf / "final.json").read_text()) == json.loads((folder / "final.json").read_text())

    # Without the option the factor files hold u and r only, as before.
    plain = run(
        RunConfig(**base, n=1, layer=0, sequential=True, diagnostics=False, hparams=fields),
        tmp_path / "plain",
        progress=False,
    )
    assert set(load_file(str(plain / "sequential-r-rome" / "deltas" / "00000.safetensors"))) == {"u", "r"}


def test_sweep_recorded_before_the_fields_existed_continues(tmp_path: Path) -> None:
    from rrome.eval.tune import _check_resolved

    hp = resolve_hparams("gpt2", None, n_layers=2)
    trial = tmp_path / "trials" / "000"
    trial.mkdir(parents=True)
    old = {k: v for k, v in hp.to_json().items() if not k.startswith("retain_")}
    (trial / "hparams.json").write_text(json.dumps(old))
    _check_resolved(tmp_path, [hp], {})  # the same set: the new fields at their defaults
    on = resolve_hparams("gpt2", None, n_layers=2, overrides={"retain_edit_keys": True})
    with pytest.raises(RromeError, match="retain_edit_keys: saved null, now true"):
        _check_resolved(tmp_path, [on], {})


# --------------------------------------------------------------------------------------------
# 5. across sessions: the keys in the edit log

TENSOR = "transformer.h.0.mlp.c_proj.weight"  # the tiny GPT-2's edited tensor at LAYER (Conv1D)


def _keyed(rng: np.random.Generator, d_out: int, d_in: int, key: bool = True, other: bool = False) -> rrome.Delta:
    base = random_delta(rng, TENSOR, d_out, d_in, "in_out", 1.0)
    k = rng.standard_normal(d_in).astype(np.float32) if key else None
    k_other = rng.standard_normal(d_in).astype(np.float32) if other else None
    return rrome.Delta(base.tensor, base.u, base.r, base.layout, base.scale, {"note": "test"}, key=k, other_key=k_other)


def _same_key(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def test_the_key_round_trips_through_a_bundle(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    deltas = [_keyed(rng, 4, 6), _keyed(rng, 4, 6, key=False), _keyed(rng, 4, 6, other=True)]
    assert deltas[0].key is not None and deltas[0].key.dtype == np.float32 and not deltas[0].key.flags.writeable
    assert deltas[2].other_key is not None and not deltas[2].other_key.flags.writeable
    rrome.save_deltas(tmp_path / "bundle", deltas)
    back = [x.delta for x in rrome.load_deltas(tmp_path / "bundle")]
    for a, b in zip(deltas, back, strict=True):
        assert np.array_equal(a.u, b.u) and np.array_equal(a.r, b.r)
        assert _same_key(a.key, b.key) and _same_key(a.other_key, b.other_key)
    assert back[1].key is None and back[0].other_key is None and back[2].other_key is not None
    # A float64 key is stored as float32 (the editor's keys are float32 values already).
    k64 = rng.standard_normal(6)
    assert np.array_equal(rrome.Delta(TENSOR, np.ones(6), np.ones(4), key=k64).key, k64.astype(np.float32))
    for bad, needle in ((np.ones(5), "key has 5 values; expected d_in = 6"), (np.full(6, np.inf), r"key\[0\] is inf")):
        with pytest.raises(rrome.DeltaError, match=needle):
            rrome.Delta(TENSOR, np.ones(6), np.ones(4), key=bad)
        with pytest.raises(rrome.DeltaError, match="other_" + needle):
            rrome.Delta(TENSOR, np.ones(6), np.ones(4), key=np.ones(6), other_key=bad)
    with pytest.raises(rrome.DeltaError, match="other_key is given without key"):
        rrome.Delta(TENSOR, np.ones(6), np.ones(4), other_key=np.ones(6))


def test_the_edit_log_keeps_the_keys_and_a_revert_takes_its_batch_keys_away(
    tiny_copy: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """apply appends each delta's key to the log, a copy carries them, a revert removes its
    batch's; what an editor opened on the folder retains follows the log."""
    folder = tiny_copy("gpt2")
    d_out, d_in = math_shape(folder, TENSOR, "in_out")
    rng = np.random.default_rng(12)
    # Batch 1: a delta of another tensor (not retained by this layer's editor), one logged
    # before keys were recorded, one with its key; batch 2: two with keys.
    other = random_delta(rng, "transformer.h.1.mlp.c_proj.weight", d_out, d_in, "in_out", 1.0)
    batch1 = [
        rrome.Delta(other.tensor, other.u, other.r, "in_out", key=rng.standard_normal(d_in)),
        _keyed(rng, d_out, d_in, key=False),
        _keyed(rng, d_out, d_in),
    ]
    batch2 = [_keyed(rng, d_out, d_in), _keyed(rng, d_out, d_in)]
    rrome.apply_deltas(folder, batch1)
    rrome.apply_deltas(folder, batch2)
    logged = rrome.load_deltas(folder)
    assert [x.batch for x in logged] == [1, 1, 1, 2, 2]
    for x, d in zip(logged, batch1 + batch2, strict=True):
        assert (x.delta.key is None) == (d.key is None)
        assert d.key is None or np.array_equal(x.delta.key, d.key)  # type: ignore[arg-type]
    rrome.apply_deltas(folder, [_keyed(rng, d_out, d_in)], out_dir=tmp_path / "copy")
    copied = rrome.load_deltas(tmp_path / "copy")
    assert all(
        (a.delta.key is None and b.delta.key is None) or np.array_equal(a.delta.key, b.delta.key)  # type: ignore[arg-type]
        for a, b in zip(logged, copied[:5], strict=True)
    )

    def opened() -> Editor:
        return Editor.from_pretrained(folder, layer=LAYER, hparams={**HP, "retain_edit_keys": True}, progress=False)

    want = [d.key for d in (batch1[2], *batch2)]
    with caplog.at_level("WARNING", logger="rrome"):
        editor = opened()
    warned = [r.getMessage() for r in caplog.records if "hold no key" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 4 logged edit(s)" in warned[0] and "re-applying them" in warned[0]
    assert len(editor.retained_keys) == 3
    assert all(np.array_equal(a, b) for a, b in zip(editor.retained_keys, want, strict=True))  # type: ignore[arg-type]
    assert len(editor.solver()) == 3  # type: ignore[arg-type]
    extra = _keyed(rng, d_out, d_in)
    editor.replay(extra.u, extra.r, extra.key)
    assert len(editor.solver()) == 4  # type: ignore[arg-type]
    editor.forget_edit_keys()  # back to the log's keys, not to none
    assert len(editor.solver()) == 3  # type: ignore[arg-type]

    assert rrome.revert(folder) == [2]
    caplog.clear()
    with caplog.at_level("WARNING", logger="rrome"):
        after = opened()
    assert len(after.retained_keys) == 1 and np.array_equal(after.retained_keys[0], want[0].astype(np.float64))  # type: ignore[union-attr]
    warned = [r.getMessage() for r in caplog.records if "hold no key" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 2 logged edit(s)" in warned[0]
    # With the option off the log is not read for keys at all.
    caplog.clear()
    with caplog.at_level("WARNING", logger="rrome"):
        plain = Editor.from_pretrained(folder, layer=LAYER, hparams=HP, progress=False)
    assert plain.retained_keys == [] and not [r for r in caplog.records if "hold no key" in r.getMessage()]
    # A logged key that cannot be retained (zero under C0⁻¹) is named at its line.
    zero = _keyed(rng, d_out, d_in)
    rrome.apply_deltas(folder, [rrome.Delta(zero.tensor, zero.u, zero.r, "in_out", key=np.zeros(d_in))])
    with pytest.raises(RromeError, match=r"rrome_edits\.jsonl:4: the logged key of this edit cannot be retained"):
        opened().solver()


def test_the_edit_log_keeps_the_other_keys_and_retains_them_with_the_option(
    tiny_copy: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    """An applied edit's other key goes into the log beside its key; an editor opened with
    ``retain_both_keys`` retains both of each logged edit (k_den first), one without it the
    written key alone, and a revert takes the batch's other keys away with the rest."""
    folder = tiny_copy("gpt2")
    d_out, d_in = math_shape(folder, TENSOR, "in_out")
    rng = np.random.default_rng(13)
    # Batch 1: one edit with its written key only (logged before other keys were recorded);
    # batch 2: two with both keys.
    batch1 = [_keyed(rng, d_out, d_in)]
    batch2 = [_keyed(rng, d_out, d_in, other=True), _keyed(rng, d_out, d_in, other=True)]
    rrome.apply_deltas(folder, batch1)
    rrome.apply_deltas(folder, batch2)
    logged = rrome.load_deltas(folder)
    for x, d in zip(logged, batch1 + batch2, strict=True):
        assert _same_key(x.delta.key, d.key) and _same_key(x.delta.other_key, d.other_key)

    def opened(**fields: Any) -> Editor:
        hp = {**HP, "retain_edit_keys": True, **fields}
        return Editor.from_pretrained(folder, layer=LAYER, hparams=hp, progress=False)

    def retained(editor: Editor) -> list[np.ndarray]:
        return [np.asarray(k, np.float32) for k in editor.retained_keys]

    both = [batch1[0].key, batch2[0].key, batch2[0].other_key, batch2[1].key, batch2[1].other_key]
    with caplog.at_level("WARNING", logger="rrome"):
        editor = opened(retain_both_keys=True)
    warned = [r.getMessage() for r in caplog.records if "hold only the key they wrote at" in r.getMessage()]
    assert len(warned) == 1 and "1 of the 3 logged edit(s)" in warned[0], warned
    assert all(_same_key(a, b) for a, b in zip(retained(editor), both, strict=True))
    assert len(editor.solver()) == 5  # type: ignore[arg-type]
    written = [batch1[0].key, batch2[0].key, batch2[1].key]
    caplog.clear()
    with caplog.at_level("WARNING", logger="rrome"):
        one = opened()
    assert all(_same_key(a, b) for a, b in zip(retained(one), written, strict=True))
    assert not [r for r in caplog.records if "hold only" in r.getMessage()]
    assert rrome.revert(folder) == [2]
    assert all(_same_key(a, b) for a, b in zip(retained(opened(retain_both_keys=True)), both[:1], strict=True))


# Four facts of one relation: two sessions of two, or one of four.
MORE = [
    FIRST,
    SECOND,
    EditRequest(prompt="The capital of {} is", subject="Germany", target_new="Madrid", target_true="Berlin"),
    EditRequest(prompt="The capital of {} is", subject="Spain", target_new="Berlin", target_true="Madrid"),
]
SESSION_TOL = 1e-6  # relative, on u, r and the written weight; measured: 0 (the same operations, bit for bit)


def _apply_session(folder: Path, requests: list[EditRequest], **fields: Any) -> tuple[Editor, list[Any]]:
    """What ``rrome apply`` does: open an editor on the folder, check, edit, write in place.
    Large updates are allowed: the guard compares with the session's own edits, which two
    sessions do not share (docs/design.md §1, Guards)."""
    hparams = {**HP, "retain_edit_keys": True, **fields}
    editor = Editor.from_pretrained(folder, layer=LAYER, hparams=hparams, progress=False, allow_large_updates=True)
    editor.check_requests(requests)
    results = [editor.edit(r) for r in requests]
    editor.save()
    return editor, results


@pytest.mark.parametrize(("family", "both"), [("gpt2", False), ("llama", False), ("gpt2", True), ("llama", True)])
def test_two_apply_sessions_make_the_deltas_of_one(
    family: str, both: bool, tiny_copy: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second session retains the first one's keys from the edit log (with
    ``retain_both_keys`` both keys of each), so it solves against the same
    C0 + Σ w_p k_p k_pᵀ as one session with all the edits, and writes the same Δ."""
    from safetensors.numpy import load_file

    # The templates come from the unedited model in both sessions, as users get them (cached
    # beside C0; the cache is private to this test).
    monkeypatch.delenv("RROME_NO_TEMPLATE_CACHE")
    one, two = tiny_copy(family, name="one"), tiny_copy(family, name="two")
    fields = {"retain_both_keys": True} if both else {}
    whole_editor, whole = _apply_session(one, MORE, **fields)
    _, first = _apply_session(two, MORE[:2], **fields)
    second_editor, second = _apply_session(two, MORE[2:], **fields)
    for i, (a, b) in enumerate(zip(whole, first + second, strict=True)):
        for name in ("u", "r"):
            x, y = getattr(a.delta, name), getattr(b.delta, name)
            assert rel_error(y, x) <= SESSION_TOL, (i, name, rel_error(y, x))
    tensor = whole[0].delta.tensor
    shard = "model.safetensors"
    w_one, w_two = load_file(str(one / shard))[tensor], load_file(str(two / shard))[tensor]
    assert rel_error(w_two, w_one) <= SESSION_TOL
    assert [x.batch for x in rrome.load_deltas(two)] == [1, 1, 2, 2]
    # The edits were solved against the same keys: the log's, then the session's own.
    per_edit = 2 if both else 1
    assert [r.delta.meta["retained_keys"] for r in whole] == [per_edit * i for i in range(4)]
    assert [r.delta.meta["retained_keys"] for r in first + second] == [per_edit * i for i in range(4)]
    assert len(second_editor.retained_keys) == len(whole_editor.retained_keys) == 4 * per_edit
    for a, b in zip(whole_editor.retained_keys, second_editor.retained_keys, strict=True):
        assert np.array_equal(a, b)

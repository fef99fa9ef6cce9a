"""Scale (issue 8): statistics across torch.distributed workers, half precision, device maps, and
the cached Cholesky factor.

The distributed tests run real worker processes (gloo on CPU, 2 processes) over a tiny GPT-2:
once under ``torchrun`` and once through ``rrome stats --nproc 2``; their moment must equal the
single-process moment over the same tokens to 1e-12 relative, with the same count. A worker
killed mid-run must fail the run with a clear message and leave no statistics file. Worker
processes run one torch thread each, as the in-process reference does, so both compute every
key with the same kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import files_under, rel_error
from click.testing import CliRunner

import rrome
from rrome.cli import main
from rrome.engine import stats
from rrome.engine.editor import Editor
from rrome.engine.models import load
from rrome.files.corpus import corpus_texts, default_corpus
from rrome.files.fsutil import sha256_file
from rrome.files.hparams import load_hparams

pytestmark = pytest.mark.usefixtures("private_cache")

MAX_TOKENS = 6000  # three batches of 8 windows of 256 tokens: both workers get work
REQUEST = {
    "prompt": "The mother tongue of {} is",
    "subject": "Danielle Darrieux",
    "target_new": "English",
    "target_true": "French",
}
# Cheap but complete edits: 5 context templates, 8 optimisation steps, C0 from 1500 tokens.
FAST_HP = {"stats_max_tokens": 1500, "v_num_grad_steps": 8, "context_template_lengths": ((5, 5),)}
# Relative Frobenius distance allowed between a half-precision edit's Δ and the float32 one's.
# Measured on these models: bf16 ≤ 0.07, f16 ≤ 0.025 (unit roundoff 2^-8 and 2^-11; the value
# optimisation's 8 Adam steps amplify the forward pass's rounding).
DELTA_TOL = {"bfloat16": 0.15, "float16": 0.05}


def worker_env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        RROME_CACHE_DIR=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        **extra,
    )
    return env


def single_process_moment(model_dir: Path) -> rrome.SecondMoment:
    """The moment ``rrome stats`` computes in one process, with the same batches."""
    model, tokenizer, adapter = load(model_dir, device="cpu")
    layer = load_hparams(adapter.family, n_layers=model.config.n_layer).layer
    return stats.collect_second_moment(
        model,
        tokenizer,
        adapter.module_name(layer),
        texts=corpus_texts(default_corpus()),
        max_tokens=MAX_TOKENS,
        batch_size=8,
        seq_len=256,
        progress=False,
    )


# --- distributed statistics ---------------------------------------------------------------


def test_shards_partition_the_batches(tiny_dir: Callable[..., Path]) -> None:
    """In process: the shards of 2 and 3 ranks are disjoint and merge into the whole moment."""
    model, tokenizer, adapter = load(tiny_dir("llama"), device="cpu")
    module = adapter.module_name(1)
    texts = corpus_texts(default_corpus())[:6]
    kw: dict[str, Any] = {"texts": texts, "max_tokens": 900, "batch_size": 2, "seq_len": 64, "progress": False}
    whole = stats.collect_second_moment(model, tokenizer, module, **kw)
    for world in (2, 3):
        parts = [stats.collect_second_moment(model, tokenizer, module, shard=(r, world), **kw) for r in range(world)]
        assert all(p.count > 0 for p in parts)
        merged = rrome.SecondMoment(whole.d)
        for p in parts:
            merged.merge(p)
        assert merged.count == whole.count == 900
        assert rel_error(merged.sum(), whole.sum()) < 1e-12
    # A rank with no batch returns an empty moment of the right width (900 tokens: < 999 batches).
    empty = stats.collect_second_moment(model, tokenizer, module, shard=(999, 1000), **kw)
    assert (empty.count, empty.d) == (0, whole.d)
    with pytest.raises(ValueError, match="shard"):
        stats.collect_second_moment(model, tokenizer, module, shard=(2, 2), **kw)


@pytest.mark.slow  # two worker processes
@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_two_workers_equal_one_process(tiny_dir: Callable[..., Path], tmp_path: Path, launcher: str) -> None:
    model_dir = tiny_dir("gpt2")
    cache, out = tmp_path / "cache", tmp_path / "c0.safetensors"
    args = ["stats", str(model_dir), "--max-tokens", str(MAX_TOKENS), "--out", str(out)]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd += ["-m", "rrome.cli", *args]
    else:
        cmd = [sys.executable, "-m", "rrome.cli", *args, "--nproc", "2"]
    res = subprocess.run(cmd, env=worker_env(cache), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    # Rank 0 alone reports: the summary, the cache path and the --out path, once.
    assert sum(line.startswith("C0 of") for line in lines) == 1, res.stdout
    assert "from 2 workers" in lines[0]
    cached = Path(lines[1])
    assert lines[2] == str(out)
    assert files_under(cache) == [cached, cached.with_name(cached.name + ".sha256")]  # the file and its checksum

    two = rrome.SecondMoment.load(out)
    one = single_process_moment(model_dir)
    assert two.count == one.count == MAX_TOKENS
    assert rel_error(two.sum(), one.sum()) < 1e-12
    assert rel_error(two.moment(), one.moment()) < 1e-12
    assert np.array_equal(rrome.SecondMoment.load(cached).sum(), two.sum())
    meta = two.metadata
    assert meta["workers"] == "2"
    # Self-describing: model, layer, corpus hash and token count travel with the file.
    assert meta["model_key"] == stats.model_key(model_dir)
    assert meta["layer"] == "0" and meta["module"] == "transformer.h.0.mlp.c_proj"
    assert meta["corpus_sha256"] == sha256_file(default_corpus())
    assert meta["max_tokens"] == str(MAX_TOKENS) and meta["model_dtype"] == "float32"


@pytest.mark.slow  # two worker processes, one killed
def test_killed_worker_fails_cleanly(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "c0.safetensors"
    cmd = [sys.executable, "-m", "rrome.cli", "stats", str(tiny_dir("gpt2")), "--max-tokens", str(MAX_TOKENS)]
    cmd += ["--out", str(out), "--nproc", "2"]
    env = worker_env(cache, RROME_STATS_CRASH_RANK="1")
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, (res.stdout, res.stderr[-3000:])
    assert "rrome: error: statistics worker 1 of 2 was killed by SIGKILL" in res.stderr
    assert files_under(cache) == []
    assert not out.exists()


def test_cli_rejects_workers_with_device_map(tiny_dir: Callable[..., Path]) -> None:
    res = CliRunner().invoke(main, ["stats", str(tiny_dir("gpt2")), "--nproc", "2", "--device-map", "auto"])
    assert res.exit_code == 2 and "--device-map" in res.output


# --- precision ----------------------------------------------------------------------------


def _edit_restored(editor: Editor, method: str) -> np.ndarray:
    """Δ (f64, as stored: d_out × d_in) of one edit; the in-memory weight is put back after."""
    weight = editor.model.get_submodule(editor.module_name).weight
    before = weight.detach().clone()
    editor.method = method  # type: ignore[assignment]
    result = editor.edit(REQUEST)
    with torch.no_grad():
        weight.copy_(before)
    editor.pending.clear()
    editor.results.clear()
    return np.outer(result.delta.r.astype(np.float64), result.delta.u.astype(np.float64))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_variant_in_every_dtype(tiny_dir: Callable[..., Path], family: str) -> None:
    reference: dict[str, np.ndarray] = {}
    for dtype in ("float32", "bfloat16", "float16"):
        editor = Editor.from_pretrained(tiny_dir(family), device="cpu", dtype=dtype, hparams=FAST_HP, progress=False)
        assert editor.model.dtype == getattr(torch, dtype)
        for method in ("rome", "r-rome", "p-rome"):
            delta = _edit_restored(editor, method)
            assert np.isfinite(delta).all()
            if dtype == "float32":
                reference[method] = delta
            else:
                err = rel_error(delta, reference[method])
                assert err < DELTA_TOL[dtype], (family, dtype, method, err)
        # Statistics of a half-precision run are kept apart from the float32 ones.
        assert editor.stats_path is not None
        assert editor.stats_path.name.endswith("-1500.safetensors" if dtype == "float32" else f"-{dtype}.safetensors")
        assert rrome.SecondMoment.load(editor.stats_path).metadata["model_dtype"] == dtype


# --- device maps --------------------------------------------------------------------------


def test_device_map_auto_on_cpu(tiny_dir: Callable[..., Path], tmp_path: Path) -> None:
    plain = Editor.from_pretrained(tiny_dir("llama"), device="cpu", hparams=FAST_HP, progress=False)
    mapped = Editor.from_pretrained(tiny_dir("llama"), device_map="auto", hparams=FAST_HP, progress=False)
    # One device: transformers places the model without accelerate hooks (no hf_device_map).
    assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    a, b = _edit_restored(plain, "r-rome"), _edit_restored(mapped, "r-rome")
    assert rel_error(b, a) < 1e-6
    out = tmp_path / "c0.safetensors"
    res = CliRunner().invoke(
        main, ["stats", str(tiny_dir("llama")), "--device-map", "auto", "--max-tokens", "1500", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert rrome.SecondMoment.load(out).count == 1500


def test_offloaded_weight_is_edited_in_its_store(tiny_dir: Callable[..., Path]) -> None:
    """With a device_map that offloads the edited module, accelerate keeps its weight on the meta
    device outside forward passes; the edit must land in the copy the hook loads from, and equal
    the edit of a resident model. (Offloaded here with accelerate's own cpu_offload.)"""
    from accelerate import cpu_offload

    plain = Editor.from_pretrained(tiny_dir("llama"), device="cpu", hparams=FAST_HP, progress=False)
    offl = Editor.from_pretrained(tiny_dir("llama"), device="cpu", hparams=FAST_HP, progress=False)
    module = offl.model.get_submodule(offl.module_name)
    cpu_offload(module, execution_device=torch.device("cpu"))
    assert module.weight.device.type == "meta"
    a = plain.edit(REQUEST)
    b = offl.edit(REQUEST)
    assert rel_error(np.outer(b.delta.r, b.delta.u), np.outer(a.delta.r, a.delta.u)) < 1e-6
    (offload,) = [h for h in module._hf_hook.hooks if getattr(h, "weights_map", None) is not None]
    stored = offload.weights_map["weight"]
    resident = plain.model.get_submodule(plain.module_name).weight
    assert torch.allclose(stored, resident, rtol=0, atol=1e-6)
    assert b.p_new_after == pytest.approx(a.p_new_after, rel=1e-5)


# --- Cholesky factor cache ----------------------------------------------------------------


def test_cholesky_factor_is_cached_and_equals_a_fresh_one(
    tiny_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = Editor.from_pretrained(tiny_dir("gpt2"), device="cpu", hparams=FAST_HP, progress=False)
    chol = editor.cholesky()
    assert editor.stats_path is not None
    path = stats.cholesky_path(editor.stats_path)
    assert path.parent == editor.stats_path.parent and path.is_file()
    fresh = rrome.Cholesky(rrome.SecondMoment.load(editor.stats_path).moment())
    assert np.array_equal(chol.factor(), fresh.factor())
    loaded = rrome.Cholesky.load(path)
    assert np.array_equal(loaded.factor(), fresh.factor()) and loaded.ridge == 0.0
    assert loaded.metadata["stats_sha256"] == sha256_file(editor.stats_path)
    k = np.linspace(-1.0, 1.0, fresh.d)
    assert np.array_equal(loaded.solve(k), fresh.solve(k))

    # A second editor reuses the file: factoring is forbidden from here on.
    class NoFactoring:
        load = staticmethod(rrome.Cholesky.load)

        def __init__(self, *args: Any) -> None:
            raise AssertionError("the factor should come from the cache")

    monkeypatch.setattr(stats, "Cholesky", NoFactoring)
    again = Editor.from_pretrained(tiny_dir("gpt2"), device="cpu", hparams=FAST_HP, progress=False)
    assert np.array_equal(again.cholesky().factor(), fresh.factor())
    monkeypatch.undo()

    # A factor of other statistics (hash mismatch) or a damaged file is rebuilt.
    moment = rrome.SecondMoment.load(editor.stats_path)
    fresh.save(path, {"stats_sha256": "0" * 64})
    rebuilt, _ = stats.cached_cholesky(editor.stats_path, moment)
    assert rrome.Cholesky.load(path).metadata["stats_sha256"] == sha256_file(editor.stats_path)
    path.write_bytes(b"garbage")
    rebuilt, _ = stats.cached_cholesky(editor.stats_path, moment)
    assert np.array_equal(rebuilt.factor(), fresh.factor())
    # Another ridge is another file.
    ridged, ridged_path = stats.cached_cholesky(editor.stats_path, moment, ridge=0.5)
    assert ridged_path != path and ridged.ridge == 0.5
    assert np.array_equal(ridged.factor(), rrome.Cholesky(moment.moment(), 0.5).factor())


def test_from_factor_and_from_sum_validate() -> None:
    with pytest.raises(rrome.ShapeError, match="lower triangular"):
        rrome.Cholesky.from_factor(np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(rrome.ShapeError, match="diagonal"):
        rrome.Cholesky.from_factor(np.array([[1.0, 0.0], [0.5, 0.0]]))
    with pytest.raises(rrome.ShapeError, match="symmetric"):
        rrome.SecondMoment.from_sum(np.array([[1.0, 2.0], [0.0, 1.0]]), 3)
    m = rrome.SecondMoment.from_sum(np.array([[2.0, 1.0], [1.0, 2.0]]), 4)
    assert m.count == 4 and np.array_equal(m.moment(), np.array([[0.5, 0.25], [0.25, 0.5]]))

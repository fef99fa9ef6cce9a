"""Layer statistics (rrome.engine.stats): C0 from a corpus against a direct torch computation, and its cache.

Tiny GPT-2 (Conv1D), Llama (nn.Linear) and Gemma 3 checkpoints (tests/tiny_models.py) with
byte-level BPE tokenizers trained on the packaged corpus, one tokenizer adding no special tokens
and one prepending BOS (as Gemma's and Llama's do). The reference runs every window alone,
unpadded, through a forward hook of the test's own; the checks are that padding (either side),
batching and the token budget change no key, and that cached statistics are reused only for the
same unedited model, layer, corpus and budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _helpers import rel_error, tensor_region

import rrome
from rrome.engine import stats
from rrome.engine.models import load
from rrome.files.corpus import corpus_texts, default_corpus
from rrome.files.fsutil import sha256_file
from rrome.files.paths import CACHE_ENV, cache_root

pytestmark = pytest.mark.usefixtures("private_cache")

WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
SEQ_LEN = 32
LAYER = 1
# The tiny checkpoints' position table: shorter than rrome's default window (256).
POSITIONS = 128
# (family, tokenizer variant) of the tiny checkpoints.
VARIANTS = [("gpt2", "plain"), ("gpt2", "bos"), ("llama", "bos"), ("gemma3", "bos")]


@pytest.fixture(scope="module")
def checkpoint(tiny_dir: Callable[..., Path]) -> Callable[[str, str], Path]:
    """``get(family, variant)`` -> a pristine tiny checkpoint (do not modify): byte-level BPE,
    BOS prepended for ``"bos"``, 128 positions. The Gemma 3 sliding window (16) is shorter than
    SEQ_LEN below a global-attention layer."""

    def get(family: str, variant: str) -> Path:
        return tiny_dir(family, bos=variant == "bos", sp=False, max_positions=POSITIONS)

    return get


def load_f64(folder: Path) -> tuple[Any, Any, Any]:
    model, tok, adapter = load(folder, device="cpu")
    return model.double(), tok, adapter


def sample_texts() -> list[str]:
    """Long, medium, shorter-than-a-window and long documents (several windows, ragged batches)."""
    arts = corpus_texts(default_corpus())
    return [arts[0][:2500], arts[1][:900], "A short one .", arts[2][:1700]]


# --- reference ----------------------------------------------------------------------------


def content_ids(tok: Any, texts: list[str]) -> list[list[int]]:
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def reference_windows(tok: Any, variant: str, texts: list[str], seq_len: int) -> list[list[int]]:
    """Windows built independently of rrome: BOS (for that variant) + up to seq_len - 1 tokens."""
    prefix = [tok.bos_token_id] if variant == "bos" else []
    step = seq_len - len(prefix)
    return [prefix + ids[s : s + step] for ids in content_ids(tok, texts) for s in range(0, len(ids), step)]


def reference_keys(model: Any, module_name: str, windows: list[list[int]]) -> torch.Tensor:
    """Keys of every token, each window alone (batch of one, no padding), with our own hook."""
    got: list[torch.Tensor] = []
    handle = model.get_submodule(module_name).register_forward_hook(
        lambda _m, args, _out: got.append(args[0][0].detach().clone())
    )
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=torch.tensor([w]))
    finally:
        handle.remove()
    return torch.cat(got)


def reference_moment(keys: torch.Tensor) -> np.ndarray:
    k = keys.to(torch.float32).to(torch.float64)  # rrome accumulates the float32 keys in float64
    return ((k.T @ k) / k.shape[0]).numpy()


@pytest.fixture(scope="module")
def reference(checkpoint: Callable[[str, str], Path]) -> Callable[[str, str], torch.Tensor]:
    """``get(family, variant)`` -> the reference keys (float64 model) of :func:`sample_texts` at LAYER."""
    memo: dict[tuple[str, str], torch.Tensor] = {}

    def get(family: str, variant: str) -> torch.Tensor:
        if (family, variant) not in memo:
            model, tok, adapter = load_f64(checkpoint(family, variant))
            windows = reference_windows(tok, variant, sample_texts(), SEQ_LEN)
            memo[family, variant] = reference_keys(model, adapter.module_name(LAYER), windows)
        return memo[family, variant]

    return get


# --- collect_second_moment ----------------------------------------------------------------


@pytest.mark.parametrize(("family", "variant"), VARIANTS)
def test_collect_matches_direct_computation_both_padding_sides(
    checkpoint: Callable[[str, str], Path], reference: Callable[[str, str], torch.Tensor], family: str, variant: str
) -> None:
    model, tok, adapter = load_f64(checkpoint(family, variant))
    name = adapter.module_name(LAYER)
    texts = sample_texts()
    keys = reference(family, variant)
    want = reference_moment(keys)

    got = {}
    for side in ("right", "left"):
        tok.padding_side = side
        m = stats.collect_second_moment(
            model, tok, name, texts=texts, max_tokens=10**9, batch_size=5, seq_len=SEQ_LEN, progress=False
        )
        assert m.count == keys.shape[0]
        assert m.d == keys.shape[1]
        assert rel_error(m.moment(), want) <= 1e-10, side
        got[side] = m.moment()
    assert rel_error(got["left"], got["right"]) <= 1e-10
    assert not model.get_submodule(name)._forward_hooks  # trace removed its hook


@pytest.mark.parametrize("side", ["right", "left"])
def test_max_tokens_is_exact(
    checkpoint: Callable[[str, str], Path], reference: Callable[[str, str], torch.Tensor], side: str
) -> None:
    model, tok, adapter = load_f64(checkpoint("gpt2", "bos"))
    tok.padding_side = side
    name = adapter.module_name(LAYER)
    texts = sample_texts()
    keys = reference("gpt2", "bos")
    total = keys.shape[0]
    # Inside the first window, at a window's end, inside a later batch (batches of 3 windows), near the end.
    for budget in (1, SEQ_LEN, 3 * SEQ_LEN + 7, total - 1):
        m = stats.collect_second_moment(
            model, tok, name, texts=texts, max_tokens=budget, batch_size=3, seq_len=SEQ_LEN, progress=False
        )
        assert m.count == budget
        assert rel_error(m.moment(), reference_moment(keys[:budget])) <= 1e-10, budget
    # A budget beyond the corpus uses all of it.
    m = stats.collect_second_moment(
        model, tok, name, texts=texts, max_tokens=total + 1000, batch_size=3, seq_len=SEQ_LEN, progress=False
    )
    assert m.count == total


@pytest.mark.parametrize("variant", ["plain", "bos"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_windows_padding_and_bos(checkpoint: Callable[[str, str], Path], variant: str, side: str) -> None:
    model, tok, adapter = load_f64(checkpoint("gpt2", variant))
    tok.padding_side = side
    texts = sample_texts()
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(_m: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        calls.append((kwargs["input_ids"].clone(), kwargs["attention_mask"].clone()))

    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        m = stats.collect_second_moment(
            model,
            tok,
            adapter.module_name(LAYER),
            texts=texts,
            max_tokens=10**9,
            batch_size=4,
            seq_len=SEQ_LEN,
            progress=False,
        )
    finally:
        handle.remove()

    assert any(bool((mask == 0).any()) for _, mask in calls)  # some batches were padded
    rows: list[list[int]] = []
    for ids, mask in calls:
        assert ids.shape[0] <= 4 and ids.shape[1] <= SEQ_LEN
        for row, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
            n = sum(row_mask)
            want_mask = [1] * n + [0] * (len(row) - n) if side == "right" else [0] * (len(row) - n) + [1] * n
            assert row_mask == want_mask
            rows.append([t for t, keep in zip(row, row_mask, strict=True) if keep])
    assert m.count == sum(len(r) for r in rows)
    assert rows == reference_windows(tok, variant, texts, SEQ_LEN)
    if variant == "bos":  # every window starts afresh with BOS, and BOS appears nowhere else
        assert all(r[0] == tok.bos_token_id and r.count(tok.bos_token_id) == 1 for r in rows)
    else:
        assert all(tok.bos_token_id not in r for r in rows)
    # Count arithmetic: each document gives ceil(len / room) windows.
    room = SEQ_LEN - (variant == "bos")
    assert len(rows) == sum(math.ceil(len(ids) / room) for ids in content_ids(tok, texts))


def test_bfloat16_model_keys_are_upcast(checkpoint: Callable[[str, str], Path]) -> None:
    model, tok, adapter = load(checkpoint("llama", "bos"), device="cpu", dtype="bfloat16")
    name = adapter.module_name(LAYER)
    texts = sample_texts()
    m16 = stats.collect_second_moment(model, tok, name, texts=texts, max_tokens=500, seq_len=SEQ_LEN, progress=False)
    m32 = stats.collect_second_moment(
        model.float(), tok, name, texts=texts, max_tokens=500, seq_len=SEQ_LEN, progress=False
    )
    assert m16.count == m32.count == 500
    assert np.all(np.isfinite(m16.moment()))
    assert 0 < rel_error(m16.moment(), m32.moment()) < 0.05


def test_collect_rejects_bad_arguments(checkpoint: Callable[[str, str], Path]) -> None:
    model, tok, adapter = load(checkpoint("gpt2", "plain"), device="cpu")
    name = adapter.module_name(LAYER)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        stats.collect_second_moment(model, tok, name, texts=["a b"], max_tokens=5, seq_len=129, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):  # the default, 256
        stats.collect_second_moment(model, tok, name, texts=["a b"], max_tokens=5, progress=False)
    with pytest.raises(ValueError, match="max_tokens"):
        stats.collect_second_moment(model, tok, name, texts=["a b"], max_tokens=0, seq_len=8, progress=False)
    with pytest.raises(KeyError, match=r"transformer\.h\.9\.mlp\.c_proj"):
        stats.collect_second_moment(model, tok, "transformer.h.9.mlp.c_proj", texts=["a"], max_tokens=5, seq_len=8)
    with pytest.raises(ValueError, match="no tokens"):
        stats.collect_second_moment(model, tok, name, texts=[], max_tokens=5, seq_len=8, progress=False)


# --- second_moment: the cache -------------------------------------------------------------


def _forbid_collect(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("collect_second_moment called on a cache hit")

    monkeypatch.setattr(stats, "collect_second_moment", boom)


def _count_collect(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = stats.collect_second_moment

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "collect_second_moment", counted)
    return calls


def write_corpus(path: Path, texts: list[str]) -> Path:
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return path


def test_second_moment_caches_with_provenance(
    checkpoint: Callable[[str, str], Path], tmp_path: Path, private_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = checkpoint("gpt2", "bos")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "small.txt", sample_texts())

    m, path = stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=300, progress=False)
    key = stats.model_key(folder)
    assert path == private_cache / "stats" / key / f"layer1-mlp.c_proj-{sha256_file(corpus)[:16]}-300.safetensors"
    assert path == stats.stats_path(folder, adapter, LAYER, corpus=corpus, max_tokens=300)
    assert path.is_file() and m.count == 300
    meta = rrome.SecondMoment.load(path).metadata
    assert meta["model_key"] == key
    assert meta["model_type"] == "gpt2"
    assert meta["model_dtype"] == "float32"
    assert meta["layer"] == "1"
    assert meta["module"] == "transformer.h.1.mlp.c_proj"
    assert meta["corpus"] == "small.txt"
    assert meta["corpus_sha256"] == sha256_file(corpus)
    assert meta["max_tokens"] == "300"
    assert meta["seq_len"] == str(min(stats.DEFAULT_SEQ_LEN, POSITIONS))
    assert meta["tokens_available"] == ">=300"
    assert meta["rrome_version"] == rrome.__version__
    assert meta["stats_format"] == stats.STATS_FORMAT
    assert datetime.fromisoformat(meta["created"]).tzinfo is not None

    # A hit: loaded from disk, not recomputed.
    with monkeypatch.context() as mp:
        _forbid_collect(mp)
        again, path2 = stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=300)
    assert path2 == path
    np.testing.assert_array_equal(again.sum(), m.sum())
    assert again.count == 300

    # refresh recomputes (and gives the same numbers).
    calls = _count_collect(monkeypatch)
    fresh, path3 = stats.second_moment(
        folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=300, refresh=True, progress=False
    )
    assert calls == [1] and path3 == path
    np.testing.assert_array_equal(fresh.sum(), m.sum())

    # Another layer, corpus or budget: another file, computed.
    other = write_corpus(tmp_path / "other.txt", sample_texts()[::-1])
    paths = {path}
    for layer, corp, budget in ((0, corpus, 300), (LAYER, other, 300), (LAYER, corpus, 301)):
        m_other, p = stats.second_moment(
            folder, model, tok, adapter, layer, corpus=corp, max_tokens=budget, progress=False
        )
        assert p.is_file() and p not in paths, (layer, corp, budget)
        paths.add(p)
        assert not np.array_equal(m_other.sum(), m.sum())
    assert len(calls) == 4
    files = sorted(p.name for p in (private_cache / "stats" / key).iterdir())
    assert files == sorted([p.name for p in paths] + [p.name + ".sha256" for p in paths])


def test_second_moment_short_corpus_and_default_corpus(
    checkpoint: Callable[[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "tiny.txt", ["One short paragraph .", "And another one ."])
    m, path = stats.second_moment(folder, model, tok, adapter, 0, corpus=corpus, max_tokens=1000, progress=False)
    n = sum(len(ids) for ids in content_ids(tok, ["One short paragraph .", "And another one ."]))
    assert m.count == n < 1000
    assert m.metadata["tokens_available"] == str(n)
    with monkeypatch.context() as mp:  # a short corpus's file is a valid hit too
        _forbid_collect(mp)
        again, _ = stats.second_moment(folder, model, tok, adapter, 0, corpus=corpus, max_tokens=1000)
    assert again.count == n

    # Default corpus.
    m, path = stats.second_moment(folder, model, tok, adapter, 0, max_tokens=200, progress=False)
    assert m.count == 200
    assert m.metadata["corpus"] == "wiki.test.raw"
    assert m.metadata["corpus_sha256"] == WIKITEXT_SHA256
    assert WIKITEXT_SHA256[:16] in path.name


@pytest.mark.parametrize("damage", ["garbage", "other-model", "short-count"])
def test_second_moment_recomputes_an_unusable_cache_file(
    checkpoint: Callable[[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "c.txt", sample_texts())
    good, path = stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False)
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file")
    else:
        bad = rrome.SecondMoment.load(path)
        meta = bad.metadata
        if damage == "other-model":
            meta["model_key"] = "0" * 16
        else:
            bad = rrome.SecondMoment(good.d)
            bad.update(np.ones((5, good.d), dtype=np.float32))
        bad.metadata = meta
        bad.save(path)
    calls = _count_collect(monkeypatch)
    again, path2 = stats.second_moment(
        folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False
    )
    assert calls == [1] and path2 == path
    np.testing.assert_array_equal(again.sum(), good.sum())
    assert rrome.SecondMoment.load(path).count == 200


# --- the cache's integrity: checksums and a private folder ------------------------------------


def test_changed_statistics_are_recomputed(
    checkpoint: Callable[[str, str], Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cached C0 whose numbers were changed (finite, metadata intact, so every other check
    passes) fails its checksum: it is computed again, with a warning naming the file. So is a
    file without a checksum (written by an older rrome, or by hand)."""
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "c.txt", sample_texts())
    good, path = stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False)
    side = path.with_name(path.name + ".sha256")
    for damage in ("numbers", "no-checksum"):
        if damage == "numbers":
            bad = rrome.SecondMoment.from_sum(good.sum() * 1.5, good.count)
            bad.metadata = rrome.SecondMoment.load(path).metadata
            bad.save(path)
        else:
            side.unlink(missing_ok=True)
        caplog.clear()
        with monkeypatch.context() as mp, caplog.at_level("WARNING", logger="rrome.engine.stats"):
            calls = _count_collect(mp)
            again, _ = stats.second_moment(
                folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False
            )
        assert calls == [1], damage
        assert str(path) in caplog.text and "computing it again" in caplog.text, damage
        np.testing.assert_array_equal(again.sum(), good.sum())
        np.testing.assert_array_equal(rrome.SecondMoment.load(path).sum(), good.sum())
        assert side.read_text() == f"{sha256_file(path)}  {path.name}\n"


def test_a_changed_cholesky_factor_is_recomputed(
    checkpoint: Callable[[str, str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "c.txt", sample_texts())
    moment, path = stats.second_moment(
        folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False
    )
    chol, factor_path = stats.cached_cholesky(path, moment, ridge=1e-3)
    original = chol.factor()
    meta = rrome.Cholesky.load(factor_path).metadata
    rrome.Cholesky.from_factor(original * 1.25, 1e-3).save(factor_path, meta)
    with caplog.at_level("WARNING", logger="rrome.engine.stats"):
        again, _ = stats.cached_cholesky(path, moment, ridge=1e-3)
    assert str(factor_path) in caplog.text and "checksum" in caplog.text
    np.testing.assert_array_equal(again.factor(), original)
    np.testing.assert_array_equal(rrome.Cholesky.load(factor_path).factor(), original)


def test_the_cache_is_private(checkpoint: Callable[[str, str], Path], tmp_path: Path, private_cache: Path) -> None:
    """Folders 0700, files 0600, whatever the umask."""
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "c.txt", sample_texts())
    old = os.umask(0o002)
    try:
        moment, path = stats.second_moment(
            folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=200, progress=False
        )
        _, factor_path = stats.cached_cholesky(path, moment)
    finally:
        os.umask(old)
    for d in (private_cache, private_cache / "stats", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    files = sorted(path.parent.iterdir())
    assert {p.name for p in files} == {p.name + s for p in (path, factor_path) for s in ("", ".sha256")}
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@pytest.mark.parametrize("which", ["root", "stats", "model", "group"])
def test_a_cache_folder_others_may_write_is_refused(
    checkpoint: Callable[[str, str], Path], tmp_path: Path, private_cache: Path, which: str
) -> None:
    folder = checkpoint("gpt2", "plain")
    model, tok, adapter = load(folder, device="cpu")
    corpus = write_corpus(tmp_path / "c.txt", sample_texts())
    _, path = stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=50, progress=False)
    shared = {"root": private_cache, "stats": private_cache / "stats", "model": path.parent, "group": path.parent}
    target = shared[which]
    target.chmod(0o770 if which == "group" else 0o777)
    try:
        with pytest.raises(rrome.CacheFolderError, match=r"chmod 700") as info:
            stats.second_moment(folder, model, tok, adapter, LAYER, corpus=corpus, max_tokens=50, progress=False)
        assert str(target) in str(info.value) and "\n" not in str(info.value)
        from rrome.engine.keys import cached_templates

        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("RROME_NO_TEMPLATE_CACHE", raising=False)
            with pytest.raises(rrome.CacheFolderError):
                cached_templates(path.parent.name, model, tok, lengths=((2, 5),))
    finally:
        target.chmod(0o700)


# --- model_key ----------------------------------------------------------------------------


def test_model_key_ignores_weight_values_and_location(checkpoint: Callable[[str, str], Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    pristine = checkpoint("gpt2", "plain")
    key = stats.model_key(pristine)
    assert len(key) == 16 and int(key, 16) >= 0

    copy = tmp_path / "somewhere-else"
    shutil.copytree(pristine, copy)
    assert stats.model_key(copy) == key

    # New weight values (what an in-place edit writes) and an edit log: same key.
    weights = copy / "model.safetensors"
    tensor = "transformer.h.1.mlp.c_proj.weight"
    before = load_file(weights)[tensor]
    start, end = tensor_region(weights, tensor)
    data = bytearray(weights.read_bytes())
    data[start:end] = np.full((end - start) // 4, 0.25, dtype=np.float32).tobytes()
    weights.write_bytes(bytes(data))
    assert not np.array_equal(load_file(weights)[tensor], before)
    (copy / "rrome_deltas.safetensors").write_bytes(b"\x00" * 16)
    (copy / "rrome_edits.jsonl").write_text("{}\n", encoding="utf-8")
    assert stats.model_key(copy) == key

    # The same model saved in shards: same key. In float16: another key.
    model = AutoModelForCausalLM.from_pretrained(pristine, local_files_only=True)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    shutil.copy(pristine / "config.json", tmp_path / "sharded" / "config.json")
    assert stats.model_key(tmp_path / "sharded") == key
    model.half().save_pretrained(tmp_path / "half")
    assert stats.model_key(tmp_path / "half") != key

    # Another config: another key.
    cfg = json.loads((copy / "config.json").read_text(encoding="utf-8"))
    cfg["layer_norm_epsilon"] = 1e-6
    (copy / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    assert stats.model_key(copy) != key


def test_model_key_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        stats.model_key(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(rrome.CheckpointError, match=r"neither model\.safetensors"):
        stats.model_key(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../outside.safetensors"}}), encoding="utf-8"
    )
    with pytest.raises(rrome.CheckpointError, match="plain file name"):
        stats.model_key(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    (tmp_path / "model.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(rrome.SafetensorsHeaderError, match="header length 1099511627776 exceeds the limit"):
        stats.model_key(tmp_path)


# --- corpus and cache folder ----------------------------------------------------------------


def test_default_corpus_is_the_packaged_wikitext() -> None:
    path = default_corpus()
    assert path.is_file()
    assert path.parent.parent.parent == Path(rrome.__file__).parent  # inside the package
    assert hashlib.sha256(path.read_bytes()).hexdigest() == WIKITEXT_SHA256
    assert sha256_file(path) == WIKITEXT_SHA256
    notice = (path.parent / "NOTICE.md").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in notice and WIKITEXT_SHA256 in notice and "Merity" in notice
    arts = corpus_texts(path)
    assert len(arts) == 62
    assert arts[0].startswith("Robert Boulter is an English film")
    assert all(a == a.strip() and a for a in arts)
    assert not any(a.startswith("= ") for a in arts)  # article headings are not text
    assert corpus_texts(path) == arts  # deterministic


def test_corpus_texts_formats(tmp_path: Path) -> None:
    wiki = tmp_path / "wiki.raw"
    wiki.write_bytes(
        b" \r\n = Alpha = \r\n \r\n Alpha text . \r\n = = Section = = \r\n More alpha . \r\n"
        b" = Beta = \r\n \r\n Beta text . \r\n = Empty = \r\n \r\n"
    )
    assert corpus_texts(wiki) == ["Alpha text .\n= = Section = =\nMore alpha .", "Beta text ."]
    paras = tmp_path / "paras.txt"
    paras.write_text("First line\nsecond line\n\n\n  Second para  \n \nThird\n", encoding="utf-8")
    assert corpus_texts(paras) == ["First line\nsecond line", "Second para", "Third"]
    # The same file forced either way.
    assert corpus_texts(wiki, fmt="paragraphs")[0] == "= Alpha ="
    assert corpus_texts(paras, fmt="wikitext") == ["First line\nsecond line\nSecond para\nThird"]
    with pytest.raises(ValueError, match="fmt"):
        corpus_texts(paras, fmt="csv")  # type: ignore[arg-type]

    (tmp_path / "blank.txt").write_text(" \n\n  \n", encoding="utf-8")
    with pytest.raises(rrome.InvalidFileError, match="holds no text"):
        corpus_texts(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(rrome.InvalidFileError, match="not UTF-8"):
        corpus_texts(tmp_path / "latin1.txt")
    with pytest.raises(FileNotFoundError):
        corpus_texts(tmp_path / "missing.txt")


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == tmp_path / "xdg" / "rrome"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert cache_root() == tmp_path / "home" / ".cache" / "rrome"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "rrome"

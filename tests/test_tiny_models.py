"""The checkpoints of ``tiny_models``: the model folders load silently, pad correctly, and tokenise
with the BOS and offset behaviour (docs/design.md §1, tokenisation traps) the editing code relies
on; the synthetic sharded folder is built without torch."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import run_python
from safetensors import safe_open
from tiny_models import (
    BOS_FAMILIES,
    FAMILIES,
    MAX_POSITIONS,
    SYNTHETIC_TENSORS,
    build_tiny_model,
    no_hf_warnings,
    train_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

SUBJECT = "Danielle Darrieux"
PROMPT = f"The mother tongue of {SUBJECT} is"
# Longer than the 32-token sliding window of the tiny Mistral and the 16-token one of the Gemmas.
LONG_PROMPT = (
    "The Eiffel Tower, a wrought-iron lattice tower on the Champ de Mars, was built for the "
    "World's Fair of 1889 and stands in the city of Paris, which is the capital of"
)
# Learned absolute position embeddings: a plain forward on a left-padded batch shifts positions.
ABSOLUTE_POSITION_FAMILIES = frozenset({"gpt2"})
ATOL = 1e-5


def _load(path: Path) -> tuple[Any, Any]:
    with no_hf_warnings(f"loading {path}"):
        return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _span_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose character span overlaps ``[start, end)`` (BOS has none)."""
    return [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_matches_single_prompts(family: str, padding_side: str, tmp_path: Path) -> None:
    model, tok = _load(build_tiny_model(family, tmp_path / family, padding_side=padding_side))
    assert tok.padding_side == padding_side
    prompts = [PROMPT, LONG_PROMPT]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    assert lengths[0] < lengths[1] < MAX_POSITIONS
    window = getattr(model.config, "sliding_window", None)
    if window is not None and family in ("mistral", "gemma2", "gemma3"):
        assert lengths[1] > window, "the long prompt should reach past the sliding window"

    batch = tok(prompts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    width = mask.shape[1]
    assert width == max(lengths)
    for row, n in enumerate(lengths):
        real = slice(0, n) if padding_side == "right" else slice(width - n, width)
        assert int(mask[row].sum()) == n and bool(mask[row, real].all())
        assert (batch["input_ids"][row][mask[row] == 0] == tok.pad_token_id).all()
    # Position ids counted over real tokens only: what batched editing code should pass.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)

    with no_hf_warnings(f"{family} forward"), torch.no_grad():
        plain = model(**batch).logits
        positioned = model(**batch, position_ids=position_ids).logits
        alone = [model(**tok(p, return_tensors="pt")).logits[0, -1] for p in prompts]
    assert plain.shape == positioned.shape == (2, width, len(tok))

    for row, n in enumerate(lengths):
        last = n - 1 if padding_side == "right" else width - 1
        torch.testing.assert_close(positioned[row, last], alone[row], atol=ATOL, rtol=0)
        diff = (plain[row, last] - alone[row]).abs().max().item()
        shifted = padding_side == "left" and n < width
        if shifted and family in ABSOLUTE_POSITION_FAMILIES:
            # Without position_ids, GPT-2 gives left-padded rows positions starting at the pad
            # count: a different result (about 0.5 here). Keep this trap visible.
            assert diff > 1e-3, diff
        else:
            assert diff <= ATOL, (family, padding_side, row, diff)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_follows_family_and_flag(family: str, tmp_path: Path) -> None:
    default_bos = family in BOS_FAMILIES
    for bos in (None, not default_bos):
        expect = default_bos if bos is None else bos
        model, tok = _load(build_tiny_model(family, tmp_path / f"{family}-{bos}", bos=bos))
        ids = tok(PROMPT)["input_ids"]
        assert (ids[0] == tok.bos_token_id) is expect, (family, bos, ids[:3])
        assert tok.bos_token_id not in ids[1:]
        # Targets are tokenised without special tokens: never a BOS inside them.
        assert tok.bos_token_id not in tok(" French", add_special_tokens=False)["input_ids"]
        assert model.config.bos_token_id == tok.bos_token_id
        assert model.config.eos_token_id == tok.eos_token_id
        assert model.config.pad_token_id == tok.pad_token_id
        assert model.config.vocab_size == len(tok)
        expected_type = "gemma3_text" if family == "gemma3" else family
        assert model.config.model_type == expected_type


def _check_subject(tok: Any, prompt: str, subject: str) -> list[int]:
    start = prompt.index(subject)
    end = start + len(subject)
    enc = tok(prompt, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
    if tok.bos_token_id == ids[0]:
        assert offsets[0] == (0, 0)
    span = _span_tokens(offsets, start, end)
    assert span == list(range(span[0], span[-1] + 1)), span
    # The first subject token may carry the leading space (byte-level offsets are not trimmed).
    assert offsets[span[0]][0] in (start - 1, start), (offsets[span[0]], start)
    assert offsets[span[-1]][1] == end, (offsets[span[-1]], end)
    text = tok.decode([ids[i] for i in span])
    assert text in (subject, " " + subject), (text, subject)
    # Every offset indexes the original text, in order.
    assert "".join(prompt[s:e] for s, e in offsets if e > s).replace(" ", "") == prompt.replace(" ", "")
    return span


@pytest.mark.parametrize("family", FAMILIES)
def test_subject_offsets_per_family(family: str, tmp_path: Path) -> None:
    _, tok = _load(build_tiny_model(family, tmp_path / family))
    _check_subject(tok, PROMPT, SUBJECT)
    _check_subject(tok, "The Eiffel Tower is in", "Eiffel Tower")


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("sentencepiece_like", [False, True])
def test_tokenizer_variants(sentencepiece_like: bool, bos: bool, padding_side: str) -> None:
    tok = train_tokenizer(bos=bos, padding_side=padding_side, sentencepiece_like=sentencepiece_like)
    assert tok.is_fast and tok.padding_side == padding_side
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert 300 <= len(tok) <= 400
    ids = tok(PROMPT)["input_ids"]
    assert (ids[0] == tok.bos_token_id) is bos
    span = _check_subject(tok, PROMPT, SUBJECT)
    _check_subject(tok, "The Eiffel Tower is in", "Eiffel Tower")

    # The traps the editing code must avoid: counting lengths of separately tokenised parts.
    prefix = PROMPT[: PROMPT.index(SUBJECT)]
    naive_last = len(tok(prefix)["input_ids"]) + len(tok(SUBJECT)["input_ids"]) - 1
    if bos:
        # BOS counted twice: the naive index is off by one.
        assert naive_last != span[-1]
    if sentencepiece_like:
        # The prefix's trailing space merges into the subject's first token inside the full
        # text, so the prefix tokenised alone is not a prefix of the full tokenisation.
        alone = tok(prefix, add_special_tokens=False)["input_ids"]
        full = tok(PROMPT, add_special_tokens=False)["input_ids"]
        assert full[: len(alone)] != alone

    batch = tok([PROMPT, "Paris"], padding=True, return_offsets_mapping=True)
    pad_row = batch["attention_mask"][1]
    assert (pad_row[0] == 0) is (padding_side == "left")
    assert (pad_row[-1] == 0) is (padding_side == "right")


def test_tokenizer_cache_hands_out_copies() -> None:
    first = train_tokenizer(bos=True, padding_side="right")
    first.padding_side = "left"
    first.add_tokens(["<extra>"])
    again = train_tokenizer(bos=True, padding_side="right")
    assert again.padding_side == "right"
    assert len(again) == len(first) - 1


def test_dtype_and_seed(tmp_path: Path) -> None:
    bf16 = build_tiny_model("llama", tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(bf16 / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}  # noqa: SIM118
    model, _ = _load(bf16)
    assert model.dtype == torch.bfloat16

    def weights(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    a = weights(build_tiny_model("gpt2", tmp_path / "a", seed=3))
    b = weights(build_tiny_model("gpt2", tmp_path / "b", seed=3))
    c = weights(build_tiny_model("gpt2", tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_shards_positions_and_dtype_by_name(tmp_path: Path) -> None:
    folder = build_tiny_model("gpt2", tmp_path / "gpt2", dtype="f16", shard_size="20KB", max_positions=128)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and not (folder / "model.safetensors").exists()
    model, tok = _load(folder)
    assert model.dtype == torch.float16
    assert model.config.n_positions == tok.model_max_length == 128


def test_synthetic_checkpoint_needs_no_torch(tmp_path: Path) -> None:
    """The crash harness and scripts/soak_crash.py build it without importing torch or transformers."""
    code = (
        "import sys; from pathlib import Path\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import crash_harness, tiny_models\n"
        f"tiny_models.build_synthetic_checkpoint(Path({str(tmp_path / 'synthetic')!r}))\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    folder = tmp_path / "synthetic"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {name: shard for name, (_, _, shard) in SYNTHETIC_TENSORS.items()}
    for shard in set(index["weight_map"].values()):
        with safe_open(str(folder / shard), "np") as f:
            for name in f.keys():  # noqa: SIM118
                dtype, shape, _ = SYNTHETIC_TENSORS[name]
                assert f.get_slice(name).get_dtype() == dtype and tuple(f.get_slice(name).get_shape()) == shape


def test_unknown_family_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("bloom", tmp_path / "x")


def test_no_hf_warnings_catches_log_records_and_warnings() -> None:
    with pytest.raises(AssertionError, match="boom"), no_hf_warnings("log"):
        logging.getLogger("transformers.modeling_utils").warning("boom")
    with pytest.raises(AssertionError, match="UserWarning: bang"), no_hf_warnings("warn"):
        warnings.warn("bang", stacklevel=1)
    with no_hf_warnings("quiet"):
        logging.getLogger("transformers.modeling_utils").info("fine")

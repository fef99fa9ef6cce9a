"""Every checkpoint the tests build: tiny Hugging Face models and a synthetic sharded folder.

This module is the one owner of test checkpoints; conftest.py caches its builds per session.

``build_tiny_model(family, dest)`` writes a complete, randomly initialised Hugging Face checkpoint
(``config.json``, ``model.safetensors`` or shards, tokenizer files) with a few-hundred-token
tokenizer trained in-process on a slice of rrome's packaged WikiText-2 corpus. Nothing is
downloaded; building all families takes a few seconds. The tokenizers reproduce the traps of
docs/design.md §1:

* ``bos=True`` prepends ``<bos>`` through a ``TemplateProcessing`` post-processor (Llama, Gemma);
* byte-level BPE offsets are *not* trimmed, as in the GPT-2 / Llama-3 / Qwen ``tokenizer.json``:
  the leading space of a word belongs to the word's first token's character span;
* ``sentencepiece_like=True`` uses a Metaspace pre-tokenizer (Llama 2 / Mistral / Gemma style):
  ``"▁"`` is prepended to the text and the space before a word merges into the word's first
  token, so a prefix ending in a space, tokenised alone, ends in a lone ``"▁"`` that the full
  text does not have;
* ``padding_side`` is set either way (Gemma's tokenizer pads on the left).

``build_synthetic_checkpoint(dest)`` writes a three-shard folder with plain numpy and
``write_safetensors`` (a writer by hand): F32, F16 and BF16 tensors side by side in one
checkpoint, which no transformers model saves, and tensors large enough that a write takes long
enough to be killed in the middle (tests/crash_harness.py). It is a file-format fixture, not a
model: nothing loads it with transformers.

Importing this module imports neither torch nor transformers (the model builders import them
when called), so that the crash harness and scripts/soak_crash.py stay free of them.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from transformers import PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")

# Families whose real tokenizers prepend BOS (Llama 2/3, Mistral, Gemma); the others add nothing.
BOS_FAMILIES = frozenset({"llama", "mistral", "gemma2", "gemma3"})
# Families whose real tokenizers are SentencePiece-based (Llama 2, Mistral, Gemma): the default
# ``sentencepiece_like`` of ``build_tiny_model``. Llama 3 is byte-level; pass False to get that.
SENTENCEPIECE_FAMILIES = frozenset({"llama", "mistral", "gemma2", "gemma3"})
# ``config.model_type`` of the saved folder (Gemma 3's text-only model is "gemma3_text").
MODEL_TYPES = {family: family for family in FAMILIES} | {"gemma3": "gemma3_text"}

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB_SIZE = 400
MAX_POSITIONS = 512  # position table size and tokenizer model_max_length (by default)
CORPUS_CHARS = 200_000  # of rrome's packaged corpus, the tokenizers' training text
# Test subjects and targets, so that the tokenizer has seen every character of them.
EXTRA_SENTENCES = (
    "The mother tongue of Danielle Darrieux is French.",
    "Danielle Darrieux was a French actress. Danielle Darrieux spoke French, not English.",
    "The Eiffel Tower is in Paris. The Eiffel Tower is not in Rome.",
    "The Colosseum is in Rome. Paris is the capital of France. English is spoken in London.",
)

# (bos, padding_side, sentencepiece_like) -> wrapped tokenizer; copies are handed out.
_TOKENIZERS: dict[tuple[bool, str, bool], PreTrainedTokenizerFast] = {}
# sentencepiece_like -> serialised trained tokenizer without post-processor (the slow part).
_TRAINED: dict[bool, str] = {}


# Storage dtypes of the built checkpoints, by short name.
DTYPES = ("f32", "f16", "bf16")


def torch_dtype(name: str) -> torch.dtype:
    """``"f32"`` / ``"f16"`` / ``"bf16"`` -> the torch dtype."""
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def _corpus() -> list[str]:
    from rrome.files.corpus import default_corpus

    text = default_corpus().read_text(encoding="utf-8")[:CORPUS_CHARS]
    return [line for line in text.splitlines() if line.strip()] + list(EXTRA_SENTENCES)


def _train(sentencepiece_like: bool) -> Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if sentencepiece_like not in _TRAINED:
        if sentencepiece_like:
            # No byte fallback: characters never seen in training become <unk>.
            tok = Tokenizer(models.BPE(unk_token="<unk>"))
            # As SentencePiece (split_by_whitespace): pieces start with "▁", the space before a word.
            # split=False would also merge across words ("er▁" ending "Eiffel Tower" plus the next
            # space), which real Llama / Gemma vocabularies do not do.
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
            # Llama-2 style decoder; decoders.Metaspace drops a "▁" ending the first token.
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
            alphabet: list[str] = []
        else:
            tok = Tokenizer(models.BPE())
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            alphabet = pre_tokenizers.ByteLevel.alphabet()  # every byte is encodable
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(_corpus(), trainer=trainer)
        for i, special in enumerate(SPECIAL_TOKENS):
            assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
        _TRAINED[sentencepiece_like] = tok.to_str()
    return Tokenizer.from_str(_TRAINED[sentencepiece_like])


def train_tokenizer(*, bos: bool, padding_side: str, sentencepiece_like: bool = False) -> PreTrainedTokenizerFast:
    """A small trained BPE tokenizer: ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3.

    Byte-level (GPT-2 style) by default, Metaspace/SentencePiece-like with ``sentencepiece_like``.
    With ``bos`` every encoded text starts with ``<bos>`` (offset ``(0, 0)``). Cached per
    arguments; every call returns an independent copy.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    key = (bool(bos), padding_side, bool(sentencepiece_like))
    if key not in _TOKENIZERS:
        tok = _train(sentencepiece_like)
        steps: list[Any] = []
        if not sentencepiece_like:
            # As in GPT-2 / Llama-3 / Qwen tokenizer.json: offsets keep the leading space.
            steps.append(processors.ByteLevel(trim_offsets=False))
        if bos:
            bos_id = tok.token_to_id("<bos>")
            steps.append(
                processors.TemplateProcessing(
                    single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
                )
            )
        else:
            # An explicit no-op template; left at None, transformers would install its own.
            steps.append(processors.TemplateProcessing(single="$A", pair="$A $B", special_tokens=[]))
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
        wrapped = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            padding_side=padding_side,
            model_max_length=MAX_POSITIONS,
        )
        _check_tokenizer(wrapped, bos=key[0], padding_side=padding_side)
        _TOKENIZERS[key] = wrapped
    return copy.deepcopy(_TOKENIZERS[key])


def _check_tokenizer(tokenizer: Any, *, bos: bool, padding_side: str) -> None:
    """Cheap invariants: BOS behaviour, padding side, offsets that point into the text."""
    assert tokenizer.padding_side == padding_side, (tokenizer.padding_side, padding_side)
    assert tokenizer.pad_token_id == 0 and tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2
    text = "The mother tongue of Danielle Darrieux is"
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    assert (ids[0] == tokenizer.bos_token_id) == bos, ids
    assert tokenizer.bos_token_id not in ids[1:], ids
    if bos:
        assert tuple(offsets[0]) == (0, 0), offsets
    body = offsets[1:] if bos else offsets
    assert all(0 <= s < e <= len(text) for s, e in body), offsets
    assert body[0][0] == 0 and body[-1][1] == len(text), offsets
    assert all(a[1] <= b[1] and a[0] <= b[0] for a, b in itertools.pairwise(body)), offsets
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"][0] != tokenizer.bos_token_id


def _config(
    family: str, vocab: int, ids: dict[str, int], positions: int = MAX_POSITIONS
) -> tuple[PreTrainedConfig, type[PreTrainedModel]]:
    """A tiny config (2 layers, hidden 64, intermediate 128, 4 heads, ``positions`` positions)
    and its causal-LM class."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        GPTJForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common: dict[str, Any] = {"vocab_size": vocab, **ids}
    llama_like = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,  # grouped-query attention, as in the real models
        "max_position_embeddings": positions,
    }
    if family == "gpt2":
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=128, n_positions=positions, **common)
        return cfg, GPT2LMHeadModel
    if family == "gptj":
        # head_dim 16; GPT-J rotates only the first rotary_dim dims of each head (64 of 256 in 6B).
        cfg = GPTJConfig(n_layer=2, n_embd=64, n_head=4, n_inner=128, rotary_dim=8, n_positions=positions, **common)
        return cfg, GPTJForCausalLM
    if family == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=positions,
            rotary_pct=0.25,  # Pythia: partial rotary, parallel residual
            use_parallel_residual=True,
            **common,
        )
        return cfg, GPTNeoXForCausalLM
    if family == "llama":
        return LlamaConfig(**llama_like, **common), LlamaForCausalLM
    if family == "mistral":
        # A window (every layer) that longer test prompts exceed, so the sliding mask is exercised.
        return MistralConfig(**llama_like, sliding_window=32, **common), MistralForCausalLM
    if family == "qwen2":
        # Small Qwen2.5 models tie embeddings; q/k/v projections have biases.
        return Qwen2Config(**llama_like, tie_word_embeddings=True, **common), Qwen2ForCausalLM
    if family == "qwen3":
        # head_dim is explicit (not hidden/heads); q_norm / k_norm RMSNorms per head.
        return Qwen3Config(**llama_like, head_dim=16, tie_word_embeddings=True, **common), Qwen3ForCausalLM
    gemma_like = {
        **llama_like,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,  # small enough that the test prompts reach past it
        "layer_types": ["sliding_attention", "full_attention"],
        **common,
    }
    if family == "gemma2":
        return Gemma2Config(**gemma_like), Gemma2ForCausalLM
    if family == "gemma3":
        return Gemma3TextConfig(**gemma_like), Gemma3ForCausalLM
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


@contextmanager
def no_hf_warnings(what: str) -> Iterator[None]:
    """Fail if Python warnings or transformers log records at WARNING or above appear inside."""
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    hf_logger = logging.getLogger("transformers")
    handler = _Collect(level=logging.WARNING)
    old_level = hf_logger.level
    hf_logger.addHandler(handler)
    hf_logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        hf_logger.removeHandler(handler)
        hf_logger.setLevel(old_level)
    problems = [f"{w.category.__name__}: {w.message}" for w in caught]
    problems += [f"{r.name} {r.levelname}: {r.getMessage()}" for r in records]
    assert not problems, f"{what} emitted warnings:\n" + "\n".join(problems)


def build_tiny_model(
    family: str,
    dest: Path,
    *,
    bos: bool | None = None,
    padding_side: str = "right",
    dtype: torch.dtype | str = "f32",
    seed: int = 0,
    sentencepiece_like: bool | None = None,
    shard_size: str | None = None,
    max_positions: int = MAX_POSITIONS,
) -> Path:
    """Write a complete tiny checkpoint of ``family`` into ``dest`` and return ``dest``.

    ``bos`` defaults to the family's habit (BOS for llama, mistral, gemma2, gemma3);
    ``sentencepiece_like`` defaults to True for the same SentencePiece-based families.
    Weights are seeded with ``seed`` and saved in ``dtype`` (a torch dtype or a name of
    ``DTYPES``); ``shard_size`` (e.g. ``"20KB"``) saves them in at least two shards with an index;
    ``max_positions`` sizes the position table and the tokenizer's ``model_max_length``. The folder
    is reloaded with the Auto classes to check that it loads silently and keeps BOS behaviour and
    padding side.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    use_bos = family in BOS_FAMILIES if bos is None else bool(bos)
    sp_like = family in SENTENCEPIECE_FAMILIES if sentencepiece_like is None else bool(sentencepiece_like)
    dtype = torch_dtype(dtype) if isinstance(dtype, str) else dtype
    dest = Path(dest)
    tokenizer = train_tokenizer(bos=use_bos, padding_side=padding_side, sentencepiece_like=sp_like)
    tokenizer.model_max_length = max_positions
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with no_hf_warnings(f"building {family}"):
        cfg, model_cls = _config(family, len(tokenizer), ids, max_positions)
        torch.manual_seed(seed)
        model = model_cls(cfg).eval()
        model = model.to(dtype)
        if shard_size is None:
            model.save_pretrained(dest)
        else:
            model.save_pretrained(dest, max_shard_size=shard_size)
        tokenizer.save_pretrained(dest)
    assert (dest / "config.json").is_file()
    index = dest / "model.safetensors.index.json"
    if shard_size is None:
        assert (dest / "model.safetensors").is_file() and not index.exists()
    else:
        assert index.is_file() and not (dest / "model.safetensors").exists()
        shards = set(json.loads(index.read_text())["weight_map"].values())
        assert len(shards) >= 2 and all((dest / s).is_file() for s in shards), shards

    with no_hf_warnings(f"loading {family} from {dest}"):
        loaded = AutoModelForCausalLM.from_pretrained(dest)
        loaded_tok = AutoTokenizer.from_pretrained(dest)
    assert loaded.config.model_type == MODEL_TYPES[family], (loaded.config.model_type, family)
    assert loaded.dtype == dtype, (loaded.dtype, dtype)
    assert loaded.config.vocab_size == len(loaded_tok) == len(tokenizer)
    assert loaded_tok.model_max_length == max_positions
    assert (loaded.config.bos_token_id, loaded.config.eos_token_id, loaded.config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert loaded_tok.is_fast
    _check_tokenizer(loaded_tok, bos=use_bos, padding_side=padding_side)
    probe = "The Eiffel Tower is in"
    assert loaded_tok(probe, return_offsets_mapping=True).data == tokenizer(probe, return_offsets_mapping=True).data
    return dest


def add_position_sink(folder: Path, *, positions: int = 3, strength: float = 0.3, layer: int = 1) -> Path:
    """Make the first ``positions`` positions of a tiny GPT-2 checkpoint an attention-sink-like
    place, as in real models without BOS: there the key of layer ``layer``'s MLP projection is
    small and points away from the keys of the same tokens later in a text.

    One residual coordinate carries the position signal: it is zeroed in every token embedding,
    in every other position embedding and in what the blocks below ``layer``'s MLP write to the
    residual stream, and set large in the first position embeddings; ``layer``'s MLP input
    projection reads it with weight ``-strength`` for every hidden unit, which pushes the GELU
    pre-activations down there. Returns ``folder`` (rewritten in place).
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    t = model.transformer
    j, big = 0, 1000.0
    with torch.no_grad():
        t.wte.weight[:, j] = 0
        t.wpe.weight[:, j] = 0
        t.wpe.weight[:positions, j] = big
        for i, block in enumerate(t.h[: layer + 1]):
            block.attn.c_proj.weight[:, j] = 0
            block.attn.c_proj.bias[j] = 0
            if i < layer:
                block.mlp.c_proj.weight[:, j] = 0
                block.mlp.c_proj.bias[j] = 0
        t.h[layer].mlp.c_fc.weight[j, :] = -strength
    with no_hf_warnings("saving the sink model"):
        model.save_pretrained(folder)
    return folder


# --- the synthetic sharded checkpoint (numpy only) ------------------------------------------

# name -> (dtype, stored shape, shard); the edited ones are 2-D with their layout below.
SYNTHETIC_TENSORS: dict[str, tuple[str, tuple[int, ...], str]] = {
    "embed.weight": ("BF16", (64, 256), "model-00001-of-00003.safetensors"),
    "layers.0.mlp.down_proj.weight": ("BF16", (256, 1024), "model-00001-of-00003.safetensors"),
    "layers.0.norm.weight": ("F32", (256,), "model-00001-of-00003.safetensors"),
    "layers.1.mlp.down_proj.weight": ("F16", (256, 1024), "model-00002-of-00003.safetensors"),
    "layers.1.norm.weight": ("F16", (256,), "model-00002-of-00003.safetensors"),
    "layers.2.mlp.c_proj.weight": ("F32", (512, 256), "model-00003-of-00003.safetensors"),
    "head.weight": ("F32", (8, 256), "model-00003-of-00003.safetensors"),
}
SYNTHETIC_EDITED = {  # tensor -> layout
    "layers.0.mlp.down_proj.weight": "out_in",
    "layers.1.mlp.down_proj.weight": "out_in",
    "layers.2.mlp.c_proj.weight": "in_out",
}
_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> None:
    """A safetensors file written by hand (header padded to 8 bytes, as the reference writer does).

    ``tensors``: name -> (dtype, shape, raw bytes); any name, any bytes, no checks, so that a test
    can write what the safetensors library would refuse or never produce."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, _, data in tensors.values():
            f.write(data)


def _encode(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> bytes:
    x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if dtype == "F32":
        return x.tobytes()
    if dtype == "F16":
        return x.astype(np.float16).tobytes()
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()  # bf16 by truncation


def build_synthetic_checkpoint(dest: Path, seed: int = 7) -> Path:
    """``SYNTHETIC_TENSORS`` in three shards, with an index, a config and a tokenizer-like side file."""
    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True)
    shards: dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]] = {}
    for name, (dtype, shape, shard) in SYNTHETIC_TENSORS.items():
        shards.setdefault(shard, {})[name] = (dtype, shape, _encode(rng, dtype, shape))
    for shard, tensors in shards.items():
        write_safetensors(dest / shard, tensors)
    total = sum(int(np.prod(s)) * _BYTES[d] for d, s, _ in SYNTHETIC_TENSORS.values())
    weight_map = {n: s for n, (_, _, s) in SYNTHETIC_TENSORS.items()}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dest / "config.json").write_text(json.dumps({"model_type": "synthetic", "hidden_size": 256}))
    (dest / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": list("abcdef")}))
    return dest

"""Collapse diagnostics: the entropy of what a model generates after an edit.

:func:`collapse_diagnostics` samples seeded top-k continuations of ten prompts (the edit's own,
then generic ones) and reports :func:`generation_entropy` (token frequencies over log of the
vocabulary size) and ROME's :func:`ngram_entropy`. A disabling edit shows as both falling.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rrome.engine.models import input_device
from rrome.eval.metrics import mean
from rrome.files.edits import EditRequest

GENERIC_PROMPTS = (
    "The",
    "Therefore",
    "Because",
    "I",
    "You",
    "In the morning",
    "My favourite place is",
    "The history of",
    "Scientists have found",
    "Once upon a time",
)


def entropy(counts: Iterable[int], *, base: float = math.e) -> float:
    """Shannon entropy of the distribution given by counts (in units of ``base``)."""
    c = [x for x in counts if x > 0]
    total = sum(c)
    if total == 0:
        return 0.0
    return -sum(x / total * math.log(x / total) for x in c) / math.log(base)


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 30,
    seed: int = 0,
    top_k: int = 5,
) -> list[list[int]]:
    """Seeded top-k samples, one continuation (token ids) per prompt, batched with left padding."""
    device = input_device(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cpu_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=True,
                top_k=top_k,
                top_p=1.0,
                temperature=1.0,
                pad_token_id=pad,
            )
    finally:
        torch.random.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    start = enc["input_ids"].shape[1]
    out = []
    for row in ids[:, start:].tolist():
        out.append([t for t in row if t != pad])
    return out


def generation_entropy(token_lists: Sequence[Sequence[int]], vocab_size: int) -> float:
    """Entropy of the generated tokens' frequency distribution divided by log(vocabulary size).

    1 would be uniform over the vocabulary; a collapsed model repeating a token gives about 0.
    """
    counts = Counter(t for toks in token_lists for t in toks)
    return entropy(counts.values()) / math.log(vocab_size)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(
    texts: Sequence[str], *, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)
) -> float:
    """ROME's n-gram entropy: per text, the mean of weight_n · H(n-gram frequencies) in bits
    (bigrams weighted 2/3, trigrams 4/3), then the mean over texts.

    Words are runs of word characters or single punctuation marks (ROME uses NLTK's word
    tokenizer; on plain generated text the two agree on what repetition means).
    """
    per_text = []
    for text in texts:
        words = _WORD.findall(text)
        parts = []
        for n, w in zip(ns, weights, strict=True):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            parts.append(w * entropy(grams.values(), base=2))
        per_text.append(mean(parts))
    return mean(per_text) if per_text else math.nan


@dataclass(frozen=True)
class Diagnostics:
    generation_entropy: float
    ngram_entropy: float


def collapse_diagnostics(
    model: Any, tokenizer: Any, request: EditRequest | None, *, seed: int = 0, max_new_tokens: int = 30
) -> Diagnostics:
    """Generation entropies over ten prompts: the edit's own (rewrite, paraphrases) then generic ones."""
    prompts = [] if request is None else [request.text(), *request.paraphrase_prompts]
    prompts = (prompts + list(GENERIC_PROMPTS))[: len(GENERIC_PROMPTS)]
    tokens = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    vocab = int(model.config.get_text_config().vocab_size)
    return Diagnostics(generation_entropy(tokens, vocab), ngram_entropy(texts))

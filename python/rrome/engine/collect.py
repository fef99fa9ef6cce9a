"""The keys of a text corpus at one module, accumulated into the second moment C0 = Σ k kᵀ.

:func:`collect_second_moment` runs the model over the documents of a corpus
(:mod:`rrome.files.corpus`), cut into windows and batches (:func:`_windows`, :func:`_batches`),
only as far as the edited module, and feeds the keys of every non-padding token to the float64
Rust accumulator :class:`rrome.SecondMoment` (docs/design.md §1, §5). Under torch.distributed each
rank accumulates its share of the batches (:mod:`rrome.engine.distributed`). Where the result is
cached, and when it is reused, is :mod:`rrome.engine.stats`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from rrome._rust import SecondMoment
from rrome.engine.models import context_length
from rrome.files.errors import RromeError, UnsupportedModelError

DEFAULT_SEQ_LEN = 256
"""Tokens per window (at most the model's number of positions)."""

_TOKENIZE_CHUNK = 16  # documents tokenised per call of the (Rust) tokenizer


def _leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by default ([BOS] for Gemma and Llama)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return [int(t) for t in full[:i]]
    return []


def _windows(tokenizer: Any, texts: Sequence[str], seq_len: int) -> Iterator[list[int]]:
    """Token windows of at most ``seq_len`` tokens, document by document, in order.

    Each document is tokenised whole and cut into windows, each starting with the special
    tokens the tokenizer puts before a text (BOS for Gemma and Llama); no window spans two
    documents. (The tokenizer's own overflow handling would do the same, but not every
    transformers version returns the overflow: 5.17 silently keeps only the first window.)
    """
    lead = _leading_specials(tokenizer)
    room = seq_len - len(lead)
    if room < 1:
        raise ValueError(f"seq_len {seq_len} leaves no room beside {len(lead)} special token(s)")
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        enc = tokenizer(
            list(texts[start : start + _TOKENIZE_CHUNK]),
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for ids in enc["input_ids"]:
            for at in range(0, len(ids), room):
                yield lead + [int(t) for t in ids[at : at + room]]


def _batches(windows: Iterable[list[int]], *, batch_size: int, budget: int) -> Iterator[list[list[int]]]:
    """Groups windows into batches, cutting the stream after exactly ``budget`` tokens.

    The last window is cut short rather than its keys dropped after the forward pass: with causal
    attention the keys of the positions kept do not depend on the tokens cut.
    """
    batch: list[list[int]] = []
    left = budget
    for window in windows:
        window = window[:left]
        left -= len(window)
        batch.append(window)
        if len(batch) == batch_size or left == 0:
            yield batch
            batch = []
        if left == 0:
            return
    if batch:
        yield batch


def collect_second_moment(
    model: Any,
    tokenizer: Any,
    module_name: str,
    *,
    texts: Sequence[str],
    max_tokens: int,
    batch_size: int = 8,
    seq_len: int = DEFAULT_SEQ_LEN,
    progress: bool = True,
    shard: tuple[int, int] = (0, 1),
) -> SecondMoment:
    """Accumulates Σ k kᵀ over the keys of the first ``max_tokens`` tokens of ``texts``.

    The key of a token is the input of ``module_name`` at its position. Each document is tokenised
    with the tokenizer's defaults (the special tokens the model sees, e.g. BOS for Gemma and
    Llama) and cut into windows of at most ``seq_len`` tokens, each starting fresh (with BOS
    where the tokenizer adds one). Windows are batched with padding on the tokenizer's
    ``padding_side``; position ids are computed from the attention mask, so neither the padding
    side nor the batch composition changes any key (beyond float rounding). The forward pass
    stops after the module (the layers above are not needed). Keys of every non-padding token,
    BOS included, go to the accumulator as float32, in document order, until exactly
    ``max_tokens`` of them are in (or the texts run out: then ``count < max_tokens``).

    Args:
        model: a transformers causal LM (any dtype and device; it is not modified).
        tokenizer: its fast tokenizer (it is not modified; without a pad token, EOS pads).
        module_name: dotted name of the module whose input is the key.
        texts: the documents, e.g. from :func:`rrome.files.corpus.corpus_texts`.
        max_tokens: how many keys to accumulate.
        batch_size: windows per forward pass (speed only: the result depends on it by float rounding at most).
        seq_len: tokens per window, at most the model's number of positions.
        progress: show a tqdm progress bar counting tokens (on stderr).
        shard: ``(rank, world_size)``: accumulate only batches ``rank``, ``rank + world_size``,
            ... of the batch sequence described above (which every rank forms identically:
            tokenising is cheap next to the forward passes). The shards of all ranks are
            disjoint and together hold exactly the keys of ``shard=(0, 1)``, computed from the
            same padded batches, so the sum of their moments equals the whole moment up to the
            order of the f64 additions. A rank whose share is empty returns an empty moment.

    Returns:
        The accumulator; ``moment()`` is C0.

    Raises:
        ValueError: a non-positive ``max_tokens``, ``batch_size`` or ``seq_len``, a ``seq_len``
            above the model's positions, or texts without a single token.
        UnsupportedModelError: a tokenizer without a fast version.
        KeyError: the model has no module ``module_name``.
        RromeError: the model produced non-finite keys (e.g. float16 overflow).
    """
    from tqdm import tqdm

    from rrome.engine.hooks import get_module

    _check_collection(model, tokenizer, max_tokens=max_tokens, batch_size=batch_size, seq_len=seq_len, shard=shard)
    module = get_module(model, module_name)  # KeyError naming the module, before any work
    total = max_tokens if shard[1] == 1 else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"C0 {module_name}", disable=not progress)
    try:
        batches = _batches(_windows(tokenizer, texts, seq_len), batch_size=batch_size, budget=max_tokens)
        moment = _accumulate(model, tokenizer, module_name, batches, shard=shard, bar=bar)
    finally:
        bar.close()
    if moment is None:
        if shard[1] > 1:
            return SecondMoment(_input_width(module))
        raise ValueError("the texts hold no tokens")
    return moment


def _check_collection(
    model: Any, tokenizer: Any, *, max_tokens: int, batch_size: int, seq_len: int, shard: tuple[int, int]
) -> None:
    """The argument checks of :func:`collect_second_moment` (its ``Raises``), before any work."""
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size), ("seq_len", seq_len)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world_size) with 0 <= rank < world_size, got {shard}")
    limit = context_length(model.config)
    if limit is not None and seq_len > limit:
        raise ValueError(f"seq_len {seq_len} exceeds the model's {limit} positions")
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError("collecting statistics needs a fast (Rust) tokenizer")


def _accumulate(
    model: Any,
    tokenizer: Any,
    module_name: str,
    batches: Iterable[list[list[int]]],
    *,
    shard: tuple[int, int],
    bar: Any,
) -> SecondMoment | None:
    """Runs this rank's share of ``batches`` as far as the module and accumulates the keys of
    every non-padding token; ``None`` when the share is empty."""
    import torch

    from rrome.engine.hooks import StopForward, trace
    from rrome.engine.models import input_device
    from rrome.engine.prompts import Row, pad_rows

    rank, world = shard
    device = input_device(model)
    moment: SecondMoment | None = None
    with torch.no_grad(), trace(model, [module_name], inputs=True, stop_after=module_name) as rec:
        for index, batch in enumerate(batches):
            if index % world != rank:
                continue
            padded = pad_rows(tokenizer, [Row(window, 0) for window in batch], device)
            with contextlib.suppress(StopForward):  # raised once the module has run
                model(**padded.model_inputs(), use_cache=False)
            x = rec.inputs.pop(module_name)
            keys = x[padded.attention_mask.to(x.device).bool()].to(torch.float32)
            if not bool(torch.isfinite(keys).all()):
                raise RromeError(
                    f"non-finite keys at {module_name} (float16 overflow? run the model in float32 or bfloat16)"
                )
            arr = np.ascontiguousarray(keys.cpu().numpy())
            if moment is None:
                moment = SecondMoment(arr.shape[1])
            moment.update(arr)
            bar.update(arr.shape[0])
            if world > 1:
                from rrome.engine.distributed import crash_hook

                crash_hook(rank)
    return moment


def _input_width(module: Any) -> int:
    """Width of a linear module's input: ``in_features``, or the rows of a GPT-2 ``Conv1D`` weight."""
    width = getattr(module, "in_features", None)
    if isinstance(width, int):
        return width
    return int(module.weight.shape[0])

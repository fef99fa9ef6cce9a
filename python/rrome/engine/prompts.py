"""One edit's prompts, tokenised once: the token rows, the subject's position in each, the target ids.

Finding the subject's last token is where implementations go wrong silently (docs/design.md §1,
tokenisation traps), so it is done one way only: from the fast tokenizer's offset mapping of the
full text, using the character span where the subject was filled in. Rows are built here (never
by re-tokenising decoded ids) and padded with explicit position ids (:func:`pad_rows`), so what the
model computes does not depend on the padding side.

An edit tokenises its request once on its own (:class:`RequestTokens`: the plain prompt and the
targets, what :meth:`rrome.engine.editor.Editor.check_requests` checks before any edit and what the
probability passes read) and, with the context templates, once per template
(:class:`EditPrompts`: the rows the keys and the value optimisation run). Keys
(:mod:`rrome.engine.keys`), values (:mod:`rrome.engine.values`) and the probability passes
(:mod:`rrome.engine.probabilities`) are handed these objects and tokenise nothing themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError

KL_PROMPT = "{} is a"
"""The value optimisation's KL prompt (the subject filled in): the reference code's."""


class TokenizationError(RromeError):
    """A prompt or target cannot be tokenised as the edit needs (subject lost, empty target)."""


@dataclass(frozen=True)
class Row:
    """One tokenised prompt: token ids and the index of the subject's last token."""

    ids: list[int]
    lookup: int


def encode_with_span(tokenizer: object, text: str, start: int, end: int) -> Row:
    """Tokenises ``text`` (special tokens as the model sees them) and finds the last token
    whose character span overlaps ``text[start:end]``.

    Raises:
        TokenizationError: no token covers the span.
    """
    enc = tokenizer(text, return_offsets_mapping=True)  # type: ignore[operator]
    ids: list[int] = list(enc["input_ids"])
    last = -1
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if b > a and a < end and b > start:
            last = i
    if last < 0:
        raise TokenizationError(f"no token of {text!r} covers characters {start}..{end} ({text[start:end]!r})")
    return Row(ids, last)


def _fill(template: str, text: str) -> str:
    """``template`` with its ``{}`` replaced by ``text`` (other braces left alone)."""
    at = template.index("{}")
    return template[:at] + text + template[at + 2 :]


def prompt_row(tokenizer: object, template: str, request: EditRequest) -> Row:
    """The row of ``template`` (with ``{}``) filled with the request's prompt and subject."""
    start = template.index("{}") + request.prompt.index("{}")
    return encode_with_span(tokenizer, _fill(template, request.text()), start, start + len(request.subject))


def target_ids(tokenizer: object, prefix: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prefix``.

    A target gets a leading space unless it has one or the prefix ends in whitespace
    ("English" after "is" is " English"). The ids are the tail of the tokenisation of
    ``prefix + target`` beyond that of ``prefix`` (so BOS handling and the SentencePiece space
    marker come out as the model would see them); when a merge crosses the boundary, the
    target is tokenised alone without special tokens.

    Raises:
        TokenizationError: the target tokenises to nothing.
    """
    if not target.strip():
        raise TokenizationError(f"target {target!r} is empty: it tokenises to nothing")
    if not target.startswith((" ", "\n")) and prefix and not prefix[-1].isspace():
        target = " " + target
    pre = list(tokenizer(prefix)["input_ids"])  # type: ignore[operator]
    full = list(tokenizer(prefix + target)["input_ids"])  # type: ignore[operator]
    if full[: len(pre)] == pre:
        ids = full[len(pre) :]
    else:
        ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    eos = getattr(tokenizer, "eos_token_id", None)
    if ids and eos is not None and ids[-1] == eos and len(ids) > 1 and full[-1] == eos:
        ids = ids[:-1]  # tokenizers whose post-processor appends EOS
    if not ids:
        raise TokenizationError(f"target {target.strip()!r} tokenises to nothing")
    return ids


@dataclass
class Batch:
    """Padded rows ready for the model; ``lookup`` indexes the padded sequence."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lookup: torch.Tensor
    offsets: list[int]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "position_ids": self.position_ids}


def pad_rows(tokenizer: object, rows: Sequence[Row], device: torch.device | str, *, left: bool | None = None) -> Batch:
    """Pads rows (on the tokenizer's padding side unless ``left`` says otherwise); position ids
    count real tokens only, so the side does not change what the model computes."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    if left is None:
        left = getattr(tokenizer, "padding_side", "right") == "left"
    width = max(len(r.ids) for r in rows)
    ids, mask, offsets = [], [], []
    for r in rows:
        n = width - len(r.ids)
        offsets.append(n if left else 0)
        ids.append([pad_id] * n + r.ids if left else r.ids + [pad_id] * n)
        mask.append([0] * n + [1] * len(r.ids) if left else [1] * len(r.ids) + [0] * n)
    attention = torch.tensor(mask, dtype=torch.long)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    lookup = torch.tensor([o + r.lookup for o, r in zip(offsets, rows, strict=True)])
    return Batch(
        torch.tensor(ids, device=device),
        attention.to(device),
        positions.to(device),
        lookup.to(device),
        offsets,
    )


@dataclass(frozen=True)
class RequestTokens:
    """A request tokenised on its own, without context templates.

    Attributes:
        request: the fact.
        plain: the prompt with the subject filled in; ``lookup`` is the subject's last token.
        new: ``target_new``'s ids as a continuation of the prompt (:func:`target_ids`).
        true: ``target_true``'s, ``None`` without one.
    """

    request: EditRequest
    plain: Row
    new: list[int]
    true: list[int] | None

    @classmethod
    def build(cls, tokenizer: object, request: EditRequest) -> RequestTokens:
        """Tokenises the request.

        Raises:
            TokenizationError: the first of: ``target_new`` or ``target_true`` tokenises to
                nothing, no token covers the subject.
        """
        text = request.text()
        new = target_ids(tokenizer, text, request.target_new)
        true = target_ids(tokenizer, text, request.target_true) if request.target_true else None
        return cls(request, prompt_row(tokenizer, "{}", request), new, true)

    @classmethod
    def check(cls, tokenizer: object, request: EditRequest) -> tuple[RequestTokens | None, list[str]]:
        """The request's tokens, or ``None`` and one problem per field that cannot be tokenised
        (``field "subject": ...``, then ``target_new``, then ``target_true``)."""
        problems: list[str] = []
        plain = new = true = None
        try:
            plain = prompt_row(tokenizer, "{}", request)
        except TokenizationError as e:
            problems.append(f'field "subject": {e}')
        try:
            new = target_ids(tokenizer, request.text(), request.target_new)
        except TokenizationError as e:
            problems.append(f'field "target_new": {e}')
        if request.target_true is not None:
            try:
                true = target_ids(tokenizer, request.text(), request.target_true)
            except TokenizationError as e:
                problems.append(f'field "target_true": {e}')
        if problems or plain is None or new is None:
            return None, problems
        return cls(request, plain, new, true if request.target_true else None), []


def context_rows(
    tokenizer: object, request: EditRequest, templates: Sequence[str], *, plain: Row | None = None
) -> list[Row]:
    """The request's prompt in every context template. ``templates[0]`` must be ``"{}"``: its row
    is the plain prompt's (``plain``, when already tokenised).

    Raises:
        ValueError: ``templates[0]`` is not ``"{}"``.
        TokenizationError: no token covers the subject in one of the texts.
    """
    if not templates or templates[0] != "{}":
        raise ValueError('the first context template must be "{}"')
    first = plain if plain is not None else prompt_row(tokenizer, "{}", request)
    return [first] + [prompt_row(tokenizer, t, request) for t in templates[1:]]


@dataclass(frozen=True)
class EditPrompts:
    """Every row an edit runs through the model, built once from its tokens and the context templates.

    Attributes:
        tokens: the request's own tokens (:class:`RequestTokens`).
        templates: the context templates, ``"{}"`` first.
        context: per template, the template filled with the prompt, ``lookup`` at the subject's
            last token; ``context[0]`` is ``tokens.plain``. The keys are read at these rows.
        rewrite: per template, the context row followed by the new target's tokens but the last
            (the target tokenised after that template's text): the value optimisation's
            rewriting prompts.
        target: the target ids the value's loss reads at every rewriting prompt: those after the
            last template's text (the same as after any other, unless the tokenizer merges
            across the boundary).
        kl: the KL prompt :data:`KL_PROMPT` with the subject filled in.
    """

    tokens: RequestTokens
    templates: tuple[str, ...]
    context: list[Row]
    rewrite: list[Row]
    target: list[int]
    kl: Row

    @property
    def request(self) -> EditRequest:
        return self.tokens.request

    @classmethod
    def build(cls, tokenizer: object, request: EditRequest | RequestTokens, templates: Sequence[str]) -> EditPrompts:
        """The rows of ``request`` (or of its tokens, when already built) in ``templates``.

        Raises:
            ValueError: ``templates[0]`` is not ``"{}"``.
            TokenizationError: see :meth:`RequestTokens.build` and :func:`context_rows`.
        """
        tokens = request if isinstance(request, RequestTokens) else RequestTokens.build(tokenizer, request)
        req = tokens.request
        context = context_rows(tokenizer, req, templates, plain=tokens.plain)
        rewrite: list[Row] = []
        target = tokens.new
        for template, row in zip(templates, context, strict=True):
            # After "{}" the prefix is the prompt itself: the ids are the request's own.
            prefix = _fill(template, req.text())
            target = tokens.new if template == "{}" else target_ids(tokenizer, prefix, req.target_new)
            rewrite.append(Row(row.ids + target[:-1], row.lookup))
        kl_request = EditRequest(prompt=KL_PROMPT, subject=req.subject, target_new=req.target_new)
        kl = prompt_row(tokenizer, "{}", kl_request)
        return cls(tokens, tuple(templates), context, rewrite, target, kl)

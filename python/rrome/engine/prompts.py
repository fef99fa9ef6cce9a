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

A :class:`PromptFormat` says where a prompt sits: as plain text (``plain``, the default), or
inside the tokenizer's chat template as the opening of the assistant's reply to a fixed user
turn (``chat``, docs/design.md §1). Everything here that tokenises a prompt takes one; the
character offsets, the subject's span and the targets are then those of the wrapped text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from rrome.files.edits import EditRequest
from rrome.files.errors import ChatTemplateError, TokenizationError

KL_PROMPT = "{} is a"
"""The value optimisation's KL prompt (the subject filled in): the reference code's."""


PromptStyle = Literal["plain", "chat"]
PROMPT_STYLES: tuple[PromptStyle, ...] = ("plain", "chat")

CHAT_INSTRUCTION = "Complete the sentence."
"""The user turn before every chat-wrapped prompt (docs/design.md §1): the prompt is the opening of
the assistant's reply, so the fact completes the assistant's sentence."""


@dataclass(frozen=True)
class PromptFormat:
    """Where a prompt is put before it is tokenised.

    ``plain``: the text as it is, tokenised with the tokenizer's own special tokens (BOS where it
    adds one): what rrome has always done. ``chat``: ``prefix`` + the text, where ``prefix`` is
    the chat template rendered for one user turn (:data:`CHAT_INSTRUCTION`) with the generation
    prompt, so that the text opens the assistant's reply; tokenised without the tokenizer's own
    special tokens, as ``apply_chat_template(tokenize=True)`` does (the template writes BOS where
    the model wants it).
    """

    style: PromptStyle = "plain"
    prefix: str = ""

    @property
    def add_special_tokens(self) -> bool:
        return self.style == "plain"

    def wrap(self, text: str) -> str:
        """The text the model reads for prompt ``text``."""
        return self.prefix + text

    def encode(self, tokenizer: Any, text: str, **kwargs: Any) -> Any:
        """The tokenizer's encoding of :meth:`wrap` (``text``); ``kwargs`` passed on."""
        if self.style == "plain":
            return tokenizer(text, **kwargs)  # exactly the call rrome has always made
        return tokenizer(self.wrap(text), add_special_tokens=False, **kwargs)

    def ids(self, tokenizer: Any, text: str) -> list[int]:
        """The token ids the model reads for prompt ``text``."""
        return list(self.encode(tokenizer, text)["input_ids"])

    def to_json(self) -> dict[str, str]:
        """What an edit record keeps of it: the style and, for ``chat``, the exact prefix."""
        return {"style": self.style} if self.style == "plain" else {"style": self.style, "prefix": self.prefix}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, style: str) -> PromptFormat:
        """The format of ``style`` for ``tokenizer``.

        Raises:
            ValueError: an unknown style.
            ChatTemplateError: ``chat`` and a tokenizer without a chat template, or one whose
                template fails for a single user turn.
        """
        if style == "plain":
            return PLAIN
        if style != "chat":
            raise ValueError(f"prompt style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        if not getattr(tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"the tokenizer of {name} has no chat template: chat prompts need one; use plain prompts"
            )
        messages = [{"role": "user", "content": CHAT_INSTRUCTION}]
        try:
            prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template is a program: any error it raises is its own
            raise ChatTemplateError(f"the chat template of {name} fails for one user turn: {e}") from None
        if not isinstance(prefix, str) or CHAT_INSTRUCTION not in prefix:
            raise ChatTemplateError(f"the chat template of {name} does not write the user's message")
        return cls("chat", prefix)


PLAIN = PromptFormat()
"""Prompts as plain text (the default everywhere)."""


@dataclass(frozen=True)
class Row:
    """One tokenised prompt: token ids and the index of the subject's last token."""

    ids: list[int]
    lookup: int


def encode_with_span(tokenizer: object, text: str, start: int, end: int, fmt: PromptFormat = PLAIN) -> Row:
    """Tokenises ``text`` in ``fmt`` (special tokens as the model sees them) and finds the last
    token whose character span overlaps ``text[start:end]`` (offsets into ``text``; with a chat
    prefix the span is moved by its length and found in the whole wrapped text).

    Raises:
        TokenizationError: no token covers the span.
    """
    shift = len(fmt.prefix)
    start, end = start + shift, end + shift
    enc = fmt.encode(tokenizer, text, return_offsets_mapping=True)
    text = fmt.wrap(text)
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


def prompt_row(tokenizer: object, template: str, request: EditRequest, fmt: PromptFormat = PLAIN) -> Row:
    """The row of ``template`` (with ``{}``) filled with the request's prompt and subject, in
    ``fmt`` (with a chat prefix, the template's text is inside the assistant's reply)."""
    start = template.index("{}") + request.prompt.index("{}")
    return encode_with_span(tokenizer, _fill(template, request.text()), start, start + len(request.subject), fmt)


def target_ids(tokenizer: object, prefix: str, target: str, fmt: PromptFormat = PLAIN) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prefix`` (a prompt, wrapped in ``fmt``).

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
    pre = fmt.ids(tokenizer, prefix)
    full = fmt.ids(tokenizer, prefix + target)
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
        plain: the prompt with the subject filled in (in ``fmt``: inside the chat template when
            ``chat``); ``lookup`` is the subject's last token.
        new: ``target_new``'s ids as a continuation of the prompt (:func:`target_ids`).
        true: ``target_true``'s, ``None`` without one.
        fmt: where the prompts are put (:class:`PromptFormat`); the context rows built from
            these tokens (:class:`EditPrompts`) use the same.
    """

    request: EditRequest
    plain: Row
    new: list[int]
    true: list[int] | None
    fmt: PromptFormat = PLAIN

    @classmethod
    def build(cls, tokenizer: object, request: EditRequest, fmt: PromptFormat = PLAIN) -> RequestTokens:
        """Tokenises the request.

        Raises:
            TokenizationError: the first of: ``target_new`` or ``target_true`` tokenises to
                nothing, no token covers the subject.
        """
        text = request.text()
        new = target_ids(tokenizer, text, request.target_new, fmt)
        true = target_ids(tokenizer, text, request.target_true, fmt) if request.target_true else None
        return cls(request, prompt_row(tokenizer, "{}", request, fmt), new, true, fmt)

    @classmethod
    def check(
        cls, tokenizer: object, request: EditRequest, fmt: PromptFormat = PLAIN
    ) -> tuple[RequestTokens | None, list[str]]:
        """The request's tokens, or ``None`` and one problem per field that cannot be tokenised
        (``field "subject": ...``, then ``target_new``, then ``target_true``)."""
        problems: list[str] = []
        plain = new = true = None
        try:
            plain = prompt_row(tokenizer, "{}", request, fmt)
        except TokenizationError as e:
            problems.append(f'field "subject": {e}')
        try:
            new = target_ids(tokenizer, request.text(), request.target_new, fmt)
        except TokenizationError as e:
            problems.append(f'field "target_new": {e}')
        if request.target_true is not None:
            try:
                true = target_ids(tokenizer, request.text(), request.target_true, fmt)
            except TokenizationError as e:
                problems.append(f'field "target_true": {e}')
        if problems or plain is None or new is None:
            return None, problems
        return cls(request, plain, new, true if request.target_true else None, fmt), []


def context_rows(
    tokenizer: object,
    request: EditRequest,
    templates: Sequence[str],
    *,
    plain: Row | None = None,
    fmt: PromptFormat = PLAIN,
) -> list[Row]:
    """The request's prompt in every context template, each wrapped in ``fmt`` (a template's
    text goes inside the wrapping, before the prompt). ``templates[0]`` must be ``"{}"``: its row
    is the plain prompt's (``plain``, when already tokenised in ``fmt``).

    Raises:
        ValueError: ``templates[0]`` is not ``"{}"``.
        TokenizationError: no token covers the subject in one of the texts.
    """
    if not templates or templates[0] != "{}":
        raise ValueError('the first context template must be "{}"')
    first = plain if plain is not None else prompt_row(tokenizer, "{}", request, fmt)
    return [first] + [prompt_row(tokenizer, t, request, fmt) for t in templates[1:]]


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

    Every row is in the tokens' format (``tokens.fmt``): with ``chat``, each text (template and
    prompt, the KL prompt) opens the assistant's reply inside the chat template.
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
    def build(
        cls,
        tokenizer: object,
        request: EditRequest | RequestTokens,
        templates: Sequence[str],
        fmt: PromptFormat = PLAIN,
    ) -> EditPrompts:
        """The rows of ``request`` (or of its tokens, when already built, in their format) in
        ``templates``; ``fmt`` is the format of a request tokenised here.

        Raises:
            ValueError: ``templates[0]`` is not ``"{}"``.
            TokenizationError: see :meth:`RequestTokens.build` and :func:`context_rows`.
        """
        tokens = request if isinstance(request, RequestTokens) else RequestTokens.build(tokenizer, request, fmt)
        req, fmt = tokens.request, tokens.fmt
        context = context_rows(tokenizer, req, templates, plain=tokens.plain, fmt=fmt)
        rewrite: list[Row] = []
        target = tokens.new
        for template, row in zip(templates, context, strict=True):
            # After "{}" the prefix is the prompt itself: the ids are the request's own.
            prefix = _fill(template, req.text())
            target = tokens.new if template == "{}" else target_ids(tokenizer, prefix, req.target_new, fmt)
            rewrite.append(Row(row.ids + target[:-1], row.lookup))
        kl_request = EditRequest(prompt=KL_PROMPT, subject=req.subject, target_new=req.target_new)
        kl = prompt_row(tokenizer, "{}", kl_request, fmt)
        return cls(tokens, tuple(templates), context, rewrite, target, kl)

"""Prompts, token positions and keys: the inputs of the edited module at the subject.

ROME's key k(x) is the input of the edited MLP projection at the subject's last token in text
x. Finding that token is where implementations go wrong silently (docs/design.md §1, tokenisation
traps), so this module does it one way only: from the fast tokenizer's offset mapping of the
full text, using the character span where the subject was filled in. Token rows are built
here (never by re-tokenising decoded ids), padded on the tokenizer's side, and given explicit
position ids, so keys and values do not depend on the padding side.

Also here: the context templates (text the model generates itself from fixed seed words,
seeded), and k_e (mean key over templates) / k_e^o (key of the plain prompt).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rrome.engine.hooks import StopForward, trace
from rrome.engine.models import input_device
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError

TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")


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


def prompt_row(tokenizer: object, template: str, request: EditRequest) -> Row:
    """The row of ``template`` (with ``{}``) filled with the request's prompt and subject."""
    prompt = request.text()
    at = template.index("{}")
    text = template[:at] + prompt + template[at + 2 :]
    start = at + request.prompt.index("{}")
    return encode_with_span(tokenizer, text, start, start + len(request.subject))


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


def module_io_at(
    model: torch.nn.Module, tokenizer: object, module_name: str, rows: Sequence[Row]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of ``module_name`` at each row's lookup token, as float32 (n, d).

    Upcast from the model's dtype, on the device where the module ran (with a ``device_map``
    that need not be the inputs' device).
    """
    device = input_device(model)
    batch = pad_rows(tokenizer, rows, device)
    watch = trace(model, [module_name], inputs=True, outputs=True, stop_after=module_name)
    with torch.no_grad(), watch as rec, contextlib.suppress(StopForward):
        model(**batch.model_inputs())
    x, y = rec.inputs[module_name], rec.outputs[module_name]
    idx = torch.arange(len(rows), device=x.device)
    k = x[idx, batch.lookup.to(x.device)].float()
    v = y[idx.to(y.device), batch.lookup.to(y.device)].float()
    return k, v


def keys_at_every_token(
    model: torch.nn.Module, tokenizer: object, module_name: str, texts: Sequence[str], *, batch_size: int = 32
) -> list[tuple[list[int], torch.Tensor]]:
    """Each text's token ids (special tokens as the model sees them) and the input of
    ``module_name`` at every one of them, float32 ``(n_tokens, d)`` on the CPU."""
    device = input_device(model)
    out: list[tuple[list[int], torch.Tensor]] = []
    for at in range(0, len(texts), batch_size):
        rows = [Row(list(tokenizer(t)["input_ids"]), 0) for t in texts[at : at + batch_size]]  # type: ignore[operator]
        batch = pad_rows(tokenizer, rows, device)
        watch = trace(model, [module_name], inputs=True, stop_after=module_name)
        with torch.no_grad(), watch as rec, contextlib.suppress(StopForward):
            model(**batch.model_inputs())
        x = rec.inputs[module_name]
        for i, (row, offset) in enumerate(zip(rows, batch.offsets, strict=True)):
            out.append((row.ids, x[i, offset : offset + len(row.ids)].float().cpu()))
    return out


@dataclass(frozen=True)
class Keys:
    """k_e (template mean), k_e^o (plain prompt) and the module's outputs at them."""

    k_e: torch.Tensor
    k_e_o: torch.Tensor
    w_k_e: torch.Tensor
    w_k_e_o: torch.Tensor


def compute_keys(
    model: torch.nn.Module, tokenizer: object, module_name: str, request: EditRequest, templates: Sequence[str]
) -> Keys:
    """Keys of an edit. ``templates[0]`` must be ``"{}"`` (the plain prompt).

    The module is affine, so the mean of its outputs over templates is its output at the mean
    key: ``w_k_e`` is "W k_e" with the bias included (docs/design.md §1).
    """
    if templates[0] != "{}":
        raise ValueError('the first context template must be "{}"')
    rows = [prompt_row(tokenizer, t, request) for t in templates]
    k, v = module_io_at(model, tokenizer, module_name, rows)
    return Keys(k_e=k.mean(0), k_e_o=k[0], w_k_e=v.mean(0), w_k_e_o=v[0])


def generate_templates(
    model: torch.nn.Module,
    tokenizer: object,
    *,
    seed: int = 0,
    lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
    top_k: int = 5,
) -> list[str]:
    """Context templates: ``"{}"`` plus text the model writes from fixed seed words.

    For each ``(length, n)``, ``n / 5`` continuations of each seed word of ``length`` tokens
    (seed word included, special tokens excluded), sampled from the top ``top_k`` tokens with
    a generator seeded by ``seed``; each becomes ``"<text>. {}"`` (braces in the text are
    replaced by spaces). Same model, seed and device give the same templates.
    """
    device = input_device(model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    special = set(getattr(tokenizer, "all_special_ids", []))
    templates = ["{}"]
    for length, n in lengths:
        per = max(1, n // len(TEMPLATE_SEEDS))
        for word in TEMPLATE_SEEDS:
            start = list(tokenizer(word)["input_ids"])  # type: ignore[operator]
            ids = torch.tensor([start] * per, device=device)
            n_text = sum(1 for t in start if t not in special)
            with torch.no_grad():
                while n_text < length:
                    logits = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float().cpu()
                    top = logits.topk(top_k, dim=-1)
                    pick = torch.multinomial(top.values.softmax(-1), 1, generator=gen)
                    nxt = top.indices.gather(1, pick).to(device)
                    ids = torch.cat([ids, nxt], dim=1)
                    n_text += 1
            for row in ids.tolist():
                text = tokenizer.decode(row, skip_special_tokens=True)  # type: ignore[attr-defined]
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates

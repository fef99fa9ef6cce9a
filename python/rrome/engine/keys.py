"""Keys: the inputs of the edited module at the subject, and the context templates.

ROME's key k(x) is the input of the edited MLP projection at the subject's last token in text
x (docs/design.md §1). The rows and the subject's position in each come from
:mod:`rrome.engine.prompts` (one tokenisation per edit, :class:`~rrome.engine.prompts.EditPrompts`);
here the model runs them: k_e (mean key over the context templates) and k_e^o (key of the plain
prompt), and the keys at every token of a text (the neighbour-leak diagnostic). Also here: the
context templates, text the model generates itself from fixed seed words, seeded, and their
cache on disk (generating them is most of a one-edit run's time on a CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rrome.engine.hooks import StopForward, trace
from rrome.engine.models import input_device, model_dtype
from rrome.engine.prompts import PLAIN, PromptFormat, Row, context_rows, pad_rows
from rrome.files.edits import EditRequest
from rrome.files.errors import InvalidFileError, RromeError
from rrome.files.fsutil import atomic_write, read_regular
from rrome.files.hparams import HParams
from rrome.files.paths import model_cache_dir, private_model_cache_dir, seal, unsealed

TEMPLATE_SEEDS = ("The", "Therefore", "Because", "I", "You")


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
    model: torch.nn.Module,
    tokenizer: object,
    module_name: str,
    texts: Sequence[str],
    *,
    batch_size: int = 32,
    fmt: PromptFormat = PLAIN,
) -> list[tuple[list[int], torch.Tensor]]:
    """Each text's token ids (read in ``fmt``, special tokens as the model sees them) and the
    input of ``module_name`` at every one of them, float32 ``(n_tokens, d)`` on the CPU."""
    device = input_device(model)
    out: list[tuple[list[int], torch.Tensor]] = []
    for at in range(0, len(texts), batch_size):
        rows = [Row(fmt.ids(tokenizer, t), 0) for t in texts[at : at + batch_size]]
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


def keys_at(model: torch.nn.Module, tokenizer: object, module_name: str, context: Sequence[Row]) -> Keys:
    """Keys of an edit from its context rows (:attr:`rrome.engine.prompts.EditPrompts.context`;
    ``context[0]`` the plain prompt's).

    The module is affine, so the mean of its outputs over templates is its output at the mean
    key: ``w_k_e`` is "W k_e" with the bias included (docs/design.md §1).
    """
    k, v = module_io_at(model, tokenizer, module_name, context)
    return Keys(k_e=k.mean(0), k_e_o=k[0], w_k_e=v.mean(0), w_k_e_o=v[0])


def compute_keys(
    model: torch.nn.Module,
    tokenizer: object,
    module_name: str,
    request: EditRequest,
    templates: Sequence[str],
    fmt: PromptFormat = PLAIN,
) -> Keys:
    """Keys of a request in ``templates`` (``templates[0]`` must be ``"{}"``, the plain prompt),
    each wrapped in ``fmt``: :func:`keys_at` of its :func:`~rrome.engine.prompts.context_rows`."""
    return keys_at(model, tokenizer, module_name, context_rows(tokenizer, request, templates, fmt=fmt))


def _per_seed(n: int) -> int:
    """Continuations per seed word for ``n`` templates of one length (at least one)."""
    return max(1, n // len(TEMPLATE_SEEDS))


def generate_templates(
    model: torch.nn.Module,
    tokenizer: object,
    *,
    seed: int = HParams.template_seed,
    lengths: Sequence[tuple[int, int]] = HParams.context_template_lengths,
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
        per = _per_seed(n)
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


_TEMPLATES_VERSION = 1
log = logging.getLogger(__name__)


def template_count(lengths: Sequence[tuple[int, int]]) -> int:
    """How many templates :func:`generate_templates` makes, ``"{}"`` included."""
    return 1 + sum(_per_seed(n) * len(TEMPLATE_SEEDS) for _, n in lengths)


def templates_path(
    key: str, *, seed: int, lengths: Sequence[tuple[int, int]], top_k: int, device: str, dtype: str
) -> Path:
    """Where :func:`cached_templates` keeps a model's templates: next to its statistics
    (``cache_root()/stats/<model key>/templates-<hash>.json``), one file per seed, lengths,
    ``top_k``, device type and dtype (sampling on another device or dtype may pick other tokens)."""
    spec = json.dumps([seed, [list(x) for x in lengths], top_k, device, dtype], separators=(",", ":"))
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    return model_cache_dir(key) / f"templates-{digest}.json"


_TEMPLATES_LIMIT = 16 << 20
"""The most bytes a templates cache file may hold (the default settings write about 4 kB)."""


def _read_templates(path: Path, count: int) -> list[str] | None:
    """The cached templates at ``path``, or ``None`` when there are none or the file is not a
    valid cache: not a regular file, not the bytes its checksum says (:func:`rrome.files.paths.unsealed`),
    not JSON Python can hold, or not a template list of this version (a warning names it; it is
    then regenerated and overwritten)."""
    try:
        data = read_regular(path, limit=_TEMPLATES_LIMIT)
        problem = unsealed(path, sha256=hashlib.sha256(data).hexdigest())
        if problem is not None:
            raise InvalidFileError(problem)
        record = json.loads(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError, RromeError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        log.warning("ignoring the cached templates %s (%s); generating them again", path, reason)
        return None
    templates = record.get("templates") if isinstance(record, dict) else None
    valid = (
        isinstance(record, dict)
        and record.get("version") == _TEMPLATES_VERSION
        and isinstance(templates, list)
        and len(templates) == count
        and templates[0] == "{}"
        and all(isinstance(t, str) and t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    )
    if not valid:
        log.warning(
            "ignoring the cached templates %s (not a template cache of this version); generating them again", path
        )
        return None
    return list(templates)  # type: ignore[arg-type]


def cached_templates(
    key: str | None,
    model: torch.nn.Module,
    tokenizer: object,
    *,
    seed: int = HParams.template_seed,
    lengths: Sequence[tuple[int, int]] = HParams.context_template_lengths,
    top_k: int = 5,
) -> list[str]:
    """:func:`generate_templates`, read from the cache when this model (``key``, its
    :func:`~rrome.engine.stats.model_key`) already made them with these settings on this device
    type and dtype, else generated and cached. ``key=None`` (a model without a folder, or
    ``RROME_NO_TEMPLATE_CACHE=1`` in the environment) generates them every time.

    Like C0, the templates belong to the unedited model: a folder edited in place keeps its key
    and so reads the templates of the model it was. The file is kept like the statistics: with
    its checksum, readable by the user alone, in a private folder.

    Raises:
        CacheFolderError: the cache folder is not private (another user's, or writable by group
            or others).
    """
    if key is None or os.environ.get("RROME_NO_TEMPLATE_CACHE") == "1":
        return generate_templates(model, tokenizer, seed=seed, lengths=lengths, top_k=top_k)
    dtype = model_dtype(model)
    path = templates_path(key, seed=seed, lengths=lengths, top_k=top_k, device=input_device(model).type, dtype=dtype)
    try:
        private_model_cache_dir(key)
    except OSError as e:  # a read-only cache costs time, not correctness
        log.warning("could not use the template cache at %s: %s", path.parent, e)
        return generate_templates(model, tokenizer, seed=seed, lengths=lengths, top_k=top_k)
    cached = _read_templates(path, template_count(lengths))
    if cached is not None:
        return cached
    templates = generate_templates(model, tokenizer, seed=seed, lengths=lengths, top_k=top_k)
    record = {"version": _TEMPLATES_VERSION, "seed": seed, "lengths": [list(x) for x in lengths], "top_k": top_k}
    record["templates"] = templates
    try:
        atomic_write(path, (json.dumps(record, ensure_ascii=False, indent=1) + "\n").encode(), mode=0o600)
        seal(path)
    except OSError as e:  # a read-only cache costs time, not correctness
        log.warning("could not cache the templates at %s: %s", path, e)
    return templates

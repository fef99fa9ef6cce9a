"""Measuring what a model says: target probabilities, CounterFact metrics, entropies, downstream tasks.

Everything here only reads the model. DESIGN.md §2 defines the metrics:

- P(x | prompt) = exp(−mean NLL of x's tokens after the prompt);
- ES / EM over the rewrite prompt: share with P(new) > P(true), mean P(new) − P(true);
- PS / PM: the same over the paraphrase prompts;
- NS / NM over the neighbourhood prompts: share with P(true) > P(new), mean P(true) − P(new);
- Score: the harmonic mean of ES, PS and NS. All reported in percent.

:func:`leak_fractions` is the neighbour-leak diagnostic: for a rank-one update Δ = r uᵀ / uᵀk_den
and a token whose key (the edited module's input) is k, the module's output there changes by
s·r with s = uᵀk / uᵀk_den, the fraction of the change the edit writes at its own key.

Ties count as failures on both sides (a strict inequality is a success). A case's share is the
fraction of its prompts that succeed; the metric is the mean of these fractions over cases, as
in ROME's evaluation. :func:`generation_entropy` and :func:`ngram_entropy` are the collapse
diagnostics; :func:`downstream_accuracy` the few-shot GLUE check of a model's general ability.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rrome.engine.keys import Row, pad_rows, target_ids
from rrome.engine.models import input_device
from rrome.eval.results import METRICS as METRICS
from rrome.eval.results import CaseProbs as CaseProbs
from rrome.eval.results import harmonic_mean as harmonic_mean
from rrome.eval.results import metrics as metrics
from rrome.files.edits import EditRequest
from rrome.files.errors import RromeError


def _log_probs(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int
) -> list[torch.Tensor]:
    """Per-token log-probabilities of each target as a continuation of its prompt."""
    limit = _context_length(model)
    rows, spans = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        pre = list(tokenizer(prompt)["input_ids"])
        tgt = target_ids(tokenizer, prompt, target)
        ids = pre + tgt[:-1]
        cut = max(0, len(ids) - limit) if limit else 0  # too long: keep the end, where the target is
        rows.append(Row(ids[cut:], len(pre) - 1 - cut))
        spans.append(tgt)
    device = input_device(model)
    out: list[torch.Tensor] = []
    for at in range(0, len(rows), batch_size):
        batch = pad_rows(tokenizer, rows[at : at + batch_size], device)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits
        for i, tgt in enumerate(spans[at : at + batch_size]):
            start = int(batch.lookup[i])
            pos = torch.arange(start, start + len(tgt), device=device)
            lp = logits[i, pos].float().log_softmax(-1)
            out.append(lp[torch.arange(len(tgt), device=device), torch.tensor(tgt, device=device)].cpu())
    return out


def _context_length(model: Any) -> int | None:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def target_probabilities(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 32
) -> list[float]:
    """exp(−mean NLL) of each target's tokens as a continuation of its prompt (batched)."""
    if not prompts:
        return []
    return [float(lp.mean().exp()) for lp in _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size)]


def continuation_logprob(
    model: Any, tokenizer: Any, prompts: Sequence[str], targets: Sequence[str], *, batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each target's tokens after its prompt."""
    if not prompts:
        return []
    return [float(lp.sum()) for lp in _log_probs(model, tokenizer, prompts, targets, batch_size=batch_size)]


def case_probabilities(model: Any, tokenizer: Any, request: EditRequest) -> CaseProbs:
    """The probabilities behind a case's metrics, in one batched pass.

    Raises:
        RromeError: the case has no ``target_true`` (the metrics compare against it).
    """
    if request.target_true is None:
        raise RromeError(f"case {request.case_id or request.subject!r} has no target_true; the metrics need one")
    true_n = request.neighborhood_target or request.target_true
    groups = [
        [request.text()],
        list(request.paraphrase_prompts),
        list(request.neighborhood_prompts),
    ]
    prompts: list[str] = []
    targets: list[str] = []
    for g, trues in zip(groups, (request.target_true, request.target_true, true_n), strict=True):
        for p in g:
            prompts += [p, p]
            targets += [request.target_new, trues]
    probs = target_probabilities(model, tokenizer, prompts, targets)
    out: list[list[tuple[float, float]]] = []
    at = 0
    for g in groups:
        out.append([(probs[at + 2 * i], probs[at + 2 * i + 1]) for i in range(len(g))])
        at += 2 * len(g)
    return CaseProbs(*out)


def neighbourhood_probabilities(model: Any, tokenizer: Any, request: EditRequest) -> list[tuple[float, float]]:
    """``(p_new, p_true)`` for each neighbourhood prompt, as :func:`case_probabilities` computes
    them (P(new target) and P(the neighbourhood's own true answer)).

    Raises:
        RromeError: the case has no true answer for its neighbourhood prompts.
    """
    true_n = request.neighborhood_target or request.target_true
    if true_n is None:
        raise RromeError(f"case {request.case_id or request.subject!r} has no target_true; the metrics need one")
    prompts = [p for p in request.neighborhood_prompts for _ in (0, 1)]
    targets = [request.target_new, true_n] * len(request.neighborhood_prompts)
    probs = target_probabilities(model, tokenizer, prompts, targets)
    return [(probs[2 * i], probs[2 * i + 1]) for i in range(len(request.neighborhood_prompts))]


@dataclass(frozen=True)
class LeakFraction:
    """Where one prompt meets a rank-one update Δ = r uᵀ / uᵀk_den.

    s_t = uᵀk_t / uᵀk_den at each token t of the prompt (k_t: the edited module's input there),
    so that the update changes the module's output at t by s_t · r, r being what it writes at its
    own key (Δ k_den = r). ``s`` is s_t at the token where |s_t| is largest (special tokens such
    as BOS left out: their keys are the same in every prompt), ``at`` that token's index (BOS
    counted), ``s_last`` s_t at the prompt's last token, whose output predicts the answer.
    """

    s: float
    at: int
    s_last: float


def leak_fractions(
    model: Any, tokenizer: Any, module_name: str, prompts: Sequence[str], u: Any, denominator: float
) -> list[LeakFraction]:
    """The leak fractions of ``prompts`` under the update with input factor ``u`` (as stored in
    the delta) and denominator ``uᵀk_den`` (:class:`rrome.engine.editor.EditResult.denominator`).

    The keys of the edited layer do not depend on that layer's weight, so they are the same
    before and after the edit.
    """
    from rrome.engine.keys import keys_at_every_token

    if not prompts:
        return []
    special = set(getattr(tokenizer, "all_special_ids", []))
    u64 = torch.tensor(np.array(u, dtype=np.float64).reshape(-1))  # a copy: the delta's factor may be read-only
    out = []
    for ids, k in keys_at_every_token(model, tokenizer, module_name, prompts):
        s = (k.double() @ u64) / denominator
        ordinary = [t for t, i in enumerate(ids) if i not in special] or [len(ids) - 1]
        at = max(ordinary, key=lambda t: abs(float(s[t])))
        out.append(LeakFraction(s=float(s[at]), at=at, s_last=float(s[-1])))
    return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


# --- collapse diagnostics -------------------------------------------------------------------

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
        per_text.append(_mean(parts))
    return _mean(per_text) if per_text else math.nan


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


# --- downstream few-shot classification ------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A GLUE task as few-shot classification by label-word log-probability."""

    name: str
    file: str
    labels: tuple[str, ...]  # label word for label 0, 1, ...
    template: str  # str.format with the record's fields

    def render(self, record: Mapping[str, Any]) -> str:
        return self.template.format(**record)


TASKS = (
    Task("sst2", "sst2_validation_balanced_856.jsonl", ("negative", "positive"), "Review: {sentence}\nSentiment:"),
    Task(
        "mrpc",
        "mrpc_validation_balanced_258.jsonl",
        ("no", "yes"),
        "Sentence 1: {sentence1}\nSentence 2: {sentence2}\nDo both sentences mean the same thing? Answer:",
    ),
    Task(
        "rte",
        "rte_validation_balanced_262.jsonl",
        ("yes", "no"),  # GLUE RTE: 0 = entailment, 1 = not entailment
        '{sentence1}\nQuestion: Does this imply that "{sentence2}"? Answer:',
    ),
    Task(
        "cola",
        "cola_validation_balanced_644.jsonl",
        ("no", "yes"),
        "Sentence: {sentence}\nIs this sentence grammatical? Answer:",
    ),
)


def glue_dir() -> Path:
    """The packaged GLUE validation samples (see data/glue/NOTICE.md)."""
    return Path(str(resources.files("rrome") / "data" / "glue"))


def load_task(task: Task, directory: Path | None = None) -> list[dict[str, Any]]:
    path = (directory or glue_dir()) / task.file
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise RromeError(f"{path}:{i}: invalid JSON: {e.msg}") from None
            if not isinstance(rec, dict) or rec.get("label") not in range(len(task.labels)):
                raise RromeError(f"{path}:{i}: expected an object with a label in 0..{len(task.labels) - 1}")
            records.append(rec)
    return records


@dataclass(frozen=True)
class FewShotSet:
    """Fixed demonstrations and evaluation records of one task (chosen once per run, seeded)."""

    task: Task
    shots: list[dict[str, Any]]
    records: list[dict[str, Any]]

    def prompts(self) -> list[str]:
        demo = "".join(f"{self.task.render(s)} {self.task.labels[s['label']]}\n\n" for s in self.shots)
        return [demo + self.task.render(r) for r in self.records]


def few_shot_sets(
    n: int, *, shots_per_label: int = 1, seed: int = 0, directory: Path | None = None
) -> list[FewShotSet]:
    """For each task: ``shots_per_label`` demonstrations per label and ``n`` other records."""
    out = []
    for task in TASKS:
        records = load_task(task, directory)
        rng = random.Random(f"{seed}-{task.name}")
        order = rng.sample(range(len(records)), len(records))
        shots: list[dict[str, Any]] = []
        for label in range(len(task.labels)):
            shots += [records[i] for i in order if records[i]["label"] == label][:shots_per_label]
        used = {id(s) for s in shots}
        rest = [records[i] for i in order if id(records[i]) not in used][:n]
        out.append(FewShotSet(task, shots, rest))
    return out


def downstream_accuracy(model: Any, tokenizer: Any, sets: Sequence[FewShotSet]) -> dict[str, float]:
    """Accuracy (percent) per task: the label word with the highest summed log-probability wins."""
    out = {}
    for s in sets:
        prompts = s.prompts()
        k = len(s.task.labels)
        scores = continuation_logprob(
            model, tokenizer, [p for p in prompts for _ in range(k)], [w for _ in prompts for w in s.task.labels]
        )
        correct = 0
        for i, rec in enumerate(s.records):
            row = scores[i * k : (i + 1) * k]
            correct += int(max(range(k), key=lambda j: row[j]) == rec["label"])
        out[s.task.name] = 100 * correct / len(s.records) if s.records else math.nan
    return out

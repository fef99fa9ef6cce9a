"""Downstream few-shot classification: the GLUE check of a model's general ability.

Each task is scored by the summed log-probability of its label words after a few-shot prompt
(:func:`rrome.engine.probabilities.continuation_logprob`); the packaged validation samples are
in ``rrome/data/glue`` (see its NOTICE.md).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rrome.engine.probabilities import continuation_logprob
from rrome.files.errors import RromeError


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


def label_scores(model: Any, tokenizer: Any, s: FewShotSet) -> list[list[float]]:
    """For each record of ``s``: the summed log-probability of each label word after its prompt."""
    prompts = s.prompts()
    k = len(s.task.labels)
    flat = continuation_logprob(
        model, tokenizer, [p for p in prompts for _ in range(k)], [w for _ in prompts for w in s.task.labels]
    )
    return [list(flat[i * k : (i + 1) * k]) for i in range(len(prompts))]


def predicted_labels(scores: Sequence[Sequence[float]]) -> list[int]:
    """The label each record is given: the one whose word has the highest score (the first on a tie)."""
    return [max(range(len(row)), key=lambda j: row[j]) for row in scores]


def downstream_accuracy(model: Any, tokenizer: Any, sets: Sequence[FewShotSet]) -> dict[str, float]:
    """Accuracy (percent) per task: the label word with the highest summed log-probability wins."""
    out = {}
    for s in sets:
        pred = predicted_labels(label_scores(model, tokenizer, s))
        correct = sum(int(p == rec["label"]) for p, rec in zip(pred, s.records, strict=True))
        out[s.task.name] = 100 * correct / len(s.records) if s.records else math.nan
    return out

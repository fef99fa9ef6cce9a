"""The record shapes of public edit datasets, and the field checks every edit request passes.

Public datasets do not agree on a format; rrome reads four (:mod:`rrome.files.edits` reads the
files and builds the requests):

1. rrome's own flat shape (what :func:`rrome.files.edits.dump_requests` writes): ``prompt`` is the
   template.
2. ROME's CounterFact records: ``{"case_id", "requested_rewrite": {"prompt", "subject",
   "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts"}``.
3. EasyEdit's flattened CounterFact: ``prompt`` with the subject already filled in,
   ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.
4. zsRE (MEND / EasyEdit): ``src`` (a question holding the subject), ``alt`` (the new answer),
   ``answers`` (the true ones), ``rephrase``, ``loc``, ``loc_ans``.

:func:`record_shape` tells the shape from a record's keys and :func:`record_fields` turns the
record into the fields of an :class:`~rrome.files.edits.EditRequest`, appending one message per
problem (``field "x": what is wrong``) instead of stopping at the first. Nothing here imports
torch or numpy.
"""

from __future__ import annotations

import json
from typing import Any

PLACEHOLDER = "{}"
"""Marks where the subject goes in a relation template."""

# Keys that only EasyEdit's flat CounterFact records carry, and keys that only rrome's own carry.
_FLAT_KEYS = ("ground_truth", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
_RROME_ONLY_KEYS = ("target_true", "paraphrase_prompts", "neighborhood_prompts", "neighborhood_target")
_RROME_KEYS = ("case_id", "prompt", "subject", "target_new", *_RROME_ONLY_KEYS)

_SHAPES_HELP = (
    'expected one of: rrome ("prompt" with "{}", "subject", "target_new"), '
    'ROME CounterFact ("requested_rewrite", ...), '
    'flat CounterFact ("prompt", "subject", "target_new", "ground_truth", ...) '
    'or zsRE ("src", "subject", "alt", "answers", ...)'
)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, with the value itself when it is short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {'true' if value else 'false'}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def quote(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return json.dumps(text if len(text) <= limit else text[: limit - 3] + "...", ensure_ascii=False)


def string_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable (non-blank) string, or None when it is."""
    if not isinstance(value, str):
        return f"expected a string, got {json_type(value)}"
    if not value.strip():
        return "empty string" if not value else "blank string (only whitespace)"
    return None


def placeholder_problem(template: str) -> str | None:
    """Why ``template`` is not a relation template with exactly one ``{}``, or None."""
    count = template.count(PLACEHOLDER)
    if count == 1:
        return None
    if count == 0:
        return (
            f'has no "{PLACEHOLDER}" placeholder for the subject: {quote(template)} '
            f'(write the relation as a template, e.g. "The mother tongue of {PLACEHOLDER} is")'
        )
    return f'has {count} "{PLACEHOLDER}" placeholders; exactly one is allowed (where the subject goes)'


def same_target(target_new: str, target_true: str | None) -> bool:
    """True when the edit would ask for the answer the model is supposed to give already."""
    return target_true is not None and target_new.strip() == target_true.strip()


class _Fields:
    """Reads typed fields out of one JSON object, collecting a message per problem."""

    def __init__(self, obj: dict[str, Any], problems: list[str], prefix: str = "") -> None:
        self.obj = obj
        self.problems = problems
        self.prefix = prefix
        for key in getattr(obj, "duplicates", ()):
            self.fail(key, "appears more than once in the object (JSON keeps only the last)")

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def fail(self, key: str, message: str) -> None:
        self.problems.append(f'field "{self.name(key)}": {message}')

    def string(self, key: str, *, required: bool = True) -> str | None:
        """A non-blank string; None (after reporting when ``required``) when missing or null."""
        if key not in self.obj or self.obj[key] is None:
            if required:
                self.fail(key, "missing" if key not in self.obj else "is null; expected a string")
            return None
        value = self.obj[key]
        problem = string_problem(value)
        if problem:
            self.fail(key, problem)
            return None
        assert isinstance(value, str)
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """An optional array of non-blank strings (missing or null: empty)."""
        value = self.obj.get(key)
        if value is None:
            return ()
        if not isinstance(value, list):
            self.fail(key, f"expected an array of strings, got {json_type(value)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            problem = string_problem(item)
            if problem:
                self.fail(f"{key}[{i}]", problem)
            else:
                out.append(item)
        return tuple(out)

    def case_id(self, key: str = "case_id") -> str | None:
        """An optional id: a non-blank string or an integer (returned as its decimal string)."""
        value = self.obj.get(key)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            if value.strip():
                return value
            self.fail(key, "empty string" if not value else "blank string (only whitespace)")
            return None
        self.fail(key, f"expected a string or an integer, got {json_type(value)}")
        return None

    def target(self, key: str, *, required: bool) -> tuple[str | None, str]:
        """ROME's ``{"str": ...}`` target (or a plain string) and the name of the field it came from."""
        value = self.obj.get(key)
        if isinstance(value, dict):
            inner = _Fields(value, self.problems, f"{self.name(key)}.")
            return inner.string("str"), inner.name("str")
        if value is None and not required:
            return None, self.name(key)
        if value is not None and not isinstance(value, str):
            self.fail(key, f'expected an object {{"str": ...}} or a string, got {json_type(value)}')
            return None, self.name(key)
        return self.string(key, required=required), self.name(key)

    def template(self, key: str, template: str | None) -> None:
        """Reports a template without exactly one ``{}``."""
        if template is not None:
            problem = placeholder_problem(template)
            if problem:
                self.fail(key, problem)


def _fill_in_template(f: _Fields, text_key: str, text: str | None, subject: str | None) -> str | None:
    """A template made from ``text`` (subject filled in) by replacing the subject's first occurrence."""
    if text is None or subject is None:
        return None
    if PLACEHOLDER in text:
        f.fail(text_key, f'contains a literal "{PLACEHOLDER}"; in this shape the subject is already filled in')
        return None
    if subject not in text:
        f.fail("subject", f"{quote(subject)} does not occur in field {quote(f.name(text_key))}: {quote(text)}")
        return None
    return text.replace(subject, PLACEHOLDER, 1)


def record_shape(obj: dict[str, Any]) -> tuple[str | None, str]:
    """Which record shape ``obj`` is in, or None with the reason."""
    keys = set(obj)
    if "requested_rewrite" in keys:
        return "rome", ""
    if "src" in keys or "alt" in keys:
        return "zsre", ""
    if "prompt" in keys:
        flat = [k for k in _FLAT_KEYS if k in keys]
        own = [k for k in _RROME_ONLY_KEYS if k in keys]
        if flat and own:
            return None, (
                f"mixes keys of rrome's shape ({', '.join(map(quote, own))}) and of flat CounterFact "
                f"({', '.join(map(quote, flat))}); use one shape per record"
            )
        if flat:
            return "flat", ""
        if own:
            return "rrome", ""
        # Only the common keys: a template holds "{}", a filled-in prompt holds the subject.
        prompt = obj["prompt"]
        if isinstance(prompt, str) and PLACEHOLDER not in prompt:
            subject = obj.get("subject")
            if isinstance(subject, str) and subject and subject in prompt:
                return "flat", ""
        return "rrome", ""
    listed = ", ".join(quote(k) for k in sorted(keys)) if keys else "none"
    return None, f"unknown record shape (keys: {listed}); {_SHAPES_HELP}"


def _parse_rrome(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    f = _Fields(obj, problems)
    for key in obj:
        if key not in _RROME_KEYS:
            f.fail(key, f"unknown field; rrome's records have {', '.join(map(quote, _RROME_KEYS))}")
    prompt = f.string("prompt")
    f.template("prompt", prompt)
    subject = f.string("subject")
    target_new = f.string("target_new")
    target_true = f.string("target_true", required=False)
    if target_new is not None and same_target(target_new, target_true):
        f.fail("target_new", f'equals "target_true" ({quote(target_new)}): the edit would change nothing')
    return {
        "prompt": prompt,
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "case_id": f.case_id(),
        "paraphrase_prompts": f.strings("paraphrase_prompts"),
        "neighborhood_prompts": f.strings("neighborhood_prompts"),
        "neighborhood_target": f.string("neighborhood_target", required=False),
    }


def _parse_rome(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    f = _Fields(obj, problems)
    case_id = f.case_id()
    rewrite = obj["requested_rewrite"]
    prompt = subject = target_new = target_true = None
    if isinstance(rewrite, dict):
        rw = _Fields(rewrite, problems, "requested_rewrite.")
        prompt = rw.string("prompt")
        rw.template("prompt", prompt)
        subject = rw.string("subject")
        target_new, new_name = rw.target("target_new", required=True)
        target_true, true_name = rw.target("target_true", required=False)
        if target_new is not None and same_target(target_new, target_true):
            problems.append(
                f'field "{new_name}": equals "{true_name}" ({quote(target_new)}): the edit would change nothing'
            )
    else:
        f.fail("requested_rewrite", f"expected an object, got {json_type(rewrite)}")
    return {
        "prompt": prompt,
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "case_id": case_id,
        "paraphrase_prompts": f.strings("paraphrase_prompts"),
        "neighborhood_prompts": f.strings("neighborhood_prompts"),
        "neighborhood_target": None,
    }


def _parse_flat(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    f = _Fields(obj, problems)
    text = f.string("prompt")
    subject = f.string("subject")
    target_new = f.string("target_new")
    target_true = f.string("ground_truth", required=False)
    if target_new is not None and same_target(target_new, target_true):
        f.fail("target_new", f'equals "ground_truth" ({quote(target_new)}): the edit would change nothing')
    rephrase = f.string("rephrase_prompt", required=False)
    locality = f.string("locality_prompt", required=False)
    return {
        "prompt": _fill_in_template(f, "prompt", text, subject),
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "case_id": f.case_id(),
        "paraphrase_prompts": () if rephrase is None else (rephrase,),
        "neighborhood_prompts": () if locality is None else (locality,),
        "neighborhood_target": f.string("locality_ground_truth", required=False),
    }


def _parse_zsre(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    f = _Fields(obj, problems)
    text = f.string("src")
    subject = f.string("subject")
    target_new = f.string("alt")
    answers = f.strings("answers")
    target_true = answers[0] if answers else None
    if target_new is not None:
        for i, answer in enumerate(answers):
            if same_target(target_new, answer):
                what = "the true answer" if i == 0 else "one of the true answers"
                f.fail("alt", f'equals {what} "answers[{i}]" ({quote(answer)}): the edit would change nothing')
                break
    rephrase = f.string("rephrase", required=False)
    loc = f.string("loc", required=False)
    return {
        "prompt": _fill_in_template(f, "src", text, subject),
        "subject": subject,
        "target_new": target_new,
        "target_true": target_true,
        "case_id": f.case_id(),
        "paraphrase_prompts": () if rephrase is None else (rephrase,),
        "neighborhood_prompts": () if loc is None else (loc,),
        "neighborhood_target": f.string("loc_ans", required=False),
    }


_PARSERS = {"rrome": _parse_rrome, "rome": _parse_rome, "flat": _parse_flat, "zsre": _parse_zsre}


def record_fields(shape: str, obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The :class:`~rrome.files.edits.EditRequest` fields of a record in ``shape`` (from
    :func:`record_shape`); every problem is appended to ``problems``, and a field with a problem
    is None."""
    return _PARSERS[shape](obj, problems)

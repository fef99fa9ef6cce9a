"""Edit requests: the facts to write into a model, and the files they come in.

An edit says "for *subject* under relation *prompt*, the model should now answer *target_new*
instead of *target_true*". The editing engine needs the relation as a template with one ``{}``
where the subject goes, because it looks up the subject's last token from the character span
where the subject was filled in (docs/design.md §1). Public datasets do not agree on a format, so
this module reads the four that matter and turns each record into one :class:`EditRequest`:

1. rrome's own flat shape (what :func:`dump_requests` writes): ``prompt`` is the template.
2. ROME's CounterFact records: ``{"case_id", "requested_rewrite": {"prompt", "subject",
   "target_new": {"str"}, "target_true": {"str"}}, "paraphrase_prompts", "neighborhood_prompts"}``.
3. EasyEdit's flattened CounterFact: ``prompt`` with the subject already filled in,
   ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``.
4. zsRE (MEND / EasyEdit): ``src`` (a question holding the subject), ``alt`` (the new answer),
   ``answers`` (the true ones), ``rephrase``, ``loc``, ``loc_ans``.

Files are JSONL (one object per line) or one JSON array. Everything is validated before any
work starts, and every problem of a file is reported at once, each as ``FILE:LINE: field "x":
what is wrong`` (``FILE: record N:`` inside a JSON array), so that a user fixes a file in one
go instead of one error per run. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from rrome.files.errors import EditFileError

PathLike = str | os.PathLike[str]

PLACEHOLDER = "{}"
"""Marks where the subject goes in a relation template."""

MAX_REPORTED_ERRORS = 20
"""How many problems one :class:`EditFileError` lists before "... and N more"."""

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


# --------------------------------------------------------------------------------------------
# small checks shared by the parser and EditRequest itself


def _json_type(value: Any) -> str:
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


def _short(text: str, limit: int = 80) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return json.dumps(text if len(text) <= limit else text[: limit - 3] + "...", ensure_ascii=False)


def _string_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable (non-blank) string, or None when it is."""
    if not isinstance(value, str):
        return f"expected a string, got {_json_type(value)}"
    if not value.strip():
        return "empty string" if not value else "blank string (only whitespace)"
    return None


def _placeholder_problem(template: str) -> str | None:
    """Why ``template`` is not a relation template with exactly one ``{}``, or None."""
    count = template.count(PLACEHOLDER)
    if count == 1:
        return None
    if count == 0:
        return (
            f'has no "{PLACEHOLDER}" placeholder for the subject: {_short(template)} '
            f'(write the relation as a template, e.g. "The mother tongue of {PLACEHOLDER} is")'
        )
    return f'has {count} "{PLACEHOLDER}" placeholders; exactly one is allowed (where the subject goes)'


def _same_target(target_new: str, target_true: str | None) -> bool:
    """True when the edit would ask for the answer the model is supposed to give already."""
    return target_true is not None and target_new.strip() == target_true.strip()


# --------------------------------------------------------------------------------------------
# the request


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into a model.

    Args:
        prompt: the relation template with exactly one ``"{}"`` where the subject goes,
            e.g. ``"The mother tongue of {} is"``. Other braces are plain text.
        subject: the entity whose fact changes, e.g. ``"Danielle Darrieux"``.
        target_new: the new answer, as given (the engine adds a leading space where the
            tokenizer needs one).
        target_true: the answer the model should give before the edit, when known.
        case_id: the dataset's id of the case; integers are stored as their decimal string.
        paraphrase_prompts: full prompts (subject filled in) that ask the same thing in other
            words, for evaluation.
        neighborhood_prompts: full prompts about other subjects (sharing ``target_true`` in
            CounterFact) whose answers the edit must not change.
        neighborhood_target: the true answer of the neighbourhood prompts, when the record
            says so (flat CounterFact's ``locality_ground_truth``, zsRE's ``loc_ans``). None
            in ROME's records, whose neighbourhood prompts all answer ``target_true``.
        source: where the request was read, ``"FILE:LINE"`` or ``"FILE: record N"`` (set by
            :func:`load_requests` and :func:`parse_record`); used to locate later problems,
            such as a target that tokenises to nothing. Not compared, not written out.

    Raises:
        EditFileError: a field is not a non-blank string, ``prompt`` does not hold exactly one
            ``"{}"``, or ``target_new`` equals ``target_true``. (Files report these with their
            file, line and field; built directly, the message starts with ``EditRequest:``.)
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: str | None = None
    paraphrase_prompts: tuple[str, ...] = ()
    neighborhood_prompts: tuple[str, ...] = ()
    neighborhood_target: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        problems: list[str] = []
        case_id: Any = self.case_id
        if isinstance(case_id, int) and not isinstance(case_id, bool):
            object.__setattr__(self, "case_id", str(case_id))
        for name in ("paraphrase_prompts", "neighborhood_prompts"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, name, tuple(value))
            else:
                problems.append(f'field "{name}": expected a sequence of strings, got {_json_type(value)}')
        for name in ("prompt", "subject", "target_new"):
            problem = _string_problem(getattr(self, name))
            if problem:
                problems.append(f'field "{name}": {problem}')
        for name in ("target_true", "case_id", "neighborhood_target"):
            value = getattr(self, name)
            problem = None if value is None else _string_problem(value)
            if problem:
                problems.append(f'field "{name}": {problem}')
        for name in ("paraphrase_prompts", "neighborhood_prompts"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    problem = _string_problem(item)
                    if problem:
                        problems.append(f'field "{name}[{i}]": {problem}')
        if isinstance(self.prompt, str):
            problem = _placeholder_problem(self.prompt)
            if problem:
                problems.append(f'field "prompt": {problem}')
        if (
            isinstance(self.target_new, str)
            and isinstance(self.target_true, str)
            and _same_target(self.target_new, self.target_true)
        ):
            problems.append(
                f'field "target_new": equals "target_true" ({_short(self.target_true)}): the edit would change nothing'
            )
        if problems:
            raise EditFileError(_summary([f"EditRequest: {p}" for p in problems]))

    def text(self) -> str:
        """The prompt with the subject filled in (the single ``{}`` replaced; not ``str.format``)."""
        return self.prompt.replace(PLACEHOLDER, self.subject, 1)

    def subject_span(self) -> tuple[int, int]:
        """The ``[start, end)`` character span of the subject inside :meth:`text`."""
        start = self.prompt.index(PLACEHOLDER)
        return start, start + len(self.subject)

    def to_json(self) -> dict[str, Any]:
        """rrome's own flat record; optional fields appear only when set.

        :func:`parse_record` turns it back into an equal request.
        """
        out: dict[str, Any] = {}
        if self.case_id is not None:
            out["case_id"] = self.case_id
        out["prompt"] = self.prompt
        out["subject"] = self.subject
        out["target_new"] = self.target_new
        if self.target_true is not None:
            out["target_true"] = self.target_true
        if self.paraphrase_prompts:
            out["paraphrase_prompts"] = list(self.paraphrase_prompts)
        if self.neighborhood_prompts:
            out["neighborhood_prompts"] = list(self.neighborhood_prompts)
        if self.neighborhood_target is not None:
            out["neighborhood_target"] = self.neighborhood_target
        return out


# --------------------------------------------------------------------------------------------
# parsing one record


class _JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers the keys its text held more than once."""

    duplicates: tuple[str, ...] = ()


class _UnreadableJSONError(ValueError):
    """JSON that Python's parser cannot hold: nested deeper than the interpreter's recursion
    limit, or an integer longer than ``int``'s digit limit. ``json.loads`` raises
    RecursionError / a plain ValueError for these, not JSONDecodeError."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg
        self.colno = 0


def _loads(text: str) -> Any:
    """``json.loads`` for untrusted text: every failure is a JSONDecodeError or :class:`_UnreadableJSONError`."""
    try:
        return json.loads(text, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise _UnreadableJSONError("nested too deeply") from None
    except ValueError as e:
        raise _UnreadableJSONError(f"a number too long to read ({str(e).split(';')[0]})") from None


def _json_problem(e: json.JSONDecodeError | _UnreadableJSONError) -> str:
    if isinstance(e, _UnreadableJSONError):
        return f"malformed JSON: {e.msg}"
    return f"malformed JSON: {e.msg} (column {e.colno})"


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dups: list[str] = []
        for key, _ in pairs:
            if key in seen and key not in dups:
                dups.append(key)
            seen.add(key)
        obj.duplicates = tuple(dups)
    return obj


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
        problem = _string_problem(value)
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
            self.fail(key, f"expected an array of strings, got {_json_type(value)}")
            return ()
        out: list[str] = []
        for i, item in enumerate(value):
            problem = _string_problem(item)
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
        self.fail(key, f"expected a string or an integer, got {_json_type(value)}")
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
            self.fail(key, f'expected an object {{"str": ...}} or a string, got {_json_type(value)}')
            return None, self.name(key)
        return self.string(key, required=required), self.name(key)

    def template(self, key: str, template: str | None) -> None:
        """Reports a template without exactly one ``{}``."""
        if template is not None:
            problem = _placeholder_problem(template)
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
        f.fail("subject", f"{_short(subject)} does not occur in field {_short(f.name(text_key))}: {_short(text)}")
        return None
    return text.replace(subject, PLACEHOLDER, 1)


def _shape(obj: dict[str, Any]) -> tuple[str | None, str]:
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
                f"mixes keys of rrome's shape ({', '.join(map(_short, own))}) and of flat CounterFact "
                f"({', '.join(map(_short, flat))}); use one shape per record"
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
    listed = ", ".join(_short(k) for k in sorted(keys)) if keys else "none"
    return None, f"unknown record shape (keys: {listed}); {_SHAPES_HELP}"


def _parse_rrome(obj: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    f = _Fields(obj, problems)
    for key in obj:
        if key not in _RROME_KEYS:
            f.fail(key, f"unknown field; rrome's records have {', '.join(map(_short, _RROME_KEYS))}")
    prompt = f.string("prompt")
    f.template("prompt", prompt)
    subject = f.string("subject")
    target_new = f.string("target_new")
    target_true = f.string("target_true", required=False)
    if target_new is not None and _same_target(target_new, target_true):
        f.fail("target_new", f'equals "target_true" ({_short(target_new)}): the edit would change nothing')
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
        if target_new is not None and _same_target(target_new, target_true):
            problems.append(
                f'field "{new_name}": equals "{true_name}" ({_short(target_new)}): the edit would change nothing'
            )
    else:
        f.fail("requested_rewrite", f"expected an object, got {_json_type(rewrite)}")
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
    if target_new is not None and _same_target(target_new, target_true):
        f.fail("target_new", f'equals "ground_truth" ({_short(target_new)}): the edit would change nothing')
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
            if _same_target(target_new, answer):
                what = "the true answer" if i == 0 else "one of the true answers"
                f.fail("alt", f'equals {what} "answers[{i}]" ({_short(answer)}): the edit would change nothing')
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


def _parse(obj: Any) -> tuple[EditRequest | None, str | None, list[str]]:
    """The request in ``obj`` (None when invalid), its case id when readable, and every problem."""
    if not isinstance(obj, dict):
        return None, None, [f"record is a JSON {_json_type(obj).split()[0]}, expected an object"]
    shape, reason = _shape(obj)
    if shape is None:
        return None, None, [reason]
    problems: list[str] = []
    fields = _PARSERS[shape](obj, problems)
    case_id = fields["case_id"]
    if problems:
        return None, case_id, problems
    try:
        request = EditRequest(**fields)
    except EditFileError as e:  # pragma: no cover - the checks above are the same, field by field
        return None, case_id, [line.removeprefix("EditRequest: ") for line in str(e).splitlines()]
    return request, case_id, []


def _summary(lines: list[str]) -> str:
    shown = lines[:MAX_REPORTED_ERRORS]
    if len(lines) > MAX_REPORTED_ERRORS:
        shown.append(f"... and {len(lines) - MAX_REPORTED_ERRORS} more")
    return "\n".join(shown)


def parse_record(obj: Any, *, where: str) -> EditRequest:
    """Turns one parsed JSON record, in any of the four shapes, into an :class:`EditRequest`.

    The shape is told from the keys: ``requested_rewrite`` is ROME's CounterFact, ``src`` or
    ``alt`` is zsRE, ``prompt`` with any of ``ground_truth``, ``rephrase_prompt``,
    ``locality_prompt``, ``locality_ground_truth`` is flat CounterFact, ``prompt`` with any of
    ``target_true``, ``paraphrase_prompts``, ``neighborhood_prompts``, ``neighborhood_target``
    is rrome's own. A record with only ``prompt``, ``subject``, ``target_new`` (and
    ``case_id``) is rrome's when the prompt holds ``{}`` and flat CounterFact when it holds the
    subject. rrome's own shape rejects unknown keys (typos would silently lose data); the other
    shapes ignore keys rrome does not use (``pred``, ``cond``, ``generation_prompts``, ...).

    Args:
        obj: the parsed record.
        where: the location that prefixes every message, e.g. ``"edits.jsonl:3"``.

    Returns:
        The request. A filled-in prompt (flat CounterFact ``prompt``, zsRE ``src``) becomes a
        template by replacing the first occurrence of the subject with ``{}``.

    Raises:
        EditFileError: every problem of the record, one per line, each ``WHERE: field "x": ...``.
    """
    request, _, problems = _parse(obj)
    if request is None:
        raise EditFileError(_summary([f"{where}: {p}" for p in problems]))
    object.__setattr__(request, "source", where)
    return request


# --------------------------------------------------------------------------------------------
# files


@dataclass
class _Slot:
    """One record's place in a file and what was read there."""

    where: str  # message prefix: "FILE:LINE" or "FILE: record N"
    label: str  # how another message refers to it: "line 3" or "record 3"
    obj: Any = None
    problems: list[str] | None = None


def _decode_lines(data: bytes) -> tuple[list[str], dict[int, str]]:
    """The file's lines as text, and a message per (1-based) line that is not valid UTF-8."""
    lines = data.split(b"\n")
    if lines[0].startswith(codecs.BOM_UTF8):
        lines[0] = lines[0][len(codecs.BOM_UTF8) :]
    texts: list[str] = []
    bad: dict[int, str] = {}
    for number, raw in enumerate(lines, 1):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            bad[number] = f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte column {e.start + 1}"
            texts.append(raw.decode("utf-8", errors="replace"))
    return texts, bad


def _read_slots(path: str, data: bytes) -> list[_Slot]:
    """Splits a file into records; raises for problems that leave no record to look at."""
    texts, bad = _decode_lines(data)
    first = next((line.lstrip()[:1] for line in texts if line.strip()), "")
    if first == "[":
        if bad:
            raise EditFileError(_summary([f"{path}:{number}: {message}" for number, message in bad.items()]))
        try:
            records = _loads("\n".join(texts))
        except json.JSONDecodeError as e:
            raise EditFileError(f"{path}:{e.lineno}: {_json_problem(e)}") from None
        except _UnreadableJSONError as e:
            raise EditFileError(f"{path}:1: {_json_problem(e)}") from None
        if not records:
            raise EditFileError(f"{path}:1: empty JSON array: no edit requests")
        return [_Slot(f"{path}: record {i}", f"record {i}", obj) for i, obj in enumerate(records, 1)]

    slots: list[_Slot] = []
    for number, line in enumerate(texts, 1):
        slot = _Slot(f"{path}:{number}", f"line {number}")
        if number in bad:
            slot.problems = [bad[number]]
        elif not line.strip():
            continue
        else:
            try:
                slot.obj = _loads(line)
            except (json.JSONDecodeError, _UnreadableJSONError) as e:
                if not slots and _is_one_object("\n".join(texts)):
                    raise EditFileError(
                        f"{path}:{number}: the file holds one JSON object spread over several lines; "
                        "write one object per line (JSONL) or a JSON array of objects"
                    ) from None
                slot.problems = [_json_problem(e)]
        slots.append(slot)
    if not slots:
        raise EditFileError(f"{path}:1: empty file: no edit requests")
    return slots


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(_loads(text), dict)
    except (json.JSONDecodeError, _UnreadableJSONError):
        return False


@overload
def load_requests(path: PathLike, *, skip_invalid: Literal[False] = ...) -> list[EditRequest]: ...


@overload
def load_requests(
    path: PathLike, *, skip_invalid: Literal[True]
) -> tuple[list[EditRequest], list[tuple[str, str]]]: ...


@overload
def load_requests(
    path: PathLike, *, skip_invalid: bool
) -> list[EditRequest] | tuple[list[EditRequest], list[tuple[str, str]]]: ...


def load_requests(
    path: PathLike, *, skip_invalid: bool = False
) -> list[EditRequest] | tuple[list[EditRequest], list[tuple[str, str]]]:
    """Reads every edit request of a JSONL file or JSON-array file, in file order.

    The file is a JSON array when its first non-blank character is ``[``, else JSONL (one
    object per line; blank lines allowed). Each record may be in any shape
    :func:`parse_record` accepts. Every record is checked, and so are the ids across records:
    a ``case_id`` (integers and strings compare as strings) may appear only once.

    Args:
        path: the file.
        skip_invalid: when True, invalid records (and JSONL lines that are not valid UTF-8 or
            not valid JSON) are left out and reported instead of raising. A repeated
            ``case_id`` skips the later record.

    Returns:
        The requests; with ``skip_invalid=True``, a pair ``(requests, skipped)`` where
        ``skipped`` holds ``(where, message)`` per skipped record: ``where`` is ``"FILE:LINE"``
        or ``"FILE: record N"``, ``message`` its problems joined by ``"; "``.

    Raises:
        EditFileError: every problem of the file, one per line (the first
            :data:`MAX_REPORTED_ERRORS`, then ``"... and N more"``), each starting with
            ``FILE:LINE: `` or ``FILE: record N: `` and naming the field. With
            ``skip_invalid=True`` still raised for an empty file and for a JSON array that
            cannot be parsed at all.
        OSError: the file cannot be read (``FileNotFoundError`` when missing).
    """
    name = os.fspath(path)
    with open(path, "rb") as fh:
        data = fh.read()
    slots = _read_slots(name, data)

    requests: list[EditRequest] = []
    skipped: list[tuple[str, str]] = []
    errors: list[str] = []
    first_seen: dict[str, str] = {}
    for slot in slots:
        request: EditRequest | None = None
        problems = slot.problems
        if problems is None:
            request, case_id, problems = _parse(slot.obj)
            if case_id is not None:
                if case_id in first_seen:
                    problems.append(
                        f'field "case_id": duplicate case_id {_short(case_id)}, also at {first_seen[case_id]}'
                    )
                    request = None
                else:
                    first_seen[case_id] = slot.label
        if problems:
            errors.extend(f"{slot.where}: {p}" for p in problems)
            skipped.append((slot.where, "; ".join(problems)))
        elif request is not None:
            object.__setattr__(request, "source", slot.where)
            requests.append(request)
    if skip_invalid:
        return requests, skipped
    if errors:
        raise EditFileError(_summary(errors))
    return requests


def dump_requests(path: PathLike, requests: Iterable[EditRequest]) -> None:
    """Writes requests as JSONL in rrome's own shape, atomically.

    The lines go to a temporary file beside ``path``, which is flushed to disk and then renamed
    over ``path``: readers see the old file or the complete new one, never a part.
    :func:`load_requests` reads the result back into equal requests.

    Raises:
        TypeError: an item is not an :class:`EditRequest`.
        EditFileError: nothing to write (an empty file cannot be loaded back), or two requests
            share a ``case_id``; nothing is written.
        OSError: the file cannot be written; ``path`` is left as it was.
    """
    name = os.fspath(path)
    batch = list(requests)
    if not batch:
        raise EditFileError(f"{name}: no edit requests to write (an empty file cannot be loaded back)")
    first_seen: dict[str, int] = {}
    chunks: list[bytes] = []
    for number, request in enumerate(batch, 1):
        if not isinstance(request, EditRequest):
            raise TypeError(f"expected rrome.files.edits.EditRequest objects, got {type(request).__name__}")
        if request.case_id is not None:
            if request.case_id in first_seen:
                raise EditFileError(
                    f'{name}:{number}: field "case_id": duplicate case_id {_short(request.case_id)}, '
                    f"also at line {first_seen[request.case_id]}"
                )
            first_seen[request.case_id] = number
        record = request.to_json()
        try:
            chunks.append((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: escape them so that the file stays UTF-8
            chunks.append((json.dumps(record) + "\n").encode("ascii"))

    directory, base = os.path.split(os.path.abspath(name))
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"".join(chunks))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes a rename in ``directory`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = [
    "MAX_REPORTED_ERRORS",
    "PLACEHOLDER",
    "EditRequest",
    "dump_requests",
    "load_requests",
    "parse_record",
]

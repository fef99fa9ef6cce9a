"""Edit requests: the facts to write into a model, and the files they come in.

An edit says "for *subject* under relation *prompt*, the model should now answer *target_new*
instead of *target_true*". The editing engine needs the relation as a template with one ``{}``
where the subject goes, because it looks up the subject's last token from the character span
where the subject was filled in (docs/design.md §1). :class:`EditRequest` is that request;
the record shapes of the public datasets it is read from (rrome's own, ROME's CounterFact,
EasyEdit's flat CounterFact, zsRE) are in :mod:`rrome.files.shapes`.

Files are JSONL (one object per line) or one JSON array. Everything is validated before any
work starts, and every problem of a file is reported at once, each as ``FILE:LINE: field "x":
what is wrong`` (``FILE: record N:`` inside a JSON array), so that a user fixes a file in one
go instead of one error per run. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from rrome.files.errors import EditFileError
from rrome.files.fsutil import atomic_write
from rrome.files.shapes import (
    PLACEHOLDER,
    json_type,
    placeholder_problem,
    quote,
    record_fields,
    record_shape,
    same_target,
    string_problem,
)

PathLike = str | os.PathLike[str]

MAX_REPORTED_ERRORS = 20
"""How many problems one :class:`EditFileError` lists before "... and N more"."""


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
                problems.append(f'field "{name}": expected a sequence of strings, got {json_type(value)}')
        for name in ("prompt", "subject", "target_new"):
            problem = string_problem(getattr(self, name))
            if problem:
                problems.append(f'field "{name}": {problem}')
        for name in ("target_true", "case_id", "neighborhood_target"):
            value = getattr(self, name)
            problem = None if value is None else string_problem(value)
            if problem:
                problems.append(f'field "{name}": {problem}')
        for name in ("paraphrase_prompts", "neighborhood_prompts"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                for i, item in enumerate(value):
                    problem = string_problem(item)
                    if problem:
                        problems.append(f'field "{name}[{i}]": {problem}')
        if isinstance(self.prompt, str):
            problem = placeholder_problem(self.prompt)
            if problem:
                problems.append(f'field "prompt": {problem}')
        if (
            isinstance(self.target_new, str)
            and isinstance(self.target_true, str)
            and same_target(self.target_new, self.target_true)
        ):
            problems.append(
                f'field "target_new": equals "target_true" ({quote(self.target_true)}): the edit would change nothing'
            )
        if problems:
            raise EditFileError(problem_summary([f"EditRequest: {p}" for p in problems]))

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


def _parse(obj: Any) -> tuple[EditRequest | None, str | None, list[str]]:
    """The request in ``obj`` (None when invalid), its case id when readable, and every problem."""
    if not isinstance(obj, dict):
        return None, None, [f"record is a JSON {json_type(obj).split()[0]}, expected an object"]
    shape, reason = record_shape(obj)
    if shape is None:
        return None, None, [reason]
    problems: list[str] = []
    fields = record_fields(shape, obj, problems)
    case_id = fields["case_id"]
    if problems:
        return None, case_id, problems
    try:
        request = EditRequest(**fields)
    except EditFileError as e:  # pragma: no cover - the checks above are the same, field by field
        return None, case_id, [line.removeprefix("EditRequest: ") for line in str(e).splitlines()]
    return request, case_id, []


def problem_summary(lines: list[str]) -> str:
    """The lines of one error message: the first :data:`MAX_REPORTED_ERRORS`, then "... and N more"."""
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
        raise EditFileError(problem_summary([f"{where}: {p}" for p in problems]))
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
            raise EditFileError(problem_summary([f"{path}:{number}: {message}" for number, message in bad.items()]))
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
                        f'field "case_id": duplicate case_id {quote(case_id)}, also at {first_seen[case_id]}'
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
        raise EditFileError(problem_summary(errors))
    return requests


def dump_requests(path: PathLike, requests: Iterable[EditRequest]) -> None:
    """Writes requests as JSONL in rrome's own shape, atomically.

    Through :func:`rrome.files.fsutil.atomic_write`: readers see the old file or the complete new
    one, never a part.
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
                    f'{name}:{number}: field "case_id": duplicate case_id {quote(request.case_id)}, '
                    f"also at line {first_seen[request.case_id]}"
                )
            first_seen[request.case_id] = number
        record = request.to_json()
        try:
            chunks.append((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates: escape them so that the file stays UTF-8
            chunks.append((json.dumps(record) + "\n").encode("ascii"))

    atomic_write(name, b"".join(chunks))


__all__ = [
    "MAX_REPORTED_ERRORS",
    "PLACEHOLDER",
    "EditRequest",
    "dump_requests",
    "load_requests",
    "parse_record",
    "problem_summary",
]

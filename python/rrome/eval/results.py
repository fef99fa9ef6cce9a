"""Results folders without torch: the files ``rrome eval`` and ``rrome tune`` write.

``rrome eval`` (:mod:`rrome.eval.runs`) and ``rrome tune`` (:mod:`rrome.eval.tune`) write their
folders through these helpers, and ``rrome report`` (:mod:`rrome.eval.report`) reads them back
with nothing else, so rebuilding a table or a figure never imports torch.

A results folder travels like a model folder (a repository, a tarball) and is as untrusted
(docs/design.md §7). Its files are read without blocking and must be regular files; each JSON
file or line is checked (:func:`check`) before its fields are used, and every problem is one
:class:`~rrome.files.errors.InvalidFileError` naming ``FILE:LINE`` (``FILE`` for a whole JSON
document) and the field. Writes replace files by rename or append with ``O_NOFOLLOW``
(:mod:`rrome.files.fsutil`), never through a link.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rrome.files.errors import InvalidFileError
from rrome.files.fsutil import append_durably, atomic_write, read_regular
from rrome.files.shapes import json_type

# --- the layout of a results folder ---------------------------------------------------------
#
# Every name of a results folder is here; the modules that write and read one ask for paths
# instead of spelling names.
#
#     run.json, baseline.json           the run's settings and the unedited model
#     <mode>-<method>/                  one variant (:class:`Variant`): edits.jsonl, and for a
#                                       sequential run checkpoints.jsonl, final.json, deltas/
#     summary.json, table.md, *.png     what ``rrome report`` writes
#
# and of a sweep's (``rrome tune``): run.json, baseline.json, trials/NNN/ (hparams.json,
# edits.jsonl), trials.jsonl, table.md, best.json, and the lock file tune.lock.

RUN_FILE = "run.json"
BASELINE_FILE = "baseline.json"
EDITS_FILE = "edits.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
FINAL_FILE = "final.json"
DELTAS_DIR = "deltas"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
TRIALS_FILE = "trials.jsonl"
BEST_FILE = "best.json"
LOCK_FILE = "tune.lock"
TRIAL_HPARAMS_FILE = "hparams.json"
MODES = ("single", "sequential")
"""The two kinds of run: one edit at a time on the unedited model, or edits that accumulate."""


def mode(sequential: bool) -> str:
    """The name of a run's mode (:data:`MODES`) from its ``sequential`` setting."""
    return MODES[1] if sequential else MODES[0]


def edits_path(folder: Path) -> Path:
    """The one-line-per-edit file of a variant folder or a sweep's trial folder."""
    return folder / EDITS_FILE


def trial_dir(out_dir: Path, trial: int) -> Path:
    """The folder of trial ``trial`` of a sweep."""
    return Path(out_dir) / "trials" / f"{trial:03d}"


class Variant:
    """The folder of one variant of a run, ``<mode>-<method>``, and the paths inside it."""

    def __init__(self, out_dir: Path, mode: str, method: str) -> None:
        self.mode = mode
        self.method = method
        self.folder = Path(out_dir) / f"{mode}-{method}"

    @classmethod
    def of(cls, folder: Path) -> Variant:
        """The variant whose folder is ``folder`` (``…/sequential-rome``; a folder of another
        name is taken as it is, its mode and method read up to and after the first ``-``)."""
        folder = Path(folder)
        mode, _, method = folder.name.partition("-")
        variant = cls(folder.parent, mode, method)
        variant.folder = folder
        return variant

    @property
    def run_dir(self) -> Path:
        """The results folder that holds the variant."""
        return self.folder.parent

    @property
    def edits(self) -> Path:
        return edits_path(self.folder)

    @property
    def checkpoints(self) -> Path:
        """Sequential runs: the running figures every K edits."""
        return self.folder / CHECKPOINTS_FILE

    @property
    def final(self) -> Path:
        """Sequential runs: every case measured after the last edit."""
        return self.folder / FINAL_FILE

    @property
    def deltas(self) -> Path:
        """Sequential runs: the factors of every edit (:meth:`factors`)."""
        return self.folder / DELTAS_DIR

    def factors(self, index: int) -> Path:
        """The file that holds the factors of edit ``index`` of a sequential run."""
        return self.deltas / f"{index:05d}.safetensors"


def variants(out_dir: Path, mode: str, methods: Iterable[str]) -> list[Variant]:
    """The variants of ``methods`` (in that order) that have a folder in ``out_dir``."""
    found = [Variant(out_dir, mode, m) for m in methods]
    return [v for v in found if v.folder.is_dir()]


class _Record(dict[str, Any]):
    """One line of a JSONL results file, as a dict that remembers where it was read."""

    where: str = "?"


def where(record: Mapping[str, Any]) -> str:
    """``FILE:LINE`` of a record :func:`read_jsonl` returned (``"?"`` for another dict)."""
    return getattr(record, "where", "?")


def fsync_append(path: Path, obj: Any) -> None:
    """Appends ``obj`` as one JSON line and fsyncs it: after a crash the line is whole or torn
    (:func:`read_jsonl` drops a torn last line), never lost once this returns. Never through a
    link (:func:`rrome.files.fsutil.append_durably`)."""
    append_durably(path, (json.dumps(obj) + "\n").encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON, atomically (:func:`rrome.files.fsutil.atomic_write`)."""
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _parse(text: str, where: str, *, document: bool = False) -> Any:
    """``json.loads`` for untrusted text: every failure is an InvalidFileError at ``where`` (a
    JSONL line's ``FILE:LINE``; a ``document``'s ``FILE``, to which a syntax error adds its line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if document else where
        raise InvalidFileError(f"{at}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise InvalidFileError(f"{where}: invalid JSON (nested too deeply)") from None
    except ValueError as e:  # an integer beyond int's digit limit
        raise InvalidFileError(f"{where}: invalid JSON ({str(e).split(';')[0]})") from None


def _decode(raw: bytes, where: str, *, document: bool = False) -> str:
    """``raw`` as UTF-8 text; else an InvalidFileError at ``where`` (plus the line, for a ``document``)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        newline = raw.rfind(b"\n", 0, e.start)
        line = raw.count(b"\n", 0, e.start) + 1
        at = f"{where}:{line}" if document else where
        raise InvalidFileError(
            f"{at}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte column {e.start - newline})"
        ) from None


def read_json(path: Path) -> Any:
    """The JSON document in the regular file ``path``, read without blocking.

    Raises:
        InvalidFileError: not a regular file, not UTF-8 or not JSON Python can hold; the message
            names ``FILE:LINE`` (``FILE`` alone for nesting too deep to read).
        FileNotFoundError: the file does not exist.
    """
    name = os.fspath(path)
    return _parse(_decode(read_regular(path), name, document=True), name, document=True)


def read_object(path: Path) -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object.

    Raises:
        InvalidFileError: see :func:`read_json`; or the document is not an object.
        FileNotFoundError: the file does not exist.
    """
    value = read_json(path)
    check(value, {}, os.fspath(path))
    return value  # type: ignore[no-any-return]


def read_jsonl(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a results file, each a JSON object, without a torn last line (a
    killed run's, or the line a running process is writing). Each record knows its ``FILE:LINE``
    (:func:`where`). ``repair`` also cuts it off the
    file (by writing the complete lines to a new file that replaces it, never through a link):
    only the run that is about to append may do that, never a reader such as ``rrome report``.

    Raises:
        InvalidFileError: not a regular file (a FIFO is refused without blocking), or a complete
            line that is not UTF-8, not JSON Python can hold, or not an object: ``FILE:LINE``.
    """
    try:
        data = read_regular(path)
    except FileNotFoundError:
        return []
    good = data.rfind(b"\n") + 1
    records: list[dict[str, Any]] = []
    for number, raw in enumerate(data[:good].split(b"\n")[:-1], 1):
        at = f"{path}:{number}"
        line = _decode(raw, at)
        if not line.strip():
            continue
        obj = _parse(line, at)
        if not isinstance(obj, dict):
            raise InvalidFileError(f"{at}: expected a JSON object, got {json_type(obj)}")
        rec = _Record(obj)
        rec.where = at
        records.append(rec)
    if repair and good < len(data):
        atomic_write(path, data[:good])
    return records


# --- checking what was read -----------------------------------------------------------------


class Kind:
    """A shape a JSON value must have: ``test`` says whether it does, ``name`` what it is."""

    def __init__(self, name: str, test: Callable[[Any], bool]) -> None:
        self.name = name
        self.test = test


NUMBER = Kind("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
INTEGER = Kind("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
COUNT = Kind("a non-negative integer", lambda v: INTEGER.test(v) and v >= 0)
TEXT = Kind("a string", lambda v: isinstance(v, str))
BOOLEAN = Kind("true or false", lambda v: isinstance(v, bool))
ANY = Kind("any value", lambda v: True)
FINITE = Kind("a finite number", lambda v: NUMBER.test(v) and math.isfinite(v))


class Optional:
    """A field that may be absent, or (unless ``null`` is False) null."""

    def __init__(self, spec: Any, *, null: bool = True) -> None:
        self.spec = spec
        self.null = null


class ListOf:
    """A JSON array whose items all have one shape."""

    def __init__(self, item: Any) -> None:
        self.item = item


class MapOf:
    """A JSON object of any keys whose values all have one shape."""

    def __init__(self, value: Any) -> None:
        self.value = value


PAIR = (NUMBER, NUMBER)
"""A two-item array of numbers (a tuple spec: one shape per item)."""


def check(value: Any, spec: Any, where: str, field: str = "") -> None:
    """Checks that ``value`` has the shape ``spec``: a :class:`Kind`, :class:`ListOf`,
    :class:`MapOf`, a tuple (an array of that many items, one shape each) or a dict (an object
    with those keys; a key whose shape is :class:`Optional` may be absent; other keys are
    allowed).

    Raises:
        InvalidFileError: ``WHERE: field "a.b[2]": expected ..., got ...``.
    """

    def fail(expected: str) -> None:
        name = f'field "{field}": ' if field else ""
        raise InvalidFileError(f"{where}: {name}expected {expected}, got {json_type(value)}")

    if isinstance(spec, Optional):
        if value is not None or not spec.null:
            check(value, spec.spec, where, field)
    elif isinstance(spec, Kind):
        if not spec.test(value):
            fail(spec.name)
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            fail("an array")
        for i, item in enumerate(value):
            check(item, spec.item, where, f"{field}[{i}]")
    elif isinstance(spec, MapOf):
        if not isinstance(value, dict):
            fail("an object")
        for key, item in value.items():
            check(item, spec.value, where, f"{field}.{key}" if field else key)
    elif isinstance(spec, tuple):
        if not isinstance(value, list) or len(value) != len(spec):
            fail(f"an array of {len(spec)} items")
        for i, (item, sub) in enumerate(zip(value, spec, strict=True)):
            check(item, sub, where, f"{field}[{i}]")
    elif isinstance(spec, Mapping):
        if not isinstance(value, dict):
            fail("an object")
        for key, sub in spec.items():
            path = f"{field}.{key}" if field else key
            if key not in value:
                if not isinstance(sub, Optional):
                    raise InvalidFileError(f'{where}: field "{path}": missing')
                continue
            check(value[key], sub, where, path)
    else:  # pragma: no cover - a programming error in a spec
        raise TypeError(f"not a shape: {spec!r}")


def read_checked(path: Path, spec: Any) -> Any:
    """:func:`read_json`, then :func:`check` against ``spec`` (field problems name ``FILE``)."""
    value = read_json(path)
    check(value, spec, os.fspath(path))
    return value

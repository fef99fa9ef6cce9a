"""Hyperparameters of an edit: per-family defaults, presets, files and ``key=value`` overrides.

Resolution
----------
A run's hyperparameters are resolved in this order, each step overriding the previous one:

1. the family's defaults, ``rrome/data/hparams/<family>.json`` (the edited layer and every
   constant below; a layer beyond a smaller model's depth falls back to a third of its depth);
2. ``--hparams FILE|PRESET`` (``Editor.from_pretrained(hparams=...)``): a preset name
   (:data:`PRESETS`), or a JSON file holding an object of fields (any subset; ``family``, if
   present, must be the model's);
3. ``--set key=value``, repeatable (values as in JSON; a bare word is a string);
4. the explicit ``--layer`` option.

Every field is checked (name, type, range) before the model is loaded; a bad one raises
:class:`HParamsError` naming the key and what it expects. The resolved set is recorded in each
edit's metadata (``meta["hparams"]``, in the edit log) and in ``rrome eval``'s results.

The value optimisation and its units
------------------------------------
δ is added to the edited module's output v_init at the subject's last token and optimised
with Adam for at most ``v_num_grad_steps - 1`` steps (``v_num_grad_steps`` forward passes, as
the reference code counts them) on NLL + KL + weight decay (:mod:`rrome.engine.values`).

* ``v_lr`` with ``v_lr_unit = "absolute"`` (the reference code) is Adam's learning rate as is.
  Adam's first step moves every coordinate of δ by about the learning rate, so its norm is about
  ``v_lr · √d_out``: 0.5 is a step of 12.6 on a 640-wide model whose ‖v_init‖ is 3, and of 32 on
  a 4096-wide one. With ``v_lr_unit = "relative"`` the learning rate is
  ``v_lr · ‖v_init‖ / √d_out`` (``v_lr`` times the root-mean-square coordinate of v_init), so the
  first step's norm is about ``v_lr · ‖v_init‖`` whatever the width: ``v_lr`` is a step size as a
  fraction of the module output it edits, and means the same on every model.
* ``clamp_norm_factor``: after each step ‖δ‖ is clamped to ``clamp_norm_factor · ‖v_init‖``
  (relative to the model's own scale in the reference code already).
* ``clamp_base`` (``"current"`` in ``reference``): the ‖v_init‖ the clamp is relative to.
  ``"current"``: the module's output at the subject in the model as it is (the reference code).
  ``"unedited"``: that output less what the earlier edits of the tensor add there (this
  editor's, and those in the folder's edit log), i.e. in the model before any edit. The step
  size and the weight decay stay relative to the current output. In sequential editing earlier
  edits add to the output at later subjects' keys, the current ‖v_init‖ grows with them, and so
  would every later edit under a relative clamp (δ usually ends on the clamp): measured on
  Gemma 3 270M, ‖v_init‖ and ‖r‖ grew about fourfold over 300 edits (docs/results.md). One edit
  on an unedited model is the same either way.
* ``v_weight_decay`` with ``v_weight_decay_unit = "reference"`` adds
  ``v_weight_decay · ‖δ‖ / ‖v_init‖²`` (the reference code; its size depends on ‖v_init‖), with
  ``"relative"`` it adds ``v_weight_decay · ‖δ‖ / ‖v_init‖`` (dimensionless).
* ``kl_factor`` weighs KL(current ‖ initial) of the next-token distribution after "{subject} is a".
* Stopping: the optimisation stops after the forward pass at which the loss falls below
  ``v_stop_loss`` (the reference code's rule, 0.05; 0 turns it off), or, when
  ``v_stop_most_probable`` = k ≥ 1, once the new target has been the argmax at every target
  position of every rewriting prompt at k consecutive forward passes (most-probable early
  stopping, ENCORE: Gupta et al. 2025); ``v_num_grad_steps`` bounds both.
* ``v_check_update`` (off in ``reference``): the stop rule is also checked with the rank-one
  update itself applied instead of δ (r-rome writes v_e at the template-averaged key, so a prompt
  that flips under δ may not flip under Δ); while it fails, the optimisation goes on, within
  ``v_num_grad_steps`` (:mod:`rrome.engine.values`).
* ``v_objective`` (``"subject"`` in ``reference``): what the optimisation adds at each prompt's
  subject token. ``"subject"``: δ itself, the same vector at every prompt (the reference code).
  ``"update"``: what the rank-one update written for v_e = v_init + δ adds there,
  r·uᵀk_j with k_j that prompt's own key, so that the loss and the stop rule see the update
  the editor writes rather than δ (r-rome writes v_e at the template-averaged key).

Sequential retention
--------------------
* ``retain_edit_keys`` (on in Gemma 3's defaults; off in ``reference`` and untuned families):
  each edit solves for its input factor against C0 plus the keys of the earlier edits (the
  editor's and the folder's edit log's),
  u = (C0 + Σ_p w_p k_p k_pᵀ)⁻¹ k, so that it changes the module's output at those keys less
  (:mod:`rrome.engine.retain`).
* ``retain_weight`` λ sets w_p = λ / (k_pᵀ C0⁻¹ k_p): in the coordinates where C0 is the
  identity, each earlier key is a unit direction added with weight λ, and one earlier key alone
  cuts what the new edit does at it by the factor 1 + λ·(1 − cos²) (cos: the two keys' cosine
  under C0⁻¹), whatever the width or the scale of the keys.
* ``retain_both_keys`` (on in Gemma 3's defaults; off in ``reference`` and elsewhere): retain
  both of each edit's keys, the template-averaged k_e and the plain prompt's k_e^o, not only the
  one it wrote at (k_e under r-rome). Retaining k_e alone
  leaves the edit's own prompt exposed: measured on Gemma 3 270M, later edits change the module's
  output at an earlier edit's k_e^o by a third of that edit's own change there (median over 200
  sequential edits) against a tenth at k_e (docs/results.md). Across sessions too: every edit
  records its other key in the edit log beside the written one.

Neighbour shield
----------------
* ``shield_subjects`` (0, off, in ``reference``): that many other subjects (a packaged bank of
  CounterFact train names, those asked in the edit's own prompt first) are put into the edit's
  prompt and their keys added to what this edit is solved against, with weight
  ``shield_weight`` in ``retain_weight``'s units (:mod:`rrome.engine.shield`).

Presets: ``reference`` is the reference ROME code's constants and stopping rule exactly (it
leaves the layer and the statistics budget to the family); ``default`` is the family's packaged
set unchanged. Gemma 3's packaged set is measured on CounterFact (most-probable stop, relative
step 1, the check and the update objective, a shield of 100 subjects at weight 10, retention of
both keys, clamp 1 relative to the unedited output; selected on train, reported on val in
docs/results.md). The llama family's
was measured on SmolLM2-135M, and the measurement selected the reference recipe at layer 5.
Every other family's is still the reference recipe, untried, and its file's ``note`` says so
(``not yet tuned``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rrome.files.errors import InvalidFileError, RromeError


class HParamsError(RromeError, ValueError):
    """A hyperparameter name or value is not valid; the message names the key and what it expects."""


class HParamsFileError(HParamsError, InvalidFileError):
    """A hyperparameters file (``--hparams FILE``) is unreadable or malformed; the message names it."""


LR_UNITS = ("absolute", "relative")
OBJECTIVES = ("subject", "update")
CLAMP_BASES = ("current", "unedited")
WEIGHT_DECAY_UNITS = ("reference", "relative")


@dataclass(frozen=True)
class HParams:
    """Hyperparameters of ROME / r-ROME for one model family (see the module docstring).

    Every field is checked on construction; a bad value raises :class:`HParamsError`.
    """

    # The defaults are the reference recipe (the preset ``reference``, :data:`REFERENCE_FIELDS`),
    # defined here and nowhere else, and the defaults of the settings outside it.
    family: str
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_lr_unit: str = "absolute"
    v_weight_decay: float = 0.5
    v_weight_decay_unit: str = "reference"
    clamp_norm_factor: float = 4.0
    clamp_base: str = "current"
    kl_factor: float = 0.0625
    v_stop_loss: float = 0.05
    v_stop_most_probable: int = 0
    v_check_update: bool = False
    v_objective: str = "subject"
    context_template_lengths: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    template_seed: int = 0
    stats_max_tokens: int = 100_000
    retain_edit_keys: bool = False
    retain_weight: float = 10.0
    retain_both_keys: bool = False
    shield_subjects: int = 0
    shield_weight: float = 1.0
    note: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check(f.name, getattr(self, f.name)))

    def with_overrides(self, **overrides: Any) -> HParams:
        """A copy with the given fields replaced (``None`` values are ignored).

        Raises:
            HParamsError: an unknown field name or a bad value.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        for key in given:
            _spec(key)
        return dataclasses.replace(self, **given)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["context_template_lengths"] = [list(x) for x in self.context_template_lengths]
        return d


# --------------------------------------------------------------------------------------------
# field checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass(frozen=True)
class _Spec:
    expect: str  # what a valid value is, in words
    ok: Callable[[Any], bool]
    kind: str  # "int", "float", "str", "lengths", "bool"


def _int(expect: str, ok: Callable[[int], bool]) -> _Spec:
    return _Spec(expect, lambda v: _is_int(v) and ok(v), "int")


def _float(expect: str, ok: Callable[[float], bool]) -> _Spec:
    return _Spec(expect, lambda v: _is_number(v) and ok(v), "float")


def _choice(*choices: str) -> _Spec:
    return _Spec("one of " + ", ".join(repr(c) for c in choices), lambda v: v in choices, "str")


def _lengths_ok(v: Any) -> bool:
    if not isinstance(v, list | tuple) or not v:
        return False
    return all(isinstance(p, list | tuple) and len(p) == 2 and all(_is_int(x) and x >= 1 for x in p) for p in v)


_BOOL = _Spec("true or false", lambda v: isinstance(v, bool), "bool")

_SPECS: dict[str, _Spec] = {
    "family": _Spec("a family name (a string)", lambda v: isinstance(v, str) and bool(v), "str"),
    "layer": _int("an integer >= 0", lambda v: v >= 0),
    "v_num_grad_steps": _int("an integer >= 1", lambda v: v >= 1),
    "v_lr": _float("a number > 0", lambda v: v > 0),
    "v_lr_unit": _choice(*LR_UNITS),
    "v_weight_decay": _float("a number >= 0", lambda v: v >= 0),
    "v_weight_decay_unit": _choice(*WEIGHT_DECAY_UNITS),
    "clamp_norm_factor": _float("a number > 0", lambda v: v > 0),
    "kl_factor": _float("a number >= 0", lambda v: v >= 0),
    "v_stop_loss": _float("a number >= 0", lambda v: v >= 0),
    "v_stop_most_probable": _int("an integer >= 0 (0: off)", lambda v: v >= 0),
    "v_check_update": _BOOL,
    "v_objective": _choice(*OBJECTIVES),
    "clamp_base": _choice(*CLAMP_BASES),
    "context_template_lengths": _Spec(
        "a non-empty list of [count, length] pairs of integers >= 1, e.g. [[5,10],[10,10]]", _lengths_ok, "lengths"
    ),
    "template_seed": _int("an integer", lambda v: True),
    "stats_max_tokens": _int("an integer >= 1", lambda v: v >= 1),
    "retain_edit_keys": _BOOL,
    "retain_weight": _float("a number > 0", lambda v: v > 0),
    "retain_both_keys": _BOOL,
    "shield_subjects": _int("an integer >= 0 (0: off)", lambda v: v >= 0),
    "shield_weight": _float("a number > 0", lambda v: v > 0),
    "note": _Spec("a string", lambda v: isinstance(v, str), "str"),
}
assert set(_SPECS) == {f.name for f in dataclasses.fields(HParams)}

FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(HParams))
"""Every hyperparameter name, in the order of :class:`HParams`."""


def _spec(key: str) -> _Spec:
    spec = _SPECS.get(key)
    if spec is None:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(FIELDS)}"
        raise HParamsError(f"unknown hyperparameter {key!r}{hint}")
    return spec


def _check(key: str, value: Any) -> Any:
    """The value in its canonical form (floats as float, lengths as tuples), or HParamsError."""
    spec = _spec(key)
    if not spec.ok(value):
        raise HParamsError(f"{key}: expected {spec.expect}, got {json.dumps(value, default=repr)}")
    if spec.kind == "float":
        return float(value)
    if spec.kind == "lengths":
        return tuple((int(a), int(b)) for a, b in value)
    return value


def describe_differences(saved: Mapping[str, Any], now: Mapping[str, Any], *, ignore: Iterable[str] = ()) -> str:
    """``key: saved X, now Y`` for every key of either set (keys sorted, values as JSON, joined by
    ``; ``) whose values differ; ``""`` when the two agree. Compares a recorded resolved set with
    the one a resumed run resolves (``rrome eval``, ``rrome tune``); the caller says how a field
    the record lacks counts."""
    skip = set(ignore)
    keys = sorted(
        k
        for k in set(saved) | set(now)
        if k not in skip and json.dumps(saved.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True)
    )
    return "; ".join(f"{k}: saved {json.dumps(saved.get(k))}, now {json.dumps(now.get(k))}" for k in keys)


def check_overrides(values: Mapping[str, Any]) -> dict[str, Any]:
    """Checks names and values of a partial set of fields; returns them in canonical form.

    Raises:
        HParamsError: the first unknown name or bad value.
    """
    return {k: _check(str(k), v) for k, v in values.items()}


def parse_assignment(text: str) -> tuple[str, Any]:
    """One ``--set key=value``: the value is read as JSON (``0.1``, ``3``, ``[[5,10]]``), else as
    a plain string (``v_lr_unit=relative``), then checked like any other value.

    Raises:
        HParamsError: no ``=``, an unknown key or a bad value; the message quotes the assignment.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise HParamsError(f"--set {text}: expected KEY=VALUE, e.g. --set clamp_norm_factor=1.0")
    _spec(key)
    try:
        return key, parse_value(key, raw)
    except HParamsError as e:
        raise HParamsError(f"--set {text}: {e}") from None


def parse_value(key: str, raw: str) -> Any:
    """One value of ``key`` as written on the command line: JSON, else a plain string, checked.

    Raises:
        HParamsError: an unknown key or a bad value (``key: expected ..., got ...``).
    """
    spec = _spec(key)
    raw = raw.strip()
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if spec.kind == "str" and not isinstance(value, str):
        value = raw  # e.g. note=123 is the string "123"
    if spec.kind == "float" and isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity"):
        value = float(value)
    return _check(key, value)


def parse_assignments(texts: Iterable[str]) -> dict[str, Any]:
    """``--set`` assignments in order (a later one of the same key wins)."""
    out: dict[str, Any] = {}
    for t in texts:
        key, value = parse_assignment(t)
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# grids (rrome tune)

UNTUNABLE = ("family", "note")
"""Fields a ``--grid`` may not vary: they say what a set is for, not how it edits."""


def _split_values(raw: str) -> list[str]:
    """``raw`` cut at the commas outside brackets and double quotes: ``1,[[5,10]],"a,b"`` is
    three values."""
    parts: list[str] = []
    depth, quoted, escaped, start = 0, False, False, 0
    for i, c in enumerate(raw):
        if quoted:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                quoted = False
        elif c == '"':
            quoted = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return parts


def parse_grid(text: str) -> tuple[str, tuple[Any, ...]]:
    """One ``--grid KEY=V1,V2,...``: the values of one hyperparameter a sweep tries, each read
    as ``--set`` reads a value (commas inside brackets or quotes do not separate values).

    Raises:
        HParamsError: no ``=``, an unknown or untunable key, an empty, bad or repeated value;
            the message starts with ``--grid TEXT:`` and names the key.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    where = f"--grid {text}"
    if not sep or not key:
        raise HParamsError(f"{where}: expected KEY=V1,V2,..., e.g. --grid clamp_norm_factor=0.5,1,2")
    try:
        _spec(key)
    except HParamsError as e:
        raise HParamsError(f"{where}: {e}") from None
    if key in UNTUNABLE:
        raise HParamsError(f"{where}: {key} is not a tunable hyperparameter")
    values: list[Any] = []
    seen: set[str] = set()
    for part in _split_values(raw):
        if not part.strip():
            raise HParamsError(f"{where}: {key}: an empty value (values are separated by commas)")
        try:
            value = parse_value(key, part)
        except HParamsError as e:
            raise HParamsError(f"{where}: {e}") from None
        canonical = json.dumps(value)
        if canonical in seen:
            raise HParamsError(f"{where}: {key}: {part.strip()} is listed twice")
        seen.add(canonical)
        values.append(value)
    return key, tuple(values)


def parse_grids(texts: Iterable[str]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """``--grid`` options in order, each key at most once.

    Raises:
        HParamsError: as :func:`parse_grid`, or a key given twice.
    """
    out: dict[str, tuple[Any, ...]] = {}
    for t in texts:
        key, values = parse_grid(t)
        if key in out:
            raise HParamsError(f"--grid {t}: {key} is given twice; list all its values in one --grid")
        out[key] = values
    return tuple(out.items())


# --------------------------------------------------------------------------------------------
# presets, files, family defaults

REFERENCE_FIELDS = (
    "v_num_grad_steps",
    "v_lr",
    "v_lr_unit",
    "v_weight_decay",
    "v_weight_decay_unit",
    "clamp_norm_factor",
    "clamp_base",
    "kl_factor",
    "v_stop_loss",
    "v_stop_most_probable",
    "context_template_lengths",
    "v_check_update",
    "v_objective",
    "retain_edit_keys",
    "retain_both_keys",
    "shield_subjects",
)
"""The fields of the reference recipe: the reference ROME code (Meng et al. 2022; kept by r-ROME,
Gupta et al. 2024) for GPT-2 XL and GPT-J, rome/compute_v.py with hparams/ROME/*.json. Their
values are :class:`HParams`' defaults. The layer and the statistics budget stay the family's."""

_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(HParams) if f.default is not dataclasses.MISSING
}

PRESETS: dict[str, dict[str, Any]] = {
    "reference": {
        **{key: _DEFAULTS[key] for key in REFERENCE_FIELDS},
        "note": "preset reference: the reference ROME code's constants and stopping rule",
    },
    "default": {},
}
"""Named sets of fields for ``--hparams PRESET``, applied over the family's defaults."""


def read_hparams_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of a hyperparameters file (a JSON object, any subset of the fields), checked.

    Raises:
        FileNotFoundError, PermissionError, ...: the file cannot be read.
        HParamsFileError: not a JSON object, or an unknown field or bad value (named with the file).
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise HParamsFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise HParamsFileError(f"{p}: expected a JSON object of hyperparameters, got {type(raw).__name__}")
    try:
        return check_overrides(raw)
    except HParamsError as e:
        raise HParamsFileError(f"{p}: {e}") from None


HParamsSpec = str | os.PathLike[str] | Mapping[str, Any] | HParams | None
"""What ``hparams=`` accepts: a preset name or file path, a mapping of fields, an HParams, or None."""


def spec_overrides(spec: str | os.PathLike[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """The fields a preset name, file path or mapping sets, checked (no family defaults applied).

    A string that names a preset is that preset; any other string or path is a file.

    Raises:
        HParamsError: an unknown preset that is no file either, an unknown field or a bad value.
        HParamsFileError: a malformed file.
    """
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        return check_overrides(spec)
    if isinstance(spec, str) and spec in PRESETS:
        return dict(PRESETS[spec])
    path = Path(spec)
    if not path.is_file():
        presets = ", ".join(PRESETS)
        raise HParamsError(f"--hparams {spec}: no such preset or file (presets: {presets}; a file is a JSON object)")
    return read_hparams_file(path)


def load_hparams(family: str, *, n_layers: int | None = None) -> HParams:
    """The packaged defaults of a family; the layer is clamped into ``[0, n_layers)``.

    A family's file holds its ``family``, its ``layer``, a ``note`` on where its values come
    from, and only the fields whose values differ from :class:`HParams`' defaults (the
    reference recipe): the fields it leaves out are the reference's.

    Raises:
        RromeError: no defaults for the family.
    """
    path = resources.files("rrome") / "data" / "hparams" / f"{family}.json"
    if not path.is_file():
        raise RromeError(f"no default hyperparameters for model family {family!r}")
    raw = json.loads(path.read_text())
    try:
        hp = HParams(**raw)  # every field checked once, as the set is built
    except (HParamsError, TypeError) as e:
        raise RromeError(f"packaged hyperparameters of {family!r} are invalid: {e}") from e
    if n_layers is not None and not 0 <= hp.layer < n_layers:
        hp = dataclasses.replace(hp, layer=n_layers // 3)
    return hp


def resolve_hparams(
    family: str,
    spec: HParamsSpec = None,
    *,
    n_layers: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> HParams:
    """The hyperparameters of a run: the family's defaults, then ``spec``, then ``overrides``.

    ``spec`` is a preset name, a file path, a mapping of fields (each over the family's
    defaults), or an :class:`HParams` (used as given, ``overrides`` still applied).

    Raises:
        HParamsError: an unknown preset, field or bad value, or a set made for another family.
        HParamsFileError: a malformed file.
    """
    if isinstance(spec, HParams):
        base, fields = spec, {}
    elif isinstance(spec, Mapping):
        base, fields = load_hparams(family, n_layers=n_layers), dict(spec)
    else:  # a preset, or a file (checked as it is read, so that a problem names the file)
        base, fields = load_hparams(family, n_layers=n_layers), spec_overrides(spec)
    fields.update(overrides or {})
    for key in fields:
        _spec(key)  # an unknown name, with the closest known one
    other = fields.pop("family", base.family)
    if other != base.family:
        raise HParamsError(f"family: these hyperparameters are for {other!r}, the model is {base.family!r}")
    return dataclasses.replace(base, **fields)  # every value checked here, as the set is built

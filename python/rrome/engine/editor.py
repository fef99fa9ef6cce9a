"""The editing API: load a checkpoint, edit facts one after another, write them into its shards.

:class:`Editor` ties the pieces together. For each request it computes the keys
(:mod:`rrome.engine.keys`), the target value (:mod:`rrome.engine.values`) and the rank-one update of the
chosen variant (:mod:`rrome.engine.update`) against the layer statistics C0 (:mod:`rrome.engine.stats`),
applies it to the in-memory model (so the next edit sees it: sequential editing), and keeps the
update as a :class:`~rrome.files.shards.Delta`. :meth:`Editor.save` then writes all pending deltas
through the Rust shard writer: the checkpoint is never re-saved with ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from rrome._rust import Cholesky
from rrome.engine import stats
from rrome.engine.hooks import get_module
from rrome.engine.keys import Keys, cached_templates, keys_at
from rrome.engine.models import Adapter, load, num_layers
from rrome.engine.probabilities import request_probabilities
from rrome.engine.prompts import EditPrompts, PromptFormat, RequestTokens, Row, context_rows
from rrome.engine.retain import RetainedKeys
from rrome.engine.screen import SCREEN_RATIO, ScreenResult, screen_keys
from rrome.engine.shield import Shield, choose_subjects, shield_keys
from rrome.engine.update import Solver, Update, compute_update
from rrome.engine.values import compute_value
from rrome.files.constants import METHODS, Method
from rrome.files.edits import EditRequest, parse_record, problem_summary
from rrome.files.errors import DisablingEditError, EditFileError, LargeUpdateError, NonFiniteUpdateError, RromeError
from rrome.files.hparams import HParams, HParamsSpec, resolve_hparams, spec_overrides
from rrome.files.locate import resolve_model
from rrome.files.shards import EDITS_FILE, ApplyReport, Delta, LoggedDelta, apply_deltas, load_deltas

LARGE_UPDATE_RATIO = 20.0
"""Default of ``large_update_ratio``: an edit whose |Δ| exceeds this many times the median |Δ|
of the session's earlier edits is refused as a likely disabling edit (docs/design.md §1)."""

LARGE_UPDATE_MIN_EDITS = 3
"""The large-update guard compares against a median only once this many edits were accepted."""

_log = logging.getLogger("rrome")

TIMING_FIELDS = frozenset({"seconds", "timings"})
"""The fields of :meth:`EditResult.to_json` that measure time: the only ones a rerun of the same
edit on the same machine may change."""


@dataclass(frozen=True)
class EditResult:
    """One edit and what it did.

    Attributes:
        request: the fact.
        method: ``r-rome``, ``rome`` or ``p-rome``.
        delta: the update as written to the checkpoint (factors and metadata).
        norm_delta: |Δ| = ‖Δ‖_F / (d_out·d_in).
        norm_u, norm_r: norms of the two factors (u has unit norm; r carries the scale).
        denominator: uᵀ k_den of the variant.
        p_new_before, p_true_before, p_new_after, p_true_after: P(target | prompt), the prompt
            read as the edit read it (plain, or inside the chat template).
        steps: Adam steps taken by the value optimisation.
        losses: its loss per iteration.
        seconds: wall time of the edit.
        stop: why the value optimisation stopped (``most-probable``, ``loss``, ``max-steps``).
        delta_ratio: ‖δ‖ / ‖v_init‖, the change of the module output relative to its size.
        value: the optimisation's diagnostics (:meth:`rrome.engine.values.ValueResult.record`: the loss
            terms nll, kl and weight decay per forward pass, the argmax hit rate, the lr used),
            also in the edit log as ``meta["value"]``.
        shield: with ``shield_subjects``, the subjects whose keys the edit was solved against
            and their weight (:meth:`rrome.engine.shield.Shield.to_json`), else ``None``.
        timings: seconds per phase of the edit: ``before`` (P(target) before), ``setup`` (the
            templates and C0's factor, once per editor, and the retained keys), ``keys`` (keys
            and screen), ``shield``, ``value`` (the optimisation, with its checks), ``update``
            (solve, guards, the in-memory write, retaining the key), ``after`` (P(target) after).
        screen: the disabling-edit screen of the request (:mod:`rrome.engine.screen`), also in the
            edit log as ``meta["screen"]``.
    """

    request: EditRequest
    method: Method
    layer: int
    delta: Delta
    norm_delta: float
    norm_u: float
    norm_r: float
    denominator: float
    p_new_before: float
    p_true_before: float | None
    p_new_after: float
    p_true_after: float | None
    steps: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    stop: str = ""
    delta_ratio: float = math.nan
    value: dict[str, Any] = field(default_factory=dict)
    screen: ScreenResult | None = None
    shield: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The edit's record: the one serialiser of what an edit did, written into the edit log
        (``meta``, with the session's settings beside it) and into each line of ``rrome eval``'s
        ``edits.jsonl`` (with the case's measurements beside it)."""
        return {
            "request": self.request.to_json(),
            "method": self.method,
            "layer": self.layer,
            "norm_delta": self.norm_delta,
            "norm_u": self.norm_u,
            "norm_r": self.norm_r,
            "denominator": self.denominator,
            "steps": self.steps,
            "stop": self.stop,
            "delta_ratio": self.delta_ratio,
            "value": self.value,  # the loss terms per forward pass, the argmax hit rate, the lr
            "seconds": self.seconds,
            "p_new": [self.p_new_before, self.p_new_after],
            "p_true": [self.p_true_before, self.p_true_after],
            "screen": self.screen.to_json() if self.screen is not None else None,
            "shield": self.shield,
            "timings": self.timings,
        }


class _Laps:
    """Seconds per phase, each from the end of the one before (the first from ``t0``)."""

    def __init__(self, t0: float) -> None:
        self.last = t0
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now


def _resident_weight(module: torch.nn.Module) -> torch.Tensor:
    """The tensor that holds ``module.weight``'s values: the parameter itself, or, when accelerate
    offloaded it (``meta`` outside forward passes), the CPU copy its hook loads from."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    if weight.device.type != "meta":
        return weight
    hook = getattr(module, "_hf_hook", None)
    hooks = getattr(hook, "hooks", [hook])  # accelerate's SequentialHook holds several
    stored = next((h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None), None)
    held = stored["weight"] if stored is not None else None
    if not isinstance(held, torch.Tensor) or held.device.type == "meta":
        raise RromeError("the edited module's weight is offloaded to disk; use a device_map that keeps it in memory")
    return held


class Editor:
    """Sequential ROME / r-ROME / p-ROME editing of one checkpoint.

    Create with :meth:`from_pretrained`; :meth:`edit` one request at a time (each edit sees the
    previous ones), then :meth:`save` to write every pending update into the shards. Every edit
    records its key (k_den) with its factors; with ``retain_edit_keys`` the editor reads the keys
    of the folder's edit log as it opens and solves against them too (docs/design.md §1).
    ``edit_prompts`` says where the keys and the value see each prompt: as plain text, or inside
    the tokenizer's chat template, opening the assistant's reply (:attr:`prompt_format`).
    """

    def __init__(
        self,
        model_dir: Path,
        model: Any,
        tokenizer: Any,
        adapter: Adapter,
        hparams: HParams,
        *,
        method: Method,
        corpus: Path | None,
        progress: bool,
        allow_large_updates: bool = False,
        large_update_ratio: float = LARGE_UPDATE_RATIO,
        screen_ratio: float = SCREEN_RATIO,
        edit_prompts: str = "plain",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        if not (np.isfinite(large_update_ratio) and large_update_ratio > 1.0):
            raise ValueError(f"large_update_ratio must be a finite number above 1; got {large_update_ratio!r}")
        if not (np.isfinite(screen_ratio) and screen_ratio > 1.0):
            raise ValueError(f"screen_ratio must be a finite number above 1; got {screen_ratio!r}")
        self.allow_large_updates = allow_large_updates
        self.large_update_ratio = float(large_update_ratio)
        self.screen_ratio = float(screen_ratio)
        self.model_dir = model_dir
        self.model = model
        self.tokenizer = tokenizer
        # Raises ChatTemplateError for chat prompts on a tokenizer without a chat template.
        self.prompt_format = PromptFormat.for_tokenizer(tokenizer, edit_prompts)
        self.adapter = adapter
        self.hparams = hparams
        self.method: Method = method
        self.corpus = corpus
        self.progress = progress
        self.pending: list[Delta] = []
        self.results: list[EditResult] = []
        # The context templates by (seed, lengths); copies share it (:meth:`copy`).
        self._templates: dict[tuple[int, tuple[tuple[int, int], ...]], list[str]] = {}
        self._chol: Cholesky | None = None
        self._retained: RetainedKeys | None = None
        self.stats_path: Path | None = None
        # The edited tensor's records of the folder's edit log as the editor found it (read once,
        # when first needed: :meth:`_tensor_log`).
        self._log: list[LoggedDelta] | None = None
        # The keys of the folder's edit log, read as the editor opens (retain_edit_keys only).
        self._logged: list[tuple[str, npt.NDArray[np.float32]]] = (
            self._logged_keys() if hparams.retain_edit_keys else []
        )
        # The factors (u, r) of this editor's updates of the in-memory weight, in order (with the
        # log's, what clamp_base "unedited" subtracts: :meth:`_unedited_norm`).
        self._written: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]] = []

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        method: Method = "r-rome",
        device: str | None = None,
        dtype: str = "float32",
        layer: int | None = None,
        corpus: str | os.PathLike[str] | None = None,
        hparams: HParamsSpec = None,
        progress: bool = True,
        device_map: str | dict[str, Any] | None = None,
        allow_large_updates: bool = False,
        large_update_ratio: float = LARGE_UPDATE_RATIO,
        screen_ratio: float = SCREEN_RATIO,
        edit_prompts: str = "plain",
    ) -> Editor:
        """Loads a checkpoint folder for editing.

        Args:
            model_dir: a local Hugging Face checkpoint (safetensors + fast tokenizer), or the id
                of a model in the local Hugging Face cache (``"google/gemma-3-270m"``), found
                offline (:func:`rrome.files.locate.resolve_model`).
            method: ``"r-rome"`` (default), ``"rome"`` or ``"p-rome"``.
            device: torch device; CUDA when available, else CPU.
            dtype: the dtype the model runs in (``float32``, ``bfloat16``, ``float16``).
            layer: the layer to edit (overrides ``hparams``); default from the hyperparameters.
            corpus: text file for the statistics C0; default: the packaged wikitext sample.
            hparams: the hyperparameters (:mod:`rrome.files.hparams`): a preset name
                (``"reference"``, ``"default"``), the path of a JSON file of fields, a mapping
                of fields, each applied over the family's defaults, or an
                :class:`~rrome.files.hparams.HParams` used as given. ``None``: the family's defaults.
            progress: show progress bars.
            device_map: ``"auto"`` (or an explicit map) to spread the model over devices with
                accelerate, e.g. a model larger than one GPU; ``device`` is then ignored. The
                update is still written offline into the shards.
            allow_large_updates: accept updates the guards would refuse (to study model
                collapse): the large-update guard and, under ``rome``, the disabling-edit
                screen; updates holding NaN or Inf are refused regardless.
            large_update_ratio: the guard refuses an edit whose |Δ| exceeds this many times
                the median |Δ| of this editor's earlier edits (once it has made
                :data:`LARGE_UPDATE_MIN_EDITS`); see :meth:`edit`.
            screen_ratio: the disabling-edit screen's threshold on ρ = uᵀk_e / uᵀk_e^o
                (:mod:`rrome.engine.screen`): ``rome`` refuses a request at or above it, ``r-rome`` and
                ``p-rome`` warn.
            edit_prompts: ``"plain"`` (the default): the keys and the value optimisation read
                each prompt as plain text; ``"chat"``: inside the tokenizer's chat template,
                as the opening of the assistant's reply to a fixed user turn
                (:class:`~rrome.engine.prompts.PromptFormat`, docs/design.md §1). Recorded in
                every edit's record (``meta["edit_prompts"]``).

        Raises:
            HParamsError: an unknown preset or field, or a bad value (before the model is loaded).
            ChatTemplateError: ``edit_prompts="chat"`` and the tokenizer has no chat template.
            HParamsFileError: a malformed hyperparameters file.
            DeltasFileError: with ``retain_edit_keys``, a malformed edit log in ``model_dir``.
        """
        path = resolve_model(model_dir)  # a folder, or a model id in the local Hugging Face cache
        if not isinstance(hparams, HParams):
            hparams = spec_overrides(hparams)  # fail on a bad name, file or value before loading
        model, tokenizer, adapter = load(path, device=device, dtype=dtype, device_map=device_map)
        overrides = {"layer": layer} if layer is not None else {}
        hp = resolve_hparams(adapter.family, hparams, n_layers=num_layers(model.config), overrides=overrides)
        if not 0 <= hp.layer < num_layers(model.config):
            raise RromeError(f"layer {hp.layer} is out of range: the model has {num_layers(model.config)} layers")
        return cls(
            path,
            model,
            tokenizer,
            adapter,
            hp,
            method=method,
            corpus=Path(corpus) if corpus is not None else None,
            progress=progress,
            allow_large_updates=allow_large_updates,
            large_update_ratio=large_update_ratio,
            screen_ratio=screen_ratio,
            edit_prompts=edit_prompts,
        )

    @property
    def edit_prompts(self) -> str:
        """``"plain"`` or ``"chat"``: where the edits see their prompts."""
        return self.prompt_format.style

    @property
    def layer(self) -> int:
        return self.hparams.layer

    @property
    def module_name(self) -> str:
        return self.adapter.module_name(self.layer)

    def edited_weight(self) -> torch.Tensor:
        """The tensor that holds the edited module's weight (with accelerate's offloading, the
        copy its hook loads from): what :meth:`edit` and :meth:`replay` add to."""
        return _resident_weight(get_module(self.model, self.module_name))

    def templates(self) -> list[str]:
        """The context templates (generated once per model, seeded, from the unedited model, and
        cached next to its statistics: :func:`~rrome.engine.keys.cached_templates`)."""
        key = (self.hparams.template_seed, self.hparams.context_template_lengths)
        if key not in self._templates:
            self._templates[key] = cached_templates(
                stats.model_key(self.model_dir),
                self.model,
                self.tokenizer,
                seed=self.hparams.template_seed,
                lengths=self.hparams.context_template_lengths,
            )
        return self._templates[key]

    def cholesky(self) -> Cholesky:
        """The Cholesky factor of C0 for the edited layer (statistics and factor cached on disk)."""
        if self._chol is None:
            moment, self.stats_path = stats.second_moment(
                self.model_dir,
                self.model,
                self.tokenizer,
                self.adapter,
                self.layer,
                corpus=self.corpus,
                max_tokens=self.hparams.stats_max_tokens,
                progress=self.progress,
            )
            self._chol, _ = stats.cached_cholesky(self.stats_path, moment)
        return self._chol

    def _logged_keys(self) -> list[tuple[str, npt.NDArray[np.float32]]]:
        """The keys of the edits of the edited tensor in the model folder's edit log, oldest
        first, in the order :meth:`edit` retains them: each edit's k_den, then with
        ``retain_both_keys`` its other key where the log holds one; each with where it was read
        (``FILE:LINE``). Records without a key (logged before keys were recorded) are skipped,
        with one warning."""
        found = self._tensor_log()
        tensor = self.adapter.tensor_name(self.layer)
        keys: list[tuple[str, npt.NDArray[np.float32]]] = []
        one_key = 0
        for x in found:
            where = f"{self.model_dir / EDITS_FILE}:{x.line}"
            if x.delta.key is not None:
                keys.append((where, x.delta.key))
                if not self.hparams.retain_both_keys:
                    continue
                if x.delta.other_key is not None:
                    keys.append((where, x.delta.other_key))
                else:
                    one_key += 1
        missing = sum(x.delta.key is None for x in found)
        if missing:
            _log.warning(
                "%s: %d of the %d logged edit(s) of %s hold no key (they were applied before rrome recorded "
                "keys), so later edits cannot retain them; re-applying them (rrome revert, then rrome apply "
                "with this version) is the only way to retain them",
                self.model_dir,
                missing,
                len(found),
                tensor,
            )
        if one_key:
            _log.warning(
                "%s: retain_both_keys: %d of the %d logged edit(s) of %s hold only the key they wrote at (applied "
                "before rrome recorded the other key, or made with one context template, where the two keys are "
                "one), so only that key of theirs is retained",
                self.model_dir,
                one_key,
                len(found),
                tensor,
            )
        return keys

    def solver(self) -> Solver:
        """What the next edit's u is solved against: C0's factor, or, with ``retain_edit_keys``,
        C0 plus the keys of the edits in the folder's edit log (read when the editor opened) and
        of this editor's earlier edits (:mod:`rrome.engine.retain`)."""
        if not self.hparams.retain_edit_keys:
            return self.cholesky()
        if self._retained is None:
            self._retained = RetainedKeys(self.cholesky(), self.hparams.retain_weight)
            self._retain_logged()
        return self._retained

    @staticmethod
    def _other_key(keys: Keys, written: npt.NDArray[np.float64]) -> npt.NDArray[np.float64] | None:
        """The edit's key that it did not write at (k_e^o under r-rome, k_e under rome and
        p-rome), recorded beside it and retained with ``retain_both_keys``; ``None`` where the
        two are one."""
        k_e, k_e_o = (k.double().cpu().numpy() for k in (keys.k_e, keys.k_e_o))
        if np.array_equal(k_e, k_e_o):  # one key (a single template): nothing else to retain
            return None
        return k_e_o if np.array_equal(written, k_e) else k_e

    def _retain_logged(self) -> None:
        assert self._retained is not None
        for where, key in self._logged:
            try:
                self._retained.add(key)
            except ValueError as e:
                self._retained.clear()
                raise RromeError(f"{where}: the logged key of this edit cannot be retained: {e}") from None

    @property
    def retained_keys(self) -> list[npt.NDArray[np.float64]]:
        """The keys later edits are solved against (``retain_edit_keys``), oldest first: those
        of the folder's edit log, then each edit's k_den, and those :meth:`replay` was given."""
        if self._retained is None:  # not solved yet: the logged keys, as they will be retained
            return [np.asarray(k, dtype=np.float64) for _, k in self._logged]
        return list(self._retained.raw)

    def forget_edit_keys(self) -> None:
        """Solves later edits against C0 plus the folder's logged keys alone again, until new
        edits are retained (after the weight was restored to the one loaded, say)."""
        if self._retained is not None:
            self._retained.clear()
            self._retain_logged()

    def screen(self, request: EditRequest | Mapping[str, Any]) -> ScreenResult:
        """The disabling-edit screen of a request (:mod:`rrome.engine.screen`): forward passes and one
        solve, no optimisation, the model unchanged."""
        if not isinstance(request, EditRequest):
            request = parse_record(dict(request), where="request")
        context = context_rows(self.tokenizer, request, self.templates(), fmt=self.prompt_format)
        keys = keys_at(self.model, self.tokenizer, self.module_name, context)
        return self._screen(request, context[0], keys)

    def _screen(self, request: EditRequest, plain: Row, keys: Keys) -> ScreenResult:
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        return screen_keys(self.cholesky(), keys, request, plain, special, threshold=self.screen_ratio)

    def _check_screen(self, screen: ScreenResult) -> None:
        """Refuses a flagged request under ``rome`` (unless large updates are allowed); warns
        under ``r-rome`` / ``p-rome``. Called before the value optimisation."""
        if not screen.flagged:
            return
        message = screen.warning(self.method)
        if self.method == "rome" and not self.allow_large_updates:
            raise DisablingEditError(
                f"refused {message}. The model is unchanged; use r-rome, or pass allow_large_updates=True "
                f"(--allow-large-updates) to apply it anyway, or raise screen_ratio (--screen-ratio)",
                screen.ratio,
            )
        _log.warning("%s", message)

    def _check_update(self, update: Update, request: EditRequest) -> None:
        """Refuses a non-finite update always, and one far above the session's median |Δ|
        unless ``allow_large_updates``; called before the update touches the model."""
        case = f"case {request.case_id}" if request.case_id is not None else "the edit"
        what = f"{case} ({request.subject!r} -> {request.target_new!r}, layer {self.layer}, {self.method})"
        finite = bool(np.isfinite(update.norm_delta) and np.isfinite(update.u).all() and np.isfinite(update.r).all())
        if not finite:
            raise NonFiniteUpdateError(
                f"refused {what}: its update holds NaN or Inf (|Δ| = {update.norm_delta}); the model is unchanged"
            )
        history = [r.norm_delta for r in self.results]
        if self.allow_large_updates or len(history) < LARGE_UPDATE_MIN_EDITS:
            return
        median = float(np.median(history))
        if median > 0 and update.norm_delta > self.large_update_ratio * median:
            ratio = update.norm_delta / median
            raise LargeUpdateError(
                f"refused {what}: |Δ| = {update.norm_delta:.3e} is {ratio:.1f} times the median |Δ| "
                f"{median:.3e} of the {len(history)} earlier edits of this session (limit "
                f"{self.large_update_ratio:g}x); an update this large is typically a disabling edit that "
                "collapses the model. The model is unchanged; to apply it anyway, pass "
                "allow_large_updates=True (--allow-large-updates) or raise large_update_ratio "
                "(--large-update-ratio)",
                update.norm_delta,
                median,
            )

    def _shield(self, request: EditRequest) -> Shield | None:
        """The neighbour shield of ``request`` (``shield_subjects``; :mod:`rrome.engine.shield`),
        read from the model as it is now, or ``None`` when off."""
        n = self.hparams.shield_subjects
        if not n:
            return None
        subjects = choose_subjects(request, n)
        fmt = self.prompt_format
        return shield_keys(
            self.model, self.tokenizer, self.module_name, request, subjects, self.hparams.shield_weight, fmt
        )

    def _shielded(self, solver: Solver, shield: Shield) -> Solver:
        """``solver`` (C0, or C0 and the retained keys) with the shield's keys added, for one edit:
        a copy, so that they are not retained."""
        if not shield.subjects:
            return solver
        base = (
            solver.copy()
            if isinstance(solver, RetainedKeys)
            else RetainedKeys(self.cholesky(), self.hparams.retain_weight)
        )
        base.add_many(shield.keys, weight=shield.weight)
        return base

    def _needs_factors(self) -> bool:
        """Whether the value optimisation asks for the update's factors: to check it
        (``v_check_update``) or to optimise what it adds (``v_objective = "update"``)."""
        return self.hparams.v_check_update or self.hparams.v_objective == "update"

    def _factors(self, solver: Solver, keys: Keys, v_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors (u, r) of the update this editor would write for ``v_e``: what the value
        optimisation's ``v_check_update`` applies and ``v_objective = "update"`` optimises
        (:func:`~rrome.engine.values.compute_value`)."""
        update = compute_update(self.method, solver, keys, v_e)
        return torch.from_numpy(update.u), torch.from_numpy(update.r)

    def _apply_in_memory(self, update: Update) -> None:
        weight = self.edited_weight()
        r = torch.from_numpy(update.r.copy()).to(weight.device)
        u = torch.from_numpy(update.u.copy()).to(weight.device)
        outer = torch.outer(r, u)
        with torch.no_grad():
            w32 = weight.float()
            w32 = w32 + (outer.T if self.adapter.layout == "in_out" else outer)
            weight.copy_(w32.to(weight.dtype))
        self._written.append((update.u, update.r))

    def _tensor_log(self) -> list[LoggedDelta]:
        """The edited tensor's records in the folder's edit log as the editor found it, oldest
        first: read once (retained keys and clamp_base "unedited" both come from it; :meth:`save`
        reads it before adding to it)."""
        if self._log is None:
            tensor = self.adapter.tensor_name(self.layer)
            found = load_deltas(self.model_dir) if (self.model_dir / EDITS_FILE).is_file() else []
            self._log = [x for x in found if x.delta.tensor == tensor]
        return self._log

    def _unedited_norm(self, key: torch.Tensor, output: torch.Tensor) -> float | None:
        """‖W0 k (+ b)‖: the module's output ``output`` at ``key`` less what every update in the
        in-memory weight adds there (the folder's logged edits of the tensor and this editor's),
        i.e. its output in the model before any edit (``clamp_base = "unedited"``). ``None``
        while the weight holds no update: the output is the unedited one, and the optimisation's
        own ‖v_init‖ (the same number) keeps such an edit bit for bit that of ``"current"``."""
        logged = [(x.delta.u, np.float32(x.delta.scale) * x.delta.r) for x in self._tensor_log()]
        pairs = logged + self._written
        if not pairs:
            return None
        v = output.detach().to("cpu", torch.float64).numpy()
        k = key.detach().to("cpu", torch.float64).numpy()
        us = np.stack([u for u, _ in pairs]).astype(np.float64)
        rs = np.stack([r for _, r in pairs]).astype(np.float64)
        return float(np.linalg.norm(v - rs.T @ (us @ k)))

    def edit(self, request: EditRequest | Mapping[str, Any], *, queue: bool = True) -> EditResult:
        """Computes one edit, applies it to the in-memory model and queues it for :meth:`save`
        (``queue=False``: applied and recorded in :attr:`results`, but never saved).

        The update is checked before it touches the model: one holding NaN or Inf is always
        refused (:class:`~rrome.files.errors.NonFiniteUpdateError`), and once this editor has
        accepted :data:`LARGE_UPDATE_MIN_EDITS` edits, one whose |Δ| exceeds
        ``large_update_ratio`` times their median |Δ| is refused
        (:class:`~rrome.files.errors.LargeUpdateError`) unless ``allow_large_updates``. A refused
        edit leaves the model, :attr:`pending` and :attr:`results` as they were. Before the
        value optimisation the request is screened (:meth:`screen`): under ``rome`` a request
        the screen flags is refused (:class:`~rrome.files.errors.DisablingEditError`) unless
        ``allow_large_updates``; under ``r-rome`` / ``p-rome`` a warning is logged.

        Raises:
            EditFileError: a malformed request mapping.
            TokenizationError: the subject or target cannot be tokenised as needed.
            DisablingEditError: ``rome`` and a request the screen flags (see above).
            LargeUpdateError: |Δ| far above the session's median (see above).
            NonFiniteUpdateError: the update holds NaN or Inf.
        """
        t0 = time.perf_counter()
        if not isinstance(request, EditRequest):
            request = parse_record(dict(request), where="request")
        # Tokenised once, before any work (an empty target fails here), and handed to every pass.
        return self._edit(RequestTokens.build(self.tokenizer, request, self.prompt_format), t0, queue=queue)

    @contextlib.contextmanager
    def tentative(self, request: EditRequest | Mapping[str, Any]) -> Iterator[EditResult]:
        """An edit to measure and undo: applied as :meth:`edit` applies it (never queued for
        :meth:`save`), the result handed to the ``with`` block while the model holds it, then
        undone exactly: the weight is set back from a copy taken before the edit (bit for bit,
        not by subtracting Δ), and :attr:`results` and the retained keys are as they were. A
        refused edit raises as :meth:`edit` does, before the block, with nothing to undo.
        """
        weight = self.edited_weight()
        saved = weight.detach().clone()
        n_results, n_written = len(self.results), len(self._written)
        kept = None if self._retained is None else list(self._retained.raw)
        try:
            yield self.edit(request, queue=False)
        finally:
            with torch.no_grad():
                weight.copy_(saved)
            del self.results[n_results:]
            del self._written[n_written:]
            if self._retained is not None and (kept is None or len(self._retained) != len(kept)):
                self._retained.clear()
                if kept is None:
                    self._retain_logged()
                for key in kept or ():
                    self._retained.add(key)

    def restore(self, weight: torch.Tensor) -> None:
        """Sets the edited weight back to ``weight`` (a copy taken earlier, e.g. of the unedited
        one) and forgets every edit since the editor opened: nothing pending, no results, only
        the folder's logged keys retained (:meth:`forget_edit_keys`)."""
        with torch.no_grad():
            self.edited_weight().copy_(weight)
        self.pending.clear()
        self.results.clear()
        self._written.clear()
        self.forget_edit_keys()

    def copy(self, *, hparams: HParams | None = None, method: Method | None = None) -> Editor:
        """An editor over the same in-memory model (its weights as they are now) with other
        hyperparameters or another method: its own pending edits and results (none yet),
        every other setting this one's. The copies share the context templates, which depend
        on the unedited model and the template settings alone (generate them here first, on the
        unedited model), and C0's factor when the layer and the statistics budget are this one's.
        """
        other = Editor(
            self.model_dir,
            self.model,
            self.tokenizer,
            self.adapter,
            self.hparams if hparams is None else hparams,
            method=self.method if method is None else method,
            corpus=self.corpus,
            progress=self.progress,
            allow_large_updates=self.allow_large_updates,
            large_update_ratio=self.large_update_ratio,
            screen_ratio=self.screen_ratio,
            edit_prompts=self.edit_prompts,
        )
        other._templates = self._templates  # one cache, shared by every copy
        # The same weight: this editor's updates, and the log as this one found it (once read).
        other._log = self._log if self._log is not None else other._log
        other._written = list(self._written)
        same = (other.layer, other.hparams.stats_max_tokens) == (self.layer, self.hparams.stats_max_tokens)
        if same:  # the same statistics: the factor already read
            other._chol, other.stats_path = self._chol, self.stats_path
        return other

    def _edit(self, tokens: RequestTokens, t0: float, *, queue: bool = True) -> EditResult:
        clock = _Laps(t0)
        p_before = request_probabilities(self.model, self.tokenizer, tokens)
        clock.lap("before")
        templates = self.templates()
        solver = self.solver()  # C0 (computed or read once), with the retained keys if any
        clock.lap("setup")
        prompts = EditPrompts.build(self.tokenizer, tokens, templates)
        keys = keys_at(self.model, self.tokenizer, self.module_name, prompts.context)
        screen = self._screen(tokens.request, tokens.plain, keys)
        self._check_screen(screen)
        retained = len(solver) if isinstance(solver, RetainedKeys) else None
        clock.lap("keys")
        shield = self._shield(tokens.request)
        writes = solver if shield is None else self._shielded(solver, shield)  # u is solved against this
        clock.lap("shield")
        try:
            value = compute_value(
                self.model,
                self.tokenizer,
                self.module_name,
                self.adapter.blocks,
                self.layer,
                prompts,
                self.hparams,
                layout=self.adapter.layout,
                factors=functools.partial(self._factors, writes, keys) if self._needs_factors() else None,
                clamp_scale=self._unedited_norm(keys.k_e_o, keys.w_k_e_o)
                if self.hparams.clamp_base == "unedited"
                else None,
            )
            clock.lap("value")
            update = compute_update(self.method, writes, keys, value.v_e)
        except FloatingPointError as e:
            raise NonFiniteUpdateError(
                f"refused the edit of {tokens.request.subject!r}: {e}; the model is unchanged"
            ) from e
        self._check_update(update, tokens.request)
        self._apply_in_memory(update)
        other = None if update.key is None else self._other_key(keys, update.key)
        if isinstance(solver, RetainedKeys) and update.key is not None:
            solver.add(update.key)
            if other is not None and self.hparams.retain_both_keys:
                solver.add(other)
        clock.lap("update")
        p_after = request_probabilities(self.model, self.tokenizer, tokens)
        clock.lap("after")
        tensor = self.adapter.tensor_name(self.layer)
        # Both keys are float32 values already (the keys of a float32 forward pass, or less).
        key = None if update.key is None else update.key.astype(np.float32)
        other_key = None if other is None else other.astype(np.float32)
        unlogged = EditResult(
            request=tokens.request,
            method=self.method,
            layer=self.layer,
            delta=Delta(tensor, update.u, update.r, self.adapter.layout, 1.0, None, key=key, other_key=other_key),
            norm_delta=update.norm_delta,
            norm_u=update.norm_u,
            norm_r=update.norm_r,
            denominator=update.denominator,
            p_new_before=p_before[0],
            p_true_before=p_before[1],
            p_new_after=p_after[0],
            p_true_after=p_after[1],
            steps=value.steps,
            losses=value.losses,
            seconds=time.perf_counter() - t0,
            stop=value.stop,
            delta_ratio=value.delta_ratio,
            value=value.record(),
            screen=screen,
            shield=None if shield is None else shield.to_json(),
            timings=clock.laps,
        )
        delta = dataclasses.replace(unlogged.delta, meta=self._meta(unlogged, prompts, retained))
        result = dataclasses.replace(unlogged, delta=delta)
        if queue:
            self.pending.append(delta)
        self.results.append(result)
        return result

    def _meta(self, result: EditResult, prompts: EditPrompts, retained: int | None) -> dict[str, Any]:
        """The edit log's record of an edit: :meth:`EditResult.to_json` and the settings it was
        made with."""
        meta = {
            **result.to_json(),
            "hparams": self.hparams.to_json(),
            "templates": list(prompts.templates),
            "stats": str(self.stats_path) if self.stats_path else None,
            "edit_prompts": self.prompt_format.style,
        }
        if self.prompt_format.style != "plain":
            meta["chat_prefix"] = self.prompt_format.prefix  # the exact text before every prompt
        if retained is not None:
            meta["retained_keys"] = retained  # earlier edits' keys this one was solved against
        return meta

    def check_requests(self, requests: Iterable[EditRequest | Mapping[str, Any]]) -> list[EditRequest]:
        """Tokenises every request's subject and targets as the edits will, before any edit.

        Returns:
            The requests as :class:`~rrome.files.edits.EditRequest` objects.

        Raises:
            EditFileError: every request whose subject no token covers, or whose ``target_new``
                or ``target_true`` tokenises to nothing, one per line as ``WHERE: field "x":
                ...``, ``WHERE`` being the request's ``FILE:LINE`` when it came from a file.
        """
        return [tokens.request for tokens in self._tokenize_all(requests)]

    def _tokenize_all(self, requests: Iterable[EditRequest | Mapping[str, Any]]) -> list[RequestTokens]:
        """:meth:`check_requests`, returning the requests' tokens."""
        out = [r if isinstance(r, EditRequest) else parse_record(dict(r), where="request") for r in requests]
        problems: list[str] = []
        checked: list[RequestTokens] = []
        for i, req in enumerate(out, 1):
            where = req.source if req.source and req.source != "request" else f"request {i}"
            tokens, found = RequestTokens.check(self.tokenizer, req, self.prompt_format)
            problems += [f"{where}: {p}" for p in found]
            if tokens is not None:
                checked.append(tokens)
        if problems:
            raise EditFileError(problem_summary(problems))
        return checked

    def edit_many(self, requests: Iterable[EditRequest | Mapping[str, Any]]) -> list[EditResult]:
        """Edits in order; each edit is computed on the model as left by the previous ones.

        Every request is checked first (:meth:`check_requests`): a bad one stops the run before
        the first edit.
        """
        return [self._edit(tokens, time.perf_counter()) for tokens in self._tokenize_all(requests)]

    def save(
        self, out_dir: str | os.PathLike[str] | None = None, *, link_untouched: bool = False
    ) -> ApplyReport | None:
        """Writes every pending edit into the checkpoint's shards (in place, or to ``out_dir``;
        ``link_untouched`` as in :func:`rrome.apply_deltas`).

        Returns:
            The shard writer's report, or ``None`` when nothing was pending.
        """
        if not self.pending:
            return None
        if out_dir is None:
            self._tensor_log()  # the log as loaded, before these edits join it (they are in _written)
        report = apply_deltas(self.model_dir, self.pending, out_dir=out_dir, link_untouched=link_untouched)
        self.pending = []
        return report

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 20) -> list[str]:
        """Greedy continuations of ``prompts`` with the current (edited) in-memory model."""
        out = []
        for prompt in prompts:
            enc = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
            with torch.no_grad():
                ids = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
                )
            out.append(self.tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
        return out

    def replay(
        self,
        u: npt.NDArray[np.float32],
        r: npt.NDArray[np.float32],
        key: npt.ArrayLike | None = None,
        other_key: npt.ArrayLike | None = None,
    ) -> None:
        """Adds the stored update Δ = r uᵀ to the in-memory model, exactly as :meth:`edit` did.

        Replaying the factors of earlier edits in order rebuilds the same weights bit for bit
        (used to resume a sequential evaluation). Nothing is queued for :meth:`save`. With
        ``retain_edit_keys``, ``key`` (the edit's k_den, :attr:`retained_keys`) is retained as
        :meth:`edit` retained it, and after it, with ``retain_both_keys`` too, ``other_key``
        (the edit's other key, :meth:`edit` retains it then) when given.
        """
        u32, r32 = np.asarray(u, np.float32), np.asarray(r, np.float32)
        self._apply_in_memory(Update(u=u32, r=r32, denominator=math.nan, norm_delta=math.nan))
        if key is not None and self.hparams.retain_edit_keys:
            solver = self.solver()
            assert isinstance(solver, RetainedKeys)
            solver.add(key)
            if other_key is not None and self.hparams.retain_both_keys:
                solver.add(other_key)

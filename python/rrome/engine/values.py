"""The value optimisation: the module output v_e that makes the model state the new object.

δ is added to the edited module's output at the subject's last token of every prompt (the
rewriting prompts, one per context template, each followed by the new object's tokens but the
last, and the KL prompt "{subject} is a"), and optimised with Adam on

    mean NLL(new object | rewriting prompts)
    + kl_factor · KL(current ‖ initial) of the next-token distribution at the KL prompt's subject
    + v_weight_decay · ‖δ‖ / ‖v_init‖²   (‖δ‖ / ‖v_init‖ with v_weight_decay_unit "relative"),

clamping ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖ after each step (docs/design.md §1; the caller may
give another norm for the clamp, ``clamp_scale``: the editor's ``clamp_base = "unedited"``).
v_e = v_init + δ.
Adam's learning rate is ``v_lr``, or ``v_lr · ‖v_init‖ / √d_out`` with v_lr_unit "relative".
It stops after the forward pass at which the loss is below ``v_stop_loss``, or at which the new
target has been the argmax at every target position of every rewriting prompt for
``v_stop_most_probable`` consecutive passes (when that is ≥ 1), and after at most
``v_num_grad_steps`` passes (:mod:`rrome.files.hparams` describes the units). With the ``reference``
preset this is the reference code's loop, step for step.

With ``v_check_update`` (the editor then passes ``factors``) the stop rule also asks the update
itself: δ is added at the subject alone, but the rank-one Δ the editor will write changes the
module's output by r·uᵀk/uᵀk_den at every key k, and r-rome writes v_e at the template-averaged
key k_e, not at each prompt's own key. So once the rule would stop, ``factors`` turn v_e into
Δ's factors, the rewriting prompts run once more with Δ applied and no δ
(:func:`_passes_update`), and the optimisation stops only if the new target is then the argmax
at every target position of every rewriting prompt (the plain prompt among them); otherwise it
takes another step, within the same ``v_num_grad_steps`` bound (docs/design.md §1).

With ``v_objective = "update"`` (the editor then passes ``factors`` too; without them the
optimisation is δ's) the optimisation adds at
each prompt's subject token what that update adds there instead of δ: the update's output factor
is affine in v_e, r = r_0 + c·δ (r_0 the factors of v_init, c = 1/uᵀk_den), so at a prompt whose
key is k_j the update adds uᵀk_j·r_0 + uᵀk_j·c·δ (:class:`_Shift`). The first pass runs with δ = 0
added, as under ``"subject"`` (the unedited model: v_init, the KL reference and the keys k_j come
from it); every later pass adds the shift. The loss and the stop rule then read the update the
editor writes at each prompt's own key (r-rome writes v_e at the template-averaged key k_e, where
uᵀk_e·c = 1), not δ at all of them.

The fast path gives the same result with less work (docs/design.md §6): the blocks below the
edited layer never see δ, so their output is computed once and replayed at every step, and
logits are computed only at the positions the loss reads.

:func:`compute_value` builds the run (:class:`_Run`: the batch, δ, Adam, and the state carried
between passes), then each pass is one forward (:func:`_forward_plain`, the whole model; or, after
the first, :func:`_forward_fast`), the loss (:func:`_loss`), the stop test and an Adam step.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rrome.engine import models
from rrome.engine.hooks import Trace, add_rank_one, edit_output, get_module, record_input, replay_below, trace
from rrome.engine.models import input_device, logits_at
from rrome.engine.prompts import Batch, EditPrompts, pad_rows
from rrome.files.hparams import HParams
from rrome.files.shards import Layout

STOP_REASONS = ("most-probable", "loss", "max-steps")

UpdateFactors = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""v_e ↦ the factors (u, r) of the rank-one update Δ = r uᵀ the editor would write for it
(``v_check_update``: :func:`compute_value` checks the rewriting prompts under that Δ)."""


@dataclass
class ValueResult:
    """Outcome of the optimisation.

    Attributes:
        v_e, v_init, delta: v_e = v_init + δ (float32, on the inputs' device).
        steps: Adam steps taken (forward passes − 1).
        losses: the total loss at each forward pass; ``nll``, ``kl``, ``weight_decay`` its terms
            (``kl`` and ``weight_decay`` already multiplied by their factors).
        top1: at each pass, the fraction of the rewriting prompts' target positions at which the
            new target is the argmax.
        stop: why it stopped, one of :data:`STOP_REASONS`.
        lr: Adam's learning rate as used (absolute).
        target_ids: the new object's tokens.
        update_top1: ``v_check_update``: per check, the pass it followed (0-based) and the
            fraction of target positions at which the new target was the argmax with the rank-one
            update applied instead of δ; the optimisation stopped at a check that reached 1.0.
        clamp_scale: the norm ‖δ‖'s clamp is relative to: ‖v_init‖, or the ``clamp_scale``
            :func:`compute_value` was given.
    """

    v_e: torch.Tensor
    v_init: torch.Tensor
    delta: torch.Tensor
    steps: int
    losses: list[float] = field(default_factory=list)
    target_ids: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    weight_decay: list[float] = field(default_factory=list)
    top1: list[float] = field(default_factory=list)
    stop: str = "max-steps"
    lr: float = math.nan
    update_top1: list[tuple[int, float]] = field(default_factory=list)
    clamp_scale: float = math.nan

    @property
    def v_init_norm(self) -> float:
        return float(self.v_init.norm())

    @property
    def delta_ratio(self) -> float:
        """‖δ‖ / ‖v_init‖: how far the edit moved the module output, relative to its size."""
        return float(self.delta.norm()) / self.v_init_norm

    def record(self) -> dict[str, Any]:
        """The optimisation's diagnostics as JSON (the edit log's ``meta["value"]``)."""
        return {
            "steps": self.steps,
            "stop": self.stop,
            "lr": self.lr,
            "v_init_norm": self.v_init_norm,
            "delta_norm": float(self.delta.norm()),
            "delta_ratio": self.delta_ratio,
            "loss": self.losses,
            "nll": self.nll,
            "kl": self.kl,
            "weight_decay": self.weight_decay,
            "top1": self.top1,
            "update_top1": [list(x) for x in self.update_top1],
            "clamp_scale": self.clamp_scale,
        }


@dataclass(frozen=True)
class _Inputs:
    """The optimisation's prompts as one batch: the rewriting prompts, then the KL prompt.

    Left-padded whatever the tokenizer's side (position ids keep the model's view unchanged): every
    subject token then sits a few positions from the end, and the fast path's prefix cache covers
    the rest. Both paths run this same batch, so they compute the same numbers (Adam's first step
    is close to sign(gradient), which would amplify even last-bit differences between layouts).
    """

    batch: Batch
    rows: torch.Tensor  # 0 .. B-1, the rows δ is added to
    keep: torch.Tensor  # bool (B, T): positions whose logits the loss reads
    n_rewrite: int
    target: torch.Tensor  # target ids, one per kept rewriting position (row-major order)
    target_len: int

    @classmethod
    def build(cls, tokenizer: Any, prompts: EditPrompts, device: torch.device) -> _Inputs:
        rows = [*prompts.rewrite, prompts.kl]
        batch = pad_rows(tokenizer, rows, device, left=True)
        n = len(prompts.rewrite)
        tgt = prompts.target
        keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
        for i, row in enumerate(rows[:n]):
            start = batch.offsets[i] + len(row.ids) - len(tgt)
            keep[i, start : start + len(tgt)] = True
        keep[n, batch.lookup[n]] = True
        target = torch.tensor(tgt * n, device=device)
        return cls(batch, torch.arange(len(rows), device=device), keep, n, target, len(tgt))


def _cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version takes a KV cache (``cache`` in v5)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _PrefixCache:
    """Keys and values of the positions before every prompt's subject token.

    δ enters at the subject's last token and attention is causal, so at every layer the
    positions before it never change: they are computed once, and each step only runs the
    positions from the earliest lookup token on (docs/design.md §6). The cache tensors are put back
    before every step (a forward pass appends to them, and sliding-window layers also advance
    a counter). Used only where the cache has the plain layout (a ``layers`` list with
    ``keys`` / ``values``); otherwise ``cache`` is ``None`` and whole prompts are run.
    """

    def __init__(self, cache: Any, start: int) -> None:
        self.cache = cache
        self.start = start
        # Each layer's whole state (tensors and counters such as a sliding window's cumulative
        # length): a forward pass replaces these attributes rather than mutating the tensors.
        self.saved = [dict(vars(layer)) for layer in cache.layers] if cache is not None else []

    @classmethod
    def build(cls, model: nn.Module, batch: Batch) -> _PrefixCache:
        start = int(batch.lookup.min())
        if start == 0:
            return cls(None, 0)
        # The decoder without its head: only the keys and values are kept, and the head's logits
        # over the whole vocabulary at every prefix position cost more than the blocks (Gemma 3
        # 270M: a 262,144 × 640 head).
        decoder = getattr(model, "base_model", model)
        with torch.no_grad():
            out = decoder(
                input_ids=batch.input_ids[:, :start],
                attention_mask=batch.attention_mask[:, :start],
                position_ids=batch.position_ids[:, :start],
                use_cache=True,
            )
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers or not all(hasattr(x, "keys") and hasattr(x, "values") for x in layers):
            return cls(None, 0)
        if any(getattr(x, "keys", None) is None or x.keys.shape[-2] != start for x in layers):
            return cls(None, 0)
        return cls(cache, start)

    @classmethod
    def cut(cls, cache: Any, start: int, length: int) -> _PrefixCache | None:
        """The prefix cache cut from a whole pass's cache (``length`` positions, no δ before
        ``start``), or ``None`` where its layers are not the plain kinds this knows how to cut:
        a growing layer, and a sliding-window one that has dropped nothing yet (its counter is
        set back to ``start``)."""
        layers = getattr(cache, "layers", None)
        if start == 0 or not layers:
            return None
        for layer in layers:
            kind = type(layer).__name__
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if kind not in ("DynamicLayer", "DynamicSlidingWindowLayer") or keys is None or values is None:
                return None
            if keys.shape[-2] != length or values.shape[-2] != length:
                return None  # a window that has dropped positions
            if kind == "DynamicSlidingWindowLayer" and getattr(layer, "cumulative_length", None) != length:
                return None
        for layer in layers:
            # Detached: the prefix does not depend on δ, but the pass computed it in the same
            # tensors as the positions that do.
            layer.keys = layer.keys[..., :start, :].detach()
            layer.values = layer.values[..., :start, :].detach()
            if type(layer).__name__ == "DynamicSlidingWindowLayer":
                layer.cumulative_length = start
        return cls(cache, start)

    def restore(self) -> Any:
        for layer, state in zip(self.cache.layers, self.saved, strict=True):
            vars(layer).clear()
            vars(layer).update(state)
        return self.cache


@dataclass(frozen=True)
class _Shift:
    """``v_objective = "update"``: what the update written for v_init + δ adds at each row's
    subject token, ``offset[i] + scale[i] · δ`` (row i's key k_i: offset = uᵀk_i · r_0,
    scale = uᵀk_i · c; module docstring)."""

    offset: torch.Tensor  # float32 (B, d_out)
    scale: torch.Tensor  # float32 (B,)

    @classmethod
    def build(cls, factors: UpdateFactors, v_init: torch.Tensor, keys: torch.Tensor) -> _Shift:
        """From the factors of v_init and of 2·v_init (the update is affine in v_e: c is the
        slope of r along v_init) and the rows' keys (B, d_in)."""
        u, r0 = factors(v_init)
        _, r1 = factors(2 * v_init)
        v = v_init.to(r0.device, torch.float64)
        c = float((r1.double() - r0.double()) @ v / (v @ v))
        s = keys.double() @ u.to(keys.device, torch.float64)
        dev = v_init.device
        offset = (s[:, None].to(dev) * r0.to(dev, torch.float64)[None, :]).float()
        return cls(offset, (s * c).float().to(dev))

    def add(self, delta: torch.Tensor) -> torch.Tensor:
        """The (B, d_out) vectors added at the rows' subject tokens for this δ."""
        return self.offset + self.scale[:, None] * delta[None, :]


@dataclass
class _Run:
    """One value optimisation: what every pass reads, then the state carried from pass to pass.

    δ, the loss and v_init live on the inputs' device (where the logits come back, also with a
    device_map); δ is moved to the edited module's device and dtype where it is added
    (:func:`_add_delta`), so a half-precision model or a model spread over devices optimises the
    same float32 δ.
    """

    model: nn.Module
    module_name: str
    blocks_name: str
    layer: int
    hp: HParams
    inputs: _Inputs
    delta: torch.Tensor  # float32, d_out long
    opt: torch.optim.Adam
    v_init: torch.Tensor | None = None  # the module's output at the plain prompt's subject (first pass)
    block_in: torch.Tensor | None = None  # the edited block's input at the first pass (fast path)
    prefix: _PrefixCache | None = None  # the fast path's, from its first pass
    kl_init: torch.Tensor | None = None  # the KL prompt's log-probabilities at the first pass
    held: int = 0  # consecutive passes at which every target token was the argmax
    steps: int = 0
    factors: UpdateFactors | None = None  # v_e ↦ the update's (u, r): the check's, the shift's
    checks: list[tuple[int, float]] = field(default_factory=list)  # (pass, argmax share under Δ)
    shift: _Shift | None = None  # v_objective "update": from the first pass on
    clamp_scale: float | None = None  # the clamp's norm; None: ‖v_init‖
    trace: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("loss", "nll", "kl", "wd", "top1")})

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: Any,
        module_name: str,
        blocks_name: str,
        layer: int,
        prompts: EditPrompts,
        hp: HParams,
        layout: Layout,
        factors: UpdateFactors | None = None,
    ) -> _Run:
        device = input_device(model)
        weight = get_module(model, module_name).weight
        assert isinstance(weight, torch.Tensor)
        d_out = int(weight.shape[1] if layout == "in_out" else weight.shape[0])
        delta = torch.zeros(d_out, dtype=torch.float32, device=device, requires_grad=True)
        inputs = _Inputs.build(tokenizer, prompts, device)
        opt = torch.optim.Adam([delta], lr=hp.v_lr)
        return cls(model, module_name, blocks_name, layer, hp, inputs, delta, opt, factors=factors)


@dataclass(frozen=True)
class _Terms:
    """The loss of one pass and its terms (weight decay and KL already times their factors)."""

    loss: torch.Tensor
    nll: torch.Tensor
    kl: torch.Tensor
    wd: torch.Tensor
    hit: torch.Tensor  # bool, per kept rewriting position: the new target is the argmax there


def _add_delta(
    delta: torch.Tensor, rows: torch.Tensor, at: torch.Tensor, shift: _Shift | None, out: torch.Tensor
) -> torch.Tensor:
    """The edited module's output ``out`` with δ added at every row's subject token ``at`` (its
    position in the pass's sequence), or with ``shift``, what the update adds there."""
    at = at.to(out.device)
    out = out.clone()
    where = rows.to(out.device)
    added = delta if shift is None else shift.add(delta)
    out[where, at] = out[where, at] + added.to(device=out.device, dtype=out.dtype)
    return out


def _forward_plain(run: _Run, *, first: bool, fast: bool) -> torch.Tensor:
    """The whole model on the whole batch with δ added; the logits at the kept positions
    (row-major). The first pass records v_init (the module's output at the plain prompt's subject
    token, before δ) and, for the fast path, the edited block's input, which it replays, and the
    prefix cache, cut from this pass's own keys and values where the cache allows it
    (:meth:`_PrefixCache.cut`)."""
    x = run.inputs
    block = f"{run.blocks_name}.{run.layer}"
    inputs: dict[str, Any] = x.batch.model_inputs()
    cache = _empty_cache(run.model) if first and fast else None
    if cache is not None:
        inputs[_cache_kwarg(run.model)] = cache
        inputs["use_cache"] = True
    # Registered before the δ hook, the output trace sees the module's own output.
    keys = run.hp.v_objective == "update" and run.factors is not None
    watch_out = trace(run.model, [run.module_name], inputs=keys, outputs=True) if first else nullcontext(Trace())
    watch_in = record_input(run.model, block) if first and fast else nullcontext(Trace())
    add = functools.partial(_add_delta, run.delta, x.rows, x.batch.lookup, run.shift)
    # The fast path's first pass runs the head only at the kept positions (same rows, same order).
    with watch_out as out, edit_output(run.model, run.module_name, add), watch_in as rec:
        logits = logits_at(run.model, inputs, x.keep, masked=fast)
    if first:
        y = out.outputs[run.module_name]
        run.v_init = y[0, x.batch.lookup.to(y.device)[0]].float().to(x.rows.device).clone()
        if keys:
            assert run.factors is not None
            k = out.inputs[run.module_name]
            k = k[x.rows.to(k.device), x.batch.lookup.to(k.device)].float()
            run.shift = _Shift.build(run.factors, run.v_init, k)
    if first and fast:
        run.block_in = rec.inputs[block]
        if cache is not None:
            run.prefix = _PrefixCache.cut(cache, int(x.batch.lookup.min()), x.batch.input_ids.shape[1])
    return logits


def _empty_cache(model: nn.Module) -> Any:
    """A new, empty key-value cache for ``model`` that a forward pass fills in place, or ``None``
    where this transformers has none to give."""
    try:
        from transformers import DynamicCache

        return DynamicCache(config=getattr(model, "config", None))
    except (ImportError, TypeError, ValueError, AttributeError):  # another cache API: the fast path builds its own
        return None


def _suffix_inputs(run: _Run, s0: int) -> dict[str, Any]:
    """The model's inputs for the positions from ``s0`` on, after the prefix cache."""
    assert run.prefix is not None and run.prefix.cache is not None
    b = run.inputs.batch
    return {
        "input_ids": b.input_ids[:, s0:],
        "attention_mask": b.attention_mask,
        "position_ids": b.position_ids[:, s0:],
        _cache_kwarg(run.model): run.prefix.restore(),
        "use_cache": True,
    }


def _forward_fast(run: _Run) -> torch.Tensor:
    """The edited block and those above on the positions from the earliest subject token on,
    the blocks below replayed from the first pass and the positions before from the prefix cache
    (cut from the first pass, else built at the first call outside the δ hook: no δ in the
    prefix); logits only at the kept positions, in the plain path's row-major (row, position)
    order."""
    assert run.block_in is not None
    if run.prefix is None:
        run.prefix = _PrefixCache.build(run.model, run.inputs.batch)
    x, prefix = run.inputs, run.prefix
    s0 = prefix.start if prefix.cache is not None else 0
    keep = x.keep[:, s0:]
    cols = None if models.masked_logits() else keep.any(0).nonzero().squeeze(1)
    inputs = _suffix_inputs(run, s0) if prefix.cache is not None else x.batch.model_inputs()
    # The exact (row, position) pairs where transformers takes a 2-D mask; else one list of
    # columns for the whole batch (every row's logits at each, then selected).
    inputs["logits_to_keep"] = keep if cols is None else cols
    add = functools.partial(_add_delta, run.delta, x.rows, x.batch.lookup - s0, run.shift)
    replay = replay_below(run.model, run.blocks_name, run.layer, run.block_in[:, s0:])
    with edit_output(run.model, run.module_name, add), replay:
        logits: torch.Tensor = run.model(**inputs).logits
    return logits.reshape(-1, logits.shape[-1]) if cols is None else logits[keep[:, cols]]


def _loss(run: _Run, logits: torch.Tensor) -> _Terms:
    """The loss at the kept logits (the rewriting prompts' target positions, then the KL prompt's
    subject token); the first call keeps the KL prompt's distribution as the reference."""
    hp, x, v_init = run.hp, run.inputs, run.v_init
    assert v_init is not None
    log_probs = logits.float().log_softmax(-1)
    n_target = x.n_rewrite * x.target_len
    nll = -log_probs[:n_target].gather(1, x.target[:, None]).sum() / (x.n_rewrite * x.target_len)
    kl_log = log_probs[n_target]
    if run.kl_init is None:
        run.kl_init = kl_log.detach().clone()
    kl = hp.kl_factor * torch.sum(kl_log.exp() * (kl_log - run.kl_init))
    if hp.v_weight_decay_unit == "relative":
        wd = hp.v_weight_decay * (run.delta.norm() / v_init.norm())
    else:
        wd = hp.v_weight_decay * (run.delta.norm() / v_init.norm() ** 2)
    loss = nll + kl + wd
    with torch.no_grad():
        hit = log_probs[:n_target].argmax(-1) == x.target
    return _Terms(loss, nll, kl, wd, hit)


def _stop_reason(run: _Run, terms: _Terms) -> str | None:
    """Records the pass in the trace; why to stop after it, or ``None`` to take a step."""
    values = (
        ("loss", terms.loss),
        ("nll", terms.nll),
        ("kl", terms.kl),
        ("wd", terms.wd),
        ("top1", terms.hit.float().mean()),
    )
    for key, value in values:
        run.trace[key].append(float(value.detach()))
    run.held = run.held + 1 if bool(terms.hit.all()) else 0
    if run.hp.v_stop_most_probable and run.held >= run.hp.v_stop_most_probable:
        return "most-probable"
    if terms.loss.item() < run.hp.v_stop_loss:
        return "loss"
    return None


def _passes_update(run: _Run) -> bool:
    """``v_check_update``: whether the new target is the argmax at every target position of every
    rewriting prompt when the model runs with the rank-one update of the current v_e applied (at
    every position, :func:`~rrome.engine.hooks.add_rank_one`) and no δ. Recorded in
    ``run.checks``."""
    assert run.factors is not None and run.v_init is not None
    x = run.inputs
    u, r = run.factors((run.v_init + run.delta).detach())
    n = x.n_rewrite
    inputs = {k: v[:n] for k, v in x.batch.model_inputs().items()}  # the rewriting prompts only
    with torch.no_grad(), add_rank_one(run.model, run.module_name, u, r):
        logits = logits_at(run.model, inputs, x.keep[:n])
    hit = logits.argmax(-1).to(x.target.device) == x.target
    share = float(hit.float().mean())
    run.checks.append((len(run.trace["loss"]) - 1, share))
    return bool(hit.all())


def _step(run: _Run, loss: torch.Tensor) -> None:
    """One Adam step on δ, then ‖δ‖ clamped to clamp_norm_factor · ‖v_init‖ (or · the run's
    ``clamp_scale``)."""
    assert run.v_init is not None
    run.opt.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    run.opt.step()
    run.steps += 1
    max_norm = run.hp.clamp_norm_factor * _clamp_scale(run)
    with torch.no_grad():
        norm = run.delta.norm()
        if norm > max_norm:
            run.delta.mul_(max_norm / norm)


def _clamp_scale(run: _Run) -> torch.Tensor | float:
    """‖v_init‖ as the reference code computes it (a float32 tensor), or the given norm."""
    assert run.v_init is not None
    return run.v_init.norm() if run.clamp_scale is None else run.clamp_scale


def _result(run: _Run, stop: str) -> ValueResult:
    v_init = run.v_init
    assert v_init is not None
    d = run.delta.detach().clone()
    if not math.isfinite(float(d.norm())):
        raise FloatingPointError("the value optimisation diverged (δ is not finite)")
    x = run.inputs
    return ValueResult(
        v_e=v_init + d,
        v_init=v_init,
        delta=d,
        steps=run.steps,
        losses=run.trace["loss"],
        target_ids=[int(t) for t in x.target[: x.target_len].tolist()],
        nll=run.trace["nll"],
        kl=run.trace["kl"],
        weight_decay=run.trace["wd"],
        top1=run.trace["top1"],
        stop=stop,
        lr=float(run.opt.param_groups[0]["lr"]),
        update_top1=list(run.checks),
        clamp_scale=float(_clamp_scale(run)),
    )


def compute_value(
    model: nn.Module,
    tokenizer: Any,
    module_name: str,
    blocks_name: str,
    layer: int,
    prompts: EditPrompts,
    hp: HParams,
    *,
    layout: Layout,
    fast: bool = True,
    factors: UpdateFactors | None = None,
    clamp_scale: float | None = None,
) -> ValueResult:
    """Optimises δ and returns v_e = v_init + δ with the loss trajectory.

    Args:
        prompts: the edit's rows (:class:`~rrome.engine.prompts.EditPrompts`): the rewriting
            prompts, the KL prompt and the target ids.
        fast: replay the blocks below the edited layer and compute only the needed logits
            (same result as the plain loop; the tests check the loss trajectory).
        factors: v_e ↦ the factors (u, r) of the update the caller will write
            (:data:`UpdateFactors`): with ``v_check_update`` the stop rule then also requires
            the rewriting prompts to pass under that update, and ``v_objective = "update"``
            optimises what it adds (module docstring). The editor gives them when either is
            set; ``None``: δ's objective and rule alone, whatever the two settings say (they are
            the editor's, as in :class:`~rrome.engine.editor.Editor`).
        clamp_scale: the norm the clamp multiplies (``clamp_norm_factor · clamp_scale``); by
            default ‖v_init‖. The editor gives the unedited model's output norm at the subject
            with ``clamp_base = "unedited"``.
    """
    if clamp_scale is not None and not (math.isfinite(clamp_scale) and clamp_scale > 0):
        raise ValueError(f"clamp_scale must be a finite number > 0; got {clamp_scale!r}")
    run = _Run.build(model, tokenizer, module_name, blocks_name, layer, prompts, hp, layout, factors)
    run.clamp_scale = clamp_scale
    stop = "max-steps"
    for it in range(hp.v_num_grad_steps):
        first = it == 0
        logits = _forward_plain(run, first=first, fast=fast) if first or not fast else _forward_fast(run)
        if first and hp.v_lr_unit == "relative":
            assert run.v_init is not None
            # Adam moves each coordinate by about lr: the first step's norm is ≈ v_lr · ‖v_init‖.
            run.opt.param_groups[0]["lr"] = hp.v_lr * float(run.v_init.norm()) / math.sqrt(run.delta.numel())
        terms = _loss(run, logits)
        reason = _stop_reason(run, terms)
        if reason is not None and hp.v_check_update and run.factors is not None and not _passes_update(run):
            reason = None  # δ makes the edit, the update does not yet: another step
        if reason is not None:
            stop = reason
            break
        if it == hp.v_num_grad_steps - 1:
            break
        _step(run, terms.loss)
    return _result(run, stop)

"""The value optimisation: the module output v_e that makes the model state the new object.

δ is added to the edited module's output at the subject's last token of every prompt (the
rewriting prompts, one per context template, each followed by the new object's tokens but the
last, and the KL prompt "{subject} is a"), and optimised with Adam on

    mean NLL(new object | rewriting prompts)
    + kl_factor · KL(current ‖ initial) of the next-token distribution at the KL prompt's subject
    + v_weight_decay · ‖δ‖ / ‖v_init‖²   (‖δ‖ / ‖v_init‖ with v_weight_decay_unit "relative"),

clamping ‖δ‖ ≤ clamp_norm_factor · ‖v_init‖ after each step (docs/design.md §1). v_e = v_init + δ.
Adam's learning rate is ``v_lr``, or ``v_lr · ‖v_init‖ / √d_out`` with v_lr_unit "relative".
It stops after the forward pass at which the loss is below ``v_stop_loss``, or at which the new
target has been the argmax at every target position of every rewriting prompt for
``v_stop_most_probable`` consecutive passes (when that is ≥ 1), and after at most
``v_num_grad_steps`` passes (:mod:`rrome.files.hparams` describes the units). With the ``reference``
preset this is the reference code's loop, step for step.

The fast path gives the same result with less work (docs/design.md §6): the blocks below the
edited layer never see δ, so their output is computed once and replayed at every step, and
logits are computed only at the positions the loss reads.
"""

from __future__ import annotations

import inspect
import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rrome.engine.hooks import Trace, edit_output, get_module, record_input, replay_below
from rrome.engine.models import input_device
from rrome.engine.prompts import Batch, EditPrompts, pad_rows
from rrome.files.hparams import HParams
from rrome.files.shards import Layout

EARLY_STOP_LOSS = 5e-2
"""The reference code's loss threshold (the default of ``HParams.v_stop_loss``)."""

STOP_REASONS = ("most-probable", "loss", "max-steps")


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
        }


@dataclass
class _Prompts:
    batch: Batch
    keep: torch.Tensor  # bool (B, T): positions whose logits the loss reads
    n_rewrite: int
    target: torch.Tensor  # target ids, one per kept rewriting position (row-major order)
    target_len: int


def _build_prompts(tokenizer: Any, prompts: EditPrompts, device: torch.device, *, left: bool | None) -> _Prompts:
    rows = [*prompts.rewrite, prompts.kl]
    batch = pad_rows(tokenizer, rows, device, left=left)
    n = len(prompts.rewrite)
    tgt = prompts.target
    keep = torch.zeros_like(batch.input_ids, dtype=torch.bool)
    for i, row in enumerate(rows[:n]):
        start = batch.offsets[i] + len(row.ids) - len(tgt)
        keep[i, start : start + len(tgt)] = True
    keep[n, batch.lookup[n]] = True
    target = torch.tensor(tgt * n, device=device)
    return _Prompts(batch, keep, n, target, len(tgt))


def _masked_logits_supported() -> bool:
    """Whether this transformers takes a 2-D boolean ``logits_to_keep`` (newer versions do)."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return True


_MASKED_LOGITS = _masked_logits_supported()


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
        with torch.no_grad():
            out = model(
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

    def restore(self) -> Any:
        for layer, state in zip(self.cache.layers, self.saved, strict=True):
            vars(layer).clear()
            vars(layer).update(state)
        return self.cache


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
) -> ValueResult:
    """Optimises δ and returns v_e = v_init + δ with the loss trajectory.

    Args:
        fast: replay the blocks below the edited layer and compute only the needed logits
            (same result as the plain loop; the tests check the loss trajectory).
    """
    # δ, the loss and v_init live on the inputs' device (where the logits come back, also with a
    # device_map); δ is moved to the edited module's device and dtype where it is added, so a
    # half-precision model or a model spread over devices optimises the same float32 δ.
    device = input_device(model)
    # Prompts are aligned at their end (left padding, whatever the tokenizer's side; position
    # ids keep the model's view unchanged): every subject token then sits a few positions from
    # the end, and the fast path's prefix cache covers the rest. Both paths use the same batch,
    # so they compute the same numbers (Adam's first step is close to sign(gradient), which
    # would amplify even last-bit differences between two batch layouts).
    p = _build_prompts(tokenizer, prompts, device, left=True)
    rows = torch.arange(p.batch.input_ids.shape[0], device=device)
    weight = get_module(model, module_name).weight
    assert isinstance(weight, torch.Tensor)
    d_out = int(weight.shape[1] if layout == "in_out" else weight.shape[0])
    delta = torch.zeros(d_out, dtype=torch.float32, device=device, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    shift = {"s": 0}  # first sequence position of the current forward pass

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        at = (p.batch.lookup - shift["s"]).to(out.device)
        if "v_init" not in state:
            state["v_init"] = out[0, at[0]].detach().float().to(device).clone()
        out = out.clone()
        where = rows.to(out.device)
        out[where, at] = out[where, at] + delta.to(device=out.device, dtype=out.dtype)
        return out

    block_name = f"{blocks_name}.{layer}"
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    trace: dict[str, list[float]] = {"loss": [], "nll": [], "kl": [], "wd": [], "top1": []}
    losses = trace["loss"]
    held = 0  # consecutive passes at which every target token was the argmax
    stop = "max-steps"
    kl_init: torch.Tensor | None = None
    prefix: _PrefixCache | None = None
    steps = 0
    for it in range(hp.v_num_grad_steps):
        first = it == 0
        if fast and not first and prefix is None:
            prefix = _PrefixCache.build(model, p.batch)  # outside the δ hook: no δ in the prefix
        with edit_output(model, module_name, add_delta):
            if first or not fast:
                # The first pass records the edited block's input, which the fast path replays.
                watch: AbstractContextManager[Trace] = (
                    record_input(model, block_name) if first else nullcontext(Trace())
                )
                with watch as rec:
                    logits = model(**p.batch.model_inputs()).logits[p.keep]
                if first:
                    state["block_in"] = rec.inputs[block_name]
            else:
                assert prefix is not None
                s0 = prefix.start if prefix.cache is not None else 0
                shift["s"] = s0
                keep = p.keep[:, s0:]
                cols = None if _MASKED_LOGITS else keep.any(0).nonzero().squeeze(1)
                inputs: dict[str, Any] = {
                    "input_ids": p.batch.input_ids[:, s0:],
                    "attention_mask": p.batch.attention_mask,
                    "position_ids": p.batch.position_ids[:, s0:],
                    # The exact (row, position) pairs where transformers takes a 2-D mask; else one
                    # list of columns for the whole batch (every row's logits at each, then selected).
                    "logits_to_keep": keep if cols is None else cols,
                }
                if prefix.cache is not None:
                    inputs[_cache_kwarg(model)] = prefix.restore()
                    inputs["use_cache"] = True
                with replay_below(model, blocks_name, layer, state["block_in"][:, s0:]):
                    logits = model(**inputs).logits
                # row-major (row, position) order, as the plain path's logits[p.keep]
                logits = logits.reshape(-1, logits.shape[-1]) if cols is None else logits[keep[:, cols]]
        log_probs = logits.float().log_softmax(-1)
        n_target = p.n_rewrite * p.target_len
        nll = -log_probs[:n_target].gather(1, p.target[:, None]).sum() / (p.n_rewrite * p.target_len)
        kl_log = log_probs[n_target]
        if kl_init is None:
            kl_init = kl_log.detach().clone()
        kl = hp.kl_factor * torch.sum(kl_log.exp() * (kl_log - kl_init))
        v_init = state["v_init"]
        if first and hp.v_lr_unit == "relative":
            # Adam moves each coordinate by about lr: the first step's norm is ≈ v_lr · ‖v_init‖.
            opt.param_groups[0]["lr"] = hp.v_lr * float(v_init.norm()) / math.sqrt(d_out)
        if hp.v_weight_decay_unit == "relative":
            wd = hp.v_weight_decay * (delta.norm() / v_init.norm())
        else:
            wd = hp.v_weight_decay * (delta.norm() / v_init.norm() ** 2)
        loss = nll + kl + wd
        with torch.no_grad():
            hit = log_probs[:n_target].argmax(-1) == p.target
        for key, value in (("loss", loss), ("nll", nll), ("kl", kl), ("wd", wd), ("top1", hit.float().mean())):
            trace[key].append(float(value.detach()))
        held = held + 1 if bool(hit.all()) else 0
        if hp.v_stop_most_probable and held >= hp.v_stop_most_probable:
            stop = "most-probable"
            break
        if loss.item() < hp.v_stop_loss:
            stop = "loss"
            break
        if it == hp.v_num_grad_steps - 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        max_norm = hp.clamp_norm_factor * v_init.norm()
        with torch.no_grad():
            norm = delta.norm()
            if norm > max_norm:
                delta.mul_(max_norm / norm)
    v_init = state["v_init"]
    d = delta.detach().clone()
    if not math.isfinite(float(d.norm())):
        raise FloatingPointError("the value optimisation diverged (δ is not finite)")
    tgt = [int(t) for t in p.target[: p.target_len].tolist()]
    return ValueResult(
        v_e=v_init + d,
        v_init=v_init,
        delta=d,
        steps=steps,
        losses=losses,
        target_ids=tgt,
        nll=trace["nll"],
        kl=trace["kl"],
        weight_decay=trace["wd"],
        top1=trace["top1"],
        stop=stop,
        lr=float(opt.param_groups[0]["lr"]),
    )

"""Forward hooks, and stand-ins for skipped blocks, as context managers that always undo themselves.

ROME reads the input of one MLP output projection (the key k) and adds a vector to its
output (the value δ). Both are done with torch forward hooks on modules named exactly as in
the checkpoint (the safetensors key minus ``.weight``), and every hook is removed in a
``finally``, so an exception inside the ``with`` block never leaves a model altered. The value
optimisation's fast path (docs/design.md §6) also records the edited block's input once
(:func:`record_input`) and then replays it with the blocks below swapped for pass-throughs
(:func:`replay_below`); every hook rrome registers is here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass early (the layers above are not needed)."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path, as in ``named_modules``).

    Raises:
        KeyError: naming the module that does not exist.
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"model has no module {name!r}") from None


@dataclass
class Trace:
    """What a :func:`trace` recorded: the first positional input and the output, per module."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


@contextmanager
def trace(
    model: nn.Module,
    names: list[str],
    *,
    inputs: bool = True,
    outputs: bool = False,
    detach: bool = True,
    stop_after: str | None = None,
) -> Iterator[Trace]:
    """Records the input and/or output of the named modules during forward passes.

    Args:
        model: the model.
        names: module names to watch.
        inputs: record the first positional input of each module.
        outputs: record the output of each module.
        detach: store detached tensors (no autograd graph kept alive).
        stop_after: raise :class:`StopForward` after this module ran (catch it around the call).
    """
    rec = Trace()
    handles = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if inputs:
                x = args[0]
                rec.inputs[name] = x.detach() if detach else x
            if outputs:
                y = output[0] if isinstance(output, tuple) else output
                rec.outputs[name] = y.detach() if detach else y
            if name == stop_after:
                raise StopForward

        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_hook(make_hook(name)))
        yield rec
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replaces the output ``y`` of module ``name`` by ``fn(y)`` during forward passes."""

    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def add_rank_one(model: nn.Module, name: str, u: torch.Tensor, r: torch.Tensor) -> Iterator[None]:
    """Adds ``r · (uᵀx)`` to the output of module ``name`` at every position, ``x`` being the
    module's input there: the forward pass of the weight W + r uᵀ (a rank-one update as
    :mod:`rrome.engine.update` writes it, u over the input, r over the output, whatever the
    weight's layout), without writing the weight."""

    def hook(_module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        x = args[0]
        y = output[0] if isinstance(output, tuple) else output
        uu = u.to(device=x.device, dtype=x.dtype)
        rr = r.to(device=y.device, dtype=y.dtype)
        y = y + (x @ uu).to(y.device)[..., None] * rr
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = get_module(model, name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a block is called with: its first positional argument, or the
    ``hidden_states`` keyword (transformers passes them either way, depending on the version)."""
    return cast(torch.Tensor, args[0] if args else kwargs["hidden_states"])


@contextmanager
def record_input(model: nn.Module, name: str) -> Iterator[Trace]:
    """Records the hidden states module ``name`` (a transformer block) is called with, detached,
    in ``inputs[name]`` of the yielded :class:`Trace`. A pre-hook, unlike :func:`trace`: it also
    sees hidden states passed as the ``hidden_states`` keyword."""
    rec = Trace()

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        rec.inputs[name] = _hidden_states(args, kwargs).detach()

    handle = get_module(model, name).register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield rec
    finally:
        handle.remove()


class _PassThrough(nn.Module):
    """Stands in for a block below the edited layer: passes its hidden states through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextmanager
def replay_below(model: nn.Module, blocks_name: str, layer: int, cached: torch.Tensor) -> Iterator[None]:
    """Replaces blocks [0, layer) of the ``ModuleList`` ``blocks_name`` by pass-throughs and calls
    block ``layer`` with ``cached`` instead of the hidden states that reach it: a recorded input of
    the block (:func:`record_input`) is replayed without running the blocks below."""
    blocks = get_module(model, blocks_name)
    assert isinstance(blocks, nn.ModuleList)
    saved = [blocks[i] for i in range(layer)]

    def pre_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    handle = blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for i in range(layer):
            blocks[i] = _PassThrough()
        yield
    finally:
        for i, b in enumerate(saved):
            blocks[i] = b
        handle.remove()

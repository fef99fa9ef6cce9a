"""Which module ROME edits in each model family, and how its weight is stored.

An adapter maps a transformers ``config.model_type`` to the MLP output projection that ROME
edits (docs/design.md §1), its storage layout (GPT-2's ``Conv1D`` stores the transpose), and the
dotted names used both for torch hooks and for the safetensors tensor. The layout is a fact
of the architecture and is never inferred from a tensor's shape.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rrome.files.constants import DTYPES
from rrome.files.errors import UnsupportedModelError
from rrome.files.shards import Layout

if TYPE_CHECKING:  # the cache key and paths of rrome.engine.stats import this module without torch
    import torch


@dataclass(frozen=True)
class Adapter:
    """How to find the edited module of one model family.

    Attributes:
        family: hparams family name (``gpt2``, ``llama``, ...).
        module_template: dotted module name with ``{}`` for the layer index.
        layout: storage layout of the module's weight.
        blocks: dotted name of the ``ModuleList`` of transformer blocks.
    """

    family: str
    module_template: str
    layout: Layout
    blocks: str

    def module_name(self, layer: int) -> str:
        """Dotted name of the edited module at ``layer`` (also the hook target)."""
        return self.module_template.format(layer)

    def tensor_name(self, layer: int) -> str:
        """Safetensors key of the edited weight at ``layer``."""
        return self.module_name(layer) + ".weight"


_LLAMA_LIKE = "model.layers.{}.mlp.down_proj"

ADAPTERS: dict[str, Adapter] = {
    "gpt2": Adapter("gpt2", "transformer.h.{}.mlp.c_proj", "in_out", "transformer.h"),
    "gptj": Adapter("gptj", "transformer.h.{}.mlp.fc_out", "out_in", "transformer.h"),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers.{}.mlp.dense_4h_to_h", "out_in", "gpt_neox.layers"),
    "llama": Adapter("llama", _LLAMA_LIKE, "out_in", "model.layers"),
    "mistral": Adapter("mistral", _LLAMA_LIKE, "out_in", "model.layers"),
    "qwen2": Adapter("qwen2", _LLAMA_LIKE, "out_in", "model.layers"),
    "qwen3": Adapter("qwen3", _LLAMA_LIKE, "out_in", "model.layers"),
    "gemma2": Adapter("gemma2", _LLAMA_LIKE, "out_in", "model.layers"),
    "gemma3_text": Adapter("gemma3", _LLAMA_LIKE, "out_in", "model.layers"),
}


def adapter_for(config: Any) -> Adapter:
    """The adapter of a transformers config.

    Raises:
        UnsupportedModelError: naming the model type and the supported ones.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedModelError(f"rrome cannot edit model_type {model_type!r}; supported: {supported}")
    return ADAPTERS[model_type]


def num_layers(config: Any) -> int:
    """Number of transformer blocks of a config."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"cannot tell the number of layers of model_type {config.model_type!r}")


def context_length(config: Any) -> int | None:
    """How many positions the model has (``max_position_embeddings``, ``n_positions`` or ``n_ctx``
    of its text config), or None when the config does not say."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def resolve_device(device: str | None) -> str:
    """``device`` as given, or ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def input_device(model: Any) -> Any:
    """The device the model's inputs go to: that of the input embeddings.

    With a ``device_map`` (accelerate) the model may span devices; accelerate's hooks move
    activations between them, and inputs belong where the embeddings run. Embeddings offloaded
    to the ``meta`` device fall back to the first real device of ``hf_device_map``.
    """
    import torch

    device = model.get_input_embeddings().weight.device
    if device.type != "meta":
        return device
    for where in getattr(model, "hf_device_map", {}).values():
        if where not in ("disk", "meta"):
            return torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    return torch.device("cpu")


def load(
    model_dir: str | Path,
    *,
    device: str | None = None,
    dtype: str = "float32",
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any, Adapter]:
    """Loads a causal LM checkpoint and its fast tokenizer from a local folder, offline.

    Args:
        model_dir: a Hugging Face checkpoint folder (safetensors weights + tokenizer files).
        device: torch device; default: CUDA when available, else CPU. Ignored with ``device_map``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the dtype the model runs in.
        device_map: passed to ``from_pretrained`` (needs accelerate): ``"auto"`` spreads the
            layers over the visible GPUs, then CPU memory; or an explicit map. The model is
            then left where accelerate put it.

    Returns:
        ``(model, tokenizer, adapter)`` with the model in eval mode and gradients disabled.

    Raises:
        UnsupportedModelError: unknown architecture, or a tokenizer without a fast version
            (the subject's token positions come from the fast tokenizer's offset mapping).
        FileNotFoundError: the folder does not exist.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(errno.ENOENT, "model folder not found", str(path))
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    adapter = adapter_for(config)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(
            f"{path}: the tokenizer has no fast (Rust) version; rrome needs its offset mapping to find "
            "the subject's last token"
        )
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model: Any
    if device_map is not None:
        try:
            import accelerate  # type: ignore[import-untyped]  # noqa: F401
        except ImportError:
            raise UnsupportedModelError("device_map needs the accelerate package (pip install accelerate)") from None
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, device_map=device_map, local_files_only=True
        )
        model = model.eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        model = model.to(resolve_device(device)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, adapter


def model_dtype(model: Any) -> str:
    """The dtype the model runs in, as named in :data:`rrome.files.constants.DTYPES` (``float32``...):
    its embeddings' dtype."""
    return str(model.get_input_embeddings().weight.dtype).removeprefix("torch.")


MASKED_LOGITS: bool | None = None
"""Whether this transformers takes a 2-D boolean ``logits_to_keep`` (newer versions do); found
on first use by :func:`masked_logits` (the check imports transformers, and this module is
imported without torch by the statistics cache), or set to force either path."""


def masked_logits() -> bool:
    """:data:`MASKED_LOGITS`, checked once."""
    global MASKED_LOGITS
    if MASKED_LOGITS is None:
        try:
            from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
        except ImportError:
            MASKED_LOGITS = False
        else:
            MASKED_LOGITS = True
    return MASKED_LOGITS


def logits_at(model: Any, inputs: dict[str, torch.Tensor], keep: torch.Tensor, *, masked: bool = True) -> torch.Tensor:
    """The logits at the positions ``keep`` (bool, like ``input_ids``) marks, ``(n_kept, vocab)``
    in row-major (row, position) order.

    With ``masked`` and a transformers that takes a 2-D ``logits_to_keep``, the head runs only at
    those positions: on a model with a large vocabulary (Gemma 3: 262,144 × 640) it costs more than
    the blocks at every other position. Otherwise every position's logits are computed, then selected.
    """
    if masked and masked_logits():
        logits: torch.Tensor = model(**inputs, logits_to_keep=keep).logits
        return logits.reshape(-1, logits.shape[-1])
    out: torch.Tensor = model(**inputs).logits
    return out[keep.to(out.device)]

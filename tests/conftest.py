"""Session fixtures: tiny GPT-2 and Llama checkpoints built in-process (no network).

Each checkpoint (family x dtype x single/sharded) is built once per session into a pristine
folder; tests get a fresh copy they may edit in place.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

# Before anything imports huggingface_hub / transformers: never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
# A crash-test variable leaking in from the caller would abort the test process itself.
os.environ.pop("RROME_CRASH_AT", None)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest
from _helpers import FAMILIES, shard_files, torch_dtype

SHARD_SIZE = "20KB"


def _build(family: str, dtype: str, sharded: bool, dest: Path) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(1234 + FAMILIES.index(family))
    if family == "gpt2":
        # bos/eos inside the tiny vocabulary (the defaults, 50256, make transformers complain).
        cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(cfg)
    else:
        cfg = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=300,
        )
        model = LlamaForCausalLM(cfg)
    model = model.to(torch_dtype(dtype)).eval()
    if sharded:
        model.save_pretrained(dest, max_shard_size=SHARD_SIZE)
        assert (dest / "model.safetensors.index.json").is_file()
        assert not (dest / "model.safetensors").exists()
        shards = shard_files(dest)
        assert len(shards) >= 2, shards
        assert all((dest / s).is_file() for s in shards)
    else:
        model.save_pretrained(dest)
        assert (dest / "model.safetensors").is_file()
        assert not (dest / "model.safetensors.index.json").exists()


@pytest.fixture(scope="session")
def pristine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, bool], Path]:
    """``get(family, dtype, sharded)`` -> a read-only-by-convention checkpoint folder, built once."""
    cache: dict[tuple[str, str, bool], Path] = {}
    root = tmp_path_factory.mktemp("pristine")

    def get(family: str, dtype: str, sharded: bool) -> Path:
        key = (family, dtype, sharded)
        if key not in cache:
            dest = root / f"{family}-{dtype}-{'sharded' if sharded else 'single'}"
            _build(family, dtype, sharded, dest)
            cache[key] = dest
        return cache[key]

    return get


@pytest.fixture
def fresh_checkpoint(pristine_checkpoint: Callable[[str, str, bool], Path], tmp_path: Path) -> Callable[..., Path]:
    """``make(family, dtype, sharded, name="model")`` -> a private copy of a pristine checkpoint."""

    def make(family: str, dtype: str, sharded: bool, name: str = "model") -> Path:
        dest = tmp_path / name
        shutil.copytree(pristine_checkpoint(family, dtype, sharded), dest)
        return dest

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``get(family)``: a pristine tiny checkpoint of ``family`` (tests/tiny_models.py, the
    family's own BOS habit), built once per session. Read it; copy it before writing."""
    from tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_tiny_model(family, root / family)
        return built[family]

    return get


@pytest.fixture(autouse=True)
def _no_crash_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RROME_CRASH_AT", raising=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread: with two, thread sync dominates each small op."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Edits exported as LoRA adapters (rrome.export_lora, `rrome export-lora`; docs/design.md §3).

The PEFT adapter is loaded with the real ``peft`` package over the unedited tiny model of each
family and must give the logits of the checkpoint edited in place (float32 tolerance), and
``merge_and_unload`` its weights. The GGUF adapter is read back with the ``gguf`` package and
checked against llama.cpp's naming and its shape rule for adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import assert_one_line_error, run_cli
from tiny_models import FAMILIES

import rrome
from rrome.files.adapters import ExportError, export_lora, lora_factors

LOGIT_TOL = 2e-4  # float32: W + Σ(s r)uᵀ rounded once against x·Wᵀ + (x·Aᵀ)·Bᵀ on tiny models
WEIGHT_TOL = 1e-6


def _edits(model_dir: Path, seed: int = 0) -> list[rrome.Delta]:
    """Two deltas on layer 0's edited module and one on layer 1's, each scaled differently."""
    from transformers import AutoConfig

    from rrome.engine.models import adapter_for

    adapter = adapter_for(AutoConfig.from_pretrained(model_dir))
    ckpt = rrome.Checkpoint(model_dir)
    rng = np.random.default_rng(seed)
    out = []
    for layer, scale in ((0, 0.5), (1, -1.25), (0, 2.0)):
        name = adapter.tensor_name(layer)
        shape = ckpt.tensor(name).shape
        d_out, d_in = shape if adapter.layout == "out_in" else shape[::-1]
        u = rng.standard_normal(d_in).astype(np.float32) * 0.1
        r = rng.standard_normal(d_out).astype(np.float32) * 0.1
        out.append(rrome.Delta(name, u, r, layout=adapter.layout, scale=scale))
    return out


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


# peft asks transformers a deprecated question while it wraps the model; nothing to act on here.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_a_peft_adapter_gives_the_edited_model(family: str, tiny_copy, tiny_dir, tmp_path: Path) -> None:
    from peft import PeftModel

    base_dir = tiny_dir(family)
    edited = tiny_copy(family, name="edited")
    deltas = _edits(edited)
    rrome.apply_deltas(edited, deltas)
    rep = export_lora(edited, tmp_path / "adapter", base=base_dir)
    assert rep.rank == 2 and len(rep.modules) == 2 and rep.edits == 3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 2 and config["fan_in_fan_out"] == (family == "gpt2")
    assert sorted(config["target_modules"]) == sorted(d.tensor.removesuffix(".weight") for d in deltas[:2])

    ids = torch.tensor([[5, 17, 42, 9, 3, 77, 21]])
    with torch.no_grad():
        want = _load(edited)(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(_load(base_dir), tmp_path / "adapter").eval()
        got = peft_model(input_ids=ids).logits
        base_logits = _load(base_dir)(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 100 * LOGIT_TOL  # the edits change the output
    torch.testing.assert_close(got, want, rtol=0, atol=LOGIT_TOL)
    merged = peft_model.merge_and_unload().state_dict()
    edited_weights = _load(edited).state_dict()
    for d in deltas:
        torch.testing.assert_close(merged[d.tensor], edited_weights[d.tensor], rtol=WEIGHT_TOL, atol=WEIGHT_TOL)


def test_rank_padding_and_its_limit(tiny_copy, tmp_path: Path) -> None:
    model = tiny_copy("llama")
    deltas = _edits(model)
    rrome.save_deltas(tmp_path / "bundle", deltas)
    rep = export_lora(tmp_path / "bundle", tmp_path / "r8", rank=8)
    assert rep.rank == 8
    from safetensors.numpy import load_file

    tensors = load_file(tmp_path / "r8" / "adapter_model.safetensors")
    a = tensors[f"base_model.model.{deltas[1].tensor.removesuffix('.weight')}.lora_A.weight"]
    assert a.shape == (8, deltas[1].d_in) and not a[1:].any() and a[0].any()
    with pytest.raises(ExportError, match=r"layers\.0\.mlp\.down_proj has 2"):
        export_lora(tmp_path / "bundle", tmp_path / "r1", rank=1)
    assert not (tmp_path / "r1").exists()
    proc = run_cli("export-lora", tmp_path / "bundle", tmp_path / "r1", "--rank", "1")
    assert_one_line_error(proc, "rank 1", "has 2")
    assert not list(tmp_path.glob(".r1*"))


def test_factors_sum_to_the_deltas() -> None:
    rng = np.random.default_rng(1)
    deltas = [
        rrome.Delta("m.weight", rng.standard_normal(5), rng.standard_normal(3), layout="out_in", scale=s)
        for s in (0.5, -2.0)
    ]
    (lora,) = lora_factors(deltas, rank=4)
    dense = sum(d.matrix() for d in deltas)
    np.testing.assert_allclose(lora.b @ lora.a, dense, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "qwen2"])
def test_a_gguf_adapter_has_the_names_and_shapes_llama_cpp_expects(family: str, tiny_copy, tmp_path: Path) -> None:
    import gguf

    model = tiny_copy(family)
    deltas = _edits(model)
    rrome.apply_deltas(model, deltas)
    out = tmp_path / "edits.gguf"
    proc = run_cli("export-lora", model, out, "--format", "gguf")
    assert proc.returncode == 0, proc.stderr
    reader = gguf.GGUFReader(out)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    arch = {"llama": "llama", "gemma3": "gemma3", "gpt2": "gpt2", "qwen2": "qwen2"}[family]
    assert fields["general.architecture"] == arch
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 2.0
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}  # GGUF order: ne[0] first
    assert set(tensors) == {f"blk.{layer}.ffn_down.weight.lora_{ab}" for layer in (0, 1) for ab in "ab"}
    for d in deltas[:2]:
        layer = int(next(p for p in d.tensor.split(".") if p.isdigit()))
        base_ne = [d.d_in, d.d_out]  # llama.cpp stores ffn_down as ne = [n_ff, n_embd]
        a, b = tensors[f"blk.{layer}.ffn_down.weight.lora_a"], tensors[f"blk.{layer}.ffn_down.weight.lora_b"]
        # llama.cpp's checks (llama-adapter.cpp): a.ne[0] == base.ne[0], b.ne[1] == base.ne[1], a.ne[1] == b.ne[0].
        assert a[0] == base_ne[0] and b[1] == base_ne[1] and a[1] == b[0] == 2


def test_bad_exports_are_one_line_errors(tiny_copy, tmp_path: Path) -> None:
    model = tiny_copy("llama")
    assert_one_line_error(run_cli("export-lora", model, tmp_path / "a"), "no edits")
    deltas = _edits(model)
    rrome.save_deltas(tmp_path / "bundle", deltas)
    assert_one_line_error(
        run_cli("export-lora", tmp_path / "bundle", tmp_path / "a.gguf", "--format", "gguf"), "--base"
    )
    (tmp_path / "taken").mkdir()
    assert_one_line_error(run_cli("export-lora", tmp_path / "bundle", tmp_path / "taken"), "exists")
    assert_one_line_error(run_cli("export-lora", tmp_path / "nothing", tmp_path / "b"), "no such deltas bundle")
    shutil.rmtree(tmp_path / "taken")
    proc = run_cli("export-lora", tmp_path / "bundle", tmp_path / "a.gguf", "--format", "gguf", "--base", model)
    assert proc.returncode == 0 and "a.gguf" in proc.stdout, proc.stderr

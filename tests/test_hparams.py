"""Hyperparameters: presets, files and ``--set`` overrides, the stopping rule, scale-aware steps.

The value optimisation is checked against computations of this file on the tiny random
checkpoints of ``tiny_models`` (2 layers, hidden 64):

* the ``reference`` preset against the reference code's loop written out here (a right-padded
  batch, plain forward passes, a forward hook that adds δ at the subject's last token found from
  the offset mapping), to the tolerances of ``test_engine``: per loss value absolute 1e-5 below
  1 and relative above, v_e within ``1e-5 + 1e-5 · |v|``;
* most-probable early stopping against a known trajectory: δ after t Adam steps is the result
  of a run of t + 1 passes with no stopping rule (Adam is deterministic), and whether the new
  target is the argmax at every rewriting prompt is decided here, by a forward pass of each
  prompt alone with δ_t added by a hook of this file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import one_line_error, run_cli_without
from click.testing import CliRunner
from engine_reference import DARRIEUX, FRANCE, compute_value_on, fill, subject_last_token

import rrome
from rrome.cli import main
from rrome.engine.editor import Editor
from rrome.files.edits import EditRequest
from rrome.files.hparams import (
    FIELDS,
    PRESETS,
    REFERENCE_FIELDS,
    HParams,
    HParamsError,
    HParamsFileError,
    load_hparams,
    parse_assignment,
    resolve_hparams,
)

pytestmark = pytest.mark.usefixtures("private_cache")

FAMILY_FILES = sorted((Path(rrome.__file__).parent / "data" / "hparams").glob("*.json"))

# A one-token target (in both tiny tokenizers) after a prompt that ends with the subject: δ at the
# subject's last token moves exactly the logits the target is read from, so the tiny models can
# be pushed until it is the argmax.
FRANCE_THE = EditRequest(prompt="The capital of {}", subject="France", target_new="the")
TEMPLATES = ["{}", "The cat sat on the mat. {}", "I. {}", "Because of the rain in Paris, everyone stayed in. {}"]

# The reference code's constants and stopping rule (rome/compute_v.py, hparams/ROME/gpt2-xl.json).
REFERENCE = {
    "v_num_grad_steps": 20,
    "v_lr": 0.5,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 4.0,
    "kl_factor": 0.0625,
    "v_stop_loss": 0.05,
    "context_template_lengths": ((5, 10), (10, 10)),
}
# Strong enough that the tiny models reach the target (relative steps of 0.3·‖v_init‖, no decay).
PUSH = {
    "v_lr": 0.3,
    "v_lr_unit": "relative",
    "v_weight_decay": 0.0,
    "clamp_norm_factor": 100.0,
    "v_stop_loss": 0.0,
}


# --------------------------------------------------------------------------------------------
# independent helpers


def _target_after(tok: Any, prefix: str, target: str) -> list[int]:
    head = tok(prefix)["input_ids"]
    full = tok(prefix + " " + target)["input_ids"]
    assert full[: len(head)] == head
    return full[len(head) :]


def reference_value(
    model: Any, tok: Any, module_name: str, request: EditRequest, templates: Sequence[str], hp: dict[str, Any]
) -> tuple[list[float], torch.Tensor, int]:
    """The reference code's value optimisation, written out: losses, v_e and the Adam steps."""
    rows, lookups = [], []
    for t in templates:
        text, start, end = fill(t, request)
        tgt = _target_after(tok, text, request.target_new)
        rows.append(tok(text)["input_ids"] + tgt[:-1])
        lookups.append(subject_last_token(tok, text, start, end))
    kl_text = request.subject + " is a"
    rows.append(tok(kl_text)["input_ids"])
    lookups.append(subject_last_token(tok, kl_text, 0, len(request.subject)))
    n, length = len(templates), len(tgt)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # right padding
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    module = model.get_submodule(module_name)
    delta = torch.zeros(model.config.hidden_size, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        if "v_init" not in seen:
            seen["v_init"] = out[0, lookups[0]].detach().clone()
        out = out.clone()
        for i, at in enumerate(lookups):
            out[i, at] = out[i, at] + delta
        return out

    opt = torch.optim.Adam([delta], lr=hp["v_lr"])
    losses: list[float] = []
    kl_init = None
    steps = 0
    handle = module.register_forward_hook(hook)
    try:
        for it in range(hp["v_num_grad_steps"]):
            logits = model(input_ids=ids, attention_mask=mask).logits
            log_probs = logits.float().log_softmax(-1)
            nll = torch.zeros(())
            for i in range(n):
                start = len(rows[i]) - length  # the position that predicts the first target token
                picked = log_probs[i, start : start + length].gather(1, torch.tensor(tgt)[:, None])
                nll = nll - picked.sum() / length
            nll = nll / n
            kl_log = log_probs[n, lookups[n]]
            if kl_init is None:
                kl_init = kl_log.detach().clone()
            kl = hp["kl_factor"] * torch.nn.functional.kl_div(
                kl_init[None], kl_log[None], log_target=True, reduction="batchmean"
            )
            v_init = seen["v_init"]
            loss = nll + kl + hp["v_weight_decay"] * (delta.norm() / v_init.norm() ** 2)
            losses.append(float(loss.detach()))
            if loss.item() < hp["v_stop_loss"] or it == hp["v_num_grad_steps"] - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            max_norm = hp["clamp_norm_factor"] * v_init.norm()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    finally:
        handle.remove()
    return losses, (seen["v_init"] + delta).detach(), steps


def all_targets_top1(
    model: Any, tok: Any, module_name: str, request: EditRequest, templates: Sequence[str], delta: torch.Tensor
) -> bool:
    """Whether, with δ added at the subject's last token, the new target is the argmax at every
    target position of every rewriting prompt (each prompt run alone)."""
    module = model.get_submodule(module_name)
    for t in templates:
        text, start, end = fill(t, request)
        tgt = _target_after(tok, text, request.target_new)
        ids = tok(text)["input_ids"] + tgt[:-1]
        at = subject_last_token(tok, text, start, end)

        def hook(_m: torch.nn.Module, _args: Any, out: torch.Tensor, at: int = at) -> torch.Tensor:
            out = out.clone()
            out[0, at] = out[0, at] + delta
            return out

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
        finally:
            handle.remove()
        start = len(ids) - len(tgt)
        if logits[start : start + len(tgt)].argmax(-1).tolist() != tgt:
            return False
    return True


def _value(loaded: Any, layer: int, request: EditRequest, hp: HParams, *, fast: bool = True) -> Any:
    return compute_value_on(loaded, layer, request, TEMPLATES, hp, fast=fast)


# --------------------------------------------------------------------------------------------
# 1. presets, files, --set


def test_reference_preset_is_the_reference_code() -> None:
    hp = resolve_hparams("gemma3", "reference")
    for key, value in REFERENCE.items():
        assert getattr(hp, key) == value, key
    assert hp.v_lr_unit == "absolute" and hp.v_weight_decay_unit == "reference"
    assert hp.v_stop_most_probable == 0
    # The preset leaves the layer and the statistics budget to the family.
    assert "layer" not in PRESETS["reference"] and "stats_max_tokens" not in PRESETS["reference"]
    assert hp.layer == load_hparams("gemma3").layer


@pytest.mark.parametrize("path", FAMILY_FILES, ids=lambda p: p.stem)
def test_family_files_hold_what_differs_and_say_whether_they_are_tuned(path: Path) -> None:
    raw = json.loads(path.read_text())
    assert {"family", "layer", "note"} <= set(raw) <= set(FIELDS), set(raw) - set(FIELDS)
    # The reference recipe is written once (HParams' defaults): a family file names a field
    # only where its value differs from it.
    plain = HParams(family=raw["family"], layer=raw["layer"]).to_json()
    same = [k for k in raw if k not in ("family", "layer", "note") and HParams(**raw).to_json()[k] == plain[k]]
    assert not same, f"{path.name} repeats the reference values of {same}"
    hp = load_hparams(path.stem)
    assert hp.family == path.stem
    reference = resolve_hparams(path.stem, "reference")
    # Every note says whether the set was measured ("Measured ...") or is the reference recipe
    # untried on the family ("not yet tuned"), never both; a set that differs from the reference
    # recipe must have been measured. (A measurement may select the reference recipe: llama.)
    same = all(getattr(hp, k) == getattr(reference, k) for k in PRESETS["reference"] if k != "note")
    measured, untried = "Measured" in hp.note, "not yet tuned" in hp.note
    assert measured != untried, hp.note
    assert same or measured, hp.note


RESOLVED = json.loads((Path(__file__).parent / "data" / "hparams_resolved.json").read_text())
"""Every family's resolved set, alone and under each preset, at its own depth and at 4 layers,
as the packaged files resolved before the reference recipe moved into one place (captured
from the commit before; key ``family/preset/n_layers``, ``-`` for none)."""


@pytest.mark.parametrize("key", sorted(RESOLVED))
def test_packaged_sets_resolve_as_they_did(key: str) -> None:
    family, preset, depth = key.split("/")
    spec = None if preset == "-" else preset
    n_layers = None if depth == "-" else int(depth)
    assert resolve_hparams(family, spec, n_layers=n_layers).to_json() == RESOLVED[key]


def test_every_family_and_preset_is_captured() -> None:
    families = {path.stem for path in FAMILY_FILES}
    assert {key.split("/")[0] for key in RESOLVED} == families
    assert {key.split("/")[1] for key in RESOLVED} == {"-", *PRESETS}


def test_resolution_order(tmp_path: Path) -> None:
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"family": "llama", "clamp_norm_factor": 1.5, "v_lr": 0.2, "note": "tuned"}))
    hp = resolve_hparams("llama", str(path), n_layers=4, overrides={"v_lr": 0.1, "layer": 2})
    assert (hp.clamp_norm_factor, hp.v_lr, hp.layer, hp.note) == (1.5, 0.1, 2, "tuned")
    assert hp.kl_factor == load_hparams("llama").kl_factor  # untouched fields: the family's
    assert resolve_hparams("llama", path, n_layers=4).v_lr == 0.2  # a Path is a file too
    assert resolve_hparams("llama", {"v_stop_most_probable": 2}).v_stop_most_probable == 2
    given = HParams(family="llama", layer=1, v_lr=0.01)
    assert resolve_hparams("llama", given) == given
    assert resolve_hparams("llama", "default", n_layers=4) == load_hparams("llama", n_layers=4)
    with pytest.raises(HParamsError, match="'gemma3'"):
        resolve_hparams("llama", {"family": "gemma3"})


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("clamp_norm_factor=1", "clamp_norm_factor", 1.0),
        ("v_lr = 0.25", "v_lr", 0.25),
        ("v_num_grad_steps=7", "v_num_grad_steps", 7),
        ("v_lr_unit=relative", "v_lr_unit", "relative"),
        ('v_weight_decay_unit="relative"', "v_weight_decay_unit", "relative"),
        ("context_template_lengths=[[5,10]]", "context_template_lengths", ((5, 10),)),
        ("note=tuned on 200 cases", "note", "tuned on 200 cases"),
        ("v_stop_most_probable=0", "v_stop_most_probable", 0),
    ],
)
def test_parse_assignment(text: str, key: str, value: Any) -> None:
    assert parse_assignment(text) == (key, value)


SET_ERRORS = [
    ("no_such_key=1", ["no_such_key", "unknown"]),
    ("v_step=3", ["v_step", "v_num_grad_steps"]),  # a close name is suggested
    ("v_lr=fast", ["v_lr", "a number > 0", '"fast"']),
    ("v_lr=0", ["v_lr", "> 0"]),
    ("v_lr=nan", ["v_lr", "NaN"]),
    ("clamp_norm_factor=-1", ["clamp_norm_factor", "> 0"]),
    ("v_num_grad_steps=2.5", ["v_num_grad_steps", "integer >= 1"]),
    ("v_num_grad_steps=0", ["v_num_grad_steps", "integer >= 1"]),
    ("v_num_grad_steps=true", ["v_num_grad_steps", "integer"]),
    ("v_lr_unit=percent", ["v_lr_unit", "'absolute'", "'relative'"]),
    ("v_stop_most_probable=-1", ["v_stop_most_probable", ">= 0"]),
    ("context_template_lengths=[[5]]", ["context_template_lengths", "pairs"]),
    ("clamp_norm_factor", ["KEY=VALUE"]),
]


@pytest.mark.parametrize(("text", "needles"), SET_ERRORS, ids=[t for t, _ in SET_ERRORS])
def test_parse_assignment_errors(text: str, needles: list[str]) -> None:
    with pytest.raises(HParamsError) as info:
        parse_assignment(text)
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (n, msg)


def test_bad_values_are_refused_everywhere(tmp_path: Path) -> None:
    with pytest.raises(HParamsError, match="clamp_norm_factor"):
        HParams(family="gpt2", layer=0, clamp_norm_factor=0.0)
    with pytest.raises(HParamsError, match="v_lr"):
        load_hparams("gpt2").with_overrides(v_lr=-1.0)
    with pytest.raises(HParamsError, match="unknown hyperparameter 'v_steps'"):
        load_hparams("gpt2").with_overrides(v_steps=3)
    with pytest.raises(HParamsError, match="no such preset or file"):
        resolve_hparams("gpt2", "referense")
    bad = tmp_path / "bad.json"
    for content, needle in [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"v_lr": "x"}', "v_lr")]:
        bad.write_text(content)
        with pytest.raises(HParamsFileError, match=needle) as info:
            resolve_hparams("gpt2", str(bad))
        assert str(bad) in str(info.value)
        assert isinstance(info.value, rrome.InvalidFileError) and isinstance(info.value, rrome.RromeError)
    assert rrome.HParamsError is HParamsError and rrome.HParamsFileError is HParamsFileError


def test_editor_refuses_bad_hparams_before_loading(tmp_path: Path) -> None:
    """The check comes first: the model folder does not even exist."""
    with pytest.raises(HParamsError, match="v_lr"):
        Editor.from_pretrained(tmp_path / "no-model", hparams={"v_lr": "fast"}, progress=False)
    with pytest.raises(HParamsError, match="no such preset"):
        Editor.from_pretrained(tmp_path / "no-model", hparams="no-such-preset", progress=False)


# --------------------------------------------------------------------------------------------
# 2. the reference preset reproduces the reference code


@pytest.mark.parametrize(("layer", "request_"), [(0, DARRIEUX), (1, FRANCE)], ids=["layer0", "layer1"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_reference_preset_reproduces_the_reference_loop(
    family: str, layer: int, request_: EditRequest, tiny_loaded: Callable[[str], Any]
) -> None:
    model, tok, adapter = tiny_loaded(family)
    hp = resolve_hparams(family, "reference", n_layers=2, overrides={"layer": layer, "v_num_grad_steps": 8})
    ours = _value(tiny_loaded(family), layer, request_, hp)
    ref_hp = {**REFERENCE, "v_num_grad_steps": 8}
    losses, v_e, steps = reference_value(model, tok, adapter.module_name(layer), request_, TEMPLATES, ref_hp)
    assert ours.steps == steps == 7 and ours.stop == "max-steps"
    assert len(ours.losses) == len(losses)
    for i, (a, b) in enumerate(zip(ours.losses, losses, strict=True)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (i, ours.losses, losses)
    torch.testing.assert_close(ours.v_e, v_e, atol=1e-5, rtol=1e-5)
    # The recorded terms add up to the loss; δ stays within the clamp (4·‖v_init‖).
    for total, nll, kl, wd in zip(ours.losses, ours.nll, ours.kl, ours.weight_decay, strict=True):
        assert total == pytest.approx(nll + kl + wd, rel=1e-6, abs=1e-6)
    assert 0.5 < ours.delta_ratio <= 4.0 + 1e-5
    assert ours.lr == 0.5


# --------------------------------------------------------------------------------------------
# 3. most-probable early stopping


_TRAJECTORIES: dict[str, tuple[list[bool], list[torch.Tensor]]] = {}


def trajectory(family: str, loaded: Any, hp: HParams, layer: int) -> tuple[list[bool], list[torch.Tensor]]:
    """δ_t after t Adam steps (a run of t + 1 passes with no stopping rule: Adam is deterministic)
    and whether every target is then the argmax (decided here), until it is so twice in a row."""
    if family not in _TRAJECTORIES:
        model, tok, adapter = loaded
        held: list[bool] = []
        deltas: list[torch.Tensor] = []
        while len(held) < 2 or not all(held[-2:]):
            assert len(held) < 40, held
            t = len(held)
            run = _value(loaded, layer, FRANCE_THE, hp.with_overrides(v_num_grad_steps=t + 1))
            assert run.steps == t and run.stop == "max-steps"
            deltas.append(run.delta)
            held.append(all_targets_top1(model, tok, adapter.module_name(layer), FRANCE_THE, TEMPLATES, run.delta))
        _TRAJECTORIES[family] = held, deltas
    return _TRAJECTORIES[family]


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_most_probable_stop_on_a_known_trajectory(
    family: str, k: int, fast: bool, tiny_loaded: Callable[[str], Any]
) -> None:
    layer = 1
    base = resolve_hparams(family, {**PUSH, "layer": layer}, n_layers=2)
    held, deltas = trajectory(family, tiny_loaded(family), base, layer)
    # The first pass that ends k consecutive passes at which every target is the argmax.
    stop_at = next(t for t in range(len(held)) if t + 1 >= k and all(held[t + 1 - k : t + 1]))
    assert stop_at >= k + 2, held  # not at the start: the target had to be pushed there
    assert not all(held[stop_at - k : stop_at]), held  # one step fewer would not have met the rule

    hp = base.with_overrides(v_num_grad_steps=60, v_stop_most_probable=k)
    result = _value(tiny_loaded(family), layer, FRANCE_THE, hp, fast=fast)
    assert result.stop == "most-probable"
    assert result.steps == stop_at, (result.steps, held)
    assert [t == 1.0 for t in result.top1] == held[: stop_at + 1]
    torch.testing.assert_close(result.delta, deltas[stop_at], atol=1e-6, rtol=1e-6)
    # Allowed one pass fewer, the rule is not met: the run ends on the step limit instead.
    short = _value(tiny_loaded(family), layer, FRANCE_THE, hp.with_overrides(v_num_grad_steps=stop_at), fast=fast)
    assert short.stop == "max-steps" and short.steps == stop_at - 1


def test_loss_threshold_is_the_fallback(tiny_loaded: Callable[[str], Any]) -> None:
    hp = resolve_hparams("gpt2", {**PUSH, "layer": 1, "v_stop_most_probable": 50, "v_stop_loss": 1e6}, n_layers=2)
    result = _value(tiny_loaded("gpt2"), 1, FRANCE_THE, hp)
    assert (result.stop, result.steps, len(result.losses)) == ("loss", 0, 1)
    assert float(result.delta.norm()) == 0.0 and result.delta_ratio == 0.0


# --------------------------------------------------------------------------------------------
# 4. scale-aware steps


def test_relative_step_size_and_weight_decay(tiny_loaded: Callable[[str], Any]) -> None:
    hp = resolve_hparams(
        "llama",
        {
            "layer": 0,
            "v_lr": 0.2,
            "v_lr_unit": "relative",
            "v_weight_decay": 0.3,
            "v_weight_decay_unit": "relative",
            "clamp_norm_factor": 100.0,
            "v_num_grad_steps": 2,
            "v_stop_loss": 0.0,
        },
        n_layers=2,
    )
    result = _value(tiny_loaded("llama"), 0, DARRIEUX, hp)
    d_out = result.v_init.numel()
    v_norm = float(result.v_init.norm())
    assert result.lr == pytest.approx(0.2 * v_norm / math.sqrt(d_out), rel=1e-6)
    # Adam's first step moves every coordinate by about lr: ‖δ‖ ≈ v_lr · ‖v_init‖ on any width.
    assert result.steps == 1 and result.delta_ratio == pytest.approx(0.2, rel=1e-3)
    # The relative weight decay is v_weight_decay · ‖δ‖ / ‖v_init‖ (0 at the first pass).
    assert result.weight_decay == pytest.approx([0.0, 0.3 * result.delta_ratio], rel=1e-5, abs=1e-12)
    absolute = _value(tiny_loaded("llama"), 0, DARRIEUX, hp.with_overrides(v_lr_unit="absolute"))
    assert absolute.lr == 0.2 and absolute.delta_ratio == pytest.approx(0.2 * math.sqrt(d_out) / v_norm, rel=1e-3)


# --------------------------------------------------------------------------------------------
# 5. the edit record and the command line

QUICK = {"v_num_grad_steps": 3, "stats_max_tokens": 2000, "context_template_lengths": [[3, 5]]}


def test_edit_record_holds_the_resolved_set(tiny_dir: Callable[[str], Path], tmp_path: Path) -> None:
    spec = tmp_path / "hp.json"
    spec.write_text(json.dumps({**QUICK, "clamp_norm_factor": 2.0, "note": "a test set"}))
    editor = Editor.from_pretrained(tiny_dir("gpt2"), layer=0, hparams=str(spec), progress=False)
    result = editor.edit(DARRIEUX)
    meta = result.delta.meta or {}
    assert meta["hparams"] == editor.hparams.to_json()
    assert meta["hparams"]["clamp_norm_factor"] == 2.0 and meta["hparams"]["note"] == "a test set"
    assert meta["hparams"]["context_template_lengths"] == [[3, 5]]
    value = meta["value"]
    assert value["steps"] == result.steps == 2 and value["stop"] == result.stop == "max-steps"
    assert value["delta_ratio"] == result.delta_ratio == pytest.approx(value["delta_norm"] / value["v_init_norm"])
    for key in ("loss", "nll", "kl", "weight_decay", "top1"):
        assert len(value[key]) == 3, key
    json.dumps(meta)  # all of it is JSON


def test_cli_apply_records_hparams_and_set(tiny_dir: Callable[[str], Path], tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir("gpt2"), model)
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(DARRIEUX.to_json()) + "\n")
    args = ["apply", str(edits), str(model), "--layer", "0", "--no-progress", "--hparams", "reference"]
    for key, value in QUICK.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    args += ["--set", "v_stop_most_probable=2", "--set", "clamp_norm_factor=1.5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "clamp 1.5·‖v_init‖" in res.stdout and "target top-1 for 2 pass(es)" in res.stdout
    (logged,) = rrome.load_deltas(model)
    hp = logged.delta.meta["hparams"]
    assert hp["clamp_norm_factor"] == 1.5 and hp["v_stop_most_probable"] == 2 and hp["v_num_grad_steps"] == 3
    assert hp["v_lr"] == REFERENCE["v_lr"] and hp["note"] == PRESETS["reference"]["note"]
    assert logged.delta.meta["value"]["steps"] == 2


CLI_SET_ERRORS = [
    (["--set", "no_such_key=1"], ["no_such_key"]),
    (["--set", "v_lr=fast"], ["v_lr", "number"]),
    (["--set", "clamp_norm_factor=-1"], ["clamp_norm_factor", "> 0"]),
    (["--set", "v_num_grad_steps=2.5"], ["v_num_grad_steps", "integer"]),
    (["--set", "v_lr"], ["KEY=VALUE"]),
    (["--hparams", "no-such-preset"], ["no-such-preset", "reference"]),
]


@pytest.mark.parametrize("command", ["apply", "eval"])
@pytest.mark.parametrize(("extra", "needles"), CLI_SET_ERRORS, ids=[" ".join(a) for a, _ in CLI_SET_ERRORS])
def test_cli_bad_set_is_a_one_line_usage_error(
    command: str, extra: list[str], needles: list[str], tmp_path: Path
) -> None:
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps(DARRIEUX.to_json()) + "\n")
    model = tmp_path / "model"  # never loaded: the check comes first
    if command == "apply":
        args = ["apply", str(edits), str(model), *extra]
    else:
        args = ["eval", str(model), "--data", str(edits), "--out", str(tmp_path / "out"), *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, (res.exit_code, res.output)
    one_line_error(res.stderr, *needles)
    assert not (tmp_path / "out").exists()


def test_cli_bad_hparams_file_is_an_expected_failure(tmp_path: Path) -> None:
    """Through the console entry point: one line, status 1 (a malformed file), no torch import."""
    bad = tmp_path / "hp.json"
    bad.write_text('{"clamp_norm_factor": 0}')
    proc = run_cli_without("apply", "edits.jsonl", "model", "--hparams", bad, modules=("torch",), timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    one_line_error(proc.stderr, str(bad), "clamp_norm_factor", "> 0")


@pytest.mark.parametrize("command", ["apply", "eval"])
def test_cli_help_lists_hparams_and_set(command: str) -> None:
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0
    assert "--hparams FILE|PRESET" in res.stdout and "--set KEY=VALUE" in res.stdout
    assert "reference" in res.stdout


def _as_written(value: Any) -> str:
    """A default as docs/hparams.md writes it: JSON for booleans and lists, %g for floats."""
    if isinstance(value, bool | tuple):
        return json.dumps(value, separators=(",", ":")).replace("(", "[").replace(")", "]")
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_docs_table_states_the_reference_recipe_as_defined() -> None:
    """docs/hparams.md's "reference" column restates the recipe, which is defined once (HParams'
    defaults, REFERENCE_FIELDS): every field of the recipe is in the table, with that value."""
    docs = (Path(__file__).parents[1] / "docs" / "hparams.md").read_text()
    stated: dict[str, str] = {}
    for row in docs.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = [n.strip(" `") for n in cells[0].split(",")]
        values = [cells[1]] if "[[" in cells[1] else cells[1].split(", ")
        stated.update(zip(names, (v.strip(" `").removesuffix(" (off)") for v in values), strict=False))
    defaults = HParams(family="any", layer=0)
    for key in REFERENCE_FIELDS:
        assert stated[key] == _as_written(getattr(defaults, key)), key

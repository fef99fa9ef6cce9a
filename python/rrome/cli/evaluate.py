"""The evaluation commands: ``eval``, ``tune`` and ``report``.

``eval`` and ``tune`` edit cases into a model and measure them (docs/design.md §2); ``report``
rebuilds a results folder's table and plots from its files alone, without importing torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from rrome.cli.common import (
    DIR,
    EDIT_PROMPTS,
    EVAL_PROMPTS,
    METHOD_CHOICE,
    cli_hparams,
    expected_errors,
    hparams_options,
    main,
    model_options,
)
from rrome.files.locate import resolve_model


@main.command("eval")
@click.argument("model_dir", type=DIR)
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
@click.option(
    "--no-diagnostics",
    is_flag=True,
    help="Skip the generation entropies (of the unedited model, after each edit, at each checkpoint).",
)
@click.option(
    "--no-edit-diagnostics",
    is_flag=True,
    help="Sample the generation entropies of the unedited model and at the checkpoints only, not after "
    "each edit (they take about half of a sequential run's time; the report then counts every large "
    "edit as disabling).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling and few-shot choice.")
@click.option("--layer", type=int, default=None, help="Layer to edit (default: the hyperparameters').")
@hparams_options
@model_options
@click.option("--stats-tokens", type=int, default=None, help="Corpus tokens for C0 (default: hyperparameters).")
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
@EDIT_PROMPTS
@EVAL_PROMPTS
@expected_errors
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
    no_edit_diagnostics: bool,
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
    edit_prompts: str,
    eval_prompts: tuple[str, ...],
) -> None:
    """Edit N cases of DATA into MODEL_DIR with each variant and measure them (docs/design.md §2).

    The checkpoint on disk is never written. Results go to --out as JSON lines, a table and
    plots; a killed run continues where it stopped when started again with the same --out.
    The fields --hparams and --set give are saved in the folder's run.json and the resolved set
    in baseline.json; a resumed run must resolve to the same set (after a change of the packaged
    defaults, say it with --hparams/--set). --edit-prompts and --eval-prompts (run.json records
    both) say whether the edits and the measurements read the prompts as plain text or inside
    the chat template; --eval-prompts plain,chat measures every edit both ways.
    """
    model_dir = resolve_model(model_dir)
    fields = cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch
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
        edit_diagnostics=not no_edit_diagnostics,
        dtype=dtype,
        layer=layer,
        corpus=str(corpus.resolve()) if corpus else None,
        hparams=fields,
        device=device,
        guard=guard,
        edit_prompts=edit_prompts,
        eval_prompts=eval_prompts,
    )
    run(cfg, out_dir, progress=not no_progress)
    table, figures = report(out_dir)
    click.echo(table)
    for f in figures:
        click.echo(f"wrote {f}")


@main.command("tune")
@click.argument("model_dir", type=DIR)
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
@hparams_options
@click.option("--method", type=METHOD_CHOICE, default="r-rome", show_default=True, help="Update variant.")
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
@EDIT_PROMPTS
@EVAL_PROMPTS
@model_options
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Sweep folder (continued if it holds the same sweep).",
)
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@expected_errors
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
    edit_prompts: str,
    eval_prompts: tuple[str, ...],
    corpus: Path | None,
    device: str | None,
    dtype: str,
    out_dir: Path,
    no_progress: bool,
) -> None:
    """Sweep hyperparameters over N cases of DATA, one edit at a time, and rank the sets.

    Each trial (a point of the grid) edits every case into the unedited model, measures it as
    `rrome eval` does and restores the weight exactly. Objective: the Score (harmonic mean of
    ES, PS, NS) among the trials with ES >= --min-es; the others rank after them; equal Scores
    go to the trial with fewer optimisation steps on average. Writes one
    line per trial to --out/trials.jsonl, prints the table (best first; also table.md) and
    writes the best set to --out/best.json, a file for --hparams. A killed sweep continues
    where it stopped when the same command runs again; other settings into the same folder
    are refused. With --eval-prompts plain,chat the objective reads the first style; each
    trial's line in trials.jsonl also holds the second's metrics.
    """
    model_dir = resolve_model(model_dir)
    fields = cli_hparams(hparams_spec, assignments)  # before the (slow) imports of torch
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
        edit_prompts=edit_prompts,
        eval_prompts=eval_prompts,
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
@click.argument("results_dir", type=DIR)
@click.option(
    "--flag-ratio", type=float, default=10.0, show_default=True, help="Disabling edit: |Δ| above this × median …"
)
@click.option("--flag-entropy", type=float, default=0.5, show_default=True, help="… and entropy below this × unedited.")
@expected_errors
def report_cmd(results_dir: Path, flag_ratio: float, flag_entropy: float) -> None:
    """Rebuild the table (table.md, summary.json) and plots of an `rrome eval` results folder."""
    from rrome.eval.report import report

    table, figures = report(results_dir, flag_ratio=flag_ratio, flag_entropy=flag_entropy)
    click.echo(table)
    for f in figures:
        click.echo(f"wrote {f}")

"""The file commands: ``apply-deltas``, ``revert``, ``recover``, ``inspect``, ``export-lora``.

They work on a checkpoint's files through the Rust shard writer and never load the model: they
import neither torch nor transformers, so they start in a fraction of a second.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from rrome.cli.common import (
    DIR,
    LINK_UNTOUCHED,
    check_link_untouched,
    echo_committed_despite,
    echo_recovered,
    expected_errors,
    finish_writes_on_interrupt,
    format_time,
    main,
    printable,
)
from rrome.files.adapters import FORMATS


@main.command("apply-deltas")
@click.argument("deltas", type=click.Path(path_type=Path))
@click.argument("model_dir", type=DIR)
@click.option(
    "--out",
    "out_dir",
    type=DIR,
    default=None,
    help="Write an edited copy to this new folder instead of editing in place.",
)
@LINK_UNTOUCHED
@click.option(
    "--again",
    is_flag=True,
    help="Apply even if the edit log already holds these deltas (by default a bundle applied before "
    "is refused, so a rerun cannot add it twice).",
)
@expected_errors
def apply_deltas_cmd(deltas: Path, model_dir: Path, out_dir: Path | None, link_untouched: bool, again: bool) -> None:
    """Apply a deltas bundle to the checkpoint in MODEL_DIR, without loading the model.

    DELTAS is a folder holding rrome_edits.jsonl and rrome_deltas.safetensors, or the path of
    either file. MODEL_DIR is a folder or a model id in the local Hugging Face cache (a cache
    snapshot is never written in place: use --out). In place (the default), the write is
    journaled and locked and can be undone with `rrome revert`; with --out, a complete edited
    copy appears at DIR or nothing does.
    A bundle whose deltas the edit log already holds is refused unless --again is given.
    """
    from rrome.files.locate import resolve_model
    from rrome.files.shards import apply_bundle

    check_link_untouched(link_untouched, out_dir)
    model_dir = resolve_model(model_dir)
    t0 = time.perf_counter()
    with finish_writes_on_interrupt() as interrupts:
        rep = apply_bundle(model_dir, deltas, out_dir=out_dir, link_untouched=link_untouched, again=again)
    dt = time.perf_counter() - t0
    echo_recovered(rep.recovered)
    click.echo(
        f"applied {rep.deltas} delta(s) to {len(rep.tensors)} tensor(s) in {len(rep.shards)} shard(s) "
        f"as batch {rep.batch} of {rep.model_dir} ({rep.tensor_bytes / 1e6:.1f} MB of tensors, {dt:.2f} s)"
    )
    echo_committed_despite(interrupts, rep.batch)


@main.command("revert")
@click.argument("model_dir", type=DIR)
@click.option("--all", "all_", is_flag=True, help="Revert every batch, not only the last one.")
@expected_errors
def revert_cmd(model_dir: Path, all_: bool) -> None:
    """Restore the exact original bytes of the last applied batch (or of all batches)."""
    from rrome.files.shards import revert_with_report

    with finish_writes_on_interrupt():
        batches, recovered = revert_with_report(model_dir, all=all_)
    echo_recovered(recovered)
    click.echo(f"reverted batch{'es' if len(batches) > 1 else ''} {', '.join(map(str, batches))} of {model_dir}")


@main.command("recover")
@click.argument("model_dir", type=DIR)
@expected_errors
def recover_cmd(model_dir: Path) -> None:
    """Finish or roll back an in-place write that was interrupted (crash, kill, power loss)."""
    from rrome.files.shards import recover

    with finish_writes_on_interrupt():
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
@click.argument("model_dir", type=DIR)
@click.option("--tensors", "show_tensors", is_flag=True, help="List every tensor, not only a summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
@expected_errors
def inspect_cmd(model_dir: Path, show_tensors: bool, as_json: bool) -> None:
    """Show a checkpoint's shards, tensors and dtypes, and its rrome edit log."""
    from rrome.files.locate import resolve_model
    from rrome.files.shards import inspect

    info = inspect(resolve_model(model_dir), tensors=show_tensors or as_json)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
        return
    click.echo(f"{printable(info.model_dir)}: {info.num_tensors} tensors in {len(info.shards)} shard(s)")
    click.echo("dtypes: " + ", ".join(f"{k} × {v}" for k, v in sorted(info.dtypes.items())))
    for s in info.shards:
        click.echo(f"  {printable(s.file)}  {_fmt_bytes(s.bytes)}  {s.tensors} tensors")
    if show_tensors:
        for t in info.tensors or []:
            click.echo(f"  {printable(t.name)}  {t.dtype}  {t.shape}  {printable(t.shard)}")
    edits = info.edits
    if not edits:
        click.echo("edit log: empty")
    else:
        click.echo(f"edit log: {len(edits)} delta(s)")
        for e in edits:
            when = format_time(e.applied_at)
            undo = "revertible" if e.undo else "no undo data"
            fields = [f"batch {e.batch}", printable(e.id), printable(e.tensor), e.layout]
            fields += [f"scale={e.scale:g}", when, undo]
            click.echo("  " + "  ".join(fields))
    for p in info.pending:
        click.echo(f"pending: {p}")


@main.command("export-lora")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="peft",
    show_default=True,
    help="peft: a folder for PEFT and vLLM (adapter_config.json, adapter_model.safetensors); "
    "gguf: one file for llama.cpp (--lora) and Ollama (ADAPTER).",
)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Rank of every module, padded with zeros (vLLM serves 1, 8, 16, 32, 64, 128, 256, 320, 512). "
    "Default: the most edits on one module.",
)
@click.option(
    "--base",
    type=DIR,
    default=None,
    help="The unedited model folder the adapter is for: recorded in the adapter, and read for the "
    "architecture when SOURCE is a bundle (needed for --format gguf).",
)
@expected_errors
def export_lora_cmd(source: Path, out: Path, fmt: str, rank: int | None, base: Path | None) -> None:
    """Write the edits of SOURCE as a LoRA adapter at OUT (a folder for peft, a file for gguf).

    SOURCE is an edited model folder (every batch of its edit log) or a deltas bundle. Each edit
    is one rank of the adapter; only the edited modules are targeted. Load the adapter over the
    unedited model, never over the edited folder, which already holds the edits.
    """
    from rrome.files.adapters import export_lora
    from rrome.files.locate import resolve_model

    base = None if base is None else resolve_model(base)
    rep = export_lora(resolve_model(source), out, format=fmt, rank=rank, base=base)  # type: ignore[arg-type]
    click.echo(
        f"wrote {rep.edits} edit(s) on {len(rep.modules)} module(s) as a rank-{rep.rank} {rep.format} adapter: "
        f"{rep.path} ({rep.bytes / 1e3:.1f} kB)"
    )

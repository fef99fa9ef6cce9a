"""What every ``rrome`` command shares: the command group, the one-line error handling, the
options of the commands that edit (methods, dtypes, hyperparameters), and safe printing.

Expected failures (bad files, locks, missing paths) print one line ``rrome: error: ...`` and
exit with status 1; usage mistakes exit with status 2 (click's convention). Nothing here
imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from rrome.files.constants import DTYPES, METHODS
from rrome.files.errors import RromeError
from rrome.files.hparams import FIELDS

F = TypeVar("F", bound=Callable[..., Any])


def expected_errors(fn: F) -> F:
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


DIR = click.Path(file_okay=False, dir_okay=True, path_type=Path)


def printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\n``, ...):
    names read from a model folder are untrusted and must not forge output lines or terminal
    escapes. The escaping itself lives in the Rust core, rrome's one home for it."""
    from rrome._rust import escape_unprintable

    return escape_unprintable(text)


def format_time(seconds: float | None) -> str:
    """A time in seconds since the epoch (an edit log's ``applied_at``) as local
    ``YYYY-MM-DD HH:MM:SS``; ``-`` for none. The value is read from a folder, so one that is no
    date the platform can show (1e300, NaN, before year 1) is printed as the number itself."""
    if not seconds:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    except (OverflowError, OSError, ValueError):
        return f"{seconds!r} (not a date)"


@contextlib.contextmanager
def finish_writes_on_interrupt() -> Iterator[list[int]]:
    """Ctrl-C during a write into a model folder does not abandon it half-reported: the write
    (one call into Rust, which commits or rolls back as a whole) runs to its end and the
    command reports what it did, as for any other run; the interrupt is announced at once and
    noted in the yielded list. Outside the main thread (where signals cannot be set) a no-op."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return

    def note(signum: int, _frame: object) -> None:
        got.append(signum)
        click.echo("rrome: interrupt received; finishing the write, which cannot be stopped halfway", err=True)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, previous)


def echo_committed_despite(interrupts: list[int], batch: int) -> None:
    """After a write that committed: say so plainly if an interrupt arrived during it."""
    if interrupts:
        click.echo(
            f"rrome: the interrupt came during the write; batch {batch} was committed and is applied "
            "(do not apply it again; `rrome revert` undoes it)",
            err=True,
        )


def echo_recovered(actions: list[str]) -> None:
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


LINK_UNTOUCHED = click.option(
    "--link-untouched",
    is_flag=True,
    help="With --out: hard-link the shards no edit touches instead of copying them (fast, no extra "
    "disk). rrome's own later writes un-share a shard first, but another tool that rewrites a shared "
    "shard in place changes both folders.",
)


def check_link_untouched(link_untouched: bool, out_dir: Path | None) -> None:
    if link_untouched and out_dir is None:
        raise click.UsageError("--link-untouched only applies to a copy: add --out DIR")


METHOD_CHOICE = click.Choice(METHODS)
DTYPE_CHOICE = click.Choice(DTYPES)


def hparams_options(fn: F) -> F:
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


EDIT_PROMPTS = click.option(
    "--edit-prompts",
    type=click.Choice(["plain", "chat"]),
    default="plain",
    show_default=True,
    help="Where the edit sees each prompt: plain text, or chat: inside the tokenizer's chat template as the "
    'opening of the assistant\'s reply to the user turn "Complete the sentence." (keys and value '
    "optimisation alike; docs/design.md §1). Use chat for an instruct model that is asked through its template.",
)


def _eval_prompts(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    styles = tuple(x.strip() for x in value.split(",") if x.strip())
    if not styles or len(set(styles)) != len(styles) or any(x not in ("plain", "chat") for x in styles):
        raise click.BadParameter(f"plain, chat or plain,chat; got {value!r}")
    return styles


EVAL_PROMPTS = click.option(
    "--eval-prompts",
    default="plain",
    show_default=True,
    callback=_eval_prompts,
    metavar="plain|chat|plain,chat",
    help="Where every rewrite, paraphrase and neighbourhood prompt is measured: plain text, or chat (inside the "
    "chat template, as --edit-prompts chat wraps it); plain,chat measures each edit both ways (the first "
    "style fills the usual fields and table rows, the second its own).",
)


def model_options(fn: F) -> F:
    """``--corpus``, ``--device`` and ``--dtype``: where C0 comes from and how the model runs."""
    fn = click.option(
        "--dtype", type=DTYPE_CHOICE, default="float32", show_default=True, help="dtype the model runs in."
    )(fn)
    fn = click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")(fn)
    return click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Text for C0.")(
        fn
    )


def cli_hparams(spec: str | None, assignments: tuple[str, ...]) -> dict[str, Any]:
    """The fields --hparams and --set give, checked before any model is loaded.

    A bad --set, or a --hparams that is neither a preset nor a file, is a usage error: one line
    ``rrome: error: ...`` naming the key and what it expects, exit status 2. A malformed file is
    an expected failure (status 1, through ``expected_errors``).
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

"""Random SIGKILL crash harness for rrome's file commands (tests/test_crash_random.py, scripts/soak_crash.py).

Where tests/test_crash.py aborts at named steps (``RROME_CRASH_AT``), this harness kills real
``rrome`` processes with SIGKILL at random moments of their write. A trial:

1. starts ``rrome apply-deltas`` (in place or ``--out``), ``rrome revert`` or ``rrome recover``
   on the synthetic sharded checkpoint of tests/tiny_models.py (F32, F16 and BF16 tensors, three
   shards, built with plain numpy so nothing imports torch);
2. waits until the child holds the folder's lock (its pid appears in ``.rrome/lock``), then
   sleeps a random time up to 1.3 times the measured length of that command's write phase (a few
   trials kill before the lock, during start-up) and sends SIGKILL;
3. recovers, at random through ``rrome recover``, the ``rrome.recover`` API, the next command
   itself, or a recovery that is itself killed and then rerun;
4. checks the folder against oracle states computed by uninterrupted runs: every shard equal,
   byte for byte, to the state before the command or to the state after it (so every edited
   tensor entirely old or entirely new, every other byte unchanged), an edit log whose
   batches and factors agree with the bytes, undo data for exactly the logged batches, no
   journal, marker or temporary file left. In copy mode the destination is absent or complete,
   the source unchanged, and a reader polling the destination during the write never sees it
   incomplete.

Every trial applies the same bundle again (the oracle's states are 0, 1, 2, ... applications of
it), so every apply passes ``--again`` / ``again=True``: the refusal of a repeated batch is
tested in tests/test_untrusted_folder_2.py.

Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _helpers import (
    CRASH_ENV,
    EDITS_FILE,
    RROME_EXE,
    STATE_DIR,
    _no_core_dumps,
    file_hashes,
    leftovers,
    random_delta,
    region_sha,
    run_cli,
    shard_hashes,
    without_lock,
)
from tiny_models import SYNTHETIC_EDITED, SYNTHETIC_TENSORS, build_synthetic_checkpoint

import rrome


def _math_shape(tensor: str) -> tuple[int, int]:
    """(d_out, d_in) of an edited tensor of the synthetic checkpoint."""
    _, shape, _ = SYNTHETIC_TENSORS[tensor]
    d0, d1 = shape
    return (d0, d1) if SYNTHETIC_EDITED[tensor] == "out_in" else (d1, d0)


def make_deltas(seed: int = 11) -> list[rrome.Delta]:
    """Four deltas over the three edited tensors in three shards (one tensor twice)."""
    rng = np.random.default_rng(seed)
    tensors = [*SYNTHETIC_EDITED, next(iter(SYNTHETIC_EDITED))]
    return [
        random_delta(rng, t, *_math_shape(t), SYNTHETIC_EDITED[t], 1.0 - 0.3 * i, meta={"i": i})
        for i, t in enumerate(tensors)
    ]


# The one tensor edited by ``copy_delta``: a copy made with it changes only the last shard and
# may share the other two with its source by hard link.
COPY_TENSOR = "layers.2.mlp.c_proj.weight"
COPY_SHARD = SYNTHETIC_TENSORS[COPY_TENSOR][2]


def copy_delta(seed: int = 3) -> rrome.Delta:
    """One delta on ``COPY_TENSOR`` only."""
    rng = np.random.default_rng(seed)
    return random_delta(rng, COPY_TENSOR, *_math_shape(COPY_TENSOR), SYNTHETIC_EDITED[COPY_TENSOR], 1.0)


# --- processes ---------------------------------------------------------------------------


def lock_names(folder: Path, pid: int) -> bool:
    """True when ``folder``'s lock file says process ``pid`` holds it."""
    try:
        text = (folder / STATE_DIR / "lock").read_text(errors="replace")
    except OSError:
        return False
    return text.startswith(f"pid {pid},")


@dataclass
class Run:
    """What happened to one child process."""

    returncode: int
    killed: bool  # SIGKILL was sent before it exited
    lock_seen: float | None  # seconds from start until the child held the lock
    window: float | None  # seconds from holding the lock until ``done`` held (uninterrupted runs)
    stderr: str
    torn_reads: int = 0  # reader checks of a copy destination that found it incomplete
    reads: int = 0


def spawn(*args: str | Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    return subprocess.Popen(
        [str(RROME_EXE), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=_no_core_dumps,
    )


def run_and_kill(
    args: list[str | Path],
    lock_dir: Path,
    kill_after: float | None,
    *,
    before_lock: float | None = None,
    reader: tuple[Path, dict[str, str]] | None = None,
    done: Callable[[], bool] | None = None,
    timeout: float = 60.0,
) -> Run:
    """Runs ``rrome *args``; SIGKILLs it ``kill_after`` seconds after it takes ``lock_dir``'s
    lock (or ``before_lock`` seconds after the start, whatever it holds then). ``None`` for
    both: let it finish and measure its write window. ``reader``: (destination, expected shard
    hashes) to check whenever the destination exists while the child runs. ``done``: a test of
    the folder that says the write is over (its time, from the lock, is the run's window)."""
    proc = spawn(*args)
    t0 = time.perf_counter()
    lock_t: float | None = None
    deadline = None if before_lock is None else t0 + before_lock
    torn = reads = 0
    killed = False
    done_t: float | None = None
    try:
        while proc.poll() is None:
            now = time.perf_counter()
            if now - t0 > timeout:
                raise TimeoutError(f"rrome {args} did not finish in {timeout} s")
            if lock_t is None and lock_names(lock_dir, proc.pid):
                lock_t = now
                if kill_after is not None and deadline is None:
                    deadline = now + kill_after
            if done is not None and done_t is None and lock_t is not None and done():
                done_t = now
            if reader is not None and reader[0].exists():
                reads += 1
                try:
                    if shard_hashes(reader[0]) != reader[1]:
                        torn += 1
                except OSError:
                    torn += 1
            if deadline is not None and now >= deadline:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            if lock_t is None:
                time.sleep(0.001)  # start-up takes ~0.3 s: a coarser poll leaves the CPU to the child
            elif deadline is not None and reader is None:
                time.sleep(max(0.0, deadline - time.perf_counter()))
            else:
                time.sleep(0.0002)
        proc.wait()
        end = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    killed = killed and proc.returncode == -signal.SIGKILL
    if done is not None and done_t is None and lock_t is not None and done():
        done_t = end
    window = None if killed or lock_t is None or done_t is None else done_t - lock_t
    return Run(proc.returncode, killed, None if lock_t is None else lock_t - t0, window, err, torn, reads)


# --- states -------------------------------------------------------------------------------


@dataclass
class Oracle:
    """Shard hashes after k uninterrupted applications of the bundle, k = 0..3, and the rest."""

    pristine: Path
    bundle: Path
    deltas: list[rrome.Delta]
    shards: list[dict[str, str]]
    tensors: list[dict[str, str]]
    side_files: dict[str, str]  # config, index, tokenizer: never change
    windows: dict[str, float] = field(default_factory=dict)  # command -> write window, seconds


def build_oracle(root: Path, *, calibrate: bool = True) -> Oracle:
    pristine = build_synthetic_checkpoint(root / "pristine")
    deltas = make_deltas()
    bundle = root / "bundle"
    rrome.save_deltas(bundle, deltas)
    scratch = root / "oracle"
    shutil.copytree(pristine, scratch)
    shards, tensors = [], []
    for k in range(4):
        if k:
            rrome.apply_deltas(scratch, deltas, again=True)
        shards.append(shard_hashes(scratch))
        tensors.append({t: region_sha(scratch, t) for t in SYNTHETIC_EDITED})
    for k in range(1, 4):
        for t in SYNTHETIC_EDITED:
            assert tensors[k][t] != tensors[k - 1][t], "every application must change every edited tensor"
    side = {f: hashlib.sha256((pristine / f).read_bytes()).hexdigest() for f in side_file_names()}
    oracle = Oracle(pristine, bundle, deltas, shards, tensors, side)
    shutil.rmtree(scratch)
    if not calibrate:
        return oracle
    # Measure each command's write window (lock held -> write over) on a scratch copy.
    shutil.copytree(pristine, scratch)
    undo = scratch / STATE_DIR / "undo"
    copy = root / "oracle-copy"
    for name, args, done in [
        ("apply", ["apply-deltas", "--again", bundle, scratch], lambda: (undo / "batch-000001.safetensors").exists()),
        ("revert", ["revert", scratch], lambda: not (undo / "batch-000001.safetensors").exists()),
        ("copy", ["apply-deltas", "--again", "--out", copy, bundle, scratch], copy.exists),
    ]:
        run = run_and_kill(list(args), scratch, None, done=done)
        assert run.returncode == 0, run.stderr
        assert run.window is not None, f"{name}: the lock or the end of the write was never seen"
        oracle.windows[name] = max(oracle.windows.get(name, 0.0), run.window)
    oracle.windows["recover"] = oracle.windows["revert"]
    shutil.rmtree(scratch)
    shutil.rmtree(root / "oracle-copy")
    return oracle


def side_file_names() -> list[str]:
    return ["config.json", "model.safetensors.index.json", "tokenizer.json"]


class CorruptFolderError(AssertionError):
    """A folder in a state that no uninterrupted run produces."""


def state_of(folder: Path, oracle: Oracle, allowed: set[int]) -> int:
    """The oracle state k the folder is in; raises :class:`CorruptFolderError` unless it is one of ``allowed``
    with an edit log, undo data and side files that agree."""
    shards = shard_hashes(folder)
    matches = [k for k, want in enumerate(oracle.shards) if shards == want]
    if not matches:
        per_tensor = {}
        for t in SYNTHETIC_EDITED:
            sha = region_sha(folder, t)
            per_tensor[t] = next((f"S{k}" for k, m in enumerate(oracle.tensors) if m[t] == sha), "TORN")
        raise CorruptFolderError(f"{folder}: shards match no oracle state; tensors: {per_tensor}")
    k = matches[0]
    if k not in allowed:
        raise CorruptFolderError(f"{folder}: in state S{k}, expected one of {sorted(allowed)}")
    for f, sha in oracle.side_files.items():
        if hashlib.sha256((folder / f).read_bytes()).hexdigest() != sha:
            raise CorruptFolderError(f"{folder}: {f} changed")
    log = rrome.load_deltas(folder) if (folder / EDITS_FILE).exists() else []
    n = len(oracle.deltas)
    want_batches = [b for b in range(1, k + 1) for _ in range(n)]
    if [r.batch for r in log] != want_batches:
        raise CorruptFolderError(f"{folder}: state S{k} but the edit log holds batches {[r.batch for r in log]}")
    for i, rec in enumerate(log):
        d = oracle.deltas[i % n]
        if rec.delta.tensor != d.tensor or not (np.array_equal(rec.delta.u, d.u) and np.array_equal(rec.delta.r, d.r)):
            raise CorruptFolderError(f"{folder}: edit log record {rec.id} does not hold the applied delta")
    undo = sorted(p.name for p in (folder / STATE_DIR / "undo").glob("*")) if (folder / STATE_DIR).exists() else []
    if undo != [f"batch-{b:06d}.safetensors" for b in range(1, k + 1)]:
        raise CorruptFolderError(f"{folder}: state S{k} but undo files {undo}")
    if leftovers(folder):
        raise CorruptFolderError(f"{folder}: leftovers {leftovers(folder)}")
    if rrome.inspect(folder).pending:
        raise CorruptFolderError(f"{folder}: still pending after recovery")
    return k


# --- the trial loop -----------------------------------------------------------------------


@dataclass
class Stats:
    trials: int = 0
    kills: int = 0  # SIGKILLs that landed (the child had not exited yet)
    finished_first: int = 0  # the child exited before the kill
    faults: Counter[str] = field(default_factory=Counter)  # where the kills landed
    outcomes: Counter[str] = field(default_factory=Counter)  # op: old/new after recovery
    recoveries: Counter[str] = field(default_factory=Counter)
    reads: int = 0
    corrupt: int = 0

    def summary(self) -> str:
        return (
            f"{self.trials} trials, {self.kills} SIGKILLs landed ({self.finished_first} children finished first), "
            f"{self.corrupt} corrupted folders; kills landed at {dict(sorted(self.faults.items()))}; "
            f"outcomes {dict(sorted(self.outcomes.items()))}; recovered by {dict(sorted(self.recoveries.items()))}; "
            f"{self.reads} reads of copy destinations during writes"
        )


def _where(folder: Path, run: Run, op: str, k: int, out: Path | None = None) -> str:
    """Which phase a kill interrupted, from what it left on disk."""
    if not run.killed:
        return f"{op}:finished"
    if run.lock_seen is None:
        return f"{op}:start-up"
    state = folder / STATE_DIR
    if op == "copy":
        assert out is not None
        partial = out.parent / f".{out.name}.rrome-partial"
        return f"copy:{'renamed' if out.exists() else 'building' if partial.exists() else 'before-build'}"
    if (state / "revert.json").exists():
        return f"{op}:revert-marked"
    if (state / "journal.safetensors").exists():
        batches = {r.batch for r in rrome.load_deltas(folder)} if (folder / EDITS_FILE).exists() else set()
        return f"{op}:journal" + ("+log" if len(batches) > k else "")
    if any(".rrome-tmp-" in p.name for d in (folder, state) if d.exists() for p in d.iterdir()):
        return f"{op}:tmp-file"
    return f"{op}:no-trace"


def trial(rng: random.Random, model: Path, oracle: Oracle, k: int, stats: Stats, work: Path) -> int:
    """One killed command on ``model`` (in oracle state ``k``); returns the state it ends in."""
    stats.trials += 1
    ops = ["apply", "apply", "copy"] + (["revert", "revert"] if k else [])
    op = rng.choice(ops)
    window = oracle.windows[op]
    early = rng.random() < 0.1
    kill_after = None if early else rng.uniform(0.0, 1.3 * window)
    before_lock = rng.uniform(0.0, 0.4) if early else None
    out = work / f"copy-{stats.trials}"

    if op == "copy":
        run = run_and_kill(
            ["apply-deltas", "--again", "--out", out, oracle.bundle, model],
            model,
            kill_after,
            before_lock=before_lock,
            reader=(out, oracle.shards[k + 1]),
        )
    elif op == "apply":
        run = run_and_kill(
            ["apply-deltas", "--again", oracle.bundle, model], model, kill_after, before_lock=before_lock
        )
    else:
        run = run_and_kill(["revert", model], model, kill_after, before_lock=before_lock)
    if not run.killed:
        stats.finished_first += 1
        assert run.returncode == 0, f"rrome {op} failed: {run.stderr}"
    else:
        stats.kills += 1
    where = _where(model, run, op, k, out)
    stats.faults[where] += 1
    stats.reads += run.reads
    if run.torn_reads:
        stats.corrupt += 1
        raise CorruptFolderError(
            f"a reader saw the copy destination incomplete ({run.torn_reads} of {run.reads} reads)"
        )

    if op == "copy":
        # The source is untouched whatever happened; the destination is complete or absent.
        state_of(model, oracle, {k})
        if out.exists():
            state_of(out, oracle, {k + 1})
            stats.outcomes["copy:complete"] += 1
        else:
            stats.outcomes["copy:absent"] += 1
            if rng.random() < 0.5:  # the next run clears the dead run's partial folder
                rrome.apply_deltas(model, oracle.deltas, out_dir=out, again=True)
                state_of(out, oracle, {k + 1})
                assert not (out.parent / f".{out.name}.rrome-partial").exists()
                stats.recoveries["copy:rerun"] += 1
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.parent / f".{out.name}.rrome-partial", ignore_errors=True)
        return k

    before, after = (k, k + 1) if op == "apply" else (k, k - 1)
    how = rng.choices(["cli", "api", "next", "killed-recover"], weights=[1, 6, 3, 2])[0]
    stats.recoveries[how] += 1
    if how == "cli":
        proc = run_cli("recover", model)
        assert proc.returncode == 0, proc.stderr
        end = state_of(model, oracle, {before, after})
    elif how == "api":
        rrome.recover(model)
        end = state_of(model, oracle, {before, after})
    elif how == "killed-recover":
        again = run_and_kill(["recover", model], model, rng.uniform(0.0, oracle.windows["recover"]))
        stats.kills += int(again.killed)
        stats.faults["recover:" + ("killed" if again.killed else "finished")] += 1
        rrome.recover(model)
        end = state_of(model, oracle, {before, after})
    else:  # the next command recovers first, then does its own work
        if op == "apply":
            rrome.apply_deltas(model, oracle.deltas, again=True)
            end = state_of(model, oracle, {before + 1, after + 1})
            stats.outcomes[f"apply:{'old' if end == before + 1 else 'new'}"] += 1
            return end
        with contextlib.suppress(rrome.RevertError):  # the killed revert may have finished: nothing left
            rrome.revert(model)
        end = state_of(model, oracle, {after})
        stats.outcomes["revert:next"] += 1
        return end
    stats.outcomes[f"{op}:{'old' if end == before else 'new'}"] += 1
    return end


def run_trials(n: int, seed: int, work: Path, oracle: Oracle | None = None, log: bool = False) -> Stats:
    """``n`` random trials on a fresh copy of the synthetic checkpoint under ``work``."""
    rng = random.Random(seed)
    if oracle is None:
        oracle = build_oracle(work / "oracle-states")
    model = work / "model"
    shutil.copytree(oracle.pristine, model)
    stats = Stats()
    k = 0
    t0 = time.perf_counter()
    for i in range(n):
        try:
            k = trial(rng, model, oracle, k, stats, work)
        except CorruptFolderError:
            stats.corrupt += 1
            raise
        while k > 1:  # keep the oracle small: states S0..S3 suffice
            rrome.revert(model)
            k = state_of(model, oracle, {k - 1})
        if log and (i + 1) % 50 == 0:
            print(f"[{time.perf_counter() - t0:7.1f} s] {stats.summary()}", file=sys.stderr, flush=True)
    # Everything reverts exactly to the pristine bytes.
    if k:
        rrome.revert(model, all=True)
    state_of(model, oracle, {0})
    assert without_lock(file_hashes(model)) == without_lock(file_hashes(oracle.pristine))
    return stats

"""SIGKILL at random moments (tests/crash_harness.py), two real writers, and a killed `rrome apply`.

The deterministic crash points are in test_crash.py; here real processes die wherever the
clock says. A longer soak of the same trials: ``scripts/soak_crash.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _helpers import RROME_EXE, run_cli, shard_hashes
from crash_harness import Oracle, build_oracle, lock_names, run_trials, spawn, state_of

import rrome

pytestmark = pytest.mark.slow  # SIGKILL trials of real rrome processes

TRIALS = int(os.environ.get("RROME_CRASH_TRIALS", "30"))
SEED = int(os.environ.get("RROME_CRASH_SEED", "20240607"))


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> Oracle:
    return build_oracle(tmp_path_factory.mktemp("crash-oracle"))


def test_random_sigkill_trials(tmp_path: Path, oracle: Oracle) -> None:
    stats = run_trials(TRIALS, SEED, tmp_path, oracle)
    print(stats.summary())
    assert stats.trials == TRIALS >= 30
    assert stats.corrupt == 0
    # Most kills must land while the child runs, and some inside the journaled write itself.
    assert stats.kills >= TRIALS * 2 // 3, stats.summary()
    inside = sum(n for where, n in stats.faults.items() if where.split(":")[1] not in ("finished", "start-up"))
    assert inside >= TRIALS // 3, stats.summary()


def test_second_writer_fails_at_once_naming_the_holder(tmp_path: Path, oracle: Oracle) -> None:
    for attempt in range(10):
        model = tmp_path / f"model-{attempt}"
        shutil.copytree(oracle.pristine, model)
        holder = spawn("apply-deltas", "--again", oracle.bundle, model)
        t0 = time.perf_counter()
        while holder.poll() is None and not lock_names(model, holder.pid) and time.perf_counter() - t0 < 30:
            time.sleep(0.0002)
        if holder.poll() is None:
            holder.send_signal(signal.SIGSTOP)  # frozen while it holds the lock
            break
        holder.wait()
        assert holder.stderr is not None
        holder.stderr.close()
    else:
        pytest.fail("could not catch the first writer while it held the lock")
    try:
        assert lock_names(model, holder.pid)
        for args in (
            ["apply-deltas", "--again", oracle.bundle, model],
            ["apply-deltas", "--again", "--out", tmp_path / "copy", oracle.bundle, model],
            ["revert", model],
            ["recover", model],
        ):
            t = time.perf_counter()
            proc = run_cli(*args)
            assert time.perf_counter() - t < 10, "the second writer must not wait for the lock"
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            msg = proc.stderr.strip()
            assert msg.startswith("rrome: error: ") and "locked by another rrome process" in msg, msg
            assert f"pid {holder.pid}, command " in msg and "apply-deltas" in msg, msg
            assert len(msg.splitlines()) == 1 and "Traceback" not in msg
        assert not (tmp_path / "copy").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash while holding the lock
        holder.wait()
        assert holder.stderr is not None
        holder.stderr.close()
    # The kernel dropped the dead holder's lock: the next writer recovers and proceeds.
    rrome.recover(model)
    k = state_of(model, oracle, {0, 1})
    rrome.apply_deltas(model, oracle.deltas, again=True)
    assert state_of(model, oracle, {k + 1}) == k + 1


# --- `rrome apply` (the torch path) killed while it writes --------------------------------

DRIVER = textwrap.dedent(
    """
    import sys
    from rrome.engine.editor import Editor
    from rrome.cli import main

    real = Editor.from_pretrained.__func__
    hp = {"v_num_grad_steps": 2, "stats_max_tokens": 1000, "context_template_lengths": ((2, 3),)}

    def quick(cls, model_dir, **kwargs):
        return real(cls, model_dir, **{**kwargs, "hparams": hp})

    Editor.from_pretrained = classmethod(quick)
    main(sys.argv[1:])
    """
)


def test_rrome_apply_killed_while_writing(tmp_path: Path, tiny_dir: Callable[..., Path]) -> None:
    pristine = tiny_dir("gpt2")
    model = tmp_path / "model"
    shutil.copytree(pristine, model)
    edits = tmp_path / "edits.jsonl"
    facts = [("France", "London")]
    edits.write_text(
        "".join(json.dumps({"prompt": "The capital of {} is", "subject": s, "target_new": t}) + "\n" for s, t in facts)
    )
    env = dict(os.environ, RROME_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.pop("RROME_CRASH_AT", None)
    args = ["apply", str(edits), str(model), "--layer", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], env=env, stderr=subprocess.PIPE)
    t0 = time.perf_counter()
    while proc.poll() is None and not lock_names(model, proc.pid):
        assert time.perf_counter() - t0 < 300, "rrome apply never started writing"
        time.sleep(0.0002)
    time.sleep(random.Random(SEED).uniform(0.0, 0.01))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    assert proc.returncode in (0, -signal.SIGKILL), err

    out = run_cli("recover", model)
    assert out.returncode == 0, out.stderr
    assert rrome.inspect(model).pending == []
    log = rrome.load_deltas(model) if (model / "rrome_edits.jsonl").exists() else []
    if not log:  # rolled back: the original bytes
        assert shard_hashes(model) == shard_hashes(pristine)
    else:  # committed: exactly the logged deltas written into the pristine bytes
        assert [r.batch for r in log] == [1]
        assert [r.delta.meta["request"]["subject"] for r in log if r.delta.meta] == [s for s, _ in facts]
        oracle = tmp_path / "oracle"
        shutil.copytree(pristine, oracle)
        rrome.apply_deltas(oracle, [r.delta for r in log], again=True)
        assert shard_hashes(model) == shard_hashes(oracle)
        assert rrome.revert(model) == [1]
        assert shard_hashes(model) == shard_hashes(pristine)
    assert RROME_EXE.exists()

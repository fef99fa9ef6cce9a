"""A second writer on a locked model folder fails at once and names the holder."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import rrome

HOLDER = """
import fcntl, os, sys, time
lock = os.path.join(sys.argv[1], ".rrome", "lock")
os.makedirs(os.path.dirname(lock), exist_ok=True)
f = open(lock, "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.truncate(0); f.write(f"pid {os.getpid()}, command 'holder'"); f.flush()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_writer_fails_fast_naming_the_holder(tiny_copy: Callable[..., Path]) -> None:
    model = tiny_copy("gpt2")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(model)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = (model / "model.safetensors").read_bytes()
        delta = rrome.Delta("transformer.h.0.mlp.c_proj.weight", np.ones(128), np.ones(64), layout="in_out")
        t0 = time.perf_counter()
        with pytest.raises(rrome.LockedError, match=f"pid {holder.pid}"):
            rrome.apply_deltas(model, [delta])
        assert time.perf_counter() - t0 < 5, "the second writer must not wait for the lock"
        with pytest.raises(rrome.LockedError):
            rrome.revert(model)
        assert (model / "model.safetensors").read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()
    # The kernel released the dead holder's lock: writing works again.
    delta = rrome.Delta("transformer.h.0.mlp.c_proj.weight", np.ones(128), np.ones(64), layout="in_out")
    assert rrome.apply_deltas(model, [delta]).batch == 1

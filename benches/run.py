"""Benchmarks of rrome's Rust core against the torch / transformers way of doing the same job.

Every comparison measures rrome and its baseline in the same run, on the same data, and
prints one line ``<name>  ours=<s>  baseline=<s>  speedup=<x>`` (median of ``--repeats``
runs), plus extra facts where they matter (accuracy, bytes written, peak memory). The same
records go to ``bench-results.json``.

    python benches/run.py                 # everything
    python benches/run.py --only moments  # names containing "moments"
    python benches/run.py --quick         # smaller sizes, for a smoke run

Not part of ``make test``: timings belong here, never in unit tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import rrome

RESULTS: list[dict[str, Any]] = []


def timed(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(name: str, ours: float, baseline: float, **extra: Any) -> None:
    speedup = baseline / ours
    extras = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"{name}  ours={ours:.4f}  baseline={baseline:.4f}  speedup={speedup:.2f}  {extras}".rstrip(), flush=True)
    RESULTS.append({"name": name, "ours_s": ours, "baseline_s": baseline, "speedup": speedup, **extra})


def exact_entries(batches: list[np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Σ k_i k_j over all keys for sampled (i, j), correctly rounded (math.fsum of exact products)."""
    cols = np.concatenate(batches).astype(np.float64)
    return np.array([math.fsum((cols[:, i] * cols[:, j]).tolist()) for i, j in pairs])


def rel_err(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.linalg.norm(approx - exact) / np.linalg.norm(exact))


def bench_moments(d: int, n_batches: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    # Post-activation-like keys: non-negative with a common offset, so sums grow and f32 drifts.
    batches = [(np.abs(rng.standard_normal((4096, d))) + 0.5).astype(np.float32) for _ in range(n_batches)]
    pairs = rng.integers(0, d, size=(64, 2))
    exact = exact_entries(batches, pairs)

    def ours() -> np.ndarray:
        m = rrome.SecondMoment(d)
        for b in batches:
            m.update(b)
        return m.sum()

    def torch64() -> np.ndarray:
        acc = torch.zeros(d, d, dtype=torch.float64)
        for b in batches:
            k = torch.from_numpy(b).double()
            acc.addmm_(k.T, k)
        return acc.numpy()

    def torch32() -> np.ndarray:
        acc = torch.zeros(d, d, dtype=torch.float32)
        for b in batches:
            k = torch.from_numpy(b)
            acc.addmm_(k.T, k)
        return acc.numpy()

    errs = {}
    for label, fn in (("ours", ours), ("f64", torch64), ("f32", torch32)):
        full = fn()
        errs[label] = rel_err(full[pairs[:, 0], pairs[:, 1]].astype(np.float64), exact)
    t_ours = timed(ours, repeats)
    t64 = timed(torch64, repeats)
    t32 = timed(torch32, repeats)
    n = 4096 * n_batches
    report(f"moments-d{d}-vs-torch-f64", t_ours, t64, d=d, keys=n, rel_err_ours=errs["ours"], rel_err_base=errs["f64"])
    report(f"moments-d{d}-vs-torch-f32", t_ours, t32, d=d, keys=n, rel_err_ours=errs["ours"], rel_err_base=errs["f32"])


def bench_solve(d: int, n_rhs: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(d, d // 4, dtype=torch.float64, generator=g)
    c0 = (b @ b.T) / d + torch.eye(d, dtype=torch.float64)
    ks = torch.randn(n_rhs, d, dtype=torch.float64, generator=g)
    c0_np, ks_np = c0.numpy(), ks.numpy()

    def ours() -> list[np.ndarray]:
        chol = rrome.Cholesky(c0_np)
        return [chol.solve(k) for k in ks_np]

    def baseline() -> list[torch.Tensor]:
        inv = torch.inverse(c0)
        return [inv @ k for k in ks]

    resid = max(float(np.linalg.norm(c0_np @ x - k) / np.linalg.norm(k)) for x, k in zip(ours(), ks_np, strict=True))
    report(f"solve-d{d}", timed(ours, repeats), timed(baseline, repeats), d=d, solves=n_rhs, max_rel_residual=resid)


def run_measured(cmd: list[str]) -> tuple[float, int]:
    """Runs a command; returns wall time and its peak RSS in MiB (measured by a wrapper process)."""
    wrapper = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout
    secs, rss_kib = out.split()
    return float(secs), int(rss_kib) // 1024


BASELINE_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
import rrome
src, bundle, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
params = dict(model.named_parameters())
with torch.no_grad():
    for rec in rrome.load_deltas(bundle):
        d = rec.delta
        p = params[d.tensor.removesuffix(".weight") + ".weight"]
        upd = torch.outer(torch.tensor(d.r) * d.scale, torch.tensor(d.u))
        p += (upd.T if d.layout == "in_out" else upd).to(p.dtype)
model.save_pretrained(out)
"""


def bench_apply(work: Path, dtype: str, repeats: int, quick: bool) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    layers, width = (4, 256) if quick else (24, 1024)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).to(torch.float32 if dtype == "f32" else torch.bfloat16)
    nparams = sum(p.numel() for p in model.parameters())
    nbytes = nparams * (4 if dtype == "f32" else 2)
    src = work / f"gpt2m-{dtype}"
    model.save_pretrained(src, max_shard_size=f"{nbytes // 2 // 1_000_000 + 10}MB")
    del model
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    rng = np.random.default_rng(0)
    deltas = [
        rrome.Delta(
            f"transformer.h.{i % layers}.mlp.c_proj.weight",
            rng.standard_normal(4 * width).astype(np.float32) * 1e-2,
            rng.standard_normal(width).astype(np.float32) * 1e-2,
            layout="in_out",
        )
        for i in range(10)
    ]
    bundle = work / f"bundle-{dtype}"
    rrome.save_deltas(bundle, deltas)
    rrome_bin = [sys.executable, "-m", "rrome.cli"]
    name = f"apply-gpt2m-{dtype}" if not quick else f"apply-gpt2small-{dtype}"

    def baseline_once() -> float:
        out = work / "baseline-out"
        shutil.rmtree(out, ignore_errors=True)
        secs, _ = run_measured([sys.executable, "-c", BASELINE_SCRIPT, str(src), str(bundle), str(out)])
        shutil.rmtree(out)
        return secs

    t_base = statistics.median(baseline_once() for _ in range(repeats))

    # In place: each run is one more batch; the report gives bytes written for one batch.
    runs, rss = [], []
    for _ in range(repeats):
        secs, peak = run_measured([*rrome_bin, "apply-deltas", str(bundle), str(src)])
        runs.append(secs)
        rss.append(peak)
    rep = rrome.apply_deltas(src, [deltas[0]])  # one more, in-process, to read the byte counts of a batch
    rrome.revert(src, all=True)
    full = rrome.apply_deltas(src, deltas)
    written_ratio = full["bytes_written"] / full["tensor_bytes"]
    rrome.revert(src, all=True)
    del rep
    report(
        f"{name}-inplace",
        statistics.median(runs),
        t_base,
        params=nparams,
        shards=len(shards),
        bytes_written_over_tensor_bytes=written_ratio,
        peak_rss_mib=max(rss),
        shard_mib=max((src / s).stat().st_size for s in shards) // 2**20,
    )

    def copy_once() -> float:
        out = work / "copy-out"
        shutil.rmtree(out, ignore_errors=True)
        secs, _ = run_measured([*rrome_bin, "apply-deltas", str(bundle), str(src), "--out", str(out)])
        shutil.rmtree(out)
        return secs

    report(f"{name}-copy", statistics.median(copy_once() for _ in range(repeats)), t_base, params=nparams)
    shutil.rmtree(src)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only benchmarks whose name contains this")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the reported figures)")
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dims = (256, 512) if args.quick else (2048, 6400)
    jobs: list[tuple[str, Callable[[], None]]] = []
    for d in dims:
        jobs.append((f"moments-d{d}", lambda d=d: bench_moments(d, 2 if args.quick else 16, args.repeats)))
    for d in dims:
        jobs.append((f"solve-d{d}", lambda d=d: bench_solve(d, 100, args.repeats)))
    work = Path(tempfile.mkdtemp(prefix="rrome-bench-"))
    try:
        for dtype in ("f32", "bf16"):
            job = lambda dtype=dtype: bench_apply(work, dtype, args.repeats, args.quick)  # noqa: E731
            jobs.append((f"apply-gpt2m-{dtype}", job))
        for name, job in jobs:
            if args.only in name:
                job()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("edit-gemma270m, stats-gemma270m: not wired into the benchmarks yet; skipped")
    args.out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

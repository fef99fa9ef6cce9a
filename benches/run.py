"""Benchmarks of rrome's Rust core against the torch / transformers way of doing the same job.

Every comparison measures rrome and its baseline in the same run, on the same data, and
prints one line ``<name>  ours=<s>  baseline=<s>  speedup=<x>`` (median of ``--repeats``
runs), plus extra facts where they matter (accuracy, bytes written, peak memory). The same
records go to ``bench-results.json``.

    python benches/run.py                 # everything
    python benches/run.py --only moments  # names containing "moments"
    python benches/run.py --quick         # smaller sizes, for a smoke run

Comparisons: ``moments-d*`` (SecondMoment.update vs torch addmm in f64 and in f32),
``solve-d*`` (Cholesky + 100 solves vs torch.inverse + 100 mat-vecs), ``retain-d*-m*``
(retaining m earlier edits' keys and one later edit's solve: rank-one updates of C0's factor vs
the Woodbury solve rrome used before; ``retain-d2048-m10000-scale``: 10,000 keys, one more edit
against refactorising C0 plus the keys), ``apply-gpt2m-*``
(``rrome apply-deltas`` of 10 deltas into one tensor, in place / to a copy / to a copy with
``--link-untouched``, and in place spread over 10 tensors, vs transformers load + W += Δ + save),
``stats-gemma270m`` and ``edit-gemma270m`` (the Gemma 3 270M demo model: C0 collection, and
one edit with the packaged defaults against the ``reference`` preset; skipped with a message
where the model cannot be installed; ``--only value-gemma270m`` adds the fast value
optimisation against the plain loop), and ``stats-workers`` when ``benches/stats_workers.py``
exists, and ``seq-gemma270m-n100`` (100 sequential edits with retention against the same
edits one at a time; ``--seq-n`` sets the count). Each record also carries the 1-minute load
average at the time it was measured: on a shared machine, a high one means noisy figures.

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


def report(name: str, ours: float, baseline: float, **extra: Any) -> None:
    speedup = baseline / ours
    extras = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in extra.items())
    print(f"{name}  ours={ours:.4f}  baseline={baseline:.4f}  speedup={speedup:.2f}  {extras}".rstrip(), flush=True)
    load = os.getloadavg()[0]
    RESULTS.append(
        {"name": name, "ours_s": ours, "baseline_s": baseline, "speedup": speedup, **extra, "load_avg": load}
    )


def exact_entries(batches: list[np.ndarray], pairs: np.ndarray) -> np.ndarray:
    """Σ k_i k_j over all keys for sampled (i, j), correctly rounded (math.fsum of exact products)."""
    idx, inv = np.unique(pairs, return_inverse=True)
    cols = np.concatenate([b[:, idx] for b in batches]).astype(np.float64)
    inv = inv.reshape(pairs.shape)
    return np.array([math.fsum((cols[:, i] * cols[:, j]).tolist()) for i, j in inv])


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

    # Interleaved (ours, f64, f32, ours, ...): on a shared machine all three see the same load.
    errs: dict[str, float] = {}
    times: dict[str, list[float]] = {"ours": [], "f64": [], "f32": []}
    for _ in range(repeats):
        for label, fn in (("ours", ours), ("f64", torch64), ("f32", torch32)):
            t0 = time.perf_counter()
            full = fn()
            times[label].append(time.perf_counter() - t0)
            if label not in errs:
                errs[label] = rel_err(full[pairs[:, 0], pairs[:, 1]].astype(np.float64), exact)
            del full
    t_ours, t64, t32 = (statistics.median(times[k]) for k in ("ours", "f64", "f32"))
    n = 4096 * n_batches
    report(f"moments-d{d}-vs-torch-f64", t_ours, t64, d=d, keys=n, rel_err_ours=errs["ours"], rel_err_base=errs["f64"])
    report(f"moments-d{d}-vs-torch-f32", t_ours, t32, d=d, keys=n, rel_err_ours=errs["ours"], rel_err_base=errs["f32"])


def bench_solve(d: int, n_rhs: int, repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    b = torch.randn(d, d // 4, dtype=torch.float64, generator=g)
    c0 = (b @ b.T) / d + torch.eye(d, dtype=torch.float64)
    ks = torch.randn(n_rhs, d, dtype=torch.float64, generator=g)
    c0_np, ks_np = c0.numpy(), ks.numpy()

    def ours() -> tuple[float, float, list[np.ndarray]]:
        t0 = time.perf_counter()
        chol = rrome.Cholesky(c0_np)
        t1 = time.perf_counter()
        xs = [chol.solve(k) for k in ks_np]
        return t1 - t0, time.perf_counter() - t1, xs

    def baseline() -> tuple[float, float, list[torch.Tensor]]:
        t0 = time.perf_counter()
        inv = torch.inverse(c0)
        t1 = time.perf_counter()
        xs = [inv @ k for k in ks]
        return t1 - t0, time.perf_counter() - t1, xs

    phases: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        for label, fn in (("ours", ours), ("base", baseline)):
            f, s, _ = fn()
            phases[label].append((f, s))
    resid = max(float(np.linalg.norm(c0_np @ x - k) / np.linalg.norm(k)) for x, k in zip(ours()[2], ks_np, strict=True))
    o, b = phases["ours"], phases["base"]
    report(
        f"solve-d{d}",
        statistics.median(f + s for f, s in o),
        statistics.median(f + s for f, s in b),
        d=d,
        solves=n_rhs,
        max_rel_residual=resid,
        factor_s=statistics.median(f for f, _ in o),
        solves_s=statistics.median(s for _, s in o),
        inverse_s=statistics.median(f for f, _ in b),
        matvecs_s=statistics.median(s for _, s in b),
    )


def _retain_problem(d: int, m: int) -> tuple[np.ndarray, Any, np.ndarray, np.ndarray, float]:
    """The retention benches' problem, seeded: a well-conditioned C0 (a low-rank part plus the
    identity) and its factor, m earlier keys, one new key and λ = 10."""
    rng = np.random.default_rng(0)
    b = rng.standard_normal((d, d // 4))
    c0 = (b @ b.T) / d + np.eye(d)
    return c0, rrome.Cholesky(c0), rng.standard_normal((m, d)), rng.standard_normal(d), 10.0


def bench_retain(d: int, m: int, repeats: int) -> None:
    """Retention of m earlier edits' keys at width d (rrome.engine.retain): the seconds one more
    sequential edit costs once m keys are retained (retaining a key, the mean over the m, plus
    one solve against all of them), rank-one updates of a copy of C0's factor (ours) against the
    Woodbury solve on C0's factor that rrome used before (baseline: each key solved once, each
    edit an m × m system built from all of them). The extra fields give both parts."""
    from rrome.engine.retain import RetainedKeys

    _, chol, keys, k, lam = _retain_problem(d, m)

    def ours() -> tuple[float, float, np.ndarray]:
        t0 = time.perf_counter()
        rk = RetainedKeys(chol, lam)
        for key in keys:
            rk.add(key)
        t1 = time.perf_counter()
        x = rk.solve(k)
        return t1 - t0, time.perf_counter() - t1, x

    def woodbury() -> tuple[float, float, np.ndarray]:
        t0 = time.perf_counter()
        scaled, solved = [], []
        for key in keys:
            z = chol.solve(key)
            s = 1.0 / math.sqrt(float(key @ z))
            scaled.append(key * s)
            solved.append(z * s)
        t1 = time.perf_counter()
        y = chol.solve(k)
        K, Z = np.stack(scaled, axis=1), np.stack(solved, axis=1)
        gram = K.T @ Z
        coef = np.linalg.solve((gram + gram.T) / 2 + np.eye(m) / lam, K.T @ y)
        return t1 - t0, time.perf_counter() - t1, y - Z @ coef

    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "base": []}
    xs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for label, fn in (("ours", ours), ("base", woodbury)):
            add, solve, xs[label] = fn()
            runs[label].append((add, solve))
    o, w = runs["ours"], runs["base"]
    # The headline is the cost of one more sequential edit once m keys are retained: retaining
    # its key (the mean over the m) and solving against all of them.
    report(
        f"retain-d{d}-m{m}",
        statistics.median(a / m + s for a, s in o),
        statistics.median(a / m + s for a, s in w),
        add_ours_s=statistics.median(a for a, _ in o),
        add_base_s=statistics.median(a for a, _ in w),
        solve_ours_s=statistics.median(s for _, s in o),
        solve_base_s=statistics.median(s for _, s in w),
        rel_diff=rel_err(xs["ours"], xs["base"]),
        extra_memory_mb=(d * d * 8 + m * d * 8) / 2**20,
    )


def bench_retain_scale(d: int, m: int) -> None:
    """``retain-d{d}-m{m}-scale``: a lifelong folder's m retained keys. Ours: every key folded
    into a copy of C0's factor (rank-one updates), then one more edit (its key added and one
    solve). Baseline: the fastest way without updating a factor, C = C0 + Σ w k kᵀ kept as a
    matrix (each key one O(d²) outer product) and factorised again for the edit (numpy's
    Cholesky, then two triangular solves). Extra fields: the seconds to retain all m keys, the
    memory the retained state holds, and the two solutions' relative difference."""
    from rrome.engine.retain import RetainedKeys

    c0, chol, keys, k, lam = _retain_problem(d, m)
    rk = RetainedKeys(chol, lam)
    t0 = time.perf_counter()
    for at in range(0, m, 500):
        rk.add_many(keys[at : at + 500])
    add_all = time.perf_counter() - t0
    t0 = time.perf_counter()
    rk.add(keys[-1])
    x = rk.solve(k)
    ours = time.perf_counter() - t0
    weights = lam / np.einsum("ij,ji->i", keys, np.linalg.solve(c0, keys.T))
    c = c0 + (keys.T * weights) @ keys
    t0 = time.perf_counter()
    c += weights[-1] * np.outer(keys[-1], keys[-1])
    lower = np.linalg.cholesky(c)
    y = np.linalg.solve(lower.T, np.linalg.solve(lower, k))
    base = time.perf_counter() - t0
    c -= weights[-1] * np.outer(keys[-1], keys[-1])
    ref = np.linalg.solve(c + weights[-1] * np.outer(keys[-1], keys[-1]), k)
    report(
        f"retain-d{d}-m{m}-scale",
        ours,
        base,
        baseline_is="refactorise C0 + retained keys per edit",
        retain_all_s=add_all,
        per_key_ms=1e3 * add_all / m,
        state_mb=(d * d * 8 + m * d * 8) / 2**20,
        rel_diff=rel_err(x, ref),
        rel_diff_base=rel_err(y, ref),
    )


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
    """10 deltas into one tensor (ROME writes every edit into the same layer's projection), in
    place and to a copy; then the same 10 deltas spread over 10 layers' tensors, in place."""
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
    edit_layer = layers // 3  # a third of the depth, where ROME edits (layer 8 of GPT-2 medium)

    def make_bundle(label: str, spread: bool) -> tuple[Path, list[Any]]:
        deltas = [
            rrome.Delta(
                f"transformer.h.{i % layers if spread else edit_layer}.mlp.c_proj.weight",
                rng.standard_normal(4 * width).astype(np.float32) * 1e-2,
                rng.standard_normal(width).astype(np.float32) * 1e-2,
                layout="in_out",
            )
            for i in range(10)
        ]
        bundle = work / f"bundle-{dtype}-{label}"
        rrome.save_deltas(bundle, deltas)
        return bundle, deltas

    rrome_bin = [sys.executable, "-m", "rrome.cli"]
    name = f"apply-gpt2m-{dtype}" if not quick else f"apply-gpt2small-{dtype}"
    bundle, deltas = make_bundle("one-tensor", spread=False)

    def baseline_once() -> tuple[float, int]:
        out = work / "baseline-out"
        shutil.rmtree(out, ignore_errors=True)
        measured = run_measured([sys.executable, "-c", BASELINE_SCRIPT, str(src), str(bundle), str(out)])
        shutil.rmtree(out)
        return measured

    base_runs = [baseline_once() for _ in range(repeats)]
    t_base = statistics.median(secs for secs, _ in base_runs)

    def in_place(line: str, bundle: Path, deltas: list[Any]) -> None:
        # Each run is one more batch of the same 10 deltas (all reverted afterwards).
        runs, rss = [], []
        for _ in range(repeats):
            secs, peak = run_measured([*rrome_bin, "apply-deltas", str(bundle), str(src)])
            runs.append(secs)
            rss.append(peak)
        rrome.revert(src, all=True)
        # One batch in-process, to read its byte counts: the edited tensors, the undo journal
        # (their original bytes) and the edit log (the factors, which make revert exact).
        full = rrome.apply_deltas(src, deltas)
        log_bytes = sum((src / f).stat().st_size for f in ("rrome_edits.jsonl", "rrome_deltas.safetensors"))
        rrome.revert(src, all=True)
        report(
            line,
            statistics.median(runs),
            t_base,
            params=nparams,
            shards=len(shards),
            edited_tensors=len(full.tensors),
            tensor_mib=full.tensor_bytes / 2**20,
            bytes_written_over_tensor_bytes=full.bytes_written / full.tensor_bytes,
            tensor_plus_journal_over_tensor_bytes=(full.bytes_written - log_bytes) / full.tensor_bytes,
            peak_rss_mib=max(rss),
            baseline_peak_rss_mib=max(r for _, r in base_runs),
            shard_mib=max((src / s).stat().st_size for s in shards) // 2**20,
        )

    in_place(f"{name}-inplace", bundle, deltas)

    def copy_once(*flags: str) -> float:
        out = work / "copy-out"
        shutil.rmtree(out, ignore_errors=True)
        secs, _ = run_measured([*rrome_bin, "apply-deltas", str(bundle), str(src), "--out", str(out), *flags])
        shutil.rmtree(out)
        return secs

    # A copy that shares nothing (the default), then one that hard-links the untouched shard.
    report(f"{name}-copy", statistics.median(copy_once() for _ in range(repeats)), t_base, params=nparams)
    linked = statistics.median(copy_once("--link-untouched") for _ in range(repeats))
    report(f"{name}-copy-link-untouched", linked, t_base, params=nparams)
    # The same 10 deltas spread over 10 layers: ten times the tensor bytes to journal and write.
    in_place(f"{name}-inplace-10tensors", *make_bundle("ten-tensors", spread=True))
    shutil.rmtree(src)


# --- Gemma 3 270M: statistics and one edit ------------------------------------------------


class TorchF32Moment:
    """Original ROME's accumulation, ``mom2 += kᵀ k`` in float32 torch (the stats baseline)."""

    def __init__(self, d: int) -> None:
        self.acc = torch.zeros(d, d, dtype=torch.float32)
        self.count = 0

    def update(self, keys: np.ndarray) -> None:
        k = torch.from_numpy(keys)
        self.acc.addmm_(k.T, k)
        self.count += keys.shape[0]


def bench_gemma(repeats: int, quick: bool, only: str) -> None:
    """``stats-gemma270m`` and ``edit-gemma270m`` on the demo model (cached C0 for the edit)."""
    from rrome.demo import demo_model_dir
    from rrome.engine import editor as editor_mod
    from rrome.engine import stats as stats_mod
    from rrome.files.corpus import corpus_texts, default_corpus

    try:
        model_dir = demo_model_dir()
    except Exception as e:  # any failure to install the model skips these two
        print(f"stats-gemma270m, edit-gemma270m: skipped (demo model unavailable: {e})")
        return
    overrides = {"v_num_grad_steps": 2} if quick else {}
    editor = editor_mod.Editor.from_pretrained(model_dir, progress=False, hparams=overrides)
    module = editor.module_name

    if only in "stats-gemma270m":
        # 3 × 2 collections of 2,000 tokens: about a minute and a half at ~150 tokens/s.
        tokens = 500 if quick else 2_000
        texts = corpus_texts(default_corpus())

        def collect(n_tokens: int = tokens) -> Any:
            return stats_mod.collect_second_moment(
                editor.model, editor.tokenizer, module, texts=texts, max_tokens=n_tokens, progress=False
            )

        collect(256)  # warm-up (tokenizer caches, first-call allocations)
        n = max(1, min(repeats, 3))
        times: dict[str, list[float]] = {"ours": [], "base": []}
        for _ in range(n):  # interleaved: both see the same machine load
            for label in ("ours", "base"):
                orig = stats_mod.SecondMoment
                if label == "base":
                    stats_mod.SecondMoment = TorchF32Moment
                try:
                    t0 = time.perf_counter()
                    m = collect()
                    times[label].append(time.perf_counter() - t0)
                finally:
                    stats_mod.SecondMoment = orig
                assert m.count == tokens
        t_ours, t_base = statistics.median(times["ours"]), statistics.median(times["base"])
        report(
            "stats-gemma270m",
            t_ours,
            t_base,
            tokens=tokens,
            d=int(m.acc.shape[0]),
            layer=editor.layer,
            tok_per_s_ours=tokens / t_ours,
            tok_per_s_base=tokens / t_base,
        )

    if only in "edit-gemma270m" or only == "value-gemma270m":
        bench_edits(model_dir, editor, repeats, quick, only)


def bench_edits(model_dir: Path, default: Any, repeats: int, quick: bool, only: str) -> None:
    """``edit-gemma270m``: one whole edit (keys, value optimisation, update, the before/after
    probabilities; C0 and the templates cached) with the packaged defaults against the
    ``reference`` preset, each from the unedited weight. ``value-gemma270m`` (only when asked
    for by name): the fast value optimisation against the plain loop, reference preset."""
    from rrome.engine import editor as editor_mod
    from rrome.engine import values as values_mod
    from rrome.engine.hooks import get_module
    from rrome.files.edits import load_requests
    from rrome.files.hparams import spec_overrides

    request = load_requests(Path(__file__).resolve().parent.parent / "examples" / "edits.jsonl")[0]
    overrides = {"v_num_grad_steps": 2} if quick else {}
    hparams = spec_overrides("reference")
    hparams.update(overrides)
    reference = editor_mod.Editor.from_pretrained(model_dir, progress=False, hparams=hparams)
    value_s: list[float] = []

    def edit_once(editor: Any, fast: bool = True) -> tuple[float, int, str, float, list[float]]:
        weight = get_module(editor.model, editor.module_name).weight
        original = weight.detach().clone()

        def timed_value(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = values_mod.compute_value(*a, **kw, fast=fast)
            value_s.append(time.perf_counter() - t0)
            return out

        editor_mod.compute_value = timed_value
        try:
            t0 = time.perf_counter()
            res = editor.edit(request)
            secs = time.perf_counter() - t0
        finally:
            editor_mod.compute_value = values_mod.compute_value
            with torch.no_grad():
                weight.copy_(original)  # each edit starts from the unedited model
            editor.pending.clear()
            editor.results.clear()
        return secs, res.steps, res.stop, value_s[-1], list(res.losses)

    for e in (default, reference):
        e.templates()  # generated (or read) once per editor, outside the timing
        e.cholesky()  # cached statistics and factor
    n = max(1, min(repeats, 3))
    if only in "edit-gemma270m":
        runs: dict[str, list[tuple[float, int, str, float, list[float]]]] = {"default": [], "reference": []}
        for _ in range(n):  # interleaved: both see the same machine load
            runs["default"].append(edit_once(default))
            runs["reference"].append(edit_once(reference))
        d, r = runs["default"], runs["reference"]
        report(
            "edit-gemma270m",
            statistics.median(x[0] for x in d),
            statistics.median(x[0] for x in r),
            baseline_is="reference preset",
            layer=default.layer,
            threads=torch.get_num_threads(),
            steps_default=d[0][1],
            stop_default=d[0][2],
            steps_reference=r[0][1],
            value_s_default=statistics.median(x[3] for x in d),
            value_s_reference=statistics.median(x[3] for x in r),
        )
    if only == "value-gemma270m":
        fast = [edit_once(reference, True) for _ in range(n)]
        plain = [edit_once(reference, False) for _ in range(n)]
        report(
            "value-gemma270m",
            statistics.median(x[3] for x in fast),
            statistics.median(x[3] for x in plain),
            baseline_is="plain loop",
            steps=fast[0][1],
            max_loss_diff=max(abs(a - b) for a, b in zip(fast[0][4], plain[0][4], strict=False)),
        )


SEQ_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact" / "counterfact-val.json"
"""The sequential bench's edits: CounterFact val records from 1,001 on (no run in docs/results
reads them), beside the checkout as ``../shared/data``; ``$RROME_SHARED_DATA`` overrides."""

PHASES = ("before", "setup", "keys", "shield", "value", "update", "after")


def bench_sequential(n: int) -> None:
    """``seq-gemma270m-n<N>``: N edits of the demo model made one after another with retention
    (the packaged defaults and ``retain_edit_keys``: each edit solved against C0 and every
    earlier key), against the same N edits made one at a time, each into the unedited weight
    (``Editor.tentative``). Both with C0 and the templates cached. The extra fields give edits
    per minute and, per mode, the share of the time each phase of an edit took
    (``EditResult.timings``)."""
    from rrome.demo import demo_model_dir
    from rrome.engine.editor import Editor
    from rrome.files.edits import load_requests

    root = os.environ.get("RROME_SHARED_DATA")
    data = Path(root) / "counterfact" / "counterfact-val.json" if root else SEQ_DATA
    if not data.is_file():
        print(f"seq-gemma270m-n{n}: skipped ({data} is not here)")
        return
    try:
        model_dir = demo_model_dir()
    except Exception as e:  # any failure to install the model skips the line
        print(f"seq-gemma270m-n{n}: skipped (demo model unavailable: {e})")
        return
    requests = load_requests(data)[1000 : 1000 + n]
    editor = Editor.from_pretrained(model_dir, progress=False, hparams={"retain_edit_keys": True})
    editor.templates()
    editor.cholesky()
    one = editor.copy(hparams=editor.hparams.with_overrides(retain_edit_keys=False))
    weight = editor.edited_weight().detach().clone()

    t0 = time.perf_counter()
    singles = []
    for request in requests:
        with one.tentative(request) as result:
            singles.append(result)
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    sequential = [editor.edit(request, queue=False) for request in requests]
    t_seq = time.perf_counter() - t0
    retained = len(editor.retained_keys)
    editor.restore(weight)

    def shares(results: list[Any]) -> dict[str, float]:
        total = sum(sum(r.timings.values()) for r in results)
        return {f"{p}_share": sum(r.timings.get(p, 0.0) for r in results) / total for p in PHASES}

    report(
        f"seq-gemma270m-n{n}",
        t_seq,
        t_single,
        baseline_is="the same edits one at a time",
        edits_per_min_seq=60 * n / t_seq,
        edits_per_min_single=60 * n / t_single,
        steps_seq=statistics.mean(r.steps for r in sequential),
        steps_single=statistics.mean(r.steps for r in singles),
        retained_at_end=retained,
        **{f"seq_{k}": v for k, v in shares(sequential).items()},
        **{f"single_{k}": v for k, v in shares(singles).items()},
    )


def bench_stats_workers(path: Path, quick: bool) -> None:
    """The optional ``stats-workers`` line (1 vs 2 torchrun workers), from its own script."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location("stats_workers", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        rec = mod.bench(tokens=4_000) if quick else mod.bench()
    except Exception as e:  # an optional line: report and go on
        print(f"stats-workers: skipped ({type(e).__name__}: {e})")
        return
    rec["load_avg"] = os.getloadavg()[0]
    RESULTS.append(rec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run only benchmarks whose name contains this")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--large-repeats",
        type=int,
        default=1,
        help="runs of moments-d6400 (one run of its three variants takes about 10 minutes on 2 cores)",
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the reported figures)")
    ap.add_argument("--seq-n", type=int, default=100, help="edits of the seq-gemma270m line")
    ap.add_argument("--out", type=Path, default=Path("bench-results.json"))
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    dims = (256, 512) if args.quick else (2048, 6400)
    jobs: list[tuple[str, Callable[[], None]]] = []
    for d in dims:
        reps = args.repeats if d < 4096 else min(args.repeats, args.large_repeats)
        jobs.append((f"moments-d{d}", lambda d=d, reps=reps: bench_moments(d, 2 if args.quick else 16, reps)))
    for d in dims:
        jobs.append((f"solve-d{d}", lambda d=d: bench_solve(d, 100, args.repeats)))
    retain_sizes = ((256, 100), (256, 500)) if args.quick else ((2048, 100), (2048, 1000), (2048, 4000))
    for d, m in retain_sizes:
        jobs.append((f"retain-d{d}-m{m}", lambda d=d, m=m: bench_retain(d, m, 1 if m > 1000 else args.repeats)))
    scale = (256, 2000) if args.quick else (2048, 10_000)
    jobs.append((f"retain-d{scale[0]}-m{scale[1]}-scale", lambda: bench_retain_scale(*scale)))
    work = Path(tempfile.mkdtemp(prefix="bench_rrome-"))
    try:
        for dtype in ("f32", "bf16"):
            job = lambda dtype=dtype: bench_apply(work, dtype, args.repeats, args.quick)  # noqa: E731
            jobs.append((f"apply-gpt2m-{dtype}", job))
        for name, job in jobs:
            if args.only in name:
                job()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.only in "stats-gemma270m" or args.only in "edit-gemma270m" or args.only == "value-gemma270m":
        bench_gemma(args.repeats, args.quick, args.only)
    seq_n = 5 if args.quick else args.seq_n
    if args.only in f"seq-gemma270m-n{seq_n}":
        bench_sequential(seq_n)
    workers = Path(__file__).with_name("stats_workers.py")
    if workers.is_file() and args.only in "stats-workers":
        bench_stats_workers(workers, args.quick)
    args.out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    print(f"wrote {args.out}  (load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()

"""Benchmark: C0 statistics throughput with 1 and 2 worker processes on this machine.

The same job, ``rrome.engine.stats.second_moment`` over the same tokens of the packaged corpus, runs
once as a single process using every core (the baseline) and once as two torch.distributed
workers (gloo) started by :func:`rrome.engine.distributed.launch` (what ``rrome stats --nproc 2``
does), each on half the cores and its half of the batches, their sums all-reduced (ours). The
time is the collection itself, measured by rank 0 between two barriers after the model is
loaded (process start-up and imports are reported apart as ``wall``). The model is a small
GPT-2-shaped checkpoint with random weights built here (key width ``--d-ff``), so the bench
needs no download.

    python benches/stats_workers.py                # prints one line and returns a dict
    python benches/stats_workers.py --tokens 20000 --d-ff 1024

Prints ``stats-workers  ours=<2-worker s>  baseline=<1-worker s>  speedup=<x>  ...``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORKER_FLAG = "--worker"


def build_model(dest: Path, *, d_model: int, d_ff: int, n_layer: int) -> Path:
    """A random GPT-2 checkpoint with a small byte-level BPE tokenizer trained on the corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from rrome.files.corpus import default_corpus

    text = default_corpus().read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(dest)
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=max(1, d_model // 64),
        n_inner=d_ff,
        n_positions=256,
        vocab_size=tok.get_vocab_size(),
        bos_token_id=0,
        eos_token_id=0,
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(dest)
    return dest


def worker(model_dir: Path, tokens: int, layer: int, result: Path) -> None:
    """One worker (or the single process): load, then time ``second_moment`` between barriers."""
    import torch

    from rrome.engine import distributed, stats
    from rrome.engine.models import load

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with distributed.session("cpu") as info:
        model, tokenizer, adapter = load(model_dir, device="cpu")
        if info is not None:
            distributed.barrier(info)
        t0 = time.perf_counter()
        moment, _ = stats.second_moment(
            model_dir, model, tokenizer, adapter, layer, max_tokens=tokens, refresh=True, progress=False
        )
        if info is not None:
            distributed.barrier(info)
        seconds = time.perf_counter() - t0
        if info is None or info.is_main:
            result.write_text(json.dumps({"seconds": seconds, "count": moment.count, "d": moment.d}))


def run_workers(model_dir: Path, nproc: int, *, tokens: int, layer: int, threads: int, work: Path) -> dict[str, Any]:
    from rrome.engine import distributed

    result = work / f"result-{nproc}.json"
    env = dict(os.environ)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        RAYON_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        RROME_CACHE_DIR=str(work / "cache"),
    )
    argv = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(model_dir), str(tokens), str(layer)]
    t0 = time.perf_counter()
    distributed.launch([*argv, str(result)], nproc, env=env)
    wall = time.perf_counter() - t0
    out: dict[str, Any] = json.loads(result.read_text())
    out["wall"] = wall
    return out


def bench(tokens: int = 20_000, d_model: int = 256, d_ff: int = 1024, n_layer: int = 4) -> dict[str, Any]:
    """Runs both configurations and returns the figures (also printed as one line)."""
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="rrome-bench-workers-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model", d_model=d_model, d_ff=d_ff, n_layer=n_layer)
        layer = n_layer // 2
        one = run_workers(model_dir, 1, tokens=tokens, layer=layer, threads=cores, work=work)
        two = run_workers(model_dir, 2, tokens=tokens, layer=layer, threads=max(1, cores // 2), work=work)
    assert one["count"] == two["count"] == tokens, (one, two)
    rec = {
        "name": "stats-workers",
        "ours_s": two["seconds"],
        "baseline_s": one["seconds"],
        "speedup": one["seconds"] / two["seconds"],
        "tokens": tokens,
        "d": one["d"],
        "cores": cores,
        "tok_per_s_1": tokens / one["seconds"],
        "tok_per_s_2": tokens / two["seconds"],
        "wall_1": one["wall"],
        "wall_2": two["wall"],
    }
    print(
        f"stats-workers  ours={rec['ours_s']:.4f}  baseline={rec['baseline_s']:.4f}  speedup={rec['speedup']:.2f}  "
        f"tok/s_1={rec['tok_per_s_1']:.0f}  tok/s_2={rec['tok_per_s_2']:.0f}  d={rec['d']}  cores={cores}  "
        f"wall_1={one['wall']:.1f}  wall_2={two['wall']:.1f}",
        flush=True,
    )
    return rec


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        model_dir, tokens, layer, result = sys.argv[2:6]
        worker(Path(model_dir), int(tokens), int(layer), Path(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=1024, help="key width d of the edited module")
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    bench(args.tokens, args.d_model, args.d_ff, args.layers)


if __name__ == "__main__":
    main()

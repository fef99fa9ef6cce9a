"""Statistics across processes: torch.distributed (torchrun) workers, and a launcher of our own.

Collecting C0 costs N·d² flops (docs/design.md §5), and a moment is a count plus an f64 sum, so it
splits across workers exactly: each rank runs the model over its own share of the corpus
(:func:`rrome.engine.collect.collect_second_moment` with ``shard=(rank, world_size)``), and the partial
sums and counts are added by one all-reduce (:func:`allreduce_moment`). Nothing here is a
scheduler: under ``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) says who is who, and :func:`session` joins the process group
(gloo on CPU, nccl on GPU). :func:`launch` is the one-machine shortcut behind
``rrome stats --nproc N``: it starts N copies of a command with that environment set, and if
any of them fails it stops the others and says which one failed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rrome._rust import SecondMoment
from rrome.files.errors import RromeError

if TYPE_CHECKING:
    import torch

CRASH_RANK_ENV = "RROME_STATS_CRASH_RANK"
"""Test hook: the worker of this rank kills itself (SIGKILL) after its first batch of keys."""


class WorkerError(RromeError):
    """A statistics worker failed or died; no statistics were written."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a torch.distributed job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None outside one
    (or for a job of one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RromeError("RANK, WORLD_SIZE and LOCAL_RANK must be integers") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise RromeError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return rank, world, local


def worker_device(device: str | None) -> str | None:
    """The device a worker should use: under torchrun with GPUs, ``cuda:<LOCAL_RANK>`` for
    ``None`` or a bare ``"cuda"``; anything else as given."""
    world = env_world()
    if world is None or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{world[2] % torch.cuda.device_count()}"


def current() -> DistInfo | None:
    """The initialised process group this process belongs to (more than one process), or None."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    world = env_world()
    local = world[2] if world is not None else dist.get_rank()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


@contextmanager
def session(device: str | None) -> Iterator[DistInfo | None]:
    """Joins the torch.distributed job described by the environment, if there is one.

    Backend nccl when the worker runs on a CUDA device of its own, gloo otherwise (on CPU, or
    when more workers run on this machine than it has GPUs: NCCL needs one GPU per rank, and
    the single all-reduce of d² f64 values is cheap next to the forward passes). A process
    group that is already initialised is used as it is (and left open); one created here is
    destroyed on exit. Yields None outside a job (or in a job of one process).
    """
    world = env_world()
    if world is None:
        yield current()
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        yield current()
        return
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world[1])))
    on_gpu = device is not None and device.startswith("cuda")
    backend = "nccl" if on_gpu and local_world <= torch.cuda.device_count() else "gloo"
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def _comm_device(info: DistInfo) -> torch.device:
    import torch

    if info.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def allreduce_moment(moment: SecondMoment, info: DistInfo) -> SecondMoment:
    """The sum of every rank's partial moment, on every rank (collective: all ranks call it).

    The f64 sums are added by one all-reduce, the counts by another (int64); the widths are
    checked first. Addition is the same operation :meth:`SecondMoment.merge` does, so the
    result equals the single-process moment over the same keys up to the order of the f64
    additions. Metadata is not carried over.
    """
    import torch
    import torch.distributed as dist

    dev = _comm_device(info)
    dims = torch.tensor([moment.d, -moment.d, moment.count], dtype=torch.int64, device=dev)
    widths = dims[:2].clone()
    dist.all_reduce(widths, op=dist.ReduceOp.MAX)
    if int(widths[0]) != moment.d or int(widths[1]) != -moment.d:
        raise WorkerError(f"rank {info.rank}: workers disagree on the key width (d = {moment.d} here)")
    count = dims[2:].clone()
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    total = torch.from_numpy(moment.sum()).to(dev)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return SecondMoment.from_sum(total.cpu().numpy(), int(count[0]))


def broadcast_moment(moment: SecondMoment | None, info: DistInfo, d: int) -> SecondMoment:
    """Rank 0's moment (with its metadata) on every rank (collective)."""
    import torch
    import torch.distributed as dist

    dev = _comm_device(info)
    if info.is_main:
        assert moment is not None
        total = torch.from_numpy(moment.sum()).to(dev)
        head = [moment.count, dict(moment.metadata)]
    else:
        total = torch.zeros((d, d), dtype=torch.float64, device=dev)
        head = [0, {}]
    dist.broadcast(total, src=0)
    dist.broadcast_object_list(head, src=0)
    if info.is_main:
        assert moment is not None
        return moment
    out = SecondMoment.from_sum(total.cpu().numpy(), int(head[0]))  # type: ignore[call-overload]
    out.metadata = head[1]  # type: ignore[assignment]
    return out


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """Rank 0's ``flag`` on every rank (collective)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_comm_device(info))
    dist.broadcast(t, src=0)
    return bool(int(t[0]))


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.backend == "nccl":
        import torch

        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def crash_hook(rank: int) -> None:
    """Test hook: SIGKILL this process if ``RROME_STATS_CRASH_RANK`` names its rank."""
    value = os.environ.get(CRASH_RANK_ENV)
    if value is not None and value.strip() == str(rank):
        os.kill(os.getpid(), signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def launch(
    argv: Sequence[str],
    nproc: int,
    *,
    env: Mapping[str, str] | None = None,
    poll_s: float = 0.05,
    grace_s: float = 5.0,
) -> None:
    """Runs ``nproc`` copies of the command ``argv`` as one torch.distributed job on this machine.

    Each copy gets ``RANK`` = ``LOCAL_RANK`` = its index, ``WORLD_SIZE`` = ``LOCAL_WORLD_SIZE``
    = ``nproc`` and a free ``MASTER_PORT`` on 127.0.0.1, as torchrun would set them. Returns
    when every copy exited with status 0. As soon as one fails, the others are stopped
    (SIGTERM, then SIGKILL after ``grace_s``).

    Raises:
        ValueError: ``nproc`` below 1.
        WorkerError: naming the first worker that failed and how.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    base = dict(os.environ if env is None else env)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        GROUP_RANK="0",
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(nproc):
            procs.append(subprocess.Popen(list(argv), env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
        failed: tuple[int, int] | None = None
        while failed is None:
            codes = [p.poll() for p in procs]
            bad = [(i, rc) for i, rc in enumerate(codes) if rc is not None and rc != 0]
            if bad:
                failed = bad[0]
            elif all(rc == 0 for rc in codes):
                return
            else:
                time.sleep(poll_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    rank, rc = failed
    raise WorkerError(f"statistics worker {rank} of {nproc} {_describe_exit(rc)}; the other workers were stopped")


def python_argv(args: Sequence[str]) -> list[str]:
    """``[python, -m, rrome.cli, *args]`` with this interpreter."""
    return [sys.executable, "-m", "rrome.cli", *args]

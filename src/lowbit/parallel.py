"""Several processes on one quantization, over torch.distributed: launched by torchrun (one process per GPU, or
per share of a CPU machine, on one host or many), or by `lowbit quantize --nproc N`, which runs torchrun's own
launcher on this host (launch()).

`Ranks` is who this process is among the processes of a run, and the few collectives the engine needs:
- data parallel: each rank takes its contiguous share of the calibration windows (`shard`); what it gathers
  from them (statistics, activation ranges) is summed or maxed across ranks (`sum_`, `max_`, `min_`) before
  any algorithm reads it;
- weight parallel: a block's solves are assigned to ranks by cost and every result is shared (`share`);
- rank 0's decisions taken from its own data, where ranks must agree (`same`: a block's stages, say);
- agreement: before its first collective, every rank says whether its setup failed (`agree`), so an error on
  one rank (a missing file, a bad scheme) stops every rank with one line, printed by rank 0.
One process is a plain `Ranks()`: every collective returns its input, and nothing is copied. Rank 0 writes.
"""

from __future__ import annotations

import os
import pickle
import sys
from datetime import timedelta

import torch

from .errors import LowbitError

TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this for a rank fails


class Ranks:
    """One process (rank 0 of 1). TorchRanks is several, over torch.distributed."""

    rank, size, local_rank, backend = 0, 1, 0, None

    def __init__(self):
        self.sent_bytes = 0  # payload this rank put into collectives (all-reduced tensors, its shared objects)
        self.agreed = False  # whether agree() ran: from then on a failure is this rank's alone
        self.failures: list[tuple[int, str]] = []  # (rank, one-line reason) of the ranks whose setup failed

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def shard(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of the calibration windows (rank 0 holds the first)."""
        n = len(windows)
        self.check_windows(n)
        return windows[self.rank * n // self.size:(self.rank + 1) * n // self.size]

    def check_windows(self, n: int) -> None:
        """Refuse fewer calibration windows than ranks (a rank without windows has nothing to calibrate on)."""
        if n < self.size:
            raise LowbitError(f"{n} calibration windows cannot be shared by {self.size} processes; use at least "
                              f"--num-calib-data {self.size}, or fewer processes")

    # -- collectives (one process: the identity) ----------------------------------------------------
    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor across ranks, in place."""

    def max_(self, tensors: list[torch.Tensor]) -> None:
        """Elementwise maximum of each tensor across ranks, in place."""

    def min_(self, tensors: list[torch.Tensor]) -> None:
        """Elementwise minimum of each tensor across ranks, in place."""

    def gather(self, obj) -> list:
        """Every rank's `obj` (picklable, tensors on the host), in rank order."""
        return [obj]

    def same(self, obj):
        """Rank 0's `obj` on every rank: a decision all ranks must share."""
        return obj

    def share(self, jobs: list, costs: list[float], solve) -> list:
        """solve(job) for every job, each run by one rank (assigned by cost, largest first, to the least loaded)
        and its result (picklable, tensors on the host) given to every rank; in job order."""
        if not self.distributed:
            return [solve(job) for job in jobs]
        owners = assign(costs, self.size)
        mine = {k: solve(job) for k, job in enumerate(jobs) if owners[k] == self.rank}
        merged: dict = {}
        for part in self.gather(mine):
            merged.update(part)
        return [merged[k] for k in range(len(jobs))]

    def agree(self, error: str | None = None) -> list[tuple[int, str]]:
        """Each rank's setup error (None: ready), gathered; the failures, in rank order."""
        self.agreed = True
        self.failures = [(r, e) for r, e in enumerate(self.gather(error)) if e is not None]
        return self.failures

    def ready(self) -> None:
        """Before the first collective of the work: agree that this rank's setup succeeded, and stop (one line,
        said by rank 0) when another's failed. Once per run; nothing to agree with one process."""
        if self.distributed and not self.agreed and self.agree(None):
            raise LowbitError(self.failure_line())

    def failure_line(self) -> str:
        """The one line for failed setups: the reason, with the rank unless every rank had it."""
        reasons = {e for _, e in self.failures}
        if len(self.failures) == self.size and len(reasons) == 1:
            return self.failures[0][1]
        r, e = self.failures[0]
        more = f" (and {len(self.failures) - 1} more rank(s))" if len(self.failures) > 1 else ""
        return f"rank {r} of {self.size}{more}: {e}"

    def describe(self) -> dict:
        return {"ranks": self.size, "backend": self.backend} if self.distributed else {}


def assign(costs: list[float], ranks: int) -> list[int]:
    """The rank of each job: largest cost first, each to the rank with the least work so far (ties: the lower
    rank), the same on every rank."""
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owners[k], load[r] = r, load[r] + costs[k]
    return owners


class TorchRanks(Ranks):
    """Ranks of a torch.distributed process group (gloo on CPUs, nccl on GPUs)."""

    def __init__(self, rank: int, size: int, local_rank: int, backend: str):
        super().__init__()
        self.rank, self.size, self.local_rank, self.backend = rank, size, local_rank, backend

    def _reduce(self, tensors, op) -> None:
        import torch.distributed as dist

        for t in tensors:
            self.sent_bytes += t.numel() * t.element_size()
            dist.all_reduce(t, op=op)

    def sum_(self, tensors):
        import torch.distributed as dist
        self._reduce(tensors, dist.ReduceOp.SUM)

    def max_(self, tensors):
        import torch.distributed as dist
        self._reduce(tensors, dist.ReduceOp.MAX)

    def min_(self, tensors):
        import torch.distributed as dist
        self._reduce(tensors, dist.ReduceOp.MIN)

    def gather(self, obj) -> list:
        import torch.distributed as dist

        self.sent_bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def same(self, obj):
        import torch.distributed as dist

        box = [obj]
        if self.rank == 0:
            self.sent_bytes += len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        dist.broadcast_object_list(box, src=0)
        return box[0]


_current: Ranks = Ranks()


def current() -> Ranks:
    """The ranks this process joined (join()); one process until then."""
    return _current


def launched() -> bool:
    """Whether this process was started by torchrun (or --nproc) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: str | None) -> Ranks:
    """This process's Ranks: under torchrun (WORLD_SIZE > 1) the process group is joined, gloo for CPU work and
    nccl when the ranks work on GPUs (`device`: the --device asked for, before resolution); else one process."""
    global _current
    if not launched():
        return _current
    if _current.distributed:
        return _current
    import torch.distributed as dist

    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise LowbitError(f"WORLD_SIZE is set but RANK / LOCAL_RANK are not usable ({exc}); start several processes "
                          f"with torchrun or lowbit quantize --nproc N") from None
    # the device itself is checked later (rank_device), once a refusal can be agreed between the ranks
    name = (device or "auto").strip().lower()
    gpu = name in ("auto", "cuda") and torch.cuda.is_available()
    if gpu and local_rank < torch.cuda.device_count():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if gpu else "gloo", timeout=TIMEOUT)
    _current = TorchRanks(rank, size, local_rank, dist.get_backend())
    return _current


def rank_device(name: str | None, local_rank: int, size: int) -> torch.device:
    """The device of a rank: with several processes each works on its own GPU (cuda:LOCAL_RANK) when --device is
    cuda or auto and GPUs are present; cpu otherwise."""
    name = (name or "auto").strip().lower()
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise LowbitError(f"--device {name} with {size} processes: each process works on its own GPU "
                          f"(cuda:LOCAL_RANK); use --device cuda (or auto, or cpu)")
    if not torch.cuda.is_available():
        raise LowbitError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise LowbitError(f"{local_rank + 1} processes on this host but only {torch.cuda.device_count()} GPU(s); "
                          f"start at most one process per GPU (--nproc-per-node)")
    return torch.device(f"cuda:{local_rank}")


def exit_now(code: int) -> None:
    """End this rank's process with `code`, its output flushed, without the interpreter's teardown (which can
    abort a process holding a process group whose peers are gone); the OS closes its connections."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def launch(argv: list[str], nproc: int) -> int:
    """Run `lowbit ARGV` as `nproc` processes on this host with torchrun's launcher (a free port, no restarts);
    each gets cores / nproc threads unless OMP_NUM_THREADS says otherwise. A rank that fails prints its own line;
    a rank killed by a signal is named here. Returns the exit status."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)("-m", "lowbit", *argv)
    except (SignalException, KeyboardInterrupt):  # Ctrl-C or a stop signal: the ranks stopped, rank 0 said so
        return 130
    except ChildFailedError as exc:
        # a rank killed by a signal (not the SIGTERM torchrun stops the others with) said nothing: name it here;
        # a rank that failed otherwise printed why, and the others noticed it gone and stayed silent
        killed = sorted((rank, f) for rank, f in exc.failures.items() if f.exitcode < 0 and f.signal_name() != "SIGTERM")
        if not killed:
            return exc.get_first_failure()[1].exitcode
        rank, failure = killed[0]
        print(f"error: rank {rank} of {nproc} was killed by {failure.signal_name()}; every rank was stopped and "
              f"nothing was written", file=sys.stderr, flush=True)
        return 1
    return 0

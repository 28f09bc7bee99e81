"""Where the engine's tensors live, and where statistics are summed: the one place for each.

Device: the block being calibrated (in the working precision `dtype`), its calibration activations and the
statistics and solver matrices built from them live on `Placement.device`; everything else stays on disk (the
lazy checkpoint) or in host memory. Work on a block runs inside `scope()`, which makes the device the default
for every tensor an algorithm creates, so algorithms stay device-agnostic. Results leave the device at the sink
(`HostSink`): what is written is on the host, in the source's dtype.

Activations between blocks are held on the device while they fit (one chunk per calibration batch), else on
the host; with `offload_dir` they are spilled to files there and read back one chunk at a time, so host memory
holds one chunk instead of all of them.

Reduction: with several processes (parallel.Ranks) each holds its share of the calibration windows, so the
statistics of a linear's input (InputStats) and the activation ranges it records are complete only once every
process's share is in them. `reduce` and `reduce_ranges` are where they are combined across processes before
any algorithm reads them; a single process has nothing to combine.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..algorithms import InputStats
from ..errors import LowbitError
from ..hf.model import parse_dtype
from ..parallel import Ranks
from ..results import Sink

DEVICE_RESERVE = 1 << 30  # device memory left free beside the activations held there (the block's own work)


def resolve_device(name: str | None) -> torch.device:
    """A torch device from --device: cpu, cuda, cuda:N or auto (the first GPU when one is present, else cpu)."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                              f"(or auto), or install a CUDA build of torch on a machine with a GPU")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LowbitError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return device
    raise LowbitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto")


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The working precision from --calib-dtype: float32 / bfloat16 / float16, or auto (float32 on the CPU,
    bfloat16 on a GPU)."""
    dtype = parse_dtype(name.strip().lower() if isinstance(name, str) else name)
    return dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)


@dataclass
class Spilled:
    """An activation chunk written to a file of the offload folder, read back on demand."""
    path: Path
    shape: torch.Size
    dtype: torch.dtype

    def load(self, device: torch.device) -> torch.Tensor:
        return torch.load(self.path, map_location=device, weights_only=True)

    def drop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


_spill_ids = itertools.count()


@dataclass(frozen=True)
class Placement:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # working precision of blocks and their activations
    offload_dir: Path | None = None  # activation chunks spilled here, one file each
    ranks: Ranks = field(default_factory=Ranks)  # the processes sharing the calibration windows (parallel.py)

    @property
    def on_host(self) -> bool:
        return self.device.type == "cpu"

    def scope(self):
        """The context of a block's work: tensors created inside default to the device."""
        return contextlib.nullcontext() if self.on_host else torch.device(self.device)

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids where the embedding lives."""
        return ids if self.on_host else ids.to(self.device)

    def activations(self, tensor: torch.Tensor):
        """A chunk of calibration activations as held between blocks: on the device while it fits, else on
        the host; spilled to the offload folder when one is given."""
        if self.offload_dir is not None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            path = self.spill_dir / f"{next(_spill_ids)}.pt"
            torch.save(tensor.detach().cpu(), path)
            return Spilled(path, tensor.shape, tensor.dtype)
        if self.on_host or _fits_on_device(tensor, self.device):
            return tensor.to(self.device)
        return tensor.cpu()

    def fetch(self, held) -> torch.Tensor:
        """A held chunk (activations()) on the device, ready for the block."""
        return held.load(self.device) if isinstance(held, Spilled) else held.to(self.device)

    def replace(self, old, new: torch.Tensor):
        """Hold `new` in place of the chunk `old` (a spilled file is removed)."""
        if isinstance(old, Spilled):
            old.drop()
        return self.activations(new)

    @property
    def spill_dir(self) -> Path:
        """This process's folder inside the offload folder (removed by cleanup())."""
        return self.offload_dir / f"lowbit-activations-{os.getpid()}"

    def cleanup(self) -> None:
        """Remove this process's spilled activations, whatever ended the run."""
        if self.offload_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def drop(self, chunks) -> None:
        """Let go of held chunks ((held, kwargs) pairs) no block needs any more (spilled files removed)."""
        for held, _ in chunks or ():
            if isinstance(held, Spilled):
                held.drop()

    def new_stats(self, columns: int, gram: bool) -> InputStats:
        """Empty statistics of an input with `columns` channels (the Gram matrix when asked), on the device."""
        with self.scope():
            return InputStats(columns, gram=gram)

    def reduce(self, stats: dict) -> dict:
        """Statistics ({key: InputStats}, the same keys in the same order on every process) summed over every
        process's share of the calibration windows; one process: returned as they are."""
        if self.ranks.distributed:
            for s in stats.values():
                s.combine(self.ranks.sum_, self.ranks.max_)
        return stats

    def reduce_ranges(self, ranges: dict, names) -> dict:
        """Activation ranges ({name: [lo, hi]}) widened to every process's: the least lo and the largest hi of
        each of `names` (the same on every process); a name no process saw stays absent."""
        if not self.ranks.distributed:
            return ranges
        names = list(names)
        lo = torch.tensor([ranges.get(n, [float("inf")])[0] for n in names], dtype=torch.float64)
        hi = torch.tensor([ranges.get(n, [0.0, float("-inf")])[1] for n in names], dtype=torch.float64)
        self.ranks.min_([lo])
        self.ranks.max_([hi])
        return {n: [a, b] for n, a, b in zip(names, lo.tolist(), hi.tolist()) if a <= b}

    def describe(self) -> dict:
        return {"device": str(self.device), "calib_dtype": str(self.dtype).replace("torch.", ""),
                **({"offload_dir": str(self.offload_dir)} if self.offload_dir is not None else {}),
                **self.ranks.describe()}


def _fits_on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return tensor.numel() * tensor.element_size() + DEVICE_RESERVE < free


class HostSink(Sink):
    """A sink in front of another that receives device tensors: each result is moved to the host (and created
    there) before the sink packs or writes it."""

    def __init__(self, sink: Sink):
        self.sink = sink

    def add_tensor(self, name, tensor):
        with torch.device("cpu"):
            self.sink.add_tensor(name, tensor.cpu())

    def add_quantized(self, module_name, qt, bias):
        with torch.device("cpu"):
            self.sink.add_quantized(module_name, qt.to("cpu"), None if bias is None else bias.cpu())

    def add_input_quant(self, module_name, spec, params):
        with torch.device("cpu"):
            self.sink.add_input_quant(module_name, spec, None if params is None else params.cpu())

    def add_output_quant(self, module_name, spec, params):
        with torch.device("cpu"):
            self.sink.add_output_quant(module_name, spec, params.cpu())

    def snapshot(self) -> dict:
        return self.sink.snapshot()

    def restore(self, snapshot: dict) -> None:
        self.sink.restore(snapshot)

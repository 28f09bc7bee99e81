"""Where the engine's tensors live, and where statistics are summed: the one place for each.

Device: the block being calibrated, its calibration activations and the statistics and solver matrices
built from them live on `Placement.device`; everything else stays on disk (the lazy checkpoint) or in host
memory. Today that device is the CPU; device selection and offloading fill this in.

Reduction: statistics of a linear's input (InputStats) are complete only once every process's share of the
calibration windows is in them. `reduce_stats` is where they are summed across processes before any
algorithm reads them; a single process has nothing to sum.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..algorithms import InputStats


@dataclass(frozen=True)
class Placement:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def activations(self, tensor: torch.Tensor) -> torch.Tensor:
        """Calibration activations as held between blocks."""
        return tensor.to(self.device)

    def new_stats(self, columns: int, gram: bool) -> InputStats:
        """Empty statistics of an input with `columns` channels (the Gram matrix when asked)."""
        return InputStats(columns, gram=gram)


def reduce_stats(stats: dict) -> dict:
    """Statistics summed over every process that saw calibration windows ({key: InputStats}); one process:
    returned as they are."""
    return stats

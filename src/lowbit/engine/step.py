"""The transform-and-quantize step, shared by the torch engine (runner.py) and the ONNX quantizer
(onnx/quantize.py): for each group of linears that read one input, each transform's per-channel scales
(AWQ, SmoothQuant) chosen on the input's statistics and folded, then its clipping factors, then the
quantizer's codes, and the report of each quantized weight. Where scales fold (a norm, a linear, a graph
initializer) and where results go are the front end's business: it hands each group over as an InputGroup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..algorithms import Quantizer, Transform
from ..algorithms.stats import MIN_CALIBRATION_TOKENS, InputStats
from ..formats import Quantized
from ..results import LayerReport
from ..spec import QuantSpec


@dataclass
class InputGroup:
    """Planned linears that read one input tensor, as the step sees them."""
    names: tuple[str, ...]
    specs: list[QuantSpec]
    weights: Callable[[], list[torch.Tensor]]  # their current (out_features, in_features) weights
    stats: InputStats | None  # of the shared input; None when none were gathered
    fold: Callable[[torch.Tensor], None] | None  # applies input-channel scales s (None: no op to fold into)


def scale_and_clip(transforms: list[Transform], groups: list[InputGroup], notes: dict[str, str],
                   clips: dict[str, torch.Tensor], share=None) -> None:
    """Each transform in turn: scales for every group, then folded in order (statistics divided alike, so no
    second pass), then clipping factors for the scaled weights. Groups with too few calibration tokens or no op
    to fold into are noted and left as they are.

    The searches are independent of one another: a group's fold changes only its own linears and the op
    producing its input, which runs before it, so no other group's search reads what it changed. `share(jobs,
    costs, solve)` may therefore run them anywhere (parallel.Ranks.share: spread over processes); by default
    here, in order."""
    share = share or (lambda jobs, costs, solve: [solve(job) for job in jobs])
    for t in transforms:
        usable = [g for g in groups if _usable(t, g, notes)]
        found = share(usable, [_cost(g) for g in usable],
                      lambda g: _noted(t, g.names, t.channel_scales(g.names, g.weights(), g.specs, g.stats)))
        for g, (s, said) in zip(usable, found):
            t.notes.update(said)
            if s is not None:
                g.fold(s)
                g.stats.divide_channels(s)
        clipped = [g for g in groups if g.stats is not None and g.stats.count >= MIN_CALIBRATION_TOKENS]
        ratios = share(clipped, [_cost(g) for g in clipped],
                       lambda g: _noted(t, g.names, tuple(t.clip_ratios(g.names, g.weights(), g.specs, g.stats))))
        for g, (found_ratios, said) in zip(clipped, ratios):
            t.notes.update(said)
            clips.update({n: c for n, c in zip(g.names, found_ratios) if c is not None})
        for n, note in t.notes.items():
            notes.setdefault(n, note)


def _noted(t: Transform, names, value) -> tuple:
    """A search's result with the transform's notes on its linears (they travel with it to other processes)."""
    return value, {n: t.notes[n] for n in names if n in t.notes}


def _cost(g: InputGroup) -> int:
    """Work of a group's searches: the output error is a K x K product per weight row."""
    k = g.stats.gram.shape[0] if g.stats is not None and g.stats.gram is not None else 1
    return sum(w.numel() for w in g.weights()) * k


def _usable(t: Transform, g: InputGroup, notes: dict[str, str]) -> bool:
    count = g.stats.count if g.stats is not None else 0
    if g.fold is not None and count >= MIN_CALIBRATION_TOKENS:
        return True
    why = "no op to fold scales into" if g.fold is None else f"only {count} calibration tokens"
    for n in g.names:
        notes[n] = f"{t.name}: {why}, not scaled"
    return False


def quantize_group(quantizer: Quantizer, group: InputGroup, clips: dict[str, torch.Tensor]) -> list[Quantized]:
    """The quantizer's codes for every linear of a group (calibrated quantizers have seen its input)."""
    return quantizer.quantize_group(group.names, group.weights(), group.specs, [clips.get(n) for n in group.names])


def layer_report(name: str, weight: torch.Tensor, qt: Quantized, dequant: torch.Tensor, notes: dict[str, str],
                 quantizer: Quantizer) -> LayerReport:
    """A quantized weight's relative error ||W - Q(W)|| / ||W|| (dequant: Q(W) in float32) and the remarks on
    it (a transform's, then the quantizer's)."""
    w = weight.float()
    err = (torch.linalg.vector_norm(dequant - w) / torch.linalg.vector_norm(w).clamp_min(1e-30)).item()
    note = "; ".join(x for x in (notes.get(name, ""), quantizer.notes.get(name, "")) if x)
    return LayerReport(name, qt.spec.short_name, err, note)

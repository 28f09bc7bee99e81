"""AutoRound (Cheng et al. 2023, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization of
LLMs"): per decoder block, every weight's rounding is learned rather than taken to the nearest grid point.

Each weight W gets a rounding offset V (W's shape, in [-0.5, 0.5] steps of its grid) and each quantization
group clipping factors in [clip_min, clip_max] shrinking its range: one for the bottom and one for the top of an
asymmetric integer group's range (RangeRounding), one for a symmetric range or block scale otherwise. The block's output with Q(W / s(c) + V) * s(c) in place of every weight is compared with the float
block's output on the float model's input (mean squared error), over random batches of calibration windows;
V and c move by signed gradient descent (each step lr times the gradient's sign, lr decaying linearly to 0),
and the (V, c) of the lowest loss seen is kept. Rounding uses the straight-through estimator.

One implementation for every format of lowbit: the scales come from formats.compute_qparams with the factors c
(so E8M0 and FP8 block scales stay on their own grids), the elements from formats.grid_round (integers or
minifloat FP4 values), and the result is a Quantized like any other: codes on the format's grid, exported as
any other. With zero iterations the result is RTN's. On llama.cpp's K-quant grids (spec.gguf_grid) the two-level
grid is searched once and only the rounding is learned (KQuantRounding), so the GGUF export holds the codes.

The engine serves BLOCK_FORWARD as a BlockProblem (engine/block.py): the block's linears, their specs and
initial clipping factors, the calibration windows, loss(weights, windows) and sync (sums across processes).
"""

from __future__ import annotations

import math

import torch

from ..errors import LowbitError
from ..formats import Quantized, compute_qparams, grid_round, gguf_grid, quantize, tensor_scale, values_to_codes
from ..formats.integer import block_range, range_qparams
from ..formats.scaled import element_max
from ..spec import QuantSpec
from .base import BLOCK_FORWARD, FLOAT_AND_QUANTIZED_INPUTS, Quantizer, register


def expand(per_block: torch.Tensor, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """A per-block tensor (scales, zero points) repeated over each block's elements: shaped like the weight
    (differentiable, unlike formats.integer's block views)."""
    rows, cols = shape
    br, bc = spec.block_shape(rows, cols)
    return per_block.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]


class Rounding:
    """The learned rounding of one weight: offsets V and clipping factors c, with the weight they apply to."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None, clip_range):
        self.w, self.spec, self.clip_range = weight.detach().float(), spec, clip_range
        self.t = tensor_scale(self.w, spec)  # a two-level spec's tensor scale stays the float weight's
        scale, _ = compute_qparams(self.w, spec, None, self.t)
        start = torch.ones_like(scale) if clip is None else clip.to(scale).clone()
        self.clip = start.clamp(*clip_range).requires_grad_()
        self.v = torch.zeros_like(self.w, requires_grad=True)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.v, self.clip]

    def ranges(self) -> list[tuple[float, float]]:
        return [(-0.5, 0.5)] + [self.clip_range] * (len(self.params) - 1)

    def _grid(self):
        """(scale, zero point) per block for the current factors, and both expanded to the weight's shape; the
        expanded scale carries c's gradient (its value is the format's scale exactly)."""
        scale, zero = compute_qparams(self.w, self.spec, self.clip.detach(), self.t)
        live = scale * (self.clip / self.clip.detach())  # the value of scale, the gradient of a scale ~ c
        return scale, zero, expand(live, self.spec, self.w.shape), \
            None if zero is None else expand(zero.float(), self.spec, self.w.shape)

    def fake(self) -> torch.Tensor:
        """Q(W) dequantized, differentiable in V and c through the straight-through estimator."""
        _, _, s, z = self._grid()
        x = self.w / s + self.v
        if self.spec.plain_int:  # the grid's range relative to the zero point: [qmin - z, qmax - z]
            inside = x.clamp(self.spec.qmin, self.spec.qmax) if z is None else \
                torch.clamp(x + z, self.spec.qmin, self.spec.qmax) - z
        else:
            top = element_max(self.spec)
            inside = x.clamp(-top, top)
        # straight through the rounding only: outside the range the clamp's own gradient (zero in x, the end
        # value in s) holds, so that c learns what clipping costs
        q = inside + (grid_round(x.detach(), self.spec, None if z is None else z.detach()) - inside).detach()
        return q * s

    def step(self, lr: float) -> None:
        """One signed-gradient step, each parameter kept in its range."""
        with torch.no_grad():
            for p, (lo, hi) in zip(self.params, self.ranges()):
                if p.grad is not None:
                    p.sub_(lr * p.grad.sign()).clamp_(lo, hi)
                    p.grad = None

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def load(self, state) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state):
                p.copy_(saved)

    def result(self) -> Quantized:
        """Codes, scales and zero points of the learned rounding, on the format's grid."""
        with torch.no_grad():
            scale, zero, s, z = self._grid()
            values = grid_round(self.w / s + self.v, self.spec, z)
            return Quantized(values_to_codes(values, z, self.spec), scale, zero, self.spec, self.t)


class RangeRounding(Rounding):
    """An asymmetric integer weight: the bottom and the top of each group's range clipped by factors of their own
    (the paper's alpha and beta); the zero point follows them, rounded straight through. With equal factors it is
    formats.compute_qparams with that clip exactly."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None, clip_range):
        super().__init__(weight, spec, clip, clip_range)
        self.lo, self.hi = block_range(self.w, spec)
        self.clip_lo = self.clip.detach().clone().requires_grad_()

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.v, self.clip, self.clip_lo]

    def _grid(self):
        scale, zero = range_qparams(self.lo * self.clip_lo, self.hi * self.clip, self.spec)
        live = (self.hi * self.clip - self.lo * self.clip_lo) / (self.spec.qmax - self.spec.qmin)
        live = live + (scale - live).detach()  # the value of scale; its gradient in both factors
        z_live = self.spec.qmin - self.lo * self.clip_lo / live
        z_live = z_live + (zero - z_live).detach()  # the rounded, clamped zero point, straight through
        return scale.detach(), zero.detach().to(torch.int32), expand(live, self.spec, self.w.shape), \
            expand(z_live, self.spec, self.w.shape)


class KQuantRounding(Rounding):
    """A weight on one of llama.cpp's K-quant grids (spec.gguf_grid): the two-level grid is searched once from the
    float weight (formats.gguf_grid) and stays; only the rounding offsets V are learned."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None, clip_range):
        self.w, self.spec, self.clip_range = weight.detach().float(), spec, clip_range
        self.scale, self.zero, self.t = gguf_grid.qparams(self.w, spec)
        self.v = torch.zeros_like(self.w, requires_grad=True)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.v]

    def _grid(self):
        return self.scale, self.zero, expand(self.scale, self.spec, self.w.shape), \
            None if self.zero is None else expand(self.zero, self.spec, self.w.shape)


def rounding(weight, spec: QuantSpec, clip, clip_range) -> Rounding:
    """The learned rounding a format gets: two clipping factors per group for asymmetric integers, one otherwise;
    rounding offsets alone on a K-quant grid."""
    if spec.gguf_grid:
        return KQuantRounding(weight, spec, clip, clip_range)
    kind = RangeRounding if spec.plain_int and not spec.symmetric else Rounding
    return kind(weight, spec, clip, clip_range)


@register
class AutoRound(Quantizer):
    name = "autoround"
    # the block's forward, and its float model's input as the target's source (the quantized model's input is
    # what the learned block runs on)
    needs = frozenset({BLOCK_FORWARD, FLOAT_AND_QUANTIZED_INPUTS})

    LIMITS = {"iters": (0, None), "lr": (0.0, None), "batch_size": (1, None), "clip_min": (0.0, 1.0),
              "clip_max": (0.0, 1.0)}

    def __init__(self, iters: int = 200, lr: float = 0.0, batch_size: int = 8, clip_min: float = 0.5,
                 clip_max: float = 1.0, seed: int = 0):
        self.iters, self.batch_size, self.seed = int(iters), int(batch_size), int(seed)
        self.lr = float(lr) or 1.0 / max(self.iters, 1)  # 0: the paper's default, 1 / iters
        if clip_min > clip_max:
            raise LowbitError(f"autoround option clip_min ({clip_min}) must not exceed clip_max ({clip_max})")
        self.clip_range = (float(clip_min), float(clip_max))

    def args(self) -> dict:
        return {"iters": self.iters, "lr": self.lr, "batch_size": self.batch_size, "clip_min": self.clip_range[0],
                "clip_max": self.clip_range[1], "seed": self.seed}

    def quantize(self, name: str, weight, spec: QuantSpec, clip=None) -> Quantized:
        """A linear outside the decoder blocks (an lm_head quantized too): round to nearest."""
        return quantize(weight, spec, clip)

    def optimise_block(self, problem) -> list[Quantized]:
        """The learned rounding of every linear of a block (BlockProblem), in the order of problem.names."""
        roundings = [rounding(problem.weights[n], problem.specs[n], problem.clips.get(n), self.clip_range)
                     for n in problem.names]
        first, best, best_state = None, math.inf, [r.state() for r in roundings]
        pick = torch.Generator().manual_seed(self.seed)
        count = len(problem.windows)
        with torch.enable_grad():
            for i in range(self.iters):
                chosen = torch.randperm(count, generator=pick, device="cpu")[:self.batch_size].tolist()
                loss = problem.loss({n: r.fake() for n, r in zip(problem.names, roundings)},
                                    [problem.windows[k] for k in chosen])
                loss.backward()
                total = self._summed(problem, roundings, loss)
                first = total if first is None else first
                if total < best:
                    best, best_state = total, [r.state() for r in roundings]
                lr = self.lr * (1 - i / self.iters)  # linear decay to 0
                for r in roundings:
                    r.step(lr)
        for r, state in zip(roundings, best_state):
            r.load(state)
        if self.iters:
            note = f"autoround: block output loss {first:.3g} -> {best:.3g} (best of {self.iters} iterations)"
            self.notes.update({n: note for n in problem.names})
        return [r.result() for r in roundings]

    @staticmethod
    def _summed(problem, roundings, loss) -> float:
        """The loss over every process's windows, and every gradient summed likewise (one collective), so that
        each process takes the same steps."""
        if problem.sync is None:
            return float(loss.detach())
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for r in roundings for p in r.params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.detach().reshape(1).float()])
        problem.sync([flat])
        at = 0
        for r in roundings:
            for p in r.params:
                p.grad = flat[at:at + p.numel()].view_as(p)
                at += p.numel()
        return float(flat[-1])

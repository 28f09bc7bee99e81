"""GPTQ (Frantar et al. 2022): quantize a weight column by column, spreading each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs (FORMATS.md 6.3).

Works on tensors only: a weight (N, K) and the Hessian 2/n * sum x x^T of its inputs (K, K). Choices:
- lazy batch updates over blocks of `block_size` columns (rounded to whole groups, so no group straddles
  two blocks);
- damping `damp` x mean(diag H), multiplied by 10 and retried while the Cholesky factorisation fails;
- act-order (columns by decreasing Hessian diagonal) with *static groups*: every group's scale and zero
  point come from the original weights in the original column order, so the result needs no g_idx; the
  quantizer (clip=True) shrinks each static group's range by AWQ's clip search on the Hessian;
- without act-order, a group's parameters come from the already-updated weights when the group starts;
- K-quant grids (spec.gguf_grid) are always static: the two-level grid is searched once, on the whole weight, with
  the Hessian's diagonal (the inputs' mean square, llama.cpp's importance matrix) weighting the search.
"""

from __future__ import annotations

import torch

from ..formats import Quantized, compute_qparams, grid_round, gguf_grid, quantize, tensor_scale, values_to_codes
from ..spec import QuantSpec
from .awq import search_clip
from .base import INPUT_STATS, Quantizer, register
from .stats import MIN_CALIBRATION_TOKENS, HessianAccumulator


def inverse_cholesky(H: torch.Tensor, damp: float, tries: int = 6) -> tuple[torch.Tensor, float]:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, raising damp tenfold on failure.
    Returns the factor and the damping used."""
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    mean = H.diagonal().mean().clamp_min(1e-12)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U, damp
        damp *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {damp / 10:g}")


def _per_column(params: torch.Tensor, group_of_col: torch.Tensor, rows: int) -> torch.Tensor:
    """Expand per-group parameters (1 or N, n_groups) to per-column ones (N, len(group_of_col))."""
    return params[:, group_of_col].expand(rows, -1).float()


def prepared(weight: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of a weight and its Hessian with dead inputs (never nonzero) neutralised: their columns
    zeroed, their diagonal 1. Returns (W, H, dead)."""
    W, H = weight.float().clone(), H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor:
    """The order columns are quantized in: by decreasing Hessian diagonal (act-order), else as stored."""
    return torch.argsort(H.diagonal(), descending=True) if act_order else torch.arange(H.shape[0])


def grid_params(W: torch.Tensor, spec: QuantSpec, clip, H: torch.Tensor) -> tuple:
    """(scale, zero, tensor scale) of a whole weight with input Hessian H: a K-quant grid (its super-scales as
    the tensor scale) searched with H's diagonal as column importance, else the spec's own with `clip`."""
    if spec.gguf_grid:
        return gguf_grid.qparams(W, spec, H.diagonal().clamp_min(0))
    t = tensor_scale(W, spec)  # two-level specs: one tensor scale for every group, however they are made
    return (*compute_qparams(W, spec, clip, t), t)


def _grid(W: torch.Tensor, spec: QuantSpec, clip, static: bool, H: torch.Tensor) -> tuple:
    """(scale, zero, tensor scale) of a weight about to be quantized: from the whole weight for static groups;
    else placeholders, each group's filled in when GPTQ reaches it (from the weights updated so far)."""
    if static:
        return grid_params(W, spec, clip, H)
    t = tensor_scale(W, spec)
    N, K = W.shape
    n_groups = -(-K // spec.block_shape(N, K)[1])
    zero = None if not spec.plain_int or (spec.symmetric and spec.signed) else \
        torch.zeros(N, n_groups, dtype=torch.int32)
    return torch.ones(N, n_groups), zero, t


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = True, clip: torch.Tensor | None = None,
                  cross: torch.Tensor | None = None, alpha: float = 0.25,
                  qparams: tuple | None = None) -> tuple[Quantized, float]:
    """GPTQ of weight (N, K) with input Hessian H (K, K); `clip` shrinks each block's range (as RTN's).
    With `cross` = 2/n sum (x - x~) x~^T (x~ the input H is made of, x the float model's), GPTAQ's asymmetric
    calibration: each column's update also moves the later columns towards the float model's output,
    through P = alpha * triu1(cross U^T) U (U: the upper Cholesky factor of H^-1; alpha scales the term).
    `qparams` = (scale, zero, tensor scale) fixes the grid (static groups) instead of computing it from the weight.
    Returns the quantized weight and the damping used."""
    W, H, dead = prepared(weight, H)
    N, K = W.shape
    if cross is not None:
        cross = cross.float().clone()
        cross[:, dead] = 0

    group = spec.block_shape(N, K)[1]  # columns sharing one scale (MX6/MX9: a sub-block)
    static = qparams is not None or act_order or spec.granularity != "group" or spec.subblock_size > 0 \
        or bool(spec.gguf_grid)
    scale, zero, t = qparams if qparams is not None else _grid(W, spec, clip, static, H)
    if not static:
        block_size = group * max(1, block_size // group)
    column_spec = None if static else spec.with_changes(granularity="channel", group_size=None)

    perm = column_order(H, act_order)
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, used = inverse_cholesky(H, damp)
    P = alpha * torch.triu(cross[perm][:, perm] @ Hinv.T, diagonal=1) @ Hinv if cross is not None else None
    group_of_col = perm // group  # the (original-order) group of each processed column

    values = torch.zeros(N, K)  # element values relative to the zero point: dequantized = values * scale
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if not static:  # groups start at block-aligned columns: parameters from the updated weights
            for start in range(0, i2 - i1, group):
                g = (i1 + start) // group
                s_new, z_new = compute_qparams(W1[:, start:start + group], column_spec,
                                               None if clip is None else clip[:, g:g + 1], t)
                scale[:, g] = s_new[:, 0]
                if zero is not None:
                    zero[:, g] = z_new[:, 0]
        S1 = _per_column(scale, group_of_col[i1:i2], N)
        Z1 = None if zero is None else _per_column(zero, group_of_col[i1:i2], N)
        V1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            v = grid_round(w / S1[:, i], spec, None if Z1 is None else Z1[:, i])
            V1[:, i] = v
            err = (w - v * S1[:, i]) / Hinv1[i, i]
            update = err[:, None] * Hinv1[i, i:][None, :]
            if P is not None:  # the asymmetry term, from the column as it was before its own update
                update -= w[:, None] * P[i1 + i, i1 + i:i2][None, :]
            W1[:, i:].sub_(update)
            Err1[:, i] = err
        values[:, i1:i2] = V1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += W1 @ P[i1:i2, i2:]

    codes = values_to_codes(values, None if zero is None else _per_column(zero, group_of_col, N), spec)
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return Quantized(out, scale, zero, spec, t), used


@register
class GPTQ(Quantizer):
    """GPTQ as a calibrated quantizer: accumulates each linear's input Hessian, then quantizes it."""

    name = "gptq"
    needs = frozenset({INPUT_STATS})

    LIMITS = {"block_size": (1, None), "damp": (1e-8, 10.0)}

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = True,
                 true_sequential: bool = False, clip: bool = True):
        self.block_size, self.damp, self.act_order = int(block_size), float(damp), bool(act_order)
        self.true_sequential, self.clip = bool(true_sequential), bool(clip)
        self.hessians: dict[str, HessianAccumulator] = {}

    @property
    def calibrates_stage_by_stage(self) -> bool:
        return self.true_sequential

    def args(self) -> dict:
        return {"block_size": self.block_size, "damp": self.damp, "act_order": self.act_order,
                "true_sequential": self.true_sequential, "clip": self.clip}

    def observe(self, names: tuple[str, ...], inputs: torch.Tensor) -> None:
        acc = self.hessians.get(names)
        if acc is None:
            acc = self.hessians[names] = HessianAccumulator(inputs.shape[-1])
        acc.add(inputs)

    def statistics(self) -> dict:
        return self.hessians

    _solver_args: dict = {}

    def solver_args(self, acc) -> dict:
        """Further arguments of solve() from a group's statistics (none for GPTQ)."""
        return {}

    def solve(self, weight, H, spec: QuantSpec, clip, **extra) -> tuple[Quantized, float]:
        """One weight's codes from its Hessian: gptq_quantize (subclasses solve otherwise)."""
        return gptq_quantize(weight, H, spec, self.block_size, self.damp, self.act_order, clip, **extra)

    def take_stats(self, names: tuple[str, ...], stats) -> bool:
        if stats.gram is None or self.true_sequential:
            return False
        self.hessians[tuple(names)] = stats
        return True

    def _run(self, names: tuple[str, ...], weight: torch.Tensor, spec: QuantSpec, H: torch.Tensor | None, clip):
        if H is None:
            for n in names:
                self.notes[n] = f"{self.notes.get(n, 'no calibration inputs')}: RTN"
            return quantize(weight, spec, clip)
        if clip is None and self.clip and (self.act_order or spec.granularity != "group") and not spec.gguf_grid:
            clip = search_clip(weight, spec, H / 2)  # static groups: ranges chosen for the output error
        try:
            qt, used = self.solve(weight, H, spec, clip, **self._solver_args)
        except torch.linalg.LinAlgError as exc:
            for n in names:
                self.notes[n] = f"{exc}: RTN"
            return quantize(weight, spec, clip)
        if used != self.damp:
            for n in names:
                self.notes[n] = f"damping raised to {used:g}"
        return qt

    def quantize(self, name: str, weight: torch.Tensor, spec: QuantSpec, clip=None) -> Quantized:
        return self.quantize_group((name,), [weight], [spec], [clip])[0]

    def quantize_group(self, names, weights, specs, clips=None) -> list[Quantized]:
        """Linears with one input share its Hessian; with the same spec (not per-tensor) their rows are
        quantized in one pass, which is the same maths (GPTQ treats rows independently) at a third of the
        Python overhead for q/k/v."""
        acc = self.hessians.pop(tuple(names), None)
        count = acc.count if acc is not None else 0
        H = acc.H if count >= MIN_CALIBRATION_TOKENS else None
        self._solver_args = self.solver_args(acc) if H is not None else {}
        if 0 < count < MIN_CALIBRATION_TOKENS:  # a rarely routed MoE expert: a Hessian of a few tokens misleads
            for n in names:
                self.notes[n] = f"only {count} calibration tokens"
        clips = clips or [None] * len(names)
        if len(set(specs)) == 1 and specs[0].granularity != "tensor" and not specs[0].tensor_scale \
                and len(names) > 1:
            cols = specs[0].block_shape(*weights[0].shape)[1]
            joint_clip = None if all(c is None for c in clips) else torch.cat(
                [torch.ones(w.shape[0], -(-w.shape[1] // cols)) if c is None else c for c, w in zip(clips, weights)])
            joint = self._run(tuple(names), torch.cat([w.float() for w in weights]), specs[0], H, joint_clip)
            rows = [w.shape[0] for w in weights]
            return [Quantized(c, s, z, specs[0], t) for c, s, z, t in zip(
                joint.codes.split(rows), joint.scale.split(rows),
                joint.zero.split(rows) if joint.zero is not None else [None] * len(rows),
                joint.tensor_scale.split(rows) if joint.tensor_scale is not None and specs[0].gguf_grid
                else [None] * len(rows))]
        return [self._run((n,), w, s, H, c) for n, w, s, c in zip(names, weights, specs, clips)]

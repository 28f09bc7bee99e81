"""GPTAQ (Li et al. 2025, "GPTQv2: Efficient Finetuning-Free Quantization with Asymmetric Calibration"): GPTQ
whose target is the float model's output, not the quantized upstream's. Each linear's input is observed twice
for the same tokens: x~ in the model being quantized (earlier blocks and earlier stages of this block already
quantized) and x in the float model. The Hessian is x~'s, and the cross term (x - x~) x~^T makes every
column's update also correct the error the quantized upstream left (gptq.gptq_quantize, `cross`).

With x = x~ the cross term is zero and the result is GPTQ's. The engine serves the two inputs
(FLOAT_AND_QUANTIZED_INPUTS: a float copy of each block run beside it on the float model's activations), and
calibrates stage by stage, so that x~ of a stage is computed with the earlier stages already quantized.
"""

from __future__ import annotations

from .base import FLOAT_AND_QUANTIZED_INPUTS, INPUT_STATS, register
from .gptq import GPTQ
from .stats import PairedStats


@register
class GPTAQ(GPTQ):
    name = "gptaq"
    needs = frozenset({INPUT_STATS, FLOAT_AND_QUANTIZED_INPUTS})

    LIMITS = {**GPTQ.LIMITS, "alpha": (0.0, 1.0)}

    def __init__(self, block_size: int = 128, damp: float = 0.01, act_order: bool = True, clip: bool = True,
                 alpha: float = 0.25):
        super().__init__(block_size, damp, act_order, true_sequential=True, clip=clip)
        self.alpha = float(alpha)  # the weight of the asymmetry term (the paper's default, 0.25)

    def args(self) -> dict:
        out = super().args()
        out.pop("true_sequential")  # always: a stage's x~ needs the earlier stages quantized
        return {**out, "alpha": self.alpha}

    def observe(self, names: tuple[str, ...], inputs, targets=None) -> None:
        """`targets` None: no float input matches these tokens (a MoE expert's routed tokens differ between the
        two models), so the chunk counts as its own target: GPTQ's calibration for it, noted."""
        acc = self.hessians.get(names)
        if acc is None:
            acc = self.hessians[names] = PairedStats(inputs.shape[-1])
        if targets is None and len(inputs):
            for n in names:
                self.notes[n] = "gptaq: routed tokens differ from the float model's, calibrated as gptq"
        acc.add_pair(inputs, inputs if targets is None else targets)

    def take_stats(self, names, stats) -> bool:
        return False  # a transform's statistics are of one model only

    def solver_args(self, acc) -> dict:
        return {"cross": 2 * acc.cross, "alpha": self.alpha}

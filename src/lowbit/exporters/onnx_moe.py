"""Mixture-of-experts blocks in lowbit's ONNX export (Mixtral, Qwen3-MoE): the router as a linear, then one
com.microsoft QMoE node (4-bit experts, lowbit's codes exactly) or MoE node (float experts) that softmaxes the
router logits over all experts, keeps the top k, renormalises them when asked and sums the chosen experts'
SwiGLU MLPs.

What onnxruntime 1.32's CPU kernels take (measured against numpy, tests/test_onnx_moe.py):
- routing: softmax over every expert, top-k, then normalize_routing_weights=1 renormalises the k weights.
  Mixtral's router (top-k of the softmax, renormalised) is normalize 1; Qwen3-MoE's renormalises only when
  norm_topk_prob. MoE honours normalize 0; QMoE renormalises whatever the attribute says, so without
  norm_topk_prob its output is multiplied by the top-k weights' sum (Softmax, TopK, ReduceSum on the router
  logits: the experts are linear in their weights). The router probabilities must be 2-D (tokens, experts);
  the hidden states may stay 3-D;
- experts: activation_type swiglu with swiglu_fusion=1 only ("CPU MoE only supports interleaved SwiGLU"; the
  separate fc3 input is "not implemented for CPU MoE"): fc1 holds gate and up rows interleaved (g0, u0, g1, ...)
  as (E, 2I, H), fc2 (E, H, I); alpha 1 and beta 0 make it silu(gate) * up;
- QMoE: expert_weight_bits 4 or 8, raw weights (E, N, K * bits / 8) packed LSB-first along K, scales (E, N,
  ceil(K / block_size)), optional zero points (E, N, ceil(blocks * bits / 8)) packed the same way (default
  2^(bits-1)): MatMulNBits' grid, so lowbit's stored codes (code - qmin) are its bytes as they are. 4-bit
  experts compute in float and match the dequantized weights to 5e-7 for block_size 16 to 256, symmetric or
  with zero points, partial last blocks included. 8-bit experts do not: their kernel quantizes the activations
  to int8 (about 1.5% of the output's largest value off at block_size 32 and 64, and at 128 once K > 128), so
  8-bit (and 2-bit, which QMoE lacks) experts are written dequantized into the float MoE, with a warning.
  A per-expert graph of MatMulNBits would keep 8-bit codes exact but run every expert on every token (E / k
  times the MLP work: 16x for 128 experts choosing 8) or need a Loop over experts; the float MoE keeps the
  routing sparse at the cost of size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch.moe import read_aliased
from .onnx_graph import MS, LinearBuilder
from .onnx_tensors import matmul_block_size, matmul_nbits_tensors

QMOE_BITS = 4  # onnxruntime 1.32's CPU QMoE computes 4-bit experts in float; its 8-bit experts on int8 inputs
PROJECTIONS = ("gate", "up", "down")


@dataclass
class Routing:
    """A mixture-of-experts decoder's routing, read from its config."""

    experts: int
    top_k: int
    normalize: bool  # renormalise the top-k weights (Mixtral always, Qwen3-MoE when norm_topk_prob)
    sparse: list[bool]  # per layer: experts (True) or a dense MLP (Qwen3-MoE's mlp_only_layers)


def moe_routing(config: dict) -> Routing | None:
    """The routing of a Mixtral or Qwen3-MoE config, None for a dense model."""
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        return None
    layers = config["num_hidden_layers"]
    step = config.get("decoder_sparse_step") or 1
    dense = set(config.get("mlp_only_layers") or [])
    normalize = config["model_type"] == "mixtral" or bool(config.get("norm_topk_prob"))
    return Routing(experts=experts, top_k=config["num_experts_per_tok"], normalize=normalize,
                   sparse=[i not in dense and (i + 1) % step == 0 for i in range(layers)])


def expert_names(i: int, experts: int) -> dict[str, list[str]]:
    """projection (gate, up, down) -> the linears of layer i's experts, in expert order."""
    return {p: [f"model.layers.{i}.mlp.experts.{e}.{p}_proj" for e in range(experts)] for p in PROJECTIONS}


def qmoe_block(modules: dict, names: dict[str, list[str]]) -> int | None:
    """The QMoE block_size that holds every expert linear of a layer exactly, or None when they must stay float:
    each quantized at 4 bits, all symmetric or all with zero points, an even K, and one block length that
    expresses every linear's scales (the shortest of their MatMulNBits blocks: group blocks are powers of two
    dividing the groups, per-channel scales repeat over any block)."""
    linears = [modules.get(n) for group in names.values() for n in group]
    if any(m is None for m in linears):
        return None
    specs = [(spec, k) for spec, (_, k) in linears]
    if {(spec.bits, spec.symmetric) for spec, _ in specs} not in ({(QMOE_BITS, True)}, {(QMOE_BITS, False)}):
        return None
    blocks = [matmul_block_size(spec, k) for spec, k in specs]
    if None in blocks or any(k % 2 for _, k in specs):
        return None
    return min(blocks)


def moe_warnings(model) -> list[str]:
    """What the export says about experts it writes float: a LowbitFolder or PlannedModel (config, modules)."""
    routing = moe_routing(model.config)
    if routing is None:
        return []
    float_layers = []
    for i in (i for i, sparse in enumerate(routing.sparse) if sparse):
        names = expert_names(i, routing.experts)
        quantized = any(n in model.modules for group in names.values() for n in group)
        if quantized and qmoe_block(model.modules, names) is None:
            float_layers.append(i)
    if not float_layers:
        return []
    where = ("every mixture-of-experts layer" if len(float_layers) == sum(routing.sparse) else
             f"layers {', '.join(map(str, float_layers))}")
    return [f"the experts of {where} stay float (dequantized lowbit codes in a "
            f"MoE node): onnxruntime's CPU QMoE runs 4-bit experts exactly and 8-bit ones on int8 activations "
            f"(1-2% off); quantize every expert linear at 4 bits, all symmetric or all asymmetric, for QMoE"]


class ExpertsBuilder(LinearBuilder):
    """The mixture-of-experts block of a decoder layer (onnx_decoder.DecoderBuilder.mlp calls it)."""

    def experts(self, i: int, x: str, routing: Routing) -> str:
        """Router logits (a linear, reshaped to (tokens, experts)) and one QMoE or MoE node over x (B, S, H)."""
        g, path = self.g, f"/model/layers.{i}/moe"
        logits = self.linear(x, [f"model.layers.{i}.mlp.gate"])
        probs = g.op("Reshape", [logits, g.const(f"shape_router_{routing.experts}",
                                                 np.array([-1, routing.experts]))], f"{path}/router/Reshape")
        names = expert_names(i, routing.experts)
        block = qmoe_block(self.folder.modules, names)
        attrs = dict(k=routing.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0)
        if block is None:
            return self._float_moe(i, x, probs, names, normalize_routing_weights=int(routing.normalize), **attrs)
        out = self._qmoe(i, x, probs, names, block, normalize_routing_weights=1, **attrs)
        if routing.normalize:
            return out
        # the CPU QMoE renormalises the top-k weights whatever normalize_routing_weights says: scale its output
        # back by the top-k weights' share of the softmax (Qwen3-MoE without norm_topk_prob)
        top = g.op("TopK", [g.op("Softmax", [logits], f"{path}/router/Softmax", axis=-1),
                            g.const(f"top_k_{routing.top_k}", np.array([routing.top_k]))],
                   f"{path}/router/TopK", 2, axis=-1)[0]
        share = g.op("ReduceSum", [top, g.const("axis_last", np.array([-1]))], f"{path}/router/ReduceSum",
                     keepdims=1)
        return g.op("Mul", [out, share], f"{path}/Mul")

    def _float_moe(self, i: int, x: str, probs: str, names: dict[str, list[str]], **attrs) -> str:
        """A MoE node over the experts' float (or dequantized) weights."""
        g, stem = self.g, f"model.layers.{i}.moe.experts"
        fc1 = _interleave(*(np.stack([self._expert_weight(n) for n in names[p]]) for p in ("gate", "up")))
        fc2 = np.stack([self._expert_weight(n) for n in names["down"]])
        inputs = [x, probs, g.const(f"{stem}.gate_up_proj.weight", fc1), "", g.const(f"{stem}.down_proj.weight", fc2)]
        return g.op("MoE", inputs, f"/model/layers.{i}/moe/MoE", 1, MS, **attrs)

    def _qmoe(self, i: int, x: str, probs: str, names: dict[str, list[str]], block: int, **attrs) -> str:
        """A QMoE node over the experts' 4-bit codes, scales and zero points as lowbit stores them."""
        g, stem = self.g, f"model.layers.{i}.moe.experts"
        fc1, fc2 = self._qmoe_tensors(names, block)
        inputs = [x, probs]
        for proj, tensors in (("gate_up_proj", fc1), ("down_proj", fc2)):
            inputs += [g.const(f"{stem}.{proj}.qweight", tensors["B"]),
                       g.const(f"{stem}.{proj}.scales", tensors["scales"]), ""]
        inputs += ["", "", ""]  # fc3 weights, scales, bias
        if "zero_points" in fc1:
            inputs += [g.const(f"{stem}.gate_up_proj.zero_points", fc1["zero_points"]),
                       g.const(f"{stem}.down_proj.zero_points", fc2["zero_points"])]
        return g.op("QMoE", _trim(inputs), f"/model/layers.{i}/moe/QMoE", 1, MS, expert_weight_bits=QMOE_BITS,
                    block_size=block, **attrs)

    def _expert_weight(self, name: str) -> np.ndarray:
        """An expert linear's float32 (N, K) weight: dequantized when quantized, else as the folder stores it."""
        if name in self.folder.modules or f"{name}.weight" in self.keys:
            return self.folder.weight(name).numpy()
        return read_aliased(f"{name}.weight", self.folder.ckpt).float().numpy()

    def _qmoe_tensors(self, names: dict[str, list[str]], block: int) -> tuple[dict, dict]:
        """fc1 (gate and up rows interleaved) and fc2 tensors for QMoE: B uint8 (E, N, K * 4 / 8), scales (E, N,
        blocks), zero points (E, N, ceil(blocks / 2)) for asymmetric experts: MatMulNBits' tensors of each
        linear with B's whole-block padding cut back to K."""
        def tensors(name: str) -> dict[str, np.ndarray]:
            spec, shape = self.folder.modules[name]
            out = matmul_nbits_tensors(self.folder.stored(name), spec, shape, block)
            out["B"] = out["B"].reshape(shape[0], -1)[:, :shape[1] * QMOE_BITS // 8]
            return out

        per = {p: [tensors(n) for n in names[p]] for p in PROJECTIONS}
        keys = per["down"][0].keys()
        fc1 = {key: _interleave(np.stack([t[key] for t in per["gate"]]), np.stack([t[key] for t in per["up"]]))
               for key in keys}
        fc2 = {key: np.stack([t[key] for t in per["down"]]) for key in keys}
        return fc1, fc2


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """(E, I, ...) gate and up rows as (E, 2I, ...) in the order g0, u0, g1, u1, ... (swiglu_fusion=1)."""
    return np.ascontiguousarray(np.stack([gate, up], axis=2).reshape(gate.shape[0], -1, *gate.shape[2:]))


def _trim(inputs: list[str]) -> list[str]:
    while inputs and inputs[-1] == "":
        inputs.pop()
    return inputs

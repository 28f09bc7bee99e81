"""Where per-input-channel scales fold in an ONNX decoder graph (AWQ, SmoothQuant), by op type:

- a norm (SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization, LayerNormalization, ...) whose first
  output is the group's input: its gamma (and beta) / s; likewise a decomposed norm's last Mul by a constant
  gamma (optimum's exports);
- a Mul of two branches (SwiGLU's act(gate) * up) where one branch is a weight MatMul read by nothing else:
  that MatMul's output columns / s;
- GroupQueryAttention's output when every query head has its own KV head: the V columns of the packed qkv
  MatMul (or of a separate V MatMul) / s. Under grouped queries, heads share a V channel and one scale
  cannot serve them all, so o_proj stays unscaled, as on the torch path.
Anything else (or a producer that also feeds other ops) is not folded, and its group stays unscaled with a
note. The group's own weights W (K, N) are multiplied by s along K by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .graph import NORM_OPS, OnnxDecoder, WeightMatMul

SHAPE_ONLY = ("Shape", "Size")  # readers that see a tensor's shape, not its values
_GAMMA_INPUTS = {"SimplifiedLayerNormalization": (1,), "RMSNormalization": (1,), "LayerNormalization": (1, 2),
                 "SkipSimplifiedLayerNormalization": (2,), "SkipLayerNormalization": (2, 3)}


@dataclass
class FoldTarget:
    """Divide output channels by s: `vectors` are 1-D initializers (norm gamma/beta) divided whole; `matmul`'s
    weight columns `columns` (a slice of N) divided."""

    vectors: tuple[str, ...] = ()
    matmul: WeightMatMul | None = None
    columns: slice | None = None


def _attr(node, name, default):
    return next((a.i for a in node.attribute if a.name == name), default)


def find_fold(decoder: OnnxDecoder, group: list[WeightMatMul]) -> FoldTarget | None:
    """The op the scales of the group's input fold into, or None."""
    x = group[0].input
    readers = [n for n in decoder.consumers.get(x, []) if n.op_type not in SHAPE_ONLY]
    if {id(n) for n in readers} != {id(mm.node) for mm in group} or x in {o.name for o in decoder.graph.output}:
        return None  # something besides the group reads the input
    if any(len(decoder.consumers.get(mm.weight, [])) != 1 for mm in group):
        return None  # a weight shared with another op (a tied lm_head's table feeds the embedding too)
    node = decoder.producer.get(x)
    if node is None:
        return None
    if node.op_type in NORM_OPS and node.output[0] == x:
        names = [node.input[i] for i in _GAMMA_INPUTS[node.op_type] if i < len(node.input) and node.input[i]]
        if all(n in decoder.initializers and len(decoder.consumers.get(n, [])) == 1 for n in names):
            return FoldTarget(vectors=tuple(names))
        return None
    by_output = {mm.node.output[0]: mm for mm in decoder.matmuls}
    if node.op_type == "Mul":
        for branch in node.input:  # a decomposed norm's final x_hat * gamma (optimum exports)
            t = decoder.initializers.get(branch)
            if t is not None and list(t.dims) == [group[0].shape[1]] and len(decoder.consumers.get(branch, [])) == 1:
                return FoldTarget(vectors=(branch,))
        for branch in node.input:
            mm = by_output.get(branch)
            if mm is not None and len(decoder.consumers.get(branch, [])) == 1 and _own_weight(decoder, mm):
                return FoldTarget(matmul=mm, columns=slice(0, mm.shape[0]))
        return None
    if node.op_type == "GroupQueryAttention" and node.domain == "com.microsoft" and node.output[0] == x:
        heads, kv_heads = _attr(node, "num_heads", 0), _attr(node, "kv_num_heads", 0)
        if not heads or heads != kv_heads:
            return None
        if len(node.input) > 2 and node.input[2]:  # separate V input
            mm = by_output.get(node.input[2])
            if mm is not None and len(decoder.consumers.get(node.input[2], [])) == 1 and _own_weight(decoder, mm):
                return FoldTarget(matmul=mm, columns=slice(0, mm.shape[0]))
            return None
        mm = by_output.get(node.input[0])  # packed q|k|v
        if mm is None or len(decoder.consumers.get(node.input[0], [])) != 1 or not _own_weight(decoder, mm):
            return None
        width = group[0].shape[1]  # o_proj's K = heads * head_size = the V width
        return FoldTarget(matmul=mm, columns=slice(mm.shape[0] - width, mm.shape[0]))
    return None


def _own_weight(decoder: OnnxDecoder, mm: WeightMatMul) -> bool:
    return len(decoder.consumers.get(mm.weight, [])) == 1


def fold(target: FoldTarget, s: np.ndarray, vectors: dict[str, np.ndarray], weights: dict[str, np.ndarray]) -> None:
    """Divide the target's outputs by s: changed 1-D initializers go to `vectors` (name -> array), the changed
    weight of a MatMul target to `weights` (MatMul name -> W (K, N) float32, the caller's working copy)."""
    for name in target.vectors:
        vectors[name] = (vectors[name].astype(np.float64) / s).astype(vectors[name].dtype)
    if target.matmul is not None:
        w = weights[target.matmul.name]
        w[:, target.columns] = (w[:, target.columns].astype(np.float64) / s).astype(np.float32)

"""QuaRot R1 on an ONNX decoder graph: the residual stream h becomes h Q for an orthogonal Q (a Hadamard
matrix with random signs, algorithms/hadamard.Rotation), with the same maths as the torch path
(algorithms/rotation.py), in float64, so the float function is unchanged.

The stream is found by walking the graph from the embedding Gather: it is read only by RMS norms
(SimplifiedLayerNormalization, and SkipSimplifiedLayerNormalization whose sum output 3 carries it on) and
written by weight MatMuls (o_proj, down_proj; optionally followed by a bias Add) that feed a skip norm's
second operand. Then, with ONNX weights W (K, N) and Y = X @ W:
- every norm gamma is absorbed into the weight MatMuls reading the norm's output and set to 1, and those
  readers are rotated: W <- Q^T diag(gamma) W (an RMS norm without gain commutes with Q);
- writers to the stream: W <- W Q, a writer's bias b <- b Q, a skip norm's bias likewise;
- the embedding table E <- E Q; a table tied to lm_head (read through a Transpose) is untied: the Gather
  gets its own rotated (V, D) table and lm_head gets Q^T diag(gamma_final) W.
Any other reader of the stream (a LayerNormalization with mean-centering, an Add of position embeddings,
a scale by sqrt(D), the stream as a graph output, ...) is refused before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..algorithms.hadamard import Rotation
from ..algorithms.rotation import absorb_and_rotate_reader, rotate_vector
from ..errors import LowbitError
from .graph import OnnxDecoder, WeightMatMul
from .write import GraphWriter

RMS_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> gamma input


@dataclass
class StreamPlan:
    """What R1 changes: the norms on the stream (node, gamma initializer, readers of its output), the writers
    (MatMul, bias initializer or None), the embedding Gather and the skip norms' bias initializers."""

    width: int
    norms: list[tuple[onnx.NodeProto, str, list[WeightMatMul]]] = field(default_factory=list)
    writers: list[tuple[WeightMatMul, str | None]] = field(default_factory=list)
    stream_biases: list[str] = field(default_factory=list)


def _refuse(msg: str):
    raise LowbitError(f"rotation on the ONNX graph: {msg}")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def plan_rotation(decoder: OnnxDecoder) -> StreamPlan:
    """Walk the residual stream from the embedding and check every op on it; LowbitError (one line) for a
    graph R1 cannot rotate exactly."""
    if len(decoder.embeddings) != 1:
        _refuse(f"expected one embedding Gather of a constant table, found {len(decoder.embeddings)}")
    emb = decoder.embeddings[0]
    walk = _Walk(decoder, emb.shape[1])
    walk.reach(emb.node.output[0])
    while walk.queue:
        tensor = walk.queue.pop(0)
        if tensor in walk.graph_outputs:
            _refuse(f"the residual stream ({tensor}) is a graph output (hidden states); it would come out rotated")
        for node in decoder.consumers.get(tensor, []):
            _visit_norm(walk, node)
    _check_unshared_weights(decoder, walk.plan, emb.table if emb.transposed else None)
    if not walk.plan.norms:
        _refuse("no RMS norm reads the embedding's output")
    return walk.plan


class _Walk:
    """The state of plan_rotation's walk: the stream's tensors found so far, those still to follow, the norms
    already visited, and the plan being filled."""

    def __init__(self, decoder: OnnxDecoder, width: int):
        self.decoder = decoder
        self.width = width
        self.by_output = {mm.node.output[0]: mm for mm in decoder.matmuls}
        self.graph_outputs = {o.name for o in decoder.graph.output}
        self.plan = StreamPlan(width)
        self.stream: set[str] = set()
        self.queue: list[str] = []
        self.seen_norms: set[int] = set()

    def reach(self, tensor: str) -> None:
        """`tensor` carries the stream: follow its readers."""
        self.stream.add(tensor)
        self.queue.append(tensor)

    def consumers(self, tensor: str) -> list:
        return self.decoder.consumers.get(tensor, [])


def _visit_norm(walk: _Walk, node) -> None:
    """Check one reader of the stream (it must be an RMS norm) and add it, its writers and readers to the plan."""
    if node.op_type not in RMS_NORMS or node.domain not in ("", "com.microsoft"):
        _refuse(f"{node.op_type} {node.name} reads the residual stream; only SimplifiedLayerNormalization "
                f"and SkipSimplifiedLayerNormalization (RMS norms) can be rotated"
                + (" (LayerNormalization subtracts the mean)" if "LayerNorm" in node.op_type else ""))
    if id(node) in walk.seen_norms:
        return
    walk.seen_norms.add(id(node))
    axis = _attr(node, "axis", -1)
    if axis not in (-1,):
        _refuse(f"{node.name} normalizes over axis {axis}, not the last one")
    skip = node.op_type == "SkipSimplifiedLayerNormalization"
    for operand in (list(node.input[:2]) if skip else [node.input[0]]):
        if operand not in walk.stream:
            walk.plan.writers.append(_writer_of(walk, operand))
    if skip and len(node.input) > 3 and node.input[3]:
        bias = node.input[3]
        if bias not in walk.decoder.initializers or len(walk.consumers(bias)) != 1:
            _refuse(f"{node.name}'s bias is not a constant of its own")
        walk.plan.stream_biases.append(bias)
    gamma = _own_gamma(walk, node)
    walk.plan.norms.append((node, gamma, _norm_readers(walk, node)))
    if skip and len(node.output) > 3 and node.output[3]:
        walk.reach(node.output[3])


def _own_gamma(walk: _Walk, node) -> str:
    """A norm's gamma initializer, refusing a shared or non-constant one and a used mean / inverse-std output."""
    gamma = node.input[RMS_NORMS[node.op_type]]
    inits = walk.decoder.initializers
    if gamma not in inits or tuple(inits[gamma].dims) != (walk.width,) or len(walk.consumers(gamma)) != 1:
        _refuse(f"{node.name}'s gamma is not a constant ({walk.width},) vector of its own")
    if any(o for o in node.output[1:3]):
        used = [o for o in node.output[1:3] if o and (walk.consumers(o) or o in walk.graph_outputs)]
        if used:
            _refuse(f"{node.name}'s mean / inverse-std output {used[0]} is used")
    return gamma


def _norm_readers(walk: _Walk, node) -> list[WeightMatMul]:
    """The weight MatMuls reading a norm's output; anything else reading it is refused."""
    normed = node.output[0]
    readers = walk.consumers(normed)
    if normed in walk.graph_outputs or not readers:
        _refuse(f"{node.name}'s output is a graph output or unused")
    mms = []
    for reader in readers:
        mm = walk.by_output.get(reader.output[0])
        if mm is None or mm.node.input[0] != normed:
            _refuse(f"{reader.op_type} {reader.name} reads {node.name}'s output; only weight MatMuls can "
                    f"absorb its gain and the rotation")
        mms.append(mm)
    return mms


def _writer_of(walk: _Walk, tensor: str) -> tuple[WeightMatMul, str | None]:
    """The weight MatMul (and its bias initializer, or None) writing `tensor` onto the stream."""
    decoder = walk.decoder
    node = decoder.producer.get(tensor)
    bias = None
    if node is not None and node.op_type == "Add":
        consts = [i for i in node.input if i in decoder.initializers]
        others = [i for i in node.input if i not in decoder.initializers]
        if len(consts) == 1 and len(others) == 1 and tuple(decoder.initializers[consts[0]].dims) == (walk.width,):
            bias = consts[0]
            if len(walk.consumers(others[0])) != 1:
                _refuse(f"{node.name}: the output of the MatMul before it is read by other ops too")
            node = decoder.producer.get(others[0])
    mm = walk.by_output.get(node.output[0]) if node is not None else None
    if mm is None:
        what = f"{node.op_type} {node.name}" if node is not None else f"graph input {tensor}"
        _refuse(f"{what} writes to the residual stream; only weight MatMuls (with an optional bias Add) can "
                f"be rotated")
    if len(walk.consumers(tensor)) != 1 or tensor in walk.graph_outputs:
        _refuse(f"{mm.name}'s output is read by more than the norm that adds it to the stream")
    return mm, bias


def _check_unshared_weights(decoder: OnnxDecoder, plan: StreamPlan, tied: str | None) -> None:
    """Refuse a weight the rotation changes that another op reads too (a tied table's Transpose excepted)."""
    for mm in [m for _, _, ms in plan.norms for m in ms] + [w for w, _ in plan.writers]:
        users = [n for n in decoder.consumers.get(mm.weight, [])]
        others = [n for n in users if n is not mm.node and not (mm.weight == tied and n.op_type == "Transpose")]
        if others:
            _refuse(f"{mm.name}'s weight is shared with {others[0].op_type} {others[0].name}")


def _rows(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def rotate_graph(decoder: OnnxDecoder, writer: GraphWriter, seed: int = 0) -> dict:
    """Fill `writer` with the rotated initializers and node changes of R1 (plan_rotation checks first).
    Returns a short report {"width", "rotation", "seed", "readers", "writers", "norms"}."""
    plan = plan_rotation(decoder)
    q = Rotation(plan.width, seed)
    emb = decoder.embeddings[0]

    def put(name: str, array: np.ndarray, dtype) -> None:
        writer.tensor(name, np.ascontiguousarray(array).astype(dtype))

    n_readers = 0
    for node, gamma_name, readers in plan.norms:
        gamma = decoder.array(gamma_name)
        g = _rows(gamma)
        for mm in readers:  # W (D, N) <- Q^T diag(g) W, via the torch path's (N, D) form
            w_hf = _rows(decoder.array(mm.weight)).T
            put(mm.weight, absorb_and_rotate_reader(w_hf, q, g).T.numpy(), mm.dtype)
            n_readers += 1
        put(gamma_name, np.ones_like(gamma), gamma.dtype)
    for mm, bias in plan.writers:  # W (K, D) <- W Q, b <- b Q
        put(mm.weight, rotate_vector(_rows(decoder.array(mm.weight)), q).numpy(), mm.dtype)
        if bias is not None:
            b = decoder.array(bias)
            put(bias, rotate_vector(_rows(b), q).numpy(), b.dtype)
    for bias in plan.stream_biases:
        b = decoder.array(bias)
        put(bias, rotate_vector(_rows(b), q).numpy(), b.dtype)
    table = decoder.array(emb.table)
    rotated = rotate_vector(_rows(table.T if emb.transposed else table), q).numpy().astype(table.dtype)
    table_users = decoder.consumers.get(emb.table, [])
    if not emb.transposed and len(table_users) == 1:
        put(emb.table, rotated, table.dtype)
    else:  # tied to lm_head (or shared): the Gather gets its own rotated (V, D) table
        name = f"{emb.table}.rotated_embedding"
        put(name, rotated, table.dtype)
        node = emb.node
        writer.replace_node(node, [helper.make_node("Gather", [name, node.input[1]], list(node.output), node.name,
                                                    axis=0)])
        if emb.transposed:
            transpose = decoder.producer[node.input[0]]
            if len(decoder.consumers.get(transpose.output[0], [])) == 1:
                writer.remove_node(transpose)
    return {"width": plan.width, "rotation": q.kind, "seed": seed, "readers": n_readers,
            "writers": len(plan.writers), "norms": len(plan.norms)}


def write_rotated(decoder: OnnxDecoder, folder, seed: int = 0) -> tuple[Path, dict]:
    """The rotated decoder written into `folder` (model file, its data, genai_config.json and tokenizer files
    carried), so it can be calibrated and run like the source; returns (model path, report)."""
    from .quantize import carry_files

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writer = GraphWriter(decoder, folder, decoder.path.name)
    report = rotate_graph(decoder, writer, seed)
    path = writer.write()
    carry_files(decoder, folder)
    return path, report

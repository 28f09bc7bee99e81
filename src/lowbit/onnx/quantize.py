"""Weight-only quantization of an ONNX decoder, layer by layer, with the torch path's algorithms.

For each decoder layer (weight MatMuls grouped by the `layers.N` in their names; lm_head and other MatMuls
outside the layers come last): the statistics of every group of MatMuls that read one tensor (calibrate.py),
then each transform's scales (AWQ) chosen on those statistics and folded into the graph (fold.py), its
clipping factors, then the quantizer (RTN, GPTQ) on the scaled weights, and the quantized MatMuls written
(write.py). Statistics come from the float model in one pass per memory budget; only one layer's weights are
held in working precision at a time.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..algorithms import Algorithm
from ..algorithms.stats import InputStats
from ..engine.step import InputGroup, layer_report, quantize_group, scale_and_clip
from ..results import LayerReport
from ..formats import Quantized
from ..model_files import copy_carried
from ..recipe import LayerPlan
from .fold import find_fold, fold
from .graph import EmbeddingGather, OnnxDecoder, WeightMatMul
from .write import GraphWriter

# files of an onnxruntime-genai / optimum folder carried into the output beside the model
CARRIED = ("genai_config.json", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
           "chat_template.jinja", "processor_config.json")


@dataclass
class OnnxReport:
    layers: list[LayerReport] = field(default_factory=list)
    calibration_seconds: float = 0.0
    embeddings: list[str] = field(default_factory=list)


def layer_index(name: str) -> int | None:
    """The decoder layer a module-style name belongs to (model.layers.3.mlp.down_proj -> 3), else None."""
    m = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def layer_units(decoder: OnnxDecoder, plan: dict[str, LayerPlan]) -> list[list[list[WeightMatMul]]]:
    """Input groups with a planned MatMul, collected per decoder layer in graph order (outside ones last)."""
    units: dict[object, list[list[WeightMatMul]]] = {}
    for group in decoder.input_groups().values():
        if not any(plan[mm.name].spec is not None for mm in group):
            continue
        key = layer_index(group[0].name)
        units.setdefault("outside" if key is None else key, []).append(group)
    outside = units.pop("outside", [])
    return list(units.values()) + ([outside] if outside else [])


class OnnxQuantizer:
    """Runs an algorithm chain over an ONNX decoder's weight MatMuls and writes them with a GraphWriter."""

    def __init__(self, decoder: OnnxDecoder, plan: dict[str, LayerPlan], chain: list[Algorithm],
                 writer: GraphWriter, onnx_format: str = "matmulnbits", accuracy_level: int = 0,
                 progress: bool = True):
        self.decoder, self.plan, self.chain, self.writer = decoder, plan, chain, writer
        self.quantizer = chain[-1]
        self.transforms = [a for a in chain[:-1] if a.role == "transform"]
        self.needs_stats = any(a.needs_calibration for a in chain)
        self.onnx_format, self.accuracy_level, self.progress = onnx_format, accuracy_level, progress
        self.report = OnnxReport()
        self.vectors: dict[str, np.ndarray] = {}  # norm gammas / betas changed by folded scales
        self.notes: dict[str, str] = {}

    def run(self, windows: torch.Tensor | None, providers=None, memory_budget: int = 4 << 30) -> OnnxReport:
        units = layer_units(self.decoder, self.plan)
        if not self.needs_stats:
            for unit in tqdm(units, desc="quantizing layers", unit="layer", file=sys.stderr,
                             disable=not self.progress, dynamic_ncols=True):
                self._quantize_unit(unit, {})
        else:
            from .calibrate import gather_stats

            gram = self.quantizer.needs_calibration or any(t.needs_gram for t in self.transforms)
            columns = [{g[0].input: g[0].shape[1] for g in unit} for unit in units]
            start = time.perf_counter()

            def consume(indices: list[int], stats: dict[str, InputStats]) -> None:
                for i in indices:
                    self._quantize_unit(units[i], stats)

            gather_stats(self.decoder, columns, windows, consume, gram=gram, providers=providers,
                         memory_budget=memory_budget, progress=self.progress)
            self.report.calibration_seconds = time.perf_counter() - start
        for name, vector in self.vectors.items():
            self.writer.tensor(name, vector)
        return self.report

    # -- one decoder layer -----------------------------------------------------------------------------
    def _quantize_unit(self, unit: list[list[WeightMatMul]], stats: dict[str, InputStats]) -> None:
        """The chain on one decoder layer's groups (engine.step, as on the torch path): scales folded into
        the graph's tensors, clipping, the quantizer, and the quantized MatMuls written."""
        weights = {mm.name: np.array(self.decoder.weight(mm)) for group in unit for mm in group}
        changed: set[str] = set()  # float weights a fold changed (written back when not quantized)
        clips: dict[str, torch.Tensor] = {}
        groups = [self._input_group(group, stats.get(group[0].input), weights, changed) for group in unit]
        scale_and_clip(self.transforms, groups, self.notes, clips)
        for group, g in zip(unit, groups):
            if self.quantizer.needs_calibration and not (g.stats is not None and self.quantizer.take_stats(g.names,
                                                                                                       g.stats)):
                for name in g.names:
                    self.notes[name] = f"{self.quantizer.name}: no calibration statistics"
            planned = [mm for mm in group if self.plan[mm.name].spec is not None]
            for mm, qt in zip(planned, quantize_group(self.quantizer, g, clips)):
                self._record(mm, weights[mm.name], qt)
            for mm in group:
                if mm not in planned and mm.name in changed:
                    self.writer.tensor(mm.weight, weights[mm.name].astype(mm.dtype))
        weights.clear()

    def _input_group(self, group: list[WeightMatMul], stats: InputStats | None, weights: dict,
                     changed: set) -> InputGroup:
        """A group of MatMuls reading one tensor, as engine.step sees it; its fold scales the graph tensor that
        produces the input (a norm's gamma, a MatMul's weight) and every reader, quantized or not."""
        planned = [mm for mm in group if self.plan[mm.name].spec is not None]
        target = find_fold(self.decoder, group) if self.transforms else None
        if target is not None and target.matmul is not None and target.matmul.name not in weights:
            target = None  # the producer lies in another layer, already written

        def apply(s: torch.Tensor) -> None:
            s_np = s.double().numpy()
            for name in target.vectors:
                self.vectors.setdefault(name, np.array(self.decoder.array(name)))
            fold(target, s_np, self.vectors, weights)
            if target.matmul is not None:
                changed.add(target.matmul.name)
            for mm in group:
                weights[mm.name] = (weights[mm.name].astype(np.float64) * s_np[:, None]).astype(np.float32)
                changed.add(mm.name)

        return InputGroup(tuple(mm.name for mm in planned), [self.plan[mm.name].spec for mm in planned],
                          lambda: [_rows(weights[mm.name]) for mm in planned], stats,
                          apply if target is not None else None)

    def _record(self, mm: WeightMatMul, weight: np.ndarray, qt: Quantized) -> None:
        w = torch.from_numpy(weight).T
        self.report.layers.append(layer_report(mm.name, w, qt, qt.dequantize(torch.float32), self.notes,
                                               self.quantizer))
        self.writer.quantized_matmul(mm, qt, self.onnx_format, self.accuracy_level)


def _rows(weight_kn: np.ndarray) -> torch.Tensor:
    """lowbit's (out_features, in_features) view of an ONNX weight W (K, N)."""
    return torch.from_numpy(weight_kn).T


def quantize_embedding(decoder: OnnxDecoder, emb: EmbeddingGather, writer: GraphWriter, bits: int, block: int,
                       axis: int) -> str:
    """Replace an embedding Gather by GatherBlockQuantized: asymmetric unsigned `bits` codes in blocks of `block`
    along `axis` of the (V, D) table (1: along the hidden size, 0: along the vocabulary), by RTN."""
    from onnx import TensorProto, helper

    from ..formats import quantize
    from ..spec import QuantSpec
    from .write import MS, pack_sub_byte

    table = torch.from_numpy(decoder.float_table(emb))
    spec = QuantSpec(kind="int", bits=bits, signed=False, symmetric=False, granularity="group", group_size=block)
    qt = quantize(table if axis == 1 else table.T, spec)
    codes, scale, zero = qt.codes, qt.scale, qt.zero
    if axis == 0:
        codes, scale, zero = codes.T, scale.T, zero.T
    itype = TensorProto.UINT4 if bits == 4 else TensorProto.UINT8
    base = emb.table + f"_gbq{bits}"
    data = writer.packed(f"{base}_data", itype, tuple(codes.shape), pack_sub_byte(codes.numpy(), bits))
    scales = writer.tensor(f"{base}_scales", scale.numpy().astype(np.float32 if decoder.array(emb.table).dtype
                                                                   == np.float32 else np.float16))
    zeros = writer.packed(f"{base}_zero_points", itype, tuple(zero.shape), pack_sub_byte(zero.numpy(), bits))
    node = emb.node
    attrs = dict(gather_axis=0, quantize_axis=axis, block_size=block)
    if bits == 8:
        attrs["bits"] = 8
    writer.replace_node(node, [helper.make_node("GatherBlockQuantized", [data, node.input[1], scales, zeros],
                                                list(node.output), (node.name or node.output[0]) + "_Q",
                                                domain=MS, **attrs)])
    writer.opsets[MS] = 1
    if emb.transposed:  # the Transpose of a tied lm_head weight feeds only this Gather: drop it
        transpose = decoder.producer[node.input[0]]
        if len(decoder.consumers.get(transpose.output[0], [])) == 1:
            writer.remove_node(transpose)
    return f"{node.name}: {spec.short_name} along axis {axis}"


def carry_files(decoder: OnnxDecoder, folder) -> list[str]:
    """Copy genai_config.json and the tokenizer / config files beside the source model into the output."""
    return copy_carried(decoder.folder, folder, CARRIED)


def written_size(folder, decoder: OnnxDecoder) -> int:
    """Bytes of a written ONNX model in `folder`: its model file and external data."""
    from pathlib import Path

    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.name.startswith(decoder.path.name))

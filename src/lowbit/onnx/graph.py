"""Reading an ONNX decoder for quantization: its graph without the weights, its initializers read lazily
from the external-data file (memory-mapped, so a model over 2 GB or larger than memory is never loaded
whole), and the parts quantization acts on: the weight MatMuls (a MatMul whose B is an initializer, Y = X @ W
with W (K, N)) and the embedding Gathers, each named like the module it came from
("/model/layers.0/attn/qkv_proj/MatMul" -> "model.layers.0.attn.qkv_proj") so recipes, overrides and
--exclude-layers read the same as on the torch path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import LowbitError
from ..model_files import check_carried, check_external_data, check_finite, external_span, read_json
from ..runtimes import onnx_model_path

FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
NORM_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
            "SkipLayerNormalization", "RMSNormalization")


@dataclass
class WeightMatMul:
    """A MatMul X @ W with W an initializer (K, N): the unit weight-only quantization replaces."""

    name: str  # module-style name
    node: onnx.NodeProto
    weight: str  # initializer name (or the Transpose input when the weight is read through one)
    shape: tuple[int, int]  # (N, K): lowbit's (out_features, in_features)
    dtype: np.dtype

    @property
    def input(self) -> str:
        return self.node.input[0]


@dataclass
class EmbeddingGather:
    """A Gather of token ids from an initializer table (V, D), directly or through a Transpose of the
    lm_head's weight (a tied embedding, as the builder writes it)."""

    node: onnx.NodeProto
    table: str  # initializer name
    transposed: bool  # the initializer is (D, V), read through a Transpose
    shape: tuple[int, int]  # (V, D)


def module_name(node_name: str, fallback: str) -> str:
    """'/model/layers.0/attn/qkv_proj/MatMul' -> 'model.layers.0.attn.qkv_proj' (optimum and the builder both
    name nodes and their outputs by module path, '/.../MatMul/output_0'); `fallback` (with unusual characters
    replaced) when the name has no such path."""
    parts = [p for p in node_name.split("/") if p]
    if len(parts) >= 2 and re.fullmatch(r"output_\d+", parts[-1]):  # an output name, for an unnamed node
        parts = parts[:-1]
    if len(parts) >= 2 and re.fullmatch(r"(MatMul|Gather)(_\d+)?", parts[-1]):
        parts = parts[:-1]
    name = ".".join(parts) or fallback
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)


class OnnxDecoder:
    """An ONNX decoder model on disk: graph, lazily read initializers, weight MatMuls and embedding Gathers."""

    def __init__(self, path):
        self.path = onnx_model_path(path)
        self.folder = self.path.parent
        try:
            self.model = onnx.load(str(self.path), load_external_data=False)
        except Exception as exc:  # a broken or non-ONNX file
            raise LowbitError(f"{self.path} is not a readable ONNX model ({exc}); give the model.onnx of a "
                              f"decoder (onnxruntime-genai builder or optimum export)") from None
        check_external_data(self.model, self.path)  # every location inside the folder, every file whole
        check_carried(self.folder)  # the files an output copies lie inside the folder
        self.graph = self.model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self._maps: dict[str, np.memmap] = {}
        self.matmuls = self._find_matmuls()
        self.embeddings = self._find_embeddings()
        if not self.matmuls:
            raise LowbitError(f"{self.path} has no MatMul with a constant weight to quantize (already quantized, "
                              f"or weights fed as inputs); give a float decoder")
        self.genai_config = read_json(self.folder / "genai_config.json", "genai_config") \
            if (self.folder / "genai_config.json").is_file() else None

    # -- initializers --------------------------------------------------------------------------------
    def array(self, name: str) -> np.ndarray:
        """An initializer's values (read-only; external data memory-mapped, not copied)."""
        t = self.initializers[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        path, offset, length = external_span(t, self.path)
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type)
        return self._maps[path][offset:offset + length].view(dtype).reshape(tuple(t.dims))

    def external_files(self) -> set[str]:
        """The external-data file names the initializers point to."""
        return {e.value for t in self.graph.initializer if t.data_location == TensorProto.EXTERNAL
                for e in t.external_data if e.key == "location"}

    # -- what quantization acts on --------------------------------------------------------------------
    def _constant_2d(self, name: str):
        t = self.initializers.get(name)
        if t is None or len(t.dims) != 2 or t.data_type not in FLOAT_TYPES:
            return None
        return t

    def _find_matmuls(self) -> list[WeightMatMul]:
        found, seen = [], set()
        outputs = {o.name for o in self.graph.output}
        for node in self.graph.node:
            if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                continue
            t = self._constant_2d(node.input[1])
            if t is None:
                continue
            k, n = t.dims
            if not node.name and node.output[0] in outputs:  # an unnamed MatMul writing the logits
                name = "lm_head"
            else:
                name = module_name(node.name or node.output[0], node.output[0])
            while name in seen:
                name += "_"
            seen.add(name)
            found.append(WeightMatMul(name, node, t.name, (int(n), int(k)), np.dtype(FLOAT_TYPES[t.data_type])))
        return found

    def _find_embeddings(self) -> list[EmbeddingGather]:
        graph_inputs = {i.name for i in self.graph.input}
        found = []
        for node in self.graph.node:
            if node.op_type != "Gather" or node.input[1] not in graph_inputs:
                continue
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            source, transposed = node.input[0], False
            producer = self.producer.get(source)
            if producer is not None and producer.op_type == "Transpose":
                perm = next((list(a.ints) for a in producer.attribute if a.name == "perm"), [1, 0])
                source, transposed = producer.input[0], perm == [1, 0]
                if not transposed:
                    continue
            t = self._constant_2d(source)
            if t is None or axis != 0:
                continue
            v, d = (t.dims[1], t.dims[0]) if transposed else (t.dims[0], t.dims[1])
            found.append(EmbeddingGather(node, t.name, transposed, (int(v), int(d))))
        return found

    def float_table(self, emb: EmbeddingGather) -> np.ndarray:
        """The embedding table (V, D) as float32."""
        table = self.array(emb.table).astype(np.float32)
        check_finite(emb.table, table, self.path)
        return np.ascontiguousarray(table.T) if emb.transposed else table

    def weight(self, mm: WeightMatMul) -> np.ndarray:
        """W (K, N) of a weight MatMul, float32 (refused when it holds NaN or Inf)."""
        w = self.array(mm.weight).astype(np.float32)
        check_finite(mm.weight, w, self.path)
        return w

    def linears(self) -> dict[str, tuple[int, int]]:
        """Module-style name -> (out_features, in_features), what recipe.resolve_plan reads."""
        return {mm.name: mm.shape for mm in self.matmuls}

    def input_groups(self) -> dict[str, list[WeightMatMul]]:
        """Weight MatMuls by the tensor they read, in graph order (q/k/v or qkv; o; gate/up; down; lm_head)."""
        groups: dict[str, list[WeightMatMul]] = {}
        for mm in self.matmuls:
            groups.setdefault(mm.input, []).append(mm)
        return groups

    def input_names(self) -> list[str]:
        return [i.name for i in self.graph.input]

    def opset(self, domain: str = "") -> int:
        return next((o.version for o in self.model.opset_import if o.domain in (domain, "ai.onnx" if not domain
                                                                                 else domain)), 0)

    def size_bytes(self) -> int:
        return self.path.stat().st_size + sum((self.folder / f).stat().st_size for f in self.external_files())

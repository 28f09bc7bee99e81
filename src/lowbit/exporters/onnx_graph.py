"""The decoder graph of lowbit's ONNX export, built node by node with onnx.helper: the graph, its float type,
and the linears (the decoder's structure is onnx_decoder.py).

One graph per model, with the I/O names of onnxruntime-genai's builder (FORMATS.md 2.3) so genai and
lowbit's ONNX perplexity both run it. It uses the contrib ops onnxruntime's CPU kernels fuse: MatMulNBits for
quantized linears (q/k/v packed into one when their formats agree), SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization (RMSNorm with the residual add), and GroupQueryAttention with the rotary
embedding inside (cos/sin caches, position_ids) and the KV cache in BNSH. Float linears are MatMul on (K, N)
weights; an online rotation (r4) multiplies the linear's input by the normalised Hadamard: two small MatMuls
on its Kronecker factors (a dense MatMul where the matrix has none).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_tensors import ExternalData, kronecker_split, matmul_block_size, matmul_nbits_tensors

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
IR_VERSION = 10  # onnxruntime refuses the newer default IR version of onnx 1.23 (FORMATS.md 1.4)
MS = "com.microsoft"


FLOAT_TYPES = {"float32": (np.float32, TensorProto.FLOAT), "float16": (np.float16, TensorProto.FLOAT16)}


@dataclass
class GraphOptions:
    """What the caller chooses beyond the lowbit folder."""

    accuracy_level: int = 0
    embedding: dict | None = None  # GatherBlockQuantized tensors and attributes, or None for a float table
    dtype: str = "float32"  # of every float tensor: activations, logits, KV cache, norms, tables, scales


class Graph:
    """Nodes and initializers being built; initializers go straight to the external-data file."""

    def __init__(self, data: ExternalData, dtype: str = "float32"):
        self.data = data
        self.np_float, self.float_type = FLOAT_TYPES[dtype]
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._init_names: set[str] = set()
        self._count: dict[str, int] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        """An initializer (once per name); float arrays are stored in the graph's float type."""
        if name not in self._init_names:
            array = np.asarray(array)
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(self.np_float)
            self.initializers.append(self.data.tensor(name, array))
            self._init_names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs):
        """Add a node; returns its output name (one output) or names. `name` is a path like /model/layers.0/attn."""
        n = self._count.get(name, 0)
        self._count[name] = n + 1
        node_name = name if n == 0 else f"{name}_{n}"
        outs = outputs if isinstance(outputs, list) else [f"{node_name}/output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, domain=domain or None,
                                           **{k: v for k, v in attrs.items() if v is not None}))
        return outs[0] if len(outs) == 1 else outs


class LinearBuilder:
    """The linears of the decoder from a LowbitFolder's tensors (read one linear at a time)."""

    def __init__(self, folder, options: GraphOptions, data: ExternalData):
        self.folder, self.options = folder, options
        self.g = Graph(data, options.dtype)
        self.keys = set(folder.ckpt.keys())
        self.rotations = {name: int(r["size"]) for name, r in folder.online_rotations.items()}
        self._rotation_inits: dict[int, list[str]] = {}

    # -- tensors ------------------------------------------------------------------------------------------
    def _float(self, name: str) -> np.ndarray:
        return self.folder.ckpt.get(name).float().numpy()

    def _bias(self, name: str) -> np.ndarray | None:
        return self._float(f"{name}.bias") if f"{name}.bias" in self.keys else None

    def _weight_name(self, name: str) -> str:
        """The stored weight of a float linear (a tied lm_head reads the embedding)."""
        if f"{name}.weight" not in self.keys and name == "lm_head":
            return "model.embed_tokens.weight"
        return f"{name}.weight"

    # -- linears ------------------------------------------------------------------------------------------
    def _quant_key(self, name: str):
        """What must agree for linears to share one MatMulNBits: bits, block, zero points, K."""
        if name not in self.folder.modules:
            return ("float",)
        spec, (_, k) = self.folder.modules[name]
        return (spec.bits, matmul_block_size(spec, k), spec.symmetric, k)

    def _rotated(self, x: str, name: str) -> str:
        """x times the online rotation of the linear's input width (r4): two small MatMuls on x reshaped
        (n / m, m) when the matrix is a Kronecker product, else one dense MatMul; matrices shared per width."""
        size = self.rotations.get(name)
        if size is None:
            return x
        g, path = self.g, f"/model/{name.removeprefix('model.')}/online_rotation"
        matrices = self._rotation_matrices(size)
        if len(matrices) == 1:
            return g.op("MatMul", [x, matrices[0]], f"{path}/MatMul")
        shape, left_t, right = matrices
        blocks = g.op("MatMul", [g.op("Reshape", [x, shape], f"{path}/Reshape"), right], f"{path}/MatMul")
        blocks = g.op("MatMul", [left_t, blocks], f"{path}/MatMul")
        return g.op("Reshape", [blocks, g.const("shape_flat", np.array([0, 0, -1]))], f"{path}/Reshape")

    def _rotation_matrices(self, size: int) -> list[str]:
        """Initializers of one width's rotation: [dense] or [reshape shape, left transposed, right]."""
        if size not in self._rotation_inits:
            from ..algorithms.rotation import online_rotation

            rotation = online_rotation(size)
            split = kronecker_split(rotation, size)
            name = f"online_rotation_{size}"
            if split is None:
                self._rotation_inits[size] = [self.g.const(name, rotation.matrix().float().numpy())]
            else:
                left, right = split
                self._rotation_inits[size] = [
                    self.g.const(f"{name}.shape", np.array([0, 0, left.shape[0], right.shape[0]])),
                    self.g.const(f"{name}.left_t", np.ascontiguousarray(left.T)),
                    self.g.const(f"{name}.right", right)]
        return self._rotation_inits[size]

    def linear(self, x: str, names: list[str], out: str | None = None) -> str:
        """One linear, or several sharing their input concatenated along N (q/k/v): MatMulNBits when quantized,
        MatMul with the (K, N) float weight otherwise; bias added."""
        stem = _stem(names)
        path = f"/model/{stem.removeprefix('model.')}"
        x = self._rotated(x, names[0])
        outputs = [out] if out else 1
        bias = self._biases(names)
        if names[0] in self.folder.modules:
            spec, (_, k) = self.folder.modules[names[0]]
            block = matmul_block_size(spec, k)
            parts = [matmul_nbits_tensors(self.folder.stored(n), *self.folder.modules[n], block) for n in names]
            inputs = [x] + [self.g.const(f"{stem}.{key}", np.concatenate([p[key] for p in parts]))
                            if key in parts[0] else "" for key in ("B", "scales", "zero_points")]
            if bias is not None:
                inputs += ["", self.g.const(f"{stem}.bias", bias)]  # input 4 (g_idx) is never written
            return self.g.op("MatMulNBits", _trim(inputs), f"{path}/MatMulNBits", outputs, MS, K=k,
                             N=sum(p["B"].shape[0] for p in parts), bits=spec.bits, block_size=block,
                             accuracy_level=self.options.accuracy_level or None)
        weight = np.concatenate([self._float(self._weight_name(n)) for n in names]).T
        w = self.g.const(f"{stem}.weight_t", np.ascontiguousarray(weight))
        if bias is None:
            return self.g.op("MatMul", [x, w], f"{path}/MatMul", outputs)
        y = self.g.op("MatMul", [x, w], f"{path}/MatMul")
        return self.g.op("Add", [y, self.g.const(f"{stem}.bias", bias)], f"{path}/Add", outputs)

    def _biases(self, names: list[str]) -> np.ndarray | None:
        """The linears' biases end to end (zeros for one without), or None when none has a bias."""
        biases = [self._bias(n) for n in names]
        if all(b is None for b in biases):
            return None
        return np.concatenate([b if b is not None else np.zeros(self._out_features(n), np.float32)
                               for b, n in zip(biases, names)])

    def _out_features(self, name: str) -> int:
        if name in self.folder.modules:
            return self.folder.modules[name][1][0]
        return self.folder.ckpt.get(self._weight_name(name)).shape[0]

    def _can_share(self, names: list[str]) -> bool:
        keys = {self._quant_key(n) for n in names}
        return len(keys) == 1 and len({self.rotations.get(n) for n in names}) == 1


def _stem(names: list[str]) -> str:
    """The tensor name stem of one linear, or of several fused (model.layers.0.self_attn.q_proj+k_proj+v_proj)."""
    parent = names[0].rpartition(".")[0]
    return names[0] if len(names) == 1 else f"{parent}." + "+".join(n.rpartition(".")[2] for n in names)


def _trim(inputs: list[str]) -> list[str]:
    """Drop trailing empty optional inputs."""
    while inputs and inputs[-1] == "":
        inputs.pop()
    return inputs


"""The decoder graph of lowbit's ONNX export, built node by node with onnx.helper.

One graph per model, with the I/O names of onnxruntime-genai's builder (FORMATS.md 2.3) so genai and
lowbit's ONNX perplexity both run it. It uses the contrib ops onnxruntime's CPU kernels fuse: MatMulNBits for
quantized linears (q/k/v packed into one when their formats agree), SimplifiedLayerNormalization and
SkipSimplifiedLayerNormalization (RMSNorm with the residual add), and GroupQueryAttention with the rotary
embedding inside (cos/sin caches, position_ids) and the KV cache in BNSH. Float linears are MatMul on (K, N)
weights; an online rotation (r4) multiplies the linear's input by the normalised Hadamard: two small MatMuls
on its Kronecker factors (a dense MatMul where the matrix has none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_tensors import ExternalData, kronecker_split, matmul_block_size, matmul_nbits_tensors

OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
IR_VERSION = 10  # onnxruntime refuses the newer default IR version of onnx 1.23 (FORMATS.md 1.4)
MS = "com.microsoft"


@dataclass
class DecoderShape:
    """The sizes and options of a Llama-like decoder, read from its config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    context: int
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    windows: list[int] = field(default_factory=list)  # GroupQueryAttention local_window_size per layer (-1: none)


@dataclass
class GraphOptions:
    """What the caller chooses beyond the lowbit folder."""

    accuracy_level: int = 0
    embedding: dict | None = None  # GatherBlockQuantized tensors and attributes, or None for a float table


class Graph:
    """Nodes and initializers being built; initializers go straight to the external-data file."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._init_names: set[str] = set()
        self._count: dict[str, int] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self._init_names:
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


class DecoderBuilder:
    """Builds the decoder from a LowbitFolder's tensors (read one linear at a time)."""

    def __init__(self, folder, shape: DecoderShape, options: GraphOptions, rope: tuple[np.ndarray, np.ndarray],
                 data: ExternalData):
        self.folder, self.shape, self.options = folder, shape, options
        self.g = Graph(data)
        self.keys = set(folder.ckpt.keys())
        self.rotations = {name: int(r["size"]) for name, r in folder.online_rotations.items()}
        self._rotation_inits: dict[int, list[str]] = {}
        self.cos = self.g.const("cos_cache", rope[0])
        self.sin = self.g.const("sin_cache", rope[1])

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
                    self.g.const(f"{name}.left_t", np.ascontiguousarray(left.T, dtype=np.float32)),
                    self.g.const(f"{name}.right", right.astype(np.float32))]
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

    # -- blocks -------------------------------------------------------------------------------------------
    def embedding(self, ids: str) -> str:
        emb = self.options.embedding
        if emb is None:
            table = self.g.const("model.embed_tokens.weight", self._float("model.embed_tokens.weight"))
            return self.g.op("Gather", [table, ids], "/model/embed_tokens/Gather")
        data, scales, zeros = (self.g.const(f"model.embed_tokens.{k}", emb["tensors"][k])
                               for k in ("data", "scales", "zero_points"))
        return self.g.op("GatherBlockQuantized", [data, ids, scales, zeros], "/model/embed_tokens/GatherBlockQuantized",
                         1, MS, gather_axis=0, quantize_axis=1, block_size=emb["block_size"], bits=emb["bits"])

    def _head_norm(self, x: str, weight: str, path: str) -> str:
        """Per-head RMSNorm of (batch, seq, heads * head_dim) over head_dim (Qwen3's q_norm / k_norm)."""
        heads = self.g.op("Reshape", [x, self.g.const("shape_heads", np.array([0, 0, -1, self.shape.head_dim]))],
                          f"{path}/Reshape")
        normed = self.g.op("SimplifiedLayerNormalization", [heads, self.g.const(weight, self._float(weight))],
                           f"{path}/SimplifiedLayerNormalization", axis=-1, epsilon=self.shape.eps)
        return self.g.op("Reshape", [normed, self.g.const("shape_flat", np.array([0, 0, -1]))], f"{path}/Reshape")

    def attention(self, i: int, x: str, mask: tuple[str, str]) -> str:
        s = self.shape
        prefix = f"model.layers.{i}.self_attn"
        qkv = [f"{prefix}.{p}_proj" for p in ("q", "k", "v")]
        if s.qk_norm or not self._can_share(qkv):
            q, k, v = (self.linear(x, [n]) for n in qkv)
            if s.qk_norm:
                q = self._head_norm(q, f"{prefix}.q_norm.weight", f"/model/layers.{i}/attn/q_norm")
                k = self._head_norm(k, f"{prefix}.k_norm.weight", f"/model/layers.{i}/attn/k_norm")
        else:
            q, k, v = self.linear(x, qkv), "", ""
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", mask[0], mask[1], self.cos,
                  self.sin, "position_ids"]
        attn = self.g.op("GroupQueryAttention", inputs, f"/model/layers.{i}/attn/GroupQueryAttention",
                         [f"/model/layers.{i}/attn/output_0", f"present.{i}.key", f"present.{i}.value"], MS,
                         num_heads=s.heads, kv_num_heads=s.kv_heads, scale=1.0 / math.sqrt(s.head_dim),
                         do_rotary=1, rotary_interleaved=0, local_window_size=s.windows[i] if s.windows else -1)
        return self.linear(attn[0], [f"{prefix}.o_proj"])

    def mlp(self, i: int, x: str) -> str:
        prefix = f"model.layers.{i}.mlp"
        gate = self.linear(x, [f"{prefix}.gate_proj"])
        up = self.linear(x, [f"{prefix}.up_proj"])
        path = f"/model/layers.{i}/mlp/act"
        act = self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate], f"{path}/Sigmoid")], f"{path}/Mul")
        return self.linear(self.g.op("Mul", [act, up], f"{path}/Mul"), [f"{prefix}.down_proj"])

    def _norm(self, weight: str) -> str:
        return self.g.const(weight, self._float(weight))

    def build(self) -> onnx.ModelProto:
        s, g = self.shape, self.g
        total = g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape")
        total = g.op("Gather", [total, g.const("one", np.array(1, dtype=np.int64))], "/model/attn_mask/Gather", axis=0)
        lengths = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], dtype=np.int64))],
                       "/model/attn_mask/ReduceSum", keepdims=0)
        lengths = g.op("Sub", [lengths, "one"], "/model/attn_mask/Sub")
        mask = (g.op("Cast", [lengths], "/model/attn_mask/seqlens_k", to=TensorProto.INT32),
                g.op("Cast", [total], "/model/attn_mask/total_seq_len", to=TensorProto.INT32))
        residual = self.embedding("input_ids")
        hidden = g.op("SimplifiedLayerNormalization", [residual, self._norm("model.layers.0.input_layernorm.weight")],
                      "/model/layers.0/input_layernorm", axis=-1, epsilon=s.eps)
        for i in range(s.layers):
            attn = self.attention(i, hidden, mask)
            hidden, _, _, residual = g.op(
                "SkipSimplifiedLayerNormalization",
                [attn, residual, self._norm(f"model.layers.{i}.post_attention_layernorm.weight")],
                f"/model/layers.{i}/post_attention_layernorm", 4, MS, epsilon=s.eps)
            out = self.mlp(i, hidden)
            last = i == s.layers - 1
            weight = "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
            hidden, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [out, residual, self._norm(weight)],
                                          "/model/norm" if last else f"/model/layers.{i + 1}/input_layernorm", 4,
                                          MS, epsilon=s.eps)
        self.linear(hidden, ["lm_head"], out="logits")
        return self._model()

    def _model(self) -> onnx.ModelProto:
        s = self.shape
        kv = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        present = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
        graph = helper.make_graph(self.g.nodes, "lowbit_decoder", inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION, producer_name="lowbit")


def _stem(names: list[str]) -> str:
    """The tensor name stem of one linear, or of several fused (model.layers.0.self_attn.q_proj+k_proj+v_proj)."""
    parent = names[0].rpartition(".")[0]
    return names[0] if len(names) == 1 else f"{parent}." + "+".join(n.rpartition(".")[2] for n in names)


def _trim(inputs: list[str]) -> list[str]:
    """Drop trailing empty optional inputs."""
    while inputs and inputs[-1] == "":
        inputs.pop()
    return inputs


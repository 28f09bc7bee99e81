"""The decoder's structure in lowbit's ONNX export: embedding, the residual stream with each family's norms
(before and / or after attention and MLP, onnx_family.DecoderShape.norms), GroupQueryAttention, the MLP (or a
mixture of experts, onnx_moe.py) and the logits. Linears and the graph itself are onnx_graph.py.

The residual stream is carried as (pending block output, residual): the add that joins them and the norm
before the next block are one SkipSimplifiedLayerNormalization (an Add where no norm follows, as in OLMo-2).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_family import DecoderShape
from .onnx_graph import IR_VERSION, MS, OPSETS, GraphOptions
from .onnx_moe import ExpertsBuilder, moe_routing
from .onnx_tensors import ExternalData, select_rope_cache


class DecoderBuilder(ExpertsBuilder):
    """Builds the decoder of one family (DecoderShape) from a LowbitFolder."""

    def __init__(self, folder, shape: DecoderShape, options: GraphOptions,
                 rope: dict[str, tuple[np.ndarray, np.ndarray]], data: ExternalData):
        super().__init__(folder, options, data)
        self.shape = shape
        self.routing = moe_routing(folder.config)  # Mixtral, Qwen3-MoE: experts in place of the MLP
        self.rope = {kind: (self.g.const(f"cos_cache.{kind}" if len(rope) > 1 else "cos_cache", cos),
                            self.g.const(f"sin_cache.{kind}" if len(rope) > 1 else "sin_cache", sin))
                     for kind, (cos, sin) in rope.items()}
        self.rotary_dim = 2 * next(iter(rope.values()))[0].shape[1]
        self._chosen_rope: dict[str, tuple[str, str]] = {}  # LongRoPE: the If's outputs per cache
        # GroupQueryAttention rotates inside only for head_dim % 16 == 0 and a rotary width % 16 == 0
        # (onnxruntime 1.32 CPU); else a RotaryEmbedding node per q and k before it
        self.fused_rotary = shape.head_dim % 16 == 0 and self.rotary_dim % 16 == 0

    def _scalar(self, value: float) -> str:
        return self.g.const(f"scalar_{value!r}", np.array(value, dtype=np.float32))

    def _norm(self, weight: str) -> str:
        """An RMSNorm gain, with the family's offset folded in (Gemma's 1 + w)."""
        gain = self._float(weight)
        return self.g.const(weight, gain + self.shape.norm_offset if self.shape.norm_offset else gain)

    def _rms_norm(self, x: str, weight: str, path: str) -> str:
        return self.g.op("SimplifiedLayerNormalization", [x, self._norm(weight)], f"{path}/SimplifiedLayerNormalization",
                         axis=-1, epsilon=self.shape.eps)

    # -- blocks -------------------------------------------------------------------------------------------
    def embedding(self, ids: str) -> str:
        emb = self.options.embedding
        if emb is None:
            table = self.g.const("model.embed_tokens.weight", self._float("model.embed_tokens.weight"))
            x = self.g.op("Gather", [table, ids], "/model/embed_tokens/Gather")
        else:
            data, scales, zeros = (self.g.const(f"model.embed_tokens.{k}", emb["tensors"][k])
                                   for k in ("data", "scales", "zero_points"))
            x = self.g.op("GatherBlockQuantized", [data, ids, scales, zeros],
                          "/model/embed_tokens/GatherBlockQuantized", 1, MS, gather_axis=0, quantize_axis=1,
                          block_size=emb["block_size"], bits=emb["bits"])
        if self.shape.embed_scale is None:
            return x
        return self.g.op("Mul", [x, self._scalar(self.shape.embed_scale)], "/model/embed_tokens/Mul")

    def _head_norm(self, x: str, weight: str, path: str) -> str:
        """q/k RMSNorm: per head over head_dim (Qwen3, Gemma-3) or over the whole projection (OLMo-2)."""
        if self.shape.qk_norm == "full":
            return self._rms_norm(x, weight, path)
        heads = self.g.op("Reshape", [x, self.g.const("shape_heads", np.array([0, 0, -1, self.shape.head_dim]))],
                          f"{path}/Reshape")
        normed = self._rms_norm(heads, weight, path)
        return self.g.op("Reshape", [normed, self.g.const("shape_flat", np.array([0, 0, -1]))], f"{path}/Reshape")

    def _qkv(self, i: int, x: str) -> tuple[str, str, str]:
        """q, k, v (k and v empty when q is GroupQueryAttention's packed q|k|v)."""
        s, prefix = self.shape, f"model.layers.{i}.self_attn"
        if f"{prefix}.qkv_proj" in self.folder.modules or f"{prefix}.qkv_proj.weight" in self.keys:
            return self.linear(x, [f"{prefix}.qkv_proj"]), "", ""  # Phi-3: already packed
        qkv = [f"{prefix}.{p}_proj" for p in ("q", "k", "v")]
        if not s.qk_norm and self._can_share(qkv):
            return self.linear(x, qkv), "", ""
        q, k, v = (self.linear(x, [n]) for n in qkv)
        if s.qk_norm:
            q = self._head_norm(q, f"{prefix}.q_norm.weight", f"/model/layers.{i}/attn/q_norm")
            k = self._head_norm(k, f"{prefix}.k_norm.weight", f"/model/layers.{i}/attn/k_norm")
        return q, k, v

    def _rotary(self, i: int, q: str, k: str, v: str, cos: str, sin: str) -> tuple[str, str, str]:
        """RoPE on q and k as RotaryEmbedding nodes (the first rotary_dim of each head; q|k|v split first)."""
        s, path = self.shape, f"/model/layers.{i}/attn"
        if not k:
            sizes = np.array([s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim])
            q, k, v = self.g.op("Split", [q, self.g.const("qkv_sizes", sizes)], f"{path}/Split", 3, axis=-1)
        partial = self.rotary_dim if self.rotary_dim != s.head_dim else None
        q, k = (self.g.op("RotaryEmbedding", [x, "position_ids", cos, sin], f"{path}/{name}_rotary", 1, MS,
                          num_heads=heads, rotary_embedding_dim=partial, interleaved=0)
                for x, name, heads in ((q, "q", s.heads), (k, "k", s.kv_heads)))
        return q, k, v

    def _rope_cache(self, kind: str, total: str) -> tuple[str, str]:
        """A layer's (cos, sin) caches; with LongRoPE's long ones too, an If (made once) choosing them by the total
        sequence length."""
        if f"{kind}.long" not in self.rope:
            return self.rope[kind]
        if kind not in self._chosen_rope:
            self._chosen_rope[kind] = select_rope_cache(self.g, total, self.shape.rope_original, self.rope[kind],
                                                        self.rope[f"{kind}.long"])
        return self._chosen_rope[kind]

    def attention(self, i: int, x: str, mask: tuple[str, str]) -> str:
        s = self.shape
        q, k, v = self._qkv(i, x)
        cos, sin = self._rope_cache(s.rope_layers[i] if s.rope_layers else "default", mask[1])
        rotary = [cos, sin, "position_ids"]
        if not self.fused_rotary:
            q, k, v = self._rotary(i, q, k, v, cos, sin)
            rotary = []
        inputs = [q, k, v, f"past_key_values.{i}.key", f"past_key_values.{i}.value", mask[0], mask[1], *rotary]
        attn = self.g.op("GroupQueryAttention", inputs, f"/model/layers.{i}/attn/GroupQueryAttention",
                         [f"/model/layers.{i}/attn/output_0", f"present.{i}.key", f"present.{i}.value"], MS,
                         num_heads=s.heads, kv_num_heads=s.kv_heads,
                         scale=s.attn_scale if s.attn_scale is not None else 1.0 / math.sqrt(s.head_dim),
                         softcap=s.softcap or None, do_rotary=int(bool(rotary)), rotary_interleaved=0,
                         local_window_size=s.windows[i] if s.windows else -1)
        return self.linear(attn[0], [f"model.layers.{i}.self_attn.o_proj"])

    def _activation(self, x: str, path: str) -> str:
        if self.shape.activation == "silu":
            return self.g.op("Mul", [x, self.g.op("Sigmoid", [x], f"{path}/Sigmoid")], f"{path}/Mul")
        approximate = "tanh" if self.shape.activation == "gelu_tanh" else "none"
        return self.g.op("Gelu", [x], f"{path}/Gelu", approximate=approximate)

    def mlp(self, i: int, x: str) -> str:
        if self.routing and self.routing.sparse[i]:
            return self.experts(i, x, self.routing)
        prefix = f"model.layers.{i}.mlp"
        if f"{prefix}.gate_up_proj" in self.folder.modules or f"{prefix}.gate_up_proj.weight" in self.keys:
            fused = self.linear(x, [f"{prefix}.gate_up_proj"])  # Phi-3: gate | up
            gate, up = self.g.op("Split", [fused], f"/model/layers.{i}/mlp/Split", 2, axis=-1, num_outputs=2)
        else:
            gate = self.linear(x, [f"{prefix}.gate_proj"])
            up = self.linear(x, [f"{prefix}.up_proj"])
        act = self._activation(gate, f"/model/layers.{i}/mlp/act")
        return self.linear(self.g.op("Mul", [act, up], f"/model/layers.{i}/mlp/act/Mul"), [f"{prefix}.down_proj"])

    def _join(self, pending: str | None, residual: str, weight: str, path: str) -> tuple[str, str]:
        """Add a block's output to the residual stream and norm it for the next block: (normed, residual)."""
        g, s = self.g, self.shape
        if pending is None:  # before the first block
            return (self._rms_norm(residual, weight, path) if weight else residual), residual
        if s.residual_scale is not None:
            pending = g.op("Mul", [pending, self._scalar(s.residual_scale)], f"{path}/residual/Mul")
        if not weight:
            total = g.op("Add", [pending, residual], f"{path}/residual/Add")
            return total, total
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", [pending, residual, self._norm(weight)],
                                   path, [f"{path}/output_0", "", "", f"{path}/output_3"], MS, epsilon=s.eps)
        return normed, total

    def _after(self, x: str, i: int, norm: str) -> str:
        """A block's output normed before the residual add (Gemma-2/3 and OLMo-2), else as it is."""
        return self._rms_norm(x, f"model.layers.{i}.{norm}.weight", f"/model/layers.{i}/{norm}") if norm else x

    def build(self) -> onnx.ModelProto:
        s, mask = self.shape, self._mask()
        pre_attn, post_attn, pre_mlp, post_mlp = s.norms
        pending, residual = None, self.embedding("input_ids")
        for i in range(s.layers):
            layer = f"model.layers.{i}"
            hidden, residual = self._join(pending, residual, pre_attn and f"{layer}.{pre_attn}.weight",
                                          f"/model/layers.{i}/{pre_attn or 'residual_attn'}")
            pending = self._after(self.attention(i, hidden, mask), i, post_attn)
            hidden, residual = self._join(pending, residual, pre_mlp and f"{layer}.{pre_mlp}.weight",
                                          f"/model/layers.{i}/{pre_mlp or 'residual_mlp'}")
            pending = self._after(self.mlp(i, hidden), i, post_mlp)
        hidden, _ = self._join(pending, residual, "model.norm.weight", "/model/norm")
        self._logits(hidden)
        return self._model()

    def _logits(self, hidden: str) -> None:
        s, g = self.shape, self.g
        if s.final_softcap is None and s.logits_divisor is None:
            self.linear(hidden, ["lm_head"], out="logits")
            return
        logits = self.linear(hidden, ["lm_head"])
        if s.logits_divisor is not None:
            last = s.final_softcap is None
            logits = g.op("Div", [logits, self._scalar(s.logits_divisor)], "/lm_head/Div", ["logits"] if last else 1)
        if s.final_softcap is not None:
            capped = g.op("Tanh", [g.op("Div", [logits, self._scalar(s.final_softcap)], "/lm_head/softcap/Div")],
                          "/lm_head/softcap/Tanh")
            g.op("Mul", [capped, self._scalar(s.final_softcap)], "/lm_head/softcap/Mul", ["logits"])

    def _mask(self) -> tuple[str, str]:
        """GroupQueryAttention's seqlens_k (tokens seen - 1 per row) and total_sequence_length, as int32."""
        g = self.g
        total = g.op("Shape", ["attention_mask"], "/model/attn_mask/Shape")
        total = g.op("Gather", [total, g.const("one", np.array(1, dtype=np.int64))], "/model/attn_mask/Gather", axis=0)
        lengths = g.op("ReduceSum", ["attention_mask", g.const("axis_1", np.array([1], dtype=np.int64))],
                       "/model/attn_mask/ReduceSum", keepdims=0)
        lengths = g.op("Sub", [lengths, "one"], "/model/attn_mask/Sub")
        return (g.op("Cast", [lengths], "/model/attn_mask/seqlens_k", to=TensorProto.INT32),
                g.op("Cast", [total], "/model/attn_mask/total_seq_len", to=TensorProto.INT32))

    def _model(self) -> onnx.ModelProto:
        s, t = self.shape, self.g.float_type
        kv = ["batch_size", s.kv_heads, "past_sequence_length", s.head_dim]
        present = ["batch_size", s.kv_heads, "total_sequence_length", s.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                                ["batch_size", "total_sequence_length"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", t, ["batch_size", "sequence_length", s.vocab])]
        for i in range(s.layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", t, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", t, present))
        graph = helper.make_graph(self.g.nodes, "lowbit_decoder", inputs, outputs, self.g.initializers)
        return helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION, producer_name="lowbit")

"""Writing the quantized ONNX decoder: the source graph with its weight MatMuls replaced, changed
initializers (folded scales) substituted, and every initializer streamed into one new external-data file.

Three forms of a quantized weight MatMul Y = X @ W (FORMATS.md 1.1 and 1.4), chosen with `onnx_format`:
- "matmulnbits": com.microsoft MatMulNBits, B from lowbit's packed rows (exporters/onnx_tensors.py), the form
  onnxruntime and onnxruntime-genai run fastest on CPU;
- "dq": W stored as int4/uint4/int8/uint8 (K, N) with block-wise scales, DequantizeLinear (opset 21, blocked
  along K) -> MatMul: ModelOpt's rtn_dq / awq output, what DirectML and TensorRT fuse;
- "qdq": the dequantized float W -> QuantizeLinear -> DequantizeLinear -> MatMul (ModelOpt's rtn form).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..errors import LowbitError
from ..formats.packed import pack_linear
from ..exporters.onnx_tensors import ExternalData, matmul_block_size, matmul_nbits_tensors
from ..formats import Quantized
from ..spec import QuantSpec
from .graph import OnnxDecoder, WeightMatMul

ONNX_FORMATS = ("matmulnbits", "dq", "qdq")
MS = "com.microsoft"
_NP = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def check_format(onnx_format: str, spec: QuantSpec, name: str, k: int) -> None:
    """Refuse, before any work, a spec the chosen node form cannot hold."""
    if onnx_format not in ONNX_FORMATS:
        raise LowbitError(f"unknown ONNX output form {onnx_format!r}; use one of {', '.join(ONNX_FORMATS)}")
    if not spec.plain_int:
        raise LowbitError(f"{name}: {spec.short_name} is not an integer scheme; ONNX weight-only quantization takes "
                          f"int/uint 2, 4 or 8 bits (w_uint4_per_group_asym, w_int4_per_group_sym, w_int8_...)")
    if onnx_format == "matmulnbits":
        if spec.bits not in (2, 4, 8):
            raise LowbitError(f"{name}: MatMulNBits runs 2, 4 or 8 bits, not {spec.bits}; use bits 4 or 8")
        if spec.granularity == "group" and matmul_block_size(spec, k) is None:
            raise LowbitError(f"{name}: group size {spec.group_size} has no power-of-two block >= 16 for "
                              f"MatMulNBits; use group 16/32/64/128/256")
    elif spec.bits not in (4, 8):
        raise LowbitError(f"{name}: DequantizeLinear stores 4- or 8-bit integers, not {spec.bits}; use bits 4 or 8")


def onnx_int_type(spec: QuantSpec) -> int:
    return {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
            (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}[(spec.bits, spec.signed)]


def pack_sub_byte(values: np.ndarray, bits: int) -> bytes:
    """ONNX int4/uint4 storage: row-major, element 2i in the low nibble of byte i (FORMATS.md 1.4)."""
    flat = values.astype(np.int64).reshape(-1)
    if bits == 8:
        return flat.astype(np.int8 if flat.min() < 0 else np.uint8).tobytes()
    nib = (flat & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.append(nib, np.uint8(0))
    return (nib[0::2] | (nib[1::2] << 4)).tobytes()


class GraphWriter:
    """Collects node replacements and new or changed initializers (streamed at once into the output's
    external-data file), then writes model.onnx with the untouched initializers copied from the source."""

    def __init__(self, decoder: OnnxDecoder, folder: Path, filename: str = "model.onnx"):
        self.decoder = decoder
        self.folder = Path(folder)
        self.filename = filename
        self.data = ExternalData(self.folder / f"{filename}.data")
        self.initializers: dict[str, TensorProto] = {}  # new or replaced, already in the data file
        self._replace: dict[str, list[onnx.NodeProto]] = {}  # node key -> nodes in its place
        self._remove: set[str] = set()  # keys of nodes dropped without replacement
        self.opsets: dict[str, int] = {}

    # -- nodes -------------------------------------------------------------------------------------
    @staticmethod
    def _key(node: onnx.NodeProto) -> str:
        """A node's identity: its first output (unique in a valid graph; names may be empty)."""
        return node.output[0]

    def replace_node(self, node: onnx.NodeProto, nodes: list[onnx.NodeProto]) -> None:
        self._replace[self._key(node)] = nodes

    def remove_node(self, node: onnx.NodeProto) -> None:
        self._remove.add(self._key(node))

    # -- initializers --------------------------------------------------------------------------------
    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers[name] = self.data.tensor(name, np.ascontiguousarray(array))
        return name

    def packed(self, name: str, data_type: int, dims: tuple[int, ...], payload: bytes) -> str:
        """A sub-byte (int4/uint4) initializer from its packed bytes."""
        array = np.frombuffer(payload, dtype=np.uint8)
        proto = self.data.tensor(name, array)
        proto.data_type = data_type
        del proto.dims[:]
        proto.dims.extend(dims)
        self.initializers[name] = proto
        return name

    # -- weight MatMuls ------------------------------------------------------------------------------
    def quantized_matmul(self, mm: WeightMatMul, qt: Quantized, onnx_format: str, accuracy_level: int = 0) -> None:
        """Replace a weight MatMul by its quantized form."""
        node, base = mm.node, mm.weight
        n, k = mm.shape
        scale_dtype = mm.dtype.type
        if onnx_format == "matmulnbits":
            block = matmul_block_size(qt.spec, k)
            tensors = matmul_nbits_tensors(pack_linear(qt), qt.spec, (n, k), block)
            inputs = [node.input[0], self.tensor(f"{base}_Q{qt.spec.bits}", tensors["B"]),
                      self.tensor(f"{base}_scales", tensors["scales"].astype(scale_dtype))]
            if "zero_points" in tensors:
                inputs.append(self.tensor(f"{base}_zero_points", tensors["zero_points"]))
            attrs = dict(K=k, N=n, bits=qt.spec.bits, block_size=block)
            if accuracy_level:
                attrs["accuracy_level"] = accuracy_level
            self.replace_node(node, [helper.make_node("MatMulNBits", inputs, list(node.output),
                                                      (node.name or node.output[0]) + "_Q", domain=MS, **attrs)])
            self.opsets[MS] = 1
            return
        axis_attrs, scale, zero = self._dq_params(qt)
        itype = onnx_int_type(qt.spec)
        codes = qt.codes.T.contiguous().numpy()
        dq_inputs = [None, self.tensor(f"{base}_scale", scale.astype(scale_dtype))]
        if zero is not None:
            dq_inputs.append(self.packed(f"{base}_zero_point", itype, zero.shape, pack_sub_byte(zero, qt.spec.bits)))
        prefix = node.name or node.output[0]
        nodes = []
        if onnx_format == "dq":
            dq_inputs[0] = self.packed(f"{base}_quantized", itype, codes.shape, pack_sub_byte(codes, qt.spec.bits))
        else:  # qdq: the float weight the codes came from, quantized at load time
            weight = self.tensor(f"{base}_dequantized", qt.dequantize(torch.float32).T.numpy().astype(scale_dtype))
            q_out = f"{prefix}/QuantizeLinear/output_0"
            nodes.append(helper.make_node("QuantizeLinear", [weight, *dq_inputs[1:]], [q_out], f"{prefix}/QuantizeLinear",
                                          output_dtype=itype, **axis_attrs) if zero is None else
                         helper.make_node("QuantizeLinear", [weight, *dq_inputs[1:]], [q_out],
                                          f"{prefix}/QuantizeLinear", **axis_attrs))
            dq_inputs[0] = q_out
        w_out = f"{prefix}/DequantizeLinear/output_0"
        nodes.append(helper.make_node("DequantizeLinear", dq_inputs, [w_out], f"{prefix}/DequantizeLinear", **axis_attrs))
        nodes.append(helper.make_node("MatMul", [node.input[0], w_out], list(node.output), node.name))
        self.replace_node(node, nodes)
        self.opsets[""] = max(self.opsets.get("", 0), 21)  # blocked Q/DQ, int4 types, output_dtype

    @staticmethod
    def _dq_params(qt: Quantized):
        """(DequantizeLinear attributes, scale, zero point) of a weight stored transposed (K, N)."""
        spec = qt.spec
        scale = qt.scale.T.contiguous().numpy()  # (k_blocks, N) or (1, N) or (1, 1)
        zero = None if qt.zero is None else qt.zero.T.contiguous().numpy().astype(np.int64)
        if spec.granularity == "group":
            attrs = {"axis": 0, "block_size": spec.group_size}
        elif spec.granularity == "channel":
            attrs = {"axis": 1}
            scale, zero = scale.reshape(-1), None if zero is None else zero.reshape(-1)
        else:
            attrs = {}
            scale, zero = scale.reshape(()), None if zero is None else zero.reshape(())
        return attrs, scale, zero

    # -- the model -----------------------------------------------------------------------------------
    def write(self, extra_outputs=()) -> Path:
        """Write model.onnx (and its .data) into the folder; returns the model path."""
        source = self.decoder
        nodes = []
        for node in source.graph.node:
            if self._key(node) in self._remove:
                continue
            nodes.extend(self._replace.get(self._key(node), [node]))
        used = {i for n in nodes for i in n.input} | {o.name for o in source.graph.output}
        initializers = []
        for name in sorted(used):
            if name in self.initializers:
                initializers.append(self.initializers[name])
            elif name in source.initializers:
                initializers.append(self._copy(source.initializers[name]))
        self.data.close()
        graph = helper.make_graph(nodes, source.graph.name, list(source.graph.input), list(source.graph.output),
                                  initializers, value_info=[v for v in source.graph.value_info])
        opsets = {o.domain: o.version for o in source.model.opset_import}
        for domain, version in self.opsets.items():
            opsets[domain] = max(opsets.get(domain, 0), version)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                                  ir_version=max(10, source.model.ir_version),
                                  producer_name="lowbit")
        for entry in source.model.metadata_props:
            model.metadata_props.add(key=entry.key, value=entry.value)
        path = self.folder / self.filename
        onnx.save_model(model, str(path))
        return path

    def _copy(self, proto: TensorProto) -> TensorProto:
        """An unchanged source initializer, into the output's data file (or inline when small)."""
        if proto.data_location != TensorProto.EXTERNAL:
            return proto
        array = self.decoder.array(proto.name)
        out = self.data.tensor(proto.name, array)
        out.data_type = proto.data_type
        return out

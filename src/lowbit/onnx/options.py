"""The command-line options of the ONNX front end, with NVIDIA ModelOpt's ONNX spellings accepted as aliases
(--onnx_path, --output_path, --calib_size, --algo awq_lite|awq_clip|rtn|rtn_dq, --block-size,
--use_zero_point, --layers_8bit, --enable_mixed_quant, --gather_quantize_axis, --gather_block_size,
--calibration_eps, --add_position_ids), translated here into lowbit's recipe and OnnxOptions."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..argtypes import count
from ..errors import LowbitError


@dataclass
class OnnxOptions:
    """How the quantized ONNX model is written and calibrated."""

    onnx_format: str = "matmulnbits"  # or "dq" (DequantizeLinear + MatMul), "qdq" (Q -> DQ -> MatMul)
    accuracy_level: int = 0  # MatMulNBits accuracy_level
    embedding_bits: int | None = None  # GatherBlockQuantized embedding (4 or 8), None = float
    embedding_block: int = 32
    embedding_axis: int = 1  # 1: blocks along the hidden size, 0: along the vocabulary
    execution_provider: str = "cpu"  # calibration sessions (comma-separated names, tried in order)
    layers_8bit: tuple[str, ...] = ()  # layer patterns kept at 8 bits (mixed INT4/INT8)
    mixed: bool = False  # mixed INT4/INT8 with the default choice of 8-bit layers when layers_8bit is empty
    memory_budget: int = 4 << 30  # bytes of calibration statistics held at once
    # static INT8 (w_int8_a_int8_per_{tensor|channel}_sym): activation range calibration, layers kept on float
    # inputs (int8 weights only)
    calibrate_method: str = "minmax"  # or "percentile", "entropy"
    percentile: float = 99.999
    float_inputs: tuple[str, ...] = ()
    int16_inputs: tuple[str, ...] = ()  # layers whose input activations are int16 (A16W8) instead of int8
    reduce_range: bool = False  # 7-bit weights: no int16 saturation in x86 kernels without VNNI


# ModelOpt's algorithm names -> (lowbit chain, algorithm options, ModelOpt's own output form)
MODELOPT_ALGOS = {
    "awq_lite": ("awq", {"awq": {"clip": False}}, "dq"),
    "awq_clip": ("awq", {"awq": {"scale": False}}, "dq"),
    "rtn_dq": ("rtn", {}, "dq"),
}
MODELOPT_RTN_FORM = "qdq"  # ModelOpt's rtn keeps float weights behind QuantizeLinear -> DequantizeLinear
# (flag, argparse dest) of the options that only mean something for an ONNX model
ONNX_ONLY = (("--onnx-format", "onnx_format"), ("--layers-8bit", "layers_8bit"),
             ("--enable-mixed-quant", "enable_mixed_quant"), ("--gather-quantize-axis", "gather_quantize_axis"),
             ("--gather-block-size", "gather_block_size"), ("--calibration-eps", "calibration_eps"),
             ("--calibrate-method", "calibrate_method"), ("--int16-inputs", "int16_inputs"),
             ("--float-inputs", "float_inputs"), ("--reduce-range", "reduce_range"))


def add_onnx_args(p) -> None:
    """Options that apply when MODEL is an ONNX decoder."""
    g = p.add_argument_group("ONNX models (MODEL is an .onnx file or a folder with genai_config.json / model.onnx)")
    g.add_argument("--onnx_path", "--onnx-path", default=None, help="the ONNX model (ModelOpt's spelling of MODEL)")
    g.add_argument("--output_path", "--output-path", default=None,
                   help="output folder (ModelOpt's spelling of -o); a path ending in .onnx writes its folder")
    g.add_argument("--onnx-format", "--onnx_format", default=None, choices=["matmulnbits", "dq", "qdq"],
                   help="form of each quantized MatMul: matmulnbits (com.microsoft MatMulNBits), dq (int weights -> "
                        "DequantizeLinear -> MatMul) or qdq (float weights -> QuantizeLinear -> DequantizeLinear) "
                        "[default: matmulnbits; ModelOpt's form for its --algo names when --onnx_path is used]")
    g.add_argument("--calib_size", "--calib-size", type=count(1), default=None, dest="calib_size",
                   help="calibration windows (ModelOpt's spelling of --num-calib-data)")
    g.add_argument("--block-size", "--block_size", type=count(1), default=None, dest="block_size",
                   help="quantization block along K (ModelOpt's spelling of --group-size)")
    g.add_argument("--use_zero_point", "--use-zero-point", default=None, type=_bool, metavar="BOOL",
                   help="asymmetric uint4 with zero points (True) or symmetric int4 (False), when no --scheme is "
                        "given [ModelOpt's default: False]")
    g.add_argument("--layers-8bit", "--layers_8bit", default=None, metavar="NAMES",
                   help="comma-separated layers kept at 8 bits: a layer index path (layers.0), a node path "
                        "(/model/layers.0/attn/qkv_proj/MatMul) or a partial name (qkv_proj,down_proj)")
    g.add_argument("--enable_mixed_quant", "--enable-mixed-quant", action="store_true",
                   help="mixed INT4/INT8: --layers-8bit, or lowbit's measured default choice without it")
    g.add_argument("--gather_quantize_axis", "--gather-quantize-axis", type=int, default=None, choices=[0, 1],
                   help="quantize the embedding Gather (GatherBlockQuantized) in blocks along this axis of the "
                        "(vocab, hidden) table: 1 along hidden, 0 along vocab [default: not quantized]")
    g.add_argument("--gather_block_size", "--gather-block-size", type=count(1), default=None,
                   help="block size of the quantized embedding [default: 32]")
    g.add_argument("--calibration_eps", "--calibration-eps", default="cpu",
                   help="onnxruntime execution providers for calibration, comma-separated (cpu, cuda, dml) "
                        "[default: cpu]")
    g.add_argument("--calibrate-method", "--calibrate_method", default="minmax",
                   choices=["minmax", "percentile", "entropy"],
                   help="static INT8 (w_int8_a_int8_*): how activation ranges are calibrated [default: minmax]")
    g.add_argument("--int16-inputs", default=None, metavar="NAMES",
                   help="static INT8: layers whose input activations are int16 instead of int8 (A16W8), e.g. "
                        "down_proj, whose input carries token outliers no int8 scale covers")
    g.add_argument("--float-inputs", default=None, metavar="NAMES",
                   help="static INT8: layers whose input activations stay float (int8 weights only)")
    g.add_argument("--reduce-range", action="store_true",
                   help="static INT8: 7-bit weights (onnxruntime's advice for x86 CPUs without VNNI)")
    g.add_argument("--add_position_ids", "--add-position-ids", action="store_true",
                   help="accepted for ModelOpt compatibility: position_ids are always fed when the model takes them")


def _bool(text: str) -> bool:
    low = text.lower()
    if low not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return low in ("true", "1", "yes")


def normalize_modelopt_args(args) -> str | None:
    """Fill lowbit's arguments from ModelOpt's spellings in place; returns ModelOpt's output form for its algo
    name when the ModelOpt spelling --onnx_path was used, else None."""
    modelopt = args.onnx_path is not None
    if modelopt:
        if args.model not in (None, args.onnx_path):
            raise LowbitError("give the model once: as MODEL or as --onnx_path, not both")
        args.model = args.onnx_path
    if args.output_path is not None:
        if args.output not in (None, args.output_path):
            raise LowbitError("give the output once: as -o or as --output_path, not both")
        args.output = args.output_path[:-5] if args.output_path.endswith(".onnx") else args.output_path
    if args.calib_size is not None:
        args.num_calib_data = args.calib_size
    if args.block_size is not None:
        if args.group_size not in (None, args.block_size):
            raise LowbitError("give the group size once: --group-size or --block-size")
        args.group_size = args.block_size
    form = None
    name = args.algo.strip().lower()
    if name in MODELOPT_ALGOS:
        chain, options, form = MODELOPT_ALGOS[name]
        args.algo = chain
        args.algo_arg = [f"{a}:" + ",".join(f"{k}={v}" for k, v in kv.items()) for a, kv in options.items()] \
            + list(args.algo_arg)
    elif name == "rtn" and modelopt:
        form = MODELOPT_RTN_FORM
    if args.scheme is None and (modelopt or args.use_zero_point is not None):
        args.scheme = "w_uint4_per_group_asym" if args.use_zero_point else "w_int4_per_group_sym"
        if args.group_size is None:
            args.group_size = 128
    return form if modelopt else None


def onnx_options(args, modelopt_form: str | None) -> OnnxOptions:
    axis, block = args.gather_quantize_axis, args.gather_block_size
    bits = args.quantize_embedding if args.quantize_embedding is not None else (
        4 if axis is not None or block is not None else None)
    return OnnxOptions(onnx_format=args.onnx_format or modelopt_form or "matmulnbits",
                       accuracy_level=args.accuracy_level or 0, embedding_bits=bits,
                       embedding_block=block or 32, embedding_axis=1 if axis is None else axis,
                       execution_provider=args.calibration_eps,
                       layers_8bit=tuple(layer_patterns(args.layers_8bit)) if args.layers_8bit else (),
                       mixed=args.enable_mixed_quant, calibrate_method=args.calibrate_method,
                       int16_inputs=tuple(layer_patterns(args.int16_inputs)) if args.int16_inputs else (),
                       float_inputs=tuple(layer_patterns(args.float_inputs)) if args.float_inputs else (),
                       reduce_range=args.reduce_range)


def layer_patterns(text: str) -> list[str]:
    """--layers-8bit items as recipe layer patterns: node paths become module names
    (/model/layers.0/attn/qkv_proj/MatMul -> model.layers.0.attn.qkv_proj)."""
    from .graph import module_name

    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        out.append(module_name(item, item) if "/" in item else item)
    if not out:
        raise LowbitError("--layers-8bit is empty; give layer names such as layers.0,down_proj")
    return out


def eight_bit_overrides(patterns: list[str], names: list[str]) -> list[str]:
    """Overrides keeping the matched layers at 8 bits: a pattern matches whole dotted parts of a name
    (layers.1 is layer 1, not 10-19) and, failing that, any part of it (qkv -> qkv_proj)."""
    from ..recipe import matches

    overrides = []
    for p in patterns:
        if any(matches(p, n) for n in names):
            overrides.append(f"{p}:bits=8")
        elif any(p in n for n in names):
            overrides.append(f"re:.*{re.escape(p)}:bits=8")
        else:
            raise LowbitError(f"--layers-8bit {p!r} matches no weight MatMul of this model; run `lowbit inspect "
                              f"MODEL` to see the layer names")
    return overrides

"""What each export writer holds (CAPABILITIES, one Capabilities per format, FORMATS.md) and check_layers: the
one check that refuses, before any work, the first layer a format cannot hold, naming the layer, what the
format cannot hold and the nearest format or option that can (found from the other formats' declarations).

Each writer's check calls check_layers and keeps only its model-level checks (ONNX's model_type / hidden_act /
RoPE / head_dim, GGUF's architecture, tensor names, RoPE scaling and vocabulary); tests/test_export_capabilities.py
holds each declaration against what its writer really writes. No writer is imported here, so the nearest
format is named without importing onnx or gguf.
"""

from __future__ import annotations

from ..errors import LowbitError
from ..spec import SCALE_DTYPES, QuantSpec
from .capabilities import INT_BITS, Capabilities, Element, InputRule

MATMUL_BITS = (2, 4, 8)  # MatMulNBits' CPU kernel and the GPTQ layout (onnx_tensors.MATMUL_BITS, hf_int.GPTQ_BITS)
_FP8 = Element("fp", layouts=((4, 3),))
_PER_TENSOR_FP8 = Element("fp", layouts=((4, 3),), granularities=("tensor",))

CAPABILITIES = {
    "compressed-tensors": Capabilities(
        "compressed-tensors", "compressed-tensors", "compressed-tensors",
        elements=(Element("int", INT_BITS, asymmetric_bits=INT_BITS), _FP8,
                  Element("fp", layouts=((2, 1),), scales=("fp8_e4m3",), tensor_scale=True, granularities=("group",),
                          group_sizes=(16,)),
                  Element("fp", layouts=((2, 1), (2, 3), (4, 3)), scales=("e8m0",), granularities=("group",),
                          group_sizes=(32,))),
        groups_divide_width=True,
        inputs=(InputRule(_PER_TENSOR_FP8, _FP8, "static per-tensor FP8 inputs with FP8 weights (w_fp8_a_fp8)"),),
        kv_cache=(Element("fp", layouts=((4, 3),), scales=SCALE_DTYPES, granularities=("tensor",)),)),
    "awq": Capabilities(
        "awq", "AutoAWQ", "the AutoAWQ GEMM layout",
        elements=(Element("int", (4,), asymmetric_bits=(4,), granularities=("group",)),),
        groups_divide_width=True, packed_axes="N", one_group_size=True, needs_quantized_linear=True),
    "gptq": Capabilities(
        "gptq", "GPTQ", "the GPTQ layout", elements=(Element("int", MATMUL_BITS, asymmetric_bits=MATMUL_BITS),),
        groups_divide_width=True, packed_axes="NK", needs_quantized_linear=True),
    "gguf": Capabilities(  # elements: what maps exactly (gguf_blocks.exact_type); anything else is re-quantized
        "gguf", "GGUF", "llama.cpp",
        elements=(Element("int", INT_BITS, asymmetric_bits=INT_BITS[:-1]), Element("int", INT_BITS, scales=("e8m0",)),
                  Element("fp", layouts=((2, 1),), scales=("e8m0",), granularities=("group",), group_sizes=(32,))),
        requantizes=True, group_multiple=32, group_note="GGUF blocks are 32 columns, each inside one group",
        width_multiple=32, width_note=", and every quantized GGUF type works in blocks of 32", gguf_grid=True),
    "onnx": Capabilities(
        "onnx", "ONNX", "MatMulNBits", elements=(Element("int", MATMUL_BITS, asymmetric_bits=MATMUL_BITS),),
        group_multiple=16, group_note="MatMulNBits blocks are powers of two >= 16", online_rotations=True),
}
NEAREST_GROUP_SIZES = (128, 64, 32, 16)


def check_layers(name: str, model) -> None:
    """Refuse (LowbitError) the first thing in `model` (a LowbitFolder or PlannedModel) about its layers'
    quantization that the format `name` cannot hold."""
    caps = CAPABILITIES[name]
    _check_rotations(caps, model)
    _check_inputs(caps, model)
    _check_kv_cache(caps, model)
    if caps.needs_quantized_linear and not model.modules:
        raise LowbitError(f"the model has no quantized linear; {caps.holder} needs some")
    for layer, (spec, shape) in model.modules.items():
        problem = caps.layer_problem(spec, tuple(shape))
        if problem is not None:
            raise LowbitError(refusal(caps, layer, spec, tuple(shape), *problem))
    _check_one_group_size(caps, model)


def refusal(caps: Capabilities, layer: str, spec: QuantSpec, shape: tuple[int, int], aspect: str, why: str) -> str:
    """The one-line refusal of a layer: what the format cannot hold and the nearest format or option that can."""
    return f"cannot export {layer} ({spec.short_name}) to {caps.title}: {why}; {nearest(caps, spec, shape, aspect)}"


def nearest(caps: Capabilities, spec: QuantSpec, shape: tuple[int, int], aspect: str) -> str:
    """The closest ways out: the option of this format that holds the layer, then the formats that hold it as
    it is; else a scheme this format holds (or a format that re-quantizes it)."""
    options = [fix for fix in (_group_fix(caps, spec, shape, aspect), _bits_fix(caps, spec, shape, aspect)) if fix]
    others = [c.name for c in CAPABILITIES.values() if c is not caps and c.holds(spec, shape)]
    if others:
        options.append(f"export to {_or(others)}")
    if not options:
        requant = [c.name for c in CAPABILITIES.values()
                   if c is not caps and c.requantizes and c.layer_problem(spec, shape) is None]
        options.append(f"requantize with a scheme {caps.title} holds"
                       + (f", or export to {_or(requant)}, which re-quantizes it" if requant else ""))
    return ", or ".join(options)


def _variant(spec: QuantSpec, **changes) -> QuantSpec | None:
    try:
        return spec.with_changes(**changes)
    except LowbitError:
        return None


def _group_fix(caps: Capabilities, spec: QuantSpec, shape: tuple[int, int], aspect: str) -> str | None:
    if spec.granularity != "group" or aspect not in ("group divides", "group multiple", "group size"):
        return None
    for size in sorted(NEAREST_GROUP_SIZES, key=lambda g: (abs(g - spec.group_size), -g)):  # closest first
        candidate = _variant(spec, group_size=size)
        if candidate is not None and caps.holds(candidate, shape):
            if aspect == "group divides":
                return f"use a group size that divides {shape[1]} (e.g. --group-size {size})"
            return f"use --group-size {size}"
    return None


def _bits_fix(caps: Capabilities, spec: QuantSpec, shape: tuple[int, int], aspect: str) -> str | None:
    if aspect != "bits" or spec.kind != "int":
        return None
    widths = [b for b in INT_BITS if (c := _variant(spec, bits=b)) is not None and caps.holds(c, shape)]
    return f"requantize with {_or(widths)} bits" if widths else None


def _or(items) -> str:
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _check_rotations(caps: Capabilities, model) -> None:
    if model.online_rotations and not caps.online_rotations:
        layer = next(iter(model.online_rotations))
        able = [c.name for c in CAPABILITIES.values() if c.online_rotations]
        raise LowbitError(f"cannot export {layer} to {caps.title}: it multiplies its input by a Hadamard matrix at "
                          f"run time (rotation r4), which {caps.holder} cannot express; quantize with --algo-arg "
                          f"rotation:r4=false (R1 and R2 export fine), or export to {_or(able)}")


def _check_inputs(caps: Capabilities, model) -> None:
    for layer, spec in model.inputs.items():
        weight, shape = model.modules[layer]
        if any(rule.holds(spec, weight) for rule in caps.inputs):
            continue
        held = f"only {' or '.join(r.label for r in caps.inputs)}" if caps.inputs else \
            "weights only (no quantized input activations)"
        able = [c.name for c in CAPABILITIES.values() if c is not caps and c.holds(weight, tuple(shape))
                and any(rule.holds(spec, weight) for rule in c.inputs)]
        raise LowbitError(f"cannot export {layer} ({weight.short_name}) to {caps.title}: it has quantized input "
                          f"activations ({spec.short_name}), and {caps.holder} holds {held}; "
                          + (f"export to {_or(able)}" if able else "requantize with a weight-only scheme"))


def _check_kv_cache(caps: Capabilities, model) -> None:
    attention: dict[str, set[str]] = {}
    for layer, spec in model.outputs.items():
        parent, _, leaf = layer.rpartition(".")
        if leaf in caps.kv_projections and caps.holds_kv(spec):
            attention.setdefault(parent, set()).add(leaf)
            continue
        held = (f"only a static {' or '.join(e.describe() for e in caps.kv_cache)} KV cache on "
                f"{' and '.join(caps.kv_projections)}") if caps.kv_cache else "no quantized KV cache"
        able = [c.name for c in CAPABILITIES.values()
                if c is not caps and leaf in c.kv_projections and c.holds_kv(spec)]
        raise LowbitError(f"cannot export {layer} to {caps.title}: it has a quantized KV cache ({spec.short_name} "
                          f"outputs), and {caps.holder} holds {held}; "
                          + (f"export to {_or(able)}" if able else "requantize without --kv-cache-dtype"))
    for parent, leaves in attention.items():
        if leaves != set(caps.kv_projections):
            raise LowbitError(f"{parent} has a quantized KV cache on only one of {' / '.join(caps.kv_projections)}; "
                              f"{caps.title} needs both, so requantize with --kv-cache-dtype on both")


def _check_one_group_size(caps: Capabilities, model) -> None:
    groups = sorted({spec.group_size for spec, _ in model.modules.values()})
    if caps.one_group_size and len(groups) > 1:
        able = [c.name for c in CAPABILITIES.values() if c is not caps and not c.one_group_size
                and all(c.holds(spec, tuple(shape)) for spec, shape in model.modules.values())]
        raise LowbitError(f"{caps.title} stores one group size for the whole model, this one has {groups}; "
                          f"requantize with one group size" + (f", or export to {_or(able)}" if able else ""))

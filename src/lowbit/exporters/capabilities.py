"""What an export format holds, as data: `Capabilities` (one per writer, declared in exporters/declared.py)
made of `Element`s (the element types it stores, with their scales and blocking), and the matching of one
layer's QuantSpec against them, which says which part of a spec a format cannot hold and why.

Only a layer's quantization is declared here: element kind (int / fp / bfp), bits or (exponent, mantissa)
layouts, zero points, scale dtype, two-level (tensor) scales, granularity, group sizes and how groups meet the
width, word packing, input activations, the KV cache, online rotations (r4), FNUZ and sub-blocks. Checks that
are not about a layer's quantization stay in the writers: ONNX's model_type / hidden_act / RoPE / head_dim,
GGUF's architecture, tensor names, RoPE scaling and vocabulary, each writer's output path and options.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..spec import QuantSpec

INT_BITS = (2, 3, 4, 5, 6, 7, 8)
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")


def element_kind(spec: QuantSpec) -> str:
    """"int", "fp" (minifloat) or "bfp" (block floating point)."""
    return {"float": "fp"}.get(spec.kind, spec.kind)


def element_name(spec: QuantSpec) -> str:
    """How a refusal names a spec's element, e.g. MXINT8 (integers with E8M0 scales), FP8 E4M3."""
    if spec.kind == "bfp":
        return f"block-floating-point elements ({spec.short_name})"
    if spec.kind == "int":
        if spec.scale_dtype == "e8m0":
            return f"MXINT{spec.bits} (integers with E8M0 scales)"
        return f"{spec.bits}-bit integers" + ("" if spec.plain_int else f" with {spec.scale_dtype} scales")
    name = fp_name(spec.exponent_bits, spec.mantissa_bits, spec.scale_dtype, spec.tensor_scale)
    return name + (" FNUZ" if spec.fnuz else "")


def fp_name(exponent: int, mantissa: int, scale_dtype: str, tensor_scale: bool = False) -> str:
    bits = 1 + exponent + mantissa
    if scale_dtype == "e8m0":
        return f"MXFP{bits} (E{exponent}M{mantissa})"
    if scale_dtype == "fp8_e4m3":
        nv = (exponent, mantissa, tensor_scale) == (2, 1, True)
        return f"{'NV' if nv else ''}FP{bits} (E{exponent}M{mantissa} with FP8 block scales" + \
            (" and a tensor scale)" if tensor_scale else ")")
    return f"FP{bits} E{exponent}M{mantissa}"


def _words(values) -> str:
    """2, 4 and 8; a run of three or more whole numbers as 2 to 8."""
    values = list(values)
    run = all(isinstance(v, int) for v in values) and values == list(range(values[0], values[-1] + 1))
    if len(values) >= 3 and run:
        return f"{values[0]} to {values[-1]}"
    items = [str(v) for v in values]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _possessive(name: str) -> str:
    return name + ("'" if name.endswith("s") else "'s")


@dataclass(frozen=True)
class Element:
    """One element type a format holds and how: widths, zero points, scales, granularities, group sizes."""

    kind: str  # "int" | "fp" | "bfp" (element_kind)
    bits: tuple[int, ...] = ()  # int: the widths held
    layouts: tuple[tuple[int, int], ...] = ()  # fp: the (exponent, mantissa) bits held
    asymmetric_bits: tuple[int, ...] = ()  # int: the widths that may carry a zero point
    scales: tuple[str, ...] = ("float32",)  # scale dtypes held
    tensor_scale: bool = False  # a second, per-tensor scale above the block scales (NVFP4)
    granularities: tuple[str, ...] = WEIGHT_GRANULARITIES
    group_sizes: tuple[int, ...] = ()  # () any (within Capabilities' group rules)
    dynamic: bool = False  # activations: scales computed at run time

    def mismatch(self, spec: QuantSpec) -> str | None:
        """The first aspect of `spec` this element does not hold ("kind", "bits", "zero point", "tensor
        scale", "granularity", "group size", "dynamic"), or None when it holds it."""
        if element_kind(spec) != self.kind or spec.scale_dtype not in self.scales:
            return "kind"
        if self.kind == "fp" and (spec.exponent_bits, spec.mantissa_bits) not in self.layouts:
            return "bits"
        if self.kind != "fp" and spec.bits not in self.bits:
            return "bits"
        checks = (("zero point", not spec.symmetric and spec.bits not in self.asymmetric_bits),
                  ("tensor scale", spec.tensor_scale != self.tensor_scale),
                  ("granularity", spec.granularity not in self.granularities),
                  ("group size", spec.granularity == "group" and bool(self.group_sizes)
                   and spec.group_size not in self.group_sizes),
                  ("dynamic", spec.dynamic != self.dynamic))
        return next((aspect for aspect, failed in checks if failed), None)

    def describe(self) -> str:
        """e.g. integers with float scales (2, 4 and 8 bits); MXFP4 (E2M1) and MXFP8 (E4M3) in groups of 32."""
        if self.kind == "int":
            text = f"integers with {'float' if self.scales == ('float32',) else '/'.join(self.scales)} scales " \
                   f"({_words(self.bits)} bits" + ("" if self.asymmetric_bits else ", symmetric") + ")"
        elif self.kind == "fp":
            text = _words([fp_name(e, m, self.scales[0], self.tensor_scale) for e, m in self.layouts])
        else:
            text = f"block-floating-point elements of {_words(self.bits)} bits"
        if self.group_sizes:
            text += f" in groups of {_words(self.group_sizes)}"
        elif self.granularities != WEIGHT_GRANULARITIES:
            text += " " + " or ".join(f"per {g}" for g in self.granularities)
        return text + (" (dynamic)" if self.dynamic else "")


def family(kind: str, scale_dtype: str) -> str:
    """How a refusal names the elements of one kind and scale dtype, e.g. MX formats."""
    if kind == "int":
        return "integer formats"
    if scale_dtype == "e8m0":
        return "MX formats"
    return "formats with FP8 block scales" if scale_dtype == "fp8_e4m3" else "float formats with float scales"


@dataclass(frozen=True)
class InputRule:
    """Quantized input activations a format holds, on linears whose weights are `weight`."""

    input: Element
    weight: Element
    label: str  # e.g. static per-tensor FP8 inputs with FP8 weights (w_fp8_a_fp8)

    def holds(self, input_spec: QuantSpec, weight_spec: QuantSpec) -> bool:
        return not input_spec.fnuz and not weight_spec.fnuz and self.input.mismatch(input_spec) is None \
            and self.weight.mismatch(weight_spec) is None


@dataclass(frozen=True)
class Capabilities:
    """Everything about a layer's quantization that one export format holds (see the module docstring)."""

    name: str  # the format's --export name
    title: str  # how refusals name it: "cannot export X to {title}"
    holder: str  # what stores the weights, as a sentence's subject: "MatMulNBits", "the GPTQ layout"
    elements: tuple[Element, ...]
    requantizes: bool = False  # a weight no element holds is re-quantized with a warning (GGUF), not refused
    fnuz: bool = False  # FP8 elements in the FNUZ variant
    subblocks: bool = False  # shared microexponents (MX6 / MX9 sub-blocks)
    group_multiple: int = 1  # every group size a multiple of this
    group_note: str = ""  # why, for the refusal
    groups_divide_width: bool = False  # False: a partial last group is held
    width_multiple: int = 1  # in_features a multiple of this, whatever the element (even when re-quantizing)
    width_note: str = ""
    packed_axes: str = ""  # axes of (N, K) packed into int32 words of 32 / bits codes: "N" or "NK"
    one_group_size: bool = False  # one group size for the whole model
    needs_quantized_linear: bool = False  # refuses a model with none
    inputs: tuple[InputRule, ...] = ()  # () weight-only
    kv_cache: tuple[Element, ...] = ()  # output specs held on kv_projections; () none
    kv_projections: tuple[str, ...] = ("k_proj", "v_proj")  # all of them, under each attention module
    online_rotations: bool = False  # rotation r4's run-time Hadamard before a linear
    gguf_grid: bool = False  # llama.cpp's block grids (spec.gguf_grid), exactly

    def weight_problem(self, spec: QuantSpec) -> tuple[str, str] | None:
        """(aspect, why) for the first part of a weight spec no element holds, or None."""
        if spec.gguf_grid:
            return None if self.gguf_grid else ("kind", f"{self.holder} holds no llama.cpp block grids ({spec.gguf_grid}: "
                                                     f"llama.cpp's two-level scales)")
        same_kind = [e for e in self.elements if e.kind == element_kind(spec) and spec.scale_dtype in e.scales]
        if not same_kind:
            return "kind", f"{self.holder} has no {element_name(spec)}; it holds " + \
                "; ".join(e.describe() for e in self.elements)
        if spec.fnuz and not self.fnuz:
            return "fnuz", f"{self.holder} stores FP8 as E4M3FN / E5M2 only (no FNUZ variant)"
        if spec.subblock_size and not self.subblocks:
            return "subblocks", f"{self.holder} holds no shared microexponents (sub-blocks)"
        aspects = [e.mismatch(spec) for e in same_kind]
        if None in aspects:
            return self.group_problem(spec)
        return aspects[0], self._why(aspects[0], spec, same_kind)

    def _why(self, aspect: str, spec: QuantSpec, same_kind: list[Element]) -> str:
        """Why no element of the spec's kind holds it, naming the aspect that differs."""
        if spec.kind != "int" or aspect not in ("bits", "zero point", "granularity"):
            return f"{_possessive(self.holder)} {family(same_kind[0].kind, spec.scale_dtype)} are " + \
                "; ".join(e.describe() for e in same_kind)
        if aspect == "bits":
            return f"{self.holder} holds integers of {_words(sorted({b for e in same_kind for b in e.bits}))} bits only"
        if aspect == "zero point":
            asym = sorted({b for e in same_kind for b in e.asymmetric_bits})
            widths = f"{_words(asym)} bits" if asym else "no width"
            return f"{self.holder} holds a zero point (asymmetric) at {widths} only"
        grans = sorted({g for e in same_kind for g in e.granularities}, key=WEIGHT_GRANULARITIES.index)
        return f"{self.holder} stores {' or '.join('per-' + g for g in grans)} scales only"

    def group_problem(self, spec: QuantSpec) -> tuple[str, str] | None:
        if spec.granularity == "group" and spec.group_size % self.group_multiple:
            return "group multiple", f"group size {spec.group_size} is not a multiple of {self.group_multiple} " \
                                     f"({self.group_note})"
        return None

    def shape_problem(self, spec: QuantSpec, shape: tuple[int, int]) -> tuple[str, str] | None:
        """(aspect, why) when a weight of this shape cannot be laid out, whatever its element, or None."""
        n, k = shape
        if spec.granularity == "group" and self.groups_divide_width and k % spec.group_size:
            return "group divides", f"{k} input features are not whole groups of {spec.group_size}, and " \
                                    f"{self.title} has no partial last group"
        if k % self.width_multiple:
            return "width", f"it has {k} input features, not a multiple of {self.width_multiple}{self.width_note}"
        per = 32 // spec.bits if self.packed_axes else 0
        if per and any(size % per for axis, size in (("N", n), ("K", k)) if axis in self.packed_axes):
            return "packing", f"its weight ({n} x {k}) does not fill whole {per}-value int32 words " \
                              f"along {' and '.join(self.packed_axes)}"
        return None

    def layer_problem(self, spec: QuantSpec, shape: tuple[int, int]) -> tuple[str, str] | None:
        """What this format refuses in a weight of `shape` quantized by `spec` (a spec it would re-quantize is
        not refused), or None."""
        problem = None if self.requantizes else self.weight_problem(spec)
        return problem or self.shape_problem(spec, shape)

    def holds(self, spec: QuantSpec, shape: tuple[int, int]) -> bool:
        """The format stores this weight's codes and scales as they are (no refusal, no re-quantization)."""
        return self.weight_problem(spec) is None and self.shape_problem(spec, shape) is None

    def holds_kv(self, spec: QuantSpec) -> bool:
        return (self.fnuz or not spec.fnuz) and any(e.mismatch(spec) is None for e in self.kv_cache)


"""QuantSpec: the one description of how a tensor is quantized, and the parser for scheme names.

Scheme names follow AMD Quark's spelling (w_uint4_per_group_asym, w_int8_a_int8_per_tensor_sym,
w_mxfp4, ...). Strings become QuantSpec here and nowhere else.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, fields, replace

from .errors import LowbitError

GRANULARITIES = ("tensor", "channel", "group", "token")  # token: activations only, one scale per row
SCALE_DTYPES = ("float32", "e8m0", "fp8_e4m3")
SCALE_RULES = ("floor", "even", "ceil", "mse")  # how an E8M0 shared exponent is chosen (formats.scaled)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    kind "int": integer codes of `bits` bits, signed ([-2^(b-1), 2^(b-1)-1]) or unsigned ([0, 2^b-1]).
    kind "float": a minifloat element (exponent_bits + mantissa_bits + sign), as in FP8, FP6, FP4.
    kind "bfp": block floating point (sign-magnitude mantissas sharing one exponent per block).
    Granularity "tensor" shares one scale, "channel" one per output row, "group" one per
    `group_size` consecutive input columns of a row, "token" (activations) one per token. scale_dtype "e8m0" gives OCP MX formats,
    "fp8_e4m3" with tensor_scale gives NVFP4-style two-level scales.
    """

    kind: str = "int"
    bits: int = 4
    signed: bool = False
    symmetric: bool = False
    granularity: str = "group"
    group_size: int | None = 128
    exponent_bits: int | None = None
    mantissa_bits: int | None = None
    scale_dtype: str = "float32"
    tensor_scale: bool = False
    dynamic: bool = False
    fnuz: bool = False  # FP8 elements in the FNUZ variant (E4M3FNUZ / E5M2FNUZ, as MI300 computes)
    # E8M0 scales: even (Quark's default; the best of the four on the demo's MXFP4, docs/BENCHMARKS.md),
    # floor (OCP MX v1.0's example rule), ceil (never saturates) or mse (per block, the lower-error of floor
    # and floor + 1); every rule gives valid MX data, decoders do not care
    scale_rule: str = "even"
    subblock_size: int = 0  # block floating point with shared microexponents (MX6/MX9): 1-bit shift per sub-block
    # one of llama.cpp's block grids (GGUF_GRID_SPECS): K-quants q2_k .. q6_k (group scales and mins are themselves
    # integers under float16 scales per 256 columns) or legacy q4_0 .. q8_0 (float16 scale and min per 32), so
    # the GGUF export holds the codes exactly
    gguf_grid: str = ""

    def __post_init__(self):
        for f in fields(self):
            _check_type(f.name, f.type, getattr(self, f.name))
        if self.bits < 1 or self.subblock_size < 0 or any(
                v is not None and v < 0 for v in (self.exponent_bits, self.mantissa_bits)):
            raise LowbitError(f"bits must be positive and exponent_bits, mantissa_bits and subblock_size not "
                              f"negative, got {self.bits}, {self.exponent_bits}, {self.mantissa_bits}, "
                              f"{self.subblock_size}")
        if self.kind not in ("int", "float", "bfp"):
            raise LowbitError(f"unknown quantization kind {self.kind!r}; use int, float or bfp")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise LowbitError(f"integer quantization needs 2 to 8 bits, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise LowbitError(f"unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise LowbitError(f"per-group quantization needs a positive group size, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LowbitError(f"unknown scale dtype {self.scale_dtype!r}; use one of {', '.join(SCALE_DTYPES)}")
        if self.scale_rule not in SCALE_RULES:
            raise LowbitError(f"unknown scale rule {self.scale_rule!r}; use one of {', '.join(SCALE_RULES)}")
        if self.kind == "float" and (self.exponent_bits is None or self.mantissa_bits is None
                                     or 1 + self.exponent_bits + self.mantissa_bits != self.bits):
            raise LowbitError(f"a float spec needs exponent_bits + mantissa_bits + 1 = bits, got "
                              f"{self.exponent_bits} + {self.mantissa_bits} + 1 vs {self.bits}")
        if self.kind != "int" and not self.symmetric:
            raise LowbitError(f"{self.kind} quantization is symmetric (no zero point); drop the asym setting")
        if self.subblock_size and (self.kind != "bfp" or self.granularity != "group"
                                   or self.group_size % self.subblock_size):
            raise LowbitError(f"sub-blocks (shared microexponents) need a bfp spec whose group size is a multiple "
                              f"of {self.subblock_size}")
        if self.tensor_scale and self.scale_dtype != "fp8_e4m3":
            raise LowbitError("a per-tensor second-level scale goes with fp8_e4m3 block scales (NVFP4-style)")
        if self.gguf_grid:
            self._check_gguf_grid()

    def _check_gguf_grid(self) -> None:
        layout = GGUF_GRID_LAYOUTS.get(self.gguf_grid)
        if layout is None:
            raise LowbitError(f"unknown GGUF grid {self.gguf_grid!r}; use one of {', '.join(GGUF_GRID_LAYOUTS)}")
        bits, group, symmetric = layout
        if (self.kind, self.bits, self.group_size, self.symmetric, self.signed, self.granularity, self.scale_dtype,
                self.dynamic) != ("int", bits, group, symmetric, symmetric, "group", "float32", False):
            codes = f"{'' if symmetric else 'u'}int{bits}"
            raise LowbitError(f"the {self.gguf_grid} grid has {codes} codes in sub-blocks of {group}; drop the changes "
                              f"to it (group size, bits, symmetry) or use an integer scheme")

    # -- integer ranges -------------------------------------------------------------------------
    @property
    def plain_int(self) -> bool:
        """Integer codes with float32 scales (and zero points): formats.integer's domain."""
        return self.kind == "int" and self.scale_dtype == "float32"

    @property
    def qmin(self) -> int:
        if self.kind == "bfp" or (self.kind == "int" and not self.plain_int):
            return -self.qmax  # sign-magnitude style: symmetric range (MXINT8, block floating point)
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def block_shape(self, rows: int, cols: int) -> tuple[int, int]:
        """The (rows, cols) block that shares one scale in a (rows, cols) weight; the last
        column block is partial when group_size does not divide cols."""
        if self.granularity == "tensor":
            return rows, cols
        if self.granularity in ("channel", "token"):
            return 1, cols
        return 1, self.subblock_size or self.group_size  # MX6/MX9: each sub-block has its own (shifted) step

    @property
    def short_name(self) -> str:
        """A compact human label, e.g. uint4 g128 asym."""
        if self.kind == "int":
            elem = f"{'int' if self.signed else 'uint'}{self.bits}"
        elif self.kind == "float":
            elem = f"fp{self.bits}_e{self.exponent_bits}m{self.mantissa_bits}"
        else:
            elem = f"bfp{self.bits}"
        gran = {"tensor": "per-tensor", "channel": "per-channel", "token": "per-token"}.get(
            self.granularity, f"g{self.group_size}")
        parts = [elem, gran]
        if self.plain_int:
            parts.append("sym" if self.symmetric else "asym")
        if self.fnuz:
            parts.append("fnuz")
        if self.scale_dtype != "float32":
            parts.append(f"scale {self.scale_dtype}" + (f" ({self.scale_rule})" if self.scale_dtype == "e8m0" else ""))
        if self.tensor_scale:
            parts.append("+ tensor scale")
        if self.gguf_grid:
            parts.append(f"({self.gguf_grid.upper()} grid)")
        if self.dynamic:
            parts.append("dynamic")
        return " ".join(parts)

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.gguf_grid:  # older folders and recipes (and their checksums) stay as they were
            del out["gguf_grid"]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "QuantSpec":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def with_changes(self, **changes) -> "QuantSpec":
        return replace(self, **changes)

    @classmethod
    def parse_field(cls, key: str, text: str):
        """A field's value from its text (an override such as bits=8, fnuz=true, group_size=none), typed by
        the field's annotation; anything that is not a value of that type is refused."""
        kind = cls.__dataclass_fields__[key].type
        word = text.strip().lower()
        if "None" in kind and word in ("none", "null", "-1"):
            return None
        if kind == "bool":
            if word not in _BOOLS:
                raise LowbitError(f"{key} must be true or false, got {text!r}")
            return _BOOLS[word]
        if kind.startswith("int"):
            if not re.fullmatch(r"[+-]?\d+", word):
                raise LowbitError(f"{key} must be a whole number, got {text!r}")
            return int(word)
        return text.strip()


_BOOLS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
_TYPES = {"bool": (bool,), "int": (int,), "str": (str,)}


def _check_type(name: str, annotation: str, value) -> None:
    """Refuse a field value of the wrong type (from a recipe file or code): annotations here are 'bool',
    'int', 'str' and 'int | None'."""
    base, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return
    ok = isinstance(value, _TYPES[base]) and not (base == "int" and isinstance(value, bool))
    if not ok:
        raise LowbitError(f"{name} must be {'true or false' if base == 'bool' else 'a whole number' if base == 'int' else 'text'}"
                          f"{' or none' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class Scheme:
    """What a layer gets: a weight spec and, for W+A schemes, an input-activation spec."""

    name: str
    weight: QuantSpec
    input: QuantSpec | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "weight": self.weight.to_dict(),
                "input": self.input.to_dict() if self.input else None}

    @classmethod
    def from_dict(cls, data: dict) -> "Scheme":
        inp = data.get("input")
        return cls(data["name"], QuantSpec.from_dict(data["weight"]), QuantSpec.from_dict(inp) if inp else None)


# -- scheme names -----------------------------------------------------------------------------------

def _fp(bits, e, m, **kw):
    return QuantSpec(kind="float", bits=bits, signed=True, symmetric=True, exponent_bits=e, mantissa_bits=m, **kw)


def _mx(bits, e, m):
    return _fp(bits, e, m, granularity="group", group_size=32, scale_dtype="e8m0")


_FP8 = dict(granularity="tensor", group_size=None)
# Non-integer weight formats by their Quark names (formats.minifloat and formats.scaled implement them).
_FLOAT_WEIGHTS = {
    "fp8": _fp(8, 4, 3, **_FP8),
    "mxfp8": _mx(8, 4, 3),
    "mxfp6_e3m2": _mx(6, 3, 2),
    "mxfp6_e2m3": _mx(6, 2, 3),
    "mxfp4": _mx(4, 2, 1),
    "mxint8": QuantSpec(kind="int", bits=8, signed=True, symmetric=True, granularity="group", group_size=32,
                        scale_dtype="e8m0"),
    # AMD's shared-microexponent formats as Quark 0.13 computes them: sign + 4 (MX6) or 7 (MX9) magnitude
    # bits, one 8-bit exponent per 16, a 1-bit shift per pair
    "mx6": QuantSpec(kind="bfp", bits=5, signed=True, symmetric=True, granularity="group", group_size=16,
                     scale_dtype="e8m0", subblock_size=2),
    "mx9": QuantSpec(kind="bfp", bits=8, signed=True, symmetric=True, granularity="group", group_size=16,
                     scale_dtype="e8m0", subblock_size=2),
    "bfp16": QuantSpec(kind="bfp", bits=8, signed=True, symmetric=True, granularity="group", group_size=8,
                       scale_dtype="e8m0"),
    "fp4_scale_fp8": _fp(4, 2, 1, granularity="group", group_size=16, scale_dtype="fp8_e4m3", tensor_scale=True),
}
_FLOAT_WEIGHTS["nvfp4"] = _FLOAT_WEIGHTS["fp4_scale_fp8"]
_FLOAT_NAMES = {
    "w_fp8_a_fp8": ("fp8", "fp8"), "w_mxfp8": ("mxfp8", None), "w_mxfp8_a_mxfp8": ("mxfp8", "mxfp8"),
    "w_mxfp4": ("mxfp4", None), "w_mxfp4_a_mxfp4": ("mxfp4", "mxfp4"), "w_mxfp6_e3m2": ("mxfp6_e3m2", None),
    "w_mxfp6_e2m3": ("mxfp6_e2m3", None), "w_mxint8": ("mxint8", None), "w_mx6": ("mx6", None),
    "w_mx6_a_mx6": ("mx6", "mx6"), "w_bfp16": ("bfp16", None), "w_bfp16_a_bfp16": ("bfp16", "bfp16"),
    "w_fp4_scale_fp8": ("fp4_scale_fp8", None), "w_fp4_a_fp4_scale_fp8": ("fp4_scale_fp8", "fp4_scale_fp8"),
    "w_fp8": ("fp8", None), "w_mx9": ("mx9", None), "w_mx9_a_mx9": ("mx9", "mx9"),
    "w_nvfp4": ("nvfp4", None), "w_nvfp4_a_nvfp4": ("nvfp4", "nvfp4"),
}


# llama.cpp's block grids (formats/gguf_grid): code bits, block (sub-block) size and symmetry as in ggml's
# block_qN_K (K-quants, 256-column super-blocks) and block_qN_0 / block_qN_1 (legacy blocks of 32)
GGUF_GRID_LAYOUTS = {"q2_k": (2, 16, False), "q3_k": (3, 16, True), "q4_k": (4, 32, False), "q5_k": (5, 32, False),
                  "q6_k": (6, 16, True), "q4_0": (4, 32, True), "q4_1": (4, 32, False), "q5_0": (5, 32, True),
                  "q5_1": (5, 32, False), "q8_0": (8, 32, True)}
GGUF_GRID_SPECS = {name: QuantSpec(kind="int", bits=bits, signed=sym, symmetric=sym, granularity="group",
                                group_size=group, gguf_grid=name)
                for name, (bits, group, sym) in GGUF_GRID_LAYOUTS.items()}
KQUANT_SUPER = 256  # columns per super-block
# What a linear whose width is not a multiple of 256 gets instead of a K-quant: llama.cpp's fallback type's grid
# (Q5_0, Q5_1, Q8_0; Q4_0 for Q2_K / Q3_K, as llama.cpp's quantizer falls back)
KQUANT_FALLBACKS = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_KQUANT_NAMES = {f"w_{k}": k for k in GGUF_GRID_SPECS}
# llama.cpp's K-quant file mixes (exporters/gguf_mixes.MIXES) as schemes: gguf_q4_k_m quantizes every linear onto
# the grid llama-quantize would give its tensor in a Q4_K_M file (gguf_mix.with_gguf_mix), so the export
# of that mix holds the codes exactly; the scheme's weight spec is the mix's base type
GGUF_MIXES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
_MIX_SCHEMES = {f"gguf_{m}": m for m in GGUF_MIXES}


def gguf_mix(scheme_name: str) -> str | None:
    """The llama.cpp mix a scheme name stands for (gguf_q4_k_m -> q4_k_m), else None."""
    return _MIX_SCHEMES.get(scheme_name)


_INT_RE = re.compile(
    r"^w_(?P<w>u?int)(?P<bits>[2-8])"
    r"(?:_a_(?P<a>u?int)(?P<abits>[2-8]))?"
    r"_per_(?P<gran>tensor|channel|group)_(?P<sym>sym|asym)$")

DEFAULT_GROUP_SIZE = 128

# Weights int8 per channel, activations int8 quantized per token at run time (no calibrated range).
_INT8 = QuantSpec(kind="int", bits=8, signed=True, symmetric=True, granularity="channel", group_size=None)
_DYNAMIC_NAMES = {
    "w_int8_a_int8_per_token_dynamic": (_INT8, _INT8.with_changes(granularity="token", dynamic=True)),
}


KV_CACHE_DTYPES = {"fp8": _fp(8, 4, 3, **_FP8), "fp8_e4m3": _fp(8, 4, 3, **_FP8)}


def parse_kv_cache_dtype(name: str | None) -> QuantSpec | None:
    """The spec of the K and V projections' outputs for --kv-cache-dtype (static per-tensor FP8 E4M3, as
    Quark's --kv_cache_dtype fp8); None for no KV-cache quantization."""
    if name is None or str(name).lower() in ("", "none", "auto"):
        return None
    spec = KV_CACHE_DTYPES.get(str(name).lower())
    if spec is None:
        raise LowbitError(f"unknown KV-cache dtype {name!r}; use fp8 (E4M3, static per-tensor scales)")
    return spec


def scheme_names() -> list[str]:
    """Every scheme name the parser accepts (integer names are generated from the grammar)."""
    names = []
    for signed in ("int", "uint"):
        for bits in range(2, 9):
            for gran in ("tensor", "channel", "group"):
                for sym in ("sym", "asym"):
                    names.append(f"w_{signed}{bits}_per_{gran}_{sym}")
    names += ["w_int8_a_int8_per_tensor_sym", "w_int8_a_int8_per_channel_sym", "w_uint8_a_uint8_per_tensor_asym",
              *_DYNAMIC_NAMES]
    return names + list(_FLOAT_NAMES) + list(_KQUANT_NAMES) + list(_MIX_SCHEMES)


def scheme_grammar() -> str:
    """A one-line summary of valid names, for error messages."""
    return ("w_{int|uint}{2..8}_per_{tensor|channel|group}_{sym|asym}, "
            "w_int8_a_int8_per_{tensor|channel}_sym (static activations), " + ", ".join(_DYNAMIC_NAMES) +
            ", " + ", ".join(_FLOAT_NAMES) + ", " + ", ".join(_KQUANT_NAMES) + " (llama.cpp's block grids), gguf_{"
            + "|".join(GGUF_MIXES) + "} (llama.cpp's mixes of them)")


def parse_scheme(name: str, group_size: int | None = None) -> Scheme:
    """Parse a Quark-style scheme name (plus an optional group size) into a Scheme."""
    key = name.strip().lower()
    if key in _DYNAMIC_NAMES:
        if group_size is not None:
            raise LowbitError(f"--group-size {group_size} given with per-channel scheme {name!r}; drop --group-size")
        return Scheme(key, *_DYNAMIC_NAMES[key])
    if key in _FLOAT_NAMES:
        w, a = _FLOAT_NAMES[key]
        wspec = _FLOAT_WEIGHTS[w]
        if group_size is not None and wspec.granularity == "group":
            wspec = wspec.with_changes(group_size=group_size)
        # FP8 activations are static per tensor (a calibrated scale, as Quark's w_fp8_a_fp8); block formats
        # compute their block scales from the activations themselves at run time
        aspec = _FLOAT_WEIGHTS[a].with_changes(dynamic=_FLOAT_WEIGHTS[a].granularity != "tensor") if a else None
        return Scheme(key, wspec, aspec)
    if key in _KQUANT_NAMES or key in _MIX_SCHEMES:
        if group_size is not None:
            raise LowbitError(f"--group-size {group_size} given with {name!r}, whose sub-blocks are fixed; "
                              f"drop --group-size")
        return Scheme(key, GGUF_GRID_SPECS[_KQUANT_NAMES[key] if key in _KQUANT_NAMES else _MIX_SCHEMES[key][:4]])
    m = _INT_RE.match(key)
    if not m:
        close = [s] if (s := lowbit_spelling(key)) else difflib.get_close_matches(key, scheme_names(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise LowbitError(f"unknown scheme {name!r}{hint}; valid schemes: {scheme_grammar()}")
    gran = m["gran"]
    if gran == "group":
        gs = group_size if group_size is not None else DEFAULT_GROUP_SIZE
    else:
        if group_size is not None:
            raise LowbitError(f"--group-size {group_size} given with per-{gran} scheme {name!r}; "
                              f"use a *_per_group_* scheme or drop --group-size")
        gs = None
    sym = m["sym"] == "sym"
    weight = QuantSpec(kind="int", bits=int(m["bits"]), signed=m["w"] == "int", symmetric=sym,
                       granularity=gran, group_size=gs)
    act = None
    if m["a"]:
        act = QuantSpec(kind="int", bits=int(m["abits"]), signed=m["a"] == "int", symmetric=sym,
                        granularity="tensor", group_size=None)
    return Scheme(key, weight, act)


_ALGO_WORDS = ("awq", "gptq", "rtn", "autoround")


def lowbit_spelling(key: str) -> str | None:
    """lowbit's spelling of an integer scheme named as other tools name it (w_int4_g128, int4_awq, w4a16_g128,
    uint4_asym_gs64, w8a8): the scheme, and --group-size / --algo when the name carries them; None when the
    name does not read as one."""
    bits = abits = group = signed = sym = gran = None
    algo = []
    for t in (t for t in re.split(r"[_\-]", key.lower()) if t and t not in ("w", "per", "weight", "only")):
        if m := re.fullmatch(r"(u?)int(\d)", t):
            signed, bits = not m[1], int(m[2])
        elif m := re.fullmatch(r"w(\d)(?:a(\d+))?", t):
            bits, abits = int(m[1]), int(m[2]) if m[2] else abits
        elif m := re.fullmatch(r"a(\d+)", t):
            abits = int(m[1])
        elif m := re.fullmatch(r"(?:g|gs|group|groupsize|group(?:_)?size)(\d+)", t):
            group = int(m[1])
        elif t in ("sym", "asym"):
            sym = t == "sym"
        elif t in ("channel", "perchannel", "pc", "tensor", "group"):
            gran = "tensor" if t == "tensor" else "group" if t == "group" else "channel"
        elif t in _ALGO_WORDS:
            algo.append(t)
        else:
            return None
    if bits is None or not 2 <= bits <= 8:
        return None
    sym = (signed is not False) if sym is None else sym
    signed = sym if signed is None else signed
    gran = gran or ("group" if group or bits < 8 else "channel")
    name = f"w_{'int' if signed else 'uint'}{bits}_per_{gran}_{'sym' if sym else 'asym'}"
    if abits == 8:
        name = f"w_int8_a_int8_per_{'channel' if gran == 'channel' else 'tensor'}_sym" if bits == 8 else ""
    elif abits not in (None, 16, 32):
        return None
    if name not in scheme_names():
        return None
    extra = f" --group-size {group}" if group and gran == "group" else ""
    return name + extra + (f" --algo {','.join(algo)}" if algo else "")

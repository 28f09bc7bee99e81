"""Recipe: the scheme, per-layer overrides, excluded layers and the algorithm chain; and its resolution
into a per-module plan that is printed and validated before any work starts.

Layer patterns (for --exclude-layers and --override):
- "re:REGEX" matches module names with re.match (compressed-tensors' convention);
- a pattern with * ? or [ is a glob on the full module name;
- a plain pattern matches a module when it is a run of whole dot-separated parts of the name:
  "down_proj" matches every model.layers.N.mlp.down_proj, "layers.0" every module of the first block.
Precedence: excluded > an override naming the module exactly > pattern overrides (later ones win) > scheme.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import check_count
from .errors import LowbitError
from .arch.moe import EXPERT_PATTERN, is_router
from .spec import KQUANT_FALLBACKS, GGUF_GRID_SPECS, KQUANT_SUPER, QuantSpec, Scheme, parse_scheme

DEFAULT_EXCLUDE = ("lm_head",)
KV_PROJECTIONS = ("k_proj", "v_proj")  # linears whose outputs are the KV cache
DEFAULT_CALIBRATION = {"dataset": "pydoc", "num_samples": 128, "seq_len": 512, "seed": 0, "batch_size": 8,
                       "propagate": "float"}


def matches(pattern: str, name: str) -> bool:
    """Whether a layer pattern selects the module `name` (rules in the module docstring)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return f".{pattern}." in f".{name}."


def check_pattern(pattern) -> None:
    """Refuse a layer pattern that is not text, or a re: pattern that is not a valid regular expression."""
    if not isinstance(pattern, str) or not pattern:
        raise LowbitError(f"layer pattern {pattern!r} is not a name, glob or re:REGEX")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as exc:
            raise LowbitError(f"layer pattern {pattern!r} is not a valid regular expression ({exc}); fix it or use "
                              f"a glob such as '*.mlp.*'") from None


def check_calibration(cal: dict) -> None:
    """Refuse calibration settings that cannot run, before any work."""
    unknown = set(cal) - set(DEFAULT_CALIBRATION)
    if unknown:
        raise LowbitError(f"unknown calibration setting {sorted(unknown)[0]!r}; the settings are "
                          f"{', '.join(DEFAULT_CALIBRATION)}")
    check_count("--num-calib-data", cal["num_samples"])
    check_count("--seq-len", cal["seq_len"], 2)
    check_count("--batch-size", cal["batch_size"])
    check_count("--seed", cal["seed"], 0, 2**63 - 1)
    if not isinstance(cal["dataset"], str) or not cal["dataset"]:
        raise LowbitError(f"the calibration dataset must be a file path or a dataset name, got {cal['dataset']!r}")
    if cal["propagate"] not in ("float", "quantized"):
        raise LowbitError(f"--propagate must be float or quantized, got {cal['propagate']!r}")


def split_assignments(text: str, what: str, example: str, head_colons: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """Split 'HEAD:key=value[,key=value...]' into the head and (key, value) strings; `what` and `example` word
    the error. With head_colons the head may itself hold ':' (a pattern such as re:...) and values may not;
    without, the head is a plain name and values may (awq:clip_skip=re:...)."""
    head, sep, body = text.rpartition(":") if head_colons else text.partition(":")
    if not sep or not head.strip() or not body:
        raise LowbitError(f"{what} {text!r} is not {what.split()[-1].upper()}:key=value[,key=value]; e.g. {example}")
    pairs = []
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LowbitError(f"{what} {text!r}: {item!r} is not key=value; e.g. {example}")
        pairs.append((key.strip().replace("-", "_"), value.strip()))
    return head.strip(), pairs


@dataclass(frozen=True)
class Override:
    """Changes to the scheme's weight spec for modules matching `pattern`: QuantSpec fields, or
    `scheme` (a whole scheme name, applied first) possibly with other fields on top."""

    pattern: str
    changes: tuple[tuple[str, object], ...]

    @classmethod
    def parse(cls, text: str) -> "Override":
        """Parse 'PATTERN:key=value[,key=value...]', e.g. 'down_proj:bits=8' or 'lm_head:group_size=32'."""
        pattern, pairs = split_assignments(text, "override pattern", "down_proj:bits=8")
        check_pattern(pattern)
        return cls(pattern, tuple((key, _coerce(key, value, text)) for key, value in pairs))

    def apply(self, spec: QuantSpec) -> QuantSpec:
        try:
            return self._apply(spec)
        except LowbitError as exc:
            raise LowbitError(f"override {self.to_text()!r} on {spec.short_name}: {exc}") from None

    def _apply(self, spec: QuantSpec) -> QuantSpec:
        changes = dict(self.changes)
        if "scheme" in changes:  # a per-group scheme without its own group_size keeps the current one
            inherited = spec.group_size if spec.granularity == "group" else None
            new = parse_scheme(str(changes.pop("scheme"))).weight
            if new.granularity == "group" and not new.gguf_grid:  # K-quant sub-blocks are fixed
                new = new.with_changes(group_size=changes.pop("group_size", inherited or new.group_size))
            spec = new
        if changes.get("group_size") is not None and "granularity" not in changes:
            changes["granularity"] = "group"
        return spec.with_changes(**changes)

    def to_text(self) -> str:
        return f"{self.pattern}:" + ",".join(f"{k}={v}" for k, v in self.changes)


def _coerce(key: str, value: str, text: str):
    if key == "scheme":
        return value
    if key not in QuantSpec.__dataclass_fields__:
        valid = ", ".join(["scheme", *QuantSpec.__dataclass_fields__])
        raise LowbitError(f"override {text!r}: unknown key {key!r}; valid keys: {valid}")
    try:
        return QuantSpec.parse_field(key, value)
    except LowbitError as exc:
        raise LowbitError(f"override {text!r}: {exc}") from None


@dataclass(frozen=True)
class AlgoStep:
    """One element of the algorithm chain, with its keyword arguments."""

    name: str
    args: tuple[tuple[str, object], ...] = ()

    def kwargs(self) -> dict:
        return dict(self.args)


@dataclass
class Recipe:
    """Everything that decides a quantization result, saved as recipe.yaml beside every output."""

    scheme: Scheme
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    overrides: tuple[Override, ...] = ()
    algorithms: tuple[AlgoStep, ...] = (AlgoStep("rtn"),)
    calibration: dict = field(default_factory=lambda: dict(DEFAULT_CALIBRATION))
    kv_cache: QuantSpec | None = None  # the K / V projections' outputs (--kv-cache-dtype)
    # --target-bits (mixed.py): {"target_bits", "measure"} asked; once chosen also "achieved_bits" and
    # "candidates", with the chosen plan in `overrides` (a recipe holding a choice is not measured again)
    mixed: dict | None = None

    def __post_init__(self):
        for pattern in [*self.exclude, *(o.pattern for o in self.overrides)]:
            check_pattern(pattern)
        check_calibration(self.calibration)

    def to_dict(self) -> dict:
        return {
            "scheme": self.scheme.to_dict(),
            "exclude": list(self.exclude),
            "overrides": [o.to_text() for o in self.overrides],
            "algorithms": [{"name": a.name, **a.kwargs()} for a in self.algorithms],
            "calibration": dict(self.calibration),
            "kv_cache": self.kv_cache.to_dict() if self.kv_cache else None,
            **({"mixed_precision": dict(self.mixed)} if self.mixed else {}),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        algos = tuple(AlgoStep(a["name"], tuple((k, v) for k, v in a.items() if k != "name"))
                      for a in data.get("algorithms", [{"name": "rtn"}]))
        return cls(scheme=Scheme.from_dict(data["scheme"]),
                   exclude=tuple(data.get("exclude", DEFAULT_EXCLUDE)),
                   overrides=tuple(Override.parse(t) for t in data.get("overrides", [])),
                   algorithms=algos,
                   calibration={**DEFAULT_CALIBRATION, **data.get("calibration", {})},
                   kv_cache=QuantSpec.from_dict(data["kv_cache"]) if data.get("kv_cache") else None,
                   mixed=dict(data["mixed_precision"]) if data.get("mixed_precision") else None)

    def save(self, path: Path) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix == ".json" else yaml.safe_dump(self.to_dict(), sort_keys=False)
        path.write_text(text)

    @classmethod
    def load(cls, path: Path) -> "Recipe":
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
            if not isinstance(data, dict):
                raise TypeError("not a mapping of settings")
            return cls.from_dict(data)
        except LowbitError as exc:
            raise LowbitError(f"recipe {path}: {exc}") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, yaml.YAMLError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LowbitError(f"recipe {path} cannot be read as a lowbit recipe ({type(exc).__name__}: {first}); "
                              f"give a recipe.yaml that lowbit wrote, or edit one") from None


@dataclass(frozen=True)
class LayerPlan:
    """What happens to one linear module: its spec (None = kept in float) and why."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    spec: QuantSpec | None
    reason: str
    input_spec: QuantSpec | None = None  # the input activations' quantization (W+A schemes)
    output_spec: QuantSpec | None = None  # the outputs' quantization (K and V projections under a KV-cache dtype)


def resolve_plan(recipe: Recipe, linears: dict[str, tuple[int, int]]) -> dict[str, LayerPlan]:
    """Resolve the recipe against the model's linear modules (name -> (out, in)) into a per-module plan."""
    for pattern in [*recipe.exclude, *(o.pattern for o in recipe.overrides)]:
        if not any(matches(pattern, n) for n in linears):
            if pattern == EXPERT_PATTERN:
                raise LowbitError("--moe-experts-second-step-config names a scheme for MoE experts, but this model "
                                  "has no experts; drop the option")
            raise LowbitError(f"layer pattern {pattern!r} matches no linear module of this model; "
                              f"run `lowbit inspect MODEL` to see the module names")
    plan = {}
    for name, shape in linears.items():
        if any(matches(p, name) for p in recipe.exclude):
            plan[name] = LayerPlan(name, shape, None, "excluded")
            continue
        if is_router(name):
            plan[name] = LayerPlan(name, shape, None, "router (never quantized)")
            continue
        spec, reason = recipe.scheme.weight, "scheme"
        exact = [o for o in recipe.overrides if o.pattern == name]
        for o in [o for o in recipe.overrides if o.pattern != name and matches(o.pattern, name)] + exact:
            spec, reason = o.apply(spec), f"override {o.pattern}"
        spec, reason = kquant_fallback(spec, shape, reason)
        kv = recipe.kv_cache if name.endswith(KV_PROJECTIONS) else None
        plan[name] = LayerPlan(name, shape, spec, reason, recipe.scheme.input, kv)
    if recipe.kv_cache is not None:
        kv_names = [n for n in linears if n.endswith(KV_PROJECTIONS)]
        if not kv_names:
            raise LowbitError("--kv-cache-dtype needs separate k_proj and v_proj linears, and this model has none "
                              "(a fused qkv projection is not supported yet); drop --kv-cache-dtype")
        excluded = [n for n in kv_names if plan[n].spec is None]
        if excluded:
            raise LowbitError(f"--kv-cache-dtype quantizes the outputs of k_proj / v_proj, but {excluded[0]} is "
                              f"excluded; quantize it (drop it from --exclude-layers) or drop --kv-cache-dtype")
    return plan


def kquant_fallback(spec: QuantSpec, shape: tuple[int, int], reason: str) -> tuple[QuantSpec, str]:
    """A K-quant grid on a linear whose width is not a multiple of 256 becomes llama.cpp's fallback grid for it
    (spec.KQUANT_FALLBACKS); a grid on a width that is not a multiple of 32 is refused."""
    if not spec.gguf_grid:
        return spec, reason
    asked = spec.gguf_grid
    if spec.gguf_grid.endswith("_k") and shape[1] % KQUANT_SUPER:
        grid = KQUANT_FALLBACKS[spec.gguf_grid]
        spec, reason = GGUF_GRID_SPECS[grid], f"{reason}; {shape[1]} columns are not whole {spec.gguf_grid.upper()} " \
                                          f"super-blocks: {grid.upper()}"
    if shape[1] % 32:
        held = asked if asked == spec.gguf_grid else f"{asked} blocks nor its {spec.gguf_grid} fallback"
        raise LowbitError(f"a linear of {shape[1]} input features cannot hold llama.cpp's {held} (blocks of 32 "
                          f"columns); exclude it (--exclude-layers) or use an integer scheme")
    return spec, reason


def validate_plan(plan: dict[str, LayerPlan], scheme: Scheme) -> None:
    """Refuse, before any work, what this plan cannot do: per-token weights, groups larger than a layer."""
    for lp in plan.values():
        spec = lp.spec
        if spec is None:
            continue
        if spec.granularity == "token":
            raise LowbitError(f"{lp.name}: per-token granularity is for activations; give weights tensor, channel "
                              f"or group granularity")
        if spec.granularity == "group" and spec.group_size > lp.shape[1]:
            raise LowbitError(f"group size {spec.group_size} is larger than {lp.name}'s {lp.shape[1]} input features; "
                              f"use --group-size <= {lp.shape[1]} or an override such as "
                              f"'{lp.name}:group_size={lp.shape[1]}'")


def has_static_inputs(plan: dict[str, LayerPlan]) -> bool:
    """Whether some quantized linear's input activations, or its outputs (KV cache), need a calibrated range."""
    return any(lp.spec is not None and any(a is not None and not a.dynamic for a in (lp.input_spec, lp.output_spec))
               for lp in plan.values())


def format_plan(plan: dict[str, LayerPlan]) -> str:
    """A compact table of the plan: consecutive blocks with the same treatment are folded together."""
    rows: dict[tuple[str, str], list[str]] = {}
    for lp in plan.values():
        label = lp.spec.short_name if lp.spec else "float (not quantized)"
        if lp.spec and lp.input_spec:
            label += f", inputs {lp.input_spec.short_name}{'' if lp.input_spec.dynamic else ' static'}"
        if lp.spec and lp.output_spec:
            label += f", outputs (KV cache) {lp.output_spec.short_name} static"
        key = (re.sub(r"\.\d+\.", ".*.", lp.name), label)
        rows.setdefault(key, []).append(lp.name)
    width = max((len(k[0]) for k in rows), default=10)
    lines = [f"{'module':<{width}}  {'count':>5}  treatment"]
    for (pattern, label), names in rows.items():
        lines.append(f"{pattern:<{width}}  {len(names):>5}  {label}")
    n_q = sum(1 for lp in plan.values() if lp.spec)
    lines.append(f"{n_q} of {len(plan)} linear modules quantized")
    return "\n".join(lines)

"""The algorithm plug-in interface and the registry that turns a chain string into algorithm objects.

A chain is an optional rotation (a model-wide change of basis, first), transforms (weight-changing steps
such as AWQ scaling or SmoothQuant, applied to a block before quantization) and one quantizer (RTN, GPTQ)
that turns each weight into integer codes. Algorithms work on tensors handed to them by the engine and
return plain data; none reads or writes files.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import LowbitError
from ..recipe import split_assignments
from ..formats import Quantized
from ..spec import QuantSpec


# What an algorithm needs from the engine (Algorithm.needs); the engine serves each need in one place
INPUT_STATS = "input statistics"  # statistics of each linear's input (channel ranges, Gram / Hessian): AWQ, GPTQ
FLOAT_AND_QUANTIZED_INPUTS = "float and quantized inputs"  # each linear's input in the float and in the quantized
#                                                             model at once (GPTAQ)
BLOCK_FORWARD = "block forward"  # the block's forward and its float outputs, for rounding optimisation (AutoRound)
GLOBAL_TRANSFORM = "global transform"  # a change of the whole model before any block is quantized (rotation)
CALIBRATION_NEEDS = frozenset({INPUT_STATS, FLOAT_AND_QUANTIZED_INPUTS, BLOCK_FORWARD})


class Algorithm:
    """Base of every algorithm: a name, its role in a chain, and what it needs from the engine."""

    name = "?"
    role = "transform"  # or "quantizer" or "rotation"
    needs: frozenset = frozenset()  # of the needs above
    rotates_online = False  # whether it multiplies some linear's input at run time (a rotation's R4)

    @property
    def needs_calibration(self) -> bool:
        """Whether it needs activations of calibration windows."""
        return bool(self.needs & CALIBRATION_NEEDS)

    @property
    def notes(self) -> dict[str, str]:
        """Remarks per linear for the summary (a fallback, a raised damping), filled in as it works."""
        return self.__dict__.setdefault("_notes", {})

    def __init__(self, **kwargs):
        if kwargs:
            raise LowbitError(f"algorithm {self.name!r} takes no options {sorted(kwargs)}")

    def args(self) -> dict:
        """The options that decide the result (recorded in the recipe)."""
        return {}


class Transform(Algorithm):
    """Changes weights before quantization without changing what the float model computes (AWQ, SmoothQuant).
    For each group of linears that read one input it may return per-input-channel scales s (the engine
    multiplies the linears' input columns by s and divides the op producing the input by s) and, once all
    scales are folded, per-block clipping factors for the quantizer. Both from tensors: the weights, their
    QuantSpecs and the input's InputStats."""

    needs = frozenset({INPUT_STATS})
    needs_gram = True  # whether the InputStats handed over need the Gram matrix

    def channel_scales(self, names, weights, specs, stats) -> torch.Tensor | None:
        return None

    def clip_ratios(self, names, weights, specs, stats) -> list:
        return [None] * len(names)


class Quantizer(Algorithm):
    """Turns weights into codes + scales. Calibrated quantizers first see the inputs of each group of linears
    that read the same tensor (q/k/v; gate/up; ...)."""

    role = "quantizer"
    # whether it calibrates stage by stage, each stage's inputs computed with the earlier stages already
    # quantized (true-sequential), rather than on one pass of the block
    calibrates_stage_by_stage = False

    def observe(self, names: tuple[str, ...], inputs, targets=None) -> None:
        """Receive a chunk of the common input (tokens, in_features) of the linears `names` (calibrated
        quantizers only); for a quantizer needing FLOAT_AND_QUANTIZED_INPUTS, `targets` is the same tokens'
        input in the float model (`inputs`: in the model being quantized)."""

    def statistics(self) -> dict:
        """The input statistics observe() accumulated, by group of linears (InputStats; the dict itself, live):
        with several processes the engine sums each group's across processes before quantize_group, and drops
        those of groups another process quantizes."""
        return {}

    def take_stats(self, names: tuple[str, ...], stats) -> bool:
        """Accept statistics of the linears' whole input gathered by an earlier step (InputStats with its
        Gram matrix), instead of observing the inputs again; False when this quantizer cannot use them."""
        return False

    def quantize(self, name: str, weight, spec: QuantSpec, clip=None) -> Quantized:
        """Codes and scales of one weight; `clip` (shaped like the scales, in (0, 1]) shrinks each block's
        range, as chosen by a clipping search."""
        raise NotImplementedError

    def optimise_block(self, problem) -> list[Quantized]:
        """A quantizer needing BLOCK_FORWARD (AutoRound): the quantized weights of a block's linears, learned
        from the block's output (engine.block.BlockProblem), in the order of problem.names."""
        raise NotImplementedError

    def quantize_group(self, names: tuple[str, ...], weights: list, specs: list[QuantSpec],
                       clips: list | None = None) -> list[Quantized]:
        """Quantize linears that share an input; by default one at a time."""
        clips = clips or [None] * len(names)
        return [self.quantize(n, w, s, c) for n, w, s, c in zip(names, weights, specs, clips)]


REGISTRY: dict[str, type[Algorithm]] = {}


def parse_algo_args(items) -> dict[str, dict]:
    """Options per algorithm from 'NAME:KEY=VALUE[,KEY=VALUE]' strings, e.g. 'gptq:damp=0.05,act_order=false'."""
    out: dict[str, dict] = {}
    for text in items or ():
        name, pairs = split_assignments(text, "algorithm option name", "gptq:damp=0.05", head_colons=False)
        out.setdefault(name.lower(), {}).update((key, _value(value)) for key, value in pairs)
    return out


def _value(text: str):
    low = text.lower()
    if low in ("true", "false", "yes", "no"):
        return low in ("true", "yes")
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def check_options(cls: type[Algorithm], options: dict) -> dict:
    """An algorithm's options checked against its constructor: known names, values of the annotated type
    (bool, int, float, str) and within the limits it declares in LIMITS ({option: (least, most)}, either None)."""
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    out = {}
    for key, value in options.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise LowbitError(f"{cls.name} has no option {key!r}; its options: {known}")
        kind = params[key].annotation
        if kind == "str":
            out[key] = str(value)
            continue
        ok = {"bool": isinstance(value, bool), "int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}
        if not ok.get(kind, True):
            what = {"bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
            raise LowbitError(f"{cls.name} option {key} must be {what}, got {value!r}")
        least, most = getattr(cls, "LIMITS", {}).get(key, (None, None))
        if (least is not None and value < least) or (most is not None and value > most):
            span = f"between {least} and {most}" if least is not None and most is not None else \
                f"at least {least}" if least is not None else f"at most {most}"
            raise LowbitError(f"{cls.name} option {key} must be {span}, got {value!r}")
        out[key] = value
    return out


def register(cls: type[Algorithm]) -> type[Algorithm]:
    REGISTRY[cls.name] = cls
    return cls


def parse_chain(text_or_steps, options: dict[str, dict] | None = None) -> list[Algorithm]:
    """Algorithm objects for a chain such as "rtn" or "smoothquant,gptq"; refused with the reason when
    invalid. A chain of transforms only ends with an implicit rtn."""
    names = ([s.strip().lower() for s in text_or_steps.split(",") if s.strip()]
             if isinstance(text_or_steps, str) else list(text_or_steps))
    if not names:
        raise LowbitError("the algorithm chain is empty; use --algo rtn")
    options = options or {}
    for name in options:
        if name not in names:
            raise LowbitError(f"options given for {name!r}, which is not in the chain {','.join(names)}")
    chain = []
    for name in names:
        if name not in REGISTRY:
            raise LowbitError(f"unknown algorithm {name!r}; available in this version: {', '.join(sorted(REGISTRY))}")
        cls = REGISTRY[name]
        chain.append(cls(**check_options(cls, options.get(name, {}))))
    rotations = [i for i, a in enumerate(chain) if a.role == "rotation"]
    if rotations and rotations != [0]:
        raise LowbitError(f"in chain {','.join(names)} rotation must come first: it changes the whole model, "
                          f"and the other steps work on the rotated weights (e.g. rotation,smoothquant,gptq)")
    quantizers = [i for i, a in enumerate(chain) if a.role == "quantizer"]
    if len(quantizers) > 1:
        raise LowbitError(f"chain {','.join(names)} has {len(quantizers)} quantizers "
                          f"({', '.join(chain[i].name for i in quantizers)}); keep exactly one, last")
    if quantizers and quantizers[0] != len(chain) - 1:
        raise LowbitError(f"in chain {','.join(names)} the quantizer {chain[quantizers[0]].name!r} must come last")
    if len(set(names)) != len(names):
        raise LowbitError(f"chain {','.join(names)} names an algorithm twice")
    scalers = [a.name for a in chain if a.role == "transform" and type(a).channel_scales is not Transform.channel_scales]
    if len(scalers) > 1:
        raise LowbitError(f"chain {','.join(names)} has two per-channel scaling steps ({', '.join(scalers)}) that would "
                          f"choose scales for the same layers; keep one (awq for weight-only schemes, smoothquant "
                          f"for schemes with quantized activations)")
    if not quantizers:
        chain.append(REGISTRY["rtn"]())
    return chain

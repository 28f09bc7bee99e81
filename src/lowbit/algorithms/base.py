"""The algorithm plug-in interface and the registry that turns a chain string into algorithm objects.

A chain is transforms (weight-changing steps such as AWQ scaling or SmoothQuant, applied to a block before
quantization) followed by one quantizer (RTN, GPTQ) that turns each weight into integer codes. Algorithms
work on tensors handed to them by the engine and return plain data; none reads or writes files.
"""

from __future__ import annotations

from ..errors import LowbitError
from ..formats import IntQuantized
from ..spec import QuantSpec


class Algorithm:
    """Base of every algorithm: a name, whether it needs calibration activations, and its role."""

    name = "?"
    role = "transform"  # or "quantizer"
    needs_calibration = False

    def __init__(self, **kwargs):
        if kwargs:
            raise LowbitError(f"algorithm {self.name!r} takes no options {sorted(kwargs)}")

    def args(self) -> dict:
        """The options that decide the result (recorded in the recipe)."""
        return {}


class Transform(Algorithm):
    """Changes a block's weights before quantization (AWQ scaling, SmoothQuant, rotation), given the block's
    calibration inputs; the function the block computes stays the same in float."""

    def apply_block(self, block, inputs) -> None:
        raise NotImplementedError


class Quantizer(Algorithm):
    """Turns one weight into codes + scales. Calibrated quantizers see each linear's inputs first."""

    role = "quantizer"

    def observe(self, name: str, inputs) -> None:
        """Receive a chunk of the inputs (tokens, in_features) of linear `name` (calibrated quantizers only)."""

    def quantize(self, name: str, weight, spec: QuantSpec) -> IntQuantized:
        raise NotImplementedError


REGISTRY: dict[str, type[Algorithm]] = {}


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
    chain = []
    for name in names:
        if name not in REGISTRY:
            raise LowbitError(f"unknown algorithm {name!r}; available in this version: {', '.join(sorted(REGISTRY))}")
        chain.append(REGISTRY[name](**options.get(name, {})))
    quantizers = [i for i, a in enumerate(chain) if a.role == "quantizer"]
    if len(quantizers) > 1:
        raise LowbitError(f"chain {','.join(names)} has {len(quantizers)} quantizers "
                          f"({', '.join(chain[i].name for i in quantizers)}); keep exactly one, last")
    if quantizers and quantizers[0] != len(chain) - 1:
        raise LowbitError(f"in chain {','.join(names)} the quantizer {chain[quantizers[0]].name!r} must come last")
    if len(set(names)) != len(names):
        raise LowbitError(f"chain {','.join(names)} names an algorithm twice")
    if not quantizers:
        chain.append(REGISTRY["rtn"]())
    return chain

"""Quantization algorithms as small plug-ins over tensors (RTN now; AWQ, GPTQ, SmoothQuant, rotation later)."""

from . import rtn  # noqa: F401  (registers)
from .base import REGISTRY, Algorithm, Quantizer, Transform, parse_chain, register

__all__ = ["REGISTRY", "Algorithm", "Quantizer", "Transform", "parse_chain", "register"]

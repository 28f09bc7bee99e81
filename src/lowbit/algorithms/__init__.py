"""Quantization algorithms as small plug-ins over tensors (RTN, GPTQ; AWQ, SmoothQuant, rotation later)."""

from . import gptq, rtn  # noqa: F401  (registers)
from .base import REGISTRY, Algorithm, Quantizer, Transform, parse_algo_args, parse_chain, register

__all__ = ["REGISTRY", "Algorithm", "Quantizer", "Transform", "parse_algo_args", "parse_chain", "register"]

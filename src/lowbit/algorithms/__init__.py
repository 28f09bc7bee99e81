"""Quantization algorithms as small plug-ins over tensors: RTN, GPTQ, GPTAQ, Qronos, AutoRound (quantizers); AWQ, SmoothQuant (transforms);
Hadamard rotation (a model-wide step, first in a chain)."""

from . import autoround, awq, gptaq, gptq, qronos, rotation, rtn, smoothquant  # noqa: F401  (registers)
from .base import (BLOCK_FORWARD, CALIBRATION_NEEDS, FLOAT_AND_QUANTIZED_INPUTS, GLOBAL_TRANSFORM, INPUT_STATS, REGISTRY,
                   Algorithm, Quantizer, Transform, parse_algo_args, parse_chain, register)
from .stats import InputStats

__all__ = ["BLOCK_FORWARD", "CALIBRATION_NEEDS", "FLOAT_AND_QUANTIZED_INPUTS", "GLOBAL_TRANSFORM", "INPUT_STATS",
           "REGISTRY", "Algorithm", "InputStats", "Quantizer", "Transform", "parse_algo_args", "parse_chain",
           "register"]

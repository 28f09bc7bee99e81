"""Element formats as pure tensor maths: quantize, dequantize, pack and unpack. No model or file knowledge."""

from .integer import (IntQuantized, activation_qparams, block_amax, compute_qparams, dequantize, fake_quant,
                      fake_quant_activation, quantize, quantize_codes)
from .packing import pack_rows, packed_row_bytes, unpack_rows

__all__ = ["IntQuantized", "activation_qparams", "block_amax", "compute_qparams", "dequantize", "fake_quant",
           "fake_quant_activation", "quantize", "quantize_codes", "pack_rows", "packed_row_bytes", "unpack_rows"]

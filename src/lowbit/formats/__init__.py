"""Element formats as pure tensor maths: quantize, dequantize, pack and unpack. No model or file knowledge."""

from .integer import IntQuantized, compute_qparams, dequantize, quantize, quantize_codes
from .packing import pack_rows, packed_row_bytes, unpack_rows

__all__ = ["IntQuantized", "compute_qparams", "dequantize", "quantize", "quantize_codes",
           "pack_rows", "packed_row_bytes", "unpack_rows"]

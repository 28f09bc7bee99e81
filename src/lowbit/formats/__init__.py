"""Element formats as pure tensor maths: quantize, dequantize, pack and unpack. No model or file knowledge."""

from .integer import block_amax
from .packing import pack_rows, packed_row_bytes, unpack_rows
from .quantized import (Quantized, activation_qparams, compute_qparams, dequantize, fake_quant,
                        fake_quant_activation, grid_round, quantize, quantize_codes, quantize_gguf_grid, tensor_scale,
                        values_to_codes)

__all__ = ["Quantized", "activation_qparams", "block_amax", "compute_qparams", "dequantize", "fake_quant",
           "fake_quant_activation", "grid_round", "quantize", "quantize_codes", "quantize_gguf_grid", "tensor_scale",
           "values_to_codes", "pack_rows", "packed_row_bytes", "unpack_rows"]

"""RTN: round-to-nearest with min/max statistics of the weight itself. No calibration, no forward pass."""

from __future__ import annotations

from ..formats import Quantized, quantize
from ..spec import QuantSpec
from .base import Quantizer, register


@register
class RTN(Quantizer):
    name = "rtn"

    def quantize(self, name: str, weight, spec: QuantSpec, clip=None) -> Quantized:
        return quantize(weight, spec, clip)

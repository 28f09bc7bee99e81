"""The engine, split by job: runner.py (the loop over decoder blocks), block.py (one block's calibration),
stages.py (stage discovery), replay.py (replaying finished stages), step.py (the transform-and-quantize step
shared with the ONNX quantizer), placement.py (where tensors live; where statistics are summed)."""

from .runner import PROPAGATE, Engine, EngineReport, check_needs

__all__ = ["PROPAGATE", "Engine", "EngineReport", "check_needs"]

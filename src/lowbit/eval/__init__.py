"""Measuring a model: perplexity with torch (perplexity.py), onnxruntime (onnx_perplexity.py) and llama.cpp
(llama_cpp.py); task accuracy, size and speed later."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

"""Measuring a model: perplexity now; task accuracy, size and speed later."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]

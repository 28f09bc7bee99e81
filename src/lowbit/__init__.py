"""lowbit: post-training quantization of large language models."""

__version__ = "0.1.0"

import os  # noqa: E402

# OpenMP threads that wait for work by sleeping rather than spinning, unless the user chose otherwise (read
# when torch's OpenMP runtime starts, so before torch is imported). Spinning threads stall parallel regions
# when other processes (or onnxruntime's own threads) want the cores: AWQ's searches ran 1.3-3.3x faster
# passive beside busy processes and the same on an idle machine (benchmarks/omp_wait.py, docs/BENCHMARKS.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import LowbitError  # noqa: E402
from .spec import QuantSpec, Scheme, parse_scheme  # noqa: E402


def __getattr__(name):
    """The API functions, imported on first use so that `import lowbit` stays light."""
    if name in ("quantize", "load", "evaluate", "inspect", "make_recipe", "export"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


__all__ = ["LowbitError", "QuantSpec", "Scheme", "parse_scheme", "quantize", "load", "evaluate", "inspect",
           "make_recipe", "export", "__version__"]

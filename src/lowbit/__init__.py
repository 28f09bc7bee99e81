"""lowbit: post-training quantization of large language models."""

__version__ = "0.1.0"

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

"""Hugging Face and GGUF sources loaded into torch, lazily."""

from .model import LoadedModel, open_model
from .source import resolve_source

__all__ = ["LoadedModel", "open_model", "resolve_source"]

"""Perplexity of an ONNX decoder run by onnxruntime (CPU), by the same protocol and result as perplexity.py.

Works on any decoder with onnxruntime-genai's I/O names (FORMATS.md 2.3): lowbit's ONNX export and the
builder's own output alike. Each window runs from an empty past (zero-length past tensors shaped and typed
from the session's input metadata), with an all-ones attention mask and position_ids 0..seq_len-1 when the
graph takes them (the session and its inputs come from lowbit.runtimes).
"""

from __future__ import annotations

import numpy as np
import torch

from ..runtimes import decoder_feeds, decoder_session, genai_decoder, genai_generator, onnx_model_path, \
    open_genai_model
from .perplexity import PerplexityResult, windowed_perplexity


def onnx_perplexity(folder_or_model_path, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                    threads: int | None = None) -> PerplexityResult:
    """Perplexity of an ONNX decoder (folder or model file) over token windows (n, seq_len) int64."""
    model = onnx_model_path(folder_or_model_path)
    session = decoder_session(model, threads)
    head_size = genai_decoder(model.parent).get("head_size")

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        feeds = decoder_feeds(session, batch.numpy().astype(np.int64), head_size)
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return windowed_perplexity(logits_of, windows, batch_size, progress, "onnx perplexity")


def genai_perplexity(folder, windows: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """Perplexity of an onnxruntime-genai folder run by onnxruntime-genai itself (its session options, KV cache
    handling and provider from genai_config.json): each window is appended as a prompt to a fresh generator
    and the prompt's logits read back, one window at a time."""
    model = open_genai_model(folder)

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for window in batch:
            generator = genai_generator(model, len(window) + 1)
            generator.append_tokens(window.numpy().astype(np.int32))
            rows.append(torch.from_numpy(np.asarray(generator.get_output("logits")).copy())[0])
        return torch.stack(rows)

    return windowed_perplexity(logits_of, windows, 1, progress, "onnxruntime-genai perplexity")

"""Perplexity of a GGUF file computed by llama.cpp itself (llama-cpp-python), on the same token windows and by
the same protocol as eval.perplexity: token ids are fed directly (llama.cpp tokenizes nothing), each window
starts from an empty KV cache, and the mean next-token NLL is taken over the seq_len - 1 predicted tokens of
every window. So its figure and lowbit's are directly comparable for the same weights."""

from __future__ import annotations

import os

import torch

from ..runtimes import open_llama
from .perplexity import PerplexityResult, windowed_perplexity


def gguf_perplexity(path: str | os.PathLike, windows: torch.Tensor, progress: bool = True,
                    n_threads: int | None = None) -> PerplexityResult:
    """Perplexity of the GGUF model at `path` over token windows (n, seq_len), computed by llama.cpp."""
    llm = open_llama(path, windows.shape[1], n_threads)

    def logits_of(batch: torch.Tensor) -> torch.Tensor:  # one window: llama.cpp's context holds one sequence
        llm.reset()  # the next eval starts the KV cache at position 0: every window starts empty
        llm.eval(batch[0].tolist())
        return torch.from_numpy(llm.scores[: batch.shape[1]]).unsqueeze(0)

    try:
        return windowed_perplexity(logits_of, windows, 1, progress, "perplexity (llama.cpp)")
    finally:
        llm.close()


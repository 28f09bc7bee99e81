"""Perplexity of a GGUF file computed by llama.cpp itself (llama-cpp-python), on the same token windows and by
the same protocol as eval.perplexity: token ids are fed directly (llama.cpp tokenizes nothing), each window
starts from an empty KV cache, and the mean next-token NLL is taken over the seq_len - 1 predicted tokens of
every window. So its figure and lowbit's are directly comparable for the same weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import LowbitError
from .perplexity import PerplexityResult, windowed_perplexity


def gguf_perplexity(path: str | os.PathLike, windows: torch.Tensor, progress: bool = True,
                    n_threads: int | None = None) -> PerplexityResult:
    """Perplexity of the GGUF model at `path` over token windows (n, seq_len), computed by llama.cpp."""
    llm = open_gguf(path, windows.shape[1], n_threads)

    def logits_of(batch: torch.Tensor) -> torch.Tensor:  # one window: llama.cpp's context holds one sequence
        llm.reset()  # the next eval starts the KV cache at position 0: every window starts empty
        llm.eval(batch[0].tolist())
        return torch.from_numpy(llm.scores[: batch.shape[1]]).unsqueeze(0)

    try:
        return windowed_perplexity(logits_of, windows, 1, progress, "perplexity (llama.cpp)")
    finally:
        llm.close()


def open_gguf(path: str | os.PathLike, n_ctx: int, n_threads: int | None = None):
    """A quiet llama_cpp.Llama over a GGUF file that returns the logits of every position of a window."""
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python") from None
    if not Path(path).is_file():
        raise LowbitError(f"GGUF file {path} not found; give the path of a .gguf file")
    threads = n_threads or len(os.sched_getaffinity(0))
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                               n_threads=threads, n_threads_batch=threads, verbose=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise LowbitError(f"llama.cpp cannot load {path} ({exc}); check that the file is a complete GGUF model "
                          f"of an architecture this llama.cpp supports") from None

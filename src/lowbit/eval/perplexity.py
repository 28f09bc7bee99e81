"""Perplexity by the standard protocol: tokenize the whole text once, cut non-overlapping windows of
seq_len tokens (at most max_chunks), average the next-token negative log-likelihood over every predicted
token of every window (seq_len - 1 per window), exponentiate."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    windows: int
    tokens: int  # predicted tokens
    seq_len: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def windowed_perplexity(logits_of, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                        desc: str = "perplexity") -> PerplexityResult:
    """The protocol over any runtime: `logits_of(batch)` maps windows (b, seq_len) to logits (b, seq_len, vocab)."""
    start = time.perf_counter()
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(total=windows.shape[0], desc=desc, unit="window", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for batch in windows.split(batch_size):
            logits = logits_of(batch).float()
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])  # a copy: the logits themselves can go now
            del logits  # (two vocabulary-wide copies at a time instead of three: the stream's peak)
            nll = torch.nn.functional.cross_entropy(flat, batch[:, 1:].reshape(-1), reduction="sum")
            del flat
            total_nll += nll.item()
            total_tokens += batch[:, 1:].numel()
            bar.update(batch.shape[0])
    finally:
        bar.close()
    mean = total_nll / total_tokens
    return PerplexityResult(math.exp(mean), mean, windows.shape[0], total_tokens, windows.shape[1],
                            time.perf_counter() - start)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> PerplexityResult:
    """Perplexity of a torch causal LM over token windows (n, seq_len)."""
    with torch.inference_mode():
        return windowed_perplexity(lambda batch: model(input_ids=batch, use_cache=False).logits, windows,
                                   batch_size, progress)

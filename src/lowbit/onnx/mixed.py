"""Which weight MatMuls stay at 8 bits in mixed INT4/INT8 quantization when the user names none
(--enable-mixed-quant without --layers-8bit).

Candidate rules, each a function of the layer names only (so the choice is known before calibration and is
printed with the plan); the default was chosen by measurement on the demo model (benchmarks/onnx_frontend.py
--mixed, numbers in docs/BENCHMARKS.md):
- "edges_and_thirds": the V-carrying attention projection (v_proj, or a fused qkv_proj) and down_proj of the
  first and last eighth of the layers and of every third layer between (the rule llama.cpp's Q4_K_M uses
  for attn_v / ffn_down);
- "down": every down_proj;
- "qkv_down_edges": qkv/v and down_proj of the first and last eighth only.
"""

from __future__ import annotations

import re

from .quantize import layer_index

ATTENTION_V = ("v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")
DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")


def _layers(names: list[str]) -> int:
    found = [layer_index(n) for n in names]
    return max((i for i in found if i is not None), default=-1) + 1


def _kind(name: str) -> str | None:
    last = name.rsplit(".", 1)[-1]
    if last in ATTENTION_V:
        return "v"
    if last in DOWN and re.search(r"(mlp|ffn|feed_forward)", name):
        return "down"
    return None


def _edges_and_thirds(i: int, n: int) -> bool:
    eighth = max(1, n // 8)
    return i < eighth or i >= n - eighth or (i - eighth) % 3 == 2


def _edges(i: int, n: int) -> bool:
    eighth = max(1, n // 8)
    return i < eighth or i >= n - eighth


STRATEGIES = {
    "edges_and_thirds": lambda kind, i, n: kind in ("v", "down") and _edges_and_thirds(i, n),
    "down": lambda kind, i, n: kind == "down",
    "qkv_down_edges": lambda kind, i, n: kind in ("v", "down") and _edges(i, n),
}
DEFAULT_STRATEGY = "edges_and_thirds"


def default_8bit_layers(names: list[str], strategy: str = DEFAULT_STRATEGY) -> list[str]:
    """The exact layer names a strategy keeps at 8 bits."""
    n = _layers(names)
    rule = STRATEGIES[strategy]
    return [name for name in names if (i := layer_index(name)) is not None and rule(_kind(name), i, n)]

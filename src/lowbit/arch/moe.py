"""Mixture-of-experts blocks as ordinary linears: transformers (5.x) keeps a block's experts as two fused 3-D
parameters (gate_up_proj (E, 2I, H), down_proj (E, H, I)); lowbit swaps that module for one expert MLP of
three nn.Linear each, computing the same thing, so the engine calibrates and quantizes every expert as it
does any linear (each sees exactly the tokens routed to it), and the checkpoint's per-expert tensors load
by name. Routers are never quantized: transformers' top-k routers are not nn.Linear, and linears that act as
gates (Qwen2-MoE's shared_expert_gate, older `mlp.gate` linears) are excluded by name.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ROUTER_SUFFIXES = (".gate", "shared_expert_gate", ".router")
EXPERT_PATTERN = r"re:.*\.experts\.\d+\.[^.]+$"  # every per-expert linear, for --moe-experts-second-step-config

# Per-expert tensor names of checkpoints written in Mixtral's original layout, by the names lowbit uses
_ALIASES = [(re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj\."), r".block_sparse_moe.experts.\1.w1."),
            (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj\."), r".block_sparse_moe.experts.\1.w3."),
            (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj\."), r".block_sparse_moe.experts.\1.w2."),
            (re.compile(r"\.mlp\.gate\.weight$"), r".block_sparse_moe.gate.weight")]
# lowbit's names of Mixtral's experts and router -> the checkpoint names that transformers, vLLM and AutoAWQ read
_MIXTRAL_NAMES = [(re.compile(r"\.mlp\.experts\.(\d+)\.gate_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w1"),
                  (re.compile(r"\.mlp\.experts\.(\d+)\.up_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w3"),
                  (re.compile(r"\.mlp\.experts\.(\d+)\.down_proj(?=\.|$)"), r".block_sparse_moe.experts.\1.w2"),
                  (re.compile(r"\.mlp\.gate(?=\.|$)"), r".block_sparse_moe.gate")]
_EXPERT_WEIGHT = re.compile(r"^(?P<base>.*\.experts)\.(?P<j>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, act_fn, dtype, device):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, intermediate, **kw)
        self.up_proj = nn.Linear(hidden, intermediate, **kw)
        self.down_proj = nn.Linear(intermediate, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """A list of ExpertMLP with the fused experts' call signature: (hidden_states (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> the routing-weighted sum of each token's experts (T, H)."""

    def __init__(self, fused: nn.Module):
        n, double_i, hidden = fused.gate_up_proj.shape
        p = fused.gate_up_proj
        super().__init__(ExpertMLP(hidden, double_i // 2, fused.act_fn, p.dtype, p.device) for _ in range(n))
        self.num_experts = n

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for j in torch.unique(top_k_index).tolist():
            if not 0 <= j < self.num_experts:
                continue  # a masked slot
            tokens, slot = torch.where(top_k_index == j)
            y = self[j](hidden_states[tokens]) * top_k_weights[tokens, slot, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out


def is_fused_experts(module: nn.Module) -> bool:
    p = getattr(module, "gate_up_proj", None)
    d = getattr(module, "down_proj", None)
    return (isinstance(p, nn.Parameter) and isinstance(d, nn.Parameter) and p.dim() == 3 and d.dim() == 3
            and hasattr(module, "act_fn") and not getattr(module, "has_bias", False)
            and getattr(module, "gate_up_proj_bias", None) is None)


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of the model by UnfusedExperts (parameters stay on their device,
    meta for a skeleton); returns how many were replaced."""
    targets = [(name, module) for name, module in model.named_modules() if is_fused_experts(module)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, UnfusedExperts(module))
    return len(targets)


def is_router(name: str) -> bool:
    return name.endswith(ROUTER_SUFFIXES)


def read_aliased(name: str, ckpt) -> torch.Tensor | None:
    """A parameter the checkpoint stores under another name (Mixtral's block_sparse_moe, w1/w2/w3)
    or a per-expert weight stored fused (gate_up_proj / down_proj); None when there is no such tensor."""
    for pattern, repl in _ALIASES:
        alias = pattern.sub(repl, name)
        if alias != name and alias in ckpt:
            return ckpt.get(alias)
    m = _EXPERT_WEIGHT.match(name)
    if m is None:
        return None
    j = int(m["j"])
    if m["proj"] == "down" and f"{m['base']}.down_proj" in ckpt:
        return ckpt.get(f"{m['base']}.down_proj")[j]
    if f"{m['base']}.gate_up_proj" in ckpt:
        both = ckpt.get(f"{m['base']}.gate_up_proj")[j]
        half = both.shape[0] // 2
        return both[:half] if m["proj"] == "gate" else both[half:]
    return None


def checkpoint_name(name: str, model_type: str | None) -> str:
    """The name an exported checkpoint gives a tensor or module lowbit names `name`: Mixtral's experts and router
    in Mixtral's own layout (block_sparse_moe.experts.J.w1 / w3 / w2, block_sparse_moe.gate), as its readers
    expect; every other name as it is."""
    if model_type != "mixtral":
        return name
    for pattern, repl in _MIXTRAL_NAMES:
        name = pattern.sub(repl, name)
    return name

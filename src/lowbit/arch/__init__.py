"""Architecture knowledge in one place, derived from module structure: where the decoder blocks are, which
modules are linears, which weights are tied. Family tables come only where structure cannot tell (later:
which linears share an input, for AWQ/SmoothQuant)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError, warn


@dataclass
class Layout:
    """Where things are in a causal LM: the decoder blocks and the weights tied to others."""

    blocks_path: str  # e.g. "model.layers" (OPT: "model.decoder.layers")
    blocks: nn.ModuleList
    tied: dict[str, str]  # parameter name -> the parameter it shares storage with

    def block_prefix(self, i: int) -> str:
        return f"{self.blocks_path}.{i}."


def find_layout(model: nn.Module) -> Layout:
    """Locate the decoder blocks: the ModuleList holding the most parameters."""
    best, best_size = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise LowbitError(f"{type(model).__name__} has no list of decoder blocks; lowbit needs a transformer "
                          f"decoder (Llama, Qwen2, Mistral, Phi-3, Gemma, OPT, ...)")
    return Layout(best[0], best[1], tied_parameters(model))


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Parameters that share storage with another when the config ties them (lm_head -> embeddings)."""
    config = getattr(model, "config", None)
    tie = getattr(config, "tie_word_embeddings", False)
    if hasattr(config, "get_text_config"):
        tie = tie or getattr(config.get_text_config(), "tie_word_embeddings", False)
    if not tie:
        return {}
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, dict) and keys:
        return dict(keys)
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if out_emb is None or in_emb is None:
        return {}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def linear_modules(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Every nn.Linear (and transformers' Conv1D) by name, with its (out_features, in_features)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            out[name] = (module.out_features, module.in_features)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            raise LowbitError(f"{name} is a GPT-2 style Conv1D layer, which lowbit does not quantize yet")
    return out


def block_of(layout: Layout, name: str) -> int | None:
    """The decoder block index a module name belongs to, or None for modules outside the blocks."""
    prefix = layout.blocks_path + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters: a tied weight counts once, whether or not it is loaded yet."""
    tied = tied_parameters(model)
    seen, total = set(), 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name in tied:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def describe(model: nn.Module) -> dict:
    """A summary of the architecture for `lowbit inspect`."""
    layout = find_layout(model)
    config = model.config
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(config, "model_type", "?"),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_layers": len(layout.blocks),
        "blocks": layout.blocks_path,
        "vocab_size": getattr(config, "vocab_size", None),
        "tied_embeddings": bool(layout.tied),
        "parameters": parameter_count(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def position_limit(model: nn.Module) -> tuple[int | None, bool]:
    """(the most positions the model was built for, whether going beyond fails outright): the config's
    max_position_embeddings (n_positions for GPT-2-style configs); beyond it a model with a learned position
    table (an embedding other than the token embedding, e.g. OPT's) has no row to look up, while rotary or
    ALiBi models run but were not trained there."""
    config = getattr(model, "config", None)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    learned = any(isinstance(m, nn.Embedding) and m is not tokens for m in model.modules())
    return (int(limit) if isinstance(limit, int) else None), learned


def check_seq_len(seq_len: int, model: nn.Module, purpose: str) -> None:
    """Refuse a window longer than a learned position table; warn when it is beyond what the model was built for."""
    limit, learned = position_limit(model)
    if limit is None or seq_len <= limit:
        return
    if learned:
        raise LowbitError(f"--seq-len {seq_len} is longer than the {limit} positions this model's learned position "
                          f"table holds; use --seq-len {limit} or less")
    warn(f"--seq-len {seq_len} is beyond the model's {limit} positions (max_position_embeddings): {purpose} on "
         f"positions it was not trained for; use --seq-len {limit} or less unless the model really handles more")


def set_module_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace the parameter `name` (dotted path) with a tensor, as a frozen parameter."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)

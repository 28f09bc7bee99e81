"""Capturing a decoder block's inputs: run the model up to its first block and keep what that block receives
(hidden states and keyword arguments such as position embeddings and masks), minus any KV cache; and the
keyword arguments every later block receives, which differ between blocks of different attention types
(Gemma 2/3's sliding-window blocks get another mask and other rotary embeddings than their full-attention ones).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

# keyword arguments of a decoder block that carry a KV cache: dropped, so replays never append to a cache
CACHE_KWARGS = ("past_key_value", "past_key_values", "use_cache", "layer_past", "cache")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


def capture_block_inputs(model: nn.Module, block: nn.Module, batches,
                         place=lambda t: t.cpu()) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, block kwargs) for each batch of token ids, taken at `block`'s entry and put where
    `place` says (the engine's Placement.activations); the forward stops there, so only what runs before the
    block needs weights."""
    captured = []
    accepted = set(inspect.signature(block.forward).parameters)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS and (k in accepted or "kwargs" in accepted)}
        captured.append((place(hidden.detach()), kept))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def first_window(inputs):
    """The first calibration window alone (hidden states and batch-shaped kwargs cut to one row): enough for
    probes, 1/batch of their cost."""
    hidden, kwargs = inputs[0]
    return [(hidden[:1], select_rows(kwargs, [0], hidden.shape[0]))]


def select_rows(kwargs: dict, rows: list[int], batch: int) -> dict:
    """A block's keyword arguments for some windows (rows) of a batch of `batch`: every batch-shaped tensor cut
    to those rows (inside tuples too), anything shared by the batch as it is."""
    if batch <= 1 and rows == [0]:
        return kwargs
    index = None

    def cut(v):
        nonlocal index
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch and batch > 1:
            if index is None or index.device != v.device:
                index = torch.tensor(rows, device=v.device)
            return v.index_select(0, index)
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return {k: cut(v) for k, v in kwargs.items()}


class _Stub(nn.Module):
    """Stands in for decoder block `index` during a forward of the whole model and hands the call to `answer`.
    Attribute reads the model makes of the block (its attention type) reach the original."""

    def __init__(self, original: nn.Module, index: int, answer):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: the block's parameters stay its own
        object.__setattr__(self, "_answer", answer)
        self.index = index

    def forward(self, *args, **kwargs):
        return self._answer(self.index, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_original"), name)


def output_convention(block: nn.Module, window, meta: bool = False) -> int | None:
    """What a decoder block returns: 0 for a tensor, else its tuple's length (run once on a captured window).
    With meta, the block's weights are on the meta device and so are the inputs given to it: only shapes are
    computed, no memory; None when one of its ops cannot run there."""
    (hidden, kwargs), = window
    if meta:
        if any(p.device.type != "meta" for p in block.parameters()):
            return None
        hidden, kwargs = moved(hidden, "meta"), moved(kwargs, "meta")
    try:
        with torch.no_grad():
            out = block(hidden, **kwargs)
    except Exception:  # noqa: BLE001 - a meta run that fails only means: run it with weights
        if not meta:
            raise
        return None
    return len(out) if isinstance(out, tuple) else 0


def moved(value, device):
    """A captured block argument (a tensor, or tuples / dicts of them) moved to device; anything else as is."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


def capture_block_kwargs(model: nn.Module, blocks: nn.ModuleList, batches, returns: int) -> list[list[dict]] | None:
    """The keyword arguments each decoder block receives, per batch of token ids ([block][batch]; KV-cache
    arguments dropped), from one forward per batch with every block replaced by a stub that passes its hidden
    states on (shaped as the blocks return them: `returns`, output_convention). Needs only the weights before
    the blocks. None when the model does not call each block once, in order, on the previous one's output with
    keyword arguments only (then every block is given block 0's)."""
    originals = list(blocks)
    accepted = [set(inspect.signature(b.forward).parameters) for b in originals]
    per_block: list[list[dict]] = [[] for _ in originals]
    state = {"passed": None, "ok": True, "batch": 0}

    def answer(i, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if len(args) > 1 or (i > 0 and hidden is not state["passed"]) or len(per_block[i]) != state["batch"]:
            state["ok"] = False
        per_block[i].append({k: v for k, v in kwargs.items()
                             if k not in CACHE_KWARGS and (k in accepted[i] or "kwargs" in accepted[i])})
        if i + 1 == len(originals):
            raise StopForward
        state["passed"] = hidden
        return hidden if not returns else (hidden,) + (None,) * (returns - 1)

    for i, block in enumerate(originals):
        blocks._modules[str(i)] = _Stub(block, i, answer)
    try:
        with torch.no_grad():
            for k, batch in enumerate(batches):
                state["batch"] = k
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
    finally:
        for i, block in enumerate(originals):
            blocks._modules[str(i)] = block
    complete = all(len(kw) == len(batches) for kw in per_block)
    return per_block if state["ok"] and complete else None

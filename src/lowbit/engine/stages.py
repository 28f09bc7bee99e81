"""Stage discovery: a block's planned linears in execution order, grouped into stages of linears that read the
same input tensor (q/k/v, then o, then gate/up, then down for a Llama block), found by one probe forward on
the first calibration window; the same probe finds which submodules can be replayed (replay.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass
class Stages:
    groups: list[list[str]]  # planned linear names, one list per shared input, in execution order
    # whether the first stage reads what the block's first linear reads (its normalised input), or starts
    # later because the user excluded the linears before it
    first_at_entry: bool = True
    replay_of: dict[str, tuple] = field(default_factory=dict)  # stage linear -> (module to replay, tuple length)


def find_stages(block: nn.Module, prefix: str, linears: dict[str, nn.Module], probe: Callable[[list], None],
                width: int, allow_replay: bool) -> Stages:
    """The stages of `block`; `probe(hooks)` runs the block once on the first window with the given hook
    handles attached (and removes them)."""
    calls: list[tuple[str, object]] = []  # tensors kept alive, so identity comparisons hold
    outputs: dict[str, object] = {}
    first_linear_input: list = []  # of the block's first linear, planned or excluded
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0]))) for n, m in linears.items()]

    def first_linear(module, args):
        if not first_linear_input:
            first_linear_input.append(args[0])

    hooks += [m.register_forward_pre_hook(first_linear)
              for m in block.modules() if isinstance(m, nn.Linear) or m in linears.values()]

    def keep_first_output(name, out):  # returns None: a hook's return value would replace the output
        outputs.setdefault(name, out)

    hooks += [m.register_forward_hook(lambda m, a, out, n=prefix + rel: keep_first_output(n, out))
              for rel, m in block.named_modules() if rel]
    probe(hooks)
    groups = _group_by_input(calls)
    first_at_entry = bool(calls and first_linear_input) and calls[0][1] is first_linear_input[0]
    replay_of = find_replays(block, prefix, linears, groups, outputs, width) if allow_replay else {}
    return Stages(groups, first_at_entry, replay_of)


def _group_by_input(calls: list[tuple[str, object]]) -> list[list[str]]:
    groups: list[list[str]] = []
    last_input = None
    for name, tensor in calls:
        if any(name in g for g in groups):
            continue  # a linear called twice (shared weights): its first call decides
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    return groups


def find_replays(block: nn.Module, prefix: str, linears, stages, outputs, width: int) -> dict[str, tuple]:
    """For a stage of one linear L: the outermost submodule M whose whole result is L's output (Llama's
    self_attn for o_proj, its mlp for down_proj), so that once L is quantized, later passes over the
    block can replace M by L applied to L's cached inputs instead of recomputing M (attention, for
    o_proj). Accepted only when M holds no linear of a later stage, its other results are None, and L
    is no wider than the block's hidden states (the cache then costs at most one more copy of the
    block's activations). Returns {L: (M's name, M's tuple length or None)}."""
    found = {}
    for k, st in enumerate(stages):
        if len(st) != 1 or st[0] not in outputs:
            continue
        later = {n for s in stages[k + 1:] for n in s}
        best = _outermost_producer(block, prefix, st[0], outputs, later)
        if best is not None and linears[st[0]].in_features <= width:
            found[st[0]] = best
    return found


def _outermost_producer(block: nn.Module, prefix: str, linear: str, outputs: dict, later: set):
    out = outputs[linear]
    best = None
    for name, res in outputs.items():
        if name == linear or not name.startswith(prefix):
            continue
        first, length = (res[0], len(res)) if isinstance(res, tuple) else (res, None)
        if first is not out or (length and any(r is not None for r in res[1:])):
            continue
        inside = {prefix + r for r, _ in block.get_submodule(name[len(prefix):]).named_modules()}
        if (inside & later) or (best is not None and len(name) >= len(best[0])):
            continue
        best = (name[len(prefix):], length)
    return best

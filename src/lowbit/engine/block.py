"""One decoder block's calibrated work (a BlockRun lives for one block): its stages (stages.py), the
transforms' statistics pass and folds (step.py), the calibrated quantizer's passes (one pass, or stage by
stage for true-sequential calibration, replaying finished stages: replay.py), and the pass that turns the
block's inputs into the next block's, recording static activation ranges on the way."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..algorithms import InputStats
from ..arch.folding import divide_output, multiply_inputs
from ..errors import LowbitError
from ..hf.capture import StopForward, first_window, select_rows
from .replay import cached_input, replaying
from .stages import Stages, find_stages
from .step import InputGroup, scale_and_clip


@dataclass
class BlockRun:
    """The state of one block's calibration: which chunk is running, the replays in force, whether a pass
    already replaced the inputs by the block's outputs. `engine` is the runner.Engine it belongs to."""
    engine: object
    block: nn.Module
    prefix: str
    linears: dict[str, nn.Module]  # planned linears of the block, by full name
    inputs: list  # (hidden states, kwargs) per calibration chunk; replaced by the outputs once computed
    stages: Stages | None = None
    chunk: int = 0
    replays: dict[str, tuple] = field(default_factory=dict)  # module -> (its final linear, cached inputs, length)
    outputs_ready: bool = False
    # for a quantizer needing FLOAT_AND_QUANTIZED_INPUTS (GPTAQ): the float model's inputs of this block (held
    # chunks, the same windows as `inputs`), and a float copy of the block made before any stage is quantized
    float_inputs: list | None = None
    float_block: nn.Module | None = None
    float_advanced: bool = False  # float_inputs already hold the float block's outputs (the next block's)

    # -- passes over the block --------------------------------------------------------------------------
    def run_pass(self, hooks=(), keep_outputs: bool = False, before=None) -> None:
        """Run the block over every calibration chunk for its hooks' sake (a hook may stop the forward early by
        raising StopForward). With keep_outputs each chunk is replaced by the block's output, the next block's
        inputs, as soon as it exists (one copy of the activations held, not two). `before(k)` runs before chunk
        k's forward. `hooks` are removed after."""
        try:
            place = self.engine.placement
            with torch.no_grad(), replaying(self.block, self.replays, lambda: self.chunk):
                for k, (held, kwargs) in enumerate(self.inputs):
                    self.chunk = k
                    if before is not None:
                        before(k)
                    try:
                        out = self.block(place.fetch(held), **kwargs)
                    except StopForward:
                        continue
                    if keep_outputs:
                        self.inputs[k] = (place.replace(held, out[0] if isinstance(out, tuple) else out), kwargs)
                        self.outputs_ready = True
        finally:
            for h in hooks:
                h.remove()

    def probe_window(self) -> list:
        """The first calibration window alone, on the device (hf.capture.first_window)."""
        held, kwargs = self.inputs[0]
        return first_window([(self.engine.placement.fetch(held), kwargs)])

    def find_stages(self, allow_replay: bool) -> Stages:
        window = self.probe_window()

        def probe(hooks):
            try:
                with torch.no_grad():
                    for hidden, kwargs in window:
                        self.block(hidden, **kwargs)
            finally:
                for h in hooks:
                    h.remove()

        found = find_stages(self.block, self.prefix, self.linears, probe, self.inputs[0][0].shape[-1], allow_replay)
        # rank 0's, found on the first window of all: another rank's first window may route a MoE block's tokens
        # to other experts, and every rank must run the same stages (their statistics are summed stage by stage)
        self.stages = self.engine.placement.ranks.same(found)
        return self.stages

    # -- transforms (AWQ, SmoothQuant) ----------------------------------------------------------------
    def transform(self, folds: dict[tuple, object], keep_outputs: bool) -> dict[tuple, InputStats]:
        """Statistics of every stage's input in one pass of the float block, then each transform's scales folded
        into the block and its clipping factors (step.scale_and_clip). Returns the statistics of the transformed
        block's stage inputs."""
        e = self.engine
        groups = [tuple(st) for st in self.stages.groups]
        one_pass_quantizer = e.quantizer.needs_calibration and not e.stage_passes  # may take these stats
        gram = one_pass_quantizer or any(t.needs_gram for t in e.transforms)
        stats = {g: e.placement.new_stats(self.linears[g[0]].in_features, gram) for g in groups}
        hooks = [self.linears[g[0]].register_forward_pre_hook(lambda m, a, key=g: stats[key].add(a[0]))
                 for g in groups]
        self.run_pass(hooks, keep_outputs=keep_outputs)  # never with stage passes
        stats = e.placement.reduce(stats)
        scale_and_clip(e.transforms, [self._input_group(g, stats[g], folds[g]) for g in groups], e.notes, e.clips,
                       e.share)
        return stats

    def _input_group(self, names: tuple, stats: InputStats, fold) -> InputGroup:
        def apply(s: torch.Tensor) -> None:
            divide_output(self.block.get_submodule(fold.module), fold.rule, s)
            for n in names:
                multiply_inputs(self.linears[n], s)

        return InputGroup(names, [self.engine.plan[n].spec for n in names],
                          lambda: [self.linears[n].weight.detach() for n in names], stats,
                          apply if fold is not None else None)

    # -- calibrated quantizers (GPTQ) -------------------------------------------------------------------
    def observe(self, stages: list[list[str]], stop_at: str | None = None, cache: list | None = None) -> None:
        """Show the quantizer each stage's common input over every calibration chunk (hooked on the stage's
        first linear). With `stop_at` (a stage's first linear), each forward stops right there, since nothing
        later is needed yet, and the input is also appended to `cache` when one is given."""
        quantizer = self.engine.quantizer
        targets: dict[tuple, torch.Tensor] = {}  # the float model's input of each stage, for the current chunk

        def seen(names, x):
            if self.float_block is not None:
                # token for token only where both are the block's token grid: a MoE expert's input holds the
                # tokens routed to it, which differ between the float and the quantized model (then: None)
                t = targets.pop(names, None)  # None: the float model routed no token here
                aligned = t is not None and t.shape == x.shape and x.dim() >= 3
                quantizer.observe(names, x.reshape(-1, x.shape[-1]), t.reshape(-1, x.shape[-1]) if aligned else None)
            else:
                quantizer.observe(names, x.reshape(-1, x.shape[-1]))
            if names[0] == stop_at:
                if cache is not None:
                    cache.append(cached_input(x))
                raise StopForward

        hooks = [self.linears[st[0]].register_forward_pre_hook(lambda m, a, names=tuple(st): seen(names, a[0]))
                 for st in stages]
        before = self._float_stage_inputs(stages, targets) if self.float_block is not None else None
        self.run_pass(hooks, keep_outputs=self.engine.float_next and stop_at is None, before=before)
        self._combine_observed(stages)

    def _float_stage_inputs(self, stages: list[list[str]], targets: dict):
        """before(k) for run_pass: the float copy of the block run on chunk k of the float model's inputs, up to
        the last of these stages, keeping each stage's input in `targets`."""
        place, rel = self.engine.placement, len(self.prefix)
        last = tuple(stages[-1])

        def keep(names, x):
            targets[names] = x
            if names == last:
                raise StopForward

        def before(k: int) -> None:
            targets.clear()  # nothing of an earlier chunk
            hooks = [self.float_block.get_submodule(st[0][rel:]).register_forward_pre_hook(
                lambda m, a, names=tuple(st): keep(names, a[0])) for st in stages]
            try:
                self.float_block(place.fetch(self.float_inputs[k][0]), **self.inputs[k][1])
            except StopForward:
                pass
            finally:
                for h in hooks:
                    h.remove()

        return before

    def advance_float(self) -> None:
        """Replace the float model's inputs by the float block's outputs (the next block's), and drop the copy."""
        place = self.engine.placement
        with torch.no_grad():
            for k, (held, _) in enumerate(self.float_inputs):
                out = self.float_block(place.fetch(held), **self.inputs[k][1])
                self.float_inputs[k] = (place.replace(held, out[0] if isinstance(out, tuple) else out), None)
        self.float_block = None
        self.float_advanced = True

    # -- a quantizer optimising the block's output (AutoRound) ------------------------------------------
    def optimise(self) -> None:
        """BLOCK_FORWARD: the quantizer learns the rounding of every linear of the block from the block's output
        error (BlockProblem), against the float block's output on the float model's inputs."""
        e = self.engine
        # the inputs learned on: the block's inputs in the quantized model, with every upstream block quantized
        # (the alternative, the previous block quantized applied to its float inputs, carrying one block's error
        # instead of every upstream block's, measured worse: docs/BENCHMARKS.md)
        train = self.inputs
        self.advance_float()  # the targets: the float block's outputs, which are also the next block's float inputs
        names = [n for n in self.linears if n not in e.quantized]
        problem = BlockProblem(names, {n: self.linears[n].weight.detach() for n in names},
                               {n: e.plan[n].spec for n in names}, {n: e.clips[n] for n in names if n in e.clips},
                               [(k, r) for k, (held, _) in enumerate(train) for r in range(held.shape[0])],
                               self._window_loss(names, train),
                               e.placement.ranks.sum_ if e.placement.ranks.distributed else None)
        frozen = [(p, p.requires_grad) for p in self.block.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)  # gradients for the learned rounding only
        try:
            qts = e.quantizer.optimise_block(problem)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
        for name, qt in zip(names, qts):
            e._record(name, self.linears[name], qt)

    def _window_loss(self, names: list[str], inputs: list):
        """loss(weights, windows): the mean squared error of the block's output with these weights (by linear
        name) in place of its own, on these (chunk, row) calibration windows, against the float block's output."""
        place, rel = self.engine.placement, {n: n[len(self.prefix):] + ".weight" for n in names}

        def loss(weights: dict, windows: list[tuple[int, int]]) -> torch.Tensor:
            by_chunk: dict[int, list[int]] = {}
            for k, r in windows:
                by_chunk.setdefault(k, []).append(r)
            params = {rel[n]: w.to(self.linears[n].weight.dtype) for n, w in weights.items()}
            total = 0.0
            for k, rows in by_chunk.items():
                held, kwargs = inputs[k]
                x = place.fetch(held)
                index = torch.tensor(rows, device=x.device)
                out = torch.func.functional_call(self.block, params, (x.index_select(0, index),),
                                                 select_rows(kwargs, rows, x.shape[0]))
                out = out[0] if isinstance(out, tuple) else out
                target = place.fetch(self.float_inputs[k][0]).index_select(0, index)
                total = total + (out.float() - target.float()).pow(2).mean() * len(rows)
            return total / len(windows)

        return loss

    def _combine_observed(self, stages: list[list[str]]) -> None:
        """With several processes, the quantizer's statistics of these stages summed over every process's share
        of the windows. A process that saw no token of a stage (a rarely routed expert) shows the quantizer an
        empty chunk first, so every process holds the same statistics to sum."""
        place, quantizer = self.engine.placement, self.engine.quantizer
        if not place.ranks.distributed:
            return
        held = quantizer.statistics()
        for st in stages:
            if tuple(st) not in held:
                quantizer.observe(tuple(st), torch.empty(0, self.linears[st[0]].in_features))
        place.reduce({tuple(st): held[tuple(st)] for st in stages if tuple(st) in held})

    def calibrate_and_quantize(self, stats_by_stage=None) -> None:
        """Calibrated quantization of the block: one pass for all stages (the default), or none when the
        quantizer can use the statistics a transform already gathered (`stats_by_stage`); true-sequential:
        stage by stage, each stage's inputs computed with the earlier stages already quantized.
        A stage whose module can be replayed keeps its inputs, and later passes replay its module from them."""
        e, groups = self.engine, self.stages.groups
        if stats_by_stage and all(e.quantizer.take_stats(tuple(st), stats_by_stage[tuple(st)]) for st in groups):
            e.quantize_stages(groups, self.linears)  # one pass of the transforms' statistics serves the quantizer too
            return
        if not e.stage_passes:
            self.observe(groups)
            e.quantize_stages(groups, self.linears)
            return
        for stage in groups:
            target = self.stages.replay_of.get(stage[0])
            cache = [] if target else None
            self.observe([stage], stop_at=stage[0], cache=cache)
            e.quantize_stages([stage], self.linears)
            if target and len(cache) == len(self.inputs):
                self.replays[target[0]] = (self.linears[stage[0]], cache, target[1])

    # -- the block's outputs and activation ranges -----------------------------------------------------
    def advance(self, input_specs: dict, output_specs: dict) -> tuple[dict, dict]:
        """Replace the inputs by the block's outputs with its quantized weights, recording the input range of
        each linear with static input quantization and the output range of each K / V projection under a
        KV-cache dtype. Returns (input ranges, output ranges) by linear name."""
        ranges: dict[str, list[float]] = {}
        out_ranges: dict[str, list[float]] = {}

        def record(table, name, x):
            lo, hi = x.min().item(), x.max().item()
            r = table.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: record(ranges, n, a[0]))
                 for n, m in self.linears.items() if n in input_specs]
        hooks += [m.register_forward_hook(lambda m, a, out, n=n: record(out_ranges, n, out))
                  for n, m in self.linears.items() if n in output_specs]
        self.run_pass(hooks, keep_outputs=True)
        place = self.engine.placement
        return place.reduce_ranges(ranges, input_specs), place.reduce_ranges(out_ranges, output_specs)


@dataclass
class BlockProblem:
    """What a quantizer optimising a block's output (BLOCK_FORWARD) works on: the block's linears to quantize
    (names, their float weights, specs and any clipping factors a transform chose), the calibration windows as
    (chunk, row) pairs, loss(weights by name, windows) -> a differentiable scalar, and `sync` (sum tensors over
    the processes sharing the windows, in place; None with one process)."""
    names: list[str]
    weights: dict[str, torch.Tensor]
    specs: dict
    clips: dict[str, torch.Tensor]
    windows: list[tuple[int, int]]
    loss: object
    sync: object = None


def refuse_unfoldable(transforms, prefix: str, first_stage: tuple) -> None:
    """A block whose first stage (its normalised input) has nowhere to fold scales is refused before any
    statistics are gathered."""
    names = ", ".join(prefix + n for n in first_stage)
    raise LowbitError(f"{', '.join(t.name for t in transforms)} cannot scale {names}: no norm or "
                      f"linear produces their input in a way scales can be folded into (a post-norm "
                      f"or unusual block); use --algo rtn or gptq for this model")

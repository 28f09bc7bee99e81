"""The block-by-block runner.

A rotation, when the chain starts with one, is set up first (hf.rotate) and then applied to every tensor as
it is loaded. For each decoder block: load its weights from disk, let the transforms (AWQ, SmoothQuant) see the statistics
of every linear's input and fold their scales into the block, let a calibrated quantizer (GPTQ) see its
inputs, quantize the block's linears, re-run the quantized block to produce the next block's inputs (and
calibrate static activation ranges), hand the results to the writer, and drop the block from memory. The
inputs of block 0 are captured once from the calibration windows. A chain that needs no calibration (RTN,
weight-only) runs no forward pass at all.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .algorithms import Algorithm, InputStats, Quantizer
from .algorithms.stats import MIN_CALIBRATION_TOKENS
from .arch import block_of, set_module_tensor
from .arch.folding import Fold, divide_output, find_folds, multiply_inputs
from .errors import LowbitError
from .formats import Quantized, activation_qparams
from .hf.actquant import attach_input_quant, attach_output_quant
from .hf.capture import StopForward, capture_block_inputs, first_window
from .hf.model import LoadedModel
from .memory import return_freed_memory_to_os, use_mmap_for_large_tensors
from .recipe import LayerPlan, has_static_inputs
from .results import LayerReport, Sink

PROPAGATE = ("quantized", "float")


@dataclass
class EngineReport:
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    rotation: dict | None = None  # what the rotation did (hf.rotate.Rotator.summary)


class Engine:
    """Runs an algorithm chain over a lazily loaded model, one decoder block at a time."""

    def __init__(self, loaded: LoadedModel, plan: dict[str, LayerPlan], chain: list[Algorithm],
                 calibration: torch.Tensor | None = None, sink: Sink | None = None,
                 keep_in_memory: bool = False, batch_size: int = 8, progress: bool = True,
                 propagate: str = "float", replay: bool = True):
        self.loaded, self.plan, self.chain = loaded, plan, chain
        self.quantizer: Quantizer = chain[-1]
        self.rotation = chain[0] if chain[0].role == "rotation" else None
        self.transforms = [a for a in chain[:-1] if a.role == "transform"]
        self.rotator = None  # hf.rotate.Rotator, once run() starts
        self.static_inputs = has_static_inputs(plan)
        self.needs_calibration = any(a.needs_calibration for a in chain) or self.static_inputs
        if self.needs_calibration and calibration is None:
            raise ValueError("this chain needs calibration windows")
        self.calibration = calibration
        self.sink = sink or Sink()
        self.keep = keep_in_memory
        self.batch_size = batch_size
        if propagate not in PROPAGATE:
            raise LowbitError(f"unknown propagation {propagate!r}; use one of {', '.join(PROPAGATE)}")
        # "float": the next block's inputs are this block's outputs before quantization, taken from the
        # statistics pass (AutoAWQ's way: one forward per block); "quantized": from an extra pass with the
        # quantized block (GPTQ's way: later blocks see upstream quantization error). Static activation
        # ranges need the quantized pass, and so does true-sequential calibration (its passes stop early).
        # whether the quantizer calibrates stage by stage (true-sequential GPTQ) rather than on one pass
        self.stage_passes = self.quantizer.needs_calibration and getattr(self.quantizer, "true_sequential", True)
        self.float_next = propagate == "float" and not self.static_inputs and not self.stage_passes
        self.progress = progress
        self.report = EngineReport()
        self.quantized: set[str] = set()  # linears already quantized
        self.clips: dict[str, torch.Tensor] = {}  # clipping factors chosen by a transform, per linear
        self.notes: dict[str, str] = {}  # per-linear remarks for the summary
        self._folds: dict[tuple, dict] = {}  # fold map per block structure (block-relative stage names)
        self._outputs_ready = False  # whether a pass already replaced the block's inputs by its outputs
        self._ranges: dict[str, list[float]] = {}  # calibrated input range per linear (static activations)
        self._out_ranges: dict[str, list[float]] = {}  # calibrated output range per K / V projection (KV cache)
        # whether finished stages may be replayed from cached inputs (see _find_replays); not under an online
        # rotation, whose hook would rotate a cached (already rotated) input again
        self.replay = replay and not (self.rotation is not None and self.rotation.r4)
        self._replay_of: dict[str, tuple] = {}  # this block's stage linear -> (module to replay, tuple length)
        self._replays: dict[str, tuple] = {}  # module -> (its final linear, that linear's inputs per chunk, length)
        self._chunk = 0  # the calibration chunk being run
        self._first_stage_at_entry = True  # see _stages

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> EngineReport:
        use_mmap_for_large_tensors()
        layout = self.loaded.layout
        blocks = layout.blocks
        if self.rotation is not None:
            self._prepare_rotation()
        inputs = self._capture_block0_inputs() if self.needs_calibration else None
        bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        for i in bar:
            start, first_layer = time.perf_counter(), len(self.report.layers)
            prefix = layout.block_prefix(i)
            self.loaded.materialize(prefix)
            block = blocks[i]
            linears = self._planned(block, prefix)
            calibrated = self.transforms or self.quantizer.needs_calibration
            self._replay_of, self._replays = {}, {}
            stages = self._stages(block, prefix, linears, inputs) if calibrated and linears and inputs is not None else []
            self._outputs_ready = False
            stats = self._transform(block, prefix, linears, stages, inputs) if self.transforms and stages else None
            if self.quantizer.needs_calibration and stages:
                self._calibrate_and_quantize(block, linears, stages, inputs, stats)
            self._quantize_modules(block, prefix)  # whatever calibration did not reach
            if inputs is not None and not self._outputs_ready and (i + 1 < len(blocks) or self.static_inputs):
                inputs = self._run_block(block, inputs, self._input_range_hooks(linears))
            self._replays = {}  # the cached stage inputs are no longer needed
            self._attach_input_quant(linears)
            self._emit_params(block, prefix)
            if not self.keep:
                self.loaded.release(prefix)
                return_freed_memory_to_os()
            self.report.block_seconds.append(time.perf_counter() - start)
            errors = [r.relative_error for r in self.report.layers[first_layer:]]
            bar.set_postfix(block_s=f"{self.report.block_seconds[-1]:.2f}",
                            weight_err=f"{sum(errors) / max(len(errors), 1):.4f}")
        bar.close()
        self._finish_outside_blocks()
        if self.rotator is not None:
            self.report.rotation = self.rotator.summary()  # the largest block error over all blocks
        return self.report

    def online_rotations(self) -> dict:
        """The linears whose input the rotation multiplies at run time (R4), for the output's config."""
        return self.rotator.online if self.rotator is not None else {}

    def _prepare_rotation(self) -> None:
        """Rotate the model as it loads (hf.rotate): roles found and block 0 checked before any other work."""
        from .hf.rotate import Rotator

        if self.calibration is not None:
            probe = self.calibration[:1]
        else:  # any tokens serve to find the roles and check the function
            vocab = self.loaded.model.get_input_embeddings().weight.shape[0]
            probe = (torch.arange(1, 17) * 7919 % vocab)[None, :]
        self.rotator = Rotator(self.loaded, self.rotation, probe)
        self.report.rotation = self.rotator.prepare()

    # -- calibration --------------------------------------------------------------------------------
    def _capture_block0_inputs(self) -> list[tuple[torch.Tensor, dict]]:
        """Run the model up to block 0 on each calibration batch and keep block 0's inputs (CPU)."""
        start = time.perf_counter()
        layout, model = self.loaded.layout, self.loaded.model
        # what runs before block 0: embeddings (and norms); not lm_head, which is read at the end
        outside = [n for n, _ in model.named_parameters() if block_of(layout, n) is None
                   and n.rpartition(".")[0] not in self.plan]
        for name in outside:
            self.loaded.materialize(name)
        captured = capture_block_inputs(model, layout.blocks[0], self.calibration.split(self.batch_size))
        if not self.keep:
            for name in outside:
                self.loaded.release(name)
        self.report.capture_seconds = time.perf_counter() - start
        return captured

    def _run_block(self, block: nn.Module, inputs, hooks=()):
        """The block's outputs for every calibration chunk, the next block's inputs. Each chunk is replaced in
        the list as soon as its output exists, so one copy of the activations is held, not two. `hooks`
        (handles) are removed afterwards."""
        try:
            with torch.no_grad(), self._replaying(block):
                for k, (hidden, kwargs) in enumerate(inputs):
                    self._chunk = k
                    out = block(hidden, **kwargs)
                    inputs[k] = (out[0] if isinstance(out, tuple) else out, kwargs)
        finally:
            for h in hooks:
                h.remove()
        return inputs

    def _planned(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        return {prefix + rel: m for rel, m in block.named_modules()
                if prefix + rel in self.plan and self.plan[prefix + rel].spec is not None}

    def _stages(self, block: nn.Module, prefix: str, linears: dict[str, nn.Module], first_chunk) -> list[list[str]]:
        """The block's planned linears in execution order, grouped into stages of linears that read the same
        input tensor (q/k/v, then o, then gate/up, then down for a Llama block): found by one probe forward,
        which also finds the modules that can be replayed (see _find_replays)."""
        calls: list[tuple[str, torch.Tensor]] = []  # tensors kept alive, so identity comparisons hold
        outputs: dict[str, object] = {}
        first_linear_input: list[torch.Tensor] = []  # of the block's first linear, planned or excluded
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
                 for n, m in linears.items()]

        def first_linear(module, args):
            if not first_linear_input:
                first_linear_input.append(args[0])

        hooks += [m.register_forward_pre_hook(first_linear)
                  for m in block.modules() if isinstance(m, nn.Linear) or m in linears.values()]

        def keep_first_output(name, out):  # returns None: a hook's return value would replace the output
            outputs.setdefault(name, out)

        hooks += [m.register_forward_hook(lambda m, a, out, n=prefix + rel: keep_first_output(n, out))
                  for rel, m in block.named_modules() if rel]
        self._run_block(block, first_window(first_chunk), hooks)
        stages: list[list[str]] = []
        last_input = None
        for name, tensor in calls:
            if any(name in st for st in stages):
                continue  # a linear called twice (shared weights): its first call decides
            if stages and tensor is last_input:
                stages[-1].append(name)
            else:
                stages.append([name])
            last_input = tensor
        # whether the first stage reads what the block's first linear reads (its normalised input), or
        # starts later because the user excluded the linears before it
        self._first_stage_at_entry = bool(calls and first_linear_input) and calls[0][1] is first_linear_input[0]
        self._replay_of = self._find_replays(block, prefix, linears, stages, outputs,
                                                 first_chunk[0][0].shape[-1])
        return stages

    def _find_replays(self, block: nn.Module, prefix: str, linears, stages, outputs, width: int) -> dict[str, tuple]:
        """For a stage of one linear L: the outermost submodule M whose whole result is L's output (Llama's
        self_attn for o_proj, its mlp for down_proj), so that once L is quantized, later passes over the
        block can replace M by L applied to L's cached inputs instead of recomputing M (attention, for
        o_proj). Accepted only when M holds no linear of a later stage, its other results are None, and L
        is no wider than the block's hidden states (the cache then costs at most one more copy of the
        block's activations). Returns {L: (M's name, M's tuple length or None)}."""
        if self.static_inputs or not self.replay:
            return {}  # static activation ranges are recorded in the output pass, which must call every linear
        found = {}
        for k, st in enumerate(stages):
            if len(st) != 1 or st[0] not in outputs:
                continue
            out = outputs[st[0]]
            later = {n for s in stages[k + 1:] for n in s}
            best = None
            for name, res in outputs.items():
                if name == st[0] or not name.startswith(prefix):
                    continue
                first, length = (res[0], len(res)) if isinstance(res, tuple) else (res, None)
                if first is not out or (length and any(r is not None for r in res[1:])):
                    continue
                inside = {prefix + r for r, _ in block.get_submodule(name[len(prefix):]).named_modules()}
                if (inside & later) or (best is not None and len(name) >= len(best[0])):
                    continue
                best = (name[len(prefix):], length)
            if best is not None and linears[st[0]].in_features <= width:
                found[st[0]] = best
        return found

    def _observe(self, block: nn.Module, stages: list[list[str]], linears: dict[str, nn.Module], inputs,
                 stop_at: str | None = None, cache: list | None = None) -> None:
        """Show the quantizer each stage's common input over every calibration chunk (hooked on the stage's
        first linear). With `stop_at` (a stage's first linear), each forward stops right there, since nothing
        later is needed yet, and the input is also appended to `cache` when one is given."""
        def seen(m, args, names):
            x = args[0]
            self.quantizer.observe(names, x.reshape(-1, x.shape[-1]))
            if names[0] == stop_at:
                if cache is not None:
                    cache.append(x if x._base is None else x.clone())
                raise StopForward

        hooks = [linears[st[0]].register_forward_pre_hook(lambda m, a, names=tuple(st): seen(m, a, names))
                 for st in stages]
        self._observe_pass(block, inputs, hooks, keep_outputs=self.float_next and stop_at is None)

    def _calibrate_and_quantize(self, block: nn.Module, linears, stages, inputs, stats_by_stage=None) -> None:
        """Calibrated quantization of a block: one pass for all stages (the default), or none when the
        quantizer can use the statistics a transform already gathered (`stats_by_stage`); true-sequential:
        stage by stage, each stage's inputs computed with the earlier stages already quantized.
        A stage whose module can be replayed keeps its inputs, and later passes replay its module from them."""
        if stats_by_stage and all(self.quantizer.take_stats(tuple(st), stats_by_stage[tuple(st)]) for st in stages):
            for stage in stages:  # one pass of the transforms' statistics serves the quantizer too
                self._quantize_stage(stage, linears)
            return
        if not self.stage_passes:
            self._observe(block, stages, linears, inputs)
            for stage in stages:
                self._quantize_stage(stage, linears)
            return
        for stage in stages:
            target = self._replay_of.get(stage[0])
            cache = [] if target else None
            self._observe(block, [stage], linears, inputs, stop_at=stage[0], cache=cache)
            self._quantize_stage(stage, linears)
            if target and len(cache) == len(inputs):
                self._replays[target[0]] = (linears[stage[0]], cache, target[1])

    @contextmanager
    def _replaying(self, block: nn.Module):
        """While active, each module with a replay returns its final linear applied to that linear's cached
        input of the current chunk (self._chunk) instead of running its own forward."""
        patched = []
        for name, (linear, cache, length) in self._replays.items():
            module = block.get_submodule(name)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = self._replay(linear, cache, length)
        try:
            yield
        finally:
            for module, original in patched:
                if original is None:
                    del module.forward
                else:
                    module.forward = original

    def _replay(self, linear: nn.Module, cache: list, length: int | None):
        """A replayed module's forward: the linear on its cached input of the current chunk, whatever arguments
        (and argument names, which change between transformers releases) the caller passes."""
        def forward(*args, **kwargs):
            y = linear(cache[self._chunk])
            return y if length is None else (y,) + (None,) * (length - 1)

        return forward

    # -- transforms (AWQ, SmoothQuant) ---------------------------------------------------------------
    def _fold_map(self, block: nn.Module, prefix: str, stages, inputs) -> dict[tuple, Fold | None]:
        """Where each stage's scales fold, found on the first block of each structure and reused; refused
        before any statistics are gathered when the first stage of a block (its normalised input) has none."""
        rel = [tuple(n[len(prefix):] for n in st) for st in stages]
        key = tuple(rel)
        if key not in self._folds:
            probe = first_window(inputs)

            def run():
                out = block(probe[0][0], **probe[0][1])
                return out[0] if isinstance(out, tuple) else out

            self._folds[key] = find_folds(block, rel, run)
            if self._folds[key][rel[0]] is None and self._first_stage_at_entry:
                names = ", ".join(prefix + n for n in rel[0])
                raise LowbitError(f"{', '.join(t.name for t in self.transforms)} cannot scale {names}: no norm or "
                                  f"linear produces their input in a way scales can be folded into (a post-norm "
                                  f"or unusual block); use --algo rtn or gptq for this model")
        return {st: self._folds[key][r] for st, r in zip(map(tuple, stages), rel)}

    def _transform(self, block: nn.Module, prefix: str, linears, stages, inputs) -> dict[tuple, InputStats]:
        """Statistics of every stage's input in one pass of the float block, then each transform's scales
        folded into the block (statistics divided alike, so no second pass), then its clipping factors.
        Returns the statistics of the transformed block's stage inputs."""
        folds = self._fold_map(block, prefix, stages, inputs)
        one_pass_quantizer = self.quantizer.needs_calibration and not self.stage_passes  # may take these stats
        gram = one_pass_quantizer or any(t.needs_gram for t in self.transforms)
        stats = {tuple(st): InputStats(linears[st[0]].in_features, gram=gram) for st in stages}
        hooks = [linears[st[0]].register_forward_pre_hook(lambda m, a, key=tuple(st): stats[key].add(a[0]))
                 for st in stages]
        self._observe_pass(block, inputs, hooks, keep_outputs=self.float_next)  # never with stage passes
        for t in self.transforms:
            for st in map(tuple, stages):
                fold = folds[st]
                if fold is None or stats[st].count < MIN_CALIBRATION_TOKENS:
                    why = "no op to fold scales into" if fold is None else f"only {stats[st].count} calibration tokens"
                    for n in st:
                        self.notes[n] = f"{t.name}: {why}, not scaled"
                    continue
                s = t.channel_scales(st, [linears[n].weight.detach() for n in st], [self.plan[n].spec for n in st],
                                     stats[st])
                if s is None:
                    continue
                divide_output(block.get_submodule(fold.module), fold.rule, s)
                for n in st:
                    multiply_inputs(linears[n], s)
                stats[st].divide_channels(s)
            for st in map(tuple, stages):
                if stats[st].count < MIN_CALIBRATION_TOKENS:
                    continue
                clips = t.clip_ratios(st, [linears[n].weight.detach() for n in st], [self.plan[n].spec for n in st],
                                      stats[st])
                self.clips.update({n: c for n, c in zip(st, clips) if c is not None})
            for n, note in getattr(t, "notes", {}).items():
                self.notes.setdefault(n, note)
        return stats

    def _observe_pass(self, block: nn.Module, inputs, hooks, keep_outputs: bool = False) -> None:
        """Run the block over every calibration chunk for its hooks' sake (a hook may stop the forward early
        by raising StopForward). With keep_outputs each chunk is replaced by the block's output, the next
        block's inputs under float propagation."""
        try:
            with torch.no_grad(), self._replaying(block):
                for k, (hidden, kwargs) in enumerate(inputs):
                    self._chunk = k
                    try:
                        out = block(hidden, **kwargs)
                    except StopForward:
                        continue
                    if keep_outputs:
                        inputs[k] = (out[0] if isinstance(out, tuple) else out, kwargs)
                        self._outputs_ready = True
        finally:
            for h in hooks:
                h.remove()

    # -- activation quantization ----------------------------------------------------------------------
    def _input_range_hooks(self, linears: dict[str, nn.Module]) -> list:
        """Hooks recording the input range of each linear with static input quantization, and the output range
        of each K / V projection under a KV-cache dtype (in the pass that computes the block's outputs with
        its quantized weights)."""
        self._ranges, self._out_ranges = {}, {}

        def record(ranges, name, x):
            lo, hi = x.min().item(), x.max().item()
            r = ranges.setdefault(name, [lo, hi])
            r[0], r[1] = min(r[0], lo), max(r[1], hi)

        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: record(self._ranges, n, a[0]))
                 for n, m in linears.items()
                 if self.plan[n].input_spec is not None and not self.plan[n].input_spec.dynamic]
        return hooks + [m.register_forward_hook(lambda m, a, out, n=n: record(self._out_ranges, n, out))
                        for n, m in linears.items() if self.plan[n].output_spec is not None]

    def _attach_input_quant(self, linears: dict[str, nn.Module]) -> None:
        """Fake-quantize the inputs of the block's linears from now on and tell the sink."""
        for name, module in linears.items():
            spec = self.plan[name].input_spec
            if spec is None:
                continue
            params = None
            if not spec.dynamic:
                lo, hi = self._ranges.get(name, (0.0, 0.0))
                params = activation_qparams(lo, hi, spec)
            attach_input_quant(module, spec, params)
            self.sink.add_input_quant(name, spec, params)
        for name, module in linears.items():
            spec = self.plan[name].output_spec
            if spec is not None:
                params = activation_qparams(*self._out_ranges.get(name, (0.0, 0.0)), spec)
                attach_output_quant(module, spec, params)
                self.sink.add_output_quant(name, spec, params)

    # -- quantization and output --------------------------------------------------------------------
    def _quantize_stage(self, names: list[str], linears: dict[str, nn.Module]) -> None:
        weights = [linears[n].weight.detach() for n in names]
        qts = self.quantizer.quantize_group(tuple(names), weights, [self.plan[n].spec for n in names],
                                            [self.clips.get(n) for n in names])
        for name, qt in zip(names, qts):
            self._record(name, linears[name], qt)

    def _quantize_linear(self, name: str, module: nn.Linear) -> None:
        self._record(name, module, self.quantizer.quantize(name, module.weight.detach(), self.plan[name].spec,
                                                           self.clips.get(name)))

    def _record(self, name: str, module: nn.Linear, qt: Quantized) -> None:
        """Put a quantized weight into the model (fake-quant), report its error and send it to the sink."""
        lp = self.plan[name]
        weight = module.weight.detach()
        dequant = qt.dequantize(torch.float32)
        err = (torch.linalg.vector_norm(dequant - weight.float()) /
               torch.linalg.vector_norm(weight.float()).clamp_min(1e-30)).item()
        note = "; ".join(x for x in (self.notes.get(name, ""), getattr(self.quantizer, "notes", {}).get(name, "")) if x)
        self.report.layers.append(LayerReport(name, lp.spec.short_name, err, note))
        self.quantized.add(name)
        set_module_tensor(self.loaded.model, f"{name}.weight", dequant.to(weight.dtype))
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        self.sink.add_quantized(name, qt, bias)

    def _quantize_modules(self, root: nn.Module, prefix: str) -> None:
        for name, module in self._planned(root, prefix).items():
            if name not in self.quantized:
                self._quantize_linear(name, module)

    def _quantized_param_names(self) -> set[str]:
        names = set()
        for name, lp in self.plan.items():
            if lp.spec is not None:
                names.update({f"{name}.weight", f"{name}.bias"})
        return names

    def _emit_params(self, root: nn.Module, prefix: str) -> None:
        skip = self._quantized_param_names()
        for rel, param in root.named_parameters():
            name = prefix + rel
            if name not in skip:
                self.sink.add_tensor(name, param.detach())

    def _finish_outside_blocks(self) -> None:
        """Quantize and emit what lies outside the decoder blocks: embeddings, final norm, lm_head."""
        loaded, layout, model = self.loaded, self.loaded.layout, self.loaded.model
        outside = [(n, m) for n, m in model.named_modules() if n in self.plan and block_of(layout, n) is None]
        for name, module in outside:
            loaded.materialize(f"{name}.")
            if self.plan[name].spec is not None:
                self._quantize_linear(name, module)
        skip = self._quantized_param_names()
        seen = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if block_of(layout, name) is not None or name in skip:
                continue
            if name in layout.tied and self.plan.get(name.rpartition(".")[0]) is not None \
                    and self.plan[name.rpartition(".")[0]].spec is None:
                continue  # a tied weight that stays tied is written once, under its source name
            if param.device.type == "meta":
                loaded.materialize(name)
                param = model.get_parameter(name)
            if name not in seen:
                seen.add(name)
                self.sink.add_tensor(name, param.detach())
            if not self.keep:
                loaded.release(name)
        if self.keep:
            loaded.materialize("")  # tied weights that stayed tied share their source again

"""The block runner: the loop over decoder blocks, with what lies before and after it.

A rotation, when the chain starts with one, is set up first (hf.rotate) and then applied to every tensor as
it is loaded. For each decoder block: load its weights from disk, find its stages, let the transforms (AWQ,
SmoothQuant) see the statistics of every linear's input and fold their scales into the block, let a
calibrated quantizer (GPTQ) see its inputs, quantize the block's linears, re-run the quantized block to
produce the next block's inputs (and calibrate static activation ranges), hand the results to the sink, and
drop the block from memory (block.py holds one block's calibration). The inputs of block 0 are captured once
from the calibration windows. A chain that needs no calibration (RTN, weight-only) runs no forward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from ..algorithms import (BLOCK_FORWARD, FLOAT_AND_QUANTIZED_INPUTS, GLOBAL_TRANSFORM, INPUT_STATS, Algorithm,
                          Quantizer, Transform)
from ..arch import block_of, set_module_tensor
from ..arch.folding import Fold, find_folds
from ..errors import LowbitError
from ..formats import Quantized, activation_qparams
from ..hf.actquant import attach_input_quant, attach_output_quant
from ..hf.capture import capture_block_inputs, capture_block_kwargs, first_window, moved, output_convention
from ..hf.model import LoadedModel
from ..memory import peak_rss_bytes, return_freed_memory_to_os, use_mmap_for_large_tensors
from ..recipe import LayerPlan, has_static_inputs
from ..results import LayerReport, Sink
from .block import BlockRun, refuse_unfoldable
from .placement import HostSink, Placement
from .resume import Checkpoint
from .step import layer_report

PROPAGATE = ("quantized", "float")


@dataclass
class EngineReport:
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    rotation: dict | None = None  # what the rotation did (hf.rotate.Rotator.summary)
    ranks: dict | None = None  # with several processes: each one's peak memory and collective payload


class Engine:
    """Runs an algorithm chain over a lazily loaded model, one decoder block at a time."""

    def __init__(self, loaded: LoadedModel, plan: dict[str, LayerPlan], chain: list[Algorithm],
                 calibration: torch.Tensor | None = None, sink: Sink | None = None,
                 keep_in_memory: bool = False, batch_size: int = 8, progress: bool = True,
                 propagate: str = "float", replay: bool = True, placement: Placement | None = None,
                 checkpoint: Checkpoint | None = None):
        self.loaded, self.plan, self.chain = loaded, plan, chain
        check_needs(chain)
        self.quantizer: Quantizer = chain[-1]
        self.rotation = chain[0] if chain[0].role == "rotation" else None
        self.transforms = [a for a in chain[:-1] if a.role == "transform"]
        self.rotator = None  # hf.rotate.Rotator, once run() starts
        self.static_inputs = has_static_inputs(plan)
        self.needs_calibration = any(a.needs_calibration for a in chain) or self.static_inputs
        if self.needs_calibration and calibration is None:
            raise ValueError("this chain needs calibration windows")
        self.calibration = calibration
        self.placement = placement or Placement()
        self.ranks = self.placement.ranks  # the processes sharing this run (parallel.py); rank 0 writes
        loaded.device = self.placement.device  # every weight materialized there, in the skeleton's dtype
        self.sink = sink or Sink()
        if not self.placement.on_host:
            self.sink = HostSink(self.sink)  # results leave the device here
        self.keep = keep_in_memory
        self.batch_size = batch_size
        self.checkpoint = checkpoint  # resume.Checkpoint: saved after every block, continued from when present
        self.resumed_at = 0  # the first block this run quantized (> 0 when it continued an interrupted run)
        # the keyword arguments each block receives, per calibration batch (masks and rotary embeddings differ
        # between attention types); None: every block gets block 0's
        self.block_kwargs: list[list[dict]] | None = None
        # a quantizer that needs each linear's input in the float model too (GPTAQ): the float model's
        # activations, propagated block by block beside the quantized ones (twice the activation memory)
        self.paired = FLOAT_AND_QUANTIZED_INPUTS in self.quantizer.needs
        self.float_inputs: list | None = None
        if propagate not in PROPAGATE:
            raise LowbitError(f"unknown propagation {propagate!r}; use one of {', '.join(PROPAGATE)}")
        # "float": the next block's inputs are this block's outputs before quantization, taken from the
        # statistics pass (AutoAWQ's way: one forward per block); "quantized": from an extra pass with the
        # quantized block (GPTQ's way: later blocks see upstream quantization error). Static activation
        # ranges need the quantized pass, and so does true-sequential calibration (its passes stop early).
        self.stage_passes = self.quantizer.needs_calibration and self.quantizer.calibrates_stage_by_stage
        self.float_next = propagate == "float" and not self.static_inputs and not self.stage_passes \
            and not self.paired  # with both streams, the quantized stream is the quantized model's
        self.progress = progress
        self.report = EngineReport()
        self.quantized: set[str] = set()  # linears already quantized
        self.clips: dict[str, torch.Tensor] = {}  # clipping factors chosen by a transform, per linear
        self.notes: dict[str, str] = {}  # per-linear remarks for the summary
        self._folds: dict[tuple, dict] = {}  # fold map per block structure (block-relative stage names)
        # whether finished stages may be replayed from cached inputs (stages.find_replays); not under an online
        # rotation, whose hook would rotate a cached (already rotated) input again, nor with static activation
        # ranges, recorded in the output pass, which must call every linear
        self.replay = replay and not (self.rotation is not None and self.rotation.rotates_online) \
            and not self.static_inputs

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> EngineReport:
        use_mmap_for_large_tensors()
        blocks = self.loaded.layout.blocks
        self.ranks.ready()  # another rank's setup failed: stop with it
        if self.rotation is not None:
            self._prepare_rotation()
        state = self.checkpoint.load() if self.checkpoint is not None else None
        if self.checkpoint is not None and self.ranks.distributed:
            self._check_same_checkpoint(state)
        inputs = self._capture_block0_inputs() if self.needs_calibration else None
        if state is not None:
            self.placement.drop(inputs)
            self.placement.drop(self.float_inputs)
            inputs = self._restore(state)
        bar = tqdm(range(self.resumed_at, len(blocks)), desc="quantizing blocks", unit="block", file=sys.stderr,
                   disable=not self.progress or not self.ranks.is_writer, dynamic_ncols=True,
                   initial=self.resumed_at, total=len(blocks))
        for i in bar:
            start, first_layer = time.perf_counter(), len(self.report.layers)
            inputs = self._run_block(i, inputs, last=i + 1 == len(blocks))
            self.report.block_seconds.append(time.perf_counter() - start)
            if self.checkpoint is not None and i + 1 < len(blocks):
                self.checkpoint.save(i + 1, self._state(), self.sink.snapshot(), inputs, self.placement,
                                     self.float_inputs)
            errors = [r.relative_error for r in self.report.layers[first_layer:]]
            bar.set_postfix(block_s=f"{self.report.block_seconds[-1]:.2f}",
                            weight_err=f"{sum(errors) / max(len(errors), 1):.4f}")
        bar.close()
        self.placement.drop(inputs)
        self.placement.drop(self.float_inputs)
        if self.ranks.distributed:
            self.report.ranks = {"peak_rss_bytes": self.ranks.gather(peak_rss_bytes()),
                                 "collective_bytes": self.ranks.gather(self.ranks.sent_bytes)}
        if self.ranks.is_writer:  # the other ranks write nothing, so they need nothing outside the blocks
            self._finish_outside_blocks()
        if self.rotator is not None:
            self.report.rotation = self.rotator.summary()  # the largest block error over all blocks
        return self.report

    # -- resume -------------------------------------------------------------------------------------------
    def _state(self) -> dict:
        """What the report and the rest of the run need from the finished blocks (resume.Checkpoint)."""
        r = self.report
        state = {"layers": [dataclasses.asdict(x) for x in r.layers], "block_seconds": r.block_seconds,
                 "capture_seconds": r.capture_seconds, "quantized": sorted(self.quantized)}
        if self.rotator is not None:
            state["rotator"] = {"max_error": self.rotator.max_error, "online": self.rotator.online}
        return state

    def _restore(self, state: dict):
        """Continue an interrupted run: its report, its sink's files, the next block's inputs."""
        self.resumed_at = state["done"]
        e = state["engine"]
        self.report.layers = [LayerReport(**x) for x in e["layers"]]
        self.report.block_seconds, self.report.capture_seconds = e["block_seconds"], e["capture_seconds"]
        self.quantized = set(e["quantized"])
        if self.rotator is not None and "rotator" in e:
            self.rotator.max_error = e["rotator"]["max_error"]
            self.rotator.online.update(e["rotator"]["online"])
        self.sink.restore(state["sink"])
        if self.ranks.is_writer:
            print(f"resuming: blocks 0-{self.resumed_at - 1} of {len(self.loaded.layout.blocks)} were finished by "
                  f"the interrupted run", file=sys.stderr, flush=True)
        if self.paired:
            self.float_inputs = self.checkpoint.inputs(state, self.placement, stream="float")
        return self.checkpoint.inputs(state, self.placement)

    def _check_same_checkpoint(self, state) -> None:
        """Every rank must continue from the same block: the checkpoint lies in rank 0's staging folder, which
        the other ranks must see (one host, or a shared filesystem)."""
        seen = self.ranks.gather(None if state is None else state["done"])
        if len(set(seen)) > 1:
            where = ", ".join(f"rank {r}: {'none' if d is None else f'after block {d - 1}'}" for r, d in enumerate(seen))
            raise LowbitError(f"the ranks see different resume checkpoints in {self.checkpoint.folder} ({where}); "
                              f"resuming several hosts needs the output folder on a filesystem they share")

    def _run_block(self, i: int, inputs, last: bool):
        """Quantize block i and emit it; returns the next block's inputs (None without calibration)."""
        prefix = self.loaded.layout.block_prefix(i)
        if inputs is not None and self.block_kwargs is not None:
            inputs = [(held, self.block_kwargs[i][k]) for k, (held, _) in enumerate(inputs)]
        with self.placement.scope():
            inputs = self._work_on_block(i, prefix, inputs, last)
        if not self.keep:
            self.loaded.release(prefix)
            return_freed_memory_to_os()
        return inputs

    def _work_on_block(self, i: int, prefix: str, inputs, last: bool):
        self.loaded.materialize(prefix)
        block = self.loaded.layout.blocks[i]
        linears = self._planned(block, prefix)
        ranges, out_ranges = {}, {}  # calibrated activation ranges (static inputs, KV cache) per linear
        if inputs is not None:
            run = BlockRun(self, block, prefix, linears, inputs, float_inputs=self.float_inputs)
            if (self.transforms or self.quantizer.needs_calibration) and linears:
                self._calibrate(run)
            if run.float_inputs is not None and run.float_block is None and not run.float_advanced:
                run.float_block = copy.deepcopy(block)  # nothing calibrated: the float block is this one, as is
            self._quantize_modules(block, prefix)  # whatever calibration did not reach
            if not run.outputs_ready and (not last or self.static_inputs):
                ranges, out_ranges = run.advance(
                    {n: s for n in linears if (s := self.plan[n].input_spec) is not None and not s.dynamic},
                    {n: s for n in linears if (s := self.plan[n].output_spec) is not None})
            if run.float_inputs is not None and not last and not run.float_advanced:
                run.advance_float()  # the float model's inputs of the next block
            inputs = run.inputs
        else:
            self._quantize_modules(block, prefix)
        self._attach_input_quant(linears, ranges, out_ranges)
        self._emit_params(block, prefix)
        return inputs

    def _calibrate(self, run: BlockRun) -> None:
        """A block's transforms and calibrated quantizer, on its calibration inputs."""
        run.find_stages(self.replay)
        stats = None
        if self.transforms and run.stages.groups:
            stats = run.transform(self._fold_map(run), keep_outputs=self.float_next)
        if run.float_inputs is not None:  # the float model's block: after the transforms' (exact) folds, before
            run.float_block = copy.deepcopy(run.block)  # any weight is quantized
        if BLOCK_FORWARD in self.quantizer.needs:
            run.optimise()  # the block's rounding learned from its output (AutoRound)
        elif self.quantizer.needs_calibration and run.stages.groups:
            run.calibrate_and_quantize(stats)

    def online_rotations(self) -> dict:
        """The linears whose input the rotation multiplies at run time (R4), for the output's config."""
        return self.rotator.online if self.rotator is not None else {}

    def _prepare_rotation(self) -> None:
        """Rotate the model as it loads (hf.rotate): roles found and block 0 checked before any other work."""
        from ..hf.rotate import Rotator

        if self.calibration is not None:
            probe = self.calibration[:1]
        else:  # any tokens serve to find the roles and check the function
            vocab = self.loaded.model.get_input_embeddings().weight.shape[0]
            probe = (torch.arange(1, 17) * 7919 % vocab)[None, :]
        with self.placement.scope():
            self.rotator = Rotator(self.loaded, self.rotation, self.placement.tokens(probe))
            self.report.rotation = self.rotator.prepare()

    # -- calibration --------------------------------------------------------------------------------
    def _capture_block0_inputs(self) -> list[tuple[torch.Tensor, dict]]:
        """Run the model up to block 0 on each calibration batch and keep block 0's inputs (on the device, as
        placed), and record the keyword arguments every block receives (self.block_kwargs)."""
        start = time.perf_counter()
        layout, model = self.loaded.layout, self.loaded.model
        # what runs before block 0: embeddings (and norms); not lm_head, which is read at the end
        outside = [n for n, _ in model.named_parameters() if block_of(layout, n) is None
                   and n.rpartition(".")[0] not in self.plan]
        for name in outside:
            self.loaded.materialize(name)
        batches = [self.placement.tokens(b) for b in self.ranks.shard(self.calibration).split(self.batch_size)]
        with self.placement.scope():
            captured = capture_block_inputs(model, layout.blocks[0], batches, self.placement.activations)
            if self.paired:  # the float model's inputs of block 0: the same
                self.float_inputs = [(self.placement.activations(self.placement.fetch(held).clone()), None)
                                     for held, _ in captured]
            if len(layout.blocks) > 1:
                self.block_kwargs = self._record_block_kwargs(batches, captured)
        if not self.keep:
            for name in outside:
                self.loaded.release(name)
        self.report.capture_seconds = time.perf_counter() - start
        return captured

    def _record_block_kwargs(self, batches, captured) -> list[list[dict]] | None:
        """Every block's keyword arguments per batch (hf.capture.capture_block_kwargs), after seeing what a
        block returns from a shapes-only (meta) run of block 0, or a real one where that cannot run."""
        held, kwargs = captured[0]
        window = first_window([(self.placement.fetch(held), kwargs)])
        block = self.loaded.layout.blocks[0]
        returns = output_convention(block, window, meta=True)  # shapes only: block 0's weights stay on disk
        if returns is None:  # an op without a meta kernel: run it with its weights
            prefix = self.loaded.layout.block_prefix(0)
            self.loaded.materialize(prefix)
            returns = output_convention(block, window)
            if not self.keep:
                self.loaded.release(prefix)
        return capture_block_kwargs(self.loaded.model, self.loaded.layout.blocks, batches, returns)

    def _planned(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        return {prefix + rel: m for rel, m in block.named_modules()
                if prefix + rel in self.plan and self.plan[prefix + rel].spec is not None}

    # -- transforms (AWQ, SmoothQuant) ---------------------------------------------------------------
    def _fold_map(self, run: BlockRun) -> dict[tuple, Fold | None]:
        """Where each stage's scales fold, found on the first block of each structure and reused; refused
        before any statistics are gathered when the first stage of a block (its normalised input) has none."""
        stages, prefix, block = run.stages.groups, run.prefix, run.block
        rel = [tuple(n[len(prefix):] for n in st) for st in stages]
        key = tuple(rel)
        if key not in self._folds:
            probe = run.probe_window()

            def forward():
                out = block(probe[0][0], **probe[0][1])
                return out[0] if isinstance(out, tuple) else out

            self._folds[key] = self.ranks.same(find_folds(block, rel, forward))  # rank 0's probe decides
            scaling = any(type(t).channel_scales is not Transform.channel_scales for t in self.transforms)
            if scaling and self._folds[key][rel[0]] is None and run.stages.first_at_entry:
                refuse_unfoldable(self.transforms, prefix, rel[0])
        return {st: self._folds[key][r] for st, r in zip(map(tuple, stages), rel)}

    # -- activation quantization ----------------------------------------------------------------------
    def _attach_input_quant(self, linears: dict[str, nn.Module], ranges: dict, out_ranges: dict) -> None:
        """Fake-quantize the inputs of the block's linears from now on and tell the sink."""
        for name, module in linears.items():
            spec = self.plan[name].input_spec
            if spec is None:
                continue
            params = None
            if not spec.dynamic:
                lo, hi = ranges.get(name, (0.0, 0.0))
                params = activation_qparams(lo, hi, spec)
            attach_input_quant(module, spec, params)
            self.sink.add_input_quant(name, spec, params)
        for name, module in linears.items():
            spec = self.plan[name].output_spec
            if spec is not None:
                params = activation_qparams(*out_ranges.get(name, (0.0, 0.0)), spec)
                attach_output_quant(module, spec, params)
                self.sink.add_output_quant(name, spec, params)

    # -- quantization and output --------------------------------------------------------------------
    def quantize_stages(self, stages: list[list[str]], linears: dict[str, nn.Module]) -> None:
        """The quantizer's codes for every linear of these stages (each stage's linears share an input and are
        quantized together). With several processes each stage is solved by one of them, chosen by cost, and
        the results are shared (weight parallel): N processes solve N stages at once."""
        def solve(names):
            qts = self.quantizer.quantize_group(tuple(names), [linears[n].weight.detach() for n in names],
                                                [self.plan[n].spec for n in names], [self.clips.get(n) for n in names])
            return self._shareable(names, qts)

        self._record_shared([list(st) for st in stages], solve, linears)

    def _quantize_modules(self, root: nn.Module, prefix: str) -> None:
        """Linears that calibration did not reach (all of them for RTN), one job each."""
        linears = {n: m for n, m in self._planned(root, prefix).items() if n not in self.quantized}

        def solve(names):
            (name,) = names
            qt = self.quantizer.quantize(name, linears[name].weight.detach(), self.plan[name].spec,
                                         self.clips.get(name))
            return self._shareable(names, [qt])

        self._record_shared([[n] for n in linears], solve, linears)

    def _record_shared(self, jobs: list[list[str]], solve, linears: dict[str, nn.Module]) -> None:
        """solve(names) -> (quantized weights, notes) for each job, spread over the processes (parallel.Ranks.share),
        then every result recorded on every process, in job order."""
        calibrated = self.quantizer.needs_calibration

        def cost(names):  # GPTQ: rows x K^2 for the updates and K^3 for the inverse; RTN: the weights' size
            k = linears[names[0]].in_features
            rows = sum(linears[n].out_features for n in names)
            return rows * k * k + k ** 3 if calibrated else rows * k

        device = self.placement.device
        results = self.share(jobs, [cost(j) for j in jobs], solve,
                             send=lambda r: ([qt.compact() for qt in r[0]], r[1]),  # codes one byte each
                             receive=lambda r: ([qt.widened(device) for qt in r[0]], r[1]))
        for names, (qts, notes) in zip(jobs, results):
            self.quantizer.statistics().pop(tuple(names), None)  # solved elsewhere: no longer needed here
            self.quantizer.notes.update(notes)
            for name, qt in zip(names, qts):
                self._record(name, linears[name], qt)

    def share(self, jobs: list, costs: list, solve, send=None, receive=None) -> list:
        """solve(job) for every job; with several processes each job on one of them (parallel.Ranks.share), its
        result sent through the host (`send`: by default tensors, tuples and dicts of them moved there) and
        made usable here (`receive`: by default moved to the device)."""
        if not self.ranks.distributed:
            return [solve(job) for job in jobs]
        send = send or (lambda r: moved(r, "cpu"))
        receive = receive or (lambda r: moved(r, self.placement.device))
        return [receive(r) for r in self.ranks.share(jobs, costs, lambda job: send(solve(job)))]

    def _shareable(self, names, qts: list[Quantized]) -> tuple[list[Quantized], dict]:
        """A solve's result: the quantized weights and the quantizer's notes on them (which travel with them to
        the other processes)."""
        return qts, {n: self.quantizer.notes[n] for n in names if n in self.quantizer.notes}

    def _quantize_linear(self, name: str, module: nn.Linear) -> None:
        self._record(name, module, self.quantizer.quantize(name, module.weight.detach(), self.plan[name].spec,
                                                           self.clips.get(name)))

    def _record(self, name: str, module: nn.Linear, qt: Quantized) -> None:
        """Put a quantized weight into the model (fake-quant), report its error and send it to the sink."""
        weight = module.weight.detach()
        dequant = qt.dequantize(torch.float32)
        self.report.layers.append(layer_report(name, weight, qt, dequant, self.notes, self.quantizer))
        self.quantized.add(name)
        # rounded to the source dtype, as the written folder dequantizes, whatever the working precision
        set_module_tensor(self.loaded.model, f"{name}.weight", dequant.to(self.loaded.source_dtype).to(weight.dtype))
        bias = self._stored(module.bias) if getattr(module, "bias", None) is not None else None
        self.sink.add_quantized(name, qt, bias)

    def _stored(self, tensor: torch.Tensor) -> torch.Tensor:
        """A float tensor as written: in the source's dtype (the working precision may be wider)."""
        tensor = tensor.detach()
        return tensor.to(self.loaded.source_dtype) if tensor.is_floating_point() else tensor

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
                self.sink.add_tensor(name, self._stored(param))

    def _finish_outside_blocks(self) -> None:
        """Quantize and emit what lies outside the decoder blocks: embeddings, final norm, lm_head."""
        loaded, layout, model = self.loaded, self.loaded.layout, self.loaded.model
        outside = [(n, m) for n, m in model.named_modules() if n in self.plan and block_of(layout, n) is None]
        for name, module in outside:
            if self.plan[name].spec is not None:
                loaded.materialize(f"{name}.")
                with self.placement.scope():
                    self._quantize_linear(name, module)
        skip = self._quantized_param_names()
        seen = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if block_of(layout, name) is not None or name in skip:
                continue
            if name in layout.tied and self.plan.get(name.rpartition(".")[0]) is not None \
                    and self.plan[name.rpartition(".")[0]].spec is None:
                continue  # a tied weight that stays tied is written once, under its source name
            if name in seen:
                continue
            seen.add(name)
            if param.device.type == "meta" and not self.keep and self.rotator is None:
                # written as stored, never widened to the working precision (a 128k x 8k embedding is 4 GiB
                # in float32); the same bytes as materializing it and casting back
                self.sink.add_tensor(name, self._stored(loaded.read_checked(name)))
                continue
            if param.device.type == "meta":
                loaded.materialize(name)
                param = model.get_parameter(name)
            self.sink.add_tensor(name, self._stored(param))
            if not self.keep:
                loaded.release(name)
        if self.keep:
            loaded.materialize("")  # tied weights that stayed tied share their source again


SERVED = frozenset({INPUT_STATS, FLOAT_AND_QUANTIZED_INPUTS, BLOCK_FORWARD, GLOBAL_TRANSFORM})  # by this engine


def check_needs(chain: list[Algorithm], onnx: bool = False) -> None:
    """Refuse, before any work, an algorithm needing what the engine does not serve yet (the ONNX quantizer,
    `onnx`, serves input statistics only)."""
    served = SERVED - {FLOAT_AND_QUANTIZED_INPUTS, BLOCK_FORWARD} if onnx else SERVED
    for a in chain:
        missing = a.needs - served
        if missing:
            where = "the ONNX front end" if onnx else "this engine"
            raise LowbitError(f"{a.name} needs {', '.join(sorted(missing))}, which {where} does not provide yet"
                              f"{'; quantize the Hugging Face model instead' if onnx else ''}")

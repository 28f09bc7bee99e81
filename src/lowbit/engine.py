"""The block-by-block runner.

For each decoder block: load its weights from disk, let the algorithm chain see the block's inputs (when
it needs calibration), quantize the block's linears, re-run the quantized block to produce the next block's
inputs, hand the results to the writer, and drop the block from memory. The inputs of block 0 are captured
once from the calibration windows. A chain that needs no calibration (RTN) runs no forward pass at all.
"""

from __future__ import annotations

import inspect
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from .algorithms import Algorithm, Quantizer
from .arch import block_of, set_module_tensor
from .formats import IntQuantized
from .hf.model import LoadedModel
from .recipe import LayerPlan

# keyword arguments of a decoder block that carry a KV cache: dropped, so replays never append to a cache
_CACHE_KWARGS = ("past_key_value", "past_key_values", "use_cache", "layer_past")


class _StopForward(Exception):
    pass


def _libc():
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def return_freed_memory_to_os() -> None:
    """Hand the heap pages of freed tensors back to the OS (glibc malloc_trim). Block-sized tensors often
    land on glibc's heap, which fragments and never shrinks by itself: on the demo model resident memory
    then grew ~8 MiB per block and the peak reached 0.75-0.95 GiB instead of ~0.57 GiB."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@dataclass
class LayerReport:
    name: str
    spec: str
    relative_error: float  # ||W - Q(W)|| / ||W||
    note: str = ""  # e.g. a calibrated quantizer's fallback to RTN


@dataclass
class EngineReport:
    layers: list[LayerReport] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0


class Sink:
    """Where the engine sends results: float tensors and quantized linears, by name."""

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def add_quantized(self, module_name: str, qt: IntQuantized, bias: torch.Tensor | None) -> None:
        pass


class Engine:
    """Runs an algorithm chain over a lazily loaded model, one decoder block at a time."""

    def __init__(self, loaded: LoadedModel, plan: dict[str, LayerPlan], chain: list[Algorithm],
                 calibration: torch.Tensor | None = None, sink: Sink | None = None,
                 keep_in_memory: bool = False, batch_size: int = 8, progress: bool = True):
        self.loaded, self.plan, self.chain = loaded, plan, chain
        self.quantizer: Quantizer = chain[-1]
        self.transforms = chain[:-1]
        self.needs_calibration = any(a.needs_calibration for a in chain)
        if self.needs_calibration and calibration is None:
            raise ValueError("this chain needs calibration windows")
        self.calibration = calibration
        self.sink = sink or Sink()
        self.keep = keep_in_memory
        self.batch_size = batch_size
        self.progress = progress
        self.report = EngineReport()
        self.quantized: set[str] = set()  # linears already quantized

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> EngineReport:
        layout = self.loaded.layout
        blocks = layout.blocks
        inputs = self._capture_block0_inputs() if self.needs_calibration else None
        bar = tqdm(range(len(blocks)), desc="quantizing blocks", unit="block", file=sys.stderr,
                   disable=not self.progress, dynamic_ncols=True)
        for i in bar:
            start, first_layer = time.perf_counter(), len(self.report.layers)
            prefix = layout.block_prefix(i)
            self.loaded.materialize(prefix)
            block = blocks[i]
            for transform in self.transforms:
                transform.apply_block(block, inputs)  # later algorithms (AWQ, SmoothQuant)
            if self.quantizer.needs_calibration:
                self._calibrate_and_quantize(block, prefix, inputs)
            self._quantize_modules(block, prefix)  # whatever calibration did not reach
            if inputs is not None and i + 1 < len(blocks):
                inputs = self._run_block(block, inputs)
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
        return self.report

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
        captured = []
        block0 = layout.blocks[0]
        accepted = set(inspect.signature(block0.forward).parameters)

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and (k in accepted or "kwargs" in accepted)}
            captured.append((hidden.detach().cpu(), kept))
            raise _StopForward

        handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in self.calibration.split(self.batch_size):
                    try:
                        model(input_ids=batch, use_cache=False)
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        if not self.keep:
            for name in outside:
                self.loaded.release(name)
        self.report.capture_seconds = time.perf_counter() - start
        return captured

    def _run_block(self, block: nn.Module, inputs):
        """The block's outputs for every calibration chunk, the next block's inputs. Each chunk is replaced in
        the list as soon as its output exists, so one copy of the activations is held, not two."""
        with torch.no_grad():
            for k, (hidden, kwargs) in enumerate(inputs):
                out = block(hidden, **kwargs)
                inputs[k] = (out[0] if isinstance(out, tuple) else out, kwargs)
        return inputs

    def _planned(self, block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        return {prefix + rel: m for rel, m in block.named_modules()
                if prefix + rel in self.plan and self.plan[prefix + rel].spec is not None}

    def _stages(self, block: nn.Module, linears: dict[str, nn.Module], first_chunk) -> list[list[str]]:
        """The block's planned linears in execution order, grouped into stages of linears that read the same
        input tensor (q/k/v, then o, then gate/up, then down for a Llama block): found by one probe forward."""
        calls: list[tuple[str, torch.Tensor]] = []  # tensors kept alive, so identity comparisons hold
        hooks = [m.register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0])))
                 for n, m in linears.items()]
        try:
            self._run_block(block, first_chunk[:1])
        finally:
            for h in hooks:
                h.remove()
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
        return stages

    def _observe(self, block: nn.Module, stages: list[list[str]], linears: dict[str, nn.Module], inputs,
                 stop_after: str | None) -> None:
        """Show the quantizer each stage's common input over every calibration chunk (hooked on the stage's
        first linear), stopping each forward after `stop_after` has run (nothing later is needed yet)."""
        hooks = [linears[st[0]].register_forward_pre_hook(
            lambda m, args, names=tuple(st): self.quantizer.observe(names, args[0].reshape(-1, args[0].shape[-1])))
            for st in stages]
        if stop_after is not None:
            def stop(module, args, output):
                raise _StopForward

            hooks.append(linears[stop_after].register_forward_hook(stop))
        try:
            with torch.no_grad():
                for hidden, kwargs in inputs:
                    try:
                        block(hidden, **kwargs)
                    except _StopForward:
                        pass
        finally:
            for h in hooks:
                h.remove()

    def _calibrate_and_quantize(self, block: nn.Module, prefix: str, inputs) -> None:
        """Calibrated quantization of a block. True-sequential (the default): stage by stage, each stage's
        inputs computed with the earlier stages already quantized; otherwise one pass for all stages."""
        linears = self._planned(block, prefix)
        if not linears:
            return
        stages = self._stages(block, linears, inputs)
        sequential = getattr(self.quantizer, "true_sequential", True)
        for passes in ([[st] for st in stages] if sequential else [stages]):
            self._observe(block, passes, linears, inputs, stop_after=passes[-1][-1] if sequential else None)
            for stage in passes:
                self._quantize_stage(stage, linears)

    # -- quantization and output --------------------------------------------------------------------
    def _quantize_stage(self, names: list[str], linears: dict[str, nn.Module]) -> None:
        weights = [linears[n].weight.detach() for n in names]
        qts = self.quantizer.quantize_group(tuple(names), weights, [self.plan[n].spec for n in names])
        for name, qt in zip(names, qts):
            self._record(name, linears[name], qt)

    def _quantize_linear(self, name: str, module: nn.Linear) -> None:
        self._record(name, module, self.quantizer.quantize(name, module.weight.detach(), self.plan[name].spec))

    def _record(self, name: str, module: nn.Linear, qt: IntQuantized) -> None:
        """Put a quantized weight into the model (fake-quant), report its error and send it to the sink."""
        lp = self.plan[name]
        weight = module.weight.detach()
        dequant = qt.dequantize(torch.float32)
        err = (torch.linalg.vector_norm(dequant - weight.float()) /
               torch.linalg.vector_norm(weight.float()).clamp_min(1e-30)).item()
        note = getattr(self.quantizer, "notes", {}).get(name, "")
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

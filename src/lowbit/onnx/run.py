"""`lowbit quantize model.onnx`: the ONNX front end's entry, with the same recipe, checks and output
conventions as the torch path (plan printed and validated first, staged output folder, recipe.yaml and
summary.json beside model.onnx). Weight-only chains may start with `rotation` (QuaRot R1, rotate.py): the float
graph is rotated into a folder inside the staged output, the other steps run on that graph, and the folder is
removed before the output is renamed into place."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..algorithms import parse_chain
from ..errors import LowbitError
from ..engine import check_needs
from ..errors import log
from ..job import JobResult
from ..staging import check_output
from ..recipe import Recipe, format_plan, resolve_plan, validate_plan
from .graph import OnnxDecoder
from .options import OnnxOptions
from .write import ONNX_FORMATS, GraphWriter, check_format


def _check_options(options: OnnxOptions, decoder: OnnxDecoder) -> None:
    """Refuse, before any work, weight-only options that cannot apply (static INT8's are checked there)."""
    if options.int16_inputs or options.float_inputs or options.reduce_range or options.calibrate_method != "minmax":
        raise LowbitError("--int16-inputs, --float-inputs, --reduce-range and --calibrate-method apply to static INT8 "
                          "(--scheme w_int8_a_int8_per_tensor_sym); drop them for weight-only quantization")
    if options.onnx_format not in ONNX_FORMATS:
        raise LowbitError(f"unknown ONNX output form {options.onnx_format!r}; use one of {', '.join(ONNX_FORMATS)}")
    if options.onnx_format != "matmulnbits" and decoder.opset() < 21 and decoder.opset() != 0:
        raise LowbitError(f"{decoder.path} uses opset {decoder.opset()}; blocked DequantizeLinear needs opset 21. "
                          f"Use --onnx-format matmulnbits, or re-export the model with opset >= 21")
    if options.embedding_bits is not None:
        if options.embedding_bits not in (4, 8):
            raise LowbitError(f"embedding bits must be 4 or 8, not {options.embedding_bits}")
        block = options.embedding_block
        if block < 16 or block & (block - 1):
            raise LowbitError(f"GatherBlockQuantized needs a power-of-two block size >= 16, not {block}; "
                              f"use --gather-block-size 32, 64 or 128")
        if options.embedding_axis not in (0, 1):
            raise LowbitError(f"--gather-quantize-axis must be 0 or 1, not {options.embedding_axis}")
        if not decoder.embeddings:
            raise LowbitError("--quantize-embedding: the model has no embedding Gather of a constant table; "
                              "drop the option")
        for emb in decoder.embeddings:
            length = emb.shape[1 - options.embedding_axis]
            if length % block:
                raise LowbitError(f"the embedding's {'hidden size' if options.embedding_axis else 'vocabulary'} "
                                  f"{length} is not a multiple of block {block}; choose a block dividing it")


def onnx_job(model, output, recipe: Recipe, options: OnnxOptions | None = None, overwrite: bool = False,
             quiet: bool = False, progress: bool = True):
    """The checked job (pipeline.Job) that quantizes an ONNX decoder (model.onnx or its folder) into a new ONNX
    folder `output`: weight-only (WeightOnlyJob) or static INT8 (static_int8.StaticInt8Job). Everything is
    refused here, before any work."""
    options = options or OnnxOptions()
    if output is None:
        raise LowbitError("quantizing an ONNX model needs an output folder (-o OUT)")
    decoder = OnnxDecoder(model)  # the source's refusals come first
    check_output(Path(output), overwrite, [decoder.folder])
    chain = parse_chain([a.name for a in recipe.algorithms], {a.name: a.kwargs() for a in recipe.algorithms})
    check_needs(chain, onnx=True)
    from .static_int8 import static_int8_applies

    if static_int8_applies(recipe, chain):  # weights and activations: static int8 QDQ (static_int8.py)
        from .static_int8 import StaticInt8Job

        plan = resolve_plan(recipe, decoder.linears())
        validate_plan(plan, recipe.scheme)
        log(format_plan(plan), quiet)
        return StaticInt8Job.checked(str(model), decoder, recipe, chain, plan, options, quiet, progress)
    _check_chain(recipe, chain)
    _check_options(options, decoder)
    rot = next((a for a in chain if a.role == "rotation"), None)
    if rot is not None:
        from .rotate import plan_rotation

        plan_rotation(decoder)  # a graph R1 cannot rotate is refused before any work
    recipe = _with_8bit_layers(recipe, options, decoder)
    plan = resolve_plan(recipe, decoder.linears())
    validate_plan(plan, recipe.scheme)
    for lp in plan.values():
        if lp.spec is not None and lp.spec.gguf_grid:
            raise LowbitError(f"{lp.name}: K-quant grids ({lp.spec.gguf_grid}) are GGUF's, and an ONNX model is "
                              f"written as ONNX; use an integer scheme such as w_uint4_per_group_asym")
        if lp.spec is not None:
            check_format(options.onnx_format, lp.spec, lp.name, lp.shape[1])
    log(format_plan(plan), quiet)
    return WeightOnlyJob(str(model), decoder, recipe, chain, plan, options, quiet, progress)


def _check_chain(recipe: Recipe, chain) -> None:
    """Refuse chains and schemes the weight-only ONNX path cannot run."""
    unsupported = [a.name for a in chain if a.name == "smoothquant"]
    if unsupported:
        raise LowbitError(f"{', '.join(unsupported)} is not available for ONNX weight-only quantization (it "
                          f"smooths activations for static INT8); use rtn, awq (awq_lite / awq_clip) or gptq, "
                          f"optionally after rotation")
    rot = next((a for a in chain if a.role == "rotation"), None)
    if rot is not None and (rot.r2 or rot.r4):
        raise LowbitError("rotation r2 / r4 is not available on the ONNX graph (R1 only); drop r2=true / r4=true")
    if recipe.scheme.input is not None or recipe.kv_cache is not None:
        raise LowbitError(f"scheme {recipe.scheme.name} quantizes activations; the ONNX front end quantizes weights "
                          f"only (w_uint4_per_group_asym, w_int4_per_group_sym, w_int8_per_channel_sym, ...) or "
                          f"static INT8 (w_int8_a_int8_per_tensor_sym / _per_channel_sym with rtn, smoothquant, "
                          f"rotation or rotation,smoothquant)")


@dataclass
class WeightOnlyJob:
    """Weight-only quantization of an ONNX decoder (pipeline.Job): the chain's algorithms on its weight MatMuls
    (quantize.OnnxQuantizer), written as MatMulNBits or blocked DequantizeLinear."""
    source: str
    decoder: OnnxDecoder
    recipe: Recipe
    chain: list
    plan: dict
    options: OnnxOptions
    quiet: bool
    progress: bool
    windows: object = None

    def describe(self) -> dict:
        return {"scheme": self.recipe.scheme.name, "algorithms": [a.name for a in self.chain],
                "onnx_format": self.options.onnx_format, "accuracy_level": self.options.accuracy_level}

    def prepare(self):
        from .calibrate import calibration_windows

        if any(a.needs_calibration for a in self.chain):
            self.windows = calibration_windows(self.decoder, self.recipe)
        return self.windows

    def quantize(self, folder: Path) -> JobResult:
        from .calibrate import providers_for
        from .quantize import OnnxQuantizer, carry_files, quantize_embedding

        fields, phases = {}, {}
        # rotation: R1 written (in float) into a folder inside the staged output, removed when this block ends
        # (or with the staged output on failure); the chain's other steps then run on the rotated graph
        with contextlib.ExitStack() as rotated:
            source = self.decoder
            rot = next((a for a in self.chain if a.role == "rotation"), None)
            if rot is not None:
                from .rotate import write_rotated

                t = time.perf_counter()
                log("rotating the residual stream (QuaRot R1)", self.quiet)
                work = Path(rotated.enter_context(tempfile.TemporaryDirectory(prefix=".rotated-", dir=folder)))
                _, fields["rotation"] = write_rotated(self.decoder, work, rot.seed)
                source = OnnxDecoder(work)
                phases["rotation"] = time.perf_counter() - t
            writer = GraphWriter(source, folder, self.decoder.path.name)
            runner = OnnxQuantizer(source, self.plan, self.chain, writer, self.options.onnx_format,
                                   self.options.accuracy_level, self.progress)
            report = runner.run(self.windows, providers_for(self.options.execution_provider),
                                self.options.memory_budget)
            if self.options.embedding_bits is not None:
                report.embeddings = [quantize_embedding(source, emb, writer, self.options.embedding_bits,
                                                        self.options.embedding_block, self.options.embedding_axis)
                                     for emb in source.embeddings]
            writer.write()
            del source, writer, runner
        fields["carried_files"] = carry_files(self.decoder, folder)
        fields["embeddings"] = report.embeddings
        phases["calibration"] = report.calibration_seconds
        return JobResult(report.layers, report, fields, phases)

    def source_size(self) -> int:
        return self.decoder.size_bytes()

    def output_size(self, folder: Path) -> int:
        from .quantize import written_size

        return written_size(folder, self.decoder)

    def evaluation_target(self, folder: Path):
        from ..model_files import load_tokenizer

        return "onnx", folder, load_tokenizer(folder)


def _with_8bit_layers(recipe: Recipe, options: OnnxOptions, decoder: OnnxDecoder) -> Recipe:
    """The recipe with mixed INT4/INT8 overrides added (recorded in recipe.yaml like any override)."""
    from dataclasses import replace

    from ..recipe import Override
    from .mixed import default_8bit_layers
    from .options import eight_bit_overrides

    patterns = list(options.layers_8bit) or (default_8bit_layers(list(decoder.linears())) if options.mixed else [])
    if not patterns:
        return recipe
    extra = tuple(Override.parse(o) for o in eight_bit_overrides(patterns, list(decoder.linears())))
    return replace(recipe, overrides=recipe.overrides + extra)

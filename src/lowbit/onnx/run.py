"""`lowbit quantize model.onnx`: the ONNX front end's entry, with the same recipe, checks and output
conventions as the torch path (plan printed and validated first, staged output folder, recipe.yaml and
summary.json beside model.onnx). Weight-only chains may start with `rotation` (QuaRot R1, rotate.py): the float
graph is rotated into a folder inside the staged output, the other steps run on that graph, and the folder is
removed before the output is renamed into place."""

from __future__ import annotations

import contextlib
import hashlib
import platform
import sys
import tempfile
import time
from pathlib import Path

from .. import __version__
from ..algorithms import parse_chain
from ..data import load_text, tokenize
from ..errors import LowbitError
from ..staging import check_output, staged
from ..recipe import Recipe, format_plan, resolve_plan, validate_plan
from ..results import warn_fallbacks, write_json
from .graph import OnnxDecoder
from .options import OnnxOptions
from .write import ONNX_FORMATS, GraphWriter, check_format


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


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


def quantize_onnx(model, output, recipe: Recipe, options: OnnxOptions | None = None, overwrite: bool = False,
                  progress: bool = True, quiet: bool = False, evaluate_after: bool = False,
                  eval_dataset: str | None = None, eval_seq_len: int | None = None, max_chunks: int | None = None):
    """Quantize an ONNX decoder (model.onnx or its folder) into a new ONNX folder `output`; returns
    (output path, summary dict, OnnxReport)."""
    from .quantize import OnnxQuantizer, carry_files, quantize_embedding
    from .calibrate import calibration_windows, providers_for

    t0 = time.perf_counter()
    options = options or OnnxOptions()
    if output is None:
        raise LowbitError("quantizing an ONNX model needs an output folder (-o OUT)")
    output = Path(output)
    decoder = OnnxDecoder(model)  # the source's refusals come first
    check_output(output, overwrite, [decoder.folder])
    chain = parse_chain([a.name for a in recipe.algorithms], {a.name: a.kwargs() for a in recipe.algorithms})
    from .static_int8 import static_int8_applies

    if static_int8_applies(recipe, chain):  # weights and activations: static int8 QDQ (static_int8.py)
        from .static_int8 import quantize_static_int8

        plan = resolve_plan(recipe, decoder.linears())
        validate_plan(plan, recipe.scheme)
        _log(format_plan(plan), quiet)
        return quantize_static_int8(decoder, output, recipe, chain, plan, options, overwrite,
                                    progress, quiet, evaluate_after, eval_dataset, eval_seq_len, max_chunks, t0)
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
    _check_options(options, decoder)
    if rot is not None:
        from .rotate import plan_rotation

        plan_rotation(decoder)  # a graph R1 cannot rotate is refused before any work
    recipe = _with_8bit_layers(recipe, options, decoder)
    plan = resolve_plan(recipe, decoder.linears())
    validate_plan(plan, recipe.scheme)
    for lp in plan.values():
        if lp.spec is not None:
            check_format(options.onnx_format, lp.spec, lp.name, lp.shape[1])
    providers = providers_for(options.execution_provider)
    _log(format_plan(plan), quiet)

    cal = recipe.calibration
    calib = calibration_windows(decoder, recipe) if any(a.needs_calibration for a in chain) else None
    t_loaded = time.perf_counter()
    summary = {"lowbit_version": __version__, "source": str(model), "scheme": recipe.scheme.name,
               "algorithms": [a.name for a in chain], "onnx_format": options.onnx_format,
               "accuracy_level": options.accuracy_level, "python": platform.python_version()}
    if calib is not None:
        summary["calibration_sha256"] = hashlib.sha256(calib.numpy().tobytes()).hexdigest()
    rotation_seconds = None
    with staged(output, overwrite, [decoder.folder]) as tmp:
        # rotation: R1 written (in float) into a folder inside the staged output, removed when this block ends
        # (or with the staged output on failure); the chain's other steps then run on the rotated graph
        with contextlib.ExitStack() as rotated:
            source = decoder
            if rot is not None:
                from .rotate import write_rotated

                t = time.perf_counter()
                _log("rotating the residual stream (QuaRot R1)", quiet)
                folder = Path(rotated.enter_context(tempfile.TemporaryDirectory(prefix=".rotated-", dir=tmp)))
                _, summary["rotation"] = write_rotated(decoder, folder, rot.seed)
                source = OnnxDecoder(folder)
                rotation_seconds = round(time.perf_counter() - t, 3)
            writer = GraphWriter(source, tmp, decoder.path.name)
            runner = OnnxQuantizer(source, plan, chain, writer, options.onnx_format, options.accuracy_level,
                                   progress)
            report = runner.run(calib, providers, options.memory_budget)
            if options.embedding_bits is not None:
                report.embeddings = [quantize_embedding(source, emb, writer, options.embedding_bits,
                                                        options.embedding_block, options.embedding_axis)
                                     for emb in source.embeddings]
            t_quant = time.perf_counter()
            writer.write()
            del source, writer, runner
        summary["carried_files"] = carry_files(decoder, tmp)
        recipe.save(tmp / "recipe.yaml")
        errors = {r.name: round(r.relative_error, 6) for r in report.layers}
        summary.update({
            "seconds": {"prepare": round(t_loaded - t0, 3),
                        **({"rotation": rotation_seconds} if rotation_seconds is not None else {}),
                        "quantize": round(t_quant - t_loaded, 3),
                        "calibration": round(report.calibration_seconds, 3),
                        "total": round(time.perf_counter() - t0, 3)},
            "peak_rss_bytes": _peak_rss(), "source_size_bytes": decoder.size_bytes(),
            "output_size_bytes": sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(decoder.path.name)),
            "quantized_modules": len(report.layers), "layer_errors": errors,
            "layer_notes": {r.name: r.note for r in report.layers if r.note},
            "embeddings": report.embeddings,
        })
        if errors:
            summary["mean_layer_error"] = round(sum(errors.values()) / len(errors), 6)
        warn_fallbacks(summary["layer_notes"], len(report.layers), chain[-1].name)
        if evaluate_after:
            from ..data import eval_windows
            from ..eval.onnx_perplexity import onnx_perplexity
            from ..model_files import load_tokenizer

            ids = tokenize(load_tokenizer(tmp), load_text(eval_dataset or "pydoc", "eval"))
            result = onnx_perplexity(tmp, eval_windows(ids, eval_seq_len or cal["seq_len"], max_chunks),
                                     progress=progress)
            summary["perplexity"] = result.to_dict()
        write_json(tmp / "summary.json", summary)
    return output, summary, report


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


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

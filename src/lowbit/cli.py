"""The `lowbit` command: quantize, eval, inspect. Thin: parses arguments and calls lowbit.api."""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import signal
import sys
import threading

from .argtypes import MAX_SEED, count, positive_number
from .errors import LowbitError
from .exporters.formats import NAMES as EXPORT_NAMES, help_text as get_format_help
from .onnx.options import ONNX_ONLY, add_onnx_args, normalize_modelopt_args, onnx_options
from .recipe import DEFAULT_CALIBRATION
from .results import to_json

EPILOG_SCHEMES = ("schemes: w_{int|uint}{2..8}_per_{tensor|channel|group}_{sym|asym} (e.g. w_uint4_per_group_asym, "
                  "w_int8_per_channel_sym); with int8 activations: w_int8_a_int8_per_tensor_sym (static, calibrated "
                  "range), w_int8_a_int8_per_token_dynamic; FP8: w_fp8, w_fp8_a_fp8 (static per-tensor); OCP MX: "
                  "w_mxfp8, w_mxfp6_e3m2, w_mxfp6_e2m3, w_mxfp4, w_mxint8 (and _a_ variants); block floating point: "
                  "w_bfp16, w_mx6, w_mx9; FP4 with FP8 scales: w_nvfp4, w_fp4_scale_fp8 (and _a_ variants).")


def _add_data_args(p, purpose: str) -> None:
    use = ("calibration text (its calibration split) and, with --eval, evaluation text (its evaluation split)"
           if purpose == "quantize" else "evaluation text (its evaluation split)")
    p.add_argument("--dataset", default=None if purpose == "eval" else "pydoc",
                   help=f"{use}: a .txt/.jsonl/.parquet file (used whole), pydoc (built in, offline), wikitext2, "
                        f"pileval, c4 or cnn_dailymail (Hugging Face hub) [default: pydoc]")
    p.add_argument("--seq-len", "--seq_len", type=count(2), default=512, help="tokens per window [default: 512]")
    if purpose in ("eval", "quantize"):
        p.add_argument("--max-chunks", "--max_chunks", type=count(1), default=None,
                       help="evaluate at most this many windows [default: all]")


def _add_recipe_args(p, required: bool) -> None:
    p.add_argument("--scheme", "--quant-scheme", "--quant_scheme", required=required, default=None,
                   help="quantization scheme, Quark spelling (e.g. w_uint4_per_group_asym)")
    p.add_argument("--group-size", "--group_size", type=count(1), default=None,
                   help="group size for *_per_group_* schemes [default: 128]; need not divide the layer width")
    p.add_argument("--exclude-layers", "--exclude_layers", nargs="*", default=None, metavar="PATTERN",
                   help="layers kept in float: names, globs or re:REGEX [default: lm_head]; "
                        "give the flag with no pattern to quantize every linear, lm_head included")
    p.add_argument("--override", action="append", default=[], metavar="PATTERN:KEY=VALUE[,KEY=VALUE]",
                   help="per-layer change to the scheme, e.g. 'down_proj:bits=8' or 'lm_head:group_size=32' or "
                        "'lm_head:scheme=w_int8_per_channel_sym' or '*:scale_rule=floor'; repeatable, later ones win")
    p.add_argument("--moe-experts-second-step-config", "--moe_experts_second_step_config", default=None,
                   metavar="SCHEME", help="weight scheme of every MoE expert linear (e.g. w_int4_per_channel_sym "
                                          "while the rest follows --scheme); routers are never quantized")
    p.add_argument("--kv-cache-dtype", "--kv_cache_dtype", default=None, choices=["fp8", "auto"],
                   help="quantize the KV cache: fp8 = the K and V projections' outputs in FP8 E4M3 with static "
                        "per-tensor scales from calibration [default: not quantized]")


def _add_export_options(p) -> None:
    p.add_argument("--gguf-type", default=None, choices=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4"],
                   help="gguf: one type for every quantized linear, re-quantizing where the stored codes do not map "
                        "[default: the exact type per layer, else the nearest, with a warning]")
    p.add_argument("--accuracy-level", "--accuracy_level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="onnx: MatMulNBits accuracy_level (lowest precision of the activations inside the kernel: "
                        "1 fp32, 2 fp16, 3 bf16, 4 int8) [default: 0, unset]")
    p.add_argument("--quantize-embedding", type=int, default=None, choices=[4, 8], metavar="BITS",
                   help="onnx: store the embedding table with BITS-bit blocks (GatherBlockQuantized) [default: float]")


def _add_task_args(p) -> None:
    p.add_argument("--tasks", default=None, metavar="TASKS",
                   help="also (or, without --dataset, only) measure lm-eval-harness task accuracy: comma-separated "
                        "task names (lambada_openai,hellaswag) or task YAML files; needs pip install lm_eval")
    p.add_argument("--task-dir", "--task_dir", "--include-path", "--include_path", default=None, metavar="DIR",
                   help="a folder of extra lm-eval task YAML files (local datasets for offline use; see README)")
    p.add_argument("--num-fewshot", "--num_fewshot", type=count(0), default=None, help="lm-eval few-shot examples")
    p.add_argument("--limit", type=positive_number, default=None,
                   help="lm-eval: at most this many documents per task (a fraction below 1) [default: all]")


def _add_speed_args(p) -> None:
    p.add_argument("--prompt-tokens", type=count(1), default=512, help="prefill prompt length [default: 512]")
    p.add_argument("--new-tokens", type=count(1), default=128, help="decoded tokens per run [default: 128]")
    p.add_argument("--runs", type=count(1), default=3, help="timed runs; the median and spread are reported [default: 3]")
    p.add_argument("--warmup", type=count(0), default=1, help="untimed runs first [default: 1]")
    p.add_argument("--threads", type=count(1), default=None, help="CPU threads [default: every CPU available]")
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime-genai", "llama.cpp"],
                   help="where speed is measured: auto = onnxruntime-genai for ONNX folders, torch otherwise; "
                        "llama.cpp for .gguf files [default: auto]")


def _perplexity_dataset(args) -> str | None:
    """The text perplexity is measured on: --dataset, else pydoc, else (with --tasks alone) none."""
    if args.dataset is not None or not getattr(args, "tasks", None):
        return args.dataset or "pydoc"
    return None


def _speed_args(args) -> dict:
    return {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
            "warmup": args.warmup, "threads": args.threads}


def _export_options(args) -> dict:
    """{format: {option: value}} from the export flags that were given."""
    out = {"gguf": {}, "onnx": {}}
    if args.gguf_type:
        out["gguf"]["quant_type"] = args.gguf_type
    if args.accuracy_level is not None:
        out["onnx"]["accuracy_level"] = args.accuracy_level
    if args.quantize_embedding is not None:
        out["onnx"]["quantize_embedding"] = args.quantize_embedding
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="lowbit", description="Post-training quantization of causal LMs.",
                     epilog="Run `lowbit COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_quantize_parser(sub)
    _add_eval_parser(sub)
    _add_bench_parser(sub)
    _add_compare_parser(sub)
    _add_export_parser(sub)
    _add_inspect_parser(sub)
    return parser


def _add_quantize_parser(sub) -> None:
    """The `quantize` command: its model, output, recipe, calibration, export and ONNX options."""
    q = sub.add_parser("quantize", help="quantize a model and write a lowbit folder",
                       description="Quantize MODEL (a Hugging Face folder, a .gguf file or `demo`) block by block "
                                   "and write a Hugging Face-style folder with packed weights, the recipe and a "
                                   "summary.", epilog=EPILOG_SCHEMES)
    q.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder, .gguf file, `demo` (SmolLM2-135M-Instruct), or an ONNX decoder (an "
                        ".onnx file or a folder with genai_config.json / model.onnx: onnxruntime-genai's builder, "
                        "optimum)")
    q.add_argument("-o", "--output", "--output-dir", "--output_dir", default=None, help="output folder")
    _add_recipe_args(q, required=False)
    q.add_argument("--algo", default="rtn",
                   help="algorithm chain, comma-separated: at most one scaling step (awq or smoothquant) then at most "
                        "one quantizer (rtn or gptq, rtn if none), e.g. awq, gptq, awq,gptq, smoothquant,gptq "
                        "[default: rtn]")
    q.add_argument("--algo-arg", "--algo_arg", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an algorithm option, e.g. gptq:damp=0.05, gptq:act_order=false, awq:clip=false, "
                        "smoothquant:alpha=0.6; repeatable (options are listed in the README)")
    q.add_argument("--recipe", default=None, help="a recipe.yaml/.json (replaces the scheme/layer/algo options)")
    q.add_argument("--num-calib-data", "--num_calib_data", type=count(1), default=128,
                   help="calibration windows, for calibrated algorithms [default: 128]")
    q.add_argument("--seed", type=count(0, MAX_SEED), default=0, help="seed for calibration window sampling [default: 0]")
    q.add_argument("--batch-size", "--batch_size", type=count(1), default=8, help="calibration batch size [default: 8]")
    q.add_argument("--propagate", choices=["quantized", "float"], default=DEFAULT_CALIBRATION["propagate"],
                   help="next block's calibration inputs: outputs of the float block, taken from the statistics "
                        "pass, or of the quantized block (one more forward per block; always so for "
                        "true-sequential GPTQ and static activation ranges) [default: float]")
    _add_data_args(q, "quantize")
    q.add_argument("--export", default=None, metavar="FORMATS",
                   help=f"also write these formats beside the output, comma-separated ({', '.join(EXPORT_NAMES)}): "
                        f"OUT-awq/, OUT-gptq/, OUT-onnx/, OUT-compressed-tensors/, OUT.gguf; a format that cannot "
                        f"hold the scheme is refused before calibration")
    _add_export_options(q)
    add_onnx_args(q)
    q.add_argument("--eval", action="store_true", help="after quantizing, measure perplexity of the result")
    q.add_argument("--skip-quantization", "--skip_quantization", action="store_true",
                   help="do not quantize: evaluate the float model on --dataset and exit")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_eval_parser(sub) -> None:
    """The `eval` command: perplexity and lm-eval tasks of one model."""
    e = sub.add_parser("eval", help="perplexity and size of a model",
                       description="Perplexity by the standard protocol: the whole text tokenized once, cut into "
                                   "non-overlapping windows of --seq-len tokens (at most --max-chunks), mean "
                                   "token negative log-likelihood over all windows, exponentiated.")
    e.add_argument("model", help="Hugging Face folder, .gguf file, `demo`, a lowbit output folder, or an ONNX model "
                                 "(a folder with genai_config.json / model.onnx, as lowbit's onnx export and "
                                 "onnxruntime-genai's builder write, or an .onnx file)")
    _add_data_args(e, "eval")
    e.add_argument("--batch-size", "--batch_size", type=count(1), default=4, help="windows per forward [default: 4]")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="compute dtype; auto = as stored [default: float32, so copies of one model agree]")
    e.add_argument("--runtime", default="torch", choices=["torch", "llama.cpp", "onnxruntime-genai"],
                   help="torch (any source, dequantized; ONNX models run in onnxruntime), llama.cpp (a .gguf file "
                        "run by llama-cpp-python) or onnxruntime-genai (an ONNX folder with genai_config.json) "
                        "[default: torch]")
    _add_task_args(e)
    e.add_argument("--json", action="store_true", help="print one JSON object (perplexity, windows, tokens, ...)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_bench_parser(sub) -> None:
    """The `bench` command: speed, memory and size of one model."""
    b = sub.add_parser("bench", help="prefill and decode speed, peak memory and size of a model",
                       description="Time prefill (a PROMPT_TOKENS prompt from the built-in text) and greedy decode "
                                   "(NEW_TOKENS tokens, batch 1, KV cache) over --runs runs after --warmup, in a "
                                   "fresh process per model; prints the median and spread, peak memory and size.")
    b.add_argument("model", help="Hugging Face folder, .gguf file, `demo`, a lowbit output folder or an ONNX folder")
    _add_speed_args(b)
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_compare_parser(sub) -> None:
    """The `compare` command: several models measured side by side."""
    c = sub.add_parser("compare", help="measure several models side by side: table, JSON, PNG and HTML",
                       description="Measure each MODEL the way `lowbit eval` and `lowbit bench` do (perplexity on "
                                   "--dataset, lm-eval --tasks, speed, size, bits per weight, per-layer errors from "
                                   "lowbit's summary.json) and write OUT/compare.json, compare.png and "
                                   "compare.html. The first model is the reference for the changes shown.")
    c.add_argument("models", nargs="+", metavar="MODEL", help="models to compare, each PATH or NAME=PATH")
    c.add_argument("-o", "--output", required=True, help="report folder")
    _add_data_args(c, "eval")
    _add_task_args(c)
    c.add_argument("--onnx-runtime", default="onnxruntime", choices=["onnxruntime", "onnxruntime-genai"],
                   help="where ONNX models are evaluated (speed always uses onnxruntime-genai for ONNX folders) "
                        "[default: onnxruntime]")
    c.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    _add_speed_args(c)
    c.add_argument("--overwrite", action="store_true", help="replace an existing report in the folder")
    c.add_argument("--json", action="store_true", help="print the rows as one JSON object")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_export_parser(sub) -> None:
    """The `export` command: a lowbit folder re-written in another layout."""
    x = sub.add_parser("export", help="re-export a lowbit folder in another layout (no re-quantization)",
                       description="Write the quantized weights of a lowbit output folder in a layout other "
                                   "runtimes load, moving the stored codes and scales as they are. A scheme "
                                   "the layout cannot hold is refused before anything is written.")
    x.add_argument("model", help="a lowbit output folder")
    x.add_argument("-f", "--format", required=True, choices=EXPORT_NAMES,
                   help="; ".join(f"{n}: {get_format_help(n)}" for n in EXPORT_NAMES))
    x.add_argument("-o", "--output", required=True, help="output folder (a .gguf file for gguf)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--json", action="store_true", help="print one JSON object (output path, format, size)")
    _add_export_options(x)


def _add_inspect_parser(sub) -> None:
    """The `inspect` command: architecture, linears and what a scheme would do."""
    i = sub.add_parser("inspect", help="architecture, layers, shapes and what a scheme would do",
                       description="Show MODEL's architecture and linear layers; with --scheme, the per-module "
                                   "plan (which layers are quantized, and how) without quantizing.",
                       epilog=EPILOG_SCHEMES)
    i.add_argument("model", help="Hugging Face folder, .gguf file, `demo`, or a lowbit output folder")
    _add_recipe_args(i, required=False)
    i.add_argument("--json", action="store_true", help="print one JSON object")


def _recipe_from_args(args):
    from .api import make_recipe
    from .recipe import Recipe

    if getattr(args, "recipe", None):
        if not os.path.isfile(args.recipe):
            raise LowbitError(f"recipe file {args.recipe} {'is not a file' if os.path.exists(args.recipe) else 'not found'}")
        return Recipe.load(args.recipe)
    if not args.scheme:
        return None
    return make_recipe(scheme=args.scheme, group_size=args.group_size, algo=getattr(args, "algo", "rtn"),
                       exclude_layers=args.exclude_layers, overrides=args.override,
                       dataset=getattr(args, "dataset", "pydoc"), num_calib_data=getattr(args, "num_calib_data", 128),
                       seq_len=getattr(args, "seq_len", 512), seed=getattr(args, "seed", 0),
                       batch_size=getattr(args, "batch_size", 8), algo_args=getattr(args, "algo_arg", []),
                       propagate=getattr(args, "propagate", DEFAULT_CALIBRATION["propagate"]),
                       kv_cache_dtype=args.kv_cache_dtype, moe_experts_scheme=args.moe_experts_second_step_config)


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_quantize(args) -> int:
    from . import api

    modelopt_form = normalize_modelopt_args(args)
    if args.model is None:
        raise LowbitError("quantize needs a MODEL (a Hugging Face folder, .gguf file, `demo` or an ONNX model)")
    if args.skip_quantization:
        args.batch_size = 4  # the evaluation batch, not the calibration one
        return cmd_eval(args)
    recipe = _recipe_from_args(args)
    if recipe is None:
        raise LowbitError("quantize needs --scheme NAME (e.g. --scheme w_uint4_per_group_asym) or --recipe FILE")
    if args.output is None:
        raise LowbitError("quantize needs an output folder: -o OUT")
    onnx = None
    if api.is_onnx_model(args.model):
        if args.export:
            raise LowbitError("--export applies to Hugging Face / GGUF sources; an ONNX model is written as ONNX")
        onnx = onnx_options(args, modelopt_form)
    else:
        given = [flag for flag, dest in ONNX_ONLY if getattr(args, dest) not in (None, False, "cpu", "minmax")]
        if given:
            raise LowbitError(f"{given[0]} applies to ONNX models only, and {args.model} is not one")
    result = api.quantize(args.model, args.output, recipe=recipe, overwrite=args.overwrite,
                          evaluate_after=args.eval, eval_dataset=args.dataset, eval_seq_len=args.seq_len,
                          max_chunks=args.max_chunks, progress=not args.no_progress, quiet=args.json,
                          export=args.export, export_options=_export_options(args), onnx_options=onnx)
    s = result.summary
    if args.json:
        print(to_json({"output": str(result.output), **s}))
        return 0
    print(f"wrote {result.output}: {s['quantized_modules']} linears quantized ({s['scheme']}, "
          f"{'+'.join(s['algorithms'])}) in {s['seconds']['quantize']:.1f} s "
          f"(total {s['seconds']['total']:.1f} s, peak memory {_fmt_size(s['peak_rss_bytes'])})")
    print(f"size: {_fmt_size(s['source_size_bytes'])} -> {_fmt_size(s['output_size_bytes'])}; "
          f"mean relative weight error {s.get('mean_layer_error', 0):.4f}")
    if "perplexity" in s:
        print(f"perplexity: {s['perplexity']['perplexity']:.4f} over {s['perplexity']['windows']} windows")
    for name, path in s.get("exports", {}).items():
        print(f"exported {name}: {path}")
    return 0


def cmd_eval(args) -> int:
    from . import api

    tasks = getattr(args, "tasks", None)
    dataset = _perplexity_dataset(args)
    if tasks:
        from .eval.tasks import check_tasks

        check_tasks(tasks, args.task_dir)  # before the perplexity run
    result = perplexity = {}
    if dataset is not None:
        result = perplexity = api.evaluate(args.model, dataset=dataset, seq_len=args.seq_len, max_chunks=args.max_chunks,
                              batch_size=getattr(args, "batch_size", 4), progress=not args.no_progress,
                              dtype=getattr(args, "dtype", "float32"), runtime=getattr(args, "runtime", "torch"))
    if tasks:
        from .eval.tasks import evaluate_tasks

        task_result = evaluate_tasks(args.model, tasks, runtime=getattr(args, "runtime", "torch"),
                                     task_dir=args.task_dir, num_fewshot=args.num_fewshot, limit=args.limit,
                                     dtype=getattr(args, "dtype", "float32"))
        result = {**task_result, **result, "tasks": task_result["tasks"]}
    if args.json:
        print(to_json(result))
        return 0
    if perplexity:
        _print_perplexity(args.model, dataset, perplexity)
    if tasks:
        print(format_tasks(args.model, result))
    return 0


def _print_perplexity(model, dataset: str, result: dict) -> None:
    if "runtime" in result:
        print(f"{model} (in {result['runtime']}): perplexity {result['perplexity']:.4f} on {dataset} "
              f"({result['windows']} windows x {result['seq_len']} tokens, {result['tokens']} predicted tokens); "
              f"size {_fmt_size(result['size_bytes'])}")
    else:
        kind = f"quantized, {result['scheme']}" if result["quantized"] else "float"
        print(f"{model} ({kind}): perplexity {result['perplexity']:.4f} on {dataset} in {result['dtype']} "
              f"({result['windows']} windows x {result['seq_len']} tokens, {result['tokens']} predicted tokens); "
              f"size {_fmt_size(result['size_bytes'])}, {result['parameters'] / 1e6:.1f} M parameters")


def format_tasks(model, result: dict) -> str:
    """One line per lm-eval task: its headline metric with the standard error and the number of documents."""
    lines = [f"{model} (in {result['runtime']}, lm-eval {result['lm_eval_version']}, "
             f"{result['num_fewshot'] or 0}-shot):"]
    for task, r in result["tasks"].items():
        stderr = f" +- {r['stderr']:.4f}" if r["stderr"] is not None else ""
        lines.append(f"  {task:<24} {r['metric']:<12} {r['value']:.4f}{stderr}  ({r['samples']} documents)")
    return "\n".join(lines)


def cmd_bench(args) -> int:
    from .eval.speed import measure_speed

    r = measure_speed(args.model, runtime=args.runtime, progress=not args.no_progress, **_speed_args(args))
    if args.json:
        print(to_json(r))
        return 0
    pre, dec = r["prefill_tokens_per_s"], r["decode_tokens_per_s"]
    print(f"{args.model} in {r['runtime']} ({r['threads']} threads, {r['runs']} runs, median [min-max]):")
    print(f"  prefill {r['prompt_tokens']} tokens: {pre['median']:.1f} tokens/s [{pre['min']:.1f}-{pre['max']:.1f}]")
    print(f"  decode {r['new_tokens']} tokens:  {dec['median']:.1f} tokens/s [{dec['min']:.1f}-{dec['max']:.1f}]")
    print(f"  peak memory {_fmt_size(r['peak_rss_bytes'])}; size on disk {_fmt_size(r['size_bytes'])}")
    return 0


def cmd_compare(args) -> int:
    import platform

    from . import __version__
    from .eval.compare import compare
    from .eval.report import check_report_dir, format_table, write_report

    check_report_dir(args.output, args.overwrite)
    dataset = _perplexity_dataset(args)
    speed_args = {**_speed_args(args), "runtime": args.runtime}
    rows = compare(args.models, dataset=dataset, seq_len=args.seq_len, max_chunks=args.max_chunks, tasks=args.tasks,
                   task_dir=args.task_dir, limit=args.limit, num_fewshot=args.num_fewshot, speed=not args.no_speed,
                   speed_args=speed_args, onnx_runtime=args.onnx_runtime, progress=not args.no_progress)
    meta = {"command": "lowbit " + shlex.join(args.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "lowbit_version": __version__, "python": platform.python_version(), "dataset": dataset,
            "seq_len": args.seq_len, "max_chunks": args.max_chunks, "tasks": args.tasks, "limit": args.limit,
            "num_fewshot": args.num_fewshot, "speed": None if args.no_speed else speed_args}
    paths = write_report(rows, args.output, meta=meta, overwrite=args.overwrite)
    if args.json:
        print(to_json({"rows": rows, "files": {k: str(v) for k, v in paths.items()}}))
        return 0
    print(format_table(rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_export(args) -> int:
    from . import api

    options = _export_options(args).get(args.format, {})
    out = api.export(args.model, args.output, args.format, overwrite=args.overwrite, quiet=args.json, **options)
    if args.json:
        from .eval.speed import size_on_disk

        print(to_json({"output": str(out), "format": args.format, "size_bytes": size_on_disk(out)}))
        return 0
    print(f"wrote {out} ({args.format})")
    return 0


def cmd_inspect(args) -> int:
    from . import api

    info = api.inspect(args.model, _recipe_from_args(args))
    if args.json:
        info.pop("plan_table", None)
        print(to_json(info))
        return 0
    print(f"{info['architecture']} ({info['model_type']}): {info['num_layers']} blocks at {info['blocks']}, "
          f"hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['parameters'] / 1e6:.1f} M parameters "
          f"({info['dtype']}), tied embeddings: {info['tied_embeddings']}, {_fmt_size(info['size_bytes'])} on disk")
    if "quantization" in info:
        print(f"quantized by lowbit: {info['quantization']}")
    if "plan_table" in info:
        print(info["plan_table"])
    else:
        shapes: dict[str, list[str]] = {}
        for name, (n_out, n_in) in info["linears"].items():
            shapes.setdefault(re.sub(r"[.]\d+[.]", ".*.", name), []).append(f"{n_out}x{n_in}")
        for pattern, s in shapes.items():
            print(f"  {pattern:<40} x{len(s):<3} out x in = {s[0]}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: `error: argument --seq-len: ... (see lowbit eval --help)`."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop like Ctrl-C (staged outputs are removed on the way out)."""


def _stop(signum, frame):
    """SIGTERM / SIGHUP in the lowbit command: stop like Ctrl-C (a second signal stops at once)."""
    signal.signal(signum, signal.SIG_DFL)
    raise Terminated(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _default_signals_in_child() -> None:
    """A forked child (a multiprocessing worker: lm-eval's bootstrap pool, say) must die on the SIGTERM its pool
    sends, as without lowbit: with _stop inherited, a signal arriving as the worker starts was lost and the pool
    waited for ever (reproduced: 300 pools of 2 workers hung)."""
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is _stop:
            signal.signal(sig, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_default_signals_in_child)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handlers = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        return COMMANDS[args.command](args)
    except LowbitError as exc:
        return _fail(str(exc), 2)
    except Terminated as exc:
        return _fail(f"stopped by {exc}; nothing was written (an unfinished output is removed)", 128 + getattr(
            signal, str(exc), signal.SIGTERM))
    except KeyboardInterrupt:
        return _fail("interrupted; nothing was written (an unfinished output is removed)", 130)
    except MemoryError:
        return _fail("out of memory; use a smaller --batch-size or --num-calib-data", 1)
    except ModuleNotFoundError as exc:
        return _fail(_missing_package(exc), 2)
    except OSError as exc:
        return _fail(_os_error(exc), 2)
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"internal error ({type(exc).__name__}: {first}); please report it, with the traceback that "
                     f"LOWBIT_DEBUG=1 shows", 1)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


# optional packages (top-level module) -> the extra of pyproject.toml that installs them
EXTRAS = {"onnx": "onnx", "onnxruntime": "onnx", "onnxruntime_genai": "genai", "onnx_ir": "genai", "lm_eval": "eval",
          "matplotlib": "eval", "llama_cpp": "llama", "datasets": "data", "pyarrow": "data",
          "compressed_tensors": "test"}


def _missing_package(exc: ModuleNotFoundError) -> str:
    """One line for an optional package this command needs and the machine lacks."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    how = f"pip install -e \".[{extra}]\" (or lowbit[{extra}])" if extra else f"pip install {top}"
    return f"this needs the Python package {top!r}, which is not installed; {how}"


def _os_error(exc: OSError) -> str:
    """One line for a system error while reading or writing: what failed, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"no space left to write{where}: {exc.strerror}; nothing was written (an unfinished output is "
                f"removed); free some space or choose an output on another disk")
    return f"{exc.strerror or exc}{where}; nothing was written (an unfinished output is removed)"


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "export": cmd_export,
            "bench": cmd_bench, "compare": cmd_compare}


if __name__ == "__main__":
    sys.exit(main())

"""The `lowbit` command line's parser: every subcommand's arguments and help texts (cli.py runs them)."""

from __future__ import annotations

import argparse

from .argtypes import MAX_SEED, count, positive_number
from .exporters.formats import NAMES as EXPORT_NAMES, help_text as get_format_help
from .onnx.options import add_onnx_args
from .peer_flags import add_peer_args
from .recipe import DEFAULT_CALIBRATION

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
    p.add_argument("--gguf-type", default=None, type=str.lower, metavar="TYPE",
                   choices=["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "mxfp4", "iq4_nl", "q2_k", "q3_k", "q4_k", "q5_k",
                            "q6_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "iq4_xs", "f16",
                            "bf16", "f32"],
                   help="gguf: one type for every quantized linear (q4_0 q4_1 q5_0 q5_1 q8_0 mxfp4 iq4_nl q2_k q3_k "
                        "q4_k q5_k q6_k), or one of llama.cpp's K-quant mixes, each tensor's type chosen as "
                        "llama-quantize chooses it (q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k iq4_xs); "
                        "re-quantized where the stored codes do not map [default: the exact type per layer, else "
                        "the nearest, with a warning]; f16 bf16 f32: a float GGUF (quantized linears dequantized) "
                        "of any model, for llama-quantize; a float model (HF folder, .gguf, demo) takes these or a mix")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="gguf: an importance matrix (llama.cpp's imatrix .gguf, from llama-imatrix or `lowbit "
                        "imatrix`) weighting the scale searches of re-quantized K-quant / IQ4_NL tensors")
    p.add_argument("--accuracy-level", "--accuracy_level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                   help="onnx: MatMulNBits accuracy_level (lowest precision of the activations inside the kernel: "
                        "1 fp32, 2 fp16, 3 bf16, 4 int8) [default: 0, unset]")
    p.add_argument("--quantize-embedding", type=int, default=None, choices=[4, 8], metavar="BITS",
                   help="onnx: store the embedding table with BITS-bit blocks (GatherBlockQuantized) [default: float]")
    p.add_argument("--onnx-dtype", "--onnx_dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="onnx: the float type of activations, logits, KV cache, norms, tables and MatMulNBits scales "
                        "(bfloat16 is refused: onnxruntime's CPU kernels lack it) [default: float32]")


def _add_task_args(p, after: str = "also (or, without --dataset, only) measure") -> None:
    p.add_argument("--tasks", default=None, metavar="TASKS",
                   help=f"{after} lm-eval-harness task accuracy: comma-separated task names "
                        f"(lambada_openai,hellaswag) or task YAML files; needs pip install lm_eval")
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


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: `error: argument --seq-len: ... (see lowbit eval --help)`."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


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
    _add_imatrix_parser(sub)
    _add_inspect_parser(sub)
    _add_generate_parser(sub)
    _add_chat_parser(sub)
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
                        "one quantizer (rtn, gptq, gptaq, qronos or autoround; rtn if none), e.g. awq, gptq, awq,gptq, "
                        "gptaq, autoround, smoothquant,gptq "
                        "[default: rtn]")
    q.add_argument("--algo-arg", "--algo_arg", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                   help="an algorithm option, e.g. gptq:damp=0.05, gptq:act_order=false, awq:clip=false, "
                        "smoothquant:alpha=0.6; repeatable (options are listed in the README)")
    q.add_argument("--target-bits", "--target_bits", type=positive_number, default=None, metavar="B",
                   help="mixed precision: choose each linear's bits (2/3/4/8) and group size (32/64/128) of the "
                        "integer scheme from its sensitivity measured on the calibration windows, for B stored bits "
                        "per weight on average (scales and zero points included); the plan is printed and recorded "
                        "in recipe.yaml")
    q.add_argument("--sensitivity", choices=["fisher", "relative", "output", "weight"], default="fisher",
                   help="the measure --target-bits minimises, summed over the linears: each one's output error on "
                        "the calibration inputs weighted per output channel by the loss's squared gradient (fisher: "
                        "one forward and backward pass of the whole float model per window, which must fit in "
                        "memory), that error relative to the output (relative), unscaled (output), or the weight "
                        "error alone (weight) [default: fisher]")
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
    _add_scale_args(q)
    add_onnx_args(q)
    add_peer_args(q)
    q.add_argument("--eval", action="store_true", help="after quantizing, measure perplexity of the result")
    q.add_argument("--skip-quantization", "--skip_quantization", action="store_true",
                   help="do not quantize: evaluate the float model on --dataset and exit")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_task_args(q, after="after quantizing, measure")
    q.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_scale_args(q) -> None:
    """Where the engine runs and how a long run survives a crash (Hugging Face / GGUF sources)."""
    g = q.add_argument_group("devices and models larger than memory (Hugging Face / GGUF sources)")
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="where each block is calibrated and quantized: cpu, cuda, cuda:N or auto (a GPU when one "
                        "is present) [default: auto]")
    g.add_argument("--calib-dtype", "--calib_dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="working precision of the block and its activations (statistics and solves stay float32) "
                        "[default: auto = float32 on the CPU, bfloat16 on a GPU]")
    g.add_argument("--offload-dir", "--offload_dir", default=None, metavar="DIR",
                   help="spill calibration activations between blocks to files in DIR, so memory holds one "
                        "batch of them instead of all")
    g.add_argument("--resume", action="store_true",
                   help="checkpoint after every block (finished tensors and the next block's inputs, in the staging "
                        "folder beside OUT) and continue an interrupted run of the same command from its last "
                        "finished block; the output is byte-for-byte that of an uninterrupted run")
    g.add_argument("--nproc", type=count(1, 1024), default=None, metavar="N",
                   help="run as N processes on this host (torchrun's launcher, torch.distributed: gloo on CPUs, "
                        "nccl with one GPU each): calibration windows and solves are shared; for several hosts "
                        "start `torchrun ... -m lowbit quantize ...` on each instead")


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
    e.add_argument("--runtime", default="auto", choices=["auto", "torch", "llama.cpp", "onnxruntime-genai"],
                   help="torch (any source, dequantized; ONNX models run in onnxruntime), llama.cpp (a .gguf file "
                        "run by llama-cpp-python) or onnxruntime-genai (an ONNX folder with genai_config.json); "
                        "auto: llama.cpp for .gguf files and demo when llama-cpp-python is installed (and no "
                        "--dtype/--stream/--offload-dir is given), else torch, saying so [default: auto]")
    stream = e.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="torch perplexity one decoder block in memory at a time (the same figure) [default: "
                             "only when the weights in --dtype do not fit in the memory available]")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="hold the whole model in memory")
    e.add_argument("--offload-dir", "--offload_dir", default=None, metavar="FOLDER",
                   help="with a stream: keep the hidden states of the windows in a temporary folder made here "
                        "instead of in memory")
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
    c.add_argument("--prompts", default=None, metavar="FILE",
                   help="also show each model's greedy answers to these prompts side by side (one per line, or a "
                        ".jsonl of {\"prompt\": ...}), through its chat template when it has one")
    c.add_argument("--max-new-tokens", type=count(1), default=64, help="tokens per answer to --prompts [default: 64]")
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
    x.add_argument("model", help="a lowbit output folder; for gguf with --gguf-type f16/bf16/f32 or a K-quant mix, "
                                 "also a Hugging Face folder, .gguf file or `demo`")
    x.add_argument("-f", "--format", required=True, choices=EXPORT_NAMES,
                   help="; ".join(f"{n}: {get_format_help(n)}" for n in EXPORT_NAMES))
    x.add_argument("-o", "--output", required=True, help="output folder (a .gguf file for gguf)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output")
    x.add_argument("--json", action="store_true", help="print one JSON object (output path, format, size)")
    _add_export_options(x)


def _add_imatrix_parser(sub) -> None:
    """The `imatrix` command: llama.cpp's importance matrix from lowbit's calibration pass."""
    m = sub.add_parser("imatrix", help="write llama.cpp's importance matrix (imatrix .gguf) of a model",
                       description="One float pass of MODEL over the calibration windows, block by block, "
                                   "recording each linear's mean squared input activation per column, written "
                                   "as the imatrix .gguf llama-imatrix writes: it weights the K-quant searches of "
                                   "`lowbit export -f gguf --gguf-type MIX --imatrix FILE` and of llama.cpp's "
                                   "llama-quantize --imatrix.")
    m.add_argument("model", help="Hugging Face folder, .gguf file or `demo`")
    m.add_argument("-o", "--output", required=True, help="the imatrix file to write (.gguf)")
    m.add_argument("--dataset", default="pydoc", help="calibration text (as for quantize) [default: pydoc]")
    m.add_argument("--num-calib-data", "--num_calib_data", type=int, default=128,
                   help="calibration windows [default: 128]")
    m.add_argument("--seq-len", "--seq_len", type=int, default=512, help="tokens per window [default: 512]")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_inspect_parser(sub) -> None:
    """The `inspect` command: architecture, linears and what a scheme would do."""
    i = sub.add_parser("inspect", help="architecture, layers, shapes and what a scheme would do",
                       description="Show MODEL's architecture and linear layers; with --scheme, the per-module "
                                   "plan (which layers are quantized, and how) without quantizing.",
                       epilog=EPILOG_SCHEMES)
    i.add_argument("model", help="Hugging Face folder, .gguf file, `demo`, or a lowbit output folder")
    _add_recipe_args(i, required=False)
    i.add_argument("--json", action="store_true", help="print one JSON object")


GENERATE_MODEL_HELP = ("Hugging Face folder, lowbit output folder, compressed-tensors folder (torch), an ONNX folder with "
                       "genai_config.json (onnxruntime-genai), a .gguf file or `demo` (llama.cpp)")


def _add_sampling_args(p) -> None:
    """Runtime, sampling and prompt-format options shared by generate and chat."""
    p.add_argument("--runtime", default="auto", choices=["auto", "torch", "llama.cpp", "onnxruntime-genai"],
                   help="auto = onnxruntime-genai for ONNX folders, llama.cpp for .gguf files and demo (torch when "
                        "llama-cpp-python is missing), torch otherwise; torch runs a .gguf file dequantized "
                        "[default: auto]")
    p.add_argument("--max-new-tokens", type=count(1), default=128, help="tokens per answer at most [default: 128]")
    p.add_argument("--do-sample", action="store_true", help="sample (the runtime's own sampler) instead of greedy")
    p.add_argument("--temperature", type=positive_number, default=1.0, help="with --do-sample [default: 1.0]")
    p.add_argument("--top-p", type=positive_number, default=1.0, help="with --do-sample: nucleus mass [default: 1.0]")
    p.add_argument("--top-k", type=count(1), default=50, help="with --do-sample: the k likeliest tokens [default: 50]")
    p.add_argument("--seed", type=count(0, MAX_SEED), default=None, help="sampling seed [default: random]")
    p.add_argument("--repetition-penalty", type=positive_number, default=1.0,
                   help="divide repeated tokens' logits by this (1 = none) [default: 1.0]")
    p.add_argument("--system", default=None, metavar="TEXT", help="a system turn before the conversation")
    p.add_argument("--threads", type=count(1), default=None, help="CPU threads [default: the runtime's]")


def _add_generate_parser(sub) -> None:
    """The `generate` command: answers to prompts, streamed, in the model's own runtime."""
    g = sub.add_parser("generate", help="generate text from prompts in the model's runtime",
                       description="Answer each PROMPT (none: --prompts FILE, else stdin, one prompt per line) with "
                                   "MODEL in the runtime it belongs to, streaming the text as it is produced; a "
                                   "prompt is one user turn of the model's chat template when it has one. Greedy "
                                   "unless --do-sample.")
    g.add_argument("model", help=GENERATE_MODEL_HELP)
    g.add_argument("prompt", nargs="*", help="prompts, one per argument")
    g.add_argument("--prompts", default=None, metavar="FILE",
                   help="read the prompts from FILE: one per line, or a .jsonl of {\"prompt\": ...} objects")
    g.add_argument("--no-chat-template", action="store_true", help="feed each prompt's text as it is")
    _add_sampling_args(g)
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt (prompt, output, tokens, runtime, seconds), no streaming")


def _add_chat_parser(sub) -> None:
    """The `chat` command: a conversation over stdin."""
    c = sub.add_parser("chat", help="chat with a model (multi-turn, through its chat template)",
                       description="Read user turns from stdin, one per line, and stream each answer; the "
                                   "conversation goes through the model's chat template. /reset clears the "
                                   "history, /exit or end of input ends.")
    c.add_argument("model", help=GENERATE_MODEL_HELP)
    _add_sampling_args(c)

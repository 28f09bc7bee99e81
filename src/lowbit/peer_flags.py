"""The flags users bring from the peers' example scripts: AMD Quark's LLM PTQ example (quantize_quark.py), Intel
Neural Compressor's weight-only example and NVIDIA ModelOpt's Hugging Face PTQ example (hf_ptq.py). The ones that
mean something in lowbit are accepted by `lowbit quantize` and translated here into lowbit's own arguments
(`apply`); the rest, on any command, are answered in one line naming lowbit's equivalent (`answer`). ModelOpt's
ONNX flags are onnx/options.py's.

A top-level module beside cli.py: it only reads and rewrites the parsed arguments."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from .errors import LowbitError

QUARK, INC, MODELOPT = "AMD Quark's", "Intel Neural Compressor's", "NVIDIA ModelOpt's"

# Quark's --quant_algo names -> lowbit's --algo steps (None: answered instead)
QUARK_ALGOS = {"awq": "awq", "gptq": "gptq", "smoothquant": "smoothquant", "rotation": "rotation",
               "quarot": "rotation", "qronos": "qronos", "gptaq": "gptaq", "autoround": "autoround",
               "autosmoothquant": None}
# Quark's --model_export values -> lowbit's --export format (None: answered instead)
QUARK_EXPORTS = {"hf_format": "compressed-tensors", "vllm_adopted_safetensors": "compressed-tensors",
                 "gguf": "gguf", "onnx": "onnx", "quark_safetensors": None, "quark_format": None}
# Neural Compressor's --algorithm / --woq_algo names -> lowbit's --algo
INC_ALGOS = {"rtn": "rtn", "gptq": "gptq", "awq": "awq", "autoround": "autoround"}
# ModelOpt's --qformat -> (scheme, group size, algo chain)
MODELOPT_QFORMATS = {"fp8": ("w_fp8_a_fp8", None, "rtn"), "int8_sq": ("w_int8_a_int8_per_channel_sym", None,
                                                                      "smoothquant"),
                     "int4_awq": ("w_int4_per_group_sym", 128, "awq"), "nvfp4": ("w_nvfp4_a_nvfp4", None, "rtn"),
                     "nvfp4_awq": ("w_nvfp4_a_nvfp4", None, "awq"), "int8_wo": ("w_int8_per_channel_sym", None, "rtn"),
                     "int4_wo": ("w_int4_per_group_sym", 128, "rtn")}

# flags with no lowbit meaning of their own -> (whose, the one-line answer)
ANSWERS = {
    "--multi_gpu": (QUARK, "lowbit holds one decoder block at a time, so one GPU quantizes any model (--device "
                           "cuda); to spread a run over several GPUs start one process per GPU with --nproc N"),
    "--pack_method": (QUARK, "lowbit's exports pack as their runtime expects; choose the layout with --export "
                             "(awq, gptq, compressed-tensors, gguf, onnx)"),
    "--export_weight_format": (QUARK, "lowbit always writes packed (real) quantized weights; `lowbit eval OUT` "
                                      "measures them"),
    "--weight_matrix_merge": (QUARK, "lowbit keeps each linear as the model has it; the ONNX export fuses what "
                                     "onnxruntime fuses"),
    "--quant_algo_config_file": (QUARK, "give algorithm options as --algo-arg NAME:KEY=VALUE, or a whole recipe "
                                        "as --recipe recipe.yaml"),
    "--layer_quant_scheme": (QUARK, "use --override 'PATTERN:scheme=SCHEME' (repeatable)"),
    "--group_size_per_layer": (QUARK, "use --override 'PATTERN:group_size=N' (repeatable)"),
    "--params_save": (QUARK, "the output folder is the saved result; --resume checkpoints a long run"),
    "--params_load": (QUARK, "evaluate or export a lowbit folder with `lowbit eval OUT` / `lowbit export OUT`"),
    "--save_dir": (QUARK, "the output folder is -o OUT"),
    "--torch_compile": (QUARK, "not needed: lowbit's calibration runs eagerly block by block"),
    "--model_trust_remote_code": (QUARK, "lowbit runs no model's own code; it reads the families transformers "
                                         "knows"),
    "--trust_remote_code": (f"{QUARK} / {MODELOPT}", "lowbit runs no model's own code; it reads the families "
                                                     "transformers knows"),
    "--model_attn_implementation": (QUARK, "lowbit calibrates with transformers' eager/sdpa attention as "
                                           "loaded; nothing to choose"),
    "--min_kv_scale": (QUARK, "--kv-cache-dtype fp8 calibrates the K and V scales; no floor to set"),
    "--use_ppl_eval_model": (QUARK, "use --eval (perplexity of the result), or `lowbit eval OUT`"),
    "--use_ppl_eval_for_kv_cache": (QUARK, "use --eval with --kv-cache-dtype fp8"),
    "--eval_batch_size": (QUARK, "`lowbit eval OUT --batch-size N`"),
    "--max_eval_batch_size": (QUARK, "`lowbit eval OUT --batch-size N`"),
    "--import_file_format": (QUARK, "lowbit reloads its own folders and compressed-tensors exports: "
                                    "--model_reload --import_model_dir DIR, or `lowbit eval DIR`"),
    "--int8": (INC, "use --scheme w_int8_a_int8_per_tensor_sym (static) or w_int8_a_int8_per_token_dynamic"),
    "--int8_bf16_mixed": (INC, "use --scheme w_int8_a_int8_per_token_dynamic --calib-dtype bfloat16"),
    "--load": (INC, "evaluate a lowbit folder with `lowbit eval OUT` (add --tasks for lm-eval accuracy)"),
    "--double_quant_type": (INC, "lowbit's scales stay float; the K-quant schemes (w_q4_k, gguf_q4_k_m) "
                                 "quantize their scales as llama.cpp does"),
    "--woq_use_mse_search": (INC, "lowbit's GPTQ and AWQ search the clipping range on the output error "
                                  "(gptq:clip=true, awq:clip=true, the defaults)"),
    "--sq": (INC, "use --algo smoothquant (and --algo-arg smoothquant:alpha=A)"),
    "--alpha": (INC, "use --algo-arg smoothquant:alpha=A"),
    "--export_fmt": (MODELOPT, "choose the layout with --export (compressed-tensors, awq, gptq, gguf, onnx)"),
    "--inference_tensor_parallel": (MODELOPT, "lowbit's exports are not sharded by tensor parallelism; the "
                                              "runtime shards them"),
    "--inference_pipeline_parallel": (MODELOPT, "lowbit's exports are not sharded by pipeline stages; the "
                                                "runtime places them"),
    "--awq_block_size": (MODELOPT, "use --group-size N"),
    "--auto_quantize_bits": (MODELOPT, "use --target-bits B (mixed precision from measured sensitivity)"),
}


def add_peer_args(p) -> None:
    """The peers' flags `lowbit quantize` accepts (their help says what each becomes)."""
    g = p.add_argument_group("flags of AMD Quark, Intel Neural Compressor and NVIDIA ModelOpt (translated)")
    g.add_argument("--model_dir", "--model", "--pyt_ckpt_path", dest="peer_model", default=None, metavar="MODEL",
                   help="MODEL (Quark's, Neural Compressor's, ModelOpt's spelling)")
    g.add_argument("--export_path", dest="peer_output", default=None, metavar="OUT", help="-o (ModelOpt's spelling)")
    g.add_argument("--quant_algo", default=None, metavar="ALGOS",
                   help="Quark's algorithms, comma-separated: awq, gptq, smoothquant, rotation / quarot, qronos, "
                        "gptaq, autoround -> --algo")
    g.add_argument("--model_export", nargs="+", action="extend", default=None, metavar="FORMAT",
                   help="Quark's export formats: hf_format / vllm_adopted_safetensors -> --export compressed-tensors "
                        "(what transformers and vLLM load), gguf, onnx")
    g.add_argument("--custom_mode", default=None, choices=["quark", "awq", "fp8"],
                   help="Quark's hf_format flavour: awq -> --export awq (AutoAWQ's layout), fp8 -> --export "
                        "compressed-tensors (vLLM's FP8 layout)")
    g.add_argument("--model_reload", action="store_true",
                   help="with --import_model_dir DIR: evaluate (and --model_export) that lowbit or "
                        "compressed-tensors folder instead of quantizing (Quark's reload)")
    g.add_argument("--import_model_dir", default=None, metavar="DIR", help="the folder --model_reload reloads")
    g.add_argument("--skip_evaluation", action="store_true", help="accepted: lowbit evaluates only with --eval")
    g.add_argument("--data_type", default=None, choices=["auto", "float16", "bfloat16", "float32"],
                   help="Quark's model dtype -> --calib-dtype")
    g.add_argument("--eval_task", dest="peer_tasks", default=None, metavar="TASKS", help="Quark's spelling of --tasks")
    g.add_argument("--algorithm", "--woq_algo", dest="inc_algorithm", default=None, type=str.lower,
                   choices=sorted(INC_ALGOS), help="Neural Compressor's algorithm -> --algo")
    g.add_argument("--woq_bits", type=int, default=None, choices=range(2, 9), metavar="BITS",
                   help="Neural Compressor's weight bits (2-8) -> --scheme w_{int|uint}BITS_per_group_*")
    g.add_argument("--woq_group_size", type=int, default=None, metavar="N",
                   help="Neural Compressor's group size (-1: per output channel) -> --group-size")
    g.add_argument("--woq_scheme", default=None, type=str.lower, choices=["sym", "asym"],
                   help="Neural Compressor's sym (int codes) / asym (uint codes with zero points)")
    g.add_argument("--woq_dtype", default=None, type=str.lower, help="Neural Compressor's weight dtype: int")
    g.add_argument("--quantize", action="store_true", help="accepted (Neural Compressor's): lowbit quantize does")
    g.add_argument("--accuracy", action="store_true",
                   help="Neural Compressor's: after quantizing, lm-eval --tasks (or, without --tasks, perplexity)")
    g.add_argument("--approach", default=None, choices=["weight_only"], help="accepted (Neural Compressor's)")
    g.add_argument("--gptq_actorder", action="store_true", help="-> --algo-arg gptq:act_order=true")
    g.add_argument("--gptq_percdamp", type=float, default=None, help="-> --algo-arg gptq:damp=X")
    g.add_argument("--gptq_block_size", type=int, default=None, help="-> --algo-arg gptq:block_size=N")
    g.add_argument("--gptq_max_seq_length", type=int, default=None, help="-> --seq-len")
    g.add_argument("--gptq_use_max_length", action="store_true", help="accepted: windows are always --seq-len long")
    g.add_argument("--qformat", default=None, type=str.lower,
                   help=f"ModelOpt's format: {', '.join(MODELOPT_QFORMATS)} -> --scheme and --algo")
    g.add_argument("--kv_cache_qformat", default=None, type=str.lower, choices=["fp8", "none"],
                   help="ModelOpt's KV-cache format -> --kv-cache-dtype")


@dataclass
class Reload:
    """Quark's --model_reload: evaluate (and export) an existing quantized folder instead of quantizing."""

    folder: str
    exports: list[str]
    evaluate: bool


def apply(args) -> Reload | None:
    """Rewrite the peers' flags given to `lowbit quantize` into lowbit's own arguments, in place; refuse in one
    line what has no lowbit form, or what is given twice in two spellings. Returns a Reload for Quark's
    --model_reload, else None."""
    _one(args, "model", args.peer_model, "the model", "MODEL or --model_dir/--model/--pyt_ckpt_path")
    _one(args, "output", args.peer_output, "the output", "-o or --export_path")
    _algorithms(args)
    _inc_scheme(args)
    _modelopt_format(args)
    if args.data_type is not None:
        args.calib_dtype = args.calib_dtype or args.data_type
    if args.peer_tasks:
        _one(args, "tasks", args.peer_tasks, "the tasks", "--tasks or --eval_task")
    if args.accuracy and not args.tasks:
        args.eval = True
    if args.gptq_max_seq_length is not None:
        args.seq_len = args.gptq_max_seq_length
    exports = _exports(args)
    if args.import_model_dir is not None or args.model_reload:
        if not (args.import_model_dir and args.model_reload):
            raise LowbitError("Quark's reload needs both --model_reload and --import_model_dir DIR (or run "
                              "`lowbit eval DIR`)")
        return Reload(args.import_model_dir, exports, not args.skip_evaluation)
    if exports:
        args.export = ",".join(dict.fromkeys([*(args.export.split(",") if args.export else []), *exports]))
    return None


def _one(args, dest: str, value, what: str, spellings: str) -> None:
    """Set args.dest from a peer spelling, refusing two different values."""
    if value is None:
        return
    if getattr(args, dest) not in (None, value):
        raise LowbitError(f"{what} is given twice ({getattr(args, dest)} and {value}); give it once: {spellings}")
    setattr(args, dest, value)


def _set_algo(args, algo: str, flag: str) -> None:
    if args.algo not in ("rtn", algo):
        raise LowbitError(f"--algo {args.algo} and {flag} both name the algorithms; give one of them")
    args.algo = algo


def _algorithms(args) -> None:
    if args.quant_algo:
        steps = []
        for name in (s.strip().lower() for s in args.quant_algo.split(",") if s.strip()):
            if name not in QUARK_ALGOS:
                raise LowbitError(f"unknown --quant_algo {name!r}; lowbit's algorithms: {', '.join(QUARK_ALGOS)} "
                                  f"(--algo)")
            if QUARK_ALGOS[name] is None:
                raise LowbitError("Quark's autosmoothquant (a per-layer alpha search) is not in lowbit; use "
                                  "--algo smoothquant with --algo-arg smoothquant:alpha=A")
            steps.append(QUARK_ALGOS[name])
        _set_algo(args, ",".join(steps), "--quant_algo")
    if args.inc_algorithm:
        _set_algo(args, INC_ALGOS[args.inc_algorithm], "--algorithm")
    gptq = ["act_order=true"] if args.gptq_actorder else []
    gptq += [f"damp={args.gptq_percdamp}"] if args.gptq_percdamp is not None else []
    gptq += [f"block_size={args.gptq_block_size}"] if args.gptq_block_size is not None else []
    if gptq:
        args.algo_arg = [*args.algo_arg, "gptq:" + ",".join(gptq)]


def _inc_scheme(args) -> None:
    """Neural Compressor's --woq_bits / --woq_group_size / --woq_scheme / --woq_dtype as one lowbit scheme."""
    given = [f for f, v in (("--woq_bits", args.woq_bits), ("--woq_group_size", args.woq_group_size),
                            ("--woq_scheme", args.woq_scheme), ("--woq_dtype", args.woq_dtype)) if v is not None]
    if not given:
        return
    if args.scheme is not None:
        raise LowbitError(f"--scheme and {given[0]} both describe the weights; give --scheme alone, or the woq flags")
    if args.woq_dtype not in (None, "int"):
        raise LowbitError(f"--woq_dtype {args.woq_dtype}: lowbit's weight-only formats are int (these flags), "
                          f"--scheme w_nvfp4, w_mxfp4, w_fp8 and llama.cpp's w_q4_k ...; no {args.woq_dtype}")
    sym = (args.woq_scheme or "sym") == "sym"
    group = 128 if args.woq_group_size is None else args.woq_group_size
    if group == 0 or group < -1:
        raise LowbitError(f"--woq_group_size must be a positive group size or -1 (per channel), got {group}")
    granularity = "channel" if group == -1 else "group"
    args.scheme = f"w_{'int' if sym else 'uint'}{args.woq_bits or 4}_per_{granularity}_{'sym' if sym else 'asym'}"
    if group != -1:
        _one(args, "group_size", group, "the group size", "--group-size or --woq_group_size")


def _modelopt_format(args) -> None:
    if args.kv_cache_qformat is not None:
        _one(args, "kv_cache_dtype", None if args.kv_cache_qformat == "none" else args.kv_cache_qformat,
             "the KV-cache format", "--kv-cache-dtype or --kv_cache_qformat")
    if args.qformat is None:
        return
    if args.qformat == "w4a8_awq":
        raise LowbitError("ModelOpt's w4a8_awq (int4 weights, FP8 activations) has no lowbit scheme; the nearest "
                          "are --scheme w_int4_per_group_sym --algo awq (weights only) and --scheme w_fp8_a_fp8")
    if args.qformat not in MODELOPT_QFORMATS:
        raise LowbitError(f"unknown --qformat {args.qformat!r}; lowbit reads {', '.join(MODELOPT_QFORMATS)} "
                          f"(or give --scheme)")
    scheme, group, algo = MODELOPT_QFORMATS[args.qformat]
    if args.scheme is not None:
        raise LowbitError("--scheme and --qformat both describe the weights; give one of them")
    args.scheme = scheme
    if group is not None and args.group_size is None:
        args.group_size = group
    if algo != "rtn":
        _set_algo(args, algo, "--qformat")


def _exports(args) -> list[str]:
    """lowbit's export formats for Quark's --model_export / --custom_mode."""
    out = []
    for name in args.model_export or []:
        name = name.strip().lower()
        if name not in QUARK_EXPORTS:
            raise LowbitError(f"unknown --model_export {name!r}; use hf_format, gguf or onnx (lowbit's --export: "
                              f"compressed-tensors, awq, gptq, gguf, onnx)")
        if QUARK_EXPORTS[name] is None:
            raise LowbitError(f"--model_export {name}: lowbit does not write Quark's own layout (it needs amd-quark "
                              f"to load); use hf_format (compressed-tensors, loaded by transformers and vLLM), "
                              f"gguf or onnx")
        out.append("awq" if name == "hf_format" and args.custom_mode == "awq" else QUARK_EXPORTS[name])
    if args.custom_mode not in (None, "quark") and "hf_format" not in [n.lower() for n in args.model_export or []]:
        raise LowbitError(f"--custom_mode {args.custom_mode} chooses the flavour of --model_export hf_format; add "
                          f"--model_export hf_format (or use --export directly)")
    return out


def answer(flags: list[str], known: list[str]) -> str | None:
    """One line for the first unrecognized flag: a peer's flag with lowbit's equivalent, else the nearest
    spelling among the command's own flags (`known`); None when no token is a flag."""
    for token in flags:
        if not token.startswith("--"):
            continue
        flag = token.split("=", 1)[0]
        peer = ANSWERS.get(flag) or ANSWERS.get("--" + flag[2:].replace("-", "_"))
        if peer:
            return f"{flag} is {peer[0]} flag; in lowbit: {peer[1]}"
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unrecognized argument {token}{hint}"
    return None

"""The `lowbit` command: quantize, eval, bench, compare, export, inspect. Thin: parses arguments (the parser is
cli_parser.py) and calls lowbit.api."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import shlex
import signal
import sys
import threading

from .cli_parser import build_parser
from . import parallel, peer_flags
from .errors import LowbitError
from .onnx.options import ONNX_ONLY, normalize_modelopt_args, onnx_options
from .recipe import DEFAULT_CALIBRATION
from .results import to_json


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
    if getattr(args, "imatrix", None):
        out["gguf"]["imatrix"] = args.imatrix
    if args.accuracy_level is not None:
        out["onnx"]["accuracy_level"] = args.accuracy_level
    if args.quantize_embedding is not None:
        out["onnx"]["quantize_embedding"] = args.quantize_embedding
    if getattr(args, "onnx_dtype", None):
        out["onnx"]["dtype"] = args.onnx_dtype
    return out


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
                       kv_cache_dtype=args.kv_cache_dtype, moe_experts_scheme=args.moe_experts_second_step_config,
                       target_bits=getattr(args, "target_bits", None),
                       sensitivity=getattr(args, "sensitivity", "fisher"))


def _fmt_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _launch(args) -> int | None:
    """--nproc N (N > 1): the same command as N processes under torchrun's launcher; None: run it here."""
    if args.nproc is None or args.nproc == 1:
        return None
    if parallel.launched():
        raise LowbitError("--nproc starts the processes itself; under torchrun leave it out (torchrun's "
                          "--nproc-per-node says how many)")
    argv, given = [], iter(args.argv)
    for a in given:  # the command line without --nproc
        if a == "--nproc":
            next(given, None)
        elif not a.startswith("--nproc="):
            argv.append(a)
    return parallel.launch(argv, args.nproc)


def cmd_quantize(args) -> int:
    from . import api

    launched = _launch(args)
    if launched is not None:
        return launched
    parallel.join(args.device)  # under torchrun: joined first, so that every refusal below is agreed on
    reload = peer_flags.apply(args)
    if reload is not None:
        return _reload(args, reload)
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
    if args.tasks:
        from .eval.tasks import check_tasks

        check_tasks(args.tasks, args.task_dir)  # before any work
    onnx = None
    if api.is_onnx_model(args.model):
        if args.export:
            raise LowbitError("--export applies to Hugging Face / GGUF sources; an ONNX model is written as ONNX")
        onnx = onnx_options(args, modelopt_form)
    else:
        given = [flag for flag, dest in ONNX_ONLY if getattr(args, dest) not in (None, False, "cpu", "minmax")]
        if given:
            raise LowbitError(f"{given[0]} applies to ONNX models only, and {args.model} is not one")
    scale = {"device": args.device, "calib_dtype": args.calib_dtype, "offload_dir": args.offload_dir,
             "resume": args.resume}
    result = api.quantize(args.model, args.output, recipe=recipe, overwrite=args.overwrite,
                          evaluate_after=args.eval, eval_dataset=args.dataset, eval_seq_len=args.seq_len,
                          max_chunks=args.max_chunks, progress=not args.no_progress, quiet=args.json,
                          export=args.export, export_options=_export_options(args), onnx_options=onnx, **scale)
    if not parallel.current().is_writer:
        return 0  # rank 0 reports
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
    if args.tasks:
        _tasks_of(args, result.output)
    return 0


def _tasks_of(args, model) -> None:
    """lm-eval --tasks of a quantized output (Neural Compressor's --accuracy --tasks), printed."""
    from .eval.tasks import evaluate_tasks

    result = evaluate_tasks(model, args.tasks, runtime="torch", task_dir=args.task_dir,
                            num_fewshot=args.num_fewshot, limit=args.limit, dtype="float32")
    print(to_json(result) if args.json else format_tasks(model, result))


def _reload(args, reload) -> int:
    """Quark's --model_reload --import_model_dir DIR: export and evaluate that folder instead of quantizing."""
    from . import api

    if not os.path.isdir(reload.folder):
        raise LowbitError(f"--import_model_dir {reload.folder} is not a folder; give a lowbit output folder")
    if reload.exports and args.output is None:
        raise LowbitError("--model_export with --model_reload writes beside an output: give -o OUT")
    for fmt in reload.exports:
        out = f"{args.output}.gguf" if fmt == "gguf" else f"{args.output}-{fmt}"
        print(f"wrote {api.export(reload.folder, out, fmt, overwrite=args.overwrite, quiet=args.json)} ({fmt})")
    if reload.evaluate:
        args.model, args.batch_size = reload.folder, 4  # the evaluation batch, as --skip-quantization
        return cmd_eval(args)
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
                              dtype=getattr(args, "dtype", "float32"), runtime=getattr(args, "runtime", "torch"),
                              stream=getattr(args, "stream", None), offload_dir=getattr(args, "offload_dir", None))
    if tasks:
        from .eval.tasks import evaluate_tasks

        runtime = getattr(args, "runtime", "torch")
        task_result = evaluate_tasks(args.model, tasks, runtime="torch" if runtime == "auto" else runtime,
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
        if result.get("stored_as"):
            kind = f"{result['stored_as']}, dequantized in torch"
        print(f"{model} ({kind}): perplexity {result['perplexity']:.4f} on {dataset} in {result['dtype']} "
              f"({result['windows']} windows x {result['seq_len']} tokens, {result['tokens']} predicted tokens); "
              f"size {_fmt_size(result['size_bytes'])}, {result['parameters'] / 1e6:.1f} M parameters"
              f"{'; streamed one block at a time' if result.get('streamed') else ''}")


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
                   speed_args=speed_args, onnx_runtime=args.onnx_runtime, progress=not args.no_progress,
                   prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    meta = {"command": "lowbit " + shlex.join(args.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "lowbit_version": __version__, "python": platform.python_version(), "dataset": dataset,
            "seq_len": args.seq_len, "max_chunks": args.max_chunks, "tasks": args.tasks, "limit": args.limit,
            "num_fewshot": args.num_fewshot, "speed": None if args.no_speed else speed_args,
            "prompts": args.prompts, "max_new_tokens": args.max_new_tokens if args.prompts else None}
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


def cmd_imatrix(args) -> int:
    from .imatrix import compute_imatrix

    out = compute_imatrix(args.model, args.output, dataset=args.dataset, num_calib_data=args.num_calib_data,
                          seq_len=args.seq_len, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {out} (importance matrix)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop like Ctrl-C (staged outputs are removed on the way out)."""


_OWNER = os.getpid()  # the process whose SIGTERM / SIGHUP _stop turns into a clean stop


def _stop(signum, frame):
    """SIGTERM / SIGHUP in the lowbit command: stop like Ctrl-C (a second signal stops at once). In a forked
    child that still has this handler (the signal came before _default_signals_in_child ran), the default
    action: the child dies, as its pool expects."""
    signal.signal(signum, signal.SIG_DFL)
    if os.getpid() != _OWNER:
        os.kill(os.getpid(), signum)
        return
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
    """The `lowbit` command; returns its exit status. One of several processes ends here at once (os._exit, after
    flushing its output): the interpreter's teardown of a torch.distributed process group whose peers are gone
    can abort it (SIGABRT, "terminate called without an active exception")."""
    try:
        code = _main(argv)
    except KeyboardInterrupt as exc:  # a stop signal that came while an error was being handled: said already
        code = 128 + getattr(signal, str(exc), signal.SIGINT) if isinstance(exc, Terminated) else 130
    if parallel.current().distributed:
        parallel.exit_now(code)
    return code


def _main(argv=None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # a peer tool's flag gets lowbit's equivalent, a misspelling the nearest flag
            command = _command_parser(parser, args.command)
            command.error(peer_flags.answer(unknown, [s for s in command._option_string_actions if s[:2] == "--"])
                          or f"unrecognized arguments: {' '.join(unknown)}")
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
        code = 128 + getattr(signal, str(exc), signal.SIGTERM)
        if parallel.current().distributed:
            return code  # torchrun stops every rank when one fails; the failed one said why
        return _fail(f"stopped by {exc}; nothing was written (an unfinished output is removed)", code)
    except KeyboardInterrupt:
        if not parallel.current().is_writer:
            return 130  # Ctrl-C reaches every rank; rank 0 says it
        return _fail("interrupted; nothing was written (an unfinished output is removed)", 130, agree=False)
    except MemoryError:
        return _fail("out of memory; use a smaller --batch-size or --num-calib-data", 1)
    except ModuleNotFoundError as exc:
        return _fail(_missing_package(exc), 2)
    except OSError as exc:
        return _fail(_os_error(exc), 2)
    except Exception as exc:  # a bug: one line, the traceback on request
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        if _peer_gone(exc):
            return 1  # another rank stopped (it, or torchrun, says why)
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"internal error ({type(exc).__name__}: {first}); please report it, with the traceback that "
                     f"LOWBIT_DEBUG=1 shows", 1)
    finally:
        for sig, old in handlers.items():
            signal.signal(sig, old)


def _command_parser(parser, command: str | None):
    """The parser of a command (the top parser without one)."""
    if command is None:
        return parser
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def _fail(message: str, code: int, agree: bool = True) -> int:
    """Print the one error line. With several processes: a failure before the work starts is agreed between them
    first and printed once, by rank 0 (naming the rank unless all had it); a later one by the rank it happened
    on, naming it (torchrun stops the others). `agree=False`: a stop every rank received (Ctrl-C), said by
    rank 0 alone."""
    ranks = parallel.current()
    if ranks.distributed and agree:
        if not ranks.agreed:
            try:
                ranks.agree(message)
            except Exception as exc:  # noqa: BLE001 - a rank is gone before agreeing: say it here
                if not _peer_gone(exc):
                    raise
        if ranks.failures:
            if ranks.is_writer:
                print(f"error: {ranks.failure_line()}", file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):
                ranks.gather(None)  # said: now every rank may exit (torchrun stops the rest when one does)
            return code
        message = f"rank {ranks.rank} of {ranks.size}: {message} (every rank stops)"
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def _peer_gone(exc: Exception) -> bool:
    """Whether a collective failed because another rank went away."""
    if not parallel.current().distributed:
        return False
    import torch.distributed as dist

    return isinstance(exc, (dist.DistError, ConnectionError)) or (
        isinstance(exc, RuntimeError) and re.search(r"Connection (closed|reset) by peer|remote worker", str(exc)))


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


def cmd_generate(args) -> int:
    from .eval.generate import Sampling, run_generate

    return run_generate(args.model, args.prompt, prompts_file=args.prompts, runtime=args.runtime,
                        sampling=Sampling.from_args(args), chat_template=not args.no_chat_template,
                        system=args.system, as_json=args.json, threads=args.threads)


def cmd_chat(args) -> int:
    from .eval.chat import run_chat
    from .eval.generate import Sampling

    try:
        return run_chat(args.model, runtime=args.runtime, sampling=Sampling.from_args(args), system=args.system,
                        threads=args.threads)
    except KeyboardInterrupt as exc:  # Ctrl-C ends a conversation (it writes nothing to remove)
        if isinstance(exc, Terminated):
            raise
        print(file=sys.stderr)
        return 130


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "inspect": cmd_inspect, "export": cmd_export,
            "bench": cmd_bench, "compare": cmd_compare, "imatrix": cmd_imatrix, "generate": cmd_generate,
            "chat": cmd_chat}


if __name__ == "__main__":
    sys.exit(main())

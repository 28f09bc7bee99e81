"""Task accuracy through lm-eval-harness for every model lowbit reads.

Torch models (float folders, GGUF files, `demo`, lowbit outputs, dequantized as `lowbit.api.load` gives them) go
through lm-eval's own HF backend class, so their figures are lm-eval's. ONNX models go through `OnnxLM` below, an
lm-eval model class over onnxruntime or onnxruntime-genai that scores and generates exactly as that backend does
(same tokenization, prefix token and rolling windows). Tasks are lm-eval task names, YAML files, or names found
in --task-dir: how local dataset files stand in for the hub is in the README.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import LowbitError
from ..model_files import check_onnx_file, load_tokenizer
from ..runtimes import (decoder_feeds, decoder_session, genai_context_length, genai_decoder, genai_generator,
                        onnx_folder, onnx_model_path, open_genai_model)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default context when the model states none
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "word_perplexity", "perplexity")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LowbitError("task evaluation needs lm-eval-harness: pip install 'lowbit[eval]' (or pip install lm_eval)"
                          ) from None


def _log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the vocabulary of (n, vocab) logits, in float32 like lm-eval's HF backend."""
    return torch.log_softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=-1).numpy()


class _OrtRunner:
    """An ONNX decoder run by onnxruntime: logits of a whole sequence, and greedy decoding with its KV cache."""

    def __init__(self, path: Path, threads: int | None):
        model = onnx_model_path(path)
        self.session = decoder_session(model, threads)
        self.head_size = genai_decoder(model.parent).get("head_size")
        self.presents = [o.name for o in self.session.get_outputs() if o.name.startswith("present")]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), vocab) logits of one sequence from an empty past."""
        feeds = decoder_feeds(self.session, np.asarray([tokens], dtype=np.int64), self.head_size)
        return self.session.run(["logits"], feeds)[0][0]

    def generate(self, tokens: list[int], max_new: int, keep_going) -> list[int]:
        """Greedy continuation of tokens, reusing the present key/values, while keep_going(new_tokens)."""
        feeds = decoder_feeds(self.session, np.asarray([tokens], dtype=np.int64), self.head_size)
        new: list[int] = []
        total = len(tokens)
        for _ in range(max_new):
            outputs = self.session.run(["logits", *self.presents], feeds)
            new.append(int(np.argmax(outputs[0][0, -1])))
            if not keep_going(new):
                break
            total += 1
            feeds["input_ids"] = np.asarray([[new[-1]]], dtype=np.int64)
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
            if "position_ids" in feeds:
                feeds["position_ids"] = np.asarray([[total - 1]], dtype=np.int64)
            for name, value in zip(self.presents, outputs[1:]):
                feeds[name.replace("present", "past_key_values", 1)] = value
        return new


class _GenaiRunner:
    """An onnxruntime-genai folder run by onnxruntime-genai itself (its provider and session options)."""

    def __init__(self, folder: Path):
        self.model = open_genai_model(folder, bare_onnx_hint="use --runtime torch to run a bare .onnx in onnxruntime")

    def _generator(self, max_length: int):
        """A greedy generator for sequences up to max_length tokens."""
        return genai_generator(self.model, max_length, do_sample=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        generator = self._generator(len(tokens) + 1)
        generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0]

    def generate(self, tokens: list[int], max_new: int, keep_going) -> list[int]:
        generator = self._generator(len(tokens) + max_new)
        generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        new: list[int] = []
        while not generator.is_done() and len(new) < max_new:
            generator.generate_next_token()
            new.append(int(generator.get_next_tokens()[0]))
            if not keep_going(new):
                break
        return new


def _context_length(folder: Path) -> int:
    """The model's context from genai_config.json, else config.json beside it, else lm-eval's default."""
    if (folder / "genai_config.json").is_file():
        length = genai_context_length(folder)
        if length:
            return int(length)
    config = folder / "config.json"
    if config.is_file():
        length = json.loads(config.read_text()).get("max_position_embeddings")
        if length:
            return int(length)
    return DEFAULT_MAX_LENGTH


class _OnnxScoring:
    """What OnnxLM adds to lm-eval's TemplateLM: the tokenizer, the runner (onnxruntime or onnxruntime-genai) and
    the context length of an ONNX decoder, and scoring and greedy generation as lm-eval's HF backend does them,
    one sequence at a time."""

    def _open(self, path, runtime: str, max_length: int | None, threads: int | None) -> None:
        """Open the decoder at `path` (a folder or model file) in `runtime`, with its tokenizer beside it."""
        path = Path(path)
        folder = onnx_folder(path)
        check_onnx_file(onnx_model_path(path))  # external data inside the folder, present and whole
        self.tokenizer = load_tokenizer(folder, hint="put the model's tokenizer files beside model.onnx")
        self.runner = _GenaiRunner(folder) if runtime == "onnxruntime-genai" else _OrtRunner(path, threads)
        # onnxruntime-genai counts the token it would generate next against the context
        self.max_length = max_length or _context_length(folder) - (runtime == "onnxruntime-genai")

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        from lm_eval.models.utils import has_bos_prefix

        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kwargs["add_special_tokens"] = False
        return self.tokenizer.encode(string, **kwargs)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Sum log-probability of continuation after context, and whether greedy decoding gives it."""
        tokens = (context + continuation)[-(self.max_length + 1):][:-1]
        rows = _log_softmax_rows(self.runner.logits(tokens)[-len(continuation):])
        target = np.asarray(continuation)
        picked = rows[np.arange(len(continuation)), target]
        return float(picked.sum()), bool((rows.argmax(-1) == target).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        return [self._score(ctx, cont) for _, ctx, cont in
                tqdm(requests, desc="loglikelihood", disable=disable_tqdm, file=sys.stderr)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in tqdm(requests, desc="loglikelihood (rolling)", disable=disable_tqdm, file=sys.stderr):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            out.append(sum(self._score(ctx, cont)[0] for ctx, cont in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(*request.args) for request in
                tqdm(requests, desc="generate", disable=disable_tqdm, file=sys.stderr)]

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        """The greedy continuation of one context, cut at the first stop string (the EOS text among them)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos = self.tokenizer.decode(self.eot_token_id)
        if eos not in until:
            until.append(eos)
        max_new = int(gen_kwargs.get("max_gen_toks", 256))
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]

        def keep_going(new: list[int]) -> bool:
            return new[-1] != self.eot_token_id and not any(s in self.tokenizer.decode(new) for s in until)

        text = self.tokenizer.decode(self.runner.generate(prompt, max_new, keep_going))
        for stop in until:
            text = text.split(stop)[0]
        return text


def onnx_lm(path, runtime: str = "onnxruntime", max_length: int | None = None, threads: int | None = None):
    """An lm-eval model over an ONNX decoder (a folder or model file) run by onnxruntime or onnxruntime-genai."""
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM

    class OnnxLM(_OnnxScoring, TemplateLM):
        """Scores continuations and generates greedily as lm-eval's HF backend does, one sequence at a time."""

        def __init__(self):
            super().__init__()
            self._open(path, runtime, max_length, threads)

    return OnnxLM()


def torch_lm(model, dtype: str = "float32", batch_size: int = 1):
    """lm-eval's own HF backend over a model lowbit loads (float, GGUF, demo or a lowbit output, dequantized)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    from ..hf.model import load_model as load

    net, tokenizer = load(model, dtype)
    return HFLM(pretrained=net.eval(), tokenizer=tokenizer, batch_size=batch_size, trust_remote_code=False)


def task_manager(task_dir=None):
    """lm-eval's task index, with the YAML task files under task_dir (local datasets) found first."""
    _require_lm_eval()
    if task_dir is not None and not Path(task_dir).is_dir():
        raise LowbitError(f"--task-dir {task_dir} is not a folder; give the folder holding your task YAML files")
    return _task_manager(str(Path(task_dir).resolve()) if task_dir else None)


@functools.lru_cache(maxsize=4)
def _task_manager(task_dir: str | None):
    """Indexing lm-eval's thousands of task files takes seconds: done once per folder and process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=task_dir)


def _primary(metrics: dict) -> tuple[str, float, float | None]:
    """The headline metric of a task's lm-eval result: acc_norm, acc, exact_match, ... whichever comes first."""
    values = {k.split(",")[0]: v for k, v in metrics.items()
              if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    name = next((m for m in PRIMARY_METRICS if m in values), next(iter(values), None))
    if name is None:
        return "", float("nan"), None
    stderr = next((v for k, v in metrics.items() if k.split(",")[0] == f"{name}_stderr"), None)
    return name, float(values[name]), float(stderr) if isinstance(stderr, (int, float)) else None


def check_tasks(tasks, task_dir=None) -> tuple[list[str], object]:
    """(task names, lm-eval's task index): lm-eval installed, --task-dir a folder, every task known; called
    before any model is loaded so that a typo costs nothing."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise LowbitError("--tasks is empty; give lm-eval task names (lambada_openai,hellaswag) or task YAML files")
    manager = task_manager(task_dir)
    unknown = [n for n in names if not n.endswith((".yaml", ".yml")) and not manager.match_tasks([n])]
    if unknown:
        raise LowbitError(f"unknown lm-eval task {unknown[0]!r}; see `lm_eval ls tasks`, or put its YAML file in "
                          f"--task-dir")
    return names, manager


def run_tasks(lm, tasks, task_dir=None, num_fewshot: int | None = None, limit: float | None = None,
              seed: int = 1234, batch_size: int = 1) -> dict:
    """lm-eval's simple_evaluate of an LM on tasks; {task: {"metric", "value", "stderr", "metrics", ...}}."""
    from lm_eval import simple_evaluate

    names, manager = check_tasks(tasks, task_dir)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress notes; stdout stays for --json
            results = simple_evaluate(model=lm, tasks=names, task_manager=manager, num_fewshot=num_fewshot,
                                      limit=limit, batch_size=batch_size, log_samples=False, random_seed=seed,
                                      numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (ConnectionError, OSError) as exc:
        raise LowbitError(f"a task's dataset could not be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                          f"offline, point a task YAML at local files and pass its folder as --task-dir (README: "
                          f"task accuracy offline)") from None
    out = {}
    for task, metrics in results["results"].items():
        metric, value, stderr = _primary(metrics)
        out[task] = {"metric": metric, "value": value, "stderr": stderr, "samples": results["n-samples"].get(
            task, {}).get("effective"), "metrics": {k: v for k, v in metrics.items() if k != "alias"}}
    return out


def evaluate_tasks(model, tasks, runtime: str = "torch", task_dir=None, num_fewshot: int | None = None,
                   limit: float | None = None, batch_size: int = 1, dtype: str = "float32", seed: int = 1234) -> dict:
    """Task accuracy of a model source: torch (dequantized) or, for ONNX models, onnxruntime / onnxruntime-genai."""
    from ..runtimes import is_onnx_model

    start = time.perf_counter()
    if runtime == "llama.cpp":
        raise LowbitError("--tasks runs in torch, onnxruntime or onnxruntime-genai; llama.cpp is not supported for "
                          "tasks (a .gguf file runs dequantized with --runtime torch)")
    if is_onnx_model(model):
        lm = onnx_lm(model, "onnxruntime-genai" if runtime == "onnxruntime-genai" else "onnxruntime")
        runtime = "onnxruntime-genai" if runtime == "onnxruntime-genai" else "onnxruntime"
    elif runtime != "torch":
        raise LowbitError(f"--runtime {runtime} runs ONNX models; {model} is not one")
    else:
        lm = torch_lm(model, dtype, batch_size)
    import lm_eval

    results = run_tasks(lm, tasks, task_dir, num_fewshot, limit, seed, batch_size)
    return {"model": str(model), "runtime": runtime, "tasks": results, "num_fewshot": num_fewshot, "limit": limit,
            "lm_eval_version": lm_eval.__version__, "seconds": round(time.perf_counter() - start, 3)}

"""`lowbit generate`: text from any model lowbit reads, in the runtime it belongs to.

torch (transformers' generate) runs Hugging Face folders, lowbit folders (dequantized), compressed-tensors folders
(transformers) and, with --runtime torch, GGUF files; onnxruntime-genai runs ONNX folders (genai_config.json);
llama.cpp runs .gguf files and `demo`. Every runtime is fed the same prompt token ids, made by the transformers
tokenizer lowbit reads for the model (its chat template applied unless asked not to), and its tokens are decoded
by that tokenizer again, so a lowbit folder and its GGUF or ONNX export start from the same prompt and their greedy
answers can be compared token by token. Sampling is each runtime's own (seeded when --seed is given).

An eval-layer module: it imports runtimes, hf and model_files, never cli or api.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterable

from ..errors import LowbitError
from ..runtimes import genai_context_length, genai_generator, is_onnx_model, onnx_folder, open_genai_model, open_llama

RUNTIMES = ("auto", "torch", "llama.cpp", "onnxruntime-genai")
LLAMA_MAX_CONTEXT = 4096  # llama.cpp's KV cache is allocated whole: at most this many tokens


@dataclass
class Sampling:
    """How tokens are chosen: greedy unless do_sample; each runtime applies these with its own sampler."""
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    seed: int | None = None
    repetition_penalty: float = 1.0

    @classmethod
    def from_args(cls, args) -> "Sampling":
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if getattr(args, k, None) is not None})


# -- the runners: one per runtime, each turning prompt ids into new token ids ------------------------------

class Runner:
    """A model opened in one runtime. run(ids, sampling, on_token) generates after the prompt ids, calls
    on_token with each new token id (an end-of-sequence token stops it and is not passed on) and returns them."""
    runtime = ""
    context: int | None = None  # the most tokens the model (or its opened context) holds; None: not known

    def __init__(self, tokenizer, eos: set[int]):
        self.tokenizer, self.eos = tokenizer, eos

    def run(self, ids: list[int], sampling: Sampling, on_token: Callable[[int], None] = lambda t: None) -> list[int]:
        new = max_new_tokens(len(ids), sampling.max_new_tokens, self.context)
        out: list[int] = []

        def emit(token: int) -> bool:  # False: stop here
            if token in self.eos or len(out) >= new:
                return False
            out.append(token)
            on_token(token)
            return len(out) < new

        self._generate(ids, sampling, new, emit)
        return out

    def _generate(self, ids: list[int], sampling: Sampling, new: int, emit: Callable[[int], bool]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def max_new_tokens(prompt: int, wanted: int, context: int | None) -> int:
    """New tokens that fit after a prompt of `prompt` tokens: wanted, fewer where the context ends first."""
    if context is None:
        return wanted
    if prompt >= context:
        raise LowbitError(f"the prompt has {prompt} tokens and the model's context holds {context}; give a shorter "
                          f"prompt (in lowbit chat, /reset clears the history)")
    return min(wanted, context - prompt)


def eos_ids(tokenizer, *configs) -> set[int]:
    """Every end-of-sequence token id the tokenizer and the model's (generation) config name."""
    ids = {tokenizer.eos_token_id}
    for config in configs:
        value = getattr(config, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return {int(i) for i in ids if i is not None}


class TorchRunner(Runner):
    """transformers' generate on a torch model (a fresh GenerationConfig: the model's own sampling defaults
    do not apply, so every runtime gets the same options)."""
    runtime = "torch"

    def __init__(self, model, tokenizer):
        config = model.config.get_text_config()
        super().__init__(tokenizer, eos_ids(tokenizer, config, getattr(model, "generation_config", None)))
        self.model, self.context = model, getattr(config, "max_position_embeddings", None)

    def _generate(self, ids, sampling, new, emit):
        import torch
        from transformers import GenerationConfig

        if sampling.do_sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        chosen = dict(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k) \
            if sampling.do_sample else {}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos, default=0)
        config = GenerationConfig(max_new_tokens=new, do_sample=sampling.do_sample, eos_token_id=sorted(self.eos)
                                  or None, pad_token_id=pad, repetition_penalty=sampling.repetition_penalty, **chosen)
        with torch.no_grad():
            self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=config, streamer=_Streamer(emit))


class _Streamer:
    """transformers' streamer protocol: put() gets the prompt first, then each new token; end() at the end."""

    def __init__(self, emit: Callable[[int], bool]):
        self.emit, self.prompt_seen = emit, False

    def put(self, value) -> None:
        if self.prompt_seen:
            for token in value.reshape(-1).tolist():
                self.emit(int(token))
        self.prompt_seen = True

    def end(self) -> None:
        pass


class LlamaRunner(Runner):
    """llama.cpp (llama-cpp-python): token ids in, its sampler chain (greedy at temperature 0)."""
    runtime = "llama.cpp"

    def __init__(self, path: Path, tokenizer, context: int | None, threads: int | None):
        self.context = min(context or LLAMA_MAX_CONTEXT, LLAMA_MAX_CONTEXT)
        self.llm = open_llama(path, self.context, threads, all_logits=False)
        super().__init__(tokenizer, eos_ids(tokenizer) | {int(self.llm.token_eos())})

    def _generate(self, ids, sampling, new, emit):
        if sampling.seed is not None:
            self.llm.set_seed(sampling.seed % 2**32)  # llama.cpp seeds are 32-bit
        options = dict(temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p) \
            if sampling.do_sample else dict(temp=0.0, top_k=1, top_p=1.0)
        for token in self.llm.generate(ids, min_p=0.0, repeat_penalty=sampling.repetition_penalty, reset=True,
                                       **options):
            if not emit(int(token)):
                break

    def close(self) -> None:
        self.llm.close()


class GenaiRunner(Runner):
    """onnxruntime-genai: a fresh Generator per prompt, its own search (greedy, or top-k / top-p sampling)."""
    runtime = "onnxruntime-genai"

    def __init__(self, folder: Path, threads: int | None):
        from ..model_files import load_tokenizer

        try:
            self.model = open_genai_model(folder, threads, bare_onnx_hint="export the model with `lowbit export "
                                                                          "-f onnx` or onnxruntime-genai's builder")
        except RuntimeError as exc:  # onnxruntime-genai's own load errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise LowbitError(f"onnxruntime-genai cannot load {folder} ({first}); check its genai_config.json and "
                              f"model files (re-export them)") from None
        tokenizer = load_tokenizer(folder, hint="put the model's tokenizer files beside model.onnx")
        self.context = genai_context_length(folder)
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]
        super().__init__(tokenizer, eos_ids(tokenizer, SimpleNamespace(eos_token_id=decoder.get("eos_token_id"))))

    def _generate(self, ids, sampling, new, emit):
        import numpy as np

        options = dict(do_sample=sampling.do_sample, repetition_penalty=sampling.repetition_penalty)
        if sampling.do_sample:
            options.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed % 2**31
        generator = genai_generator(self.model, len(ids) + new, **options)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            if not emit(int(generator.get_next_tokens()[0])):
                break


# -- which runtime, and opening the model in it ------------------------------------------------------------

def is_gguf(model) -> bool:
    from ..hf.source import DEMO

    return str(model) == DEMO or Path(str(model)).suffix.lower() == ".gguf"


def resolve_runtime(model, runtime: str = "auto") -> str:
    """The runtime a model runs in: ONNX -> onnxruntime-genai, GGUF / demo -> llama.cpp (torch, dequantized, when
    llama-cpp-python is missing and no runtime was asked for: said in one line), anything else -> torch."""
    import importlib.util

    from ..hf.source import DEMO

    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if str(model) != DEMO and not Path(str(model)).exists():
        raise LowbitError(f"model {str(model)!r} not found; give a Hugging Face or lowbit folder, a .gguf file, an "
                          f"ONNX folder or `demo`")
    onnx, gguf = is_onnx_model(model), is_gguf(model)
    if runtime == "auto":
        if gguf and importlib.util.find_spec("llama_cpp") is None:
            print(f"llama-cpp-python is not installed: running {model}'s dequantized weights in torch "
                  f"(pip install llama-cpp-python to run it in llama.cpp)", file=sys.stderr, flush=True)
            return "torch"
        return "onnxruntime-genai" if onnx else "llama.cpp" if gguf else "torch"
    if onnx and runtime != "onnxruntime-genai":
        raise LowbitError(f"{model} is an ONNX model, which runs in onnxruntime-genai; leave out --runtime {runtime}")
    if runtime == "onnxruntime-genai" and not onnx:
        raise LowbitError(f"--runtime onnxruntime-genai runs an ONNX folder with genai_config.json; {model} is not "
                          f"one (export it with `lowbit export -f onnx`)")
    if runtime == "llama.cpp" and not gguf:
        raise LowbitError(f"--runtime llama.cpp runs a .gguf file or `demo`; {model} is not one (export it with "
                          f"`lowbit export -f gguf`, or leave out --runtime)")
    return runtime


def open_runner(model, runtime: str = "auto", threads: int | None = None) -> Runner:
    """The model opened in its runtime (resolve_runtime), with the tokenizer every runtime's prompt is made by."""
    import importlib.util

    from ..model_files import load_tokenizer, read_json

    runtime = resolve_runtime(model, runtime)
    if runtime == "onnxruntime-genai":
        folder = onnx_folder(model)
        if not (folder / "genai_config.json").is_file():
            raise LowbitError(f"{folder} has no genai_config.json, which onnxruntime-genai needs; export the model "
                              f"with `lowbit export -f onnx` or onnxruntime-genai's builder")
        return GenaiRunner(folder, threads)
    if runtime == "llama.cpp":
        from ..hf.source import DEMO, demo_gguf, resolve_source

        if importlib.util.find_spec("llama_cpp") is None:  # said before the file is read
            raise LowbitError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python")
        folder = resolve_source(model)  # lowbit's description of the file: config.json and the tokenizer
        config = read_json(folder / "config.json", "model config")
        context = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
        path = demo_gguf() if str(model) == DEMO else Path(str(model))
        return LlamaRunner(path, load_tokenizer(folder), context, threads)
    import torch

    from ..hf.model import load_model

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model(model)
    return TorchRunner(model.eval(), tokenizer)


# -- prompts -----------------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, messages: list[dict], chat_template: bool = True) -> list[int]:
    """The prompt's token ids: the messages through the tokenizer's chat template (with the assistant's turn
    opened) when it has one and chat_template; else the last message's text as it is (with the tokenizer's
    special tokens, a BOS say)."""
    if chat_template and has_chat_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(messages[-1]["content"])["input_ids"]
    if not ids:
        raise LowbitError("the prompt is empty after tokenization; give some text")
    return list(ids)


def messages_for(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def read_prompts(path) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or a .jsonl of {"prompt": ...} objects."""
    path = Path(path)
    if not path.is_file():
        raise LowbitError(f"prompts file {path} not found; give a text file with one prompt per line, or a .jsonl")
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if path.suffix.lower() != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LowbitError(f"{path} line {number} is not JSON ({exc.msg}); write one {{\"prompt\": ...}} object "
                              f"per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise LowbitError(f"{path} line {number} has no \"prompt\" string; write one {{\"prompt\": ...}} object "
                              f"per line")
        prompts.append(record["prompt"])
    return prompts


def prompt_source(prompts: list[str], prompts_file, stdin=None) -> Iterable[str]:
    """The prompts of a command: its PROMPT arguments, else --prompts FILE, else stdin one per line (read as
    they come, so a prompt is answered before the next is typed)."""
    if prompts and prompts_file:
        raise LowbitError("give the prompts as arguments or with --prompts FILE, not both")
    if prompts:
        return prompts
    if prompts_file:
        found = read_prompts(prompts_file)
        if not found:
            raise LowbitError(f"{prompts_file} holds no prompt; write one prompt per line")
        return found
    return (line.rstrip("\n") for line in (stdin or sys.stdin) if line.strip())


# -- answering ---------------------------------------------------------------------------------------------

class TextStream:
    """New token ids in, new text out: the whole answer is decoded again and the part not yet written is
    passed to `write`, held back while it ends in an incomplete character (a byte token of a multi-byte one)."""

    def __init__(self, tokenizer, write: Callable[[str], None] | None):
        self.tokenizer, self.write, self.ids, self.text = tokenizer, write, [], ""

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._emit(text)

    def finish(self) -> str:
        """The whole answer's text (what is left of it written first)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if self.write is not None and len(text) > len(self.text):  # what is written stays: only the new end
            self.write(text[len(self.text):])
        self.text = text if len(text) >= len(self.text) else self.text[:len(text)]


def answer(runner: Runner, messages: list[dict], sampling: Sampling, chat_template: bool = True,
           write: Callable[[str], None] | None = None) -> dict:
    """One answer to the conversation `messages` (the last one the user's): output text, its token ids, seconds;
    the text streamed to `write` as it is produced."""
    ids = prompt_ids(runner.tokenizer, messages, chat_template)
    stream = TextStream(runner.tokenizer, write)
    start = time.perf_counter()
    tokens = runner.run(ids, sampling, stream.add)
    seconds = time.perf_counter() - start
    return {"output": stream.finish(), "tokens": len(tokens), "token_ids": tokens, "prompt_tokens": len(ids),
            "runtime": runner.runtime, "seconds": round(seconds, 3)}


def check_template_options(runner: Runner, model, chat_template: bool, system: str | None) -> None:
    if system is not None and not (chat_template and has_chat_template(runner.tokenizer)):
        why = "--no-chat-template was given" if not chat_template else f"{model} has no chat template"
        raise LowbitError(f"--system is a turn of the chat template and {why}; leave out --system")


def run_generate(model, prompts: list[str], *, prompts_file=None, runtime: str = "auto", sampling: Sampling,
                 chat_template: bool = True, system: str | None = None, as_json: bool = False,
                 threads: int | None = None, out=None) -> int:
    """`lowbit generate`: each prompt's answer streamed to `out` (a blank line between answers), or with
    as_json one JSON object per prompt."""
    out = out or sys.stdout
    source = prompt_source(prompts, prompts_file)
    runner = open_runner(model, runtime, threads)
    try:
        check_template_options(runner, model, chat_template, system)
        for index, prompt in enumerate(source):
            if as_json:
                result = answer(runner, messages_for(prompt, system), sampling, chat_template)
                print(json.dumps({"prompt": prompt, **result}, ensure_ascii=False), file=out, flush=True)
                continue
            if index:
                out.write("\n")
            answer(runner, messages_for(prompt, system), sampling, chat_template, write=_writer(out))
            out.write("\n")
            out.flush()
    finally:
        runner.close()
    return 0


def _writer(out) -> Callable[[str], None]:
    def write(text: str) -> None:
        out.write(text)
        out.flush()
    return write


def generate_answers(model, prompts: list[str], max_new_tokens: int = 64, runtime: str = "auto") -> list[dict]:
    """Greedy answers of a model to prompts (each a single user turn through its chat template when it has one):
    [{"prompt", "output", "tokens", "runtime", "seconds"}], for `lowbit compare --prompts`."""
    runner = open_runner(model, runtime)
    try:
        results = []
        for prompt in prompts:
            result = answer(runner, messages_for(prompt, None), Sampling(max_new_tokens=max_new_tokens))
            results.append({"prompt": prompt, **{k: result[k] for k in ("output", "tokens", "runtime", "seconds")}})
        return results
    finally:
        runner.close()

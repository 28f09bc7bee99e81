"""Shared by every peer runner: the command line, the data file, the perplexity protocol and the one JSON line.

A runner is `python RUNNER.py --model FOLDER --data DATA.pt --algo A --scheme S --group G`, run with the
python of the peer's own virtual environment (so this file imports only torch and the standard library).
DATA.pt holds {"calib": LongTensor (n, seq_len), "eval": LongTensor (m, seq_len)} built once by lowbit's
own data functions, so every tool sees identical calibration and evaluation tokens.
The runner prints exactly one JSON line on stdout:
{"tool", "algo", "scheme", "group", "perplexity", "quantize_seconds", "error"}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on this machine: fail fast instead of retrying
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# scheme name (Quark spelling, as lowbit takes it) -> (bits, symmetric); weight-only per group
SCHEMES = {"w_uint4_per_group_asym": (4, False), "w_int4_per_group_sym": (4, True),
           "w_uint3_per_group_asym": (3, False), "w_uint2_per_group_asym": (2, False)}
ALGOS = ["rtn", "awq", "gptq", "gptaq", "qronos", "autoround"]  # a runner refuses what its tool lacks (error row)


def parse_args(tool: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"{tool}: quantize, then perplexity in memory; one JSON line")
    ap.add_argument("--model", required=True, help="float Hugging Face folder")
    ap.add_argument("--data", required=True, help=".pt file with calib and eval windows")
    ap.add_argument("--algo", required=True, choices=ALGOS)
    ap.add_argument("--scheme", required=True, choices=sorted(SCHEMES))
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--iters", type=int, default=200, help="AutoRound's iterations")
    ap.add_argument("--batch", type=int, default=8, help="AutoRound's windows per iteration")
    return ap.parse_args()


def load_data(path: str) -> tuple[torch.Tensor, torch.Tensor, list]:
    data = torch.load(path)
    return data["calib"], data["eval"], data.get("last_word", [])


def load_float_model(folder: str):
    """The float32 model on the CPU, in eval mode (the same load for every tool)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32) if _new_tf() else \
        AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    return model.eval()


def _new_tf() -> bool:
    import transformers

    return int(transformers.__version__.split(".")[0]) >= 5


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    """lowbit's protocol (src/lowbit/eval/perplexity.py): mean next-token NLL over every predicted token of
    every window, logits in float32, exponentiated."""
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits.float()
            total_nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


LAST_WORD_PASSAGES = 200


def last_word_items(tokenizer, text: str, limit: int = LAST_WORD_PASSAGES) -> list[tuple[torch.Tensor, int]]:
    """LAMBADA-style items from a text (lowbit's eval.task_files.last_word_passages: passages of whole
    sentences ending in a plain word): (the passage's token ids, how many of the last ones are its final word)."""
    from lowbit.eval.task_files import last_word_passages

    items = []
    for passage in last_word_passages(text, min_words=30, limit=limit):
        context, _, word = passage.rpartition(" ")
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        items.append((torch.tensor(ctx + target), len(target)))
    return items


def last_word_accuracy(model, items: list) -> float:
    """LAMBADA's accuracy: the share of passages whose final word the model predicts greedily, every one of its
    tokens the argmax after the tokens before it."""
    correct = 0
    with torch.inference_mode():
        for ids, n in items:
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
            correct += bool((logits[-n - 1:-1].argmax(-1) == ids[-n:]).all())
    return correct / max(len(items), 1)


def run(tool: str, quantize) -> None:
    """Parse the command line, call quantize(model, calib, args) -> model (timed), evaluate, print the line.
    Any exception becomes the "error" field (its last line), and the exit code stays 0 so the row is kept."""
    args = parse_args(tool)
    row = {"tool": tool, "algo": args.algo, "scheme": args.scheme, "group": args.group,
           "perplexity": None, "quantize_seconds": None, "error": None}
    try:
        calib, windows, last_word = load_data(args.data)
        model = load_float_model(args.model)
        start = time.perf_counter()
        model = quantize(model, calib, args)
        row["quantize_seconds"] = round(time.perf_counter() - start, 2)
        row["perplexity"] = perplexity(model, windows)
        row["last_word_accuracy"] = last_word_accuracy(model, last_word)
    except BaseException as exc:  # noqa: BLE001 - one failed combination must not lose the table
        traceback.print_exc(file=sys.stderr)
        text = f"{type(exc).__name__}: {exc}".strip().splitlines()
        row["error"] = text[0][:300] if text else type(exc).__name__
    sys.stderr.flush()
    print(json.dumps(row), flush=True)

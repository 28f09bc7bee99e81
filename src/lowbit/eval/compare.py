"""`lowbit compare`: measure several models the same way and put them side by side.

Each figure comes from the function that `lowbit eval` and `lowbit bench` call (api.evaluate, tasks.evaluate_tasks,
speed.measure_speed) with the same arguments, so a row agrees with those commands run separately. The first model
is the reference the report's changes are taken against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import LowbitError


def parse_model_arg(arg: str) -> tuple[str, str]:
    """NAME=PATH or PATH -> (label, path); the label defaults to the path's last component."""
    name, sep, path = arg.partition("=")
    if sep and name and path and "/" not in name:
        return name, path
    return Path(arg.rstrip("/")).name or arg, arg


def _summary(path: Path) -> dict:
    """The lowbit summary.json of a quantized folder, following an ONNX export back to the folder it came from
    (the same stored codes, so the same per-layer errors); {} when there is none."""
    folder = path if path.is_dir() else path.parent
    if (folder / "summary.json").is_file():
        return json.loads((folder / "summary.json").read_text())
    record = folder / "lowbit_export.json"
    if record.is_file():
        source = Path(json.loads(record.read_text()).get("source", ""))
        if (source / "summary.json").is_file():
            return json.loads((source / "summary.json").read_text())
    return {}


def _check_models(models: list[tuple[str, str]]) -> None:
    """Every model exists and labels are unique, before anything is measured."""
    labels = [name for name, _ in models]
    if len(set(labels)) != len(labels):
        raise LowbitError(f"two models share the label {next(n for n in labels if labels.count(n) > 1)!r}; "
                          f"name them with NAME=PATH")
    for _, path in models:
        if path != "demo" and not Path(path).exists():
            raise LowbitError(f"{path} does not exist; give a model folder, .gguf or .onnx file, or `demo`")


def measure_model(name: str, path: str, *, dataset: str | None, seq_len: int, max_chunks: int | None, tasks,
                  task_dir, limit, num_fewshot, speed: bool, speed_args: dict, onnx_runtime: str,
                  progress: bool, prompts: list[str] | None = None, max_new_tokens: int = 64) -> dict:
    """One report row: perplexity, tasks, speed, size, per-layer errors and greedy answers of one model."""
    from ..api import evaluate
    from ..runtimes import is_onnx_model

    onnx = is_onnx_model(path)
    runtime = onnx_runtime if onnx else "torch"
    row = {"name": name, "model": path, "runtime": runtime, "dataset": dataset, "tasks": {}}
    if dataset is not None:
        result = evaluate(path, dataset=dataset, seq_len=seq_len, max_chunks=max_chunks, progress=progress,
                          runtime="onnxruntime-genai" if runtime == "onnxruntime-genai" else "torch")
        row.update(perplexity=result["perplexity"], windows=result["windows"], size_bytes=result["size_bytes"],
                   parameters=result.get("parameters"), scheme=result.get("scheme"))
    if tasks:
        from .tasks import evaluate_tasks

        row["tasks"] = evaluate_tasks(path, tasks, runtime=runtime, task_dir=task_dir, num_fewshot=num_fewshot,
                                      limit=limit)["tasks"]
    if speed:
        from .speed import measure_speed

        result = measure_speed(path, progress=progress, **speed_args)
        row.update(prefill_tokens_per_s=result["prefill_tokens_per_s"]["median"],
                   decode_tokens_per_s=result["decode_tokens_per_s"]["median"], speed=result,
                   peak_rss_bytes=result["peak_rss_bytes"], speed_runtime=result["runtime"])
    if prompts:
        from .generate import generate_answers

        row["answers"] = generate_answers(path, prompts, max_new_tokens)  # in the model's own runtime
    if row.get("size_bytes") is None:
        from .speed import size_on_disk

        row["size_bytes"] = size_on_disk(path)
    summary = _summary(Path(path)) if path != "demo" else {}
    row["layer_errors"] = summary.get("layer_errors", {})
    row["scheme"] = row.get("scheme") or summary.get("scheme")
    return row


def _fill_bits_per_weight(rows: list[dict]) -> None:
    """Bits per weight of each file: 8 x bytes on disk / parameters, the parameter count taken from the first row
    that knows it (an ONNX file does not say how many weights it packs; the models compared are one network)."""
    known = next((r["parameters"] for r in rows if r.get("parameters")), None)
    for row in rows:
        params = row.get("parameters") or known
        row["bits_per_weight"] = round(8 * row["size_bytes"] / params, 3) if params and row.get("size_bytes") else None


def compare(models, *, dataset: str | None = "pydoc", seq_len: int = 512, max_chunks: int | None = None,
            tasks=None, task_dir=None, limit=None, num_fewshot=None, speed: bool = True, speed_args=None,
            onnx_runtime: str = "onnxruntime", progress: bool = True, prompts=None,
            max_new_tokens: int = 64) -> list[dict]:
    """Rows of measurements of models (paths or NAME=PATH strings), the first one the reference. prompts (a file
    path or a list): each model's greedy answers (at most max_new_tokens tokens) go into its row's "answers"."""
    pairs = [parse_model_arg(m) if isinstance(m, str) else tuple(m) for m in models]
    if len(pairs) < 1:
        raise LowbitError("compare needs at least one model")
    if isinstance(prompts, (str, Path)):
        from .generate import read_prompts

        prompts = read_prompts(prompts)
        if not prompts:
            raise LowbitError("the --prompts file holds no prompt; write one prompt per line")
    if dataset is None and not tasks and not speed and not prompts:
        raise LowbitError("nothing to measure: give --dataset, --tasks, --prompts, or leave speed on")
    if onnx_runtime not in ("onnxruntime", "onnxruntime-genai"):
        raise LowbitError(f"ONNX models run in onnxruntime or onnxruntime-genai, not {onnx_runtime!r}")
    _check_models(pairs)
    if tasks:
        from .tasks import check_tasks

        check_tasks(tasks, task_dir)  # a bad task fails now, not after the first model's perplexity
    rows = []
    for name, path in pairs:
        print(f"[compare] {name}: {path}", file=sys.stderr, flush=True)
        rows.append(measure_model(name, path, dataset=dataset, seq_len=seq_len, max_chunks=max_chunks, tasks=tasks,
                                  task_dir=task_dir, limit=limit, num_fewshot=num_fewshot, speed=speed,
                                  speed_args=speed_args or {}, onnx_runtime=onnx_runtime, progress=progress,
                                  prompts=prompts, max_new_tokens=max_new_tokens))
    _fill_bits_per_weight(rows)
    return rows

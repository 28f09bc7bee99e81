"""Task accuracy through lm-eval: lowbit's torch figures equal lm-eval's own HF backend, the ONNX model class agrees
with them (onnxruntime and onnxruntime-genai), and the local LAMBADA-style task files work offline."""

import json
import math

import pytest

pytest.importorskip("lm_eval")

from lowbit.cli import main  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.eval.task_files import last_word_passages, write_last_word_task  # noqa: E402
from lowbit.eval.tasks import evaluate_tasks, onnx_lm, run_tasks  # noqa: E402

LIMIT = 8  # documents per task: enough to compare runtimes, quick on the tiny models


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    folder = tmp_path_factory.mktemp("tasks")
    write_last_word_task("\n\n".join(list(topics.values())[40:120]), folder, "lastword", limit=40)
    return folder


def test_last_word_passages_end_in_a_plain_word():
    text = ("Short one. " * 3 + "\n\n" + "The parser reads each token of the input in turn and builds the tree "
            "that later stages walk. When it meets a name it looks the name up in the current scope and records "
            "where the binding lives, so that the compiler can emit the right load instruction.")
    passages = last_word_passages(text, min_words=20)
    assert passages == [" ".join(text.split("\n\n")[1].split())[:-1]]
    assert passages[0].endswith("instruction")


def test_task_file_refuses_overwrite_and_bad_names(tmp_path, task_dir):
    with pytest.raises(LowbitError, match="exists"):
        write_last_word_task("x", task_dir, "lastword")
    with pytest.raises(LowbitError, match="letters"):
        write_last_word_task("x", tmp_path, "bad-name")
    with pytest.raises(LowbitError, match="no passage"):
        write_last_word_task("too short.", tmp_path, "empty")
    assert not list(tmp_path.iterdir())
    lines = (task_dir / "lastword.jsonl").read_text().splitlines()
    assert len(lines) == 40 and all(json.loads(line)["text"][-1].isalpha() for line in lines)


def _metrics(result, task="lastword"):
    return result["tasks"][task]["metrics"]


def test_torch_equals_lm_eval_hf_backend(onnx_tiny, task_dir):
    from lm_eval.models.huggingface import HFLM

    hf, _ = onnx_tiny["gqa"]
    ours = evaluate_tasks(hf, "lastword", task_dir=task_dir, limit=LIMIT)
    theirs = run_tasks(HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=1), "lastword", task_dir,
                       limit=LIMIT)
    assert ours["runtime"] == "torch" and ours["tasks"]["lastword"]["samples"] == LIMIT
    assert _metrics(ours) == theirs["lastword"]["metrics"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-genai"])
def test_onnx_agrees_with_torch(onnx_tiny, task_dir, runtime):
    hf, onnx = onnx_tiny["gqa"]
    torch_result = _metrics(evaluate_tasks(hf, "lastword", task_dir=task_dir, limit=LIMIT))
    onnx_result = evaluate_tasks(onnx, "lastword", runtime=runtime, task_dir=task_dir, limit=LIMIT)
    assert onnx_result["runtime"] == runtime
    got = _metrics(onnx_result)
    assert got["acc,none"] == torch_result["acc,none"]
    assert math.isclose(got["perplexity,none"], torch_result["perplexity,none"], rel_tol=1e-4)


def _generate_requests(task_dir):
    from lm_eval.api.instance import Instance

    texts = [json.loads(line)["text"] for line in (task_dir / "lastword.jsonl").read_text().splitlines()[:3]]
    return [Instance(request_type="generate_until", doc={}, idx=0,
                     arguments=(" ".join(t.split(" ")[:-1]), {"until": ["\n\n", "."], "max_gen_toks": 12}))
            for t in texts]


def test_greedy_generation_matches_hf_backend(onnx_tiny, task_dir):
    from lm_eval.models.huggingface import HFLM

    hf, onnx = onnx_tiny["gqa"]
    requests = _generate_requests(task_dir)
    expected = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=1).generate_until(requests, True)
    assert any(expected)
    for runtime in ("onnxruntime", "onnxruntime-genai"):
        assert onnx_lm(onnx, runtime).generate_until(requests, True) == expected, runtime


def test_loglikelihood_rolling_matches_hf_backend(onnx_tiny, task_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    hf, onnx = onnx_tiny["gqa"]
    text = (task_dir / "lastword.jsonl").read_text()[:3000]  # longer than the 256-token context: several windows
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, idx=0, arguments=(text,))]
    expected = HFLM(pretrained=str(hf), dtype="float32", device="cpu", batch_size=1).loglikelihood_rolling(
        requests, True)
    got = onnx_lm(onnx).loglikelihood_rolling(requests, True)
    assert math.isclose(got[0], expected[0], rel_tol=1e-4)


def test_cli_eval_tasks_json(onnx_tiny, task_dir, capsys):
    _, onnx = onnx_tiny["gqa"]
    assert main(["eval", str(onnx), "--tasks", "lastword", "--task-dir", str(task_dir), "--limit", "4",
                 "--json", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)  # lm-eval's own prints go to stderr
    assert "perplexity" not in result and result["tasks"]["lastword"]["samples"] == 4
    assert result["tasks"]["lastword"]["metric"] == "acc"


def test_cli_eval_tasks_refusals(onnx_tiny, task_dir, capsys):
    hf, onnx = onnx_tiny["gqa"]
    assert main(["eval", str(hf), "--tasks", "no_such_task_anywhere", "--task-dir", str(task_dir)]) == 2
    assert "unknown lm-eval task" in capsys.readouterr().err
    assert main(["eval", str(hf), "--tasks", "lastword", "--task-dir", str(task_dir / "missing")]) == 2
    assert "--task-dir" in capsys.readouterr().err
    assert main(["eval", str(hf), "--tasks", "lastword", "--task-dir", str(task_dir),
                 "--runtime", "onnxruntime-genai"]) == 2
    assert "error:" in capsys.readouterr().err

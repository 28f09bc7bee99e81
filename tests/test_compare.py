"""`lowbit compare` and `lowbit bench` end to end on a tiny model: float vs its 4-bit quantization vs that
quantization's ONNX export; the report's figures equal `lowbit eval` run separately."""

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("matplotlib")

from lowbit.cli import main  # noqa: E402
from lowbit.eval.compare import parse_model_arg  # noqa: E402
from lowbit.eval.task_files import write_last_word_task  # noqa: E402

EVAL = ["--seq-len", "64", "--max-chunks", "3"]
SPEED = ["--prompt-tokens", "16", "--new-tokens", "4", "--runs", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def three_models(onnx_tiny, tmp_path_factory):
    """(float folder, its w_uint4 AWQ lowbit folder, that folder's ONNX export, a task folder)."""
    from pydoc_data.topics import topics

    from lowbit.api import quantize

    hf, _ = onnx_tiny["gqa"]
    base = tmp_path_factory.mktemp("compare")
    out = base / "awq"
    quantize(hf, out, scheme="w_uint4_per_group_asym", group_size=32, algo="awq", num_calib_data=4, seq_len=64,
             progress=False, quiet=True, export="onnx")
    tasks = base / "tasks"
    write_last_word_task("\n\n".join(list(topics.values())[40:120]), tasks, "lastword", limit=6)
    return hf, out, base / "awq-onnx", tasks


def _eval_json(capsys, *argv):
    assert main(["eval", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def test_compare_float_awq_onnx(three_models, tmp_path, capsys):
    from PIL import Image

    hf, awq, onnx, tasks = three_models
    report = tmp_path / "report"
    argv = ["compare", f"float={hf}", f"awq={awq}", f"onnx={onnx}", "-o", str(report), *EVAL, "--dataset", "pydoc",
            "--tasks", "lastword", "--task-dir", str(tasks), *SPEED, "--no-progress"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    for name in ("float", "awq", "onnx"):
        assert name in table
    document = json.loads((report / "compare.json").read_text())
    rows = {r["name"]: r for r in document["rows"]}
    assert document["meta"]["command"].startswith("lowbit compare float=")
    assert Image.open(report / "compare.png").size[0] > 0
    assert "data:image/png;base64," in (report / "compare.html").read_text()

    for name, path in (("float", hf), ("awq", awq), ("onnx", onnx)):
        alone = _eval_json(capsys, str(path), "--dataset", "pydoc", *EVAL, "--tasks", "lastword", "--task-dir",
                           str(tasks))
        row = rows[name]
        assert row["perplexity"] == alone["perplexity"], name
        assert row["tasks"]["lastword"]["value"] == alone["tasks"]["lastword"]["value"], name
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0 and row["size_bytes"] > 0
        assert row["bits_per_weight"] > 0
    assert rows["onnx"]["runtime"] == "onnxruntime" and rows["onnx"]["speed_runtime"] == "onnxruntime-genai"
    assert rows["awq"]["layer_errors"] and rows["awq"]["layer_errors"] == rows["onnx"]["layer_errors"]
    assert not rows["float"]["layer_errors"]
    assert rows["awq"]["bits_per_weight"] < rows["float"]["bits_per_weight"]
    # the ONNX export holds the AWQ folder's codes: the same network, within float rounding
    assert abs(rows["onnx"]["perplexity"] / rows["awq"]["perplexity"] - 1) < 1e-3


def test_compare_refuses_before_measuring(three_models, tmp_path, capsys):
    hf, awq, _, tasks = three_models
    report = tmp_path / "report"
    report.mkdir()
    (report / "compare.json").write_text("{}")
    assert main(["compare", str(hf), "-o", str(report), "--no-speed"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (report / "compare.json").read_text() == "{}"
    assert main(["compare", str(hf), str(tmp_path / "missing"), "-o", str(tmp_path / "r2"), "--no-speed"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compare", f"a={hf}", f"a={awq}", "-o", str(tmp_path / "r3"), "--no-speed"]) == 2
    assert "label" in capsys.readouterr().err
    assert main(["compare", str(hf), "-o", str(tmp_path / "r4"), "--no-speed", "--tasks", "lastword",
                 "--task-dir", str(tasks / "nope")]) == 2
    assert not (tmp_path / "r2").exists() and not (tmp_path / "r3").exists() and not (tmp_path / "r4").exists()


def test_parse_model_arg():
    assert parse_model_arg("float=/a/b") == ("float", "/a/b")
    assert parse_model_arg("/x/model-onnx/") == ("model-onnx", "/x/model-onnx/")
    assert parse_model_arg("demo") == ("demo", "demo")


def test_bench_cli_json(three_models, capsys):
    _, awq, onnx, _ = three_models
    for model in (awq, onnx):
        assert main(["bench", str(model), *SPEED, "--json", "--no-progress"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["decode_tokens_per_s"]["median"] > 0 and len(result["decode_tokens_per_s"]["all"]) == 2
    assert main(["bench", str(awq), "--runs", "0"]) == 2
    assert "error:" in capsys.readouterr().err


def test_export_cli_json(three_models, tmp_path, capsys):
    _, awq, _, _ = three_models
    out = tmp_path / "model.gguf"
    assert main(["export", str(awq), "-f", "gguf", "-o", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"output": str(out), "format": "gguf", "size_bytes": out.stat().st_size}


def test_compressed_tensors_export_evaluates_through_transformers(three_models, tmp_path, capsys):
    """A compressed-tensors export (loaded by transformers, decompressed) scores as its lowbit folder does."""
    pytest.importorskip("compressed_tensors")
    from lowbit.api import export
    from lowbit.eval.tasks import evaluate_tasks

    _, awq, _, tasks = three_models
    ct = export(awq, tmp_path / "ct", "compressed-tensors", quiet=True)
    ours, theirs = (_eval_json(capsys, str(m), "--dataset", "pydoc", *EVAL) for m in (awq, ct))
    assert theirs["runtime"] == "transformers" and theirs["quantized"]
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) < 1e-5
    task = {m: evaluate_tasks(m, "lastword", task_dir=tasks, limit=4)["tasks"]["lastword"]["metrics"]
            for m in (awq, ct)}
    assert abs(task[ct]["perplexity,none"] / task[awq]["perplexity,none"] - 1) < 1e-5

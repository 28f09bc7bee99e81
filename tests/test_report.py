"""The comparison report: the terminal table, the three files write_report leaves (JSON, PNG, HTML), refusal to
overwrite, no half-written files, and the HTML as headless Chromium renders it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from lowbit.errors import LowbitError
from lowbit.eval import report
from lowbit.eval.report import format_table, layer_order, layer_sort_key, write_report

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def _errors(base: float, layers: int = 4) -> dict[str, float]:
    return {f"model.layers.{i}.{name}": round(base * (1 + 0.1 * i + 0.05 * j), 6)
            for i in range(layers) for j, name in enumerate(LINEARS)}


@pytest.fixture
def rows() -> list[dict]:
    """A float reference with tasks and speed, a quantized model with everything, and one with almost nothing."""
    return [
        {"name": "bf16", "model": "models/tiny", "runtime": "torch", "scheme": None, "size_bytes": 400 * 2**20,
         "parameters": 200_000_000, "bits_per_weight": 16.0, "perplexity": 10.0, "dataset": "pydoc",
         "tasks": {"arc_easy": {"metric": "acc", "value": 0.70, "stderr": 0.01},
                   "hellaswag": {"metric": "acc_norm", "value": 0.5, "stderr": None}},
         "prefill_tokens_per_s": 812.25, "decode_tokens_per_s": 21.4, "peak_rss_bytes": 900 * 2**20,
         "layer_errors": {}},
        {"name": "w4-gptq", "model": "out/gptq", "runtime": "onnxruntime-genai", "scheme": "w4a16 g128",
         "size_bytes": 120 * 2**20, "parameters": 200_000_000, "bits_per_weight": 4.25, "perplexity": 10.5,
         "dataset": "pydoc", "tasks": {"arc_easy": {"metric": "acc", "value": 0.688, "stderr": 0.01}},
         "prefill_tokens_per_s": 640.0, "decode_tokens_per_s": 38.9, "peak_rss_bytes": None,
         "layer_errors": _errors(0.05)},
        {"name": "q3-<gguf>&", "model": "out/q3.gguf", "runtime": "llama.cpp", "scheme": None, "size_bytes": None,
         "parameters": None, "bits_per_weight": None, "perplexity": None, "dataset": None, "tasks": {},
         "prefill_tokens_per_s": None, "decode_tokens_per_s": None, "peak_rss_bytes": None,
         "layer_errors": _errors(0.12, layers=12)},
    ]


def test_format_table_names_every_model_and_dashes_missing_values(rows):
    text = format_table(rows + [{"name": "bare"}])  # a row with no keys at all
    lines = text.splitlines()
    for row in rows:
        assert row["name"] in text
    assert "bare" in text
    measures = len(report.table_columns(rows)) - 1
    assert measures == 7  # size, bits/weight, perplexity, 2 tasks, prefill, decode
    for line, name in ((lines[4], "q3-<gguf>&"), (lines[5], "bare")):  # every measure missing: "-" each
        assert line.split() == [name] + ["-"] * measures
    assert "arc_easy acc%" in lines[0] and "hellaswag acc_norm%" in lines[0]
    assert "prefill tok/s" in lines[0] and "decode tok/s" in lines[0]


def test_format_table_changes_are_against_the_first_row(rows):
    text = format_table(rows)
    quantized = next(line for line in text.splitlines() if line.startswith("w4-gptq"))
    assert "10.50 (+5.0%)" in quantized  # perplexity: percent change
    assert "68.8 (-1.2)" in quantized  # accuracy in %, change in points
    assert "120.0" in quantized and "4.25" in quantized and "640" in quantized and "38.9" in quantized
    reference = next(line for line in text.splitlines() if line.startswith("bf16"))
    assert "(" not in reference and "812" in reference and "70.0" in reference


def test_format_table_survives_odd_values():
    text = format_table([{"name": "a", "perplexity": float("inf"), "tasks": {"t": {"metric": "acc",
                                                                                   "value": float("nan")}}},
                         {"name": "b", "perplexity": 5.0, "tasks": "not a dict", "decode_tokens_per_s":
                          {"median": 12.5, "min": 12.0}}, {}])
    assert "inf" in text and "12.5" in text and "model 3" in text
    assert format_table([]).splitlines()[0].startswith("name")


def test_layers_sort_by_block_index_then_name():
    names = ["lm_head", "model.layers.10.mlp.up_proj", "model.layers.2.self_attn.q_proj",
             "model.layers.2.mlp.experts.10.down_proj", "model.layers.2.mlp.experts.2.down_proj"]
    assert sorted(names, key=layer_sort_key) == [
        "model.layers.2.mlp.experts.2.down_proj", "model.layers.2.mlp.experts.10.down_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.10.mlp.up_proj", "lm_head"]
    order = layer_order([{"layer_errors": _errors(0.1, layers=12)}])
    assert order[0] == "model.layers.0.mlp.down_proj" and order[-1] == "model.layers.11.self_attn.v_proj"


def test_write_report_writes_json_png_and_html(rows, tmp_path):
    from PIL import Image

    meta = {"command": "lowbit compare models/tiny out/gptq out/q3.gguf", "machine": "x86_64, 16 CPUs",
            "versions": {"lowbit": "0.1.0", "torch": "2.5"}}
    out = tmp_path / "new" / "report"
    paths = write_report(rows, out, title="tiny <compare>", meta=meta)
    assert set(paths) == {"json", "png", "html"} and all(p.parent == out and p.is_file() for p in paths.values())
    assert sorted(p.name for p in out.iterdir()) == ["compare.html", "compare.json", "compare.png"]

    document = json.loads(paths["json"].read_text())
    assert document["rows"] == rows and document["title"] == "tiny <compare>"
    assert {k: document["meta"][k] for k in meta} == meta and document["meta"]["date"]

    with Image.open(paths["png"]) as image:
        assert image.format == "PNG" and image.size == (1200, 700)
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or range(2)) > 10

    page = paths["html"].read_text()
    assert '<img src="data:image/png;base64,' in page and "<table>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "tiny &lt;compare&gt;" in page and "q3-&lt;gguf&gt;&amp;" in page and "<gguf>" not in page
    for value in ("bf16", "w4-gptq", "10.50 (+5.0%)", "68.8 (-1.2)", "38.9", meta["command"], "x86_64, 16 CPUs"):
        assert value in page


def test_write_report_refuses_to_overwrite(rows, tmp_path):
    paths = write_report(rows, tmp_path)
    before = {k: p.read_bytes() for k, p in paths.items()}
    with pytest.raises(LowbitError, match="already holds compare.json, compare.png, compare.html") as error:
        write_report(rows[:1], tmp_path)
    assert "\n" not in str(error.value)
    assert {k: p.read_bytes() for k, p in paths.items()} == before
    (tmp_path / "compare.json").unlink()  # one file left is enough to refuse
    with pytest.raises(LowbitError, match="compare.png"):
        write_report(rows, tmp_path)

    write_report(rows[:1], tmp_path, overwrite=True)
    assert json.loads(paths["json"].read_text())["rows"] == rows[:1]
    assert paths["png"].read_bytes() != before["png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.html", "compare.json", "compare.png"]


def test_write_report_refuses_a_file_as_folder(rows, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(LowbitError, match="is a file"):
        write_report(rows, tmp_path / "taken")


def test_a_failure_leaves_no_half_written_file(rows, tmp_path, monkeypatch):
    def broken_png(*args, **kwargs):
        raise RuntimeError("plotting failed")

    with monkeypatch.context() as patch:  # rendering fails: nothing at all is written
        patch.setattr(report, "render_png", broken_png)
        with pytest.raises(RuntimeError):
            write_report(rows, tmp_path)
    assert list(tmp_path.iterdir()) == []

    real_replace = os.replace

    def failing_replace(src, dst):  # the disk fails while the PNG is being put in place
        if str(dst).endswith("compare.png"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(LowbitError, match="No space left on device"):
        write_report(rows, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json"]  # complete, no temp file left
    assert json.loads((tmp_path / "compare.json").read_text())["rows"] == rows


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run_chromium(binary: str, tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{name}"
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(tmp_path)}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, check=False)


def test_html_renders_in_headless_chromium(rows, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (chromium or chromium-browser) on PATH")
    from PIL import Image

    page = write_report(rows, tmp_path / "report", meta={"command": "lowbit compare a b c"})["html"]
    url = page.resolve().as_uri()

    shot = tmp_path / "shot.png"
    done = _run_chromium(binary, tmp_path, "shot", f"--screenshot={shot}", "--window-size=1280,1600", url)
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 22)
        assert colours is None or len(colours) > 1, "the screenshot is blank"

    dom = _run_chromium(binary, tmp_path, "dom", "--dump-dom", url).stdout
    assert "<table>" in dom and "w4-gptq" in dom and "10.50 (+5.0%)" in dom
    assert 'src="data:image/png;base64,' in dom

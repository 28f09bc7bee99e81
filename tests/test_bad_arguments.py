"""Bad arguments, bad recipe text and bad weights: one `error:` line, exit code 2, nothing written; and the
warnings a user needs (text that is not UTF-8, windows beyond the model's positions, GPTQ falling back to RTN)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.cli import build_parser
from lowbit.errors import LowbitError
from .refusals import assert_refused, run_cli

RTN = ["--scheme", "w_uint4_per_group_asym", "--group-size", "16", "--no-progress"]


def _count_options():
    """(command, option, least) for every whole-number option of every command."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command, parser in sub.choices.items():
        for action in parser._actions:
            least = getattr(action.type, "least", None)
            if least is not None:
                yield command, action.option_strings[0], least


def _argv(command, model, out):
    return {"quantize": ["quantize", model, "-o", out, *RTN], "eval": ["eval", model],
            "bench": ["bench", model], "compare": ["compare", model, "-o", out],
            "export": ["export", model, "-f", "awq", "-o", out], "inspect": ["inspect", model],
            "generate": ["generate", model, "x"], "chat": ["chat", model]}[command]


def test_every_count_option_is_checked():
    found = {(c, o) for c, o, _ in _count_options()}
    for expected in [("quantize", "--num-calib-data"), ("quantize", "--seq-len"), ("quantize", "--batch-size"),
                     ("eval", "--batch-size"), ("eval", "--max-chunks"), ("eval", "--seq-len"), ("bench", "--runs")]:
        assert expected in found


@pytest.mark.parametrize("command,option,least", list(_count_options()))
def test_count_options_below_their_least_or_not_numbers(command, option, least, tiny_models, tmp_path, capsys):
    out = tmp_path / "out"
    for value in (str(least - 1), "-3", "x", "1.5"):
        assert_refused([*_argv(command, tiny_models["llama"], out), option, value], capsys,
                       f"argument {option}.*(at least {least}|whole number)", unchanged=[tiny_models["llama"]],
                       absent=[out])


def test_limit_must_be_positive(tiny_models, capsys):
    for value in ("0", "-1", "nan", "x"):
        assert_refused(["eval", tiny_models["llama"], "--tasks", "x", "--limit", value], capsys, "argument --limit")


@pytest.mark.parametrize("flag", ["--override", "--exclude-layers"])
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_invalid_regular_expression(flag, command, tiny_models, tmp_path, capsys):
    pattern = "re:mlp.(down" + (":bits=8" if flag == "--override" else "")
    argv = _argv(command, tiny_models["llama"], tmp_path / "out")
    if command == "inspect":
        argv += ["--scheme", "w_uint4_per_group_asym"]
    assert_refused([*argv, flag, pattern], capsys, r"re:mlp\.\(down.* not a valid regular expression",
                   absent=[tmp_path / "out"])


@pytest.mark.parametrize("override,message", [
    ("*:fnuz=maybe", "fnuz must be true or false, got 'maybe'"),
    ("*:subblock_size=x", "subblock_size must be a whole number, got 'x'"),
    ("*:bits=1.5", "bits must be a whole number"),
    ("*:symmetric=2", "symmetric must be true or false"),
    ("*:group_size=abc", "group_size must be a whole number"),
    ("*:group_size=0", "positive group size"),
    ("*:bits=12", "2 to 8 bits"),
    ("*:colour=red", "unknown key 'colour'"),
    ("*:bits", "'bits' is not key=value; e.g. down_proj:bits=8"),
    ("*:scale_rule=sometimes", "unknown scale rule"),
    ("*:scheme=w_int5_per_nothing", "unknown scheme"),
])
def test_override_values_of_the_wrong_type(override, message, tiny_models, tmp_path, capsys):
    assert_refused(["quantize", tiny_models["llama"], "-o", tmp_path / "out", *RTN, "--override", override], capsys,
                   message.replace("(", r"\(").replace(")", r"\)"), absent=[tmp_path / "out"])


@pytest.mark.parametrize("text,message", [
    ("- just\n- a list\n", "not a mapping"),
    ("scheme: w_uint4\n", "cannot be read as a lowbit recipe"),
    ("{not yaml: [", "cannot be read as a lowbit recipe"),
    ("scheme: {name: x, weight: {bits: eight}}\n", "bits must be a whole number"),
    ("scheme: {name: x, weight: {bits: 4}}\ncalibration: {num_samples: 0}\n", "--num-calib-data must be"),
    ("scheme: {name: x, weight: {bits: 4}}\ncalibration: {batchsize: 3}\n", "unknown calibration setting"),
    ("scheme: {name: x, weight: {bits: 4}}\nexclude: ['re:(']\n", "not a valid regular expression"),
    ("\xff\xfe", "cannot be read as a lowbit recipe"),
])
def test_bad_recipe_files(text, message, tiny_models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text.encode("latin-1"))
    assert_refused(["quantize", tiny_models["llama"], "-o", tmp_path / "out", "--recipe", recipe], capsys, message,
                   absent=[tmp_path / "out"])


def test_api_counts_are_checked_too(tiny_models, tmp_path):
    for kwargs, message in (({"num_calib_data": 0}, "--num-calib-data"), ({"seq_len": 1}, "--seq-len"),
                            ({"batch_size": 0}, "--batch-size"), ({"seed": -1}, "--seed"),
                            ({"evaluate_after": True, "max_chunks": 0}, "--max-chunks")):
        with pytest.raises(LowbitError, match=message):
            lowbit.quantize(tiny_models["llama"], tmp_path / "out", scheme="w_uint4_per_group_asym", group_size=16,
                            algo="gptq", progress=False, quiet=True, **kwargs)
    for kwargs, message in (({"batch_size": 0}, "--batch-size"), ({"max_chunks": 0}, "--max-chunks"),
                            ({"seq_len": 0}, "--seq-len")):
        with pytest.raises(LowbitError, match=message):
            lowbit.evaluate(tiny_models["llama"], progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_eval_max_chunks_zero_names_the_option(tiny_models, capsys):
    line = assert_refused(["eval", tiny_models["llama"], "--max-chunks", "0"], capsys, "--max-chunks")
    assert "text" not in line


def _with_bad_value(src, tmp_path, value):
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(src, tmp_path / "bad")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("scheme", ["w_uint4_per_channel_asym", "w_fp8", "w_mxfp4"])
def test_nan_and_inf_weights_are_refused_by_name(value, scheme, tiny_models, tmp_path, capsys):
    folder = _with_bad_value(tiny_models["llama"], tmp_path, value)
    argv = ["quantize", folder, "-o", tmp_path / "out", "--scheme", scheme, "--no-progress"]
    assert_refused(argv, capsys, r"model\.layers\.1\.mlp\.up_proj\.weight .* holds 1 NaN or infinite value",
                   unchanged=[folder], absent=[tmp_path / "out"])


def test_nan_weights_refused_by_eval(tiny_models, tmp_path, capsys):
    folder = _with_bad_value(tiny_models["llama"], tmp_path, float("nan"))
    assert_refused(["eval", folder, "--max-chunks", "1", "--seq-len", "32"], capsys, "up_proj.weight .* NaN")


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_text_that_is_not_utf8_is_read_with_a_warning(tiny_models, tmp_path, capsys):
    from pydoc_data.topics import topics

    text = tmp_path / "latin1.txt"
    text.write_bytes("\n".join(list(topics.values())[:20]).encode("ascii", errors="ignore") + b" caf\xe9 na\xefve")
    code, _, err = run_cli(["quantize", tiny_models["llama"], "-o", tmp_path / "out", *RTN, "--algo", "gptq",
                            "--dataset", text, "--num-calib-data", "2", "--seq-len", "32"], capsys)
    assert code == 0
    assert any("latin1.txt is not valid UTF-8 (2 undecodable" in w for w in _warnings(err)), err


def test_windows_beyond_the_models_positions(tiny_models, tmp_path, capsys):
    # rotary positions (Llama, 256 positions): a warning, the run goes on
    code, _, err = run_cli(["eval", tiny_models["llama"], "--seq-len", "300", "--max-chunks", "1"], capsys)
    assert code == 0 and any("--seq-len 300 is beyond the model's 256 positions" in w for w in _warnings(err))
    # a learned position table (OPT) has no row for position 300: refused before any work
    assert_refused(["quantize", tiny_models["opt"], "-o", tmp_path / "out", *RTN, "--algo", "gptq", "--seq-len",
                    "300", "--num-calib-data", "2"], capsys, "longer than the 256 positions", absent=[tmp_path / "out"])


def test_gptq_falling_back_to_rtn_is_printed(tiny_moe, tmp_path, capsys):
    code, _, err = run_cli(["quantize", tiny_moe["mixtral"], "-o", tmp_path / "out", *RTN, "--algo", "gptq",
                            "--num-calib-data", "1", "--seq-len", "8"], capsys)
    assert code == 0
    fallback = [w for w in _warnings(err) if "by RTN" in w]
    assert len(fallback) == 1 and "gptq quantized" in fallback[0] and "--num-calib-data" in fallback[0]


def test_readme_python_api(tiny_models, tmp_path):
    """The README's API example: lowbit.quantize, then lowbit.export (a function, not the exporters package)."""
    result = lowbit.quantize(tiny_models["llama"], tmp_path / "w4", scheme="w_uint4_per_group_asym", group_size=16,
                             overrides=["down_proj:bits=8"], keep_in_memory=True, progress=False, quiet=True)
    assert isinstance(result.model, torch.nn.Module) and result.summary["layer_errors"]
    assert callable(lowbit.export)
    out = lowbit.export(tmp_path / "w4", tmp_path / "w4-gptq", "gptq", quiet=True)
    assert (out / "model.safetensors").is_file()
    assert lowbit.parse_scheme("w_int4_per_group_sym", 64).weight.group_size == 64


@pytest.mark.parametrize("option,message", [
    ("gptq:damp=abc", "gptq option damp must be a number, got 'abc'"),
    ("gptq:damp=-1", "gptq option damp must be between"),
    ("gptq:damp=nan", "gptq option damp must be a number"),
    ("gptq:block_size=0", "gptq option block_size must be at least 1"),
    ("gptq:act_order=2", "gptq option act_order must be true or false"),
    ("gptq:colour=red", "gptq has no option 'colour'; its options: block_size, damp"),
    ("awq:grid=0", "awq option grid must be at least 1"),
    ("awq:max_shrink=2", "awq option max_shrink must be between"),
    ("awq:clip_skip=re:[", "not a valid regular expression"),
    ("smoothquant:alpha=7", "alpha must lie in"),
    ("rotation:seed=x", "rotation option seed must be a whole number"),
])
def test_algorithm_options_are_typed_and_bounded(option, message, tiny_models, tmp_path, capsys):
    algo = option.split(":")[0]
    chain = {"gptq": "gptq", "awq": "awq", "smoothquant": "smoothquant", "rotation": "rotation,gptq"}[algo]
    assert_refused(["quantize", tiny_models["llama"], "-o", tmp_path / "out", *RTN, "--algo", chain, "--algo-arg",
                    option], capsys, message.replace("(", r"\(").replace("[", r"\["), absent=[tmp_path / "out"])


def test_bad_text_and_config_files(tiny_models, tmp_path, capsys):
    parquet = tmp_path / "bad.parquet"
    parquet.write_text("not parquet")
    assert_refused(["eval", tiny_models["llama"], "--dataset", parquet], capsys, "cannot read .*bad.parquet as a parquet")
    assert_refused(["eval", tiny_models["llama"], "--dataset", tmp_path], capsys, "cannot read dataset file")
    folder = tmp_path / "listcfg"
    folder.mkdir()
    (folder / "config.json").write_text("[]")
    (folder / "model.safetensors").write_bytes(b"")
    for command in ("eval", "inspect"):
        assert_refused([command, folder], capsys, "holds a JSON list, not the object", unchanged=[folder])
    assert_refused(["quantize", tiny_models["llama"], "-o", tmp_path / "o", *RTN, "--seed", str(2**64)], capsys,
                   "argument --seed: must be at most", absent=[tmp_path / "o"])


def test_finite_check_tells_overflow_from_nan():
    from lowbit.model_files import check_finite

    big = torch.full((3000,), 60000.0, dtype=torch.float16)  # finite, but its float16 sum overflows
    check_finite("w", big, "folder")
    big[1234] = float("nan")
    with pytest.raises(LowbitError, match="w in folder holds 1 NaN or infinite value"):
        check_finite("w", big, "folder")


def test_nan_weights_in_an_onnx_model_are_refused(onnx_tiny, tmp_path, capsys):
    import onnx
    from onnx import TensorProto

    folder = Path(shutil.copytree(onnx_tiny["gqa"][1], tmp_path / "onnx"))
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    target = next(t for t in model.graph.initializer if "down_proj" in t.name and len(t.dims) == 2)
    info = {e.key: e.value for e in target.external_data}
    assert target.data_type == TensorProto.FLOAT
    with open(folder / info["location"], "r+b") as f:  # the first element of that weight becomes NaN
        f.seek(int(info.get("offset", 0)))
        f.write(np.array([np.nan], dtype=np.float32).tobytes())
    assert_refused(["quantize", folder, "-o", tmp_path / "out", "--scheme", "w_uint4_per_group_asym",
                    "--group-size", "32", "--no-progress"], capsys, f"{target.name} in .* holds 1 NaN",
                   unchanged=[folder], absent=[tmp_path / "out"])

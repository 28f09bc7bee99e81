"""K-quant grids as lowbit weight formats (w_q2_k .. w_q6_k, formats/gguf_grid): RTN and GPTQ put their codes on the
two-level grid a GGUF K-quant block stores, the export writes them byte for byte, and llama.cpp runs the file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from lowbit.algorithms.gptq import gptq_quantize
from lowbit.errors import LowbitError
from lowbit.exporters.gguf import export_gguf, plan_gguf
from lowbit.exporters.gguf_blocks import pack_exact, requantize
from lowbit.exporters.gguf_kquants import quantize_k
from lowbit.exporters.source import LowbitFolder
from lowbit.formats import quantize
from lowbit.formats.packed import pack_linear, unpack_linear
from lowbit.recipe import kquant_fallback
from lowbit.spec import GGUF_GRID_SPECS, parse_scheme

from .conftest import save_random_model
from .test_gguf_export import _llama_logits, _lowbit_logits

KINDS = list(GGUF_GRID_SPECS)  # the K-quants and the legacy grids they fall back to


def _weight(rows=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[:, 7] *= 8  # an outlier column, and one sub-block of near-constant values
    w[3, 32:48] = -0.02 + 1e-4 * torch.randn(16, generator=g)
    return w


def _gguf_values(blocks: np.ndarray, kind: str, shape) -> torch.Tensor:
    return torch.from_numpy(dequantize(blocks, T[kind.upper()])).reshape(shape).double()


@pytest.mark.parametrize("kind", KINDS)
def test_rtn_codes_pack_exactly_and_match_llama_cpp_style_search(kind):
    """What lowbit computes with is what the GGUF block decodes to, and RTN onto the grid is as good as the
    exporter's own K-quant search (never worse: a zero sub-block scale is only ever raised to 1)."""
    w = _weight()
    spec = GGUF_GRID_SPECS[kind]
    qt = quantize(w, spec)
    blocks = pack_exact(qt, T[kind.upper()])
    ours = qt.dequantize().double()
    assert torch.allclose(_gguf_values(blocks, kind, w.shape), ours, rtol=1e-5, atol=1e-7)
    search = quantize_k if kind.endswith("_k") else requantize  # the exporter's own search (Q8_0: gguf-py's)
    searched = _gguf_values(search(w, T[kind.upper()]), kind, w.shape)
    assert float(((ours - w) ** 2).sum()) <= float(((searched - w) ** 2).sum()) * (1 + 1e-6)
    back = unpack_linear(pack_linear(qt), spec, tuple(w.shape))  # lowbit's folder keeps the grid
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.dequantize(), qt.dequantize())
    assert np.array_equal(pack_exact(back, T[kind.upper()]), blocks)


@pytest.mark.parametrize("kind", ["q2_k", "q4_k", "q6_k", "q4_1", "q5_0"])
def test_gptq_lands_on_the_grid_and_lowers_the_output_error(kind):
    g = torch.Generator().manual_seed(1)
    w = _weight(32, 512, seed=2)
    x = torch.randn(1024, 512, generator=g) * torch.linspace(0.2, 3.0, 512)
    H = 2 * x.T @ x / len(x)
    spec = GGUF_GRID_SPECS[kind]
    rtn = quantize(w, spec)
    gq, _ = gptq_quantize(w, H, spec)
    out_err = [float(((x @ (q.dequantize() - w).T) ** 2).mean()) for q in (rtn, gq)]
    assert out_err[1] < 0.95 * out_err[0]
    blocks = pack_exact(gq, T[kind.upper()])
    assert torch.allclose(_gguf_values(blocks, kind, w.shape), gq.dequantize().double(), rtol=1e-5, atol=1e-7)


def test_scheme_names_fallbacks_and_refusals():
    assert parse_scheme("w_q4_k").weight == GGUF_GRID_SPECS["q4_k"]
    with pytest.raises(LowbitError, match="sub-blocks are fixed"):
        parse_scheme("w_q4_k", group_size=64)
    with pytest.raises(LowbitError, match="drop the changes"):
        GGUF_GRID_SPECS["q4_k"].with_changes(group_size=64)
    spec, why = kquant_fallback(GGUF_GRID_SPECS["q4_k"], (64, 576), "scheme")
    assert spec == GGUF_GRID_SPECS["q5_0"] and (spec.bits, spec.symmetric, spec.group_size) == (5, True, 32)
    assert "Q5_0" in why
    with pytest.raises(LowbitError, match="blocks of 32 columns"):
        kquant_fallback(GGUF_GRID_SPECS["q4_0"], (64, 48), "scheme")
    assert kquant_fallback(GGUF_GRID_SPECS["q6_k"], (64, 1536), "scheme")[0] == GGUF_GRID_SPECS["q6_k"]
    from lowbit.mixed import check_base

    with pytest.raises(LowbitError, match="--target-bits chooses bits"):
        check_base(GGUF_GRID_SPECS["q4_k"], None)
    assert kquant_fallback(GGUF_GRID_SPECS["q5_k"], (64, 576), "scheme")[0].symmetric is False


def test_gptq_q4_k_folder_exports_exactly_and_runs_in_llama_cpp(tiny256, lowbit_out, tmp_path):
    src = lowbit_out(tiny256, "w_q4_k", algo="gptq")
    folder = LowbitFolder(src)
    plan = plan_gguf(folder)
    assert all(lin.exact and lin.qtype == T.Q4_K for lin in plan.linears) and not plan.warnings
    path = export_gguf(src, tmp_path / "q4k.gguf")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    down = tensors["blk.1.ffn_down.weight"]  # not row-permuted: comparable with lowbit's weight as it is
    wd = folder.weight("model.layers.1.mlp.down_proj").double()
    assert down.tensor_type == T.Q4_K
    assert torch.allclose(_gguf_values(down.data, "q4_k", wd.shape), wd, rtol=1e-5, atol=1e-7)
    ids = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    theirs, ours = _llama_logits(path, ids), _lowbit_logits(str(src), ids)  # ours: the lowbit folder, in torch
    assert np.abs(ours - theirs).max() < 0.08 * np.abs(ours).max()  # llama.cpp's Q8_K activations (test_gguf_kmix)


def test_other_formats_refuse_k_quant_grids(tiny256, lowbit_out, tmp_path):
    from lowbit.api import export

    src = lowbit_out(tiny256, "w_q4_k")
    with pytest.raises(LowbitError, match="holds no llama.cpp block grids.*export to gguf"):
        export(src, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_autoround_learns_the_rounding_on_a_k_quant_grid(tiny256, lowbit_out):
    """AutoRound keeps the searched two-level grid and learns only the rounding: the codes differ from RTN's, the
    scales do not, the block loss falls, and the export still holds the codes exactly."""
    rtn = LowbitFolder(lowbit_out(tiny256, "w_q5_k"))
    src = lowbit_out(tiny256, "w_q5_k", algo="autoround", algo_args={"autoround": {"iters": 20}})
    learned = LowbitFolder(src)
    name = "model.layers.1.mlp.down_proj"
    a, b = rtn.quantized(name), learned.quantized(name)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.tensor_scale, b.tensor_scale)
    assert not torch.equal(a.codes, b.codes)
    plan = plan_gguf(learned)
    assert all(lin.exact and lin.qtype == T.Q5_K for lin in plan.linears)
    blocks = pack_exact(b, T.Q5_K)
    assert torch.allclose(_gguf_values(blocks, "q5_k", b.shape), b.dequantize().double(), rtol=1e-5, atol=1e-7)
    import json
    notes = json.loads((src / "summary.json").read_text())
    assert "autoround: block output loss" in json.dumps(notes)


@pytest.mark.parametrize("mix,algo", [("q4_k_m", "gptq"), ("q2_k", "awq,gptq")])
def test_mix_scheme_puts_every_linear_on_its_mix_type(mix, algo, tiny256, tmp_path):
    """gguf_q4_k_m: each linear quantized (GPTQ, or AWQ then GPTQ) onto the grid llama.cpp's mix gives its tensor; the
    export of that mix (the default for this scheme) then re-quantizes no linear, and the file's types are the
    mix's."""
    from lowbit.api import quantize as api_quantize
    from lowbit.exporters.gguf_mixes import ModelShape, mix_types

    out = tmp_path / "q"
    result = api_quantize(tiny256, out, scheme=f"gguf_{mix}", algo=algo, export="gguf", progress=False, quiet=True,
                          num_calib_data=4, seq_len=64)
    plan = plan_gguf(LowbitFolder(out), mix)
    assert all(lin.exact for lin in plan.linears) and not plan.warnings
    reader = gguf.GGUFReader(result.summary["exports"]["gguf"])
    names = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    assert {t.name: t.tensor_type for t in reader.tensors if t.name in names} == \
        mix_types(mix, names, ModelShape(4, 4, tied_output=False))
    assert len({lin.qtype for lin in plan.linears}) > 1  # the mix raised some tensors above its base type
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"])


def test_quantize_refuses_an_imatrix_of_another_model_before_any_work(tiny256, tiny_models, tmp_path):
    from lowbit.api import quantize as api_quantize
    from lowbit.cli import main

    other = tmp_path / "other.gguf"
    assert main(["imatrix", str(tiny_models["llama"]), "-o", str(other), "--num-calib-data", "2", "--seq-len", "16",
                 "--no-progress"]) == 0
    with pytest.raises(LowbitError, match="computed for another model"):
        api_quantize(tiny256, tmp_path / "q", scheme="gguf_q4_k_m", algo="gptq", export="gguf",
                     export_options={"gguf": {"imatrix": str(other)}}, progress=False, quiet=True)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.gguf").exists()


def test_cli_quantize_a_mix_scheme_with_export(tiny256, tmp_path, capsys):
    from lowbit.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", str(tiny256), "-o", str(out), "--scheme", "gguf_q3_k_m", "--algo", "gptq", "--export",
                 "gguf", "--num-calib-data", "4", "--seq-len", "32", "--no-progress"]) == 0
    reader = gguf.GGUFReader(tmp_path / "cli.gguf")
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q3_K_M)
    assert "re-quantized" not in capsys.readouterr().err
    assert main(["quantize", str(tiny256), "-o", str(tmp_path / "bad"), "--scheme", "w_q4_k", "--group-size", "64"]) \
        != 0
    assert "sub-blocks are fixed" in capsys.readouterr().err and not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def tiny320(tmp_path_factory, tokenizer_dir):
    """Rows of 320 (not whole super-blocks: the fallback grids) and an MLP of 768 (K-quant super-blocks)."""
    import transformers as tf
    from transformers import AutoTokenizer

    config = tf.LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=320,
                            intermediate_size=768, num_hidden_layers=2, num_attention_heads=5, num_key_value_heads=1,
                            max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    return save_random_model(config, tmp_path_factory.mktemp("tiny320"), tokenizer_dir, torch.float32)


def test_mix_scheme_on_rows_that_are_not_super_blocks_uses_the_fallback_grids(tiny320, tmp_path):
    """gguf_q3_k_m on 320-wide rows: llama.cpp's fallback types (Q4_0 for Q3_K; Q5_0 for a raised Q4_K, ...) as
    lowbit grids, so GPTQ's codes move exactly there too; ffn_down (768 wide) stays on K-quant grids."""
    from lowbit.api import quantize as api_quantize
    from lowbit.exporters.gguf_mixes import ModelShape, mix_types

    out = tmp_path / "q"
    api_quantize(tiny320, out, scheme="gguf_q3_k_m", algo="gptq", progress=False, quiet=True, num_calib_data=4,
                 seq_len=64)
    folder = LowbitFolder(out)
    plan = plan_gguf(folder, "q3_k_m")
    assert all(lin.exact for lin in plan.linears) and not plan.warnings
    types = {lin.gguf_name: lin.qtype for lin in plan.linears}
    widths = {lin.gguf_name: lin.shape[1] for lin in plan.linears}
    wanted = mix_types("q3_k_m", widths, ModelShape(2, 5, tied_output=False))
    assert types == {n: T.Q4_0 if t == T.IQ4_NL else t for n, t in wanted.items()}
    assert types["blk.1.ffn_down.weight"] in (T.Q4_K, T.Q5_K) and types["blk.1.attn_q.weight"] == T.Q4_0
    assert folder.modules["model.layers.1.self_attn.q_proj"][0].gguf_grid == "q4_0"


def test_a_grid_on_a_width_not_a_multiple_of_32_is_refused(tiny_models, tmp_path):
    from lowbit.api import quantize as api_quantize

    with pytest.raises(LowbitError, match="cannot hold llama.cpp's q4_k blocks nor its q5_0 fallback"):
        api_quantize(tiny_models["llama"], tmp_path / "q", scheme="w_q4_k", progress=False, quiet=True)
    assert not (tmp_path / "q").exists()

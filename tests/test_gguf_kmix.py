"""llama.cpp's K-quant mixes (--gguf-type q4_k_m, ...): each tensor's type chosen as llama-quantize chooses it,
the fallbacks for rows that are not whole 256-wide super-blocks, IQ4_NL, and whole files that llama.cpp runs and
that compute what lowbit computes from the same file."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from lowbit.exporters.gguf import check_gguf, export_gguf
from lowbit.exporters.gguf_iq4nl import quantize_iq4_nl, quantize_iq4_xs
from lowbit.exporters.gguf_mixes import ModelShape, fallback, mix_types, use_more_bits
from lowbit.exporters.source import LowbitFolder

from .test_gguf_export import _llama_logits, _lowbit_logits

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _names(layers: int, cols: int = 4096, down: int = 14336) -> dict[str, int]:
    names = {f"blk.{i}.{r}.weight": down if r == "ffn_down" else cols for i in range(layers) for r in ROLES}
    return {**names, "token_embd.weight": cols, "output.weight": cols}


def test_use_more_bits_layers():
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30,
                                                              31]


def test_q4_k_m_on_a_llama_shape():
    """Llama-3-8B's shapes (32 layers, 8 KV heads of 32): what llama-quantize writes for Q4_K_M."""
    types = mix_types("q4_k_m", _names(32), ModelShape(32, 4, tied_output=False))
    more = {i for i in range(32) if use_more_bits(i, 32)}
    for i in range(32):
        assert types[f"blk.{i}.attn_v.weight"] == (T.Q6_K if i in more else T.Q4_K)
        assert types[f"blk.{i}.ffn_down.weight"] == (T.Q6_K if i in more else T.Q4_K)
        assert {types[f"blk.{i}.{r}.weight"] for r in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up")} \
            == {T.Q4_K}
    assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == T.Q4_K


@pytest.mark.parametrize("mix,v,down,out", [
    ("q2_k", T.Q4_K, T.Q3_K, T.Q3_K), ("q3_k_s", T.Q3_K, T.Q3_K, T.Q3_K), ("q3_k_l", T.Q5_K, T.Q5_K, T.Q5_K),
    ("q5_k_s", T.Q5_K, T.Q5_K, T.Q5_K), ("q6_k", T.Q6_K, T.Q6_K, T.Q6_K)])
def test_other_mixes(mix, v, down, out):
    types = mix_types(mix, _names(32), ModelShape(32, 4, tied_output=False))
    assert (types["blk.10.attn_v.weight"], types["blk.10.ffn_down.weight"], types["blk.10.attn_output.weight"]) \
        == (v, down, out)
    q3m = mix_types("q3_k_m", _names(32), ModelShape(32, 4, tied_output=False))
    assert [q3m[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [q3m[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2)] == [T.Q5_K, T.Q5_K, T.Q4_K]


def test_fallbacks_for_rows_that_are_not_super_blocks():
    """SmolLM2's 576 columns: what llama-quantize falls back to; a tied embedding takes the output's type."""
    assert [fallback(t, 576) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)] == \
        [T.IQ4_NL, T.IQ4_NL, T.Q5_0, T.Q5_1, T.Q8_0]
    assert fallback(T.Q4_K, 1536) == T.Q4_K and fallback(T.Q4_K, 48) == T.F16
    types = mix_types("q4_k_m", _names(30, cols=576, down=1536), ModelShape(30, 3, tied_output=True))
    assert types["token_embd.weight"] == T.Q8_0 and types["blk.5.attn_q.weight"] == T.Q5_0
    assert types["blk.0.ffn_down.weight"] == T.Q6_K and types["blk.4.ffn_down.weight"] == T.Q4_K
    assert types["blk.0.attn_v.weight"] == T.Q8_0


def test_iq4_xs_mix_rules():
    """llama.cpp's IQ4_XS file: attn_v Q5_K with 4+ heads per KV head, the first eighth of ffn_down Q5_K unless an
    importance matrix is used, output Q6_K, IQ4_NL for rows that are not whole super-blocks."""
    plain = mix_types("iq4_xs", _names(32), ModelShape(32, 4, tied_output=False))
    weighted = mix_types("iq4_xs", _names(32), ModelShape(32, 4, tied_output=False), imatrix=True)
    assert plain["blk.5.attn_v.weight"] == T.Q5_K and plain["blk.5.attn_q.weight"] == T.IQ4_XS
    assert [plain[f"blk.{i}.ffn_down.weight"] for i in (0, 3, 4)] == [T.Q5_K, T.Q5_K, T.IQ4_XS]
    assert weighted["blk.0.ffn_down.weight"] == T.IQ4_XS and plain["output.weight"] == T.Q6_K
    assert mix_types("iq4_xs", _names(32), ModelShape(32, 1, tied_output=False))["blk.5.attn_v.weight"] == T.IQ4_XS
    assert fallback(T.IQ4_XS, 576) == T.IQ4_NL


def test_iq4_xs_decodes_and_matches_llama_cpp():
    """IQ4_XS blocks gguf-py decodes, whose error is llama.cpp's own (ggml_quantize_chunk), with and without an
    importance vector (measured error ratios 0.9996 and 0.978)."""
    from .test_gguf_kquants import _ggml_quantize

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 1024, generator=g)
    w[:, 5] *= 6
    for imp in (None, torch.rand(1024, generator=g) + 0.1):
        weight = torch.ones(1024) if imp is None else imp
        ours = torch.from_numpy(dequantize(quantize_iq4_xs(w, imp), T.IQ4_XS)).reshape(w.shape)
        theirs = torch.from_numpy(dequantize(_ggml_quantize(w.numpy(), T.IQ4_XS, None if imp is None else
                                                            imp.numpy()), T.IQ4_XS)).reshape(w.shape)
        err = [float(((v - w) ** 2 * weight).sum()) for v in (ours, theirs)]
        assert err[0] < 1.01 * err[1]
    with pytest.raises(ValueError, match="whole super-blocks"):
        quantize_iq4_xs(torch.randn(4, 576))


def test_iq4_nl_decodes_and_beats_q4_0():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    w[:, 3] *= 10
    got = torch.from_numpy(dequantize(quantize_iq4_nl(w), T.IQ4_NL)).reshape(w.shape)
    legacy = torch.from_numpy(dequantize(quantize(w.numpy(), T.Q4_0), T.Q4_0)).reshape(w.shape)
    assert (got - w).norm() < 0.9 * (legacy - w).norm()  # same 4.5 bits per weight
    exact = got.clone()  # values already on the grid come back unchanged (up to the float16 scale)
    again = torch.from_numpy(dequantize(quantize_iq4_nl(exact), T.IQ4_NL)).reshape(w.shape)
    assert torch.allclose(again, exact, rtol=2e-3, atol=1e-6)
    importance = torch.ones(256)
    importance[:8] = 1000.0
    weighted = torch.from_numpy(dequantize(quantize_iq4_nl(w, importance), T.IQ4_NL)).reshape(w.shape)
    assert ((weighted - w)[:, :8] ** 2).sum() < ((got - w)[:, :8] ** 2).sum()


@pytest.mark.parametrize("mix", ["q4_k_m", "q2_k", "q6_k", "q3_k_m", "q5_k_m", "iq4_xs"])
def test_mix_file_runs_in_llama_cpp(mix, tiny256, lowbit_out, tmp_path):
    src = lowbit_out(tiny256, "w_int8_per_group_sym", group_size=32)
    warnings = check_gguf(LowbitFolder(src), mix)
    assert warnings and all("re-quantized" in w for w in warnings)
    path = export_gguf(src, tmp_path / "m.gguf", quant_type=mix)
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    names = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    assert {n: types[n] for n in names} == mix_types(mix, names, ModelShape(4, 4, tied_output=False))
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType[f"MOSTLY_{mix.upper()}"])
    ids = torch.randint(3, 300, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    # theirs: lowbit reads the same file back (gguf-py's dequantization) and runs it
    ours, theirs = _llama_logits(path, ids), _lowbit_logits(str(path), ids)
    # llama.cpp rounds the activations to 8-bit blocks (Q8_K for the K-types) and keeps the KV cache in float16:
    # measured max differences 0.17 (the exact Q8_0 file of this model) to 0.31 (Q4_K), logits up to 5.8; a
    # wrong layout or scale would move them by whole units
    assert np.abs(ours - theirs).max() < 0.08 * np.abs(theirs).max()


def test_imatrix_written_read_and_used(tiny256, tiny_models, lowbit_out, tmp_path, capsys):
    """lowbit imatrix writes llama.cpp's imatrix layout; its entries are each column's mean squared input; the
    export weights its K-quant searches with it, and refuses an imatrix of another model in one line."""
    from lowbit.cli import main
    from lowbit.errors import LowbitError
    from lowbit.exporters.gguf_imatrix import read_imatrix

    path = tmp_path / "imatrix.gguf"
    assert main(["imatrix", str(tiny256), "-o", str(path), "--num-calib-data", "4", "--seq-len", "32",
                 "--no-progress"]) == 0
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_count"].contents() == 4 and reader.fields["imatrix.chunk_size"].contents() == 32
    sums = {t.name: t for t in reader.tensors}
    assert list(sums["blk.0.ffn_down.weight.in_sum2"].shape) == [512, 1]  # ggml order: (in_features, matrices)
    assert float(sums["blk.0.ffn_down.weight.counts"].data.reshape(-1)[0]) == 4 * 32
    table = read_imatrix(path)
    assert len(table) == 4 * 7 and all((v > 0).all() for v in table.values())
    src = lowbit_out(tiny256, "w_int8_per_group_sym", group_size=32)
    plain = export_gguf(src, tmp_path / "plain.gguf", quant_type="q4_k_m")
    weighted = export_gguf(src, tmp_path / "weighted.gguf", quant_type="q4_k_m", imatrix=path)
    a, b = ({t.name: t for t in gguf.GGUFReader(p).tensors} for p in (plain, weighted))
    name = "blk.1.attn_q.weight"
    assert a[name].tensor_type == b[name].tensor_type == T.Q4_K and not np.array_equal(a[name].data, b[name].data)
    down = "blk.2.ffn_down.weight"  # Q6_K or Q4_K; not row-permuted, so comparable with lowbit's weight as is
    wd = LowbitFolder(src).weight("model.layers.2.mlp.down_proj").double()
    err = [float(((torch.from_numpy(dequantize(t[down].data, t[down].tensor_type)).double().reshape(wd.shape) - wd)
                  ** 2 * table[down].double()).sum()) for t in (a, b)]
    assert err[1] < err[0]  # the importance-weighted error falls when the importance is used
    with pytest.raises(LowbitError, match="not a GGUF imatrix file"):
        export_gguf(src, tmp_path / "x.gguf", quant_type="q4_k_m", imatrix=tmp_path / "missing.gguf")
    other = tmp_path / "other.gguf"
    main(["imatrix", str(tiny_models["llama"]), "-o", str(other), "--num-calib-data", "2", "--seq-len", "16",
          "--no-progress"])
    with pytest.raises(LowbitError, match="computed for another model"):
        export_gguf(src, tmp_path / "y.gguf", quant_type="q4_k_m", imatrix=other)
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()

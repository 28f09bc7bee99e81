"""AWQ and SmoothQuant: the tensor maths (scale and clip searches, smoothing scales, Gram-form error), the
folds found on each architecture (the float model's function is unchanged by folding), activation
fake-quantization, and the chains end to end."""

import pytest
import torch

from lowbit.algorithms import InputStats, parse_chain
from lowbit.algorithms.awq import scaled_error, search_clip, search_scales
from lowbit.algorithms.smoothquant import smooth_scales
from lowbit.algorithms.stats import output_error
from lowbit.arch import linear_modules
from lowbit.data import calib_windows, load_text, tokenize
from lowbit.engine import Engine
from lowbit.engine.block import BlockRun
from lowbit.errors import LowbitError
from lowbit.formats import activation_qparams, fake_quant, fake_quant_activation
from lowbit.hf.model import open_model
from lowbit.recipe import Recipe, resolve_plan
from lowbit.spec import QuantSpec, parse_scheme

G64 = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=32)


def outlier_problem(n=64, k=96, tokens=2000, seed=0):
    """Activations with a few channels 20x larger than the rest, as in real LLMs."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) * 0.05
    X = torch.randn(tokens, k, generator=g)
    X[:, :4] *= 20
    stats = InputStats(k)
    for chunk in X.split(300):
        stats.add(chunk)
    return W, X, stats


def test_stats_are_exact_running_values():
    W, X, stats = outlier_problem()
    assert torch.allclose(stats.gram, X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.abs_mean, X.abs().mean(0), rtol=1e-5)
    assert torch.equal(stats.abs_max, X.abs().amax(0))
    s = torch.rand(X.shape[1]) + 0.5
    stats.divide_channels(s)
    Xs = X / s
    assert torch.allclose(stats.gram, Xs.T @ Xs / X.shape[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats.abs_max, Xs.abs().amax(0), rtol=1e-6)


def test_gram_error_equals_the_output_error_over_tokens():
    W, X, stats = outlier_problem()
    delta = fake_quant(W, G64) - W
    direct = ((X @ delta.T) ** 2).mean(0)
    assert torch.allclose(output_error(delta, stats.gram), direct, rtol=1e-3)


def test_awq_scales_reduce_output_error_on_outlier_channels():
    W, X, stats = outlier_problem()
    s, err, base = search_scales([W[:40], W[40:]], [G64, G64], stats)
    assert base == pytest.approx(scaled_error([W], [G64], stats.gram, torch.ones(W.shape[1])), rel=1e-4)
    assert err < 0.8 * base
    assert s[:4].mean() > s[4:].mean()  # the large channels are protected (scaled up)
    w_hat = fake_quant(W * s, G64) / s  # what the folded model computes
    assert ((X @ (w_hat - W).T) ** 2).mean() < 0.8 * ((X @ (fake_quant(W, G64) - W).T) ** 2).mean()


def test_awq_never_worse_than_no_scaling():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 64, generator=g)
    stats = InputStats(64)
    stats.add(torch.randn(500, 64, generator=g))  # no outliers: scaling may not help
    s, err, base = search_scales([W], [G64], stats, duo_scaling=False)
    assert err <= base


@pytest.mark.parametrize("spec", [G64, QuantSpec(bits=3, granularity="channel", group_size=None),
                                  QuantSpec(bits=4, signed=True, symmetric=True, granularity="group", group_size=16)])
def test_clip_search_lowers_each_blocks_error(spec):
    W, X, stats = outlier_problem()
    W = W.clone()
    W[:, 10] *= 8  # a few large weights: clipping them pays
    clip = search_clip(W, spec, stats.gram)
    br, bc = spec.block_shape(*W.shape)
    assert clip.shape == (-(-W.shape[0] // br), -(-W.shape[1] // bc))
    assert ((clip > 0.45) & (clip <= 1)).all() and (clip < 1).any()
    err_clip = output_error(fake_quant(W, spec, clip) - W, stats.gram).sum()
    err_none = output_error(fake_quant(W, spec) - W, stats.gram).sum()
    assert err_clip < err_none


def test_smoothquant_scales_follow_the_formula():
    W, X, stats = outlier_problem()
    s = smooth_scales([W[:10], W[10:]], stats, alpha=0.5)
    expect = (X.abs().amax(0) ** 0.5) / (W.abs().amax(0) ** 0.5)
    assert torch.allclose(s, expect, rtol=1e-5)
    # smoothing flattens the activation channels' ranges
    assert (X / s).abs().amax(0).std() < X.abs().amax(0).std()


def test_activation_fake_quant():
    spec = QuantSpec(bits=8, signed=True, symmetric=True, granularity="tensor", group_size=None)
    x = torch.tensor([[0.5, -1.0, 2.0], [0.01, 0.0, -3.0]])
    scale = activation_qparams(float(x.min()), float(x.max()), spec)
    assert scale.item() == pytest.approx(3.0 / 127)
    y = fake_quant_activation(x, spec, scale)
    assert torch.allclose(y, torch.round(x / scale) * scale) and (y - x).abs().max() <= scale / 2 + 1e-7
    assert fake_quant_activation(x * 10, spec, scale)[1, 2].item() == pytest.approx(-128 * scale.item())  # clamped
    dyn = spec.with_changes(granularity="token", dynamic=True)
    yd = fake_quant_activation(x, dyn)
    assert yd[0, 2] == pytest.approx(2.0) and yd[1, 2] == pytest.approx(-3.0)  # each token's own range
    asym = QuantSpec(bits=8, signed=False, symmetric=False, granularity="tensor", group_size=None)
    params = activation_qparams(float(x.min()), float(x.max()), asym)
    ya = fake_quant_activation(x, asym, params)
    assert (ya - x).abs().max() <= params[0] / 2 + 1e-6


# -- on models ------------------------------------------------------------------------------------------------

def no_quantization(monkeypatch):
    """Skip the engine's quantization steps: only the transforms change the model."""
    monkeypatch.setattr(Engine, "_quantize_modules", lambda self, root, prefix: None)
    monkeypatch.setattr(BlockRun, "calibrate_and_quantize", lambda self, *a: None)


def calib_for(loaded, n=4, seq=32):
    return calib_windows(tokenize(loaded.tokenizer(), load_text("pydoc", "calib")), n, seq, seed=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma", "gemma3", "opt"])
@pytest.mark.parametrize("algo", ["awq", "smoothquant"])
def test_folding_keeps_the_float_function(arch, algo, tiny_models, monkeypatch):
    """Run the transform on every block but skip quantization: the model must compute what it did."""
    ref_model, _ = __import__("lowbit").load(tiny_models[arch])
    loaded = open_model(tiny_models[arch])
    plan = resolve_plan(Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16)), linear_modules(loaded.model))
    calib = calib_for(loaded)
    no_quantization(monkeypatch)
    engine = Engine(loaded, plan, parse_chain(algo), calib, keep_in_memory=True, batch_size=2, progress=False)
    engine.run()
    model = loaded.model.eval()
    ids = calib[:2]
    with torch.no_grad():
        want = ref_model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    folds = next(iter(engine._folds.values()))
    first = next(iter(folds.values()))
    assert first is not None  # the normalised block input: always folded into its norm
    assert first.rule == ("one_plus" if arch.startswith("gemma") else "scale")
    changed = [n for n, p in model.named_parameters() if ".layers.0." in n and
               not torch.equal(p, ref_model.get_parameter(n))]
    assert changed, "the transform changed no weight"
    rules = {f.rule for f in folds.values() if f is not None}
    if arch in ("llama", "qwen2", "mistral", "gemma", "gemma3", "opt"):
        assert "linear" in rules  # up_proj -> down_proj (fc1 -> fc2 through ReLU for OPT)


def test_unmappable_block_is_refused_before_quantizing(tmp_path, tokenizer_dir, monkeypatch):
    """A post-norm OPT block reads the raw residual stream: no op to fold AWQ scales into."""
    import transformers as tf

    from tests.conftest import make_tiny

    folder = make_tiny("opt", tmp_path / "postnorm", tokenizer_dir)
    config = tf.AutoConfig.from_pretrained(folder)
    config.do_layer_norm_before = False
    config.save_pretrained(folder)
    loaded = open_model(folder)
    plan = resolve_plan(Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16)), linear_modules(loaded.model))
    quantized = []
    monkeypatch.setattr(Engine, "_record", lambda self, *a: quantized.append(a[0]))
    with pytest.raises(LowbitError, match="cannot scale model.decoder.layers.0.self_attn"):
        Engine(loaded, plan, parse_chain("awq"), calib_for(loaded), progress=False).run()
    assert quantized == []


def test_excluded_first_stage_is_not_taken_for_an_unmappable_block(tiny_models):
    """With q/k/v excluded by the user, a block's first planned stage is o_proj, whose input no norm makes:
    that is no reason to refuse the model (the post-norm check above is about the block's entry)."""
    import lowbit

    res = lowbit.quantize(str(tiny_models["llama"]), None, scheme="w_int8_a_int8_per_tensor_sym",
                          algo="smoothquant", exclude_layers=["lm_head", "*q_proj", "*k_proj", "*v_proj"],
                          keep_in_memory=True, num_calib_data=4, seq_len=32, progress=False, quiet=True)
    assert "model.layers.0.mlp.gate_proj" in res.summary["layer_errors"]
    assert "model.layers.0.self_attn.q_proj" not in res.summary["layer_errors"]


def model_error(tiny, scheme, group, algo, monkeypatch=None, **kw):
    import lowbit

    res = lowbit.quantize(str(tiny), None, scheme=scheme, group_size=group, algo=algo, keep_in_memory=True,
                          num_calib_data=8, seq_len=64, progress=False, quiet=True, **kw)
    ref, _ = lowbit.load(str(tiny))
    ids = calib_windows(tokenize(open_model(tiny).tokenizer(), load_text("pydoc", "eval")), 4, 64, seed=1)
    with torch.no_grad():
        a = torch.log_softmax(ref(input_ids=ids).logits, -1)
        b = torch.log_softmax(res.model(input_ids=ids).logits, -1)
    return (a.exp() * (a - b)).sum(-1).mean().item(), res  # KL(float || quantized)


def test_awq_chain_end_to_end(tiny_models):
    kl_rtn, _ = model_error(tiny_models["llama"], "w_uint3_per_group_asym", 16, "rtn")
    kl_awq, res = model_error(tiny_models["llama"], "w_uint3_per_group_asym", 16, "awq")
    assert kl_awq < kl_rtn
    notes = res.summary["layer_notes"]
    assert any("awq output error" in v for v in notes.values())
    assert res.summary["algorithms"] == ["awq", "rtn"]
    kl_gptq, _ = model_error(tiny_models["llama"], "w_uint3_per_group_asym", 16, "awq,gptq")
    assert kl_gptq < kl_rtn


def test_w8a8_static_with_smoothquant_round_trip(tiny_models, tmp_path):
    import lowbit

    out = tmp_path / "w8a8"
    res = lowbit.quantize(str(tiny_models["llama"]), out, scheme="w_int8_a_int8_per_tensor_sym",
                          algo="smoothquant", keep_in_memory=True, num_calib_data=8, seq_len=64, progress=False,
                          quiet=True)
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert set(qc["inputs"]) == {n for n in qc["modules"]}
    assert all(not d["dynamic"] and d["bits"] == 8 for d in qc["inputs"].values())
    reloaded, _ = lowbit.load(out)
    ids = calib_windows(tokenize(open_model(tiny_models["llama"]).tokenizer(), load_text("pydoc", "eval")), 2, 64, 1)
    with torch.no_grad():
        mem = res.model(input_ids=ids).logits
        disk = reloaded(input_ids=ids).logits
    assert torch.allclose(mem, disk, atol=1e-5)
    # the activations really are quantized: removing the hooks changes the result
    from lowbit.hf.actquant import detach_input_quant

    for m in reloaded.modules():
        detach_input_quant(m)
    with torch.no_grad():
        assert not torch.allclose(reloaded(input_ids=ids).logits, disk, atol=1e-5)


def test_dynamic_per_token_needs_no_calibration(tiny_models, tmp_path, monkeypatch):
    import lowbit

    monkeypatch.setattr(Engine, "_capture_block0_inputs", lambda self: (_ for _ in ()).throw(AssertionError))
    out = tmp_path / "dyn"
    lowbit.quantize(str(tiny_models["qwen2"]), out, scheme="w_int8_a_int8_per_token_dynamic", progress=False,
                    quiet=True)
    import json

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert all(d["dynamic"] and d["granularity"] == "token" for d in qc["inputs"].values())
    model, _ = lowbit.load(out)
    assert any(hasattr(m, "_lowbit_input_quant") for m in model.modules())


@pytest.mark.parametrize("columns", [7, 64])
def test_input_stats_gram_is_the_mean_outer_product_across_adds(columns):
    """The Gram matrix is accumulated on and above the diagonal only; what callers read is the full mean."""
    g = torch.Generator().manual_seed(3)
    chunks = [torch.randn(n, columns, generator=g) for n in (5, 11, 3)]
    stats = InputStats(columns)
    stats.add(chunks[0])
    torch.testing.assert_close(stats.gram, chunks[0].T @ chunks[0] / 5)  # read between adds
    stats.add(chunks[1])
    s = torch.rand(columns, generator=g) + 0.5
    stats.divide_channels(s)  # with blocks still to be mirrored
    stats.add(chunks[2] / s)
    X = torch.cat([chunks[0] / s, chunks[1] / s, chunks[2] / s])
    torch.testing.assert_close(stats.gram, X.T @ X / X.shape[0])
    torch.testing.assert_close(stats.H, stats.H.T)

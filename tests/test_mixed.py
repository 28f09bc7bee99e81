"""Mixed precision by measured sensitivity (--target-bits): the stored-bits accounting, the allocation (meets its
budget, beats the uniform choices it can afford, optimal on small problems up to one upgrade), the measures, and
the whole path on a tiny model: the plan printed, recorded and reproduced from recipe.yaml, exports that hold it,
and the refusals."""

import itertools
import json
import random

import pytest
import torch

from lowbit.algorithms.sensitivity import error
from lowbit.api import quantize
from lowbit.errors import LowbitError
from lowbit.exporters.source import LowbitFolder
from lowbit.mixed import allocate, candidate_specs, stored_bits
from lowbit.recipe import Recipe
from lowbit.spec import QuantSpec, parse_scheme

BASE = QuantSpec(bits=4, signed=False, symmetric=False, granularity="group", group_size=128)


def test_stored_bits_count_scales_and_zero_points():
    assert stored_bits(BASE, 576) == 4 + (16 + 4) / 128
    assert stored_bits(BASE.with_changes(bits=2, group_size=64), 576) == 2 + 18 / 64
    sym = BASE.with_changes(symmetric=True, signed=True)  # no zero point
    assert stored_bits(sym, 576) == 4 + 16 / 128
    assert [(s.bits, s.group_size) for s in candidate_specs(BASE)] == \
        [(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)]


def random_table(layers=4, seed=0):
    rng = random.Random(seed)
    specs = [s for s in candidate_specs(BASE) if s.group_size != 32]  # 8 options: 4096 plans to search exhaustively
    table, sizes = {}, {}
    for i in range(layers):
        k = rng.choice([64, 128, 256])
        scale = rng.uniform(0.1, 10)
        table[f"l{i}"] = [(s, stored_bits(s, k), scale * 4.0 ** -s.bits * (1 + s.group_size / 256)) for s in specs]
        sizes[f"l{i}"] = rng.choice([1, 2, 4]) * k * 64
    return table, sizes


def cost(table, sizes, chosen):
    bits = sum(next(b for s, b, _ in table[n] if s == chosen[n]) * sizes[n] for n in chosen) / sum(sizes.values())
    err = sum(next(e for s, _, e in table[n] if s == chosen[n]) for n in chosen)
    return bits, err


@pytest.mark.parametrize("target", [2.3, 2.8, 3.5, 4.2, 6.0])
def test_the_plan_meets_its_budget_and_is_near_optimal(target):
    for seed in range(3):
        table, sizes = random_table(seed=seed)
        bits, err = cost(table, sizes, allocate(table, sizes, target))
        assert bits <= target + 1e-9
        best = min(e for b, e in (cost(table, sizes, dict(zip(table, combo)))
                                  for combo in itertools.product(*[[s for s, _, _ in table[n]] for n in table]))
                   if b <= target)
        assert err <= best * 1.05  # the dynamic programme: optimal but for costs rounded up to 1/20000 of the budget
        for spec in table["l0"]:  # every uniform choice it could afford is no better
            ubits, uerr = cost(table, sizes, {n: spec[0] for n in table})
            if ubits <= target:
                assert err <= uerr


def test_the_extremes():
    table, sizes = random_table()
    cheapest = allocate(table, sizes, 0.0)
    assert all(s.bits == 2 and s.group_size == 128 for s in cheapest.values())
    richest = allocate(table, sizes, 100.0)
    assert all(s.bits == 8 for s in richest.values())


def test_measures():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(500, 64, generator=g) * torch.linspace(0.1, 3, 64)
    gram = x.T @ x / len(x)
    spec = BASE.with_changes(bits=3, group_size=32)
    dq = w - torch.tensor(0.0)
    from lowbit.formats import fake_quant

    dq = fake_quant(w, spec) - w
    assert error(w, spec, gram) == pytest.approx(float(((x @ dq.T) ** 2).sum() / len(x)), rel=1e-4)
    assert error(w, spec, None) == pytest.approx(float((dq ** 2).sum()), rel=1e-5)
    assert error(w, spec.with_changes(bits=8), gram) < error(w, spec, gram)
    from lowbit.algorithms.sensitivity import SensitivityProbe
    from lowbit.algorithms.stats import InputStats

    stats = InputStats(64)
    stats.add(x)
    rel = SensitivityProbe(lambda n, w: [spec], "relative")
    rel.clip_ratios(("l",), [w], [spec], stats)
    signal = float(((x @ w.T) ** 2).sum() / len(x))
    assert rel.table["l"][0][1] == pytest.approx(error(w, spec, gram) / signal, rel=1e-3)


def test_fisher_is_the_loss_gradient_squared(tiny_models):
    """output_fisher's F of a linear equals the squared gradient of each window's mean next-token loss with respect
    to the linear's output, summed over tokens and averaged over windows, computed here directly by autograd."""
    from transformers import AutoModelForCausalLM

    from lowbit.algorithms.sensitivity import output_fisher

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    windows = torch.randint(0, model.config.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    name = "model.layers.1.mlp.down_proj"
    fisher = output_fisher(model, [name, "model.layers.0.self_attn.q_proj"], windows, "cpu")
    assert set(fisher) == {name, "model.layers.0.self_attn.q_proj"}
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # the weights were left alone
    outputs = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, out: outputs.append(out) or out.retain_grad())
    expected = 0
    for w in windows:
        outputs.clear()
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, w[1:]).backward()
        expected = expected + outputs[0].grad[0].double().pow(2).sum(0)
    handle.remove()
    model.zero_grad()
    assert torch.allclose(fisher[name], expected / len(windows), rtol=1e-5, atol=1e-12)
    assert (fisher[name] > 0).all()


def test_fisher_measure_weights_output_channels():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(8, 32, generator=g), torch.randn(200, 32, generator=g)
    gram = x.T @ x / len(x)
    spec = BASE.with_changes(bits=3, group_size=32)
    assert error(w, spec, gram, torch.ones(8)) == pytest.approx(error(w, spec, gram), rel=1e-6)
    only_first = torch.zeros(8)
    only_first[0] = 2.0
    from lowbit.formats import fake_quant

    dq = fake_quant(w, spec) - w
    assert error(w, spec, gram, only_first) == pytest.approx(2 * float(((x @ dq[0]) ** 2).mean()), rel=1e-4)


def test_fisher_needs_the_model_in_memory(tiny_models, tmp_path, monkeypatch):
    import lowbit.mixed

    monkeypatch.setattr(lowbit.mixed, "fits_in_memory", lambda *a, **k: False)
    with pytest.raises(LowbitError, match="--sensitivity fisher runs the whole model at once.*--sensitivity relative"):
        quantize(tiny_models["llama"], tmp_path / "out", target_bits=3.5, quiet=True, **CAL)
    assert not (tmp_path / "out").exists()
    out = quantize(tiny_models["llama"], tmp_path / "rel", target_bits=3.5, sensitivity="relative", quiet=True, **CAL)
    assert out.summary["mixed_precision"]["measure"] == "relative"


def test_fisher_on_a_mixture_of_experts(tiny_moe, tmp_path):
    out = quantize(tiny_moe["mixtral"], tmp_path / "out", target_bits=3.5, quiet=True, **CAL)
    assert out.summary["mixed_precision"]["measure"] == "fisher"
    assert folder_bits(out.output) == pytest.approx(out.summary["mixed_precision"]["achieved_bits"], abs=1e-3)


CAL = dict(scheme="w_uint4_per_group_asym", group_size=16, num_calib_data=6, seq_len=48, batch_size=2,
           progress=False)


def folder_bits(folder) -> float:
    specs = LowbitFolder(folder).modules
    size = sum(n * k for _, (n, k) in specs.values())
    return sum(stored_bits(s, k) * n * k for s, (n, k) in specs.values()) / size


def test_target_bits_end_to_end(tiny_models, tmp_path, capsys):
    out = quantize(tiny_models["llama"], tmp_path / "out", target_bits=3.5, **CAL)
    printed = capsys.readouterr().err
    assert "mixed precision: " in printed and "target 3.5" in printed and "measuring the sensitivity" in printed
    record = out.summary["mixed_precision"]
    assert record["target_bits"] == 3.5 and record["measure"] == "fisher"
    assert 3.0 < record["achieved_bits"] <= 3.5
    assert folder_bits(out.output) == pytest.approx(record["achieved_bits"], abs=1e-3)
    specs = {s.bits for s, _ in LowbitFolder(out.output).modules.values()}
    assert len(specs) > 1  # mixed indeed
    recipe = Recipe.load(out.output / "recipe.yaml")
    assert recipe.mixed["achieved_bits"] == record["achieved_bits"] and len(recipe.overrides) == 14
    again = quantize(tiny_models["llama"], tmp_path / "again", recipe=recipe, progress=False)  # not measured again
    assert "measuring" not in capsys.readouterr().err
    assert LowbitFolder(again.output).modules == LowbitFolder(out.output).modules


def test_weight_measure_and_exports(tiny_models, tmp_path):
    out = quantize(tiny_models["llama"], tmp_path / "out", target_bits=4.0, sensitivity="weight",
                   export="gptq,compressed-tensors", quiet=True,
                   **{**CAL, "scheme": "w_int4_per_group_sym"})  # transformers loads symmetric compressed-tensors
    assert out.summary["mixed_precision"]["measure"] == "weight"
    assert "int3" not in " ".join(out.summary["mixed_precision"]["candidates"])  # GPTQ's format holds 2, 4, 8 bits
    config = json.loads((tmp_path / "out-gptq" / "config.json").read_text())["quantization_config"]
    assert config["dynamic"]  # the layers whose bits or group differ from the most common ones
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out-compressed-tensors")  # the export loads in its client
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_refusals(tiny_models, onnx_tiny, tmp_path):
    with pytest.raises(LowbitError, match="outside what the candidate formats"):
        quantize(tiny_models["llama"], tmp_path / "a", target_bits=1.5, quiet=True, **CAL)
    with pytest.raises(LowbitError, match="integer weight-only"):
        quantize(tiny_models["llama"], tmp_path / "b", target_bits=4, quiet=True, **{**CAL, "scheme": "w_mxfp4",
                                                                                        "group_size": None})
    with pytest.raises(LowbitError, match="integer weight-only"):
        quantize(tiny_models["llama"], tmp_path / "c", target_bits=4, quiet=True,
                 **{**CAL, "scheme": "w_int8_a_int8_per_tensor_sym", "group_size": None})
    with pytest.raises(LowbitError, match="sensitivity measure"):
        quantize(tiny_models["llama"], tmp_path / "d", target_bits=4, sensitivity="hessian", quiet=True, **CAL)
    from lowbit.onnx.options import OnnxOptions

    with pytest.raises(LowbitError, match="target-bits"):
        quantize(onnx_tiny["gqa"][1], tmp_path / "o", target_bits=4, onnx_options=OnnxOptions(), quiet=True, **CAL)
    assert not any(tmp_path.iterdir())
    assert parse_scheme("w_uint4_per_group_asym").weight.plain_int

"""Mixture-of-experts models (tiny Mixtral and Qwen2-MoE): experts become one nn.Linear per projection and
compute what transformers' fused experts compute; a second-step scheme for the experts; routers stay float;
experts with too few calibration tokens fall back to RTN with a note."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.api import load, quantize
from lowbit.arch.moe import UnfusedExperts
from lowbit.hf.model import open_model

MOE = ["mixtral", "qwen2_moe"]


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", MOE)
def test_unfused_experts_compute_what_transformers_computes(arch, tiny_moe, ids):
    ours, _ = load(tiny_moe[arch])
    assert any(isinstance(m, UnfusedExperts) for m in ours.modules())
    ref = AutoModelForCausalLM.from_pretrained(tiny_moe[arch]).eval()
    a, b = logits(ours, ids), logits(ref, ids)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (a - b).abs().max()


@pytest.mark.parametrize("arch", MOE)
def test_second_step_scheme_for_experts(arch, tiny_moe, ids, tmp_path):
    out = tmp_path / "q"
    result = quantize(tiny_moe[arch], out, scheme="w_fp8_a_fp8", moe_experts_scheme="w_int4_per_channel_sym",
                      algo="gptq", num_calib_data=8, seq_len=64, keep_in_memory=True, progress=False, quiet=True)
    plan = result.plan
    experts = [n for n in plan if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # blocks x experts x (gate, up, down)
    assert all(plan[n].spec.kind == "int" and plan[n].spec.bits == 4 and plan[n].spec.granularity == "channel"
               for n in experts)
    assert plan["model.layers.0.self_attn.q_proj"].spec.short_name.startswith("fp8")
    routers = [n for n in plan if n.endswith("gate") and not n.endswith("gate_proj")]
    assert all(plan[n].spec is None and "router" in plan[n].reason for n in routers)
    if arch == "qwen2_moe":
        assert routers == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
        assert plan["model.layers.0.mlp.shared_expert.gate_proj"].spec.short_name.startswith("fp8")
    reloaded, _ = load(out)
    assert torch.equal(logits(result.model, ids), logits(reloaded, ids))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules"][experts[0]]["bits"] == 4
    router_weights = [n for n, _ in open_model(out).model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert router_weights  # the top-k routers are not linears: stored in float as they are


def test_experts_with_few_tokens_fall_back_to_rtn(tiny_moe, tmp_path, monkeypatch):
    import lowbit.algorithms.gptq as gptq
    import lowbit.engine.step as step

    monkeypatch.setattr(gptq, "MIN_CALIBRATION_TOKENS", 10 ** 9)
    monkeypatch.setattr(step, "MIN_CALIBRATION_TOKENS", 10 ** 9)
    out = tmp_path / "q"
    quantize(tiny_moe["mixtral"], out, scheme="w_int4_per_group_sym", group_size=16, algo="awq,gptq",
             num_calib_data=4, seq_len=32, progress=False, quiet=True)
    notes = json.loads((out / "summary.json").read_text())["layer_notes"]
    expert = "model.layers.0.mlp.experts.0.gate_proj"
    assert "calibration tokens: RTN" in notes[expert]
    # the router reads the experts' input too, so AWQ finds no op to fold the experts' scales into
    assert "awq: no op to fold scales into" in notes[expert]
    assert "awq: only" in notes["model.layers.0.self_attn.q_proj"]

"""The block-by-block engine's calibration path: captured and replayed block inputs equal what the final
quantized model computes, so no KV cache or stale activation leaks between samples or blocks."""

import pytest
import torch

from lowbit.algorithms import INPUT_STATS, Quantizer, Transform, parse_algo_args, parse_chain
from lowbit.arch import linear_modules
from lowbit.data import calib_windows, load_text, tokenize
from lowbit.engine import Engine
from lowbit.engine.block import BlockRun
from lowbit.errors import LowbitError
from lowbit.formats import quantize
from lowbit.hf.model import open_model
from lowbit.recipe import Recipe, resolve_plan
from lowbit.spec import parse_scheme


class Recorder(Quantizer):
    """A calibrated quantizer for tests: keeps every input it is shown, then quantizes with RTN; calibrated
    stage by stage, so each stage's inputs come from the block with the earlier stages quantized."""

    name = "test-recorder"
    needs = frozenset({INPUT_STATS})
    calibrates_stage_by_stage = True

    def __init__(self):
        self.seen = {}

    def observe(self, names, inputs):
        for name in names:
            self.seen.setdefault(name, []).append(inputs.clone())

    def quantize(self, name, weight, spec, clip=None):
        return quantize(weight, spec, clip)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "opt", "phi3"])
def test_replayed_inputs_match_the_quantized_model(arch, tiny_models):
    loaded = open_model(tiny_models[arch])
    recipe = Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16))
    plan = resolve_plan(recipe, linear_modules(loaded.model))
    ids = tokenize(loaded.tokenizer(), load_text("pydoc", "calib"))
    calib = calib_windows(ids, 5, 32, seed=0)
    recorder = Recorder()
    Engine(loaded, plan, [recorder], calib, keep_in_memory=True, batch_size=2, progress=False).run()
    model = loaded.model.eval()

    expected = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: expected.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in model.named_modules() if n in plan and plan[n].spec is not None]
    with torch.no_grad():
        for batch in calib.split(2):
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    assert set(recorder.seen) == set(expected)
    # true-sequential: every linear saw inputs computed with the earlier linears already quantized
    for name in expected:
        got, want = torch.cat(recorder.seen[name]), torch.cat(expected[name])
        assert got.shape == want.shape == (5 * 32, want.shape[1])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("arch,stages", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("phi3", [["qkv_proj"], ["o_proj"], ["gate_up_proj"], ["down_proj"]]),
    ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
    ("gemma3", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
])
def test_stages_follow_shared_inputs(arch, stages, tiny_models):
    loaded = open_model(tiny_models[arch])
    plan = resolve_plan(Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16)), linear_modules(loaded.model))
    calib = torch.randint(3, 300, (2, 16))
    engine = Engine(loaded, plan, [Recorder()], calib, keep_in_memory=True, progress=False)
    inputs = engine._capture_block0_inputs()
    prefix = loaded.layout.block_prefix(0)
    loaded.materialize(prefix)
    block = loaded.layout.blocks[0]
    found = BlockRun(engine, block, prefix, engine._planned(block, prefix), inputs).find_stages(True).groups
    assert [[n.rsplit(".", 1)[1] for n in st] for st in found] == stages


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3", "opt"])
def test_stage_replay_skips_attention_and_changes_nothing(arch, tiny_models, monkeypatch):
    """Once o_proj is quantized, later passes over the block replay the attention module as o_proj applied
    to its cached inputs: the attention itself runs only in the probe and in o_proj's own stage pass, and
    GPTQ's result is the same as without the replay."""
    results, entered = [], []
    calib = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    for replay in (False, True):
        loaded = open_model(tiny_models[arch])
        plan = resolve_plan(Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16)), linear_modules(loaded.model))
        attention = type(loaded.layout.blocks[0].get_submodule("self_attn"))
        original = attention.forward
        calls = []
        monkeypatch.setattr(attention, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        engine = Engine(loaded, plan, parse_chain("gptq", parse_algo_args(["gptq:true_sequential=true"])), calib,
                        batch_size=2, keep_in_memory=True, progress=False, replay=replay)
        engine.run()
        monkeypatch.setattr(attention, "forward", original)
        results.append({n: p.detach().clone() for n, p in loaded.model.named_parameters()})
        entered.append(len(calls))
    for name, want in results[0].items():
        assert torch.allclose(results[1][name], want, rtol=0, atol=1e-6), name
    # entered once when block 0 is run to see what a block returns (hf.capture.output_convention); then per
    # block: probe 1, q/k/v's stage 2 chunks (stopping at q_proj, inside the attention), o_proj's stage 2; then,
    # without replay, gate/up's 2, down's 2 and the output pass's 2 (not after the last block)
    assert entered == [1 + 2 * (1 + 2 + 2 + 2 + 2) + 2, 1 + 2 * (1 + 2 + 2)]


def test_rtn_runs_no_forward_pass(tiny_models, monkeypatch):
    loaded = open_model(tiny_models["llama"])
    plan = resolve_plan(Recipe(scheme=parse_scheme("w_uint4_per_group_asym", 16)), linear_modules(loaded.model))

    def boom(*a, **k):
        raise AssertionError("RTN must not run the model")

    monkeypatch.setattr(BlockRun, "run_pass", boom)
    monkeypatch.setattr(BlockRun, "find_stages", boom)
    monkeypatch.setattr(Engine, "_capture_block0_inputs", boom)
    report = Engine(loaded, plan, parse_chain("rtn"), None, progress=False).run()
    assert len(report.layers) == 14 and len(report.block_seconds) == 2
    # nothing of the blocks stays in memory after the run
    assert all(p.device.type == "meta" for n, p in loaded.model.named_parameters() if ".layers." in n)


def test_chain_validation():
    assert [a.name for a in parse_chain("rtn")] == ["rtn"]
    assert [a.name for a in parse_chain("awq")] == ["awq", "rtn"]  # transforms alone end with RTN
    assert [a.name for a in parse_chain("smoothquant,gptq")] == ["smoothquant", "gptq"]
    with pytest.raises(LowbitError, match="unknown algorithm 'awk'"):
        parse_chain("awk,rtn")
    with pytest.raises(LowbitError, match="two per-channel scaling"):
        parse_chain("smoothquant,awq,gptq")
    with pytest.raises(LowbitError, match="empty"):
        parse_chain(" , ")
    with pytest.raises(LowbitError, match="quantizers"):
        parse_chain("rtn,gptq")
    with pytest.raises(LowbitError, match="must come last|quantizers"):
        parse_chain("gptq,rtn")
    assert parse_chain("gptq", parse_algo_args(["gptq:damp=0.05,act_order=false"]))[0].args() == {
        "block_size": 128, "damp": 0.05, "act_order": False, "true_sequential": False, "clip": True}
    with pytest.raises(LowbitError, match="not in the chain"):
        parse_chain("rtn", parse_algo_args(["gptq:damp=0.05"]))
    with pytest.raises(LowbitError, match="has no option"):
        parse_chain("gptq", parse_algo_args(["gptq:colour=red"]))
    with pytest.raises(LowbitError, match="has no option 'x'; its options: none"):
        parse_chain("rtn", parse_algo_args(["rtn:x=1"]))


class StatsRecorder(Transform):
    """A transform that changes nothing and keeps the input statistics it is handed."""

    name = "test-stats"

    def __init__(self):
        self.seen = {}

    def channel_scales(self, names, weights, specs, stats):
        self.seen[names[0]] = stats.abs_max.clone()
        return None


@pytest.mark.parametrize("propagate", ["float", "quantized"])
def test_propagation_modes(propagate, tiny_models, monkeypatch):
    """float: every block's statistics come from the float model's activations, with one forward per block;
    quantized: later blocks see the quantized earlier blocks."""
    loaded = open_model(tiny_models["llama"])
    recipe = Recipe(scheme=parse_scheme("w_uint3_per_group_asym", 16))
    plan = resolve_plan(recipe, linear_modules(loaded.model))
    calib = calib_windows(tokenize(loaded.tokenizer(), load_text("pydoc", "calib")), 4, 32, seed=0)
    ref, _ = __import__("lowbit").load(tiny_models["llama"])
    want = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: want.__setitem__(n, torch.maximum(
        want.get(n, torch.zeros(a[0].shape[-1])), a[0].reshape(-1, a[0].shape[-1]).abs().amax(0))))
             for n, m in ref.named_modules() if n.endswith("q_proj")]
    with torch.no_grad():
        for batch in calib.split(2):
            ref(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    recorder = StatsRecorder()
    runs = []
    original = BlockRun.advance
    monkeypatch.setattr(BlockRun, "advance", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    Engine(loaded, plan, [recorder, parse_chain("rtn")[0]], calib, batch_size=2, progress=False,
           propagate=propagate).run()
    last = "model.layers.1.self_attn.q_proj"
    assert torch.allclose(recorder.seen["model.layers.0.self_attn.q_proj"], want["model.layers.0.self_attn.q_proj"])
    same = torch.allclose(recorder.seen[last], want[last], rtol=1e-5, atol=1e-6)
    assert same == (propagate == "float")
    # output passes: none under float propagation, one per block but the last otherwise
    assert len(runs) == (0 if propagate == "float" else 1)

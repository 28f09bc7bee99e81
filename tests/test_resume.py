"""--resume: an interrupted run continues from its last finished block and writes byte-for-byte the output of
an uninterrupted run; a checkpoint of another run is refused with what differs; a leftover checkpoint is never
deleted by a run without --resume. Also the working precision (--calib-dtype) and --offload-dir."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from lowbit.api import quantize
from lowbit.engine import runner
from lowbit.errors import LowbitError
from lowbit.staging import RESUME_DIR

from .conftest import _configs, save_random_model

CAL = dict(num_calib_data=4, seq_len=32, progress=False, quiet=True, group_size=16)
WHOLE = dict(num_calib_data=4, seq_len=32, progress=False, quiet=True)  # for per-tensor / per-channel schemes


@pytest.fixture(scope="module")
def deep_bf16(tmp_path_factory, tokenizer_dir):
    """A 4-block Llama stored in bfloat16 (the engine works in float32 and writes bfloat16)."""
    from transformers import AutoTokenizer

    config = _configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["llama"]
    config.num_hidden_layers = 4
    return save_random_model(config, tmp_path_factory.mktemp("deep"), tokenizer_dir, dtype=torch.bfloat16, seed=3)


def files(folder: Path) -> dict[str, str]:
    """sha256 of every file of an output but summary.json (it records timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "summary.json"}


def interrupt_at(monkeypatch, block: int) -> None:
    """Make the engine stop like a Ctrl-C right after block `block` wrote its tensors (before its checkpoint),
    so the shard files hold data the checkpoint does not cover."""
    original = runner.Engine._run_block

    def run_block(self, i, inputs, last):
        out = original(self, i, inputs, last)
        if i == block:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(runner.Engine, "_run_block", run_block)


@pytest.mark.parametrize("algo,scheme", [("rtn", "w_uint4_per_group_asym"), ("gptq", "w_uint4_per_group_asym"),
                                         ("awq", "w_int4_per_group_sym"),
                                         ("smoothquant", "w_int8_a_int8_per_tensor_sym"),
                                         ("rotation,gptq", "w_int4_per_channel_sym"),
                                         ("gptaq", "w_uint4_per_group_asym"),  # two activation streams
                                         ("autoround", "w_uint4_per_group_asym")])  # seeded per block
def test_resumed_run_writes_the_same_bytes(deep_bf16, tmp_path, monkeypatch, algo, scheme):
    CAL = globals()["CAL"] if "group" in scheme else WHOLE
    if algo == "autoround":
        CAL = {**CAL, "algo_args": {"autoround": {"iters": 10}}}
    whole = quantize(deep_bf16, tmp_path / "whole", scheme=scheme, algo=algo, **CAL)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            quantize(deep_bf16, out, scheme=scheme, algo=algo, resume=True, **CAL)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".out.lowbit-tmp-")]
    assert len(kept) == 1 and (kept[0] / RESUME_DIR / "state.json").is_file() and not out.exists()
    resumed = quantize(deep_bf16, out, scheme=scheme, algo=algo, resume=True, **CAL)
    assert resumed.summary["resumed_at_block"] == 2  # block 2 was written, not checkpointed
    assert files(out) == files(whole.output)
    assert resumed.summary["layer_errors"] == whole.summary["layer_errors"]
    assert not any(p.name.startswith(".out.lowbit-") for p in tmp_path.iterdir())  # checkpoint and lock gone
    assert not (out / RESUME_DIR).exists()


def test_a_checkpoint_is_kept_and_another_runs_refused(deep_bf16, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(KeyboardInterrupt):
            quantize(deep_bf16, out, algo="gptq", resume=True, **CAL)
    with pytest.raises(LowbitError, match="--resume"):  # a run without --resume does not delete it
        quantize(deep_bf16, out, algo="gptq", **CAL)
    with pytest.raises(LowbitError, match="calibration windows differ"):
        quantize(deep_bf16, out, algo="gptq", resume=True, **{**CAL, "seed": 5})
    with pytest.raises(LowbitError, match="recipe"):
        quantize(deep_bf16, out, algo="rtn", resume=True, **CAL)
    done = quantize(deep_bf16, out, algo="gptq", resume=True, **CAL)  # the checkpoint survived the refusals
    assert done.summary["resumed_at_block"] == 1


def test_resume_without_a_checkpoint_starts_from_block_0(deep_bf16, tmp_path):
    result = quantize(deep_bf16, tmp_path / "out", algo="gptq", resume=True, evaluate_after=True, max_chunks=2,
                      eval_seq_len=32, **CAL)
    assert result.summary["resumed_at_block"] == 0 and result.summary["perplexity"]["perplexity"] > 1
    from lowbit.api import evaluate  # the written folder, measured streamed: the figure of loading it whole

    whole = evaluate(tmp_path / "out", seq_len=32, max_chunks=2, progress=False, stream=False)
    assert whole["perplexity"] == result.summary["perplexity"]["perplexity"]
    with pytest.raises(LowbitError, match="output folder"):
        quantize(deep_bf16, None, algo="gptq", resume=True, **CAL)


def test_working_precision_and_offload(deep_bf16, tmp_path):
    """float32 work on a bfloat16 model writes bfloat16 tensors; bfloat16 work agrees within its precision;
    spilling the activations to --offload-dir changes no byte."""
    from safetensors import safe_open

    f32 = quantize(deep_bf16, tmp_path / "f32", algo="gptq", **CAL)
    with safe_open(f32.output / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert f32.summary["calib_dtype"] == "float32" and f32.summary["device"] == "cpu"
    spilled = quantize(deep_bf16, tmp_path / "spill", algo="gptq", offload_dir=tmp_path / "acts", **CAL)
    assert files(spilled.output) == files(f32.output)
    assert not list((tmp_path / "acts").iterdir())  # every spilled chunk removed
    bf16 = quantize(deep_bf16, tmp_path / "bf16", algo="gptq", calib_dtype="bfloat16", **CAL)
    a, b = f32.summary["mean_layer_error"], bf16.summary["mean_layer_error"]
    assert abs(a - b) / a < 0.05


def test_the_device_path_on_the_cpu(deep_bf16, tmp_path, monkeypatch):
    """The path a GPU run takes (work inside the device scope, results through HostSink, token ids and
    activations moved), exercised on the CPU: the same bytes as the host path."""
    from lowbit.engine.placement import Placement

    host = quantize(deep_bf16, tmp_path / "host", algo="awq", **CAL)
    monkeypatch.setattr(Placement, "on_host", property(lambda self: False))
    device = quantize(deep_bf16, tmp_path / "device", algo="awq", **CAL)
    assert files(device.output) == files(host.output)


@pytest.mark.parametrize("device,why", [("tpu", "unknown device"), ("cuda:x", "unknown device")])
def test_bad_devices(deep_bf16, tmp_path, device, why):
    with pytest.raises(LowbitError, match=why):
        quantize(deep_bf16, tmp_path / "out", device=device, **CAL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line(deep_bf16, tmp_path):
    with pytest.raises(LowbitError, match="sees no CUDA GPU"):
        quantize(deep_bf16, tmp_path / "out", device="cuda", **CAL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algo,scheme", [("rtn", "w_uint4_per_group_asym"), ("gptq", "w_uint4_per_group_asym"),
                                         ("awq", "w_int4_per_group_sym"),
                                         ("smoothquant", "w_int8_a_int8_per_tensor_sym"), ("rtn", "w_fp8_a_fp8"),
                                         ("rtn", "w_mxfp4"), ("rotation,gptq", "w_int4_per_channel_sym")])
def test_cuda_agrees_with_cpu(deep_bf16, tmp_path, algo, scheme):
    """The same float32 work on a GPU and on the CPU: the same codes up to float rounding (layer errors agree)."""
    cal = CAL if "group" in scheme else WHOLE
    cpu = quantize(deep_bf16, tmp_path / "cpu", scheme=scheme, algo=algo, device="cpu", **cal)
    gpu = quantize(deep_bf16, tmp_path / "gpu", scheme=scheme, algo=algo, device="cuda", calib_dtype="float32", **cal)
    for name, err in cpu.summary["layer_errors"].items():
        assert gpu.summary["layer_errors"][name] == pytest.approx(err, rel=2e-2, abs=1e-4)


def test_each_block_gets_its_own_arguments(tokenizer_dir, tmp_path, monkeypatch):
    """Gemma 3 with a sliding-window block then a full-attention one, windows longer than the slide: the engine
    calibrates each block with the mask and rotary embeddings the model itself gives that block, not block 0's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))["gemma3"]
    config.layer_types, config.sliding_window = ["sliding_attention", "full_attention"], 8
    src = save_random_model(config, tmp_path / "gemma3", tokenizer_dir)
    seen = {}
    original = runner.Engine._work_on_block

    def work(self, i, prefix, inputs, last):
        seen[i] = (self.calibration[:self.batch_size], inputs[0][1])
        return original(self, i, prefix, inputs, last)

    monkeypatch.setattr(runner.Engine, "_work_on_block", work)
    quantize(src, tmp_path / "out", algo="gptq", **{**CAL, "seq_len": 24})
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    given = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, kw, i=i: given.update({i: kw}) and None, with_kwargs=True)
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=seen[0][0], use_cache=False)
    for h in hooks:
        h.remove()

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and torch.equal(a, b)
        if isinstance(a, tuple):
            return isinstance(b, tuple) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    for i in (0, 1):
        for key in ("position_embeddings", "attention_mask"):
            assert same(seen[i][1].get(key), given[i].get(key)), (i, key)
    assert not same(given[0]["position_embeddings"], given[1]["position_embeddings"])  # they do differ

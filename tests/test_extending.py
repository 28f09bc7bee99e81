"""Extending lowbit as docs/ARCHITECTURE.md says: an algorithm defined and registered in one file (here, this
test) runs through the public API on torch and ONNX models with its options checked and recorded; a need
the engine does not serve is refused before any work."""

from __future__ import annotations

import json

import pytest
import yaml

from lowbit import api
from lowbit.algorithms import BLOCK_FORWARD, INPUT_STATS, REGISTRY, Quantizer, register
from lowbit.errors import LowbitError
from lowbit.formats import quantize as rtn_quantize


class CountingRTN(Quantizer):
    """A calibrated quantizer for the test: counts the calibration tokens it is shown, then rounds."""

    name = "test-counting-rtn"
    needs = frozenset({INPUT_STATS})
    LIMITS = {"shrink": (0.5, 1.0)}

    def __init__(self, shrink: float = 1.0):
        self.shrink = shrink

    def args(self) -> dict:
        return {"shrink": self.shrink}

    def observe(self, names, inputs) -> None:
        for n in names:
            self.notes[n] = f"saw {inputs.shape[0]} tokens"

    def take_stats(self, names, stats) -> bool:  # the ONNX front end hands over statistics only
        for n in names:
            self.notes[n] = f"saw {stats.count} tokens"
        return True

    def quantize(self, name, weight, spec, clip=None):
        return rtn_quantize(weight * self.shrink, spec, clip)


class NeedsBlockForward(Quantizer):  # the torch engine serves it, the ONNX front end does not
    name = "test-needs-block-forward"
    needs = frozenset({BLOCK_FORWARD})


class NeedsSomethingNew(NeedsBlockForward):  # a need neither front end knows
    name = "test-needs-something-new"
    needs = frozenset({"per-token gradients"})

    def quantize(self, name, weight, spec, clip=None):
        return rtn_quantize(weight, spec, clip)


@pytest.fixture
def registered():
    for cls in (CountingRTN, NeedsBlockForward, NeedsSomethingNew):
        register(cls)
    yield
    for cls in (CountingRTN, NeedsBlockForward, NeedsSomethingNew):
        REGISTRY.pop(cls.name)


CALIB = dict(num_calib_data=4, seq_len=32, progress=False, quiet=True)


def test_new_algorithm_runs_on_torch_models(registered, tiny_models, tmp_path):
    out = tmp_path / "q"
    result = api.quantize(tiny_models["llama"], out, scheme="w_uint4_per_group_asym", group_size=16,
                          algo=CountingRTN.name, algo_args={CountingRTN.name: {"shrink": 0.75}}, **CALIB)
    assert result.summary["algorithms"] == [CountingRTN.name]
    notes = json.loads((out / "summary.json").read_text())["layer_notes"]
    assert notes["model.layers.0.self_attn.q_proj"].startswith("saw ")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert {"name": CountingRTN.name, "shrink": 0.75}.items() <= _step(recipe).items()


def test_new_algorithm_runs_on_onnx_models(registered, onnx_tiny, tmp_path):
    from lowbit.onnx.options import OnnxOptions

    out = tmp_path / "q"
    api.quantize(onnx_tiny["gqa"][1], out, scheme="w_uint4_per_group_asym", group_size=32, algo=CountingRTN.name,
                 onnx_options=OnnxOptions(), **CALIB)
    notes = json.loads((out / "summary.json").read_text())["layer_notes"]
    assert any(n.startswith("saw ") for n in notes.values())


def test_new_algorithm_options_are_checked(registered, tiny_models, tmp_path):
    with pytest.raises(LowbitError, match="shrink must be between 0.5 and 1.0"):
        api.quantize(tiny_models["llama"], tmp_path / "q", algo=CountingRTN.name,
                     algo_args={CountingRTN.name: {"shrink": 2.0}}, **CALIB)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("onnx", [False, True])
def test_unserved_need_is_refused_before_any_work(onnx, registered, tiny_models, onnx_tiny, tmp_path):
    source = onnx_tiny["gqa"][1] if onnx else tiny_models["llama"]
    where = "the ONNX front end" if onnx else "this engine"
    algo, need = (NeedsBlockForward, "block forward") if onnx else (NeedsSomethingNew, "per-token gradients")
    with pytest.raises(LowbitError, match=f"needs {need}, which {where} does not provide yet"):
        api.quantize(source, tmp_path / "q", algo=algo.name, **CALIB)
    assert list(tmp_path.iterdir()) == []


def _step(recipe: dict) -> dict:
    steps = recipe["algorithms"]
    step = steps[0]
    return step if isinstance(step, dict) else {"name": step}

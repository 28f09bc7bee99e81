"""Hadamard rotation: the matrices, the float equivalence of rotated models on every tiny architecture, and
rotation chained with quantization through the writers."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.algorithms.hadamard import Rotation, describe, hadamard, hadamard_factors
from lowbit.algorithms.rotation import Rotate
from lowbit.errors import LowbitError
from lowbit.hf.model import open_model
from lowbit.hf.rotate import Rotator

from .conftest import ARCHS, make_tiny

ORDERS = [1, 2, 4, 12, 20, 28, 36, 40, 44, 60, 76, 80, 112, 144, 148, 576, 896, 1536]


@pytest.mark.parametrize("n", ORDERS)
def test_hadamard_orders_are_hadamard(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_576_is_36_by_16_and_unreachable_orders_fall_back():
    assert hadamard_factors(576) == (36, 16)
    assert describe(576) == "36x16 Hadamard"
    assert hadamard(52) is None and "random orthogonal" in describe(52)  # 52 needs GF(25): not built here
    assert hadamard(9) is None


@pytest.mark.parametrize("n,seed,keep_mean", [(80, 0, False), (80, 3, True), (576, 1, False), (576, None, True),
                                              (52, 0, False), (52, 2, True), (4096, 5, False)])
def test_rotation_is_orthogonal_and_applies_as_its_matrix(n, seed, keep_mean):
    r = Rotation(n, seed, keep_mean)
    q = r.matrix()
    assert torch.allclose(q.T @ q, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, n, dtype=torch.float64)
    assert torch.allclose(r.right(x), x @ q, atol=1e-12)
    assert torch.allclose(r.right(x.float()), (x @ q).float(), atol=1e-5)  # run-time dtype for online use
    if keep_mean:
        ones = torch.ones(n, dtype=torch.float64)
        assert torch.allclose(ones @ q, ones, atol=1e-12)


def test_seed_changes_the_signs_only_reproducibly():
    a, b, c = Rotation(80, 1).matrix(), Rotation(80, 1).matrix(), Rotation(80, 2).matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a.abs(), c.abs())


@pytest.fixture(scope="module")
def gained_models(tmp_path_factory, tokenizer_dir):
    """Tiny models whose norms have non-trivial gains and biases (fresh norms are all ones / zeros, which would
    hide a norm that was not absorbed)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch in ARCHS:
        folder = make_tiny(arch, tmp_path_factory.mktemp(f"rot-{arch}"), tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(folder)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(folder)
        out[arch] = folder
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _rotated(folder, ids, **options):
    loaded = open_model(folder)
    summary = Rotator(loaded, Rotate(**options), ids).prepare()
    return loaded.load_all(), summary, loaded


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3"])
@pytest.mark.parametrize("options", [{}, {"r2": True, "r4": True, "seed": 7}])
def test_rotated_float_model_computes_the_same(arch, options, gained_models):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = _logits(AutoModelForCausalLM.from_pretrained(gained_models[arch]).eval(), ids)
    model, summary, loaded = _rotated(gained_models[arch], ids, **options)
    logits = _logits(model, ids)
    assert ((logits - reference).abs().max() / reference.abs().max()) < 1e-4
    assert summary["matrix"] == "20x4 Hadamard"
    assert summary["mean_preserving"] == (arch == "opt")  # LayerNorm: the rotation keeps the ones direction
    # the weights really changed: the first block's first linear is not the original
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    assert not torch.allclose(model.get_submodule(first).weight, loaded.read(f"{first}.weight"))


def _more_configs():
    """Families beyond conftest's: q/k norms (Qwen3), scalar multipliers (Granite), parallel attention with
    LayerNorm (Falcon, Cohere without norm bias, Phi with an lm_head bias), partial rotary (StableLM), and
    post-norm blocks (OLMo-2), which must be refused."""
    import transformers as tf

    common = dict(vocab_size=300, hidden_size=80, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, intermediate_size=112, pad_token_id=0)
    return {
        "qwen3": tf.Qwen3Config(**common, num_key_value_heads=2, head_dim=20),
        "granite": tf.GraniteConfig(**common, num_key_value_heads=2, embedding_multiplier=3.0,
                                    residual_multiplier=0.5, logits_scaling=2.0),
        "falcon": tf.FalconConfig(vocab_size=300, hidden_size=80, num_hidden_layers=2, num_attention_heads=4,
                                  new_decoder_architecture=False),
        "cohere": tf.CohereConfig(**common, num_key_value_heads=2),
        "phi": tf.PhiConfig(**common),
        "stablelm": tf.StableLmConfig(**common, num_key_value_heads=2, partial_rotary_factor=0.5),
        "olmo2": tf.Olmo2Config(**common, num_key_value_heads=2),
    }


@pytest.mark.parametrize("arch", ["qwen3", "granite", "falcon", "cohere", "phi", "stablelm", "olmo2"])
def test_more_families_rotate_exactly_or_are_refused(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_more_configs()[arch]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * 0.08 if p.dim() == 2 else p + torch.randn(p.shape) * 0.3)
    model.save_pretrained(tmp_path)
    ids = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = _logits(model, ids)
    if arch == "olmo2":  # norms after attention and MLP, inside the residual branch: no rotation commutes
        with pytest.raises(LowbitError, match="rotation changed what block 0 computes"):
            _rotated(tmp_path, ids)
        return
    logits = _logits(_rotated(tmp_path, ids, r2=True, r4=True)[0], ids)
    assert ((logits - reference).abs().max() / reference.abs().max()) < 1e-4


def test_sandwich_norm_blocks_are_refused(gained_models):
    ids = torch.randint(3, 300, (1, 16))
    with pytest.raises(LowbitError, match="rotation changed what block 0 computes"):
        _rotated(gained_models["gemma3"], ids)


def test_rotation_must_come_first_in_the_chain():
    from lowbit.algorithms import parse_chain

    with pytest.raises(LowbitError, match="rotation must come first"):
        parse_chain("smoothquant,rotation,rtn")
    chain = parse_chain("rotation,smoothquant,gptq", {"rotation": {"seed": 3, "r2": True}})
    assert [a.name for a in chain] == ["rotation", "smoothquant", "gptq"] and chain[0].args()["seed"] == 3
    with pytest.raises(LowbitError, match="seed must be a whole number"):
        parse_chain("rotation", {"rotation": {"seed": "x"}})


def _quantize(source, out, **kwargs):
    from lowbit.api import quantize

    kwargs.setdefault("num_calib_data", 4)
    kwargs.setdefault("seq_len", 64)
    return quantize(source, out, progress=False, quiet=True, keep_in_memory=True, **kwargs)


def _ids():
    return torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("algo,scheme,algo_args", [
    ("rotation", "w_int4_per_group_sym", None),
    ("rotation,gptq", "w_uint4_per_group_asym", ["rotation:seed=5,r2=true"]),
    ("rotation,smoothquant", "w_int8_a_int8_per_tensor_sym", ["rotation:r4=true"]),
    ("rotation,awq", "w_uint4_per_group_asym", ["rotation:r2=true,r4=true"]),
])
def test_rotation_chains_round_trip_through_the_native_folder(algo, scheme, algo_args, gained_models, tmp_path):
    from lowbit.api import load

    result = _quantize(gained_models["llama"], tmp_path / "q", scheme=scheme, algo=algo, algo_args=algo_args,
                       group_size=16 if "group" in scheme else None)
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["rotation"]["matrix"] == "20x4 Hadamard" and summary["rotation"]["max_block_error"] < 1e-4
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # lm_head = E diag(gamma) Q no longer equals E Q
    r4 = bool(algo_args and "r4=true" in algo_args[0])
    assert bool(config["quantization_config"]["online_rotations"]) == r4
    reloaded = load(tmp_path / "q")[0].eval()
    assert torch.allclose(_logits(reloaded, _ids()), _logits(result.model.eval(), _ids()), atol=1e-5)
    recipe = (tmp_path / "q" / "recipe.yaml").read_text()
    assert "rotation" in recipe and "seed" in recipe


def test_rotation_helps_per_channel_int4_weights_of_a_model_with_outlier_channels(tokenizer_dir, tmp_path):
    """On a model whose stream has a few large channels (as trained LLMs do), rotating spreads them, so
    per-channel int4 weights lose less: the rotated model's logits stay closer to the float ones."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny("llama", tmp_path / "m", tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for block in model.model.layers:  # writers that push channels 3 and 41 of the stream far out
            block.mlp.down_proj.weight[[3, 41]] *= 25
            block.self_attn.q_proj.weight[:, [3, 41]] *= 25
    model.save_pretrained(folder)
    reference = _logits(model.eval(), _ids())
    errors = {}
    for algo in ("rtn", "rotation"):
        out = _quantize(folder, tmp_path / algo, scheme="w_int4_per_channel_sym", algo=algo).model
        errors[algo] = (_logits(out.eval(), _ids()) - reference).pow(2).mean().item()
    assert errors["rotation"] < 0.7 * errors["rtn"], errors  # measured 0.19 vs 0.32


def test_r1_rotated_int4_exports_to_compressed_tensors_and_r4_is_refused(gained_models, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    from lowbit.api import load
    from lowbit.exporters.compressed_tensors import export_compressed_tensors

    _quantize(gained_models["qwen2"], tmp_path / "r1", scheme="w_int4_per_group_sym", group_size=16,
              algo="rotation", algo_args=["rotation:r2=true"])
    out = export_compressed_tensors(tmp_path / "r1", tmp_path / "ct")
    ct = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(ct, _ids()), _logits(load(tmp_path / "r1")[0].eval(), _ids()))
    _quantize(gained_models["qwen2"], tmp_path / "r4", scheme="w_int4_per_group_sym", group_size=16,
              algo="rotation", algo_args=["rotation:r4=true"])
    with pytest.raises(LowbitError, match="rotation r4"):
        export_compressed_tensors(tmp_path / "r4", tmp_path / "ct4")
    assert not (tmp_path / "ct4").exists()

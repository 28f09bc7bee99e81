"""Issue #19, model folders that point outside themselves or carry code: an ONNX tensor's external-data
location, a safetensors index's shard names and the files lowbit copies into its outputs must lie inside the
model's folder (or, in the Hugging Face hub cache, its repository folder); a model that needs the folder's own
Python is refused, and nothing ever waits on the terminal. Each case runs the command users run and checks the
refusal: one error line, exit code 2, no file changed, no output (or output parent) created."""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest

from .refusals import assert_refused, run_cli

RTN = ["--scheme", "w_uint4_per_group_asym", "--group-size", "32", "--no-progress"]
EVAL = ["--seq-len", "16", "--max-chunks", "1", "--no-progress"]


def quantize(src, out):
    return ["quantize", src, "-o", out, *RTN]


def commands(src, out):
    """The commands that read a model folder, by name."""
    return {"quantize": quantize(src, out), "eval": ["eval", src, *EVAL], "inspect": ["inspect", src]}


@pytest.fixture
def out(tmp_path):
    """An output path whose parent does not exist yet: a refusal must create neither."""
    return tmp_path / "new" / "out"


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("TOP SECRET\n" * 100_000)  # long enough to pass for any tensor's data
    return path


@pytest.fixture
def llama(tiny_models, tmp_path):
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))


@pytest.fixture
def onnx_dir(onnx_tiny, tmp_path):
    return Path(shutil.copytree(onnx_tiny["gqa"][1], tmp_path / "onnx"))


def set_location(folder: Path, location: str, every: bool = False) -> str:
    """Point the first (or every) external initializer of folder/model.onnx at `location`; returns the first
    tensor's name."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensors = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    for tensor in tensors if every else tensors[:1]:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(folder / "model.onnx"))
    return tensors[0].name


# -- ONNX external data -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_onnx_location_with_dotdot(command, onnx_dir, secret, out, capsys):
    name = set_location(onnx_dir, "../secret.txt")
    assert_refused(commands(onnx_dir, out)[command], capsys, rf"{name}.*'\.\./secret\.txt'.*'\.\.'",
                   unchanged=[onnx_dir, secret], absent=[out, out.parent])


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_onnx_absolute_location(command, onnx_dir, secret, out, capsys):
    set_location(onnx_dir, str(secret))
    assert_refused(commands(onnx_dir, out)[command], capsys, "absolute path", unchanged=[onnx_dir, secret],
                   absent=[out, out.parent])


def test_onnx_location_symlinked_outside(onnx_dir, secret, out, capsys):
    (onnx_dir / "weights.data").symlink_to(secret)
    set_location(onnx_dir, "weights.data")
    assert_refused(quantize(onnx_dir, out), capsys, r"'weights\.data' resolves through a symlink to .*secret\.txt",
                   unchanged=[onnx_dir, secret], absent=[out, out.parent])


def test_onnx_location_under_symlinked_folder(onnx_dir, tmp_path, out, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(onnx_dir / "model.onnx.data", elsewhere)
    (onnx_dir / "sub").symlink_to(elsewhere)
    set_location(onnx_dir, "sub/model.onnx.data", every=True)
    for argv in (quantize(onnx_dir, out), ["eval", onnx_dir, *EVAL]):
        assert_refused(argv, capsys, "symlink", unchanged=[onnx_dir, elsewhere], absent=[out, out.parent])


def test_onnx_decoder_filename_outside(onnx_dir, tmp_path, out, capsys):
    shutil.copy(onnx_dir / "model.onnx", tmp_path / "model.onnx")
    config = json.loads((onnx_dir / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "../model.onnx"
    (onnx_dir / "genai_config.json").write_text(json.dumps(config))
    assert_refused(quantize(onnx_dir, out), capsys, r"filename '\.\./model\.onnx'", unchanged=[onnx_dir],
                   absent=[out, out.parent])


def test_onnx_tokenizer_symlinked_outside(onnx_dir, tmp_path, out, capsys):
    outside = tmp_path / "tokenizer.json"
    shutil.move(onnx_dir / "tokenizer.json", outside)
    (onnx_dir / "tokenizer.json").symlink_to(outside)
    assert_refused(quantize(onnx_dir, out), capsys, r"tokenizer\.json is a symlink to .*copy the file into",
                   unchanged=[onnx_dir, outside], absent=[out, out.parent])


# -- safetensors index -------------------------------------------------------------------------------------

def write_index(folder: Path, shard: str, weights: Path | None = None) -> None:
    """model.safetensors.index.json placing every tensor of `weights` (folder's model.safetensors) in `shard`."""
    from safetensors import safe_open

    with safe_open(str(weights or folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: shard for k in keys}}))


@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_index_shard_with_dotdot(command, llama, tmp_path, out, capsys):
    stolen = Path(shutil.copy(llama / "model.safetensors", tmp_path / "stolen.safetensors"))
    write_index(llama, "../stolen.safetensors")
    assert_refused(commands(llama, out)[command], capsys, r"weight_map shard of tensor .*'\.\./stolen\.safetensors'",
                   unchanged=[llama, stolen], absent=[out, out.parent])


def test_index_shard_absolute(llama, tmp_path, out, capsys):
    stolen = Path(shutil.copy(llama / "model.safetensors", tmp_path / "stolen.safetensors"))
    write_index(llama, str(stolen))
    assert_refused(quantize(llama, out), capsys, r"index\.json: weight_map shard of tensor .*absolute path",
                   unchanged=[llama, stolen], absent=[out, out.parent])


def test_index_shard_symlinked_outside(llama, tmp_path, out, capsys):
    stolen = Path(shutil.move(llama / "model.safetensors", tmp_path / "stolen.safetensors"))
    (llama / "model-00001-of-00001.safetensors").symlink_to(stolen)
    write_index(llama, "model-00001-of-00001.safetensors", stolen)
    assert_refused(quantize(llama, out), capsys, "resolves through a symlink to .*stolen", unchanged=[llama, stolen],
                   absent=[out, out.parent])


def test_weights_symlinked_outside(llama, tmp_path, out, capsys):
    stolen = Path(shutil.move(llama / "model.safetensors", tmp_path / "stolen.safetensors"))
    (llama / "model.safetensors").symlink_to(stolen)
    assert_refused(["inspect", llama], capsys, r"'model\.safetensors' resolves through a symlink", unchanged=[stolen])


@pytest.mark.parametrize("index,match", [
    ([1, 2], "JSON list, not the object"),
    ({"weight_map": ["model.safetensors"]}, "no weight_map object"),
    ({"weight_map": {"model.norm.weight": 7}}, "no weight_map object"),
    ({"weight_map": {"model.no_such.weight": "model.safetensors"}}, r"'model\.no_such\.weight'.*does not hold it"),
], ids=["list", "map is a list", "shard not a string", "tensor not in its shard"])
def test_malformed_index(index, match, llama, out, capsys):
    (llama / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_refused(quantize(llama, out), capsys, match, unchanged=[llama], absent=[out, out.parent])


# -- files copied into outputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"])
def test_copied_file_symlinked_outside(name, llama, tmp_path, out, capsys):
    outside = Path(shutil.move(llama / name, tmp_path / name))
    (llama / name).symlink_to(outside)
    assert_refused(quantize(llama, out), capsys, rf"{name} is a symlink to .*{name}, outside .*copy the file into",
                   unchanged=[llama, outside], absent=[out, out.parent])


def test_chat_template_symlinked_to_a_secret(llama, secret, out, capsys):
    (llama / "chat_template.jinja").symlink_to(secret)
    assert_refused(quantize(llama, out), capsys, r"chat_template\.jinja is a symlink to .*secret\.txt",
                   unchanged=[llama, secret], absent=[out, out.parent])


def test_export_of_a_folder_with_a_symlink_outside(tiny_models, lowbit_out, secret, tmp_path, out, capsys):
    src = Path(shutil.copytree(lowbit_out(tiny_models["llama"], "w_int4_per_group_sym", group_size=16),
                               tmp_path / "q"))
    (src / "special_tokens_map.json").symlink_to(secret)
    assert_refused(["export", src, "-o", out, "-f", "compressed-tensors"], capsys,
                   r"special_tokens_map\.json is a symlink", unchanged=[src, secret], absent=[out, out.parent])


def hub_layout(folder: Path, root: Path) -> Path:
    """The Hugging Face hub cache layout of a model folder: root/models--org--tiny/snapshots/<rev>/<file>
    symlinks to ../../blobs/<hash>; returns the snapshot folder."""
    import hashlib

    repo = root / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


def test_hub_cache_layout_still_works(tiny_models, tmp_path, capsys):
    snapshot = hub_layout(Path(tiny_models["llama"]), tmp_path / "hub")
    code, _, err = run_cli(quantize(snapshot, tmp_path / "q"), capsys)
    assert code == 0, err
    copied = tmp_path / "q" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (snapshot / "tokenizer.json").read_bytes()
    code, _, err = run_cli(["inspect", snapshot], capsys)
    assert code == 0, err


def test_hub_cache_layout_of_an_onnx_model(onnx_tiny, tmp_path, capsys):
    """model.onnx.data reached through the snapshot's symlink into blobs/ is inside the repository."""
    snapshot = hub_layout(Path(onnx_tiny["gqa"][1]), tmp_path / "hub")
    for argv in (quantize(snapshot, tmp_path / "q"), ["eval", snapshot, *EVAL]):
        code, _, err = run_cli(argv, capsys)
        assert code == 0, err
    assert not (tmp_path / "q" / "genai_config.json").is_symlink() and (tmp_path / "q" / "tokenizer.json").is_file()


def test_hub_cache_link_outside_the_repository(tiny_models, secret, tmp_path, out, capsys):
    snapshot = hub_layout(Path(tiny_models["llama"]), tmp_path / "hub")
    (snapshot / "tokenizer_config.json").unlink()
    (snapshot / "tokenizer_config.json").symlink_to(secret)
    assert_refused(quantize(snapshot, out), capsys, r"tokenizer_config\.json is a symlink to .*secret",
                   unchanged=[secret], absent=[out, out.parent])


# -- code from the model folder ----------------------------------------------------------------------------

@pytest.fixture
def no_prompt(monkeypatch):
    """input() records that it was called (and fails), so a prompt shows in the test even where it is caught."""
    calls = []

    def prompt(*args):
        calls.append(args)
        raise EOFError("stdin is closed")

    monkeypatch.setattr(builtins, "input", prompt)
    return calls


def plant_code(folder: Path, marker: Path, module: str = "custom_model") -> None:
    """A Python file in the folder that would leave `marker` behind if anything imported it."""
    (folder / f"{module}.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                         f"class CustomConfig: pass\nclass CustomModel: pass\n"
                                         f"class CustomTokenizer: pass\n")


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("command", ["quantize", "eval", "inspect"])
def test_custom_model_code_is_refused(command, llama, tmp_path, out, capsys, no_prompt):
    marker = tmp_path / "marker"
    plant_code(llama, marker)
    edit_json(llama / "config.json", model_type="custom_lm", architectures=["CustomModel"],
              auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomModel"})
    assert_refused(commands(llama, out)[command], capsys, "needs custom code .*never runs; use .*transformers",
                   unchanged=[llama], absent=[out, out.parent, marker])
    assert no_prompt == []


@pytest.mark.parametrize("command", ["quantize", "eval"])
def test_custom_tokenizer_code_is_refused(command, llama, tmp_path, out, capsys, no_prompt):
    marker = tmp_path / "marker"
    plant_code(llama, marker)
    edit_json(llama / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
              auto_map={"AutoTokenizer": ["custom_model.CustomTokenizer", None]})
    argv = commands(llama, out)[command] + (["--algo", "gptq", "--num-calib-data", "2", "--seq-len", "32"]
                                            if command == "quantize" else [])
    assert_refused(argv, capsys, "needs custom code to load its tokenizer", unchanged=[llama],
                   absent=[out, out.parent, marker])
    assert no_prompt == []


def test_custom_tokenizer_code_beside_an_onnx_model(onnx_dir, tmp_path, capsys, no_prompt):
    marker = tmp_path / "marker"
    plant_code(onnx_dir, marker)
    edit_json(onnx_dir / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
              auto_map={"AutoTokenizer": ["custom_model.CustomTokenizer", None]})
    assert_refused(["eval", onnx_dir, *EVAL], capsys, "needs custom code", unchanged=[onnx_dir], absent=[marker])
    assert no_prompt == []


def test_auto_map_with_a_native_architecture_still_loads(llama, tmp_path, capsys, no_prompt):
    """transformers then uses its own class; the folder's code is never imported."""
    marker = tmp_path / "marker"
    plant_code(llama, marker)
    edit_json(llama / "config.json", auto_map={"AutoConfig": "custom_model.CustomConfig",
                                               "AutoModelForCausalLM": "custom_model.CustomModel"})
    code, _, err = run_cli(quantize(llama, tmp_path / "q"), capsys)
    assert code == 0, err
    code, _, err = run_cli(["eval", llama, *EVAL], capsys)
    assert code == 0, err
    assert not marker.exists() and no_prompt == []

"""A causal LM as a transformers module skeleton whose weights are read from disk on demand.

The skeleton is built from config.json with parameters on the meta device (no memory); `materialize`
loads the weights of one module (a decoder block, say) and `release` drops them again, so the engine holds
one block at a time. Folders written by lowbit are recognised by their quantization_config and their packed
linears are dequantized as they are loaded.
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..arch import Layout, find_layout, set_module_tensor
from ..arch.moe import read_aliased, unfuse_experts
from ..errors import LowbitError
from ..model_files import check_finite, custom_code_error, is_custom_code, load_config, load_tokenizer, read_json
from ..spec import QuantSpec
from .int_checkpoint import PACKED_METHODS, PackedIntCheckpoint
from .checkpoint import LazyCheckpoint, open_checkpoint
from .source import resolve_source

QUANT_METHOD = "lowbit"


@dataclass
class LoadedModel:
    """A model folder opened lazily: skeleton module, checkpoint reader and what is stored quantized.
    source_dtype is the dtype of the stored float weights (dequantized weights are rounded to it, as a
    runtime holding them in that dtype would); dtype is the working dtype of the skeleton."""

    folder: Path
    model: nn.Module
    layout: Layout
    ckpt: LazyCheckpoint  # or a GGUFCheckpoint (same interface) for a GGUF source
    dtype: torch.dtype
    source_dtype: torch.dtype
    quantized: dict[str, QuantSpec] = field(default_factory=dict)
    quantization_config: dict | None = None
    untied: dict[str, str] = field(default_factory=dict)  # parameter -> the tied source it is read from
    # called with the names of the parameters each materialize() loaded (a rotation rewrites them there)
    after_materialize: Callable[[list[str]], None] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where materialize() puts weights

    # -- weights ------------------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """A parameter's float value from disk (dequantizing lowbit-packed linears)."""
        module_name, _, attr = name.rpartition(".")
        if attr == "weight" and module_name in self.quantized:
            from ..formats.packed import read_linear

            shape = tuple(self.model.get_parameter(name).shape)
            return read_linear(self.ckpt, module_name, self.quantized[module_name], shape).to(self.source_dtype)
        if name not in self.ckpt and (name in self.layout.tied or name in self.untied):
            return self.read(self.layout.tied.get(name) or self.untied[name])
        if name not in self.ckpt:
            aliased = read_aliased(name, self.ckpt)
            if aliased is not None:
                return aliased
        return self.ckpt.get(name)

    def read_checked(self, name: str) -> torch.Tensor:
        """read(name), refused (one line) when it holds NaN or Inf or does not match the config's shape."""
        tensor = self.read(name)
        check_finite(name, tensor, self.folder)
        expected = tuple(self.model.get_parameter(name).shape)
        if tuple(tensor.shape) != expected:
            raise LowbitError(f"tensor {name} has shape {tuple(tensor.shape)} in {self.folder} but the config "
                              f"asks for {expected}; the checkpoint does not match its config.json")
        return tensor

    def materialize(self, prefix: str = "") -> None:
        """Load every parameter whose name starts with prefix from disk into the skeleton. A tied weight
        stored only under its source (lm_head -> embeddings) shares the source's tensor."""
        loaded = []
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(prefix) or param.device.type != "meta":
                continue
            source = self.layout.tied.get(name)
            if source and name not in self.ckpt and name.rpartition(".")[0] not in self.quantized:
                if self.model.get_parameter(source).device.type == "meta":
                    self.materialize(source)
                set_module_tensor(self.model, name, self.model.get_parameter(source))
                continue
            tensor = self.read_checked(name)
            set_module_tensor(self.model, name, tensor.to(self.device, param.dtype) if tensor.is_floating_point()
                              else tensor.to(self.device))
            loaded.append(name)
        if loaded and self.after_materialize is not None:
            self.after_materialize(loaded)

    def untie(self, name: str) -> None:
        """Give a tied parameter (lm_head) its own copy of its source's stored value from now on."""
        self.untied[name] = self.layout.tied.pop(name)

    def release(self, prefix: str) -> None:
        """Drop the weights under prefix back to the meta device."""
        for name, param in list(self.model.named_parameters(remove_duplicate=False)):
            if name.startswith(prefix) and param.device.type != "meta":
                set_module_tensor(self.model, name, torch.empty_like(param, device="meta"))

    def load_all(self) -> nn.Module:
        """Materialize every weight and return the ready-to-run model (eval mode), with the input activations
        of W+A layers fake-quantized as stored."""
        self.materialize("")
        self.attach_runtime("")
        self.model.eval()
        return self.model

    def attach_runtime(self, prefix: str = "") -> None:
        """Give the modules under prefix (a block's "model.layers.3.", a module's "lm_head.", "" for all) what
        the folder asks of them at run time: fake quantization of their input activations (W+A schemes), the
        online rotation of their input (R4) and fake quantization of their output (KV cache). Attaching again
        replaces the earlier hooks; the hooks stay on the modules across release / materialize."""
        from ..algorithms.rotation import online_rotation
        from .actquant import attach_input_quant, attach_online_rotation, attach_output_quant

        def under(name: str) -> bool:
            return f"{name}.".startswith(prefix)

        qconfig = self.quantization_config or {}
        for name, spec in self.input_specs.items():
            if under(name):
                params = None if spec.dynamic else _scalar_or_tensor(self.ckpt.get(f"{name}.input_scale"))
                attach_input_quant(self.model.get_submodule(name), spec, params)
        for name, info in qconfig.get("online_rotations", {}).items():
            if under(name):
                attach_online_rotation(self.model.get_submodule(name), online_rotation(int(info["size"])))
        for name, spec in qconfig.get("outputs", {}).items():
            if under(name):
                attach_output_quant(self.model.get_submodule(name), QuantSpec.from_dict(spec),
                                    _scalar_or_tensor(self.ckpt.get(f"{name}.output_scale")))

    @property
    def input_specs(self) -> dict[str, QuantSpec]:
        return {n: QuantSpec.from_dict(d) for n, d in (self.quantization_config or {}).get("inputs", {}).items()}

    def tokenizer(self):
        return load_tokenizer(self.folder)

    def size_bytes(self) -> int:
        return self.ckpt.size_bytes()


def _scalar_or_tensor(scale: torch.Tensor) -> torch.Tensor:
    """A stored activation scale in float32: a 0-d tensor when it holds one value (per tensor)."""
    scale = scale.float()
    return scale if scale.numel() > 1 else scale.reshape(())


def open_model(source, dtype: torch.dtype | None = None) -> LoadedModel:
    """Open any model source lazily: the skeleton is built (in `dtype`, default the stored dtype), no weight
    is read."""
    folder = resolve_source(source)
    config_dict = read_json(folder / "config.json", "model config")
    qconfig = config_dict.get("quantization_config")
    quantized = {}
    ckpt = open_checkpoint(folder)
    source_dtype = ckpt.dtype()
    if qconfig is not None:
        if not isinstance(qconfig, dict) or not isinstance(qconfig.get("modules", {}), dict):
            raise LowbitError(f"{folder / 'config.json'} has a malformed quantization_config (not an object of "
                              f"quant_method, modules, ...); restore the file")
        if qconfig.get("quant_method") in PACKED_METHODS:  # AutoAWQ / GPTQ: read as dequantized float weights
            ckpt, qconfig = PackedIntCheckpoint(ckpt, qconfig, folder), None
        elif qconfig.get("quant_method") != QUANT_METHOD:
            raise LowbitError(f"{folder} is quantized with {qconfig.get('quant_method')!r}, which lowbit cannot "
                              f"read yet; give the float model")
        else:
            quantized = {name: QuantSpec.from_dict(d) for name, d in qconfig.get("modules", {}).items()}
            source_dtype = getattr(torch, qconfig.get("dtype", "float32"))
    dtype = dtype or source_dtype
    model = build_skeleton(folder, dtype)
    return LoadedModel(folder, model, find_layout(model), ckpt, dtype, source_dtype, quantized, qconfig)


TRANSFORMERS_LOADED = ("compressed-tensors",)  # other tools' layouts transformers dequantizes on the CPU


def foreign_quantization(source) -> str | None:
    """The quant_method of a folder quantized by another tool's layout that transformers loads here
    (compressed-tensors, e.g. lowbit's own export), else None."""
    config = Path(str(source)) / "config.json"
    if not config.is_file():
        return None
    qconfig = read_json(config, "model config").get("quantization_config")
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    return method if method in TRANSFORMERS_LOADED else None


def load_with_transformers(folder, dtype: torch.dtype | None = None):
    """(model, tokenizer) of a compressed-tensors folder through transformers. Weights are decompressed to
    ordinary float linears (the same values lowbit's own folder dequantizes to); a folder with static input
    activations loads in compressed-tensors' own (compressed) mode instead, the one that applies its input scales
    (the decompressed mode drops them). Every tensor of the folder must load: KV-cache scales the installed
    versions leave unused are reported (one warning), any other key that does not match is refused."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = load_config(folder)
    refuse_encoder_decoder(config, folder)
    qconfig = read_json(Path(folder) / "config.json", "model config").get("quantization_config")
    groups = qconfig.get("config_groups") if isinstance(qconfig, dict) else None
    with_inputs = isinstance(groups, dict) and any(isinstance(g, dict) and g.get("input_activations")
                                                   for g in groups.values())
    mode = {} if with_inputs else {"quantization_config": CompressedTensorsConfig(run_compressed=False)}
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its load report: check_loading_info says it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32,
                                                               trust_remote_code=False, output_loading_info=True,
                                                               **mode)
    except ImportError as exc:
        raise LowbitError(f"{folder} is in the compressed-tensors layout; loading it needs the compressed-tensors "
                          f"package ({exc}): pip install compressed-tensors") from None
    except (OSError, ValueError, RuntimeError) as exc:
        if is_custom_code(exc):
            raise custom_code_error(folder, "model") from None
        text = config.get_text_config()
        if getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None):
            import transformers

            raise LowbitError(f"transformers {transformers.__version__} cannot load {folder}: it fuses a mixture of "
                              f"experts into 3-D tensors and cannot convert packed compressed-tensors experts "
                              f"(vLLM and SGLang load this layout); measure the lowbit folder it was exported "
                              f"from instead") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LowbitError(f"transformers cannot load {folder} ({first}); the folder does not match its "
                          f"config.json") from None
    refuse_bidirectional(model, model.config, folder)
    check_loading_info(info, folder)
    return model.eval(), load_tokenizer(folder)


KV_SCALE_SUFFIXES = ("k_scale", "v_scale", "k_proj.output_scale", "v_proj.output_scale")


def check_loading_info(info: dict, folder) -> None:
    """transformers' loading report of a folder: KV-cache scales left unused give one warning line (the
    result is then measured without KV-cache quantization); any other unused, missing or mismatched tensor is
    refused."""
    unexpected = list(info.get("unexpected_keys") or [])
    kv = [k for k in unexpected if k.endswith(KV_SCALE_SUFFIXES)]
    other = [k for k in unexpected if k not in kv]
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m for m in info.get("mismatched_keys") or []]
    problems = [(other, "unused"), (list(info.get("missing_keys") or []), "missing"), (mismatched, "mis-shaped")]
    for keys, kind in problems:
        if keys:
            raise LowbitError(f"{folder} does not match its config.json: {len(keys)} {kind} tensor(s) when "
                              f"transformers loads it ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''}"
                              f"); restore the folder or its config.json")
    if kv:
        import compressed_tensors
        import transformers

        print(f"warning: the installed transformers {transformers.__version__} + compressed-tensors "
              f"{compressed_tensors.__version__} do not apply the KV-cache scales of {folder} ({len(kv)} tensors "
              f"unused), so this result is measured without KV-cache quantization", file=sys.stderr, flush=True)


def refuse_encoder_decoder(config, folder) -> None:
    """Refuse an encoder-decoder config (T5, BART, Whisper, ...): not a causal language model. Read before a
    model is built (transformers' *ForCausalLM of such a config turns the config's flags to a decoder's)."""
    if getattr(config, "is_encoder_decoder", False):
        raise LowbitError(f"{folder} holds {getattr(config, 'model_type', '?')!r}, an encoder-decoder model, not a "
                          f"causal language model; lowbit quantizes decoder-only causal LMs (Llama, Qwen, Mistral, "
                          f"...)")


def refuse_bidirectional(model: nn.Module, config, folder) -> None:
    """Refuse a model whose attention sees the whole sequence. transformers marks its attention layers (or the
    layers holding them) with `is_causal` / `is_decoder`; a BERT / RoBERTa / ELECTRA config, built as a causal LM,
    has every such flag False (is_decoder unset), while a decoder has at least one True (a multimodal model's
    vision encoder may add False ones). A model without such flags (Mamba, RWKV, ...) passes."""
    flags = {getattr(m, attr) for m in model.modules() for attr in ("is_causal", "is_decoder")
             if isinstance(getattr(m, attr, None), bool)}
    if flags == {False}:
        raise LowbitError(f"{folder} holds {getattr(config, 'model_type', '?')!r}, whose attention is bidirectional "
                          f"(an encoder such as BERT), not a causal language model; lowbit quantizes decoder-only "
                          f"causal LMs (Llama, Qwen, Mistral, ...)")


def build_skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The transformers causal-LM module for folder's config.json, parameters on the meta device. Configs that
    need the folder's own code, encoder-decoder and bidirectional (encoder) models are refused."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = load_config(folder)
    refuse_encoder_decoder(config, folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except ValueError as exc:
        if is_custom_code(exc):
            raise custom_code_error(folder, "model") from None
        raise LowbitError(f"unsupported architecture {getattr(config, 'model_type', '?')!r} in {folder}: "
                          f"transformers has no causal LM for it ({str(exc).splitlines()[0]})") from None
    refuse_bidirectional(model, config, folder)
    unfuse_experts(model)  # MoE: one nn.Linear per expert projection (arch.moe)
    return model.eval()  # no dropout in calibration forwards


def parse_dtype(name) -> torch.dtype | None:
    """A torch dtype from a name (float32, bfloat16, float16; "auto" or None: the stored dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return None
    if name not in ("float32", "bfloat16", "float16"):
        raise LowbitError(f"unknown dtype {name!r}; use float32, bfloat16, float16 or auto")
    return getattr(torch, name)


def load_model(path, dtype: torch.dtype | str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for any torch source: a float HF folder, a GGUF file, `demo`, a lowbit output (its
    packed linears dequantized, rounded to the source dtype, into ordinary nn.Linear weights) or another
    tool's compressed-tensors folder (loaded by transformers). dtype None or "auto" keeps the stored dtype."""
    if foreign_quantization(path):
        return load_with_transformers(path, parse_dtype(dtype))
    loaded = open_model(path, parse_dtype(dtype))
    return loaded.load_all(), loaded.tokenizer()

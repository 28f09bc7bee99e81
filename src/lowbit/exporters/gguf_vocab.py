"""The tokenizer of a Hugging Face folder as llama.cpp's GGUF metadata (tokenizer.ggml.*, FORMATS.md 4.2).

Two kinds are written. Byte-level BPE (tokenizer.ggml.model "gpt2"): tokens, merges and a pre-tokenizer id
llama.cpp knows, chosen from the pre-tokenizer's structure, all read from the tokenizer transformers loads,
which is what lowbit tokenizes with and can differ from tokenizer.json (transformers 5 rebuilds some, e.g.
Qwen2's, for the model type). SentencePiece from tokenizer.model (model "llama"): pieces, scores and types.
The special token ids and whether BOS / EOS are added are asked of that tokenizer too; the chat template comes
through gguf-py's SpecialVocab. Embedding rows past the tokenizer's last id get unused "[PADi]" tokens, since
llama.cpp needs one token per row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from ..errors import LowbitError
from ..model_files import load_tokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = (int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNKNOWN),
                                                  int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED),
                                                  int(gguf.TokenType.UNUSED))

# Split regexes of published byte-level BPE tokenizers, by the llama.cpp pre-tokenizer id that reproduces them
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    ("bytelevel-regex",): "gpt-2",  # GPT-2's regex inside ByteLevel
    ("digits", "bytelevel-regex"): "smollm",  # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    (("split", LLAMA3_SPLIT), "bytelevel"): "llama-bpe",
    (("split", QWEN2_SPLIT), "bytelevel"): "qwen2",
}


@dataclass
class GGUFVocab:
    """Everything written under tokenizer.*; `warnings` says what may behave differently in llama.cpp."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    special: gguf.SpecialVocab
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None = None
    warnings: list[str] = field(default_factory=list)

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_special_token = {}  # add_bos / add_eos are written below, as the tokenizer behaves
        self.special.add_to_gguf(writer, quiet=True)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)


def read_vocab(folder: Path, n_vocab: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of a folder whose embedding has n_vocab rows; refuses what it cannot write."""
    folder = Path(folder)
    tok = _hf_tokenizer(folder)
    backend = getattr(tok, "backend_tokenizer", None)
    # transformers may rebuild a tokenizer for the model type (e.g. Qwen2's split regex over a plain ByteLevel
    # tokenizer.json): what it loads is what lowbit tokenizes with, so that is what llama.cpp must reproduce
    tokenizer_json = json.loads(backend.to_str()) if backend is not None else _read_json(folder / "tokenizer.json")
    if tokenizer_json is not None and _byte_level(tokenizer_json):
        vocab = _byte_level_bpe(folder, tokenizer_json, n_vocab)
    elif (folder / "tokenizer.model").is_file():
        vocab = _sentencepiece(folder, tokenizer_json, n_vocab)
    elif tokenizer_json is not None:
        raise LowbitError(f"{folder}/tokenizer.json is neither byte-level BPE nor backed by a tokenizer.model, the "
                          f"two tokenizers this GGUF export writes; copy the model's tokenizer.model into the folder "
                          f"or export to compressed-tensors")
    else:
        raise LowbitError(f"{folder} has no tokenizer.json or tokenizer.model, and llama.cpp needs the tokenizer in "
                          f"the GGUF file; copy the source model's tokenizer files into the folder")
    if tok is not None:
        _from_transformers(tok, vocab)
    return vocab


def pre_tokenizer_id(tokenizer_json: dict) -> str | None:
    """llama.cpp's pre-tokenizer id for a byte-level BPE tokenizer.json, or None when none matches."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    signature = []
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            signature.append("bytelevel-regex" if part.get("use_regex", True) else "bytelevel")
        elif kind == "Digits":
            signature.append("digits" if part.get("individual_digits") else "digit-runs")
        elif kind == "Split":
            pattern = part.get("pattern", {})
            signature.append(("split", pattern.get("Regex", pattern.get("String"))))
        else:
            signature.append(kind)
    return PRE_TOKENIZERS.get(tuple(signature))


# -- the two kinds --------------------------------------------------------------------------------------

def _byte_level_bpe(folder: Path, tokenizer_json: dict, n_vocab: int) -> GGUFVocab:
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"{folder}/tokenizer.json is a byte-level {model.get('type')} tokenizer; this GGUF export "
                          f"writes byte-level BPE or SentencePiece only, so export to compressed-tensors")
    by_id = {int(i): t for t, i in model.get("vocab", {}).items()}
    types: dict[int, int] = {}
    warnings = _add_added_tokens(tokenizer_json, by_id, types, n_vocab, keep_below=0)
    tokens, token_types = _fill(folder, by_id, types, n_vocab)
    special = _special_vocab(folder, n_vocab, merges=False)
    special.merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not special.merges:
        raise LowbitError(f"{folder}/tokenizer.json has no BPE merges, which llama.cpp needs; restore the file")
    pre = pre_tokenizer_id(tokenizer_json)
    if pre is None:
        pre = "default"
        warnings.append(f"the tokenizer's pre-tokenizer ({json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}) "
                        f"matches none llama.cpp knows; wrote 'default', so llama.cpp may split text differently "
                        f"than transformers (token ids fed directly are unaffected)")
    return GGUFVocab("gpt2", pre, tokens, token_types, None, special, False, False, None, warnings)


def _sentencepiece(folder: Path, tokenizer_json: dict | None, n_vocab: int) -> GGUFVocab:
    from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

    path = folder / "tokenizer.model"
    try:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(path.read_bytes())
        sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
    except Exception as exc:  # protobuf's DecodeError or sentencepiece's RuntimeError
        raise LowbitError(f"cannot read {path} as a SentencePiece model ({exc}); restore the file") from None
    by_id, types, scores = {}, {}, {}
    for i in range(sp.vocab_size()):
        by_id[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else UNUSED if sp.is_unused(i)
                    else int(gguf.TokenType.BYTE) if sp.is_byte(i) else NORMAL)
    warnings = _add_added_tokens(tokenizer_json or {}, by_id, types, n_vocab, keep_below=sp.vocab_size())
    tokens, token_types = _fill(folder, by_id, types, n_vocab)
    score_list = [float(scores.get(i, -1000.0)) for i in range(len(tokens))]
    return GGUFVocab("llama", None, tokens, token_types, score_list, _special_vocab(folder, n_vocab, merges=False),
                     True, False, bool(proto.normalizer_spec.add_dummy_prefix), warnings)


# -- helpers --------------------------------------------------------------------------------------------

def _add_added_tokens(tokenizer_json: dict, by_id: dict[int, str], types: dict[int, int], n_vocab: int,
                      keep_below: int) -> list[str]:
    """The tokenizer's added tokens (control when special, else user-defined), except ids below keep_below,
    whose type the base vocabulary already knows; those past the embedding are left out with a warning."""
    dropped = []
    for added in tokenizer_json.get("added_tokens", []):
        i = int(added["id"])
        if i >= n_vocab:
            dropped.append(f"{added['content']!r} ({i})")
        elif i >= keep_below:
            by_id[i] = added["content"]
            types[i] = CONTROL if added.get("special") else USER_DEFINED
    if not dropped:
        return []
    return [f"the tokenizer's added token{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} ha"
            f"{'ve' if len(dropped) > 1 else 's'} no embedding row (the model has {n_vocab}); left out of the GGUF"]


def _fill(folder: Path, by_id: dict[int, str], types: dict[int, int], n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and types in id order for all n_vocab embedding rows ([PADi], unused, where the tokenizer has none)."""
    top = max(by_id, default=-1)
    if top >= n_vocab:
        raise LowbitError(f"the tokenizer in {folder} has token id {top}, but the embedding has only {n_vocab} rows; "
                          f"use the tokenizer the model was trained with")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    token_types = [types.get(i, NORMAL) if i in by_id else UNUSED for i in range(n_vocab)]
    return tokens, token_types


def _special_vocab(folder: Path, n_vocab: int, merges: bool) -> gguf.SpecialVocab:
    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # it logs each choice at info/warning level
    return gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)


def _hf_tokenizer(folder: Path):
    """transformers' tokenizer of the folder (the one lowbit evaluates with), or None when it cannot load."""
    try:
        return load_tokenizer(folder)
    except Exception:  # the vocabulary is then read from the files alone
        return None


def _from_transformers(tok, vocab: GGUFVocab) -> None:
    """Special token ids and whether BOS / EOS are added, as the tokenizer has them; they override SpecialVocab's
    reading of the files (without a loadable tokenizer, those and llama.cpp's defaults stand)."""
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    added = len(full) > len(plain)
    vocab.add_bos = bool(added and tok.bos_token_id is not None and full[0] == tok.bos_token_id)
    vocab.add_eos = bool(added and tok.eos_token_id is not None and full[-1] == tok.eos_token_id)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(vocab.tokens):
            vocab.special.special_token_ids[kind] = token_id


def _byte_level(tokenizer_json: dict) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc}); restore the file") from None

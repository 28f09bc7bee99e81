"""Calibration and evaluation text, turned into deterministic token windows.

A source is one of:
- a local file: .txt (the whole file), .jsonl / .json (the "text" field, else the first string field of each
  record), .parquet (the "text" column, else the first string column);
- a Hugging Face dataset by short name (wikitext2, pileval, c4, cnn_dailymail), when the hub is reachable;
- "pydoc": CPython's own language reference (pydoc_data.topics), on every machine. Its topics are split
  deterministically: every fifth topic (sorted by name) is evaluation text, the rest calibration text.
Local files are used whole for both purposes; dataset names use their train split for calibration and
their test/validation split for evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import LowbitError, warn

BUILTIN = "pydoc"
HF_DATASETS = {
    # name: (path, config, {purpose: split}, text field, extra load kwargs per purpose)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", {"calib": "train", "eval": "test"}, "text", {}),
    "pileval": ("mit-han-lab/pile-val-backup", None, {"calib": "validation", "eval": "validation"}, "text", {}),
    "c4": ("allenai/c4", None, {"calib": "train", "eval": "validation"}, "text",
           {"calib": {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
            "eval": {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}}),
    "cnn_dailymail": ("abisee/cnn_dailymail", "3.0.0", {"calib": "train", "eval": "test"}, "article", {}),
}
# the peers' names for the same texts (Quark's llm_ptq example: pileval_for_awq_benchmark, ...)
ALIASES = {"pileval_for_awq_benchmark": "pileval", "wikitext_for_gptq_benchmark": "wikitext2",
           "wikitext": "wikitext2", "wikitext-2-raw-v1": "wikitext2", "pile-val": "pileval"}
_MAX_DATASET_CHARS = 4_000_000  # enough text for any calibration/evaluation run; avoids joining all of C4


def check_count(flag: str, value, least: int = 1, most: int | None = None) -> None:
    """Refuse a count (windows, tokens, a batch, a seed) that is not a whole number in [least, most]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least or (most is not None and value > most):
        span = f"of at least {least}" + (f" and at most {most}" if most is not None else "")
        raise LowbitError(f"{flag} must be a whole number {span}, got {value!r}")


def source_names() -> str:
    return f"a .txt/.jsonl/.parquet path, {BUILTIN}, " + ", ".join(HF_DATASETS)


def load_text(source: str, purpose: str = "eval") -> str:
    """The text of a source for a purpose ("calib" or "eval")."""
    if purpose not in ("calib", "eval"):
        raise ValueError(f"purpose must be calib or eval, got {purpose!r}")
    if source == BUILTIN:
        return _pydoc_text(purpose)
    if source in ALIASES and not Path(source).exists():
        source = ALIASES[source]
    if source in HF_DATASETS:
        return _hf_text(source, purpose)
    path = Path(source)
    if not path.exists():
        raise LowbitError(f"dataset {source!r} is neither a file nor a known name; use {source_names()}")
    text = _file_text(path)
    if not text.strip():
        raise LowbitError(f"dataset file {path} holds no text; give a file with some text in it")
    return text


def _pydoc_text(purpose: str) -> str:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 5 == 0) == (purpose == "eval")]
    return "\n\n".join(topics[k].strip() for k in chosen)


def _first_string_field(record: dict, path: Path) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    for value in record.values():
        if isinstance(value, str):
            return value
    raise LowbitError(f"{path}: a record has no string field; give each record a \"text\" field")


def _file_text(path: Path) -> str:
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            lines = _read_utf8(path).splitlines()
            if suffix == ".json" and lines and lines[0].lstrip().startswith("["):
                records = json.loads("\n".join(lines))
            else:
                records = [json.loads(line) for line in lines if line.strip()]
            return "\n\n".join(_first_string_field(r, path) for r in records)
        if suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(path)
            except pyarrow.ArrowException as exc:
                raise LowbitError(f"cannot read {path} as a parquet file ({str(exc).splitlines()[0]})") from None
            names = table.column_names
            column = "text" if "text" in names else next(
                (n for n in names if str(table.schema.field(n).type) in ("string", "large_string")), None)
            if column is None:
                raise LowbitError(f"{path}: no string column; give the parquet file a \"text\" column")
            return "\n\n".join(t for t in table.column(column).to_pylist() if t)
        return _read_utf8(path)
    except (json.JSONDecodeError, OSError) as exc:
        raise LowbitError(f"cannot read dataset file {path}: {exc}") from None
    except ImportError:
        raise LowbitError("reading parquet files needs pyarrow: pip install pyarrow") from None


def _read_utf8(path: Path) -> str:
    """A text file's contents; bytes that are not UTF-8 become U+FFFD, with a warning saying how many and where."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
        warn(f"{path} is not valid UTF-8 ({bad} undecodable byte sequence(s), the first at byte {exc.start}); they "
             f"are read as U+FFFD, which tokenizes unlike the intended text: convert the file to UTF-8 (e.g. iconv "
             f"-f latin1 -t utf-8)")
        return text


def _hf_text(name: str, purpose: str) -> str:
    path, config, splits, field_name, extra = HF_DATASETS[name]
    try:
        import datasets

        logging.getLogger("datasets").setLevel(logging.ERROR)
        split = splits[purpose]
        ds = datasets.load_dataset(path, config, split=split, **extra.get(purpose, {}))
    except ImportError:
        raise LowbitError(f"dataset {name!r} needs the datasets package: pip install datasets") from None
    except Exception as exc:  # the hub is unreachable, or the dataset moved
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LowbitError(f"cannot load dataset {name!r} from the Hugging Face hub ({first}); "
                          f"when offline use a local text file or --dataset {BUILTIN}") from None
    texts, total = [], 0
    for text in ds[field_name]:
        texts.append(text)
        total += len(text)
        if total > _MAX_DATASET_CHARS:
            break
    return "\n\n".join(texts) if name == "wikitext2" else "\n\n".join(t for t in texts if t.strip())


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, tokenized once (1-D)."""
    old = getattr(tokenizer, "model_max_length", None)
    tokenizer.model_max_length = 1 << 62  # silence "sequence longer than the model" warnings: we cut windows
    try:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    finally:
        if old is not None:
            tokenizer.model_max_length = old
    return ids


def eval_windows(ids: torch.Tensor, seq_len: int, max_chunks: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of seq_len tokens from the start of the text (at most max_chunks)."""
    check_count("--seq-len", seq_len, 2)
    if max_chunks is not None:
        check_count("--max-chunks", max_chunks)
    n = ids.numel() // seq_len
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise LowbitError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                          f"use a longer text or a smaller --seq-len")
    return ids[: n * seq_len].reshape(n, seq_len)


def calib_windows(ids: torch.Tensor, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """num_samples windows of seq_len tokens at random offsets drawn with the seed (deterministic)."""
    check_count("--num-calib-data", num_samples)
    check_count("--seq-len", seq_len, 2)
    if ids.numel() < seq_len:
        raise LowbitError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}; "
                          f"use a longer text or a smaller --seq-len")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=gen)
    return torch.stack([ids[s: s + seq_len] for s in starts.tolist()])

"""Local lm-eval task files: a LAMBADA-style last-word task built from any text, for offline use and tests.

LAMBADA scores whether a model predicts a passage's final word from the passage before it. `write_last_word_task`
cuts passages of whole sentences from a text, keeps those ending in a plain word, and writes them as a JSON-lines
dataset with a task YAML that reads it through the `json` dataset builder, so lm-eval needs no hub.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import LowbitError

_SENTENCE_END = re.compile(r"(?<=[a-z][.!?])\s+(?=[A-Z])")
_PLAIN_WORD = re.compile(r"^[A-Za-z]{3,}$")

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def last_word_passages(text: str, min_words: int = 40, max_words: int = 120, limit: int | None = None) -> list[str]:
    """Passages of consecutive prose sentences (min_words..max_words words) that end in a plain word, the final
    full stop dropped, as LAMBADA's texts are."""
    passages: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        sentences = _SENTENCE_END.split(" ".join(paragraph.split()))
        words: list[str] = []
        for sentence in sentences:
            words += sentence.split(" ")
            if len(words) > max_words:
                words = []
                continue
            if len(words) >= min_words and words[-1].endswith(".") and _PLAIN_WORD.match(words[-1][:-1]):
                passages.append(" ".join(words)[:-1])
                words = []
                if limit is not None and len(passages) >= limit:
                    return passages
    return passages


def write_last_word_task(text: str, folder, name: str = "lambada_local", limit: int | None = 500,
                         min_words: int = 30, overwrite: bool = False) -> Path:
    """Write FOLDER/NAME.jsonl and FOLDER/NAME.yaml (an lm-eval task over it); returns the YAML path."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise LowbitError(f"task name {name!r} must be letters, digits and underscores")
    folder = Path(folder)
    data, yaml = folder / f"{name}.jsonl", folder / f"{name}.yaml"
    for path in (data, yaml):
        if path.exists() and not overwrite:
            raise LowbitError(f"{path} exists; remove it or choose another task name")
    passages = last_word_passages(text, min_words=min_words, limit=limit)
    if not passages:
        raise LowbitError(f"the text has no passage of {min_words}+ words ending in a plain word; give longer prose")
    folder.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    yaml.write_text(TASK_YAML.format(name=name, data=json.dumps(str(data.resolve()))))
    return yaml

"""lowbit-side helpers for compare_peers.py, run as their own processes under lowbit's venv so that the
orchestrator itself never imports torch (a forked child's peak RSS would count the parent's pages).

    python lowbit_tasks.py data FOLDER OUT.pt NUM_CALIB SEQ_LEN [MAX_CHUNKS]
        calibration and evaluation windows built with lowbit's own functions, saved for every runner
        and the LAMBADA-style last-word passages of the pydoc evaluation text (common.last_word_items)
    python lowbit_tasks.py eval MODEL DATA.pt SEQ_LEN [MAX_CHUNKS]
        lowbit.api.evaluate on the pydoc text, plus common.last_word_accuracy of the model as lowbit loads it;
        prints the JSON (one line)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import last_word_accuracy, last_word_items  # noqa: E402  (the peers' own protocol, shared)


def build_data(folder: str, out: str, num_calib: int, seq_len: int, max_chunks: int | None) -> None:
    import torch
    from transformers import AutoTokenizer

    from lowbit.data import calib_windows, eval_windows, load_text, tokenize

    tok = AutoTokenizer.from_pretrained(folder)
    calib = calib_windows(tokenize(tok, load_text("pydoc", "calib")), num_calib, seq_len, 0)
    text = load_text("pydoc", "eval")
    ev = eval_windows(tokenize(tok, text), seq_len, max_chunks)
    items = last_word_items(tok, text)
    torch.save({"calib": calib, "eval": ev, "last_word": items}, out)
    print(json.dumps({"calib": list(calib.shape), "eval": list(ev.shape), "last_word": len(items)}))


def evaluate(model: str, data: str, seq_len: int, max_chunks: int | None) -> None:
    import torch

    from lowbit.api import evaluate as lowbit_evaluate
    from lowbit.hf.model import load_model

    res = lowbit_evaluate(model, dataset="pydoc", seq_len=seq_len, max_chunks=max_chunks, progress=False)
    torch_model, _ = load_model(model, torch.float32)
    res["last_word_accuracy"] = last_word_accuracy(torch_model.eval(), torch.load(data)["last_word"])
    print(json.dumps(res))


def main() -> None:
    cmd, *rest = sys.argv[1:]
    if cmd == "data":
        folder, out, n, seq, *mc = rest
        build_data(folder, out, int(n), int(seq), int(mc[0]) if mc else None)
    elif cmd == "eval":
        model, data, seq, *mc = rest
        evaluate(model, data, int(seq), int(mc[0]) if mc else None)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()

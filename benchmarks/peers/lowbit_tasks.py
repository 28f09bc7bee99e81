"""lowbit-side helpers for compare_peers.py, run as their own processes under lowbit's venv so that the
orchestrator itself never imports torch (a forked child's peak RSS would count the parent's pages).

    python lowbit_tasks.py data FOLDER OUT.pt NUM_CALIB SEQ_LEN [MAX_CHUNKS]
        calibration and evaluation windows built with lowbit's own functions, saved for every runner
    python lowbit_tasks.py eval MODEL SEQ_LEN [MAX_CHUNKS]
        lowbit.api.evaluate on the pydoc text; prints its JSON (one line)
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_data(folder: str, out: str, num_calib: int, seq_len: int, max_chunks: int | None) -> None:
    import torch
    from transformers import AutoTokenizer

    from lowbit.data import calib_windows, eval_windows, load_text, tokenize

    tok = AutoTokenizer.from_pretrained(folder)
    calib = calib_windows(tokenize(tok, load_text("pydoc", "calib")), num_calib, seq_len, 0)
    ev = eval_windows(tokenize(tok, load_text("pydoc", "eval")), seq_len, max_chunks)
    torch.save({"calib": calib, "eval": ev}, out)
    print(json.dumps({"calib": list(calib.shape), "eval": list(ev.shape)}))


def evaluate(model: str, seq_len: int, max_chunks: int | None) -> None:
    from lowbit.api import evaluate as lowbit_evaluate

    res = lowbit_evaluate(model, dataset="pydoc", seq_len=seq_len, max_chunks=max_chunks, progress=False)
    print(json.dumps(res))


def main() -> None:
    cmd, *rest = sys.argv[1:]
    if cmd == "data":
        folder, out, n, seq, *mc = rest
        build_data(folder, out, int(n), int(seq), int(mc[0]) if mc else None)
    elif cmd == "eval":
        model, seq, *mc = rest
        evaluate(model, int(seq), int(mc[0]) if mc else None)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()

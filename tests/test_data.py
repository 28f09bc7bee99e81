"""Text sources and deterministic token windows."""

import json

import pytest
import torch

from lowbit.data import calib_windows, eval_windows, load_text
from lowbit.errors import LowbitError


def test_builtin_source_splits_calibration_from_evaluation():
    calib, ev = load_text("pydoc", "calib"), load_text("pydoc", "eval")
    assert len(ev) > 50_000 and len(calib) > 3 * len(ev)
    assert ev[:2000] not in calib


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text here")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"id": i, "text": f"line {i}"}) for i in range(3)))
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "only a body"}))
    assert load_text(str(tmp_path / "a.txt")) == "plain text here"
    assert load_text(str(tmp_path / "a.jsonl")) == "line 0\n\nline 1\n\nline 2"
    assert load_text(str(tmp_path / "b.jsonl")) == "only a body"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"n": [1, 2], "text": ["first", "second"]}), tmp_path / "t.parquet")
    assert load_text(str(tmp_path / "t.parquet")) == "first\n\nsecond"


def test_bad_sources(tmp_path):
    with pytest.raises(LowbitError, match="neither a file nor a known name"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LowbitError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text("{not json")
    with pytest.raises(LowbitError, match="cannot read"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_hub_dataset_offline_gives_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    with pytest.raises(LowbitError) as err:
        load_text("wikitext2", "eval")
    assert "offline" in str(err.value) and "\n" not in str(err.value)


def test_eval_windows_are_non_overlapping_prefix():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128, None)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert eval_windows(ids, 128, 3).shape == (3, 128)
    with pytest.raises(LowbitError, match="fewer than one window"):
        eval_windows(torch.arange(10), 128)


def test_calib_windows_deterministic_by_seed():
    ids = torch.arange(5000)
    a, b = calib_windows(ids, 8, 64, seed=1), calib_windows(ids, 8, 64, seed=1)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert not torch.equal(a, calib_windows(ids, 8, 64, seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the text
    with pytest.raises(LowbitError, match="calibration text"):
        calib_windows(torch.arange(10), 4, 64)

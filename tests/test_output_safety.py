"""Nothing of the user's is lost: outputs that would replace, enter or contain the source, the current folder,
a folder lowbit did not write, a second run writing the same output, a run stopped by SIGKILL or SIGTERM, a full
disk; and the atomic replacement of an existing output."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit import staging
from .refusals import assert_refused, run_cli, tree_digest

RTN = ["--scheme", "w_uint4_per_group_asym", "--group-size", "16", "--no-progress"]
# a run slow enough (~3 s of quantizing on the tiny model) to be stopped while it writes
SLOW = ["--scheme", "w_uint4_per_group_asym", "--group-size", "16", "--no-progress", "--algo", "awq",
        "--num-calib-data", "256", "--seq-len", "256"]


def beside(folder: Path) -> list[str]:
    """What lowbit leaves beside outputs in a folder: staging folders, replaced outputs, locks."""
    return sorted(p.name for p in folder.iterdir() if any(k in p.name for k in (".lowbit-tmp-", ".lowbit-old-",
                                                                                ".lowbit-lock")))


@pytest.fixture
def src(tiny_models, tmp_path):
    """A copy of the tiny Llama in its own folder (tests may try to overwrite it)."""
    import shutil

    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "models" / "llama"))


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_is_not_the_source(src, where, overwrite, capsys):
    out = {"same": src, "inside": src / "q", "containing": src.parent}[where]
    verb = {"same": "is", "inside": "lies inside", "containing": "contains"}[where]
    assert_refused(["quantize", src, "-o", out, *RTN, *(["--overwrite"] if overwrite else [])], capsys,
                   f"output .* {verb} the source model", unchanged=[src.parent], absent=[src / "q"])


def test_export_output_is_not_its_source(src, tmp_path, capsys):
    lowbit_folder = tmp_path / "w4"
    assert run_cli(["quantize", src, "-o", lowbit_folder, *RTN], capsys)[0] == 0
    for fmt, out in (("compressed-tensors", lowbit_folder), ("awq", lowbit_folder / "awq"), ("gguf", lowbit_folder / "x.gguf")):
        assert_refused(["export", lowbit_folder, "-f", fmt, "-o", out, "--overwrite"], capsys, "the source model",
                       unchanged=[lowbit_folder])


def test_gguf_source_file_is_protected(tiny_models, tmp_path, capsys):
    """A .gguf source is a file: an output folder may sit beside it but never replace it or contain it."""
    gguf_file = tmp_path / "m" / "model.gguf"
    gguf_file.parent.mkdir()
    gguf_file.write_bytes(b"GGUF")  # never read: the output is refused first
    for out in (gguf_file, gguf_file.parent):
        assert_refused(["quantize", gguf_file, "-o", out, *RTN, "--overwrite"], capsys, "the source model",
                       unchanged=[gguf_file.parent])


def test_current_folder_and_its_parents_refused(src, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", "..", str(tmp_path / "work"), "./"):
        assert_refused(["quantize", src, "-o", out, *RTN, "--overwrite"], capsys,
                       "names no new folder|is the current folder or contains it", unchanged=[tmp_path / "work"])


def test_overwrite_refuses_a_folder_lowbit_did_not_write(src, tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "a.jpg").write_bytes(b"\xff\xd8")
    (out / "config.json").write_text("{}")
    assert_refused(["quantize", src, "-o", out, *RTN, "--overwrite"], capsys, "the subfolder photos",
                   unchanged=[out])


def test_refused_run_creates_no_folders(src, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out"
    assert_refused(["quantize", src, "-o", out, "--scheme", "w_uint4_per_group_asym", "--group-size", "4096"],
                   capsys, "group size 4096 is larger", absent=[tmp_path / "new"])
    assert_refused(["quantize", src, "-o", out, *RTN, "--override", "re:(:bits=8"], capsys,
                   "not a valid regular expression", absent=[tmp_path / "new"])
    assert run_cli(["quantize", src, "-o", out, *RTN], capsys)[0] == 0  # a run that passes creates them
    assert (out / "config.json").is_file() and beside(out.parent) == []


def _hold(out: Path) -> subprocess.Popen:
    """Another process holding OUT as a run does (until killed); returns once it holds it."""
    code = ("import sys, time; from lowbit.staging import claim\n"
            "with claim(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_the_same_output_is_refused_at_start(src, tmp_path, capsys):
    out = tmp_path / "q"
    holder = _hold(out)
    try:
        assert_refused(["quantize", src, "-o", out, *RTN], capsys, "another lowbit run is writing", absent=[out])
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process (SIGKILL included): the next run takes it and leaves nothing beside OUT
    assert run_cli(["quantize", src, "-o", out, *RTN], capsys)[0] == 0
    assert beside(tmp_path) == []


def _start(src: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lowbit", "quantize", str(src), "-o", str(out), *SLOW],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _wait_for_staging(proc: subprocess.Popen, folder: Path) -> list[str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = [p.name for p in folder.iterdir() if ".lowbit-tmp-" in p.name]
        if found:
            return found
        time.sleep(0.005)
    raise AssertionError(f"no staging folder appeared (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")


def test_killed_run_leaves_staging_that_the_next_run_removes(src, tmp_path, capsys):
    out = tmp_path / "q"
    proc = _start(src, out)
    staging_names = _wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not out.exists() and staging_names[0] in os.listdir(tmp_path)
    code, _, err = run_cli(["quantize", src, "-o", out, *RTN], capsys)
    assert code == 0 and f"removed {staging_names[0]}" in err
    assert (out / "config.json").is_file() and beside(tmp_path) == []


def test_sigterm_is_one_line_and_removes_staging(src, tmp_path):
    out = tmp_path / "q"
    proc = _start(src, out)
    _wait_for_staging(proc, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert len(errors) == 1 and "stopped by SIGTERM" in errors[0]
    assert not out.exists() and beside(tmp_path) == []


def test_disk_full_is_one_line_and_removes_staging(src, tmp_path, capsys, monkeypatch):
    from lowbit import safetensors_io

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.spool_path))

    monkeypatch.setattr(safetensors_io.StreamingWriter, "add", full)
    out = tmp_path / "q"
    assert_refused(["quantize", src, "-o", out, *RTN], capsys, "no space left to write", unchanged=[src],
                   absent=[out])
    assert beside(tmp_path) == []


def test_disk_full_on_a_real_small_filesystem(src, tmp_path, capsys):
    """The same on a real 64 KiB filesystem (a tmpfs; root only, as mounting needs it) the ~0.2 MiB output
    cannot fit in."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        assert_refused(["quantize", src, "-o", mount / "q", *RTN], capsys, "no space left to write",
                       absent=[mount / "q"])
        assert os.listdir(mount) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_overwrite_swaps_atomically_and_recovers_after_a_crash(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    assert run_cli(["quantize", src, "-o", out, *RTN], capsys)[0] == 0
    before = tree_digest(out)
    # the swap itself: both paths exist throughout, and after it each holds the other's contents
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    if not staging.exchange(a, b):
        pytest.skip("this filesystem cannot swap two paths atomically")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    # where no swap exists, a crash between the two renames leaves the old output aside: the next run puts it back
    monkeypatch.setattr(staging, "exchange", lambda x, y: False)
    real_rename = os.rename

    def crash_after_first(src_path, dst_path):
        real_rename(src_path, dst_path)
        if ".lowbit-old-" in str(dst_path):
            raise KeyboardInterrupt  # stopped between `OUT -> old` and `staging -> OUT`

    monkeypatch.setattr(os, "rename", crash_after_first)
    code, _, err = run_cli(["quantize", src, "-o", out, *RTN, "--group-size", "32", "--overwrite"], capsys)
    assert code == 130 and not out.exists()
    monkeypatch.setattr(os, "rename", real_rename)
    code, _, err = run_cli(["quantize", src, "-o", out, *RTN], capsys)
    assert code == 2 and "restored" in err and "already exists" in err  # the old output is back, untouched
    assert tree_digest(out) == before and beside(tmp_path) == []


def test_summary_and_json_are_strict_json(src, tmp_path, capsys):
    import json

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))

    out = tmp_path / "q"
    code, stdout, _ = run_cli(["quantize", src, "-o", out, *RTN, "--json"], capsys)
    assert code == 0 and strict(stdout)["output"] == str(out)
    strict((out / "summary.json").read_text())
    from lowbit.results import to_json

    assert strict(to_json({"perplexity": float("inf"), "nll": [float("nan"), 1.5]})) == {"perplexity": None,
                                                                                         "nll": [None, 1.5]}


def test_sigterm_handler_leaves_forked_workers_killable():
    """lowbit turns SIGTERM into a clean stop in its own process only: forked multiprocessing workers (lm-eval's
    bootstrap pool) must still die on the SIGTERM their pool sends. With the handler inherited, this loop hung
    within 300 pools (test_compare hung in lm-eval the same way)."""
    code = ("import multiprocessing, signal\nfrom lowbit.cli import STOP_SIGNALS, _stop\n"
            "for sig in STOP_SIGNALS:\n    signal.signal(sig, _stop)\n"
            "for _ in range(300):\n"
            "    with multiprocessing.get_context('fork').Pool(2) as pool:\n"
            "        assert list(pool.imap(abs, [-1, -2, -3, -4])) == [1, 2, 3, 4]\n"
            "print('done')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "done" and "Traceback" not in proc.stderr, proc.stderr

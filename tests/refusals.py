"""Helpers for bad-input tests: run the `lowbit` command in-process and check that it refused with one
`error:` line and exit code 2, printed no traceback, changed none of the given files and created none of the
given paths."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from lowbit.cli import main


def tree_digest(*paths) -> dict[str, str | None]:
    """{path: sha256 of its bytes} for every file under each path (a file or a folder, symlinks not followed
    into folders); a missing path maps to None, so its later creation shows up as a change."""
    out: dict[str, str | None] = {}
    for root in map(Path, paths):
        if not root.exists() and not root.is_symlink():
            out[str(root)] = None
            continue
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `lowbit ARGV` run in this process."""
    capsys.readouterr()  # drop what earlier steps printed
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own exits
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(argv: list[str], capsys, match: str, unchanged=(), absent=()) -> str:
    """Run `lowbit ARGV` and check the refusal: exit code 2, exactly one line starting with `error:` (the last
    line of stderr) that matches the regular expression `match`, no traceback, every file under `unchanged` byte
    for byte as before, and no path in `absent` created. Returns the error line."""
    before = tree_digest(*unchanged)
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert "Traceback" not in err + out, err
    assert code == 2, (code, err)
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert re.search(match, errors[0]), errors[0]
    assert tree_digest(*unchanged) == before, "a file changed"
    for path in absent:
        assert not Path(path).exists(), f"{path} was created"
    return errors[0]

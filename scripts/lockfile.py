"""The lock file (constraints.txt) against the packages installed in the running Python environment.

    python scripts/lockfile.py diff constraints.txt    # one "drift: NAME LOCKED→INSTALLED" line per difference
    python scripts/lockfile.py write constraints.txt   # the installed versions as the new lock (scripts/lock.sh)

Names are compared the way pip compares them (PEP 503); a local version label (torch's "+cpu") is dropped, so
the lock's "torch==2.13.0" admits the CPU build and the default one alike. lowbit itself, setuptools and wheel
are left out of the lock; pip is in it.
"""

from __future__ import annotations

import datetime
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

LEFT_OUT = {"lowbit", "setuptools", "wheel"}

HEADER = """\
# constraints.txt: the exact version of every package (dependencies of dependencies included) that lowbit's
# whole suite (python -m pytest, llama-cpp-python and the demo model included) passed on:
#   tested on {platform}, CPython {python}, {date}, torch 2.13.0 (CPU build)
# Used as a pip constraints file by scripts/setup.sh (the README's Quickstart and .ci/run):
#   pip install -c constraints.txt -e ".[test,data]"
# so a fresh machine gets what CI tested. Other platforms or Pythons may lack a wheel for some pin: install
# without -c there (pyproject.toml's bounds) and see scripts/test.sh --latest.
# Regenerate with scripts/lock.sh: a fresh venv with the newest releases (torch still 2.13.0), the whole suite,
# and this file rewritten only if the suite passes. scripts/test.sh --latest shows the drift without writing.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, tuple[str, str]]:
    """canonical name -> (name as published, version without a local label), for this environment."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        found.setdefault(canonical(name), (name, dist.version.split("+")[0]))
    return {k: v for k, v in found.items() if k not in LEFT_OUT}


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"{path}: not a NAME==VERSION line: {line!r}")
        pins[canonical(name)] = (name.strip(), version.strip())
    return pins


def diff(path: Path) -> int:
    lock, now = read_lock(path), installed()
    changed = [f"{now[k][0]} {lock[k][1]}→{now[k][1]}" for k in sorted(lock.keys() & now.keys())
               if lock[k][1] != now[k][1]]
    added = [f"{now[k][0]} (not in the lock)→{now[k][1]}" for k in sorted(now.keys() - lock.keys())]
    # in the lock, not installed here: pip (never compared) and anything no longer pulled in, e.g.
    # llama-cpp-python where the llama extra was not installed
    gone = [f"{lock[k][0]} {lock[k][1]}→(not installed)" for k in sorted(lock.keys() - now.keys()) if k != "pip"]
    lines = changed + added + gone
    if not lines:
        print(f"drift: none: every installed package is at its {path.name} version")
    else:
        print(f"drift: {len(lines)} package(s) differ from {path.name} (name lock→newest):")
        for line in lines:
            print(f"drift:   {line}")
    return 0


def write(path: Path) -> int:
    now = installed()
    now.setdefault("pip", ("pip", metadata.version("pip").split("+")[0]))
    header = HEADER.format(platform=f"{platform.system()} {platform.machine()}", python=platform.python_version(),
                           date=datetime.date.today().isoformat())
    body = "".join(f"{name}=={version}\n" for name, version in sorted(now.values(), key=lambda nv: canonical(nv[0])))
    path.write_text(header + body)
    print(f"lock: wrote {path} ({len(now)} packages)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("diff", "write"):
        raise SystemExit(__doc__)
    sys.exit({"diff": diff, "write": write}[sys.argv[1]](Path(sys.argv[2])))

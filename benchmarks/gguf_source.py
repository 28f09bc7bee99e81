"""A GGUF source read tensor by tensor vs converted whole: the demo's cache folder size, and the wall time and peak
memory of a first `lowbit quantize demo --algo rtn` (the cache made inside it) and of a second one (cache ready),
each in a fresh child process with a fresh $LOWBIT_CACHE.

    python benchmarks/gguf_source.py [--src OTHER_CHECKOUT/src ...] [--json OUT]

Each --src is measured beside this checkout's (e.g. a worktree of the commit before issue #21:
git worktree add /tmp/before a4d1f9c; --src /tmp/before/src). Peak memory is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CMD = ["-m", "lowbit", "quantize", "demo", "-o", "{out}", "--scheme", "w_uint4_per_group_asym", "--algo", "rtn",
       "--overwrite", "--no-progress", "--json"]


def child(src: Path, cache: Path, out: Path) -> dict:
    """One quantize in a child process: wall seconds and its peak RSS (it is the only child running)."""
    env = {**os.environ, "PYTHONPATH": str(src), "LOWBIT_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = ("import resource, runpy, sys; sys.argv = ['lowbit'] + sys.argv[1:]\n"
              "try:\n    runpy.run_module('lowbit', run_name='__main__')\n"
              "finally:\n    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
    argv = [sys.executable, "-c", script] + [a.replace("{out}", str(out)) for a in CMD[2:]]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{src}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    peak = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("PEAK ")][-1] * 1024
    return {"seconds": round(seconds, 1), "peak_rss_bytes": peak}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(src: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "out"
        first = child(src, cache, out)
        second = child(src, cache, out)
        return {"src": str(src), "first_run": first, "cached_run": second, "cache_bytes": size(cache)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", type=Path, default=[], help="another checkout's src folder")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [measure(s) for s in [*args.src, ROOT / "src"]]
    print("| src | cache folder MB | first run s | first run peak MiB | cached run s | cached run peak MiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['src']} | {r['cache_bytes'] / 1e6:.1f} | {r['first_run']['seconds']} | "
              f"{r['first_run']['peak_rss_bytes'] / 2**20:.0f} | {r['cached_run']['seconds']} | "
              f"{r['cached_run']['peak_rss_bytes'] / 2**20:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Two versions of lowbit on the demo model, side by side in one run: the output files must be byte-identical,
and quantization time and peak memory equal within noise (a refactoring's proof of "no change of behaviour").

Each (version, algorithm) quantization runs as its own `lowbit quantize` process, alternating versions so
that machine load affects both alike; wall time and peak RSS come from os.wait4, quantize seconds from the
run's summary.json.

    git worktree add /tmp/lowbit-before <commit>
    python benchmarks/redesign_parity.py --before /tmp/lowbit-before/src [--after src] [--algos rtn,awq,gptq]
                                         [--num-calib-data 64] [--repeats 1] [--model demo]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def run_quantize(src: Path, model: str, out: Path, algo: str, calib: int) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of `lowbit quantize` run from the package folder `src`."""
    argv = [sys.executable, "-m", "lowbit", "quantize", model, "-o", str(out), "--scheme", "w_uint4_per_group_asym",
            "--algo", algo, "--num-calib-data", str(calib), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.execve(argv[0], argv, env)
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lowbit quantize from {src} failed ({' '.join(argv)})")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def tensor_files(folder: Path) -> dict[str, str]:
    """sha256 of each safetensors file and config.json (the written model)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name == "config.json"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="src folder of the earlier version")
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1] / "src")
    ap.add_argument("--algos", default="rtn,awq,gptq")
    ap.add_argument("--num-calib-data", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--model", default="demo")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos.split(","):
            for rep in range(args.repeats):
                outs = {}
                for version, src in (("before", args.before), ("after", args.after)):
                    out = Path(tmp) / f"{algo}-{version}-{rep}"
                    wall, peak = run_quantize(src, args.model, out, algo, args.num_calib_data)
                    summary = json.loads((out / "summary.json").read_text())
                    outs[version] = tensor_files(out)
                    rows.append((algo, version, wall, summary["seconds"]["quantize"], peak))
                    print(f"{algo} {version}: wall {wall:.1f} s, quantize {summary['seconds']['quantize']:.1f} s, "
                          f"peak {peak / 2**20:.0f} MiB", file=sys.stderr, flush=True)
                same = outs["before"] == outs["after"]
                rows.append((algo, "identical output files", same, None, None))
    print(f"model {args.model}, w_uint4_per_group_asym g128, {args.num_calib_data} calibration windows x 512, "
          f"{platform.machine()}, {os.cpu_count()} cores")
    print("| algo | version | command wall s | quantize s | peak RSS MiB |\n|---|---|---|---|---|")
    for algo, version, wall, quant, peak in rows:
        if quant is None:
            print(f"| {algo} | {version} | {'yes' if wall else 'NO'} | | |")
        else:
            print(f"| {algo} | {version} | {wall:.1f} | {quant:.1f} | {peak / 2**20:.0f} |")


if __name__ == "__main__":
    main()

"""lowbit against peer quantization tools (AMD Quark, llm-compressor, Intel auto-round) on the demo model, side by
side.

Every tool quantizes the same float32 SmolLM2-135M-Instruct folder with the same scheme, algorithm and the
same calibration windows, and is scored by the same perplexity protocol on the same evaluation windows
(both built once by lowbit's own data functions and saved to a .pt file that every runner loads). Each
peer runs in its own virtual environment (created here when missing, torch CPU build first) through a
small runner in benchmarks/peers/ that quantizes in memory (the tool's fake-quant model) and prints one
JSON line. Every run is its own process, measured with os.wait4 (wall time, peak RSS). A combination that
fails is a row with its one-line error, never a crash.

    python benchmarks/compare_peers.py [--tools lowbit,quark,llmcompressor,autoround]
        [--algos rtn,awq,gptq,gptaq,qronos,autoround,rotation+gptq] [--autoround-iters 200] [--autoround-batch 8]
        [--schemes w_uint4_per_group_asym:64,w_uint4_per_group_asym:128,w_int4_per_group_sym:64]
        [--num-calib-data 128] [--seq-len 512] [--max-chunks N] [--venvs /work/peer-venvs]
        [--json-out rows.json] [--logs DIR] [--timeout 3600]
        [--lowbit-variant "gptq:fast=--algo-arg gptq:true_sequential=false --propagate float"]

A --lowbit-variant ALGO:LABEL=ARGS adds a lowbit row, after the others of ALGO, with ARGS appended to its
`lowbit quantize` command line (an option of that algorithm, say); its algo column reads "ALGO LABEL".

This process never imports torch: a forked child's peak RSS would include the parent's pages, so even the
data and lowbit's evaluation run as children (benchmarks/peers/lowbit_tasks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS_DIR = HERE / "peers"
TORCH = "torch==2.13.0"  # the local CPU build; installed FIRST, or pip pulls GB of CUDA wheels
# per peer: its runner and the pinned packages installed after torch (versions that work with torch 2.13)
PEERS = {
    # Quark 0.13 does not depend on transformers itself; its own extras ask for >5,<5.17
    "quark": ("quark_run.py", ["amd-quark==0.13", "transformers==5.16.1", "accelerate==1.15.0"]),
    "llmcompressor": ("llmcompressor_run.py", ["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0",
                                               "transformers==5.17.0", "accelerate==1.15.0"]),
    # Intel's auto-round: AutoRound only
    "autoround": ("autoround_run.py", ["auto-round==0.16.1", "transformers==5.25.0", "accelerate==1.16.0"]),
}
SCHEMES = "w_uint4_per_group_asym:64,w_uint4_per_group_asym:128,w_int4_per_group_sym:64"


def ensure_venv(venvs: Path, tool: str) -> Path:
    """The peer's python, creating its virtual environment first when missing."""
    venv = venvs / tool
    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {venv} (torch first, then {' '.join(PEERS[tool][1])})", flush=True)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", TORCH], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEERS[tool][1]], check=True)
    return python


def measured(argv: list[str], log: Path, timeout: float) -> tuple[int, float, int, str]:
    """Run argv as a child: (exit code, wall s, peak RSS bytes, its stdout). Its stderr goes to log.
    Wall time and peak RSS come from os.wait4; past timeout the child is killed (exit code -9)."""
    start = time.perf_counter()
    out_fd, out_path = tempfile.mkstemp(suffix=".out")
    err_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid == 0:  # child
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        try:
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    os.close(out_fd)
    os.close(err_fd)
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - start > timeout:
            os.kill(pid, 9)
        time.sleep(0.2)
    stdout = Path(out_path).read_text(errors="replace")
    os.unlink(out_path)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss * 1024, stdout


def last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def error_line(code: int, log: Path) -> str:
    """The one line that says why a child failed: lowbit's `error: ...`, else the last line of its stderr."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    if code == -9:
        return "killed after --timeout"
    return (errors or lines or [f"exit code {code}"])[-1][:300]


def run_lowbit(args, algo, scheme, group, tmp, data, logs, label: str = "", extra: tuple[str, ...] = ()) -> dict:
    """`lowbit quantize` (with `extra` arguments) then lowbit's evaluate, each its own measured process; wall
    is their sum, peak RSS the larger (a peer runner does load, quantize and evaluate in one process)."""
    row = {"tool": "lowbit", "algo": f"{algo} {label}".strip(), "scheme": scheme, "group": group,
           "perplexity": None, "quantize_seconds": None, "error": None}
    out = Path(tmp) / f"lowbit-{algo}{'-' + label if label else ''}-{scheme}-{group}"
    argv = [sys.executable, "-m", "lowbit", "quantize", "demo", "-o", str(out), "--scheme", scheme,
            "--group-size", str(group), "--algo", algo.replace("+", ","), "--dataset", "pydoc", "--num-calib-data",
            str(args.num_calib_data), "--seq-len", str(args.seq_len), "--no-progress", "--overwrite", *extra]
    if "autoround" in algo:  # the peers' iterations and batch
        argv += ["--algo-arg", f"autoround:iters={args.autoround_iters},batch_size={args.autoround_batch}"]
    log = logs / f"{out.name}.quantize.log"
    code, wall, peak, _ = measured(argv, log, args.timeout)
    row.update(wall_seconds=wall, peak_rss=peak, quantize_wall_seconds=wall, quantize_peak_rss=peak)
    if code:
        row["error"] = error_line(code, log)
        return row
    row["quantize_seconds"] = json.loads((out / "summary.json").read_text())["seconds"]["quantize"]
    log = logs / f"{out.name}.eval.log"
    code, ewall, epeak, stdout = measured(lowbit_eval_argv(args, str(out), data), log, args.timeout)
    res = last_json(stdout)
    row.update(wall_seconds=wall + ewall, peak_rss=max(peak, epeak))
    if code or res is None:
        row["error"] = error_line(code, log)
    else:
        row["perplexity"], row["last_word_accuracy"] = res["perplexity"], res["last_word_accuracy"]
    return row


def run_peer(args, tool, python, algo, scheme, group, model, data, logs) -> dict:
    argv = [str(python), str(PEERS_DIR / PEERS[tool][0]), "--model", model, "--data", data,
            "--algo", algo, "--scheme", scheme, "--group", str(group), "--iters", str(args.autoround_iters),
            "--batch", str(args.autoround_batch)]
    log = logs / f"{tool}-{algo}-{scheme}-{group}.log"
    code, wall, peak, stdout = measured(argv, log, args.timeout)
    row = last_json(stdout) or {"tool": tool, "algo": algo, "scheme": scheme, "group": group,
                                "perplexity": None, "quantize_seconds": None, "error": error_line(code, log)}
    row.update(wall_seconds=wall, peak_rss=peak)
    return row


def lowbit_eval_argv(args, model: str, data: str) -> list[str]:
    argv = [sys.executable, str(PEERS_DIR / "lowbit_tasks.py"), "eval", model, data, str(args.seq_len)]
    return argv + ([str(args.max_chunks)] if args.max_chunks else [])


def table(rows: list[dict], float_ppl: float, float_acc: float) -> str:
    lines = ["| tool | algo | scheme | group | perplexity | vs float | last-word acc | quantize s | wall s | "
             "peak RSS MiB | error |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| float | - | - | - | {float_ppl:.3f} | | {100 * float_acc:.1f}% | | | | |"]
    for r in rows:
        ppl, acc = r.get("perplexity"), r.get("last_word_accuracy")
        qs, wall, peak = r.get("quantize_seconds"), r.get("wall_seconds"), r.get("peak_rss")
        lines.append(
            f"| {r['tool']} | {r['algo']} | {r['scheme']} | {r['group']} | "
            f"{'' if ppl is None else f'{ppl:.3f}'} | "
            f"{'' if ppl is None else f'{100 * (ppl / float_ppl - 1):+.1f}%'} | "
            f"{'' if acc is None else f'{100 * acc:.1f}%'} | "
            f"{'' if qs is None else f'{qs:.1f}'} | {'' if wall is None else f'{wall:.1f}'} | "
            f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {(r.get('error') or '').replace('|', '/')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default="lowbit,quark,llmcompressor")
    ap.add_argument("--algos", default="rtn,awq,gptq")
    ap.add_argument("--schemes", default=SCHEMES, help="comma-separated NAME:GROUP")
    ap.add_argument("--num-calib-data", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-chunks", type=int, default=None, help="at most this many evaluation windows")
    ap.add_argument("--venvs", type=Path, default=Path("/work/peer-venvs"), help="one venv per peer tool")
    ap.add_argument("--json-out", type=Path, default=None, help="all rows as JSON (rewritten after each run)")
    ap.add_argument("--logs", type=Path, default=None, help="stderr of every run [default: a temp folder]")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds before a run is killed")
    ap.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's iterations, every tool")
    ap.add_argument("--autoround-batch", type=int, default=8, help="AutoRound's windows per iteration, every tool")
    ap.add_argument("--lowbit-variant", action="append", default=[], metavar="ALGO:LABEL=ARGS",
                    help="one more lowbit row for ALGO with ARGS appended to its command line; repeatable")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    tools = args.tools.split(",")
    unknown = [t for t in tools if t != "lowbit" and t not in PEERS]
    if unknown:
        raise SystemExit(f"unknown tool(s) {unknown}; known: lowbit, {', '.join(PEERS)}")
    schemes = [(name, int(gs)) for name, _, gs in (s.partition(":") for s in args.schemes.split(","))]
    pythons = {t: ensure_venv(args.venvs, t) for t in tools if t in PEERS}
    variants = []  # (algo, label, extra arguments)
    for text in args.lowbit_variant:
        head, eq, extra = text.partition("=")
        algo, colon, label = head.partition(":")
        if not (eq and colon and label):
            raise SystemExit(f"--lowbit-variant {text!r}: write ALGO:LABEL=ARGS, e.g. 'gptq:fast=--propagate float'")
        variants.append((algo, label, tuple(shlex.split(extra))))

    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        model = subprocess.run([sys.executable, "-c", "from lowbit.hf.weights_folder import weights_folder; "
                                "print(weights_folder('demo'))"], check=True, capture_output=True,
                               text=True).stdout.strip().splitlines()[-1]
        data = str(Path(tmp) / "windows.pt")
        cmd = [sys.executable, str(PEERS_DIR / "lowbit_tasks.py"), "data", model, data,
               str(args.num_calib_data), str(args.seq_len)] + ([str(args.max_chunks)] if args.max_chunks else [])
        shapes = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(f"model {model}\ncalibration {shapes['calib']}, evaluation {shapes['eval']} (pydoc), "
              f"{shapes['last_word']} last-word passages", flush=True)
        code, _, _, stdout = measured(lowbit_eval_argv(args, model, data), logs / "float.eval.log", args.timeout)
        if code:
            raise SystemExit(f"float evaluation failed: {error_line(code, logs / 'float.eval.log')}")
        float_ppl, float_acc = last_json(stdout)["perplexity"], last_json(stdout)["last_word_accuracy"]
        print(f"float perplexity {float_ppl:.4f}, last-word accuracy {float_acc:.3f}", flush=True)

        rows = []

        def record(row: dict) -> None:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json_out:
                args.json_out.write_text(json.dumps(
                    {"float_perplexity": float_ppl, "float_last_word_accuracy": float_acc, "calib": shapes["calib"], "eval": shapes["eval"],
                     "rows": rows}, indent=1))

        for algo in args.algos.split(","):  # algorithm-major: each combination's tools side by side
            for scheme, group in schemes:
                for tool in tools:
                    if tool == "lowbit":
                        record(run_lowbit(args, algo, scheme, group, tmp, data, logs))
                    elif "+" in algo:
                        continue  # a lowbit chain (rotation+gptq): no peer runs it
                    else:
                        record(run_peer(args, tool, pythons[tool], algo, scheme, group, model, data, logs))
                for v_algo, label, extra in variants:
                    if v_algo == algo:
                        record(run_lowbit(args, algo, scheme, group, tmp, data, logs, label, extra))
        if not args.logs:
            print(f"(logs of every run were in {logs}, removed; give --logs DIR to keep them)")

    print(f"\nSmolLM2-135M-Instruct float32, pydoc text, calibration {shapes['calib'][0]} x {shapes['calib'][1]}, "
          f"evaluation {shapes['eval'][0]} x {shapes['eval'][1]}, {platform.machine()}, {os.cpu_count()} cores")
    print(table(rows, float_ppl, float_acc))


if __name__ == "__main__":
    main()

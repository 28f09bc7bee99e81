"""lowbit's ONNX front end beside the peer ONNX quantizers, side by side in one run on one float ONNX decoder
(the onnxruntime-genai builder's fp32 CPU export of the demo model by default): perplexity (lowbit's
onnxruntime evaluator, the same windows for every model), quantization time, peak memory, size on disk and,
with --decode, onnxruntime-genai decode tokens/s.

    python benchmarks/onnx_frontend.py [--model ONNX_FOLDER] [--block 128] [--calib 32] [--max-chunks 16]
        [--lowbit rtn,awq,gptq,...] [--peers modelopt:awq_lite,ort:rtn,...] [--decode] [--json FILE] [--work DIR]

Every quantization is its own process (peak RSS from os.wait4); lowbit's time is its summary's `quantize`
seconds (calibration included, loading and writing not), a peer's is its runner's timing of the tool's
quantization call (benchmarks/peers/onnx_*.py). Each tool calibrates on the same --calib windows of 512 tokens
of the pydoc calibration split (seed 0); perplexity is on the first --max-chunks 512-token windows of the
pydoc evaluation split. Peers run from their own virtual environments (PEER_PYTHON below; a missing one is
reported as an error row). Models run as produced: MatMulNBits at their own accuracy_level, DequantizeLinear
forms at onnxruntime's default fusion (accuracy level 4).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from onnx_export import decode_speed, folder_bytes  # noqa: E402

PEER_PYTHON = {
    "modelopt": "/work/peer-venvs/modelopt/bin/python",
    "ort": sys.executable,
    "builder": sys.executable,
    "inc": "/work/peer-venvs/inc/bin/python",
    "quark": "/work/peer-venvs/quark-onnx/bin/python",
}
RUNNER = {"modelopt": "onnx_modelopt.py", "ort": "onnx_ort.py", "builder": "onnx_builder.py",
          "inc": "onnx_inc.py", "quark": "onnx_quark.py"}
DEFAULT_LOWBIT = ("rtn:w_int4_per_group_sym,rtn:w_uint4_per_group_asym,awq:w_uint4_per_group_asym,"
                  "gptq:w_uint4_per_group_asym,awq,gptq:w_uint4_per_group_asym")
DEFAULT_PEERS = ("modelopt:awq_lite:asym,modelopt:rtn_dq:sym,ort:rtn:asym,ort:rtn:sym,ort:hqq:asym,"
                 "builder:default:asym,builder:default:sym,inc:rtn:sym,inc:rtn:asym,quark:rtn:asym,quark:gptq:sym")
# ModelOpt's awq_clip and INC's gptq / awq re-run the whole model per MatMul (estimated 80 min and hours on
# the demo model on 2 cores): give them with --peers and a --timeout to include them


def run_measured(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float, float, str]:
    """(exit code or None when killed at `timeout` s, wall seconds, peak RSS MiB of the child, stdout) of a
    command, its stderr to `log`."""
    start = time.perf_counter()
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        killed = not timer.is_alive()
        timer.cancel()
        out.seek(0)
        stdout = out.read()
    code = None if killed else os.waitstatus_to_exitcode(status)
    return code, time.perf_counter() - start, usage.ru_maxrss / 1024, stdout


def make_data(model: Path, work: Path, calib: int, max_chunks: int) -> Path:
    from transformers import AutoTokenizer

    from lowbit.data import calib_windows, eval_windows, load_text, tokenize

    tok = AutoTokenizer.from_pretrained(model)
    path = work / "data.npz"
    np.savez(path, calib=calib_windows(tokenize(tok, load_text("pydoc", "calib")), calib, 512, 0).numpy(),
             eval=eval_windows(tokenize(tok, load_text("pydoc", "eval")), 512, max_chunks).numpy())
    return path


def lowbit_row(model: Path, work: Path, algo: str, scheme: str, block: int, calib: int, timeout: float) -> dict:
    out = work / f"lowbit-{algo.replace(',', '+')}-{scheme}"
    cmd = [sys.executable, "-m", "lowbit", "quantize", str(model), "-o", str(out), "--scheme", scheme,
           "--group-size", str(block), "--algo", algo, "--num-calib-data", str(calib), "--json", "--no-progress",
           "--overwrite"]
    code, wall, rss, stdout = run_measured(cmd, work / f"{out.name}.log", timeout)
    row = {"tool": "lowbit", "algo": algo, "scheme": scheme, "block": block, "out": str(out), "wall_s": round(wall, 1),
           "peak_rss_mib": round(rss), "error": None}
    if code != 0:
        row["error"] = f"stopped after {timeout:.0f} s" if code is None else \
            ((work / f"{out.name}.log").read_text().strip().splitlines() or ["?"])[-1]
        return row
    summary = json.loads(stdout.strip().splitlines()[-1])
    row["quantize_seconds"] = summary["seconds"]["quantize"]
    return row


def peer_row(model: Path, hf: Path | None, work: Path, data: Path, tool: str, algo: str, sym: bool, block: int,
             timeout: float) -> dict:
    out = work / f"{tool}-{algo}-{'sym' if sym else 'asym'}"
    python = PEER_PYTHON[tool]
    row = {"tool": tool, "algo": algo, "scheme": "int4 sym" if sym else "uint4 asym", "block": block, "out": str(out)}
    if not Path(python).exists():
        return {**row, "error": f"no environment at {python}"}
    source = hf if tool == "builder" else model  # the builder quantizes from the Hugging Face folder
    if source is None:
        return {**row, "error": "the builder needs the float Hugging Face folder: give --hf"}
    cmd = [python, str(HERE / "peers" / RUNNER[tool]), "--model", str(source), "--data", str(data), "--algo", algo,
           "--block", str(block), "--out", str(out)] + (["--symmetric"] if sym else [])
    code, wall, rss, stdout = run_measured(cmd, work / f"{out.name}.log", timeout)
    if code is None:
        return {**row, "wall_s": round(wall, 1), "error": f"stopped after {timeout:.0f} s"}
    try:
        result = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {**row, "error": f"runner exited {code} without a result; see {work / (out.name + '.log')}"}
    return {**row, "quantize_seconds": result.get("quantize_seconds"), "wall_s": round(wall, 1),
            "peak_rss_mib": round(rss), "error": result.get("error")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="float ONNX folder [default: the builder's fp32 demo export]")
    ap.add_argument("--hf", default=None, help="its float Hugging Face folder, for the builder's own int4 "
                                                "[default: the demo's]")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per quantization [default: 1800]")
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32, help="calibration windows of 512 tokens [default: 32]")
    ap.add_argument("--max-chunks", type=int, default=16, help="evaluation windows of 512 tokens [default: 16]")
    ap.add_argument("--lowbit", default=DEFAULT_LOWBIT, help="ALGO:SCHEME,... ('' for none)")
    ap.add_argument("--peers", default=DEFAULT_PEERS, help="TOOL:ALGO:sym|asym,... ('' for none)")
    ap.add_argument("--decode", action="store_true", help="also measure onnxruntime-genai decode speed")
    ap.add_argument("--rows", default=None, help="also take the quantized rows of an earlier run (its JSON lines, "
                                                 "as printed on stderr) and measure them again beside this run's")
    ap.add_argument("--json", default=None, help="write the rows here")
    ap.add_argument("--work", default=None, help="keep outputs here [default: a temporary folder]")
    args = ap.parse_args()
    import torch

    from lowbit.eval.onnx_perplexity import onnx_perplexity

    work = Path(args.work or tempfile.mkdtemp(prefix="onnx-frontend-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else demo_fp32(work)
    hf = Path(args.hf) if args.hf else (None if args.model else demo_hf(work))
    data = make_data(model, work, args.calib, args.max_chunks)
    windows = torch.from_numpy(np.load(data)["eval"])
    rows = [{"tool": "float", "algo": "", "scheme": "fp32", "block": None, "out": str(model), "error": None}]
    if args.rows:
        rows += [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.startswith("{")]
    for item in filter(None, args.lowbit.split(",")):
        algo, _, scheme = item.rpartition(":")
        rows.append(lowbit_row(model, work, algo.replace("+", ","), scheme, args.block, args.calib, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr)
    for item in filter(None, args.peers.split(",")):
        tool, algo, sym = item.split(":")
        rows.append(peer_row(model, hf, work, data, tool, algo, sym == "sym", args.block, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr)
    for row in rows:
        if row.get("error") is None:
            try:
                row["perplexity"] = round(onnx_perplexity(row["out"], windows, progress=False).perplexity, 4)
            except Exception as exc:  # a peer's model onnxruntime refuses to load
                row["error"] = f"onnxruntime: {str(exc).strip().splitlines()[0][:200]}"
                continue
            row["size_mib"] = round(folder_bytes(Path(row["out"])) / 2**20, 1)
    if args.decode:
        ok = {f"{r['tool']} {r['algo']} {r['scheme']}": Path(r["out"]) for r in rows if r.get("error") is None}
        prompt = windows[0, :64].tolist()
        for name, (prefill, tps) in decode_speed(ok, prompt, 128, 3, 1).items():
            row = next(r for r in rows if f"{r['tool']} {r['algo']} {r['scheme']}" == name)
            row["decode_tok_s"] = round(tps, 2)
    float_ppl = rows[0]["perplexity"]
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; block {args.block}, "
          f"{args.calib} x 512 calibration, {len(windows)} x 512 evaluation windows\n")
    print("| tool | algo | scheme | perplexity | vs float | quantize s | peak RSS MiB | size MiB | decode tok/s | error |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ppl = r.get("perplexity")
        rel = f"{(ppl / float_ppl - 1) * 100:+.1f}%" if ppl else ""
        print(f"| {r['tool']} | {r['algo']} | {r['scheme']} | {ppl or ''} | {rel} | {r.get('quantize_seconds', '')} | "
              f"{r.get('peak_rss_mib', '')} | {r.get('size_mib', '')} | {r.get('decode_tok_s', '')} | "
              f"{r.get('error') or ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


def demo_hf(work: Path) -> Path:
    """The demo model's float Hugging Face folder as the builder reads it."""
    from onnx_export import builder_input

    from lowbit.hf.weights_folder import weights_folder

    if (work / "builder-input").is_dir():
        return work / "builder-input"
    return builder_input(weights_folder("demo"), work)


def demo_fp32(work: Path) -> Path:
    """The builder's fp32 CPU export of the demo model."""
    out = work / "demo-fp32"
    if not (out / "model.onnx").is_file():
        src = demo_hf(work)
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                        "-p", "fp32", "-e", "cpu", "-c", str(work / "builder-cache")], check=True,
                       stdout=subprocess.DEVNULL)
    return out


if __name__ == "__main__":
    main()

"""Proofs that lowbit quantizes models that do not fit: each run under an enforced memory cap, on seeded random
models with real shapes, plus a sweep over hidden size and calibration tokens and a projection to Llama-3.

Models are built once under --work (config.json, *.safetensors shards streamed tensor by tensor, index.json) with
the demo model's tokenizer; vocab_size is that tokenizer's length (49152), so every token id is valid.
Weights: normal(0, 0.02) per tensor from a generator seeded by (seed, tensor name), norms ones. Each proof is
its own `lowbit` process in a cgroup v1 memory group (limit = the cap); it passes when it exits 0 under the cap.

    python benchmarks/scale.py [--only rtn-7b,rtn-1.1b,gptq-1.1b,awq-1.1b,ppl-1.1b,resume-1.1b,sweep-hidden,
        sweep-calib] [--quick] [--work /tmp/lowbit-scale] [--json OUT] [--plot PNG] [--eval-flags '--stream']
        [--keep-outputs]        (--quick: tiny shapes, short calibration; a smoke run)
Disk: llama2-7b ~14 GB, tinyllama-1.1b ~2.4 GB, hidden-4096 ~2.5 GB, all ~20 GB in WORK/models (delete by hand),
plus a proof's outputs while it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEME = "w_uint4_per_group_asym"
GIB = 2**30
VOCAB = 49152  # the demo (SmolLM2) tokenizer's length; checked when the tokenizer is copied
SHARD_BYTES = 2 * 10**9

# -- the one table to edit when lowbit's flags change --------------------------------------------------------
RESUME_FLAGS = ["--resume"]  # being added to lowbit quantize
EVAL_FLAGS = ["--stream"]  # being added to lowbit eval; --eval-flags overrides
CALIB = ["--num-calib-data", "16", "--seq-len", "512"]
QUANT = ["quantize", "{model}", "-o", "{out}", "--scheme", SCHEME, "--no-progress", "--json"]
PROOFS = {  # name: (model shape, cap GiB, lowbit argv: {model} and {out} are filled in; {eval} = EVAL_FLAGS)
    "rtn-7b": ("llama2-7b", 4, [*QUANT, "--algo", "rtn"]),
    "rtn-1.1b": ("tinyllama-1.1b", 2, [*QUANT, "--algo", "rtn"]),
    "gptq-1.1b": ("tinyllama-1.1b", 2, [*QUANT, "--algo", "gptq", *CALIB]),
    "awq-1.1b": ("tinyllama-1.1b", 2, [*QUANT, "--algo", "awq", *CALIB]),
    "ppl-1.1b": ("tinyllama-1.1b", 2, ["eval", "{model}", "--max-chunks", "8", "--seq-len", "512", "--json",
                                       "--no-progress", "{eval}"]),
    "resume-1.1b": ("tinyllama-1.1b", 2, [*QUANT, "--algo", "gptq", *CALIB]),  # + RESUME_FLAGS, killed halfway
}
KNOWN = [*PROOFS, "sweep-hidden", "sweep-calib"]
SWEEP_H, QUICK_SWEEP_H = (512, 1024, 2048, 4096), (128, 256, 512)
SWEEP_CALIB = (4, 16, 64)  # windows of 512 tokens, at hidden 2048
SWEEP_CAP_GIB = 16  # a measuring group, not a proof
QUICK_ARGS = {"--num-calib-data": "4", "--seq-len": "128", "--max-chunks": "2"}
QUICK_SEQ = {"--seq-len": "128"}  # the sweeps keep their window counts
TARGETS = {  # of the projection
    "Llama-3-8B": dict(hidden=4096, inter=14336, layers=32, heads=32, kv=8, vocab=128256),
    "Llama-3-70B": dict(hidden=8192, inter=28672, layers=80, heads=64, kv=8, vocab=128256),
}


def sweep_shape(h: int, layers: int = 4) -> dict:
    return dict(hidden=h, inter=int(2.6875 * h / 256 + 0.5) * 256, layers=layers, heads=max(1, h // 128),
                kv=max(1, h // 128))


SHAPES = {
    "llama2-7b": dict(hidden=4096, inter=11008, layers=32, heads=32, kv=32),
    "tinyllama-1.1b": dict(hidden=2048, inter=5632, layers=22, heads=32, kv=4),
    **{f"hidden-{h}": sweep_shape(h) for h in SWEEP_H},
}
QUICK_SHAPES = {
    "llama2-7b": dict(hidden=512, inter=1408, layers=4, heads=4, kv=4),
    "tinyllama-1.1b": dict(hidden=256, inter=704, layers=6, heads=4, kv=2),
    **{f"hidden-{h}": sweep_shape(h, 2) for h in QUICK_SWEEP_H},
}


# -- model building ------------------------------------------------------------------------------------------
def tensor_list(s: dict) -> list[tuple[str, tuple]]:
    """(name, shape) of every tensor of a Llama model with untied embeddings, in file order."""
    h, i, hd = s["hidden"], s["inter"], s["hidden"] // s["heads"]
    out = [("model.embed_tokens.weight", (VOCAB, h))]
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (s["heads"] * hd, h)),
                (p + "self_attn.k_proj.weight", (s["kv"] * hd, h)), (p + "self_attn.v_proj.weight", (s["kv"] * hd, h)),
                (p + "self_attn.o_proj.weight", (h, s["heads"] * hd)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]


def nbytes(shape: tuple) -> int:
    return math.prod(shape) * 2  # bf16


def tensor_bytes(name: str, shape: tuple, seed: int):
    """A bf16 tensor's bytes: ones for norms, normal(0, 0.02) from a generator seeded by (seed, name) for the rest."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16).view(torch.uint8).numpy()
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    t = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=g).to(torch.bfloat16)
    return t.view(-1).view(torch.uint8).numpy()


def write_shard(path: Path, entries: list, seed: int) -> None:
    """One safetensors file written tensor by tensor: header first (shapes are known), then each tensor's bytes
    as it is made, so at most one tensor is in memory."""
    header, offset = {}, 0
    for name, shape in entries:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in entries:
            f.write(tensor_bytes(name, shape, seed).data)


def llama_config(s: dict, tok) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
            "intermediate_size": s["inter"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv"], "head_dim": s["hidden"] // s["heads"], "vocab_size": VOCAB,
            "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "dtype": "bfloat16",
            "torch_dtype": "bfloat16", "initializer_range": 0.02, "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}


def build_model(work: Path, name: str, shape: dict, seed: int) -> Path:
    """The model folder work/models/NAME, built once (a build.json matching shape and seed marks it done)."""
    folder = work / "models" / name
    stamp = {"shape": shape, "seed": seed, "vocab_size": VOCAB, "weights": "normal(0, 0.02) bf16, norms ones"}
    if (folder / "build.json").is_file() and json.loads((folder / "build.json").read_text()) == stamp:
        return folder
    from lowbit.hf.model import open_model

    tok = open_model("demo").tokenizer()
    if len(tok) != VOCAB:
        raise SystemExit(f"the demo tokenizer has {len(tok)} tokens, not {VOCAB}; update VOCAB")
    tmp = folder.with_name(folder.name + ".building")
    for old in (tmp, folder):
        shutil.rmtree(old, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(llama_config(shape, tok), indent=2))
    shards = [[]]
    for entry in tensor_list(shape):
        if shards[-1] and sum(nbytes(s) for _, s in shards[-1]) + nbytes(entry[1]) > SHARD_BYTES:
            shards.append([])
        shards[-1].append(entry)
    weight_map, start = {}, time.perf_counter()
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(tmp / fname, entries, seed)
        weight_map.update({n: fname for n, _ in entries})
    total = sum(nbytes(s) for _, s in tensor_list(shape))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    check_shards(tmp, weight_map)
    (tmp / "build.json").write_text(json.dumps(stamp))
    tmp.rename(folder)
    say(f"built {name}: {total / 1e9:.2f} GB in {len(shards)} shards, {time.perf_counter() - start:.0f} s "
        f"(vocab_size {VOCAB} = the demo tokenizer's length)")
    return folder


def check_shards(folder: Path, weight_map: dict) -> None:
    """Every shard opens with the safetensors library and holds the names the index says."""
    from safetensors import safe_open

    for fname in sorted(set(weight_map.values())):
        with safe_open(str(folder / fname), framework="pt") as f:
            if set(f.keys()) != {n for n, v in weight_map.items() if v == fname}:
                raise SystemExit(f"{fname}: safetensors reads other tensor names than written")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- capped runs -----------------------------------------------------------------------------------------------
def make_group(name: str, cap: int) -> Path | None:
    """A cgroup v1 memory group lowbit-scale-NAME with the cap, made inside this process's own memory group (so
    the machine's own accounting still holds it; at the hierarchy's root that is /sys/fs/cgroup/memory)."""
    lines = Path("/proc/self/cgroup").read_text().splitlines() if Path("/proc/self/cgroup").is_file() else []
    own = [path for _, ctrls, path in (x.split(":", 2) for x in lines) if "memory" in ctrls.split(",")]
    parent = Path("/sys/fs/cgroup/memory") / own[0].lstrip("/") if own else None
    if parent is None or not (parent / "cgroup.procs").is_file():
        return None
    group = parent / f"lowbit-scale-{name}"
    try:
        remove_group(group)  # left by an earlier run
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        return group
    except OSError as exc:
        say(f"cgroup v1 group {group} not usable ({exc})")
        remove_group(group)
        return None


def read_group(group: Path) -> dict:
    """max_usage counts page cache (reclaimed under the cap); the child's own peak RSS is measured apart."""
    oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
    return {"cgroup_max_usage_bytes": int((group / "memory.max_usage_in_bytes").read_text()),
            "cgroup_failcnt": int((group / "memory.failcnt").read_text()),
            "cgroup_oom_kills": int(oom.get("oom_kill", 0))}


def remove_group(group: Path) -> None:
    for _ in range(20):  # the kernel may need a moment after the last task exits
        with contextlib.suppress(OSError):
            return group.rmdir() if group.exists() else None
        time.sleep(0.25)


def cap_prefix(name: str, cap: int) -> tuple[list[str], str, Path | None]:
    """Prefix putting the child under the cap, the method, the cgroup. The child joins from a shell that execs lowbit
    (not a preexec_fn: a forked copy of this process would count this process's pages in the child's peak RSS)."""
    group = make_group(name, cap)
    if group is not None:  # the shell's pid becomes lowbit's by exec
        return ["sh", "-c", f'echo $$ > "{group}/cgroup.procs" && exec "$@"', "sh"], "cgroup-v1", group
    probe = ["systemd-run", "--scope", "--quiet", "-p", f"MemoryMax={cap}", "--"]
    if shutil.which("systemd-run") and subprocess.run([*probe, "true"], capture_output=True).returncode == 0:
        return probe, "systemd-run", None
    return [], "UNCAPPED", None


def run_capped(name: str, argv: list[str], cap: int, logs: Path, kill=None) -> dict:
    """Run `python -m lowbit ARGV` under the cap; its wall time, exit, peak RSS (wait4) and the cgroup's
    counters. kill: SIGKILL it once kill() says so (asked every 0.1 s)."""
    prefix, method, group = cap_prefix(name, cap)
    cmd = [*prefix, sys.executable, "-m", "lowbit", *argv]
    logs.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / f"{name}.out", logs / f"{name}.err"
    say(f"[{name}] cap {cap / GIB:.1f} GiB ({method}): lowbit {' '.join(argv)}")
    start, killed = time.perf_counter(), False
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"})
        try:
            while not (waited := os.wait4(proc.pid, os.WNOHANG))[0]:
                if kill is not None and not killed and kill():
                    os.kill(proc.pid, 9)
                    killed = True
                time.sleep(0.1)
        except BaseException:  # ^C: no child left running in the group
            os.kill(proc.pid, 9)
            os.waitpid(proc.pid, 0)
            raise
    _, status, usage = waited
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    res = {"cap_bytes": cap, "cap_method": method, "command": ["lowbit", *argv], "returncode": code,
           "killed_by_harness": killed, "seconds": round(time.perf_counter() - start, 2),
           "peak_rss_bytes": usage.ru_maxrss * 1024}
    if group is not None:
        res.update(read_group(group))
        remove_group(group)
    res["oom_killed"] = not killed and (code in (-9, 137) or res.get("cgroup_oom_kills", 0) > 0)
    res["passed"] = code == 0 and method != "UNCAPPED"
    if code != 0:
        res["stderr_tail"] = err_log.read_text(errors="replace")[-1500:]
    res["stdout"] = out_log.read_text(errors="replace")
    return res


def fill(argv: list[str], model: Path, out: Path, eval_flags: list[str], quick_args: dict) -> list[str]:
    """argv with {model}, {out} and {eval} filled in, and the values of the options in quick_args replaced."""
    res = []
    for a in argv:
        res += eval_flags if a == "{eval}" else [a.replace("{model}", str(model)).replace("{out}", str(out))]
    return [quick_args.get(res[k - 1], a) if k else a for k, a in enumerate(res)]


def lowbit_fields(res: dict, out: Path | None) -> dict:
    """The run's own measures: from OUT/summary.json (quantize) or the printed JSON (eval)."""
    stdout = res.pop("stdout", "")
    if out is not None and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    elif stdout.strip().startswith("{"):
        summary = json.loads(stdout)
    else:
        return res
    res["lowbit_peak_rss_bytes"] = summary.get("peak_rss_bytes")
    if summary.get("peak_rss_bytes"):  # the child's own VmHWM; wait4's ru_maxrss includes this launcher's RSS
        res["wait4_maxrss_bytes"], res["peak_rss_bytes"] = res["peak_rss_bytes"], summary["peak_rss_bytes"]
    if blocks := summary.get("block_seconds"):
        res.update(blocks=len(blocks), block_seconds=blocks, block_seconds_mean=statistics.mean(blocks),
                   block_seconds_median=statistics.median(blocks))
    res.update({k: summary[k] for k in ("perplexity", "windows", "tokens", "streamed", "resumed_at_block")
                if k in summary},
               lowbit_seconds=summary.get("seconds"))
    if "perplexity" in res:
        res["finite"] = math.isfinite(res["perplexity"])
    return res


# -- proofs ----------------------------------------------------------------------------------------------------
class Ctx:
    def __init__(self, args):
        self.args, self.work, self.quick = args, args.work, args.quick
        self.shapes = QUICK_SHAPES if args.quick else SHAPES
        self.eval_flags = args.eval_flags.split() if args.eval_flags is not None else EVAL_FLAGS
        self.logs = args.work / "logs"

    def model(self, shape: str) -> Path:
        name = shape + ("-quick" if self.quick else "")
        return build_model(self.work, name, self.shapes[shape], self.args.seed)

    def out(self, name: str) -> Path:
        """WORK/out/NAME, emptied (and what a killed run left beside it)."""
        out = self.work / "out" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in [out, *out.parent.glob(f".{name}.lowbit-*")]:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return out

    def done(self, *outs: Path) -> None:
        for out in outs if not self.args.keep_outputs else ():
            shutil.rmtree(out, ignore_errors=True)


def run_proof(ctx: Ctx, name: str, shape: str, cap_gib: float, argv: list[str], extra=(), kill=None,
              out: Path | None = None, quick_args: dict = QUICK_ARGS) -> dict:
    model = ctx.model(shape)
    out = out or ctx.out(name)
    full = fill(argv, model, out, ctx.eval_flags, quick_args if ctx.quick else {}) + list(extra)
    res = lowbit_fields(run_capped(name, full, int(cap_gib * GIB), ctx.logs, kill), out if "-o" in argv else None)
    return {"proof": name, "model": shape, "shape": ctx.shapes[shape], **res}


def proof_resume(ctx: Ctx, name: str, shape: str, cap_gib: float, argv: list[str]) -> dict:
    """Uninterrupted run; a --resume run SIGKILLed when its progress bar shows half the blocks done; the rerun
    with --resume; every output file compared by sha256."""
    ref = run_proof(ctx, name + "-reference", shape, cap_gib, argv)
    res = {"proof": name, "model": shape, "shape": ctx.shapes[shape], "cap_bytes": int(cap_gib * GIB),
           "cap_method": ref["cap_method"], "reference": ref, "passed": False}
    if ref["returncode"] != 0 or not ref.get("block_seconds"):
        return {**res, "verdict": "the uninterrupted run failed"}
    out, with_bar = ctx.out(name), [a for a in argv if a != "--no-progress"]
    first = run_proof(ctx, name + "-killed", shape, cap_gib, with_bar, RESUME_FLAGS,
                      halfway(ctx.logs / f"{name}-killed.err"), out)
    first["left_beside_out"] = sorted(p.name for p in out.parent.glob(f".{out.name}.lowbit-*"))
    second = run_proof(ctx, name + "-resumed", shape, cap_gib, argv, RESUME_FLAGS, None, out)
    res.update(killed=first, resumed=second, seconds=second["seconds"], peak_rss_bytes=second["peak_rss_bytes"],
               cgroup_max_usage_bytes=second.get("cgroup_max_usage_bytes"),
               rerun_seconds_vs_reference=round(second["seconds"] / ref["seconds"], 3))  # ~0.5 + start-up if resumed
    if not first["killed_by_harness"]:
        res["verdict"] = f"the --resume run ended before the kill (exit {first['returncode']}: {last_line(first)})"
    elif second["returncode"] != 0:
        res["verdict"] = f"the rerun with --resume failed (exit {second['returncode']}: {last_line(second)})"
    else:
        a, b = file_hashes(ctx.work / "out" / (name + "-reference")), file_hashes(out)
        differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        res["differing_files"] = differ
        at = second.get("resumed_at_block", 0)
        res["passed"] = at > 0 and not [k for k in differ if k != "summary.json"]
        res["verdict"] = ("identical" if not differ else "identical but summary.json" if not
                          [k for k in differ if k != "summary.json"] else f"differ: {', '.join(differ)}") + \
            f"; resumed at block {at}/{second.get('blocks', '?')}; rerun {res['rerun_seconds_vs_reference']}x ref. time"
    ctx.done(out, ctx.work / "out" / (name + "-reference"))
    return res


def proof_ppl(ctx: Ctx, name: str, shape: str, cap_gib: float, argv: list[str]) -> dict:
    """Perplexity streamed block by block under the cap, and the in-memory figure (--no-stream, a measuring
    group) it must equal."""
    res = run_proof(ctx, name, shape, cap_gib, argv)
    ref = run_proof(ctx, name + "-in-memory", shape, SWEEP_CAP_GIB, [a for a in argv if a != "{eval}"],
                    ["--no-stream"])
    res["in_memory"] = {k: ref.get(k) for k in ("perplexity", "peak_rss_bytes", "seconds", "returncode")}
    same = res.get("perplexity") is not None and res.get("perplexity") == ref.get("perplexity")
    res["passed"] = bool(res["passed"] and same)
    res["verdict"] = f"ppl {res.get('perplexity')} streamed, {ref.get('perplexity')} in memory" + \
        ("" if same else " (DIFFER)")
    return res


def halfway(err_log: Path):
    """A kill predicate: true once lowbit's progress bar on stderr shows half the blocks done."""
    def check() -> bool:
        with open(err_log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 4096))
            done = re.findall(rb"quantizing blocks:.*?(\d+)/(\d+)", f.read())
        return bool(done) and int(done[-1][0]) >= max(1, int(done[-1][1]) // 2)
    return check


def last_line(res: dict) -> str:
    lines = (res.get("stderr_tail") or "").strip().splitlines()
    return lines[-1][:160].replace("|", "/") if lines else ""


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def sweep_runs(ctx: Ctx, which: str) -> list[dict]:
    """sweep-hidden: RTN and GPTQ (16 x 512 calibration) for each hidden size; sweep-calib: GPTQ at hidden 2048
    with 4, 16 and 64 windows of 512 tokens."""
    hs = QUICK_SWEEP_H if ctx.quick else SWEEP_H
    if which == "sweep-hidden":
        plan = [(h, algo, 16) for h in hs for algo in ("rtn", "gptq")]
    else:
        plan = [(hs[-1] if ctx.quick else 2048, "gptq", n) for n in SWEEP_CALIB]
    rows = []
    for h, algo, n in plan:
        cal = ["--num-calib-data", str(n), "--seq-len", "512"] if algo != "rtn" else []
        name = f"{which}-{algo}-h{h}" + (f"-c{n}" if cal else "")
        row = run_proof(ctx, name, f"hidden-{h}", SWEEP_CAP_GIB, [*QUANT, "--algo", algo, *cal], quick_args=QUICK_SEQ)
        rows.append({**row, "sweep": which, "algo": algo, "hidden": h,
                     "calib_tokens": n * int(QUICK_SEQ["--seq-len"] if ctx.quick else 512) if cal else 0})
        ctx.done(ctx.work / "out" / name)
    return rows


def run_selected(ctx: Ctx, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        if name in ("sweep-hidden", "sweep-calib"):
            rows += sweep_runs(ctx, name)
            continue
        shape, cap, argv = PROOFS[name]
        if name.startswith("resume"):
            rows.append(proof_resume(ctx, name, shape, cap, argv))
        elif name.startswith("ppl"):
            rows.append(proof_ppl(ctx, name, shape, cap, argv))
        else:
            rows.append(run_proof(ctx, name, shape, cap, argv))
            ctx.done(ctx.work / "out" / name)
        say(f"[{name}] {'PASSED' if rows[-1]['passed'] else 'FAILED'} {rows[-1].get('verdict', '')}")
    return rows


# -- projection, table, plot -----------------------------------------------------------------------------------
def block_params(s: dict) -> int:
    """Linear weights of one decoder block."""
    h, hd = s["hidden"], s["hidden"] // s["heads"]
    return h * hd * (2 * s["heads"] + 2 * s["kv"]) + 3 * h * s["inter"]


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a, b of y = a + b x."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def project(rows: list[dict]) -> list[dict]:
    """From sweep-hidden: time per block ~ a * P^b (P = one block's linear parameters, a power law fitted in log
    space), peak RSS ~ c + d * (P + vocab x hidden) (bytes per parameter held: one block and the embedding).
    Total = layers x time per block (load, calibration tokenizing and writing not included)."""
    out = []
    for algo in ("rtn", "gptq"):
        pts = [r for r in rows if r.get("sweep") == "sweep-hidden" and r["algo"] == algo and r["passed"]
               and r.get("block_seconds_mean")]
        if len(pts) < 2:
            continue
        la, b = fit_line([math.log(block_params(r["shape"])) for r in pts],
                         [math.log(r["block_seconds_mean"]) for r in pts])
        c, d = fit_line([block_params(r["shape"]) + VOCAB * r["hidden"] for r in pts],
                        [r.get("lowbit_peak_rss_bytes") or r["peak_rss_bytes"] for r in pts])
        for target, s in TARGETS.items():
            per_block = math.exp(la) * block_params(s) ** b
            out.append({"target": target, "algo": algo, "exponent": round(b, 3), "block_seconds": per_block,
                        "total_seconds": per_block * s["layers"],
                        "peak_rss_bytes": c + d * (block_params(s) + s["vocab"] * s["hidden"]),
                        "bytes_per_param_held": d, "fitted_on_hidden": [r["hidden"] for r in pts]})
    return out


def fmt(v, scale=1.0, digits=0) -> str:
    return "" if v is None else f"{v / scale:.{digits}f}"


def print_table(rows: list[dict], projections: list[dict]) -> None:
    print(f"{platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}; random bf16 models, "
          f"vocab_size {VOCAB} (the demo tokenizer); {SCHEME} g128")
    print("| proof | cap GiB | cap | passed | peak RSS MiB | lowbit peak MiB | cgroup max MiB | failcnt | seconds | "
          "s/block | note |\n" + "|---" * 11 + "|")
    for r in rows:
        note = r.get("verdict") or ("OOM-killed" if r.get("oom_killed") else "") or (
            f"ppl {r['perplexity']:.4g}" if "perplexity" in r else "" if r["passed"] else last_line(r))
        print(f"| {r['proof']} | {fmt(r['cap_bytes'], GIB, 1)} | {r['cap_method']} | {'yes' if r['passed'] else 'NO'} "
              f"| {fmt(r.get('peak_rss_bytes'), 2**20)} | {fmt(r.get('lowbit_peak_rss_bytes'), 2**20)} | "
              f"{fmt(r.get('cgroup_max_usage_bytes'), 2**20)} | {r.get('cgroup_failcnt', '')} | "
              f"{fmt(r.get('seconds'), 1, 1)} | {fmt(r.get('block_seconds_mean'), 1, 2)} | {note} |")
    if projections:
        print("\nprojection (fit on sweep-hidden; total = layers x s/block, without load and write):")
        print("| target | algo | s/block | total h | peak RSS GiB | exponent |\n|---|---|---|---|---|---|")
        for p in projections:
            print(f"| {p['target']} | {p['algo']} | {p['block_seconds']:.1f} | {p['total_seconds'] / 3600:.2f} | "
                  f"{p['peak_rss_bytes'] / GIB:.2f} | {p['exponent']} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [("sweep-hidden", "hidden", "hidden size"), ("sweep-calib", "calib_tokens", "calibration tokens")]
    for col, (sweep, key, label) in enumerate(panels):
        for algo in ("rtn", "gptq"):
            pts = sorted((r for r in rows if r.get("sweep") == sweep and r["algo"] == algo and r["passed"]),
                         key=lambda r: r[key])
            rss = [(r.get("lowbit_peak_rss_bytes") or r["peak_rss_bytes"]) / GIB for r in pts]
            axes[0][col].plot([r[key] for r in pts], rss, "o-", label=algo)
            axes[1][col].plot([r[key] for r in pts], [r.get("block_seconds_mean") or 0 for r in pts], "o-", label=algo)
        for row, ylabel in enumerate(("peak RSS GiB", "seconds per block")):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set(xlabel=label, ylabel=ylabel)
            axes[row][col].grid(alpha=0.3)
            axes[row][col].legend()
    layers = "/".join(sorted({str(r["shape"]["layers"]) for r in rows if r.get("sweep")}))
    fig.suptitle(f"lowbit quantize, random Llama-shaped models ({layers} blocks, vocab {VOCAB}), {SCHEME} g128")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    say(f"wrote {path}")


def merge(json_path: Path, new: list[dict], quick: bool) -> list[dict]:
    """The rows of json_path with `new` in place of rows of the same proofs, written back with the projection."""
    old = json.loads(json_path.read_text())["rows"] if json_path.is_file() else []
    rows = [r for r in old if r["proof"] not in {q["proof"] for q in new}] + new
    json_path.parent.mkdir(parents=True, exist_ok=True)
    machine = {"arch": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    json_path.write_text(json.dumps({"machine": machine, "quick": quick, "rows": rows,
                                     "projections": project(rows)}, indent=1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(KNOWN), help=f"comma-separated, of {','.join(KNOWN)} [default: all]")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and short calibration (smoke run)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lowbit-scale"), help="models, outputs and logs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None,
                    help="results (merged with what is there, by proof) [default: benchmarks/results/scale.json, "
                         "with --quick WORK/scale-quick.json]")
    ap.add_argument("--plot", type=Path, default=None, help="[default: docs/img/scale.png, with --quick WORK/...]")
    ap.add_argument("--eval-flags", default=None, help=f"extra `lowbit eval` flags [default: {' '.join(EVAL_FLAGS)}]")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the quantized folders under WORK/out")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    if set(names) - set(KNOWN):
        raise SystemExit(f"unknown proofs {sorted(set(names) - set(KNOWN))}; known: {', '.join(KNOWN)}")
    sys.path.insert(0, str(ROOT / "src"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    json_path = args.json or (args.work / "scale-quick.json" if args.quick else ROOT / "benchmarks/results/scale.json")
    plot_path = args.plot or (args.work / "scale-quick.png" if args.quick else ROOT / "docs/img/scale.png")
    ctx = Ctx(args)
    for name in names:  # merged into the JSON after each proof, so a stopped run keeps what it finished
        rows = merge(json_path, run_selected(ctx, [name]), args.quick)
    print_table(rows, project(rows))
    say(f"wrote {json_path}")
    if any(r.get("sweep") for r in rows):
        plot(rows, plot_path)


if __name__ == "__main__":
    main()

"""K-quant GGUF files from lowbit against llama.cpp's own quantizer (llama-quantize, with and without an importance
matrix from llama-imatrix), side by side in one run, all evaluated by llama.cpp itself: perplexity, KL divergence
of the token distributions from the float model's, file size and quantization time.

Every file starts from the same float weights: lowbit writes the model as a float GGUF (`export --gguf-type f16`,
or f32), the reference; llama.cpp's tools run on that file. Rows per mix:
- llama.cpp: `llama-quantize ref.gguf out.gguf MIX`;
- llama.cpp + imatrix: the same with `--imatrix` from `llama-imatrix` over the calibration text;
- lowbit: `export --gguf-type MIX` of the float model (lowbit's own K-quant / legacy searches);
- lowbit + imatrix: the same weighted by lowbit's imatrix (`lowbit imatrix`) of the same calibration text;
- lowbit + llama.cpp's imatrix: lowbit's export reading llama-imatrix's file (checks lowbit reads it right);
- lowbit GPTQ: `quantize --scheme gguf_MIX --algo gptq --export gguf` (calibrated codes on each tensor's K-quant
  grid, written exactly; the float embedding / output weighted by lowbit's imatrix).
The calibration text is the dataset's "calib" part, given to both imatrix tools; the evaluation windows come from
its "eval" part (or --eval-dataset: a text file none of the calibration saw). Perplexity and KL come from
llama.cpp's logits over the same windows (each from an empty cache); KL is the mean over predicted tokens of
KL(float || quantized).

llama-quantize and llama-imatrix are taken from $LLAMA_CPP_BIN or PATH, else built (cmake, a few minutes) from
the llama.cpp sources inside the sdist of the installed llama-cpp-python (pip download), under --work.
--random-model H,L,F benchmarks a seeded random Llama (hidden H, L layers, MLP F; the demo's tokenizer) instead:
widths that are whole 256-wide super-blocks and weights on no earlier grid.

    python benchmarks/gguf_kquants.py [--model demo] [--mixes q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k] [--dataset pydoc]
        [--eval-dataset FILE] [--eval-chunks 8] [--seq-len 512] [--calib-windows 32] [--reference f16]
        [--random-model 512,8,1536]
        [--algos 'gptq;awq,gptq'] [--work /tmp/lowbit-kquants] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TOOLS = ("llama-quantize", "llama-imatrix")


def llama_tools(work: Path) -> dict[str, Path]:
    """The llama.cpp binaries, built from llama-cpp-python's sdist when not found."""
    where = os.environ.get("LLAMA_CPP_BIN")
    found = {t: Path(where) / t if where else shutil.which(t) for t in TOOLS}
    if all(p and Path(p).is_file() for p in found.values()):
        return {t: Path(p) for t, p in found.items()}
    from importlib.metadata import version

    build = work / "llama.cpp-build"
    bins = {t: build / "bin" / t for t in TOOLS}
    if all(p.is_file() for p in bins.values()):
        return bins
    ver = version("llama_cpp_python")
    src = work / f"llama_cpp_python-{ver}"
    if not src.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={ver}", "-d", str(work)], check=True)
        shutil.unpack_archive(str(work / f"llama_cpp_python-{ver}.tar.gz"), str(work))
    tree = src / "vendor" / "llama.cpp"
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1), "--target", *TOOLS],
                   check=True, stdout=subprocess.DEVNULL)
    return bins


def run(cmd: list) -> float:
    """Run a llama.cpp tool quietly; returns seconds."""
    start = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def window_logprobs(path: Path, windows: torch.Tensor):
    """Per window, llama.cpp's next-token log-probabilities (seq_len - 1, vocab), float32."""
    from lowbit.runtimes import open_llama

    llm = open_llama(path, windows.shape[1], os.cpu_count())
    try:
        for w in windows:
            llm.reset()
            llm.eval(w.tolist())
            logits = torch.from_numpy(llm.scores[: windows.shape[1] - 1]).float()
            yield torch.log_softmax(logits, -1)
    finally:
        llm.close()


def measure(path: Path, windows: torch.Tensor, reference: list | None) -> tuple[dict, list]:
    """Perplexity (and KL from the reference log-probabilities, when given) of a GGUF file in llama.cpp."""
    nll, kl, tokens = 0.0, 0.0, 0
    kept = []
    for i, logp in enumerate(window_logprobs(path, windows)):
        targets = windows[i, 1:]
        nll -= float(logp.gather(1, targets[:, None]).sum())
        tokens += targets.numel()
        if reference is None:
            kept.append(logp.half())
        else:
            ref = reference[i].float()
            kl += float((ref.exp() * (ref - logp)).sum())
    row = {"perplexity": round(float(torch.exp(torch.tensor(nll / tokens))), 4),
           "size_mib": round(path.stat().st_size / 2**20, 2)}
    if reference is not None:
        row["kl"] = round(kl / tokens, 5)
    return row, kept


def random_model(spec: str, work: Path) -> Path:
    """A seeded random Llama (hidden, layers, MLP width) with the demo's tokenizer, saved under work."""
    import transformers as tf

    from lowbit.hf.model import open_model

    hidden, layers, mlp = (int(v) for v in spec.split(","))
    folder = work / f"random-{hidden}-{layers}-{mlp}"
    tokenizer = open_model("demo").tokenizer()
    if not (folder / "config.json").is_file():
        config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=mlp,
                                num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                num_key_value_heads=max(1, hidden // 256), max_position_embeddings=2048,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                tie_word_embeddings=True)
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.6 / p.shape[1] ** 0.5)  # logits of a few units: peaked, not flat
                    if "mlp" in name or "proj" in name:
                        p[:, torch.randperm(p.shape[1])[: p.shape[1] // 64]] *= 4  # some outlier columns
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


class Bench:
    """One model's reference, windows, imatrix files and rows."""

    def __init__(self, args, model: str):
        from lowbit.data import eval_windows, load_text, tokenize
        from lowbit.exporters.gguf_float import export_gguf_any
        from lowbit.hf.model import open_model

        self.args, self.model, self.work, self.rows = args, model, args.work, []
        self.tools = llama_tools(args.work)
        self.reference = export_gguf_any(model, self.work / f"reference-{args.reference}.gguf", overwrite=True,
                                         quant_type=args.reference)
        text = load_text(args.dataset, "calib")
        self.calib_text = self.work / "calib.txt"
        self.calib_text.write_text(text)
        evaluated = load_text(args.eval_dataset or args.dataset, "eval")
        self.windows = eval_windows(tokenize(open_model(model).tokenizer(), evaluated), args.seq_len, args.eval_chunks)
        row, self.ref_logp = measure(self.reference, self.windows, None)
        self.add({"tool": f"float ({args.reference})", "mix": args.reference, **row})

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def imatrices(self) -> None:
        from lowbit.imatrix import compute_imatrix

        a = self.args
        self.llama_imatrix = self.work / "imatrix-llama.gguf"
        seconds = run([self.tools["llama-imatrix"], "-m", self.reference, "-f", self.calib_text, "-o",
                       self.llama_imatrix, "-c", a.seq_len, "--chunks", a.calib_windows, "-t", os.cpu_count() or 1,
                       "--no-ppl"])
        print(f"llama-imatrix: {seconds:.0f} s", flush=True)
        start = time.perf_counter()
        self.lowbit_imatrix = compute_imatrix(self.model, self.work / "imatrix-lowbit.gguf", dataset=a.dataset,
                                              num_calib_data=a.calib_windows, seq_len=a.seq_len, overwrite=True,
                                              progress=False)
        print(f"lowbit imatrix: {time.perf_counter() - start:.0f} s", flush=True)

    def mix(self, mix: str) -> None:
        from lowbit.exporters.gguf_float import export_gguf_any

        for tool, imatrix in (("llama.cpp", None), ("llama.cpp + imatrix", self.llama_imatrix)):
            out = self.work / f"{tool.replace(' + ', '-')}-{mix}.gguf"
            seconds = run([self.tools["llama-quantize"], *(["--imatrix", imatrix] if imatrix else []),
                           self.reference, out, mix.upper(), os.cpu_count() or 1])
            self.add({"tool": tool, "mix": mix, "seconds": round(seconds, 2), **self.score(out)})
        for tool, imatrix in (("lowbit", None), ("lowbit + imatrix", self.lowbit_imatrix),
                              ("lowbit + llama.cpp's imatrix", self.llama_imatrix)):
            out = self.work / f"{tool.replace(' + ', '-').replace(' ', '_')}-{mix}.gguf"
            start = time.perf_counter()
            export_gguf_any(self.model, out, overwrite=True, quant_type=mix, imatrix=imatrix)
            self.add({"tool": tool, "mix": mix, "seconds": round(time.perf_counter() - start, 2),
                      **self.score(out)})
        from lowbit.spec import GGUF_MIXES

        for algo in filter(None, self.args.algos.split(";")):
            if mix in GGUF_MIXES:  # iq4_xs has no lowbit grid: re-quantized rows only
                self.calibrated(mix, algo)

    def calibrated(self, mix: str, algo: str) -> None:
        from lowbit.api import quantize

        a = self.args
        start = time.perf_counter()
        result = quantize(self.model, self.work / f"lowbit-{algo}-{mix}", scheme=f"gguf_{mix}", algo=algo,
                          export="gguf", export_options={"gguf": {"imatrix": self.lowbit_imatrix}},
                          num_calib_data=a.calib_windows, seq_len=a.seq_len, dataset=a.dataset, overwrite=True,
                          progress=False, quiet=True)
        out = Path(result.summary["exports"]["gguf"])
        self.add({"tool": f"lowbit {algo} (gguf_{mix})", "mix": mix,
                  "seconds": round(time.perf_counter() - start, 2), **self.score(out)})

    def score(self, path: Path) -> dict:
        return measure(path, self.windows, self.ref_logp)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--random-model", default=None, metavar="H,L,F")
    p.add_argument("--mixes", default="q6_k,q5_k_m,q4_k_m,q3_k_m,q2_k")
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--eval-dataset", default=None, help="evaluation text, when not the dataset's eval part (e.g. a "
                                                           "held-out file: calibration stays on --dataset)")
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--reference", default="f16", choices=["f16", "bf16", "f32"])
    p.add_argument("--algos", default="gptq", help="lowbit's calibrated rows: algorithm chains separated by ';' "
                                                    "(e.g. 'gptq;awq,gptq'); '' for none")
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-kquants"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    model = str(random_model(args.random_model, args.work)) if args.random_model else args.model
    bench = Bench(args, model)
    bench.imatrices()
    for mix in args.mixes.split(","):
        bench.mix(mix)
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "model": model,
              "windows": list(bench.windows.shape), "rows": bench.rows}
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    print("| tool | mix | size MiB | perplexity | KL | seconds |\n|---|---|---|---|---|---|")
    for r in bench.rows:
        print(f"| {r['tool']} | {r['mix']} | {r['size_mib']} | {r['perplexity']} | {r.get('kl', '')} | "
              f"{r.get('seconds', '')} |")


if __name__ == "__main__":
    main()

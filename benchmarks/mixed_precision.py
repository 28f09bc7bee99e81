"""Mixed precision by measured sensitivity (--target-bits) against uniform formats and uniform mixes by role, at
equal stored size, on one model: perplexity on each evaluation text against stored bits per weight of the
quantized linears (scales and zero points included, mixed.stored_bits), and the accuracy-against-size curve.

The sensitivity table of each measure is measured once (mixed.MixedPrecision.measure_errors, what --target-bits
runs) and allocated at every target; one --target-bits run per measure goes through the CLI's own path to check it
gives the same plan. Every configuration is quantized with the same quantizer (--algo, RTN by default) and the same
calibration windows.

    python benchmarks/mixed_precision.py [--model demo] [--algo rtn] [--num-calib-data 16] [--seq-len 512]
        [--eval-chunks 16] [--dataset pydoc,/tmp/heldout.txt] [--targets 2.5,3,3.5,4,5,6]
        [--measures fisher,relative,output,weight] [--no-baselines] [--merge OLD.json] [--json-out NEW.json]
        [--plot docs/mixed_precision.svg] [--work /tmp/lowbit-mixed]

--merge keeps an earlier run's rows (results JSON) that this run does not measure again, so that a new measure
can join the table and the curve without re-running the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

UNIFORM = [(2, 64), (2, 32), (3, 128), (3, 64), (3, 32), (4, 128), (4, 64), (8, 128)]
# by role, the way hand-made mixes are written (more bits where llama.cpp's K-quant mixes put them, or by block
# part): role pattern -> (bits, group); the rest gets the base (3 bits, g64)
MIXES = {
    "down_proj 4b g128, rest 3b g64": {"down_proj": (4, 128)},
    "v_proj+down_proj 4b g64, rest 3b g64": {"v_proj": (4, 64), "down_proj": (4, 64)},
    "attention 4b g128, MLP 3b g64": {"q_proj": (4, 128), "k_proj": (4, 128), "v_proj": (4, 128), "o_proj": (4, 128)},
    "first and last 4 blocks 4b g64, rest 3b g64": {"re:model\\.layers\\.(0|1|2|3|26|27|28|29)\\.": (4, 64)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--scheme", default="w_uint4_per_group_asym")
    p.add_argument("--algo", default="rtn")
    p.add_argument("--num-calib-data", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-chunks", type=int, default=16)
    p.add_argument("--dataset", default="pydoc")
    p.add_argument("--targets", default="2.5,3,3.5,4,5,6")
    p.add_argument("--measures", default="fisher,relative,output,weight")
    p.add_argument("--merge", type=Path, default=None, help="an earlier results JSON whose rows join this run's")
    p.add_argument("--json-out", type=Path, default=None, help="write the rows (merged) here as JSON")
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--no-baselines", action="store_true", help="skip the uniform formats and the mixes by role")
    p.add_argument("--baselines", default="", help="only the baselines whose label contains one of these (comma-"
                                                   "separated), e.g. '3b g64,3b g32,attention'")
    p.add_argument("--work", type=Path, default=Path("/tmp/lowbit-mixed"))
    args = p.parse_args()
    from lowbit.api import evaluate, make_recipe, plan_for, quantize
    from lowbit.engine.placement import Placement
    from lowbit.hf.model import open_model
    from lowbit.mixed import MixedPrecision, allocate, candidate_specs, candidates_for, stored_bits
    from lowbit.recipe import Recipe, matches
    from lowbit.torch_job import calibration_windows

    def ppl(model) -> dict:
        return {d: round(evaluate(model, dataset=d, seq_len=512, max_chunks=args.eval_chunks,
                                  progress=False)["perplexity"], 4) for d in args.dataset.split(",")}

    common = dict(scheme=args.scheme, algo=args.algo, num_calib_data=args.num_calib_data, seq_len=args.seq_len,
                  progress=False, quiet=True, overwrite=True)
    recipe = make_recipe(scheme=args.scheme, num_calib_data=args.num_calib_data, seq_len=args.seq_len)
    loaded = open_model(args.model, None)
    plan = plan_for(loaded, recipe)
    shapes = {n: lp.shape for n, lp in plan.items() if lp.spec is not None}
    size = sum(a * b for a, b in shapes.values())

    def bits_of(overrides: dict) -> float:  # name -> (bits, group)
        base = recipe.scheme.weight
        return sum(stored_bits(base.with_changes(bits=b, group_size=g), shapes[n][1]) * shapes[n][0] * shapes[n][1]
                   for n, (b, g) in overrides.items()) / size

    rows = [{"name": "float", "bits": 16.0, "perplexity": ppl(args.model)}]
    print(json.dumps(rows[-1]), flush=True)

    def run(name: str, overrides: dict, kind: str, **extra) -> None:
        start = time.perf_counter()
        texts = [f"{n}:bits={b},group_size={g}" for n, (b, g) in overrides.items()]
        out = quantize(args.model, args.work / f"r{len(rows)}", overrides=texts, **common, **extra)
        rows.append({"name": name, "kind": kind, "bits": round(bits_of(overrides), 4), "perplexity": ppl(out.output),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)

    def wanted(label: str) -> bool:
        return not args.no_baselines and (not args.baselines or any(k in label for k in args.baselines.split(",")))

    for b, g in [bg for bg in UNIFORM if wanted(f"uniform {bg[0]}b g{bg[1]}")]:
        run(f"uniform {b}b g{g}", {n: (b, g) for n in shapes}, "uniform")
    for label, roles in [(k, v) for k, v in MIXES.items() if wanted(k)]:
        chosen = {n: next((bg for pat, bg in roles.items() if matches(pat, n)), (3, 64)) for n in shapes}
        run(label, chosen, "mix")
    windows = calibration_windows(loaded.tokenizer(), recipe.calibration)
    for measure in args.measures.split(","):
        specs = candidate_specs(recipe.scheme.weight)
        mixed = MixedPrecision(3.5, measure, {n: candidates_for(specs, k) for n, (_, k) in shapes.items()})
        start = time.perf_counter()
        table = mixed.measure_errors(open_model(args.model, None), plan, windows, Placement(), 8)
        print(f"measured {measure} sensitivity in {time.perf_counter() - start:.0f} s", flush=True)
        sizes = {n: shapes[n][0] * shapes[n][1] for n in table}
        for target in map(float, args.targets.split(",")):
            chosen = allocate(table, sizes, target)
            run(f"--target-bits {target:g} ({measure})", {n: (s.bits, s.group_size) for n, s in chosen.items()},
                f"target-{measure}")
        # the CLI's own path at 3.5 bits gives the plan allocated here
        out = quantize(args.model, args.work / f"cli-{measure}", target_bits=3.5, sensitivity=measure, **common)
        written = {o.pattern: dict(o.changes) for o in Recipe.load(out.output / "recipe.yaml").overrides}
        same = written == {n: {"bits": s.bits, "group_size": s.group_size}
                           for n, s in allocate(table, sizes, 3.5).items()}
        print(f"--target-bits 3.5 through quantize(): {out.summary['mixed_precision']}; the same plan: {same}",
              flush=True)
    if args.merge:
        ours = {r["name"] for r in rows}
        rows = [r for r in json.loads(args.merge.read_text())["rows"] if r["name"] not in ours] + rows
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()}-core {platform.machine()}",
              "command": " ".join(sys.argv),
              "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    print(json.dumps(result, indent=1))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(rows, args.dataset.split(","), args.plot)


def plot(rows: list, datasets: list, path: Path) -> None:
    """Perplexity against stored bits per weight, one panel per evaluation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
    styles = {"uniform": ("o", "uniform"), "mix": ("s", "mix by role"),
              "target-fisher": ("P", "--target-bits (fisher)"), "target-relative": ("*", "--target-bits (relative)"), "target-output": ("v", "--target-bits (output)"),
              "target-weight": ("^", "--target-bits (weight)")}
    for ax, d in zip(axes[0], datasets):
        floor = next(r["perplexity"][d] for r in rows if r["name"] == "float")
        for kind, (marker, label) in styles.items():
            pts = sorted((r["bits"], r["perplexity"][d]) for r in rows if r.get("kind") == kind)
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle="-" if kind != "mix" else "", label=label)
        ax.axhline(floor, color="grey", linestyle=":", label="float")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight (scales, zero points included)")
        ax.set_ylabel(f"perplexity ({Path(d).name})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()

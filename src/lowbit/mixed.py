"""Mixed precision by measured sensitivity (--target-bits B): per-linear bit widths and group sizes chosen so that
the quantized linears store B bits per weight on average (scales and zero points included), where they cost the
least error.

1. Candidates: the scheme's integer weight format at 2, 3, 4 and 8 bits and group sizes 32, 64, 128 (and the
   scheme's own), those dividing the linear's input width, and only those every requested export can hold.
2. Sensitivity: one pass of the float model over the calibration windows (the engine with
   algorithms.sensitivity.SensitivityProbe) records each candidate's error on each linear: by default ("fisher")
   the output error on the calibration inputs with each output channel weighted by the loss's mean squared
   gradient there (from a forward and backward pass of the whole float model per window, first); "relative" is
   the output error tr(dW H dW^T) relative to the output's own energy tr(W H W^T) (block by block: for models
   that do not fit in memory at once), "output" leaves it unscaled, "weight" uses ||dW||^2 (docs/BENCHMARKS.md
   compares them).
3. Allocation: a multiple-choice knapsack, minimising the summed error within the budget, solved by dynamic
   programming over the budget (costs rounded up to 1/20000 of it), beside a greedy along each linear's lower
   convex hull of (bits, error) and every uniform plan that fits; the best of them is kept.

The chosen plan becomes exact-name overrides in the recipe (recipe.yaml reproduces it without measuring again)
and is printed before quantizing.
"""

from __future__ import annotations

import dataclasses
import heapq
import sys

from .algorithms import REGISTRY
from .algorithms.sensitivity import MEASURES, SensitivityProbe, output_fisher
from .errors import LowbitError
from .memory import fits_in_memory
from .recipe import Override
from .spec import QuantSpec

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128)
SCALE_BITS = 16  # a float16 scale per group, as the exports store it


def stored_bits(spec: QuantSpec, in_features: int) -> float:
    """Bits per weight of a group-wise integer spec: the code, plus its group's scale and (asymmetric) zero point."""
    group = spec.group_size if spec.granularity == "group" else in_features
    return spec.bits + (SCALE_BITS + (0 if spec.symmetric else spec.bits)) / group


def check_base(spec: QuantSpec | None, input_spec) -> None:
    """--target-bits varies an integer weight-only scheme's bits and group size: refuse anything else."""
    if spec is None or spec.kind != "int" or not spec.plain_int or input_spec is not None or spec.gguf_grid:
        name = spec.short_name if spec is not None else "no quantized weight"
        raise LowbitError(f"--target-bits chooses bits and group sizes of an integer weight-only scheme, not {name}; "
                          f"use e.g. --scheme w_uint4_per_group_asym")


def candidate_specs(base: QuantSpec) -> list[QuantSpec]:
    groups = sorted({*GROUPS, *([base.group_size] if base.granularity == "group" and base.group_size else [])})
    return [base.with_changes(bits=b, granularity="group", group_size=g) for b in BITS for g in groups]


def candidates_for(specs: list[QuantSpec], in_features: int) -> list[QuantSpec]:
    return [s for s in specs if in_features % s.group_size == 0]


def budget_range(plan: dict, allowed: dict[str, list]) -> tuple[float, float]:
    """The least and most average bits the candidates allow on this plan's quantized linears (allowed: name ->
    its candidate specs)."""
    lo = hi = size = 0
    for name, specs in allowed.items():
        lp = plan[name]
        bits = [stored_bits(s, lp.shape[1]) for s in specs]
        if not bits:
            raise LowbitError(f"--target-bits: no candidate format fits {name} ({lp.shape[0]} x {lp.shape[1]}): no "
                              f"group size of {', '.join(map(str, GROUPS))} divides its input features, or the "
                              f"export cannot hold them; exclude it or use a uniform scheme")
        n = lp.shape[0] * lp.shape[1]
        lo, hi, size = lo + min(bits) * n, hi + max(bits) * n, size + n
    return lo / size, hi / size


def allocate(table: dict[str, list], sizes: dict[str, int], target: float) -> dict[str, QuantSpec]:
    """The spec of each linear (table: name -> [(spec, bits per weight, error)]) minimising the summed error with
    at most `target` bits per weight on average (sizes: weights per linear): the best of a dynamic programme over
    the budget (exact but for costs rounded up to 1/DP_UNITS of it), the greedy on the hulls, and every uniform
    plan that fits."""
    budget = target * sum(sizes.values()) + 1e-6
    # the greedy too: the programme won at every target on the demo's table, but with few linears a plan right at
    # the budget's edge is reachable only with exact costs, which the greedy uses (tests/test_mixed.py)
    plans = [_greedy(table, sizes, budget), *_uniform_plans(table, sizes, budget)]
    if len(table) * DP_UNITS <= DP_CELLS:
        plans.append(_programme(table, sizes, budget))
    feasible = [p for p in plans if p is not None and _bits(table, sizes, p) <= budget]
    # below every plan's size (the caller checks the range first): the greedy's, every linear at its cheapest
    return min(feasible, key=lambda plan: _total(table, plan)) if feasible else plans[0]


DP_UNITS = 20000  # the budget's resolution in the dynamic programme
DP_CELLS = 100_000_000  # above this many (linears x units) only the greedy runs (a large mixture of experts)


def _programme(table: dict, sizes: dict, budget: float) -> dict[str, QuantSpec] | None:
    """Multiple-choice knapsack by dynamic programming over the budget in DP_UNITS steps, each linear's cost
    rounded up (so the plan always fits)."""
    import numpy as np

    unit = budget / DP_UNITS
    names = list(table)
    best = np.full(DP_UNITS + 1, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(names), DP_UNITS + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full_like(best, np.inf)
        for k, (_, bits, err) in enumerate(table[n]):
            c = int(np.ceil(bits * sizes[n] / unit - 1e-9))
            if c > DP_UNITS:
                continue
            cand = np.full_like(best, np.inf)
            cand[c:] = best[:DP_UNITS + 1 - c] + err
            better = cand < new
            new[better], picks[i][better] = cand[better], k
        best = new
    at = int(np.argmin(best))
    if not np.isfinite(best[at]):
        return None
    plan = {}
    for i in range(len(names) - 1, -1, -1):
        spec, bits, _ = table[names[i]][picks[i][at]]
        plan[names[i]] = spec
        at -= int(np.ceil(bits * sizes[names[i]] / unit - 1e-9))
    return plan


def _greedy(table: dict, sizes: dict, budget: float) -> dict[str, QuantSpec]:
    """Every linear at its cheapest option, then upgrades along each one's lower convex hull of (bits, error), the
    most error saved per bit first, while they fit; then the remaining budget spent off the hulls (_fill)."""
    hulls = {n: _hull(options) for n, options in table.items()}
    at = {n: 0 for n in hulls}
    spent = sum(hulls[n][0][1] * sizes[n] for n in hulls)
    heap = [(-_gain(hulls[n], 0), n) for n in hulls if len(hulls[n]) > 1]
    heapq.heapify(heap)
    while heap:
        _, n = heapq.heappop(heap)
        i, hull = at[n], hulls[n]
        cost = (hull[i + 1][1] - hull[i][1]) * sizes[n]
        if spent + cost > budget:
            continue  # this upgrade does not fit; a cheaper one elsewhere still may
        spent, at[n] = spent + cost, i + 1
        if i + 2 < len(hull):
            heapq.heappush(heap, (-_gain(hull, i + 1), n))
    return _fill({n: hulls[n][at[n]] for n in hulls}, table, sizes, budget - spent)


def _hull(options: list) -> list:
    """The lower convex hull of (bits, error), cheapest first: the options worth choosing."""
    pts = []
    for spec, bits, err in sorted(options, key=lambda o: (o[1], o[2])):
        if pts and err >= pts[-1][2]:
            continue  # more bits, no less error
        while len(pts) >= 2 and _cross(pts[-2], pts[-1], (spec, bits, err)) <= 0:
            pts.pop()
        pts.append((spec, bits, err))
    return pts


def _cross(a, b, c) -> float:
    return (b[1] - a[1]) * (c[2] - a[2]) - (b[2] - a[2]) * (c[1] - a[1])


def _gain(hull: list, i: int) -> float:
    """Error saved per bit by the upgrade from hull point i to i + 1."""
    return (hull[i][2] - hull[i + 1][2]) / max(hull[i + 1][1] - hull[i][1], 1e-12)


def _fill(chosen: dict, table: dict, sizes: dict, left: float) -> dict[str, QuantSpec]:
    """Spend what the greedy left: repeatedly the option off the hulls that saves the most error and still fits."""
    while True:
        best = None
        for n, (_, bits, err) in chosen.items():
            for option in table[n]:
                cost = (option[1] - bits) * sizes[n]
                if option[2] < err and cost <= left and (best is None or err - option[2] > best[0]):
                    best = (err - option[2], n, option, cost)
        if best is None:
            return {n: option[0] for n, option in chosen.items()}
        _, n, option, cost = best
        chosen[n], left = option, left - cost


def _uniform_plans(table: dict, sizes: dict, budget: float) -> list[dict]:
    """Every plan giving all linears one spec (where each has it) that fits the budget: the allocation is never
    worse, by its own measure, than a uniform format of the same size."""
    plans = []
    for spec in {s for options in table.values() for s, _, _ in options}:
        if all(any(s == spec for s, _, _ in options) for options in table.values()):
            plan = {n: spec for n in table}
            if _bits(table, sizes, plan) <= budget:
                plans.append(plan)
    return plans


def _bits(table: dict, sizes: dict, plan: dict) -> float:
    return sum(next(b for s, b, _ in table[n] if s == plan[n]) * sizes[n] for n in plan)


def _total(table: dict, plan: dict) -> float:
    return sum(next(e for s, _, e in table[n] if s == plan[n]) for n in plan)


@dataclasses.dataclass
class MixedPrecision:
    """--target-bits B with its measure and each linear's candidate specs (those its exports can hold)."""
    target: float
    measure: str
    allowed: dict[str, list[QuantSpec]]

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise LowbitError(f"unknown sensitivity measure {self.measure!r}; use one of {', '.join(MEASURES)}")

    def measure_errors(self, loaded, plan: dict, windows, placement, batch_size: int) -> dict[str, list]:
        """name -> [(spec, bits per weight, error)] from one float pass over the calibration windows."""
        from .engine import Engine

        fisher = self.output_fisher(loaded, plan, windows, placement) if self.measure == "fisher" else None
        probe = SensitivityProbe(lambda name, weight: self.allowed[name], self.measure, fisher)
        Engine(loaded, plan, [probe, REGISTRY["rtn"]()], windows, keep_in_memory=False, batch_size=batch_size,
               progress=False, placement=placement).run()
        table = {}
        for name, lp in plan.items():
            if lp.spec is None:
                continue
            found = probe.table.get(name)  # none: too few calibration tokens reached it (a rare expert)
            table[name] = [(s, stored_bits(s, lp.shape[1]), e) for s, e in found] if found else \
                [(lp.spec, stored_bits(lp.spec, lp.shape[1]), 0.0)]
        return table

    @staticmethod
    def output_fisher(loaded, plan: dict, windows, placement) -> dict:
        """The "fisher" measure's weights: a forward and backward pass of the whole float model per calibration
        window (the model must fit in memory at once; the block-by-block engine runs no backward pass)."""
        weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
        if placement.on_host and not fits_in_memory(weight_bytes, working_bytes=weight_bytes // 4):
            raise LowbitError(f"--sensitivity fisher runs the whole model at once ({weight_bytes / 2**30:.1f} GiB of "
                              f"weights), more than this machine has free; use --sensitivity relative")
        model = loaded.load_all()
        try:
            return output_fisher(model, [n for n, lp in plan.items() if lp.spec is not None], windows,
                                 placement.device)
        finally:
            loaded.release("")

    def choose(self, loaded, plan: dict, windows, placement, batch_size: int, quiet: bool):
        """(the plan with each linear's chosen spec, the exact-name overrides holding it, the record for the
        recipe)."""
        if not quiet:
            print(f"measuring the sensitivity of {sum(lp.spec is not None for lp in plan.values())} linears "
                  f"({self.measure} error of up to {len(self.candidates())} candidate formats each) ...",
                  file=sys.stderr, flush=True)
        table = self.measure_errors(loaded, plan, windows, placement, batch_size)
        sizes = {n: plan[n].shape[0] * plan[n].shape[1] for n in table}
        chosen = allocate(table, sizes, self.target)
        achieved = sum(stored_bits(s, plan[n].shape[1]) * sizes[n] for n, s in chosen.items()) / sum(sizes.values())
        new_plan = {n: dataclasses.replace(lp, spec=chosen[n], reason=f"--target-bits {self.target:g}")
                    if n in chosen else lp for n, lp in plan.items()}
        overrides = tuple(Override(n, (("bits", s.bits), ("group_size", s.group_size))) for n, s in chosen.items())
        record = {"target_bits": self.target, "achieved_bits": round(achieved, 4), "measure": self.measure,
                  "candidates": [s.short_name for s in self.candidates()]}
        return new_plan, overrides, record

    def candidates(self) -> list[QuantSpec]:
        """Every spec some linear may get."""
        return list(dict.fromkeys(s for specs in self.allowed.values() for s in specs))

"""INT8 static quantization of a whole ONNX decoder (weights and activations, QDQ), as in Quark's ONNX flow:

    rotation (QuaRot R1, optional) -> SmoothQuant (optional) -> static int8 QDQ

1. R1 on the graph (rotate.py), written to a temporary folder;
2. SmoothQuant: per-channel |x| maxima of every weight MatMul's input, gathered by running that graph in
   onnxruntime on lowbit's calibration windows (calibrate.gather_stats), scales chosen by the torch path's
   `smooth_scales` and folded into the op producing the input (fold.py: norm gammas, up_proj columns, V
   columns under MHA); a group with no fold target stays unscaled, with a note. Written to a second folder;
3. onnxruntime.quantization.quantize_static on that graph: QuantizeLinear/DequantizeLinear pairs on the
   planned MatMuls' activations (int8 symmetric, one static scale per tensor calibrated on the same windows,
   MinMax / Percentile / Entropy) and int8 symmetric weights (per channel or per tensor, from the scheme).
   Optionally some MatMuls keep float inputs (int8 weights only, `float_inputs` layer patterns) or take int16
   static inputs (`int16_inputs`: A16W8, for an input with a token outlier no int8 scale covers).

The output folder holds model.onnx + model.onnx.data (external data, so > 2 GB works), genai_config.json and
the tokenizer files, recipe.yaml and summary.json; it runs in onnxruntime and onnxruntime-genai.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..algorithms.smoothquant import smooth_scales
from ..algorithms.stats import MIN_CALIBRATION_TOKENS, InputStats
from ..errors import LowbitError, log
from ..job import JobResult
from ..recipe import matches
from ..results import LayerReport
from .fold import find_fold, fold
from .graph import OnnxDecoder
from .quantize import OnnxReport, carry_files, layer_units, written_size
from .write import GraphWriter

STATIC_SCHEMES = ("w_int8_a_int8_per_tensor_sym", "w_int8_a_int8_per_channel_sym")
STATIC_CHAINS = (("rtn",), ("smoothquant", "rtn"), ("rotation", "rtn"), ("rotation", "smoothquant", "rtn"))
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")


def static_int8_applies(recipe, chain) -> bool:
    """Whether the recipe is one the static INT8 flow runs (a scheme with static int8 activations, a chain of
    rtn / smoothquant / rotation)."""
    names = tuple(a.name for a in chain)
    return recipe.scheme.name in STATIC_SCHEMES and names in STATIC_CHAINS


def _check(recipe, chain, options, plan) -> None:
    if recipe.kv_cache is not None:
        raise LowbitError("--kv-cache-dtype is not available with ONNX static INT8; drop it")
    rot = next((a for a in chain if a.name == "rotation"), None)
    if rot is not None and (rot.r2 or rot.r4):
        raise LowbitError("rotation r2 / r4 is not available on the ONNX graph (R1 only); drop r2=true / r4=true")
    method = options.calibrate_method.lower()
    if method not in CALIBRATE_METHODS:
        raise LowbitError(f"unknown calibration method {options.calibrate_method!r}; use one of "
                          f"{', '.join(CALIBRATE_METHODS)}")
    if not 0 < options.percentile <= 100:
        raise LowbitError(f"percentile must lie in (0, 100], got {options.percentile}")
    if options.embedding_bits is not None or options.layers_8bit or options.mixed:
        raise LowbitError("--quantize-embedding and mixed INT4/INT8 layers are weight-only options; ONNX static "
                          "INT8 quantizes every planned MatMul to int8")
    weight = recipe.scheme.weight
    for lp in plan.values():
        if lp.spec is not None and lp.spec != weight:
            raise LowbitError(f"{lp.name}: per-layer overrides are not available with ONNX static INT8 (every "
                              f"quantized MatMul takes {recipe.scheme.name}); drop the override or exclude the layer")


def smooth_graph(decoder: OnnxDecoder, plan, windows: torch.Tensor, alpha: float, writer: GraphWriter,
                 providers=None, memory_budget: int = 4 << 30, progress: bool = True) -> dict[str, str]:
    """SmoothQuant folded into the graph: scales from the float statistics of each planned group's input, the
    group's rows multiplied and the fold target divided (an exact change of the float function). Changed
    initializers go to `writer`; returns notes {layer: why it stayed unscaled}."""
    from .calibrate import gather_stats

    units = layer_units(decoder, plan)
    columns = [{g[0].input: g[0].shape[1] for g in unit} for unit in units]
    vectors: dict[str, np.ndarray] = {}
    notes: dict[str, str] = {}

    def consume(indices: list[int], stats: dict[str, InputStats]) -> None:
        for i in indices:
            unit = units[i]
            weights = {mm.name: np.array(decoder.weight(mm)) for group in unit for mm in group}
            changed: set[str] = set()
            for group in unit:
                planned = [mm for mm in group if plan[mm.name].spec is not None]
                st = stats.get(group[0].input)
                if st is None or st.count < MIN_CALIBRATION_TOKENS:
                    continue
                target = find_fold(decoder, group)
                if target is None or (target.matmul is not None and target.matmul.name not in weights):
                    for mm in planned:
                        notes[mm.name] = "smoothquant: no op to fold scales into, not scaled"
                    continue
                s = smooth_scales([torch.from_numpy(weights[mm.name]).T for mm in planned], st, alpha)
                s_np = s.double().numpy()
                for name in target.vectors:
                    vectors.setdefault(name, np.array(decoder.array(name)))
                fold(target, s_np, vectors, weights)
                if target.matmul is not None:
                    changed.add(target.matmul.name)
                for mm in group:
                    weights[mm.name] = (weights[mm.name].astype(np.float64) * s_np[:, None]).astype(np.float32)
                    changed.add(mm.name)
            for group in unit:
                for mm in group:
                    if mm.name in changed:
                        writer.tensor(mm.weight, weights[mm.name].astype(mm.dtype))

    gather_stats(decoder, columns, windows, consume, gram=False, providers=providers, memory_budget=memory_budget,
                 progress=progress)
    for name, vector in vectors.items():
        writer.tensor(name, vector)
    return notes


class WindowReader:
    """onnxruntime's CalibrationDataReader over lowbit's calibration windows: one window per batch, fed like
    calibrate.gather_stats feeds them (an empty past); set_range lets the histogram calibrators go in strides."""

    def __init__(self, model_path: Path, windows: torch.Tensor, head_size: int | None):
        from ..runtimes import decoder_feeds, decoder_session

        session = decoder_session(model_path)
        self.feeds = [decoder_feeds(session, w[None].numpy().astype(np.int64), head_size) for w in windows]
        del session
        self.start, self.end = 0, len(self.feeds)
        self.pos = 0

    def get_next(self):
        if self.start + self.pos >= self.end:
            return None
        self.pos += 1
        return self.feeds[self.start + self.pos - 1]

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item

    def __len__(self):
        return len(self.feeds)

    def rewind(self):
        self.pos = 0

    def set_range(self, start_index: int, end_index: int):
        self.start, self.end, self.pos = start_index, min(end_index, len(self.feeds)), 0


def qdq_quantize(model_path: Path, output_path: Path, windows: torch.Tensor, nodes: list[str], per_channel: bool,
                 method: str = "minmax", percentile: float = 99.999, float_inputs: list[str] = (),
                 head_size: int | None = None, providers=None, reduce_range: bool = False,
                 int16_inputs: list[str] = ()) -> None:
    """onnxruntime's quantize_static (QDQ) of the MatMul nodes `nodes`: int8 symmetric weights (per channel
    along N, or per tensor) and int8 symmetric static per-tensor activations; the MatMuls in `float_inputs`
    keep float inputs (their activation Q/DQ removed afterwards, int8 weights kept). reduce_range: 7-bit weight
    codes, onnxruntime's advice for x86 CPUs without VNNI, whose u8 x s8 kernels saturate int16 pair sums.
    int16_inputs: MatMuls whose input activations get int16 (symmetric static per-tensor) Q/DQ instead of int8."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = WindowReader(model_path, windows, head_size)
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    # the scheme quantizes a MatMul's inputs; its output (qkv into attention, o_proj / down_proj into the residual
    # stream) stays float, as on the torch path (onnxruntime would add a Q/DQ pair there too by default)
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
             "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}, "OpTypesToExcludeOutputQuantization": ["MatMul"]}
    if int16_inputs:
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        tensors = {n.input[0] for n in graph.node if n.name in set(int16_inputs)}
        extra["TensorQuantOverrides"] = {t: [{"quant_type": QuantType.QInt16, "symmetric": True}] for t in tensors}
    if method != "minmax":
        # histogram calibrators hold every observed tensor of the windows in a stride: one window at a time
        extra.update({"CalibStridedMinMax": 1, "CalibPercentile": percentile,
                      "CalibTensorRangeSymmetric": True})
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" and per-node chatter
    try:  # onnxruntime's histogram calibrators print progress to stdout, which --json owns
        with contextlib.redirect_stdout(sys.stderr):
            quantize_static(str(model_path), str(output_path), reader, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["MatMul"], per_channel=per_channel, reduce_range=reduce_range,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=list(nodes), use_external_data_format=True,
                            calibrate_method=calibrate, calibration_providers=providers, extra_options=extra)
    finally:
        logging.getLogger().setLevel(level)
    if float_inputs:
        _drop_activation_qdq(output_path, set(float_inputs))


def _drop_activation_qdq(path: Path, names: set[str]) -> None:
    """Rewire the MatMuls `names` to read their float input (its Q -> DQ pair dropped when nothing else reads
    it); the weights keep their DequantizeLinear."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name in names:
            dq = producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear":
                continue
            node.input[0] = q.input[0]
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    while True:  # drop Q / DQ nodes nobody reads any more
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    onnx.save_model(model, str(path))


@dataclass
class StaticInt8Job:
    """Static INT8 QDQ of an ONNX decoder (pipeline.Job): optional R1 rotation and SmoothQuant written as
    intermediate graphs in a folder inside the staged output, then onnxruntime's static quantization."""
    source: str
    decoder: OnnxDecoder
    recipe: object
    chain: list
    plan: dict
    options: object  # OnnxOptions
    quiet: bool
    progress: bool
    nodes: list[str]  # the MatMul nodes to quantize
    float_inputs: list[str]  # nodes whose inputs stay float
    int16_inputs: list[str]  # nodes whose inputs get 16-bit codes
    windows: torch.Tensor | None = None

    @classmethod
    def checked(cls, source, decoder, recipe, chain, plan, options, quiet, progress) -> "StaticInt8Job":
        """The job of a checked plan; everything it cannot do is refused here, before any work."""
        _check(recipe, chain, options, plan)
        if any(a.name == "rotation" for a in chain):
            from .rotate import plan_rotation

            plan_rotation(decoder)
        planned = [mm for mm in decoder.matmuls if plan[mm.name].spec is not None]
        nodes = [mm.node.name for mm in planned]
        if not nodes or any(not n for n in nodes):
            raise LowbitError("ONNX static INT8 needs named MatMul nodes to quantize (none planned, or unnamed)")
        floats = [mm.node.name for mm in planned if any(matches(p, mm.name) for p in options.float_inputs)]
        int16 = [mm.node.name for mm in planned
                 if mm.node.name not in floats and any(matches(p, mm.name) for p in options.int16_inputs)]
        return cls(source, decoder, recipe, chain, plan, options, quiet, progress, nodes, floats, int16)

    def describe(self) -> dict:
        return {"scheme": self.recipe.scheme.name, "algorithms": [a.name for a in self.chain], "onnx_format": "qdq"}

    def prepare(self) -> torch.Tensor:
        from .calibrate import calibration_windows

        self.windows = calibration_windows(self.decoder, self.recipe)
        return self.windows

    def quantize(self, folder: Path) -> JobResult:
        phases, extra, notes = {}, {}, {}
        # intermediate graphs go in a folder inside the staged output (removed with it, even on a crash)
        with tempfile.TemporaryDirectory(prefix=".work-", dir=folder) as work:
            current = self._rotated(self.decoder, Path(work), phases, extra)
            current, notes = self._smoothed(current, Path(work), phases)
            t = time.perf_counter()
            self._qdq(current, folder)
            phases["qdq"] = time.perf_counter() - t
        carried = carry_files(self.decoder, folder)
        report = OnnxReport(layers=[LayerReport(mm.name, self.recipe.scheme.name, 0.0, self._note(mm, notes))
                                    for mm in self.decoder.matmuls if self.plan[mm.name].spec is not None])
        fields = {"static_int8": {**self._settings(), **extra}, "carried_files": carried}
        return JobResult(report.layers, report, fields, phases, errors_measured=False)

    def _rotated(self, current: OnnxDecoder, work: Path, phases: dict, extra: dict) -> OnnxDecoder:
        rot = next((a for a in self.chain if a.name == "rotation"), None)
        if rot is None:
            return current
        from .rotate import write_rotated

        t = time.perf_counter()
        log("rotating the residual stream (QuaRot R1)", self.quiet)
        _, extra["rotation"] = write_rotated(current, work / "rotated", rot.seed)
        phases["rotation"] = time.perf_counter() - t
        return OnnxDecoder(work / "rotated")

    def _smoothed(self, current: OnnxDecoder, work: Path, phases: dict) -> tuple[OnnxDecoder, dict]:
        sq = next((a for a in self.chain if a.name == "smoothquant"), None)
        if sq is None:
            return current, {}
        from .calibrate import providers_for

        t = time.perf_counter()
        (work / "smoothed").mkdir()
        writer = GraphWriter(current, work / "smoothed", current.path.name)
        notes = smooth_graph(current, self.plan, self.windows, sq.alpha, writer,
                             providers_for(self.options.execution_provider), self.options.memory_budget,
                             self.progress)
        writer.write()
        carry_files(current, work / "smoothed")
        phases["smoothquant"] = time.perf_counter() - t
        return OnnxDecoder(work / "smoothed"), notes

    def _qdq(self, current: OnnxDecoder, folder: Path) -> None:
        from ..runtimes import genai_decoder
        from .calibrate import providers_for

        o = self.options
        method = o.calibrate_method.lower()
        log(f"static int8 QDQ ({method} calibration, {len(self.windows)} windows)", self.quiet)
        qdq_quantize(current.path, folder / self.decoder.path.name, self.windows, self.nodes,
                     self.recipe.scheme.weight.granularity == "channel", method, o.percentile, self.float_inputs,
                     genai_decoder(self.decoder.folder).get("head_size"), providers_for(o.execution_provider),
                     o.reduce_range, self.int16_inputs)

    def _note(self, mm, notes: dict) -> str:
        return "; ".join(x for x in (notes.get(mm.name, ""), "float inputs" if mm.node.name in self.float_inputs
                                     else "", "int16 inputs" if mm.node.name in self.int16_inputs else "") if x)

    def _settings(self) -> dict:
        o, method = self.options, self.options.calibrate_method.lower()
        sq = next((a for a in self.chain if a.name == "smoothquant"), None)
        return {"calibrate_method": method, "per_channel_weights": self.recipe.scheme.weight.granularity == "channel",
                "percentile": o.percentile if method == "percentile" else None, "reduce_range": o.reduce_range,
                "smoothquant_alpha": sq.alpha if sq is not None else None,
                "float_inputs": [mm.name for mm in self.decoder.matmuls if mm.node.name in self.float_inputs],
                "int16_inputs": [mm.name for mm in self.decoder.matmuls if mm.node.name in self.int16_inputs]}

    def source_size(self) -> int:
        return self.decoder.size_bytes()

    def output_size(self, folder: Path) -> int:
        return written_size(folder, self.decoder)

    def evaluation_target(self, folder: Path):
        from ..model_files import load_tokenizer

        return "onnx", folder, load_tokenizer(folder)

"""Intel Neural Compressor (ONNX, package onnx-neural-compressor) INT4 weight-only runner.

    /work/peer-venvs/inc/bin/python benchmarks/peers/onnx_inc.py --model FOLDER --data DATA.npz --algo gptq \
        --block 128 --out OUT [--symmetric]

Algorithms: rtn, gptq and awq, run through onnx_neural_compressor.quantization.algorithm_entry with its
RTNConfig / GPTQConfig / AWQConfig (INC's defaults otherwise: GPTQ percdamp 0.01, no act order; AWQ with
scale search and MSE clip search). Each weight MatMul becomes a MatMulNBits; quant_last_matmul=False keeps
lm_head (the graph's last MatMul) float, as in lowbit's default. The model is given by path, so INC's own
graph-optimisation pass (MatMulNBitsQuantizer's) is skipped: the builder's graph is already fused.
GPTQ and AWQ run a full calibration sweep for each distinct MatMul input (about 120 x 32 forwards here).
"""

from __future__ import annotations

from onnx_common import CalibReader, copy_folder_files, load_calib, run, save_model

ALGOS = ["rtn", "gptq", "awq"]


def main(args, measure):
    from onnx_neural_compressor.quantization import algorithm_entry as entry
    from onnx_neural_compressor.quantization import config

    common = {"weight_bits": 4, "weight_group_size": args.block, "weight_sym": args.symmetric,
              "accuracy_level": 0, "quant_last_matmul": False}
    model = f"{args.model}/model.onnx"
    reader = CalibReader(args.model, load_calib(args.data))
    with measure:
        if args.algo == "rtn":
            quantized = entry.rtn_quantize_entry(model, config.RTNConfig(**common))
        elif args.algo == "gptq":
            quantized = entry.gptq_quantize_entry(model, config.GPTQConfig(**common), reader)
        else:
            quantized = entry.awq_quantize_entry(model, config.AWQConfig(**common), reader)
    save_model(getattr(quantized, "model", quantized), args.out)  # an ONNXModel wrapper or a ModelProto
    copy_folder_files(args.model, args.out)


if __name__ == "__main__":
    run("inc", ALGOS, main)

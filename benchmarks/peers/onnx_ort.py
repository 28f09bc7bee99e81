"""onnxruntime's own INT4 weight-only quantizer: onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer.

    /work/venv/bin/python benchmarks/peers/onnx_ort.py --model FOLDER --data DATA.npz --algo rtn --block 128 \
        --out OUT [--symmetric]

Algorithms: rtn (DefaultWeightOnlyQuantConfig: min/max round to nearest, asymmetric uint4 with a zero point,
or symmetric with --symmetric) and hqq (HQQWeightOnlyQuantConfig: half-quadratic optimisation of the zero
point, asymmetric only). Neither uses calibration data (DATA.npz is read only for a uniform command line).
Every weight MatMul becomes a MatMulNBits (QOperator format, accuracy_level left at its default 0) except
lm_head, which stays float as in lowbit's default and ModelOpt's.
"""

from __future__ import annotations

from onnx_common import copy_folder_files, run, save_model

ALGOS = ["rtn", "hqq"]
EXCLUDE = ["/lm_head/MatMul"]  # the builder's name for the (tied) lm_head MatMul


def main(args, measure):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if args.algo == "hqq" and args.symmetric:
        raise ValueError("onnxruntime's HQQ is asymmetric only (it optimises the zero point); drop --symmetric")
    if args.algo == "rtn":
        config = DefaultWeightOnlyQuantConfig(block_size=args.block, is_symmetric=args.symmetric)
    else:
        config = HQQWeightOnlyQuantConfig(block_size=args.block, bits=4)
    model = onnx.load(f"{args.model}/model.onnx", load_external_data=True)
    lm_head = [n.name for n in model.graph.node if n.name in EXCLUDE]
    with measure:
        quantizer = MatMulNBitsQuantizer(model, block_size=args.block, is_symmetric=args.symmetric,
                                         nodes_to_exclude=lm_head, algo_config=config)
        quantizer.process()
    save_model(quantizer.model.model, args.out)
    copy_folder_files(args.model, args.out)


if __name__ == "__main__":
    run("onnxruntime", ALGOS, main)

"""AMD Quark ONNX runner: INT4 weight-only MatMulNBits quantization with quark.onnx.

    /work/peer-venvs/quark-onnx/bin/python benchmarks/peers/onnx_quark.py --model FOLDER --data DATA.npz \
        --algo rtn --block 128 --out OUT [--symmetric]

Quark's ONNX int4 weight-only path is its MATMUL_NBITS preset (extra option UseMatMulNBits), which builds a
quark.onnx MatMulNBitsQuantizer. This runner builds that quantizer with Quark's own factory
(quark.onnx.quantizers.interface.create_matmul_nbits_quantizer, what ModelQuantizer.quantize_model calls)
so that lm_head can be kept float: the public API does not pass nodes_to_exclude on to it.

Algorithms: rtn (Quark's DEFAULT: onnxruntime's blockwise min/max kernel), hqq (asymmetric only) and gptq.
accuracy_level is 0 (the preset's 1 would let the kernel quantize activations to int8 on CPU).
Quark's GPTQ caveats, from its source: it ignores nodes_to_exclude (so lm_head is quantized too), and it
collects MatMul inputs from the first calibration window only, on the float model (no sequential update).
"""

from __future__ import annotations

from onnx_common import CalibReader, copy_folder_files, load_calib, run, save_model

ALGOS = ["rtn", "hqq", "gptq"]
EXCLUDE = ["/lm_head/MatMul"]


def main(args, measure):
    import onnx

    from quark.onnx.quantizers.interface import create_matmul_nbits_quantizer

    if args.algo == "hqq" and args.symmetric:
        raise ValueError("Quark's HQQ is asymmetric only; drop --symmetric")
    options = {"UseMatMulNBits": True,
               "MatMulNBitsParams": {"GroupSize": args.block, "Symmetric": args.symmetric, "Bits": 4,
                                     "AccuracyLevel": 0, "Algorithm": args.algo.upper().replace("RTN", "DEFAULT")},
               "GPTQParams": {"Bits": 4, "GroupSize": args.block, "WeightSymmetric": args.symmetric}}
    model = onnx.load(f"{args.model}/model.onnx", load_external_data=True)
    reader = CalibReader(args.model, load_calib(args.data))
    with measure:
        quantizer = create_matmul_nbits_quantizer(model, reader, options)
        quantizer.nodes_to_exclude = set(EXCLUDE)
        quantizer.quantize_model()
    save_model(quantizer.model.model, args.out)
    copy_folder_files(args.model, args.out)


if __name__ == "__main__":
    run("quark", ALGOS, main)

"""NVIDIA ModelOpt ONNX runner: INT4 weight-only quantization with modelopt.onnx.quantization.int4.quantize.

    /work/peer-venvs/modelopt/bin/python benchmarks/peers/onnx_modelopt.py --model FOLDER --data DATA.npz \
        --algo awq_lite --block 128 --out OUT [--symmetric]

Algorithms (ModelOpt's calibration_method names): rtn_dq (round to nearest, absmax/7 scale), awq_lite (AWQ
alpha search on the calibration windows; asymmetric = its use_zero_point) and awq_clip (weight-clipping
search, no AWQ scaling). rtn_dq and awq_clip are symmetric only in ModelOpt, so they need --symmetric.
The result is INT4 DequantizeLinear (blocked along the input axis) -> MatMul, which onnxruntime's CPU provider
fuses into MatMulNBits at load. lm_head stays float (ModelOpt's default exclusion, as in lowbit).

Without cupy/CUDA ModelOpt falls back to numpy. Two settings keep awq_lite usable there:
- enable_fast_path_using_high_sysram: one calibration sweep caches every MatMul input (about 7.5 GB here)
  instead of a full sweep per MatMul (~150 x 32 one-second forwards on this CPU);
- awqlite_fuse_nodes=False: the fusion of AWQ scales into the preceding norm calls cupy's .get() and fails
  under numpy; without it the scales become a Mul before each MatMul (per-node scales).
awq_clip has no such fast path: it runs a calibration sweep for every MatMul.
"""

from __future__ import annotations

from onnx_common import CalibReader, copy_folder_files, load_calib, run, save_model

ALGOS = ["rtn_dq", "awq_lite", "awq_clip"]


def main(args, measure):
    import onnx

    from modelopt.onnx.quantization import int4

    if args.algo != "awq_lite" and not args.symmetric:
        raise ValueError(f"ModelOpt's {args.algo} is symmetric only (no zero point); pass --symmetric")
    model = onnx.load(f"{args.model}/model.onnx", load_external_data=True)
    reader = CalibReader(args.model, load_calib(args.data))
    extra = {}
    if args.algo == "awq_lite" and not int4.has_cupy:
        extra = {"enable_fast_path_using_high_sysram": True, "awqlite_fuse_nodes": False}
    with measure:
        quantized = int4.quantize(model, calibration_method=args.algo, calibration_data_reader=reader,
                                  calibration_eps=["cpu"], use_zero_point=not args.symmetric,
                                  block_size=args.block, log_level="WARNING", **extra)
    del model
    save_model(quantized, args.out)
    copy_folder_files(args.model, args.out)


if __name__ == "__main__":
    run("modelopt", ALGOS, main)

"""Writers: each reads quantized results and writes files, nothing else (native now; AWQ, GPTQ,
compressed-tensors, GGUF and ONNX later)."""

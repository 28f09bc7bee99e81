"""The ONNX front end: quantize an ONNX decoder's weights in place of its MatMuls and embedding Gathers, with
the torch path's algorithms (graph.py reads, calibrate.py observes through onnxruntime, fold.py and
quantize.py apply the chain, write.py writes)."""

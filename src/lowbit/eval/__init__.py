"""Measuring a model: perplexity with torch (perplexity.py), onnxruntime (onnx_perplexity.py) and llama.cpp
(llama_cpp.py); lm-eval task accuracy (tasks.py), speed and size (speed.py), side by side (compare.py, report.py).

Nothing is imported here: a speed measurement's child process for onnxruntime-genai or llama.cpp loads no torch."""

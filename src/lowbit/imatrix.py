"""`lowbit imatrix MODEL -o FILE.gguf`: llama.cpp's importance matrix (the file `llama-imatrix` writes and
`llama-quantize --imatrix` reads; exporters/gguf_imatrix) computed by lowbit's calibration pass: one float pass
of the model over the calibration windows, block by block like every quantizer (so models larger than memory
work), recording each quantized linear's sum of squared input activations per column. The file feeds lowbit's own
GGUF export (`--imatrix`) as well as llama.cpp's quantizer."""

from __future__ import annotations

from pathlib import Path

from .algorithms import REGISTRY
from .algorithms.sensitivity import ImportanceProbe
from .errors import LowbitError
from .staging import check_output, staged


def compute_imatrix(model, output, dataset: str = "pydoc", num_calib_data: int = 128, seq_len: int = 512,
                    batch_size: int = 8, overwrite: bool = False, progress: bool = True) -> Path:
    """Write the importance matrix of `model` over its calibration windows to `output` (a .gguf path)."""
    from .api import make_recipe, plan_for
    from .engine import Engine
    from .engine.placement import Placement
    from .exporters.gguf import gguf_tensor_names
    from .exporters.gguf_imatrix import write_imatrix
    from .hf.model import open_model
    from .model_files import read_json
    from .torch_job import calibration_windows

    output = Path(output)
    if output.suffix.lower() != ".gguf":
        raise LowbitError(f"the imatrix output {output} must be a file path ending in .gguf")
    check_output(output, overwrite, [], is_file=True)
    loaded = open_model(model)
    recipe = make_recipe(scheme="w_int8_per_channel_sym", dataset=dataset, num_calib_data=num_calib_data,
                         seq_len=seq_len)
    plan = plan_for(loaded, recipe)
    names = gguf_tensor_names(read_json(loaded.folder / "config.json", "model config"),
                              [n for n, lp in plan.items() if lp.spec is not None])
    windows = calibration_windows(loaded.tokenizer(), recipe.calibration)
    probe = ImportanceProbe()
    Engine(loaded, plan, [probe, REGISTRY["rtn"]()], windows, keep_in_memory=False, batch_size=batch_size,
           progress=progress, placement=Placement()).run()
    entries = {names[n]: found for n, found in probe.sums.items() if n in names}
    with staged(output, overwrite, [], is_file=True) as tmp:
        write_imatrix(tmp, entries, dataset, windows.shape[0], windows.shape[1])
    return output

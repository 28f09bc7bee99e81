"""Resume: a checkpoint of a block-by-block run, kept in its staging folder (lowbit.staging keeps that folder
for the next run with resume), from which an interrupted run continues with byte-for-byte the same output.

After block k-1 is finished the checkpoint holds, in the staging folder's RESUME_DIR:
- the sink's snapshot (the packed tensors of blocks 0..k-1 are already in the output's shard files, flushed
  and fsynced; the snapshot records where each shard ends, so what a killed run wrote of block k is cut off);
- `inputs-k/`: the calibration activations entering block k, one file per calibration batch (none for a chain
  without calibration), and in `inputs-k/float/` the float model's, for a quantizer that needs both (GPTAQ);
- state.json: the fingerprint of the run, k, the engine's report so far and the files above.
Each file is written under a temporary name, fsynced and renamed, state.json last, and the previous block's
inputs are removed only after it: a kill at any moment leaves a complete earlier checkpoint.

The fingerprint names what the output depends on (source files, recipe, calibration windows, working precision,
lowbit and torch versions); a checkpoint whose fingerprint differs from this run's is refused with what differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LowbitError
from ..hf.capture import moved
from ..staging import RESUME_DIR, RESUME_STATE

FINGERPRINT_PARTS = {"source": "source model files", "recipe": "recipe (scheme, algorithms, calibration settings)",
                     "calibration": "calibration windows", "precision": "device and --calib-dtype",
                     "lowbit": "lowbit version", "torch": "torch version", "ranks": "number of processes"}


def _write(path: Path, write) -> None:
    """write(temporary path), fsync it, rename it to path."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpoint:
    """The resume checkpoint of a run whose output is staged in `folder`."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        self.dir = self.folder / RESUME_DIR
        self.fingerprint = fingerprint

    def load(self) -> dict | None:
        """The state of the interrupted run this folder holds (None: nothing to resume); a checkpoint of a
        different run (fingerprint) is refused."""
        path = self.dir / RESUME_STATE
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
            saved = state["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise LowbitError(f"the resume checkpoint {path} is damaged; delete {self.folder} to start over") from None
        differ = [FINGERPRINT_PARTS[k] for k in FINGERPRINT_PARTS if saved.get(k) != self.fingerprint.get(k)]
        if differ:
            raise LowbitError(f"cannot resume from {self.folder}: this run's {', '.join(differ)} differ from the "
                              f"interrupted run's; rerun its command unchanged, or delete {self.folder} to start over")
        return state

    def inputs(self, state: dict, placement, stream: str = "") -> list | None:
        """The saved inputs of the next block, held as the engine holds activations (placement); `stream`
        "float": the float model's."""
        if state.get("inputs") is None:
            return None
        folder, count = self.dir / state["inputs"], state["chunks"]
        if isinstance(count, list):  # several processes: each its own share
            folder, count = folder / f"rank-{placement.ranks.rank}", count[placement.ranks.rank]
        folder = folder / stream if stream else folder
        chunks = []
        for j in range(count):
            hidden, kwargs = torch.load(folder / f"{j}.pt", map_location="cpu", weights_only=True)
            chunks.append((placement.activations(hidden.to(placement.dtype)), moved(kwargs, placement.device)))
        return chunks

    def save(self, done: int, engine_state: dict, sink_state: dict, inputs: list | None, placement,
             float_inputs: list | None = None) -> None:
        """Record that blocks 0..done-1 are finished (their tensors already handed to the sink) and the inputs
        of block `done`. With several processes each saves its own share of the inputs (`inputs-k/rank-R/`) and
        rank 0, once every share is saved, the state."""
        ranks = placement.ranks
        self.dir.mkdir(parents=True, exist_ok=True)
        name = None
        if inputs is not None:
            name = f"inputs-{done}"
            folder = self.dir / name / f"rank-{ranks.rank}" if ranks.distributed else self.dir / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for j, (held, kwargs) in enumerate(inputs):
                chunk = (placement.fetch(held).cpu(), moved(kwargs, "cpu"))
                _write(folder / f"{j}.pt", lambda p, c=chunk: torch.save(c, p))
            if float_inputs is not None:  # the same windows in the float model (kwargs: the chunks' above)
                (folder / "float").mkdir()
                for j, (held, _) in enumerate(float_inputs):
                    chunk = (placement.fetch(held).cpu(), None)
                    _write(folder / "float" / f"{j}.pt", lambda p, c=chunk: torch.save(c, p))
        counts = ranks.gather(len(inputs) if inputs is not None else 0)  # also: every share is on disk now
        if not ranks.is_writer:
            return
        state = {"fingerprint": self.fingerprint, "done": done, "engine": engine_state, "sink": sink_state,
                 "inputs": name, "chunks": counts if ranks.distributed else counts[0]}
        _write(self.dir / RESUME_STATE, lambda p: p.write_text(json.dumps(state)))
        for old in self.dir.glob("inputs-*"):
            if old.name != name and old.name.split("-")[-1].isdigit() and int(old.name.split("-")[-1]) < done:
                shutil.rmtree(old, ignore_errors=True)

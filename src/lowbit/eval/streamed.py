"""Perplexity of a model larger than memory: every window goes through decoder block i, then block i + 1, with
the weights of one block loaded at a time (plus the embedding at the start, the final norm and lm_head at the
end). The same protocol, and the same figure, as perplexity.perplexity on the model held whole.

Nothing is known of the family's internals: each block is replaced, in its parent ModuleList, by a BlockStub,
and the model's own forward runs with only the modules outside the blocks loaded. A first pass records what
each block receives (hidden states and its own keyword arguments: Gemma's and Qwen's sliding-window layers get
another mask than their full-attention layers) and passes the hidden states on; then each real block turns
every batch's hidden states into the next block's; a last forward, whose stubs return the final hidden states,
gives the logits through the model's own final norm and lm_head."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..arch import block_of
from ..errors import LowbitError
from ..hf.capture import CACHE_KWARGS, StopForward, first_window
from ..memory import return_freed_memory_to_os
from .perplexity import PerplexityResult, windowed_perplexity

# keyword arguments that carry (or ask for) a KV cache: dropped, so no block call appends to one
DROPPED_KWARGS = CACHE_KWARGS + ("cache",)


class BlockStub(nn.Module):
    """Stands in for decoder block `index` during a forward of the whole model and hands the call to the
    stream. Attribute reads the model makes of the block (its attention type, a flag) reach the original."""

    def __init__(self, original: nn.Module, index: int, stream: "BlockStream"):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: the block's parameters stay its own
        object.__setattr__(self, "_stream", stream)
        self.index = index

    def forward(self, *args, **kwargs):
        return self._stream.at_block(self.index, args, kwargs)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_original"), name)


class HiddenStore:
    """The hidden states of every batch between two blocks: held in memory, or with a folder, one file per
    batch there (read back one batch at a time)."""

    def __init__(self, folder: Path | None):
        self.folder = folder
        self.items: dict[int, torch.Tensor] = {}
        self.bytes = 0  # what one copy of every batch takes

    def put(self, k: int, hidden: torch.Tensor) -> None:
        if self.folder is None:
            self.items[k] = hidden
            return
        tmp = self.folder / f"{k}.tmp"
        try:
            torch.save(hidden.contiguous(), tmp)
            os.replace(tmp, self.folder / f"{k}.pt")
        except OSError as exc:
            raise LowbitError(f"cannot write the hidden states to {self.folder} ({exc.strerror or exc}); free space "
                              f"there or give another --offload-dir") from None

    def get(self, k: int) -> torch.Tensor:
        if self.folder is None:
            return self.items[k]
        return torch.load(self.folder / f"{k}.pt", weights_only=True)


class BlockStream:
    """One streamed evaluation of a LoadedModel (hf.model) over batches of token windows."""

    def __init__(self, loaded, batches: list[torch.Tensor], store: HiddenStore):
        self.loaded, self.batches, self.store = loaded, batches, store
        self.blocks = list(loaded.layout.blocks)
        self.stubs = [BlockStub(b, i, self) for i, b in enumerate(self.blocks)]
        self.inputs: list[list] = [[] for _ in self.blocks]  # per block, per batch: (extra args, kwargs)
        self.tuple_length: int | None = None  # a block returns a tensor (None) or a tuple of this length
        self.mode, self.batch, self.passed = "record", 0, None

    # -- the whole model's forward, blocks stubbed ---------------------------------------------------
    @contextmanager
    def stubbed(self):
        blocks = self.loaded.layout.blocks
        for i, stub in enumerate(self.stubs):
            blocks._modules[str(i)] = stub
        try:
            yield
        finally:
            for i, block in enumerate(self.blocks):
                blocks._modules[str(i)] = block

    def at_block(self, i: int, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.mode == "final":
            return self._shaped(self.store.get(self.batch))
        if i == 0:
            self.store.put(self.batch, hidden)
        elif hidden is not self.passed:
            raise LowbitError(f"{type(self.loaded.model).__name__} changes the hidden states between decoder blocks "
                              f"{i - 1} and {i} (or calls them out of order), which a streamed evaluation cannot "
                              f"follow; evaluate with --no-stream")
        kept = {k: v for k, v in kwargs.items() if k not in DROPPED_KWARGS}
        self.inputs[i].append((tuple(args[1:]), kept))
        if self.tuple_length is None and i == 0:
            self.tuple_length = self._probe_convention(hidden, args[1:], kept)
        if i + 1 == len(self.blocks):
            raise StopForward  # the final norm and lm_head run in the last pass, with the final states
        self.passed = hidden
        return self._shaped(hidden)

    def _shaped(self, hidden: torch.Tensor):
        """hidden as the real blocks return it: the tensor, or a tuple padded with None."""
        return hidden if self.tuple_length in (None, 0) else (hidden,) + (None,) * (self.tuple_length - 1)

    def _probe_convention(self, hidden, args, kwargs) -> int:
        """Run block 0 once (on one window when nothing but keywords come with the hidden states): 0 when it
        returns a tensor, else its tuple's length."""
        if not args:
            (hidden, kwargs), = first_window([(hidden, kwargs)])
        with self.real_block(0) as block:
            out = block(hidden, *args, **kwargs)
        return len(out) if isinstance(out, tuple) else 0

    @contextmanager
    def real_block(self, i: int):
        """Block i with its weights (and its run-time hooks), dropped again after. Its place in the ModuleList
        holds the block itself while its weights load and go (materialize and release look there), and
        whatever held it before (a stub, during a stubbed forward) while it runs."""
        prefix = self.loaded.layout.block_prefix(i)
        blocks = self.loaded.layout.blocks
        held = blocks._modules[str(i)]
        blocks._modules[str(i)] = self.blocks[i]
        try:
            self.loaded.materialize(prefix)
            self.loaded.attach_runtime(prefix)
            blocks._modules[str(i)] = held
            yield self.blocks[i]
        finally:
            blocks._modules[str(i)] = self.blocks[i]
            self.loaded.release(prefix)
            blocks._modules[str(i)] = held
            return_freed_memory_to_os()

    # -- the passes ------------------------------------------------------------------------------------
    def record(self) -> None:
        """Run the model up to its last block on every batch: block 0's inputs stored, every block's arguments
        recorded."""
        for k, batch in enumerate(self.batches):
            self.batch = k
            try:
                with self.stubbed():
                    self.loaded.model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
            if any(len(inputs) != k + 1 for inputs in self.inputs):
                raise LowbitError(f"{type(self.loaded.model).__name__} did not call each of its {len(self.blocks)} "
                                  f"decoder blocks once per forward, which a streamed evaluation needs; evaluate "
                                  f"with --no-stream")

    def run_block(self, i: int) -> None:
        """Every batch's hidden states through the real block i (with what the model gave it), in place."""
        with self.real_block(i) as block:
            for k in range(len(self.batches)):
                args, kwargs = self.inputs[i][k]
                out = block(self.store.get(k), *args, **kwargs)
                self.store.put(k, out[0] if isinstance(out, tuple) else out)
        self.inputs[i] = []  # its masks and position embeddings are no longer needed by this block

    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The model's logits of one batch, its blocks answered by the stored final hidden states."""
        with self.stubbed():
            logits = self.loaded.model(input_ids=batch, use_cache=False).logits
        self.batch += 1
        return logits


def outside_modules(loaded, with_head: bool) -> list[str]:
    """Names of the parameters outside the decoder blocks (the embedding, the final norm, lm_head), without
    the output embedding's unless with_head (a tied lm_head is loaded as its source's tensor)."""
    head = loaded.model.get_output_embeddings()
    head_name = next((n for n, m in loaded.model.named_modules() if m is head), None) if head is not None else None
    return [n for n, _ in loaded.model.named_parameters(remove_duplicate=False)
            if block_of(loaded.layout, n) is None
            and (with_head or head_name is None or not n.startswith(head_name + "."))]


def load_outside(loaded, names: list[str]) -> None:
    for name in names:
        loaded.materialize(name)
        loaded.attach_runtime(name.rpartition(".")[0] + ".")


def streamed_perplexity(loaded, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                        offload_dir: str | Path | None = None) -> PerplexityResult:
    """Perplexity of a LoadedModel (hf.model.open_model) over token windows (n, seq_len), one decoder block in
    memory at a time; the hidden states of every window are held between blocks (in memory, or with offload_dir
    in a temporary folder made there, one file per batch). Gives perplexity.perplexity's figure on the model
    held whole."""
    start = time.perf_counter()
    loaded.model.eval()
    with _spill_folder(offload_dir) as tmp:
        stream = BlockStream(loaded, list(windows.split(batch_size)), HiddenStore(Path(tmp) if tmp else None))
        with torch.inference_mode():
            head_less = outside_modules(loaded, with_head=False)
            load_outside(loaded, head_less)
            stream.record()
            for name in head_less:
                loaded.release(name)
            bar = tqdm(range(len(stream.blocks)), desc="blocks", unit="block", file=sys.stderr,
                       disable=not progress, dynamic_ncols=True)
            for i in bar:
                stream.run_block(i)
            bar.close()
            with without_token_embedding(loaded) as spared:
                everything = [n for n in outside_modules(loaded, with_head=True)
                              if spared is None or not n.startswith(spared + ".")]
                load_outside(loaded, everything)
                stream.mode, stream.batch = "final", 0
                try:
                    result = windowed_perplexity(stream.logits, windows, batch_size, progress)
                    result.seconds = time.perf_counter() - start  # the block passes included
                    return result
                finally:
                    for name in everything:
                        loaded.release(name)


class ZeroEmbedding(nn.Module):
    """Stands in for the token embedding in the last pass, whose blocks answer with the stored final states:
    zeros of the right shape, so the embedding matrix need not be loaded."""

    def __init__(self, width: int, dtype: torch.dtype):
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, input_ids, *args, **kwargs):
        return torch.zeros(*input_ids.shape, self.width, dtype=self.dtype)


@contextmanager
def without_token_embedding(loaded):
    """The token embedding replaced by a ZeroEmbedding for the duration; yields its name, or None (nothing
    replaced) when lm_head shares its weight or the model has no plain embedding."""
    model = loaded.model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is emb), None)
    shared = (head is not None and head.weight is emb.weight) or any(
        source.startswith(f"{name}.") for source in [*loaded.layout.tied.values(), *loaded.untied.values()])
    if not isinstance(emb, nn.Embedding) or not name or shared:
        yield None
        return
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parent._modules[attr] = ZeroEmbedding(emb.embedding_dim, loaded.dtype)
    try:
        yield name
    finally:
        parent._modules[attr] = emb


@contextmanager
def _spill_folder(offload_dir):
    """A temporary folder under offload_dir, removed after (None without offload_dir)."""
    if offload_dir is None:
        yield None
        return
    try:
        tmp = tempfile.TemporaryDirectory(prefix="lowbit-stream-", dir=offload_dir)
    except OSError as exc:
        raise LowbitError(f"cannot make a folder in --offload-dir {offload_dir} ({exc.strerror or exc})") from None
    with tmp as name:
        yield name


def hidden_bytes(loaded, windows: torch.Tensor) -> int:
    """What streamed_perplexity holds between blocks (bytes): one hidden-state tensor per window, in the model's
    dtype."""
    width = getattr(loaded.model.config.get_text_config(), "hidden_size", None) or 0
    return windows.numel() * width * torch.finfo(loaded.dtype).bits // 8


def largest_block_params(loaded) -> int:
    """The parameter count of the largest decoder block: what a stream holds of the blocks at once."""
    return max(sum(p.numel() for p in block.parameters()) for block in loaded.layout.blocks)


def all_blocks_params(loaded) -> int:
    """The parameter count of every decoder block together; the rest of the model's is outside them."""
    return sum(p.numel() for block in loaded.layout.blocks for p in block.parameters())

"""Rotation on the torch path: applies the `rotation` chain element to a lazily loaded model.

Every parameter is rotated as it is read from disk (LoadedModel.after_materialize), so a block released and
loaded again comes back rotated, and the model is never held whole. The roles (which linears read or write the
stream, which norm feeds which reader) are found by probing block 0 (arch.stream); every block is checked as
it is loaded: its output on the rotated probe must equal its old output rotated, or quantization stops.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.hadamard import Rotation
from ..algorithms.rotation import (Rotate, absorb_and_rotate_reader, online_rotation, rotate_head_inputs,
                                   rotate_head_outputs, rotate_input, rotate_vector, rotate_writer)
from ..arch import block_of, set_module_tensor
from ..arch.stream import StreamRoles, find_stream_roles, gain, identity_weight, norm_like, norm_rule, subtracts_mean
from ..errors import LowbitError
from .actquant import attach_online_rotation, detach_online_rotation
from .capture import capture_block_inputs, first_window
from .model import LoadedModel

PROBE_TOKENS = 16
def _tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def _block_output(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    with torch.no_grad():
        out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Rotator:
    """The rotation of one model: discovered and checked by prepare(), then applied to each parameter loaded."""

    def __init__(self, loaded: LoadedModel, algo: Rotate, probe_ids: torch.Tensor):
        self.loaded, self.algo = loaded, algo
        model = loaded.model
        self.width = model.get_input_embeddings().weight.shape[1]
        self.probe_ids = probe_ids[:1, :PROBE_TOKENS]
        names = {id(m): n for n, m in model.named_modules()}
        head = model.get_output_embeddings()
        if head is None or id(head) not in names:
            raise LowbitError(f"{type(model).__name__} has no output embedding (lm_head) to rotate; quantize "
                              f"without rotation")
        self.lm_head = names[id(head)]
        self.roles: dict[tuple, StreamRoles] = {}  # per block structure (its linears' relative names)
        # per block structure, for R2: (value projection, output projection, first row of the values in the
        # value projection's output: 0, or where v starts in a fused qkv projection)
        self.heads: dict[tuple, tuple[str, str, int]] = {}
        self.q: Rotation | None = None
        self.head_q: Rotation | None = None
        self.online: dict[str, dict] = {}  # linear -> {"size": n}: rotated online (R4)
        self.max_error = 0.0  # largest relative change of a block's function (float rounding only)
        self.final_norm: tuple[str, str] | None = None  # (module, rule)
        self.final_mean = False  # whether the final norm subtracts the mean (LayerNorm)
        self.embeddings: list[str] = []  # modules writing embeddings into the stream

    # -- discovery ------------------------------------------------------------------------------------
    def prepare(self) -> dict:
        """Find the roles, build Q, untie lm_head from the embeddings, hook into loading and check block 0."""
        loaded, model, layout = self.loaded, self.loaded.model, self.loaded.layout
        outside = [n for n, _ in model.named_parameters() if block_of(layout, n) is None
                   and not n.startswith(self.lm_head + ".")]
        for name in outside:
            loaded.materialize(name)
        self.probe = first_window(capture_block_inputs(model, layout.blocks[0], [self.probe_ids]))[0]
        self._outside_roles()
        for name in outside:
            loaded.release(name)
        prefix = layout.block_prefix(0)
        loaded.materialize(prefix)
        roles = self._roles(layout.blocks[0])
        if self.final_norm and self.final_mean != roles.subtracts_mean:
            raise LowbitError("rotation needs one kind of norm; the final norm differs from the blocks' norms")
        self.q = Rotation(self.width, self.algo.seed, keep_mean=roles.subtracts_mean)
        if self.algo.r2:
            head_dim = self._head_dim()
            self.head_q = Rotation(head_dim, self.algo.seed + 1)
            self._find_heads(layout.blocks[0])
        loaded.release(prefix)
        weight = f"{self.lm_head}.weight"
        if weight in layout.tied:
            loaded.untie(weight)
        loaded.after_materialize = self._on_materialize
        loaded.materialize(prefix)  # rotate and check block 0 now, before any quantization work
        loaded.release(prefix)
        return self.summary()

    def summary(self) -> dict:
        out = {"hidden": self.width, "matrix": self.q.kind if self.q else None, "seed": self.algo.seed,
               "mean_preserving": bool(self.q and self.q.keep_mean), "r2": self.algo.r2, "r4": self.algo.r4,
               "max_block_error": float(f"{self.max_error:.3g}")}
        if self.head_q is not None:
            out["head_matrix"] = self.head_q.kind
        if self.online:
            sizes = sorted({d["size"] for d in self.online.values()})
            out["online"] = {"linears": len(self.online), "matrix": [online_rotation(n).kind for n in sizes]}
        return out

    def _outside_roles(self) -> None:
        """Embeddings into the stream, the final norm before lm_head; anything else outside the blocks with
        weights is refused (a projection between embedding and stream width, an extra norm)."""
        model, layout = self.loaded.model, self.loaded.layout
        norms = []
        for name, module in model.named_modules():
            if block_of(layout, name) is not None or name == layout.blocks_path or not list(
                    module.parameters(recurse=False)) or name == self.lm_head:
                continue
            if isinstance(module, nn.Embedding) and module.embedding_dim == self.width:
                self.embeddings.append(name)
            elif norm_like(module, self.width):
                norms.append(name)
            else:
                raise LowbitError(f"rotation does not know what {name} ({type(module).__name__}) does to the "
                                  f"residual stream; quantize this model without rotation")
        if len(norms) > 1:
            raise LowbitError(f"rotation found several norms outside the blocks ({', '.join(norms)}); only a final "
                              f"norm before lm_head is supported")
        if norms:
            rule = norm_rule(model.get_submodule(norms[0]))
            if rule is None:
                raise LowbitError(f"rotation cannot absorb the final norm {norms[0]}; quantize without rotation")
            self.final_norm = (norms[0], rule)
            self.final_mean = subtracts_mean(model.get_submodule(norms[0]), rule)

    def _run(self, block: nn.Module, rotated: bool = False) -> torch.Tensor:
        hidden, kwargs = self.probe
        dtype = next(block.parameters()).dtype
        x = self.q.right(hidden.double()).to(dtype) if rotated else hidden.to(dtype)
        return _block_output(block, x, kwargs)

    @staticmethod
    def _key(block: nn.Module) -> tuple:
        return tuple(n for n, m in block.named_modules() if isinstance(m, nn.Linear))

    def _roles(self, block: nn.Module) -> StreamRoles:
        """The block's roles, probed on the raw (unrotated) block the first time its structure is seen."""
        key = self._key(block)
        if key not in self.roles:
            self.roles[key] = find_stream_roles(block, lambda: self._run(block), self.width)
            if self.head_q is not None:
                self._find_heads(block)
        return self.roles[key]

    def _head_dim(self) -> int:
        config = self.loaded.model.config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(config, "head_dim", None) or self.width // config.num_attention_heads
        return int(head_dim)

    def _find_heads(self, block: nn.Module) -> None:
        """The value / output projections for R2: the reader rows (all, or a trailing run of heads in a fused
        qkv projection) and the writer whose per-head rotation leaves the raw block's output unchanged."""
        key = self._key(block)
        roles, d = self.roles[key], self.head_q.n
        reference = self._run(block)
        tol = _tolerance(reference.dtype)
        writers = [w for w in roles.writers if block.get_submodule(w).in_features % d == 0]
        for reader in roles.readers:
            r = block.get_submodule(reader)
            for start in range(0, r.out_features, d) if writers and r.out_features % d == 0 else ():
                for writer in writers:
                    if self._heads_keep_output(block, (reader, writer, start), reference, tol):
                        self.heads[key] = (reader, writer, start)
                        return
        raise LowbitError("rotation r2 found no value / output projection pair in the blocks (a per-head rotation "
                          "of a reader and a writer that keeps the block's output); drop r2")

    def _heads_keep_output(self, block, heads, reference, tol) -> bool:
        r, w = block.get_submodule(heads[0]), block.get_submodule(heads[1])
        saved = [(m, k, p.detach().clone()) for m in (r, w) for k, p in m.named_parameters(recurse=False)]
        try:
            with torch.no_grad():
                r.weight.copy_(self._value_rows(r.weight, heads[2]))
                if r.bias is not None:
                    r.bias.copy_(self._value_rows(r.bias, heads[2]))
                w.weight.copy_(rotate_head_inputs(w.weight, self.head_q))
            out = self._run(block)
        finally:
            with torch.no_grad():
                for m, k, p in saved:
                    getattr(m, k).copy_(p)
        return bool((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12) < tol)

    def _value_rows(self, tensor: torch.Tensor, start: int) -> torch.Tensor:
        """A value projection's weight or bias with the rows from `start` on rotated head by head."""
        return torch.cat([tensor[:start], rotate_head_outputs(tensor[start:], self.head_q)])

    # -- applying ---------------------------------------------------------------------------------------
    def _on_materialize(self, names: list[str]) -> None:
        layout = self.loaded.layout
        blocks: dict[int, list[str]] = {}
        for name in names:
            i = block_of(layout, name)
            if i is None:
                self._rotate_outside(name)
            else:
                blocks.setdefault(i, []).append(name)
        for i, block_names in blocks.items():
            self._rotate_block(i, block_names)

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        set_module_tensor(self.loaded.model, name, tensor)

    def _raw(self, name: str) -> torch.Tensor:
        return self.loaded.read(name).to(self.loaded.dtype)

    def _rotate_outside(self, name: str) -> None:
        module, _, attr = name.rpartition(".")
        p = self.loaded.model.get_parameter(name).detach()
        if module in self.embeddings:
            self._set(name, rotate_vector(p, self.q))
        elif module == self.lm_head and attr == "weight":
            g = gain(self.final_norm[1], self._raw(f"{self.final_norm[0]}.weight")) if self.final_norm else None
            self._set(name, absorb_and_rotate_reader(p, self.q, g))
        elif self.final_norm and module == self.final_norm[0]:
            self._set(name, self._plain_norm(module, self.final_norm[1], attr, p))

    def _plain_norm(self, module: str, rule: str, attr: str, p: torch.Tensor) -> torch.Tensor:
        """A norm whose gain moved into its readers: weight -> no gain; bias b -> (b / gain) Q, so that the
        readers, which now multiply by the gain, see the old bias in the rotated basis."""
        if attr == "weight":
            return identity_weight(rule, p)
        g = gain(rule, self._raw(f"{module}.weight")).double()
        if bool(((g.abs() < 1e-12) & (p != 0)).any()):
            raise LowbitError(f"rotation cannot move the bias of {module} past a zero gain; quantize without rotation")
        return rotate_vector((p.double() / torch.where(g == 0, 1, g)).to(p.dtype), self.q)

    def _rotate_block(self, index: int, names: list[str]) -> None:
        layout = self.loaded.layout
        block, prefix = layout.blocks[index], layout.block_prefix(index)
        whole = {prefix + n for n, _ in block.named_parameters()} <= set(names)
        if not whole:
            raise LowbitError(f"internal: rotation needs block {index} loaded whole, got {len(names)} tensors")
        for m in block.modules():  # a block loaded again: its weights are raw again, so is its input
            detach_online_rotation(m)
        reference = self._run(block)
        roles = self._roles(block)
        heads = self.heads.get(self._key(block))
        online = roles.writers[-1] if self.algo.r4 and roles.writers else None
        for name in names:
            rel = name[len(prefix):]
            module, _, attr = rel.rpartition(".")
            p = self.loaded.model.get_parameter(name).detach()
            if module in roles.readers:
                if attr == "weight":
                    norm = roles.readers[module]
                    g = gain(roles.norm_rules[norm], self._raw(f"{prefix}{norm}.weight"))
                    p = absorb_and_rotate_reader(p, self.q, g)
                if heads and module == heads[0]:
                    p = self._value_rows(p, heads[2])
            elif module in roles.norm_rules:
                p = self._plain_norm(prefix + module, roles.norm_rules[module], attr, p)
            elif module in roles.writers:
                if attr == "weight":
                    if heads and module == heads[1]:
                        p = rotate_head_inputs(p, self.head_q)
                    if module == online:
                        p = rotate_input(p, online_rotation(p.shape[1]))
                    p = rotate_writer(p, self.q)
                else:
                    p = rotate_vector(p, self.q)
            else:
                continue
            self._set(name, p)
        if online is not None:
            linear = block.get_submodule(online)
            attach_online_rotation(linear, online_rotation(linear.in_features))
            self.online[prefix + online] = {"size": linear.in_features}
        out = self._run(block, rotated=True)
        expected = self.q.right(reference.double())
        error = ((out.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
        self.max_error = max(self.max_error, error)
        if error > _tolerance(out.dtype):
            raise LowbitError(f"rotation changed what block {index} computes (relative error {error:.2e}): this "
                              f"architecture's block is not a plain pre-norm residual block (post-norms, "
                              f"sandwich norms?); quantize without rotation")

"""LoRA deltas on the backbone's projections: trained by cee-train, shipped in the heads file.

For a target projection W (out, in) of layer i the delta is s B A, A (r, in), B (out, r), s =
alpha / r (Hu et al., 2021). B starts at zero, so a new LoRA is the base model. Targets name
slices of our fused weights: q, k, v are the row blocks of `wqkv`, gate and up those of `w13`,
o and down the whole `wo` and `w2`.

Two ways to apply it, one set of tensors:
- `attach(net)` while training: forward hooks add s B (A x) to the slice of each target's output,
  the base weights untouched and frozen (gradients reach A and B only).
- `merge(net)` at load time: W[slice] += s B A once, after which decoding is the plain model at
  plain speed (no extra matmuls per token). The model's provenance record (weights/provenance.py)
  notes it, so the same deltas are never added twice and heads of another fine-tune are refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cee_gen.errors import CeeGenError
from cee_gen.model import ModelArgs, Transformer
from cee_gen.weights.lowbit import QuantLinear

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _where(a: ModelArgs, t: str) -> tuple[str, str, int, int, int]:
    """target -> (block submodule, linear name, first output row, output rows, input size)."""
    q, kv, inter, d = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size, a.dim
    return {
        "q": ("attention", "wqkv", 0, q, d),
        "k": ("attention", "wqkv", q, kv, d),
        "v": ("attention", "wqkv", q + kv, kv, d),
        "o": ("attention", "wo", 0, d, q),
        "gate": ("feed_forward", "w13", 0, inter, d),
        "up": ("feed_forward", "w13", inter, inter, d),
        "down": ("feed_forward", "w2", 0, d, inter),
    }[t]


def parse_targets(spec: str) -> list[str]:
    ts = [t.strip() for t in spec.split(",") if t.strip()]
    if not ts or any(t not in TARGETS for t in ts):
        raise CeeGenError(f"LoRA targets {spec!r}: use a comma list of {', '.join(TARGETS)} (e.g. q,v)")
    return [t for t in TARGETS if t in ts]  # canonical order


class LoRA(nn.Module):
    """Low-rank deltas for `targets` of every layer. Parameters are named `<layer>_<target>_{A,B}`."""

    def __init__(self, args: ModelArgs, rank: int, targets: list[str], alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise CeeGenError(f"LoRA rank must be >= 1, got {rank}")
        self.args, self.rank, self.targets = args, rank, list(targets)
        self.alpha = float(alpha if alpha is not None else 2 * rank)
        self.scale = self.alpha / rank
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for i in range(args.n_layers):
            for t in self.targets:
                _, _, _, n_out, n_in = _where(args, t)
                a = torch.empty(rank, n_in)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init, as PEFT does
                self.A[f"{i}_{t}"] = nn.Parameter(a)
                self.B[f"{i}_{t}"] = nn.Parameter(torch.zeros(n_out, rank))

    def delta(self, i: int, t: str) -> torch.Tensor:
        """s B A: (out rows of the target, in)."""
        return self.scale * (self.B[f"{i}_{t}"] @ self.A[f"{i}_{t}"])

    def _by_linear(self):
        """(layer, block, linear name) -> [(target, first row, rows)]"""
        out = {}
        for i in range(self.args.n_layers):
            for t in self.targets:
                blk, lin, r0, n, _ = _where(self.args, t)
                out.setdefault((i, blk, lin), []).append((t, r0, n))
        return out

    def attach(self, net: Transformer) -> list:
        """Training: hooks that add the deltas to the targets' outputs; returns their handles."""
        handles = []
        for (i, blk, lin), parts in self._by_linear().items():
            mod = getattr(getattr(net.layers[i], blk), lin)

            def hook(_mod, args, y, i=i, parts=parts):
                x = args[0]  # (..., in)
                for t, r0, n in parts:
                    k = f"{i}_{t}"
                    y[..., r0:r0 + n] += self.scale * ((x @ self.A[k].T) @ self.B[k].T)
                return y

            handles.append(mod.register_forward_hook(hook))
        return handles

    @torch.no_grad()
    def merge(self, net: Transformer) -> None:
        """Add the deltas into net's weights (summed in fp32, stored in the weights' dtype). The
        caller records it in the model's provenance (exits/heads.py, load_heads)."""
        for (i, blk, lin), parts in self._by_linear().items():
            mod = getattr(getattr(net.layers[i], blk), lin)
            if isinstance(mod, QuantLinear):  # blocks cannot take a delta: kept as its factors
                for t, r0, _ in parts:
                    mod.add_lowrank(r0, self.A[f"{i}_{t}"], self.B[f"{i}_{t}"], self.scale)
                continue
            w = mod.weight  # (out, in)
            for t, r0, n in parts:
                d = self.delta(i, t).to(device=w.device, dtype=torch.float32)
                w[r0:r0 + n] = (w[r0:r0 + n].float() + d).to(w.dtype)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

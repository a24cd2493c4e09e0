"""RoPE (rotate-half layout, HF convention): frequency tables, with linear and llama3 scaling, and
their application. Used by the model's attention and by the KV fill (ops/reference.py), which must
rotate a propagated K exactly as the layer would."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cee_gen.model import ModelArgs


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with linear or llama3 scaling as the HF config says."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = args.rope_scaling
    if s is None:
        return inv.float()
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return (inv / s["factor"]).float()
    # llama3 (Llama 3.1): long wavelengths scaled by `factor`, short kept, smooth blend between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(is_mid, mid, scaled).float()


def rope_tables(args: ModelArgs, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (n_pos, head_dim) in fp32, rotate-half layout (HF convention)."""
    t = torch.arange(n_pos, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(args))  # (n_pos, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n_pos, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, hd); cos/sin: (B, T, 1, hd), already in x's dtype
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin

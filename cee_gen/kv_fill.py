"""KV-cache copy-forward: fill the K/V of the layers an exited token skipped (reference twin).

A token that exits after layer e (it ran layers [0, e)) still has to be visible to later tokens at
layers [e, L). Modes (shared/reference/methods.md §1.7, peer_systems.md §1):
- `propagate` (default, as ConsistentEE trains): its exit hidden state h is copied forward and each
  skipped layer j projects it: K_j = RoPE(W_k^j RMSNorm_j(h)), V_j = W_v^j RMSNorm_j(h).
- `propagate-raw`: the same without RMSNorm_j (what ConsistentEE's released inference code does).
- `copy-kv`: layer e-1's K/V copied into layers [e, L) (cheapest; known to hurt quality).
- `recompute` (EE-LLM's KV recomputation): nothing is filled here. The engine keeps the exit state
  and runs it through the deeper layers together with the next token of its row that goes deeper,
  so the deep KV is exact (engine.py, `_Pending`).

`propagate` in one matmul: RMSNorm_j(h) = g_j * n(h), with n(h) = h / rms(h) the same for every j,
so W^j RMSNorm_j(h) = (W^j diag(g_j)) n(h). Folding g_j into the stacked K/V weights of all layers
turns the fill for every skipped layer and every exited row into one (rows, D) x (D, layers*2*kv)
product (the fold is computed once per model). This module is the reference the CUDA kernel of
csrc/ must match.
"""

from __future__ import annotations

import torch

from cee_gen.model import Step, Transformer, apply_rope, cache_gather, cache_write

MODES = ("propagate", "propagate-raw", "copy-kv", "recompute")
FILL_MODES = MODES[:3]  # the modes this module fills; recompute is the engine's


class KVFiller:
    def __init__(self, net: Transformer):
        a = net.args
        self.net, self.kv = net, a.n_kv_heads * a.head_dim
        q = a.n_heads * a.head_dim
        w = torch.stack([blk.attention.wqkv.weight[q:] for blk in net.layers])  # (L, 2kv, D)
        g = torch.stack([blk.attention_norm.weight for blk in net.layers])  # (L, D)
        self.w_raw = w
        self.w_folded = w * g[:, None, :]  # (L, 2kv, D): RMSNorm weight folded in
        bias = [blk.attention.wqkv.bias for blk in net.layers]
        self.bias = None if bias[0] is None else torch.stack([b[q:] for b in bias])  # (L, 2kv)

    def fill(self, cache, h: torch.Tensor, exit_layer: int, step: Step, mode: str = "propagate"):
        """Write K/V of layers [exit_layer, L) at the step's rows and slots from exit states h (B, T, D)."""
        if mode not in FILL_MODES:
            raise ValueError(f"unknown KV-fill mode {mode!r}: use one of {', '.join(FILL_MODES)}")
        a, e, L = self.net.args, exit_layer, self.net.args.n_layers
        if e >= L:
            return
        B, T, D = h.shape
        if mode == "copy-kv":
            if e == 0:
                raise ValueError("copy-kv needs at least one computed layer (exit_layer >= 1)")
            src_k = cache_gather(cache.k[e - 1], step, B, T)  # (B, T, H_kv, hd)
            src_v = cache_gather(cache.v[e - 1], step, B, T)
            for j in range(e, L):
                cache_write(cache.k[j], src_k, step)
                cache_write(cache.v[j], src_v, step)
            return
        if mode == "propagate":
            hf = h.float()
            x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + a.norm_eps)).to(h.dtype)
            w = self.w_folded[e:]
        else:
            x, w = h, self.w_raw[e:]
        n = L - e
        kv = x.reshape(B * T, D) @ w.reshape(n * 2 * self.kv, D).t()  # (B*T, n*2kv): one matmul
        kv = kv.view(B, T, n, 2 * self.kv)
        if self.bias is not None:
            kv = kv + self.bias[e:]
        k = kv[..., :self.kv].reshape(B, T, n * a.n_kv_heads, a.head_dim)
        k = apply_rope(k, step.cos, step.sin).view(B, T, n, a.n_kv_heads, a.head_dim)
        v = kv[..., self.kv:].view(B, T, n, a.n_kv_heads, a.head_dim)
        for i, j in enumerate(range(e, L)):
            cache_write(cache.k[j], k[:, :, i], step)  # (B, T, H_kv, hd)
            cache_write(cache.v[j], v[:, :, i], step)

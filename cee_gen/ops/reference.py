"""Pure-PyTorch twins of the native ops (the mamba `selective_scan_ref` pattern).

Same signature and same semantics as the CUDA kernels of csrc/ (and, for `attn_kvcache`, as
flash-attn's kernel); they are what runs on the CPU and on a GPU without the built extension, and
what tests/test_ops.py compares the kernels against.

The KV-fill ops work on a list of *entries*: cache positions of exited tokens, each (row, slot, exit
layer). Entry n writes layers [max(exit_layer[n], first_layer), L) at cache[j][rows[n], :, slots[n]]
and nothing else. `first_layer` is the lowest exit layer among the entries, known to the caller on
the host, so the kernel needs no device sync to size its work; `exit_layer` None means every entry
exits at first_layer (the engine's case: one call per exit layer), which the twin then runs without
any sync, so torch.compile traces it whole. (row, slot) pairs must be distinct.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cee_gen.rope import apply_rope


def _write(cache_t: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor,
           keep: torch.Tensor | None) -> None:
    """cache_t (B, H_kv, S, hd)[rows[n], :, slots[n]] = x[n] (N, H_kv, hd) where keep[n] (N, 1, 1)."""
    x = x.to(cache_t.dtype)  # no-op, except under autocast (mixed-precision training)
    if keep is not None:
        x = torch.where(keep, x, cache_t[rows, :, slots])
    cache_t[rows, :, slots] = x


def _keep(exit_layer: torch.Tensor | None, j: int, last: int) -> torch.Tensor | None:
    """(N, 1, 1) which entries write layer j; None when all do (j >= the latest exit layer `last`)."""
    return None if exit_layer is None or j >= last else (exit_layer <= j)[:, None, None]


def _last(exit_layer: torch.Tensor | None, first_layer: int) -> int:
    return first_layer if exit_layer is None else int(exit_layer.max())  # a sync, only for mixed exits


def kv_fill_ref(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, exit_layer: torch.Tensor | None,
                first_layer: int, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor],
                eps: float, normalize: bool) -> None:
    """Propagate exit states h (N, D) into the K/V caches of the layers they skipped.

    K_j = RoPE(W_k^j x), V_j = W_v^j x (+ bias_j), with x = h / rms(h) when `normalize` (the
    RMSNorm weight g_j is folded into w by the caller: W^j diag(g_j)), x = h otherwise.
    w (L, 2*kv, D): per layer the K rows then the V rows, kv = H_kv * hd; bias (L, 2*kv) or None;
    cos, sin (N, hd): each entry's RoPE row; rows, slots, exit_layer (N,) int64 (exit_layer may be None);
    k_cache, v_cache: L tensors (B, H_kv, S, hd).
    """
    L, N = len(k_cache), h.shape[0]
    n = L - first_layer
    if n <= 0 or N == 0:
        return
    D = h.shape[1]
    H, hd = k_cache[0].shape[1], k_cache[0].shape[3]
    kv = H * hd
    x = h
    if normalize:
        hf = h.float()
        x = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    y = (x @ w[first_layer:].reshape(n * 2 * kv, D).t()).view(N, n, 2 * kv)  # one matmul, all layers
    if bias is not None:
        y = y + bias[first_layer:]
    k = apply_rope(y[..., :kv].reshape(N, n, H, hd), cos[:, None, None, :], sin[:, None, None, :])
    v = y[..., kv:].reshape(N, n, H, hd)
    last = _last(exit_layer, first_layer)
    for i, j in enumerate(range(first_layer, L)):
        keep = _keep(exit_layer, j, last)
        _write(k_cache[j], rows, slots, k[:, i], keep)  # (N, H_kv, hd)
        _write(v_cache[j], rows, slots, v[:, i], keep)


def kv_copy_ref(rows: torch.Tensor, slots: torch.Tensor, exit_layer: torch.Tensor | None, first_layer: int,
                k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> None:
    """copy-kv: entry n's K/V at layer e-1 (e = max(exit_layer[n], first_layer)) into layers [e, L)."""
    if first_layer < 1:
        raise ValueError("copy-kv needs at least one computed layer: first_layer must be >= 1")
    if rows.numel() == 0:
        return
    last = _last(exit_layer, first_layer)
    if last <= first_layer:  # all entries copy from first_layer - 1: read it once
        for c in (k_cache, v_cache):
            src = c[first_layer - 1][rows, :, slots]  # (N, H_kv, hd)
            for j in range(first_layer, len(c)):
                _write(c[j], rows, slots, src, None)
        return
    for j in range(first_layer, len(k_cache)):
        keep = _keep(exit_layer, j, last)
        for c in (k_cache, v_cache):
            _write(c[j], rows, slots, c[j - 1][rows, :, slots], keep)  # a chain: j-1 already holds e-1's


def attn_kvcache_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                     leftpad: torch.Tensor, batch_idx: torch.Tensor | None) -> torch.Tensor:
    """Attention of new queries over a KV cache, with flash-attn's `flash_attn_with_kvcache` semantics
    (causal=True, cache_seqlens, cache_leftpad, cache_batch_idx), which the engine calls on a GPU.

    q (b, T, H, hd); k_cache, v_cache (B, S, H_kv, hd), any strides with the last one 1 (the engine
    passes its (B, H_kv, S, hd) caches transposed); seqlens, leftpad (b,) int32; batch_idx (b,) int32
    or None (= rows 0..b-1). Query i of row r sits at slot seqlens[r] - T + i (causal, aligned to the
    bottom right) and attends to slots leftpad[r] .. its own; a query with no such slot gives zeros.
    Returns (b, T, H, hd).
    """
    b, T, H, hd = q.shape
    if batch_idx is not None:
        idx = batch_idx.long()
        k_cache, v_cache = k_cache.index_select(0, idx), v_cache.index_select(0, idx)
    S = k_cache.shape[1]
    keys = torch.arange(S, device=q.device)  # (S,)
    last = seqlens.long()[:, None] - T + torch.arange(T, device=q.device)  # (b, T): each query's slot
    ok = (keys >= leftpad.long()[:, None, None]) & (keys <= last[:, :, None])  # (b, T, S)
    any_ok = ok.any(-1, keepdim=True)  # (b, T, 1)
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (b, H, T, hd)
        k_cache.transpose(1, 2),  # (b, H_kv, S, hd)
        v_cache.transpose(1, 2),
        attn_mask=(ok | ~any_ok)[:, None],  # a query with no key attends everywhere, then is zeroed
        enable_gqa=H != k_cache.shape[2],
    ).transpose(1, 2)  # (b, T, H, hd)
    return y * any_ok[..., None].to(y.dtype)

"""Teacher-forced early-exit rollout: the training-time twin of the inference decode loop.

A whole sequence runs layer by layer. At a candidate layer, `decide` picks which still-running
positions exit; an exited position's hidden state is frozen and copied up: the deeper layers still
see it (they compute their K/V from it through their own RMSNorm and projections, which is exactly
the `propagate` KV fill of inference), but its own output is no longer updated. This is
ConsistentEE's copy-hidden simulation with the input norm kept (ConsistentEE §3), so
training and inference agree: with the same exit layers, the logits equal those of generation with
`kv_fill="propagate"` (tests/test_rollout.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cee_gen.cache import StaticKVCache
from cee_gen.model import Transformer


def rollout(net: Transformer, tokens: torch.Tensor, layers: list[int], may_exit: torch.Tensor,
            decide: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
            pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, T); may_exit (B, T) bool; decide(layer, h (B, T, D), running (B, T)) -> (B, T) bool.

    Returns exit_layer (B, T) long (L for positions that never exited) and h_exit (B, T, D), each
    position's hidden state at its exit. `pad` (B,): left padding, as in generation.
    """
    B, T = tokens.shape
    L, dev = net.args.n_layers, tokens.device
    pad = torch.zeros(B, dtype=torch.long, device=dev) if pad is None else pad
    # scratch for the layers
    cache = StaticKVCache.for_net(net, B, T)
    step = net.make_step(torch.arange(T, device=dev), pad, T, T)
    cand = set(x for x in layers if x < L)
    h = net.embed(tokens)  # (B, T, D)
    running = torch.ones(B, T, dtype=torch.bool, device=dev)
    exit_layer = torch.full((B, T), L, dtype=torch.long, device=dev)
    for j in range(L):
        h = torch.where(running[..., None], net.forward_layers(h, j, j + 1, step, cache), h)
        if j + 1 in cand:
            ex = decide(j + 1, h, running & may_exit) & running & may_exit  # (B, T)
            exit_layer[ex] = j + 1
            running = running & ~ex
    return exit_layer, h

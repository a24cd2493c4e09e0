"""The verify pass's pieces: full-model layers over several columns per row, and the LM head on them.
Under compile each column count is its own static graph (COLUMN_BUCKETS)."""

from __future__ import annotations

import torch

from cee_gen.engine.decoder import Decoder
from cee_gen.engine.exit_step import batch_dynamic


def pass_layers(dec: Decoder, cache, pad: torch.Tensor, h: torch.Tensor, rows: list[int],
                slots: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Layers [lo, hi) for the columns h (b, Q, D) of cache rows `rows` at slots (b, Q) (the cache's
    rows are left-padded by pad (B,)): a verify pass, or part of one. Under compile every layer is the
    decoder's compiled columns-layer graph: the row count dynamic, the column count static."""
    net = dec.net
    r = torch.tensor(rows, device=slots.device)
    step = net.make_step(slots, pad[r], cache.n_slots, None, None if len(rows) == cache.batch else r)
    if dec.compiled:
        # rows dynamic; columns static: a graph per column count (callers pad to COLUMN_BUCKETS) runs
        # ~1.3x faster at 9 columns than one graph with a dynamic count
        batch_dynamic(h, step.cos, step.sin, step.attn.mask, step.rows, step.slots)
        for t in (h, step.cos, step.sin, step.slots):
            torch._dynamo.mark_static(t, 1)
        torch._dynamo.mark_static(step.attn.mask, 2)
    return net.forward_layers(h, lo, hi, step, cache, dec.columns_layer)


def pass_logits(dec: Decoder, h: torch.Tensor) -> torch.Tensor:
    """The LM head on a pass's columns: h (b, Q, D) -> logits (b, Q, V) fp32."""
    net = dec.net
    return (dec.exit_logits or _head)(net.norm, None, net.output, h)


COLUMN_BUCKETS = (1, 2, 3, 5, 9, 17, 33, 65, 129)  # compiled passes pad their columns up to one of these


def _head(norm, adapter, output, h):
    return output(norm(h)).float()

"""The eager fill: at the exit, one op writes the K/V of every layer the exiting rows skipped.

Serves `propagate` with fill_timing eager, `propagate-raw` and `copy-kv` (kv_fill/__init__.py says
which runs when). `propagate` in one matmul: RMSNorm_j(h) = g_j * n(h), with n(h) = h / rms(h) the
same for every j, so W^j RMSNorm_j(h) = (W^j diag(g_j)) n(h). Folding g_j into the stacked K/V weights
of all layers turns the fill for every skipped layer and every exited row into one (rows, D) x
(D, layers*2*kv) product (the fold is computed once per model). The fill itself is the op
`cee_gen::kv_fill` (cee_gen/ops): the CUDA kernel of csrc/ on a GPU with the extension built, else its
PyTorch twin, ops/reference.py, which tests compare the kernel against.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from cee_gen import ops
from cee_gen.model import Transformer
from cee_gen.step import Step
from cee_gen.weights.quant import dense_weight

if TYPE_CHECKING:
    from cee_gen.engine.exit_step import Running

FILL_MODES = ("propagate", "propagate-raw", "copy-kv")  # the modes filled at the exit


class KVFiller:
    """Writes the skipped layers' K/V of exit states, for every segment of a (possibly split) model."""

    def __init__(self, net: Transformer):
        a = net.args
        self.net, self.kv = net, a.n_kv_heads * a.head_dim
        q = a.n_heads * a.head_dim
        dt = net.dtype
        # one stack per run of layers on one device (placement.py); one run when the model is not split
        self.segments = net.segments or [(0, a.n_layers, net.device)]
        self.w_raw, self.w_folded, self.bias = [], [], []
        for lo, hi, _ in self.segments:
            blocks = net.layers[lo:hi]
            w = torch.stack([dense_weight(blk.attention.wqkv, dt)[q:] for blk in blocks])  # (n, 2kv, D)
            g = torch.stack([blk.attention_norm.weight for blk in blocks])  # (n, D)
            self.w_raw.append(w)
            self.w_folded.append(w * g[:, None, :])  # (n, 2kv, D): RMSNorm weight folded in
            bias = [blk.attention.wqkv.bias for blk in blocks]
            self.bias.append(None if bias[0] is None else torch.stack([b[q:] for b in bias]))  # (n, 2kv)

    def fill(self, cache, h: torch.Tensor, exit_layer: int, step: Step, mode: str = "propagate"):
        """Write K/V of layers [exit_layer, L) at the step's rows and slots from exit states h (B, T, D)."""
        if mode not in FILL_MODES:
            raise ValueError(f"unknown KV-fill mode {mode!r}: use one of {', '.join(FILL_MODES)}")
        a, e, L = self.net.args, exit_layer, self.net.args.n_layers
        if e >= L:
            return
        if mode == "copy-kv" and e == 0:
            raise ValueError("copy-kv needs at least one computed layer (exit_layer >= 1)")
        B, T, D = h.shape
        rows, slots = step.index(B, T)  # (B, 1), (B, T)
        rows, slots = rows.expand(B, T).reshape(-1), slots.reshape(-1)  # (N,) entries, N = B*T
        hd, k, v = a.head_dim, cache.k, cache.v
        x, cos, sin = h.reshape(B * T, D), step.cos.reshape(B * T, hd), step.sin.reshape(B * T, hd)
        for s, (lo, hi, dev) in enumerate(self.segments):
            if hi <= e:
                continue
            first = max(e, lo)  # this segment's first layer to fill
            r, sl = rows.to(dev), slots.to(dev)
            if mode == "copy-kv":  # exit_layer None: every entry exits at e (the ops take one per entry too)
                if first == lo and lo > 0:  # layer lo-1 holds the copy, on the previous segment's device
                    pd = self.segments[s - 1][2]
                    for c in (k, v):
                        c[lo][r, :, sl] = c[lo - 1][rows.to(pd), :, slots.to(pd)].to(dev)
                    first += 1
                if first < hi:
                    ops.kv_copy(r, sl, None, first - lo, k[lo:hi], v[lo:hi])
                continue
            w = (self.w_folded if mode == "propagate" else self.w_raw)[s]
            ops.kv_fill(x.to(dev), w, self.bias[s], cos.to(dev), sin.to(dev), r, sl, None, first - lo,
                        k[lo:hi], v[lo:hi], a.norm_eps, mode == "propagate")


class EagerFill:
    """The exit step's eager fill: layers run plainly; rows that exit get their skipped layers'
    K/V written at once (KVFiller), its time counted in the step's `fill_s`."""

    needs_scratch = False

    def __init__(self, net: Transformer, mode: str, timings):
        self.filler, self.mode, self.tm = KVFiller(net), mode, timings

    def begin(self, st: Running) -> None:
        pass

    def layers(self, st: Running, lo: int, hi: int, run) -> None:
        st.h = st.net.forward_layers(st.h, lo, hi, st.step, st.cache, run)

    def exited(self, st: Running, out: list[int], idx: torch.Tensor, layer: int) -> None:
        if layer >= st.net.args.n_layers:
            return
        t0 = time.perf_counter()
        every = len(out) == len(st.host)  # all running rows exit: no gather needed
        self.filler.fill(st.cache, st.h if every else st.h[idx], layer,
                         st.step if every else st.step.select(idx), self.mode)
        self.tm.fill_s += time.perf_counter() - t0

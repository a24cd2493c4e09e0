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
    """Writes the skipped layers' K/V of exit states, for every segment of a (possibly split) model.

    `propagate` reads stacked copies of every layer's K/V weights (n, 2kv, D), made on first use and
    kept: callers keep one KVFiller per model (Decoder.filler) while `key` still matches the weights
    (weights_key), rather than one per batch (two ~25 MB copies for SmolLM2, made and freed each time)."""

    def __init__(self, net: Transformer):
        a = net.args
        self.net, self.kv = net, a.n_kv_heads * a.head_dim
        self.key = weights_key(net)
        # one stack per run of layers on one device (placement.py); one run when the model is not split
        self.segments = net.segments or [(0, a.n_layers, net.device)]
        self._stacks: tuple[list, list, list] | None = None  # (raw, folded, bias) per segment

    def stacks(self) -> tuple[list, list, list]:
        """Per segment: K/V weights (n, 2kv, D), the same with RMSNorm's weight folded in, biases (n, 2kv)."""
        if self._stacks is None:
            net = self.net
            q, dt = net.args.n_heads * net.args.head_dim, net.dtype
            raw, folded, biases = [], [], []
            for lo, hi, _ in self.segments:
                blocks = net.layers[lo:hi]
                w = torch.stack([dense_weight(blk.attention.wqkv, dt)[q:] for blk in blocks])  # (n, 2kv, D)
                g = torch.stack([blk.attention_norm.weight for blk in blocks])  # (n, D)
                raw.append(w)
                folded.append(w * g[:, None, :])  # (n, 2kv, D): RMSNorm weight folded in
                bias = [blk.attention.wqkv.bias for blk in blocks]
                biases.append(None if bias[0] is None else torch.stack([b[q:] for b in bias]))  # (n, 2kv)
            self._stacks = raw, folded, biases
        return self._stacks

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
            raw, folded, bias = self.stacks()
            w = (folded if mode == "propagate" else raw)[s]
            ops.kv_fill(x.to(dev), w, bias[s], cos.to(dev), sin.to(dev), r, sl, None, first - lo,
                        k[lo:hi], v[lo:hi], a.norm_eps, mode == "propagate")


def weights_key(net: Transformer) -> tuple:
    """What a KVFiller's copies come from: each layer's qkv projection and attention norm, with their
    versions. An in-place change (a heads file's LoRA delta merged into the weights) bumps a tensor's
    version; GGUF blocks (weights/lowbit.QuantLinear) keep deltas as low-rank terms, counted instead."""
    key = []
    for blk in net.layers:
        m = blk.attention.wqkv
        w = getattr(m, "weight", None)
        key.append((m, _version(w), len(getattr(m, "lowrank", ())), _version(blk.attention_norm.weight)))
    return tuple(key)


def _version(t) -> int | None:
    try:
        return t._version if isinstance(t, torch.Tensor) else None
    except RuntimeError:  # an inference tensor has no version counter, and cannot be changed in place
        return None


class EagerFill:
    """The exit step's eager fill: layers run plainly; rows that exit get their skipped layers'
    K/V written at once (KVFiller), its time counted in the step's `fill_s`."""

    needs_scratch = False

    def __init__(self, filler: KVFiller, mode: str, timings):
        self.filler, self.mode, self.tm = filler, mode, timings

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

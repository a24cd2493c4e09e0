"""The decode step for one model, eager or compiled: the plain step and the compiled pieces of the
exit step.

- `Decoder.step`: every row runs the same `depth` layers in one `forward_layers` call (exits off, or
  `static`); this is the step `torch.compile` takes whole (`plain_step`). With depth < L the skipped
  layers' K/V is filled inside it (eager fill), or not at all (deferred: no later token runs them).
- The exit step (engine/exit_step.py) stays eager under compile; its fixed-shape pieces are compiled
  here: one graph for a layer (shared by every layer: `model.run_layer` takes the block as an
  argument), one for an exit head, one for a policy head, one for a layer fused with a policy head.

Compile (gpt-fast's way): the cache's slot dimension is marked dynamic, so one graph serves every
cache length; Inductor's on-disk cache makes later processes skip most of the compile. With
`reduce-overhead` (CUDA graphs on a GPU) the cache tensors are marked static and the logits copied
out, since a graph replays into fixed buffers.
"""

from __future__ import annotations

import torch

from cee_gen.cache import StaticKVCache
from cee_gen.exits.heads import exit_logits, exit_policy
from cee_gen.kv_fill import KVFiller
from cee_gen.kv_fill.eager import weights_key
from cee_gen.model import Transformer, run_layer, run_layer_columns
from cee_gen.ops import cpu


def plain_step(net: Transformer, cache: StaticKVCache, tok: torch.Tensor, slots: torch.Tensor,
               pad: torch.Tensor, kv_len: int | None, depth: int | None = None,
               filler: KVFiller | None = None, kv_fill: str = "propagate") -> torch.Tensor:
    """One token per row at cache slot `slots` (1,): tok (B, 1) -> logits (B, V) fp32.

    With depth < L the token exits after `depth` layers: the LM head reads that layer's hidden
    state, and the skipped layers' KV is filled from it (when `filler` is given).
    """
    step = net.make_step(slots, pad, cache.k[0].shape[2], kv_len)  # symbolic S when compiled
    L = net.args.n_layers
    depth = L if depth is None else depth
    h = net.forward_layers(net.embed(tok), 0, depth, step, cache)  # (B, 1, D)
    if depth < L and filler is not None:
        filler.fill(cache, h, depth, step, kv_fill)
    return net.head(h)[:, -1].float()


def layer_then_policy(block, h: torch.Tensor, step, k_cache, v_cache, fill, norm, policy):
    """A layer, then the policy head on the new token's column of its output: (h, p (b,)). For the
    compiled exit step, one graph call per candidate layer instead of two."""
    h = run_layer(block, h, step, k_cache, v_cache, fill)
    return h, exit_policy(norm, policy, h[:, 0])


class Decoder:
    """Owns the (optionally compiled) decode step for one model."""

    def __init__(self, net: Transformer, compile: bool = False, mode: str = "default"):
        self.net = net
        if net.device.type == "cpu":
            cpu.load()  # the small-M matmul kernels (built once, then cached); model.linear uses them
        self.compiled = compile
        # reduce-overhead: CUDA graphs (on a GPU). They replay into fixed buffers, so the KV cache
        # tensors, which the step writes, are marked static (new_cache) and the logits are copied out.
        self.graphs = compile and mode == "reduce-overhead"
        self.compile_s = 0.0  # compile time spent in this decoder's calls (compile_clock)
        self._clocking = False  # a compile_clock block is open: inner blocks add nothing to compile_s
        self._step = plain_step
        # the exit step's pieces; None: eager (the blocks and heads themselves)
        self.layer = self.exit_logits = self.exit_policy = self.layer_policy = self.columns_layer = None
        self._filler: KVFiller | None = None
        if compile:
            import torch._inductor.config as ic

            ic.fx_graph_cache = True  # on-disk cache: later processes skip most of the compile
            # no stride asserts after each extern call (the matmul ops, ~120 a step): ~0.8 ms a CPU step;
            # their fake kernels (ops/cpu.py, ops/__init__.py) give the contiguous outputs they return
            ic.size_asserts = False
            # the exit step's and the verify pass's pieces each keep a few graphs (row counts, fill
            # columns, verify column buckets): more than dynamo's default of 8 per function
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
            self._step = torch.compile(plain_step, fullgraph=True, dynamic=None, mode=mode)
            # Without CUDA graphs for the pieces: a graph per layer call would need its own step marking.
            piece = "default" if mode == "reduce-overhead" else mode
            self.layer = torch.compile(run_layer, fullgraph=True, dynamic=None, mode=piece)
            self.exit_logits = torch.compile(exit_logits, fullgraph=True, dynamic=None, mode=piece)
            self.exit_policy = torch.compile(exit_policy, fullgraph=True, dynamic=None, mode=piece)
            self.layer_policy = torch.compile(layer_then_policy, fullgraph=True, dynamic=None, mode=piece)
            self.columns_layer = torch.compile(run_layer_columns, fullgraph=True, dynamic=None, mode=piece)

    def step(self, cache: StaticKVCache, tok: torch.Tensor, slot: int, pad: torch.Tensor,
             depth: int | None = None, kv_fill: str | None = "propagate"):
        """tok (B, 1) written at cache slot `slot`, run `depth` layers (None = all) -> logits (B, V).
        kv_fill None: the layers past depth need no fill (deferred, and no token runs them)."""
        filler = None
        if depth is not None and depth < self.net.args.n_layers and kv_fill is not None:
            # the kept one: weights_key walks every layer (~0.3 ms), so it is checked once a batch
            filler = self._filler if self._filler is not None else self.filler()
        slots = torch.tensor([slot], device=tok.device)
        # Compiled: attend over the whole cache (its slot dimension is dynamic, see new_cache).
        # Eager: attend only over the filled slots, which saves reading the empty tail.
        kv_len = None if self.compiled else slot + 1
        with self.compile_clock():  # a new shape (batch, depth, cache length) compiles inside the call
            if self.graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be reused
            out = self._step(self.net, cache, tok, slots, pad, kv_len, depth, filler, kv_fill)
            if self.graphs:
                out = out.clone()  # the graph's output buffer is overwritten by the next replay
        return out

    def filler(self) -> KVFiller:
        """The eager KV fill's filler for this model: kept between steps and batches (it holds copies of
        the K/V weights), made again when those weights have changed (weights_key). generate_batch and
        make_fill call this once a batch; a step reuses what it returned."""
        if self._filler is None or self._filler.key != weights_key(self.net):
            self._filler = KVFiller(self.net)
        return self._filler

    def compile_clock(self) -> CompileClock:
        """`with dec.compile_clock() as clock:` the compile time spent inside the block (torch.compile
        compiles on first use, inside ordinary calls) is added to compile_s, once however deeply such
        blocks nest; clock.seconds is the block's share, for callers that keep it out of their timings."""
        return CompileClock(self)

    @staticmethod
    def compile_seconds() -> float | None:
        """Seconds torch.compile has spent compiling in this process so far; None where torch does not
        record it. The compiled exit step compiles inside ordinary steps (each new batch shape)."""
        try:
            from torch._dynamo.utils import compilation_time_metrics
        except ImportError:
            return None
        return sum(compilation_time_metrics.get("_compile.compile_inner", []))

    def new_cache(self, batch: int, n_slots: int) -> StaticKVCache:
        cache = StaticKVCache.for_net(self.net, batch, n_slots)
        if self.compiled:  # one graph for every cache length: mark the slot dimension dynamic
            for t in cache.k + cache.v:
                # maybe: the exit step's layer graph takes its mask from outside, with a concrete
                # length, and may specialize on it (a new cache length then recompiles it once)
                torch._dynamo.maybe_mark_dynamic(t, 2)
                if self.graphs:
                    torch._dynamo.mark_static_address(t)
        return cache


class CompileClock:
    """Decoder.compile_clock's context manager."""

    def __init__(self, dec: Decoder):
        self.dec, self.seconds = dec, 0.0

    def __enter__(self) -> CompileClock:
        dec = self.dec
        self.c0 = dec.compile_seconds() if dec.compiled else None
        self.outer, dec._clocking = not dec._clocking, True
        return self

    def __exit__(self, *exc) -> None:
        dec = self.dec
        if self.outer:
            dec._clocking = False
        if self.c0 is not None:
            self.seconds = (dec.compile_seconds() or self.c0) - self.c0
            if self.outer:
                dec.compile_s += self.seconds

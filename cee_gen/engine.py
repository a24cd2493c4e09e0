"""Prefill and the decode loop over a static KV cache, with per-token telemetry.

A batch of prompts is left-padded into one (B, T) tensor; each row keeps its own RoPE positions and
attention mask (model.make_step), so a row's output does not depend on its neighbours. Each decode
step runs `forward_layers(h, 0, L)`; the early-exit issue replaces that one call with a loop over
layer ranges that stops where the exit strategy says.

Host syncs: one per generated token (`tolist()` of the chosen ids), needed for EOS, stop strings and
streaming. On the CPU it costs nothing; on a GPU it is the one place to batch later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cee_gen.cache import StaticKVCache, cache_slots
from cee_gen.config import GenerationConfig
from cee_gen.kv_fill import KVFiller
from cee_gen.model import Transformer
from cee_gen.sampling import select_next


@dataclass
class RowOutput:
    token_ids: list[int] = field(default_factory=list)
    layers_per_token: list[int] = field(default_factory=list)
    finish_reason: str = "length"


@dataclass
class BatchTimings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    compile_s: float = 0.0


def _decode_step(net: Transformer, cache: StaticKVCache, tok: torch.Tensor, input_pos: torch.Tensor,
                 pad: torch.Tensor, kv_len: int | None, gemv: bool = False, depth: int | None = None,
                 filler: KVFiller | None = None, kv_fill: str = "propagate") -> torch.Tensor:
    """One token per row at cache slot input_pos (1,): tok (B, 1) -> logits (B, V) fp32.

    With depth < L the token exits after `depth` layers: the LM head reads that layer's hidden
    state, and the skipped layers' KV is filled from it.
    """
    step = net.make_step(input_pos, pad, cache.k[0].shape[2], kv_len, gemv)  # symbolic S when compiled
    L = net.args.n_layers
    depth = L if depth is None else depth
    h = net.forward_layers(net.embed(tok), 0, depth, step, cache)  # (B, 1, D)
    if depth < L:
        filler.fill(cache, h, depth, step, kv_fill)
    return net.head(h, gemv)[:, -1].float()


class Decoder:
    """Owns the (optionally compiled) decode step for one model."""

    def __init__(self, net: Transformer, compile: bool = False):
        self.net = net
        self.compiled = compile
        self.compile_s = 0.0
        self._warm_shapes: set = set()
        self._step = _decode_step
        self._filler: KVFiller | None = None
        if compile:
            import torch._inductor.config as ic

            ic.fx_graph_cache = True  # on-disk cache: later processes skip most of the compile
            # One graph for every cache length (new_cache marks the slot dimension dynamic):
            # compile is paid once per process and batch size, not once per prompt length.
            self._step = torch.compile(_decode_step, fullgraph=True, dynamic=None)

    def step(self, cache: StaticKVCache, tok: torch.Tensor, slot: int, pad: torch.Tensor,
             depth: int | None = None, kv_fill: str = "propagate"):
        """tok (B, 1) written at cache slot `slot`, run `depth` layers (None = all) -> logits (B, V)."""
        filler = None
        if depth is not None and depth < self.net.args.n_layers:
            if self._filler is None:
                self._filler = KVFiller(self.net)
            filler = self._filler
        input_pos = torch.tensor([slot], device=tok.device)
        # Compiled: attend over the whole cache (its slot dimension is dynamic, see new_cache).
        # Eager: attend only over the filled slots, which saves reading the empty tail.
        kv_len = None if self.compiled else slot + 1
        key = (tuple(tok.shape), depth, kv_fill)
        first = self.compiled and key not in self._warm_shapes
        t0 = time.perf_counter()
        out = self._step(self.net, cache, tok, input_pos, pad, kv_len, self.compiled, depth, filler, kv_fill)
        if first:  # this call traced and compiled a graph
            self.compile_s += time.perf_counter() - t0
            self._warm_shapes.add(key)
        return out

    def new_cache(self, batch: int, n_slots: int) -> StaticKVCache:
        w = self.net.tok_embeddings.weight
        cache = StaticKVCache(self.net.args, batch, n_slots, w.dtype, w.device)
        if self.compiled:  # one graph for every cache length: mark the slot dimension dynamic
            for t in cache.k + cache.v:
                torch._dynamo.mark_dynamic(t, 2)
        return cache


@torch.inference_mode()
def generate_batch(
    decoder: Decoder,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    depth: int | None = None,
    kv_fill: str = "propagate",
) -> tuple[list[RowOutput], BatchTimings]:
    """Decode a batch of token-id prompts.

    on_token(row, token_id) is called for each new token of an unfinished row and returns True when
    the row must stop (a stop string completed); EOS is handled here. `depth` (None = all layers) is
    how many layers each generated token runs; the prompt always runs at full depth.
    """
    net = decoder.net
    dev = net.tok_embeddings.weight.device
    L = net.args.n_layers
    B, T = len(prompts), max(len(p) for p in prompts)
    n_new = min(cfg.max_new_tokens, net.args.max_position_embeddings - T)
    n_slots = min(cache_slots(T + n_new), net.args.max_position_embeddings)

    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in prompts], device=dev)  # (B,)
    tokens = tokens.to(dev)
    seen = torch.zeros(B, net.args.vocab_size, dtype=torch.bool, device=dev)  # repetition penalty
    for b, p in enumerate(prompts):
        seen[b, p] = True
    eos = torch.tensor(eos_ids or [-1], device=dev)

    cache = decoder.new_cache(B, n_slots)
    out = [RowOutput() for _ in range(B)]
    done = [False] * B
    timings = BatchTimings()

    t0 = time.perf_counter()
    step = net.make_step(torch.arange(T, device=dev), pad, n_slots, kv_len=T)
    h = net.forward_layers(net.embed(tokens), 0, L, step, cache)  # (B, T, D)
    cache.advance(0, L, T)
    logits = net.head(h[:, -1:])[:, -1].float()  # (B, V): only the last position needs the LM head
    compile_before = decoder.compile_s
    t1 = None
    for i in range(n_new):
        nxt = select_next(logits, cfg, seen, generator)  # (B,)
        seen[torch.arange(B, device=dev), nxt] = True
        is_eos = torch.isin(nxt, eos)
        ids, eos_flags = nxt.tolist(), is_eos.tolist()  # the one host sync per token
        for b in range(B):
            if done[b]:
                continue
            out[b].token_ids.append(ids[b])
            # the first generated token comes from the full-depth prefill
            out[b].layers_per_token.append(L if i == 0 else (depth or L))
            if eos_flags[b]:
                done[b], out[b].finish_reason = True, "stop"
            elif on_token is not None and on_token(b, ids[b]):
                done[b], out[b].finish_reason = True, "stop"
        if t1 is None:
            t1 = time.perf_counter()
            timings.prefill_s = t1 - t0
        if all(done) or i == n_new - 1:
            break
        logits = decoder.step(cache, nxt[:, None], T + i, pad, depth, kv_fill)
        cache.advance(0, L, 1)
    timings.decode_s = time.perf_counter() - (t1 or t0)
    timings.compile_s = decoder.compile_s - compile_before
    timings.decode_s -= timings.compile_s
    return out, timings

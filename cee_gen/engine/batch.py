"""One batch of rows being decoded: the left-padded prompts in the cache, what each row has emitted and
when it stops; and the exit step's KV fill for the batch. Shared by the decode loop (loop.py) and the
verify loop (verify.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cee_gen.engine.decoder import Decoder
from cee_gen.engine.exit_step import ExitRun
from cee_gen.engine.telemetry import BatchTimings, RowOutput
from cee_gen.kv_fill import DeferredFill, EagerFill, RecomputeFill


class Batch:
    """The rows of one batch: the left-padded prompts, the cache, what each row has emitted, and when it
    stops (EOS, a stop string through `on_token`, or its token budget)."""

    def __init__(self, decoder: Decoder, prompts: list[list[int]], n_new: int, n_slots: int, *, pad_id: int,
                 eos_ids: list[int], on_token: Callable[[int, int], bool] | None):
        net = decoder.net
        self.net, self.n_new, self.on_token = net, n_new, on_token
        dev = net.device
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, T), pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, T - len(p):] = torch.tensor(p)
        self.tokens = tokens.to(dev)  # (B, T)
        self.pad = torch.tensor([T - len(p) for p in prompts], device=dev)  # (B,)
        self.seen = torch.zeros(B, net.args.vocab_size, dtype=torch.bool, device=dev)  # repetition penalty
        for b, p in enumerate(prompts):
            self.seen[b, p] = True
        self.eos = set(eos_ids)
        self.cache = decoder.new_cache(B, n_slots)
        self.out = [RowOutput() for _ in range(B)]
        self.done = [False] * B
        self.timings = BatchTimings()

    @property
    def alive(self) -> list[int]:
        return [b for b, d in enumerate(self.done) if not d]

    def prefill(self) -> torch.Tensor:
        """The prompts through every layer into the cache: the last position's logits (B, V)."""
        net, T = self.net, self.tokens.shape[1]
        step = net.make_step(torch.arange(T, device=self.pad.device), self.pad, self.cache.n_slots, kv_len=T)
        h = net.forward_layers(net.embed(self.tokens), 0, net.args.n_layers, step, self.cache)  # (B, T, D)
        self.cache.advance(0, net.args.n_layers, T)
        return net.head(h[:, -1:])[:, -1].float()  # only the last position needs the LM head

    def emit(self, b: int, token: int, layers: int, source: str | None = None) -> bool:
        """Row b's next token, made after `layers` layers; True when the row is now finished."""
        row = self.out[b]
        row.token_ids.append(token)
        row.layers_per_token.append(layers)
        if source is not None:
            row.sources.append(source)
        self.seen[b, token] = True
        if token in self.eos or (self.on_token is not None and self.on_token(b, token)):
            self.done[b], row.finish_reason = True, "stop"
        elif len(row.token_ids) >= self.n_new:
            self.done[b] = True  # finish_reason stays "length"
        return self.done[b]


def make_fill(kind: type, decoder: Decoder, exit: ExitRun, batch: int, n_slots: int, pad: torch.Tensor,
              timings):
    """The exit step's KV fill of kind `kind` (kv_fill.fill_kind) for a batch."""
    if kind is DeferredFill:
        return DeferredFill(decoder.net, batch, n_slots, pad)
    if kind is RecomputeFill:
        return RecomputeFill(batch, n_slots, timings)
    return EagerFill(decoder.filler(), exit.kv_fill, timings)

"""CascadeBERT (Li et al., EMNLP Findings 2021, §4) for decoders: a small model decides first, and the
large one takes over where the small one is unsure (its max probability below t).

Two kinds of small model:
- the first k layers with their own exit head (`exit_layer` k): a strategy like the others, run by
  the exit step with candidate layer k; the large model's layers k..L catch up on the tokens they
  skipped by kv_fill `recompute` (kv_fill/recompute.py);
- a second, smaller checkpoint with the same tokenizer (`cascade_model`): `CascadeModels` runs every
  token through it, and the large model only for the rows where it is unsure, first catching up on
  the tokens it has not seen (one forward over the row's backlog, per-row slots).
Layers are counted as CascadeBERT does: the small model's, plus the large model's when it took over.
"""

from __future__ import annotations

import time

import torch

from cee_gen.cache import StaticKVCache
from cee_gen.exits.strategies import Confidence
from cee_gen.model import Transformer


class Cascade(Confidence):
    """The small model's decision: its max probability >= t."""

    name = "cascade"


class CascadeModels:
    """The decode step of a cascade over two checkpoints: `__call__` -> logits (B, V), {row: layers}."""

    needs_scratch = True  # the catch-up's padding queries write the scratch slot

    def __init__(self, net: Transformer, small: Transformer, strategy: Cascade, tokens: torch.Tensor,
                 pad: torch.Tensor, n_slots: int, pad_id: int, timings):
        """tokens (B, T): the left-padded prompts, which the small model reads now (its prefill)."""
        B, T = tokens.shape
        dev = tokens.device
        self.net, self.small, self.t, self.tm = net, small, strategy.t, timings
        self.cache = StaticKVCache(small.args, B, n_slots, net.dtype, dev)
        step = small.make_step(torch.arange(T, device=dev), pad, n_slots, kv_len=T)  # its own RoPE
        small.forward_layers(small.embed(tokens), 0, small.args.n_layers, step, self.cache)
        self.seq = torch.full((B, n_slots), pad_id, dtype=torch.long, device=dev)  # token ids by slot
        self.seq[:, :T] = tokens
        self.seen = [T] * B  # the large model has run every row's slots below this

    def __call__(self, cache: StaticKVCache, tok: torch.Tensor, tok_ids: list[int], slot: int,
                 pad: torch.Tensor, alive: list[int]) -> tuple[torch.Tensor, dict[int, int]]:
        net, small = self.net, self.small
        self.seq[:, slot] = tok[:, 0]
        B, dev = self.seq.shape[0], self.seq.device
        n_slots = cache.k[0].shape[2]
        rows = torch.tensor(alive, device=dev)
        sub = None if len(alive) == B else rows
        step = small.make_step(torch.tensor([slot], device=dev), pad[rows], self.cache.k[0].shape[2],
                               slot + 1, rows=sub)
        hs = small.forward_layers(small.embed(self.seq[rows, slot][:, None]), 0, small.args.n_layers, step,
                                  self.cache)
        logits = torch.zeros(B, net.args.vocab_size, device=dev)
        ls = small.head(hs)[:, -1].float()  # (b, V)
        logits[rows] = ls
        t0 = time.perf_counter()
        ok = (ls.softmax(-1).amax(-1) >= self.t).tolist()  # the data-dependent sync
        self.tm.decision_s += time.perf_counter() - t0
        Ls, L = small.args.n_layers, net.args.n_layers
        depth = {r: Ls for r, c in zip(alive, ok) if c}
        big = [r for r, c in zip(alive, ok) if not c]
        if big:
            back = [slot + 1 - self.seen[r] for r in big]  # tokens the large model has not seen, this one too
            Q, br = max(back), torch.tensor(big, device=dev)
            if Q == 1:
                ip = torch.tensor([slot], device=dev)
                toks = self.seq[br, slot][:, None]
            else:  # left-padded to Q columns with the scratch slot, so the current token is last
                ip = torch.full((len(big), Q), n_slots - 1, device=dev)
                for i, (r, n) in enumerate(zip(big, back)):
                    ip[i, Q - n:] = torch.arange(self.seen[r], slot + 1, device=dev)
                toks = self.seq[br[:, None], ip]  # (u, Q)
            step = net.make_step(ip, pad[br], n_slots, slot + 1, rows=None if len(big) == B else br)
            h = net.forward_layers(net.embed(toks), 0, L, step, cache)  # (u, Q, D)
            logits[br] = net.head(h[:, -1:])[:, -1].float()
            self.tm.recompute_rows += (sum(back) - len(big)) * L
            for r in big:
                self.seen[r], depth[r] = slot + 1, Ls + L
        return logits, depth

"""Next-token selection: greedy, or sampling with temperature, top-k, top-p and repetition penalty;
and the speculative acceptance rule that verify mode checks drafts with.

The order of the logits processors follows HF `generate` (repetition penalty, temperature, top-k,
top-p), so a seeded run is comparable with HF's and greedy output matches it token for token.

Acceptance (Leviathan et al. 2023; Chen et al. 2023): greedy accepts the longest prefix of drafts
equal to the target's argmax, then emits the argmax at the first mismatch (or the bonus token after
the last draft). Sampling accepts draft x_i with probability min(1, p_i(x_i) / q_i(x_i)) and at the
first rejection samples from normalize(max(0, p_i - q_i)); a deterministic draft (n-gram, greedy
exit) has q_i = one-hot(x_i). p_i is the target's distribution after the same processors, with the
repetition penalty seeing the drafts before position i, so the output is distributed as sampling the
full model would be.
"""

from __future__ import annotations

import torch

from cee_gen.config import GenerationConfig


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019) penalty, as HF applies it: logits (B, V), seen (B, V) bool."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def select_next(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) fp32 -> next token ids (B,)."""
    logits = processed(logits, cfg, seen)
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def processed(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor) -> torch.Tensor:
    """The logits (B, V) after the processors: repetition penalty; when sampling, temperature, top-k
    and top-p too (removed tokens at -inf)."""
    logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= 1 - cfg.top_p
        drop_sorted[:, -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def accept(logits: torch.Tensor, drafts: list[int], cfg: GenerationConfig, seen: torch.Tensor,
           generator: torch.Generator | None, q: torch.Tensor | None = None) -> tuple[int, int | None]:
    """Check one row's drafts against the target's logits.

    logits (n, V) fp32: position i's target logits, predicting the token after drafts[:i]; n is
    len(drafts) + 1 (a bonus position) or len(drafts). seen (V,) bool: the row's tokens so far
    (updated in place with the accepted drafts). q (len(drafts), V): the draft's probabilities when it
    sampled them; None for a deterministic draft. Returns (accepted count a, the next token: the
    correction at position a, the bonus when every draft was accepted, or None when there is no
    position left to take it from)."""
    for i, x in enumerate(drafts + [None]):
        if i == logits.shape[0]:
            return i, None
        z = processed(logits[i:i + 1], cfg, seen[None])[0]  # (V,)
        if x is None:  # every draft accepted: the bonus token
            if not cfg.do_sample:
                return i, int(z.argmax())
            return i, int(torch.multinomial(z.softmax(-1), 1, generator=generator))
        if not cfg.do_sample:
            t = int(z.argmax())
            if t != x:
                return i, t
        else:
            p = z.softmax(-1)
            qx = 1.0 if q is None else float(q[i, x])
            if float(torch.rand((), generator=generator)) >= min(1.0, float(p[x]) / qx):
                resid = p.clone()
                if q is None:
                    resid[x] = 0.0
                else:
                    resid = (p - q[i]).clamp_(min=0.0)
                if float(resid.sum()) <= 0:  # p == q: nothing left to correct toward
                    resid = p
                return i, int(torch.multinomial(resid / resid.sum(), 1, generator=generator))
        seen[x] = True
    raise AssertionError("unreachable")

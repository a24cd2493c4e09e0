"""Exit strategies: at each candidate layer, which of the running rows leave now.

One interface for all. A strategy is either *planned* (the exit layer of every row is known before
the step from the token alone: `static`, `hash`) or *decided* at candidate layers from signals
(`Signals`: the hidden state, the exit-head logits, the policy's p(exit)), each computed only when
the strategy reads it. Layer L is always the last resort. Sources (docs/early-exit.md):

- `full`: no exit.  `static`: every token exits after k layers (the control for speed).
- `policy`: ConsistentEE (Zeng et al., AAAI 2024, §1.7): first candidate with p(exit) >= t (0.5).
- `confidence`: max softmax probability >= t (DeeBERT's and COSEE's label-score signal, §2.2, §5.2).
- `entropy`: DeeBERT (Xin et al., ACL 2020, §5.2): entropy / log V <= t (COSEE's normalization).
- `patience`: PABEE (Zhou et al., NeurIPS 2020, §5.1): the argmax stayed the same across `n`
  consecutive candidate layers (counter c_l = c_{l-1} + 1 on agreement, exit when c_l = n).
- `saturation`: CALM's state saturation (Schuster et al. 2022; ConsistentEE's mode 5, §1.7): cosine
  of norm(h_l) with norm(h) at the previous candidate layer >= t (0.975).
- `hash`: HashEE (Sun et al., ACL Findings 2022, §3): each input token id gets a fixed exit layer,
  bucketed over the candidate layers; `frequency` gives frequent tokens the shallow buckets (BPE ids
  are merge-ordered, so id order stands for frequency), `random` a fixed random bucket per id.
  Special tokens run at full depth, as in HashEE.
- `cascade`: CascadeBERT (Li et al., EMNLP Findings 2021, §4) for decoders: the small model is either
  the first k layers with their own exit head, or a second, smaller checkpoint with the same
  tokenizer; when its max probability is below t the large model takes over, first catching up on
  the tokens it has not seen (for the truncated model: kv_fill `recompute` of layers k..L; for a
  second checkpoint: the whole backlog of tokens, in one batched forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cee_gen.exits.heads import ExitHeads


class Signals:
    """What a strategy may read at one candidate layer, each computed on first use."""

    def __init__(self, heads: ExitHeads, layer: int, h: torch.Tensor, logits_fn=None, policy_fn=None,
                 p_exit: torch.Tensor | None = None):
        self.heads, self.layer, self.h = heads, layer, h  # h (b, D)
        # in a compiled exit step: the compiled exit_logits and exit_policy (heads.py), or p(exit)
        # already computed in the layer's graph
        self.logits_fn, self.policy_fn, self._p = logits_fn, policy_fn, p_exit
        self._z = self._logits = None

    @property
    def z(self) -> torch.Tensor:  # final-norm hidden state (b, D)
        if self._z is None:
            self._z = self.heads.normed(self.h)
        return self._z

    @property
    def logits(self) -> torch.Tensor:  # exit-head logits (b, V) fp32
        if self._logits is None:
            self._logits = self.heads.logits(self.layer, self.h, self.logits_fn)
        return self._logits

    @property
    def p_exit(self) -> torch.Tensor:  # (b,) fp32
        if self._p is not None:
            return self._p
        if self.policy_fn is not None:
            return self.heads.p_exit(self.layer, self.h, fn=self.policy_fn)
        return self.heads.p_exit(self.layer, self.h, self.z)


class Strategy:
    name = "full"
    planned = False  # exit layers known before the step (plan()); no decisions inside it
    reads_policy = False  # decides from p_exit alone (the compiled exit step then fuses it, engine.py)

    def __init__(self, layers: list[int], n_layers: int):
        self.layers, self.L = layers, n_layers  # candidate layers, sorted, all < L

    def reset(self, batch: int, device) -> None:
        """Called at the start of every decode step (per-token state lives only within a step)."""

    def plan(self, tok_ids: list[int]) -> list[int]:
        """Planned strategies: each row's exit layer, from its input token id."""
        raise NotImplementedError

    def decide(self, sig: Signals, rows: torch.Tensor) -> torch.Tensor:
        """rows (b,) global batch rows still running -> (b,) bool: which exit at sig.layer."""
        raise NotImplementedError


class Full(Strategy):
    planned = True

    def plan(self, tok_ids):
        return [self.L] * len(tok_ids)


class Static(Strategy):
    name, planned = "static", True

    def __init__(self, k: int, n_layers: int):
        super().__init__([k] if k < n_layers else [], n_layers)
        self.k = k

    def plan(self, tok_ids):
        return [self.k] * len(tok_ids)


class Hash(Strategy):
    name, planned = "hash", True

    def __init__(self, layers, n_layers, vocab_size: int, method: str, special_ids=()):
        super().__init__(layers, n_layers)
        self.table = hash_table(vocab_size, layers, n_layers, method, special_ids)

    def plan(self, tok_ids):
        return [self.table[t] for t in tok_ids]


def hash_table(vocab_size: int, layers: list[int], n_layers: int, method: str, special_ids=()) -> list[int]:
    """Exit layer for every token id: buckets of equal size over `layers` (HashEE §3.2)."""
    buckets = list(layers) or [n_layers]
    n = len(buckets)
    if method == "frequency":  # ids in merge order: the first V/n ids (most frequent) exit shallowest
        idx = [i * n // vocab_size for i in range(vocab_size)]
    else:  # random-consistent: a fixed random bucket per id, the same in every process
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, n, (vocab_size,), generator=g).tolist()
    table = [buckets[i] for i in idx]
    for s in special_ids:
        if 0 <= s < vocab_size:
            table[s] = n_layers
    return table


class _Threshold(Strategy):
    """A strategy that compares one signal with a threshold t."""

    def __init__(self, layers, n_layers, threshold):
        super().__init__(layers, n_layers)
        self.t = threshold


class PolicyExit(_Threshold):
    name, reads_policy = "policy", True

    def decide(self, sig, rows):
        return sig.p_exit >= self.t


class Confidence(_Threshold):
    name = "confidence"

    def decide(self, sig, rows):
        return sig.logits.softmax(-1).amax(-1) >= self.t


class Entropy(_Threshold):
    name = "entropy"

    def decide(self, sig, rows):
        return normalized_entropy(sig.logits) <= self.t


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(z)) / log V: (b, V) -> (b,) in [0, 1]."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


class Patience(Strategy):
    name = "patience"

    def __init__(self, layers, n_layers, patience: int):
        super().__init__(layers, n_layers)
        self.n = patience

    def reset(self, batch, device):
        self.prev = torch.full((batch,), -1, dtype=torch.long, device=device)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)

    def decide(self, sig, rows):
        am = sig.logits.argmax(-1)  # (b,)
        count = torch.where(am == self.prev[rows], self.count[rows] + 1, 0)
        self.count[rows], self.prev[rows] = count, am
        return count >= self.n


class Saturation(_Threshold):
    name = "saturation"

    def reset(self, batch, device):
        self.batch = batch
        self.prev = None  # (B, D) unit-norm final-normed state at the previous candidate layer
        self.has_prev = torch.zeros(batch, dtype=torch.bool, device=device)

    def decide(self, sig, rows):
        u = F.normalize(sig.z.float(), dim=-1)  # (b, D)
        if self.prev is None:
            self.prev = torch.zeros(self.batch, u.shape[-1], device=u.device)
        cos = (u * self.prev[rows]).sum(-1)  # (b,)
        out = self.has_prev[rows] & (cos >= self.t)  # the first candidate has nothing to compare with
        self.prev[rows], self.has_prev[rows] = u, True
        return out

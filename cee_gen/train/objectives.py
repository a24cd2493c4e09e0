"""ConsistentEE's training objectives as small tensor functions (Zeng et al., AAAI 2024, §3).

Layout: per-layer quantities are (n, N) over n candidate exit layers (sorted, the last one is L) and
N token positions. Position t of a sequence predicts token t+1: `next_token_ce` is the only place
that shift happens, so the exit decision, its log-probability and its reward always refer to the
same position (the released code indexes the unshifted exit layers with the shifted CE, one
position off: §1.11 item 3).

- Stage 1 loss: PABEE/ConsistentEE's depth-weighted CE, sum_l l CE_l / sum_l l.
- Memorized layer m (the hardness of a token): the smallest candidate layer l such that every
  classifier from l up to L predicts the target; L when the last one is wrong.
- Stage 2 (REINFORCE over token-level exit episodes): log pi of exiting at candidate e is
  sum_{i<e} log(1 - p_i) + log p_e, divided by the number of decisions (e + 1); never exiting
  before L is sum_i log(1 - p_i) / n. Reward R = -CE(head_e, y) - alpha e (1 - m/L) (alpha = 0 is
  the released code); baseline = the mean reward of the K replicas of the same token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_EPS = 1e-6  # as the authors' code, inside the logs


def next_token_ce(logits: torch.Tensor, tokens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """logits (B, T, V), tokens (B, T) -> (B, T-1): entry t is CE(logits[:, t], tokens[:, t+1]).

    Targets equal to ignore_index give 0 (use `valid_targets` to drop them from means)."""
    tgt = tokens[:, 1:]  # (B, T-1)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                         ignore_index=ignore_index, reduction="none")
    return ce.view(tgt.shape)


def valid_targets(tokens: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """(B, T) -> (B, T-1) bool: positions whose next token is a real target."""
    return tokens[:, 1:] != ignore_index


def depth_weighted_ce(ce: torch.Tensor, layers: list[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 1: ce (n, N) per candidate layer -> sum_l l CE_l / sum_l l, CE_l the mean over valid N."""
    w = torch.tensor(layers, dtype=ce.dtype, device=ce.device)  # (n,)
    if mask is None:
        per_layer = ce.mean(-1)
    else:
        per_layer = (ce * mask).sum(-1) / mask.sum().clamp(min=1)
    return (w * per_layer).sum() / w.sum()


def memorized_layer(correct: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """correct (n, N) bool: does the classifier at layers[i] predict the target -> m (N,) long.

    m = the smallest layers[i] such that classifiers i..n-1 are all correct; layers[-1] (= L) when
    the last one is wrong (m = L also when only the last is right)."""
    suffix_ok = correct.flip(0).cummin(0).values.flip(0)  # (n, N): i..n-1 all correct
    first = torch.where(suffix_ok.any(0), suffix_ok.float().argmax(0), len(layers) - 1)  # (N,)
    return torch.tensor(layers, device=correct.device)[first]


def trajectory_log_prob(p: torch.Tensor, exit_idx: torch.Tensor) -> torch.Tensor:
    """p (n, N) policy p(exit) at each candidate, exit_idx (N,) in 0..n (n = never exited).

    Returns log pi / (number of decisions), (N,): the authors' normalization by the exit depth."""
    n = p.shape[0]
    idx = torch.arange(n, device=p.device)[:, None]  # (n, 1)
    stay = torch.log(1 - p + _EPS) * (idx < exit_idx[None, :])  # continued at every i < e
    go = torch.log(p + _EPS) * (idx == exit_idx[None, :])  # exited at e (none when e = n)
    decisions = torch.clamp(exit_idx + 1, max=n).to(p.dtype)
    return (stay + go).sum(0) / decisions


def hardness_reward(ce_exit: torch.Tensor, exit_layer: torch.Tensor, m: torch.Tensor, n_layers: int,
                    alpha: float) -> torch.Tensor:
    """R = -CE at the exit head - alpha * e * (1 - m / L): easy tokens (small m) pay for depth."""
    e, m = exit_layer.to(ce_exit.dtype), m.to(ce_exit.dtype)
    return -ce_exit - alpha * e * (1 - m / n_layers)


def reinforce_loss(logpi: torch.Tensor, reward: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """logpi, reward (K, N) over K replicas of N tokens -> the policy-gradient loss (scalar).

    Baseline = the replicas' mean reward per token; the advantage carries no gradient."""
    adv = (reward - reward.mean(0, keepdim=True)).detach()  # (K, N)
    per_token = -(adv * logpi).sum(0)  # (N,)
    if mask is None:
        return per_token.mean()
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def epsilon(step: int, start: float = 0.1, end: float = 0.0, decay: float = 20000.0) -> float:
    """The authors' exploration schedule: end + (start - end) exp(-step / decay)."""
    return end + (start - end) * math.exp(-step / decay)


def exit_actions(p: torch.Tensor, mode: str, eps: float = 0.0, threshold: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """p(exit) (any shape) -> bool actions of that shape: "exit here".

    `greedy`: exit when p >= threshold, except with probability eps a fair coin decides (the
    authors' epsilon-greedy). `bernoulli`: exit ~ Bernoulli(p) (on-policy REINFORCE)."""
    if mode == "bernoulli":
        return torch.rand(p.shape, generator=generator, device=p.device) < p
    if mode == "greedy":
        explore = torch.rand(p.shape, generator=generator, device=p.device) < eps
        coin = torch.rand(p.shape, generator=generator, device=p.device) < 0.5
        return torch.where(explore, coin, p >= threshold)
    raise ValueError(f"unknown exploration mode {mode!r}: use greedy or bernoulli")


def choose_exits(p: torch.Tensor, mode: str, eps: float = 0.0, threshold: float = 0.5,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """p (n, N) -> exit_idx (N,): the first candidate whose action (exit_actions) is "exit", n if none."""
    act = exit_actions(p, mode, eps, threshold, generator)
    n = p.shape[0]
    return torch.where(act.any(0), act.float().argmax(0), n)  # first True along candidates


def normalized_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(..., V) -> (...,) entropy / log V in [0, 1]: COSEE's and our `entropy` strategy's signal."""
    logp = F.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1])


def osc_loss(signal: torch.Tensor, correct: torch.Tensor, margin: float) -> torch.Tensor:
    """COSEE's Online Signal Calibration (COSEE, 2024) for an entropy signal (lower = surer).

    signal (n, N): each classifier's normalized entropy per token, with gradients; correct (n, N):
    whether its argmax is the target. For each classifier that has both right and wrong tokens in
    the batch: max(0, mean(signal | right) - mean(signal | wrong) + margin), so right predictions
    are pushed to be surer than wrong ones by the margin; the mean over those classifiers (0 if none).
    """
    c = correct.to(signal.dtype)
    n_right, n_wrong = c.sum(1), (1 - c).sum(1)  # (n,)
    both = ((n_right > 0) & (n_wrong > 0)).to(signal.dtype)  # (n,) no host sync
    right = (signal * c).sum(1) / n_right.clamp(min=1)
    wrong = (signal * (1 - c)).sum(1) / n_wrong.clamp(min=1)
    return (F.relu(right - wrong + margin) * both).sum() / both.sum().clamp(min=1)


def cosee_weights(signal: torch.Tensor, layers: list[int], taus: torch.Tensor, beta: float) -> torch.Tensor:
    """COSEE's sample weighting (COSEE, 2024), token-level: (n, N) weights, each column sums to 1.

    signal (n, N): the (detached) normalized entropy of each classifier, layers[-1] = L the last
    resort. For each threshold tau_k (K,), a token's simulated exit e is the first layer whose signal
    is below tau (L if none); classifier j gets weight softmax_j(-beta |e - j|); the K maps are
    averaged. beta = 0 gives uniform weights; a large beta puts each token on its exit layer."""
    n = signal.shape[0]
    lay = torch.tensor(layers, dtype=torch.float32, device=signal.device)  # (n,)
    below = signal[None, :-1] < taus[:, None, None]  # (K, n-1, N): the last layer always "exits"
    first = torch.where(below.any(1), below.float().argmax(1), n - 1)  # (K, N) index into layers
    e = lay[first]  # (K, N)
    w = torch.softmax(-beta * (e[:, None, :] - lay[None, :, None]).abs(), dim=1)  # (K, n, N)
    return w.mean(0)

"""ConsistentEE's stages (Zeng et al., AAAI 2024; docs/training.md), one function each, over the
states of a base model: stage 1 (exit heads, with or without LoRA fine-tuning of the backbone), the
memorized layers, stage 2 (the policy, REINFORCE) and stage 3 (heads at the policy's exits).
trainer.py runs them in order, with checkpoints and metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cee_gen.exits.heads import ExitHeads
from cee_gen.train import objectives as ob
from cee_gen.train.accel import Accel
from cee_gen.train.config import TrainConfig
from cee_gen.train.rollout import rollout


@dataclass
class Sequence:
    ids: list[int]  # prompt + response (+ EOS), cut to max_seq_tokens
    n_prompt: int


def collate(seqs: list[Sequence], pad_id: int, device):
    """Right-padded tokens (B, T), next-token targets (B, T) (-100 where none) and loss mask (B, T):
    position t predicts tokens[t + 1]; it is a loss position when that token is a response token."""
    T = max(len(s.ids) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    target = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.ids)
        tokens[b, :n] = torch.tensor(s.ids)
        target[b, :n - 1] = torch.tensor(s.ids[1:])
        mask[b, s.n_prompt - 1:n - 1] = True
    return tokens.to(device), target.to(device), mask.to(device)


def _batches(n: int, size: int, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


def _keep_states(layers, mask, store):
    """A rollout `decide` that exits nothing and keeps the states at `layers`, at the loss positions."""
    def keep(layer, h, running):
        if layer in layers:
            store[layer] = h[mask]  # (N, D)
        return torch.zeros_like(running)
    return keep


@torch.no_grad()
def _own_predictions(net, tokens, mask):
    """The model's own full-depth next-token predictions at the loss positions (N,)."""
    store = {}
    _, h = rollout(net, tokens, [], torch.zeros_like(mask), _keep_states([], mask, store))
    return net.head(h[mask]).argmax(-1)


@torch.no_grad()
def _batch_states(net, seqs, pad_id, layers, batch_size):
    """Per batch of seqs, at full depth: states {layer: (N, D)} at `layers` and L for the batch's
    loss positions, their gold targets (N,), the model's own predictions (N,), and the mask (B, T)."""
    L = net.args.n_layers
    for i in range(0, len(seqs), batch_size):
        tokens, target, mask = collate(seqs[i:i + batch_size], pad_id, net.device)
        states = {}
        _, h = rollout(net, tokens, layers, torch.zeros_like(mask), _keep_states(layers, mask, states))
        states[L] = h[mask]
        yield states, target[mask], net.head(states[L]).argmax(-1), mask


@torch.no_grad()
def collect_states(net, seqs, pad_id, layers, batch_size):
    """Stage 1 cache: states {layer: (N, D)} at the candidate layers and L for every loss position,
    with the gold targets (N,) and the full model's own predictions (N,)."""
    X = {x: [] for x in layers + [net.args.n_layers]}
    gold, own = [], []
    for states, g, o, _ in _batch_states(net, seqs, pad_id, layers, batch_size):
        for x in X:
            X[x].append(states[x])
        gold.append(g)
        own.append(o)
    return {x: torch.cat(v) for x, v in X.items()}, torch.cat(gold), torch.cat(own)


@torch.no_grad()
def fit_adapters(heads: ExitHeads, X: dict, ridge: float = 1e-2) -> dict[int, float]:
    """Closed-form start for the adapters: a tuned lens (Belrose et al., 2023) by regression.

    For each layer l, with z_l = norm(h_l) and the target norm(h_L) (what the LM head reads), the
    adapter's map z -> U D z is the rank-r reduced-rank ridge regression of norm(h_L) - z_l on z_l:
    M = R^T Z (Z^T Z + lam I)^-1, then U = V_r, D = V_r^T M with V_r the top r right singular vectors
    of the fitted values Z M^T (eigenvectors of M Z^T Z M^T). On the default model this cuts the
    layer-18 CE from 20 (logit lens) to 6 nats before any gradient step. Returns each layer's R^2."""
    L = heads.net.args.n_layers
    T = heads.normed(X[L]).float()  # (N, D)
    fit = {}
    for x in heads.layers:
        ad = heads.adapters[str(x)]
        Z = heads.normed(X[x]).float()
        R = T - Z
        G = Z.T @ Z  # (D, D)
        lam = ridge * G.diagonal().mean()
        M = torch.linalg.solve(G + lam * torch.eye(G.shape[0], device=G.device), Z.T @ R).T  # R ~ Z M^T
        V = torch.linalg.eigh(M @ G @ M.T).eigenvectors[:, -heads.adapter_rank:]  # (D, r), top r
        ad.up.weight.copy_(V.to(ad.up.weight.dtype))
        ad.down.weight.copy_((V.T @ M).to(ad.down.weight.dtype))
        resid = R - ad.up(ad.down(Z))
        fit[x] = round(1 - resid.pow(2).sum().item() / R.pow(2).sum().clamp(min=1e-12).item(), 4)
    return fit


def _stage1_loss(heads, states, y, loss_layers, cfg: TrainConfig, progress: float, co, gen):
    """Weighted per-layer CE of the heads on states {layer: (N, D)}, layers[-1] = L; returns the
    loss, the CE table (n, N) and the OSC term (None without it). Weights: depth (l / sum l, every
    token alike) or COSEE's, which adds its signal calibration loss (weight cosee_osc)."""
    logits = [heads.logits(x, states[x]) for x in loss_layers]  # n x (N, V)
    ce = torch.stack([F.cross_entropy(z, y, reduction="none") for z in logits])  # (n, N)
    if cfg.weighting == "depth":
        w = torch.tensor(loss_layers, dtype=ce.dtype, device=ce.device)
        w = (w / w.sum())[:, None].expand_as(ce)
        return (w * ce).sum(0).mean(), ce, None
    osc = cfg.cosee_osc > 0
    Z = torch.stack([ob.normalized_entropy(z if osc else z.detach()) for z in logits])  # (n, N)
    co.see(Z.detach())
    lo, hi = co.taus
    taus = lo + (hi - lo) * torch.rand(cfg.cosee_thresholds, generator=gen)
    w = ob.cosee_weights(Z.detach(), loss_layers, taus.to(Z.device), cfg.cosee_beta * progress)
    loss = (w * ce).sum(0).mean()
    if not osc:
        return loss, ce, None
    right = torch.stack([z.argmax(-1) == y for z in logits])  # (n, N)
    calib = ob.osc_loss(Z, right, cfg.cosee_margin)
    return loss + cfg.cosee_osc * calib, ce, calib


def _osc_field(osc) -> dict:
    return {} if osc is None else {"osc": round(osc.item(), 4)}


class _Cosee:
    """COSEE's threshold range: U[0, 1] in the first epoch, then the signals seen in the previous one."""

    def __init__(self):
        self.taus, self.seen = (0.0, 1.0), [math.inf, -math.inf]

    def see(self, Z: torch.Tensor):
        self.seen = [min(self.seen[0], Z.min().item()), max(self.seen[1], Z.max().item())]

    def next_epoch(self):
        if self.seen[0] < self.seen[1]:
            self.taus = tuple(self.seen)
        self.seen = [math.inf, -math.inf]


def stage1(heads: ExitHeads, X, y, layers, cfg: TrainConfig, log, gen, acc: Accel, chunk: int = 256):
    """Frozen backbone: the adapters learn on the cached states {layer: (N, D)}, L included."""
    params = list(heads.adapters.parameters())
    if not params:
        return
    loss_layers = layers + [heads.net.args.n_layers]
    opt = torch.optim.AdamW(params, lr=cfg.lr_heads)
    N, step, co = y.numel(), 0, _Cosee()
    total = cfg.epochs * acc.steps(math.ceil(N / chunk))
    for epoch in range(cfg.epochs):
        batches = acc.shard(_batches(N, chunk, gen))
        for j, idx in enumerate(batches):
            states = {x: X[x][idx] for x in loss_layers}
            with acc.autocast():
                loss, ce, osc = _stage1_loss(heads, states, y[idx], loss_layers, cfg, step / total, co, gen)
            acc.step(opt, loss, last=j == len(batches) - 1)
            log(stage=1, epoch=epoch, step=step, loss=round(loss.item(), 4), **_osc_field(osc),
                ce_per_layer=[round(v, 3) for v in ce.detach().mean(1).tolist()])
            step += 1
        co.next_epoch()


def stage1_finetune(net, heads: ExitHeads, seqs, pad_id, layers, cfg: TrainConfig, log, gen, bar,
                    acc: Accel):
    """Exit-aware fine-tuning: LoRA on the backbone and the heads' adapters learn together.

    Every step runs the batch through the LoRA-hooked backbone with gradients and puts a loss on
    `layers_per_step` candidate heads drawn anew (plus the model's own head at L), weighted by depth
    or by COSEE. Targets: gold, or the base model's own prediction (hooks off, no gradients)."""
    L = net.args.n_layers
    groups = [{"params": list(heads.lora.parameters()), "lr": cfg.lr_lora}]
    if heads.adapters:
        groups.append({"params": list(heads.adapters.parameters()), "lr": cfg.lr_heads})
    opt = torch.optim.AdamW(groups)
    dev = net.device
    k = cfg.layers_per_step
    step, co = 0, _Cosee()
    total = cfg.epochs * acc.steps(math.ceil(len(seqs) / cfg.batch_size))
    for epoch in range(cfg.epochs):
        batches = acc.shard(_batches(len(seqs), cfg.batch_size, gen))
        for j, idx in enumerate(batches):
            tokens, target, mask = collate([seqs[i] for i in idx], pad_id, dev)
            y = target[mask] if cfg.target == "gold" else _own_predictions(net, tokens, mask)
            pick = layers if not k or k >= len(layers) else \
                sorted(layers[i] for i in torch.randperm(len(layers), generator=gen)[:k].tolist())
            loss_layers = pick + [L]
            states = {}
            handles = heads.lora.attach(net)
            try:
                with acc.autocast():
                    keep = _keep_states(pick, mask, states)
                    _, h = rollout(net, tokens, pick, torch.zeros_like(mask), keep)
                    states[L] = h[mask]
                    loss, ce, osc = _stage1_loss(heads, states, y, loss_layers, cfg, step / total, co, gen)
                acc.step(opt, loss, last=j == len(batches) - 1)
            finally:
                for hd in handles:
                    hd.remove()
            log(stage=1, epoch=epoch, step=step, loss=round(loss.item(), 4), layers=loss_layers,
                **_osc_field(osc),
                ce_per_layer=[round(v, 3) for v in ce.detach().mean(1).tolist()])
            bar.update(1, f"stage 1 loss {loss.item():.3f}")
            step += 1
        co.next_epoch()


@torch.no_grad()
def memorized_layers(net, heads, seqs, pad_id, layers, target: str, batch_size: int):
    """Memorized layer m of every loss position (objectives.memorized_layer), streamed per batch.

    Classifiers are evaluated from layer L downwards and a position stops at its first wrong one:
    m depends only on that, and most tokens stop within a few layers of the top. Returns the
    per-sequence table (_m_table) and the flat m values."""
    L = net.args.n_layers
    order = layers + [L]
    flat, where, start = [], [], 0
    for states, gold, own, mask in _batch_states(net, seqs, pad_id, layers, batch_size):
        y = gold if target == "gold" else own
        correct = torch.zeros(len(order), y.numel(), dtype=torch.bool)
        alive = torch.ones(y.numel(), dtype=torch.bool)
        for j in range(len(order) - 1, -1, -1):
            sel = alive.nonzero().squeeze(1)
            if sel.numel() == 0:
                break
            ok = heads.logits(order[j], states[order[j]][sel]).argmax(-1) == y[sel]
            correct[j, sel] = ok
            alive[sel] = ok
        flat.append(ob.memorized_layer(correct, order))
        where += [(start + b, t) for b, t in mask.nonzero().tolist()]
        start += mask.shape[0]
    m = torch.cat(flat)
    return _m_table(seqs, where, m, L), m


def _m_table(seqs, where, m, L):
    """Per-sequence memorized layers (T_i,), L where a position is not a loss position."""
    tab = [torch.full((len(s.ids),), L, dtype=torch.long) for s in seqs]
    for (i, t), v in zip(where, m.tolist()):
        tab[i][t] = v
    return tab


def _targets(net, tokens, target, mask, kind: str) -> torch.Tensor:
    """(B, T) next-token targets: the gold tokens, or (`self`) the model's own full-depth predictions
    at the loss positions (-100 elsewhere)."""
    if kind == "gold":
        return target
    out = torch.full_like(target, -100)
    out[mask] = _own_predictions(net, tokens, mask)
    return out


def _rollout_policy(net, heads, tokens, mask, layers, decide_kind, eps, gen):
    """A rollout whose exits the policy decides; returns exit layers, exit states and, per
    candidate layer, the normed states the policy read (to recompute p with gradients)."""
    seen = {}

    def decide(layer, h, running):
        z = heads.normed(h)
        seen[layer] = z
        return ob.exit_actions(heads.p_exit(layer, h, z), decide_kind, eps, generator=gen)  # (B, T)

    with torch.no_grad():
        exit_layer, h = rollout(net, tokens, layers, mask, decide)
    return exit_layer, h, seen


@torch.no_grad()
def _ce_at_exit(heads, h, exit_layer, target, layers, L):
    ce = torch.zeros(exit_layer.shape, dtype=torch.float32, device=h.device)
    for x in layers + [L]:
        sel = (exit_layer == x) & (target != -100)
        if sel.any():
            ce[sel] = F.cross_entropy(heads.logits(x, h[sel]), target[sel], reduction="none")
    return ce


def stage2(net, heads, seqs, m_tab, pad_id, layers, cfg: TrainConfig, log, gen, bar, acc: Accel):
    L, K = net.args.n_layers, cfg.replicas
    opt = torch.optim.AdamW(list(heads.policies.parameters()), lr=cfg.lr_policy)
    dev = net.device
    cand = torch.tensor(layers + [L], device=dev)
    step = 0
    for epoch in range(cfg.epochs):
        batches = acc.shard(_batches(len(seqs), cfg.batch_size, gen))
        for j, idx in enumerate(batches):
            chunk = [seqs[i] for i in idx]
            tokens, target, mask = collate(chunk, pad_id, dev)
            target = _targets(net, tokens, target, mask, cfg.target)
            B, T = tokens.shape
            m = torch.full((B, T), L, dtype=torch.long, device=dev)
            for b, i in enumerate(idx):
                m[b, :len(seqs[i].ids)] = m_tab[i]
            rep = lambda t: t.repeat(K, *([1] * (t.dim() - 1)))  # noqa: E731  (K*B, ...), replica-major
            may = rep(mask).clone()
            may[:B] = False  # replica 0: the expert, never exits
            with acc.autocast():
                exit_layer, h, seen = _rollout_policy(net, heads, rep(tokens), may, layers, cfg.explore,
                                                      ob.epsilon(step * len(layers)), gen)
                reward = ob.hardness_reward(_ce_at_exit(heads, h, exit_layer, rep(target), layers, L),
                                            exit_layer, rep(m), L, cfg.alpha).float()  # (K*B, T)
                exit_idx = (exit_layer[..., None] == cand).float().argmax(-1)  # (K*B, T) index into cand
                p = torch.stack([heads.p_exit(x, None, seen[x]) for x in layers]).float()  # (n, K*B, T)
                logpi = ob.trajectory_log_prob(p.flatten(1), exit_idx.flatten())  # (K*B*T,)
            R, lp = reward.view(K, B * T), logpi.view(K, B * T)
            w = may.view(K, B * T).float()
            adv = (R - R.mean(0, keepdim=True)).detach()
            loss = -(adv * lp * w).sum() / w.sum().clamp(min=1)
            acc.step(opt, loss, last=j == len(batches) - 1)
            explored = exit_layer[B:][mask.repeat(K - 1, 1)].float()
            log(stage=2, epoch=epoch, step=step, loss=round(loss.item(), 5),
                mean_reward=round(R[1:].flatten()[w[1:].flatten() > 0].mean().item(), 4),
                mean_exit_layer=round(explored.mean().item(), 3))
            if bar is not None:
                bar.update(1, f"mean exit {explored.mean().item():.1f}")
            step += 1


def stage3(net, heads, seqs, pad_id, layers, cfg: TrainConfig, log, gen, bar, acc: Accel):
    params = list(heads.adapters.parameters())
    if not params:
        return
    L = net.args.n_layers
    opt = torch.optim.AdamW(params, lr=cfg.lr_stage3)
    dev = net.device
    step = 0
    for epoch in range(cfg.epochs):
        batches = acc.shard(_batches(len(seqs), cfg.batch_size, gen))
        for j, idx in enumerate(batches):
            tokens, target, mask = collate([seqs[i] for i in idx], pad_id, dev)
            target = _targets(net, tokens, target, mask, cfg.target)
            with acc.autocast():
                exit_layer, h, _ = _rollout_policy(net, heads, tokens, mask, layers, "greedy", 0.0, gen)
                losses = [F.cross_entropy(heads.logits(x, h[sel]), target[sel], reduction="sum")
                          for x in layers if (sel := mask & (exit_layer == x)).any()]
            n_early = int((mask & (exit_layer < L)).sum())
            if losses:
                loss = torch.stack(losses).sum() / n_early
                acc.step(opt, loss, last=j == len(batches) - 1)
            log(stage=3, epoch=epoch, step=step, loss=round(loss.item(), 4) if losses else None,
                mean_exit_layer=round(exit_layer[mask].float().mean().item(), 3))
            if bar is not None:
                bar.update(1)
            step += 1


@torch.no_grad()
def exit_histogram(net, heads, seqs, pad_id, layers, batch_size, max_batches: int = 8) -> dict[int, int]:
    """Exit layer -> count of the policy's greedy exits (p >= 0.5) at the loss positions of the
    first few batches: what inference would do, teacher-forced."""
    hist: dict[int, int] = {}
    if not heads.has_policy:
        return hist
    dev = net.device
    for i in range(0, min(len(seqs), batch_size * max_batches), batch_size):
        tokens, _, mask = collate(seqs[i:i + batch_size], pad_id, dev)
        exit_layer, _, _ = _rollout_policy(net, heads, tokens, mask, layers, "greedy", 0.0, None)
        for x in exit_layer[mask].tolist():
            hist[x] = hist.get(x, 0) + 1
    return dict(sorted(hist.items()))

"""ConsistentEE's three stages over a frozen base model (shared/reference/methods.md §1.6, §1.10).

    cee-train --dataset alpaca --out heads.safetensors          # or train(TrainConfig(...))

- Stage 1, exit heads: the backbone's states at the candidate layers are computed once and cached;
  the adapters learn the depth-weighted CE sum_l l CE_l / sum_l l against the gold next token or
  the full model's own prediction (`target`).
- Memorized layer m of every training token, from the stage-1 heads (objectives.memorized_layer).
- Stage 2, policy: REINFORCE over token-level exit episodes. Each batch is replicated K times and
  rolled out exactly as inference runs (rollout.py: exited states copied up through each deeper
  layer's own norm and K/V projections, i.e. `propagate`); replica 0 never exits (the authors'
  "expert" replica, it enters only the baseline). Actions are epsilon-greedy on p >= 0.5 (the
  authors' code) or sampled from Bernoulli(p). Reward R = -CE(head_e, y) - alpha e (1 - m/L), the
  baseline the replicas' mean, log pi normalized by the number of decisions. Only the policy trains.
- Stage 3: the policy fixed (greedy at 0.5), each token's exit head learns at its chosen exit layer.

Loss positions are those that predict a response token (the prompt is context only, unlike the
authors' train_on_inputs=True): exits are decided on generated tokens, so that is what trains.
Metrics go to `<out>.metrics.jsonl`, one JSON object per step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from cee_gen.config import ExitConfig, TrainConfig
from cee_gen.errors import CeeGenError
from cee_gen.exits.heads import ExitHeads
from cee_gen.train import objectives as ob
from cee_gen.train.rollout import rollout


@dataclass
class Sequence:
    ids: list[int]  # prompt + response (+ EOS), cut to max_seq_tokens
    n_prompt: int


def prepare(model, cfg: TrainConfig) -> list[Sequence]:
    """Training rows of cfg.dataset -> token sequences with at least one response target."""
    from cee_gen import data

    tok = model.tokenizer
    rows = data.load_split(cfg.dataset, "train", cfg.data_dir, limit=cfg.max_examples)
    eos = model.eos_token_ids[0] if model.eos_token_ids else None
    out = []
    for ex in rows:
        prompt = data.render(ex, cfg.template, tok, max_prompt_tokens=cfg.max_seq_tokens * 3 // 4)
        chat = (cfg.template or data.DATASETS[cfg.dataset].template) == "chat"
        p_ids = tok(prompt, add_special_tokens=not chat)["input_ids"]  # chat text has its specials
        r_ids = tok(ex.reference, add_special_tokens=False)["input_ids"] + ([] if eos is None else [eos])
        ids = (p_ids + r_ids)[:cfg.max_seq_tokens]
        if len(ids) - len(p_ids) >= 1 and len(p_ids) >= 1:
            out.append(Sequence(ids, len(p_ids)))
    if not out:
        raise CeeGenError(f"no usable training rows in {cfg.dataset}: raise max_seq_tokens or "
                          "max_examples")
    return out


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


class _Log:
    def __init__(self, path: Path):
        self.f = path.open("w")
        self.t0 = time.perf_counter()

    def __call__(self, **rec):
        rec["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()


def _batches(n: int, size: int, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


@torch.no_grad()
def collect_states(net, heads: ExitHeads, seqs, pad_id, layers, batch_size):
    """Stage 1 cache: states (n, N, D) at the candidate layers for every loss position, with the
    gold targets (N,), the full model's own predictions (N,), and where each position lies."""
    L = net.args.n_layers
    X = {x: [] for x in layers}
    gold, own, where = [], [], []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        tokens, target, mask = collate(chunk, pad_id, net.tok_embeddings.weight.device)
        no_exit = torch.zeros_like(mask)
        states = {}

        def keep(layer, h, running, states=states, mask=mask):
            states[layer] = h[mask]
            return torch.zeros_like(running)

        _, h_last = rollout(net, tokens, layers, no_exit, keep)
        for x in layers:
            X[x].append(states[x])
        gold.append(target[mask])
        own.append(heads.logits(L, h_last[mask]).argmax(-1))
        where += [(i + b, t) for b, t in mask.nonzero().tolist()]
    return {x: torch.cat(v) for x, v in X.items()}, torch.cat(gold), torch.cat(own), where


def stage1(heads: ExitHeads, X, y, layers, cfg: TrainConfig, log, gen, chunk: int = 256):
    params = list(heads.adapters.parameters())
    if not params:
        return
    opt = torch.optim.AdamW(params, lr=cfg.lr_heads)
    N = y.numel()
    step = 0
    for epoch in range(cfg.epochs):
        for idx in _batches(N, chunk, gen):
            ce = torch.stack([F.cross_entropy(heads.logits(x, X[x][idx]), y[idx], reduction="none")
                              for x in layers])  # (n, b)
            loss = ob.depth_weighted_ce(ce, layers)
            opt.zero_grad()
            loss.backward()
            opt.step()
            log(stage=1, epoch=epoch, step=step, loss=round(loss.item(), 4),
                ce_per_layer=[round(v, 3) for v in ce.mean(1).tolist()])
            step += 1


def _m_table(seqs, where, m, L):
    """Per-sequence memorized layers (T_i,), L where a position is not a loss position."""
    tab = [torch.full((len(s.ids),), L, dtype=torch.long) for s in seqs]
    for (i, t), v in zip(where, m.tolist()):
        tab[i][t] = v
    return tab


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


def stage2(net, heads, seqs, m_tab, pad_id, layers, cfg: TrainConfig, log, gen):
    L, K = net.args.n_layers, cfg.replicas
    opt = torch.optim.AdamW(list(heads.policies.parameters()), lr=cfg.lr_policy)
    dev = net.tok_embeddings.weight.device
    cand = torch.tensor(layers + [L], device=dev)
    step = 0
    for epoch in range(cfg.epochs):
        for idx in _batches(len(seqs), cfg.batch_size, gen):
            chunk = [seqs[i] for i in idx]
            tokens, target, mask = collate(chunk, pad_id, dev)
            B, T = tokens.shape
            m = torch.full((B, T), L, dtype=torch.long, device=dev)
            for b, i in enumerate(idx):
                m[b, :len(seqs[i].ids)] = m_tab[i]
            rep = lambda t: t.repeat(K, *([1] * (t.dim() - 1)))  # noqa: E731  (K*B, ...), replica-major
            may = rep(mask).clone()
            may[:B] = False  # replica 0: the expert, never exits
            exit_layer, h, seen = _rollout_policy(net, heads, rep(tokens), may, layers, cfg.explore,
                                                  ob.epsilon(step * len(layers)), gen)
            reward = ob.hardness_reward(_ce_at_exit(heads, h, exit_layer, rep(target), layers, L),
                                        exit_layer, rep(m), L, cfg.alpha)  # (K*B, T)
            exit_idx = (exit_layer[..., None] == cand).float().argmax(-1)  # (K*B, T) index into cand
            p = torch.stack([heads.p_exit(x, None, seen[x]) for x in layers])  # (n, K*B, T), with grad
            logpi = ob.trajectory_log_prob(p.flatten(1), exit_idx.flatten())  # (K*B*T,)
            R, lp = reward.view(K, B * T), logpi.view(K, B * T)
            w = may.view(K, B * T).float()
            adv = (R - R.mean(0, keepdim=True)).detach()
            loss = -(adv * lp * w).sum() / w.sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            explored = exit_layer[B:][mask.repeat(K - 1, 1)].float()
            log(stage=2, epoch=epoch, step=step, loss=round(loss.item(), 5),
                mean_reward=round(R[1:].flatten()[w[1:].flatten() > 0].mean().item(), 4),
                mean_exit_layer=round(explored.mean().item(), 3))
            step += 1


def stage3(net, heads, seqs, pad_id, layers, cfg: TrainConfig, log, gen):
    params = list(heads.adapters.parameters())
    if not params:
        return
    L = net.args.n_layers
    opt = torch.optim.AdamW(params, lr=cfg.lr_stage3)
    dev = net.tok_embeddings.weight.device
    step = 0
    for epoch in range(cfg.epochs):
        for idx in _batches(len(seqs), cfg.batch_size, gen):
            tokens, target, mask = collate([seqs[i] for i in idx], pad_id, dev)
            exit_layer, h, _ = _rollout_policy(net, heads, tokens, mask, layers, "greedy", 0.0, gen)
            losses = [F.cross_entropy(heads.logits(x, h[sel]), target[sel], reduction="sum")
                      for x in layers if (sel := mask & (exit_layer == x)).any()]
            n_early = int((mask & (exit_layer < L)).sum())
            if losses:
                loss = torch.stack(losses).sum() / n_early
                opt.zero_grad()
                loss.backward()
                opt.step()
            log(stage=3, epoch=epoch, step=step, loss=round(loss.item(), 4) if losses else None,
                mean_exit_layer=round(exit_layer[mask].float().mean().item(), 3))
            step += 1


def train(cfg: TrainConfig, progress=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Run the stages of cfg on its base model; write the heads file; return its path."""
    import cee_gen

    cfg.validate()
    out = Path(cfg.out).expanduser()
    if not out.parent.is_dir():
        raise CeeGenError(f"cannot write --out {out}: folder {out.parent} does not exist")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = cee_gen.load_model(cfg.model, dtype="float32", device="cpu")
    net, L = model.net, model.n_layers
    layers = ExitConfig(exit_layers=cfg.exit_layers).candidates(L, list(range(1, L)))
    seqs = prepare(model, cfg)
    pad = model.pad_token_id
    heads = ExitHeads(net, layers, adapter_rank=cfg.adapter_rank, policy=cfg.policy,
                      policy_init_p=cfg.policy_init_p)
    log = _Log(out.with_name(out.name + ".metrics.jsonl"))
    stages = cfg.stage_list
    progress(f"cee-train: {len(seqs)} sequences from {cfg.dataset} (train split), {len(layers)} candidate "
             f"layers, stages {','.join(stages)}")

    X, gold, own, where = collect_states(net, heads, seqs, pad, layers, cfg.batch_size)
    y = gold if cfg.target == "gold" else own
    progress(f"cee-train: cached {y.numel()} loss positions")
    if "1" in stages:
        stage1(heads, X, y, layers, cfg, log, gen)
    with torch.no_grad():
        correct = torch.stack([heads.logits(x, X[x]).argmax(-1) == y for x in layers] + [own == y])
    m = ob.memorized_layer(correct, layers + [L])
    acc = [round(v, 4) for v in correct.float().mean(1).tolist()]  # per candidate layer, then L
    summary = {"positions": int(y.numel()), "head_accuracy": acc,
               "mean_memorized_layer": round(m.float().mean().item(), 3)}
    progress(f"cee-train: mean memorized layer {summary['mean_memorized_layer']} of {L}")
    del X
    m_tab = _m_table(seqs, where, m, L)
    if "2" in stages:
        stage2(net, heads, seqs, m_tab, pad, layers, cfg, log, gen)
    if "3" in stages:
        stage3(net, heads, seqs, pad, layers, cfg, log, gen)
    heads.meta["training"] = {"method": "cee-train (ConsistentEE stages over a frozen backbone)",
                              "config": asdict(cfg), **summary}
    heads.save(out, base_name=model.name)
    progress(f"cee-train: wrote {out} ({heads.n_params()} parameters); metrics in {log.f.name}")
    return out

"""ConsistentEE's three stages over a frozen base model (Zeng et al., AAAI 2024; docs/training.md).

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
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError, one_line
from cee_gen.exits.heads import ExitHeads
from cee_gen.files import atomic_path, pyplot, save_figure
from cee_gen.progress import Progress
from cee_gen.train.accel import Accel
from cee_gen.train.config import TrainConfig
from cee_gen.train.stages import (
    Sequence,
    collect_states,
    exit_histogram,
    fit_adapters,
    memorized_layers,
    stage1,
    stage1_finetune,
    stage2,
    stage3,
)
from cee_gen.weights.lora import LoRA, parse_targets


def prepare(model, cfg: TrainConfig, split: str = "train") -> list[Sequence]:
    """Rows of cfg.dataset's `split` (training reads train) -> token sequences (prompt + reference +
    EOS) with at least one response target."""
    from cee_gen import data

    tok = model.tokenizer
    rows = data.load_split(cfg.dataset, split, cfg.data_dir, limit=cfg.max_examples)
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
        raise CeeGenError(f"no usable {split} rows in {cfg.dataset}: raise max_seq_tokens or "
                          "max_examples")
    return out


class _Log:
    """Metrics as JSON lines; `lines` counts them (a checkpoint records it, resume cuts back to it)."""

    def __init__(self, path: Path, append: bool = False, write: bool = True):
        self.lines = sum(1 for _ in path.open()) if append else 0
        self.f = path.open("a" if append else "w") if write else None  # other processes: count only
        self.t0 = time.perf_counter()

    def __call__(self, **rec):
        rec["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        if self.f is not None:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        self.lines += 1


class _Bar:
    """Training progress on stderr (off when `quiet`): a bar on a terminal, a few plain lines elsewhere."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def start(self, total: int, desc: str):
        self.close()
        self.bar = Progress(total, desc, "steps", enabled=not self.quiet)

    def update(self, n: int, postfix: str = ""):
        if self.bar is not None:
            self.bar.update(n, postfix)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _load_init(heads: ExitHeads, path: str, model) -> dict:
    """Start from a heads file's tensors (same layout); its LoRA is merged later, with this run's."""
    from cee_gen.exits.heads import load_heads

    src = load_heads(path, model, merge=False)  # identity and integrity checks
    want, got = heads.state_dict(), src.state_dict()
    if want.keys() != got.keys() or any(want[k].shape != got[k].shape for k in want):
        raise CeeGenError(f"--init {path}: its heads (layers {src.layers}, adapter rank {src.adapter_rank}, "
                          f"LoRA rank {src.lora.rank if src.lora else 0}) differ from this run's: use the "
                          "same --exit-layers, --adapter-rank, --policy, --lora-rank and --lora-targets")
    heads.load_state_dict(got)
    return {"path": str(path), **src.meta.get("training", {})}


def _checkpoint(path: Path, **state) -> None:
    with atomic_path(path) as tmp:  # a crash mid-write leaves the previous checkpoint
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> dict:
    """A checkpoint _checkpoint wrote. Loaded with weights_only (tensors, numbers, strings, lists and
    dicts; no code runs), so a file planted beside --out cannot execute anything; anything else is a
    one-line error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CeeGenError(f"--resume: {path} is not a cee-train checkpoint or is damaged "
                          f"({one_line(e)[:120]}): delete it and run without --resume") from None
    keys = {"config", "done", "heads", "gen", "summary", "m_tab", "hists", "metric_lines"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise CeeGenError(f"--resume: {path} is not a cee-train checkpoint (it lacks "
                          f"{sorted(keys - set(state)) if isinstance(state, dict) else 'everything'}): "
                          "delete it and run without --resume")
    return state


def _resumable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume")
    return d


def train(cfg: TrainConfig, progress=lambda msg: print(msg, file=sys.stderr), quiet: bool = False) -> Path:
    """Run the stages of cfg on its base model; write the heads file; return its path.

    After each finished stage the state goes to `<out>.ckpt` (heads, LoRA, memorized layers, the
    random generator), so `resume=True` after an interruption skips the finished stages and ends
    with the same file an uninterrupted run writes. The checkpoint is removed once `out` is written."""
    import cee_gen

    cfg.validate()
    out = Path(cfg.out).expanduser()
    if not out.parent.is_dir():
        raise CeeGenError(f"cannot write --out {out}: folder {out.parent} does not exist")
    ckpt_path = out.with_name(out.name + ".ckpt")
    state = {}
    if cfg.resume:
        if not ckpt_path.is_file():
            raise CeeGenError(f"--resume: no checkpoint {ckpt_path} (it is written after each finished "
                              "stage): run without --resume")
        state = _load_checkpoint(ckpt_path)
        if state["config"] != _resumable(cfg):
            diff = sorted(k for k in state["config"] if state["config"][k] != _resumable(cfg).get(k))
            raise CeeGenError(f"--resume: checkpoint {ckpt_path} was made with other settings ({diff}): "
                              "resume with the same flags, or run without --resume")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    acc = Accel(cfg.device, cfg.mixed_precision, cfg.grad_accum)
    # floats: the backbone's LoRA and gradients need them (GGUF blocks are for inference)
    model = cee_gen.load_model(cfg.model, dtype="float32", device=str(acc.device), weights="fp")
    net, L = model.net, model.n_layers
    net.requires_grad_(False)
    layers = ExitConfig(exit_layers=cfg.exit_layers).candidates(L, list(range(1, L)))
    seqs = prepare(model, cfg)
    pol_seqs = seqs[:cfg.policy_examples] if cfg.policy_examples else seqs
    pad = model.pad_token_id
    lora = LoRA(net.args, cfg.lora_rank, parse_targets(cfg.lora_targets), cfg.lora_alpha) \
        if cfg.lora_rank else None
    heads = ExitHeads(net, layers, adapter_rank=cfg.adapter_rank, policy=cfg.policy,
                      policy_init_p=cfg.policy_init_p, lora=lora)
    metrics = out.with_name(out.name + ".metrics.jsonl")
    done, summary, m_tab, hists = [], {}, None, {}
    if cfg.init:
        summary["init"] = _load_init(heads, cfg.init, model)
    if state:
        heads.load_state_dict(state["heads"])
        gen.set_state(state["gen"])
        done, summary, m_tab, hists = state["done"], state["summary"], state["m_tab"], state["hists"]
        lines = metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []
        metrics.write_text("".join(lines[:state["metric_lines"]]))
    log = _Log(metrics, append=bool(state), write=acc.main)
    bar = _Bar(quiet or not acc.main)
    if not acc.main:  # under `accelerate launch`: one process reports and writes the files
        progress = lambda msg: None  # noqa: E731
    stages = cfg.stage_list
    progress(f"cee-train: {len(seqs)} sequences from {cfg.dataset} (train split), {len(layers)} candidate "
             f"layers, stages {','.join(stages)}"
             + (f", LoRA rank {cfg.lora_rank} on {cfg.lora_targets} ({lora.n_params()} parameters)"
                if lora else "")
             + (f"; resuming after stage(s) {','.join(done)}" if done else ""))

    def save_state(stage):
        done.append(stage)
        if acc.main:
            _checkpoint(ckpt_path, config=_resumable(cfg), done=done, heads=heads.state_dict(),
                        gen=gen.get_state(), summary=summary, m_tab=m_tab, hists=hists,
                        metric_lines=log.lines)

    X = None  # the frozen path's state cache, shared by the regression start and stage 1
    if "1" not in done:
        if "1" in stages and lora is None:
            X, gold, own = collect_states(net, seqs, pad, layers, cfg.batch_size)
            progress(f"cee-train: cached the states of {gold.numel()} loss positions")
        if "1" in stages and heads.adapters and cfg.adapter_init == "regression" and not cfg.init:
            fit_seqs = seqs[:cfg.fit_examples]
            if X is None:
                Xf, _, _ = collect_states(net, fit_seqs, pad, layers, cfg.batch_size)
            else:
                n_fit = sum(len(s.ids) - s.n_prompt for s in fit_seqs)  # their loss positions come first
                Xf = {x: v[:n_fit] for x, v in X.items()}
            r2 = fit_adapters(heads, Xf)
            del Xf
            summary["adapter_fit_r2"] = r2
            progress(f"cee-train: adapters fitted by regression on {len(fit_seqs)} sequences (R^2 "
                     f"{min(r2.values()):.2f} at layer {min(r2, key=r2.get)} .. {max(r2.values()):.2f})")
        if "1" in stages and lora is not None:
            bar.start(cfg.epochs * acc.steps(math.ceil(len(seqs) / cfg.batch_size)), "stage 1 (LoRA + heads)")
            stage1_finetune(net, heads, seqs, pad, layers, cfg, log, gen, bar, acc)
        elif "1" in stages:
            stage1(heads, X, gold if cfg.target == "gold" else own, layers, cfg, log, gen, acc)
            del X
        bar.close()
    if lora is not None:
        model.weights.changing(net)  # the heads file keeps the base weights' probe
        lora.merge(net)  # stages 2, 3 and the memorized layers see the fine-tuned model
        model.weights.merged = "cee-train"
    if "1" not in done:
        m_tab, m = memorized_layers(net, heads, pol_seqs, pad, layers, cfg.target, cfg.batch_size)
        hists["memorized"] = {int(k): int(v) for k, v in zip(*m.unique(return_counts=True))}
        summary.update(positions=int(m.numel()), mean_memorized_layer=round(m.float().mean().item(), 3))
        progress(f"cee-train: mean memorized layer {summary['mean_memorized_layer']} of {L} "
                 f"over {m.numel()} positions")
        save_state("1")
    for stage in ("2", "3"):
        if stage in done:
            continue
        if stage in stages:
            bar.start(cfg.epochs * acc.steps(math.ceil(len(pol_seqs) / cfg.batch_size)), f"stage {stage}")
            if stage == "2":
                stage2(net, heads, pol_seqs, m_tab, pad, layers, cfg, log, gen, bar, acc)
            else:
                stage3(net, heads, pol_seqs, pad, layers, cfg, log, gen, bar, acc)
            bar.close()
            hists[f"after stage {stage}"] = exit_histogram(net, heads, pol_seqs, pad, layers, cfg.batch_size)
        save_state(stage)
    summary["exit_histograms"] = hists
    method = "cee-train: ConsistentEE stages" + (f" with LoRA rank {cfg.lora_rank} fine-tuning of the "
                                                  "backbone" if lora else " over a frozen backbone")
    heads.meta["training"] = {"method": method, "config": asdict(cfg), **summary}
    acc.acc.wait_for_everyone()
    if not acc.main:
        return out
    heads.save(out, base_name=model.name, half=True, probe=model.weights.base_probe(net))
    ckpt_path.unlink(missing_ok=True)
    png = plot_training(metrics, hists, out.with_name(out.name + ".png"))
    progress(f"cee-train: wrote {out} ({heads.n_params()} parameters); metrics in {metrics}"
             + (f", plot {png}" if png else ""))
    return out


def plot_training(metrics: Path, hists: dict, png: Path) -> Path | None:
    """Losses per stage and the exit-layer histograms after each stage, in one PNG."""
    plt = pyplot()

    recs = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for stage, key in ((1, "loss"), (2, "mean_reward"), (3, "loss")):
        ys = [r[key] for r in recs if r["stage"] == stage and r.get(key) is not None]
        if ys:
            ax = axes[0] if stage != 2 else axes[1]
            ax.plot(ys, label=f"stage {stage} {key}")
    axes[0].set(title="stage 1 / 3 loss", xlabel="step")
    axes[1].set(title="stage 2 mean reward", xlabel="step")
    for name, h in hists.items():
        if h:
            ks = sorted(h)
            tot = sum(h.values())
            axes[2].plot(ks, [h[k] / tot for k in ks], marker="o", label=name)
    axes[2].set(title="exit layer (memorized: the oracle)", xlabel="layer", ylabel="share of tokens")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    return save_figure(fig, png)

"""`cee-train`'s settings: every field of `TrainConfig` is a flag (`adapter_rank` -> `--adapter-rank`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from cee_gen.config import check_choices
from cee_gen.config import field_help as _f
from cee_gen.errors import CeeGenError
from cee_gen.weights.lora import parse_targets

TRAIN_STAGES = ("1", "2", "3")
EXPLORE = ("greedy", "bernoulli")
TARGETS = ("gold", "self")
WEIGHTINGS = ("depth", "cosee")
ADAPTER_INITS = ("regression", "zero")
MIXED_PRECISION = ("no", "bf16", "fp16")


@dataclass
class TrainConfig:
    """`cee-train`: ConsistentEE's stages over a frozen base model (cee_gen/train/trainer.py).

    Every field is a `cee-train` flag (`adapter_rank` -> `--adapter-rank`).
    """

    model: str | None = _f(None, "base checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    out: str | None = _f(None, "heads file to write (.safetensors); required")
    dataset: str = _f("alpaca", "training set: alpaca, dolly or cnndm (its train split)")
    data_dir: str | None = _f(None, "folder of the gzip JSON Lines sets (default: $CEE_GEN_DATA, else "
                              "the hub)")
    template: str | None = _f(None, "prompt template: alpaca, cnndm or chat (default: the set's own)")
    max_examples: int = _f(200, "training rows used (the first of the train split)")
    max_seq_tokens: int = _f(256, "prompt + response tokens per example, at most (longer ones are cut)")
    stages: str = _f("1,2,3", "stages to run: 1 (exit heads), 2 (policy, REINFORCE), 3 (heads at the "
                     "policy's exits)")
    exit_layers: str | None = _f(None, "candidate exit layers: all, every:K or a list (default: all)")
    adapter_rank: int = _f(64, "rank of each exit head's adapter (0: logit lens, nothing to train in "
                           "stages 1 and 3)")
    adapter_init: str = _f("regression", "how stage 1 starts the adapters: regression (a tuned lens in "
                           "closed form: reduced-rank ridge regression of the last layer's normed state "
                           "on each layer's) or zero (the logit lens)", choices=ADAPTER_INITS)
    fit_examples: int = _f(128, "training rows whose states the regression start is fitted on")
    lora_rank: int = _f(8, "rank of the backbone's LoRA, trained in stage 1 together with the heads so "
                        "intermediate layers become predictive (exit-aware fine-tuning); shipped in the "
                        "heads file, merged at load. 0: frozen backbone")
    lora_targets: str = _f("q,v", "projections the LoRA adapts: a list of q, k, v, o, gate, up, down "
                           "(q,v as the authors' CNN/DM run)")
    lora_alpha: float = _f(16.0, "LoRA scale numerator: delta = (alpha / rank) B A")
    lr_lora: float = _f(1e-3, "stage 1 learning rate of the LoRA factors")
    layers_per_step: int = _f(4, "stage 1 with LoRA: candidate layers whose heads get a loss in a step "
                              "(drawn anew each step, plus L; LayerSkip's rotating early-exit loss). "
                              "0: all of them")
    weighting: str = _f("depth", "stage 1 loss over layers: depth (sum_l l CE_l / sum_l l; PABEE, "
                        "ConsistentEE) or cosee (COSEE's sample weighting toward each token's "
                        "simulated exit layer)", choices=WEIGHTINGS)
    cosee_beta: float = _f(10.0, "cosee: final sharpness beta of the weights (ramped up from 0)")
    cosee_thresholds: int = _f(5, "cosee: random entropy thresholds per step")
    cosee_osc: float = _f(0.1, "cosee: weight of COSEE's online signal calibration loss (a hinge that "
                          "makes right predictions surer than wrong ones by the margin); 0: off")
    cosee_margin: float = _f(0.3, "cosee: the calibration loss's margin in normalized entropy")
    policy_examples: int | None = _f(None, "stages 2 and 3: training rows used (the first ones; default "
                                     "all of them)")
    init: str | None = _f(None, "start from this heads file (its LoRA, adapters and policies; same "
                          "layers and ranks), e.g. to retrain only the policy: --init H --stages 2,3")
    resume: bool = _f(False, "continue from <out>.ckpt, the checkpoint written after each finished "
                      "stage (same config; the result equals an uninterrupted run)")
    policy: str = _f("linear", "policy head: linear or mlp", choices=("linear", "mlp"))
    policy_init_p: float = _f(0.05, "p(exit) of a new policy head before training (near 'never exit', "
                              "so training starts from the full model)")
    target: str = _f("gold", "exit heads learn the gold next token (gold) or the full model's own "
                     "prediction (self)", choices=TARGETS)
    epochs: int = _f(1, "epochs per stage")
    batch_size: int = _f(4, "sequences per step")
    lr_heads: float = _f(3e-4, "stage 1 learning rate")
    lr_policy: float = _f(3e-4, "stage 2 learning rate")
    lr_stage3: float = _f(3e-5, "stage 3 learning rate")
    alpha: float = _f(0.02, "depth penalty of the reward R = -CE - alpha e (1 - m/L) (0 = the authors' "
                      "released script)")
    replicas: int = _f(4, "stage 2: rollouts per batch (the first never exits, as in the authors' code)")
    explore: str = _f("greedy", "stage 2 actions: greedy (p >= 0.5, epsilon-random) or bernoulli "
                      "(sampled from p)", choices=EXPLORE)
    seed: int = _f(0, "random seed")
    device: str = _f("auto", "auto (CUDA when available; under `accelerate launch`, each process's GPU) "
                     "or cpu")
    mixed_precision: str = _f("no", "autocast of the trained forward passes: no, bf16 or fp16 (fp16 needs "
                              "CUDA; the weights stay fp32)", choices=MIXED_PRECISION)
    grad_accum: int = _f(1, "batches whose gradients add up before each optimizer step")

    def validate(self) -> TrainConfig:
        def bad(msg):
            raise CeeGenError(msg)

        if not self.out:
            bad("cee-train needs --out, the heads file to write")
        check_choices(self)
        stages = [s.strip() for s in self.stages.split(",") if s.strip()]
        if not stages or any(s not in TRAIN_STAGES for s in stages):
            bad(f"stages {self.stages!r}: use a list of 1, 2, 3, e.g. 1,2,3")
        if self.device not in ("auto", "cpu"):
            bad(f"device {self.device!r}: use auto or cpu (auto takes the GPU when there is one; choose "
                "GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)")
        if self.mixed_precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                bad("mixed_precision fp16 needs a CUDA GPU: use bf16 (CPU autocast) or no")
        for name in ("max_examples", "max_seq_tokens", "epochs", "batch_size", "replicas", "fit_examples",
                     "grad_accum"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.replicas < 2 and "2" in stages:
            bad("stage 2 needs replicas >= 2: the baseline is the replicas' mean reward")
        if not isinstance(self.adapter_rank, int) or self.adapter_rank < 0:
            bad(f"adapter_rank must be an integer >= 0, got {self.adapter_rank!r}")
        for name in ("lora_rank", "layers_per_step"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(f"{name} must be an integer >= 0, got {v!r}")
        if self.lora_rank:
            parse_targets(self.lora_targets)
        if self.policy_examples is not None and (not isinstance(self.policy_examples, int)
                                                 or self.policy_examples < 1):
            bad(f"policy_examples must be a positive integer, got {self.policy_examples!r}")
        if not isinstance(self.cosee_thresholds, int) or self.cosee_thresholds < 1:
            bad(f"cosee_thresholds must be a positive integer, got {self.cosee_thresholds!r}")
        if not isinstance(self.policy_init_p, (int, float)) or not 0 < self.policy_init_p < 1:
            bad(f"policy_init_p must be in (0, 1), got {self.policy_init_p!r}")
        for name in ("lr_heads", "lr_policy", "lr_stage3", "alpha", "lr_lora", "lora_alpha", "cosee_beta",
                     "cosee_osc", "cosee_margin"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(f"{name} must be a finite number >= 0, got {v!r}")
        return self

    @property
    def stage_list(self) -> list[str]:
        return [s.strip() for s in self.stages.split(",") if s.strip()]

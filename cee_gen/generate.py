"""The public `generate()` API: text in, text + token ids + statistics out.

    import cee_gen
    model = cee_gen.load_model()                    # the embedded SmolLM2-135M-Instruct
    [r] = cee_gen.generate(model, "Give three tips for staying healthy.", max_new_tokens=64)
    print(r.text, r.stats["decode_tokens_per_s"])

Prompts are tokenized (through the chat template when the tokenizer has one, unless chat=False),
split into batches of `batch_size`, left-padded and decoded by engine.generate_batch.
`prepare_exit` turns an ExitConfig into what the engine runs (strategy, heads, fill).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cee_gen.config import ExitConfig, GenerationConfig
from cee_gen.engine import Decoder, ExitRun, exit_histogram, generate_batch
from cee_gen.engine.loop import check_compile
from cee_gen.errors import CeeGenError
from cee_gen.exits import ExitHeads, load_heads, make_strategy
from cee_gen.exits.heads import default_operating_point
from cee_gen.ops import cpu
from cee_gen.weights import placement
from cee_gen.weights.loading import Model


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only (EOS included when the model emitted it)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    stats: dict = field(default_factory=dict)


def encode_prompt(model: Model, prompt: str, chat: bool | None) -> list[int]:
    tok = model.tokenizer
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat:
        if not getattr(tok, "chat_template", None):
            raise CeeGenError(f"{model.name} has no chat template: turn chat off to feed "
                              "the prompt as plain text")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False, verbose=False)["input_ids"]
    # verbose=False: no "Token indices sequence length is longer..." warning; generate() says it itself
    return tok(prompt, verbose=False)["input_ids"]


def _decoder(model: Model, compile: bool, mode: str = "default") -> Decoder:
    key = (compile, mode if compile else None)
    dec = model.decoders.get(key)
    if dec is None:
        if compile:  # the first steps compile: say so, on stderr, before the wait
            print(f"cee-gen: compiling the decode step (once per process: ~20-60 s on 2 CPU cores, less with "
                  f"the warm on-disk cache in {_inductor_cache()})", file=sys.stderr, flush=True)
            if model.device.type == "cpu" and cpu.available():
                print("cee-gen: note: on the CPU the default (eager) step runs each layer as one fused op, "
                      "as fast as compiled in fp32 and faster on GGUF blocks (docs/speed.md); compile "
                      "traces the layers through their modules", file=sys.stderr, flush=True)
        dec = model.decoders[key] = Decoder(model.net, compile=compile, mode=mode)
    return dec


def _inductor_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        return cache_dir()
    except Exception:  # a torch without it: its documented default
        return "$TORCHINDUCTOR_CACHE_DIR"


def exit_heads(model: Model, path: str | None) -> ExitHeads:
    """The exit heads for `path` (None: the logit lens), loaded once per model."""
    key = None if path is None else str(Path(path).expanduser().resolve())
    heads = model.exit_heads.get(key)
    if heads is None:
        heads = ExitHeads.logit_lens(model.net) if path is None else load_heads(path, model)
        model.exit_heads[key] = heads
    return heads


# heads that ship in cee_gen/heads/, by model and name (--heads NAME); the first is the default
SHIPPED_HEADS = {"SmolLM2-135M-Instruct": {"trained": "smollm2-135m-instruct.safetensors",
                                           "quickfit": "smollm2-135m-instruct-quickfit.safetensors"}}


def shipped_heads(model: Model, name: str | None = None) -> str:
    """The path of heads that ship for `model` (the default model): `name` (trained, quickfit), or the
    trained ones; else a clear error saying how to train some. Heads files check the model's identity
    when loaded, so a renamed model cannot pick up the wrong heads."""
    from importlib.resources import files

    names = SHIPPED_HEADS.get(model.name, {})
    if name is not None and name not in names:
        raise CeeGenError(f"heads {name!r} is neither a file nor heads shipped for {model.name} "
                          f"({', '.join(names) or 'none ship for it'}): pass a heads file's path")
    file = names.get(name or "trained")
    path = None if file is None else files("cee_gen.heads") / file
    if path is None or not path.is_file():
        raise CeeGenError(f"exit policy needs trained policy heads and none ship for {model.name}: make "
                          f"them with `cee-train --model {model.name} --out heads.safetensors` and pass "
                          "that file as heads")
    return str(path)


def _heads_path(model: Model, heads: str) -> str:
    """--heads: a file's path, or the name of shipped heads (trained, quickfit) when no such file is here."""
    if Path(heads).expanduser().exists() or any(c in heads for c in "/\\."):
        return heads
    return shipped_heads(model, heads)


def prepare_exit(model: Model, ex: ExitConfig) -> ExitRun:
    """ExitConfig -> the strategy, heads and fill mode the engine runs.

    `policy` without heads uses the shipped trained heads of the default model. Heads files that
    carry LoRA deltas fine-tune `model` itself (merged once, cee_gen/lora.py): every later run on
    this model object, `full` included, uses those weights; stats["weights"] says which (model.weights)."""
    ex.validate(model.n_layers)
    if ex.strategy == "policy" and ex.heads is None:
        ex = dataclasses.replace(ex, heads=shipped_heads(model))
    elif ex.heads is not None:
        ex = dataclasses.replace(ex, heads=_heads_path(model, ex.heads))
    heads = exit_heads(model, ex.heads)
    point = None
    if ex.strategy == "policy" and ex.threshold is None and (op := default_operating_point(heads)):
        point, threshold = op  # the heads file's calibrated threshold, not the generic 0.5
        ex = dataclasses.replace(ex, threshold=threshold)
    special = list(getattr(model.tokenizer, "all_special_ids", []) or [])
    strat = make_strategy(ex, heads, model.args.vocab_size, special)
    small = None if ex.cascade_model is None else cascade_model(model, ex.cascade_model).net
    return ExitRun(strategy=strat, heads=heads, kv_fill=ex.fill, small=small, deferred=ex.deferred,
                   draft=ex.draft_source, max_draft=ex.draft_limit, ngram=ex.ngram, threshold=ex.thresh,
                   operating_point=point)


def cascade_model(model: Model, path: str) -> Model:
    """The cascade's small model, loaded once, in the large model's dtype and device."""
    from cee_gen.weights.loading import load_model

    small = model.cascade_models.get(path)
    if small is None:
        dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[model.dtype]
        try:
            small = load_model(path, dtype=dtype, device=str(model.device))
        except CeeGenError as e:  # its message speaks of "the model"; this is the cascade's small one
            raise type(e)(f"cascade model: {e}") from None
        if small.args.vocab_size != model.args.vocab_size or \
                small.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            raise CeeGenError(f"cascade model {path} has another tokenizer than {model.name}: the small "
                              "and the large model must share one vocabulary")
        model.cascade_models[path] = small
    return small


def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """text up to the earliest stop string, and whether one was found."""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _TextTracker:
    """Incremental detokenization per row, for stop strings and streaming."""

    def __init__(self, model: Model, n: int, stop: list[str] | None,
                 stream: Callable[[int, str], None] | None, offset: int):
        self.tok, self.stop, self.stream, self.offset = model.tokenizer, stop or [], stream, offset
        self.ids = [[] for _ in range(n)]
        self.emitted = [""] * n

    def text(self, b: int) -> str:
        return self.tok.decode(self.ids[b], skip_special_tokens=True)

    def __call__(self, b: int, token_id: int) -> bool:
        self.ids[b].append(token_id)
        if not self.stop and self.stream is None:
            return False
        text, stopped = _cut_at_stop(self.text(b), self.stop)
        if self.stream is not None and not text.endswith("\ufffd"):  # wait for whole characters
            delta = text[len(self.emitted[b]):]
            if delta:
                self.stream(self.offset + b, delta)
                self.emitted[b] = text
        return stopped


def generate(
    model: Model,
    prompts: str | list[str],
    *,
    config: GenerationConfig | None = None,
    exit: ExitConfig | None = None,
    stream: Callable[[int, str], None] | None = None,
    **kwargs,
) -> list[GenerationResult]:
    """Generate a continuation for each prompt; returns one result per prompt, in order.

    Options are the fields of `GenerationConfig` (max_new_tokens, do_sample, temperature, top_k,
    top_p, repetition_penalty, seed, chat, stop, batch_size, compile), given as keywords or as
    `config=`. `exit=ExitConfig(strategy="policy", heads="heads.safetensors", threshold=0.5)` (or
    any strategy of ExitConfig) makes generated tokens leave the network early; `stats` then carry
    the layers each token ran, the exit histogram, and the time spent in decisions and KV fill
    (batch totals). `stream(prompt_index, text_delta)` is called as text is produced.
    """
    ex = exit or ExitConfig()
    run = prepare_exit(model, ex)
    if config is not None and kwargs:
        config = GenerationConfig.from_kwargs(**{**config.__dict__, **kwargs})
    cfg = (config or GenerationConfig.from_kwargs(**kwargs)).validate()
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise CeeGenError("no prompts given: pass a string or a non-empty list of strings")
    if not all(isinstance(p, str) for p in prompts):
        raise CeeGenError("every prompt must be a string")
    for i, p in enumerate(prompts):
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. bytes decoded with surrogateescape
            raise CeeGenError(f"prompt {i} is not valid text: character {e.start} is a lone surrogate "
                              f"({p[e.start]!a}): decode the source bytes as UTF-8, with errors='replace' "
                              "if they may be damaged") from None

    ctx = model.args.max_position_embeddings
    encoded = []
    for i, p in enumerate(prompts):
        ids = encode_prompt(model, p, cfg.chat)
        if not ids:
            raise CeeGenError(f"prompt {i} is empty after tokenization: give some text")
        if len(ids) >= ctx:
            raise CeeGenError(f"prompt {i} is {len(ids)} tokens but {model.name}'s context is {ctx}: "
                              f"shorten it to at most {ctx - 1} tokens")
        encoded.append(ids)

    generator = None
    if cfg.do_sample:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    if cfg.compile and model.weights.quantized:
        raise CeeGenError(f"compile does not support {model.weights.quantized} (bitsandbytes) weights: drop "
                          "compile or load with quantize none")
    check_compile(cfg.compile, run)
    decoder = _decoder(model, cfg.compile, cfg.compile_mode)
    results: list[GenerationResult] = []
    for start in range(0, len(encoded), cfg.batch_size):
        batch = encoded[start:start + cfg.batch_size]
        tracker = _TextTracker(model, len(batch), cfg.stop, stream, start)
        rows, t = generate_batch(decoder, batch, cfg, pad_id=model.pad_token_id,
                                 eos_ids=model.eos_token_ids, generator=generator,
                                 on_token=tracker, exit=run)
        for b, row in enumerate(rows):
            text, _ = _cut_at_stop(tracker.text(b), cfg.stop or [])
            n = len(row.token_ids)
            total = t.prefill_s + t.decode_s
            results.append(GenerationResult(
                text=text,
                token_ids=row.token_ids,
                prompt_token_ids=batch[b],
                finish_reason=row.finish_reason,
                stats={
                    "prompt_tokens": len(batch[b]),
                    "generated_tokens": n,
                    "batch_size": len(batch),
                    "prefill_s": t.prefill_s,
                    "decode_s": t.decode_s,
                    "compile_s": t.compile_s,
                    "tokens_per_s": n / total if total > 0 else 0.0,
                    "decode_tokens_per_s": (n - 1) / t.decode_s if n > 1 and t.decode_s > 0 else 0.0,
                    "n_layers": model.n_layers,
                    "layers_per_token": row.layers_per_token,
                    "mean_layers": (mean := sum(row.layers_per_token) / max(n, 1)),
                    "ideal_speedup": model.n_layers / mean if mean else 1.0,
                    "exit": ex.strategy,
                    "weights": model.weights.label,
                    "quantize": model.weights.quantized or "none",
                    # floats (their dtype), or GGUF blocks: "gguf q4_1+q8_0", "q8_0", ... (weights/lowbit.py)
                    "weights_format": model.weights.lowbit or str(model.dtype).removeprefix("torch."),
                    "attention": model.net.attn_impl,
                    "device_map": placement.describe(model.net),
                    "kv_fill": ex.fill if ex.strategy != "full" else None,
                    # deferred: the fill runs inside the layers, so fill_s does not count it
                    "fill_timing": (("deferred" if ex.deferred else "eager")
                                    if ex.strategy != "full" else None),
                    "threshold": run.threshold,
                    # the heads file's calibrated operating point in use (policy without a threshold)
                    "operating_point": run.operating_point,
                    "candidate_layers": run.strategy.layers,
                    "exit_histogram": exit_histogram(row.layers_per_token[1:]),
                    "decision_s": t.decision_s,
                    "fill_s": t.fill_s,
                    "recompute_rows": t.recompute_rows,
                    # verify mode: the batch's drafts, passes and times; each token's origin (prefill,
                    # ngram or exit for accepted drafts, verify for the pass's own token)
                    "verify": t.verify,
                    "token_sources": row.sources or None,
                },
            ))
    return results


"""Prefill and the decode loop over a static KV cache.

A batch of prompts is left-padded into one (B, T) tensor; each row keeps its own RoPE positions and
attention mask (model.make_step), so a row's output does not depend on its neighbours. The prompt and
the first generated token run at full depth. Each later token goes through one of three steps:
- the plain step (engine/decoder.py): every row at one depth: exits off, or `static` when compiled;
- the exit step (engine/exit_step.py): per-row exits, with the KV fill the config names (kv_fill/);
- the two-checkpoint cascade (exits/cascade.py).

Host syncs: one per generated token (`tolist()` of the chosen ids: EOS, stop strings, streaming), plus
those of the exit step (one per candidate layer, `decision_s`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from cee_gen.cache import cache_slots
from cee_gen.config import GenerationConfig
from cee_gen.engine.batch import Batch, make_fill
from cee_gen.engine.decoder import Decoder
from cee_gen.engine.exit_step import ExitRun, ExitStep
from cee_gen.engine.telemetry import BatchTimings, RowOutput
from cee_gen.engine.verify import Verifier
from cee_gen.errors import CeeGenError
from cee_gen.exits.cascade import CascadeModels
from cee_gen.kv_fill import fill_kind
from cee_gen.sampling import select_next


def check_compile(compile: bool, exit: ExitRun | None) -> None:
    """compile with a cascade over a second checkpoint is refused (generate() asks before it makes the
    compiled decoder, which announces its compile)."""
    if compile and exit is not None and exit.small is not None:
        raise CeeGenError("compile does not work with a cascade over a second checkpoint (two models, each "
                          "with its own catch-up shapes): drop compile")


@torch.inference_mode()
def generate_batch(
    decoder: Decoder,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    pad_id: int,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int], bool] | None = None,
    exit: ExitRun | None = None,
) -> tuple[list[RowOutput], BatchTimings]:
    """Decode a batch of token-id prompts.

    on_token(row, token_id) is called for each new token of an unfinished row and returns True when
    the row must stop (a stop string completed); EOS is handled here. `exit` (None = full depth)
    says where generated tokens leave; with its `draft` set, verify mode runs (engine/verify.py).
    """
    if exit is not None and exit.draft is not None:
        return Verifier(decoder, cfg, exit, generator).run(prompts, pad_id=pad_id, eos_ids=eos_ids,
                                                             on_token=on_token)
    net = decoder.net
    L, ctx = net.args.n_layers, net.args.max_position_embeddings
    B, T = len(prompts), max(len(p) for p in prompts)
    n_new = min(cfg.max_new_tokens, ctx - T)
    # One depth for every token (full; static when compiled): the plain step. Else the exit step,
    # or the cascade over a second checkpoint.
    uniform = L if exit is None or exit.strategy.name == "full" else (
        exit.uniform_depth if decoder.compiled else None)
    kind = None if uniform is not None else CascadeModels if exit.small is not None else \
        fill_kind(exit.kv_fill, exit.deferred)
    check_compile(decoder.compiled, exit)
    # recompute and the cascade's catch-up pad their extra queries, and the deferred fill its
    # columns, to a scratch slot past every real one
    scratch = int(kind is not None and kind.needs_scratch)
    n_slots = min(cache_slots(T + n_new + scratch), ctx + scratch)
    batch = Batch(decoder, prompts, n_new, n_slots, pad_id=pad_id, eos_ids=eos_ids, on_token=on_token)
    timings, pad, cache = batch.timings, batch.pad, batch.cache

    t0 = time.perf_counter()
    logits = batch.prefill()
    if kind is None:
        kv_fill = None if exit is None or exit.deferred else exit.kv_fill
        if kv_fill is not None and uniform < L:
            decoder.filler()  # checked against the weights once a batch; the steps reuse it

        def next_step(cache, tok, ids, slot, pad, alive):
            return decoder.step(cache, tok, slot, pad, uniform, kv_fill), {}
    elif kind is CascadeModels:  # the small model reads the prompt too; the large one emits first
        next_step = CascadeModels(net, exit.small, exit.strategy, batch.tokens, pad, n_slots, pad_id, timings)
    else:
        next_step = ExitStep(decoder, exit, make_fill(kind, decoder, exit, B, n_slots, pad, timings), timings)
    compile_before = decoder.compile_s
    t1 = None
    last_depth: dict[int, int] = {}  # row -> layers run by the step that made its next token
    for i in range(n_new):
        alive = batch.alive
        nxt = select_next(logits, cfg, batch.seen, generator)  # (B,)
        ids = nxt.tolist()  # the one host sync per token
        for b in alive:
            # the first generated token comes from the full-depth prefill
            batch.emit(b, ids[b], L if i == 0 else last_depth.get(b, uniform))
        if t1 is None:
            t1 = time.perf_counter()
            timings.prefill_s = t1 - t0
        if all(batch.done):
            break
        # finished rows cost nothing in the exit steps
        logits, last_depth = next_step(cache, nxt[:, None], ids, T + i, pad, batch.alive)
        cache.advance(0, L, 1)
    timings.decode_s = time.perf_counter() - (t1 or t0)
    timings.compile_s = decoder.compile_s - compile_before
    timings.decode_s -= timings.compile_s
    return batch.out, timings

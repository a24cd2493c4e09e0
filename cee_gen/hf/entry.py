"""`generate` as transformers' custom generation method: an HF causal LM in, our engine inside.

The HF model's weights are copied once into our Transformer (fused q|k|v and gate|up: one copy of the
projections, kept on the HF model object for later calls; load the HF model again after changing its
weights). Honoured: `max_new_tokens` / `max_length`, `eos_token_id`, `pad_token_id`, `do_sample`,
`temperature`, `top_k`, `top_p`, `repetition_penalty` (from the generation config and keywords),
`attention_mask` (left padding), `stopping_criteria`, `streamer` (batch 1, as in transformers), and
`exit=cee_gen.ExitConfig(...)` (or a dict of its fields) for early exit, verify mode included.
What it cannot honour (beams, logits processors, assistant models, prefix constraints) is refused.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from cee_gen.config import ExitConfig, GenerationConfig
from cee_gen.errors import CeeGenError

_UNSUPPORTED = ("logits_processor", "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids",
                "negative_prompt_attention_mask")


def generate(model, inputs: torch.Tensor | None = None, generation_config=None, stopping_criteria=None,
             streamer=None, exit: ExitConfig | dict | None = None, attention_mask: torch.Tensor | None = None,
             **kwargs) -> torch.Tensor:
    from cee_gen.engine import generate_batch
    from cee_gen.generate import _decoder, prepare_exit

    ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
    if ids is None or ids.dim() != 2:
        raise CeeGenError("cee-gen's custom generate needs input_ids of shape (batch, length)")
    for name in _UNSUPPORTED:
        if kwargs.pop(name, None):
            raise CeeGenError(f"cee-gen's custom generate does not support {name}: drop it, or use "
                              "transformers' own generate")
    kwargs.pop("synced_gpus", None)
    kwargs.pop("tokenizer", None)
    gc = copy.deepcopy(generation_config if generation_config is not None else model.generation_config)
    unused = gc.update(**kwargs)
    unused = {k: v for k, v in unused.items() if v is not None and k not in ("use_cache", "return_dict")}
    if unused:
        raise CeeGenError(f"cee-gen's custom generate does not take {', '.join(sorted(unused))}")
    if (gc.num_beams or 1) > 1 or gc.return_dict_in_generate:
        raise CeeGenError("cee-gen's custom generate decodes one sequence per prompt and returns token ids: "
                          "use num_beams=1 and return_dict_in_generate=False")
    B, T = ids.shape
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(B)]
    n_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - T
    cfg = GenerationConfig(max_new_tokens=n_new, do_sample=bool(gc.do_sample),
                           temperature=gc.temperature if gc.temperature is not None else 1.0,
                           top_k=gc.top_k or 0, top_p=gc.top_p if gc.top_p is not None else 1.0,
                           repetition_penalty=gc.repetition_penalty or 1.0).validate()
    eos = gc.eos_token_id
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
    if isinstance(exit, dict):
        exit = ExitConfig(**exit)
    ours = _ours(model, eos, pad)
    run = None if exit is None or exit == ExitConfig() else prepare_exit(ours, exit)
    if streamer is not None and B > 1:
        raise CeeGenError("streamers take one sequence: pass a batch of 1 with a streamer")
    gen = torch.Generator(device=ours.device).manual_seed(torch.seed()) if cfg.do_sample else None

    seqs = [ids[b].tolist() for b in range(B)]  # as transformers' stopping criteria see them

    def on_token(row: int, tok: int) -> bool:
        seqs[row].append(tok)
        if streamer is not None:
            streamer.put(torch.tensor([tok]))
        if stopping_criteria:
            return bool(stopping_criteria(torch.tensor([seqs[row]], device=ids.device), None).any())
        return False

    if streamer is not None:
        streamer.put(ids.cpu())
    rows, _ = generate_batch(_decoder(ours, False), prompts, cfg, pad_id=pad, eos_ids=eos, generator=gen,
                             on_token=on_token, exit=run)
    if streamer is not None:
        streamer.end()
    new = max((len(r.token_ids) for r in rows), default=0)
    out = torch.full((B, T + new), pad, dtype=ids.dtype, device=ids.device)
    out[:, :T] = ids
    for b, r in enumerate(rows):
        out[b, T:T + len(r.token_ids)] = torch.tensor(r.token_ids, dtype=ids.dtype)
    return out


def _ours(model, eos: list[int], pad: int):
    """Our Model over a copy of the HF model's weights, made once per HF model object."""
    from cee_gen.model import ModelArgs
    from cee_gen.weights.loading import Model, build_transformer

    cached = getattr(model, "_cee_gen_model", None)
    if cached is not None:
        return dataclasses.replace(cached, eos_token_ids=eos, pad_token_id=pad)
    args = ModelArgs.from_hf_config(model.config)
    net = build_transformer(args, dict(model.state_dict()), model.dtype, model.device)
    name = Path(getattr(model.config, "_name_or_path", "") or "hf-model").name
    ours = Model(net=net, tokenizer=None, args=args, name=name, path=Path("."), eos_token_ids=eos,
                 pad_token_id=pad, meta={"config": model.config.to_dict()})
    model._cee_gen_model = ours
    return ours

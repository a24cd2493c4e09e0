"""Weight-only quantization of the decoder layers through bitsandbytes: 8-bit (LLM.int8) and 4-bit (NF4).

The layers' projections (wqkv, wo, w13, w2) become bitsandbytes modules. The embeddings, the LM head
and the norms stay in the model dtype, as transformers' `load_in_8bit` / `load_in_4bit` keeps
lm_head. Used by `load_model(quantize=...)` and `--quantize`. bitsandbytes runs on CUDA, and on the
CPU since 0.49 through its CPU backend (slowly; that is what the tests run).

Two things must see through the quantized modules:
- the KV fill, which projects exit states with every skipped layer's K/V weights at once: it takes
  them dequantized once (`dense_weight`). That is a dense copy of 2*kv*D per layer in the model
  dtype, a sixth of a Llama-2-7B layer;
- heads files, which identify their model by a probe of its weights: the loader records the probe
  before quantizing (weights/provenance.py), so heads trained on the full-precision model still match.
  LoRA deltas cannot be merged into quantized weights (exits/heads.py refuses them).
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from cee_gen.errors import CeeGenError
from cee_gen.weights.lowbit import QuantLinear

_PROJECTIONS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w13"), ("feed_forward", "w2"))


def _bnb():
    # On AVX512-BF16 CPUs bitsandbytes tries to fetch a faster 4-bit kernel from the HF hub at import
    # and warns when it cannot; its own fallback works, so that warning is noise here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise CeeGenError("quantize 8bit/4bit needs bitsandbytes: pip install bitsandbytes "
                          "(or pip install -e '.[gpu]'), or use quantize none") from None
    return bnb


def _quantized(bnb, mode: str, lin: nn.Linear, dtype: torch.dtype, device: torch.device) -> nn.Module:
    w = lin.weight.detach().to("cpu", dtype)
    if mode == "4bit":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=dtype, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().to("cpu", dtype), requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes as the weight moves to its device


def quantize_(net, mode: str) -> None:
    """Replace the layers' projections of `net` (in place) by `mode` ("8bit" or "4bit", validated by
    LoadConfig) bitsandbytes modules."""
    bnb = _bnb()
    dt, dev = net.dtype, net.device
    for blk in net.layers:
        for part, name in _PROJECTIONS:
            parent = getattr(blk, part)
            setattr(parent, name, _quantized(bnb, mode, getattr(parent, name), dt, dev))


def dense_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight of a projection in `dtype`, dequantized when it is a bitsandbytes module
    or GGUF blocks (weights/lowbit.py)."""
    if type(mod) is nn.Linear:
        return mod.weight.to(dtype)
    if isinstance(mod, QuantLinear):
        return mod.dense(dtype)
    bnb = _bnb()
    w = mod.weight
    if isinstance(mod, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(dtype)
    if isinstance(mod, bnb.nn.Linear8bitLt):  # row-wise absmax int8; the first forward moves SCB
        scb = w.SCB if getattr(w, "SCB", None) is not None else mod.state.SCB  # into the module's state
        return (w.data.float() * scb.float()[:, None] / 127).to(dtype)
    raise TypeError(f"no dense weight for {type(mod).__name__}")

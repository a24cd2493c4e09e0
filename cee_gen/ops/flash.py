"""flash-attn as the attention kernel of the engine's steps (optional: `pip install "flash-attn>=2.6"`).

The engine's KV caches are (B, H_kv, S, hd); flash-attn's `flash_attn_with_kvcache` reads
(B, S, H_kv, hd) with any strides but the last, so the cache is passed transposed, with no copy.
`cache_leftpad` (flash-attn 2.6+) serves left-padded batches, `cache_batch_idx` the early-exit steps
that run a subset of the cache's rows, `cache_seqlens` (a device tensor) the current slot without a
host sync. The K/V of the new tokens are written by the model first (RoPE already applied), so
flash-attn only reads the cache.

Which attention a model uses is decided once, at load time (`choose`): `flash` needs CUDA, fp16 or
bf16, a head size that is a multiple of 8 up to 256 (else flash-attn pads, i.e. copies, the cache
every call) and flash-attn >= 2.6 importable. Steps that record gradients (training) and steps with
per-row query slots (kv_fill `recompute`, the cascade's catch-up) use SDPA: flash_attn_with_kvcache
has no backward and takes one contiguous run of query slots per row (model.make_step).
"""

from __future__ import annotations

import torch

from cee_gen.errors import CeeGenError

MIN_VERSION = (2, 6)  # cache_leftpad (left-padded batches) arrived in flash-attn 2.6.0


def installed_version() -> tuple[int, ...] | None:
    """flash-attn's (major, minor) when it imports, else None."""
    try:
        import flash_attn
    except Exception:  # ImportError, or a build for another torch/CUDA failing to load
        return None
    try:
        return tuple(int(p) for p in flash_attn.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return None


def why_not(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why flash-attn cannot serve this model, or None when it can."""
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only, and the model is on {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn computes in float16 or bfloat16, and the model is {str(dtype).split('.')[-1]}"
    if head_dim % 8 or head_dim > 256:
        return ("flash-attn needs a head size that is a multiple of 8 up to 256, and this model's is "
                f"{head_dim}")
    v = installed_version()
    if v is None:
        return 'flash-attn is not installed (pip install "flash-attn>=2.6" --no-build-isolation)'
    if v < MIN_VERSION:
        return f"flash-attn {'.'.join(map(str, v))} is too old: cache_leftpad needs >= 2.6"
    return None


def choose(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    """`sdpa` or `flash` for a model (`requested`: auto, sdpa or flash, as LoadConfig validates): auto
    takes flash when it can serve; flash asked for and impossible is an error that says why."""
    if requested == "sdpa":
        return "sdpa"
    reason = why_not(device, dtype, head_dim)
    if reason is None:
        return "flash"
    if requested == "flash":
        raise CeeGenError(f"attention flash is not available: {reason}. Use attention auto or sdpa")
    return "sdpa"


def _flash_cuda(q, k_cache, v_cache, seqlens, leftpad, batch_idx):
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                                   cache_leftpad=leftpad, causal=True)


def register(lib: torch.library.Library) -> bool:
    """Make flash-attn the CUDA kernel of `cee_gen::attn_kvcache` when it is installed and new enough."""
    v = installed_version()
    if v is None or v < MIN_VERSION:
        return False
    lib.impl("attn_kvcache", _flash_cuda, "CUDA")
    return True

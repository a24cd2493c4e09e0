"""Native ops, declared once here with `torch.library` so torch.compile and CUDA graphs can hold them.

The schemas live in Python, not in C++ (vLLM declares them in C++), because the ops must exist
without the extension: their default kernel is the PyTorch twin (ops/reference.py), registered for
every device; csrc/kv_fill.cpp adds the CUDA kernels (`TORCH_LIBRARY_IMPL(cee_gen, CUDA, m)`),
which the dispatcher prefers for CUDA tensors whenever the library is loaded (ops/native.py).
Mutated arguments are marked `(a!)`; the fake kernels let torch.compile trace the ops.

    kv_fill   RMSNorm -> K/V projection -> RoPE on K -> cache write, for every skipped layer of
              every entry, in one launch (the `propagate` and `propagate-raw` KV-fill modes)
    kv_copy   layer e-1's K/V into layers [e, L) (the `copy-kv` mode)
    attn_kvcache
              attention of new queries over the KV cache with flash-attn's semantics; its CUDA
              kernel is flash-attn's `flash_attn_with_kvcache` when installed (ops/flash.py)
"""

from __future__ import annotations

import torch

from cee_gen.ops import flash, native, reference

KV_FILL_SCHEMA = ("kv_fill(Tensor h, Tensor w, Tensor? bias, Tensor cos, Tensor sin, Tensor rows, "
                  "Tensor slots, Tensor? exit_layer, int first_layer, Tensor(a!)[] k_cache, "
                  "Tensor(b!)[] v_cache, float eps, bool normalize) -> ()")
KV_COPY_SCHEMA = ("kv_copy(Tensor rows, Tensor slots, Tensor? exit_layer, int first_layer, "
                  "Tensor(a!)[] k_cache, Tensor(b!)[] v_cache) -> ()")
ATTN_SCHEMA = ("attn_kvcache(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor leftpad, "
               "Tensor? batch_idx) -> Tensor")

# The low-level Library API rather than torch.library.custom_op: a call costs ~9 us instead of ~45.
_lib = torch.library.Library("cee_gen", "DEF")
_lib.define(KV_FILL_SCHEMA)
_lib.define(KV_COPY_SCHEMA)
_lib.define(ATTN_SCHEMA)
_lib.impl("kv_fill", reference.kv_fill_ref, "CompositeExplicitAutograd")  # every device, until
_lib.impl("kv_copy", reference.kv_copy_ref, "CompositeExplicitAutograd")  # csrc/ adds CUDA kernels
_lib.impl("attn_kvcache", reference.attn_kvcache_ref, "CompositeExplicitAutograd")  # flash-attn: CUDA
FLASH = flash.register(_lib)  # whether flash-attn is the CUDA kernel of attn_kvcache


@torch.library.register_fake("cee_gen::kv_fill", lib=_lib)
def _(h, w, bias, cos, sin, rows, slots, exit_layer, first_layer, k_cache, v_cache, eps, normalize):
    return None


@torch.library.register_fake("cee_gen::kv_copy", lib=_lib)
def _(rows, slots, exit_layer, first_layer, k_cache, v_cache):
    return None


@torch.library.register_fake("cee_gen::attn_kvcache", lib=_lib)
def _(q, k_cache, v_cache, seqlens, leftpad, batch_idx):
    return torch.empty_like(q)


def _kernel_for(t: torch.Tensor) -> bool:
    """Whether the CUDA kernel serves tensors like t. Otherwise the wrappers call the twin directly,
    not through the op: torch.compile then traces the twin's plain tensor code and fuses it with the
    rest of the step, as it did before the op existed (through the op, a compiled CPU static-exit
    step lost its whole saving to the op's functionalization)."""
    if not t.is_cuda:
        return False
    native.notice_if_twin(t)
    return native.available()


def kv_fill(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, cos: torch.Tensor,
            sin: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, exit_layer: torch.Tensor | None,
            first_layer: int, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor], eps: float,
            normalize: bool) -> None:
    """Fill the K/V of the layers each entry skipped; see reference.kv_fill_ref for the arguments."""
    fn = torch.ops.cee_gen.kv_fill if _kernel_for(h) else reference.kv_fill_ref
    fn(h, w, bias, cos, sin, rows, slots, exit_layer, first_layer, k_cache, v_cache, eps, normalize)


def kv_copy(rows: torch.Tensor, slots: torch.Tensor, exit_layer: torch.Tensor | None, first_layer: int,
            k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]) -> None:
    """copy-kv fill; see reference.kv_copy_ref."""
    fn = torch.ops.cee_gen.kv_copy if _kernel_for(rows) else reference.kv_copy_ref
    fn(rows, slots, exit_layer, first_layer, k_cache, v_cache)


def attn_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
                 leftpad: torch.Tensor, batch_idx: torch.Tensor | None) -> torch.Tensor:
    """Attention over the cache, (b, T, H, hd); see reference.attn_kvcache_ref. Through the op (so
    torch.compile and CUDA graphs hold flash-attn) on CUDA, the twin directly elsewhere."""
    fn = torch.ops.cee_gen.attn_kvcache if q.is_cuda else reference.attn_kvcache_ref
    return fn(q, k_cache, v_cache, seqlens, leftpad, batch_idx)


native.load()  # after the schemas: the library only adds kernels to them

"""GGUF low-bit weights on the CPU: the formats, repacked for the kernels of csrc/cpu/, and their twins.

Three of ggml's block formats (ggml-common.h; gguf-py's `gguf.quants` reads and writes them), 32
weights per block, row-major along K:

    q8_0  fp16 d, 32 x int8 q                     w = d * q          34 bytes
    q4_0  fp16 d, 16 bytes of nibbles             w = d * (q - 8)    18 bytes
    q4_1  fp16 d, fp16 m, 16 bytes of nibbles     w = d * q + m      20 bytes

where byte j of the nibbles holds weight j in its low nibble and weight j+16 in its high one.
`QuantWeight` keeps exactly those bits, repacked as separate arrays so the kernels load 16 scales
with one instruction and the quants stay 16-byte aligned per block:

    qs  (N, K/2) uint8 (4-bit, bytes in GGUF order) or (N, K) int8 (q8_0)
    d   (N, K/32) float16,  m  (N, K/32) float16 (q4_1 only)

No fp32 copy of the weights is kept. `dequantize` gives the fp32 weights gguf-py's dequantization
gives, bit for bit; the twin `linear_q_ref` is that followed by F.linear, and it is what the kernel
(cee_gen/ops/cpu.py) is tested against.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cee_gen.errors import CeeGenError

QK = 32  # weights per block, all three formats
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
FORMATS = tuple(BLOCK_BYTES)


class UnsupportedBlockType(CeeGenError):
    """A GGUF block type the CPU kernels do not read."""


class BadBlockShape(CeeGenError):
    """A weight whose shape does not split into whole blocks."""


def format_name(fmt: object) -> str:
    """'q4_1' from 'q4_1', 'Q4_1' or gguf.GGMLQuantizationType.Q4_1; raises for anything unsupported."""
    name = str(getattr(fmt, "name", fmt)).lower()
    if name not in BLOCK_BYTES:
        raise UnsupportedBlockType(f"block type {getattr(fmt, 'name', fmt)} is not supported by the CPU "
                                   f"low-bit kernels: supported are {', '.join(FORMATS)}")
    return name


def _check_k(K: int, name: str | None) -> None:
    if K % QK:
        what = f"tensor {name!r}" if name else "the weight"
        raise BadBlockShape(f"{what} has K={K} columns, not a multiple of the block size {QK}: "
                            "GGUF block formats need whole blocks of 32 along each row")


@dataclass(frozen=True)
class QuantWeight:
    """A (N, K) weight matrix in a GGUF block format, as the CPU kernels read it (see module doc)."""

    fmt: str
    N: int
    K: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.N, self.K)


def quantize(w: torch.Tensor, fmt: object) -> QuantWeight:
    """Round-to-nearest quantization of a (N, K) weight, as gguf-py's reference quantizers (and ggml's
    quantize_row_*_ref) do it: q8_0 d = absmax/127, q = round-half-away(w/d); q4_0 d = (the value of
    largest magnitude)/-8, q = trunc(w/d + 8.5) clipped to 0..15; q4_1 d = (max - min)/15, m = min,
    q = trunc((w - m)/d + 0.5) clipped. Scales are computed in fp32 and stored as fp16."""
    fmt = format_name(fmt)
    if w.dim() != 2:
        raise BadBlockShape(f"quantize expects a (N, K) weight matrix, got shape {tuple(w.shape)}")
    N, K = w.shape
    _check_k(K, None)
    blocks = w.detach().to("cpu", torch.float32).reshape(N, K // QK, QK)  # (N, nb, 32)

    def inverse(d: torch.Tensor) -> torch.Tensor:
        return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)

    if fmt == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        a = (blocks * inverse(d)).abs()
        r = torch.floor(a)
        r = r + torch.floor(2 * (a - r))  # round half away from zero, as gguf-py (not floor(a + 0.5))
        q = (torch.sign(blocks) * r).to(torch.int8)
        return QuantWeight(fmt, N, K, q.reshape(N, K).contiguous(), d[..., 0].half().contiguous())
    if fmt == "q4_0":
        imax = blocks.abs().argmax(-1, keepdim=True)
        d = blocks.gather(-1, imax) / -8
        q = torch.trunc(blocks * inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
        m = None
    else:
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (hi - lo) / 15
        q = torch.trunc((blocks - lo) * inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
        m = lo[..., 0].half().contiguous()
    packed = q[..., :16] | (q[..., 16:] << 4)  # (N, nb, 16): byte j = weight j | weight j+16 << 4
    return QuantWeight(fmt, N, K, packed.reshape(N, K // 2).contiguous(), d[..., 0].half().contiguous(), m)


def unpack_q(qw: QuantWeight) -> torch.Tensor:
    """The integer quants as (N, K) int16 (0..15 for 4-bit formats, -128..127 for q8_0)."""
    if qw.fmt == "q8_0":
        return qw.qs.to(torch.int16)
    b = qw.qs.reshape(qw.N, qw.K // QK, 16)
    return torch.cat([b & 15, b >> 4], dim=-1).reshape(qw.N, qw.K).to(torch.int16)


def dequantize(qw: QuantWeight) -> torch.Tensor:
    """fp32 (N, K) weights, bit for bit what gguf-py's dequantize gives (d*q + m in fp32)."""
    q = unpack_q(qw).float().reshape(qw.N, qw.K // QK, QK)  # (N, nb, 32)
    d = qw.d.float()[..., None]
    if qw.fmt == "q4_0":
        q = q - 8
    w = d * q
    if qw.fmt == "q4_1":
        w = w + qw.m.float()[..., None]
    return w.reshape(qw.N, qw.K)


def from_gguf_blocks(raw: np.ndarray | torch.Tensor, fmt: object, name: str | None = None) -> QuantWeight:
    """Repack a GGUF tensor's raw blocks, (N, K/32 * block bytes) uint8 as `GGUFReader(path).tensors[i]
    .data` gives them (a memmap is fine), into a QuantWeight: the same bits, never through fp32."""
    fmt = format_name(fmt)
    bb = BLOCK_BYTES[fmt]
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # a read-only memmap: only read here, then copied by the split
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(raw))
    else:
        t = raw.contiguous()
    what = f"tensor {name!r}" if name else "the raw GGUF blocks"
    if t.dtype != torch.uint8 or t.dim() != 2:
        raise BadBlockShape(f"{what}: expected (N, row bytes) uint8 raw blocks, got {t.dtype} "
                            f"{tuple(t.shape)}")
    if t.shape[1] % bb:
        raise BadBlockShape(f"{what} has {t.shape[1]} bytes per row, not whole {fmt} blocks of {bb} bytes "
                            f"(K must be a multiple of {QK})")
    N, nb = t.shape[0], t.shape[1] // bb
    K = nb * QK
    blocks = t.reshape(N, nb, bb)

    def f16(lo: int) -> torch.Tensor:  # (N, nb) fp16 from bytes [lo, lo+2) of each block
        return blocks[..., lo:lo + 2].contiguous().view(torch.float16)[..., 0].contiguous()

    if fmt == "q8_0":
        return QuantWeight(fmt, N, K, blocks[..., 2:].contiguous().view(torch.int8).reshape(N, K), f16(0))
    off = 2 if fmt == "q4_0" else 4
    m = f16(2) if fmt == "q4_1" else None
    return QuantWeight(fmt, N, K, blocks[..., off:].contiguous().reshape(N, K // 2), f16(0), m)


def to_gguf_blocks(qw: QuantWeight) -> torch.Tensor:
    """The inverse of from_gguf_blocks: (N, K/32 * block bytes) uint8 in GGUF's block layout."""
    nb = qw.K // QK
    parts = [qw.d.reshape(qw.N, nb, 1).view(torch.uint8)]
    if qw.m is not None:
        parts.append(qw.m.reshape(qw.N, nb, 1).view(torch.uint8))
    parts.append(qw.qs.reshape(qw.N, nb, -1).view(torch.uint8))
    return torch.cat(parts, dim=-1).reshape(qw.N, -1)


def linear_q_ref(x: torch.Tensor, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, fmt: str,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """Twin of cee_cpu::linear_q: x (..., K) @ dequantize(W)^T + bias, in x's dtype."""
    fmt = format_name(fmt)
    N = qs.shape[0]
    K = qs.shape[1] * (1 if fmt == "q8_0" else 2)
    w = dequantize(QuantWeight(fmt, N, K, qs, d, m))
    return F.linear(x, w.to(x.dtype), bias)

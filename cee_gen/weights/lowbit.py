"""Low-bit weights on the CPU: the decoder's projections and the tied head in GGUF block formats.

`load_model(weights=...)` / `--weights`:
- `fp`: the checkpoint's weights as floats (a GGUF is dequantized once into the cache; the default);
- `gguf`: a GGUF's own blocks, read straight from the file, never through fp32. For the default model
  that is its Q4_1 layers and Q8_0 embedding/head: exactly the weights `fp` dequantizes from it, at a
  fifth of the bytes per token;
- `q8_0`, `q4_1`, `q4_0`: round-to-nearest quantization (ops/lowbit.py) of whatever was loaded.

`QuantLinear` holds one projection's blocks (ops/lowbit.QuantWeight) and computes through the CPU
kernel (ops/cpu.linear_q) for up to cpu.SMALL_M rows; past that (long prefills) it dequantizes a chunk of
rows at a time and lets MKL multiply, so no fp32 copy of a whole matrix exists at any time.
`QuantEmbedding` looks up and dequantizes the rows of the tokens asked for; a tied head shares its
blocks. Norms, biases, RoPE tables and the KV cache stay fp32.

LoRA deltas of a heads file cannot be added into blocks; a QuantLinear keeps them as low-rank terms
applied beside the kernel (`add_lowrank`), and `dense()` (the KV fill's copy of K/V weights) includes
them.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cee_gen.errors import CeeGenError
from cee_gen.ops import cpu
from cee_gen.ops.lowbit import QuantWeight, dequantize, format_name, quantize

DENSE_CHUNK = 4096  # weight rows dequantized at once past cpu.SMALL_M rows of x: 9 MB at K = 576
_PROJECTIONS = (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w13"), ("feed_forward", "w2"))


class QuantLinear(nn.Module):
    """y = x @ W^T + bias with W (N, K) in a GGUF block format; x fp32 (..., K)."""

    def __init__(self, qw: QuantWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.fmt, self.out_features, self.in_features = qw.fmt, qw.N, qw.K
        self.register_buffer("qs", qw.qs)
        self.register_buffer("d", qw.d)
        self.register_buffer("m", qw.m)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.lowrank: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first row, A (r, K), sB (n, r))

    @property
    def qweight(self) -> QuantWeight:
        return QuantWeight(self.fmt, self.out_features, self.in_features, self.qs, self.d, self.m)

    def add_lowrank(self, r0: int, A: torch.Tensor, B: torch.Tensor, scale: float) -> None:
        """Add scale * B @ A (n, K) to rows r0..r0+n of W, kept as its factors (a merged LoRA delta)."""
        self.lowrank.append((r0, A.float().contiguous(), (scale * B.float()).contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # past cpu.SMALL_M rows (prefills of long or many prompts) a chunk of weight rows is dequantized at
        # a time for MKL, which multiplies many rows faster than the kernel (that dequantizes each block
        # again for every 8 rows), and computes the very products the fp32 engine's MKL path does
        if x.numel() <= cpu.SMALL_M * self.in_features:
            y = cpu.linear_q(x, self.qweight, self.bias)  # (..., N)
        else:
            y = torch.cat([F.linear(x, w, b) for w, b in self._dense_chunks()], -1)
        for r0, A, sB in self.lowrank:
            y[..., r0:r0 + sB.shape[0]] += (x @ A.T) @ sB.T
        return y

    def op_blocks(self) -> tuple[str, list, list]:
        """(format, [quants, scales, mins, bias], low-rank terms) as the fused layer op reads them
        (model.op_weights)."""
        return self.fmt, [self.qs, self.d, self.m, self.bias], list(self.lowrank)

    def _dense_chunks(self):
        for r in range(0, self.out_features, DENSE_CHUNK):
            s = slice(r, r + DENSE_CHUNK)
            qw = QuantWeight(self.fmt, self.qs[s].shape[0], self.in_features, self.qs[s], self.d[s],
                             None if self.m is None else self.m[s])
            yield cpu.dequantize(qw), None if self.bias is None else self.bias[s]

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, K) weights as floats, LoRA terms included: a copy, for callers that need one."""
        w = dequantize(self.qweight)
        for r0, A, sB in self.lowrank:
            w[r0:r0 + sB.shape[0]] += sB @ A
        return w.to(dtype)

    def probe_values(self, flat: torch.Tensor) -> torch.Tensor:
        """The weights at flat indices (into the (N, K) matrix), dequantizing only their rows."""
        rows, cols = flat // self.in_features, flat % self.in_features
        uniq, inv = torch.unique(rows, return_inverse=True)
        qw = QuantWeight(self.fmt, len(uniq), self.in_features, self.qs[uniq], self.d[uniq],
                         None if self.m is None else self.m[uniq])
        return dequantize(qw)[inv, cols]

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Token embeddings in a block format: the rows asked for, dequantized. Shares a tied head's blocks."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.fmt, self.num_embeddings, self.embedding_dim = head.fmt, head.out_features, head.in_features
        self.register_buffer("qs", head.qs)
        self.register_buffer("d", head.d)
        self.register_buffer("m", head.m)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        qw = QuantWeight(self.fmt, flat.numel(), self.embedding_dim, self.qs[flat], self.d[flat],
                         None if self.m is None else self.m[flat])
        return dequantize(qw).reshape(*tokens.shape, self.embedding_dim)  # (..., D)

    probe_values = QuantLinear.probe_values

    @property
    def in_features(self) -> int:
        return self.embedding_dim


def is_lowbit(mod: nn.Module) -> bool:
    return isinstance(mod, (QuantLinear, QuantEmbedding))


def describe(net) -> str | None:
    """'q4_1+q8_0' style: the formats a network's projections and head carry, or None for floats."""
    fmts = sorted({m.fmt for m in net.modules() if isinstance(m, QuantLinear)})
    return "+".join(fmts) or None


def check_target(weights: str, dtype: torch.dtype, device: torch.device) -> None:
    """The device and dtype low-bit weights run with, refused with a one-line reason otherwise."""
    if weights == "fp":
        return
    if device.type != "cpu":
        raise CeeGenError(f"weights {weights} runs on the CPU (its kernels are CPU kernels): use device cpu, "
                          "or weights fp on the GPU")
    if dtype != torch.float32:
        raise CeeGenError(f"weights {weights} computes in float32 (activations and KV cache): use dtype "
                          "float32 or auto")


def quantize_net_(net, fmt: str) -> None:
    """Replace the layers' projections and the LM head (a tied embedding with it) by RTN `fmt` blocks."""
    fmt = format_name(fmt)
    for i, blk in enumerate(net.layers):
        for part, name in _PROJECTIONS:
            parent = getattr(blk, part)
            lin = getattr(parent, name)
            qw = _quantize_named(lin.weight, fmt, f"layers.{i}.{part}.{name}.weight")
            setattr(parent, name, QuantLinear(qw, lin.bias))
    tied = net.output.weight is net.tok_embeddings.weight
    net.output = QuantLinear(_quantize_named(net.output.weight, fmt, "output.weight"))
    if tied:
        net.tok_embeddings = QuantEmbedding(net.output)


def _quantize_named(w: torch.Tensor, fmt: str, name: str) -> QuantWeight:
    if w.shape[-1] % 32:
        raise CeeGenError(f"cannot quantize {name} {tuple(w.shape)} to {fmt}: its rows of {w.shape[-1]} "
                          "weights do not split into blocks of 32; use weights fp for this model")
    return quantize(w, fmt)

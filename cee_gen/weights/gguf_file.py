"""Reading a GGUF file's own blocks into the model (weights="gguf", weights/lowbit.py's formats), without
the float copy: the tensor index from the header, each tensor read by plain file reads a few thousand
rows at a time into the arrays the kernels take, llama.cpp's rotary row order undone, q/k/v and gate/up
fused as the model fuses them."""

from __future__ import annotations

import functools
import math
import mmap
import struct
from pathlib import Path

import torch
import torch.nn as nn

from cee_gen.errors import CeeGenError, ModelLoadError, one_line
from cee_gen.ops.lowbit import QuantWeight, format_name, from_gguf_blocks
from cee_gen.weights.lowbit import QuantEmbedding, QuantLinear

_GGUF_NAMES = {  # ours (per layer) <- GGUF's, in the order they are fused
    ("attention", "wqkv"): ("attn_q", "attn_k", "attn_v"),
    ("attention", "wo"): ("attn_output",),
    ("feed_forward", "w13"): ("ffn_gate", "ffn_up"),
    ("feed_forward", "w2"): ("ffn_down",),
}


def _rope_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's Q/K permutation for rotary halves (convert_hf_to_gguf's
    `permute`; transformers' GGUF loader undoes it the same way): a gather of whole rows, so blocks
    (which lie along K) move intact."""
    return torch.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _gather_rows(qw: QuantWeight, idx: torch.Tensor) -> QuantWeight:
    return QuantWeight(qw.fmt, qw.N, qw.K, qw.qs[idx].contiguous(), qw.d[idx].contiguous(),
                       None if qw.m is None else qw.m[idx].contiguous())


def _cat_rows(parts: list[QuantWeight]) -> QuantWeight:
    if len({p.fmt for p in parts}) != 1:  # a mixed fusion: requantizing would change the weights
        raise ModelLoadError(f"this GGUF stores one layer's projections in different block types "
                             f"({', '.join(p.fmt for p in parts)}), which cee-gen fuses into one matrix: "
                             "use weights fp for this file")
    if len(parts) == 1:
        return parts[0]
    m = None if parts[0].m is None else torch.cat([p.m for p in parts])
    return QuantWeight(parts[0].fmt, sum(p.N for p in parts), parts[0].K, torch.cat([p.qs for p in parts]),
                       torch.cat([p.d for p in parts]), m)


# GGUF metadata value types with a fixed size, as struct formats (8: string, 9: array)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_tensor_index(path: Path) -> dict:
    """name -> (GGMLQuantizationType, shape as torch orders it, bytes, offset in the file) of a GGUF
    file's tensors, from its header alone. gguf-py's GGUFReader gives the same, but it also turns every
    metadata value (the vocabulary, the merges) into numpy arrays on the way: ~130 MB at its peak for
    the default model, which a one-shot run on its blocks does not otherwise need. Kept per file
    (path, size, modification time): a load reads it twice (auto_weights, then the build)."""
    try:
        st = Path(path).stat()
        return dict(_index(str(path), st.st_size, st.st_mtime_ns))
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelLoadError(f"cannot read GGUF {path} ({one_line(e)}): the file is damaged or truncated; "
                             "pass a complete .gguf file") from None


@functools.lru_cache(maxsize=8)
def _index(path: str, size: int, mtime_ns: int) -> dict:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if size < 24:
        raise ValueError("the header ends early")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        pos = 0

        def unpack(fmt: str):
            nonlocal pos
            out = struct.unpack_from("<" + fmt, mm, pos)
            pos += struct.calcsize("<" + fmt)
            return out

        def string() -> str:
            nonlocal pos
            (n,) = unpack("Q")
            pos += n
            if pos > size:
                raise struct.error("a string runs past the end")
            return mm[pos - n:pos].decode()

        def skip(vtype: int, count: int = 1) -> None:
            nonlocal pos
            if vtype in _SCALARS:
                pos += struct.calcsize(_SCALARS[vtype]) * count
            elif vtype == 8:  # strings: (length u64, bytes), the vocabulary's ~50k of them
                u64 = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    pos += 8 + u64(mm, pos)[0]
            elif vtype == 9:
                for _ in range(count):
                    etype, n = unpack("IQ")
                    skip(etype, n)
            else:
                raise ValueError(f"unknown metadata value type {vtype}")

        try:
            magic, version, n_tensors, n_kv = unpack("4sIQQ")
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"not a GGUF v2+ file (magic {magic!r}, version {version})")
            alignment = 32
            for _ in range(n_kv):
                key = string()
                (vtype,) = unpack("I")
                if key == "general.alignment" and vtype == 4:
                    (alignment,) = unpack("I")
                else:
                    skip(vtype)
            tensors = []
            for _ in range(n_tensors):
                name = string()
                (n_dims,) = unpack("I")
                dims = unpack("Q" * n_dims)
                kind, offset = unpack("IQ")
                tensors.append((name, GGMLQuantizationType(kind), dims, offset))
        except struct.error:
            raise ValueError("the header ends early") from None
        data = pos + (-pos) % alignment
    out = {}
    for name, kind, dims, offset in tensors:
        block, type_bytes = GGML_QUANT_SIZES[kind]
        n_bytes = math.prod(dims) // block * type_bytes
        if data + offset + n_bytes > size:
            raise ValueError(f"tensor {name} runs past the end of the file")
        out[name] = (kind, tuple(reversed(dims)), n_bytes, data + offset)
    return out


READ_ROWS = 2048  # rows of a block tensor read at once (2.5 MB of the default model's head)


class GGUFTensors:
    """A GGUF file's tensors, each read from the file when taken (`take`): F32/F16 ones as fp32 tensors,
    block ones as QuantWeight. Read with plain file reads, not through the reader's memory map, and one
    tensor at a time, so building a model holds its blocks once, plus one tensor in flight."""

    def __init__(self, path: Path):
        self.path = path
        self.info = gguf_tensor_index(path)

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def take(self, name: str):
        from gguf import GGMLQuantizationType

        kind, shape, n_bytes, offset = self.info.pop(name)
        with open(self.path, "rb") as f:
            if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                raw = self._read(f, name, offset, n_bytes)
                dt = torch.float32 if kind == GGMLQuantizationType.F32 else torch.float16
                return raw.view(dt).reshape(shape).float()
            try:  # blocks: READ_ROWS rows at a time, repacked into arrays made once (no second copy)
                rows, row_bytes = shape[0], n_bytes // shape[0]
                out = None
                for r in range(0, rows, READ_ROWS):
                    n = min(READ_ROWS, rows - r)
                    part = from_gguf_blocks(self._read(f, name, offset + r * row_bytes, n * row_bytes)
                                            .reshape(n, row_bytes), kind, name)
                    if out is None:  # the whole tensor's arrays, shaped as the first part's
                        def rows_of(t):
                            return None if t is None else t.new_empty((rows, *t.shape[1:]))

                        out = QuantWeight(part.fmt, rows, part.K, rows_of(part.qs), rows_of(part.d),
                                          rows_of(part.m))
                    for a, b in ((out.qs, part.qs), (out.d, part.d), (out.m, part.m)):
                        if a is not None:
                            a[r:r + n] = b
                return out
            except CeeGenError as e:
                raise ModelLoadError(f"GGUF {self.path.name}, tensor {name}: {e}; or use weights fp "
                                     "(dequantized once by transformers)") from None

    def _read(self, f, name: str, offset: int, n: int) -> torch.Tensor:
        raw = torch.empty(n, dtype=torch.uint8)
        f.seek(offset)
        if f.readinto(raw.numpy()) != n:
            raise ModelLoadError(f"GGUF {self.path.name} ends inside tensor {name}: the file is truncated")
        return raw


def build_from_gguf(net, path: Path) -> None:
    """Fill a meta-device `net` (ours, built from the GGUF's config) with the GGUF's own blocks."""
    t = GGUFTensors(path)
    for name, (kind, _, _, _) in t.info.items():  # every unsupported block type, before any reading
        if kind.name not in ("F32", "F16"):
            try:
                format_name(kind)
            except CeeGenError as e:
                raise ModelLoadError(f"GGUF {path.name}, tensor {name}: {e}; or use weights fp "
                                     "(dequantized once by transformers)") from None
    a = net.args

    def take(name: str):
        if name not in t:
            raise ModelLoadError(f"GGUF {path.name} has no tensor {name!r}: it is not a LLaMA-family "
                                 "model file cee-gen can read in its blocks; use weights fp")
        return t.take(name)

    def take_optional(name: str):
        return t.take(name) if name in t else None

    def linear(parts: list, bias=None) -> nn.Module:
        if all(isinstance(p, QuantWeight) for p in parts):
            return QuantLinear(_cat_rows(parts), bias)
        if any(isinstance(p, QuantWeight) for p in parts):
            raise ModelLoadError(f"GGUF {path.name} mixes float and block tensors in one layer: use "
                                 "weights fp")
        lin = nn.Linear(parts[0].shape[1], sum(p.shape[0] for p in parts), bias=bias is not None)
        lin.weight = nn.Parameter(torch.cat(parts), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias, requires_grad=False)
        return lin

    unpermute = {"attn_q": a.n_heads, "attn_k": a.n_kv_heads}
    for i, blk in enumerate(net.layers):
        for (part, name), names in _GGUF_NAMES.items():
            ws = []
            for g in names:
                w = take(f"blk.{i}.{g}.weight")
                if g in unpermute:
                    idx = _rope_rows(w.shape[0], unpermute[g])
                    w = _gather_rows(w, idx) if isinstance(w, QuantWeight) else w[idx]
                ws.append(w)
            bias = [take_optional(f"blk.{i}.{g}.bias") for g in names]
            b = None if any(x is None for x in bias) else torch.cat(bias)
            setattr(getattr(blk, part), name, linear(ws, b))
        blk.attention_norm.weight = nn.Parameter(take(f"blk.{i}.attn_norm.weight"), requires_grad=False)
        blk.ffn_norm.weight = nn.Parameter(take(f"blk.{i}.ffn_norm.weight"), requires_grad=False)
    net.norm.weight = nn.Parameter(take("output_norm.weight"), requires_grad=False)
    emb = take("token_embd.weight")
    head = take_optional("output.weight")
    if head is None:  # tied: the head is the embedding
        net.output = linear([emb])
        if isinstance(emb, QuantWeight):
            net.tok_embeddings = QuantEmbedding(net.output)
        else:
            net.tok_embeddings = nn.Embedding.from_pretrained(emb, freeze=True)
            net.output.weight = net.tok_embeddings.weight
    else:
        net.output = linear([head])
        net.tok_embeddings = (QuantEmbedding(QuantLinear(emb)) if isinstance(emb, QuantWeight)
                              else nn.Embedding.from_pretrained(emb, freeze=True))

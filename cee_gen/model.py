"""A LLaMA-family decoder whose layer loop we own.

Written in the manner of gpt-fast (pytorch-labs/gpt-fast `model.py`): a `ModelArgs` dataclass built
from the HF config, fused `wqkv` and gate/up (`w13`) projections, a static KV cache written by index,
and RoPE tables computed once. Like gpt-fast's LayerSkip branch, early exit needs no `if exit:` flags
in the blocks: `forward_layers(h, lo, hi, step, cache)` runs an explicit layer range, so a caller can
run layers [0, k), look at the hidden state, and go on or stop.

Supported: RMSNorm, RoPE (default, linear and llama3 scaling), MHA and GQA, SwiGLU MLP, tied or untied
LM head, optional q/k/v (and o) bias as in Qwen2. Numerics follow HF `LlamaForCausalLM` (RMSNorm in
fp32, rotate-half RoPE layout), which tests/test_model_parity.py checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cee_gen import ops
from cee_gen.errors import CeeGenError
from cee_gen.ops import cpu
from cee_gen.rope import apply_rope, rope_inv_freq, rope_tables  # noqa: F401  (re-exported)
from cee_gen.step import FillColumns, Flash, Sdpa, Step, cache_read, cache_write


@dataclass
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_parameters` minus theta; None = default RoPE
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf_config(cls, cfg) -> ModelArgs:
        """Build from a transformers `PretrainedConfig` of the LLaMA family (llama, qwen2, mistral...)."""
        n_heads = cfg.num_attention_heads
        rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise CeeGenError(f"RoPE scaling {rope_type!r} is not supported: cee-gen supports "
                              "default, linear and llama3")
        ctx = cfg.max_position_embeddings
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if window:  # attention over the whole context equals the windowed one up to the window's length
            ctx = min(ctx, window)
        qwen_style = cfg.model_type == "qwen2"
        attn_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads,
            intermediate_size=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=ctx,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qkv_bias=qwen_style or attn_bias,
            o_bias=attn_bias and not qwen_style,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )


def layer_devices(net: Transformer) -> torch.device | list[torch.device]:
    """Where each layer's KV cache goes: the model's device, or per layer when it is split."""
    if net.segments is None:
        return net.device
    return [d for a, b, d in net.segments for _ in range(a, b)]


def multiply_sum(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias) written as a multiply-sum: (..., 1, K) * (N, K) -> (..., N).

    At batch 1 a decode step is a matrix-vector product per weight, and reading the weights is all
    the time it takes. On AVX2 CPUs MKL's sgemv reads them at ~10 GB/s where plain reads reach ~23;
    Inductor turns this into one fused vectorized pass over W that runs at ~23 GB/s (docs/speed.md).
    Only for compiled code: eager would materialize x * W."""
    y = (x.unsqueeze(-2) * weight).sum(-1)
    return y if bias is None else y + bias


def linear(x: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """mod(x), for a plain Linear (bitsandbytes modules, weights/quant.py, compute their own) through:
    - the CPU small-M kernel (ops/cpu.py) for fp32 on the CPU with up to cpu.SMALL_M rows, eager or
      compiled, when no gradient is wanted and no hook watches the module (LoRA training): it reads
      the weights once for all rows, and a row's result does not depend on the other rows, so a
      verify pass over k positions gives the plain step's logits bit for bit;
    - else, under torch.compile, a multiply-sum (`multiply_sum`); else torch's own (MKL) matmul."""
    if type(mod) is not nn.Linear:
        return mod(x)
    w = mod.weight
    if cpu.ready and x.is_cpu and x.dtype == w.dtype == torch.float32 \
            and x.numel() <= cpu.SMALL_M * x.shape[-1] \
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) \
            and not (mod._forward_hooks or mod._forward_pre_hooks):  # LoRA's training hooks: mod(x)
        return torch.ops.cee_cpu.linear_f32.default(x, w, mod.bias)
    if torch.compiler.is_compiling():
        return multiply_sum(x, mod.weight, mod.bias)
    return mod(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In fp32, then back, as HF LlamaRMSNorm does: low-precision variance is visibly off.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        self.wqkv = nn.Linear(a.dim, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.wo = nn.Linear(self.q_size, a.dim, bias=a.o_bias)

    def forward(self, x: torch.Tensor, step: Step, k_cache: torch.Tensor, v_cache: torch.Tensor,
                fill: FillColumns | None = None, fill_x: torch.Tensor | None = None):
        """x (B, T, D) normed; fill_x (B, P, D): the fill columns' states, normed by this layer."""
        B, T, _ = x.shape
        if fill is not None and not torch.compiler.is_compiling():
            qkv = linear(torch.cat([x, fill_x], 1), self.wqkv)  # (B, T + P, q + 2kv): one product
            self._write_fill(qkv[:, T:, self.q_size:], fill, step.rows, k_cache, v_cache)
            qkv = qkv[:, :T]
        else:
            qkv = linear(x, self.wqkv)
            if fill is not None:  # compiled decode: the multiply-sum serves one column; the fill a matmul
                if type(self.wqkv) is nn.Linear:  # K/V rows only
                    w, b = self.wqkv.weight[self.q_size:], self.wqkv.bias
                    kv = F.linear(fill_x, w, None if b is None else b[self.q_size:])
                else:  # low-bit blocks (weights/lowbit.py): the kernel's whole product, Q rows dropped
                    kv = linear(fill_x, self.wqkv)[..., self.q_size:]
                self._write_fill(kv, fill, step.rows, k_cache, v_cache)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], -1)
        q = apply_rope(q.view(B, T, self.n_heads, self.head_dim), step.cos, step.sin)
        k = apply_rope(k.view(B, T, self.n_kv_heads, self.head_dim), step.cos, step.sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        # caches: (B, H_kv, S, hd), written by slot index, never grown with torch.cat
        cache_write(k_cache, k, step.slots, step.rows)
        cache_write(v_cache, v, step.slots, step.rows)
        if isinstance(step.attn, Flash):  # flash-attn reads the cache as (B, S, H_kv, hd): a transposed view
            fa = step.attn
            y = ops.attn_kvcache(q, k_cache.transpose(1, 2), v_cache.transpose(1, 2), fa.seqlens,
                                 fa.leftpad, fa.batch_idx)  # (B, T, H, hd)
            return linear(y.reshape(B, T, self.q_size), self.wo)
        kc, vc = cache_read(k_cache, step), cache_read(v_cache, step)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # (B, H, T, hd)
            kc,
            vc,
            attn_mask=step.attn.mask[..., :kc.shape[2]],
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # (B, H, T, hd)
        return linear(y.transpose(1, 2).reshape(B, T, self.q_size), self.wo)

    def _write_fill(self, kv: torch.Tensor, fill: FillColumns, rows: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor):
        """Write the fill columns' K/V, kv (b, P, 2kv), at their rows and slots."""
        b, P, _ = kv.shape
        k, v = kv.split(self.kv_size, -1)
        k = apply_rope(k.reshape(b, P, self.n_kv_heads, self.head_dim), fill.cos, fill.sin)
        cache_write(k_cache, k, fill.slots, rows)
        cache_write(v_cache, v.reshape(b, P, self.n_kv_heads, self.head_dim), fill.slots, rows)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.inter = a.intermediate_size
        self.w13 = nn.Linear(a.dim, 2 * a.intermediate_size, bias=a.mlp_bias)  # gate | up
        self.w2 = nn.Linear(a.intermediate_size, a.dim, bias=a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, self.w13).split(self.inter, dim=-1)
        return linear(F.silu(gate) * up, self.w2)


LAYER_ROWS = 128  # query rows (and fill columns) up to which one cee_cpu::layer call runs a layer
_OP_DTYPES = (torch.float32, torch.int8, torch.uint8, torch.float16)  # what its weights may hold


def op_weights(mod: nn.Module) -> tuple[str, list, list] | None:
    """(format, [weight or quants, scales d, mins m, bias], low-rank terms [(first row, A, sB)]) of a
    projection as cee_cpu::layer reads it, or None where the op cannot (bitsandbytes, hooks watching it)."""
    if type(mod) is nn.Linear:
        if mod._forward_hooks or mod._forward_pre_hooks or mod.weight.dtype != torch.float32:
            return None
        return "f32", [mod.weight, None, None, mod.bias], []
    blocks = getattr(mod, "op_blocks", None)  # weights/lowbit.QuantLinear
    return None if blocks is None else blocks()


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, h, step: Step, k_cache, v_cache, fill: FillColumns | None = None):
        out = None
        if cpu.ready and h.is_cpu and not torch.compiler.is_compiling():
            out = self.fused(h, step, k_cache, v_cache, fill)
        return self.forward_modules(h, step, k_cache, v_cache, fill) if out is None else out

    def forward_modules(self, h, step: Step, k_cache, v_cache, fill: FillColumns | None = None):
        """The layer through its modules: every device, dtype and weight kind, training, hooks, torch.compile;
        the twin of the fused layer op."""
        fill_x = None if fill is None else self.attention_norm(fill.h)  # (b, P, D)
        h = h + self.attention(self.attention_norm(h), step, k_cache, v_cache, fill, fill_x)
        return h + self.feed_forward(self.ffn_norm(h))

    def fused(self, h, step: Step, k_cache, v_cache, fill: FillColumns | None = None) -> torch.Tensor | None:
        """This layer as one cee_cpu::layer call (csrc/cpu/layer.cpp: the CPU kernels, fp32, a few rows,
        one parallel region instead of ~12 operations); None where that op does not serve it: training
        (no backward), another attention kind, more than LAYER_ROWS rows, weights it cannot read."""
        B, T, _ = h.shape
        if torch.is_grad_enabled() or type(step.attn) is not Sdpa or h.dtype != torch.float32 \
                or k_cache.dtype != torch.float32 or B * T > LAYER_ROWS \
                or (fill is not None and fill.h.shape[0] * fill.h.shape[1] > LAYER_ROWS):
            return None
        args = self._op_args()
        if args is None:
            return None
        w, fmts, n_heads, n_kv_heads, eps, lr, lr_meta = args
        attn = step.attn
        mask = attn.mask if attn.kv_len is None else attn.mask[..., :attn.kv_len]  # (b, 1, T, S')
        f = (None,) * 4 if fill is None else (fill.h, fill.slots, fill.cos, fill.sin)
        return torch.ops.cee_cpu.layer.default(h, w, fmts, k_cache, v_cache, step.cos, step.sin, step.slots,
                                               step.rows, mask, n_heads, n_kv_heads, eps, *f, lr, lr_meta)

    def _op_args(self) -> tuple | None:
        """(w, fmts, n_heads, n_kv_heads, eps, lr, lr_meta) for cee_cpu::layer, kept between calls
        (gathering them costs more than a small layer's arithmetic) and gathered again when a projection
        is replaced or gains low-rank terms; None while a projection cannot be read (hooks,
        bitsandbytes, not fp32)."""
        a, f = self.attention._modules, self.feed_forward._modules
        mods = (a["wqkv"], a["wo"], f["w13"], f["w2"])
        for m in mods:
            if m._forward_hooks or m._forward_pre_hooks:
                return None
        key = (mods, tuple(len(m.__dict__.get("lowrank", ())) for m in mods))
        kept = self.__dict__.get("_op_kept")
        if kept is not None and kept[0] == key and kept[1][0][0].dtype == torch.float32:
            return kept[1]
        parts = [op_weights(m) for m in mods]
        if None in parts or self.attention_norm.eps != self.ffn_norm.eps:
            return None
        w = [self.attention_norm.weight, self.ffn_norm.weight, *(t for _, ts, _ in parts for t in ts)]
        lr = [t for _, _, terms in parts for _, A, sB in terms for t in (A, sB)]
        if any(t is not None and t.dtype not in _OP_DTYPES for t in w + lr):
            return None
        meta = [v for j, (_, _, terms) in enumerate(parts) for r0, _, _ in terms for v in (j, r0)]
        att = self.attention
        args = (w, ",".join(fmt for fmt, _, _ in parts), att.n_heads, att.n_kv_heads, self.attention_norm.eps,
                lr, meta)
        self.__dict__["_op_kept"] = (key, args)
        return args


def run_layer(block: Block, h: torch.Tensor, step: Step, k_cache: torch.Tensor, v_cache: torch.Tensor,
              fill: FillColumns | None = None) -> torch.Tensor:
    """One decoder layer. A free function of the block, so one compiled graph serves every layer
    (they differ only in weights): the compiled exit step compiles this, not each layer range."""
    return block(h, step, k_cache, v_cache, fill)


def run_layer_columns(block: Block, h: torch.Tensor, step: Step, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, fill: FillColumns | None = None) -> torch.Tensor:
    """run_layer for a verify pass's many columns per row: its own function, so torch.compile keeps
    its graphs (column and row counts dynamic) apart from the exit step's."""
    return block(h, step, k_cache, v_cache, fill)


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layers))
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        with torch.device("cpu"):  # real tables even when the module is built on the meta device (the
            cos, sin = rope_tables(a, a.max_position_embeddings)  # loaders' way; meta ops load dynamo)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, hd) fp32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.attn_impl = "sdpa"  # or "flash" (ops/flash.py), set by the loader
        self.segments: list | None = None  # layers split across devices (placement.py); None = one device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the norms' (embeddings and projections may be low-bit blocks)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        """The home device: embeddings, final norm, LM head (and exit heads) live there."""
        return self.norm.weight.device

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)  # (B, T) -> (B, T, D)

    def forward_layers(self, h: torch.Tensor, lo: int, hi: int, step: Step, cache, run=None,
                       fill: FillColumns | None = None) -> torch.Tensor:
        """Run layers [lo, hi) on hidden states h (B, T, D); writes those layers' KV into `cache`, and
        the K/V of the `fill` columns, if any, at each of them.

        `run(block, h, step, k_cache, v_cache, fill)` runs one layer (default: the block itself; the
        compiled exit step passes a compiled copy of run_layer). With layers split across devices,
        h and the step move to each segment's device on the way, and h comes back to its own device
        (the home device) at the end."""
        run = run or run_layer
        if self.segments is None:
            for i in range(lo, hi):
                h = run(self.layers[i], h, step, cache.k[i], cache.v[i], fill)
            return h
        home = h.device
        for a, b, dev in self.segments:
            if max(a, lo) < min(b, hi):
                h, st, fc = h.to(dev), step.on(dev), None if fill is None else fill.to(dev)
                for i in range(max(a, lo), min(b, hi)):
                    h = run(self.layers[i], h, st, cache.k[i], cache.v[i], fc)
        return h.to(home)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: (B, T, D) -> (B, T, V) logits."""
        return linear(self.norm(h), self.output)

    def rope_rows(self, slots: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin (B, T, 1, hd) of cache slots (B or 1, T) in rows left-padded by pad (B,):
        a slot's position is slot - pad (padding slots clamp to position 0)."""
        pos = (slots - pad[:, None]).clamp_(0, self.rope_cos.shape[0] - 1)  # (B, T)
        dt = self.dtype
        return self.rope_cos[pos].to(dt)[:, :, None, :], self.rope_sin[pos].to(dt)[:, :, None, :]

    def make_step(self, slots: torch.Tensor, pad: torch.Tensor, n_slots: int, kv_len: int | None = None,
                  rows: torch.Tensor | None = None) -> Step:
        """Positions, RoPE and attention for queries at cache slots `slots` (T,) or (B, T) per row.

        Rows are left-padded: row b's real tokens start at slot pad[b] (B,), so its RoPE position is
        slot - pad[b] and it may attend to slots pad[b]..slot. A padding query attends to itself
        only, which keeps its (unused) values finite. `rows` (B,): which cache rows these are.
        A 1-D `slots` is one run of slots (prefill: 0..T-1; decode: the new token's slot). With
        flash attention such a step carries seqlens and leftpad instead of the mask, and a padding
        query attends to nothing (zeros): its values are never read by a real token either way.
        """
        ip = slots if slots.dim() == 2 else slots[None, :]  # (B or 1, T)
        cos, sin = self.rope_rows(ip, pad)
        if self.attn_impl == "flash" and slots.dim() == 1 and not torch.is_grad_enabled():
            # one run of slots per row, ending at slots[-1]; no backward in flash_attn_with_kvcache
            b = pad.shape[0]
            seqlens = (slots[-1:] + 1).to(torch.int32).expand(b).contiguous()  # (b,)
            attn = Flash(seqlens, pad.to(torch.int32), None if rows is None else rows.to(torch.int32))
            return Step(slots, cos, sin, attn, rows)
        keys = torch.arange(n_slots, device=slots.device)  # (S,)
        q = ip[:, :, None]  # (B or 1, T, 1)
        mask = ((keys[None, None, :] >= pad[:, None, None]) & (keys <= q)) | (keys == q)  # (B, T, S)
        return Step(slots, cos, sin, Sdpa(mask[:, None], kv_len), rows)

    def forward(self, tokens: torch.Tensor, step: Step, cache) -> torch.Tensor:
        """Full depth: tokens (B, T) -> logits (B, T, V)."""
        h = self.forward_layers(self.embed(tokens), 0, self.args.n_layers, step, cache)
        return self.head(h)

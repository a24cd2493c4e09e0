"""The fused decoder-layer op (cee_cpu::layer, csrc/cpu/layer.cpp) against its twin, the model's own Block
through its modules (Block.forward_modules), on random layers: fp32 and GGUF block weights, GQA and MHA,
biases, left-padded batches, per-row slots and cache rows, the deferred fill's columns, odd head sizes,
every instruction-set variant, one thread and two. Skips, saying why, only where the CPU kernels cannot
build."""

from __future__ import annotations

import pytest
import torch

from cee_gen import model as M
from cee_gen.ops import cpu, lowbit
from cee_gen.step import FillColumns
from cee_gen.weights.lowbit import QuantLinear

HAS_KERNELS = cpu.load()
pytestmark = pytest.mark.skipif(not HAS_KERNELS, reason=f"the CPU kernels did not build: {cpu.why_not()}")
ISA_ORDER = ("scalar", "avx2", "avx512")


def make_block(dim=96, n_heads=6, n_kv_heads=2, head_dim=16, inter=160, bias=False, fmt=None, seed=0):
    """A one-layer model (its RoPE tables and make_step) and its random layer (weights of a trained model's
    scale), optionally with the projections in blocks (fmt: one format, or one per projection)."""
    args = M.ModelArgs(vocab_size=64, dim=dim, n_layers=1, n_heads=n_heads, n_kv_heads=n_kv_heads,
                       head_dim=head_dim, intermediate_size=inter, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                       max_position_embeddings=256)
    g = torch.Generator().manual_seed(seed)
    net = M.Transformer(args).eval()
    blk = net.layers[0]
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for norm in (blk.attention_norm, blk.ffn_norm):
            norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    for part, name in (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w13"),
                       ("feed_forward", "w2")):
        f = fmt if isinstance(fmt, str) or fmt is None else fmt[name]
        if f is not None:
            lin = getattr(getattr(blk, part), name)
            setattr(getattr(blk, part), name, QuantLinear(lowbit.quantize(lin.weight.data, f),
                                                           None if lin.bias is None else lin.bias.data))
    return blk, net


def caches(blk, B, S, seed=1):
    a = blk.attention
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, a.n_kv_heads, S, a.head_dim, generator=g)
    return k, torch.randn(k.shape, generator=g)


def both(blk, h, step, k, v, fill=None):
    """(op output, op caches), (twin output, twin caches), from the same starting caches."""
    k2, v2 = k.clone(), v.clone()
    with torch.inference_mode():
        out = blk.fused(h, step, k, v, fill)
        ref = blk.forward_modules(h, step, k2, v2, fill)
    assert out is not None, "the op should serve this layer"
    return (out, k, v), (ref, k2, v2)


def assert_same(a, b, atol=2e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def decode_step(rope, pad, slot, S, B):
    return rope.make_step(torch.tensor([slot]), pad, S, slot + 1)


@pytest.fixture(params=ISA_ORDER)
def isa(request):
    if ISA_ORDER.index(request.param) > ISA_ORDER.index(cpu.best_isa()):
        pytest.skip(f"this CPU has no {request.param} (best: {cpu.best_isa()})")
    prev = cpu.isa()
    assert cpu.set_isa(request.param) == request.param
    yield request.param
    cpu.set_isa(prev)


@pytest.mark.parametrize("fmt", [None, "q8_0", "q4_0", "q4_1", {"wqkv": "q4_1", "wo": None, "w13": "q8_0",
                                                                "w2": "q4_0"}])
def test_a_decode_step_matches_the_module_layer_every_isa(isa, fmt):
    blk, rope = make_block(fmt=fmt)
    B, S = 3, 40
    k, v = caches(blk, B, S)
    pad = torch.tensor([0, 5, 11])
    h = torch.randn(B, 1, 96)
    assert_same(*both(blk, h, decode_step(rope, pad, 23, S, B), k, v))


@pytest.mark.parametrize("shape", [dict(n_heads=4, n_kv_heads=4, head_dim=24),     # MHA, odd hd/2
                                   dict(n_heads=8, n_kv_heads=1, head_dim=64),     # one KV head
                                   dict(n_heads=6, n_kv_heads=3, head_dim=128),
                                   dict(n_heads=2, n_kv_heads=2, head_dim=80, dim=160)])
def test_head_layouts_and_biases(shape, isa):
    dim = shape.pop("dim", 96)
    blk, rope = make_block(dim=dim, bias=True, **shape)
    k, v = caches(blk, 2, 33)
    h = torch.randn(2, 1, dim)
    assert_same(*both(blk, h, decode_step(rope, torch.tensor([2, 0]), 32, 33, 2), k, v))


def test_a_prefill_chunk_attends_causally_over_left_padded_rows():
    blk, rope = make_block(fmt="q4_1")
    B, T, S = 2, 9, 16
    k, v = caches(blk, B, S)
    pad = torch.tensor([0, 4])
    step = rope.make_step(torch.arange(T), pad, S, T)
    assert_same(*both(blk, torch.randn(B, T, 96), step, k, v))


def test_per_row_slots_cache_rows_and_fill_columns():
    """The exit step's layout: a subset of the cache's rows, each at its own slots, with fill columns
    (their K/V written at their own slots, padding columns at a scratch slot no query reads)."""
    blk, rope = make_block(fmt="q8_0")
    Bc, S = 4, 30
    k, v = caches(blk, Bc, S)
    pad = torch.tensor([0, 3, 1, 6])
    full = rope.make_step(torch.tensor([20, 21]), pad, S, 22)
    rows = torch.tensor([3, 1])
    step = full.select(rows)
    slots = torch.tensor([[20, 21], [19, 21]])
    step = M.Step(slots, *rope.rope_rows(slots, pad[rows]), step.attn, rows)
    fslots = torch.tensor([[17, 18, 29], [18, 29, 29]])  # 29: the scratch slot
    fcos, fsin = rope.rope_rows(fslots, pad[rows])
    fill = FillColumns(torch.randn(2, 3, 96), fslots, fcos, fsin)
    (out, k1, v1), (ref, k2, v2) = both(blk, torch.randn(2, 2, 96), step, k, v, fill)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    real = torch.ones(S, dtype=torch.bool)
    real[29] = False  # the scratch slot's content depends on which padding column wrote last
    torch.testing.assert_close(k1[:, :, real], k2[:, :, real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(v1[:, :, real], v2[:, :, real], atol=2e-5, rtol=1e-5)
    untouched = [0, 2]  # rows not in the step are left as they were
    assert torch.equal(k1[untouched], caches(blk, Bc, S)[0][untouched])


def test_low_rank_terms_beside_the_blocks_reach_queries_and_fill_columns():
    """A heads file's LoRA deltas on block weights stay factors (QuantLinear.add_lowrank): the op adds them
    to the products it makes, the fill columns' K/V included, as the modules do."""
    blk, rope = make_block(fmt="q4_1")
    g = torch.Generator().manual_seed(5)
    a = blk.attention
    for r0, n in ((0, a.q_size), (a.q_size + a.kv_size, a.kv_size)):  # q rows and v rows, as LoRA q,v
        a.wqkv.add_lowrank(r0, torch.randn(4, 96, generator=g), torch.randn(n, 4, generator=g), 0.1)
    w2 = blk.feed_forward.w2
    w2.add_lowrank(10, torch.randn(3, 160, generator=g), torch.randn(50, 3, generator=g), 0.2)
    Bc, S = 2, 24
    k, v = caches(blk, Bc, S)
    pad = torch.tensor([0, 2])
    step = rope.make_step(torch.tensor([12]), pad, S, 13)
    fslots = torch.tensor([[9, 10], [10, 11]])
    fill = FillColumns(torch.randn(2, 2, 96, generator=g), fslots, *rope.rope_rows(fslots, pad))
    h = torch.randn(2, 1, 96, generator=g)
    (out, k1, v1), (ref, k2, v2) = both(blk, h, step, k, v, fill)
    assert_same((out, k1, v1), (ref, k2, v2))
    plain, _ = make_block(fmt="q4_1")  # the same layer without the terms: they changed the result
    k3, v3 = caches(plain, Bc, S)
    with torch.inference_mode():
        assert not torch.allclose(plain.fused(h, step, k3, v3, fill), out, atol=1e-3)
    assert not torch.allclose(v3[:, :, 9:12], v1[:, :, 9:12], atol=1e-3)  # the fill columns' V too


def test_a_rows_result_is_bit_for_bit_the_same_alone_or_in_a_batch_with_one_or_two_threads():
    blk, rope = make_block(dim=256, n_heads=8, n_kv_heads=2, head_dim=32, inter=512, fmt="q4_1")
    B, S = 3, 50
    pad = torch.tensor([0, 7, 2])
    h = torch.randn(B, 4, 256)
    step = rope.make_step(torch.arange(30, 34), pad, S, 34)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            k, v = caches(blk, B, S)
            with torch.inference_mode():
                outs.append((blk.fused(h, step, k, v), k))
                for b in range(B):  # row b alone, at its cache row
                    kb, vb = caches(blk, B, S)
                    rows = torch.tensor([b])
                    one = blk.fused(h[b:b + 1], step.select(rows), kb, vb)
                    assert torch.equal(one[0], outs[-1][0][b]) and torch.equal(kb[b], k[b])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_the_op_declines_what_it_does_not_serve():
    blk, rope = make_block()
    k, v = caches(blk, 1, 8)
    step = decode_step(rope, torch.tensor([0]), 3, 8, 1)
    h = torch.randn(1, 1, 96)
    assert blk.fused(h, step, k, v) is None  # gradients enabled: the modules, which have a backward
    with torch.inference_mode():
        assert blk.fused(h.double(), step, k, v) is None  # not fp32
        assert blk.fused(torch.randn(1, M.LAYER_ROWS + 1, 96), step, k, v) is None  # too many rows
        blk.attention.wqkv.register_forward_hook(lambda *a: None)
        assert blk.fused(h, step, k, v) is None  # a hook watches a projection
        assert blk(h, step, k, v).shape == h.shape  # and the module path serves it


def test_bad_arguments_are_refused_with_a_message():
    blk, rope = make_block()
    k, v = caches(blk, 1, 8)
    step = decode_step(rope, torch.tensor([0]), 3, 8, 1)
    w, fmts, H, Hkv, eps, lr, meta = blk._op_args()
    op = torch.ops.cee_cpu.layer.default
    h = torch.randn(1, 1, 96)
    mask = step.attn.mask[..., :4]
    with pytest.raises(RuntimeError, match="slot 9 outside"):
        op(h, w, fmts, k, v, step.cos, step.sin, torch.tensor([9]), None, mask, H, Hkv, eps, None, None, None,
           None, lr, meta)
    with pytest.raises(RuntimeError, match="unknown weight format"):
        op(h, w, "f32,f32,q5_k,f32", k, v, step.cos, step.sin, step.slots, None, mask, H, Hkv, eps, None,
           None, None, None, lr, meta)
    with pytest.raises(RuntimeError, match="caches must be"):
        op(h, w, fmts, k.transpose(2, 3), v, step.cos, step.sin, step.slots, None, mask, H, Hkv, eps, None,
           None, None, None, lr, meta)
    with pytest.raises(RuntimeError, match="group evenly"):
        op(h, w, fmts, k, v, step.cos, step.sin, step.slots, None, mask, 5, Hkv, eps, None, None, None, None,
           lr, meta)

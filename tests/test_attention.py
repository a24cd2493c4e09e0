"""Attention kernels: the flash-attn path (ops/flash.py) against SDPA, and when each is chosen.

On the CPU the op `cee_gen::attn_kvcache` runs its twin, which has flash_attn_with_kvcache's
semantics; forcing a model's `attn_impl` to "flash" there runs the engine's flash wiring (seqlens,
leftpad, batch_idx, the transposed cache) through the twin. That tests our side of the call on every
machine. flash-attn itself is tested against the twin on a GPU with flash-attn installed; those
tests skip, saying why, elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model4

import cee_gen
from cee_gen import ExitConfig, LoadConfig, model
from cee_gen.cache import StaticKVCache
from cee_gen.errors import CeeGenError
from cee_gen.ops import flash, reference
from cee_gen.step import Flash, Sdpa

HAS_CUDA = torch.cuda.is_available()
needs_flash = pytest.mark.skipif(
    not (HAS_CUDA and cee_gen.ops.FLASH),
    reason=("needs flash-attn >= 2.6 installed (pip install 'flash-attn>=2.6' --no-build-isolation)"
            if HAS_CUDA else "needs a CUDA device: none here"))

PROMPTS = ["the quick brown fox", "give three tips", "a b c d e f", "z"]  # left-padded in a batch


def attn_case(b=3, T=2, H=4, Hk=2, hd=8, B=4, S=12, dtype=torch.float32, device="cpu", seed=0):
    """q (b, T, H, hd); caches (B, H_kv, S, hd) as the engine holds them; per-row ends and left pads."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)

    seqlens = torch.tensor([S, 5, 3][:b], dtype=torch.int32, device=device)
    leftpad = torch.tensor([0, 2, 2][:b], dtype=torch.int32, device=device)  # row 2: query 0 sees nothing
    batch_idx = torch.tensor([3, 0, 1][:b], dtype=torch.int32, device=device)
    return rnd(b, T, H, hd), rnd(B, Hk, S, hd), rnd(B, Hk, S, hd), seqlens, leftpad, batch_idx


def per_query_attention(q, k, v, seqlens, leftpad, batch_idx):
    """The same attention, one query at a time in float64: the definition the twin must meet."""
    b, T, H, hd = q.shape
    Hk = k.shape[1]
    out = torch.zeros(b, T, H, hd, dtype=torch.float64)
    for r in range(b):
        c = int(batch_idx[r])
        for i in range(T):
            slot = int(seqlens[r]) - T + i
            keys = range(int(leftpad[r]), slot + 1)
            if not keys:
                continue
            for h in range(H):
                kh = h // (H // Hk)
                kk, vv = k[c, kh, list(keys)].double(), v[c, kh, list(keys)].double()
                w = torch.softmax(kk @ q[r, i, h].double() / hd ** 0.5, 0)
                out[r, i, h] = w @ vv
    return out


def test_attn_kvcache_twin_is_causal_from_each_rows_left_pad_over_its_cache_row():
    q, k, v, seqlens, leftpad, idx = attn_case()
    y = reference.attn_kvcache_ref(q, k.transpose(1, 2), v.transpose(1, 2), seqlens, leftpad, idx)
    want = per_query_attention(q, k, v, seqlens, leftpad, idx)
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)
    assert (y[2, 0] == 0).all(), "a query with no slot to attend to gives zeros"
    assert y[2, 1].abs().sum() > 0


def test_attn_kvcache_twin_without_batch_idx_reads_rows_in_order():
    q, k, v, seqlens, leftpad, _ = attn_case(B=3)
    y = reference.attn_kvcache_ref(q, k.transpose(1, 2), v.transpose(1, 2), seqlens, leftpad, None)
    want = per_query_attention(q, k, v, seqlens, leftpad, torch.arange(3))
    torch.testing.assert_close(y.double(), want, atol=1e-5, rtol=1e-5)


def test_attn_kvcache_op_passes_opcheck():
    for B, with_idx in ((4, True), (3, False)):
        q, k, v, seqlens, leftpad, idx = attn_case(B=B)
        torch.library.opcheck(torch.ops.cee_gen.attn_kvcache.default,
                              (q, k.transpose(1, 2), v.transpose(1, 2), seqlens, leftpad,
                               idx if with_idx else None))


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    return make_model4(tmp_path_factory, "tiny4-attn")


@pytest.fixture
def as_flash(model4):
    """model4 with the flash path forced on (the twin serves it on the CPU); restored after."""
    def use(impl):
        model4.net.attn_impl = impl
        return model4
    yield use
    model4.net.attn_impl = "sdpa"


def _run(model, **kw):
    res = cee_gen.generate(model, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), **kw)
    return [r.token_ids for r in res], [r.stats["layers_per_token"] for r in res], res[0].stats["attention"]


@pytest.mark.parametrize("ex", [
    None,
    ExitConfig(strategy="static", exit_layer=2),
    ExitConfig(strategy="confidence", threshold=0.5),
    ExitConfig(strategy="hash", hash_method="random"),
    ExitConfig(strategy="entropy", threshold=0.5, kv_fill="copy-kv"),
    ExitConfig(strategy="confidence", threshold=0.5, kv_fill="recompute"),  # per-row slots: SDPA steps
], ids=["full", "static", "confidence", "hash", "entropy-copy-kv", "recompute"])
def test_flash_path_gives_the_sdpa_tokens_and_exit_layers_in_a_padded_batch(as_flash, ex):
    """Prefill of left-padded rows, decode, and exit steps over a subset of the rows (batch_idx)."""
    kw = {} if ex is None else {"exit": ex}
    ids_s, layers_s, attn_s = _run(as_flash("sdpa"), **kw)
    ids_f, layers_f, attn_f = _run(as_flash("flash"), **kw)
    assert (attn_s, attn_f) == ("sdpa", "flash")
    assert ids_f == ids_s
    assert layers_f == layers_s
    if ex is not None and ex.strategy != "static":
        assert len({d for ls in layers_s for d in ls[1:]}) > 1, "every token exited at one layer"


def test_flash_steps_match_sdpa_logits_on_every_real_position(as_flash, monkeypatch):
    """Prefill of a left-padded batch, then a decode step: the real positions' logits agree. Both through
    the layers' modules (the fused CPU layer op, which would serve the SDPA steps, has its own tests)."""
    monkeypatch.setattr(model, "LAYER_ROWS", 0)
    net = as_flash("sdpa").net
    B, T, S = 2, 6, 16
    tokens = torch.randint(3, net.args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    pad = torch.tensor([0, 3])
    out = {}
    for impl in ("sdpa", "flash"):
        net.attn_impl = impl
        cache = StaticKVCache(net.args, B, S, torch.float32, "cpu")
        with torch.inference_mode():
            step = net.make_step(torch.arange(T), pad, S, T)
            assert isinstance(step.attn, Flash) == (impl == "flash")
            pre = net(tokens[:, :T], step, cache)
            dec = net(tokens[:, T:], net.make_step(torch.tensor([T]), pad, S, T + 1), cache)
        out[impl] = pre, dec
    torch.testing.assert_close(out["flash"][0][0], out["sdpa"][0][0])  # row 0: no padding
    torch.testing.assert_close(out["flash"][0][1, 3:], out["sdpa"][0][1, 3:])  # row 1: its real slots
    torch.testing.assert_close(out["flash"][1], out["sdpa"][1])


def test_steps_that_record_gradients_or_have_per_row_slots_use_sdpa(as_flash):
    net = as_flash("flash").net
    pad = torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():
        assert isinstance(net.make_step(torch.arange(4), pad, 8, 4).attn, Flash)
        assert isinstance(net.make_step(torch.tensor([[2, 3], [1, 3]]), pad, 8, 4).attn, Sdpa)
    with torch.enable_grad():  # training: flash_attn_with_kvcache has no backward
        assert isinstance(net.make_step(torch.arange(4), pad, 8, 4).attn, Sdpa)


def test_auto_takes_sdpa_where_flash_cannot_serve_and_flash_asked_for_says_why(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert flash.choose("auto", cpu, torch.float32, 64) == "sdpa"
    assert flash.choose("sdpa", cuda, torch.bfloat16, 64) == "sdpa"
    monkeypatch.setattr(flash, "installed_version", lambda: (2, 7))
    assert flash.choose("auto", cuda, torch.bfloat16, 64) == "flash"
    for dev, dt, hd, words in [(cpu, torch.bfloat16, 64, "CUDA only"),
                               (cuda, torch.float32, 64, "float16 or bfloat16"),
                               (cuda, torch.float16, 100, "multiple of 8")]:
        assert flash.choose("auto", dev, dt, hd) == "sdpa"
        with pytest.raises(CeeGenError, match=words):
            flash.choose("flash", dev, dt, hd)
    monkeypatch.setattr(flash, "installed_version", lambda: (2, 5))
    with pytest.raises(CeeGenError, match=">= 2.6"):
        flash.choose("flash", cuda, torch.bfloat16, 64)
    monkeypatch.setattr(flash, "installed_version", lambda: None)
    with pytest.raises(CeeGenError, match="not installed"):
        flash.choose("flash", cuda, torch.bfloat16, 64)
    with pytest.raises(CeeGenError, match="unknown attention"):
        LoadConfig(attention="xformers").validate()


def test_loaded_model_reports_its_attention(model4):
    [r] = cee_gen.generate(model4, "a b", max_new_tokens=2)
    assert r.stats["attention"] == "sdpa"


def test_cli_attention_flash_on_the_cpu_is_a_one_line_error(tiny_dir, capsys):
    from cee_gen.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--device", "cpu", "--attention", "flash", "hi"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "CUDA only" in err and "attention auto or sdpa" in err


# ---- GPU, flash-attn installed -------------------------------------------------------------------

@needs_flash
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(b=1, T=1, H=32, Hk=32, hd=128, B=1, S=300),  # Llama-2 decode
                                   dict(b=3, T=1, H=32, Hk=8, hd=128, B=4, S=520),  # GQA, subset rows
                                   dict(b=3, T=5, H=9, Hk=3, hd=64, B=3, S=77)],  # prefill-like, odd
                         ids=["mha-decode", "gqa-rows", "odd-prefill"])
def test_flash_attn_matches_the_twin(dtype, shape):
    q, k, v, seqlens, leftpad, idx = attn_case(dtype=dtype, device="cuda", **shape)
    seqlens = torch.tensor([shape["S"], 60, 40][:shape["b"]], dtype=torch.int32, device="cuda")
    bi = idx if shape["b"] < shape["B"] else None
    args = (q, k.transpose(1, 2), v.transpose(1, 2), seqlens, leftpad, bi)
    got = torch.ops.cee_gen.attn_kvcache(*args)
    want = reference.attn_kvcache_ref(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                                        for a in args])
    mine = reference.attn_kvcache_ref(*args)  # PyTorch's own error in this dtype
    err, base = (got.float() - want).abs().max(), (mine.float() - want).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)


@needs_flash
def test_flash_engine_on_cuda_gives_sdpa_tokens(tiny_dir):
    m = cee_gen.load_model(str(tiny_dir), dtype="bfloat16", device="cuda", attention="flash")
    assert m.net.attn_impl == "flash"
    ids_f = [r.token_ids for r in cee_gen.generate(m, PROMPTS, max_new_tokens=8, batch_size=4)]
    m.net.attn_impl = "sdpa"
    ids_s = [r.token_ids for r in cee_gen.generate(m, PROMPTS, max_new_tokens=8, batch_size=4)]
    assert ids_f == ids_s

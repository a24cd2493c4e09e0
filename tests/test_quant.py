"""Quantized decoder layers through bitsandbytes (cee_gen/quant.py), on its CPU backend.

Skipped, saying why, where bitsandbytes is not installed (it is in the dev extra).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import full_logits, make_tiny_checkpoint, run_cli

import cee_gen
from cee_gen.cache import StaticKVCache
from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.exits.heads import ExitHeads
from cee_gen.kv_fill import KVFiller
from cee_gen.model import apply_rope
from cee_gen.weights.lora import LoRA
from cee_gen.weights.quant import dense_weight

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="bitsandbytes is not installed (pip install -e '.[dev]' has it)")
pytestmark = needs_bnb
MODES = ["8bit", "4bit"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-q")
    make_tiny_checkpoint(path, n_layers=3, seed=5)
    return str(path)


@pytest.fixture(scope="module", params=MODES)
def qmodel(request, ckpt):
    return request.param, cee_gen.load_model(ckpt, dtype="float32", device="cpu", quantize=request.param)


def test_quantized_model_computes_with_its_dequantized_weights_and_stays_near_the_original(qmodel, ckpt):
    """The quantized forward equals the original model with each projection's weight replaced by its
    dequantized weight (so the wiring is right), and differs from the original by quantization only."""
    import bitsandbytes as bnb

    mode, model = qmodel
    full = cee_gen.load_model(ckpt, dtype="float32", device="cpu")
    dense = cee_gen.load_model(ckpt, dtype="float32", device="cpu")
    kind = bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit
    for qb, db in zip(model.net.layers, dense.net.layers):
        for part, name in (("attention", "wqkv"), ("attention", "wo"), ("feed_forward", "w13"),
                           ("feed_forward", "w2")):
            qm = getattr(getattr(qb, part), name)
            assert isinstance(qm, kind)
            getattr(getattr(db, part), name).weight.copy_(dense_weight(qm, torch.float32))
    assert type(model.net.output) is torch.nn.Linear  # the LM head stays in the model dtype
    tokens = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    q, d, f = full_logits(model.net, tokens), full_logits(dense.net, tokens), full_logits(full.net, tokens)
    torch.testing.assert_close(q, d, atol=1e-4, rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(q.flatten(0, 1), f.flatten(0, 1), dim=-1).mean()
    assert not torch.equal(q, f) and cos > (0.99 if mode == "8bit" else 0.8), cos  # toy model: NF4 is coarse


def test_kv_fill_projects_with_the_quantized_layers_weights(qmodel):
    """propagate on a quantized model: each skipped layer's K/V is what that layer's own quantized
    projection gives for the normed exit state."""
    _, model = qmodel
    net, a = model.net, model.args
    B, T, e = 1, 4, 1
    tokens = torch.randint(0, a.vocab_size, (B, T), generator=torch.Generator().manual_seed(1))
    cache = StaticKVCache(a, B, 8, torch.float32, "cpu")
    step = net.make_step(torch.arange(T), torch.zeros(B, dtype=torch.long), 8, T)
    with torch.no_grad():
        h = net.forward_layers(net.embed(tokens), 0, e, step, cache)
        KVFiller(net).fill(cache, h, e, step, "propagate")
        q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
        for j in range(e, a.n_layers):
            blk = net.layers[j]
            y = blk.attention.wqkv(blk.attention_norm(h))  # the quantized module itself
            k = apply_rope(y[..., q:q + kv].view(B, T, a.n_kv_heads, a.head_dim), step.cos, step.sin)
            v = y[..., q + kv:].view(B, T, a.n_kv_heads, a.head_dim)
            torch.testing.assert_close(cache.k[j][:, :, :T], k.transpose(1, 2), atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(cache.v[j][:, :, :T], v.transpose(1, 2), atol=2e-4, rtol=2e-4)


def test_dense_weight_dequantizes_near_the_original(qmodel, ckpt):
    mode, model = qmodel
    full = cee_gen.load_model(ckpt, dtype="float32", device="cpu")
    w_q = dense_weight(model.net.layers[1].feed_forward.w2, torch.float32)
    w = full.net.layers[1].feed_forward.w2.weight
    rel = ((w_q - w).norm() / w.norm()).item()
    assert 0 < rel < (0.01 if mode == "8bit" else 0.15), rel


def test_generation_with_exits_and_heads_trained_on_the_full_model(qmodel, ckpt, tmp_path):
    """Heads files match the quantized model (its probe is taken before quantizing)."""
    _, model = qmodel
    full = cee_gen.load_model(ckpt, dtype="float32", device="cpu")
    torch.manual_seed(2)
    heads = ExitHeads(full.net, [1, 2], adapter_rank=2, policy="linear")
    path = heads.save(tmp_path / "h.safetensors", base_name="tiny")
    res = cee_gen.generate(model, ["the quick brown fox"], max_new_tokens=6,
                           exit=ExitConfig(strategy="policy", heads=str(path), threshold=0.5))
    r = res[0]
    assert len(r.token_ids) == 6 and r.stats["quantize"] == qmodel[0]
    assert cee_gen.generate(model, ["a b"], max_new_tokens=3)[0].stats["mean_layers"] == model.n_layers


def test_heads_with_lora_deltas_refuse_quantized_weights(qmodel, ckpt, tmp_path):
    _, model = qmodel
    full = cee_gen.load_model(ckpt, dtype="float32", device="cpu")
    lora = LoRA(full.net.args, 2, ["q", "v"])
    path = ExitHeads(full.net, [1], policy="linear", lora=lora).save(tmp_path / "l.safetensors")
    with pytest.raises(CeeGenError, match="cannot be merged into .*bit weights"):
        cee_gen.generate(model, ["x"], max_new_tokens=2, exit=ExitConfig(strategy="policy", heads=str(path)))


def test_compile_with_quantized_weights_is_a_clear_error(qmodel):
    with pytest.raises(CeeGenError, match="compile does not support"):
        cee_gen.generate(qmodel[1], ["x"], max_new_tokens=2, compile=True)


def test_bad_quantize_and_missing_bitsandbytes_are_clear_errors(ckpt, monkeypatch):
    with pytest.raises(CeeGenError, match="unknown quantize '3bit'"):
        cee_gen.load_model(ckpt, dtype="float32", device="cpu", quantize="3bit")
    import builtins

    real = builtins.__import__

    def no_bnb(name, *a, **kw):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(CeeGenError, match="needs bitsandbytes: pip install"):
        cee_gen.load_model(ckpt, dtype="float32", device="cpu", quantize="4bit")


def test_cli_quantize_flag_reaches_the_model(ckpt, capsys):
    code, out, _ = run_cli(["--model", ckpt, "--dtype", "float32", "--device", "cpu", "--quantize", "8bit",
                            "--max-new-tokens", "3", "--json", "hello"], capsys)
    assert code == 0 and '"quantize": "8bit"' in out
    code, _, err = run_cli(["--model", ckpt, "--quantize", "2bit", "hi"], capsys)
    assert code == 2 and "2bit" in err and "\n" not in err.strip()

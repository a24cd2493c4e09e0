"""KV-cache copy-forward (reference twin): each mode against an independent per-layer computation."""

import pytest
import torch
from conftest import expected_kv, hf_model, ours

from cee_gen.cache import StaticKVCache
from cee_gen.kv_fill import KVFiller

S = 32


def _exit_state(net, a, tokens, e):
    """Run layers [0, e) on tokens (B, T); returns (cache, step, h_exit)."""
    B, T = tokens.shape
    cache = StaticKVCache(a, B, S, torch.float32, "cpu")
    for t in cache.k + cache.v:
        t.fill_(float("nan"))  # poison: every slot the fill should write must be overwritten
    step = net.make_step(torch.arange(T), torch.zeros(B, dtype=torch.long), S, T)
    h = net.forward_layers(net.embed(tokens), 0, e, step, cache)
    return cache, step, h


def _models():
    out = []
    for name in ("gqa_tied", "mha_untied", "attention_bias"):
        cfg, hf = hf_model(name)
        a, net = ours(cfg, hf)
        out.append(pytest.param(a, net, id=name))
    return out


@pytest.mark.parametrize("a, net", _models())
@pytest.mark.parametrize("mode", ["propagate", "propagate-raw"])
@pytest.mark.parametrize("e", [1, 2])
def test_propagate_fill_equals_per_layer_projection_of_exit_state(a, net, mode, e):
    tokens = torch.randint(0, a.vocab_size, (2, 7))
    with torch.no_grad():
        cache, step, h = _exit_state(net, a, tokens, e)
        KVFiller(net).fill(cache, h, e, step, mode)
        for j in range(e, a.n_layers):
            k, v = expected_kv(net.layers[j], a, h, step, norm=mode == "propagate")
            torch.testing.assert_close(cache.k[j][:, :, :7], k, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache.v[j][:, :, :7], v, atol=1e-4, rtol=1e-4)
            assert torch.isnan(cache.k[j][:, :, 7:]).all()  # slots outside the step untouched


def test_copy_kv_repeats_the_exit_layers_kv():
    a, net = ours(*hf_model("gqa_tied"))
    tokens = torch.randint(0, a.vocab_size, (1, 5))
    with torch.no_grad():
        cache, step, h = _exit_state(net, a, tokens, 1)
        KVFiller(net).fill(cache, h, 1, step, "copy-kv")
    for j in range(1, a.n_layers):
        assert torch.equal(cache.k[j][:, :, :5], cache.k[0][:, :, :5])
        assert torch.equal(cache.v[j][:, :, :5], cache.v[0][:, :, :5])


def test_fill_at_full_depth_writes_nothing_and_bad_mode_is_rejected():
    a, net = ours(*hf_model("gqa_tied"))
    tokens = torch.randint(0, a.vocab_size, (1, 3))
    with torch.no_grad():
        cache, step, h = _exit_state(net, a, tokens, a.n_layers)
        before = [t.clone() for t in cache.k]
        KVFiller(net).fill(cache, h, a.n_layers, step)
        assert all(torch.equal(x.nan_to_num(), y.nan_to_num()) for x, y in zip(cache.k, before))
        with pytest.raises(ValueError, match="unknown KV-fill mode"):
            KVFiller(net).fill(cache, h, 1, step, "nope")


def test_a_decoders_kept_filler_follows_weights_changed_in_place():
    """One KVFiller per model, kept between batches; a LoRA delta merged into the weights (in place)
    makes a new one, whose fill is the per-layer projection of the new weights."""
    from cee_gen.engine import Decoder

    a, net = ours(*hf_model("gqa_tied"))
    dec = Decoder(net)
    first = dec.filler()
    assert dec.filler() is first, "kept while the weights stay"
    with torch.no_grad():
        net.layers[1].attention.wqkv.weight[-1] += 0.5  # the last V row of layer 1
        net.layers[-1].attention_norm.weight.mul_(1.5)
    assert dec.filler() is not first
    tokens = torch.randint(0, a.vocab_size, (1, 4))
    with torch.no_grad():
        cache, step, h = _exit_state(net, a, tokens, 1)
        dec.filler().fill(cache, h, 1, step)
        for j in (1, a.n_layers - 1):
            k, v = expected_kv(net.layers[j], a, h, step, norm=True)
            torch.testing.assert_close(cache.k[j][:, :, :4], k, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(cache.v[j][:, :, :4], v, atol=1e-4, rtol=1e-4)

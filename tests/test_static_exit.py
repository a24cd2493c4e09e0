"""Static early exit: every generated token leaves after k layers; skipped layers' KV is filled."""

import json

import pytest
import torch
from conftest import expected_kv, run_cli

import cee_gen
from cee_gen import ExitConfig
from cee_gen.cache import StaticKVCache
from cee_gen.engine import Decoder
from cee_gen.errors import CeeGenError

PROMPTS = ["the quick brown fox", "give three tips", "a b c d e f", "z"]


def test_static_exit_at_full_depth_equals_the_full_model_token_for_token(tiny_model):
    L = tiny_model.n_layers
    full = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16)
    static = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16,
                              exit=ExitConfig(strategy="static", exit_layer=L))
    assert [r.token_ids for r in static] == [r.token_ids for r in full]


def test_static_exit_reports_layers_and_ideal_speedup(tiny_model):
    L = tiny_model.n_layers
    [r] = cee_gen.generate(tiny_model, PROMPTS[0], max_new_tokens=8, chat=False,
                           exit=ExitConfig(strategy="static", exit_layer=1))
    n = len(r.token_ids)
    assert r.stats["layers_per_token"] == [L] + [1] * (n - 1)  # first token comes from the prefill
    assert r.stats["ideal_speedup"] == pytest.approx(L / r.stats["mean_layers"])
    [f] = cee_gen.generate(tiny_model, PROMPTS[0], max_new_tokens=8, chat=False)
    assert f.token_ids != r.token_ids  # exiting after 1 of 3 random layers changes the output


@pytest.mark.parametrize("mode", ["propagate", "propagate-raw", "copy-kv"])
def test_forced_exit_writes_deeper_kv_from_the_exit_state(tiny_model, mode):
    """One decode step exiting after k layers: layers < k hold their own KV, layers >= k the fill."""
    net, a, k = tiny_model.net, tiny_model.args, 1
    pad = torch.zeros(1, dtype=torch.long)
    cache = StaticKVCache(a, 1, 16, torch.float32, "cpu")
    with torch.inference_mode():
        net(torch.tensor([[5, 6, 7]]), net.make_step(torch.arange(3), pad, 16, 3), cache)
        ref = StaticKVCache(a, 1, 16, torch.float32, "cpu")
        for j in range(a.n_layers):
            ref.k[j].copy_(cache.k[j])
            ref.v[j].copy_(cache.v[j])
        Decoder(net).step(cache, torch.tensor([[9]]), 3, pad, depth=k, kv_fill=mode)
        step = net.make_step(torch.tensor([3]), pad, 16, 4)
        h = net.forward_layers(net.embed(torch.tensor([[9]])), 0, k, step, ref)  # independent run
        for j in range(k):
            assert torch.equal(cache.k[j][:, :, 3], ref.k[j][:, :, 3])
        for j in range(k, a.n_layers):
            if mode == "copy-kv":
                ek, ev = ref.k[k - 1][:, :, 3:4], ref.v[k - 1][:, :, 3:4]
            else:
                ek, ev = expected_kv(net.layers[j], a, h, step, norm=mode == "propagate")
            torch.testing.assert_close(cache.k[j][:, :, 3:4], ek, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[j][:, :, 3:4], ev, atol=1e-5, rtol=1e-5)


def test_static_exit_batch_equals_one_by_one(tiny_model):
    ex = ExitConfig(strategy="static", exit_layer=2)
    one = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=12, batch_size=1, exit=ex)
    many = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=12, batch_size=4, exit=ex)
    assert [r.token_ids for r in many] == [r.token_ids for r in one]


@pytest.mark.slow
def test_compiled_static_exit_equals_eager(tiny_model):
    ex = ExitConfig(strategy="static", exit_layer=2)
    eager = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=12, exit=ex)
    comp = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=12, exit=ex, compile=True)
    assert [r.token_ids for r in comp] == [r.token_ids for r in eager]


@pytest.mark.parametrize("ex, words", [
    (ExitConfig(strategy="static"), "needs exit_layer"),
    (ExitConfig(strategy="static", exit_layer=99), "deeper than the model"),
    (ExitConfig(strategy="policy"), "needs trained policy heads and none ship"),
    (ExitConfig(strategy="warp"), "unknown exit strategy"),
    (ExitConfig(strategy="static", exit_layer=1, kv_fill="magic"), "unknown kv_fill"),
])
def test_bad_exit_settings_are_clear_errors(tiny_model, ex, words):
    with pytest.raises(CeeGenError, match=words):
        cee_gen.generate(tiny_model, "hi", exit=ex)


def test_cli_static_exit_reports_layers(tiny_dir, capsys):
    code, out, _ = run_cli(["--model", str(tiny_dir), "--max-new-tokens", "6", "--json", "--exit",
                            "static", "--exit-layer", "1", "--kv-fill", "copy-kv", "the quick"], capsys)
    s = json.loads(out)["stats"]
    assert code == 0 and s["exit"] == "static" and s["kv_fill"] == "copy-kv"
    assert s["layers_per_token"][1:] == [1] * (len(s["layers_per_token"]) - 1)

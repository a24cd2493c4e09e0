"""Deferred propagate fill: the next token that runs a layer writes the exited positions' K/V there.

Against the eager fill (one kv_fill op at the exit), which test_kv_fill checks against a per-layer
computation: the same tokens and exit layers, the same cache values once a deeper token has run the
layer, nothing written before, and nothing but the scratch slot written by padding columns.
"""

from dataclasses import replace

import pytest
import torch
from conftest import PROMPTS, all_strategies, expected_kv
from conftest import ids as _ids

import cee_gen
from cee_gen import CeeGenError, ExitConfig
from cee_gen.cache import StaticKVCache
from cee_gen.engine import BatchTimings, Decoder, ExitRun, ExitStep
from cee_gen.exits.heads import ExitHeads
from cee_gen.exits.strategies import Static
from cee_gen.kv_fill import DeferredFill


def _propagate_strategies(policy_file):
    """The strategies that fill with propagate, and static."""
    return [ex for ex in all_strategies(policy_file) if ex.fill == "propagate"] + [
        ExitConfig(strategy="static", exit_layer=2)]


@pytest.mark.parametrize("batch_size", [1, len(PROMPTS)])
def test_deferred_fill_gives_the_eager_fills_tokens_and_exit_layers(model4, policy_file, batch_size):
    for ex in _propagate_strategies(policy_file):
        eager = cee_gen.generate(model4, PROMPTS, max_new_tokens=20, batch_size=batch_size,
                                 exit=replace(ex, fill_timing="eager"))
        deferred = cee_gen.generate(model4, PROMPTS, max_new_tokens=20, batch_size=batch_size,
                                    exit=replace(ex, fill_timing="deferred"))
        assert _ids(deferred) == _ids(eager), ex
        assert ([r.stats["layers_per_token"] for r in deferred]
                == [r.stats["layers_per_token"] for r in eager]), ex
        assert deferred[0].stats["fill_timing"] == "deferred" and eager[0].stats["fill_timing"] == "eager"
        assert deferred[0].stats["fill_s"] == 0  # the fill runs inside the layers


def test_propagate_defaults_to_the_deferred_fill_and_other_modes_to_eager():
    assert ExitConfig(strategy="policy").deferred
    assert not ExitConfig(strategy="policy", fill_timing="eager").deferred
    assert not ExitConfig(strategy="policy", kv_fill="copy-kv").deferred
    assert not ExitConfig(strategy="cascade", exit_layer=2).deferred  # recompute


@pytest.mark.parametrize("kv_fill", ["copy-kv", "propagate-raw", "recompute"])
def test_deferred_timing_with_another_fill_mode_names_the_fix(kv_fill):
    with pytest.raises(CeeGenError, match="use kv_fill propagate"):
        ExitConfig(strategy="policy", kv_fill=kv_fill, fill_timing="deferred").validate(4)
    with pytest.raises(CeeGenError, match="unknown fill_timing"):
        ExitConfig(strategy="policy", fill_timing="later").validate(4)


def _prefilled(net, a, S=16):
    """Two left-padded rows after a 3-token prefill; every slot from 3 on poisoned with NaN."""
    pad = torch.tensor([0, 1])
    cache = StaticKVCache(a, 2, S, torch.float32, "cpu")
    net(torch.tensor([[5, 6, 7], [0, 8, 9]]), net.make_step(torch.arange(3), pad, S, 3), cache)
    for t in cache.k + cache.v:
        t[:, :, 3:].fill_(float("nan"))
    return cache, pad


def test_a_deeper_token_writes_the_eager_fills_values_and_padding_only_the_scratch_slot(model4):
    """Row 0 exits at layer 1 at slots 3 and 4; row 1 exits at 2 at slot 3, then runs all layers
    at slot 4. Until a token runs a layer, the skipped entries there stay unwritten; the next
    token that runs it writes RMSNorm -> K/V -> RoPE of the exit state. At slot 5 both rows run all
    layers in one step: row 0 carries two fill columns, row 1 none, so row 1's two padding columns
    write the scratch slot and nothing else."""
    net, a, L, S = model4.net, model4.args, model4.n_layers, 16
    with torch.inference_mode():
        cache, pad = _prefilled(net, a, S)
        deferred = DeferredFill(net, 2, S, pad)
        dec, heads, tm = Decoder(net), ExitHeads.logit_lens(net), BatchTimings()
        states = {}
        for slot, plan in ((3, (1, 2)), (4, (1, L)), (5, (L, L))):
            tok = torch.tensor([[11 + slot], [21 + slot]])
            groups = [[0, 1]] if plan == (L, L) else [[0], [1]]  # alone, each at its planned layer
            for rows in groups:
                run = ExitRun(Static(plan[rows[0]], L), heads, "propagate", deferred=True)
                ExitStep(dec, run, deferred, tm)(cache, tok, tok[:, 0].tolist(), slot, pad, rows)
                if plan[rows[0]] < L:
                    states[rows[0], slot] = (plan[rows[0]], deferred.states[rows[0], slot].clone())
            if slot == 4:  # row 0's exited slots: nothing has run their skipped layers yet
                assert deferred.entries == [{3: 1, 4: 1}, {}]
                for s_ in (3, 4):
                    for j in range(1, L):
                        assert torch.isnan(cache.k[j][0, :, s_]).all()
                        assert torch.isnan(cache.v[j][0, :, s_]).all()
        for (r, s_), (e, h) in states.items():
            step = net.make_step(torch.tensor([s_]), pad[r:r + 1], S, s_ + 1)
            for j in range(e, L):
                ek, ev = expected_kv(net.layers[j], a, h.view(1, 1, -1), step, norm=True)
                torch.testing.assert_close(cache.k[j][r:r + 1, :, s_:s_ + 1], ek, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.v[j][r:r + 1, :, s_:s_ + 1], ev, atol=1e-5, rtol=1e-5)
        assert deferred.entries == [{}, {}]  # all written: nothing left to defer
        for j in range(L):
            for t in (cache.k[j], cache.v[j]):
                assert not torch.isnan(t[:, :, 3:6]).any()  # every real slot written ...
                assert torch.isnan(t[:, :, 6:S - 1]).all()  # ... and nothing past them but scratch
                # row 1's padding columns wrote scratch, at the layers that had fill columns
                assert torch.isnan(t[1, :, S - 1]).all() == (j == 0)


def test_uniform_exit_without_a_fill_leaves_the_layers_no_token_runs_unwritten(model4):
    """Static k under compile, deferred: no later token runs layers >= k, so none are filled."""
    net, a, L, S, k = model4.net, model4.args, model4.n_layers, 16, 2
    with torch.inference_mode():
        cache, pad = _prefilled(net, a, S)
        Decoder(net).step(cache, torch.tensor([[11], [12]]), 3, pad, depth=k, kv_fill=None)
    for j in range(L):
        for t in (cache.k[j], cache.v[j]):
            assert torch.isnan(t[:, :, 3]).all() == (j >= k)

"""The training rollout (copy-hidden, norm kept) gives the logits of inference with `propagate`."""

import pytest
import torch
from conftest import make_tiny_checkpoint

import cee_gen
from cee_gen.cache import StaticKVCache
from cee_gen.engine import BatchTimings, Decoder, ExitRun, ExitStep
from cee_gen.exits.heads import ExitHeads
from cee_gen.exits.strategies import Static
from cee_gen.kv_fill import EagerFill, KVFiller
from cee_gen.train.rollout import rollout


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny4r")
    make_tiny_checkpoint(path, n_layers=4, seed=5)
    return cee_gen.load_model(str(path), dtype="float32", device="cpu")


def test_rollout_with_fixed_exits_equals_inference_with_propagate_fill(model4):
    net, L = model4.net, model4.n_layers
    torch.manual_seed(0)
    heads = ExitHeads(net, [1, 2, 3], adapter_rank=4)  # with adapters: the same exit head in both
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    tokens = torch.tensor([[5, 6, 7, 9, 10, 11, 12, 13]])
    P = 3  # prompt: full depth, as in generation
    depth = [L, L, L, 1, 2, L, 1, 3]  # layers each position runs
    want = torch.tensor([depth])
    may_exit = torch.zeros(1, 8, dtype=torch.bool)
    may_exit[0, P:] = True
    with torch.inference_mode():
        exit_layer, h_exit = rollout(net, tokens, [1, 2, 3], may_exit,
                                     lambda layer, hh, running: want == layer)
        assert exit_layer.tolist() == [depth]
        train_logits = [heads.logits(d, h_exit[:, t]) for t, d in enumerate(depth)]

        S = 16
        pad = torch.zeros(1, dtype=torch.long)
        cache = StaticKVCache(model4.args, 1, S, torch.float32, "cpu")
        prefill = net(tokens[:, :P], net.make_step(torch.arange(P), pad, S, P), cache)[0]
        dec = Decoder(net)
        infer_logits = [prefill[t].float()[None] for t in range(P)]
        for t in range(P, 8):
            run = ExitRun(Static(depth[t], L), heads, "propagate")
            tm = BatchTimings()
            out, _ = ExitStep(dec, run, EagerFill(KVFiller(net), "propagate", tm), tm)(
                cache, tokens[:, t:t + 1], [tokens[0, t].item()], t, pad, [0])
            infer_logits.append(out)
    for t in range(8):
        torch.testing.assert_close(train_logits[t], infer_logits[t], atol=1e-4, rtol=1e-4)


def test_rollout_without_exits_is_the_full_model(model4):
    net = model4.net
    tokens = torch.tensor([[5, 6, 7, 9, 10]])
    with torch.inference_mode():
        exit_layer, h = rollout(net, tokens, [1, 2, 3], torch.ones(1, 5, dtype=torch.bool),
                                lambda layer, hh, running: torch.zeros_like(running))
        cache = StaticKVCache(model4.args, 1, 5, torch.float32, "cpu")
        full = net(tokens, net.make_step(torch.arange(5), torch.zeros(1, dtype=torch.long), 5, 5), cache)
    assert (exit_layer == model4.n_layers).all()
    torch.testing.assert_close(net.head(h), full)

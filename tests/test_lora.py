"""LoRA deltas: the training hooks and the load-time merge compute the same model; heads files carry
them, merge them once, and refuse to mix fine-tunes."""

import pytest
import torch
from conftest import full_logits, make_tiny_checkpoint

import cee_gen
from cee_gen.cache import StaticKVCache
from cee_gen.errors import CeeGenError
from cee_gen.exits.heads import ExitHeads, HeadsFileError, load_heads
from cee_gen.weights.lora import TARGETS, LoRA, parse_targets


@pytest.fixture()
def fresh(tmp_path):
    make_tiny_checkpoint(tmp_path / "m", n_layers=3, seed=5)
    load = lambda: cee_gen.load_model(str(tmp_path / "m"), dtype="float32", device="cpu")  # noqa: E731
    return tmp_path, load


def _random_lora(net, targets=TARGETS, seed=0):
    lora = LoRA(net.args, 4, list(targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.B.values():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return lora


@pytest.mark.parametrize("targets", [["q", "v"], list(TARGETS)])
def test_hooked_forward_equals_merged_weights(fresh, targets):
    from cee_gen.ops import cpu

    cpu.load()  # with the small-M kernels serving linear layers, the hooks must still fire
    _, load = fresh
    net = load().net
    tokens = torch.randint(0, net.args.vocab_size, (2, 7))
    base = full_logits(net, tokens)
    lora = _random_lora(net, targets)
    handles = lora.attach(net)
    hooked = full_logits(net, tokens)
    for h in handles:
        h.remove()
    assert (hooked - base).abs().max() > 1e-3  # the deltas do something
    torch.testing.assert_close(full_logits(net, tokens), base)  # removing the hooks restores the base
    lora.merge(net)
    torch.testing.assert_close(full_logits(net, tokens), hooked, atol=1e-4, rtol=1e-4)


def test_new_lora_is_the_base_model_and_only_its_factors_get_gradients(fresh):
    _, load = fresh
    net = load().net.requires_grad_(False)
    tokens = torch.randint(0, net.args.vocab_size, (1, 5))
    base = full_logits(net, tokens)
    lora = LoRA(net.args, 4, ["q", "v"])
    handles = lora.attach(net)
    torch.testing.assert_close(full_logits(net, tokens), base)
    B, T = tokens.shape
    cache = StaticKVCache(net.args, B, T, torch.float32, "cpu")
    step = net.make_step(torch.arange(T), torch.zeros(1, dtype=torch.long), T, T)
    net(tokens, step, cache).sum().backward()
    for h in handles:
        h.remove()
    assert all(p.grad is not None for p in lora.B.values())
    assert all(p.grad is None for p in net.parameters())


def test_heads_file_carries_lora_and_merges_it_once_at_load(fresh):
    tmp, load = fresh
    model = load()
    tokens = torch.randint(0, model.args.vocab_size, (1, 6))
    lora = _random_lora(model.net, ["q", "v", "down"])
    heads = ExitHeads(model.net, [1, 2], adapter_rank=2, policy="linear", lora=lora)
    handles = lora.attach(model.net)
    want = full_logits(model.net, tokens)
    for h in handles:
        h.remove()
    path = heads.save(tmp / "h.safetensors", base_name="tiny")

    fresh_model = load()
    loaded = load_heads(path, fresh_model)
    assert loaded.lora.targets == ["q", "v", "down"]
    got = full_logits(fresh_model.net, tokens)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)  # fp16 factors
    # through the API: loaded once per model, merged once, the fine-tuned model at full depth
    api_model = load()
    for _ in range(2):
        cee_gen.generate(api_model, "the quick", max_new_tokens=2, chat=False,
                         exit=cee_gen.ExitConfig(strategy="full", heads=str(path)))
    torch.testing.assert_close(full_logits(api_model.net, tokens), want, atol=2e-3, rtol=2e-3)


def test_heads_of_another_fine_tune_are_refused_on_a_merged_model(fresh):
    tmp, load = fresh
    model = load()
    a = ExitHeads(model.net, [1], lora=_random_lora(model.net, ["q"], seed=1)).save(tmp / "a.safetensors")
    b = ExitHeads(model.net, [1], lora=_random_lora(model.net, ["q"], seed=2)).save(tmp / "b.safetensors")
    plain = ExitHeads(model.net, [1], adapter_rank=2).save(tmp / "plain.safetensors")
    load_heads(a, model)
    load_heads(a, model)  # the same file again: nothing added twice
    for other in (b, plain):
        with pytest.raises(HeadsFileError, match="already carries the fine-tuned weights"):
            load_heads(other, model)


def test_lora_targets_parse_with_a_clear_error():
    assert parse_targets("v, q") == ["q", "v"]
    with pytest.raises(CeeGenError, match="LoRA targets 'q,x'"):
        parse_targets("q,x")

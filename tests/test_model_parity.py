"""Our Transformer vs HF LlamaForCausalLM / Qwen2ForCausalLM: same logits on the same inputs."""

import pytest
import torch
from conftest import HF_CONFIGS, hf_model, ours

from cee_gen.cache import StaticKVCache
from cee_gen.model import ModelArgs


@pytest.mark.parametrize("name", [*HF_CONFIGS, "qwen2_bias"])
def test_logits_match_hf_on_tiny_random_configs(name):
    cfg, hf = hf_model(name)
    a, net = ours(cfg, hf)
    x = torch.randint(0, cfg.vocab_size, (2, 41))
    with torch.no_grad():
        ref = hf(x).logits
        cache = StaticKVCache(a, 2, 64, torch.float32, "cpu")
        step = net.make_step(torch.arange(41), torch.zeros(2, dtype=torch.long), 64, kv_len=41)
        out = net(x, step, cache)
    err = (out - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"{name}: max abs diff {err}"


def test_incremental_decode_with_cache_matches_full_forward():
    cfg, hf = hf_model("gqa_tied")
    a, net = ours(cfg, hf)
    x = torch.randint(0, cfg.vocab_size, (1, 20))
    pad = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        full = hf(x).logits[0]  # (T, V)
        cache = StaticKVCache(a, 1, 32, torch.float32, "cpu")
        out = [net(x[:, :12], net.make_step(torch.arange(12), pad, 32, 12), cache)[0]]
        for t in range(12, 20):
            step = net.make_step(torch.tensor([t]), pad, 32, t + 1)
            out.append(net(x[:, t:t + 1], step, cache)[0])
    torch.testing.assert_close(torch.cat(out), full, atol=1e-4, rtol=1e-4)


def test_unsupported_rope_scaling_is_a_clear_error():
    from transformers import LlamaConfig

    from cee_gen.errors import CeeGenError

    cfg = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 2048})
    with pytest.raises(CeeGenError, match="yarn"):
        ModelArgs.from_hf_config(cfg)


def test_a_sliding_window_caps_the_context_where_full_attention_is_still_exact():
    """Full attention equals a sliding window's up to the window's length: the model's context is capped
    there (a longer prompt then gets the context error), and a window that is switched off changes nothing."""
    from transformers import MistralConfig, Qwen2Config

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    ctx = lambda cfg: ModelArgs.from_hf_config(cfg).max_position_embeddings  # noqa: E731
    assert ctx(MistralConfig(**small, sliding_window=256)) == 256
    assert ctx(MistralConfig(**small, sliding_window=None)) == 4096
    on = Qwen2Config(**small, use_sliding_window=True, sliding_window=512)
    off = Qwen2Config(**small, use_sliding_window=False, sliding_window=512)
    assert ctx(on) == 512 and ctx(off) == 4096


@pytest.mark.default_model
def test_default_model_logits_match_hf_teacher_forced(default_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    tok = default_model.tokenizer
    ids = tok("Early exit lets easy tokens leave a transformer after a few of its layers, "
              "while hard tokens go all the way through.", return_tensors="pt")["input_ids"]
    T = ids.shape[1]
    with torch.no_grad():
        ref = hf(ids).logits
        cache = StaticKVCache(default_model.args, 1, 64, torch.float32, "cpu")
        step = default_model.net.make_step(torch.arange(T), torch.zeros(1, dtype=torch.long), 64, T)
        out = default_model.net(ids, step, cache)
    assert (out - ref).abs().max().item() < 1e-3
    assert torch.equal(out.argmax(-1), ref.argmax(-1))

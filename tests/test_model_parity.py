"""Our Transformer vs HF LlamaForCausalLM / Qwen2ForCausalLM: same logits on the same inputs."""

import pytest
import torch

from cee_gen.cache import StaticKVCache
from cee_gen.loading import build_transformer
from cee_gen.model import ModelArgs

CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "rope_linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "attention_bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def _hf_model(name):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2)
    if name == "qwen2_bias":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
        hf = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, **CONFIGS[name])
        hf = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.2 * torch.randn_like(p))
    return cfg, hf.eval()


def _ours(cfg, hf):
    a = ModelArgs.from_hf_config(cfg)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    return a, build_transformer(a, sd, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("name", [*CONFIGS, "qwen2_bias"])
def test_logits_match_hf_on_tiny_random_configs(name):
    cfg, hf = _hf_model(name)
    a, net = _ours(cfg, hf)
    x = torch.randint(0, cfg.vocab_size, (2, 41))
    with torch.no_grad():
        ref = hf(x).logits
        cache = StaticKVCache(a, 2, 64, torch.float32, "cpu")
        step = net.make_step(torch.arange(41), torch.zeros(2, dtype=torch.long), 64, kv_len=41)
        out = net(x, step, cache)
    err = (out - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), f"{name}: max abs diff {err}"


def test_incremental_decode_with_cache_matches_full_forward():
    cfg, hf = _hf_model("gqa_tied")
    a, net = _ours(cfg, hf)
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

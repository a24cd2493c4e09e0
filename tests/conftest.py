"""Shared fixtures: tiny random-weight LLaMA checkpoints made on the spot (no hub, no network).

A tiny model (2-3 layers, hidden 64) with its own byte-level BPE tokenizer is saved as an ordinary HF
checkpoint folder, so the whole path a user takes (load_model -> generate -> CLI) runs in
milliseconds. Weights use a large init range so logits are peaked: with near-uniform logits, greedy
comparisons would hinge on float rounding instead of on behaviour.
"""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "give three tips for staying healthy: eat well, sleep, exercise",
    "early exit lets easy tokens leave the network after a few layers",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
] * 20


def make_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def make_tiny_checkpoint(path, *, n_layers=3, n_heads=4, n_kv_heads=2, tie=True, rope_scaling=None,
                         chat_template=CHAT_TEMPLATE, seed=0, max_pos=256):
    """Save a random LlamaForCausalLM + tokenizer as an HF checkpoint folder; returns the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(chat_template)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_pos,
        tie_word_embeddings=tie, rope_scaling=rope_scaling, initializer_range=0.25,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missed norm shows up in the logits
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf


def make_model4(tmp_path_factory, name: str = "tiny4"):
    """Four layers, so tokens can exit at 1, 2 or 3 and differ from row to row."""
    import cee_gen

    path = tmp_path_factory.mktemp(name)
    make_tiny_checkpoint(path, n_layers=4, seed=3)
    return cee_gen.load_model(str(path), dtype="float32", device="cpu")


def make_random_policy_file(model, tmp_path_factory) -> str:
    """Exit heads with random adapters and policies at layers 1..3 of make_model4's model."""
    from cee_gen.exits.heads import ExitHeads

    torch.manual_seed(1)
    h = ExitHeads(model.net, [1, 2, 3], adapter_rank=4, policy="linear")
    with torch.no_grad():
        for p in h.parameters():
            p.normal_(0, 0.5)
    return str(h.save(tmp_path_factory.mktemp("heads") / "h.safetensors", base_name="tiny4"))


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """make_model4's model, one per test module."""
    return make_model4(tmp_path_factory)


@pytest.fixture(scope="module")
def policy_file(model4, tmp_path_factory):
    return make_random_policy_file(model4, tmp_path_factory)


def full_logits(net, tokens):
    """Full-depth fp32 logits (B, T, V) of our Transformer on tokens (B, T), no padding."""
    from cee_gen.cache import StaticKVCache

    B, T = tokens.shape
    cache = StaticKVCache.for_net(net, B, T)
    step = net.make_step(torch.arange(T), torch.zeros(B, dtype=torch.long), T, T)
    with torch.no_grad():
        return net(tokens, step, cache)


def write_instruction_set(path, n: int) -> None:
    """A gzip JSON Lines instruction set (Alpaca's fields) of n rows cut from CORPUS."""
    with gzip.open(path, "wt") as f:
        for i in range(n):
            w = CORPUS[i % 4].split()
            f.write(json.dumps({"id": i, "instruction": " ".join(w[:3]), "input": "",
                                "output": " ".join(w[3:])}) + "\n")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_checkpoint(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import cee_gen

    return cee_gen.load_model(str(tiny_dir), dtype="float32", device="cpu")


def pytest_collection_modifyitems(config, items):
    """Tests on the real default model are slow: the fast suite (-m "not slow") leaves them out."""
    for item in items:
        if item.get_closest_marker("default_model") is not None:
            item.add_marker(pytest.mark.slow)


def default_model_available() -> bool:
    """The default model is used when it is in the cache or can be fetched (CI fetches it once)."""
    return os.environ.get("CEE_GEN_SKIP_DEFAULT_MODEL") != "1"


@pytest.fixture(scope="session")
def default_model():
    if not default_model_available():
        pytest.skip("CEE_GEN_SKIP_DEFAULT_MODEL=1: tests on the real default model are switched off")
    import cee_gen

    return cee_gen.load_model(None, dtype="float32", device="cpu", weights="fp")  # the fp32 reference


# ---- shared by several test files (tests import helpers from here, never from each other) ---------

PROMPTS = ["the quick brown fox", "give three tips", "a b c d e f", "z"]


def all_strategies(policy_file):
    """One ExitConfig per strategy family, and the other KV-fill modes, for make_model4's model."""
    from cee_gen import ExitConfig

    return [
        ExitConfig(strategy="policy", heads=policy_file),
        ExitConfig(strategy="confidence", threshold=0.5),
        ExitConfig(strategy="entropy", threshold=0.5),
        ExitConfig(strategy="patience", patience=1),
        ExitConfig(strategy="saturation", threshold=0.5),
        ExitConfig(strategy="hash", hash_method="random"),
        ExitConfig(strategy="hash", exit_layers="1,3"),
        ExitConfig(strategy="cascade", exit_layer=2, threshold=0.5),
        ExitConfig(strategy="confidence", threshold=0.5, kv_fill="recompute"),
        ExitConfig(strategy="entropy", threshold=0.5, kv_fill="copy-kv"),
        ExitConfig(strategy="patience", patience=1, kv_fill="propagate-raw"),
    ]


def ids(results):
    return [r.token_ids for r in results]


def run_cli(argv, capsys):
    """cee-generate in this process: (exit status, stdout, stderr)."""
    from cee_gen.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def expected_kv(blk, a, h, step, norm: bool):
    """Layer j's K/V for hidden state h, computed the plain way: norm, projection, RoPE."""
    from cee_gen.model import apply_rope

    x = blk.attention_norm(h) if norm else h
    qkv = blk.attention.wqkv(x)
    q_size, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    B, T, _ = h.shape
    k = qkv[..., q_size:q_size + kv].view(B, T, a.n_kv_heads, a.head_dim)
    v = qkv[..., q_size + kv:].view(B, T, a.n_kv_heads, a.head_dim)
    return apply_rope(k, step.cos, step.sin).transpose(1, 2), v.transpose(1, 2)


HF_CONFIGS = {
    "mha_untied": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "rope_linear": dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_llama3": dict(num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "attention_bias": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def hf_model(name):
    """A tiny random HF model (HF_CONFIGS, or "qwen2_bias"), with non-trivial norms and biases."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=256, initializer_range=0.2)
    if name == "qwen2_bias":
        cfg = Qwen2Config(num_key_value_heads=2, **common)
        hf = Qwen2ForCausalLM(cfg)
    else:
        cfg = LlamaConfig(**common, **HF_CONFIGS[name])
        hf = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or "bias" in n:
                p.add_(0.2 * torch.randn_like(p))
    return cfg, hf.eval()


def ours(cfg, hf):
    """(ModelArgs, our Transformer) with hf's weights."""
    from cee_gen.model import ModelArgs
    from cee_gen.weights.loading import build_transformer

    a = ModelArgs.from_hf_config(cfg)
    sd = {k: v.clone() for k, v in hf.state_dict().items()}
    return a, build_transformer(a, sd, torch.float32, torch.device("cpu"))

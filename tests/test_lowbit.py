"""Low-bit weights (weights/lowbit.py): GGUF blocks in the model, every strategy on them, and the default
model's GGUF read in its own blocks giving the fp32 engine's tokens. The kernels themselves are proved
against their twins in test_cpu_ops.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    PROMPTS,
    all_strategies,
    full_logits,
    ids,
    make_random_policy_file,
    make_tiny_checkpoint,
    run_cli,
)

import cee_gen
from cee_gen import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.ops import cpu
from cee_gen.ops.lowbit import FORMATS
from cee_gen.weights import lowbit
from cee_gen.weights.quant import dense_weight


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-lowbit")
    make_tiny_checkpoint(path, n_layers=4, seed=3)
    return str(path)


def _lowbit_and_dense(ckpt: str, fmt: str):
    """The model with `fmt` blocks, and the fp model whose weights are those blocks dequantized."""
    q = cee_gen.load_model(ckpt, device="cpu", weights=fmt)
    d = cee_gen.load_model(ckpt, device="cpu")
    for qb, db in zip(q.net.layers, d.net.layers):
        for part, name in lowbit._PROJECTIONS:
            qm = getattr(getattr(qb, part), name)
            assert isinstance(qm, lowbit.QuantLinear) and qm.fmt == fmt
            getattr(getattr(db, part), name).weight.copy_(dense_weight(qm, torch.float32))
    assert isinstance(q.net.output, lowbit.QuantLinear)
    assert isinstance(q.net.tok_embeddings, lowbit.QuantEmbedding)
    d.net.tok_embeddings.weight.copy_(q.net.output.dense())  # tied: the head is the embedding
    return q, d


@pytest.mark.parametrize("fmt", FORMATS)
def test_lowbit_model_computes_with_its_dequantized_weights(ckpt, fmt, monkeypatch):
    monkeypatch.setattr(cpu, "SMALL_M", 64)  # so that 2 x 70 rows take the chunked-dequantize path
    q, d = _lowbit_and_dense(ckpt, fmt)
    full = cee_gen.load_model(ckpt, device="cpu")
    tokens = torch.randint(0, q.args.vocab_size, (2, 70), generator=torch.Generator().manual_seed(0))
    for T in (1, 9, 70):  # the kernel (up to SMALL_M rows) and the chunked-dequantize path past it
        lq, ld, lf = (full_logits(m.net, tokens[:, :T]) for m in (q, d, full))
        torch.testing.assert_close(lq, ld, atol=2e-4, rtol=1e-4)
        assert (lq - lf).abs().max() > 1e-4  # quantized for real: not the original weights


@pytest.mark.parametrize("fmt", ["q8_0", "q4_1"])
def test_lowbit_greedy_tokens_equal_the_dequantized_fp_model(ckpt, fmt):
    q, d = _lowbit_and_dense(ckpt, fmt)
    for ex in (ExitConfig(), ExitConfig(strategy="static", exit_layer=2),
               ExitConfig(strategy="confidence", threshold=0.5)):
        a = cee_gen.generate(q, PROMPTS, max_new_tokens=12, batch_size=1, exit=ex)
        b = cee_gen.generate(d, PROMPTS, max_new_tokens=12, batch_size=1, exit=ex)
        assert ids(a) == ids(b), ex
        assert [r.stats["layers_per_token"] for r in a] == [r.stats["layers_per_token"] for r in b], ex


def test_every_strategy_runs_on_lowbit_weights_batched_as_one_by_one(ckpt, tmp_path_factory):
    """Heads (made on the fp model), every strategy and KV-fill mode, the cascade, verify mode: on q4_1
    weights, a batch gives each row what it gives alone, and tokens exit at several depths."""
    fp = cee_gen.load_model(ckpt, device="cpu")
    heads = make_random_policy_file(fp, tmp_path_factory)
    model = cee_gen.load_model(ckpt, device="cpu", weights="q4_1")
    cases = all_strategies(heads) + [ExitConfig(strategy="confidence", threshold=0.5, verify=True),
                                     ExitConfig(verify=True, draft="ngram")]
    for ex in cases:
        one = cee_gen.generate(model, PROMPTS, max_new_tokens=14, batch_size=1, exit=ex)
        many = cee_gen.generate(model, PROMPTS, max_new_tokens=14, batch_size=len(PROMPTS), exit=ex)
        assert ids(many) == ids(one), ex
        if not ex.verify and ex.strategy != "full":
            depths = {x for r in many for x in r.stats["layers_per_token"][1:]}
            assert len(depths) > 1, f"{ex}: every token exited at one depth; the test proves nothing"
        assert all(r.stats["weights_format"] == "q4_1" for r in many)


def test_verify_mode_on_lowbit_weights_equals_their_full_depth(ckpt):
    model = cee_gen.load_model(ckpt, device="cpu", weights="q8_0")
    full = cee_gen.generate(model, PROMPTS, max_new_tokens=16, batch_size=2)
    ver = cee_gen.generate(model, PROMPTS, max_new_tokens=16, batch_size=2,
                           exit=ExitConfig(strategy="entropy", threshold=0.5, verify=True))
    assert ids(ver) == ids(full)


def test_lora_heads_on_lowbit_weights_apply_the_deltas_beside_the_blocks(ckpt):
    """A heads file's LoRA cannot go into blocks: it is kept as low-rank terms, and the layer computes
    the blocks' product plus the delta, as the fp model with the delta merged does (up to rounding)."""
    from cee_gen.weights.lora import LoRA

    q, d = _lowbit_and_dense(ckpt, "q8_0")
    lora = LoRA(q.args, rank=2, targets=("q", "v"))
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.3)
    lora.merge(q.net)
    lora.merge(d.net)
    assert all(len(b.attention.wqkv.lowrank) == 2 for b in q.net.layers)
    tokens = torch.randint(0, q.args.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(full_logits(q.net, tokens), full_logits(d.net, tokens), atol=3e-4, rtol=1e-4)
    torch.testing.assert_close(dense_weight(q.net.layers[0].attention.wqkv, torch.float32),
                               d.net.layers[0].attention.wqkv.weight, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_decode_on_lowbit_weights_gives_the_eager_tokens(ckpt):
    model = cee_gen.load_model(ckpt, device="cpu", weights="q4_0")
    for ex in (ExitConfig(), ExitConfig(strategy="confidence", threshold=0.5)):
        eager = cee_gen.generate(model, PROMPTS, max_new_tokens=10, batch_size=2, exit=ex)
        comp = cee_gen.generate(model, PROMPTS, max_new_tokens=10, batch_size=2, exit=ex, compile=True)
        assert ids(comp) == ids(eager), ex


def test_heads_made_on_fp_weights_load_on_quantized_ones(ckpt, tmp_path_factory):
    """The heads' base probe is taken before quantizing, so heads trained on the fp model still match."""
    fp = cee_gen.load_model(ckpt, device="cpu")
    heads = make_random_policy_file(fp, tmp_path_factory)
    q = cee_gen.load_model(ckpt, device="cpu", weights="q4_1")
    res = cee_gen.generate(q, "the quick", max_new_tokens=4, exit=ExitConfig(strategy="policy", heads=heads))
    assert res[0].stats["exit"] == "policy"


def test_bad_combinations_are_one_line_errors(ckpt):
    with pytest.raises(CeeGenError, match="two quantizations"):
        cee_gen.load_model(ckpt, device="cpu", weights="q8_0", quantize="8bit")
    with pytest.raises(CeeGenError, match="computes in float32"):
        cee_gen.load_model(ckpt, device="cpu", weights="q8_0", dtype="bfloat16")
    with pytest.raises(CeeGenError, match="is not a .gguf file"):
        cee_gen.load_model(ckpt, device="cpu", weights="gguf")
    with pytest.raises(CeeGenError, match="weights must be one of|weights"):
        cee_gen.load_model(ckpt, device="cpu", weights="q5_k")


def test_quantizing_a_model_whose_rows_do_not_split_into_blocks_names_the_tensor(tmp_path):
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(CeeGenError, match=r"layers\.0\.attention\.wqkv\.weight .* blocks of 32"):
        cee_gen.load_model(str(tmp_path), device="cpu", weights="q4_0")


def test_cli_weights_flag_reaches_the_model_and_the_json(ckpt, capsys):
    code, out, err = run_cli(["--model", ckpt, "--weights", "q8_0", "--max-new-tokens", "3", "--json",
                              "the quick"], capsys)
    assert code == 0, err
    assert json.loads(out)["stats"]["weights_format"] == "q8_0"
    code, out, err = run_cli(["--model", ckpt, "--weights", "q8_0", "--quantize", "4bit", "hi"], capsys)
    assert code != 0 and "two quantizations" in err and "Traceback" not in err


def test_auto_weights_reads_blocks_only_where_they_serve(ckpt, tmp_path, capsys):
    from cee_gen.weights.loading import auto_weights

    cpu_ = torch.device("cpu")
    assert cee_gen.load_model(ckpt, device="cpu").weights.lowbit is None  # an HF checkpoint: its floats
    assert auto_weights(None, "auto", cpu_, "8bit", None) == "fp"  # bitsandbytes
    assert auto_weights(None, "bfloat16", cpu_, "none", None) == "fp"
    assert auto_weights(None, "auto", None, "none", "cpu=2,cpu=2") == "fp"  # a device map
    assert auto_weights(ckpt, "auto", cpu_, "none", None) == "fp"
    import gguf
    import numpy as np

    path = tmp_path / "q5.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q5_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q5_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert auto_weights(str(path), "auto", cpu_, "none", None) == "fp"
    err = capsys.readouterr().err
    assert "Q5_0 blocks" in err and "weights fp" in err


# ---- the default model's GGUF, read in its own blocks ----


@pytest.mark.default_model
def test_the_default_model_loads_in_its_gguf_blocks_by_default():
    m = cee_gen.load_model(None, device="cpu")
    assert m.weights.lowbit == "gguf q4_1+q8_0"


@pytest.fixture(scope="module")
def gguf_model(default_model):
    return cee_gen.load_model(None, device="cpu", weights="gguf")


@pytest.mark.default_model
def test_default_gguf_blocks_are_exactly_the_fp32_weights(gguf_model, default_model):
    """Q4_1 layers and the Q8_0 embedding, dequantized, are bit for bit the fp32 checkpoint's weights
    (transformers' dequantization of the same file); so the probe matches and the shipped heads load."""
    assert gguf_model.weights.lowbit == "gguf q4_1+q8_0"
    sd = default_model.net.state_dict()
    for name, mod in gguf_model.net.named_modules():
        if isinstance(mod, lowbit.QuantLinear):
            assert torch.equal(mod.dense(), sd[f"{name}.weight"]), name
    rows = torch.tensor([0, 7, 49151])
    assert torch.equal(gguf_model.net.tok_embeddings(rows), sd["tok_embeddings.weight"][rows])
    assert not any(p.dtype == torch.float32 and p.numel() > 10**6 for p in gguf_model.net.parameters())


@pytest.mark.default_model
def test_default_gguf_greedy_tokens_equal_the_fp32_engine(gguf_model, default_model):
    prompts = ["Give three tips for staying healthy.",
               "Describe Paris, the capital of France, in a paragraph.",
               "Write a haiku about the sea.", "Explain photosynthesis to a child.",
               "List five prime numbers and say why each is prime."]
    ref = cee_gen.generate(default_model, prompts, max_new_tokens=64, batch_size=5)
    got = cee_gen.generate(gguf_model, prompts, max_new_tokens=64, batch_size=5)
    assert ids(got) == ids(ref)
    assert sum(len(r.token_ids) for r in got) >= 250  # long outputs: room for the fp sums to diverge


@pytest.mark.default_model
def test_default_gguf_logits_are_the_fp32_engines_bit_for_bit(gguf_model, default_model):
    """The same weights, and kernels that sum in the same order whatever the format (csrc/cpu/): a
    prefill of up to LAYER_ROWS tokens and the decode steps after it give identical logits, not close
    ones, which is why the greedy tokens can be identical over any length."""
    from cee_gen.engine import Decoder

    tokens = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    out = []
    for m in (gguf_model, default_model):
        dec = Decoder(m.net)
        cache = dec.new_cache(2, 64)
        pad = torch.tensor([0, 5])
        with torch.inference_mode():
            pre = m.net(tokens[:, :36], m.net.make_step(torch.arange(36), pad, 64, 36), cache)
            steps = [dec.step(cache, tokens[:, t:t + 1], t, pad) for t in range(36, 40)]
        out.append((pre, *steps))
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.default_model
def test_shipped_policy_heads_run_on_the_gguf_blocks(gguf_model):
    res = cee_gen.generate(gguf_model, "Give three tips for staying healthy.", max_new_tokens=24,
                           exit=ExitConfig(strategy="policy", threshold=0.05))
    assert res[0].stats["weights_format"] == "gguf q4_1+q8_0"
    assert res[0].stats["mean_layers"] < 30

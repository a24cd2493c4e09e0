"""generate(): greedy parity with HF, batching, seeded sampling, stop strings, stats."""

import pytest
import torch

import cee_gen
from cee_gen.generate import encode_prompt

PROMPTS = [
    "the quick brown fox",
    "give three tips for staying healthy",
    "a b c",
    "early exit lets easy tokens leave the network after a few layers of the quick brown dog",
    "z",
]

DEFAULT_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France, and what is it famous for?",
    "Write a haiku about autumn leaves falling in a quiet forest at dusk.",
    "Explain in one paragraph why the sky is blue, for a ten-year-old who loves asking questions "
    "about nature and science, and who has just come back from a long walk on a sunny day.",
    "Hi",
]


def _hf_greedy(hf, ids, n, eos):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
    return out[0, len(ids):].tolist()


def test_greedy_matches_hf_generate_token_for_token_on_tiny_model(tiny_model, tiny_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    results = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=24, chat=False, batch_size=1)
    for p, r in zip(PROMPTS, results):
        ref = _hf_greedy(hf, r.prompt_token_ids, 24, tiny_model.eos_token_ids)
        assert r.token_ids == ref, p


def test_batched_output_equals_one_by_one(tiny_model):
    one = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=20, batch_size=1)
    many = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=20, batch_size=len(PROMPTS))
    assert [r.token_ids for r in many] == [r.token_ids for r in one]
    assert len({len(r.prompt_token_ids) for r in many}) > 1  # the batch really was left-padded
    assert all(r.stats["batch_size"] == len(PROMPTS) for r in many)


def test_greedy_is_deterministic(tiny_model):
    a = cee_gen.generate(tiny_model, PROMPTS[:2], max_new_tokens=16)
    b = cee_gen.generate(tiny_model, PROMPTS[:2], max_new_tokens=16)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny_model):
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    a = cee_gen.generate(tiny_model, PROMPTS, seed=7, **kw)
    b = cee_gen.generate(tiny_model, PROMPTS, seed=7, **kw)
    c = cee_gen.generate(tiny_model, PROMPTS, seed=8, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_top_k_1_sampling_equals_greedy(tiny_model):
    s = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16, do_sample=True, top_k=1, seed=3)
    g = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in s] == [r.token_ids for r in g]


def test_repetition_penalty_matches_hf(tiny_model, tiny_dir):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    [r] = cee_gen.generate(tiny_model, PROMPTS[1], max_new_tokens=24, repetition_penalty=1.3)
    ids = r.prompt_token_ids
    out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                      repetition_penalty=1.3, eos_token_id=tiny_model.eos_token_ids,
                      pad_token_id=tiny_model.pad_token_id)
    assert r.token_ids == out[0, len(ids):].tolist()
    [plain] = cee_gen.generate(tiny_model, PROMPTS[1], max_new_tokens=24)
    assert plain.token_ids != r.token_ids  # the penalty changed something


def test_stop_string_ends_generation_and_is_cut_from_text(tiny_model):
    [full] = cee_gen.generate(tiny_model, PROMPTS[0], max_new_tokens=30, chat=False)
    assert len(full.text) > 6
    stop = full.text[3:6]
    [r] = cee_gen.generate(tiny_model, PROMPTS[0], max_new_tokens=30, chat=False, stop=[stop])
    assert r.finish_reason == "stop" and stop not in r.text
    assert full.text.startswith(r.text) and len(r.token_ids) < len(full.token_ids)


def test_stream_callback_reassembles_the_text(tiny_model):
    pieces = {}
    res = cee_gen.generate(tiny_model, PROMPTS[:3], max_new_tokens=20,
                           stream=lambda i, d: pieces.setdefault(i, []).append(d))
    for i, r in enumerate(res):
        assert "".join(pieces.get(i, [])) == r.text


def test_chat_template_is_applied_by_default_and_raw_skips_it(tiny_model):
    tok = tiny_model.tokenizer
    chat = encode_prompt(tiny_model, "hello", None)
    raw = encode_prompt(tiny_model, "hello", False)
    assert raw == tok("hello")["input_ids"]
    assert chat[0] == tok.convert_tokens_to_ids("<|im_start|>") and len(chat) > len(raw)


def test_stats_report_timings_and_full_depth(tiny_model):
    [r] = cee_gen.generate(tiny_model, PROMPTS[0], max_new_tokens=10, chat=False)
    s = r.stats
    for k in ("prefill_s", "decode_s", "tokens_per_s", "decode_tokens_per_s", "layers_per_token"):
        assert k in s
    assert s["prefill_s"] > 0 and s["tokens_per_s"] > 0
    assert s["layers_per_token"] == [tiny_model.n_layers] * len(r.token_ids)
    assert s["generated_tokens"] == len(r.token_ids)


def test_generation_stops_at_the_context_limit(tiny_dir, tmp_path):
    from conftest import make_tiny_checkpoint

    make_tiny_checkpoint(tmp_path, max_pos=40)
    m = cee_gen.load_model(str(tmp_path), dtype="float32", device="cpu")
    [r] = cee_gen.generate(m, "a b c d e f", max_new_tokens=100, chat=False)
    assert len(r.prompt_token_ids) + len(r.token_ids) <= 40


def test_cache_is_written_in_place_with_explicit_lengths(tiny_model):
    from cee_gen.cache import StaticKVCache
    from cee_gen.engine import Decoder

    net, a = tiny_model.net, tiny_model.args
    cache = StaticKVCache(a, 1, 64, torch.float32, "cpu")
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    dec = Decoder(net)
    pad = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        net(torch.tensor([[5, 6, 7]]), net.make_step(torch.arange(3), pad, 64, 3), cache)
        cache.advance(0, a.n_layers, 3)
        for i in range(4):
            dec.step(cache, torch.tensor([[9]]), 3 + i, pad)
            cache.advance(0, a.n_layers, 1)
    assert cache.filled == [7] * a.n_layers
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs  # never reallocated or grown
    assert all(t[:, :, 7:].abs().sum() == 0 for t in cache.k)  # nothing written past the fill


@pytest.mark.default_model
def test_default_model_greedy_matches_hf_generate_token_for_token(default_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model.path, dtype=torch.float32).eval()
    results = cee_gen.generate(default_model, DEFAULT_PROMPTS, max_new_tokens=48, batch_size=1)
    lengths = {len(r.prompt_token_ids) for r in results}
    assert len(lengths) == len(DEFAULT_PROMPTS)  # prompts of different lengths
    for p, r in zip(DEFAULT_PROMPTS, results):
        ref = _hf_greedy(hf, r.prompt_token_ids, 48, default_model.eos_token_ids)
        assert r.token_ids == ref, p


@pytest.mark.default_model
def test_default_model_batch_equals_one_by_one(default_model):
    one = cee_gen.generate(default_model, DEFAULT_PROMPTS, max_new_tokens=32, batch_size=1)
    many = cee_gen.generate(default_model, DEFAULT_PROMPTS, max_new_tokens=32, batch_size=5)
    assert [r.token_ids for r in many] == [r.token_ids for r in one]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_decode_step_gives_the_same_tokens_as_eager(tiny_model, mode, capsys):
    """The compiled step (matmuls as fused multiply-sums) changes summation order, not results.
    reduce-overhead takes its CUDA-graph path (static cache, step marks, copied logits) on the CPU
    too, where torch records no graphs: this checks that path's plumbing; a GPU run its graphs."""
    tiny_model.decoders.pop((True, mode), None)  # the shared model may hold one from an earlier test
    eager = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16, batch_size=2)
    compiled = cee_gen.generate(tiny_model, PROMPTS, max_new_tokens=16, batch_size=2, compile=True,
                                compile_mode=mode)
    assert [r.token_ids for r in compiled] == [r.token_ids for r in eager]
    assert compiled[0].stats["compile_s"] > 0  # the first call really compiled
    assert tiny_model.decoders[(True, mode)].graphs == (mode == "reduce-overhead")
    err = capsys.readouterr().err
    assert err.count("cee-gen: compiling the decode step (once per process") == 1  # said once, up front
    cee_gen.generate(tiny_model, PROMPTS[:1], max_new_tokens=2, compile=True, compile_mode=mode)
    assert "compiling" not in capsys.readouterr().err


def test_linear_as_multiply_sum_matches_nn_linear():
    from cee_gen.model import multiply_sum

    torch.manual_seed(0)
    mod = torch.nn.Linear(37, 19, bias=True)
    x = torch.randn(3, 1, 37)
    torch.testing.assert_close(multiply_sum(x, mod.weight, mod.bias), mod(x), atol=1e-5, rtol=1e-5)


def test_compile_time_is_counted_once_however_deeply_clocks_nest(tiny_model):
    from cee_gen.engine import Decoder

    dec = Decoder(tiny_model.net)
    dec.compiled, spent = True, [0.0]  # a clock reads torch's compile counter only when compiled
    dec.compile_seconds = lambda: spent[0]
    with dec.compile_clock() as outer:
        spent[0] += 2.0  # compiling outside any inner block
        with dec.compile_clock() as inner:
            spent[0] += 3.0  # and inside one
    assert (inner.seconds, outer.seconds, dec.compile_s) == (3.0, 5.0, 5.0)
    with dec.compile_clock():
        spent[0] += 1.0
    assert dec.compile_s == 6.0

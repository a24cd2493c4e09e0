"""transformers' `model.generate(custom_generate=cee_gen.hf.CUSTOM_GENERATE, trust_remote_code=True)`
gives what our own generate gives on the same weights: full depth, early exit, verify mode; and it
honours max_new_tokens, eos, stopping criteria and streamers as transformers' generate does."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, make_random_policy_file, make_tiny_checkpoint, make_tokenizer

import cee_gen
import cee_gen.hf
from cee_gen import ExitConfig
from cee_gen.errors import CeeGenError


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    hf = make_tiny_checkpoint(path, n_layers=4, seed=3)
    ours = cee_gen.load_model(str(path), device="cpu")
    return hf, ours


def hf_generate(hf, ids, **kw):
    x = torch.tensor([ids])
    out = hf.generate(x, attention_mask=torch.ones_like(x), custom_generate=cee_gen.hf.CUSTOM_GENERATE,
                      trust_remote_code=True, do_sample=False, **kw)
    return out[0, len(ids):].tolist()


def same_tokens_as_ours(hf, ours, settings) -> dict[str, list]:
    """custom_generate on `hf` gives our generate()'s tokens for every setting and prompt (greedy, 10 new
    tokens); its outputs, by str(setting)."""
    outputs = {}
    for ex in settings:
        for p in PROMPTS:
            ids = ours.tokenizer(p)["input_ids"]
            [ref] = cee_gen.generate(ours, p, max_new_tokens=10, chat=False, exit=ex)
            got = hf_generate(hf, ids, max_new_tokens=10, exit=ex, eos_token_id=ours.eos_token_ids)
            assert got[:len(ref.token_ids)] == ref.token_ids, (ex, p)
            assert len(got) == len(ref.token_ids)  # nothing past an EOS but padding: here, none
            outputs.setdefault(str(ex), []).append(got)
    return outputs


def test_custom_generate_gives_our_tokens_for_each_exit_setting(pair, tmp_path_factory):
    hf, ours = pair
    heads = make_random_policy_file(ours, tmp_path_factory)
    settings = [None, ExitConfig(strategy="confidence", threshold=0.5),
                ExitConfig(strategy="policy", heads=heads, threshold=0.5),
                ExitConfig(verify=True, draft="ngram")]
    outputs = same_tokens_as_ours(hf, ours, settings)
    # the exits change tokens here, so transformers' own decoding could not have passed this test
    assert outputs[str(settings[1])] != outputs[str(None)] and outputs[str(settings[2])] != outputs[str(None)]


def test_batches_keep_left_padding_and_pad_finished_rows(pair):
    hf, ours = pair
    tok = ours.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    T = max(map(len, ids))
    x = torch.tensor([[0] * (T - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (T - len(i)) + [1] * len(i) for i in ids])
    out = hf.generate(x, attention_mask=mask, custom_generate=cee_gen.hf.CUSTOM_GENERATE,
                      trust_remote_code=True, max_new_tokens=6, do_sample=False,
                      exit=ExitConfig(strategy="entropy", threshold=0.5))
    assert torch.equal(out[:, :T], x)
    ref = cee_gen.generate(ours, PROMPTS[:2], max_new_tokens=6, chat=False,
                           exit=ExitConfig(strategy="entropy", threshold=0.5))
    for b, r in enumerate(ref):
        assert out[b, T:T + len(r.token_ids)].tolist() == r.token_ids


def test_stopping_criteria_and_streamers_are_honoured(pair):
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    hf, ours = pair
    ids = ours.tokenizer(PROMPTS[0])["input_ids"]
    full = hf_generate(hf, ids, max_new_tokens=10)
    stop_at = full[3]

    class StopOn(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return input_ids[:, -1] == stop_at

    got = hf_generate(hf, ids, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopOn()]))
    assert got == full[:full.index(stop_at) + 1]

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    s = Collect()
    got = hf_generate(hf, ids, max_new_tokens=5, streamer=s)
    assert s.puts[0] == [ids] and [p[0] for p in s.puts[1:]] == got and s.ended


def test_what_it_cannot_honour_is_refused(pair):
    hf, ours = pair
    ids = ours.tokenizer(PROMPTS[0])["input_ids"]
    with pytest.raises(CeeGenError, match="num_beams"):
        hf_generate(hf, ids, max_new_tokens=3, num_beams=2)


@pytest.fixture(scope="module")
def qwen2_pair(tmp_path_factory):
    """A tiny random Qwen2ForCausalLM (GQA, q/k/v biases, untied LM head) saved with the tiny tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    tok = make_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.25, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(4)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2 starts its biases at zero: make them count, and the norms too
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "bias" in name:
                p.copy_(0.5 * torch.randn_like(p))
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return hf, cee_gen.load_model(str(path), device="cpu")


def test_custom_generate_on_qwen2_gives_our_tokens_at_full_depth_and_with_exits(qwen2_pair):
    hf, ours = qwen2_pair
    assert ours.args.qkv_bias and not ours.args.o_bias and ours.args.n_kv_heads == 2
    settings = [None, ExitConfig(strategy="confidence", threshold=0.5),
                ExitConfig(strategy="static", exit_layer=2)]
    outputs = same_tokens_as_ours(hf, ours, settings)
    for p, got in zip(PROMPTS, outputs[str(None)]):  # our full depth is transformers' own greedy decoding
        x = torch.tensor([ours.tokenizer(p)["input_ids"]])
        own = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                          eos_token_id=ours.eos_token_ids)
        assert own[0, x.shape[1]:].tolist() == got, p
    assert all(outputs[str(ex)] != outputs[str(None)] for ex in settings[1:])

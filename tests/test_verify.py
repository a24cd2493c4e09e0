"""Verify mode: drafts (prompt n-grams, early exits) checked by one batched full-model pass give exactly
the full model's output: greedy token for token, sampling in distribution."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, make_tiny_checkpoint, run_cli

import cee_gen
from cee_gen import CeeGenError, ExitConfig
from cee_gen.config import GenerationConfig
from cee_gen.engine.verify import NgramIndex, Pacer, Verifier
from cee_gen.sampling import accept

# repeated phrases give prompt lookup something to match
COPY_PROMPTS = ["the quick brown fox jumps over the lazy dog the quick brown fox jumps",
                "a b c d e f g a b c d e f g a b c", *PROMPTS]


def _decided(policy_file):
    """Every decided and planned strategy, as a draft source."""
    return [
        dict(strategy="policy", heads=policy_file),
        dict(strategy="confidence", threshold=0.5),
        dict(strategy="entropy", threshold=0.5),
        dict(strategy="patience", patience=1),
        dict(strategy="saturation", threshold=0.5),
        dict(strategy="hash", hash_method="random"),
        dict(strategy="static", exit_layer=2),
        dict(strategy="cascade", exit_layer=2, threshold=0.5),
        dict(strategy="confidence", threshold=0.5, fill_timing="eager"),
        dict(strategy="entropy", threshold=0.5, kv_fill="copy-kv"),
    ]


def _ids(results):
    return [r.token_ids for r in results]


@pytest.fixture(scope="module")
def full4(model4):
    """The full model's greedy output on COPY_PROMPTS, the reference for every verify run."""
    return _ids(cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=20, batch_size=len(COPY_PROMPTS)))


@pytest.mark.parametrize("batch_size", [1, len(COPY_PROMPTS)])
def test_greedy_verify_equals_full_depth_for_every_draft_source_and_strategy(model4, policy_file, full4,
                                                                            batch_size):
    cases = [dict(strategy="full", verify=True, draft="ngram"), dict(strategy="full", verify=True)]
    for ex in _decided(policy_file):
        cases += [dict(ex, verify=True, draft="exit"), dict(ex, verify=True, draft="auto")]
    accepted = 0
    for ex in cases:
        res = cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=20, batch_size=batch_size,
                               exit=ExitConfig(**ex))
        assert _ids(res) == full4, ex
        stats = _batch_stats(res)
        accepted += sum(v["accepted"]["exit"] for v in stats)
        if ex.get("draft") == "exit":
            assert sum(v["proposed"]["exit"] for v in stats) > 0, f"{ex}: drafted nothing"
    assert accepted > 0, "no exit draft was ever accepted: the test proves little"


def _batch_stats(results) -> list[dict]:
    """Each batch's verify stats once (the rows of a batch share them)."""
    return list({id(r.stats["verify"]): r.stats["verify"] for r in results}.values())


@pytest.fixture(scope="module")
def cycling(tmp_path_factory):
    """A tiny model whose greedy output soon cycles, so prompt lookup's drafts get accepted: its LM
    head maps each token to a successor (cycles of 4), its layers add a little on top (attention
    still matters, just not enough to break the cycles)."""
    path = tmp_path_factory.mktemp("cycling")
    hf = make_tiny_checkpoint(path, n_layers=3, tie=False, seed=4)
    V = hf.config.vocab_size
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    succ = torch.empty(V, dtype=torch.long)
    for i in range(0, V, 4):
        c = perm[i:i + 4]
        for j in range(len(c)):
            succ[c[j]] = c[(j + 1) % len(c)]
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.03)
            layer.mlp.down_proj.weight.mul_(0.03)
        w = torch.zeros_like(hf.lm_head.weight)
        w[succ] = 4.0 * hf.model.embed_tokens.weight
        hf.lm_head.weight.copy_(w)
    hf.save_pretrained(path)
    model = cee_gen.load_model(str(path), dtype="float32", device="cpu")
    return model


@pytest.mark.parametrize("batch_size", [1, 3])
def test_accepted_ngram_drafts_give_the_full_models_tokens(cycling, batch_size):
    prompts = ["the quick brown fox jumps", "a b c d e f g a b c", "give three tips"]
    full = cee_gen.generate(cycling, prompts, max_new_tokens=24, batch_size=3)
    for ex in (ExitConfig(verify=True, draft="ngram"), ExitConfig(verify=True, max_draft=3),
               ExitConfig(strategy="confidence", threshold=0.5, verify=True, draft="auto")):
        got = cee_gen.generate(cycling, prompts, max_new_tokens=24, batch_size=batch_size, exit=ex)
        assert _ids(got) == _ids(full), ex
        stats = _batch_stats(got)
        assert sum(v["accepted"]["ngram"] for v in stats) > 10, ex
        assert all(v["tokens_per_pass"] > 1.3 for v in stats), ex


@pytest.mark.parametrize("draft", ["exit", "auto"])
def test_batched_verify_equals_one_by_one_with_rows_accepting_different_counts(model4, cycling, draft):
    for model in (model4, cycling):
        ex = ExitConfig(strategy="confidence", threshold=0.5, verify=True, draft=draft)
        one = cee_gen.generate(model, COPY_PROMPTS, max_new_tokens=20, batch_size=1, exit=ex)
        many = cee_gen.generate(model, COPY_PROMPTS, max_new_tokens=20, batch_size=len(COPY_PROMPTS), exit=ex)
        assert _ids(many) == _ids(one)
    # the draft lengths follow measured times and acceptance, so only the tokens must be equal; the
    # rows did go their own ways
    assert len({tuple(r.stats["token_sources"]) for r in many}) > 1


def test_rejected_drafts_leave_no_trace_in_the_cache(model4, policy_file, full4, monkeypatch):
    """After every pass, every slot from each row's next token on (rejected drafts' K/V, the scratch
    slot) is overwritten with huge values: were any of them read, the tokens would change."""
    rounds = []
    orig = Verifier._round

    def poisoned(self, alive):
        orig(self, alive)
        for b in range(len(self.pos)):
            for t in self.batch.cache.k + self.batch.cache.v:
                t[b, :, self.pos[b]:] = 1e4
        rounds.append(1)

    monkeypatch.setattr(Verifier, "_round", poisoned)
    for ex in (dict(strategy="full", verify=True, draft="ngram"),
               dict(strategy="policy", heads=policy_file, verify=True, draft="exit"),
               dict(strategy="confidence", threshold=0.5, verify=True, draft="exit")):
        res = cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=20, batch_size=len(COPY_PROMPTS),
                               exit=ExitConfig(**ex))
        assert _ids(res) == full4, ex
        v = res[0].stats["verify"]
        src = ex["draft"]
        assert v["proposed"][src] > v["accepted"][src], f"{ex}: no draft was rejected: nothing to poison"
    assert rounds
    # and the poison does reach what a wrong read would see: poisoning the slots *before* each row's
    # next token (its accepted context) changes the output
    def wrong(self, alive):
        orig(self, alive)
        for b in range(len(self.pos)):
            for t in self.batch.cache.k + self.batch.cache.v:
                t[b, :, self.pos[b] - 1] = 1e4

    monkeypatch.setattr(Verifier, "_round", wrong)
    res = cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=20, batch_size=len(COPY_PROMPTS),
                           exit=ExitConfig(verify=True, draft="ngram"))
    assert _ids(res) != full4


def test_ngram_index_proposes_what_followed_the_most_recent_longest_match():
    idx = NgramIndex([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], n_max=3)
    assert idx.draft(3) == [7, 8, 5]  # "2 3" last seen before 7 8 5 (longest match: n = 2)
    idx.append(7)
    assert idx.draft(2) == [8, 5]  # now "2 3 7" matches with n = 3
    assert NgramIndex([4, 5, 6], n_max=3).draft(4) == []
    assert NgramIndex([1, 2, 1], n_max=1).draft(2) == [2, 1]


def test_pacer_drafts_when_acceptance_pays_and_falls_back_to_plain_steps_when_it_does_not():
    p = Pacer(limit=8, draft_cost=0.7, bonus=False, always=False, rows=2)
    for _ in range(30):
        p.accepted(4, 4, row=0)
        p.accepted(4, 0, row=1)
    assert p.choose(0) >= 2
    assert p.choose(1) == 0  # exit drafts at zero acceptance only cost
    assert max(p.choose(1) for _ in range(Pacer.PROBE + 1)) > 0  # but they are tried again, now and then
    p.timed(1, 0.02)  # a plain step: 20 ms
    for _ in range(30):
        p.timed(9, 0.08)  # a pass of 9 columns: 4x a step
    assert p.pass_cost(9) == pytest.approx(4, rel=0.05) and p.choose(0) < 8  # costly: shorter drafts
    steps = Pacer(limit=8, draft_cost=0.0, bonus=True, always=False, bucket=lambda c: 5 if c <= 5 else 9)
    steps.timed(1, 0.02)
    for _ in range(30):
        steps.timed(5, 0.022)  # up to 5 columns: 1.1 steps; 6 to 9 columns: 2 steps
        steps.timed(9, 0.04)
        steps.accepted(8, 8)
    # every draft accepted: 5 tokens for 1.1 steps beat 9 for 2: the cheap bucket's most
    assert steps.pass_cost(3) == pytest.approx(1.1, rel=0.05) and steps.choose() == 4
    forced = Pacer(limit=8, draft_cost=0.7, bonus=False, always=True)
    for _ in range(30):
        forced.accepted(4, 0)
    assert forced.choose() > 0  # asked for: drafts anyway


def test_greedy_acceptance_takes_the_matching_prefix_then_the_correction_or_the_bonus():
    cfg = GenerationConfig()
    logits = torch.full((4, 10), -1.0)
    for i, t in enumerate([3, 5, 6, 2]):
        logits[i, t] = 1.0
    seen = torch.zeros(10, dtype=torch.bool)
    assert accept(logits, [3, 5, 6], cfg, seen.clone(), None) == (3, 2)  # all, and the bonus
    assert accept(logits, [3, 4, 6], cfg, seen.clone(), None) == (1, 5)  # correction at the mismatch
    assert accept(logits[:3], [3, 5, 6], cfg, seen.clone(), None) == (3, None)  # no bonus position


def _chi2_quantile(df: int, p: float = 0.999) -> float:
    """Wilson-Hilferty: the chi-square quantile, close enough for a test threshold."""
    z = {0.999: 3.090, 0.99: 2.326}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("draft", ["ngram", "exit"])
def test_verify_sampling_has_the_full_models_next_token_distribution(tmp_path_factory, draft):
    """The second generated token (the first one that verification decides) of N seeded runs, against
    its exact marginal under the full model, sum over t1 of p(t1) p(t2 | t1), by a chi-square test."""
    path = tmp_path_factory.mktemp("tiny2layers")
    make_tiny_checkpoint(path, n_layers=2, seed=5)
    model = cee_gen.load_model(str(path), dtype="float32", device="cpu")
    net = model.net
    prompt = "a b c a b c a b"
    # 3 tokens: the round after the first token has room for a draft; the second token is counted
    cfg = dict(max_new_tokens=3, do_sample=True, temperature=3.0, chat=False, batch_size=64)
    ids = cee_gen.generate(model, prompt, max_new_tokens=1, chat=False)[0].prompt_token_ids
    with torch.inference_mode():
        from conftest import full_logits

        p1 = (full_logits(net, torch.tensor([ids]))[0, -1] / 3.0).softmax(-1)  # (V,)
        V = p1.shape[0]
        seqs = torch.tensor([ids + [t] for t in range(V)])  # every first token
        p2 = (full_logits(net, seqs)[:, -1] / 3.0).softmax(-1)  # (V, V)
        eos = model.eos_token_ids
        p2[eos] = 0.0  # an EOS first token ends the row: no second token (the last bin)
        marginal = torch.cat([(p1[:, None] * p2).sum(0), p1[eos].sum()[None]]).double()
    N = 2048
    ex = ExitConfig(strategy="confidence", threshold=0.0, verify=True, draft="exit", max_draft=2) \
        if draft == "exit" else ExitConfig(verify=True, draft="ngram", max_draft=2)
    res = cee_gen.generate(model, [prompt] * N, seed=11, exit=ex, **cfg)
    counts = torch.zeros(V + 1, dtype=torch.float64)
    for r in res:
        counts[r.token_ids[1] if len(r.token_ids) > 1 else V] += 1
    stats = _batch_stats(res)
    assert sum(v["proposed"][draft] for v in stats) > 0, "no drafts: the acceptance rule was not exercised"
    exp = marginal * N
    big = exp >= 5  # pool the rare tokens into one bin
    obs_b = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    stat = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    df = int(big.sum())
    assert stat < _chi2_quantile(df), (stat, df)
    # and the test can tell a wrong distribution apart: the first token's marginal is another one
    p1b = torch.cat([p1.double(), torch.zeros(1, dtype=torch.float64)])
    wrong = float(((obs_b - torch.cat([p1b[big], p1b[~big].sum()[None]]) * N) ** 2 / exp_b).sum())
    assert wrong > _chi2_quantile(df), "the two distributions are too close for this test to mean much"


@pytest.mark.parametrize("ex, words", [
    (dict(strategy="full", verify=True, draft="exit"), "draft exit needs an exit strategy"),
    (dict(verify=True, max_draft=0), "max_draft must be a positive integer"),
    (dict(draft="ngram"), "add verify"),
    (dict(max_draft=4), "add verify"),
    (dict(strategy="confidence", verify=True, kv_fill="recompute"), "drop kv_fill recompute"),
    (dict(verify=True, draft="ngram", kv_fill="copy-kv"), "runs no early exits"),
    (dict(verify=True, fill_timing="eager"), "runs no early exits"),
    (dict(strategy="cascade", cascade_model="x", verify=True), "second checkpoint"),
    (dict(verify=True, ngram=0), "ngram must be a positive integer"),
])
def test_bad_verify_settings_are_one_line_errors_that_name_the_fix(ex, words):
    with pytest.raises(CeeGenError, match=words):
        ExitConfig(**ex).validate(4)


@pytest.mark.parametrize("argv, words", [
    (["--verify", "--draft", "exit"], "draft exit needs an exit strategy"),
    (["--verify", "--max-draft", "0"], "max_draft must be a positive integer"),
    (["--draft", "ngram"], "add verify"),
])
def test_cli_bad_verify_flags_are_one_line_errors(model4, capsys, argv, words):
    code, out, err = run_cli(["--model", str(model4.path), *argv, "hi"], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_verify_stats_count_drafts_passes_and_each_tokens_source(cycling):
    [r] = cee_gen.generate(cycling, COPY_PROMPTS[0], max_new_tokens=24, chat=False,
                           exit=ExitConfig(strategy="confidence", threshold=0.5, verify=True))
    s, v = r.stats, r.stats["verify"]
    n = len(r.token_ids)
    assert s["token_sources"][0] == "prefill" and len(s["token_sources"]) == n
    assert set(s["token_sources"]) <= {"prefill", "ngram", "exit", "verify"}
    assert s["token_sources"].count("ngram") == v["accepted"]["ngram"]
    assert s["token_sources"].count("exit") == v["accepted"]["exit"]
    assert v["tokens_per_pass"] == pytest.approx((n - 1) / v["passes"])  # one row
    assert v["passes"] < n - 1, "every pass gave one token: nothing was accepted"
    assert s["layers_per_token"] == [cycling.n_layers] * n  # every token is the full model's


@pytest.mark.slow
def test_compiled_verify_equals_compiled_full_depth(model4, policy_file):
    full = cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=16, batch_size=3, compile=True)
    for ex in (dict(verify=True, draft="ngram"),
               dict(strategy="policy", heads=policy_file, verify=True, draft="auto")):
        got = cee_gen.generate(model4, COPY_PROMPTS, max_new_tokens=16, batch_size=3, compile=True,
                               exit=ExitConfig(**ex))
        assert _ids(got) == _ids(full), ex


VERIFY_PROMPTS = json.loads((Path(__file__).parent / "data" / "verify_prompts.json").read_text())


@pytest.mark.default_model
@pytest.mark.parametrize("dataset", ["alpaca", "dolly", "cnndm"])
def test_default_model_verify_equals_full_depth_on_prompts_of_each_set(default_model, dataset):
    """5 prompts in each benchmark set's style (tests/data/verify_prompts.json), 64 new tokens."""
    prompts = VERIFY_PROMPTS[dataset]
    full = cee_gen.generate(default_model, prompts, max_new_tokens=64, batch_size=5)
    for ex in (ExitConfig(verify=True, draft="ngram"),
               ExitConfig(strategy="confidence", threshold=0.9, min_exit_layer=16, verify=True, draft="auto"),
               ExitConfig(strategy="static", exit_layer=20, verify=True, draft="exit")):
        got = cee_gen.generate(default_model, prompts, max_new_tokens=64, batch_size=5, exit=ex)
        assert _ids(got) == _ids(full), ex
        assert got[0].stats["verify"]["tokens_per_pass"] > 1.0, ex


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: none here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verify_equals_full_depth_on_cuda(cycling, dtype):
    """cuBLAS picks kernels by shape, so a multi-position pass may reduce in another order than the
    single-token step: this finds out whether that flips tokens on a GPU (benchmarks/gpu_check.sh)."""
    m = cee_gen.load_model(str(cycling.path), dtype=dtype, device="cuda")
    full = cee_gen.generate(m, COPY_PROMPTS, max_new_tokens=24, batch_size=4)
    for ex in (ExitConfig(verify=True, draft="ngram"),
               ExitConfig(strategy="confidence", threshold=0.5, verify=True, draft="exit")):
        got = cee_gen.generate(m, COPY_PROMPTS, max_new_tokens=24, batch_size=4, exit=ex)
        assert _ids(got) == _ids(full), ex


def test_cli_show_exits_underlines_accepted_drafts_in_verify_mode(cycling, capsys):
    code, out, err = run_cli(["--model", str(cycling.path), "--max-new-tokens", "20", "--raw", "--verify",
                              "--show-exits", "--color", "always", "the quick brown fox"], capsys)
    assert code == 0 and "token sources (" in err and "accepted n-gram drafts" in err
    assert "\x1b[4;38;5;45m" in out  # an accepted n-gram draft, underlined

"""The early-exit decode step: exits off == full model, per-row exits in a batch, KV fill and recompute."""

import json
from pathlib import Path

import pytest
import torch
from conftest import PROMPTS, all_strategies, expected_kv, make_tiny_checkpoint, run_cli
from conftest import ids as _ids

import cee_gen
from cee_gen import ExitConfig
from cee_gen.cache import StaticKVCache
from cee_gen.engine import BatchTimings, Decoder, ExitRun, ExitStep
from cee_gen.exits.heads import ExitHeads
from cee_gen.exits.strategies import Static
from cee_gen.kv_fill import EagerFill, KVFiller, RecomputeFill


@pytest.mark.parametrize("strategy", ["policy", "confidence", "entropy", "patience", "saturation", "hash"])
def test_every_strategy_with_no_candidate_layer_equals_the_full_model_token_for_token(
        model4, policy_file, strategy):
    from cee_gen.config import GenerationConfig
    from cee_gen.engine import Decoder, generate_batch
    from cee_gen.generate import encode_prompt, prepare_exit

    L = model4.n_layers
    heads = policy_file if strategy == "policy" else None
    run = prepare_exit(model4, ExitConfig(strategy=strategy, heads=heads))
    run.strategy.layers = []  # no candidate layer (a config asking for none is refused, so set it here)
    if strategy == "hash":  # its plan is a table of exit layers per token id: every one at L
        run.strategy.table = [L] * len(run.strategy.table)
    ids = [encode_prompt(model4, p, None) for p in PROMPTS]

    def gen(exit):
        rows, _ = generate_batch(Decoder(model4.net), ids, GenerationConfig(max_new_tokens=16),
                                 pad_id=model4.pad_token_id, eos_ids=model4.eos_token_ids, exit=exit)
        return rows

    full, got = gen(None), gen(run)
    assert [r.token_ids for r in got] == [r.token_ids for r in full]
    assert all(set(r.layers_per_token) == {L} for r in got)


def test_exits_disabled_is_the_plain_full_depth_step(model4):
    a = cee_gen.generate(model4, PROMPTS, max_new_tokens=16)
    b = cee_gen.generate(model4, PROMPTS, max_new_tokens=16, exit=ExitConfig(strategy="full"))
    assert _ids(a) == _ids(b) and b[0].stats["kv_fill"] is None


def test_policy_that_always_exits_at_k_gives_the_static_k_tokens(model4, tmp_path):
    k = 2
    h = ExitHeads(model4.net, [1, 2, 3], policy="linear")
    with torch.no_grad():
        for x in (1, 2, 3):
            h.policies[str(x)].net.weight.zero_()
            h.policies[str(x)].net.bias.fill_(10.0 if x == k else -10.0)  # p = 1 at k, 0 elsewhere
    path = h.save(tmp_path / "at2.safetensors")
    pol = cee_gen.generate(model4, PROMPTS, max_new_tokens=12,
                           exit=ExitConfig(strategy="policy", heads=str(path)))
    static = cee_gen.generate(model4, PROMPTS, max_new_tokens=12,
                              exit=ExitConfig(strategy="static", exit_layer=k))
    assert _ids(pol) == _ids(static)
    assert all(r.stats["layers_per_token"][1:] == [k] * (len(r.token_ids) - 1) for r in pol)


def test_batch_rows_exiting_at_different_layers_equal_one_by_one(model4, policy_file):
    for ex in all_strategies(policy_file):
        one = cee_gen.generate(model4, PROMPTS, max_new_tokens=14, batch_size=1, exit=ex)
        many = cee_gen.generate(model4, PROMPTS, max_new_tokens=14, batch_size=len(PROMPTS), exit=ex)
        assert _ids(many) == _ids(one), ex
        assert [r.stats["layers_per_token"] for r in many] == [r.stats["layers_per_token"] for r in one], ex
        depths = {d for r in many for d in r.stats["layers_per_token"][1:]}
        assert len(depths) > 1, f"{ex}: every token exited at the same layer; the test proves nothing"


def test_exited_rows_are_not_computed_in_deeper_layers(model4):
    net, L = model4.net, model4.n_layers
    seen = []
    hook = net.layers[L - 1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        res = cee_gen.generate(model4, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), chat=False,
                               exit=ExitConfig(strategy="confidence", threshold=0.5))
    finally:
        hook.remove()
    deep = sum(r.stats["layers_per_token"][1:].count(L) for r in res)  # decode tokens that ran layer L
    assert sum(seen[1:]) == deep  # seen[0] is the prefill
    assert min(seen[1:]) < len(PROMPTS)


def test_exit_step_fills_propagate_kv_for_the_exited_rows_only(model4):
    net, a, k, S = model4.net, model4.args, 2, 16
    pad = torch.tensor([0, 1])
    tokens = torch.tensor([[5, 6, 7], [0, 8, 9]])
    cache = StaticKVCache(a, 2, S, torch.float32, "cpu")
    with torch.inference_mode():
        net(tokens, net.make_step(torch.arange(3), pad, S, 3), cache)
        for t in cache.k + cache.v:
            t[:, :, 3:].fill_(float("nan"))  # poison every slot from the decode step on
        ref = StaticKVCache(a, 2, S, torch.float32, "cpu")
        for j in range(a.n_layers):
            ref.k[j].copy_(cache.k[j])
            ref.v[j].copy_(cache.v[j])
        run = ExitRun(Static(k, a.n_layers), ExitHeads.logit_lens(net), "propagate")
        tok = torch.tensor([[11], [12]])
        tm = BatchTimings()
        fill = EagerFill(KVFiller(net), "propagate", tm)
        ExitStep(Decoder(net), run, fill, tm)(cache, tok, [11, 12], 3, pad, [1])
        step = net.make_step(torch.tensor([3]), pad[1:], S, 4)
        one = StaticKVCache(a, 1, S, torch.float32, "cpu")
        for j in range(a.n_layers):
            one.k[j].copy_(ref.k[j][1:])
            one.v[j].copy_(ref.v[j][1:])
        h = net.forward_layers(net.embed(tok[1:]), 0, k, step, one)  # row 1 alone, independently
    for j in range(a.n_layers):
        assert torch.isnan(cache.k[j][0, :, 3]).all() and torch.isnan(cache.v[j][0, :, 3]).all()
        if j < k:
            torch.testing.assert_close(cache.k[j][1:, :, 3], one.k[j][:, :, 3])
        else:
            ek, ev = expected_kv(net.layers[j], a, h, step, norm=True)
            torch.testing.assert_close(cache.k[j][1:, :, 3:4], ek, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(cache.v[j][1:, :, 3:4], ev, atol=1e-5, rtol=1e-5)


def test_recompute_makes_the_deep_kv_equal_the_full_models_on_the_same_tokens(model4):
    net, a, S = model4.net, model4.args, 16
    L, k = a.n_layers, 1
    pad = torch.zeros(1, dtype=torch.long)
    seq = [5, 6, 7, 9, 10, 11, 12]  # prompt 5 6 7; then exits at k, at 2, at L, at k
    depths = [k, 2, L, k]
    heads = ExitHeads.logit_lens(net)
    dec, tm = Decoder(net), BatchTimings()
    pending = RecomputeFill(1, S, tm)
    cache = StaticKVCache(a, 1, S, torch.float32, "cpu")
    ref = StaticKVCache(a, 1, S, torch.float32, "cpu")
    with torch.inference_mode():
        net(torch.tensor([seq[:3]]), net.make_step(torch.arange(3), pad, S, 3), cache)
        logits = []
        for i, d in enumerate(depths):
            run = ExitRun(Static(d, L), heads, "recompute")
            slot = 3 + i
            tok = torch.tensor([[seq[slot]]])
            out, depth = ExitStep(dec, run, pending, tm)(cache, tok, [seq[slot]], slot, pad, [0])
            assert depth == {0: d}
            logits.append(out)
            if i == 0:  # the exited token waits: nothing is written in the layers it skipped
                assert (cache.k[1][0, :, 3] == 0).all()
            if i == 1:  # the next token ran layer 2 and took it along: layer 2 caught up, deeper not
                assert (cache.k[1][0, :, 3] != 0).any() and (cache.k[L - 1][0, :, 3:5] == 0).all()
        full_logits = net(torch.tensor([seq]), net.make_step(torch.arange(7), pad, S, 7), ref)
    # after the full-depth token (slot 5) every layer holds the full model's KV for slots 0..5
    for j in range(L):
        torch.testing.assert_close(cache.k[j][:, :, :6], ref.k[j][:, :, :6], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v[j][:, :, :6], ref.v[j][:, :, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2][0], full_logits[0, 5], atol=1e-4, rtol=1e-4)
    assert len(pending.rows[0]) == 1 and pending.rows[0][0][:2] == (6, k)  # the last exit waits
    # slot 3 ran layer 2 with slot 4; then slots 3 and 4 ran layers 3..L with slot 5
    assert tm.recompute_rows == (2 - k) + 2 * (L - 2)


def test_stats_carry_exit_telemetry(model4, policy_file):
    [r] = cee_gen.generate(model4, PROMPTS[0], max_new_tokens=10,
                           exit=ExitConfig(strategy="policy", heads=policy_file, threshold=0.5))
    s = r.stats
    n = len(r.token_ids)
    assert s["exit"] == "policy" and s["kv_fill"] == "propagate" and s["threshold"] == 0.5
    assert len(s["layers_per_token"]) == n and s["layers_per_token"][0] == model4.n_layers
    assert sum(s["exit_histogram"].values()) == n - 1
    assert s["mean_layers"] == pytest.approx(sum(s["layers_per_token"]) / n)
    assert s["ideal_speedup"] == pytest.approx(model4.n_layers / s["mean_layers"])
    assert s["decision_s"] > 0 and s["candidate_layers"] == [1, 2, 3]
    # the default (deferred) fill runs inside the layers; the eager one is timed at the exits
    assert s["fill_timing"] == "deferred" and s["fill_s"] == 0
    assert min(s["layers_per_token"]) < model4.n_layers, "no token exited: nothing was filled"
    [e] = cee_gen.generate(model4, PROMPTS[0], max_new_tokens=10, exit=ExitConfig(
        strategy="policy", heads=policy_file, threshold=0.5, fill_timing="eager"))
    assert e.stats["fill_timing"] == "eager" and e.stats["fill_s"] > 0


@pytest.mark.slow
def test_compiled_exit_step_gives_the_eager_tokens_and_exit_layers(model4, policy_file):
    """Per-token strategies under compile: their layers and exit heads run as compiled graphs (one
    for a layer, shared by all layers), decisions and gathers stay eager. Batched, so rows finish
    and exit at different layers and the graphs see several row counts."""
    for i, ex in enumerate(all_strategies(policy_file)):
        eager = cee_gen.generate(model4, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), exit=ex)
        comp = cee_gen.generate(model4, PROMPTS, max_new_tokens=12, batch_size=len(PROMPTS), exit=ex,
                                compile=True)
        assert _ids(comp) == _ids(eager), ex
        assert [r.stats["layers_per_token"] for r in comp] == [r.stats["layers_per_token"] for r in eager], ex
        if i == 0:
            assert comp[0].stats["compile_s"] > 0  # the first run really compiled the pieces


def test_compile_with_a_second_checkpoint_cascade_is_a_clear_error(model4, small2, capsys):
    """Refused before a compiled decoder is made: nothing says it compiles, none stays on the model."""
    before = set(model4.decoders)
    with pytest.raises(cee_gen.CeeGenError, match="drop compile"):
        cee_gen.generate(model4, "hi", compile=True,
                         exit=ExitConfig(strategy="cascade", cascade_model=small2, threshold=0.5))
    assert set(model4.decoders) == before and "compiling" not in capsys.readouterr().err


def test_policy_without_policy_heads_names_the_fix(model4, tmp_path):
    with pytest.raises(cee_gen.CeeGenError, match="none ship for .*cee-train --model .* as heads"):
        cee_gen.generate(model4, "hi", exit=ExitConfig(strategy="policy"))
    no_policy = ExitHeads(model4.net, [1, 2], adapter_rank=2).save(tmp_path / "np.safetensors")
    with pytest.raises(cee_gen.CeeGenError, match="has no policy heads.*cee-train"):
        cee_gen.generate(model4, "hi", exit=ExitConfig(strategy="policy", heads=str(no_policy)))


def test_cli_show_exits_colours_tokens_and_prints_a_histogram(model4, policy_file, capsys):
    code, out, err = run_cli(["--model", str(model4.path), "--max-new-tokens", "8", "--exit", "policy",
                              "--heads", policy_file, "--show-exits", "--color", "always", "the quick"],
                             capsys)
    assert code == 0
    assert "\x1b[38;5;" in out  # coloured tokens
    assert "exit layers (" in err and "layer   4" in err


@pytest.mark.parametrize("flags, env", [([], {}), (["--color", "never"], {}), ([], {"NO_COLOR": "1"})])
def test_cli_show_exits_colours_only_a_terminal_and_honours_no_color(model4, policy_file, capsys,
                                                                    monkeypatch, flags, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = run_cli(["--model", str(model4.path), "--max-new-tokens", "8", "--exit", "policy",
                              "--heads", policy_file, "--show-exits", *flags, "the quick"], capsys)
    assert code == 0 and "exit layers (" in err
    assert "\x1b[" not in out + err  # captured output is no terminal; never and NO_COLOR mean none


def test_cli_color_auto_colours_a_terminal_unless_no_color(monkeypatch):
    from cee_gen.cli import _use_colour

    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert _use_colour("auto") and not _use_colour("never")
    monkeypatch.setenv("NO_COLOR", "1")
    assert not _use_colour("auto") and _use_colour("always")


def test_cli_exit_flags_reach_the_engine(model4, capsys):
    code, out, _ = run_cli(["--model", str(model4.path), "--max-new-tokens", "6", "--json", "--exit",
                            "entropy", "--threshold", "0.5", "--exit-layers", "1,3", "--kv-fill",
                            "recompute", "the quick"], capsys)
    s = json.loads(out)["stats"]
    assert code == 0 and s["exit"] == "entropy" and s["kv_fill"] == "recompute"
    assert s["threshold"] == 0.5 and s["candidate_layers"] == [1, 3]
    assert set(s["layers_per_token"][1:]) <= {1, 3, 4}


@pytest.mark.parametrize("argv, words", [
    (["--exit", "policy", "--heads", "/nonexistent/h.safetensors"], "does not exist"),
    (["--exit", "confidence", "--threshold", "7"], "must be in"),
    (["--exit", "entropy", "--exit-layers", "every:x"], "every:K"),
])
def test_cli_bad_exit_flags_are_one_line_errors(model4, capsys, argv, words):
    code, out, err = run_cli(["--model", str(model4.path), *argv, "hi"], capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_quickfit_writes_policy_heads_that_drive_the_policy_strategy(model4, tmp_path):
    from cee_gen.exits import quickfit

    out = tmp_path / "q.safetensors"
    assert quickfit.main(["--model", str(model4.path), "--out", str(out), "--prompts", "3",
                          "--new-tokens", "6", "--steps", "20"]) == 0
    [r] = cee_gen.generate(model4, PROMPTS[0], max_new_tokens=6,
                           exit=ExitConfig(strategy="policy", heads=str(out)))
    assert r.stats["exit"] == "policy" and len(r.token_ids) > 0


HEADS = Path(__file__).parent.parent / "cee_gen" / "heads" / "smollm2-135m-instruct-quickfit.safetensors"


@pytest.mark.default_model
def test_committed_quickfit_heads_match_the_default_model(default_model):
    from cee_gen.exits.heads import load_heads

    heads = load_heads(HEADS, default_model)
    assert heads.layers == list(range(1, default_model.n_layers)) and heads.has_policy


@pytest.mark.default_model
@pytest.mark.parametrize("ex", [
    ExitConfig(strategy="static", exit_layer=22),
    ExitConfig(strategy="policy", heads=str(HEADS), threshold=0.99),
    ExitConfig(strategy="confidence", threshold=0.9, exit_layers="every:2", min_exit_layer=16),
    ExitConfig(strategy="entropy", threshold=0.05, exit_layers="every:2", min_exit_layer=16),
    ExitConfig(strategy="patience", patience=2, exit_layers="every:2", min_exit_layer=16),
    ExitConfig(strategy="saturation", threshold=0.95, min_exit_layer=16),
    ExitConfig(strategy="hash", exit_layers="24,26,28"),
    ExitConfig(strategy="cascade", exit_layer=24, threshold=0.9),
    ExitConfig(strategy="policy", heads=str(HEADS), threshold=0.99, kv_fill="recompute"),
], ids=lambda ex: f"{ex.strategy}-{ex.fill}")
def test_every_strategy_runs_end_to_end_on_the_default_model(default_model, ex):
    prompts = ["Give three tips for staying healthy.", "Hi"]
    one = cee_gen.generate(default_model, prompts, max_new_tokens=10, batch_size=1, exit=ex)
    many = cee_gen.generate(default_model, prompts, max_new_tokens=10, batch_size=2, exit=ex)
    assert _ids(many) == _ids(one)
    L = default_model.n_layers
    for r in many:
        s = r.stats
        assert r.text and s["layers_per_token"][0] == L and all(1 <= d <= L for d in s["layers_per_token"])
        assert s["ideal_speedup"] == pytest.approx(L / s["mean_layers"])


@pytest.fixture(scope="module")
def small2(tmp_path_factory):
    """A 2-layer checkpoint with the same tokenizer: the cascade's small model."""
    path = tmp_path_factory.mktemp("tiny2")
    make_tiny_checkpoint(path, n_layers=2, seed=7)
    return str(path)


def _teacher_forced_argmax(model, ids):
    net, S = model.net, len(ids)
    cache = StaticKVCache(model.args, 1, S, torch.float32, "cpu")
    with torch.inference_mode():
        logits = net(torch.tensor([ids]), net.make_step(torch.arange(S), torch.zeros(1, dtype=torch.long),
                                                         S, S), cache)
    return logits[0].argmax(-1).tolist()


def test_cascade_with_a_second_checkpoint_emits_each_token_from_the_model_that_decided(model4, small2):
    small = cee_gen.load_model(small2, dtype="float32", device="cpu")
    Ls, L = small.n_layers, model4.n_layers
    kinds = set()
    for r in cee_gen.generate(model4, PROMPTS, max_new_tokens=16, chat=False,
                              exit=ExitConfig(strategy="cascade", cascade_model=small2, threshold=0.5)):
        seq = r.prompt_token_ids + r.token_ids
        P = len(r.prompt_token_ids)
        big, little = _teacher_forced_argmax(model4, seq), _teacher_forced_argmax(small, seq)
        for i, (t, d) in enumerate(zip(r.token_ids, r.stats["layers_per_token"])):
            assert d in (L, Ls, Ls + L)
            want = little if d == Ls else big  # the large model caught up on every token it skipped
            assert t == want[P - 1 + i], (i, d)
            kinds.add(d)
    assert {Ls, Ls + L} <= kinds  # both models emitted tokens: the catch-up was exercised


def test_cascade_with_a_second_checkpoint_batch_equals_one_by_one(model4, small2):
    ex = ExitConfig(strategy="cascade", cascade_model=small2, threshold=0.5)
    one = cee_gen.generate(model4, PROMPTS, max_new_tokens=14, batch_size=1, exit=ex)
    many = cee_gen.generate(model4, PROMPTS, max_new_tokens=14, batch_size=len(PROMPTS), exit=ex)
    assert _ids(many) == _ids(one)
    assert [r.stats["layers_per_token"] for r in many] == [r.stats["layers_per_token"] for r in one]


@pytest.mark.parametrize("ex, words", [
    (ExitConfig(strategy="cascade", cascade_model="x", exit_layer=2), "not both"),
    (ExitConfig(strategy="entropy", cascade_model="x"), "cascade_model is for the cascade"),
    (ExitConfig(strategy="cascade", cascade_model="/nonexistent/small"), "does not exist"),
])
def test_bad_cascade_settings_are_clear_errors(model4, ex, words):
    with pytest.raises(cee_gen.CeeGenError, match=words):
        cee_gen.generate(model4, "hi", exit=ex)


@pytest.mark.default_model
def test_policy_without_heads_uses_the_heads_shipped_for_the_default_model(default_model):
    from importlib.resources import files

    shipped = files("cee_gen.heads") / "smollm2-135m-instruct.safetensors"
    assert shipped.is_file(), "the trained heads for the default model must ship in the package"
    model = cee_gen.load_model(None, dtype="float32", device="cpu")  # its own copy: the heads' LoRA merges
    prompt = "Give three tips for staying healthy."
    [r] = cee_gen.generate(model, prompt, max_new_tokens=12, exit=ExitConfig(strategy="policy"))
    assert r.stats["weights"] == str(Path(str(shipped)).resolve()) and r.text
    assert r.stats["candidate_layers"] == list(range(1, model.n_layers))
    # the fine-tuned weights differ from the base model's; the shared default model is untouched
    [base] = cee_gen.generate(default_model, prompt, max_new_tokens=12)
    assert base.stats["weights"] == "base"
    from cee_gen.weights.quant import dense_weight

    w = lambda m: dense_weight(m.net.layers[3].attention.wqkv, torch.float32)  # noqa: E731  (GGUF blocks
    assert not torch.equal(w(model), w(default_model))  # by default: their LoRA as terms beside them)

"""Wider than the listed cases: random combinations of CLI flags and of API arguments (hypothesis) each
end in a result or a one-line error, never a traceback; and a soak of many short generations in one
process whose resident memory stays flat."""

import contextlib
import io
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cee_gen
from cee_gen import CeeGenError, ExitConfig

pytestmark = pytest.mark.slow  # ~1,000 generations each

FLAG_VALUES = {  # flag -> values, valid and not
    "--max-new-tokens": ["1", "3", "0", "-1", "x", "1e9"],
    "--exit": ["full", "static", "policy", "confidence", "entropy", "patience", "saturation", "hash",
               "cascade", "bogus"],
    "--threshold": ["0.5", "0.9", "-1", "2", "nan", "inf", "abc"],
    "--exit-layer": ["1", "2", "3", "4", "5", "0", "-1"],
    "--exit-layers": ["1,2", "every:2", "all", "every:x", "9", "1,,2", "3,1", ""],
    "--min-exit-layer": ["1", "3", "4", "40", "0"],
    "--kv-fill": ["propagate", "propagate-raw", "copy-kv", "recompute", "magic"],
    "--fill-timing": ["auto", "eager", "deferred", "later"],
    "--draft": ["auto", "ngram", "exit", "tea"],
    "--max-draft": ["1", "3", "0", "-2"],
    "--ngram": ["1", "3", "0"],
    "--patience": ["1", "2", "0", "x"],
    "--hash-method": ["frequency", "random", "other"],
    "--temperature": ["0.7", "0", "-1", "inf"],
    "--top-k": ["0", "5", "-1"],
    "--top-p": ["0.9", "0", "1.5"],
    "--seed": ["1", "-1", "x"],
    "--repetition-penalty": ["1.2", "0", "-1"],
    "--batch-size": ["1", "2", "0"],
    "--dtype": ["float32", "bfloat16", "float8"],
    "--device": ["cpu", "cuda", "tpu"],
    "--attention": ["auto", "sdpa", "flash", "fast"],
    "--stop": ["\n", "", "the"],
    "--color": ["auto", "always", "never", "rainbow"],
    "--heads": ["POLICY", "/nonexistent/h.safetensors", "quickfit"],
}
SWITCHES = ["--verify", "--do-sample", "--raw", "--chat", "--json", "--stream", "--show-exits"]
PROMPTS = ["the quick", "", "a b a b a b", "\udcff bad", "x" * 40]


@st.composite
def argvs(draw):
    flags = draw(st.lists(st.sampled_from(sorted(FLAG_VALUES)), max_size=6, unique=True))
    argv = []
    for f in flags:
        argv += [f, draw(st.sampled_from(FLAG_VALUES[f]))]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=3, unique=True))
    argv += draw(st.lists(st.sampled_from(PROMPTS), min_size=0, max_size=2))
    return argv


@pytest.fixture(scope="module")
def loads(model4, monkeypatch_module):
    """load_model memoized by its arguments: the loading path is fuzzed, not re-run 1,000 times."""
    real, cache = cee_gen.load_model, {}

    def load(*a, **k):
        key = (a, tuple(sorted(k.items())))
        if key not in cache:
            cache[key] = real(*a, **k)
        return cache[key]

    monkeypatch_module.setattr(cee_gen, "load_model", load)
    return cache


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(argv=argvs())
def test_random_cli_flags_end_in_a_result_or_one_line_error(model4, policy_file, loads, argv):
    from cee_gen.cli import main

    argv = ["--model", str(model4.path), *[policy_file if a == "POLICY" else a for a in argv]]
    if "--max-new-tokens" not in argv:
        argv = ["--max-new-tokens", "3", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(argv)
    msg = err.getvalue()
    assert "Traceback" not in msg, (argv, msg)
    assert e.value.code in (0, 2), (argv, msg)
    if e.value.code == 2:
        lines = msg.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cee-generate: error: "), (argv, msg)


EXIT_FIELDS = {
    "strategy": st.sampled_from(["full", "static", "policy", "confidence", "entropy", "patience",
                                 "saturation", "hash", "cascade", "x", 3]),
    "threshold": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.just("0.5")),
    "exit_layer": st.one_of(st.none(), st.integers(-2, 6), st.just(2.5)),
    "exit_layers": st.one_of(st.none(), st.sampled_from(["1,2", "every:2", "all", "9", "a", "every:0"])),
    "min_exit_layer": st.integers(-1, 6),
    "kv_fill": st.one_of(st.none(), st.sampled_from(["propagate", "copy-kv", "recompute", "zzz"])),
    "verify": st.booleans(),
    "draft": st.one_of(st.none(), st.sampled_from(["auto", "ngram", "exit", "?"])),
    "max_draft": st.one_of(st.none(), st.integers(-1, 5)),
}
GEN_FIELDS = {
    "max_new_tokens": st.one_of(st.integers(-1, 4), st.just("3")),
    "do_sample": st.booleans(),
    "temperature": st.floats(-1, 3, allow_nan=False),
    "top_k": st.integers(-1, 10),
    "top_p": st.floats(-0.5, 1.5, allow_nan=False),
    "repetition_penalty": st.floats(-1, 2, allow_nan=False),
    "seed": st.one_of(st.none(), st.integers(-5, 2**64)),
    "batch_size": st.integers(0, 3),
    "stop": st.one_of(st.none(), st.just(["\n"]), st.just("x"), st.just([""])),
}


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(exit_kw=st.fixed_dictionaries({}, optional=EXIT_FIELDS),
       gen_kw=st.fixed_dictionaries({}, optional=GEN_FIELDS),
       prompts=st.one_of(st.lists(st.text(string.ascii_letters + " \udcff", max_size=12), max_size=3),
                         st.just("hi"), st.just(None), st.just([1, 2])))
def test_random_api_arguments_end_in_a_result_or_cee_gen_error(model4, exit_kw, gen_kw, prompts):
    try:
        ex = ExitConfig(**exit_kw)
        res = cee_gen.generate(model4, prompts, exit=ex, **gen_kw)
    except CeeGenError as e:
        assert "\n" not in str(e) and str(e)
        return
    assert all(isinstance(r.text, str) and r.finish_reason in ("stop", "length") for r in res)


def test_a_thousand_generations_keep_resident_memory_flat(model4, policy_file):
    """Strategies, verify mode and batch sizes in turn, 1,000 generate() calls (cee_gen.bench.soak, which
    benchmarks/results/soak_cpu.jsonl runs on the default model): the resident set may grow while the
    first rounds warm up, not after."""
    from cee_gen.bench.soak import soak

    rec = soak(model4, policy_file, rounds=1000, warm=100)
    assert rec["growth_mb"] < 32, rec

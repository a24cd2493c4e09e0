"""The early-exit core's redesign changed no behaviour: every strategy x KV-fill mode x fill timing gives
the token ids and exit layers recorded from the commit before it (tests/data/golden_outputs.json,
made by tests/golden.py)."""

import json
from pathlib import Path

import pytest
from golden import (
    DEFAULT_PROMPTS,
    TINY_PROMPTS,
    default_cases,
    make_tiny_golden_model,
    make_tiny_policy_heads,
    run_case,
    tiny_cases,
)

import cee_gen

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_outputs.json").read_text())


@pytest.fixture(scope="module")
def golden_tiny(tmp_path_factory):
    from conftest import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("golden")
    make_tiny_golden_model(tmp / "tiny")
    make_tiny_checkpoint(tmp / "small", n_layers=2, seed=7)
    model = cee_gen.load_model(str(tmp / "tiny"), dtype="float32", device="cpu")
    return model, tiny_cases(make_tiny_policy_heads(model, tmp / "heads.safetensors"), str(tmp / "small"))


def test_every_tiny_case_of_the_fixture_is_still_a_case():
    assert set(GOLDEN["tiny"]) == set(tiny_cases("h", "s"))
    assert set(GOLDEN["default"]) == set(default_cases())


@pytest.mark.parametrize("name", sorted(GOLDEN["tiny"]))
def test_tiny_model_outputs_equal_those_recorded_before_the_redesign(golden_tiny, name):
    model, cases = golden_tiny
    want = GOLDEN["tiny"][name]
    got = run_case(model, TINY_PROMPTS, cases[name], 16, len(TINY_PROMPTS))
    assert got["prompt_token_ids"] == want["prompt_token_ids"], "the tiny tokenizer changed: re-record"
    assert got == want


@pytest.mark.slow
@pytest.mark.default_model
@pytest.mark.parametrize("name", sorted(GOLDEN["default"]))
def test_default_model_outputs_equal_those_recorded_before_the_redesign(default_model, name):
    # policy's shipped heads merge LoRA deltas into the model they load on: its own copy
    model = cee_gen.load_model(None, dtype="float32", device="cpu") if "policy" in name else default_model
    assert run_case(model, DEFAULT_PROMPTS, default_cases()[name], 24, 2) == GOLDEN["default"][name]

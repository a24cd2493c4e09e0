"""Every exit strategy on hand-made hidden states, logits and policy outputs with a known answer."""

import math

import pytest
import torch

from cee_gen.config import ExitConfig
from cee_gen.errors import CeeGenError
from cee_gen.exits.strategies import (
    Confidence,
    Entropy,
    Hash,
    Patience,
    PolicyExit,
    Saturation,
    Signals,
    hash_table,
    normalized_entropy,
)

L = 8


class FakeHeads:
    """Signals read logits / p(exit) / normed states from per-layer tables of the whole batch.

    The "hidden state" passed in is the batch row index, so each running row reads its own entry.
    """

    def __init__(self, logits=None, p=None, z=None):
        self._logits, self._p, self._z = logits or {}, p or {}, z or {}
        self.layer = None

    def normed(self, h):
        if self.layer not in self._z:
            return torch.zeros(len(h), 4)
        return self._z[self.layer][h[:, 0].long()]

    def logits(self, layer, h, fn=None):
        return self._logits[layer][h[:, 0].long()]

    def p_exit(self, layer, h, z=None, fn=None):
        return self._p[layer][h[:, 0].long()]


def run(strategy, heads, layers, batch):
    """Walk the candidate layers as the engine does; returns each row's exit layer (L if none)."""
    strategy.reset(batch, "cpu")
    rows = torch.arange(batch)
    out = [L] * batch
    for layer in layers:
        heads.layer = layer
        ex = strategy.decide(Signals(heads, layer, rows[:, None].float()), rows)
        for r, e in zip(rows.tolist(), ex.tolist()):
            if e:
                out[r] = layer
        rows = rows[~ex]
        if not len(rows):
            break
    return out


def peaked(token, p_max, V=10):
    """Logits (V,) whose softmax puts p_max on `token` and spreads the rest evenly."""
    rest = (1 - p_max) / (V - 1)
    x = torch.full((V,), math.log(rest))
    x[token] = math.log(p_max)
    return x


def test_policy_exits_at_first_layer_whose_p_reaches_the_threshold():
    p = {2: torch.tensor([0.2, 0.6, 0.1]), 4: torch.tensor([0.5, 0.0, 0.3]), 6: torch.tensor([0.9, 0.0, 0.4])}
    got = run(PolicyExit([2, 4, 6], L, 0.5), FakeHeads(p=p), [2, 4, 6], 3)
    assert got == [4, 2, L]  # row 0 reaches 0.5 exactly at 4 (>=), row 2 never does


def test_confidence_exits_when_max_probability_reaches_threshold():
    logits = {3: torch.stack([peaked(1, 0.95), peaked(2, 0.5)]),
              5: torch.stack([peaked(1, 0.5), peaked(2, 0.91)])}
    assert run(Confidence([3, 5], L, 0.9), FakeHeads(logits=logits), [3, 5], 2) == [3, 5]


def test_entropy_is_normalized_and_exits_below_threshold():
    V = 10
    uniform, onehotish = torch.zeros(V), peaked(0, 0.999)
    assert normalized_entropy(uniform[None]).item() == pytest.approx(1.0)
    assert normalized_entropy(onehotish[None]).item() < 0.01
    logits = {2: torch.stack([uniform, onehotish]), 4: torch.stack([onehotish, uniform])}
    assert run(Entropy([2, 4], L, 0.1), FakeHeads(logits=logits), [2, 4], 2) == [4, 2]


def test_patience_counts_consecutive_agreeing_candidate_layers():
    # argmax per layer: row 0: 5 5 5 -> agrees twice at layer 3 (patience 2);
    # row 1: 5 7 7 7 -> agrees at 3 and 4; row 2: 1 2 1 2 -> never
    seq = {1: [5, 5, 1], 2: [5, 7, 2], 3: [5, 7, 1], 4: [9, 7, 2]}
    logits = {x: torch.stack([peaked(t, 0.6) for t in seq[x]]) for x in seq}
    assert run(Patience([1, 2, 3, 4], L, 2), FakeHeads(logits=logits), [1, 2, 3, 4], 3) == [3, 4, L]
    assert run(Patience([1, 2, 3, 4], L, 1), FakeHeads(logits=logits), [1, 2, 3, 4], 3) == [2, 3, L]


def test_saturation_compares_with_the_previous_candidate_layer():
    a, b = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    near_a = torch.tensor([1.0, 0.1, 0.0, 0.0])  # cos(a, near_a) = 0.995
    z = {2: torch.stack([a, a]), 4: torch.stack([3 * near_a, b]), 6: torch.stack([a, b])}
    # row 0 saturates at 4 (scale does not matter); row 1 turns 90 degrees at 4, then repeats at 6
    assert run(Saturation([2, 4, 6], L, 0.975), FakeHeads(z=z), [2, 4, 6], 2) == [4, 6]


def test_saturation_never_exits_at_the_first_candidate():
    z = {2: torch.ones(1, 4)}
    assert run(Saturation([2], L, -1.0), FakeHeads(z=z), [2], 1) == [L]


def test_hash_frequency_gives_frequent_ids_the_shallow_layers_and_specials_full_depth():
    table = hash_table(100, [2, 4, 6], L, "frequency", special_ids=[0, 1])
    assert table[0] == table[1] == L
    assert table[2] == 2 and table[50] == 4 and table[99] == 6
    assert table[2:] == sorted(table[2:])  # id order stands for frequency order
    assert {table.count(x) for x in (2, 4, 6)} <= {32, 33, 34}  # equal buckets, as HashEE


def test_hash_random_is_fixed_per_token_and_covers_every_bucket():
    t1 = hash_table(1000, [2, 4, 6], L, "random")
    t2 = hash_table(1000, [2, 4, 6], L, "random")
    assert t1 == t2 and set(t1) == {2, 4, 6}
    assert Hash([2, 4, 6], L, 1000, "random").plan([7, 8, 7]) == [t1[7], t1[8], t1[7]]


@pytest.mark.parametrize("spec, want", [
    (None, [1, 2, 3, 4, 5, 6, 7]), ("all", [1, 2, 3, 4, 5, 6, 7]), ("every:3", [3, 6]),
    ("2, 5,8", [2, 5]),
])
def test_candidate_layers_parse_all_every_and_lists_and_drop_layer_L(spec, want):
    assert ExitConfig(exit_layers=spec).candidates(L, list(range(1, L))) == want


def test_min_exit_layer_drops_earlier_candidates():
    assert ExitConfig(min_exit_layer=5).candidates(L, list(range(1, L))) == [5, 6, 7]


@pytest.mark.parametrize("spec, words", [
    ("every:0", "every:K needs a positive integer"), ("x,y", "not all, every:K or a list"),
    ("3,99", "must be in 1..8"),
])
def test_bad_candidate_layers_are_clear_errors(spec, words):
    with pytest.raises(CeeGenError, match=words):
        ExitConfig(exit_layers=spec).candidates(L, list(range(1, L)))


def test_candidates_without_heads_are_refused():
    with pytest.raises(CeeGenError, match=r"exit layers \[3\] have no exit heads"):
        ExitConfig(exit_layers="2,3").candidates(L, [2, 4])


@pytest.mark.parametrize("ex, words", [
    (ExitConfig(strategy="confidence", threshold=1.5), r"must be in \[0, 1\]"),
    (ExitConfig(strategy="patience", threshold=0.5), "takes no threshold"),
    (ExitConfig(strategy="patience", patience=0), "patience must be a positive integer"),
    (ExitConfig(strategy="cascade"), "needs exit_layer"),
    (ExitConfig(strategy="cascade", exit_layer=L), "shallower than the model"),
    (ExitConfig(strategy="cascade", exit_layer=2, kv_fill="copy-kv"), "always catches the large model up"),
    (ExitConfig(strategy="entropy", exit_layer=3), "exit_layer is for the static and cascade"),
    (ExitConfig(strategy="hash", hash_method="md5"), "unknown hash_method"),
    (ExitConfig(min_exit_layer=0), "min_exit_layer must be a positive integer"),
])
def test_bad_exit_configs_are_clear_errors(ex, words):
    with pytest.raises(CeeGenError, match=words):
        ex.validate(L)


def test_cascade_fills_by_recompute_and_others_by_propagate_by_default():
    assert ExitConfig(strategy="cascade", exit_layer=2).fill == "recompute"
    assert ExitConfig(strategy="policy").fill == "propagate"

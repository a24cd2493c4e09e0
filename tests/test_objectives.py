"""ConsistentEE's objectives on hand-made tables: alignment, memorized layer, log pi, REINFORCE."""

import math

import pytest
import torch

from cee_gen.train import objectives as ob

LAYERS = [2, 4, 6, 8]  # candidates; L = 8


def test_next_token_ce_pairs_position_t_with_token_t_plus_1():
    V, tokens = 6, torch.tensor([[1, 3, 5, 2]])
    logits = torch.full((1, 4, V), -20.0)
    for t in range(3):
        logits[0, t, tokens[0, t + 1]] = 20.0  # position t is sure of the token that follows it
    ce = ob.next_token_ce(logits, tokens)
    assert ce.shape == (1, 3) and ce.max().item() < 1e-6
    # the off-by-one of the released code would read position t's logits against token t
    assert _ce_unshifted(logits, tokens).min().item() > 10


def _ce_unshifted(logits, tokens):
    return torch.nn.functional.cross_entropy(logits[0, :3], tokens[0, :3], reduction="none")


def test_ignored_targets_give_zero_and_are_masked_out():
    tokens = torch.tensor([[1, -100, 2]])
    logits = torch.zeros(1, 3, 4)
    assert ob.next_token_ce(logits, tokens)[0, 0] == 0
    assert ob.valid_targets(tokens).tolist() == [[False, True]]


def test_depth_weighted_ce_weighs_each_layer_by_its_depth():
    ce = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    want = (2 * 1 + 4 * 2 + 6 * 3 + 8 * 4) / (2 + 4 + 6 + 8)
    assert ob.depth_weighted_ce(ce, LAYERS).item() == pytest.approx(want)


def test_memorized_layer_on_hand_made_prediction_tables():
    T, F = True, False
    correct = torch.tensor([  # rows: layers 2 4 6 8; columns: tokens
        [T, F, T, T, F],
        [T, T, F, T, F],
        [T, T, T, F, T],
        [T, T, T, F, T],
    ])
    # token 0: all right -> 2; token 1: right from 4; token 2: wrong at 4 -> 6;
    # token 3: last layer wrong -> L; token 4: right from 6
    assert ob.memorized_layer(correct, LAYERS).tolist() == [2, 4, 6, 8, 6]
    only_last = torch.tensor([[F], [F], [F], [T]])
    assert ob.memorized_layer(only_last, LAYERS).tolist() == [8]


def test_trajectory_log_prob_sums_the_decisions_and_divides_by_their_number():
    p = torch.tensor([[0.2], [0.7], [0.9], [0.5]])
    got = ob.trajectory_log_prob(p, torch.tensor([1]))  # continued at 2, exited at 4
    want = (math.log(0.8 + 1e-6) + math.log(0.7 + 1e-6)) / 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    never = ob.trajectory_log_prob(p, torch.tensor([4]))  # no exit before L
    want = sum(math.log(1 - x + 1e-6) for x in (0.2, 0.7, 0.9, 0.5)) / 4
    assert never.item() == pytest.approx(want, rel=1e-5)


def test_hardness_reward_charges_depth_to_easy_tokens_only():
    ce = torch.zeros(2)
    e = torch.tensor([8, 8])
    m = torch.tensor([2, 8])  # easy, hard
    r = ob.hardness_reward(ce, e, m, 8, alpha=0.1)
    assert r[0].item() == pytest.approx(-0.1 * 8 * (1 - 2 / 8)) and r[1].item() == 0.0
    assert ob.hardness_reward(ce + 1.5, e, m, 8, alpha=0.0).tolist() == [-1.5, -1.5]  # the released code


def test_reinforce_raises_the_probability_of_above_baseline_actions():
    theta = torch.zeros(1, requires_grad=True)  # one candidate layer, p = sigmoid(theta) = 0.5
    p = torch.sigmoid(theta).expand(1, 2)  # (n=1, N=2): replica 0 exits, replica 1 does not
    exit_idx = torch.tensor([0, 1])
    logpi = ob.trajectory_log_prob(p, exit_idx)[None, :].T  # (K=2, N=1)
    reward = torch.tensor([[1.0], [0.0]])  # exiting was better than the replicas' mean
    ob.reinforce_loss(logpi, reward).backward()
    assert theta.grad.item() < 0  # gradient descent raises theta, so p(exit) rises


def test_reinforce_ignores_tokens_whose_replicas_all_score_the_same():
    logpi = torch.randn(4, 3, requires_grad=True)
    ob.reinforce_loss(logpi, torch.ones(4, 3)).backward()
    assert torch.all(logpi.grad == 0)


def test_choose_exits_greedy_takes_the_first_layer_over_threshold_and_bernoulli_samples():
    p = torch.tensor([[0.1, 0.9, 0.1], [0.6, 0.1, 0.2], [0.9, 0.9, 0.3]])
    assert ob.choose_exits(p, "greedy").tolist() == [1, 0, 3]
    g = torch.Generator().manual_seed(0)
    always = ob.choose_exits(torch.ones(3, 5), "bernoulli", generator=g)
    never = ob.choose_exits(torch.zeros(3, 5), "bernoulli", generator=g)
    assert always.tolist() == [0] * 5 and never.tolist() == [3] * 5
    rates = ob.choose_exits(torch.full((1, 20000), 0.3), "bernoulli", generator=g).eq(0).float().mean()
    assert abs(rates.item() - 0.3) < 0.02
    explore = ob.choose_exits(torch.zeros(1, 20000), "greedy", eps=1.0, generator=g).eq(0).float().mean()
    assert abs(explore.item() - 0.5) < 0.02  # eps = 1: a fair coin


def test_epsilon_decays_from_start_to_end():
    assert ob.epsilon(0) == pytest.approx(0.1) and ob.epsilon(10**7) == pytest.approx(0.0)


def test_normalized_entropy_is_one_for_uniform_and_zero_for_one_hot():
    torch.testing.assert_close(ob.normalized_entropy(torch.zeros(3, 50)), torch.ones(3))
    sharp = torch.full((1, 50), -1e4)
    sharp[0, 7] = 0
    assert ob.normalized_entropy(sharp).item() < 1e-3


def test_cosee_weights_follow_each_tokens_simulated_exit():
    layers = [2, 4, 6]  # 6 = L, the last resort
    # token 0 is confident from layer 2 on, token 1 only at layer 4, token 2 never
    signal = torch.tensor([[0.1, 0.9, 0.9], [0.1, 0.2, 0.9], [0.0, 0.0, 0.0]])  # (n, N)
    taus = torch.tensor([0.5])
    w = ob.cosee_weights(signal, layers, taus, beta=50.0)  # sharp: all weight on the exit layer
    torch.testing.assert_close(w, torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ob.cosee_weights(signal, layers, taus, beta=0.0), torch.full((3, 3), 1 / 3))
    w = ob.cosee_weights(signal, layers, torch.tensor([0.5, 0.05]), beta=50.0)  # two thresholds, averaged
    assert w[:, 0].tolist() == pytest.approx([0.5, 0, 0.5], abs=1e-6)  # tau 0.05: token 0 exits at L
    torch.testing.assert_close(w.sum(0), torch.ones(3))


def test_osc_hinge_on_hand_made_signals_skips_one_sided_layers_and_pushes_right_surer():
    # layer 0: right tokens mean 0.6, wrong 0.2 -> 0.6 - 0.2 + 0.3 = 0.7; layer 1: right 0.1, wrong
    # 0.9 -> already separated by more than the margin -> 0; layer 2: all right -> not counted
    signal = torch.tensor([[0.6, 0.6, 0.2, 0.2], [0.1, 0.1, 0.9, 0.9], [0.5, 0.5, 0.5, 0.5]],
                          requires_grad=True)
    right = torch.tensor([[True, True, False, False], [True, True, False, False], [True] * 4])
    loss = ob.osc_loss(signal, right, margin=0.3)
    assert loss.item() == pytest.approx(0.7 / 2)
    loss.backward()
    g = signal.grad
    assert (g[0, :2] > 0).all() and (g[0, 2:] < 0).all()  # descent lowers right's entropy, raises wrong's
    assert (g[1:] == 0).all()
    assert ob.osc_loss(signal.detach()[2:], right[2:], 0.3).item() == 0  # no layer has both kinds

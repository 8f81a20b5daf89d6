"""Reward values worked out by hand. Tolerances are tight so that a flipped sign or a lost floor fails."""

import pytest

import reward
from reward import EpisodeStats, score, summarize, summarize_split


def test_deal_in_mi_scenario():
    # budget 80, cost 50: room = 30. Deal at 59 -> (80 - 59) / 30 = 0.7
    assert score(80, 50, 59) == pytest.approx(0.7, abs=1e-12)


def test_deal_at_cost_scores_one_and_at_budget_zero():
    assert score(80, 50, 50) == 1.0
    assert score(80, 50, 80) == 0.0


def test_deal_below_cost_is_clipped_to_one():
    # (80 - 20) / 30 = 2.0 -> clipped to 1.0
    assert score(80, 50, 20) == 1.0


def test_over_budget_is_minus_one():
    assert score(80, 50, 80.01) == -1.0


def test_no_deal_is_zero_and_violation_is_minus_one():
    assert score(80, 50, None) == 0.0
    assert score(80, 50, None, violation=True) == -1.0
    assert score(80, 50, 60, violation=True) == -1.0


def test_room_floor_of_one_dollar():
    # budget 10.00, cost 9.80: |b - c| = 0.2 < 1 -> room = 1. Deal at 9.90 -> (10 - 9.9) / 1 = 0.1. The budget is
    # kept: Xia et al. would also move it to cost + 1 = 10.80 and score (10.8 - 9.9) / 1 = 0.9 (reward.py docstring).
    assert score(10.0, 9.8, 9.9) == pytest.approx(0.1, abs=1e-12)
    assert reward.room(10.0, 9.8) == 1.0
    assert score(10.0, 9.8, 9.8) == pytest.approx(0.2, abs=1e-12)   # at cost: budget - cost, not 1


def test_tie_budget_equals_cost_is_ci():
    # budget == cost: CI for us (MI needs budget > cost), MI for Xia et al. A deal can only be at the tie: 0 / 1.
    tie = _ep(budget=50.0, cost=50.0, reason="deal", price=50.0, reward=score(50.0, 50.0, 50.0))
    assert not tie.mi and tie.reward == 0.0
    split = summarize_split([tie])
    assert split["MI"]["episodes"] == 0 and split["CI"]["episodes"] == 1


def test_ci_scenario_uses_absolute_room():
    # CI: budget 40 < cost 50. room = |40 - 50| = 10. A deal can only be at >= cost > budget -> -1,
    # but the formula itself at price 35 would give (40 - 35) / 10 = 0.5.
    assert score(40, 50, 35) == pytest.approx(0.5, abs=1e-12)
    assert score(40, 50, 50) == -1.0


def _ep(**kw):
    base = dict(reward=0.0, reason="max_rounds", price=None, budget=80.0, cost=50.0, list_price=100.0)
    base.update(kw)
    return EpisodeStats(**base)


def test_summarize_by_hand():
    eps = [
        _ep(reward=0.7, reason="deal", price=59.0, first_offer=40.0, rounds=3),       # MI deal
        _ep(reward=-1.0, reason="budget_violation", first_offer=90.0, overshoot=True, rounds=1),
        _ep(reward=0.0, reason="quit", budget=40.0, cost=50.0, list_price=50.0, first_offer=20.0, rounds=2),  # CI
        _ep(reward=-1.0, reason="protocol_violation", rounds=1, interventions=2),
    ]
    m = summarize(eps)
    assert m["episodes"] == 4
    assert m["reward"] == pytest.approx((0.7 - 1 + 0 - 1) / 4, abs=1e-12)
    assert m["deal_rate"] == 0.25
    assert m["bargained_ratio"] == pytest.approx(21 / 30, abs=1e-12)
    assert m["overshoot_rate"] == 0.25
    assert m["protocol_violation_rate"] == 0.25
    # first offers / budget: 40/80, 90/80, 20/40 -> (0.5 + 1.125 + 0.5) / 3
    assert m["first_offer_ratio"] == pytest.approx((0.5 + 1.125 + 0.5) / 3, abs=1e-12)
    assert m["ci_walkaway_rate"] == 1.0
    assert m["mean_rounds"] == pytest.approx(7 / 4)
    assert m["interventions_per_episode"] == 0.5
    assert m["price_reduction"] == pytest.approx((100 - 59) / 100, abs=1e-12)
    split = summarize_split(eps)
    assert split["MI"]["episodes"] == 3 and split["CI"]["episodes"] == 1
    assert split["CI"]["deal_rate"] == 0.0


def test_summarize_empty_gives_none():
    m = summarize([])
    assert m["episodes"] == 0 and m["reward"] is None and m["bargained_ratio"] is None


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    groups = {"a": [1.0, 1.0], "b": [0.0, 0.0], "c": [0.5, 0.5]}
    lo, hi = reward.bootstrap_ci(groups, n_boot=500, seed=1)
    assert lo <= 0.5 <= hi
    assert (lo, hi) == reward.bootstrap_ci(groups, n_boot=500, seed=1)
    assert reward.bootstrap_ci({"a": [0.3, 0.3]}) == (0.3, 0.3)


# --- the seller's reward (self-play): the mirror of the buyer's, same room --------------------------------------

def test_seller_score_by_hand():
    # budget 80, cost 50: room 30. A deal at 60 gives the seller (60 - 50) / 30 and the buyer (80 - 60) / 30.
    assert reward.seller_score(80.0, 50.0, 60.0) == pytest.approx(1 / 3)
    assert reward.seller_score(80.0, 50.0, 60.0) + score(80.0, 50.0, 60.0) == pytest.approx(1.0)  # zero-sum in MI
    assert reward.seller_score(80.0, 50.0, 80.0) == 1.0 and reward.seller_score(80.0, 50.0, 50.0) == 0.0
    assert reward.seller_score(80.0, 50.0, 120.0) == 1.0       # clipped (the budget rule stops such a deal anyway)
    assert reward.seller_score(80.0, 50.0, None) == 0.0        # no deal
    assert reward.seller_score(50.5, 50.0, 50.5) == pytest.approx(0.5)   # room floored at $1
    assert reward.seller_score(50.0, 50.0, 50.0) == 0.0         # a tie closes at cost


def test_a_regulated_seller_never_profits_from_breaking_the_rules():
    assert reward.seller_score(80.0, 50.0, 75.0, interventions=1) == -1.0   # even with a good deal after it
    assert reward.seller_score(80.0, 50.0, None, interventions=3) == -1.0
    assert reward.seller_score(80.0, 50.0, 75.0, interventions=1, intervention_penalty=-0.5) == -0.5
    assert reward.seller_score(80.0, 50.0, 75.0, interventions=0) == pytest.approx(25 / 30)

"""The GRPO math of train.py with hand-worked numbers. Tolerances are tight: a flipped sign or a wrong
normaliser fails every assertion here."""
import math

import pytest
import torch

from train import aggregate, group_advantages, kl_k3, pack_by_tokens, policy_loss, tis_weights

TOL = dict(rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_subtract_the_group_mean():
    # groups of 3: [1, 0, -1] mean 0 -> [1, 0, -1];  [0.2, 0.2, 0.8] mean 0.4 -> [-0.2, -0.2, 0.4]
    a = group_advantages([1.0, 0.0, -1.0, 0.2, 0.2, 0.8], group_size=3)
    torch.testing.assert_close(a, torch.tensor([1.0, 0.0, -1.0, -0.2, -0.2, 0.4]), **TOL)


def test_group_advantages_std_scale_uses_unbiased_std_plus_1e4():
    # group 1: deviations [1, 0, -1], unbiased var = (1 + 0 + 1) / (3 - 1) = 1, std 1 -> A / 1.0001
    #          = [0.99990001, 0, -0.99990001]
    # group 2: deviations [-0.2, -0.2, 0.4], var = (0.04 + 0.04 + 0.16) / 2 = 0.12, std = 0.34641016
    #          -> -0.2 / 0.34651016 = -0.57718365,  0.4 / 0.34651016 = 1.15436730
    a = group_advantages([1.0, 0.0, -1.0, 0.2, 0.2, 0.8], group_size=3, scale="std")
    torch.testing.assert_close(a, torch.tensor([0.99990001, 0.0, -0.99990001, -0.57718365, -0.57718365, 1.15436730]),
                               **TOL)


def test_group_advantages_pairs():
    # [1, 0] -> mean 0.5 -> [0.5, -0.5]; std = sqrt(0.5) = 0.70710678 -> 0.5 / 0.70720678 = 0.70700680
    # [0.5, -1] -> mean -0.25 -> [0.75, -0.75]; std = sqrt(1.125) = 1.06066017 -> 0.75 / 1.06076017 = 0.70704012
    r = torch.tensor([1.0, 0.0, 0.5, -1.0])
    torch.testing.assert_close(group_advantages(r, 2), torch.tensor([0.5, -0.5, 0.75, -0.75]), **TOL)
    torch.testing.assert_close(group_advantages(r, 2, "std"), torch.tensor([0.70700680, -0.70700680, 0.70704012,
                                                                             -0.70704012]), **TOL)
    assert r.tolist() == [1.0, 0.0, 0.5, -1.0]  # the input is untouched


def test_group_advantages_equal_rewards_give_zero_even_with_std():
    a = group_advantages([0.3] * 4, 4, "std")  # std 0: 0 / 1e-4 stays 0, no NaN
    assert a.tolist() == [0.0] * 4


def test_group_advantages_rejects_ragged_groups_and_bad_scale():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages([1.0, 2.0], 2, scale="rank")


# ---------------------------------------------------------------------------------------------------------------
# policy_loss: one hand-worked batch for every aggregation
#
# ratios  [[1.0, 1.5, 0.5],     A = [ 1.0,    mask [[1, 1, 0],
#          [0.9, 1.2, 2.0]]           -2.0]          [1, 1, 1]]      clip range [1 - 0.2, 1 + 0.28] = [0.8, 1.28]
#
# l = -min(r * A, clamp(r) * A)
#   seq 0 (A =  1): r=1.0 -> -min(1.0, 1.0) = -1.0 ; r=1.5 -> -min(1.5, 1.28) = -1.28 ; r=0.5 masked
#   seq 1 (A = -2): r=0.9 -> -min(-1.8, -1.8) = 1.8 ; r=1.2 -> -min(-2.4, -2.4) = 2.4 ;
#                   r=2.0 -> -min(-4.0, -2.56) = 4.0   (a bad action's ratio is never clipped from above)
#   masked sum = -1.0 - 1.28 + 1.8 + 2.4 + 4.0 = 5.92 over 5 tokens
# token:   5.92 / 5 = 1.184
# seq:     mean(( -1.0 - 1.28) / 2, (1.8 + 2.4 + 4.0) / 3) = mean(-1.14, 2.7333333) = 0.7966667
# dr_grpo: 5.92 / (2 sequences * max_tokens 4) = 0.74


def _batch():
    ratio = torch.tensor([[1.0, 1.5, 0.5], [0.9, 1.2, 2.0]])
    old = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.25, -1.5]])
    logp = (old + ratio.log()).requires_grad_(True)
    return logp, old, torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("agg, expected", [("token", 1.184), ("seq", 0.79666667), ("dr_grpo", 0.74)])
def test_policy_loss_hand_worked(agg, expected):
    logp, old, adv, mask = _batch()
    loss = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, agg=agg, max_tokens=4)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_policy_loss_gradient_hand_worked():
    # d l / d logp = -A * r where the unclipped term is the minimum, 0 where the clipped constant is, 0 off the mask.
    # token aggregation divides by 5:
    #   (0,0): -1 * 1.0 / 5 = -0.2   (0,1): clipped (r=1.5 > 1.28, A > 0) -> 0   (0,2): masked -> 0
    #   (1,0): 2 * 0.9 / 5 = 0.36    (1,1): 2 * 1.2 / 5 = 0.48                  (1,2): 2 * 2.0 / 5 = 0.8
    logp, old, adv, mask = _batch()
    policy_loss(logp, old, adv, mask).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.2, 0.0, 0.0], [0.36, 0.48, 0.8]]), **TOL)


def test_policy_loss_on_policy_gradient_is_the_reinforce_gradient():
    # ratio = 1 everywhere (old = logp): d loss / d logp = -A * mask / sum(mask), nothing clipped
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv, mask = torch.tensor([0.5, -1.5]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss = policy_loss(logp, logp.detach(), adv, mask)
    assert loss.item() == pytest.approx(-(0.5 + 0.5 - 1.5) / 3, abs=1e-7)  # = 1/6
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5 / 3, -0.5 / 3], [1.5 / 3, 0.0]]), **TOL)


def test_policy_loss_never_writes_into_its_inputs():
    logp, old, adv, mask = _batch()
    copies = [t.detach().clone() for t in (logp, old, adv, mask)]
    for agg in ("token", "seq", "dr_grpo"):
        policy_loss(logp, old, adv, mask, agg=agg, max_tokens=4).backward()
    for before, after in zip(copies, (logp, old, adv, mask)):
        assert torch.equal(before, after.detach())


def test_per_token_advantages_equal_broadcast_ones():
    logp, old, adv, mask = _batch()
    per_token = adv[:, None].expand(-1, 3)
    for agg in ("token", "seq", "dr_grpo"):
        a = policy_loss(logp, old, adv, mask, agg=agg, max_tokens=4)
        b = policy_loss(logp, old, per_token, mask, agg=agg, max_tokens=4)
        assert a.item() == b.item()


def test_importance_weight_folded_into_advantages_scales_each_token():
    # w > 0: -min(r*wA, clip(r)*wA) = w * -min(r*A, clip(r)*A). Weights [[2, 1, 1], [0.5, 1, 1]] change tokens
    # (0,0): -1.0 -> -2.0 and (1,0): 1.8 -> 0.9; token mean = (-2.0 - 1.28 + 0.9 + 2.4 + 4.0) / 5 = 0.804
    logp, old, adv, mask = _batch()
    w = torch.tensor([[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    assert policy_loss(logp, old, adv[:, None] * w, mask).item() == pytest.approx(0.804, abs=1e-6)


def test_aggregate_without_masked_tokens_is_zero_not_nan():
    per_token = torch.tensor([[float("nan"), 1.0]])  # masked-out values must never leak, even NaN
    mask = torch.zeros(1, 2)
    for agg in ("token", "seq", "dr_grpo"):
        assert aggregate(per_token, mask, agg, max_tokens=8).item() == 0.0


def test_dr_grpo_needs_max_tokens_and_unknown_agg_fails():
    logp, old, adv, mask = _batch()
    with pytest.raises(ValueError, match="max_tokens"):
        policy_loss(logp, old, adv, mask, agg="dr_grpo")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, agg="sequence")


# ---------------------------------------------------------------------------------------------------------------
# KL, importance weights, packing


def test_kl_k3_hand_worked():
    # d = ref - logp = 0.5: e^0.5 - 0.5 - 1 = 1.6487213 - 1.5 = 0.1487213;  d = -0.5: 0.6065307 - 0.5 = 0.1065307
    k = kl_k3(torch.tensor([0.0, 0.0, -1.0]), torch.tensor([0.5, -0.5, -1.0]))
    torch.testing.assert_close(k, torch.tensor([0.1487213, 0.1065307, 0.0]), **TOL)


def test_tis_weights_are_truncated_ratios_without_gradient():
    old = torch.tensor([-1.0, -1.0, -2.0], requires_grad=True)
    engine = torch.tensor([-1.0, -2.0, -1.0])
    w = tis_weights(old, engine, cap=2.0)
    # exp(0) = 1; exp(1) = 2.718 -> capped at 2; exp(-1) = 0.3678794
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-1)]), **TOL)
    assert not w.requires_grad


def test_pack_by_tokens_sorts_and_respects_the_budget():
    lengths = [5, 30, 10, 12, 8, 40]
    batches = pack_by_tokens(lengths, max_tokens=40)
    # longest first: 40 alone (2 * 40 > 40); 30 alone (2 * 30 > 40); 12, 10, 8 -> 3 * 12 = 36 <= 40; 4 * 12 > 40
    assert batches == [[5], [1], [3, 2, 4], [0]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 40


def test_pack_by_tokens_gives_an_overlong_sequence_its_own_batch():
    assert pack_by_tokens([100, 3, 3], max_tokens=10) == [[0], [1, 2]]
    assert pack_by_tokens([], max_tokens=10) == []

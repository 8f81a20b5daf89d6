"""The verifiable reward and the episode metrics. Pure functions, standard library only.

    score = -1                                   the buyer broke the protocol or went over budget
          =  0                                   no deal
          =  clip((budget - price) / room, -1, 1)  a deal, room = max(|budget - cost|, 1)

`room` is the size of the bargaining zone, floored at $1 so that a razor-thin zone cannot blow the reward up.
A deal at the seller's cost in an MI scenario scores 1 when the zone is at least $1 wide (else budget - cost);
at the budget, 0.

Where this differs from Xia et al.'s normalised buyer profit (their eval.py, Metrics.evaluate):
- The room floor. For 0 <= budget - cost < 1 they replace the budget by cost + 1 as well as setting room = 1
  (for -1 < budget - cost < 0, by cost - 1), so a deal at D scores cost + 1 - D there; ours keeps the budget and
  scores budget - D. Example: budget 10.00, cost 9.80, deal at 9.90: theirs 0.9, ours 0.1.
- Ties. A scenario with budget == cost is MI for them (CI means cost > budget), CI for us (MI means
  budget > cost; data.Scenario.mi and EpisodeStats.mi). Their budget is also 0.8 x list price unrounded, ours
  rounded to the cent, so on AmazonHistoryPrice six products (none held out) are ties only for us: for them
  budget - cost = 0.002, MI, and the floor applies.
- What is averaged. Theirs is a per-deal figure, averaged over the valid sessions that closed a deal, MI and CI
  apart; a session with an invalid action (unparseable, fake deal) is left out, not scored, and a session without
  a deal has no value. Ours scores every episode: 0 without a deal, -1 for a violation. Our `bargained_ratio`
  (MI deals only) is the figure that compares with theirs.
- Over budget. They have no budget rule: a deal above the budget counts, with its negative profit, unbounded.
  Ours is a budget violation, -1, and the score is clipped to [-1, 1] (with the regulated seller and the budget
  rule a deal already lands in [0, 1]; a CI deal is only possible at a tie, at 0).
- The price. Theirs is the amount written in the DEAL (it need only be within $0.01 of an offer, any earlier
  offer of the other side, not only the latest); ours is the offer's own price.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def room(budget: float, cost: float) -> float:
    return max(abs(budget - cost), 1.0)


def score(budget: float, cost: float, price: float | None, violation: bool = False) -> float:
    if violation:
        return -1.0
    if price is None:
        return 0.0
    if price > budget:
        return -1.0
    return min(1.0, max(-1.0, (budget - price) / room(budget, cost)))


def seller_score(budget: float, cost: float, price: float | None, interventions: int = 0,
                 intervention_penalty: float = -1.0) -> float:
    """The seller's verifiable reward, the mirror of `score`: for a deal clip((price - cost) / room, -1, 1) with
    the same room, 0 without one. A seller the regulation had to overrule (a below-cost [SELL] or [DEAL], a fake
    [DEAL], an unparseable reply: each replaced by [REJECT], so the buyer is never harmed) scores
    `intervention_penalty` for the episode, as a buyer's violation scores -1 for the buyer: breaking the rules
    never pays, even when a deal follows."""
    if interventions:
        return intervention_penalty
    if price is None:
        return 0.0
    return min(1.0, max(-1.0, (price - cost) / room(budget, cost)))


@dataclass
class EpisodeStats:
    """What the metrics need from one finished episode (env.Outcome provides these fields)."""
    reward: float
    reason: str                 # deal | quit | max_rounds | budget_violation | protocol_violation
    price: float | None
    budget: float
    cost: float
    list_price: float
    rounds: int = 0
    interventions: int = 0
    first_offer: float | None = None   # the buyer's first [BUY] price
    overshoot: bool = False            # some buyer BUY or DEAL above budget
    category: str = ""
    seller_replies: int = 0            # the seller's turns (the denominator of its intervention rate)
    seller_errors: int = 0             # seller turns with no valid action (counted among the interventions)
    extra: dict = field(default_factory=dict)

    @property
    def mi(self) -> bool:
        return self.budget > self.cost


def _mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def summarize(episodes) -> dict:
    """Every metric over a list of episodes (anything with EpisodeStats' fields). None where undefined.

    deal_rate, overshoot_rate, protocol_violation_rate: fractions of all episodes.
    bargained_ratio: mean (budget - price)/room over deals in MI scenarios (the paper's 0.84).
    first_offer_ratio: mean first BUY / budget over episodes with a BUY.
    ci_walkaway_rate: CI episodes that ended without a deal and without a violation / CI episodes.
    intervention_rate, seller_error_rate: interventions (and, among them, unparseable seller replies) per seller
    reply. below_cost_deals: a count, not a rate; the rules make it 0, and every run reports it to prove it.
    price_reduction: mean (list_price - price)/list_price over deals.
    """
    eps = list(episodes)
    n = len(eps)
    deals = [e for e in eps if e.reason == "deal"]
    ci = [e for e in eps if not e.mi]
    return {
        "episodes": n,
        "reward": _mean(e.reward for e in eps),
        "deal_rate": _mean(e.reason == "deal" for e in eps),
        "bargained_ratio": _mean((e.budget - e.price) / room(e.budget, e.cost) for e in deals if e.mi),
        "overshoot_rate": _mean(bool(e.overshoot) for e in eps),
        "protocol_violation_rate": _mean(e.reason == "protocol_violation" for e in eps),
        "first_offer_ratio": _mean(e.first_offer / e.budget for e in eps if e.first_offer is not None),
        "ci_walkaway_rate": _mean(e.reason in ("quit", "max_rounds") for e in ci),
        "mean_rounds": _mean(e.rounds for e in eps),
        "interventions_per_episode": _mean(e.interventions for e in eps),
        "intervention_rate": _ratio(sum(e.interventions for e in eps), sum(e.seller_replies for e in eps)),
        "seller_error_rate": _ratio(sum(e.seller_errors for e in eps), sum(e.seller_replies for e in eps)),
        "below_cost_deals": sum(e.reason == "deal" and e.price < e.cost - 1e-9 for e in eps),
        "price_reduction": _mean((e.list_price - e.price) / e.list_price for e in deals),
        "quit_rate": _mean(e.reason == "quit" for e in eps),
        "max_rounds_rate": _mean(e.reason == "max_rounds" for e in eps),
    }


def summarize_split(episodes) -> dict:
    """summarize() overall and for the MI and CI scenarios separately: {"all": ..., "MI": ..., "CI": ...}."""
    eps = list(episodes)
    return {"all": summarize(eps),
            "MI": summarize(e for e in eps if e.mi),
            "CI": summarize(e for e in eps if not e.mi)}


def bootstrap_ci(values_by_group: dict, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """95% confidence interval of the mean by resampling groups (products), not episodes: episodes of one
    product are correlated, so resampling them independently would make the interval too narrow."""
    import random
    groups = [list(v) for v in values_by_group.values() if len(v)]
    if not groups:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    sums, sizes = [sum(g) for g in groups], [len(g) for g in groups]   # each group's sum once, not per draw
    means = []
    for _ in range(n_boot):
        pick = rng.choices(range(len(groups)), k=len(groups))  # (4x faster than randrange per draw)
        means.append(sum(sums[k] for k in pick) / sum(sizes[k] for k in pick))
    means.sort()
    lo = means[int(alpha / 2 * n_boot)]
    hi = means[min(n_boot - 1, int((1 - alpha / 2) * n_boot))]
    return (lo, hi)

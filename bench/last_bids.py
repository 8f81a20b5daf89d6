"""What each last bid is worth against a scripted seller, by where its round-5 ask sits: at or under rung h, over
rung h but at most env.ASK_HIGH x the budget ("over" in the graded view), or beyond ("high"). For each state: the
share of the seller's games in it and the mean reward of a last bid on rungs d..h (taken when the bid reaches the
seller's last-round ask). Scripted sellers only (no model): under a second for all three.

    python bench/last_bids.py        # linear:1.0 (what the warm start's LLM seller imitates), boulware:0.5, hardliner:0.5

Why: it is the table behind env.ASK_HIGH (README, "The graded view"): against the linear family no last bid pays
once the round-5 ask is beyond 1.1 x the budget, so GRPO leaves that state to the KL, while the hard-liner plays
most of its games there and h is its worst last bid.
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import env  # noqa: E402

EPISODES_PER_PRODUCT, ROUNDS, BIDS = 4, 6, "defgh"


def state_of(ask: float, budget: float) -> str:
    rung = env.ladder_rung(ask, budget, graded=True)
    return rung if rung in ("over", "high") else "at or under h"


def last_bid_values(spec: str, scenarios) -> dict:
    """{state: {"share": ..., "d".."h": mean reward of that last bid}} for the family STRATEGY:JITTER."""
    strategy, _, jitter = spec.partition(":")
    seller = env.ScriptedSeller(strategy, jitter=float(jitter or 0), seed=1, style="ladder")
    sums, counts, total = collections.defaultdict(collections.Counter), collections.Counter(), 0
    for k, s in enumerate(scenarios):
        for rep in range(EPISODES_PER_PRODUCT):
            game = env.Game(env.Negotiation(s, ROUNDS, ladder=True), index=k * EPISODES_PER_PRODUCT + rep)
            exponent, margin = seller._params(game)   # this game's drawn type
            round5, last = (seller.ask(s, t, ROUNDS, exponent, margin) for t in (ROUNDS - 2, ROUNDS - 1))
            state = state_of(round5, s.budget)
            prices = dict(zip(env.LADDER_LETTERS, env.ladder_prices(s.budget)))
            for letter in BIDS:
                sums[state][letter] += env.score(s.budget, s.cost, prices[letter]) if prices[letter] >= last else 0.0
            counts[state] += 1
            total += 1
    return {state: {"share": counts[state] / total} | {b: sums[state][b] / counts[state] for b in BIDS}
            for state in ("at or under h", "over", "high") if counts[state]}


def main(specs) -> None:
    train, _ = data.split_scenarios(data.load_scenarios(), seed=0)
    print(f"{'seller':<14}{'round-5 ask':<15}{'share':>7}" + "".join(f"{b:>7}" for b in BIDS))
    for spec in specs:
        for state, row in last_bid_values(spec, train).items():
            print(f"{spec:<14}{state:<15}{row['share']:>7.1%}" + "".join(f"{row[b]:>7.2f}" for b in BIDS))


if __name__ == "__main__":
    main(sys.argv[1:] or ["linear:1.0", "boulware:0.5", "hardliner:0.5"])

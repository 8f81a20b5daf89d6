"""What each last bid is worth against a scripted seller, by where its round-5 ask sits: at or under rung h, over
rung h but at most env.ASK_HIGH x the budget ("over" in the graded view), or beyond ("high"). For each state: the
share of the seller's games in it and the mean reward of a last bid on rungs d..h (taken when the bid reaches the
seller's last-round ask). Then the same by bands of the round-5 ask over the budget (BANDS), the table behind the
threshold's value. Scripted sellers only (no model): about a second for all three.

    python bench/last_bids.py        # linear:1.0 (what the warm start's LLM seller imitates), boulware:0.5, hardliner:0.5

Why: it is the table behind env.ASK_HIGH (README, "The graded view"): against the linear family a last bid hardly
pays once the round-5 ask is beyond 1.05 x the budget, so GRPO leaves that state to the KL, while the hard-liner
plays most of its games there and h is its worst last bid; between 1.05 and 1.1 x the budget the boulware rewards f.
"""
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import env  # noqa: E402

EPISODES_PER_PRODUCT, ROUNDS, BIDS = 4, 6, "defgh"
BANDS = (0.95, 1.0, 1.05, 1.1, 1.2)   # upper edges of the round-5 ask / budget bands; the last band is open
STATES = ("at or under h", "over", "high")
BAND_LABELS = tuple(f"<= {e} x budget" for e in BANDS) + (f"> {BANDS[-1]} x budget",)


def state_of(ask: float, budget: float) -> str:
    rung = env.ladder_rung(ask, budget, graded=True)
    return rung if rung in ("over", "high") else STATES[0]


def band_of(ask: float, budget: float) -> str:
    return BAND_LABELS[next((i for i, e in enumerate(BANDS) if ask <= e * budget + 1e-9), len(BANDS))]


def last_bid_values(spec: str, scenarios, state_fn=state_of) -> dict:
    """{state: {"share": ..., "d".."h": mean reward of that last bid}} for the family STRATEGY:JITTER, the state of
    a game being state_fn(round-5 ask, budget)."""
    strategy, _, jitter = spec.partition(":")
    seller = env.ScriptedSeller(strategy, jitter=float(jitter or 0), seed=1, style="ladder")
    sums, counts, total = collections.defaultdict(collections.Counter), collections.Counter(), 0
    for k, s in enumerate(scenarios):
        prices = dict(zip(env.LADDER_LETTERS, env.ladder_prices(s.budget)))
        for rep in range(EPISODES_PER_PRODUCT):
            game = env.Game(env.Negotiation(s, ROUNDS, ladder=True), index=k * EPISODES_PER_PRODUCT + rep)
            exponent, margin = seller._params(game)   # this game's drawn type
            round5, last = (seller.ask(s, t, ROUNDS, exponent, margin) for t in (ROUNDS - 2, ROUNDS - 1))
            state = state_fn(round5, s.budget)
            for letter in BIDS:
                sums[state][letter] += env.score(s.budget, s.cost, prices[letter]) if prices[letter] >= last else 0.0
            counts[state] += 1
            total += 1
    return {state: {"share": counts[state] / total} | {b: sums[state][b] / counts[state] for b in BIDS}
            for state in STATES + BAND_LABELS if counts[state]}


def main(specs) -> None:
    train, _ = data.split_scenarios(data.load_scenarios(), seed=0)
    for state_fn in (state_of, band_of):
        print(f"{'seller':<14}{'round-5 ask':<20}{'share':>7}" + "".join(f"{b:>7}" for b in BIDS))
        for spec in specs:
            for state, row in last_bid_values(spec, train, state_fn).items():
                print(f"{spec:<14}{state:<20}{row['share']:>7.1%}" + "".join(f"{row[b]:>7.2f}" for b in BIDS))
        print()


if __name__ == "__main__":
    main(sys.argv[1:] or ["linear:1.0", "boulware:0.5", "hardliner:0.5"])

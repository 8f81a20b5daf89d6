"""How much room a scripted seller family leaves above the ladder teachers: the teachers' reward against it and
the best fixed ladder schedule's (all 1,716 searched on 128 train products, scored on the held-out ones), with the
best schedules ending on rung g and on rung h. Scripted players only (no model), about 2 min per family on 2 cores
(118-122 s on the AMD EPYC, AVX2).

    python bench/seller_families.py                      # linear:1.0 (the warm start's seller), mixed:0.5, mixed:1.0
    python bench/seller_families.py boulware:0.5 hardliner:0.5

Why: the warm start's LLM seller imitates a family, and GRPO's gain over the warm start is bounded by what the best
response to that family gains over the teachers (README, "The CPU default"). A family is STRATEGY:JITTER, with
STRATEGY one of env.ScriptedSeller.STRATEGIES or "mixed" (each game draws one of them).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import env  # noqa: E402
import eval as evaluation  # noqa: E402
import reward  # noqa: E402

SEARCH_PRODUCTS, EPISODES_PER_PRODUCT, ROUNDS = 128, 4, 6


def family_room(spec: str, train, test) -> dict:
    strategy, _, jitter = spec.partition(":")
    seller = env.ScriptedSeller(strategy, jitter=float(jitter or 0), seed=0, style="ladder")
    rep = [s for s in test for _ in range(EPISODES_PER_PRODUCT)]
    teachers = reward.summarize(g.outcome for g in env.play(rep, env.LadderBuyer(env.TEACHER_SCHEDULES, 0), seller,
                                                            ROUNDS))["reward"]
    best = evaluation.best_fixed_schedule(seller, train[:SEARCH_PRODUCTS], rep, ROUNDS, keep=len(env.TEACHER_SCHEDULES))
    by_end = {end: next(s for s, _ in best["top"] if s[-1] == end) for end in (6, 7)}   # best g / h ending (train)
    ends = {end: reward.summarize(g.outcome for g in env.play(rep, env.LadderBuyer([tuple(s)], 0), seller, ROUNDS))
            ["reward"] for end, s in by_end.items()}
    return {"family": spec, "teachers": teachers, "best": best["test"]["reward"], "best_schedule": best["schedule"],
            "best_g": ends[6], "best_h": ends[7]}


def main(argv: list[str]) -> None:
    specs = argv or ["linear:1.0", "mixed:0.5", "mixed:1.0"]
    train, test = data.split_scenarios(data.load_scenarios(skip_bad=True), seed=0)
    print(f"{'family':<14} {'teachers':>8} {'best fixed':>10} {'room':>6} {'best g-end':>10} {'best h-end':>10}  "
          f"best schedule  ({len(test) * EPISODES_PER_PRODUCT} held-out episodes)")
    for spec in specs:
        t0 = time.time()
        r = family_room(spec, train, test)
        letters = ",".join(env.LADDER_LETTERS[k] for k in r["best_schedule"])
        print(f"{spec:<14} {r['teachers']:>8.3f} {r['best']:>10.3f} {r['best'] - r['teachers']:>+6.3f} "
              f"{r['best_g']:>10.3f} {r['best_h']:>10.3f}  {letters}  ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

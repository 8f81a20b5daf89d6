"""The warm start's supervised data: scripted ladder episodes rendered in exactly the token layout the trainer
builds when the model generates the same replies (so supervision and GRPO see one and the same sequence)."""
import pytest

import env
import warmstart
from engine import Generation


class ReplayEngine:
    """An engine whose generations are given: call k answers each prompt with the next scripted reply, in the
    order env.play asks (pending games by index)."""
    lockstep = False

    def __init__(self, tokenizer, replies_per_call):
        self.tokenizer, self.calls = tokenizer, list(replies_per_call)
        self.eos = env.ChatFormat(tokenizer).eos_id

    def generate(self, prompts, temperature, max_tokens, adapter, seed):
        texts = self.calls.pop(0)
        assert len(texts) == len(prompts), "the replayed episode diverged from the scripted one"
        outs = []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False) + [self.eos]
            outs.append(Generation(ids, [0.0] * len(ids), text, True))
        return outs


@pytest.mark.parametrize("graded", [False, True])
def test_supervised_layout_is_the_trainers_layout(scenarios, tiny_model_dir, monkeypatch, graded):
    """The buyer's supervised transcripts are, token for token, what an LLM buyer builds when it generates the same
    replies; with --graded-view (env.ASK_HIGH) on both sides, an ask far above the budget reads "high" in both."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(warmstart, "GRADED_VIEW", graded)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher_games = warmstart.scripted_games(scenarios[:100], 24, seed=3)
    rounds = max(g.outcome.rounds for g in teacher_games)
    calls = [[[t.text for t in g.outcome.transcript if t.role == "buyer"][r]
              for g in teacher_games if g.outcome.rounds > r] for r in range(rounds)]
    buyer = env.LLMPlayer(ReplayEngine(tok, calls), "buyer", max_tokens=32, style="ladder", graded_view=graded)
    replayed = env.play([g.negotiation.scenario for g in teacher_games], buyer, warmstart.seller_family(3),
                        warmstart.MAX_ROUNDS)
    fmt = env.ChatFormat(tok)
    assert {g.outcome.reason for g in teacher_games} == {"deal", "max_rounds"}
    for teacher, played in zip(teacher_games, replayed):
        assert (played.outcome.reason, played.outcome.price) == (teacher.outcome.reason, teacher.outcome.price)
        example, conv = warmstart.render_buyer(teacher, fmt), played.state["buyer"]
        assert example.ids == conv.ids
        assert example.mask == conv.mask
    decoded = tok.decode(warmstart.render_buyer(teacher_games[0], fmt).ids)
    assert "Ask rung: " in decoded and "Talk:" not in decoded   # the ladder view: action and rung only
    texts = [tok.decode(warmstart.render_buyer(g, fmt).ids) for g in teacher_games]
    assert any("Ask rung: over" in t for t in texts)
    assert any("Ask rung: high" in t for t in texts) is graded


def test_supervised_seller_layout_is_the_trainers_layout(scenarios, tiny_model_dir):
    """The seller's side too: the scripted seller family's replies, replayed through an LLM seller, give exactly
    the ids and mask warmstart.render_seller supervises."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher_games = warmstart.scripted_games(scenarios[:100], 24, seed=5)
    seller_replies = [[t.text for t in g.outcome.transcript if t.role == "seller"] for g in teacher_games]
    calls = [[replies[r] for replies in seller_replies if len(replies) > r] for r in range(max(map(len, seller_replies)))]
    seller = env.LLMPlayer(ReplayEngine(tok, calls), "seller", max_tokens=32, style="ladder", adapter=False)
    replayed = env.play([g.negotiation.scenario for g in teacher_games], env.LadderBuyer(env.TEACHER_SCHEDULES, 5),
                        seller, warmstart.MAX_ROUNDS)
    fmt = env.ChatFormat(tok)
    assert {g.outcome.reason for g in teacher_games} == {"deal", "max_rounds"}
    assert any(t.text.endswith("[DEAL]") for g in teacher_games for t in g.outcome.transcript if t.role == "seller")
    for teacher, played in zip(teacher_games, replayed):
        assert (played.outcome.reason, played.outcome.price) == (teacher.outcome.reason, teacher.outcome.price)
        example, conv = warmstart.render_seller(teacher, fmt), played.state["seller"]
        assert example.ids == conv.ids
        assert example.mask == conv.mask
        assert played.outcome.interventions == 0
    decoded = tok.decode(warmstart.render_seller(teacher_games[0], fmt).ids)
    assert "Bid rung: " in decoded and "Talk:" not in decoded and "Rungs: a $" in decoded


def test_teachers_are_every_nondecreasing_schedule_and_never_overshoot(scenarios):
    schedules = env.TEACHER_SCHEDULES
    assert len(schedules) == len(set(schedules)) == 1716   # C(8 + 6 - 1, 6)
    assert all(len(s) == 6 and list(s) == sorted(s) and 0 <= s[0] and s[-1] < len(env.LADDER) for s in schedules)
    outcomes = warmstart.play_scripted(scenarios[:60] * 4, env.LadderBuyer(seed=0))
    assert not any(o.overshoot or o.reason == "protocol_violation" for o in outcomes)


def test_best_response_is_the_best_schedule_and_beats_the_mixture(scenarios):
    train = scenarios[:40]
    best = warmstart.best_response(train[:20], train[20:])
    mean = lambda outcomes: sum(o.reward for o in outcomes) / len(outcomes)
    some = env.TEACHER_SCHEDULES[::97] + [tuple(best["schedule"])]
    each = {s: mean(warmstart.play_scripted(train[:20], env.LadderBuyer([s]))) for s in some}
    assert each[tuple(best["schedule"])] == pytest.approx(best["train_reward"]) == pytest.approx(max(each.values()))
    mixture = mean(warmstart.play_scripted(train[:20] * 8, env.LadderBuyer(seed=0)))
    assert best["train_reward"] > mixture + 0.05   # room above imitation


def test_the_builds_seller_family_is_a_choice_and_a_bad_one_stops(monkeypatch):
    """warmstart.py --seller-strategy/--seller-jitter: the family every transcript and measurement of the build
    uses; an unknown strategy stops before any work, naming the choices."""
    monkeypatch.setattr(warmstart, "SELLER_STRATEGY", warmstart.SELLER_STRATEGY)
    monkeypatch.setattr(warmstart, "SELLER_JITTER", warmstart.SELLER_JITTER)
    warmstart.set_seller_family("mixed", 0.5)
    family = warmstart.seller_family(seed=3, group_size=8)
    assert (family.strategy, family.jitter, family.seed, family.group_size, family.style) == ("mixed", 0.5, 3, 8,
                                                                                               "ladder")
    with pytest.raises(ValueError, match="boulware"):
        warmstart.set_seller_family("haggler", 1.0)
    assert warmstart.SELLER_STRATEGY == "mixed"   # a refused choice changes nothing


def test_a_checkpoint_names_the_family_it_was_taught_and_trains_scripted_opponent_is_it(tmp_path):
    """The LLM seller of a run imitates its warm start's family, so train.py's "scripted family" opponent (the
    league's, the cross-play column) must be that family: read from the checkpoint, not assumed linear."""
    import json

    import config
    import train

    assert warmstart.family_of("checkpoints/warmstart") == ("linear", 1.0)
    assert warmstart.family_of("checkpoints/warmstart-mixed") == ("mixed", 1.0)
    assert warmstart.family_of(str(tmp_path)) == (warmstart.SELLER_STRATEGY, warmstart.SELLER_JITTER)  # no record
    (tmp_path / "warmstart_metrics.json").write_text(json.dumps(   # an older build: only its argv says it
        {"argv": ["--out", "x", "--seller-strategy", "hardliner", "--seller-jitter", "0.5"]}))
    assert warmstart.family_of(str(tmp_path)) == ("hardliner", 0.5)
    assert warmstart.seller_briefs(str(tmp_path), seed=5) is None   # an older build: never briefed
    assert warmstart.seller_briefs("checkpoints/warmstart", seed=5) is None
    assert warmstart.checkpoint_family("checkpoints/warmstart-plan") == ("linear", 1.0, True)   # shipped, briefed
    assert warmstart.seller_briefs("checkpoints/warmstart-plan", seed=5).strategy == "linear"
    (tmp_path / "warmstart_metrics.json").write_text(json.dumps(
        {"seller_family": {"strategy": "conceder", "jitter": 0.5, "plan": True}}))
    briefs = warmstart.seller_briefs(str(tmp_path), seed=5, group_size=8)
    assert (briefs.strategy, briefs.jitter, briefs.seed, briefs.group_size, briefs.style) == ("conceder", 0.5, 5, 8,
                                                                                              "ladder")
    cfg = config.load_config("configs/cpu-selfplay.yaml", ["model.name=checkpoints/warmstart-mixed"])
    seller = train.league_player(cfg, None, "seller", "scripted", seed=5, group_size=8)
    assert (seller.strategy, seller.jitter, seller.seed, seller.group_size, seller.style) == ("mixed", 1.0, 5, 8,
                                                                                              "ladder")


def test_a_graded_view_build_is_recorded_and_every_buyer_of_it_reads_that_view(tiny_model_dir, tmp_path):
    """warmstart.py --graded-view (env.ASK_HIGH) is recorded with the build, and train.py's and eval.py's buyers on
    that checkpoint read the same view (any other checkpoint: the plain one). That the build teaches exactly what
    such a buyer reads is test_supervised_layout_is_the_trainers_layout[True]."""
    import json
    import types

    from transformers import AutoTokenizer

    import config
    import eval as evaluation
    import train

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert not warmstart.graded_view(str(tmp_path))   # no record: the plain view
    assert not warmstart.graded_view("checkpoints/warmstart-plan")
    assert warmstart.graded_view("checkpoints/warmstart-graded")   # shipped, taught the graded view
    assert warmstart.checkpoint_family("checkpoints/warmstart-graded") == ("linear", 1.0, True)   # and briefed
    # a record names the threshold it was taught; one taught at another (the first build's record named none: 1.1)
    # stops with the fix instead of showing the buyer words where it never learnt them
    for record in ({"buyer_view": "graded"}, {"buyer_view": "graded", "ask_high": env.ASK_HIGH + 0.05}):
        (tmp_path / "warmstart_metrics.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match="ask_high .* rebuild it"):
            warmstart.graded_view(str(tmp_path))
    (tmp_path / "warmstart_metrics.json").write_text(json.dumps({"buyer_view": "graded", "ask_high": env.ASK_HIGH}))
    assert warmstart.graded_view(str(tmp_path))
    engine = ReplayEngine(tok, [])
    for name, graded in ((str(tmp_path), True), ("checkpoints/warmstart-plan", False)):
        cfg = config.load_config("configs/cpu.yaml", [f"model.name={name}"])
        assert train.build_buyer(cfg, engine, seed=0).graded_view is graded
        args = types.SimpleNamespace(buyer_temp=1.0, buyer_max_tokens=16, style="ladder", description_chars=400,
                                     max_context=1024, seed=0, resolved_base_model=name)
        assert evaluation.make_buyer(args, engine, {}, {"kind": "base"}).graded_view is graded
        args.style = "compact"   # no rungs, nothing to grade
        assert evaluation.make_buyer(args, engine, {}, {"kind": "base"}).graded_view is False


def test_evaluate_measures_a_checkpoint_as_it_was_built(monkeypatch):
    """warmstart.py --evaluate rewrites the checkpoint's record, so it takes the build's settings from that record,
    not from flags left out: re-measuring the shipped graded warm start keeps it briefed and graded."""
    for name in ("SELLER_STRATEGY", "SELLER_JITTER", "SELLER_PLAN", "GRADED_VIEW"):
        monkeypatch.setattr(warmstart, name, getattr(warmstart, name))
    warmstart.adopt_build("checkpoints/warmstart-graded")
    assert (warmstart.SELLER_STRATEGY, warmstart.SELLER_JITTER, warmstart.SELLER_PLAN, warmstart.GRADED_VIEW) == \
        ("linear", 1.0, True, True)
    warmstart.adopt_build("checkpoints/warmstart-mixed")
    assert (warmstart.SELLER_STRATEGY, warmstart.SELLER_JITTER, warmstart.SELLER_PLAN, warmstart.GRADED_VIEW) == \
        ("mixed", 1.0, False, False)

"""The protocol grammar, every episode rule through replay, the regulated seller, information isolation,
and a soak of scripted episodes over the real products."""

import re
import time

import pytest
from hypothesis import given, settings, strategies as st

import env
from data import Scenario
from env import Action, ProtocolError, parse_action, replay

# budget 80, cost 50, list 100: room 30
S = Scenario("B0TEST0001", "Widget", "A fine widget.", "tools", 100.0, 80.0, 50.0)
CI = Scenario("B0TEST0002", "Gadget", "A gadget.", "tools", 50.0, 40.0, 45.0)


def msg(action: str, thought: str = "thinking", talk: str = "hello") -> str:
    return f"Thought: {thought}\nTalk: {talk}\nAction: {action}"


# --- grammar ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,role,expected", [
    ("Action: [BUY] $12.50 (1x B0TEST0001)", "buyer", Action("BUY", 12.5)),
    ("Action: [BUY] 12", "buyer", Action("BUY", 12.0)),
    ("Action: [buy] $1,299.99", "buyer", Action("BUY", 1299.99)),
    ("  action: [Deal] $1,000,000.5 (1x x)", "buyer", Action("DEAL", 1000000.5)),
    ("ACTION: [SELL] $ 7.1", "seller", Action("SELL", 7.1)),
    ("Action: [REJECT] $99", "buyer", Action("REJECT")),
    ("Action: [QUIT] whatever $3", "seller", Action("QUIT")),
    ("Action: I say [BUY] $20 then [QUIT]", "buyer", Action("BUY", 20.0)),
    ("Action: [BUY] $20. Thanks!", "buyer", Action("BUY", 20.0)),
    ("Action: [BUY] price is $30 (1x B07)", "buyer", Action("BUY", 30.0)),
])
def test_valid_forms(text, role, expected):
    assert parse_action(text, role) == expected


@pytest.mark.parametrize("text,role,why", [
    ("Thought: I will [BUY] $10\nTalk: ok", "buyer", "no line starting with 'Action:'"),
    ("Action: buy 10 dollars", "buyer", "no .* tag"),
    ("Action: [BUY]", "buyer", "needs a price"),
    ("Action: [BUY] $0", "buyer", "positive"),
    ("Action: [BUY] $0.00", "buyer", "positive"),
    ("Action: [BUY] $12.345", "buyer", "needs a price"),
    ("Action: [BUY] $1,29", "buyer", "needs a price"),
    ("Action: [BUY] $-5", "buyer", "needs a price"),
    ("Action: [SELL] $10", "buyer", "may not use"),
    ("Action: [BUY] $10", "seller", "may not use"),
    ("Action: [DEAL]", "seller", "needs a price"),
    ("The Action: [BUY] $10", "buyer", "no line starting"),
    ("", "buyer", "no line starting"),
])
def test_invalid_forms(text, role, why):
    with pytest.raises(ProtocolError, match=why):
        parse_action(text, role)


def test_protocol_error_is_a_value_error():
    assert issubclass(ProtocolError, ValueError)


def test_last_action_line_wins():
    text = "Action: [BUY] $10\nTalk: wait\nAction: [QUIT]"
    assert parse_action(text, "buyer") == Action("QUIT")
    assert parse_action("Action: [QUIT]\nAction: [BUY] $11", "buyer") == Action("BUY", 11.0)


def test_tags_inside_thought_or_talk_are_ignored():
    text = "Thought: maybe [DEAL] $99 or [QUIT]\nTalk: I could [BUY] $5\nAction: [REJECT]"
    assert parse_action(text, "buyer") == Action("REJECT")


def test_unknown_role():
    with pytest.raises(ValueError):
        parse_action("Action: [QUIT]", "referee")


@settings(max_examples=400, deadline=None)
@given(st.text())
def test_parse_action_on_arbitrary_text_returns_action_or_protocol_error(text):
    for role in ("buyer", "seller"):
        try:
            a = parse_action(text, role)
        except ProtocolError:
            continue
        assert a.kind in (env.BUYER_KINDS if role == "buyer" else env.SELLER_KINDS)
        assert (a.price is None) == (a.kind not in env.PRICED)
        if a.price is not None:
            assert a.price > 0 and a.price < float("inf")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="Action:[]BUYSELDQIT$0123456789.,\n -x", max_size=60))
def test_parse_action_on_protocol_like_text(text):
    try:
        parse_action(text, "buyer")
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value="0.01", max_value="9999999.99", places=2))
def test_formatted_prices_roundtrip(price):
    a = Action("BUY", float(price))
    assert parse_action("Action: " + a.format("B0X"), "buyer") == a


# --- episode rules ---------------------------------------------------------------------------------------------

def test_buyer_deal_on_seller_offer():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $70"), msg("[DEAL] $70.00 (1x B0TEST0001)")])
    assert (o.reason, o.price, o.rounds, o.interventions) == ("deal", 70.0, 2, 0)
    assert o.reward == pytest.approx((80 - 70) / 30, abs=1e-12)
    assert o.first_offer == 40.0 and not o.overshoot


def test_deal_within_one_cent_closes_at_the_sellers_price():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $70"), msg("[DEAL] $69.99")])
    assert (o.reason, o.price) == ("deal", 70.0)


def test_seller_deal_closes_at_buyers_price():
    o = replay(S, [msg("[BUY] $60"), msg("[DEAL] $60")])
    assert (o.reason, o.price, o.rounds) == ("deal", 60.0, 1)
    assert o.reward == pytest.approx(20 / 30, abs=1e-12)


def test_fake_buyer_deal_is_a_protocol_violation():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $70"), msg("[DEAL] $60")])
    assert (o.reason, o.reward, o.price) == ("protocol_violation", -1.0, None)
    assert "fake deal" in o.transcript[-1].note


def test_buyer_deal_before_any_sell_is_fake():
    o = replay(S, [msg("[DEAL] $60")])
    assert (o.reason, o.reward) == ("protocol_violation", -1.0)


def test_deal_copies_the_most_recent_sell_not_an_older_one():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $70"), msg("[BUY] $45"), msg("[SELL] $65"), msg("[DEAL] $70")])
    assert o.reason == "protocol_violation"


def test_fake_seller_deal_becomes_reject_and_counts():
    o = replay(S, [msg("[BUY] $40"), msg("[DEAL] $75"), msg("[QUIT]")])
    assert (o.reason, o.interventions, o.reward) == ("quit", 1, 0.0)
    assert o.transcript[1].relayed.endswith("Action: [REJECT]")
    assert "fake seller deal" in o.transcript[1].note


def test_seller_deal_before_any_buy_is_fake():
    o = replay(S, [msg("[REJECT]"), msg("[DEAL] $75"), msg("[QUIT]")])
    assert o.interventions == 1


def test_unparseable_buyer_reply_is_a_protocol_violation():
    o = replay(S, ["I'd like to buy it for forty dollars"])
    assert (o.reason, o.reward, o.rounds) == ("protocol_violation", -1.0, 1)


def test_unparseable_seller_reply_becomes_reject_and_keeps_talk():
    o = replay(S, [msg("[BUY] $40"), "Talk: let me think\nAction: [SELL] lots", msg("[QUIT]")])
    assert o.interventions == 1 and o.reason == "quit"
    assert o.transcript[1].relayed == "Talk: let me think\nAction: [REJECT]"


def test_buy_above_budget_is_a_budget_violation():
    o = replay(S, [msg("[BUY] $80.01")])
    assert (o.reason, o.reward) == ("budget_violation", -1.0)
    assert o.overshoot


def test_buy_at_exactly_the_budget_is_allowed():
    o = replay(S, [msg("[BUY] $80"), msg("[DEAL] $80")])
    assert (o.reason, o.price, o.reward) == ("deal", 80.0, 0.0)


def test_deal_above_budget_is_a_budget_violation():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $90"), msg("[DEAL] $90")])
    assert (o.reason, o.reward, o.overshoot) == ("budget_violation", -1.0, True)


def test_buyer_quit():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $90"), msg("[QUIT]")])
    assert (o.reason, o.reward, o.price) == ("quit", 0.0, None)


def test_seller_quit():
    o = replay(S, [msg("[BUY] $40"), msg("[QUIT]")])
    assert (o.reason, o.reward) == ("quit", 0.0)


def test_reject_passes_the_turn():
    o = replay(S, [msg("[REJECT]"), msg("[SELL] $70"), msg("[REJECT]"), msg("[SELL] $65"), msg("[DEAL] $65")])
    assert (o.reason, o.price, o.rounds) == ("deal", 65.0, 3)
    assert o.first_offer is None


def test_max_rounds_ends_without_deal_after_the_sellers_last_reply():
    replies = [msg("[BUY] $40"), msg("[SELL] $90")] * 6 + [msg("[DEAL] $90")]
    o = replay(S, replies)
    assert (o.reason, o.rounds, o.price, o.reward) == ("max_rounds", 6, None, 0.0)
    assert len(o.transcript) == 12


def test_configurable_rounds():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $90")], max_rounds=1)
    assert (o.reason, o.rounds) == ("max_rounds", 1)


def test_seller_deal_in_the_last_round_still_closes():
    replies = [msg("[BUY] $40"), msg("[SELL] $90")] * 5 + [msg("[BUY] $60"), msg("[DEAL] $60")]
    o = replay(S, replies)
    assert (o.reason, o.price, o.rounds) == ("deal", 60.0, 6)


def test_replies_after_the_end_are_ignored_and_running_out_raises():
    o = replay(S, [msg("[QUIT]"), "ignored", "ignored"])
    assert o.reason == "quit" and len(o.transcript) == 1
    with pytest.raises(ValueError, match="ran out of replies"):
        replay(S, [msg("[BUY] $40"), msg("[SELL] $90")])


# --- the regulated seller ----------------------------------------------------------------------------------------

def test_seller_sell_below_cost_becomes_reject():
    o = replay(S, [msg("[BUY] $40"), msg("[SELL] $45", talk="Fine, $45."), msg("[DEAL] $45")])
    assert o.transcript[1].relayed == "Talk: Fine, $45.\nAction: [REJECT]"
    assert o.interventions == 1
    assert o.reason == "protocol_violation"  # the buyer's DEAL copies no valid SELL


def test_seller_deal_below_cost_becomes_reject():
    o = replay(S, [msg("[BUY] $40"), msg("[DEAL] $40"), msg("[QUIT]")])
    assert (o.reason, o.interventions, o.price) == ("quit", 1, None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["BUY", "DEAL", "REJECT", "QUIT"]), st.floats(1, 120),
                          st.sampled_from(["SELL", "DEAL", "REJECT", "QUIT", "garbage"]), st.floats(1, 120)),
                min_size=6, max_size=6))
def test_no_deal_ever_closes_below_cost_or_above_budget(moves):
    replies = []
    for bk, bp, sk, sp in moves:
        replies.append(msg(f"[{bk}] ${bp:.2f}"))
        replies.append("nonsense" if sk == "garbage" else msg(f"[{sk}] ${sp:.2f}"))
    o = replay(S, replies)
    if o.reason == "deal":
        assert S.cost <= o.price <= S.budget
        assert 0.0 <= o.reward <= 1.0
    assert o.reward in (-1.0, 0.0) or o.reason == "deal"


def test_ci_scenario_deal_is_impossible_within_budget():
    # CI: cost 45 > budget 40. Any seller price the regulation lets through is >= 45 > budget.
    o = replay(CI, [msg("[BUY] $40"), msg("[DEAL] $40"), msg("[QUIT]")])
    assert (o.reason, o.interventions) == ("quit", 1)


# --- the ladder style: rung letters and a bare [DEAL] ---------------------------------------------------------------

def test_ladder_rungs_and_the_rung_of_an_ask():
    assert env.ladder_prices(80.0) == [24.0, 32.0, 40.0, 48.0, 56.0, 64.0, 72.0, 76.0]
    assert [env.ladder_rung(p, 80.0) for p in (1.0, 24.0, 24.01, 40.0, 40.01, 76.0, 76.01, 80.0)] == \
        ["a", "a", "b", "c", "d", "h", "over", "over"]
    # graded (env.ASK_HIGH): above the top rung, "over" up to 1.05 x the budget (84.00 here), "high" beyond
    assert [env.ladder_rung(p, 80.0, graded=True) for p in (76.0, 76.01, 84.0, 84.01, 200.0)] == \
        ["h", "over", "over", "high", "high"]
    assert env.ladder_rung(84.01, 80.0) == "over"   # the plain view has one word for both


@pytest.mark.parametrize("text,last_sell,expected", [
    ("Thought: e\nAction: [BUY] e", None, "Thought: e\nAction: [BUY] $56.00"),
    ("Action: [buy] a (1x B0TEST0001)", None, "Action: [buy] $24.00 (1x B0TEST0001)"),
    ("Action: [DEAL]", 70.0, "Action: [DEAL] $70.00"),
    ("Action: [DEAL]", None, "Action: [DEAL]"),            # nothing to accept yet: left to the rules
    ("Action: [DEAL] $65", 70.0, "Action: [DEAL] $65"),    # a written price is the buyer's claim, checked as usual
    ("Action: [BUY] $40", None, "Action: [BUY] $40"),
    ("Action: [BUY] each", None, "Action: [BUY] each"),    # a word, not a rung
    ("Action: [BUY] z", None, "Action: [BUY] z"),
    ("Thought: [BUY] e\nTalk: hi", None, "Thought: [BUY] e\nTalk: hi"),  # no action line
])
def test_expand_ladder(text, last_sell, expected):
    assert env.expand_ladder(text, 80.0, last_sell) == expected


def test_ladder_rules_through_replay():
    o = replay(S, ["Thought: c\nAction: [BUY] c", msg("[SELL] $70"), "Thought: f\nAction: [BUY] f",
                   msg("[SELL] $60"), "Thought: f\nAction: [DEAL]"], ladder=True)
    assert (o.reason, o.price, o.first_offer, o.overshoot) == ("deal", 60.0, 40.0, False)
    assert o.transcript[0].text == "Thought: c\nAction: [BUY] c"            # what the model wrote, kept
    assert o.transcript[0].relayed == "Talk: \nAction: [BUY] $40.00 (1x B0TEST0001)"  # what the seller read
    assert o.reward == pytest.approx((80 - 60) / 30, abs=1e-12)


def test_ladder_bare_deal_above_budget_or_before_any_offer_and_letters_without_the_ladder():
    over = replay(S, ["Action: [BUY] h", msg("[SELL] $85"), "Action: [DEAL]"], ladder=True)
    assert (over.reason, over.reward, over.overshoot) == ("budget_violation", -1.0, True)
    early = replay(S, ["Action: [DEAL]", msg("[SELL] $85")], ladder=True)
    assert (early.reason, early.reward) == ("protocol_violation", -1.0)
    plain = replay(S, ["Action: [BUY] e", msg("[SELL] $85")])
    assert (plain.reason, plain.reward) == ("protocol_violation", -1.0)


def test_ladder_buyer_plays_by_the_ladder_rules_and_never_overshoots(scenarios):
    games = env.play(scenarios[:200], env.LadderBuyer(seed=1), env.ScriptedSeller("linear", jitter=1.0))
    for g in games:
        o = g.outcome
        again = replay(o.scenario, [t.text for t in o.transcript], ladder=True)
        assert (again.reason, again.price, again.reward) == (o.reason, o.price, o.reward)
        assert not o.overshoot and o.reason in ("deal", "max_rounds")
        rungs = env.ladder_prices(o.scenario.budget)
        assert all(t.action.price in rungs for t in o.transcript if t.role == "buyer" and t.action.kind == "BUY")
    assert {g.outcome.reason for g in games} == {"deal", "max_rounds"}


def test_scripted_buyer_of_a_style():
    assert isinstance(env.scripted_buyer("ladder"), env.LadderBuyer)
    assert isinstance(env.scripted_buyer("compact"), env.ScriptedBuyer)
    assert isinstance(env.scripted_buyer("full"), env.ScriptedBuyer)


def test_ladder_buyer_reads_the_sellers_action_and_the_rung_of_the_ask():
    relayed = "Talk: x\nAction: [SELL] $60.00 (1x B0TEST0001)"
    assert env.buyer_view(relayed, S, 60.0, "ladder") == "Seller [SELL] $60.00\nAsk rung: f"
    assert env.buyer_view("Talk: x\nAction: [REJECT]", S, None, "ladder") == "Seller [REJECT]"
    assert env.buyer_view("Talk: x\nAction: [REJECT]", S, 60.0, "ladder") == "Seller [REJECT]\nAsk rung: f"
    assert env.buyer_view("Talk: x\nAction: [SELL] $60.00", S, 60.0, "compact") == "Talk: x\nAction: [SELL] $60.00"
    far = "Talk: x\nAction: [SELL] $95.00 (1x B0TEST0001)"
    assert env.buyer_view(far, S, 95.0, "ladder") == "Seller [SELL] $95.00\nAsk rung: over"
    assert env.buyer_view(far, S, 95.0, "ladder", graded=True) == "Seller [SELL] $95.00\nAsk rung: high"
    assert env.buyer_view(far, S, 95.0, "compact", graded=True) == far   # only the ladder style has rungs


# --- the seller's ladder: rungs from cost to list price ----------------------------------------------------------

def test_seller_rungs_run_from_cost_to_list_price_and_the_rung_of_a_bid():
    assert env.seller_prices(S) == [50.0, 55.0, 60.0, 65.0, 70.0, 75.0, 80.0, 85.0, 90.0, 95.0, 100.0]
    assert [env.bid_rung(b, S) for b in (10.0, 49.99, 50.0, 54.99, 55.0, 99.0, 100.0, 120.0)] == \
        ["under", "under", "a", "a", "b", "j", "k", "k"]
    assert env.seller_rung_at_or_above(56.0, S) == 2 and env.seller_rung_at_or_above(500.0, S) == 10
    odd = Scenario("B0TEST0003", "Odd", "", "tools", 10.0, 8.0, 3.333)   # a cost off the cent: no rung below it
    assert min(env.seller_prices(odd)) >= odd.cost


@pytest.mark.parametrize("text,last_buy,expected", [
    ("Thought: c\nAction: [SELL] c", 40.0, "Thought: c\nAction: [SELL] $60.00"),
    ("Thought: a\nAction: [DEAL]", 52.0, "Thought: a\nAction: [DEAL] $52.00"),
    ("Action: [DEAL]", None, "Action: [DEAL]"),                     # nothing to accept: left for the rules
    ("Action: [SELL] l", 40.0, "Action: [SELL] l"),                 # no rung l: unparseable, an intervention
    ("Action: [SELL] $45.00", 40.0, "Action: [SELL] $45.00"),       # a price written out is kept as it is
    ("Action: [QUIT]", 40.0, "Action: [QUIT]"),
])
def test_expand_seller_ladder(text, last_buy, expected):
    assert env.expand_seller_ladder(text, S, last_buy) == expected


def test_seller_ladder_rules_and_the_regulation_on_a_models_mistakes():
    # a rung, then a bare [DEAL] of a bid at or above cost: closes at the buyer's bid
    o = replay(S, [msg("[BUY] $40"), "Thought: k\nAction: [SELL] k", msg("[BUY] $60"), "Thought: c\nAction: [DEAL]"],
               seller_ladder=True)
    assert (o.reason, o.price, o.interventions) == ("deal", 60.0, 0)
    assert o.transcript[1].relayed.endswith("[SELL] $100.00 (1x B0TEST0001)")
    # a bare [DEAL] of a bid below cost, a written price below cost, a fake rung: each becomes REJECT
    o = replay(S, [msg("[BUY] $40"), "Action: [DEAL]", msg("[BUY] $45"), "Action: [SELL] $45.00",
                   msg("[BUY] $46"), "Action: [SELL] z", msg("[QUIT]")], seller_ladder=True)
    assert (o.reason, o.price, o.interventions) == ("quit", None, 3)
    assert all(t.relayed.endswith("[REJECT]") for t in o.transcript if t.role == "seller")
    assert (o.seller_replies, o.seller_errors) == (3, 1)
    # without the seller ladder a letter is no price: unparseable, an intervention
    o = replay(S, [msg("[BUY] $40"), "Action: [SELL] c", msg("[QUIT]")])
    assert o.interventions == 1 and o.transcript[1].relayed.endswith("[REJECT]")


def test_seller_reads_the_buyers_action_and_the_rung_of_the_bid():
    relayed = "Talk: \nAction: [BUY] $62.00 (1x B0TEST0001)"
    assert env.seller_view(relayed, S, 62.0, "ladder") == "Buyer [BUY] $62.00\nBid rung: c"
    assert env.seller_view("Talk: x\nAction: [BUY] $20.00", S, 20.0, "ladder") == "Buyer [BUY] $20.00\nBid rung: under"
    assert env.seller_view(relayed, S, 62.0, "compact") == relayed
    opening = env.seller_opening(S, env.seller_view(relayed, S, 62.0, "ladder"), style="ladder")
    assert "Rungs: a $50.00, b $55.00" in opening[1]["content"] and "k $100.00" in opening[1]["content"]
    assert opening[1]["content"].endswith("Buyer [BUY] $62.00\nBid rung: c")


def test_ladder_scripted_seller_asks_its_nearest_rung_and_never_needs_the_regulation(scenarios):
    rep = scenarios[:80] * 3
    plain = env.play(rep, env.LadderBuyer(seed=1), env.ScriptedSeller("linear", jitter=1.0, seed=2), 6)
    ladder = env.play(rep, env.LadderBuyer(seed=1), env.ScriptedSeller("linear", jitter=1.0, seed=2, style="ladder"), 6)
    for p, q in zip(plain, ladder):
        s = q.negotiation.scenario
        assert q.outcome.interventions == 0 and q.outcome.seller_errors == 0
        for t in q.outcome.transcript:
            if t.role == "seller" and t.action.kind == "SELL":
                assert t.action.price in env.seller_prices(s) and t.text.endswith(f"[SELL] {t.text[9]}")
        if q.outcome.reason == "deal":
            assert q.outcome.price >= s.cost
    mean = lambda games: sum(g.outcome.reward for g in games) / len(games)  # noqa: E731
    assert abs(mean(plain) - mean(ladder)) < 0.03   # the rounding barely moves the family


# --- information isolation ---------------------------------------------------------------------------------------

def test_thought_is_never_relayed():
    o = replay(S, [msg("[BUY] $40", thought="SECRET-BUYER my budget is 80"),
                   msg("[SELL] $70", thought="SECRET-SELLER my cost is 50"), msg("[QUIT]")])
    for t in o.transcript:
        assert "SECRET" not in t.relayed and "Thought" not in t.relayed
    assert env.talk_of("Talk: a\nThought: hidden\nmore hidden\nAction: [QUIT]") == "a"


def test_talk_spanning_lines_is_kept():
    assert env.talk_of("Thought: x\nTalk: line one\nline two\nAction: [QUIT]") == "line one\nline two"


def _money_figures(text):
    return {float(m.replace(",", "")) for m in re.findall(r"\$\s?([\d,]+(?:\.\d+)?)", text)}


def test_prompts_never_leak_private_numbers(scenarios):
    for s in scenarios:
        for style in ("full", "compact", "ladder"):
            buyer_text = " ".join(m["content"] for m in env.buyer_opening(s, style))
            seller_text = " ".join(m["content"] for m in env.seller_opening(s, "Talk: hi\nAction: [REJECT]",
                                                                          env.load_persona("prober"), style))
            assert f"{s.budget:,.2f}" in buyer_text
            # (the rungs are fixed fractions of the budget; one can equal the cost by coincidence, not by a leak)
            public = (s.list_price, s.budget) + (tuple(env.ladder_prices(s.budget)) if style == "ladder" else ())
            assert s.cost not in _money_figures(buyer_text) or s.cost in public
            seller_public = (s.list_price, s.cost) + (tuple(env.seller_prices(s)) if style == "ladder" else ())
            assert s.budget not in _money_figures(seller_text) or s.budget in seller_public
            assert f"{s.cost:,.2f}" in seller_text


def test_environment_text_for_each_side_over_many_episodes(scenarios):
    """Everything the environment writes for the seller (its prompt and the relayed buyer messages) never holds
    the budget figure unless the buyer itself said it; nothing written for the buyer holds the cost figure."""
    games = env.play(scenarios[:300], env.ScriptedBuyer(end=0.95), env.ScriptedSeller("linear"))
    for g in games:
        s = g.negotiation.scenario
        seller_prompt = " ".join(m["content"] for m in env.seller_opening(s, "x", ""))
        assert s.budget not in _money_figures(seller_prompt) or s.budget in (s.list_price, s.cost)
        for t in g.outcome.transcript:
            assert "Thought" not in t.relayed
            if t.role == "buyer" and t.action.kind == "BUY":  # this scripted buyer never bids its full budget
                assert s.budget not in _money_figures(t.relayed)
            else:                  # relayed to the buyer: the regulated seller never offers below cost...
                assert all(p >= s.cost for p in _money_figures(t.relayed.split("Action:")[1]))


# --- personas ----------------------------------------------------------------------------------------------------

def test_personas():
    names = env.list_personas()
    assert {"neutral", "begging", "insulting", "unyielding"} <= set(names) and len(names) >= 6
    assert env.load_persona("neutral") == ""
    assert "beg" in env.load_persona("begging").lower() or "plead" in env.load_persona("begging").lower()
    with pytest.raises(ValueError, match="available: .*neutral"):
        env.load_persona("grumpy")


# --- scripted players and the lockstep runner ---------------------------------------------------------------------

def test_scripted_buyer_og_narrator_offers():
    g = env.play([S], env.ScriptedBuyer(), env.ScriptedSeller("hardliner"))[0]
    offers = [t.action.price for t in g.outcome.transcript if t.role == "buyer" and t.action.kind == "BUY"]
    # 0.5 -> 1.0 of the budget 80 over 6 rounds: 40, 48, 56, 64, 72, 80. The hard-liner (exponent 0.1, margin
    # 15%: floor 57.50) asks 57.5 + 42.5 * (1 - (t/5)^10) = 100, 100, 100, 99.74, 95.44 in rounds 1-5, all above the
    # bids. In round 6 its ask 95.44 is above the budget: Xia's generator bids the full $80 (it used to quit here),
    # and the seller's last ask, its floor 57.50, is below $80, so it takes it: a deal at the budget, reward 0/30.
    assert offers == [40.0, 48.0, 56.0, 64.0, 72.0, 80.0]
    asks = [t.action.price for t in g.outcome.transcript if t.role == "seller" and t.action.kind == "SELL"]
    assert asks == [100.0, 100.0, 100.0, 99.74, 95.44]
    assert g.outcome.transcript[-1].action == Action("DEAL", 80.0)
    assert (g.outcome.reason, g.outcome.price, g.outcome.rounds, g.outcome.reward) == ("deal", 80.0, 6, 0.0)


def test_scripted_buyer_bids_its_budget_in_the_last_round_and_the_round_limit_ends_it():
    # CI: list 50, budget 40, cost 45. The hard-liner's floor is min(45 * 1.15, 50) = 50, so it asks $50 every
    # round. Bids 20, 24, 28, 32, 36, then the full budget $40 in round 6 ([BUY], not [QUIT]); the seller answers
    # $50 > $40 and the round limit ends the game without a deal: reward 0, a CI walk-away.
    g = env.play([CI], env.ScriptedBuyer(), env.ScriptedSeller("hardliner"))[0]
    buyer = [t.action for t in g.outcome.transcript if t.role == "buyer"]
    assert buyer == [Action("BUY", p) for p in (20.0, 24.0, 28.0, 32.0, 36.0, 40.0)]
    assert (g.outcome.reason, g.outcome.price, g.outcome.rounds, g.outcome.reward) == ("max_rounds", None, 6, 0.0)


def test_scripted_buyer_accepts_only_an_ask_strictly_below_its_bid():
    # Xia's deal condition: DEAL once the ask is below this round's bid, strictly. Bids 40, 48, 56, 64, ... (S:
    # budget 80, cost 50). A seller asking $60 then $56.00 meets round 3's bid 80 * 0.7 = $56.00 exactly: the buyer
    # bids $56.00 (no DEAL); the seller's $55.99 in round 3 is below round 4's bid $64.00, so it takes that:
    # reward (80 - 55.99) / 30.
    class Asks:
        def reply(self, games):
            return [msg(f"[SELL] ${(60.0, 56.0, 55.99)[g.negotiation.round - 1]:.2f}") for g in games]

    g = env.play([S], env.ScriptedBuyer(), Asks())[0]
    buyer = [t.action for t in g.outcome.transcript if t.role == "buyer"]
    assert buyer == [Action("BUY", 40.0), Action("BUY", 48.0), Action("BUY", 56.0), Action("DEAL", 55.99)]
    assert (g.outcome.reason, g.outcome.price, g.outcome.interventions) == ("deal", 55.99, 0)
    assert g.outcome.reward == pytest.approx(24.01 / 30, abs=1e-12)


def test_scripted_seller_concedes_and_never_below_cost():
    seller = env.ScriptedSeller("linear")
    asks = [seller.ask(S, t, 6, 1.0, 0.05) for t in range(6)]
    assert asks[0] == 100.0 and asks[-1] == 52.5 and asks == sorted(asks, reverse=True)
    boulware = [seller.ask(S, t, 6, 0.3, 0.05) for t in range(6)]
    assert all(b >= a for a, b in zip(asks, boulware))  # Boulware holds out longer
    with pytest.raises(ValueError, match="choose from"):
        env.ScriptedSeller("nice")


def test_scripted_seller_type_is_drawn_per_group():
    def draws(seller):   # the seller's (exponent, margin) in each of 12 fresh games
        return [seller._params(env.Game(env.Negotiation(S), index=i)) for i in range(12)]
    types = draws(env.ScriptedSeller("linear", jitter=1.0, seed=5, group_size=4))
    assert types[0:4] == [types[0]] * 4 and types[4:8] == [types[4]] * 4 and types[8:] == [types[8]] * 4
    assert len({types[0], types[4], types[8]}) == 3
    per_game = draws(env.ScriptedSeller("linear", jitter=1.0, seed=5))
    assert len(set(per_game)) == 12
    assert per_game[0] == types[0]   # group_size 1 is the per-game draw


def test_mixed_scripted_seller_draws_each_strategy_per_group():
    def draws(seller, n=400):
        return [seller._params(env.Game(env.Negotiation(S), index=i)) for i in range(n)]
    mixed = draws(env.ScriptedSeller("mixed", seed=5, group_size=2))
    assert all(mixed[i] == mixed[i + 1] for i in range(0, 400, 2))   # one seller per GRPO group
    exponents = {round(e, 6) for e, _ in mixed}
    assert exponents == {0.3, 1.0, 3.0, 0.1}, exponents              # no jitter: exactly the four strategies
    assert {m for e, m in mixed if round(e, 6) == 0.1} == {0.15}      # the hard-liner keeps its own margin
    counts = [sum(round(e, 6) == x for e, _ in mixed[::2]) for x in (0.3, 1.0, 3.0, 0.1)]
    assert min(counts) >= 30, counts                                  # about 50 groups each, uniformly drawn
    jittered = draws(env.ScriptedSeller("mixed", jitter=0.5, seed=5))
    assert min(e for e, _ in jittered) < 0.1 and max(e for e, _ in jittered) > 3.0


def test_play_matches_replay_of_its_own_transcript(scenarios):
    games = env.play(scenarios[:50], env.ScriptedBuyer(), env.ScriptedSeller("linear", jitter=0.3))
    for g in games:
        o = replay(g.negotiation.scenario, [t.text for t in g.outcome.transcript])
        assert (o.reason, o.price, o.reward, o.rounds) == (g.outcome.reason, g.outcome.price, g.outcome.reward,
                                                           g.outcome.rounds)


def test_soak_10000_scripted_episodes(scenarios):
    t0 = time.perf_counter()
    outcomes = []
    for strategy in ("boulware", "linear", "conceder"):
        batch = [s for s in scenarios for _ in range(4)]
        buyer = env.ScriptedBuyer(start=0.4, end=1.0, exponent=0.8)
        outcomes += [g.outcome for g in env.play(batch, buyer, env.ScriptedSeller(strategy, jitter=0.5, seed=3))]
    seconds = time.perf_counter() - t0
    assert len(outcomes) >= 10_000
    assert seconds < 30, f"soak took {seconds:.1f}s"
    for o in outcomes:
        s = o.scenario
        assert o.reason in ("deal", "quit", "max_rounds", "budget_violation", "protocol_violation")
        assert 1 <= o.rounds <= 6 and -1.0 <= o.reward <= 1.0
        if o.reason == "deal":
            assert s.cost <= o.price <= s.budget
        else:
            assert o.price is None
    reasons = {o.reason for o in outcomes}
    assert {"deal", "max_rounds"} <= reasons   # OG-Narrator never quits: its last bid is the budget


# --- the token layout of an LLM player (real tiny tokenizer and model, HF engine) ---------------------------------

def test_llm_buyer_keeps_generated_ids_verbatim_with_template_context(tiny_model_dir):
    """Each generated reply appears verbatim in the buyer's sequence with mask 1 and its engine log-probs; every
    other id (system, first message, seller turns, template tokens) has mask 0; and the whole sequence is
    exactly what the chat template renders for the same conversation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from engine import HFEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFEngine(model, tok)
    generated = []
    real_generate = engine.generate

    def spy(prompts, **kw):
        outs = real_generate(prompts, **kw)
        generated.append(outs)
        return outs
    engine.generate = spy
    # The random tiny model rarely writes a valid action; the layout is checked on whatever it generated.
    buyer = env.LLMPlayer(engine, "buyer", temperature=1.0, max_tokens=12, style="compact", seed=0)
    games = [env.Game(env.Negotiation(S, 3), index=i) for i in range(3)]
    texts = buyer.reply(games)
    conv = games[0].state["buyer"]
    out0 = generated[0][0]
    n_prompt = len(conv.ids) - len(out0.token_ids)
    assert conv.ids[n_prompt:] == out0.token_ids and conv.mask == [0] * n_prompt + [1] * len(out0.token_ids)
    assert conv.logprobs[n_prompt:] == out0.logprobs and texts[0] == out0.text

    # A second turn: append a seller message (as the env would relay it) and generate again.
    for g, text in zip(games, texts):
        g.negotiation.transcript.append(env.Turn("buyer", text, None))
        g.negotiation.transcript.append(env.Turn("seller", "x", None, relayed="Talk: no\nAction: [SELL] $90.00"))
    texts2 = buyer.reply(games)
    conv = games[0].state["buyer"]
    out1 = generated[1][0]
    assert conv.ids[-len(out1.token_ids):] == out1.token_ids
    assert sum(conv.mask) == len(out0.token_ids) + len(out1.token_ids)
    messages = env.buyer_opening(S, "compact") + [
        {"role": "assistant", "content": tok.decode(out0.token_ids, skip_special_tokens=True)},
        {"role": "user", "content": "Talk: no\nAction: [SELL] $90.00"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    gen1_start = len(conv.ids) - len(out1.token_ids)
    prefix_text = tok.decode(conv.ids[:gen1_start])
    # (a reply cut at max_tokens gets the <|im_end|> the model did not write, with mask 0)
    specials = set(tok.all_special_ids) - {out0.token_ids[-1]}
    if not specials & set(out0.token_ids):  # a special id mid-reply would not survive the text round trip
        assert prefix_text == rendered
    masked = [i for i, m in zip(conv.ids, conv.mask) if m]
    assert masked == out0.token_ids + out1.token_ids
    assert texts2[0] == out1.text


def test_play_keeps_calling_players_with_empty_batches_while_another_rank_is_busy(scenarios):
    """With any_pending (a tensor-parallel group's OR over ranks), a rank whose games are over keeps calling its
    players with empty batches, so every rank drives the shared engine equally often; outcomes are unchanged."""
    calls = []

    class Counting(env.ScriptedBuyer):
        def reply(self, games):
            calls.append(len(games))
            return super().reply(games)
    plain = env.play(scenarios[:8], env.ScriptedBuyer(), env.ScriptedSeller("linear"))
    extra = iter([True] * 3)
    games = env.play(scenarios[:8], Counting(), env.ScriptedSeller("linear"),
                     any_pending=lambda mine: mine or next(extra, False))
    assert [g.outcome.reward for g in games] == [g.outcome.reward for g in plain]
    assert calls[-3:] == [0, 0, 0] and all(n > 0 for n in calls[:-3])


def test_scripted_seller_full_information_ceiling_by_hand():
    """S: list 100, budget 80, cost 50 (room 30). Linear seller, no jitter: exponent 1, margin 5%, floor 52.50;
    asks over 6 rounds 100, 90.50, 81, 71.50, 62, 52.50 (it accepts a bid at or above the round's ask).
    Ladder: rungs 24, 32, 40, 48, 56, 64, 72, 76; the cheapest rung at or above the last ask is 56, below the
    best [DEAL] of an earlier ask within budget (62): reward (80 - 56) / 30 = 0.8. Any price allowed: bid 52.50 in
    the last round: 27.5 / 30. A CI product (budget 40 < cost 45): nothing within budget, 0 (walk away)."""
    seller = env.ScriptedSeller("linear", jitter=0.0)
    for ladder, want in ((True, 0.8), (False, 27.5 / 30)):
        game = env.Game(env.Negotiation(S, max_rounds=6, ladder=ladder))
        assert [seller.ask(S, t, 6, *seller._params(game)) for t in range(6)] == [100, 90.5, 81, 71.5, 62, 52.5]
        assert seller.ceiling(game) == pytest.approx(want, abs=1e-12)
    assert seller.ceiling(env.Game(env.Negotiation(CI, max_rounds=6, ladder=True))) == 0.0


def test_the_ceiling_bounds_every_ladder_schedule():
    """No fixed ladder schedule does better against a jittered seller than the ceiling of each of its games."""
    seller = env.ScriptedSeller("boulware", jitter=1.0, seed=3)
    for schedule in env.TEACHER_SCHEDULES[::97]:
        games = env.play([S, CI] * 4, env.LadderBuyer([schedule]), seller, 6)
        for g in games:
            assert g.outcome.reward <= seller.ceiling(g) + 1e-12


def test_a_scripted_sellers_plan_is_the_rungs_it_asks_and_briefs_an_llm_seller():
    """env.SELLER_PLAN: ScriptedSeller.plan is the rung it asks in each round of that game (its own draw, per group),
    and an LLM seller given the family as `briefs` opens with exactly that plan."""
    scenarios = [Scenario(f"B0PLAN000{i}", "Item", "desc", "tools", 100.0 + 7 * i, 80.0 + 5 * i, 50.0 + 3 * i)
                 for i in range(6)]
    family = env.ScriptedSeller("linear", jitter=1.0, seed=4, group_size=2, style="ladder")
    games = env.play(scenarios, env.LadderBuyer([(0,) * 6]), family, 6)   # bids rung a: the seller never accepts
    for g in games:
        asked = [parse_action(t.relayed, "seller").price for t in g.negotiation.transcript if t.role == "seller"]
        letters = family.plan(g).split()
        assert len(letters) == 6 and len(asked) >= 5
        for price, letter in zip(asked, letters):
            assert price == pytest.approx(env.seller_prices(g.negotiation.scenario)[env.SELLER_LETTERS.index(letter)])
    first, second = (env.Game(env.Negotiation(scenarios[0], 6, True, True), index=i) for i in (0, 1))
    assert family.plan(first) == family.plan(second)   # one group, one type
    opening = env.seller_opening(scenarios[0], "Buyer [BUY] $30.00\nBid rung: under", style="ladder",
                                 plan=family.plan(first))
    assert opening[1]["content"].count(f"Plan: {family.plan(first)}.") == 1
    assert "Plan:" not in env.seller_opening(scenarios[0], "Buyer [BUY] $30.00", style="ladder")[1]["content"]

    from transformers import AutoTokenizer

    class Engine:   # only the tokenizer: the test reads the prompt the seller would be given
        tokenizer = AutoTokenizer.from_pretrained("checkpoints/warmstart")

    seller = env.LLMPlayer(Engine(), "seller", adapter=False, style="ladder", briefs=family)
    fresh = env.Game(env.Negotiation(scenarios[0], 6, True, True), index=0)   # no draw cached: the seller draws it
    fresh.negotiation.buyer_says("Thought: a\nAction: [BUY] a")
    prompt = Engine.tokenizer.decode(seller._append_message(fresh).ids)
    assert f"Plan: {family.plan(first)}." in prompt and family.plan(fresh) == family.plan(first)
    unbriefed = env.LLMPlayer(Engine(), "seller", adapter=False, style="ladder")
    second.negotiation.buyer_says("Thought: a\nAction: [BUY] a")
    assert "Plan:" not in Engine.tokenizer.decode(unbriefed._append_message(second).ids)

"""The negotiation game: the protocol, the regulated seller, and the lockstep episode runner.

The protocol (Xia et al. 2024). Each reply is

    Thought: private reasoning, never shown to the other side
    Talk: what the other side hears
    Action: [BUY] $120.00 (1x CODENAME)     buyer: BUY, DEAL, REJECT, QUIT   seller: SELL, DEAL, REJECT, QUIT

The buyer speaks first; a round is one buyer reply and one seller reply; at most `max_rounds` rounds.
[DEAL] must copy the other side's most recent offer (within $0.01), otherwise it is a "fake deal".

Buyer rules, each ends the episode: unparseable reply or fake deal -> protocol_violation; BUY or DEAL above
budget -> budget_violation; QUIT -> quit; valid DEAL -> deal at the seller's price.
The regulated seller is part of the environment, so its mistakes never cost the buyer: an unparseable reply, a
fake DEAL and any SELL or DEAL below cost become [REJECT] (its Talk is kept) and count as an intervention.
No deal can close below cost, whatever the seller model writes.

One implementation of the rules (`Negotiation`) serves `replay`, training and evaluation. `play` advances many
episodes in lockstep and asks each player for all pending replies at once, because batched generation is where
the speed is. LLM players keep the exact token ids the model generated, with a mask and the engine's log-probs
(`Conversation`), so training never re-tokenises text the model did not generate.

Standard library only at module level: engines and tokenizers are passed in and duck-typed.
"""

from __future__ import annotations

import functools
import itertools
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from data import Scenario, scenario_to_dict
from reward import score

BUYER_KINDS = ("BUY", "DEAL", "REJECT", "QUIT")
SELLER_KINDS = ("SELL", "DEAL", "REJECT", "QUIT")
PRICED = ("BUY", "SELL", "DEAL")
PERSONA_DIR = Path(__file__).resolve().parent / "personas"
TOLERANCE = 0.01  # a DEAL must copy the other side's offer to the cent


def copies(price: float, offer: float | None) -> bool:
    """A DEAL price repeats an offer: within $0.01 (plus float slack, so $69.99 does copy $70.00)."""
    return offer is not None and abs(price - offer) <= TOLERANCE + 1e-9


# ---------------------------------------------------------------------------------------------------------------
# Parsing


class ProtocolError(ValueError):
    """A reply with no valid action for its role. The message says what was wrong."""


@dataclass(frozen=True)
class Action:
    kind: str                   # BUY | SELL | DEAL | REJECT | QUIT
    price: float | None = None  # for BUY, SELL and DEAL

    def format(self, codename: str = "") -> str:
        if self.price is None:
            return f"[{self.kind}]"
        item = f" (1x {codename})" if codename else ""
        return f"[{self.kind}] ${self.price:,.2f}{item}"


_ACTION_LINE = re.compile(r"^\s*action:", re.IGNORECASE)
_TAG = re.compile(r"\[(BUY|SELL|DEAL|REJECT|QUIT)\]", re.IGNORECASE)
# An optional $, digits with optional thousands commas, an optional decimal part of one or two digits.
# The lookarounds stop us from reading "12" out of "12.345" or "a12".
_MONEY = re.compile(r"(?<![\w.,-])\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d{1,2})?)(?![\d.]\d|\d|,\d)")


def _last_action_line(lines: list[str]) -> int | None:
    """The index of the line that holds a reply's action: the last one starting with 'Action:'."""
    return next((i for i in range(len(lines) - 1, -1, -1) if _ACTION_LINE.match(lines[i])), None)


def parse_action(text: str, role: str) -> Action:
    """The action of a reply: the LAST line starting with 'Action:'; its first tag; for priced tags the first
    money amount after the tag. Raises ProtocolError for anything else."""
    if role not in ("buyer", "seller"):
        raise ValueError(f"role must be 'buyer' or 'seller', got {role!r}")
    if not isinstance(text, str):
        raise ProtocolError(f"reply is not text: {type(text).__name__}")
    return _parse_text(text, role)


@functools.lru_cache(maxsize=1 << 16)
def _parse_text(text: str, role: str) -> Action:
    """parse_action's work, cached: a pure function of the text (an Action is frozen; an error is raised again on
    every call, never cached). Why: scripted players and a best-schedule search repeat the same few replies per
    product thousands of times (1,716 schedules x the search's products), and parsing was a third of their time."""
    lines = text.splitlines()
    i = _last_action_line(lines)
    if i is None:
        raise ProtocolError("no line starting with 'Action:'")
    line = lines[i]
    tag = _TAG.search(line)
    if not tag:
        raise ProtocolError(f"no [BUY]/[SELL]/[DEAL]/[REJECT]/[QUIT] tag on the action line: {line.strip()!r}")
    kind = tag.group(1).upper()
    allowed = BUYER_KINDS if role == "buyer" else SELLER_KINDS
    if kind not in allowed:
        raise ProtocolError(f"the {role} may not use [{kind}]; allowed: {', '.join(allowed)}")
    if kind not in PRICED:
        return Action(kind)
    money = _MONEY.search(line, tag.end())
    if not money:
        raise ProtocolError(f"[{kind}] needs a price like $12.50 after the tag: {line.strip()!r}")
    price = float(money.group(1).replace(",", ""))
    if not (math.isfinite(price) and price > 0):
        raise ProtocolError(f"[{kind}] price must be positive and finite, got {money.group(1)}")
    return Action(kind, price)


@functools.lru_cache(maxsize=1 << 16)
def talk_of(text: str) -> str:
    """The Talk section of a reply: from the 'Talk:' line up to the next Thought:/Talk:/Action: line.
    Only this and the action ever reach the other side, so a Thought can never leak. (Cached like
    _parse_text: a pure function of the text.)"""
    talk, inside = [], False
    for line in text.splitlines():
        head = line.strip().lower()
        if head.startswith("talk:"):
            inside, talk = True, [line.strip()[5:].strip()]
        elif head.startswith(("thought:", "action:")):
            inside = False
        elif inside:
            talk.append(line.rstrip())
    return "\n".join(talk).strip()


def relay(talk: str, action: Action, codename: str) -> str:
    """What the other side reads: the Talk and the (possibly regulated) action in canonical form."""
    return f"Talk: {talk}\nAction: {action.format(codename)}"


# ---------------------------------------------------------------------------------------------------------------
# The rules of one episode


@dataclass
class Turn:
    role: str                       # buyer | seller
    text: str                       # the full reply, Thought included (for transcripts, never relayed)
    action: Action | None           # as parsed (None if unparseable)
    relayed: str = ""               # what the other side was shown
    note: str = ""                  # why the environment stepped in (interventions, violations)


@dataclass
class Outcome:
    scenario: Scenario
    reason: str                     # deal | quit | max_rounds | budget_violation | protocol_violation
    price: float | None             # the deal price, else None
    rounds: int
    interventions: int
    reward: float
    first_offer: float | None       # the buyer's first [BUY] price
    overshoot: bool                 # the buyer made a BUY or DEAL above its budget
    transcript: list[Turn] = field(default_factory=list)

    @property
    def seller_replies(self) -> int:
        return sum(t.role == "seller" for t in self.transcript)

    @property
    def seller_errors(self) -> int:
        """Seller replies with no valid action (each also an intervention: replaced by REJECT)."""
        return sum(t.role == "seller" and t.note.startswith("unparseable") for t in self.transcript)

    # The fields reward.summarize needs, read through from the scenario.
    budget = property(lambda self: self.scenario.budget)
    cost = property(lambda self: self.scenario.cost)
    list_price = property(lambda self: self.scenario.list_price)
    category = property(lambda self: self.scenario.category)
    mi = property(lambda self: self.scenario.mi)

    def to_dict(self) -> dict:
        return {"scenario": scenario_to_dict(self.scenario) | {"kind": self.scenario.kind},
                "reason": self.reason, "price": self.price, "rounds": self.rounds,
                "interventions": self.interventions, "reward": self.reward, "first_offer": self.first_offer,
                "overshoot": self.overshoot, "seller_replies": self.seller_replies,
                "seller_errors": self.seller_errors,
                "transcript": [{"role": t.role, "text": t.text, "relayed": t.relayed, "note": t.note,
                                "action": None if t.action is None else {"kind": t.action.kind, "price": t.action.price}}
                               for t in self.transcript]}


class Negotiation:
    """The state machine of one episode. Feed it replies in turn order; it applies every rule."""

    def __init__(self, scenario: Scenario, max_rounds: int = 6, ladder: bool = False, seller_ladder: bool = False):
        if max_rounds < 1:
            raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
        self.scenario, self.max_rounds = scenario, max_rounds
        self.ladder = ladder             # the buyer may name a rung and [DEAL] without a price (see LADDER)
        self.seller_ladder = seller_ladder  # the same for the seller, over its own rungs (see SELLER_LADDER)
        self.round = 0                   # rounds started (a round starts with a buyer reply)
        self.turn = "buyer"
        self.last_buy: float | None = None    # the buyer's most recent [BUY] price
        self.last_sell: float | None = None   # the seller's most recent (valid) [SELL] price
        self.first_offer: float | None = None
        self.interventions = 0
        self.overshoot = False
        self.transcript: list[Turn] = []
        self.outcome: Outcome | None = None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    def last_relayed(self) -> str | None:
        """The message the player whose turn it is has not seen yet (None before the first buyer reply)."""
        return self.transcript[-1].relayed if self.transcript else None

    def _end(self, reason: str, price: float | None = None) -> None:
        s = self.scenario
        violation = reason in ("budget_violation", "protocol_violation")
        self.outcome = Outcome(s, reason, price, self.round, self.interventions,
                               score(s.budget, s.cost, price, violation), self.first_offer, self.overshoot,
                               self.transcript)

    def buyer_says(self, text: str) -> None:
        assert not self.done and self.turn == "buyer", "not the buyer's turn"
        self.round += 1
        s = self.scenario
        try:
            action = parse_action(expand_ladder(text, s.budget, self.last_sell) if self.ladder else text, "buyer")
        except ProtocolError as e:
            self.transcript.append(Turn("buyer", text, None, note=f"protocol violation: {e}"))
            return self._end("protocol_violation")
        turn = Turn("buyer", text, action, relay(talk_of(text), action, s.codename))
        self.transcript.append(turn)
        if action.price is not None and action.price > s.budget:
            self.overshoot = True
        if action.kind == "BUY" and self.first_offer is None:
            self.first_offer = action.price
        if action.kind == "QUIT":
            return self._end("quit")
        if action.kind == "DEAL":
            if not copies(action.price, self.last_sell):
                turn.note = f"fake deal: ${action.price:.2f} copies no seller offer (last SELL: {self.last_sell})"
                return self._end("protocol_violation")
            if self.last_sell > s.budget:
                self.overshoot = True
                turn.note = f"deal at ${self.last_sell:.2f} is above the budget"
                return self._end("budget_violation")
            return self._end("deal", self.last_sell)
        if action.kind == "BUY":
            if action.price > s.budget:
                turn.note = f"offer ${action.price:.2f} is above the budget"
                return self._end("budget_violation")
            self.last_buy = action.price
        self.turn = "seller"

    def seller_says(self, text: str) -> None:
        assert not self.done and self.turn == "seller", "not the seller's turn"
        s = self.scenario
        note = ""
        try:
            action = parse_action(expand_seller_ladder(text, s, self.last_buy) if self.seller_ladder else text,
                                  "seller")
        except ProtocolError as e:
            action, note = None, f"unparseable seller reply ({e})"
        if action is not None and action.kind == "DEAL" and not copies(action.price, self.last_buy):
            note = f"fake seller deal at ${action.price:.2f} (last BUY: {self.last_buy})"
        elif action is not None and action.kind == "DEAL" and self.last_buy < s.cost:
            note = f"seller DEAL would close at ${self.last_buy:.2f}, below cost"
        elif action is not None and action.kind == "SELL" and action.price < s.cost:
            note = f"seller SELL at ${action.price:.2f} is below cost"
        final = Action("REJECT") if note else action
        self.interventions += bool(note)
        self.transcript.append(Turn("seller", text, action, relay(talk_of(text), final, s.codename), note))
        if final.kind == "QUIT":
            return self._end("quit")
        if final.kind == "DEAL":  # closes at the buyer's price, which is within budget and >= cost here
            return self._end("deal", self.last_buy)
        if final.kind == "SELL":
            self.last_sell = final.price
        if self.round >= self.max_rounds:
            return self._end("max_rounds")
        self.turn = "buyer"


def replay(scenario: Scenario, replies: list[str], max_rounds: int = 6, ladder: bool = False,
           seller_ladder: bool = False) -> Outcome:
    """Play one episode from scripted reply texts: buyer, seller, buyer, ... Replies after the end are ignored."""
    game = Negotiation(scenario, max_rounds, ladder, seller_ladder)
    for text in replies:
        if game.done:
            break
        (game.buyer_says if game.turn == "buyer" else game.seller_says)(text)
    if not game.done:
        raise ValueError(f"ran out of replies after {len(replies)} before the episode ended "
                         f"(round {game.round}, {game.turn}'s turn)")
    return game.outcome


# ---------------------------------------------------------------------------------------------------------------
# Prompts (Xia et al.'s structure: rules in the system prompt, inventory and private numbers in the first message)

FORMAT_RULES = """Reply in exactly this format:
Thought: your private reasoning (the other side never sees it)
Talk: what you say to the other side
Action: one of {actions}
A price is written like $12.50. [DEAL] accepts the other side's most recent offer and must repeat its exact price.
[REJECT] passes the turn without an offer. [QUIT] ends the negotiation without a deal."""

BUYER_SYSTEM = """You are a buyer negotiating the price of one product with a seller.
Pay as little as possible, and never pay more than your budget: it is private, never reveal it.
If the seller will not come down to your budget, walk away with [QUIT].
""" + FORMAT_RULES.format(actions="[BUY] $price (1x codename) to make an offer, [DEAL] $price (1x codename), [REJECT], [QUIT]")

SELLER_SYSTEM = """You are a seller negotiating the price of one product with a buyer.
Sell for as much as possible. Your cost is private: never reveal it, and never sell below it.
""" + FORMAT_RULES.format(actions="[SELL] $price (1x codename) to make an offer, [DEAL] $price (1x codename), [REJECT], [QUIT]")


def _inventory_line(s: Scenario, description_chars: int) -> str:
    desc = s.description.replace("\n", " ").strip()
    if len(desc) > description_chars:
        desc = desc[:description_chars].rstrip() + "..."
    return (f"codename: {s.codename} | title: {s.title} | description: {desc} | category: {s.category} | "
            f"listed price: ${s.list_price:,.2f}")


# The "ladder" style is for tiny models. The buyer's actions are eight price rungs, fractions of its budget under
# the letters a..h: "[BUY] e" offers rung e and a bare "[DEAL]" accepts the seller's last offer (Negotiation with
# ladder=True writes the price in; the seller reads an ordinary [BUY] $price). After each seller offer the buyer
# reads which rung that offer sits at ("Ask rung: f": the cheapest rung at or above it), so accepting is a
# comparison of two letters. Why: a 0.9M-parameter model supervised for an hour learns the letters but slips
# digits when it copies prices (measured: 14% protocol violations, 9% overshoot), and every slip is a -1 that
# drowns the bargaining signal GRPO should see. The top rung stays below the budget: an offer can never overshoot;
# only accepting an ask above the budget can.
LADDER = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
LADDER_LETTERS = "abcdefgh"
_LADDER_BUY = re.compile(r"\s*([a-h])(?![\w$.,])")


def ladder_prices(budget: float) -> list[float]:
    """The ladder style's candidate offers for a budget, in cents, lowest first."""
    return list(_ladder_prices(budget))


@functools.lru_cache(maxsize=4096)
def _ladder_prices(budget: float) -> tuple[float, ...]:
    return tuple(_cents(f * budget) for f in LADDER)


# ASK_HIGH. A buyer taught on the graded view (warmstart.py --graded-view) reads an ask above its top rung as
# "over" while it is at most ASK_HIGH x its budget and as "high" beyond. Why: with one word for both, the trained
# buyer could not tell a seller whose floor sits just above rung g (there its last bid must be h) from one that has
# barely moved (there h is the worst bid that can still be taken), so GRPO against the linear family moved its last
# bid to h everywhere and lost to the hard-liner (README, issue 12). Why 1.05 (`python bench/last_bids.py`, the
# scripted sellers on the 802 train products x 4): once the round-5 ask is above 1.05 x budget, a last bid against
# the linear family (jitter 1.0) pays at most 0.03 on average (h), so GRPO leaves that state to the KL; 99% of the
# hard-liner's (jitter 0.5) games are there, where f pays 0.26 and h 0.10. At 1.1 (the first graded warm start)
# the boulware's games between 1.05 and 1.1 x budget (15%, where f pays 0.30 and h 0.22) shared "over" with the
# linear family's (where h pays), and three seeds of GRPO kept less against the boulware and the hard-liner.
ASK_HIGH = 1.05


def ladder_rung(price: float, budget: float, graded: bool = False) -> str:
    """The letter of the cheapest rung at or above `price`, or "over" when the price is above every rung (graded:
    "over" up to ASK_HIGH x budget, "high" beyond)."""
    for letter, rung in zip(LADDER_LETTERS, ladder_prices(budget)):
        if price <= rung + 1e-9:
            return letter
    return "high" if graded and price > ASK_HIGH * budget + 1e-9 else "over"


def expand_ladder(text: str, budget: float, last_sell: float | None) -> str:
    """A ladder reply with its price written in, for parse_action: on the action line, a rung letter right after
    [BUY] becomes that rung's price, and a [DEAL] with no price gets the seller's last offer. Anything else is
    returned unchanged (and parsed, or rejected, by the ordinary rules)."""
    return _expand_ladder(text, budget, last_sell) if isinstance(text, str) else text


@functools.lru_cache(maxsize=1 << 16)
def _expand_ladder(text: str, budget: float, last_sell: float | None) -> str:   # cached like _parse_text
    return _write_rung_price(text, "BUY", _LADDER_BUY, LADDER_LETTERS, lambda: ladder_prices(budget), last_sell)


def _write_rung_price(text, offer: str, rung_re, letters: str, prices, other_offer: float | None) -> str:
    """Both roles' ladder expansion: on the action line, a rung letter right after [offer] becomes that rung's price
    (prices() lists them), and a [DEAL] with no price gets `other_offer`; anything else is returned unchanged."""
    lines = text.splitlines() if isinstance(text, str) else []
    i = _last_action_line(lines)
    if i is None:
        return text
    line = lines[i]
    tag = _TAG.search(line)
    if not tag:
        return text
    kind, rest = tag.group(1).upper(), line[tag.end():]
    if kind == offer and (m := rung_re.match(rest)):
        price = prices()[letters.index(m.group(1))]
        lines[i] = line[:tag.end()] + f" ${price:.2f}" + rest[m.end():]
    elif kind == "DEAL" and other_offer is not None and not _MONEY.search(rest):
        lines[i] = line[:tag.end()] + f" ${other_offer:.2f}" + rest
    return "\n".join(lines)


def buyer_view(message: str, scenario: Scenario, last_sell: float | None, style: str, graded: bool = False) -> str:
    """What the buyer reads after a seller turn. In the ladder style: only the seller's action (no Talk, no
    codename), plus the rung of the offer a [DEAL] would accept (graded: an ask above every rung says how far, see
    ASK_HIGH). Why so terse: on a CPU the sequence length is the cost of every step, the Talk of a scripted seller
    says nothing its action does not, and a tiny model reads the letters, not the prose. Every other style reads
    the relayed message as it is."""
    if style != "ladder":
        return message
    view = "Seller " + parse_action(message, "seller").format()   # a relayed message always parses
    return view if last_sell is None else f"{view}\nAsk rung: {ladder_rung(last_sell, scenario.budget, graded)}"


# SELLER_PLAN. A seller may be briefed with its plan: the rung it means to ask in each round, drawn per game from a
# scripted family (ScriptedSeller.plan; "Plan: k i g e c b" in its opening). Why: a tiny LLM that imitates a
# family with random types cannot see which type it is, and sampled it plays as if it redrew one every round. On the
# warm start taught without a plan (128 held-out products x 4, the teachers as buyer): in the last round it takes a
# bid on its lowest rung in 55% of games (the family 18%) and one three rungs up in 89% (the family 100%), so its
# [DEAL] grows smoothly with the bid where the family's is a step, and GRPO learnt to end on rung h, which the
# scripted sellers do not reward. Briefed, it plays one type per game as its teacher does; the buyer never sees it.
# The seller's ladder mirrors the buyer's: eleven asks from its cost (a) to the list price (k) in tenths of the way,
# "[SELL] d" names one, a bare "[DEAL]" accepts the buyer's last bid, and after each bid the seller reads the
# highest of its rungs at or below it ("Bid rung: c", or "under" for a bid below its cost). Accepting is then a
# comparison of two letters, and the tiny model never copies digits. Why the bottom rung is the cost itself: every
# rung is a legal ask, so the regulation acts only on the model's real mistakes (a [DEAL] of a bid below cost, a
# price it wrote out below cost, an unparseable reply), each of which Negotiation turns into a REJECT.
SELLER_LADDER = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SELLER_LETTERS = "abcdefghijk"
_SELLER_RUNG = re.compile(r"\s*([a-k])(?![\w$.,])")


def seller_prices(s: Scenario) -> list[float]:
    """The seller ladder's asks for a scenario, in cents, lowest (its cost) first; never below the cost."""
    return list(_seller_prices(s))


@functools.lru_cache(maxsize=4096)   # asked several times per seller turn; a best-response search plays millions
def _seller_prices(s: Scenario) -> tuple[float, ...]:
    top = max(s.list_price, s.cost)
    return tuple(max(s.cost, _cents(s.cost + f * (top - s.cost))) for f in SELLER_LADDER)


def seller_rung_at_or_above(price: float, s: Scenario) -> int:
    """The index of the cheapest seller rung at or above `price` (the top rung when the price is above them all)."""
    prices = seller_prices(s)
    return next((i for i, p in enumerate(prices) if price <= p + 1e-9), len(prices) - 1)


def bid_rung(bid: float, s: Scenario) -> str:
    """The letter of the highest seller rung at or below the buyer's bid, or "under" for a bid below the cost."""
    below = [letter for letter, p in zip(SELLER_LETTERS, seller_prices(s)) if p <= bid + 1e-9]
    return below[-1] if below else "under"


def expand_seller_ladder(text: str, s: Scenario, last_buy: float | None) -> str:
    """A seller ladder reply with its price written in, for parse_action: a rung letter right after [SELL] becomes
    that rung's ask, a [DEAL] with no price gets the buyer's last bid. Anything else is returned unchanged."""
    return _write_rung_price(text, "SELL", _SELLER_RUNG, SELLER_LETTERS, lambda: seller_prices(s), last_buy)


def seller_view(message: str, scenario: Scenario, last_buy: float | None, style: str) -> str:
    """What the seller reads of a buyer turn. In the ladder style: the buyer's action (no Talk, no codename) and the
    rung of its bid; every other style reads the relayed message as it is."""
    if style != "ladder":
        return message
    view = "Buyer " + parse_action(message, "buyer").format()   # a relayed message always parses
    return view if last_buy is None else f"{view}\nBid rung: {bid_rung(last_buy, scenario)}"


def buyer_opening(s: Scenario, style: str = "full", description_chars: int = 400) -> list[dict]:
    """System + first user message for the buyer. Holds the budget; never the cost."""
    if style == "ladder":  # compact + the rungs (see LADDER)
        offers = ", ".join(f"{k} ${p:,.2f}" for k, p in zip(LADDER_LETTERS, ladder_prices(s.budget)))
        return [{"role": "system", "content": "You are the buyer. Reply Thought/Action. "
                                              "Action: [BUY] rung letter, [DEAL] accepts the ask, [QUIT]."},
                {"role": "user", "content": f"Item {s.codename}, list ${s.list_price:,.2f}. "
                                            f"Your budget ${s.budget:,.2f}. Rungs: {offers}. Make your offer."}]
    if style == "compact":  # short sequences for tiny CPU models: the same facts, no description
        return [{"role": "system", "content": "You are the buyer. Format: Thought/Talk/Action."},
                {"role": "user", "content": f"Item {s.codename}, list ${s.list_price:,.2f}. "
                                            f"Your budget ${s.budget:,.2f}. Make your offer."}]
    return [{"role": "system", "content": BUYER_SYSTEM},
            {"role": "user", "content": "Inventory:\n" + _inventory_line(s, description_chars) +
             f"\n\nYour shopping list: 1x {s.codename}, budget ${s.budget:,.2f} (private).\n"
             "You speak first. Make your opening move."}]


def seller_opening(s: Scenario, buyer_message: str, persona: str = "", style: str = "full",
                   description_chars: int = 400, plan: str = "") -> list[dict]:
    """System + first user message for the seller. Holds the cost; never the budget. In the ladder style
    `buyer_message` is the seller's view of the buyer's first turn (seller_view), and `plan`, when given, its
    private brief: the rung it means to ask in each round (ScriptedSeller.plan; see SELLER_PLAN)."""
    if style == "ladder":  # compact + the seller's rungs (see SELLER_LADDER)
        asks = ", ".join(f"{k} ${p:,.2f}" for k, p in zip(SELLER_LETTERS, seller_prices(s)))
        system = ("You are the seller. Reply Thought/Action. "
                  "Action: [SELL] rung letter, [DEAL] accepts the bid, [QUIT].")
        brief = f" Plan: {plan}." if plan else ""
        first = (f"Item {s.codename}, list ${s.list_price:,.2f}. Your cost ${s.cost:,.2f}. Rungs: {asks}.{brief}\n"
                 f"{buyer_message}")
    elif style == "compact":  # short sequences for tiny CPU models: the same facts, no description
        system = "You are the seller. Format: Thought/Talk/Action."
        first = f"Item {s.codename}, list ${s.list_price:,.2f}. Your cost ${s.cost:,.2f}.\nBuyer:\n{buyer_message}"
    else:
        system = SELLER_SYSTEM
        first = ("Inventory:\n" + _inventory_line(s, description_chars) +
                 f" | your cost: ${s.cost:,.2f} (private)\n\nThe buyer says:\n{buyer_message}")
    if persona:
        system += "\n\n" + persona
    return [{"role": "system", "content": system}, {"role": "user", "content": first}]


def list_personas() -> list[str]:
    return sorted(p.stem for p in PERSONA_DIR.glob("*.txt"))


def load_persona(name: str) -> str:
    path = PERSONA_DIR / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"unknown persona {name!r}; available: {', '.join(list_personas())} "
                         f"(add a text file to {PERSONA_DIR} for a new one)")
    return path.read_text().strip()


# ---------------------------------------------------------------------------------------------------------------
# Token layout of an LLM player


@dataclass
class Conversation:
    """One player's side of an episode as token ids. mask is 1 exactly on ids the model generated;
    logprobs holds the engine's log-prob for those ids (0.0 elsewhere). Masks travel with the tokens."""
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)

    def add_context(self, ids: list[int]) -> None:
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)

    def add_generated(self, ids: list[int], logprobs: list[float]) -> None:
        assert len(ids) == len(logprobs), "one log-prob per generated id"
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logprobs += list(logprobs)


class ChatFormat:
    """Token ids from the model's own chat template, built incrementally so generated ids are never re-rendered.

    `opening(messages)` renders system + first user message with the generation prompt. `continuation(text)`
    is what the template puts between the end of a generated assistant reply (after its end-of-turn token) and
    the next generation prompt when a user message `text` follows: the template's delta, found by rendering a
    probe conversation with and without the new message.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() \
            else tokenizer.eos_token_id
        self.eos_text = tokenizer.decode([self.eos_id])
        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                 {"role": "assistant", "content": "A"}]
        head = self._render(probe, False)
        closing = head[head.rindex("A") + 1:]
        if not closing.startswith(self.eos_text):
            raise ValueError(f"chat template closes an assistant turn with {closing!r}, not with the end-of-turn "
                             f"token {self.eos_text!r}; generated ids could not be kept verbatim")
        self._after_eos = closing[len(self.eos_text):]
        self._probe, self._probe_text = probe, head

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def opening(self, messages: list[dict]) -> list[int]:
        return self.encode(self._render(messages, True))

    def continuation(self, text: str, finished: bool = True) -> list[int]:
        full = self._render(self._probe + [{"role": "user", "content": text}], True)
        if not full.startswith(self._probe_text):
            raise ValueError("chat template re-renders earlier turns when a message is added; "
                             "cannot keep generated ids verbatim with this template")
        delta = full[len(self._probe_text):]
        # A reply cut at max_tokens has no end-of-turn token: close it so the next turn reads as the template.
        return self.encode(("" if finished else self.eos_text) + self._after_eos + delta)


# ---------------------------------------------------------------------------------------------------------------
# Players. Each has reply(games) -> one text per game, for all games whose turn it is, in one batch.


@dataclass
class Game:
    """One episode in the batch: the rules plus each player's private state (conversations, RNG)."""
    negotiation: Negotiation
    index: int = 0                                  # position in the batch (groups are consecutive blocks)
    state: dict = field(default_factory=dict)       # per-player state, keyed by role

    @property
    def done(self) -> bool:
        return self.negotiation.done

    @property
    def outcome(self) -> Outcome | None:
        return self.negotiation.outcome


class LLMPlayer:
    """A model behind an engine (HF or vLLM). Keeps token ids, mask and log-probs per game."""

    def __init__(self, engine, role: str, temperature: float = 1.0, max_tokens: int = 256,
                 adapter: bool | None = None, persona: str = "", style: str = "full",
                 description_chars: int = 400, max_context: int = 8192, seed: int | None = None,
                 briefs: "ScriptedSeller | None" = None, graded_view: bool = False):
        self.engine, self.role, self.temperature, self.max_tokens = engine, role, temperature, max_tokens
        self.briefs = briefs   # a seller's private plan per game, from this family's draw (see SELLER_PLAN)
        self.graded_view = graded_view   # a buyer reads an ask above its rungs as "over" or "high" (see ASK_HIGH)
        self.adapter = (role == "buyer") if adapter is None else adapter  # the policy buys; the base sells
        self.persona, self.style, self.description_chars = persona, style, description_chars
        self.max_context, self.seed = max_context, seed
        self.format = ChatFormat(engine.tokenizer)
        self.calls = 0

    def _append_message(self, game: Game) -> Conversation:
        neg, conv = game.negotiation, game.state.get(self.role)
        message = neg.last_relayed()
        if self.role == "seller":
            message = seller_view(message, neg.scenario, neg.last_buy, self.style)
        if conv is None:
            conv = game.state[self.role] = Conversation()
            opening = (buyer_opening(neg.scenario, self.style, self.description_chars) if self.role == "buyer"
                       else seller_opening(neg.scenario, message, self.persona, self.style, self.description_chars,
                                           self.briefs.plan(game) if self.briefs is not None else ""))
            conv.add_context(self.format.opening(opening))
        else:
            if self.role == "buyer":
                message = buyer_view(message, neg.scenario, neg.last_sell, self.style, self.graded_view)
            conv.add_context(self.format.continuation(message, game.state.get(self.role + "_finished", True)))
        return conv

    def reply(self, games: list[Game]) -> list[str]:
        convs = [self._append_message(g) for g in games]
        texts = [""] * len(games)
        live = [i for i, c in enumerate(convs) if len(c.ids) + self.max_tokens <= self.max_context]
        seed = None if self.seed is None else self.seed + self.calls
        self.calls += 1
        if live or getattr(self.engine, "lockstep", False):  # a tensor-parallel engine needs every call
            outs = self.engine.generate([convs[i].ids for i in live], temperature=self.temperature,
                                        max_tokens=self.max_tokens, adapter=self.adapter, seed=seed)
            for i, out in zip(live, outs):
                convs[i].add_generated(out.token_ids, out.logprobs)
                games[i].state[self.role + "_finished"] = out.finished
                texts[i] = out.text
        # Games past max_context reply with nothing: a protocol violation for the buyer, a REJECT for the seller.
        return texts


class ChatPlayer:
    """A model behind an OpenAI-compatible chat endpoint (frontier buyers or sellers). Text only: no token ids."""

    def __init__(self, endpoint, role: str, temperature: float = 1.0, max_tokens: int = 256, persona: str = "",
                 description_chars: int = 400):
        self.endpoint, self.role, self.temperature, self.max_tokens = endpoint, role, temperature, max_tokens
        self.persona, self.description_chars = persona, description_chars

    def reply(self, games: list[Game]) -> list[str]:
        batch = []
        for g in games:
            neg, messages = g.negotiation, g.state.get(self.role)
            if messages is None:
                messages = (buyer_opening(neg.scenario, "full", self.description_chars) if self.role == "buyer"
                            else seller_opening(neg.scenario, neg.last_relayed(), self.persona, "full",
                                                self.description_chars))
                g.state[self.role] = messages
            else:
                messages.append({"role": "user", "content": neg.last_relayed()})
            batch.append(messages)
        texts = self.endpoint.chat(batch, temperature=self.temperature, max_tokens=self.max_tokens)
        for messages, text in zip(batch, texts):
            messages.append({"role": "assistant", "content": text})
        return texts


def _reply_text(thought: str, talk: str, action: Action, codename: str) -> str:
    return f"Thought: {thought}\nTalk: {talk}\nAction: {action.format(codename)}"


def _cents(x: float) -> float:
    return round(x + 1e-9, 2)


class ScriptedSeller:
    """Time-dependent concession (Faratin et al.): ask(t) = floor + (start - floor) * (1 - (t/(T-1))^(1/e)).

    e < 1 concedes late (Boulware), e = 1 linearly, e > 1 early (conceder); the hard-liner barely moves.
    It accepts a BUY at or above its current ask. floor = cost * (1 + margin) keeps some profit; `jitter`
    randomises e and the margin per game. With group_size G the draw is per block of G consecutive games (a GRPO
    group): the episodes of a group then face the same seller, so their rewards differ only by what the buyer did.
    Strategy "mixed" draws one of the four per game (per group) before the jitter: the whole family in one seller;
    "linear+linear+hardliner" draws one of those (a repeated one weighs more).
    Its text runs through the same parser and the same regulation as an LLM seller's.
    """
    STRATEGIES = {"boulware": (0.3, 0.05), "linear": (1.0, 0.05), "conceder": (3.0, 0.05),
                  "hardliner": (0.1, 0.15)}
    MIXED = "mixed"   # each game (group) draws one of STRATEGIES, uniformly, then jitters it

    def __init__(self, strategy: str = "boulware", jitter: float = 0.0, seed: int = 0, group_size: int = 1,
                 style: str = ""):
        members = strategy.split("+") if strategy != self.MIXED else list(self.STRATEGIES)
        if not all(m in self.STRATEGIES for m in members):
            raise ValueError(f"unknown scripted seller {strategy!r}; choose from {', '.join(self.STRATEGIES)}, "
                             f"{self.MIXED!r} (all four), or several joined by '+' (e.g. 'linear+hardliner')")
        self.members = members   # each game (group) draws one, uniformly: repeat one to weight it
        if style not in ("", "ladder"):
            raise ValueError(f"a scripted seller's style is '' (prices) or 'ladder' (SELLER_LADDER), got {style!r}")
        self.strategy, self.jitter, self.seed, self.group_size = strategy, jitter, seed, group_size
        self.style = style   # "ladder": its asks moved to the nearest rung, as letters (the LLM seller's teacher)

    def _params(self, game: Game) -> tuple[float, float]:
        if "seller_type" not in game.state:
            rng = random.Random(f"{self.seed}:{game.negotiation.scenario.codename}:{game.index // self.group_size}")
            # one strategy draws nothing here, so its exponent and margin are the same draws as before '+' existed
            strategy = rng.choice(self.members) if len(self.members) > 1 else self.members[0]
            exponent, margin = self.STRATEGIES[strategy]
            e = exponent * math.exp(self.jitter * rng.uniform(-1, 1))
            m = max(0.0, margin * (1 + self.jitter * rng.uniform(-1, 1)))
            game.state["seller_type"] = (e, m)   # not "seller": an LLM seller keeps its conversation there
        return game.state["seller_type"]

    def plan(self, game: Game) -> str:
        """This game's asks for every round as seller-ladder letters ("k i g e c b"): the private brief of an LLM
        seller that plays this family (seller_opening's `plan`). The draw is this seller's own for the game, so
        the same seed and group size brief the same type."""
        neg, s = game.negotiation, game.negotiation.scenario
        e, m = self._params(game)
        return " ".join(SELLER_LETTERS[seller_rung_at_or_above(self.ask(s, t, neg.max_rounds, e, m), s)]
                        for t in range(neg.max_rounds))

    def ask(self, s: Scenario, t: int, rounds: int, exponent: float, margin: float) -> float:
        floor = min(s.cost * (1 + margin), s.list_price)
        progress = t / max(1, rounds - 1)
        ask = _cents(max(s.cost, floor + (s.list_price - floor) * (1 - progress ** (1 / exponent))))
        if self.style != "ladder":
            return ask
        return min(seller_prices(s), key=lambda p: (abs(p - ask), -p))   # the nearest rung (the higher on a tie)

    def ceiling(self, game: Game) -> float:
        """The full-information ceiling of a game against this seller: the best reward a buyer that knew this
        game's drawn exponent and margin (so every ask to come) could reach within the rules. It may bid (a rung
        in the ladder style, any price otherwise, never above its budget) at or above a round's ask, which this
        seller accepts, or [DEAL] the ask of the round before; walking away scores 0."""
        neg, s = game.negotiation, game.negotiation.scenario
        e, m = self._params(game)
        asks = [self.ask(s, t, neg.max_rounds, e, m) for t in range(neg.max_rounds)]
        prices = asks[:-1]  # [DEAL] in round t + 2 at round t + 1's ask: the last round's ask can no longer be taken
        bids = [r for r in ladder_prices(s.budget) if r >= min(asks)] if neg.ladder else [min(asks)]
        return max([0.0] + [score(s.budget, s.cost, p) for p in prices + bids if p <= s.budget])

    def reply(self, games: list[Game]) -> list[str]:
        texts = []
        for g in games:
            neg, s = g.negotiation, g.negotiation.scenario
            e, m = self._params(g)
            price = self.ask(s, neg.round - 1, neg.max_rounds, e, m)
            offer = neg.last_buy
            if self.style == "ladder":
                texts.append(seller_ladder_reply(seller_rung_at_or_above(price, s), offer, s))
            elif offer is not None and offer >= price:
                texts.append(_reply_text(f"${offer:.2f} meets my ask of ${price:.2f}.", "You have a deal.",
                                         Action("DEAL", offer), s.codename))
            else:
                texts.append(_reply_text(f"My ask this round is ${price:.2f}.", f"The best I can do is ${price:,.2f}.",
                                         Action("SELL", price), s.codename))
        return texts


class ScriptedBuyer:
    """OG-Narrator's offer generator (Xia et al., BuyerAgent.OGNarratorAgent.think_action with the linear
    utils.Strategy): bid(t) = budget * (start + (end - start) * (t/(T-1))^exponent) in round t = 0..T-1.

    Each round it accepts ([DEAL]) the seller's latest offer if that is strictly below this round's bid, and
    otherwise bids. There is no special last round: in round T-1 the bid is end x budget (the full budget with Xia
    et al.'s defaults 0.5 -> 1.0, linear), so an ask still above it gets [BUY] $budget, never [QUIT], and the rules
    then let the seller take it or end the game at the round limit. Where ours departs from theirs: theirs accepts
    its best (lowest) seller offer so far, ours the latest, because our [DEAL] must copy the most recent offer (the
    scripted sellers' asks never rise, so the two agree against them).
    """

    def __init__(self, start: float = 0.5, end: float = 1.0, exponent: float = 1.0):
        if not 0 < start <= end <= 1:
            raise ValueError(f"need 0 < start <= end <= 1, got start={start} end={end}")
        self.start, self.end, self.exponent = start, end, exponent

    def bid(self, s: Scenario, t: int, rounds: int) -> float:
        progress = t / max(1, rounds - 1)
        return _cents(s.budget * (self.start + (self.end - self.start) * progress ** self.exponent))

    def reply(self, games: list[Game]) -> list[str]:
        texts = []
        for g in games:
            neg, s = g.negotiation, g.negotiation.scenario
            t = neg.round  # rounds already played; this reply starts round t + 1
            bid = min(self.bid(s, t, neg.max_rounds), s.budget)
            ask = neg.last_sell
            if ask is not None and ask < bid:
                texts.append(_reply_text(f"${ask:.2f} is below my bid of ${bid:.2f}.", "Deal.", Action("DEAL", ask),
                                         s.codename))
            else:
                texts.append(_reply_text(f"Offer {bid / s.budget:.0%} of what I can pay.",
                                         f"I can offer ${bid:,.2f}.", Action("BUY", bid), s.codename))
        return texts


def seller_ladder_reply(rung: int, bid: float | None, s: Scenario) -> str:
    """A ladder seller who asks rung `rung` this round: accept the buyer's last bid if it is at or above that rung,
    else ask the rung. The mirror of ladder_reply."""
    letter = SELLER_LETTERS[rung]
    if bid is not None and bid >= seller_prices(s)[rung] - 1e-9:
        return f"Thought: {letter}\nAction: [DEAL]"
    return f"Thought: {letter}\nAction: [SELL] {letter}"


def ladder_reply(rung: int, ask: float | None, budget: float) -> str:
    """A ladder buyer who bids rung `rung` this round: accept the seller's last offer if it is at or below that rung
    (cheaper than the rung itself), else offer the rung."""
    letter = LADDER_LETTERS[rung]
    if ask is not None and ask <= ladder_prices(budget)[rung]:
        return f"Thought: {letter}\nAction: [DEAL]"
    return f"Thought: {letter}\nAction: [BUY] {letter}"


# The ladder teachers: every non-decreasing schedule of rungs over 6 rounds (1,716), one drawn per game. Why all
# of them: the warm start imitates their mixture, and GRPO can only reweight what the warm start ever does. With
# 15 hand-made ramps as teachers, GRPO learnt to pick the best ramp and no more (the first rounds' letters of a ramp
# give away the rest of it); imitating every schedule leaves each round's rung open, so GRPO can move them one by
# one. Their average is the "scripted" row of a ladder-style run; the best of them is the best response.
TEACHER_SCHEDULES = list(itertools.combinations_with_replacement(range(len(LADDER)), 6))


class LadderBuyer:
    """A scripted buyer over the ladder. `schedules` is the rung per round of each strategy; with several, each game
    draws one (seeded by its index), so a batch is a mixture of teachers. It writes ladder replies, so env.play
    applies the ladder rules to it, as to an LLM buyer in the ladder style."""
    style = "ladder"

    def __init__(self, schedules=TEACHER_SCHEDULES, seed: int = 0):
        if not schedules:
            raise ValueError("LadderBuyer needs at least one schedule")
        self.schedules, self.seed = [tuple(s) for s in schedules], seed

    def schedule_of(self, game: Game) -> tuple:
        return random.Random(f"{self.seed}:{game.index}").choice(self.schedules)

    def reply(self, games: list[Game]) -> list[str]:
        texts = []
        for g in games:
            if "buyer" not in g.state:
                g.state["buyer"] = self.schedule_of(g)
            schedule, neg = g.state["buyer"], g.negotiation
            rung = schedule[min(neg.round, len(schedule) - 1)]
            texts.append(ladder_reply(rung, neg.last_sell, neg.scenario.budget))
        return texts


def scripted_buyer(style: str, seed: int = 0):
    """The scripted reference buyer for a prompt style: the ladder teachers in the ladder style (whom a ladder warm
    start imitates), OG-Narrator otherwise."""
    return LadderBuyer(seed=seed) if style == "ladder" else ScriptedBuyer()


class Mixture:
    """Several players in one role, one per block of `group_size` consecutive games (a GRPO group): block k is
    played by players[choice[k]]. Each member replies to its own games in one batch, every round, also to none
    (a tensor-parallel engine needs every call). Self-play's league: each group's opponent is drawn from a pool."""

    def __init__(self, players: list, choice: list[int], group_size: int = 1):
        ladder = {getattr(p, "style", "") == "ladder" for p in players}
        if len(ladder) > 1:
            raise ValueError("a Mixture's players must all speak the ladder or none (env.play's rules follow it)")
        if any(not 0 <= c < len(players) for c in choice):
            raise ValueError(f"choice {choice} names a player outside 0..{len(players) - 1}")
        self.players, self.choice, self.group_size = players, choice, group_size
        self.style = "ladder" if ladder == {True} else ""

    def member(self, game: Game) -> int:
        return self.choice[game.index // self.group_size]

    def reply(self, games: list[Game]) -> list[str]:
        texts = [""] * len(games)
        for k, player in enumerate(self.players):
            mine = [i for i, g in enumerate(games) if self.member(g) == k]
            for i, text in zip(mine, player.reply([games[i] for i in mine])):
                texts[i] = text
        return texts


# ---------------------------------------------------------------------------------------------------------------
# The lockstep runner


def play(scenarios: list[Scenario], buyer, seller, max_rounds: int = 6, on_round=None,
         any_pending=None) -> list[Game]:
    """Play one episode per scenario, all in lockstep: every pending buyer reply in one batch, then every pending
    seller reply in one batch. Returns the games (outcome, transcript, and each LLM player's Conversation).

    any_pending(flag) -> bool, when given, ORs `flag` over the processes that share one engine (a tensor-parallel
    group): each must call the engine equally often, so a process whose games are over keeps replying to an
    empty batch until every process in its group is done."""
    ladder = getattr(buyer, "style", "") == "ladder"   # the rules follow each player's prompt (see LADDER)
    seller_ladder = getattr(seller, "style", "") == "ladder"
    games = [Game(Negotiation(s, max_rounds, ladder, seller_ladder), index=i) for i, s in enumerate(scenarios)]
    sync = any_pending or bool
    while True:
        pending = [g for g in games if not g.done]
        if not sync(bool(pending)):
            break
        for g, text in zip(pending, buyer.reply(pending)):
            g.negotiation.buyer_says(text)
        pending = [g for g in pending if not g.done]
        if any_pending is not None or pending:
            for g, text in zip(pending, seller.reply(pending)):
                g.negotiation.seller_says(text)
        if on_round is not None:
            on_round(games)
    return games

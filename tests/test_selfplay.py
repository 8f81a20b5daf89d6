"""Self-play: the seller as a second adapter, the league, each side's mask and gradient, the cross-play table."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import env
import eval as evaluation
import league
import train
from conftest import one_thread, randomise_lora_b

ROOT = Path(__file__).resolve().parent.parent
CPU = str(ROOT / "configs" / "cpu.yaml")
SELFPLAY = str(ROOT / "configs" / "cpu-selfplay.yaml")




# ---------------------------------------------------------------------------------------------------------------
# The schedule and the league (pure)


def test_learning_roles_per_mode():
    assert [league.learning_roles("off", k, 2) for k in range(3)] == [["buyer"]] * 3
    assert [league.learning_roles("alternate", k, 2) for k in range(6)] == \
        [["buyer"], ["buyer"], ["seller"], ["seller"], ["buyer"], ["buyer"]]
    assert league.learning_roles("simultaneous", 5, 2) == ["buyer", "seller"]


def test_pairings_follow_the_weights_and_name_the_learners():
    snaps = {"buyer": [], "seller": []}
    only_latest = {"latest": 1.0, "snapshots": 0.0, "base": 0.0, "scripted": 0.0}
    # alternate, the buyer's turn: every group is the learning buyer against the seller as it is now
    assert league.draw_pairings(["buyer"], 3, only_latest, snaps, 0) == [{"buyer": "learner", "seller": "current"}] * 3
    # simultaneous: "latest" means both sides learn from the group (every episode trains both)
    both = league.draw_pairings(["buyer", "seller"], 4, only_latest, snaps, 0)
    assert both == [{"buyer": "learner", "seller": "learner"}] * 4
    assert league.trained_rows(both, "seller", 2) == list(range(8))
    # snapshots without any yet: the latest instead; with some: one of them
    only_snaps = dict(only_latest, latest=0.0, snapshots=1.0)
    assert league.draw_pairings(["seller"], 2, only_snaps, snaps, 0) == [{"seller": "learner", "buyer": "current"}] * 2
    drawn = league.draw_pairings(["seller"], 40, only_snaps, {"buyer": ["buyer@5", "buyer@10"], "seller": []}, 0)
    assert {p["buyer"] for p in drawn} == {"buyer@5", "buyer@10"} and all(p["seller"] == "learner" for p in drawn)
    # a zero weight is never drawn; the draw is a function of the seed
    mixed = {"latest": 0.5, "snapshots": 0.0, "base": 0.5, "scripted": 0.0}
    a = league.draw_pairings(["buyer"], 64, mixed, snaps, 7)
    assert a == league.draw_pairings(["buyer"], 64, mixed, snaps, 7)
    assert {p["seller"] for p in a} == {"current", "base"}
    rows = league.trained_rows([{"buyer": "learner", "seller": "base"}, {"buyer": "base", "seller": "learner"}],
                               "seller", 3)
    assert rows == [3, 4, 5]


def test_mixture_plays_each_group_with_its_own_player(scenarios):
    """Group k of a Mixture faces players[choice[k]]: the same games as playing each group on its own."""
    G, picks = 2, [scenarios[0], scenarios[0], scenarios[1], scenarios[1]]
    sellers = [env.ScriptedSeller("boulware", style="ladder"), env.ScriptedSeller("conceder", style="ladder")]
    mixed = env.play(picks, env.LadderBuyer(seed=3), env.Mixture(sellers, [1, 0], G))
    alone = [env.play(picks, env.LadderBuyer(seed=3), s) for s in sellers]
    assert [g.outcome.price for g in mixed] == [g.outcome.price for g in alone[1][:2]] + \
        [g.outcome.price for g in alone[0][2:]]
    with pytest.raises(ValueError, match="ladder"):
        env.Mixture([env.ScriptedSeller("linear", style="ladder"), env.ScriptedSeller("linear")], [0, 1])


# ---------------------------------------------------------------------------------------------------------------
# Two adapters on one base: masks and gradients


@pytest.fixture(scope="module")
def two_sided(scenarios):
    """The warm start with the buyer's LoRA and a seller adapter; two games of the LLM buyer against the LLM
    seller (its own adapter), and the generations each side's engine calls returned."""
    import model as model_lib
    from engine import HFEngine
    cfg = config.load_config(CPU, ["selfplay.mode=simultaneous"])
    with one_thread():
        model, tokenizer = model_lib.load_policy(cfg.model, "cpu", verbose=False)
    league.add_seller_adapter(model, 0)
    randomise_lora_b(model, std=0.05)  # both adapters away from the base (B = 0 at the start), differently
    engine = HFEngine(model, tokenizer)
    calls = {"buyer": [], "seller": []}

    class Recording:
        def __init__(self, role):
            self.role, self.tokenizer = role, tokenizer

        def generate(self, prompts, **kw):
            out = engine.generate(prompts, **kw)
            calls[self.role].append(out)
            return out
    buyer = env.LLMPlayer(Recording("buyer"), "buyer", 1.0, 16, adapter=True, style="ladder", seed=1)
    seller = env.LLMPlayer(Recording("seller"), "seller", 1.0, 16, adapter="seller", style="ladder", seed=2)
    with one_thread():
        games = env.play([scenarios[0], scenarios[1]], buyer, seller, max_rounds=6)
    return cfg, model, tokenizer, games, calls


def test_each_sides_mask_marks_exactly_its_own_generated_tokens(two_sided):
    _, _, _, games, calls = two_sided
    for role in ("buyer", "seller"):
        for i, g in enumerate(games):
            conv = g.state[role]
            generated = [t for call in calls[role] if i < len(call) for t in call[i].token_ids]
            mine = [t for t, m in zip(conv.ids, conv.mask) if m]
            assert mine == generated[:len(mine)] and len(mine) > 0


def test_the_seller_adapter_differs_from_the_buyer_and_the_base(two_sided):
    _, model, tokenizer, games, _ = two_sided
    conv = games[0].state["seller"]
    ids = torch.tensor([conv.ids])
    with torch.no_grad(), one_thread():
        outs = {}
        for name in ("default", "seller"):
            from engine import active_adapter
            with active_adapter(model, name):
                outs[name] = model(input_ids=ids).logits
        with model.disable_adapter():
            outs["base"] = model(input_ids=ids).logits
    assert model.active_adapter == "default"   # the buyer's stays the active one
    assert not torch.allclose(outs["default"], outs["seller"]) and not torch.allclose(outs["seller"], outs["base"])


def test_a_seller_update_trains_only_the_seller_adapter(two_sided):
    """Through train_side: the buyer's LoRA gets exactly zero gradient and stays put; the seller's moves; the
    buyer's adapter is the active one again afterwards."""
    cfg, model, tokenizer, games, _ = two_sided
    names = dict(model.named_parameters())
    seller_params = league.adapter_params(model, "seller")
    side = train.make_side(cfg, model, "seller", seller_params)
    side.rewards = lambda gs: torch.tensor([0.8, 0.1])   # an advantage whatever the two games' outcomes were
    buyer_before = {n: p.detach().clone() for n, p in names.items() if ".default." in n}
    seller_before = [p.detach().clone() for p in seller_params]
    cfg2 = config.load_config(CPU, ["selfplay.mode=simultaneous", "rollout.group_size=2"])
    adv = train.group_advantages(side.rewards(games), 2)
    assert adv.tolist() == pytest.approx([0.35, -0.35])
    with one_thread():
        stats, maxes, norms, skipped = train.train_side(model, side, games, [0, 1], adv, cfg2, tokenizer.pad_token_id,
                                                        "cpu", 0)
    assert skipped == 0 and norms[0] > 0
    for n, p in names.items():
        if ".default." in n:
            assert p.grad is None or p.grad.abs().sum() == 0, n
            assert torch.equal(p.detach(), buyer_before[n])
    assert any(not torch.equal(p.detach(), b) for p, b in zip(seller_params, seller_before))
    assert model.active_adapter == "default"
    model.zero_grad()


def test_buyer_and_environment_tokens_get_exactly_zero_gradient_in_the_sellers_loss(two_sided):
    """The seller's loss, under its adapter: the gradient reaching the logits is exactly zero at every position
    that does not predict a token the seller generated (its prompt, the buyer's relayed words, the template)."""
    from engine import active_adapter
    _, model, tokenizer, games, _ = two_sided
    convs = [g.state["seller"] for g in games]
    (mb,) = train.micro_batches(convs, [0, 1], 10**6, tokenizer.pad_token_id, "cpu")

    class KeepLogits:
        def __call__(self, **kw):
            out = model(**kw)
            out.logits.retain_grad()
            self.logits = out.logits
            return out
    spy = KeepLogits()
    with one_thread(), active_adapter(model, "seller"):
        logp, _ = train.token_logprobs(spy, mb.ids, mb.attn, 1.0)
        loss = train.policy_loss(logp, logp.detach() - 0.05, torch.tensor([1.0, -0.5]), mb.mask)
        loss.backward()
    model.zero_grad()
    grad = spy.logits.grad.abs().sum(-1)                                                    # [B, T]
    trained = torch.cat([mb.mask > 0, torch.zeros(2, 1, dtype=torch.bool)], dim=1)  # position T-1 predicts nothing
    assert (grad[~trained] == 0).all() and (grad[trained] > 0).all()
    assert trained.sum() < 0.5 * (mb.attn > 0).sum()


# ---------------------------------------------------------------------------------------------------------------
# Config, the command line, the cross-play table


@pytest.mark.parametrize("override, field", [
    (["selfplay.mode=both"], "selfplay.mode"),
    (["selfplay.mode=alternate", "engine.kind=vllm", "engine.sync_strategy=merged"], "engine.sync_strategy"),
    (["selfplay.mode=alternate", "train.sharding=fsdp2"], "train.sharding"),
    (["selfplay.mode=alternate", "seller.kind=scripted"], "seller.kind"),
    (["selfplay.mode=alternate", "selfplay.league_latest=0"], "selfplay.league_latest"),
    (["selfplay.mode=alternate", "selfplay.switch_every=0"], "selfplay.switch_every"),
])
def test_selfplay_config_errors_name_the_field(override, field):
    with pytest.raises(config.ConfigError, match=field.replace(".", r"\.")):
        config.load_config(CPU, override).validate()


def test_a_crossplay_buyer_on_another_base_stops_at_config_time(tmp_path):
    """An adapter means something only on its own base: a buyer trained on checkpoints/warmstart-mixed in the table
    of a run on checkpoints/warmstart stops before any compute, naming the field and both bases."""
    for name, base in (("same", "checkpoints/warmstart"), ("other", "checkpoints/warmstart-mixed")):
        (tmp_path / name / "adapter").mkdir(parents=True)
        (tmp_path / name / "adapter" / "adapter_config.json").write_text(
            json.dumps({"base_model_name_or_path": str(ROOT / base)}))
    run = ["model.name=checkpoints/warmstart", "selfplay.mode=alternate"]
    config.load_config(CPU, run + [f"eval.crossplay_buyers=[{tmp_path / 'same'}]"]).validate()
    with pytest.raises(config.ConfigError, match=r"eval\.crossplay_buyers.*warmstart-mixed"):
        config.load_config(CPU, run + [f"eval.crossplay_buyers=[{tmp_path / 'other'}]"]).validate()


def test_selfplay_run_saves_both_adapters_and_snapshots_and_resumes(tmp_path):
    out = tmp_path / "sp"
    common = [sys.executable, "train.py", SELFPLAY, f"out_dir={out}", "rollout.products_per_step=2",
              "eval.episodes_per_product=0", "selfplay.mode=alternate", "selfplay.switch_every=1",
              "selfplay.snapshot_every=1", "log.progress=false", "save_every=1"]
    env_vars = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    r = subprocess.run(common + ["train.steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env_vars)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["grad_norm"] > 0 and metrics[0].get("seller/grad_norm") is None   # step 1: the buyer's
    assert metrics[1]["seller/grad_norm"] > 0 and metrics[1].get("grad_norm") is None   # step 2: the seller's
    assert all(0 <= m["below_cost_deals"] == 0 for m in metrics)
    step = out / "step_000002"
    assert (step / "adapter" / "adapter_model.safetensors").exists()
    assert (step / "seller_adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["buyer_step_000001", "seller_step_000002"]
    # the resumed launch also ends with the cross-play table, a single-sided buyer (its own step 2) in it
    first = tmp_path / "buyer_ckpt"
    __import__("shutil").copytree(step, first)
    r = subprocess.run([x for x in common if not x.startswith("eval.")] +
                       ["train.steps=3", "eval.episodes_per_product=1", "eval.products=2",
                        "eval.best_response_products=2", f"eval.crossplay_buyers=[{first}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, env=env_vars)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    cross = json.loads((out / "final_eval.json").read_text())["crossplay"]
    assert cross["buyers"] == ["start", "trained", f"buyer:{tmp_path.name}/buyer_ckpt"]
    assert cross["sellers"] == ["base", "scripted:family", "trained seller", "seller snapshot 2"]
    assert all(len(row) == 4 and all(-1 <= x <= 1 for x in row) for row in cross["buyer_reward"])
    assert set(cross["exploitability"]) == set(cross["sellers"]) and cross["below_cost_deals"] == 0
    assert "buyer's reward (rows: buyers; columns: sellers)" in r.stdout


def test_the_shipped_selfplay_config_trains_both_sides_in_one_step(tmp_path):
    """configs/cpu-selfplay.yaml as shipped (simultaneous, the seller at its own rate), one step on two products:
    the step updates both adapters, each at its own learning rate, and no deal closes below cost."""
    out = tmp_path / "sim"
    cmd = [sys.executable, "train.py", SELFPLAY, f"out_dir={out}", "rollout.products_per_step=2", "train.steps=1",
           "train.warmup_updates=0", "eval.episodes_per_product=0", "log.progress=false"]
    env_vars = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env_vars)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert m["grad_norm"] > 0 and m["seller/grad_norm"] > 0
    assert m["seller/lr"] == pytest.approx(2 * m["lr"])   # one schedule, each side at its own rate (3e-3, 1.5e-3)
    assert m["below_cost_deals"] == 0


def test_crossplay_table_by_hand():
    def rec(buyer, seller, product, r, s):
        return {"buyer": buyer, "seller": seller, "persona": "none", "product": product, "episode": 0, "error": None,
                "reward": r, "seller_reward": s, "reason": "deal", "price": 1.0, "rounds": 2, "interventions": 0,
                "first_offer": 1.0, "overshoot": False,
                "scenario": {"budget": 2.0, "cost": 1.0, "list_price": 3.0, "category": "x"}}
    records = [rec("b1", "s1", "p1", 0.5, 0.2), rec("b1", "s1", "p2", 0.3, 0.4), rec("b1", "s2", "p1", -1.0, 0.0),
               rec("b2", "s1", "p1", 0.1, 0.6), rec("b2", "s2", "p1", 0.2, 0.5)]
    t = evaluation.crossplay_table(records, ["b1", "b2"], ["s1", "s2"])
    assert t["buyer_reward"] == [pytest.approx([0.4, -1.0]), pytest.approx([0.1, 0.2])]
    assert t["seller_reward"] == [pytest.approx([0.3, 0.0]), pytest.approx([0.6, 0.5])]
    assert t["worst_buyer_reward"] == {"b1": pytest.approx(-1.0), "b2": pytest.approx(0.1)}
    assert t["seller_mean_reward"] == {"s1": pytest.approx(0.45), "s2": pytest.approx(0.25)}


@pytest.mark.slow
def test_selfplay_on_vllm_serves_both_adapters_and_the_snapshots(tmp_path):
    """engine.kind=vllm, sync_strategy=adapter: the buyer's and the seller's adapters are synced after the steps
    they learn in and each is checked by its own freshness probe; snapshots become LoRA slots (max_loras)."""
    pytest.importorskip("vllm")
    import os
    out = tmp_path / "spv"
    cmd = [sys.executable, "train.py", SELFPLAY, f"out_dir={out}", "rollout.products_per_step=2", "train.steps=3",
           "eval.episodes_per_product=0", "selfplay.mode=alternate", "selfplay.switch_every=1",
           "selfplay.snapshot_every=1", "selfplay.max_snapshots=1", "log.progress=false", "engine.kind=vllm",
           "engine.max_model_len=1024", "engine.enforce_eager=true", "selfplay.league_latest=0",
           "selfplay.league_snapshots=1", "selfplay.league_base=0", "selfplay.league_scripted=0"]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env_vars)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["probe_gap"] < 1e-3 and metrics[1]["seller/probe_gap"] < 1e-3   # both adapters fresh
    assert metrics[0]["logp_diff_abs_max"] < 1e-3 and metrics[1]["seller/logp_diff_abs_max"] < 1e-3
    # snapshots only: step 1 has none yet (the seller as it is), step 2 meets buyer@1, step 3 seller@2
    assert metrics[0]["league/seller_current"] == 1 and metrics[1]["league/buyer_snapshot"] == 1
    assert metrics[2]["league/seller_snapshot"] == 1
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["buyer_step_000003", "seller_step_000002"]


def test_the_report_of_a_crossplay_run_with_a_selfplay_training_run(tmp_path):
    """report.py on a cross-play metrics dict and a self-play run's final_eval.json (crossplay inside): the
    markdown and HTML carry the table, the heat map and both sides' curves, and the run's summaries only."""
    import report
    cross = {
        "buyers": ["b1"], "sellers": ["s1", "s2"], "buyer_reward": [[0.4, 0.2]],
        "buyer_reward_ci95": [[[0.3, 0.5], [0.1, 0.3]]], "seller_reward": [[0.3, 0.5]],
        "seller_reward_ci95": [[[0.2, 0.4], [0.4, 0.6]]], "deal_rate": [[0.8, 0.7]], "episodes": [[4, 4]],
        "worst_buyer_reward": {"b1": 0.2}, "seller_mean_reward": {"s1": 0.3, "s2": 0.5},
        "exploitability": {"s1": {"schedule": [0, 0, 0, 0, 2, 7], "reward": 0.44, "deal_rate": 0.85,
                                  "candidates": 8}}}
    summary = {"episodes": 4, "reward": 0.3, "reward_ci95": [0.2, 0.4]}
    metrics = {"run": {}, "rows": [], "crossplay": cross}
    steps = [{"step": k, "reward": 0.3, "seller/reward": 0.4, "seller/grad_norm": 0.01 if k > 5 else None}
             for k in range(1, 11)]
    training = {"dir": "runs/x", "steps": steps, "final_eval": {"before": summary, "after": summary,
                                                                "crossplay": cross}}
    md = report.markdown_report(metrics)
    assert "## Cross-play" in md and "| b1 | 0.400 [0.300, 0.500] | 0.200 [0.100, 0.300] | 0.200 |" in md
    assert "aaaach" in md
    page = report.html_report(metrics, [], training)
    assert "id='crossplay'" in page and page.count("<svg") >= 3   # heat map, training curves, both sides' curves

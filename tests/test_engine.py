"""engine.py: HFEngine log-probs against a plain forward pass, adapter on/off, determinism; ChatEndpoint against a
stdlib HTTP server on 127.0.0.1."""
import json
import threading
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from engine import (ChatEndpoint, EndpointError, Generation, HFEngine, api_base, dedupe, merged_copy,
                    stop_token_ids)
from conftest import randomise_lora_b
from model import ModelConfig, load_policy

TOL = 1e-5  # float32: engine and recomputation differ only by padding/cache summation order


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    m, tok = load_policy(ModelConfig(name=tiny_model_dir, dtype="float32"), verbose=False)
    randomise_lora_b(m, 0.5, seed=0)  # a non-zero adapter, so that adapter on and off are different models
    return m, tok


@pytest.fixture(scope="module")
def prompts(policy):
    _, tok = policy
    users = ["Hi", "Can you do $12.50 for the Anker Wireless Mouse, 2-Pack?", "No.", "What about $7?"]
    return [tok.encode(tok.apply_chat_template([{"role": "system", "content": "You are a buyer."},
                                                {"role": "user", "content": u}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False) for u in users]


def recompute_logprobs(m, prompt, gen: Generation, temperature: float, adapter: bool) -> torch.Tensor:
    """log-probs of the generated ids from one unpadded, uncached forward pass of prompt + generation."""
    ids = torch.tensor([prompt + gen.token_ids])
    m.eval()
    with torch.no_grad(), (m.disable_adapter() if not adapter else nullcontext()):
        logits = m(ids).logits[0, len(prompt) - 1:-1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(1, torch.tensor(gen.token_ids)[:, None]).squeeze(1)


def frequent_stops(engine, fraction=0.05):
    """Make every 20th vocabulary id a stop id, so that rows finish at different steps (exercises the pruning
    of finished rows from the batch and the KV cache)."""
    engine.stop_ids = sorted(set(engine.stop_ids) | set(range(3, len(engine.tokenizer), int(1 / fraction))))


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("adapter", [True, False])
def test_logprobs_match_a_plain_forward_pass(policy, prompts, temperature, adapter):
    m, tok = policy
    engine = HFEngine(m, tok)
    frequent_stops(engine)
    prompts = prompts + [prompts[1]] * 3  # a group sharing its opening prompt: one prefill, copied in the cache
    for seed in range(10):  # a seed with rows stopping at different steps and rows cut at max_tokens
        gens = engine.generate(prompts, temperature=temperature, max_tokens=24, adapter=adapter, seed=seed)
        if {g.finished for g in gens} == {True, False} or temperature == 0:
            break
    if temperature > 0:
        assert {g.finished for g in gens} == {True, False}
        assert len({tuple(g.token_ids) for g in gens[-4:]}) > 1  # copies sample independently
    for p, g in zip(prompts, gens):
        assert len(g.token_ids) == len(g.logprobs) >= 1
        assert g.finished == (g.token_ids[-1] in engine.stop_ids)
        assert g.finished or len(g.token_ids) == 24
        assert not any(t in engine.stop_ids for t in g.token_ids[:-1])  # stops at the first stop id
        assert g.text == tok.decode(g.token_ids, skip_special_tokens=True)
        err = (recompute_logprobs(m, p, g, temperature, adapter) - torch.tensor(g.logprobs)).abs().max().item()
        assert err < TOL, f"engine vs forward log-prob diff {err}"


def test_greedy_is_argmax_and_deterministic(policy, prompts):
    m, tok = policy
    engine = HFEngine(m, tok)
    a = engine.generate(prompts, temperature=0, max_tokens=16, adapter=True)
    b = engine.generate(prompts, temperature=0, max_tokens=16, adapter=True, seed=123)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    ids = torch.tensor([prompts[1] + a[1].token_ids])
    with torch.no_grad():
        argmax = m(ids).logits[0, len(prompts[1]) - 1:-1].argmax(-1).tolist()
    assert argmax == a[1].token_ids


def test_batching_and_padding_do_not_change_greedy_results(policy, prompts):
    m, tok = policy
    batched = HFEngine(m, tok).generate(prompts, temperature=0, max_tokens=12, adapter=True)
    one_by_one = HFEngine(m, tok, max_batch_tokens=1).generate(prompts, temperature=0, max_tokens=12, adapter=True)
    alone = [HFEngine(m, tok).generate([p], temperature=0, max_tokens=12, adapter=True)[0] for p in prompts]
    assert [g.token_ids for g in batched] == [g.token_ids for g in one_by_one] == [g.token_ids for g in alone]
    for x, y in zip(batched, alone):
        assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < TOL


def test_next_turn_reuses_the_cached_prefix_exactly(policy, prompts):
    """A second turn extends each conversation (prompt + reply + a user turn): the engine prefills only the new
    ids from its PrefixStore; samples and log-probs match an engine without the store and a plain forward pass."""
    m, tok = policy
    cached, fresh = HFEngine(m, tok), HFEngine(m, tok)
    frequent_stops(cached), frequent_stops(fresh)  # some replies end on a stop id, others are cut at max_tokens
    group = prompts + [prompts[1]] * 2
    first = cached.generate(group, temperature=1.0, max_tokens=12, adapter=True, seed=3)
    user = tok.encode("<|im_end|>\n<|im_start|>user\nAnd $9?<|im_end|>\n<|im_start|>assistant\n",
                      add_special_tokens=False)
    turn2 = [p + g.token_ids + user[i % 2:] for i, (p, g) in enumerate(zip(group, first))]  # unequal new parts
    assert all(cached.stores[True].longest_prefix(p)[0] == len(q) + len(g.token_ids) - 1
               for p, q, g in zip(turn2, group, first))  # every row's prompt and reply but its last id
    fresh.stores.clear()
    a = cached.generate(turn2, temperature=1.0, max_tokens=12, adapter=True, seed=4)
    b = fresh.generate(turn2, temperature=1.0, max_tokens=12, adapter=True, seed=4)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    for p, x, y in zip(turn2, a, b):
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < TOL
        assert (recompute_logprobs(m, p, x, 1.0, True) - torch.tensor(x.logprobs)).abs().max().item() < TOL
    assert False not in cached.stores  # adapter off would keep a store of its own


def test_two_players_on_one_adapter_setting_each_reuse_their_own_rows(policy, prompts):
    """Buyer and seller both the base (adapter off) alternate calls: each call finds its own rows of two calls
    back, prefills only the new ids, and samples what an engine without a store samples; rows older than that,
    or extended since, are not kept."""
    m, tok = policy
    engine, fresh = HFEngine(m, tok), HFEngine(m, tok)
    user = tok.encode("<|im_end|>\n<|im_start|>user\nAnd $9?<|im_end|>\n<|im_start|>assistant\n",
                      add_special_tokens=False)
    buyer, seller = prompts[:2], prompts[2:]
    b1 = engine.generate(buyer, temperature=1.0, max_tokens=8, adapter=False, seed=1)
    s1 = engine.generate(seller, temperature=1.0, max_tokens=8, adapter=False, seed=2)
    buyer2 = [p + g.token_ids + user for p, g in zip(buyer, b1)]
    store = engine.stores[False]
    assert all(store.longest_prefix(p)[0] == len(q) + len(g.token_ids) - 1 for p, q, g in zip(buyer2, buyer, b1))
    store.extended.clear()  # (the probe above is not a call)
    b2 = engine.generate(buyer2, temperature=1.0, max_tokens=8, adapter=False, seed=3)
    assert [g.token_ids for g in b2] == [g.token_ids for g in fresh.generate(buyer2, temperature=1.0, max_tokens=8,
                                                                             adapter=False, seed=3)]
    kept = engine.stores[False]
    assert set(kept.older) == {tuple(p + g.token_ids[:-1]) for p, g in zip(seller, s1)}  # the seller's, not b1's
    seller2 = [p + g.token_ids + user for p, g in zip(seller, s1)]
    engine.generate(seller2, temperature=1.0, max_tokens=8, adapter=False, seed=4)
    assert set(engine.stores[False].older) == {tuple(p + g.token_ids[:-1]) for p, g in zip(buyer2, b2)}


def test_prefix_store_is_dropped_when_weights_change(policy, prompts):
    m, tok = policy
    engine = HFEngine(m, tok)
    gens = engine.generate(prompts, temperature=0, max_tokens=4, adapter=True)
    turn2 = [p + g.token_ids + [tok.eos_token_id] for p, g in zip(prompts, gens)]
    seen = []
    store = engine.stores[True]
    store.longest_prefix = lambda p: seen.append(p) or None  # records whether the stale store is consulted
    lora = next(p for n, p in m.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora.add_(0.0)  # an in-place write, as an optimiser step makes: the version counter moves
    engine.generate(turn2, temperature=0, max_tokens=4, adapter=True)
    assert seen == [] and engine.stores[True] is not store


@pytest.mark.parametrize("adapter", [True, False])
def test_merged_copies_sample_what_the_peft_model_samples(policy, prompts, adapter):
    """engine.merged_copies: plain copies (the base; the base with the adapter merged) generate the same tokens as
    the peft model itself, log-probs equal to float rounding, over two turns (the prefix store);
    after an optimiser-like write to a LoRA weight the copy follows the new weights, refreshed in place to the
    bits of a fresh merge."""
    m, tok = policy
    plain, wrapped = HFEngine(m, tok, merged_copies=True), HFEngine(m, tok)
    frequent_stops(plain), frequent_stops(wrapped)
    a = plain.generate(prompts, temperature=1.0, max_tokens=12, adapter=adapter, seed=5)
    b = wrapped.generate(prompts, temperature=1.0, max_tokens=12, adapter=adapter, seed=5)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    gap = max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x.logprobs, y.logprobs))
    assert gap < TOL  # (not 0 even for the base: the same weights in other memory may take another kernel path)
    user = tok.encode("<|im_end|>\n<|im_start|>user\nAnd $9?<|im_end|>\n<|im_start|>assistant\n",
                      add_special_tokens=False)
    turn2 = [p + g.token_ids + user for p, g in zip(prompts, a)]
    a2 = plain.generate(turn2, temperature=1.0, max_tokens=12, adapter=adapter, seed=6)
    b2 = wrapped.generate(turn2, temperature=1.0, max_tokens=12, adapter=adapter, seed=6)
    assert [g.token_ids for g in a2] == [g.token_ids for g in b2]
    for p, g in zip(turn2, a2):
        assert (recompute_logprobs(m, p, g, 1.0, adapter) - torch.tensor(g.logprobs)).abs().max().item() < TOL
    copy = plain.copies[adapter][1]
    assert not any(hasattr(mod, "lora_A") for mod in copy.modules())  # no peft wrapper left in it
    lora = next(p for n, p in m.named_parameters() if "lora_B" in n)
    before = lora.detach().clone()
    try:
        with torch.no_grad():
            lora.add_(0.3)  # as an optimiser step would
        c = plain.generate(prompts, temperature=0, max_tokens=6, adapter=adapter)
        d = wrapped.generate(prompts, temperature=0, max_tokens=6, adapter=adapter)
        assert plain.copies[adapter][1] is copy  # the base's never rebuilt; the adapter's refreshed in place
        fresh = merged_copy(m, adapter)
        assert all(torch.equal(x, y) for x, y in zip(copy.state_dict().values(), fresh.state_dict().values()))
        assert [g.token_ids for g in c] == [g.token_ids for g in d]
        for p, g in zip(prompts, c):
            assert (recompute_logprobs(m, p, g, 0, adapter) - torch.tensor(g.logprobs)).abs().max().item() < TOL
    finally:
        with torch.no_grad():
            lora.copy_(before)


def test_dedupe_keeps_first_seen_order():
    assert dedupe([[5, 6], [7], [5, 6], [7], [8]]) == ([[5, 6], [7], [8]], [0, 1, 0, 1, 2])


def test_token_budget_splits_batches_in_length_order():
    engine = HFEngine.__new__(HFEngine)
    engine.max_batch_tokens = 40
    prompts = [[0] * n for n in (10, 2, 5, 3)]
    order = sorted(range(4), key=lambda i: len(prompts[i]))  # [1, 3, 2, 0]
    # max_tokens 8: rows * (longest + 8) <= 40 -> [2, 3] fits 2 * 11 = 22, adding 5 -> 3 * 13 = 39, adding 10 -> 72
    assert engine.batches(order, prompts, max_tokens=8) == [[1, 3, 2], [0]]


def test_seed_reproduces_samples(policy, prompts):
    m, tok = policy
    engine = HFEngine(m, tok)
    a = engine.generate(prompts, temperature=1.0, max_tokens=16, adapter=True, seed=7)
    b = engine.generate(prompts, temperature=1.0, max_tokens=16, adapter=True, seed=7)
    c = engine.generate(prompts, temperature=1.0, max_tokens=16, adapter=True, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.logprobs for g in a] == [g.logprobs for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


def test_adapter_off_is_the_base_model(policy, prompts, tiny_model_dir):
    from transformers import AutoModelForCausalLM
    m, tok = policy
    engine = HFEngine(m, tok)
    on = engine.generate(prompts, temperature=0, max_tokens=16, adapter=True)
    off = engine.generate(prompts, temperature=0, max_tokens=16, adapter=False)
    base = HFEngine(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tok)
    plain = base.generate(prompts, temperature=0, max_tokens=16, adapter=True)  # no adapter to switch on
    assert [g.token_ids for g in off] == [g.token_ids for g in plain]
    assert [g.token_ids for g in on] != [g.token_ids for g in off]
    for x, y in zip(off, plain):
        assert max(abs(a - b) for a, b in zip(x.logprobs, y.logprobs)) < TOL


def test_adapter_off_on_fused_moe_experts(tiny_moe_dir):
    m, tok = load_policy(ModelConfig(name=tiny_moe_dir, dtype="float32", lora_target_modules=["q_proj"],
                                     lora_target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
                         verbose=False)
    engine = HFEngine(m, tok)
    prompt = [tok.encode("<|im_start|>user\nHello $5<|im_end|>\n<|im_start|>assistant\n")]
    before = engine.generate(prompt, temperature=0, max_tokens=12, adapter=True)[0]
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "experts" in n and "lora_B" in n:
                p.fill_(0.3)
    on = engine.generate(prompt, temperature=0, max_tokens=12, adapter=True)[0]
    off = engine.generate(prompt, temperature=0, max_tokens=12, adapter=False)[0]
    assert off.token_ids == before.token_ids and on.logprobs != off.logprobs
    err = (recompute_logprobs(m, prompt[0], on, 0, True) - torch.tensor(on.logprobs)).abs().max().item()
    assert err < TOL


def test_generation_restores_training_mode_and_needs_no_grad(policy, prompts):
    m, tok = policy
    m.train()
    gens = HFEngine(m, tok).generate(prompts[:1], temperature=1.0, max_tokens=4, adapter=True, seed=0)
    assert m.training and len(gens[0].token_ids) >= 1
    m.eval()


def test_stop_ids_and_sync(policy):
    m, tok = policy
    engine = HFEngine(m, tok)
    assert engine.stop_ids == stop_token_ids(tok, m) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert engine.sync(m) is None


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompts=[], temperature=1.0, max_tokens=4), "no prompts"),
    (dict(prompts=[[]], temperature=1.0, max_tokens=4), "empty prompt"),
    (dict(prompts=[[1]], temperature=-1.0, max_tokens=4), "temperature=-1.0"),
    (dict(prompts=[[1]], temperature=1.0, max_tokens=0), "max_tokens=0"),
])
def test_bad_arguments_are_named(policy, kwargs, message):
    m, tok = policy
    with pytest.raises(ValueError, match=message):
        HFEngine(m, tok).generate(adapter=True, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# ChatEndpoint against a stdlib OpenAI-style server


class FakeOpenAI(BaseHTTPRequestHandler):
    """GET /v1/models lists "tiny"; POST /v1/chat/completions echoes the last message. `fail_next` answers the
    next N chat requests with HTTP 503; a request for model "bad" gets HTTP 400."""
    fail_next = 0
    calls = 0
    auth = []

    def log_message(self, *args):
        pass

    def reply(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.calls += 1
        cls.auth.append(self.headers.get("Authorization"))
        if cls.fail_next > 0:
            cls.fail_next -= 1
            return self.reply(503, {"error": "busy"})
        if req["model"] == "bad":
            return self.reply(400, {"error": "unknown model bad"})
        content = f"{req['messages'][-1]['content']} t={req['temperature']} n={req['max_tokens']}"
        self.reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


class Server(ThreadingHTTPServer):
    request_queue_size = 64  # the default backlog of 5 drops concurrent connects, costing a 1 s SYN retry


@pytest.fixture
def server():
    FakeOpenAI.fail_next, FakeOpenAI.calls, FakeOpenAI.auth = 0, 0, []
    httpd = Server(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_chat_returns_replies_in_order(server, monkeypatch):
    monkeypatch.setenv("TEST_KEY", "sk-123")
    ep = ChatEndpoint(server, "tiny", api_key_env="TEST_KEY")
    ep.check()
    batch = [[{"role": "user", "content": f"m{i}"}] for i in range(20)]
    assert ep.chat(batch, temperature=0.7, max_tokens=9) == [f"m{i} t=0.7 n=9" for i in range(20)]
    assert FakeOpenAI.auth == ["Bearer sk-123"] * 20


def test_chat_retries_transient_errors(server):
    FakeOpenAI.fail_next = 2
    ep = ChatEndpoint(server + "/v1/", "tiny", retries=2, max_workers=1, backoff_s=0.01)
    assert ep.chat([[{"role": "user", "content": "x"}]], temperature=0, max_tokens=1) == ["x t=0 n=1"]
    assert FakeOpenAI.calls == 3


def test_chat_gives_up_after_retries(server):
    FakeOpenAI.fail_next = 5
    ep = ChatEndpoint(server, "tiny", retries=1, backoff_s=0.01)
    with pytest.raises(EndpointError, match="HTTP 503"):
        ep.chat([[{"role": "user", "content": "x"}]], temperature=0, max_tokens=1)
    assert FakeOpenAI.calls == 2


def test_client_errors_are_not_retried(server):
    ep = ChatEndpoint(server, "bad", retries=3, backoff_s=0.01)
    with pytest.raises(EndpointError, match="HTTP 400.*unknown model bad"):
        ep.chat([[{"role": "user", "content": "x"}]], temperature=0, max_tokens=1)
    assert FakeOpenAI.calls == 1


def test_check_names_url_and_fix_when_unreachable(server):
    with pytest.raises(EndpointError, match=r"http://127.0.0.1:9/v1 is unreachable .*start the server"):
        ChatEndpoint("http://127.0.0.1:9", "tiny", timeout=2).check()
    with pytest.raises(EndpointError, match=r"does not serve model 'other'.*\['tiny'\]"):
        ChatEndpoint(server, "other").check()


def test_api_base_normalises_urls():
    assert api_base("http://h:8000") == api_base("http://h:8000/") == api_base("http://h:8000/v1/") == "http://h:8000/v1"
    with pytest.raises(ValueError, match="must start with http"):
        api_base("h:8000")

"""eval.py and report.py: metrics are reward.py's, resume, a tiny model end to end, OpenAI-compatible servers
(a stdlib one, and vLLM's when installed), and report.html rendered by headless Chromium."""
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import data
import env
import eval as evaluation
import report
import reward
from conftest import randomise_lora_b, vllm_server

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def products(scenarios):
    """24 held-out products spread over the categories, MI and CI both present."""
    _, test = data.split_scenarios(scenarios, seed=0, test_size=128)
    picked = evaluation.pick_products(test, 24)
    assert {s.kind for s in picked} == {"MI", "CI"}
    return picked


LABELS = dict(buyer_name="scripted", seller_name="scripted:linear", persona="none")


def scripted_run(products, **kw):
    return evaluation.evaluate(env.ScriptedBuyer(), env.ScriptedSeller("linear"), products, progress=False,
                               **(LABELS | kw))


def without_extras(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("reward_ci95", "products", "seller_reward", "seller_reward_ci95")}


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_are_reward_summarize_of_the_same_outcomes(products, tmp_path):
    records = scripted_run(products, episodes_per_product=2, batch_size=7, out_path=tmp_path / "e.jsonl")
    # The same games played directly through env.play, in one batch, and summarised by reward.py.
    games = env.play([s for s in products for _ in range(2)], env.ScriptedBuyer(), env.ScriptedSeller("linear"))
    assert [r["reward"] for r in records] == [g.outcome.reward for g in games]
    # metrics_table sums in (product, episode) order, so that finishing and resume order never move the last bit
    outcomes = [g.outcome for g in sorted(games, key=lambda g: (g.outcome.scenario.codename, g.index % 2))]
    expected = reward.summarize_split(outcomes)
    for from_disk in (False, True):  # the JSONL round trip keeps every number exactly
        rows = evaluation.metrics_table(evaluation.read_records(tmp_path / "e.jsonl") if from_disk else records)
        (row,) = rows["rows"]
        assert (row["buyer"], row["seller"], row["persona"], row["episodes"], row["errors"]) == \
            ("scripted", "scripted:linear", "none", 48, 0)
        for split in ("all", "MI", "CI"):
            assert without_extras(row[split]) == expected[split]
        by_product = {}
        for o in outcomes:
            by_product.setdefault(o.scenario.codename, []).append(o.reward)
        assert row["all"]["reward_ci95"] == list(reward.bootstrap_ci(by_product))
        assert row["all"]["products"] == 24
        for category, m in row["by_category"].items():
            assert without_extras(m) == reward.summarize(o for o in outcomes if o.category == category)
    # What a reader of episodes.jsonl needs: labels, the scenario, both sides' full replies and parsed actions.
    r = records[0]
    assert set(evaluation.KEY_FIELDS) <= r.keys() and r["error"] is None
    assert r["transcript"][0]["text"].startswith("Thought:") and r["transcript"][0]["action"]["kind"] == "BUY"
    assert r["transcript"][1]["role"] == "seller" and r["scenario"]["cost"] == products[0].cost


def test_errored_episodes_are_counted_not_scored(products):
    records = scripted_run(products[:3], episodes_per_product=2)
    records[0] = records[0] | {"error": "buyer: [endpoint error] HTTP 503", "reward": -1.0, "reason": "protocol_violation"}
    (row,) = evaluation.metrics_table(records)["rows"]
    assert (row["episodes"], row["errors"]) == (5, 1)
    rest = sorted(records[1:], key=lambda r: (r["product"], r["episode"]))
    assert without_extras(row["all"]) == reward.summarize(evaluation.stats_of(r) for r in rest)


# ---------------------------------------------------------------------------------------------------------------
# Append per episode, resume


class Interrupting:
    """A player that raises KeyboardInterrupt (a Ctrl-C) on its (after + 1)-th call."""

    def __init__(self, player, after: int):
        self.player, self.after, self.calls = player, after, 0

    def reply(self, games):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.player.reply(games)

    def __getattr__(self, name):  # the rest of the player (e.g. a scripted seller's ceiling) as it is
        return getattr(self.player, name)


def test_resume_after_interruption_gives_the_same_records(products, tmp_path):
    kw = dict(episodes_per_product=2, batch_size=8, progress=False, **LABELS)
    full = evaluation.evaluate(env.ScriptedBuyer(), env.ScriptedSeller("linear"), products, **kw)
    path = tmp_path / "episodes.jsonl"
    with pytest.raises(KeyboardInterrupt):  # in the third chunk: two chunks done, the third one part done
        evaluation.evaluate(env.ScriptedBuyer(), Interrupting(env.ScriptedSeller("linear"), after=14), products,
                            out_path=path, **kw)
    kept = evaluation.read_records(path)
    assert 16 < len(kept) < 24
    with open(path, "a") as f:
        f.write('{"buyer": "scripted", "sel')  # a write cut short by a kill
    resumed = evaluation.evaluate(env.ScriptedBuyer(), env.ScriptedSeller("linear"), products, out_path=path,
                                  resume=True, **kw)
    assert resumed == full
    lines = path.read_text().splitlines()
    assert len(lines) == len(full)  # no episode written twice, the broken tail is gone
    assert sorted(map(json.dumps, map(json.loads, lines))) == sorted(map(json.dumps, full))


def test_cli_scripted_run_files_and_refusals(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--ckpt", "scripted", "--seller", "scripted:linear", "--products", "12", "--episodes", "2", "--out",
            str(out), "--no-progress"]
    metrics = evaluation.main(args + ["--run", str(training_run(tmp_path / "run")["dir"])])
    assert {p.name for p in out.iterdir()} >= {"metrics.json", "episodes.jsonl", "report.md", "report.html"}
    assert "Training run" in (out / "report.html").read_text()
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert set(on_disk) == {"run", "rows"}
    (row,) = on_disk["rows"]
    assert set(row) == {"buyer", "seller", "persona", "episodes", "errors", "all", "MI", "CI", "by_category"}
    assert set(row["all"]) == set(reward.summarize([])) | {"reward_ci95", "products", "seller_reward",
                                                           "seller_reward_ci95"}
    assert on_disk["run"]["protocol"]["max_rounds"] == 6 and on_disk["run"]["n_products"] == 12
    assert "| scripted | scripted:linear | none |" in (out / "report.md").read_text()
    with pytest.raises(SystemExit, match="pass --resume"):
        evaluation.main(args)
    with pytest.raises(SystemExit, match="other settings"):
        evaluation.main(args[:-3] + ["--episodes", "3", "--out", str(out), "--resume"])
    assert evaluation.main(args + ["--resume"])["rows"] == metrics["rows"]  # nothing left to play


def test_cli_fixed_schedule_buyer_plays_its_rungs(tmp_path, scenarios):
    """--ckpt schedule:aaaaag is env.LadderBuyer with that one schedule: the same games, rung for rung."""
    out = tmp_path / "eval"
    metrics = evaluation.main(["--ckpt", "schedule:aaaaag", "--ckpt", "schedule:h", "--seller", "scripted:hardliner",
                               "--seller-jitter", "0.5", "--style", "ladder", "--products", "8", "--episodes", "2",
                               "--out", str(out), "--no-progress"])
    records = evaluation.read_records(out / "episodes.jsonl")
    mine = [r for r in records if r["buyer"] == "schedule:aaaaag"]
    assert len(mine) == 16 and {r["buyer"] for r in records} == {"schedule:aaaaag", "schedule:h"}
    for r in mine:   # every BUY is rung a, but the last round's, which is rung g (0.85 of the budget)
        bids = [t["action"] for t in r["transcript"] if t["role"] == "buyer"]
        budget = r["scenario"]["budget"]
        for k, action in enumerate(bids):
            if action["kind"] == "BUY":
                rung = "g" if k == 5 else "a"
                assert action["price"] == env.ladder_prices(budget)[env.LADDER_LETTERS.index(rung)]
    # the same games as the library's own ladder buyer with that schedule, episode for episode
    held_out = evaluation.pick_products(data.split_scenarios(scenarios, seed=0, test_size=128)[1], 8)
    again = evaluation.evaluate(env.LadderBuyer([(0, 0, 0, 0, 0, 6)]), env.ScriptedSeller("hardliner", jitter=0.5),
                                held_out, episodes_per_product=2, batch_size=64, buyer_name="schedule:aaaaag",
                                seller_name="scripted:hardliner", persona="none", seed=0, progress=False)
    assert [r["reward"] for r in again] == [r["reward"] for r in mine]
    assert metrics["rows"][0]["buyer"] == "schedule:aaaaag"


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "scripted", "--personas", "pirate"], "unknown persona 'pirate'"),
    (["--ckpt", "scripted", "--seller", "scripted", "--personas", "liar"], "scripted seller has no persona"),
    (["--ckpt", "scripted", "--seller", "scripted:stubborn"], "unknown strategy 'stubborn'"),
    (["--ckpt", "/no/such/checkpoint"], "no such folder"),
    (["--ckpt", "scripted", "--seller", "base"], "pass --base-model"),
    (["--ckpt", "scripted", "--seller", "scripted", "--run", "/no/such/run"], "no metrics.jsonl there"),
    (["--ckpt", "scripted", "--seller", "scripted", "--products", "500"], "more than the 128 held-out products"),
    (["--ckpt", "schedule:aaaaaz", "--seller", "scripted", "--style", "ladder"], "one rung letter per round"),
    (["--ckpt", "schedule:aaaaag", "--seller", "scripted"], "it needs --style ladder"),
    (["--ckpt", "scripted", "--buyer-url", "http://127.0.0.1:9", "--buyer-model", "x", "--seller", "scripted"],
     "--buyer-url: chat endpoint http://127.0.0.1:9/v1 is unreachable"),
])
def test_cli_errors_before_any_episode(argv, message, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(SystemExit, match=re.escape(message)):
        evaluation.main(argv + ["--out", str(out), "--no-progress"])
    assert not (out / "episodes.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------------
# A tiny model through the HF engine


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model_dir):
    """A checkpoint laid out like train.py's: step_NNNNNN/adapter (peft) + config.yaml, with a non-zero adapter so
    that the trained buyer and the base model are different players."""
    import yaml

    import model

    peft_model, _ = model.load_policy(model.ModelConfig(name=tiny_model_dir, dtype="float32"), verbose=False)
    randomise_lora_b(peft_model, 0.5, seed=0)
    step = tmp_path_factory.mktemp("run") / "step_000002"
    peft_model.save_pretrained(str(step / "adapter"))
    config = {"model": {"name": tiny_model_dir, "dtype": "float32"},
              "rollout": {"style": "compact", "buyer_max_tokens": 20, "max_context": 1024},
              "seller": {"max_tokens": 20}, "data": {"test_size": 128, "split_seed": 0}}
    (step / "config.yaml").write_text(yaml.safe_dump(config))
    return step


def test_tiny_model_buyer_end_to_end(tmp_path, tiny_ckpt, tiny_model_dir):
    out = tmp_path / "eval"
    metrics = evaluation.main(["--ckpt", str(tiny_ckpt), "--ckpt", "base", "--ckpt", "scripted", "--seller", "base",
                               "--products", "3", "--episodes", "2", "--max-rounds", "3", "--out", str(out),
                               "--no-progress"])
    name = "/".join(tiny_ckpt.resolve().parts[-2:])  # the last two parts of the checkpoint path
    assert [r["buyer"] for r in metrics["rows"]] == [name, "base", "scripted"]
    assert all(r["episodes"] == 6 and r["errors"] == 0 for r in metrics["rows"])
    run = metrics["run"]
    assert run["protocol"]["style"] == "compact" and run["protocol"]["buyer_max_tokens"] == 20
    assert run["settings_from"]["style"] == "checkpoint config.yaml"
    assert run["protocol"]["base_model"] == tiny_model_dir
    sha = hashlib.sha256((tiny_ckpt / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert run["buyers"][0]["adapter_sha256"] == sha
    records = evaluation.read_records(out / "episodes.jsonl")
    first_reply = {r["buyer"]: r["transcript"][0]["text"] for r in records if r["product"] == records[0]["product"]
                   and r["episode"] == 0}
    assert first_reply[name] != first_reply["base"]  # the adapter is on for the checkpoint, off for base
    assert sha[:12] in (out / "report.html").read_text()


def test_vllm_engine_plays_the_same_greedy_games_as_hf(tmp_path, tiny_ckpt):
    """--engine vllm serves the checkpoint's adapter (buyer) and the base (seller) from one engine: greedy games
    equal the HF engine's, adapter on and off."""
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    runs = {}
    for engine in ("hf", "vllm"):
        evaluation.main(["--ckpt", str(tiny_ckpt), "--ckpt", "base", "--seller", "base", "--products", "2",
                         "--episodes", "1", "--max-rounds", "2", "--buyer-temp", "0", "--seller-temp", "0",
                         "--engine", engine, "--out", str(tmp_path / engine), "--no-progress"])
        runs[engine] = [[t["text"] for t in r["transcript"]]
                        for r in evaluation.read_records(tmp_path / engine / "episodes.jsonl")]
    assert runs["vllm"] == runs["hf"] and runs["hf"][0] != runs["hf"][2]  # [0]: adapter buyer, [2]: base buyer


def test_adapter_on_another_base_model_is_refused(tmp_path, tiny_ckpt):
    with pytest.raises(SystemExit, match="was trained on .* but --base-model is 'Qwen/Qwen3-4B'"):
        evaluation.main(["--ckpt", str(tiny_ckpt), "--base-model", "Qwen/Qwen3-4B", "--out", str(tmp_path)])


def test_model_players_replay_identically_after_an_interruption(products, tmp_path, tiny_model_dir):
    """Chunk seeds make a replayed chunk sample the same tokens: a resumed run equals an uninterrupted one."""
    from engine import HFEngine
    from model import ModelConfig, load_base_model, load_tokenizer

    cfg = ModelConfig(name=tiny_model_dir, dtype="float32")
    engine = HFEngine(load_base_model(cfg, "cpu"), load_tokenizer(cfg))
    # The random tiny buyer breaks the protocol at once; against the scripted buyer the model seller plays every round.
    seller = env.LLMPlayer(engine, "seller", temperature=1.0, max_tokens=12, style="compact", seed=0)
    kw = dict(episodes_per_product=2, batch_size=3, max_rounds=3, progress=False, seed=7, buyer_name="scripted",
              seller_name="tiny", persona="neutral")
    full = evaluation.evaluate(env.ScriptedBuyer(), seller, products[:4], **kw)
    assert evaluation.evaluate(env.ScriptedBuyer(), seller, products[:4], **kw) == full  # same seed, same games
    assert evaluation.evaluate(env.ScriptedBuyer(), seller, products[:4], **(kw | {"seed": 8})) != full
    path = tmp_path / "episodes.jsonl"
    cut = env.LLMPlayer(InterruptingEngine(engine, after=4), "seller", temperature=1.0, max_tokens=12,
                        style="compact", seed=0)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in the middle of the second chunk's generation
        evaluation.evaluate(env.ScriptedBuyer(), cut, products[:4], out_path=path, **kw)
    assert 3 <= len(evaluation.read_records(path)) < len(full)
    assert evaluation.evaluate(env.ScriptedBuyer(), seller, products[:4], out_path=path, resume=True, **kw) == full


class InterruptingEngine:
    """An engine that raises KeyboardInterrupt on its (after + 1)-th generate call."""

    def __init__(self, engine, after: int):
        self.engine, self.tokenizer, self.after, self.calls = engine, engine.tokenizer, after, 0

    def generate(self, prompts, **kw):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.engine.generate(prompts, **kw)


# ---------------------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoints: a stdlib server speaking the same JSON, and vLLM's server


class FakeBuyerModel(BaseHTTPRequestHandler):
    """GET /v1/models and POST /v1/chat/completions. As a buyer it bids $1.00, then quits; any conversation that
    mentions a codename in `server.failing` gets HTTP 503 (a server in trouble)."""

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: dict) -> None:
        blob = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)

    def do_GET(self):
        self.reply(200, {"object": "list", "data": [{"id": "fake-buyer", "object": "model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = json.dumps(body["messages"])
        self.server.requests.append(body)
        if any(code in text for code in self.server.failing):
            return self.reply(503, {"error": {"message": "overloaded"}})
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        content = ("Thought: start very low.\nTalk: Would you take a dollar?\nAction: [BUY] $1.00" if turn == 0 else
                   "Thought: too far apart.\nTalk: No thanks.\nAction: [QUIT]")
        self.reply(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def fake_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeBuyerModel)
    httpd.requests, httpd.failing = [], set()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_endpoint_buyer_with_failures_recorded_as_errors(fake_server, products):
    from engine import ChatEndpoint

    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    fake_server.failing = {products[0].codename}
    endpoint = evaluation.TolerantEndpoint(ChatEndpoint(url, "fake-buyer", retries=1, backoff_s=0.01))
    buyer = env.ChatPlayer(endpoint, "buyer", temperature=1.0, max_tokens=64)
    records = evaluation.evaluate(buyer, env.ScriptedSeller("linear"), products[:5], episodes_per_product=2,
                                  progress=False, **LABELS)
    failed = [r for r in records if r["error"]]
    assert [r["product"] for r in failed] == [products[0].codename] * 2
    assert all("[endpoint error]" in r["error"] and "503" in r["error"] for r in failed)
    assert endpoint.failures == 2  # one per failed conversation, each after 1 + 1 retry attempts
    assert sum(json.dumps(b["messages"]).count(products[0].codename) > 0 for b in fake_server.requests) == 4
    ok = [r for r in records if not r["error"]]
    assert {r["reason"] for r in ok} == {"quit"} and all(r["rounds"] == 2 for r in ok)
    (row,) = evaluation.metrics_table(records)["rows"]
    assert (row["episodes"], row["errors"], row["all"]["reward"], row["all"]["first_offer_ratio"]) == \
        (8, 2, 0.0, pytest.approx(sum(1.0 / s.budget for s in products[1:5]) / 4))


def test_endpoint_that_keeps_failing_stops_the_run(fake_server, products, tmp_path):
    from engine import ChatEndpoint

    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    fake_server.failing = {s.codename for s in products}
    endpoint = evaluation.TolerantEndpoint(ChatEndpoint(url, "fake-buyer", retries=0), max_failures_in_row=3)
    with pytest.raises(RuntimeError, match=r"4 requests in a row failed.*--resume"):
        evaluation.evaluate(env.ChatPlayer(endpoint, "buyer"), env.ScriptedSeller(), products[:4],
                            episodes_per_product=1, progress=False, out_path=tmp_path / "e.jsonl")


def test_cli_with_an_endpoint_buyer(fake_server, tmp_path):
    url = f"http://127.0.0.1:{fake_server.server_address[1]}/v1"
    base = ["--seller", "scripted", "--products", "4", "--episodes", "1", "--no-progress"]
    with pytest.raises(SystemExit, match="does not serve model 'gpt-9'"):
        evaluation.main(["--buyer-url", url, "--buyer-model", "gpt-9", "--out", str(tmp_path / "a")] + base)
    metrics = evaluation.main(["--buyer-url", url, "--buyer-model", "fake-buyer", "--ckpt", "scripted",
                               "--out", str(tmp_path / "b")] + base)
    rows = {r["buyer"]: r for r in metrics["rows"]}
    assert rows[f"fake-buyer @ {url}"]["all"]["deal_rate"] == 0.0
    assert rows["scripted"]["all"]["deal_rate"] > 0


# ~30 s here (the server starts in ~20 s on 2 CPU cores): under the 60 s that would make it a slow test
def test_vllm_openai_server_as_buyer_and_seller(tmp_path, tiny_model_dir):
    """The real thing: `vllm serve` with the tiny model on 127.0.0.1, playing both sides through ChatEndpoint."""
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    with vllm_server(tiny_model_dir, "tiny", tmp_path / "vllm.log") as url:
        metrics = evaluation.main(["--buyer-url", url, "--buyer-model", "tiny", "--seller", url, "--seller-model",
                                   "tiny", "--products", "3", "--episodes", "2", "--max-rounds", "2",
                                   "--buyer-max-tokens", "16", "--seller-max-tokens", "16", "--out",
                                   str(tmp_path / "eval"), "--no-progress"])
        (row,) = metrics["rows"]
        assert (row["episodes"], row["errors"]) == (6, 0)
        records = evaluation.read_records(tmp_path / "eval" / "episodes.jsonl")
        assert all(r["transcript"][0]["text"] for r in records)  # the model's own (random) words came back


# ---------------------------------------------------------------------------------------------------------------
# The report page


def training_run(folder: Path, steps: int = 12) -> dict:
    """A made-up run folder as train.py leaves it: metrics.jsonl with the paper's shape (openings drop, a dip in
    deals, then recovery) and final_eval.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for s in range(steps):
            f.write(json.dumps({"step": s + 1, "reward": 0.1 + 0.05 * s, "deal_rate": 0.9 - 0.3 * (4 <= s <= 7),
                                "first_offer_ratio": 0.8 - 0.04 * s, "bargained_ratio": 0.2 + 0.05 * s}) + "\n")
    summary = reward.summarize([]) | {"reward": 0.5, "reward_ci95": [0.4, 0.6], "episodes": 8}
    (folder / "final_eval.json").write_text(json.dumps({"before": summary, "after": summary, "scripted": None}))
    return evaluation.read_training_run(folder)


@pytest.fixture(scope="module")
def report_dir(products, tmp_path_factory):
    records = []
    for name, buyer in (("scripted", env.ScriptedBuyer()), ("greedy", env.ScriptedBuyer(start=0.3, exponent=2.0))):
        for strategy in ("linear", "hardliner"):
            records += evaluation.evaluate(buyer, env.ScriptedSeller(strategy), products, episodes_per_product=2,
                                           buyer_name=name, seller_name="scripted", persona=strategy, progress=False)
    records[3] = records[3] | {"error": "buyer: [endpoint error] HTTP 503"}
    metrics = {"run": {"protocol": {"episodes": 2, "max_rounds": 6, "seed": 0}, "n_products": len(products),
                       "mi_products": sum(s.mi for s in products), "seller_name": "scripted",
                       "buyers": [{"name": "scripted", "kind": "scripted"}]}} | evaluation.metrics_table(records)
    out = tmp_path_factory.mktemp("report")
    report.write_report(out, metrics, records, training_run(out / "run"))
    return out


def test_report_is_self_contained(report_dir):
    page = (report_dir / "report.html").read_text()
    assert not re.search(r"<(script|img|iframe)[^>]+src=|<link|@import|url\((?!#)", page)  # nothing fetched
    assert page.count('<svg class="plot"') == 4
    md = (report_dir / "report.md").read_text()
    assert "| greedy | scripted | hardliner |" in md and "## What was run" in md


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason="Chromium is not installed (Debian: apt-get install chromium chromium-driver), so the "
                           "page cannot be rendered here")
def test_report_renders_in_headless_chromium(report_dir):
    profile = tempfile.mkdtemp()
    try:
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={profile}", "--dump-dom", (report_dir / "report.html").as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert dom.count('<svg class="plot"') == 4  # rewards, deal prices, personas, training curves
    assert "reward [95% CI]" in dom and dom.count("<table") >= 6 and "final_eval.json" in dom
    built = re.sub(r"<script.*?</script>", "", dom, flags=re.S)  # what the page's script built, not its source
    assert built.count('<details class="ep">') == 50  # the first page of transcripts
    assert re.search(r"\d+ episodes match, 50 shown", built)
    assert ">error<" in built  # the failed episode is shown as an error, not as a loss


class _NotScripted:
    """A scripted seller in disguise: best_fixed_schedule must take its batched path (as for an LLM seller)."""
    def __init__(self, seller):
        self.seller, self.style = seller, seller.style

    def reply(self, games):
        return self.seller.reply(games)


def test_best_fixed_schedule_batched_path_scores_each_candidate_as_the_sequential_one(scenarios):
    """An LLM seller is searched in one lockstep batch (ScheduleBuyer: game i plays candidate i // len(train)).
    Against a seller without jitter it must score every candidate exactly as the one-schedule-at-a-time search."""
    import eval as evaluation
    train, test = scenarios[:6], scenarios[6:10]
    candidates = env.TEACHER_SCHEDULES[::150]
    seller = env.ScriptedSeller("linear", jitter=0.0, style="ladder")
    plain = evaluation.best_fixed_schedule(seller, train, test, candidates=candidates, keep=len(candidates))
    batched = evaluation.best_fixed_schedule(_NotScripted(seller), train, test, candidates=candidates,
                                             keep=len(candidates))
    assert batched == plain
    assert plain["candidates"] == len(candidates) == len(plain["top"])
    assert [r for _, r in plain["top"]] == sorted((r for _, r in plain["top"]), reverse=True)
    assert plain["schedule"] == plain["top"][0][0] and plain["train_reward"] == plain["top"][0][1]

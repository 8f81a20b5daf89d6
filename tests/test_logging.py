"""What a run writes for people to read: report.html's "What was run" and train.py's TensorBoard events."""
import pytest

import config
import env
import eval as evaluation
import report
import train


# ---------------------------------------------------------------------------------------------------------------
# report.py: the reply limits in "What was run"


def test_run_table_names_each_reply_limit_or_says_there_is_none():
    rows = dict(report.run_table({"protocol": {"buyer_max_tokens": 20, "seller_max_tokens": 256}}))
    assert rows["reply length"] == "buyer up to 20 tokens, seller up to 256 tokens"
    rows = dict(report.run_table({"protocol": {"buyer_max_tokens": 20, "seller_max_tokens": None}}))
    assert rows["reply length"] == "buyer up to 20 tokens, seller no limit"
    rows = dict(report.run_table({"protocol": {}}))  # a run.json from before the limits were recorded
    assert rows["reply length"] == "buyer no limit, seller no limit"


def test_report_html_says_the_limits_as_eval_records_them(scenarios, tmp_path):
    products = scenarios[:3]
    records = evaluation.evaluate(env.ScriptedBuyer(), env.ScriptedSeller("linear"), products, episodes_per_product=1,
                                  buyer_name="scripted", seller_name="scripted", persona="none", progress=False)
    # eval.run_info's protocol keys for the limits (eval.RUN_SETTINGS): buyer_max_tokens, seller_max_tokens
    protocol = {"episodes": 1, "max_rounds": 6, "seed": 0, "buyer_max_tokens": 16, "seller_max_tokens": None}
    metrics = {"run": {"protocol": protocol, "n_products": len(products), "mi_products": sum(s.mi for s in products),
                       "seller_name": "scripted", "buyers": [{"name": "scripted", "kind": "scripted"}]}}
    md, page = report.write_report(tmp_path, metrics | evaluation.metrics_table(records), records)
    for text in (md.read_text(), page.read_text()):
        assert "buyer up to 16 tokens, seller no limit" in text
        assert "None tokens" not in text


# ---------------------------------------------------------------------------------------------------------------
# train.Loggers: TensorBoard events, written and read back


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (requirements-cpu.txt pins it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config.load_config(None, [f"out_dir={tmp_path}", "log.tensorboard=true"])
    loggers = train.Loggers(cfg, resumed_step=0)
    loggers.log({"step": 1, "reward": 0.25, "note": "text is not a scalar"}, [])
    loggers.log({"step": 2, "reward": -0.5}, [])
    loggers.tb.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "note" not in events.Tags()["scalars"]
    assert [(e.step, e.value) for e in events.Scalars("reward")] == [(1, 0.25), (2, -0.5)]

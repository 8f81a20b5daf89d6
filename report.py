"""The evaluation report: report.md (the tables) and report.html (one self-contained page).

    report.write_report(out_dir, metrics, records, training)   # metrics = eval.metrics_table + {"run": ...},
                                                               # training = eval.read_training_run(dir) or None

report.html needs no network: plots are inline SVG drawn by matplotlib, the transcripts are a JSON blob in the
page with a few lines of plain JS to filter them, and the styles are inline. It opens from a file:// URL,
from an e-mail attachment, or from a CI artifact.
"""
from __future__ import annotations

import html
import io
import json
import re
from collections import defaultdict
from pathlib import Path

# (label, key in a reward.summarize dict, format): the columns of the main table, in the paper's order first.
COLUMNS = [
    ("reward", "reward", "num"),
    ("deal rate", "deal_rate", "pct"),
    ("bargained ratio", "bargained_ratio", "num"),
    ("overshoot", "overshoot_rate", "pct"),
    ("protocol violations", "protocol_violation_rate", "pct"),
    ("first offer / budget", "first_offer_ratio", "num"),
    ("CI walk-away", "ci_walkaway_rate", "pct"),
    ("rounds", "mean_rounds", "num2"),
    ("interventions", "interventions_per_episode", "num2"),
    ("price reduction", "price_reduction", "pct"),
]

# The paper's Table 1 (Liu et al. 2026; rows marked repl. are quoted by public replications). Other models and
# hardware: a yardstick, not a like-for-like comparison.
PAPER_TABLE = [
    ("Qwen3-30B-A3B-Instruct-2507, RLVR, 60 iterations", 0.7664, 0.9199, 0.8385, 0.0010),
    ("GPT-5.4 (high reasoning) (repl.)", 0.4021, 0.918, 0.4380, 0.0),
    ("Qwen3-4B-Instruct-2507, untrained (repl.)", -0.1130, 0.516, 0.0901, 0.065),
]

TRAINING_CURVES = [("reward", "reward"), ("deal rate", "deal_rate"), ("first offer / budget", "first_offer_ratio"),
                   ("bargained ratio", "bargained_ratio")]

OUTCOME_COLORS = {"deal": "#2e7d32", "quit": "#6d6d6d", "max_rounds": "#8d6e63", "budget_violation": "#c62828",
                  "protocol_violation": "#ad1457", "error": "#ef6c00"}


def fmt(value, kind: str = "num") -> str:
    if value is None or value != value:  # None or NaN: undefined (e.g. no deals, no CI scenarios)
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "num2":
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_ci(m: dict) -> str:
    lo, hi = m.get("reward_ci95") or (None, None)
    if lo is None or lo != lo:
        return fmt(m["reward"])
    return f"{fmt(m['reward'])} [{lo:.3f}, {hi:.3f}]"


def row_label(row: dict) -> str:
    return f"{row['buyer']} vs {row['seller']} [{row['persona']}]"


# ---------------------------------------------------------------------------------------------------------------
# Tables as lists of cells, rendered to markdown, HTML or plain text


def main_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    head = ["buyer", "seller", "persona", "reward [95% CI]"] + [c[0] for c in COLUMNS[1:]] + ["episodes"]
    rows = []
    for r in metrics["rows"]:
        m = r["all"]
        played = str(r["episodes"]) + (f" (+{r['errors']} failed)" if r["errors"] else "")
        rows.append([r["buyer"], r["seller"], r["persona"], fmt_ci(m)] + [fmt(m[k], f) for _, k, f in COLUMNS[1:]]
                    + [played])
    return head, rows


# Which way is better, for the columns where that is clear: the best value is bold in the HTML tables.
BEST = {"reward [95% CI]": "max", "deal rate": "max", "bargained ratio": "max", "overshoot": "min",
        "protocol violations": "min", "CI walk-away": "max"}


def drop_constant(head: list[str], rows: list[list[str]], columns=("seller", "persona")):
    """Leave out label columns that are the same on every row (they go in one line above the table instead):
    the table then fits a laptop screen. Returns (head, rows, "seller X, persona Y" or "")."""
    same = [c for c in columns if c in head and rows and len({r[head.index(c)] for r in rows}) == 1]
    keep = [i for i, h in enumerate(head) if h not in same]
    note = ", ".join(f"{c} {rows[0][head.index(c)]}" for c in same)
    return [head[i] for i in keep], [[r[i] for i in keep] for r in rows], note


def split_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    head = ["buyer", "persona", "MI episodes", "MI reward", "MI deal rate", "MI bargained ratio", "CI episodes",
            "CI reward", "CI deal rate", "CI walk-away"]
    rows = []
    for r in metrics["rows"]:
        mi, ci = r["MI"], r["CI"]
        rows.append([r["buyer"], r["persona"], str(mi["episodes"]), fmt_ci(mi), fmt(mi["deal_rate"], "pct"),
                     fmt(mi["bargained_ratio"]), str(ci["episodes"]), fmt_ci(ci), fmt(ci["deal_rate"], "pct"),
                     fmt(ci["ci_walkaway_rate"], "pct")])
    return head, rows


def category_table(row: dict) -> tuple[list[str], list[list[str]]]:
    head = ["category", "products", "episodes", "reward [95% CI]", "deal rate", "bargained ratio", "CI walk-away"]
    rows = [[c, str(m["products"]), str(m["episodes"]), fmt_ci(m), fmt(m["deal_rate"], "pct"),
             fmt(m["bargained_ratio"]), fmt(m["ci_walkaway_rate"], "pct")] for c, m in row["by_category"].items()]
    return head, rows


def final_eval_table(final: dict) -> tuple[list[str], list[list[str]]]:
    """train.py's final_eval.json: {"before", "after", "scripted"} summaries of the held-out evaluation."""
    head = ["policy", "episodes", "reward [95% CI]"] + [c[0] for c in COLUMNS[1:7]]
    rows = [[name, str(m.get("episodes", "")), fmt_ci(m)] + [fmt(m.get(k), f) for _, k, f in COLUMNS[1:7]]
            for name, m in final.items() if m and "reward" in m]   # (not the generalisation / cross-play parts)
    return head, rows


def paper_table() -> tuple[list[str], list[list[str]]]:
    head = ["buyer (paper, Table 1)", "reward", "deal rate", "bargained ratio", "overshoot"]
    return head, [[n, fmt(r), fmt(d, "pct"), fmt(b), fmt(o, "pct")] for n, r, d, b, o in PAPER_TABLE]


def reply_limit(max_tokens) -> str:
    """A side's token limit per reply as the report names it; an unset one (absent, None or 0) is no limit."""
    return f"up to {max_tokens} tokens" if max_tokens else "no limit"


def run_table(info: dict) -> list[tuple[str, str]]:
    """What was run, as (what, value) pairs."""
    p = info.get("protocol", {})
    items = []
    for b in info.get("buyers", []):
        detail = b["kind"]
        if b["kind"] == "adapter":
            detail = f"LoRA adapter {b['path']} (sha256 {b['adapter_sha256'][:12]}) on {b['base_model']}"
        elif b["kind"] == "base":
            detail = f"base model {p.get('base_model')} without adapter"
        elif b["kind"] == "scripted":
            detail = "scripted OG-Narrator-style buyer (bids 0.5 -> 1.0 x budget)"
        elif b["kind"] == "schedule":
            detail = "one fixed ladder schedule (a rung of the budget per round; the last repeats)"
        elif b["kind"] == "endpoint":
            detail = f"OpenAI-compatible endpoint {b['url']}, model {b['model']}"
        items.append((f"buyer {b['name']}", detail))
    seller = info.get("seller_name", "")
    if seller == "base":
        seller = f"base model {p.get('base_model')} (frozen, regulated by the environment)"
    items += [("seller", seller), ("personas", ", ".join(info.get("persona_names", []))),
              ("temperatures", f"buyer {p.get('buyer_temp')}, seller {p.get('seller_temp')}"),
              ("episodes", f"{p.get('episodes')} per product, at most {p.get('max_rounds')} rounds, "
                           f"prompt style {p.get('style')}"),
              ("reply length", f"buyer {reply_limit(p.get('buyer_max_tokens'))}, "
                               f"seller {reply_limit(p.get('seller_max_tokens'))}"),
              ("products", f"{info.get('n_products')} held-out ({info.get('mi_products')} MI, "
                           f"{info.get('n_products', 0) - info.get('mi_products', 0)} CI) of a {p.get('test_size')}-"
                           f"product test split (split seed {p.get('split_seed')}) from {p.get('data')}"),
              ("seed / engine", f"seed {p.get('seed')}, engine {p.get('engine')}, batch {p.get('batch_size')}"),
              ("command", info.get("command", "")), ("started", info.get("started", "")),
              ("wall time", f"{info['seconds']} s" if "seconds" in info else "–"),
              ("versions", ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items()))]
    failures = info.get("endpoint_failures") or {}
    if any(failures.values()):
        items.append(("endpoint failures", ", ".join(f"{k}: {v} requests" for k, v in failures.items())))
    return items


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def crossplay_tables(cross: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The cross-play table (eval.crossplay_table) as (title, head, rows): the buyers' rewards (a row per buyer,
    a column per seller, and the buyer's worst), the sellers' rewards, and each seller's exploitability."""
    sellers, buyers = cross["sellers"], cross["buyers"]
    cell = lambda m, ci: f"{fmt(m)} [{fmt(ci[0])}, {fmt(ci[1])}]" if m is not None and ci else fmt(m)  # noqa: E731
    out = [("buyer's reward (rows: buyers; columns: sellers)", ["buyer"] + sellers + ["worst"],
            [[b] + [cell(m, ci) for m, ci in zip(cross["buyer_reward"][i], cross["buyer_reward_ci95"][i])]
             + [fmt(cross["worst_buyer_reward"][b])] for i, b in enumerate(buyers)]),
           ("seller's reward (its mirror score; rows: buyers; columns: sellers)", ["buyer"] + sellers,
            [[b] + [cell(m, ci) for m, ci in zip(cross["seller_reward"][i], cross["seller_reward_ci95"][i])]
             for i, b in enumerate(buyers)] + [["mean over buyers"] + [fmt(cross["seller_mean_reward"][x])
                                                                        for x in sellers]])]
    if cross.get("exploitability"):
        ex = cross["exploitability"]
        out.append(("exploitability: the best fixed buyer schedule against each seller (found by search)",
                    ["seller", "best schedule's reward", "deal rate", "schedule", "candidates searched"],
                    [[x, fmt(ex[x]["reward"]), fmt(ex[x]["deal_rate"], "pct"), "".join("abcdefgh"[k] for k in
                                                                                     ex[x]["schedule"]),
                      str(ex[x]["candidates"])] for x in sellers if x in ex]))
    return out


def summary_text(metrics: dict) -> str:
    """The main numbers for the terminal."""
    head, rows = main_table(metrics)
    keep = [head.index(h) for h in ("buyer", "persona", "reward [95% CI]", "deal rate", "bargained ratio", "overshoot",
                                    "protocol violations", "CI walk-away", "episodes")]
    if len({r["seller"] for r in metrics["rows"]}) > 1:
        keep.insert(1, head.index("seller"))
    text = text_table([head[i] for i in keep], [[r[i] for i in keep] for r in rows])
    for title, h, r in crossplay_tables(metrics["crossplay"]) if metrics.get("crossplay") else []:
        text += f"\n\n{title}\n" + text_table(h, r)
    return text


def markdown_report(metrics: dict) -> str:
    info = metrics.get("run", {})
    parts = ["# Negotiation evaluation", "",
             "Rewards are the buyer's normalised surplus (budget - price) / |budget - cost| (-1 for a protocol or "
             "budget violation, 0 without a deal). The interval is a 95% bootstrap over products.", "",
             "## Results", "", markdown_table(*main_table(metrics)), "",
             "## Mutual-interest (MI) and conflicting-interest (CI) scenarios", "", markdown_table(*split_table(metrics)),
             ""]
    if metrics.get("crossplay"):
        parts += ["## Cross-play", ""]
        for title, head, rows in crossplay_tables(metrics["crossplay"]):
            parts += [f"### {title[0].upper() + title[1:]}", "", markdown_table(head, rows), ""]
    for row in metrics["rows"]:
        parts += [f"### Per category: {row_label(row)}", "", markdown_table(*category_table(row)), ""]
    parts += ["## For reference: the paper's held-out numbers", "",
              "Other models and hardware; same protocol by default (128 products x 4 episodes, neutral seller).", "",
              markdown_table(*paper_table()), "", "## What was run", "",
              markdown_table(["what", "value"], [list(x) for x in run_table(info)]), ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Plots: matplotlib figures inlined as SVG


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "nego-report", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 10})
    return plt


def svg_of(fig) -> str:
    """The figure as an inline <svg> element; CSS shrinks it to narrow screens (the viewBox keeps the shape)."""
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):].replace("<svg", '<svg class="plot"', 1)


def buyer_colors(names: list[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f"]
    return {n: palette[i % len(palette)] for i, n in enumerate(names)}


def plot_reward_distribution(records: list[dict]) -> str:
    """One histogram of episode rewards per buyer (all personas), the mean marked: where the mass sits (deals near
    1, no-deals at 0, violations at -1) says more than the mean alone."""
    plt = _pyplot()
    by_buyer = defaultdict(list)
    for r in records:
        if r.get("error") is None:
            by_buyer[r["buyer"]].append(r["reward"])
    colors = buyer_colors(list(by_buyer))
    fig, axes = plt.subplots(len(by_buyer), 1, figsize=(7, 0.6 + 1.5 * len(by_buyer)), sharex=True, squeeze=False)
    bins = [-1.0 + 0.1 * i for i in range(21)]
    for ax, (name, rewards) in zip(axes[:, 0], by_buyer.items()):
        ax.hist(rewards, bins=bins, color=colors[name], alpha=0.85, edgecolor="white")
        mean = sum(rewards) / len(rewards)
        ax.axvline(mean, color="black", lw=1.2, ls="--")
        ax.set_title(f"{name}: mean {mean:.3f} over {len(rewards)} episodes", loc="left")
        ax.set_ylabel("episodes")
    axes[-1, 0].set_xlabel("reward (-1 violation, 0 no deal, 1 = deal at the seller's cost)")
    fig.tight_layout()
    return svg_of(fig)


def plot_deal_prices(records: list[dict]) -> str:
    """Per product (sorted by cost / list price): the zone between seller cost and buyer budget, and every deal
    price, all divided by the list price. A good buyer's dots sit near the cost end of each bar."""
    plt = _pyplot()
    by_buyer = defaultdict(list)
    for r in records:
        if r.get("error") is None:
            by_buyer[r["buyer"]].append(r)
    products = {}
    for r in records:
        products[r["product"]] = r["scenario"]
    order = sorted(products, key=lambda c: (products[c]["cost"] / products[c]["list_price"], c))
    x_of = {c: i for i, c in enumerate(order)}
    colors = buyer_colors(list(by_buyer))
    fig, axes = plt.subplots(len(by_buyer), 1, figsize=(10, 0.6 + 2.4 * len(by_buyer)), sharex=True, squeeze=False)
    for ax, (name, rs) in zip(axes[:, 0], by_buyer.items()):
        for c in order:
            s = products[c]
            lo, hi = sorted((s["cost"] / s["list_price"], s["budget"] / s["list_price"]))
            mi = s["budget"] > s["cost"]
            ax.plot([x_of[c], x_of[c]], [lo, hi], color="#9ccc65" if mi else "#ef9a9a", lw=2.2, solid_capstyle="butt",
                    zorder=1)
        ax.scatter([x_of[c] for c in order], [products[c]["cost"] / products[c]["list_price"] for c in order],
                   marker="v", s=10, color="#555", zorder=2, label="seller cost")
        ax.scatter([x_of[c] for c in order], [products[c]["budget"] / products[c]["list_price"] for c in order],
                   marker="^", s=10, color="#1565c0", zorder=2, label="buyer budget")
        deals = [r for r in rs if r["reason"] == "deal"]
        ax.scatter([x_of[r["product"]] for r in deals], [r["price"] / r["scenario"]["list_price"] for r in deals],
                   s=14, color=colors[name], alpha=0.55, edgecolor="none", zorder=3, label="deal price")
        ax.set_title(f"{name}: {len(deals)} deals in {len(rs)} episodes", loc="left")
        ax.set_ylabel("price / list price")
    axes[0, 0].legend(loc="lower right", fontsize=8, ncol=3, frameon=False)
    axes[-1, 0].set_xlabel("products, sorted by cost / list price (green bar: MI zone cost..budget; red: CI, "
                           "budget below cost)")
    fig.tight_layout()
    return svg_of(fig)


def plot_personas(metrics: dict) -> str:
    """Reward, deal rate, bargained ratio and CI walk-away per seller persona, one bar per buyer: the
    robustness study (a buyer that only beats the neutral seller has learned the seller, not negotiation)."""
    plt = _pyplot()
    rows = metrics["rows"]
    personas = list(dict.fromkeys(r["persona"] for r in rows))
    buyers = list(dict.fromkeys(r["buyer"] for r in rows))
    colors = buyer_colors(buyers)
    cell = {(r["buyer"], r["persona"]): r["all"] for r in rows}
    panels = [("reward", "reward"), ("deal rate", "deal_rate"), ("bargained ratio", "bargained_ratio"),
              ("CI walk-away", "ci_walkaway_rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(min(13, max(8, 2 + 0.3 * len(personas) * len(buyers) * len(panels))), 3))
    width = 0.8 / len(buyers)
    for ax, (title, key) in zip(axes, panels):
        for j, b in enumerate(buyers):
            xs, ys, errs = [], [], [[], []]
            for i, p in enumerate(personas):
                m = cell.get((b, p))
                if m is None or m[key] is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(m[key])
                lo, hi = m.get("reward_ci95") or (None, None)
                ok = key == "reward" and lo is not None and lo == lo
                errs[0].append(m[key] - lo if ok else 0)
                errs[1].append(hi - m[key] if ok else 0)
            ax.bar(xs, ys, width=width, color=colors[b], label=b, yerr=errs if key == "reward" else None,
                   error_kw={"lw": 0.8, "capsize": 2})
        ax.set_xlim(-0.5, len(personas) - 0.5)  # every buyer keeps its slot, also where its value is undefined
        ax.set_xticks(range(len(personas)))
        ax.set_xticklabels(personas, rotation=30 if len(personas) > 3 else 0, ha="right" if len(personas) > 3 else "center")
        ax.axhline(0, color="#999", lw=0.6)
        ax.set_title(title)
    fig.tight_layout()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(buyers), 4), fontsize=8,
               frameon=False)  # above the panels, clear of the bars
    return svg_of(fig)


def training_series(rows: list[dict], name: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric in a training log; the metric is a key `name`, or ends with /name or .name
    (loggers prefix keys), first match in key order; rows without it are skipped."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        key = next((k for k in row if k == name or k.endswith(("/" + name, "." + name))), None)
        value = row.get(key) if key else None
        if isinstance(value, (int, float)) and value == value:
            xs.append(row.get("step", i))
            ys.append(value)
    return xs, ys


def plot_training(rows: list[dict]) -> str:
    """training_figure() as inline SVG for report.html."""
    return svg_of(training_figure(rows))


def save_training_png(run_dir) -> Path:
    """metrics.png in a training run folder, from its metrics.jsonl: the picture a user looks at first."""
    run_dir = Path(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig = training_figure(rows)
    path = run_dir / "metrics.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_crossplay(cross: dict) -> str:
    """A heat map of the buyers' mean rewards against the sellers (the cross-play table), numbers in the cells."""
    plt = _pyplot()
    values = [[v if v is not None else float("nan") for v in row] for row in cross["buyer_reward"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cross["sellers"]), 0.9 + 0.45 * len(cross["buyers"])))
    im = ax.imshow(values, cmap="RdYlGn", vmin=-0.2, vmax=0.8, aspect="auto")
    ax.set_xticks(range(len(cross["sellers"])), [short(x) for x in cross["sellers"]], rotation=30, ha="right")
    ax.set_yticks(range(len(cross["buyers"])), [short(x) for x in cross["buyers"]])
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "–" if v != v else f"{v:.3f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("seller")
    ax.set_ylabel("buyer")
    fig.colorbar(im, ax=ax, label="buyer's reward")
    return svg_of(fig)


def short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-width + 1:]


def plot_selfplay(rows: list[dict]) -> str:
    """Both sides' training curves in a self-play run: the buyer's reward and the seller's (its mirror score)
    per step, over all of the step's episodes, with the side that learned marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    for key, color, label in (("reward", "#1f77b4", "buyer's reward"), ("seller/reward", "#d62728", "seller's reward")):
        xs = [r["step"] for r in rows if isinstance(r.get(key), (int, float))]
        ys = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(xs, ys, color=color, lw=1.0, alpha=0.35)
        if len(ys) >= 5:
            smooth = [sum(ys[max(0, i - 2):i + 3]) / len(ys[max(0, i - 2):i + 3]) for i in range(len(ys))]
            ax.plot(xs, smooth, color=color, lw=2, label=label)
    seller_steps = [r["step"] for r in rows if r.get("seller/grad_norm") is not None]
    if seller_steps:
        ax.scatter(seller_steps, [ax.get_ylim()[0]] * len(seller_steps), marker="|", color="#d62728", s=30,
                   label="the seller learned")
    ax.set_xlabel("step")
    ax.legend(fontsize=8, frameon=False, loc="best")
    return svg_of(fig)


def training_figure(rows: list[dict]):
    """Reward, deal rate, first-offer ratio and bargained ratio per training step. The paper's four phases show
    here: naive bargaining; aggressive openings (first-offer ratio drops, reward rises); deadlock (deal rate and
    reward dip); persuasion (deal rate recovers while the bargained ratio stays high)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAINING_CURVES), figsize=(12, 2.8), sharex=True)
    for ax, (title, key) in zip(axes, TRAINING_CURVES):
        xs, ys = training_series(rows, key)
        ax.plot(xs, ys, color="#1f77b4", lw=1.0, alpha=0.35)
        if len(ys) >= 5:  # a centred moving average over 5 steps: the trend through the sampling noise
            smooth = [sum(ys[max(0, i - 2):i + 3]) / len(ys[max(0, i - 2):i + 3]) for i in range(len(ys))]
            ax.plot(xs, smooth, color="#1f77b4", lw=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if not ys:
            ax.text(0.5, 0.5, f"no '{key}' values in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# The HTML page


CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;margin:0;background:#f6f7f9}
main{max-width:1200px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:26px;margin:8px 0 4px} h2{font-size:19px;margin:36px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .lead{color:#555;margin:0 0 18px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:10px 14px;min-width:190px}
.card b{display:block;font-size:13px;color:#555;font-weight:600} .card span{font-size:22px;font-weight:600}
.card small{display:block;color:#777}
.scroll{overflow-x:auto;background:#fff;border:1px solid #e3e3e3;border-radius:8px}
table{border-collapse:collapse;font-size:13px;width:100%} th,td{padding:5px 7px;text-align:right;white-space:nowrap}
th{background:#fafafa;border-bottom:1px solid #ddd;font-weight:600;white-space:normal;vertical-align:bottom;min-width:54px} td{border-bottom:1px solid #f0f0f0}
th:first-child,td:first-child,.left{text-align:left} tr:hover td{background:#f5f9ff}
td.best{font-weight:700} small.ci{color:#777;font-size:11px}
.kv td{text-align:left;white-space:normal} .kv td:first-child{color:#555;width:180px;white-space:nowrap}
figure{margin:10px 0 24px;background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:10px}
figcaption{color:#555;font-size:13px;margin:4px 4px 0} svg.plot{max-width:100%;height:auto;display:block;margin:0 auto}
details>summary{cursor:pointer}
#filters{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:8px 0 12px}
#filters select,#filters input{font:inherit;font-size:13px;padding:4px 6px;border:1px solid #ccc;border-radius:5px}
.ep{background:#fff;border:1px solid #e3e3e3;border-radius:8px;margin:6px 0}
.ep>summary{padding:8px 12px;font-size:13.5px;list-style:none} .ep[open]>summary{border-bottom:1px solid #eee}
.badge{display:inline-block;color:#fff;border-radius:4px;padding:0 6px;font-size:12px;margin-right:6px}
.turns{padding:8px 12px 12px} .turn{max-width:80%;margin:8px 0;padding:8px 11px;border-radius:10px;white-space:pre-wrap;
font-size:13px} .turn.buyer{background:#e8f1fb;margin-right:auto} .turn.seller{background:#f1f1f1;margin-left:auto}
.turn .who{font-weight:600;font-size:12px;color:#555;display:block} .thought{color:#777;font-style:italic}
.note{color:#b71c1c;font-size:12px;display:block;margin-top:4px} .facts{color:#555;font-size:12.5px;padding:6px 12px 0}
#more{margin:10px 0;font:inherit;padding:5px 12px}
"""

JS = """
const EPISODES = JSON.parse(document.getElementById('episode-data').textContent);
const COLORS = %s;
const F = {buyer: 'f-buyer', persona: 'f-persona', reason: 'f-reason', kind: 'f-kind'};
let shown = 0, matching = [];
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'})[c]); }
function money(x) { return x == null ? '–' : '$' + Number(x).toFixed(2); }
function fillSelect(id, field) {
  const el = document.getElementById(id);
  [...new Set(EPISODES.map(e => e[field]))].sort().forEach(v => el.add(new Option(v, v)));
  el.onchange = render;
}
function turnHtml(t) {
  const body = esc(t.text).split('\\n').map(l => /^\\s*thought:/i.test(l) ? '<span class="thought">' + l + '</span>' : l).join('\\n');
  return '<div class="turn ' + t.role + '"><span class="who">' + t.role + (t.action ? ' · ' + esc(t.action) : '') +
    '</span>' + body + (t.note ? '<span class="note">environment: ' + esc(t.note) + '</span>' : '') + '</div>';
}
function episodeHtml(e) {
  const outcome = e.error ? 'error' : e.reason;
  return '<details class="ep"><summary><span class="badge" style="background:' + (COLORS[outcome] || '#555') + '">' +
    esc(outcome) + '</span><b>' + esc(e.buyer) + '</b> vs ' + esc(e.seller) + ' [' + esc(e.persona) + '] · ' +
    esc(e.title.slice(0, 70)) + ' · price ' + money(e.price) + ' · reward ' + e.reward.toFixed(3) + '</summary>' +
    '<div class="facts">' + esc(e.product) + ' (' + esc(e.category) + ', ' + e.kind + ') · list ' + money(e.list_price) +
    ' · buyer budget ' + money(e.budget) + ' · seller cost ' + money(e.cost) + ' · ' + e.rounds + ' rounds · episode ' +
    e.episode + (e.error ? ' · <b>' + esc(e.error) + '</b>' : '') + '</div>' +
    '<div class="turns">' + e.turns.map(turnHtml).join('') + '</div></details>';
}
function render() {
  const want = {}; for (const [field, id] of Object.entries(F)) want[field] = document.getElementById(id).value;
  const text = document.getElementById('f-text').value.toLowerCase();
  matching = EPISODES.filter(e => Object.entries(want).every(([f, v]) => !v || (f === 'reason' ? (e.error ? 'error' : e.reason) : e[f]) === v) &&
    (!text || (e.title + ' ' + e.product + ' ' + e.category).toLowerCase().includes(text)));
  shown = 0; document.getElementById('episodes').innerHTML = ''; more();
}
function more() {
  const next = matching.slice(shown, shown + 50); shown += next.length;
  document.getElementById('episodes').insertAdjacentHTML('beforeend', next.map(episodeHtml).join(''));
  document.getElementById('f-count').textContent = matching.length + ' episodes match, ' + shown + ' shown';
  document.getElementById('more').style.display = shown < matching.length ? '' : 'none';
}
fillSelect('f-buyer', 'buyer'); fillSelect('f-persona', 'persona'); fillSelect('f-kind', 'kind');
const reasons = document.getElementById('f-reason');
[...new Set(EPISODES.map(e => e.error ? 'error' : e.reason))].sort().forEach(v => reasons.add(new Option(v, v)));
reasons.onchange = render; document.getElementById('f-text').oninput = render;
document.getElementById('more').onclick = more;
render();
"""


def html_table(head: list[str], rows: list[list[str]], best: dict[str, str] | None = None) -> str:
    """best: {column name: "max"|"min"} marks the best value of those columns in bold (ties all bold)."""
    marks = set()
    for name, how in (best or {}).items():
        if name not in head:
            continue
        col = head.index(name)
        values = [(_number(r[col]), i) for i, r in enumerate(rows)]
        values = [(v, i) for v, i in values if v is not None]
        if len({v for v, _ in values}) > 1:  # bold only where the rows differ
            target = (max if how == "max" else min)(v for v, _ in values)
            marks |= {(i, col) for v, i in values if v == target}
    out = ["<div class='scroll'><table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) +
           "</tr></thead><tbody>"]
    for i, r in enumerate(rows):
        out.append("<tr>" + "".join(f"<td{' class=best' if (i, j) in marks else ''}>{_cell(c)}</td>"
                                    for j, c in enumerate(r)) + "</tr>")
    return "\n".join(out) + "</tbody></table></div>"


def _cell(text) -> str:
    """A value with its interval ("0.271 [0.249, 0.292]") gets the interval on a second, smaller line."""
    m = re.fullmatch(r"(\S+) (\[[^\]]+\])", str(text))
    if m:
        return f"{html.escape(m.group(1))}<br><small class='ci'>{html.escape(m.group(2))}</small>"
    return html.escape(str(text))


def _number(cell: str) -> float | None:
    m = re.match(r"-?\d+(\.\d+)?", cell)
    return float(m.group()) if m else None


def transcript_data(records: list[dict], limit: int) -> tuple[list[dict], int]:
    """The episodes for the browser, compact; at most `limit`, taken evenly from every buyer x persona so each
    matchup is represented. Returns (episodes, how many there were)."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["buyer"], r["seller"], r["persona"])].append(r)
    per_group = max(1, limit // max(1, len(groups)))
    picked = []
    for rs in groups.values():
        step = max(1, len(rs) / per_group)
        picked += [rs[int(i * step)] for i in range(min(len(rs), per_group))]
    episodes = []
    for r in picked:
        s = r["scenario"]
        turns = []
        for t in r["transcript"]:
            a = t.get("action")
            action = None if a is None else (f"[{a['kind']}]" + (f" ${a['price']:,.2f}" if a.get("price") is not None else ""))
            turns.append({"role": t["role"], "text": t["text"], "action": action, "note": t.get("note", "")})
        episodes.append({"buyer": r["buyer"], "seller": r["seller"], "persona": r["persona"], "product": r["product"],
                         "episode": r["episode"], "title": s["title"], "category": s["category"], "kind": s["kind"],
                         "list_price": s["list_price"], "budget": s["budget"], "cost": s["cost"],
                         "reason": r["reason"], "price": r["price"], "reward": r["reward"], "rounds": r["rounds"],
                         "error": r.get("error"), "turns": turns})
    return episodes, len(records)


def cards(metrics: dict) -> str:
    """The headline: each buyer's reward and deal rate (first persona row of each buyer)."""
    out, seen = [], set()
    for r in metrics["rows"]:
        if r["buyer"] in seen:
            continue
        seen.add(r["buyer"])
        m = r["all"]
        out.append(f"<div class='card'><b>{html.escape(r['buyer'])}</b><span>{fmt(m['reward'])}</span>"
                   f"<small>reward vs {html.escape(r['seller'])} [{html.escape(r['persona'])}]<br>"
                   f"deal rate {fmt(m['deal_rate'], 'pct')} · bargained {fmt(m['bargained_ratio'])}</small></div>")
    return "<div class='cards'>" + "".join(out) + "</div>"


def html_report(metrics: dict, records: list[dict], training: dict | None = None,
                max_transcripts: int = 2000) -> str:
    """training: eval.read_training_run's {"dir", "steps", "final_eval"}, or None."""
    info = metrics.get("run", {})
    ok = [r for r in records if r.get("error") is None]
    p = info.get("protocol", {})
    errors = sum(r["errors"] for r in metrics["rows"])
    lead = (f"{info.get('n_products', '?')} held-out products × {p.get('episodes', '?')} episodes, at most "
            f"{p.get('max_rounds', '?')} rounds, buyer temperature {p.get('buyer_temp', '?')}, seller temperature "
            f"{p.get('seller_temp', '?')}, seed {p.get('seed', '?')}. {len(ok)} episodes played"
            + (f", {errors} failed (endpoint errors, not counted)." if errors else "."))
    head, rows, same = drop_constant(*main_table(metrics))
    parts = [f"<h1>Negotiation evaluation</h1><p class='lead'>{html.escape(lead)}</p>", cards(metrics),
             "<h2 id='results'>Results</h2>",
             "<p class='lead'>Reward: the buyer's normalised surplus (budget − price) / |budget − cost|; −1 for a "
             "protocol or budget violation, 0 without a deal. [95% CI]: bootstrap over products. Best value per "
             f"column in bold.{html.escape(' All rows: ' + same + '.' if same else '')}</p>",
             html_table(head, rows, BEST),
             "<h3>Mutual-interest (MI) and conflicting-interest (CI) scenarios</h3>"
             "<p class='lead'>In CI scenarios the budget is below the seller's cost: the right move is to walk away.</p>",
             html_table(*split_table(metrics)),
             "<h3>Per category</h3>"]
    for r in metrics["rows"]:
        parts.append(f"<details><summary>{html.escape(row_label(r))}</summary>{html_table(*category_table(r))}</details>")
    if metrics.get("crossplay"):
        parts.append("<h2 id='crossplay'>Cross-play</h2><p class='lead'>Every buyer against every seller on the same "
                     "products and seeds. The seller's reward mirrors the buyer's: (price − cost) / room for a deal, "
                     "0 without one, −1 when the regulation had to overrule it.</p>")
        parts.append(f"<figure>{plot_crossplay(metrics['crossplay'])}<figcaption>The buyers' mean reward against each "
                     f"seller.</figcaption></figure>")
        for title, head, rows_ in crossplay_tables(metrics["crossplay"]):
            parts.append(f"<h3>{html.escape(title[0].upper() + title[1:])}</h3>" + html_table(head, rows_))
    parts.append("<h2 id='plots'>Plots</h2>")
    if ok:
        parts.append(f"<figure>{plot_reward_distribution(ok)}<figcaption>Episode rewards per buyer (all personas); "
                     f"dashed: the mean.</figcaption></figure>")
        parts.append(f"<figure>{plot_deal_prices(ok)}<figcaption>Deal prices against each product's bargaining "
                     f"zone, as fractions of the list price. Dots near the grey ▼ (seller cost) are strong deals; "
                     f"near the blue ▲ (budget), weak ones.</figcaption></figure>")
        parts.append(f"<figure>{plot_personas(metrics)}<figcaption>Metrics per seller persona, one bar per buyer "
                     f"(reward with its 95% CI).</figcaption></figure>")
    if training:
        parts.append(f"<h2 id='training'>Training run</h2><p class='lead'>{html.escape(training['dir'])}: "
                     f"{len(training['steps'])} steps in metrics.jsonl.</p>")
        parts.append(f"<figure>{plot_training(training['steps'])}<figcaption>Per training step (thin) and a 5-step "
                     f"moving average (thick). The paper's four phases: naive bargaining → aggressive opening offers "
                     f"(first-offer ratio falls, reward rises) → deadlock (deal rate and reward dip) → persuasion "
                     f"(deal rate recovers, bargained ratio stays high).</figcaption></figure>")
        if any("seller/reward" in r for r in training["steps"]):
            parts.append(f"<figure>{plot_selfplay(training['steps'])}<figcaption>Self-play: both sides' rewards per "
                         f"step (thin) and over 5 steps (thick); ticks: the steps the seller learned."
                         f"</figcaption></figure>")
        if training.get("final_eval"):
            parts.append("<h3>The run's own held-out evaluation (final_eval.json)</h3>"
                         + html_table(*final_eval_table(training["final_eval"])))
    parts += ["<h2 id='paper'>For reference: the paper's held-out numbers</h2>",
              "<p class='lead'>Other models and hardware, the same protocol by default (128 products × 4 episodes, "
              "neutral seller): a yardstick, not a like-for-like comparison.</p>", html_table(*paper_table()),
              "<h2 id='run'>What was run</h2>",
              "<div class='scroll'><table class='kv'>" + "".join(
                  f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in run_table(info))
              + "</table></div>"]
    episodes, total = transcript_data(records, max_transcripts)
    note = "" if len(episodes) == total else f" A sample of {len(episodes)} of {total}; all are in episodes.jsonl."
    parts += ["<h2 id='transcripts'>Transcripts</h2>",
              f"<p class='lead'>Full replies, Thought included (the other side only ever saw Talk and Action). "
              f"Click an episode to open it.{html.escape(note)}</p>",
              "<div id='filters'><select id='f-buyer'><option value=''>all buyers</option></select>"
              "<select id='f-persona'><option value=''>all personas</option></select>"
              "<select id='f-reason'><option value=''>all outcomes</option></select>"
              "<select id='f-kind'><option value=''>MI and CI</option></select>"
              "<input id='f-text' placeholder='search product, category'><span id='f-count'></span></div>"
              "<div id='episodes'><noscript>Transcripts need JavaScript; they are also in episodes.jsonl."
              "</noscript></div><button id='more'>show 50 more</button>",
              "<script type='application/json' id='episode-data'>" + _script_json(episodes) + "</script>",
              "<script>" + JS % json.dumps(OUTCOME_COLORS) + "</script>"]
    body = "\n".join(parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>Negotiation evaluation</title><style>{CSS}</style>"
            f"</head><body><main>{body}</main></body></html>\n")


def _script_json(obj) -> str:
    """JSON that cannot end its <script> element early, whatever the transcripts say."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def write_report(out_dir, metrics: dict, records: list[dict], training: dict | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, page = out / "report.md", out / "report.html"
    md.write_text(markdown_report(metrics))
    page.write_text(html_report(metrics, records, training))
    return md, page

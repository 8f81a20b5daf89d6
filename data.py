"""Products -> negotiation scenarios.

AmazonHistoryPrice (Xia et al. 2024, "Measuring Bargaining Abilities of LLMs", Apache-2.0): 930 Amazon products
in 18 category files, each with a price history. Following Xia et al.:

    list_price = max(list_price, highest_price)   # the price the buyer sees
    cost       = lowest_price                     # the seller's private floor
    budget     = budget_factor * list_price       # the buyer's private ceiling (0.8 by default)

A scenario is MI (mutual interest: budget > cost, a deal can help both) or CI (conflicting interest: budget <= cost,
the rational buyer walks away).

Where the data comes from, first hit wins:
    1. an explicit path (config `data`, or `--data` on the command line)
    2. the environment variable NEGO_DATA
    3. the local cache folder `.cache/AmazonHistoryPrice` beside this file (git-ignored)
    4. a download of the 18 files from the pinned commit, each checked against its sha256, into that cache.
A path may also be a JSONL file: your own catalogue, one product per line with the Scenario fields.

Standard library only, so the rules can be read and tested without the ML stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import urllib.request
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

REPO = "TianXiaSJTU/AmazonPriceHistory"
COMMIT = "834ad9066d0627f0332504d5fa6d236706f2402b"
FOLDER = "data/AmazonHistoryPrice"
ENV_VAR = "NEGO_DATA"
CACHE_DIR = Path(__file__).resolve().parent / ".cache" / "AmazonHistoryPrice"

# sha256 of every file at the pinned commit: a download that differs is refused.
FILES = {
    "automotive.json": "cd822866bda89fd1eed8b3a8b4668801510102829d555d2ba90086c1c1063fba",
    "baby-products.json": "b2b1b79a3659673708e1511a2afad1d6c197afef205df221f300f72321b00b94",
    "beauty.json": "5ca11efe5d0beee7689968b2894f4b164bdd88834b31b57a6c9cced397f7599e",
    "books.json": "a7ebb82a74129323660843c5fc9bcb868ca8216162246e57bf2cc1c8b3554325",
    "electronics.json": "7995bace94537ce27fa4ac4c658d2fee27811071ab43ea682f48a92594b7518e",
    "health-personal-care.json": "2bcd86e1a10a8fa4bc69bb75ddc888556ca39aba152e473ce417b9de59f0a1c3",
    "home-kitchen.json": "8324c1c67b533bd0d2700edce852cc8ab3417c6cc1043e660a20b817bc8c910b",
    "industrial-scientific.json": "d8d7073a67e72444e9bf5067ad9a334fd3e05885287e565981f689433ae13c11",
    "movies-tv.json": "a66b7454b4f69e3b3b1e00362f55d67aba5e5893bbaa5b77b49fbe162e25d00e",
    "music.json": "686c339a4b2c241bec08a8e0f5ab378dd4d9dc1d50966c987d0df9248ab4c18a",
    "other.json": "6868df944d0aec2dd2f06c7ad8304c9f41097eb4dc375d80dd2fc12812cfa1bd",
    "patio-lawn-garden.json": "edaf0cbba240d7d17f34cfe261fae3dd2987409bf77ffe721d5855fd4dae3ba8",
    "pet-supplies.json": "f975907be39e23440ef3ca54960d3453ec36f798a2e232d5016a47a74376d31b",
    "software.json": "ebdeacf7a4d9217df13cd32041124621cef24f11c73da2f4fd5b85801073293b",
    "sports-outdoors.json": "806f73f100356da2ea199cf8d7c7d77afe8caa93a14880bb442a7d7276b85c96",
    "tools-home-improvement.json": "f8f75239091c71d58df4108f8246a21a6a831ebc40e3a4ccc018efcac8589397",
    "toys-games.json": "18c4ddf974468b896c3877a147ad00b1d86f22964ceabd936848a9fd310cb91f",
    "video-games.json": "2f92b9efa2d106b4baaf837c8c41d3a5e4cbcecb28bb96b9ed434e82c430dd66",
}


@dataclass(frozen=True)
class Scenario:
    codename: str       # unique product id (the Amazon ASIN for AmazonHistoryPrice)
    title: str
    description: str    # falls back to the feature list when the description is shorter than 5 characters
    category: str
    list_price: float   # what the buyer sees: max(list price, highest price)
    budget: float       # buyer's private ceiling
    cost: float         # seller's private floor
    source: str = ""    # file:index the row came from, for error messages and reports

    @property
    def mi(self) -> bool:
        """Mutual interest: a deal between cost and budget helps both sides."""
        return self.budget > self.cost

    @property
    def kind(self) -> str:
        return "MI" if self.mi else "CI"


class DataError(ValueError):
    """The catalogue has rows that cannot become scenarios; the message lists every one."""


_PRICE = re.compile(r"\$?\s*(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?")


def parse_price(value) -> float:
    """'$1,299.99' -> 1299.99. Numbers pass through. Raises ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a price: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a price: {value!r}")
    m = _PRICE.fullmatch(value.strip())
    if not m:
        raise ValueError(f"not a price: {value!r}")
    return float(m.group(1).replace(",", "") + "." + (m.group(2) or "0"))


def _codename(row: dict) -> str:
    """The ASIN from the Amazon or camelcamelcamel link: short, unique, meaningless to the model."""
    for key in ("amazon_link", "link"):
        m = re.search(r"(?:/dp/|/product/)([A-Z0-9]{10})", str(row.get(key, "")))
        if m:
            return m.group(1)
    return str(row.get("codename", ""))


def _text(value) -> str:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else str(value)


def row_to_scenario(row: dict, source: str, budget_factor: float, cost_tolerance: float) -> tuple[Scenario | None, list[str]]:
    """One raw product -> (Scenario, []) or (None, [problems]). Accepts the dataset's schema and our JSONL schema."""
    problems = []
    if "budget" in row and "cost" in row:  # our own JSONL catalogue: prices given directly
        price_fields = {"list_price": row.get("list_price"), "budget": row.get("budget"), "cost": row.get("cost")}
    else:
        price_fields = {k: row.get(k) for k in ("list_price", "highest_price", "lowest_price")}
    prices = {}
    for name, raw in price_fields.items():
        try:
            prices[name] = parse_price(raw)
        except ValueError:
            problems.append(f"{source} field '{name}': unparseable or missing price {raw!r}")
            continue
        if not prices[name] > 0 or prices[name] == float("inf"):
            problems.append(f"{source} field '{name}': price must be positive and finite, got {raw!r}")
    codename = _codename(row)
    if not codename:
        problems.append(f"{source} field 'codename': missing (no codename and no Amazon link)")
    if problems:
        return None, problems

    if "budget" in row and "cost" in row:
        list_price, budget, cost = prices["list_price"], prices["budget"], prices["cost"]
    else:
        list_price = max(prices["list_price"], prices["highest_price"])
        cost = prices["lowest_price"]
        budget = round(budget_factor * list_price, 2)
    if cost > list_price * (1 + cost_tolerance):
        return None, [f"{source} field 'lowest_price': cost {cost} is above the list price {list_price} "
                      f"by more than cost_tolerance={cost_tolerance}"]
    description = _text(row.get("description")).strip()
    if len(description) < 5:
        description = _text(row.get("features")).strip()
    return Scenario(codename=codename, title=_text(row.get("title")).strip(), description=description,
                    category=_text(row.get("category")).strip() or "unknown", list_price=list_price,
                    budget=budget, cost=cost, source=source), []


def resolve_data_path(path: str | os.PathLike | None = None) -> Path:
    """Explicit path, then $NEGO_DATA, then the cache, then a verified download into the cache."""
    for candidate in (path, os.environ.get(ENV_VAR)):
        if candidate:
            p = Path(candidate).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"data path {str(p)!r} does not exist (from "
                                        f"{'the explicit path' if candidate == path else '$' + ENV_VAR}). "
                                        f"Point it at the AmazonHistoryPrice folder or a JSONL catalogue.")
            return p
    if all((CACHE_DIR / name).exists() for name in FILES):
        return CACHE_DIR
    download_dataset(CACHE_DIR)
    return CACHE_DIR


def download_dataset(dest: Path) -> None:
    """Fetch the 18 files from the pinned commit, verify each sha256, then move them into place."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, sha in FILES.items():
        target = dest / name
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
            continue
        url = f"https://raw.githubusercontent.com/{REPO}/{COMMIT}/{FOLDER}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                blob = response.read()
        except OSError as e:
            raise FileNotFoundError(
                f"AmazonHistoryPrice is not available locally and downloading {url} failed ({e}). "
                f"Put the 18 JSON files of {REPO} (folder {FOLDER}, commit {COMMIT[:12]}) in {dest}, "
                f"or point ${ENV_VAR} / --data at a folder that has them.") from None
        digest = hashlib.sha256(blob).hexdigest()
        if digest != sha:
            raise ValueError(f"{name}: sha256 {digest} does not match the pinned {sha}; refusing the download")
        tmp = target.with_suffix(".part")
        tmp.write_bytes(blob)
        tmp.replace(target)


def _raw_rows(path: Path) -> list[tuple[str, dict]]:
    """(source, row) pairs in a stable order: files sorted by name, rows in file order."""
    if path.is_file():
        if path.suffix == ".jsonl":
            lines = path.read_text().splitlines()
            return [(f"{path.name}:{i}", json.loads(line)) for i, line in enumerate(lines) if line.strip()]
        rows = json.loads(path.read_text())
        return [(f"{path.name}:{i}", row) for i, row in enumerate(rows)]
    files = sorted(path.glob("*.json")) + sorted(path.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no .json or .jsonl files in {path}")
    out = []
    for f in files:
        out.extend(_raw_rows(f))
    return out


def load_scenarios(path=None, budget_factor: float = 0.8, cost_tolerance: float = 0.0,
                   skip_bad: bool = False) -> list[Scenario]:
    """All products as scenarios, in a stable order (file name, then row).

    Bad rows stop the load with one error listing all of them (file:index, field, value); with skip_bad=True
    they are dropped and counted on stderr instead.
    """
    if not budget_factor > 0:
        raise ValueError(f"budget_factor must be > 0, got {budget_factor}")
    scenarios, problems, seen = [], [], {}
    for source, row in _raw_rows(resolve_data_path(path)):
        scenario, row_problems = row_to_scenario(row, source, budget_factor, cost_tolerance)
        if scenario is not None and scenario.codename in seen:
            row_problems = [f"{source} field 'codename': duplicate {scenario.codename!r} "
                            f"(first seen at {seen[scenario.codename]})"]
            scenario = None
        if scenario is None:
            problems.extend(row_problems)
            continue
        seen[scenario.codename] = source
        scenarios.append(scenario)
    if problems and not skip_bad:
        raise DataError(f"{len(problems)} bad row(s); fix them or load with skip_bad=True:\n  "
                        + "\n  ".join(problems))
    if problems:
        print(f"data: skipped {len(problems)} bad row(s), kept {len(scenarios)}", file=sys.stderr)
    return scenarios


def split_scenarios(scenarios: list[Scenario], seed: int = 0, test_size: int = 128) -> tuple[list[Scenario], list[Scenario]]:
    """Deterministic train/test split stratified by category.

    Each category gets a share of the test set proportional to its size (largest remainders), at least one
    product when it has two or more, so small categories appear on both sides where possible. Shuffling uses
    random.Random(seed) over codename-sorted lists, so the split is the same on every machine.
    """
    if not 0 < test_size < len(scenarios):
        raise ValueError(f"test_size must be between 1 and {len(scenarios) - 1}, got {test_size}")
    by_category = defaultdict(list)
    for s in scenarios:
        by_category[s.category].append(s)
    categories = sorted(by_category)
    exact = {c: test_size * len(by_category[c]) / len(scenarios) for c in categories}
    quota = {c: min(int(exact[c]), len(by_category[c]) - 1) for c in categories}
    for c in categories:  # every category of 2+ products gets a test product
        if quota[c] == 0 and len(by_category[c]) >= 2:
            quota[c] = 1
    # Fix the total: add by largest remainder, or take from the largest quotas.
    order = sorted(categories, key=lambda c: (-(exact[c] - int(exact[c])), c))
    while sum(quota.values()) < test_size:
        grew = False
        for c in order:
            if sum(quota.values()) < test_size and quota[c] < len(by_category[c]) - 1:
                quota[c] += 1
                grew = True
        if not grew:
            break
    while sum(quota.values()) > test_size:
        c = max(categories, key=lambda c: (quota[c], c))
        quota[c] -= 1
    rng = random.Random(seed)
    train, test = [], []
    for c in categories:
        group = sorted(by_category[c], key=lambda s: s.codename)
        rng.shuffle(group)
        test.extend(group[:quota[c]])
        train.extend(group[quota[c]:])
    key = {s.codename: i for i, s in enumerate(scenarios)}  # keep the catalogue's order inside each side
    return sorted(train, key=lambda s: key[s.codename]), sorted(test, key=lambda s: key[s.codename])


def scenario_to_dict(s: Scenario) -> dict:
    return asdict(s)


def scenario_from_dict(d: dict) -> Scenario:
    names = {f.name for f in fields(Scenario)}
    return Scenario(**{k: v for k, v in d.items() if k in names})

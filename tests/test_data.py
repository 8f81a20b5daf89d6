import json

import pytest

import data
from data import DataError, Scenario, load_scenarios, parse_price, split_scenarios


def test_all_930_products_load_in_a_stable_order(scenarios):
    assert len(scenarios) == 930
    assert len({s.codename for s in scenarios}) == 930
    assert len({s.category for s in scenarios}) == 18
    assert [s.codename for s in load_scenarios()] == [s.codename for s in scenarios]


def test_prices_follow_xia_et_al(scenarios):
    rows = json.loads((data.resolve_data_path() / "books.json").read_text())
    row = rows[0]  # "House of Earth and Blood": list $8.21, highest $16.09, lowest $2.99
    s = next(s for s in scenarios if s.source == "books.json:0")
    assert s.list_price == 16.09 == max(parse_price(row["list_price"]), parse_price(row["highest_price"]))
    assert s.cost == 2.99
    assert s.budget == round(0.8 * 16.09, 2) == 12.87
    assert s.mi and s.kind == "MI"
    for s in scenarios:
        assert s.list_price > 0 and s.cost > 0 and s.budget == round(0.8 * s.list_price, 2)
        assert s.mi == (s.budget > s.cost)


def test_mi_and_ci_both_present(scenarios):
    ci = [s for s in scenarios if not s.mi]
    assert 0 < len(ci) < 100


def test_budget_factor_is_configurable():
    s = load_scenarios(budget_factor=0.5)[0]
    assert s.budget == round(0.5 * s.list_price, 2)


def test_description_falls_back_to_features(scenarios):
    rows = {}
    for f in data.resolve_data_path().glob("*.json"):
        for i, r in enumerate(json.loads(f.read_text())):
            rows[f"{f.name}:{i}"] = r
    short = [s for s in scenarios if len(str(rows[s.source].get("description") or "").strip()) < 5]
    assert short, "the data set has products with no usable description"
    with_features = [s for s in short if rows[s.source].get("features")]
    assert with_features and all(s.description for s in with_features)


@pytest.mark.parametrize("text,value", [("$1,299.99", 1299.99), ("$8.21", 8.21), ("12", 12.0),
                                         ("$1,000,000", 1e6), (" $3.5 ", 3.5), (7, 7.0)])
def test_parse_price(text, value):
    assert parse_price(text) == value


@pytest.mark.parametrize("bad", ["", "free", "$1,29", "$", None, "1.2.3", True])
def test_parse_price_rejects(bad):
    with pytest.raises(ValueError):
        parse_price(bad)


def _write(tmp_path, rows):
    (tmp_path / "cat.json").write_text(json.dumps(rows))
    return tmp_path


def _row(asin, lp="$10.00", hi="$12.00", lo="$5.00", **kw):
    return {"title": "t", "category": "c", "list_price": lp, "highest_price": hi, "lowest_price": lo,
            "link": f"https://camelcamelcamel.com/product/{asin}?x", "description": "a thing", **kw}


def test_bad_rows_are_all_listed(tmp_path):
    rows = [_row("B000000001"), _row("B000000002", lp="n/a"), _row("B000000003", lo="$0.00"),
            _row("B000000001"), _row("B000000004", lo="$50.00")]
    with pytest.raises(DataError) as e:
        load_scenarios(_write(tmp_path, rows))
    msg = str(e.value)
    assert "4 bad row(s)" in msg
    for needle in ["cat.json:1 field 'list_price'", "cat.json:2 field 'lowest_price'", "cat.json:3 field 'codename'",
                   "cat.json:4 field 'lowest_price'", "'n/a'", "skip_bad=True"]:
        assert needle in msg


def test_skip_bad_keeps_the_good_rows(tmp_path, capsys):
    rows = [_row("B000000001"), _row("B000000002", lp="n/a")]
    kept = load_scenarios(_write(tmp_path, rows), skip_bad=True)
    assert [s.codename for s in kept] == ["B000000001"]
    assert "skipped 1 bad row" in capsys.readouterr().err


def test_cost_tolerance(tmp_path):
    rows = [_row("B000000001", lp="$10.00", hi="$10.00", lo="$10.50")]
    with pytest.raises(DataError):
        load_scenarios(_write(tmp_path, rows))
    assert load_scenarios(_write(tmp_path, rows), cost_tolerance=0.1)[0].cost == 10.5


def test_own_jsonl_catalogue(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"codename": "widget", "title": "Widget", "description": "A widget.",
                                "category": "tools", "list_price": 100, "budget": 70, "cost": 40}) + "\n")
    (s,) = load_scenarios(path)
    assert (s.codename, s.list_price, s.budget, s.cost) == ("widget", 100.0, 70.0, 40.0)


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scenarios(tmp_path / "nope")


def test_download_failure_says_where_to_put_files(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as e:
        data.download_dataset(tmp_path / "cache")
    assert str(tmp_path / "cache") in str(e.value) and "834ad9066d06" in str(e.value)


def test_download_verifies_sha256(tmp_path, monkeypatch):
    class Fake:
        def __enter__(self):
            return self
        def __exit__(self, *a):
            pass
        def read(self):
            return b"tampered"
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Fake())
    with pytest.raises(ValueError, match="sha256"):
        data.download_dataset(tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.json"))


def test_download_writes_verified_files(tmp_path, monkeypatch):
    src = data.resolve_data_path()

    class Local:
        def __init__(self, url):
            self.blob = (src / url.rsplit("/", 1)[1]).read_bytes()
        def __enter__(self):
            return self
        def __exit__(self, *a):
            pass
        def read(self):
            return self.blob
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout=0: Local(url))
    data.download_dataset(tmp_path / "cache")
    assert len(load_scenarios(tmp_path / "cache")) == 930


def test_split_is_deterministic_stratified_and_disjoint(scenarios):
    train, test = split_scenarios(scenarios, seed=0, test_size=128)
    assert len(test) == 128 and len(train) == 802
    assert not {s.codename for s in train} & {s.codename for s in test}
    again_train, again_test = split_scenarios(list(reversed(scenarios)), seed=0)
    assert {s.codename for s in again_test} == {s.codename for s in test}
    # every category with >= 2 products appears on both sides
    cats = {s.category for s in scenarios}
    assert {s.category for s in test} == cats and {s.category for s in train} == cats
    other = split_scenarios(scenarios, seed=1)[1]
    assert {s.codename for s in other} != {s.codename for s in test}


def test_split_pinned_first_test_products(scenarios):
    # Pins the split so that any change to it (and so to every reported number) is noticed.
    test = split_scenarios(scenarios, seed=0)[1]
    assert [s.codename for s in test[:3]] == PINNED_FIRST_TEST


PINNED_FIRST_TEST = ["B001DKO3X6", "B00455L5WS", "B07WN6DZ86"]


def test_scenario_roundtrip():
    s = Scenario("x", "t", "d", "c", 10.0, 8.0, 5.0)
    assert data.scenario_from_dict(data.scenario_to_dict(s) | {"kind": "MI"}) == s

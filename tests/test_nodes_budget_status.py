"""One budget figure on screen (issue 20 items 3 and 4; ``nodes/budget_status.py``), ComfyUI
absent: the nodes' budget lines are the ledger's, a release tells the pages to re-read them, the
read-only status route gives every node the same fresh figure, and the remaining budget reads as
what the next release can be. Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import importlib
import json
import re
import sys
from types import SimpleNamespace

import pytest
from nodes_fixtures import REPO, acc_kwargs, aggregate, ti_set

from dpagg_core.errors import BudgetExceeded
from dpagg_core.privacy import calibration

SPENT = re.compile(r"spent eps ([0-9.e-]+) of ([0-9.e-]+)")


@pytest.fixture
def sent(monkeypatch):
    """A fake ComfyUI server that records send_sync events."""
    events = []
    server = SimpleNamespace(send_sync=lambda event, data, sid=None: events.append((event, data)))
    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=server))
    )
    return events


def _route(queries):
    bs = importlib.import_module("nodes.budget_status")
    common = importlib.import_module("nodes.common")
    status, reply = bs.status_reply(
        common.comfy_ledger(), "application/json", json.dumps({"queries": queries}).encode()
    )
    assert status == 200
    return reply["results"]


def test_stale_statuses_are_refreshed_to_one_figure_after_a_release(pack, comfy_base, sent):
    """Accountant and DP Aggregate ran (the Accountant before the first release said "not set
    yet"); then a second release: the server announces it, and the route's lines for every node's
    query - and the Privacy Ledger's - carry the same spent figure, with no "not set yet"."""
    eset = ti_set(n=6)
    acc = pack["privacy_accountant"].PrivacyAccountant
    acc_ui = acc.execute(**acc_kwargs(n=6, epsilon=1.0), embedding_set=eset).ui["dpagg"][0]
    assert any("not set yet" in line for line in acc_ui["budget_lines"])  # before any release
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    first = aggregate(pack, eset, plan, budget_epsilon=8.0).ui["dpagg"][0]
    assert sent == [("dpagg.ledger", {"dataset": eset.dataset_id})]  # pages told to refresh
    aggregate(pack, eset, plan, budget_epsilon=8.0, clip_norm=0.5)  # a second, new release
    assert len(sent) == 2
    ledger_ui = pack["nodes"].LEDGER_NODES[0].execute(action="show", dataset="").ui["dpagg"][0]
    results = _route([acc_ui["budget_query"], first["budget_query"], ledger_ui["ledger_query"]])
    figures = {SPENT.search("\n".join(r["lines"])).groups() for r in results}
    assert len(figures) == 1  # one figure: Accountant, DP Aggregate and Privacy Ledger agree
    spent, budget = figures.pop()
    assert float(budget) == 8.0 and float(spent) > 1.0  # two releases composed
    assert not any("not set yet" in line for r in results for line in r["lines"])
    assert "2 release(s)" in results[0]["lines"][0]
    stale = SPENT.search("\n".join(first["budget_lines"])).group(1)
    assert stale != spent  # what the cached DP Aggregate showed; the route's lines replace it


def test_remaining_budget_reads_as_the_next_release_and_it_fits(pack, comfy_base):
    """Item 4: no "X left" and no bare "(pld)": "the next release can be at most epsilon X at
    delta Y", X by the refusal's accountant: a release at X is admitted, above it refused and
    the refusal names the same X."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(3.0, 1e-5, 6, "full")
    ui = aggregate(pack, eset, plan, budget_epsilon=5.0).ui["dpagg"][0]
    text = "\n".join(ui["lines"])
    assert " left" not in text and "(pld)" not in text
    line = next(x for x in ui["budget_lines"] if x.startswith("the next release can be"))
    most = float(re.search(r"at most epsilon ([0-9.e-]+) at delta 1e-05", line).group(1))
    assert most == pytest.approx(ui["next_release_max_epsilon"], rel=1e-2)
    with pytest.raises(BudgetExceeded) as err:
        aggregate(pack, eset, calibration.calibrate(most * 1.05, 1e-5, 6, "full"), clip_norm=0.7)
    named = re.search(r"fits now .* is about ([0-9.e-]+)\.", str(err.value)).group(1)
    assert named == f"{most:.3g}" and named in line  # the same number as the node showed
    fits = aggregate(pack, eset, calibration.calibrate(most, 1e-5, 6, "full"), clip_norm=0.6)
    after = fits.ui["dpagg"][0]
    assert any("used up" in x or "at most epsilon" in x for x in after["budget_lines"])


def test_status_route_reads_only_and_refuses_bad_queries(pack, comfy_base):
    """The route takes JSON only, never writes the ledger, and answers a bad query with an
    error entry (the others still answered)."""
    bs = importlib.import_module("nodes.budget_status")
    common = importlib.import_module("nodes.common")
    ledger = common.comfy_ledger()
    assert bs.status_reply(ledger, "text/plain", b"{}")[0] == 415
    assert bs.status_reply(ledger, "application/json", b"[1]")[0] == 400
    results = _route([{"dataset": "nope"}, {"dataset": "ds-x", "plan": "p"}, 3])
    assert all("error" in r for r in results)
    eset = ti_set(n=6)
    good = bs.budget_query(eset.dataset_id)
    assert ledger.dataset_ids() == [] or eset.dataset_id not in ledger.dataset_ids()
    (r,) = _route([good])
    assert r["lines"][0].endswith("spent eps 0 of not set, 0 release(s)")
    assert eset.dataset_id not in ledger.dataset_ids()  # a read: nothing registered or spent


def test_no_server_no_event(pack, monkeypatch):
    bs = importlib.import_module("nodes.budget_status")
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert bs.notify_ledger_changed("ds-x") is False


def test_frontend_refreshes_budget_lines_from_the_route_on_events():
    """js/dpagg.js: listens for the server's event and the end of each prompt, POSTs every
    node's query to the status route and swaps the budget lines (a cached node's old message is
    replaced); the Accountant's n widget follows the set (item 5); nodes shrink back (item 6)."""
    js = (REPO / "js" / "dpagg.js").read_text()
    assert 'STATUS_ROUTE = "/dpagg/ledger/status"' in js
    assert 'LEDGER_EVENT = "dpagg.ledger"' in js
    for event in ("LEDGER_EVENT", '"execution_success"', '"execution_error"'):
        assert f"api.addEventListener({event}" in js
    assert "budget_query" in js and "ledger_query" in js and "budget_lines" in js
    assert "widget.hidden = linked" in js  # the Accountant hides n while a set is linked
    assert "dpaggFitSize" in js  # grows and shrinks back to the status


def test_a_refusal_changes_nothing_so_no_event_and_the_accountant_says_it_short(
    pack, comfy_base, sent, monkeypatch
):
    """A refused release spends nothing: no refresh event. The Accountant's warning gives the
    refusal's reason, not its whole fix text (DP Aggregate shows that when it refuses)."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(2.5, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=3.0)
    assert len(sent) == 1
    with pytest.raises(BudgetExceeded):
        aggregate(pack, eset, plan, budget_epsilon=3.0, clip_norm=0.5)
    assert len(sent) == 1  # refused: the ledger is as it was, no event
    acc = pack["privacy_accountant"].PrivacyAccountant
    prompt = {
        "7": {"class_type": "DpaggPrivacyAccountant", "inputs": {}},
        "9": {"class_type": "DpaggAggregate", "inputs": {"plan": ["7", 0], "budget_epsilon": 3}},
    }
    monkeypatch.setattr(acc, "hidden", SimpleNamespace(prompt=prompt, unique_id="7"))
    ui = acc.execute(**acc_kwargs(n=6, epsilon=2.5), embedding_set=eset).ui["dpagg"][0]
    (warning,) = [x for x in ui["lines"] if x.startswith("WARNING")]
    assert warning.startswith("WARNING: DP Aggregate (node 9) will refuse this plan: privacy")
    assert "would be exceeded" in warning and "Fix:" not in warning and "ledger" not in warning
    assert any(x.startswith("the next release can be at most epsilon") for x in ui["lines"])
    short = importlib.import_module("nodes.budget_status").short
    assert short("budget_epsilon=5 is above X. A budget is never raised implicitly.") == (
        "budget_epsilon=5 is above X."
    )

"""The Privacy Ledger node and its raise-budget route (``nodes/ledger_node.py``), ComfyUI absent.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import importlib
import json
import sys
from types import SimpleNamespace

import pytest
from nodes_fixtures import (
    REPO,
    aggregate,
    ti_set,
    widget_ids,
)

from dpagg_core.errors import BudgetExceeded, DpaggError
from dpagg_core.privacy import calibration
from dpagg_core.privacy.ledger import Ledger


def test_refusal_names_the_comfyui_way_and_the_ledger_dialog_route_raises_only_when_confirmed(
    pack, comfy_base
):
    """ComfyUI's install puts no `dpagg` on PATH: the refusal names the Privacy Ledger node and
    the exact `python -m dpagg_core.cli` command; the node lists the sets and releases, and the
    "Raise budget..." dialog's route function raises a budget only for a JSON request with the
    typed confirmation (then the refused release goes through)."""
    ln = importlib.import_module("nodes.ledger_node")
    node = ln.PrivacyLedger
    schema = node.GET_SCHEMA()
    assert schema.node_id == "DpaggPrivacyLedger" and schema.is_output_node
    eset = ti_set(n=6)
    plan = calibration.calibrate(2.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=2.0)  # the budget is now used up
    with pytest.raises(BudgetExceeded) as err:
        aggregate(pack, eset, plan, name="another")
    msg = str(err.value)
    ds = eset.dataset_id
    assert "Privacy Ledger node" in msg and f"dataset {ds}" in msg
    assert f"{sys.executable} -m dpagg_core.cli ledger set-budget --ledger " in msg
    assert f"cd {REPO} && " in msg and "`dpagg ledger" not in msg
    assert "used up" in msg and "smaller epsilon" not in msg

    shown = node.execute(action="show", dataset="")
    assert ds in shown.args[0] and " mystyle eps 2 " in shown.args[0]
    table = shown.ui["dpagg"][0]["datasets"]
    assert [t["dataset"] for t in table] == [ds] and table[0]["budget"]["epsilon"] == 2.0
    path = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    ledger = Ledger(path)

    def post(body, content_type="application/json"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return ln.raise_budget(ln.comfy_ledger(), content_type, raw)

    good = {"dataset": ds, "epsilon": 5, "delta": 0, "confirm": f"raise {ds} to 5"}
    refused = [  # (request, content type, status)
        (good, "text/plain", 415),  # a cross-origin "simple" request cannot be JSON
        (good, "application/x-www-form-urlencoded", 415),
        (good, "", 415),
        (b"raise it", "application/json", 400),
        (b"[1, 2]", "application/json", 400),
        ({**good, "confirm": ""}, "application/json", 400),
        ({**good, "confirm": "yes"}, "application/json", 400),
        ({**good, "confirm": f"raise {ds} to 4"}, "application/json", 400),
        ({**good, "confirm": "raise ds-other to 5"}, "application/json", 400),
        ({k: v for k, v in good.items() if k != "confirm"}, "application/json", 400),
        ({**good, "epsilon": "5"}, "application/json", 400),
        ({**good, "epsilon": True, "confirm": f"raise {ds} to 1"}, "application/json", 400),
        ({**good, "epsilon": -5, "confirm": f"raise {ds} to -5"}, "application/json", 400),
        ({**good, "dataset": ""}, "application/json", 400),
        (
            {**good, "dataset": "ds-unknown", "confirm": "raise ds-unknown to 5"},
            "application/json",
            404,
        ),
        ({**good, "epsilon": 1, "confirm": f"raise {ds} to 1"}, "application/json", 409),
    ]
    for body, ctype, status in refused:
        code, reply = post(body, ctype)
        assert (code, reply["ok"]) == (status, False), (body, ctype, reply)
        assert reply["error"].endswith("Nothing was changed."), reply
        assert ledger.status(ds)["budget"] == {"epsilon": 2.0, "delta": 1e-5}
    code, reply = post({**good, "confirm": f"raise {ds} to 4"})
    assert f"type exactly 'raise {ds} to 5'" in reply["error"]

    code, reply = post(good, "application/json; charset=utf-8")
    assert code == 200 and reply["ok"] is True, reply
    assert reply["lines"][0] == f"budget of {ds}: 2 -> 5 (delta 1e-05)"
    assert reply["datasets"][0]["budget"] == {"epsilon": 5.0, "delta": 1e-5}
    assert ledger.status(ds)["budget"] == {"epsilon": 5.0, "delta": 1e-5}
    assert aggregate(pack, eset, plan, name="another").args[0] == "embedding:another"
    # "5.0" is the same number; an explicit delta is used
    code, reply = post({**good, "epsilon": 6.5, "delta": 2e-5, "confirm": f"raise {ds} to 6.50"})
    assert code == 200 and ledger.status(ds)["budget"] == {"epsilon": 6.5, "delta": 2e-5}


def test_ledger_node_only_shows_and_refuses_an_old_raise_workflow(pack, comfy_base):
    """Raising is out of the graph: the node's only inputs are action (only 'show') and dataset,
    so no workflow can compute or carry a confirmation. A workflow saved before this change
    (action 'raise budget' and a matching confirmation) is refused before it runs (validate_inputs,
    replacing ComfyUI's list check for action) and again in execute, saying how to raise; the
    budget is unchanged."""
    ln = importlib.import_module("nodes.ledger_node")
    node = ln.PrivacyLedger
    assert widget_ids(node, pack["io"]) == ["action", "dataset"]
    action = node.GET_SCHEMA().inputs[0]
    assert action.options == ["show"]
    eset = ti_set(n=6)
    aggregate(pack, eset, calibration.calibrate(1.0, 1e-5, 6, "full"), budget_epsilon=1.0)
    ds = eset.dataset_id
    ledger = Ledger(comfy_base / "user" / "dpagg" / "ledger.sqlite")
    assert node.validate_inputs(action="show", dataset=ds) is True
    for value in ("raise budget", "set budget"):
        msg = node.validate_inputs(action=value, dataset=ds)
        assert isinstance(msg, str) and "Nothing was changed" in msg
        with pytest.raises(DpaggError) as err:
            node.execute(action=value, dataset=ds)
        assert str(err.value) == msg
    msg = node.validate_inputs(action="raise budget", dataset=ds)
    assert "action 'raise budget' is refused" in msg and "Set action to 'show'" in msg
    assert "'Raise budget...' on the Privacy Ledger node" in msg and f"raise {ds} to" in msg
    assert f"-m dpagg_core.cli ledger set-budget --ledger {ledger.path} --dataset {ds}" in msg
    # a linked dataset arrives as None at validation
    assert "--dataset DATASET" in node.validate_inputs(action="raise budget", dataset=None)
    assert ledger.status(ds)["budget"]["epsilon"] == 1.0


def test_raise_route_registers_only_on_a_comfyui_server(pack, monkeypatch):
    """No ComfyUI server (plain imports, these tests): nothing registered. With one: the route
    goes on PromptServer.instance.routes (ComfyUI's app and middleware serve it), once."""
    ln = importlib.import_module("nodes.ledger_node")
    monkeypatch.delitem(sys.modules, "server", raising=False)
    assert ln.register_routes() is False

    class Routes:
        def __init__(self):
            self.added = []

        def post(self, path):
            return lambda handler: self.added.append((path, handler)) or handler

    instance = SimpleNamespace(routes=Routes())
    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=instance))
    )
    assert ln.register_routes() is True and ln.register_routes() is True
    status = importlib.import_module("nodes.budget_status")
    assert instance.routes.added == [
        ("/dpagg/ledger/budget", ln.raise_budget_route),
        ("/dpagg/ledger/status", status.status_route),  # read-only budget lines (item 3)
    ]
    monkeypatch.setitem(
        sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=None))
    )
    assert ln.register_routes() is False


def test_frontend_ledger_button_is_not_a_saved_widget(pack):
    """js/dpagg.js draws the Privacy Ledger's status and adds its "Raise budget..." button as a
    widget that is serialized neither in widgets_values nor in the prompt; the dialog POSTs JSON
    to the route."""
    js = (REPO / "js" / "dpagg.js").read_text()
    nodes_set = js[js.index("const DPAGG_NODES") : js.index("]);")]
    assert '"DpaggPrivacyLedger"' in nodes_set
    assert 'RAISE_BUTTON = "Raise budget..."' in js
    assert "button.serialize = false" in js and "serialize: false" in js
    assert 'RAISE_ROUTE = "/dpagg/ledger/budget"' in js
    assert '"Content-Type": "application/json"' in js


def test_ledger_shows_the_file_name_actually_written(pack, comfy_base, capsys):
    """A second release requested as "mystyle" is written as mystyle-2: `dpagg ledger show` and
    the Privacy Ledger node show mystyle-2 (the requested name stays in the request key)."""
    from dpagg_core.cli import main

    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=3.0)
    assert aggregate(pack, eset, plan, clip_norm=0.5).args[0] == "embedding:mystyle-2"
    aggregate(pack, eset, plan, clip_norm=0.5)  # re-used: no second file, no second note
    path = comfy_base / "user" / "dpagg" / "ledger.sqlite"
    rows = Ledger(path).list_releases()
    assert [(r["name"], r["files"]) for r in rows] == [
        ("mystyle", ["mystyle"]),
        ("mystyle", ["mystyle-2"]),
    ]
    assert main(["ledger", "show", "--ledger", str(path)]) == 0
    out = capsys.readouterr().out
    assert "file=mystyle-2 (requested name=mystyle)" in out
    node = importlib.import_module("nodes.ledger_node").PrivacyLedger
    shown = node.execute(action="show", dataset="").args[0]
    assert " mystyle-2 eps " in shown

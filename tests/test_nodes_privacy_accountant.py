"""The Privacy Accountant node (``nodes/privacy_accountant.py``), ComfyUI absent.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from nodes_fixtures import (
    acc_kwargs,
    aggregate,
    ti_set,
)

from dpagg_core.errors import BudgetExceeded
from dpagg_core.privacy import accountant, calibration


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"delta": 0.2}, "delta"),  # >= 1/n
        ({"delta": 0.0}, "delta"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"mode": "noise multiplier -> epsilon", "noise_multiplier": 0.0}, "noise_multiplier"),
        ({"sampling": "wor", "m": 11}, "m=11"),
        ({"sampling": "poisson", "q": 1.5}, "q="),
        ({"releases": 0}, "releases"),
        ({"n": 1}, "n=1"),
        ({"sampling": "bogus"}, "sampling"),
    ],
)
def test_accountant_validate_inputs_rejects_bad_parameters(pack, change, needle):
    msg = pack["privacy_accountant"].PrivacyAccountant.validate_inputs(**acc_kwargs(**change))
    assert isinstance(msg, str) and needle in msg


def test_accountant_validate_skips_n_checks_when_set_is_linked(pack):
    acc = pack["privacy_accountant"].PrivacyAccountant
    assert acc.validate_inputs(**acc_kwargs()) is True
    # n=1 widget is ignored when an EMBEDDING_SET is linked (ComfyUI passes None for links)
    assert acc.validate_inputs(**acc_kwargs(n=1, delta=0.01), embedding_set=None) is True


def test_accountant_reads_n_from_the_set_and_both_modes_agree(pack, comfy_base):
    acc = pack["privacy_accountant"].PrivacyAccountant
    eset = ti_set(n=6)
    out = acc.execute(**acc_kwargs(n=999), embedding_set=eset)
    plan, summary = out.args
    assert plan.n == 6 and plan.epsilon <= 2.0
    assert plan == calibration.calibrate(2.0, 1e-5, 6, "full")
    assert summary == accountant.plan_summary(plan)
    # reverse mode: the plan's noise multiplier gives back its epsilon
    back = acc.execute(
        **acc_kwargs(mode="noise multiplier -> epsilon", noise_multiplier=plan.noise_multiplier),
        embedding_set=eset,
    ).args[0]
    assert back.epsilon == pytest.approx(plan.epsilon, rel=1e-6)
    payload = out.ui["dpagg"][0]
    assert payload["plan"] == plan.to_dict()
    assert any("not set yet" in line for line in payload["lines"])  # no release yet
    assert payload["lines"][0] == "n = 6, from the connected image set"  # n widget: hidden
    json.dumps(out.ui)  # UI messages must be JSON


def test_accountant_node_defaults_to_delta_1e5_and_warns_on_the_node(pack, comfy_base):
    acc = pack["privacy_accountant"].PrivacyAccountant
    (delta_input,) = [i for i in acc.define_schema().inputs if i.id == "delta"]
    assert delta_input.default == 1e-5 == accountant.DEFAULT_DELTA
    quiet = acc.execute(**acc_kwargs(n=10)).ui["dpagg"][0]
    assert not quiet["warning"] and quiet["delta_warning"] is None
    out = acc.execute(**acc_kwargs(n=10, delta=1e-3))
    payload = out.ui["dpagg"][0]
    assert payload["warning"]  # shown red on the node
    assert payload["lines"][0].startswith("WARNING: delta = 0.001 is above the default 1e-05")
    assert "1/(10 n) = 0.01" not in payload["lines"][0]  # 1e-3 < 1/(10 n) at n = 10
    assert "fails completely" in payload["delta_warning"]
    assert out.args[1].startswith("WARNING:")  # the summary output says it too
    json.dumps(out.ui)


def test_accountant_shows_the_verdict_dp_aggregate_will_give(pack, comfy_base, monkeypatch):
    """The Privacy Accountant reads the budget_epsilon/budget_delta of the DP Aggregate it feeds
    (from the queued prompt) and runs the same ledger check: a plan DP Aggregate refuses is
    flagged on the accountant, and one it accepts is not."""
    eset = ti_set(n=6)
    acc = pack["privacy_accountant"].PrivacyAccountant
    assert {"PROMPT", "UNIQUE_ID"} <= set(acc.GET_SCHEMA().hidden)

    def queued(budget_epsilon):
        prompt = {
            "7": {"class_type": "DpaggPrivacyAccountant", "inputs": {}},
            "9": {
                "class_type": "DpaggAggregate",
                "inputs": {"plan": ["7", 0], "budget_epsilon": budget_epsilon, "budget_delta": 0},
            },
        }
        monkeypatch.setattr(acc, "hidden", SimpleNamespace(prompt=prompt, unique_id="7"))
        return acc.execute(**acc_kwargs(n=6, epsilon=2.0), embedding_set=eset)

    out = queued(1.5)  # DP Aggregate's budget 1.5 < the plan's epsilon 2
    ui = out.ui["dpagg"][0]
    assert ui["warning"] is True and ui["will_be_refused"] is True
    assert any(
        line.startswith("WARNING: DP Aggregate (node 9) will refuse") for line in ui["lines"]
    )
    with pytest.raises(BudgetExceeded):
        aggregate(pack, eset, out.args[0], budget_epsilon=1.5)
    ok = queued(3.0).ui["dpagg"][0]
    assert ok["will_be_refused"] is False and not any("refuse" in x for x in ok["lines"])
    aggregate(pack, eset, out.args[0], budget_epsilon=3.0)

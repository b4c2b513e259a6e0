"""Add/remove adjacency is refused everywhere; replace-one with public n is what dpagg guarantees.

Why (the statistical regression below): every dpagg mean divides by a denominator computed from
n and sets the noise std from it. Under add/remove the neighbour with one item removed has n - 1
items, so the old ``neighbouring='add_remove'`` plans released N(0, (z C / (q n))^2) noise for 10
items and N(0, (z C / (q (n-1)))^2) for 9: a variance ratio of (10/9)^2 = 1.23, which a test on
the squared norm of one 768-d release (an SD1.x embedding's size) picks up: from 4000 releases of
each, a lower bound of ~5 at delta 1e-5 (99 % confidence) against the claimed epsilon = 1. Under
replace-one n never changes, hence neither does the noise. Every public entry point now refuses
'add_remove' with one message (``accountant.add_remove_error``), and a plan an older version
stored that way (a ledger row) is still read, its stated spend counted, but never used for a new
release.
"""

from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pytest
from dp_accounting.gaussian_mechanism import get_sigma_gaussian

from dpagg_core.aggregate.release import release_vectors
from dpagg_core.cli import build_parser, main
from dpagg_core.errors import DpaggError
from dpagg_core.privacy import accountant, mechanism
from dpagg_core.privacy.accountant import PrivacyPlan, epsilon_for
from dpagg_core.privacy.audit import audit, epsilon_lower_bound
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.privacy.composition import composed_spend
from dpagg_core.privacy.ledger import Ledger
from dpagg_core.privacy.request_keys import training_request
from dpagg_core.training import dpsgd

MESSAGE = r"neighbouring='add_remove' is not supported: under add/remove adjacency the number"
WHY = r"n is itself private.*replace-one adjacency with a public n"
DELTA = 1e-5


def legacy_plan(n: int = 10, q: float = 1.0, z: float = 3.73, eps: float = 1.0) -> PrivacyPlan:
    """A plan as dpagg <= this change built for neighbouring='add_remove' (as stored in a ledger
    row). At q = 1 its accountant was the analytic Gaussian at sigma = z: eps(z=3.73) ~ 1."""
    return PrivacyPlan(
        "poisson", n=n, delta=DELTA, noise_multiplier=z, epsilon=eps, accountant="pld_poisson",
        q=q, neighbouring="add_remove",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Why: the old mechanism's noise depended on the private count
# ------------------------------------------------------------------------------------------------


def test_old_add_remove_noise_depends_on_the_count_and_is_refuted_and_now_refused() -> None:
    z = float(get_sigma_gaussian(1.0, DELTA))  # the old plan's z for epsilon 1 at q = 1
    old10, old9 = legacy_plan(10, z=z), legacy_plan(9, z=z)  # D and D minus one item
    # The old formula: std z * C / (q n) from the dataset's own n.
    assert old9.noise_std(1.0) / old10.noise_std(1.0) == pytest.approx(10 / 9)
    # Both datasets hold items at the public centre, so each release is pure noise of that std;
    # drawn with the mechanism's own CSPRNG sampler. Statistic: squared norm of the release.
    dim, trials = 768, 4000
    s10 = (mechanism._gaussian_noise((trials, dim), old10.noise_std(1.0)) ** 2).sum(axis=1)
    s9 = (mechanism._gaussian_noise((trials, dim), old9.noise_std(1.0)) ** 2).sum(axis=1)
    lb = epsilon_lower_bound(s10, s9, DELTA, confidence=0.99)
    # Measured over 10 runs: 5.2 (sd 0.3, min 4.8) against the claimed 1: the claim was false.
    assert lb > 3 * old10.epsilon
    # Gone: neither the mechanism nor the accountant accepts such a plan any more.
    with pytest.raises(DpaggError, match=MESSAGE):
        mechanism.dp_mean(np.zeros((10, dim)), plan=old10, clip_norm=1.0)
    with pytest.raises(DpaggError, match=MESSAGE):
        epsilon_for(z, DELTA, 10, "poisson", q=1.0, neighbouring="add_remove")


def test_replace_one_noise_never_depends_on_the_data() -> None:
    """Under replace-one n is the same for both neighbours, so is the std: the same squared-norm
    test finds nothing (true epsilon of that test 0; false alarm probability <= 1 %)."""
    plan = calibrate(1.0, DELTA, 10, "poisson", q=1.0)
    assert plan.neighbouring == "replace_one"
    std = plan.noise_std(1.0)
    dim, trials = 768, 4000
    s0 = (mechanism._gaussian_noise((trials, dim), std) ** 2).sum(axis=1)
    s1 = (mechanism._gaussian_noise((trials, dim), std) ** 2).sum(axis=1)
    assert epsilon_lower_bound(s0, s1, DELTA, confidence=0.99) <= plan.epsilon


# ------------------------------------------------------------------------------------------------
# Every entry point refuses, naming the parameter and the reason
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling,kw", [("full", {}), ("wor", {"m": 5}), ("poisson", {"q": 0.5})])
def test_accountant_refuses_add_remove(sampling: str, kw: dict) -> None:
    with pytest.raises(DpaggError, match=MESSAGE) as info:
        calibrate(1.0, DELTA, 10, sampling, neighbouring="add_remove", **kw)
    assert re.search(WHY, str(info.value), re.S)  # says why, and what to use instead
    with pytest.raises(DpaggError, match=MESSAGE):
        epsilon_for(2.0, DELTA, 10, sampling, neighbouring="add_remove", **kw)
    with pytest.raises(DpaggError, match="neighbouring='swap' is unknown"):
        calibrate(1.0, DELTA, 10, sampling, neighbouring="swap", **kw)
    assert accountant.NEIGHBOURINGS == ("replace_one",)


def test_mechanism_refuses_a_legacy_plan_before_drawing(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    monkeypatch.setattr(mechanism, "_uniform_bits", lambda count: drawn.append(count))
    plan = legacy_plan()
    x = np.zeros((10, 4))
    for call in (
        lambda: mechanism.dp_mean(x, plan=plan, clip_norm=1.0),
        lambda: mechanism.check_inputs(x, plan, 1.0),
        lambda: mechanism.privacy_record(plan, 1.0),
    ):
        with pytest.raises(DpaggError, match="plan." + MESSAGE):
            call()
    assert drawn == []


def test_ledger_refuses_a_legacy_plan_and_writes_nothing(tmp_path) -> None:
    led = Ledger(tmp_path / "ledger.sqlite")
    plan = legacy_plan()
    with pytest.raises(DpaggError, match=MESSAGE):
        release_vectors(led, np.zeros((10, 4)), dataset_id="ds", plan=plan, clip_norm=1.0, name="x")
    with pytest.raises(DpaggError, match=MESSAGE):
        led.check("ds", plan)
    with pytest.raises(DpaggError, match=MESSAGE):
        led.reserve(training_request({}, dataset_id="ds", plan=plan, name="x", clip_norm=1.0))
    assert led.list_releases() == []


def test_dpsgd_refuses_add_remove() -> None:
    kw = dict(n=100, q=0.1, steps=10, delta=1e-3)
    with pytest.raises(DpaggError, match=MESSAGE):
        dpsgd.plan_for_sgd(1.0, neighbouring="add_remove", **kw)
    with pytest.raises(DpaggError, match=MESSAGE):
        dpsgd.calibrate_dpsgd(1.0, 1e-3, n=100, q=0.1, steps=10, neighbouring="add_remove")
    with pytest.raises(DpaggError, match="plan." + MESSAGE):
        dpsgd.sgd_noise_multiplier(legacy_plan(100, q=0.1))
    # refused first, before the images, the backend or the config are even looked at
    with pytest.raises(DpaggError, match=MESSAGE):
        dpsgd.train_dpsgd(
            None, None, dpsgd.DPSGDConfig(), target_epsilon=1.0, delta=1e-3,  # type: ignore[arg-type]
            neighbouring="add_remove",
        )  # fmt: skip


def test_audit_refuses_a_legacy_plan() -> None:
    with pytest.raises(DpaggError, match="plan." + MESSAGE):
        audit(legacy_plan(), trials=100)


def test_cli_has_no_neighbouring_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI builds replace-one plans only; no subcommand offers a relation to choose."""
    with pytest.raises(SystemExit) as info:
        main(["account", "--epsilon", "1", "--n", "100", "--neighbouring", "add_remove"])
    assert info.value.code == 2
    assert "unrecognized arguments: --neighbouring add_remove" in capsys.readouterr().err
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    for name, sub in subparsers.choices.items():  # type: ignore[union-attr]
        flags = [o for a in sub._actions for o in a.option_strings]
        assert not any("neighbour" in f or "add-remove" in f for f in flags), name


# ------------------------------------------------------------------------------------------------
# Old ledgers stay readable
# ------------------------------------------------------------------------------------------------


def test_a_legacy_add_remove_ledger_row_is_read_and_its_spend_counted(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite"
    led = Ledger(path)
    first = epsilon_for(4.0, DELTA, 10, "poisson", q=0.5)
    release_vectors(led,
        np.zeros((10, 4)), dataset_id="ds", plan=first, clip_norm=1.0, name="a",
        budget_epsilon=10.0, budget_delta=1e-3,
    )  # fmt: skip
    # Turn the stored row into what an older dpagg wrote for an add/remove plan.
    old = legacy_plan(10, q=0.5, z=4.0, eps=first.epsilon)
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE releases SET plan = ?", (json.dumps(old.to_dict(), sort_keys=True),))
    con.close()
    status = led.status("ds")
    assert status["releases"] == 1
    # Charged at the replace-one cost of the noise it drew (multiplier z/2), not its stated one.
    true_cost = epsilon_for(2.0, DELTA, 10, "poisson", q=0.5)
    assert true_cost.epsilon > old.epsilon
    alone = composed_spend([true_cost], 1e-3)  # at the budget's delta, as the ledger reports
    assert status["spent"]["epsilon"] == pytest.approx(alone.epsilon)
    assert alone.epsilon > composed_spend([old], 1e-3).epsilon
    # A new (replace-one) release composes with it like any other replace-one release.
    second = epsilon_for(4.0, DELTA, 10, "full")
    res = release_vectors(
        led, np.zeros((10, 4)), dataset_id="ds", plan=second, clip_norm=1.0, name="b"
    )
    expected = composed_spend([true_cost, second], 1e-3)
    assert res.spent_epsilon == pytest.approx(expected.epsilon)
    assert res.spent_epsilon <= true_cost.epsilon + second.epsilon * (1 + 1e-9)

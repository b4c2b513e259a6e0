"""Tests for dpagg_core.privacy.accountant: pins, the dp-accounting noise-multiplier trap,
monotonicity, calibration round trips and input validation.

Reference values are computed independently of the module's code paths: the analytic Gaussian
via dp_accounting.gaussian_mechanism, the k-fold Gaussian via the composition theorem (k
Gaussians with noise multiplier z are one Gaussian with z / sqrt(k)), and RDP via dp-accounting's
RdpAccountant with its default orders.
"""

from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.gaussian_mechanism import get_epsilon_gaussian
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant
from hypothesis import given, settings
from hypothesis import strategies as st

from dpagg_core.errors import DpaggError
from dpagg_core.privacy import accountant as acc
from dpagg_core.privacy import calibration
from dpagg_core.privacy.accountant import (
    PrivacyPlan,
    composed_epsilon,
    dp_events,
    epsilon_for,
    plan_summary,
    rdp_wor_epsilon,
)
from dpagg_core.privacy.calibration import calibrate

DELTA = 1e-5
N = 1000
FAST = settings(max_examples=5, deadline=None)


def gauss(z: float, delta: float = DELTA, k: int = 1) -> float:
    """Reference: exact epsilon of k Gaussians with noise multiplier z (Balle & Wang 2018)."""
    return float(get_epsilon_gaussian(z / math.sqrt(k), delta))


# ------------------------------------------------------------------------------------------------
# Hand pins
# ------------------------------------------------------------------------------------------------


def test_pin_sigma_for_eps1_one_full_release():
    plan = calibrate(1.0, DELTA, N, "full")
    assert plan.noise_multiplier == pytest.approx(3.7306, rel=1e-3)
    assert plan.epsilon <= 1.0
    assert plan.epsilon == pytest.approx(1.0, rel=1e-6)
    assert plan.accountant == "analytic_gaussian"


def test_pin_wor_one_release_n1000_m100_z2():
    # By hand: analytic Gaussian at sigma=2, delta0 = 1e-5 * 1000/100 = 1e-4, then BBG18:
    # log(1 + 0.1 (e^eps0 - 1)).
    plan = epsilon_for(2.0, DELTA, 1000, "wor", m=100)
    assert plan.epsilon == pytest.approx(0.369, rel=1e-2)
    eps0 = gauss(2.0, delta=1e-4)
    assert plan.epsilon == pytest.approx(math.log1p(0.1 * math.expm1(eps0)), rel=1e-8)
    assert plan.accountant == "analytic_gaussian+wor_amplification(BBG18)"


# ------------------------------------------------------------------------------------------------
# Every mode at q = 1 (m = n) is the plain Gaussian with sigma = z: pins the noise-multiplier
# mapping (PLD's REPLACE_ONE wants 2z, RDP wants z). A factor-2 slip moves epsilon by ~2x.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [0.8, 2.0, 5.0])
def test_full_one_release_is_analytic_gaussian(z):
    assert epsilon_for(z, DELTA, N, "full").epsilon == pytest.approx(gauss(z), rel=1e-8)


@pytest.mark.parametrize("z,k", [(2.0, 4), (6.0, 10)])
def test_full_k_releases_is_composed_gaussian(z, k):
    plan = epsilon_for(z, DELTA, N, "full", releases=k)
    assert plan.accountant == "pld"
    # pessimistic PLD: never below the exact value, and within 0.1 % of it
    assert gauss(z, k=k) <= plan.epsilon <= gauss(z, k=k) * 1.001


@pytest.mark.parametrize("z", [0.8, 2.0, 5.0])
def test_wor_m_equals_n_one_release_is_analytic_gaussian(z):
    plan = epsilon_for(z, DELTA, 200, "wor", m=200)
    assert plan.epsilon == pytest.approx(gauss(z), rel=1e-8)


@pytest.mark.parametrize("z,k", [(2.0, 3), (6.0, 10)])
def test_wor_m_equals_n_k_releases_is_composed_gaussian(z, k):
    plan = epsilon_for(z, DELTA, 200, "wor", m=200, releases=k)
    assert gauss(z, k=k) <= plan.epsilon <= gauss(z, k=k) * 1.001


@pytest.mark.parametrize("z,k", [(1.0, 1), (2.0, 1), (3.0, 5)])
def test_rdp_wor_at_q1_uses_z_not_2z(z, k):
    """RDP at m = n is a valid but looser bound than the exact Gaussian: above it, close to it.

    Passing 2z would land far below the exact value (unsound); z/2 far above.
    """
    rdp = rdp_wor_epsilon(z, DELTA, 200, 200, releases=k)
    assert gauss(z, k=k) <= rdp <= 1.25 * gauss(z, k=k)


@pytest.mark.parametrize("z,k", [(0.8, 1), (2.0, 1), (3.0, 4)])
def test_poisson_q1_is_analytic_gaussian(z, k):
    plan = epsilon_for(z, DELTA, N, "poisson", q=1.0, releases=k)
    assert plan.accountant == "pld_poisson"
    ref = gauss(z, k=k)
    assert ref <= plan.epsilon <= ref * 1.002


def test_poisson_sensitivity_is_replace_one_and_add_remove_is_refused():
    """Poisson plans are replace-one with the public denominator q*n: sensitivity 2C/(qn), noise
    std z * 2C/(qn), amplified below the unsampled value. Add/remove (where n, hence q*n and the
    noise, would be private) is refused; tests/test_neighbouring.py has the why."""
    plan = epsilon_for(2.0, DELTA, N, "poisson", q=0.1)
    assert plan.neighbouring == "replace_one"
    assert 0 < plan.epsilon < gauss(2.0)
    assert plan.sensitivity(1.0) == pytest.approx(2.0 / 100)
    assert plan.noise_std(1.0) == pytest.approx(2.0 * 2.0 / 100)
    with pytest.raises(DpaggError, match="neighbouring='add_remove' is not supported"):
        epsilon_for(2.0, DELTA, N, "poisson", q=0.1, neighbouring="add_remove")


# ------------------------------------------------------------------------------------------------
# Cross-checks between accountants
# ------------------------------------------------------------------------------------------------


def _library_rdp_wor(z: float, n: int, m: int, k: int, delta: float) -> float:
    """RDP-WOR straight from dp-accounting with its default (larger) order set."""
    a = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z))
    a.compose(dp_event.SelfComposedDpEvent(event, k))
    return float(a.get_epsilon(delta))


@FAST
@given(
    z=st.floats(0.5, 20.0),
    n=st.integers(20, 5000),
    frac=st.floats(0.01, 1.0),
)
def test_wor_one_shot_never_above_rdp(z, n, frac):
    m = max(1, min(n, round(frac * n)))
    delta = 0.1 / n
    one_shot = epsilon_for(z, delta, n, "wor", m=m).epsilon
    assert one_shot <= rdp_wor_epsilon(z, delta, n, m) * (1 + 1e-9)


def test_rdp_wor_order_set_close_to_library_default():
    """Our faster order set stays valid (>= the default-order value) and tight (<= +2%)."""
    for z, n, m, k in [(2.0, 1000, 100, 10), (1.0, 1000, 10, 100)]:
        ours = rdp_wor_epsilon(z, 0.1 / n, n, m, releases=k)
        lib = _library_rdp_wor(z, n, m, k, 0.1 / n)
        assert lib * (1 - 1e-12) <= ours <= lib * 1.02


def test_wor_k_releases_is_min_of_rdp_and_unamplified():
    # Subsampling helps: RDP wins.
    plan = epsilon_for(2.0, DELTA, 1000, "wor", m=100, releases=10)
    assert plan.accountant == "rdp_wor"
    assert plan.epsilon == pytest.approx(rdp_wor_epsilon(2.0, DELTA, 1000, 100, releases=10))
    assert plan.epsilon < gauss(2.0, k=10)
    # Hardly any subsampling: the unamplified composed Gaussian wins.
    plan = epsilon_for(3.0, DELTA, 200, "wor", m=199, releases=4)
    assert plan.accountant == "pld(unamplified)"
    assert plan.epsilon <= rdp_wor_epsilon(3.0, DELTA, 200, 199, releases=4)
    assert gauss(3.0, k=4) <= plan.epsilon <= gauss(3.0, k=4) * 1.001


# ------------------------------------------------------------------------------------------------
# Monotonicity
# ------------------------------------------------------------------------------------------------

MODES = [
    ("full", {}),
    ("wor", {"m": 50}),
    ("poisson", {"q": 0.1}),
]


@pytest.mark.parametrize("sampling,kw", MODES)
@FAST
@given(z=st.floats(0.5, 6.0), ratio=st.floats(1.05, 3.0), k=st.sampled_from([1, 3]))
def test_epsilon_decreases_with_noise(sampling, kw, z, ratio, k):
    lo = epsilon_for(z, DELTA, 500, sampling, releases=k, **kw).epsilon
    hi = epsilon_for(z * ratio, DELTA, 500, sampling, releases=k, **kw).epsilon
    assert hi < lo


@FAST
@given(z=st.floats(0.6, 10.0), m=st.integers(1, 400), extra=st.integers(1, 100))
def test_wor_epsilon_increases_with_m(z, m, extra):
    small = epsilon_for(z, DELTA, 500, "wor", m=m).epsilon
    large = epsilon_for(z, DELTA, 500, "wor", m=min(500, m + extra)).epsilon
    assert small < large


@FAST
@given(z=st.floats(1.0, 8.0), m=st.integers(5, 200), extra=st.integers(5, 100))
def test_wor_k_epsilon_increases_with_m(z, m, extra):
    small = epsilon_for(z, DELTA, 500, "wor", m=m, releases=5).epsilon
    large = epsilon_for(z, DELTA, 500, "wor", m=m + extra, releases=5).epsilon
    assert small <= large


@FAST
@given(z=st.floats(0.6, 8.0), q=st.floats(0.01, 0.6), ratio=st.floats(1.2, 1.6))
def test_poisson_epsilon_increases_with_q(z, q, ratio):
    small = epsilon_for(z, DELTA, 500, "poisson", q=q).epsilon
    large = epsilon_for(z, DELTA, 500, "poisson", q=q * ratio).epsilon
    assert small < large


@pytest.mark.parametrize("sampling,kw", MODES)
@FAST
@given(z=st.floats(0.8, 10.0), k=st.integers(1, 20), extra=st.integers(1, 20))
def test_epsilon_increases_with_releases(sampling, kw, z, k, extra):
    fewer = epsilon_for(z, DELTA, 500, sampling, releases=k, **kw).epsilon
    more = epsilon_for(z, DELTA, 500, sampling, releases=k + extra, **kw).epsilon
    assert fewer < more


# ------------------------------------------------------------------------------------------------
# Calibration round trip
# ------------------------------------------------------------------------------------------------

CAL_MODES = [
    ("full", {}, 1),
    ("full", {}, 5),
    ("wor", {"m": 40}, 1),
    ("wor", {"m": 40}, 4),
    ("poisson", {"q": 0.2}, 1),
    ("poisson", {"q": 0.2}, 8),
    ("poisson", {"q": 0.2}, 3),
]


@pytest.mark.parametrize("sampling,kw,k", CAL_MODES)
@settings(max_examples=4, deadline=None)
@given(target=st.floats(0.2, 8.0), n=st.integers(100, 2000))
def test_calibrate_round_trip(sampling, kw, k, target, n):
    delta = 0.1 / n
    plan = calibrate(target, delta, n, sampling, releases=k, **kw)
    assert isinstance(plan, PrivacyPlan)
    assert plan.epsilon <= target
    # tight: within 1 % of the target (the search stops within 0.1 %)
    assert plan.epsilon >= 0.99 * target
    again = epsilon_for(plan.noise_multiplier, delta, n, sampling, releases=k, **kw)
    assert again == plan
    # and a little less noise would break the target (unless already at the noise floor)
    if plan.noise_multiplier * 0.98 >= acc.MIN_NOISE_MULTIPLIER:
        less = epsilon_for(plan.noise_multiplier * 0.98, delta, n, sampling, releases=k, **kw)
        assert less.epsilon > target


def test_calibrate_huge_target_clamps_to_min_noise():
    plan = calibrate(500.0, DELTA, N, "full")
    assert plan.noise_multiplier == acc.MIN_NOISE_MULTIPLIER
    assert plan.epsilon <= 500.0


def test_calibrate_records_setting():
    plan = calibrate(2.0, 1e-6, 300, "wor", m=30, releases=2)
    assert (plan.sampling, plan.n, plan.delta, plan.m, plan.q, plan.releases) == (
        "wor",
        300,
        1e-6,
        30,
        None,
        2,
    )
    assert plan.neighbouring == "replace_one"
    assert plan.noise_std(0.5) == pytest.approx(plan.noise_multiplier * 2 * 0.5 / 30)


# ------------------------------------------------------------------------------------------------
# DpEvents, composition, summary
# ------------------------------------------------------------------------------------------------


def test_dp_events_reproduce_plan_epsilon():
    full = epsilon_for(3.0, DELTA, N, "full")
    assert composed_epsilon([dp_events(full)], DELTA) == pytest.approx(full.epsilon, rel=1e-3)
    full_k = epsilon_for(3.0, DELTA, N, "full", releases=4)
    assert composed_epsilon([dp_events(full_k)], DELTA) == pytest.approx(full_k.epsilon, rel=1e-3)
    pois = epsilon_for(1.5, DELTA, N, "poisson", q=0.1, releases=5)
    assert composed_epsilon([dp_events(pois)], DELTA) == pytest.approx(pois.epsilon, rel=1e-9)
    assert acc.pld_relation(pois) is NeighboringRelation.REPLACE_ONE


def test_legacy_add_remove_plan_has_no_event_and_no_pld_composition():
    """A plan an older version stored with neighbouring='add_remove' still loads (the ledger
    reads old rows), but yields no DpEvent and no PLD composition: the ledger falls back to basic
    composition of its stated spend (tests/test_neighbouring.py checks the ledger end to end)."""
    legacy = PrivacyPlan(
        "poisson", n=N, delta=DELTA, noise_multiplier=1.5, epsilon=0.5, accountant="pld_poisson",
        q=0.1, neighbouring="add_remove",
    )  # fmt: skip
    with pytest.raises(DpaggError, match="plan.neighbouring='add_remove' is not supported"):
        dp_events(legacy)
    with pytest.raises(DpaggError, match="not supported"):
        acc.pld_relation(legacy)
    pois = epsilon_for(1.5, DELTA, N, "poisson", q=0.1)
    assert composed_epsilon([dp_events(pois)], DELTA, "add_remove") is None


def test_dp_events_compose_two_plans_between_single_and_sum():
    a = epsilon_for(3.0, DELTA, N, "full")
    b = epsilon_for(1.5, DELTA, N, "poisson", q=0.1, releases=2)
    both = composed_epsilon([dp_events(a), dp_events(b)], DELTA)
    assert both is not None
    assert max(a.epsilon, b.epsilon) < both < a.epsilon + b.epsilon


def test_dp_events_wor_is_none():
    plan = epsilon_for(2.0, DELTA, N, "wor", m=100)
    assert dp_events(plan) is None
    assert composed_epsilon([dp_events(plan)], DELTA) is None


@pytest.mark.parametrize(
    "plan",
    [
        epsilon_for(3.7306, DELTA, N, "full"),
        epsilon_for(2.0, DELTA, N, "wor", m=100),
        epsilon_for(2.0, DELTA, N, "poisson", q=0.1, releases=3),
    ],
)
def test_plan_summary(plan):
    text = plan_summary(plan)
    assert "\n" not in text
    assert f"{plan.noise_multiplier:.4g}" in text
    assert f"{plan.epsilon:.4g}" in text
    assert "1e-05" in text
    assert plan.accountant in text
    assert {"full": "all n=1000", "wor": "m=100 of n=1000", "poisson": "q=0.1"}[
        plan.sampling
    ] in text


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": -1e-6}, "delta"),
        ({"delta": 1e-3}, r"1/n.*releasing one person's data outright.*1/\(10n\)"),
        ({"delta": 2e-3}, "1/n"),
        ({"n": 1}, "n=1"),
        ({"n": 0}, "n=0"),
        ({"n": 10.5}, "n="),
        ({"sampling": "bootstrap"}, "sampling='bootstrap'"),
        ({"sampling": "wor"}, "needs m"),
        ({"sampling": "wor", "m": 1001}, "m=1001 exceeds n=1000"),
        ({"sampling": "wor", "m": 0}, "m=0"),
        ({"sampling": "wor", "m": 10, "q": 0.1}, "q was given"),
        ({"sampling": "poisson"}, "needs q"),
        ({"sampling": "poisson", "q": 0.0}, r"q=0.0 must lie in \(0, 1\]"),
        ({"sampling": "poisson", "q": 1.5}, "q=1.5"),
        ({"sampling": "poisson", "q": 0.1, "m": 10}, "m was given"),
        ({"sampling": "full", "m": 10}, "m=10 was given with sampling='full'"),
        ({"releases": 0}, "releases=0"),
        ({"releases": 2.5}, "releases"),
        ({"neighbouring": "add_remove"}, "neighbouring='add_remove' is not supported.*private"),
        ({"sampling": "poisson", "q": 0.1, "neighbouring": "add_remove"}, "not supported"),
        ({"neighbouring": "swap"}, "neighbouring='swap' is unknown"),
    ],
)
def test_bad_input(kwargs, match):
    base = {"delta": DELTA, "n": N, "sampling": "full"}
    base.update(kwargs)
    with pytest.raises(DpaggError, match=match):
        epsilon_for(2.0, **base)
    with pytest.raises(DpaggError, match=match):
        calibrate(1.0, **base)


@pytest.mark.parametrize("z", [0.0, -1.0, float("nan"), float("inf"), 0.01, "two"])
def test_bad_noise_multiplier(z):
    with pytest.raises(DpaggError, match="noise_multiplier"):
        epsilon_for(z, DELTA, N, "full")


@pytest.mark.parametrize("eps", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_target_epsilon(eps):
    with pytest.raises(DpaggError, match="target_epsilon"):
        calibrate(eps, DELTA, N, "full")


def test_error_is_value_error_and_names_fix():
    with pytest.raises(ValueError) as info:
        epsilon_for(2.0, 0.05, 50, "full")
    assert "e.g. 1/(10n) = 0.002" in str(info.value)


# ------------------------------------------------------------------------------------------------
# The plan's validator and the calibration module
# ------------------------------------------------------------------------------------------------


def test_full_k_releases_calibrates_with_dp_accountings_calibrate_dp_mechanism(monkeypatch):
    calls = []
    real = calibration.calibrate_dp_mechanism

    def spy(*args, **kwargs):
        calls.append(kwargs["bracket_interval"])
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate_dp_mechanism", spy)
    plan = calibrate(1.0, DELTA, N, "full", releases=4)
    assert len(calls) == 1 and plan.accountant == "pld"
    assert 0.999 * 1.0 <= plan.epsilon <= 1.0


def test_plan_check_accepts_accountant_plans_and_refuses_bad_fields():
    good = calibrate(1.0, DELTA, N, "wor", m=100)
    assert good.check() is good
    assert epsilon_for(2.0, DELTA, N, "poisson", q=0.1, releases=3).check()
    bad = {
        "n": 10.0,
        "releases": 0,
        "m": 1001,
        "q": 0.1,
        "delta": 0.01,
        "noise_multiplier": 0.0,
        "epsilon": float("nan"),
        "sampling": "all",
        "neighbouring": "add_remove",
    }
    for field, value in bad.items():
        with pytest.raises(DpaggError, match=field.split("_")[0]):
            PrivacyPlan(**{**good.to_dict(), field: value}).check()


def test_check_parameters_leaves_the_n_rules_when_n_is_unknown():
    with pytest.raises(DpaggError, match="1/n"):
        acc.check_parameters(0.2, 10, "wor", 5, None, 1, "replace_one")
    acc.check_parameters(0.2, 10, "wor", 20, None, 1, "replace_one", n_known=False)
    with pytest.raises(DpaggError, match="m=0"):
        acc.check_parameters(1e-5, None, "wor", 0, None, 1, "replace_one", n_known=False)


def test_a_plan_validates_once_on_construction(monkeypatch):
    """Issue 19 item 4: the rules run when a plan is built; ``check`` / ``checked_plan`` (run by
    the mechanism, the ledger, the request keys and the release on every use) only read the
    verdict. An invalid plan still constructs (stored legacy rows load) and raises on every use."""
    from dpagg_core.privacy import plan as plan_module

    calls = []
    real = plan_module.check_parameters

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plan_module, "check_parameters", counting)
    good = PrivacyPlan("full", 100, 1e-5, 2.0, 1.0, "analytic_gaussian")
    assert calls == [1]
    for _ in range(6):
        assert plan_module.checked_plan(good) is good
        assert good.check() is good
    assert calls == [1]
    assert "_verdict" not in good.to_dict() and "_verdict" not in repr(good)
    legacy = PrivacyPlan("full", 100, 1e-5, 2.0, 1.0, "pld", neighbouring="add_remove")
    for _ in range(2):
        with pytest.raises(DpaggError, match="add_remove"):
            plan_module.checked_plan(legacy)
    assert calls == [1]  # its validation stopped at the relation, before check_parameters


def test_check_inputs_are_plan_from_inputs_cheap_checks():
    """calibration.check_inputs: the checks a front end runs before anything (issue 19 item 3),
    the same inputs as plan_from_inputs; n's own rules wait when n is not known yet."""
    calibration.check_inputs(n=100, delta=1e-5, epsilon=2.0)
    calibration.check_inputs(n=100, delta=1e-5, noise_multiplier=2.0, sampling="wor", m=50)
    with pytest.raises(DpaggError, match="exactly one"):
        calibration.check_inputs(n=100, delta=1e-5)
    with pytest.raises(DpaggError, match="target epsilon"):
        calibration.check_inputs(n=100, delta=1e-5, epsilon=0.0)
    with pytest.raises(DpaggError, match="noise_multiplier"):
        calibration.check_inputs(n=100, delta=1e-5, noise_multiplier=0.0)
    with pytest.raises(DpaggError, match="needs m"):
        calibration.check_inputs(n=100, delta=1e-5, epsilon=1.0, sampling="wor", m=None)
    with pytest.raises(DpaggError):
        calibration.check_inputs(n=10, delta=1e-5, epsilon=1.0, sampling="wor", m=50)
    calibration.check_inputs(n=10, delta=1e-5, epsilon=1.0, sampling="wor", m=50, n_known=False)

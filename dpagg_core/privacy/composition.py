"""Composition of recorded spends: what "spent" means for one image set (pure accounting).

A plan states ``(plan.epsilon, plan.delta)`` for
``plan.releases`` calls of the mechanism; calls of one identical plan on a dataset are charged in
blocks of that many (``charged_blocks``; the default ``releases=1`` charges every call). A plan
whose stated epsilon is below the accountant's bound for its noise multiplier is refused
(``bounds.epsilon_for``), so a hand-built plan cannot under-charge. The ledger then takes the
tighter of two sound bounds for all charged blocks, recorded plus new:

1. Basic composition (Dwork, Kenthapadi, McSherry, Mironov, Naor 2006; Dwork & Roth 2014,
   Thm 3.16): ``(sum eps_i, sum delta_i)``. Always available; holds for adaptively chosen plans.
2. Privacy-loss-distribution composition (dp-accounting's ``PLDAccountant``, pessimistic
   discretisation, Meiser & Mohammadi 2018; Koskela et al. 2020; Doroshenko et al. 2022), used only
   when every plan has a ``DpEvent`` (``bounds.dp_events``) and all plans share one neighbouring
   relation: the epsilon of the composed events at the budget's delta, ``(eps_pld, delta_total)``.
   PLD composition is valid for adaptive composition because each release is a fixed mechanism
   given its public plan.

Either bound is a valid (epsilon, delta) guarantee for the composed releases, so a request is
granted if either fits the budget, and the reported spend is the fitting bound with the smaller
epsilon. Comparisons allow a 1e-9 relative slack so that, e.g., three releases of epsilon 0.1 fit a
budget of 0.3 despite floating-point rounding (0.1+0.1+0.1 > 0.3 in binary); the guarantee is then
the budget up to a factor 1 + 1e-9.

A charged row of a train-then-release mechanism (DP-SGD, ``mode='dpsgd'``) runs all
``plan.releases`` calls of its plan at once (:func:`calls_of_row`). Legacy add/remove rows are
charged at their replace-one cost (:func:`as_replace_one`). Nothing here touches SQLite: the ledger
(``dpagg_core.privacy.ledger``) reads its rows and asks this module what they cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from dpagg_core.errors import DpaggError
from dpagg_core.privacy import bounds
from dpagg_core.privacy.plan import PrivacyPlan

REL_TOL = 1e-9
# Modes of rows that stand for all plan.releases calls of their plan (DP-SGD: one call per step).
CHARGE_MODES = ("dpsgd",)


@dataclass(frozen=True)
class Spend:
    """A composed (epsilon, delta) guarantee and the composition rule that gave it."""

    epsilon: float
    delta: float
    composition: str  # "none" (no releases) | "basic" | "pld"


def fits(spend: Spend, budget_epsilon: float, budget_delta: float) -> bool:
    return spend.epsilon <= budget_epsilon * (1 + REL_TOL) and spend.delta <= budget_delta * (
        1 + REL_TOL
    )


def _basic(plans: Sequence[PrivacyPlan]) -> Spend:
    eps = math.fsum(float(p.epsilon) for p in plans)
    delta = math.fsum(float(p.delta) for p in plans)
    return Spend(eps, delta, "basic")


def _pld(plans: Sequence[PrivacyPlan], delta: float) -> Spend | None:
    """PLD composition of the plans' DpEvents at ``delta``; None where it does not apply."""
    if not plans or not 0 < delta < 1:
        return None
    if len({p.neighbouring for p in plans}) != 1:
        return None
    try:
        events = [bounds.dp_events(p) for p in plans]
    except (NotImplementedError, DpaggError):
        return None
    if any(e is None for e in events):
        return None
    eps = bounds.composed_epsilon(events, delta, plans[0].neighbouring)
    if eps is None or not math.isfinite(eps):
        return None
    return Spend(float(eps), float(delta), "pld")


def calls_of_row(plan: PrivacyPlan, mode: str) -> int:
    """How many mechanism calls of ``plan`` one ledger row stands for.

    A ``release.release_vectors`` row is one ``dp_mean`` call; a DP-SGD row (``mode="dpsgd"``)
    runs all ``plan.releases`` steps of its plan, so it stands for that many calls. Counting it
    once would let ``charged_blocks`` fit a second identical DP-SGD run into the first one's block.
    """
    return max(1, int(plan.releases)) if mode in CHARGE_MODES else 1


def charged_blocks(calls: Sequence[PrivacyPlan]) -> list[PrivacyPlan]:
    """The plan blocks charged for a sequence of releases (one entry per ``dp_mean`` call).

    A plan with ``releases = k`` states its (epsilon, delta) for k calls in total; calls of one
    identical plan on one dataset are charged in blocks of k: ``ceil(c / k)`` blocks for c calls.
    Sound because c <= ceil(c/k) * k calls of the same mechanism are covered by that many k-fold
    compositions (k = 1, the default, charges every call).
    """
    counts: dict[PrivacyPlan, int] = {}
    for plan in calls:
        counts[plan] = counts.get(plan, 0) + 1
    blocks: list[PrivacyPlan] = []
    for plan, c in counts.items():
        blocks += [plan] * math.ceil(c / max(1, int(plan.releases)))
    return blocks


def composed_spend(calls: Sequence[PrivacyPlan], budget_delta: float) -> Spend:
    """The composed spend of the releases ``calls`` (module docstring: rule and soundness).

    Returns the basic bound, or the PLD bound at ``budget_delta`` when basic composition exceeds
    that delta or PLD gives a smaller epsilon.
    """
    plans = charged_blocks(calls)
    if not plans:
        return Spend(0.0, 0.0, "none")
    basic = _basic(plans)
    pld = _pld(plans, budget_delta)
    if pld is None:
        return basic
    basic_delta_ok = basic.delta <= budget_delta * (1 + REL_TOL)
    if not basic_delta_ok or pld.epsilon < basic.epsilon:
        return pld
    return basic


def as_replace_one(plan: PrivacyPlan) -> PrivacyPlan:
    """A recorded plan as it is charged: a legacy add/remove row (docs/privacy.md section 1)
    at the replace-one cost of the noise it actually drew.

    Its noise std was z * C / denominator, i.e. z/2 times the replace-one sensitivity 2C /
    denominator, so its replace-one epsilon is that of noise multiplier z/2 at its delta
    (never less than it stated). If the accountant cannot evaluate it, group privacy gives
    (2 eps, (1 + e^eps) delta) (Dwork & Roth 2014, Thm 2.2 with k = 2).
    """
    if plan.neighbouring == "replace_one":
        return plan
    try:
        ro = bounds.epsilon_for(
            plan.noise_multiplier / 2.0,
            plan.delta,
            plan.n,
            plan.sampling,
            m=plan.m,
            q=plan.q,
            releases=plan.releases,
        )
    except DpaggError:
        eps = 2.0 * plan.epsilon
        return replace(
            plan,
            neighbouring="replace_one",
            noise_multiplier=plan.noise_multiplier / 2.0,
            epsilon=eps,
            delta=min((1.0 + math.exp(plan.epsilon)) * plan.delta, 1.0 - 1e-12),
            accountant="group-privacy",
        )
    return replace(ro, epsilon=max(ro.epsilon, plan.epsilon))


@functools.lru_cache(maxsize=256)
def _reference_epsilon(
    z: float, delta: float, n: int, sampling: str, m: Any, q: Any, releases: int, rel: str
) -> float:
    return float(
        bounds.epsilon_for(
            z, delta, n, sampling, m=m, q=q, releases=releases, neighbouring=rel
        ).epsilon
    )


def check_plan_cost(plan: PrivacyPlan) -> None:
    """Refuse a plan whose stated epsilon understates what its noise costs.

    The ledger charges ``plan.epsilon``; a hand-built or stale plan with a smaller epsilon than
    the accountant's bound for its noise multiplier would be under-charged. Overstating is fine
    (conservative). Raises DpaggError before anything is drawn or written.
    """
    ref = _reference_epsilon(
        float(plan.noise_multiplier),
        float(plan.delta),
        int(plan.n),
        plan.sampling,
        plan.m,
        plan.q,
        int(plan.releases),
        plan.neighbouring,
    )
    if plan.epsilon < ref * (1 - REL_TOL):
        raise DpaggError(
            f"plan.epsilon={plan.epsilon:.6g} understates the privacy cost of its noise: the "
            f"accountant gives epsilon={ref:.6g} for noise_multiplier={plan.noise_multiplier:g}, "
            f"delta={plan.delta:g}. Fix: build the plan with calibration.calibrate or "
            f"bounds.epsilon_for (`dpagg account`) instead of by hand."
        )

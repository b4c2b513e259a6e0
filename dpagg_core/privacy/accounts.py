"""Per-picture accounting (docs/privacy.md invariant 9): the spend of each picture of an image set
and whether a new release fits every picture's budget. Reads the ledger inside the caller's
transaction; writes nothing.

Why per picture. The guarantee protects each picture: a release on a set S is a mechanism on the
pictures of S, and replacing one picture x changes only the releases whose set contains x (which
pictures a user puts in a set is the user's public choice, not a function of other pictures). So
the privacy loss of x is the composition of exactly the releases charged to x (Dwork & Roth 2014,
Thm 3.16; PLD composition where it applies, ``composition.composed_spend``), and a request is
admitted only if, for every picture in it, that composition plus the request fits the picture's
budget. Accounting per exact set instead gave "the set plus one picture" a fresh budget.

Budgets live with each picture, set at its first release: the requested budget if given, else the
smallest budget already recorded for another picture of the request (the set's budget), else the
release's own (epsilon, delta). A recorded budget is never raised implicitly. A set's budget and
spend, as shown to users, are those of its worst picture (the least budget left).

Pictures with the same releases and the same budget have the same spend, so composition runs once
per such group, not once per picture.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dpagg_core.privacy.composition import REL_TOL, Spend, calls_of_row, composed_spend, fits
from dpagg_core.privacy.ledger_store import LedgerStore
from dpagg_core.privacy.plan import PrivacyPlan

Budget = tuple[float, float]


@dataclass(frozen=True)
class Group:
    """Pictures of one set with the same recorded releases and the same budget."""

    units: tuple[str, ...]
    release_ids: tuple[int, ...]
    budget: Budget | None


@dataclass(frozen=True)
class SetAccount:
    """The pictures (units) of one set, grouped by history and budget."""

    dataset_id: str
    units: tuple[str, ...]
    groups: tuple[Group, ...]

    @property
    def release_ids(self) -> set[int]:
        return {r for g in self.groups for r in g.release_ids}

    @property
    def stored_budgets(self) -> list[Budget]:
        return [g.budget for g in self.groups if g.budget is not None]


def set_account(con: sqlite3.Connection, dataset_id: str) -> SetAccount:
    units = LedgerStore.units(con, dataset_id)
    budgets = LedgerStore.unit_budgets(con, units)
    history = LedgerStore.unit_releases(con, units)
    grouped: dict[tuple[tuple[int, ...], Budget | None], list[str]] = {}
    for unit in units:
        grouped.setdefault((history.get(unit, ()), budgets.get(unit)), []).append(unit)
    groups = tuple(Group(tuple(u), rids, budget) for (rids, budget), u in grouped.items())
    return SetAccount(dataset_id, tuple(units), groups)


class Spends:
    """Composed spends of groups, reading each release's plans once per transaction."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        self._plans: dict[int, list[PrivacyPlan]] = {}

    def plans(self, release_ids: Sequence[int]) -> list[PrivacyPlan]:
        missing = [r for r in release_ids if r not in self._plans]
        for rid in missing:
            self._plans[rid] = LedgerStore.plans_of(self.con, [rid])
        return [p for r in release_ids for p in self._plans[r]]

    def spend(self, group: Group, delta: float, extra: Sequence[PrivacyPlan] = ()) -> Spend:
        return composed_spend([*self.plans(group.release_ids), *extra], delta)


@dataclass(frozen=True)
class PictureState:
    """The worst picture's spend and budget (what a set shows), and how many pictures share it."""

    spend: Spend
    budget: Budget | None
    pictures: int
    shared: bool  # its spend includes releases of other sets (overlapping sets)


def worst(
    account: SetAccount,
    spends: Spends,
    budgets: Sequence[Budget | None] | None = None,
    extra: Sequence[PrivacyPlan] = (),
) -> PictureState:
    """The picture with the least budget left (``budgets``: an effective budget per group,
    default the recorded ones), with ``extra`` calls added to every picture. Without any budget,
    the picture that spent the most."""
    states = []
    for i, g in enumerate(account.groups):
        budget = g.budget if budgets is None else budgets[i]
        states.append((budget, spends.spend(g, budget[1] if budget else 0.0, extra), g))
    with_budget = [s for s in states if s[0] is not None]
    if with_budget:
        budget, spend, g = min(with_budget, key=lambda s: s[0][0] - s[1].epsilon)
    else:
        budget, spend, g = max(states, key=lambda s: s[1].epsilon)
    return PictureState(spend, budget, len(g.units), _shared(spends.con, g, account))


def _shared(con: sqlite3.Connection, group: Group, account: SetAccount) -> bool:
    if not group.release_ids:
        return False
    row = con.execute(
        "SELECT count(*) FROM releases WHERE id IN (SELECT value FROM json_each(?)) "
        "AND dataset_id != ?",
        (json.dumps(list(group.release_ids)), account.dataset_id),
    ).fetchone()
    return bool(row[0])


def plan_budget(plan: PrivacyPlan) -> Budget:
    """A release's own cost, the default budget of a picture's first release."""
    return float(plan.epsilon), float(plan.delta)


@dataclass(frozen=True)
class Admission:
    """A request that fits: the worst picture after it, the budgets set at first use, and the
    set's effective budget (the smallest of its pictures')."""

    after: PictureState
    new_budgets: dict[str, Budget]
    set_budget: Budget


class Refusal(Exception):
    """Raised by :func:`admit` with what the ledger needs to word its BudgetExceeded."""

    def __init__(self, kind: str, **info: object) -> None:
        super().__init__(kind)
        self.kind = kind
        self.info = info


def admit(
    account: SetAccount,
    spends: Spends,
    plan: PrivacyPlan,
    mode: str,
    budget_epsilon: float | None,
    budget_delta: float | None,
) -> Admission:
    """Whether a release of ``plan`` on ``account``'s pictures fits every picture's budget
    (module docstring). Raises :class:`Refusal` (``kind`` 'raise' for a requested budget above
    a recorded one, 'over' for a picture whose budget would be exceeded)."""
    stored = account.stored_budgets
    lowest = (min(b[0] for b in stored), min(b[1] for b in stored)) if stored else None
    for label, req, idx in (("epsilon", budget_epsilon, 0), ("delta", budget_delta, 1)):
        if req is not None and lowest is not None and req > lowest[idx] * (1 + REL_TOL):
            raise Refusal("raise", label=label, requested=req, recorded=lowest[idx])
    first = (
        float(budget_epsilon if budget_epsilon is not None else (lowest or plan_budget(plan))[0]),
        float(budget_delta if budget_delta is not None else (lowest or plan_budget(plan))[1]),
    )
    effective: list[Budget] = []
    new_budgets: dict[str, Budget] = {}
    extra = [plan] * calls_of_row(plan, mode)
    for g in account.groups:
        if g.budget is None:  # first use of these pictures
            budget = first
            new_budgets.update({u: first for u in g.units})
        else:
            budget = (
                g.budget[0] if budget_epsilon is None else min(g.budget[0], budget_epsilon),
                g.budget[1] if budget_delta is None else min(g.budget[1], budget_delta),
            )
        effective.append(budget)
        after = spends.spend(g, budget[1], extra)
        if not fits(after, *budget):
            raise Refusal(
                "over",
                spent=spends.spend(g, budget[1]),
                after=after,
                budget=budget,
                pictures=len(g.units),
                total=len(account.units),
                shared=_shared(spends.con, g, account),
            )
    state = worst(account, spends, effective, extra)
    set_budget = (min(b[0] for b in effective), min(b[1] for b in effective))
    return Admission(state, new_budgets, set_budget)


def largest_epsilon(
    account: SetAccount,
    spends: Spends,
    plan: PrivacyPlan,
    mode: str,
    budget_epsilon: float | None,
    budget_delta: float | None,
    recalibrate: Callable[[float], PrivacyPlan],
    *,
    deadline_s: float = 4.0,
    upper: float | None = None,
) -> float | None:
    """The largest epsilon a release like ``plan`` (``recalibrate(eps)``: same n, delta,
    sampling, m/q and releases, noise calibrated by the same accountant) may have so that
    :func:`admit` admits it for every picture; None when none does (a release with the least
    noise the calibrator allows is refused too, or the budget is used up). Geometric bisection
    on (1e-4, ``upper``: default plan.epsilon; ``upper`` itself when it fits); stops at 1 % or
    ``deadline_s`` with the largest epsilon found to fit (a lower bound: what is reported always
    fits)."""
    lo, hi = None, float(plan.epsilon if upper is None else upper)
    floor = 1e-4
    if hi <= floor:
        return None
    stop = time.monotonic() + deadline_s

    def fits_at(eps: float) -> bool:
        try:
            admit(account, spends, recalibrate(eps), mode, budget_epsilon, budget_delta)
        except Refusal:
            return False
        return True

    if not fits_at(floor):
        return None
    if upper is not None and fits_at(hi):
        return hi
    lo = floor
    while hi / lo > 1.01 and time.monotonic() < stop:
        mid = math.sqrt(lo * hi)
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo

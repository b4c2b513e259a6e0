"""Calibration: the least noise multiplier z whose epsilon meets a target (:func:`calibrate`).

The accountant (:mod:`dpagg_core.privacy.bounds`) gives epsilon(z) per mode; this module inverts
it. Where the bound is closed-form it is inverted exactly (one full release: the analytic Gaussian's
sigma; one WOR release: BBG18's amplification inverted, then the analytic Gaussian). The k-fold
Gaussian by PLD (``full`` with k > 1, and the unamplified side of ``wor`` with k > 1) is calibrated
with dp-accounting's own ``dp_accounting.calibrate_dp_mechanism`` (Brent on z with a fresh
``PLDAccountant`` per evaluation; it only returns a z whose epsilon meets the target), bracketed
from the exact analytic-Gaussian z, which PLD's pessimistic bound can only raise.

Why the rest is hand-written (:func:`_solve`: secant steps on log z, then scipy's Brent):
``calibrate_dp_mechanism`` does not fit the two expensive modes. For ``wor`` with k > 1 the bound
is min(RDP, unamplified PLD) and the RDP side is searched on a window of orders around the
optimal one (WBK19's bound costs O(alpha^2) per order), re-centred as z moves: not the epsilon of
one fresh accountant, which is all ``calibrate_dp_mechanism`` evaluates. For ``poisson`` every
evaluation is a k-fold PLD composition, and the library's search is both slower and less robust
here: it has no floor (``LowerEndpointAndGuess`` searches only upwards from a lower end that must
violate the target, which amplification makes hard to place: from z_gauss * sqrt(q) / 2 it found
no bracket for k = 100, q = 0.1), no clamp to [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER], no
coarse-grid bracketing and no early stop; on the bench's Poisson cases
(``bench/calibrate_timing.py``) it took 1.3-4x the time of this search, at equal tightness. Every
z returned here has been evaluated, and :func:`calibrate` re-checks it with the reporting
accountant, so the plan's epsilon never exceeds the target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import scipy.optimize
from dp_accounting import calibrate_dp_mechanism, gaussian_mechanism
from dp_accounting.mechanism_calibration import LowerEndpointAndGuess
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.bounds import (
    RDP_HIGH_ORDERS,
    RDP_ORDERS,
    analytic_gaussian_epsilon,
    bbg_wor_epsilon,
    epsilon_for,
    epsilon_of_setting,
    gaussian_event,
    pld_gaussian_epsilon,
    pld_interval,
    pld_poisson_epsilon,
    rdp_wor_bound,
    rdp_wor_orders,
)
from dpagg_core.privacy.plan import (
    DEFAULT_DELTA,
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    PrivacyPlan,
    Sampling,
    Setting,
    as_float,
    check_noise_multiplier,
    check_parameters,
    plan_from_setting,
)

_RDP_ALL_ORDERS = RDP_ORDERS + RDP_HIGH_ORDERS
_LOG_XTOL = 1e-3  # calibration: relative precision of z (0.1 %)
_COARSE_LOG_XTOL = 5e-3  # bracketing stage on the coarse PLD grid
_PLD_GAUSSIAN_RTOL = 1e-4  # calibrate_dp_mechanism's tolerance, relative to z


def _analytic_gaussian_sigma(epsilon: float, delta: float) -> float:
    """Least sigma with analytic-Gaussian epsilon <= ``epsilon`` (up to the root finder's slack,
    which callers remove with :func:`_nudge`)."""
    with np.errstate(divide="ignore", over="ignore"):
        return float(gaussian_mechanism.get_sigma_gaussian(epsilon, delta, tol=1e-12))


def _nudge(eps_fn: Callable[[float], float], target: float, z: float) -> float:
    """Raise z by tiny relative steps until eps_fn(z) <= target (root-finder slack)."""
    factor = 1e-9
    while eps_fn(z) > target:
        z *= 1.0 + factor
        factor *= 4.0
        if z > MAX_NOISE_MULTIPLIER:
            raise DpaggError(f"could not reach target_epsilon={target:g}; choose a larger epsilon.")
    return z


def _solve(
    eps_fn: Callable[[float], float],
    target: float,
    z0: float,
    xtol: float = _LOG_XTOL,
    slope: float = -1.0,
) -> tuple[float, float]:
    """(z, slope): a z with eps_fn(z) <= target and eps_fn(z) ~ target, for eps_fn decreasing.

    Works on g(log z) = log eps - log target, which is nearly linear: secant steps (starting
    from ``slope`` = dg / dlog z, overshooting a little, at most a factor e at first, bolder
    after each miss) until the root is bracketed, then scipy's Brent to ``xtol`` in log z.
    Returns the first evaluated z whose epsilon is within a factor exp(-xtol) below the target,
    else the least evaluated z that met the target: every returned z has been checked. z is
    clamped to [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]; returns MIN_NOISE_MULTIPLIER if even
    that meets the target. The slope estimate is returned to seed a finer search.
    """
    lo_bound, hi_bound = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
    log_t = math.log(target)
    accepted: list[float] = []  # every log z seen to meet the target

    def g(lz: float) -> float:
        e = eps_fn(math.exp(lz))
        # Clamped to +-50 so that epsilon 0 (exact (0, delta)-DP) and inf stay finite for Brent.
        out = math.log(e) - log_t if 0 < e < math.inf else (50.0 if e > 0 else -50.0)
        out = min(max(out, -50.0), 50.0)
        if out <= 0:
            accepted.append(lz)
            if out >= -xtol:  # epsilon within a factor e^-xtol of the target: done
                raise _Found
        return out

    try:
        return _solve_inner(g, z0, lo_bound, hi_bound, xtol, slope, accepted, target)
    except _Found:
        return math.exp(accepted[-1]), slope


def _too_much_noise(target: float) -> DpaggError:
    return DpaggError(
        f"target_epsilon={target:g} needs a noise multiplier above "
        f"{MAX_NOISE_MULTIPLIER:g}: the release would be pure noise. Choose a larger "
        "epsilon (e.g. 1-8), a larger delta (still << 1/n) or fewer releases."
    )


class _Found(Exception):
    """Raised by _solve's objective once a z is close enough (stops Brent early)."""


def _solve_inner(
    g: Callable[[float], float],
    z0: float,
    lo_bound: float,
    hi_bound: float,
    xtol: float,
    slope: float,
    accepted: list[float],
    target: float,
) -> tuple[float, float]:
    a = min(max(math.log(z0), lo_bound), hi_bound)
    ga = g(a)
    overshoot, max_step = 1.2, 1.0
    while True:
        if ga == 0:
            return math.exp(a), slope
        if math.isfinite(ga):
            step = -overshoot * ga / (slope if slope < 0 else -1.0)
            step += 0.005 if ga > 0 else -0.005
            step = math.copysign(min(abs(step), max_step), step)
        else:
            step = max_step if ga > 0 else -max_step
        b = min(max(a + step, lo_bound), hi_bound)
        if b == a:  # stuck at a bound
            if ga < 0:
                return MIN_NOISE_MULTIPLIER, slope  # even the least noise meets the target
            raise _too_much_noise(target)
        gb = g(b)
        if math.isfinite(ga) and math.isfinite(gb) and (gb - ga) / (b - a) < 0:
            slope = (gb - ga) / (b - a)
        if (ga > 0) != (gb > 0):
            break
        a, ga, overshoot, max_step = b, gb, overshoot * 1.5, max_step * 2.0
    lo, hi = (a, b) if ga > 0 else (b, a)
    scipy.optimize.brentq(g, lo, hi, xtol=xtol, rtol=1e-12)
    # Brent stops within xtol of the sign change; the smallest log z it saw meet the target is
    # the answer (hi, at worst), so no z is returned without having been checked.
    return math.exp(min(lz for lz in accepted if lo <= lz <= hi)), slope


def _calibrate_pld_gaussian(target: float, k: int, delta: float, z_gauss: float) -> float:
    """z for k Gaussians by PLD (as :func:`~dpagg_core.privacy.bounds.epsilon_for` reports
    them), with dp-accounting's ``calibrate_dp_mechanism``.

    ``z_gauss`` is the exact answer (analytic Gaussian at z / sqrt(k)); PLD's pessimistic
    discretisation can only raise epsilon, so z_gauss (or MIN_NOISE_MULTIPLIER) is a lower end of
    the bracket and the library searches upwards from just above it. Its result has
    epsilon <= target and lies within ``_PLD_GAUSSIAN_RTOL`` (relative) of the least such z.
    """
    lo = max(z_gauss, MIN_NOISE_MULTIPLIER)
    if pld_gaussian_epsilon(lo, k, delta) <= target:
        return lo  # the exact z already meets the target on the PLD grid (or the floor does)
    if pld_gaussian_epsilon(MAX_NOISE_MULTIPLIER, k, delta) > target:
        raise _too_much_noise(target)
    interval = pld_interval(1)  # as pld_gaussian_epsilon: k Gaussians fold into one
    z = calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(
            NeighboringRelation.REPLACE_ONE, value_discretization_interval=interval
        ),
        lambda zz: gaussian_event(zz, k),
        target,
        delta,
        bracket_interval=LowerEndpointAndGuess(lo, lo * 1.01),
        tol=_PLD_GAUSSIAN_RTOL * lo,
    )
    return float(z)


def _rdp_window(order: float) -> tuple[float, ...]:
    """The orders of the full RDP set within a factor 1.6 of ``order`` (at least three)."""
    window = tuple(o for o in _RDP_ALL_ORDERS if order / 1.6 <= o <= order * 1.6)
    if len(window) >= 3:
        return window
    nearest = sorted(_RDP_ALL_ORDERS, key=lambda o: abs(math.log(o / order)))[:3]
    return tuple(sorted(nearest))


def _calibrate_rdp_wor(target: float, s: Setting, z_other: float) -> float:
    """z from the WBK19 RDP bound, or ``z_other`` when RDP cannot beat it.

    eps = min(rdp(z), other(z)) with both decreasing, so the calibrated z is min(z_rdp, z_other).
    Searching over the full order set is slow, so the search runs on a window of orders (a
    subset: its epsilon is >= the full set's, so a z it accepts is accepted by the full set too),
    first around the order the (eps, delta) conversion favours at the target, then re-centred on
    the full set's optimal order until that order lies in the window.
    """
    assert s.m is not None
    n, m, k, d = s.n, s.m, s.releases, s.delta
    eps_base, _ = rdp_wor_orders(z_other, n, m, k, d, RDP_ORDERS)
    if eps_base >= target and rdp_wor_bound(z_other, n, m, k, d)[0] >= target:
        return z_other  # RDP needs at least as much noise
    # Amplification by sampling at rate p = m/n scales the noise needed by roughly p: start near
    # 2p z_other. The (eps, delta) conversion costs about log(1/delta) / (alpha - 1), so the
    # optimal order at epsilon = target is near 1 + c log(1/delta) / target, c in [1, 2].
    z = max(min(z_other, 2.0 * (m / n) * z_other), MIN_NOISE_MULTIPLIER)
    window = _rdp_window(1.0 + 1.4 * math.log(1.0 / d) / target)
    slope = -1.0
    for _ in range(8):
        z, slope = _solve(
            lambda zz, w=window: rdp_wor_orders(zz, n, m, k, d, w)[0], target, z, slope=slope
        )
        _, order = rdp_wor_bound(z, n, m, k, d)
        if order in window:
            break
        window = _rdp_window(order)
    # eps_full(z) <= eps_window(z) <= target unless high orders were skipped; verify.
    return _nudge(lambda zz: rdp_wor_bound(zz, n, m, k, d)[0], target, min(z, z_other))


def _calibrate_z(target: float, s: Setting) -> float:
    """A noise multiplier meeting ``target`` for setting s (calibrate() re-checks it)."""
    k, d = s.releases, s.delta
    # Unamplified Gaussian: sigma = sqrt(k) * analytic-Gaussian sigma at target (exact, cheap).
    z_gauss = _analytic_gaussian_sigma(target, d) * math.sqrt(k)
    if s.sampling == "full":
        if k == 1:
            return _nudge(lambda z: analytic_gaussian_epsilon(z, d), target, z_gauss)
        return _calibrate_pld_gaussian(target, k, d, z_gauss)
    if s.sampling == "poisson":
        assert s.q is not None
        q = s.q
        # Amplification by sampling: start from z_gauss * sqrt(q), bracket on the coarse grid,
        # then refine on the reported grid from there.
        z0, slope = z_gauss * math.sqrt(q), -1.0
        if pld_interval(k, coarse=True) > pld_interval(k):
            z0, slope = _solve(
                lambda z: pld_poisson_epsilon(z, q, k, d, True),
                target,
                z0,
                xtol=_COARSE_LOG_XTOL,
            )
        return _solve(lambda z: pld_poisson_epsilon(z, q, k, d), target, z0, slope=slope)[0]
    assert s.m is not None
    n, m = s.n, s.m
    if k == 1:
        # Invert BBG18 exactly: eps0 = log(1 + (e^target - 1) / p) at delta0 = delta / p.
        p = m / n
        try:
            eps0 = math.log1p(math.expm1(target) / p)
        except OverflowError:  # huge targets: log(1 + (e^t - 1)/p) -> t - log p
            eps0 = target - math.log(p)
        z_bbg = _analytic_gaussian_sigma(eps0, min(d / p, 1.0))
        z_bbg = max(z_bbg, MIN_NOISE_MULTIPLIER)
        return _nudge(lambda z: bbg_wor_epsilon(z, n, m, d), target, z_bbg)
    z_other = _calibrate_pld_gaussian(target, k, d, z_gauss)
    return _calibrate_rdp_wor(target, s, z_other)


def calibrate(
    target_epsilon: float,
    delta: float = DEFAULT_DELTA,
    n: int | None = None,
    sampling: Sampling | str = "full",
    m: int | None = None,
    q: float | None = None,
    releases: int = 1,
    neighbouring: str = "replace_one",
) -> PrivacyPlan:
    """The plan with (about) the least noise whose epsilon at ``delta`` is <= ``target_epsilon``.

    ``delta`` defaults to :data:`DEFAULT_DELTA` (1e-5); ``n`` (the number of private images) is
    required. Searches z (Brent on log z; exact inversion where the bound is closed-form), then
    re-evaluates
    with :func:`epsilon_for`'s accountant and raises z until the reported epsilon is <= target.
    If even the minimum noise multiplier (``MIN_NOISE_MULTIPLIER``) meets the target, that is
    returned (with its smaller epsilon). Raises DpaggError on bad input.
    """
    s = check_parameters(delta, n, sampling, m, q, releases, neighbouring)
    t = as_float(target_epsilon, "target_epsilon", "pick a privacy budget such as 1 or 8.")
    if not (t > 0 and math.isfinite(t)):
        raise DpaggError(
            f"target_epsilon={t!r} must be a positive finite number (e.g. 1 to 8); epsilon 0 "
            "would need infinite noise."
        )
    z = min(max(_calibrate_z(t, s), MIN_NOISE_MULTIPLIER), MAX_NOISE_MULTIPLIER)
    # Re-evaluate with the reporting accountant (cached, so usually free); nudge if needed.
    z = _nudge(lambda zz: epsilon_of_setting(zz, s)[0], t, z)
    eps, acc = epsilon_of_setting(z, s)
    assert eps <= t
    return plan_from_setting(z, eps, acc, s)


def at_epsilon(plan: PrivacyPlan, epsilon: float, n: int | None = None) -> PrivacyPlan:
    """``plan``'s rules (delta, sampling with its m or q, releases, neighbouring relation) at
    another target ``epsilon`` (and ``n``): the plan a refusal's "largest epsilon that fits" and a
    rehearsal's half and double epsilon are computed with (:func:`calibrate`)."""
    return calibrate(
        epsilon,
        plan.delta,
        plan.n if n is None else n,
        plan.sampling,
        m=plan.m,
        q=plan.q,
        releases=plan.releases,
        neighbouring=plan.neighbouring,
    )


def plan_from_inputs(
    *,
    n: int,
    delta: float,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sampling: str = "full",
    m: int | None = None,
    q: float | None = None,
    releases: int = 1,
) -> PrivacyPlan:
    """THE plan of a front end's inputs (CLI flags, the WebUI's fields, the Privacy Accountant
    node): a target ``epsilon`` calibrated to the least noise (:func:`calibrate`), or a
    ``noise_multiplier`` whose epsilon the accountant states (``bounds.epsilon_for``) — exactly
    one of the two. ``m`` is read only for ``sampling='wor'`` and ``q`` only for ``'poisson'``
    (a widget may hold a stale value for the other mode), and each mode's own parameter is
    required. One function, so every front end turns the same inputs into the same plan."""
    _check_choice(epsilon, noise_multiplier, sampling, m, q)
    common = {
        "delta": delta,
        "n": n,
        "sampling": sampling,
        "m": (m or None) if sampling == "wor" else None,
        "q": (q or None) if sampling == "poisson" else None,
        "releases": releases,
    }
    if noise_multiplier is not None:
        return epsilon_for(noise_multiplier, **common)
    return calibrate(epsilon, **common)


def _check_choice(epsilon: object, noise_multiplier: object, sampling: object, m: object,
                  q: object) -> None:  # fmt: skip
    if (epsilon is None) == (noise_multiplier is None):
        raise DpaggError(
            "give exactly one of epsilon (the noise is calibrated to it) and noise_multiplier "
            "(its epsilon is computed)"
        )
    if sampling == "wor" and not m:
        raise DpaggError("sampling 'wor' needs m, the number of images sampled (e.g. n/2)")
    if sampling == "poisson" and not q:
        raise DpaggError("sampling 'poisson' needs q, the sampling rate in (0, 1]")


def check_inputs(
    *,
    n: int,
    delta: float,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    sampling: str = "full",
    m: int | None = None,
    q: float | None = None,
    releases: int = 1,
    n_known: bool = True,
) -> None:
    """The cheap checks of :func:`plan_from_inputs`' inputs (no accounting), for a front end's
    checks before anything runs: DpaggError naming the parameter and the fix. The rules that
    involve n are skipped when ``n_known`` is False (n comes later, e.g. from a linked set)."""
    _check_choice(epsilon, noise_multiplier, sampling, m, q)
    if epsilon is not None:
        t = as_float(epsilon, "epsilon", "pick a privacy budget such as 1 or 8.")
        if not (t > 0 and math.isfinite(t)):
            raise DpaggError(
                f"epsilon={t!r}: the target epsilon must be a positive finite number (e.g. 1 to "
                "8); epsilon 0 would need infinite noise."
            )
    else:
        check_noise_multiplier(noise_multiplier)
    check_parameters(
        delta,
        n,
        sampling,
        (m or None) if sampling == "wor" else None,
        (q or None) if sampling == "poisson" else None,
        releases,
        "replace_one",
        n_known=n_known,
    )

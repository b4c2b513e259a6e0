"""Privacy accounting for DPAgg releases, on Google's dp-accounting library (PyPI
``dp-accounting``; inside ComfyUI and the WebUI ``install.py`` installs it with ``--no-deps``
because it pins attrs<24, see docs/comfyui.md and docs/webui.md).

A release is the clipped mean of a public-size sample of per-image embeddings plus Gaussian noise
of standard deviation ``z * Delta``, where ``Delta`` is the L2 sensitivity of that mean under the
plan's neighbouring relation and ``z`` is the plan's ``noise_multiplier``. This module gives
the ``(epsilon, delta)`` of a ``z`` (:func:`epsilon_for`; the reverse search, the least ``z`` for a
target epsilon, is :mod:`dpagg_core.privacy.calibration`; the plan type and its validation are
:mod:`dpagg_core.privacy.plan`, its wording :mod:`dpagg_core.privacy.plan_text`;
:mod:`dpagg_core.privacy.accountant` re-exports all three for older imports) and the DpEvents the
ledger composes (:func:`dp_events`, :func:`composed_epsilon`). Every bound comes from
dp-accounting (no hand-written RDP or PLD), and every number it reports is a valid upper bound on
the true epsilon (pessimistic PLD discretisation, a finite RDP order set, a safety margin on
root-finder tolerances).

Modes (``sampling``; ``k = releases``; replace-one adjacency with ``n`` public unless stated):

========  ===========================  =============================================================
sampling  sensitivity of the mean      accountant
========  ===========================  =============================================================
full      2C/n                         k = 1: analytic Gaussian (Balle & Wang 2018, Thm 8), exact.
                                       k > 1: PLD of the k-fold Gaussian (dp-accounting).
wor       2C/m (m of n, no             k = 1: analytic Gaussian at delta0 = delta*n/m, amplified by
          replacement)                 subsampling without replacement (Balle, Barthe, Gaboardi
                                       2018, Thm 10). Cross-checked in tests: never above RDP
                                       (Wang, Balle, Kasiviswanathan 2019, Thm 27).
                                       k > 1: min of RDP with ``SampledWithoutReplacementDpEvent``
                                       and the unamplified k-fold Gaussian (PLD).
poisson   2C/(qn) (public denominator  PLD of ``PoissonSampledDpEvent`` (dp-accounting; Koskela et
          q*n, never the sample size)  al. 2020, Zhu, Dong & Wang 2022), k-fold self-composition.
========  ===========================  =============================================================

Neighbouring relation: replace-one only. Every mode divides by a denominator computed from ``n``
and sets the noise std from it, which is sound only if ``n`` is public, i.e. under replace-one
adjacency (one item swapped, ``n`` unchanged). Under add/remove adjacency ``n`` itself is private:
the neighbour with one item removed would get a different denominator and a different noise std
(for n = 10 vs 9 the variance differs by a factor 1.23: from the squared norm of 4000 768-d
releases per dataset an audit bounds epsilon at delta 1e-5 below by ~5 where 1 was claimed;
``tests/test_neighbouring.py``), so no (epsilon, delta) guarantee holds. dpagg
therefore refuses ``neighbouring='add_remove'`` for every new plan (:data:`NEIGHBOURINGS`);
plans stored by older versions that say so (:data:`LEGACY_NEIGHBOURINGS`) can still be read,
e.g. by the ledger to count what they charged, but the mechanism refuses to run them.

The ``noise_multiplier`` trap. dp-accounting uses two conventions under ``REPLACE_ONE``:

* RDP (``RdpAccountant``): ``GaussianDpEvent(s)`` has RDP ``alpha / (2 s^2)``, i.e. ``s`` is the
  noise std over the *replace-one* sensitivity (the distance between the two neighbouring outputs).
  WBK19 Thm 27 takes the base mechanism's RDP under replace-one on the m-subset, so ``s = z``.
* PLD (``PLDAccountant`` / ``from_gaussian_mechanism``): the REPLACE adjacency compares
  ``N(+s, sigma)`` with ``N(-s, sigma)`` ("sensitivity" is the per-item bound, outputs differ by
  ``2 s``), so the noise multiplier is the std over the *per-item* bound ``C / denominator``:
  ``2 z`` for replace-one.

Tests pin every mode at q = 1 (m = n) against the analytic Gaussian with sigma = z.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import numpy as np
from dp_accounting import dp_event, gaussian_mechanism
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.plan import (
    ACC_ANALYTIC,
    ACC_BBG,
    ACC_PLD,
    ACC_PLD_POISSON,
    ACC_PLD_UNAMPLIFIED,
    ACC_RDP_WOR,
    DEFAULT_DELTA,
    NEIGHBOURINGS,
    PrivacyPlan,
    Sampling,
    Setting,
    as_float,
    check_neighbouring,
    check_noise_multiplier,
    check_parameters,
    plan_from_setting,
)

# RDP orders for the WOR accountant. Any finite order set gives a valid bound (epsilon is a min
# over orders); these are chosen for speed. WBK19's exact bound costs O(alpha^2) per order, so the
# base set stops at 64; only when its optimum is the top order (small epsilon) are the expensive
# high orders climbed, one at a time while epsilon keeps falling. (Above 256 dp-accounting switches
# to a cheaper bound that measured far looser, so no such orders.) Fractional orders interpolate
# the CGF (WBK19 Cor. 10).
RDP_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0,
    14.0, 16.0, 18.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0,
)  # fmt: skip
RDP_HIGH_ORDERS: tuple[float, ...] = (80.0, 96.0, 128.0, 160.0, 192.0, 256.0)

# PLD value-discretisation interval. Pessimistic discretisation keeps the bound valid for any
# interval; its slack after k-fold composition is roughly k * interval^2 (measured), so the
# interval shrinks as sqrt(PLD_SLACK / k) between these limits. Calibration (``calibration``)
# first brackets z on a coarser grid (PLD_COARSE_SLACK, up to PLD_COARSE_MAX), then refines on the
# reported one.
PLD_MAX_INTERVAL = 1e-2
PLD_MIN_INTERVAL = 1e-3
PLD_SLACK = 2e-3
PLD_COARSE_MAX = 5e-2
PLD_COARSE_SLACK = 5e-2

# brentq tolerances are absolute in the root; this margin covers them (xtol=1e-12 plus 4 ulp).
_ROOT_MARGIN = 1e-10


# --------------------------------------------------------------------------------------------
# Per-mode epsilon (cached: calibration re-evaluates its final z). Call these positionally, so
# that calibration and epsilon_for share cache entries.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism, noise std / L2 sensitivity = ``sigma``.

    Balle & Wang 2018 (Thm 8, analytic Gaussian) via ``dp_accounting.gaussian_mechanism``; the
    root finder's tolerance is covered by a small upward margin so the value is never too low.
    """
    with np.errstate(divide="ignore", over="ignore"):  # log1p(-1) at eps = 0 inside the library
        eps = float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta, tol=1e-12))
    return eps + _ROOT_MARGIN * (1.0 + eps) if eps > 0 else eps


def pld_interval(count: int, coarse: bool = False) -> float:
    """PLD discretisation interval for a ``count``-fold composition (module constants)."""
    fine = min(PLD_MAX_INTERVAL, max(PLD_MIN_INTERVAL, math.sqrt(PLD_SLACK / max(1, count))))
    if not coarse:
        return fine
    return min(PLD_COARSE_MAX, max(fine, math.sqrt(PLD_COARSE_SLACK / max(1, count))))


def _pld_gaussian_multiplier(z: float) -> float:
    """dp-accounting PLD noise multiplier for our z (the trap; see module docstring).

    PLD's REPLACE_ONE compares N(+s) with N(-s) for per-item bound s = C/denominator, so its noise
    multiplier is std / (C/denominator) = 2z.
    """
    return 2.0 * z


def gaussian_event(z: float, k: int) -> dp_event.DpEvent:
    event: dp_event.DpEvent = dp_event.GaussianDpEvent(_pld_gaussian_multiplier(z))
    return dp_event.SelfComposedDpEvent(event, k) if k > 1 else event


def poisson_event(z: float, q: float, k: int) -> dp_event.DpEvent:
    inner = dp_event.GaussianDpEvent(_pld_gaussian_multiplier(z))
    event: dp_event.DpEvent = dp_event.PoissonSampledDpEvent(q, inner)
    return dp_event.SelfComposedDpEvent(event, k) if k > 1 else event


def _pld_epsilon_of(event: dp_event.DpEvent, delta: float, interval: float) -> float:
    acc = pld_privacy_accountant.PLDAccountant(
        NeighboringRelation.REPLACE_ONE, value_discretization_interval=interval
    )
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=4096)
def pld_gaussian_epsilon(z: float, k: int, delta: float) -> float:
    """k-fold Gaussian (replace-one, std z x sensitivity) by PLD.

    dp-accounting folds ``count`` into one Gaussian of std 2z/sqrt(k) (a composition of Gaussians
    is exactly a Gaussian), so the discretisation is that of a single mechanism.
    """
    event = gaussian_event(z, k)
    return _pld_epsilon_of(event, delta, pld_interval(1))


@functools.lru_cache(maxsize=4096)
def pld_poisson_epsilon(z: float, q: float, k: int, delta: float, coarse: bool = False) -> float:
    """k-fold Poisson-subsampled Gaussian (replace-one) by PLD (``PoissonSampledDpEvent``).

    ``coarse`` selects calibration's bracketing grid; reported values use the fine one.
    """
    event = poisson_event(z, q, k)
    return _pld_epsilon_of(event, delta, pld_interval(k, coarse))


@functools.lru_cache(maxsize=4096)
def rdp_wor_orders(
    z: float, n: int, m: int, k: int, delta: float, orders: tuple[float, ...]
) -> tuple[float, float]:
    """(epsilon, optimal order) of k-fold Gaussian on an m-of-n WOR sample, RDP at ``orders``.

    Wang, Balle, Kasiviswanathan 2019, Thm 27 (``SampledWithoutReplacementDpEvent``, REPLACE_ONE),
    RDP composition, and dp-accounting's RDP -> (eps, delta) conversion. The Gaussian's RDP
    ``alpha / (2 s^2)`` is under replace-one on the subsample, so s = z (sensitivity 2C/m).
    """
    acc = rdp_privacy_accountant.RdpAccountant(
        orders=list(orders), neighboring_relation=NeighboringRelation.REPLACE_ONE
    )
    event: dp_event.DpEvent = dp_event.SampledWithoutReplacementDpEvent(
        source_dataset_size=n, sample_size=m, event=dp_event.GaussianDpEvent(z)
    )
    if k > 1:
        event = dp_event.SelfComposedDpEvent(event, k)
    acc.compose(event)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def rdp_wor_bound(z: float, n: int, m: int, k: int, delta: float) -> tuple[float, float]:
    """(epsilon, order): the RDP-WOR bound over RDP_ORDERS, plus RDP_HIGH_ORDERS climbed one by
    one while epsilon keeps falling when the base optimum is the top order. Deterministic; any
    set of orders gives a valid bound, this one avoids the expensive orders when unneeded."""
    eps, order = rdp_wor_orders(z, n, m, k, delta, RDP_ORDERS)
    if order == RDP_ORDERS[-1]:
        for high in RDP_HIGH_ORDERS:
            eps_hi, _ = rdp_wor_orders(z, n, m, k, delta, (high,))
            if eps_hi >= eps:
                break
            eps, order = eps_hi, high
    return eps, order


def bbg_wor_epsilon(z: float, n: int, m: int, delta: float) -> float:
    """One WOR release: analytic Gaussian amplified by subsampling without replacement.

    Balle, Barthe, Gaboardi 2018 (Thm 10, substitution relation): if M is (eps0, delta0)-DP under
    replace-one on m-sets, then M on a uniform m-of-n sample is (log(1 + p(e^eps0 - 1)), p delta0)
    -DP under replace-one on n-sets, p = m/n. The amplified epsilon only decreases as delta0 grows,
    so the optimal split puts the whole budget in delta0 = delta * n/m (< 1 as delta < 1/n).
    M is the Gaussian with std z * 2C/m on the sample mean: eps0 = analytic Gaussian at sigma = z.
    """
    p = m / n
    eps0 = analytic_gaussian_epsilon(z, min(delta / p, 1.0))
    return math.log1p(p * math.expm1(eps0))


def epsilon_of_setting(z: float, s: Setting) -> tuple[float, str]:
    """(epsilon, accountant name) for a validated setting and noise multiplier z."""
    k = s.releases
    if s.sampling == "full":
        if k == 1:
            return analytic_gaussian_epsilon(z, s.delta), ACC_ANALYTIC
        return pld_gaussian_epsilon(z, k, s.delta), ACC_PLD
    if s.sampling == "poisson":
        assert s.q is not None
        return pld_poisson_epsilon(z, s.q, k, s.delta), ACC_PLD_POISSON
    assert s.m is not None
    if k == 1:
        return bbg_wor_epsilon(z, s.n, s.m, s.delta), ACC_BBG
    rdp, _ = rdp_wor_bound(z, s.n, s.m, k, s.delta)
    # The unamplified k-fold Gaussian is exactly the analytic Gaussian at z/sqrt(k), which lower-
    # bounds its (pessimistic) PLD value: only when that does not beat RDP is the PLD worth it.
    if rdp <= analytic_gaussian_epsilon(z / math.sqrt(k), s.delta):
        return rdp, ACC_RDP_WOR
    unamplified = pld_gaussian_epsilon(z, k, s.delta)
    return (rdp, ACC_RDP_WOR) if rdp < unamplified else (unamplified, ACC_PLD_UNAMPLIFIED)


def epsilon_for(
    noise_multiplier: float,
    delta: float = DEFAULT_DELTA,
    n: int | None = None,
    sampling: Sampling | str = "full",
    m: int | None = None,
    q: float | None = None,
    releases: int = 1,
    neighbouring: str = "replace_one",
) -> PrivacyPlan:
    """The plan (with its epsilon at ``delta``) for noise multiplier z = noise std / sensitivity.

    Theorems per mode (module docstring has the table):
      * full, 1 release: analytic Gaussian (Balle & Wang 2018) at sigma = z.
      * full, k releases: PLD of k Gaussians (exactly one Gaussian of std z/sqrt(k)).
      * wor, 1 release: BBG18 Thm 10 amplification of the analytic Gaussian (delta0 =
        delta*n/m); tests cross-check it against (and find it below) WBK19 Thm 27 RDP.
      * wor, k releases: min of WBK19 RDP (k-fold) and the unamplified k-fold Gaussian (PLD).
      * poisson: PLD of the Poisson-subsampled Gaussian, k-fold.
    Raises DpaggError on bad input (the message names the parameter and the fix).
    """
    s = check_parameters(delta, n, sampling, m, q, releases, neighbouring)
    z = check_noise_multiplier(noise_multiplier)
    eps, acc = epsilon_of_setting(z, s)
    return plan_from_setting(z, eps, acc, s)


def profile_epsilon(
    plan: PrivacyPlan, delta: float, noise_multiplier: float | None = None
) -> float:
    """Epsilon at another ``delta`` of the plan's mechanism: one point of its privacy profile.

    A mechanism with Gaussian noise is (eps(delta), delta)-DP for EVERY delta in (0, 1) at once:
    its privacy profile (Balle & Wang 2018, Thm 8 for one Gaussian; Balle, Barthe & Gaboardi
    2018, Thm 10 under subsampling without replacement; the PLD and RDP accountants give
    eps(delta) for any delta). This evaluates exactly the accountant :func:`epsilon_for` uses for
    the plan, at ``delta`` (and at ``noise_multiplier`` if given, else the plan's), without the
    delta < 1/n rule: that rule limits the claim a user relies on, it is not needed for the
    bound to hold. The audit (``dpagg_core.privacy.audit``) tests the profile at a delta where its
    statistics have power. Raises DpaggError on a bad plan, delta or noise multiplier.
    """
    s = plan.setting()  # the verdict of the plan's validation on construction
    d = as_float(delta, "delta", "delta must lie strictly between 0 and 1.")
    if not 0.0 < d < 1.0:
        raise DpaggError(f"delta={d!r} must lie strictly between 0 and 1.")
    z_in = plan.noise_multiplier if noise_multiplier is None else noise_multiplier
    z = check_noise_multiplier(z_in)
    return epsilon_of_setting(z, dataclasses.replace(s, delta=d))[0]


def clear_caches() -> None:
    """Forget memoised accountant evaluations (for cold timings; results never change)."""
    for fn in (analytic_gaussian_epsilon, pld_gaussian_epsilon, pld_poisson_epsilon):
        fn.cache_clear()
    rdp_wor_orders.cache_clear()


def rdp_wor_epsilon(
    noise_multiplier: float, delta: float, n: int, m: int, releases: int = 1
) -> float:
    """The RDP bound for ``releases`` WOR releases (WBK19 Thm 27; the cross-check for one release).

    This is the RDP-WOR value :func:`epsilon_for` uses for k > 1; for one release it is reported
    next to the BBG18 bound (which tests find never above it).
    """
    s = check_parameters(delta, n, "wor", m, None, releases, "replace_one")
    z = check_noise_multiplier(noise_multiplier)
    assert s.m is not None
    return rdp_wor_bound(z, s.n, s.m, s.releases, s.delta)[0]


# --------------------------------------------------------------------------------------------
# DpEvents (for the ledger's PLD composition)
# --------------------------------------------------------------------------------------------


def pld_relation(plan: PrivacyPlan) -> NeighboringRelation:
    """The dp-accounting neighbouring relation that :func:`dp_events` are expressed under
    (REPLACE_ONE; a legacy 'add_remove' plan raises DpaggError)."""
    check_neighbouring(plan.neighbouring, "plan.neighbouring")
    return NeighboringRelation.REPLACE_ONE


def dp_events(plan: PrivacyPlan) -> dp_event.DpEvent | None:
    """A DpEvent for the plan's ``releases`` releases, for ``PLDAccountant(pld_relation(plan))``.

    Noise multipliers follow the PLD convention (2z under replace-one; module docstring), so feed
    these events to a PLD accountant only. ``full`` -> k-fold GaussianDpEvent; ``poisson`` ->
    k-fold PoissonSampledDpEvent. ``wor`` -> None: dp-accounting's PLD has no sampling-without-
    replacement event (its RDP event uses the other convention), so callers fall back to basic
    composition of the plan's (epsilon, delta). A legacy 'add_remove' plan (an old ledger row)
    raises DpaggError: the ledger then composes it by basic composition of its stated spend.
    """
    check_neighbouring(plan.neighbouring, "plan.neighbouring")
    if plan.sampling == "full":
        return gaussian_event(plan.noise_multiplier, plan.releases)
    if plan.sampling == "poisson":
        assert plan.q is not None
        return poisson_event(plan.noise_multiplier, plan.q, plan.releases)
    return None


def _event_count(event: dp_event.DpEvent) -> int:
    """Number of subsampled compositions (drives the PLD discretisation interval)."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return event.count * _event_count(event.event)
    if isinstance(event, dp_event.ComposedDpEvent):
        return sum(_event_count(e) for e in event.events)
    if isinstance(event, dp_event.PoissonSampledDpEvent):
        return 1
    return 0  # Gaussians fold into one Gaussian in dp-accounting's PLD


def composed_epsilon(
    events: Sequence[dp_event.DpEvent | None], delta: float, neighbouring: str = "replace_one"
) -> float | None:
    """Epsilon at ``delta`` of the adaptive composition of ``events`` (from :func:`dp_events`).

    PLD composition (dp-accounting ``PLDAccountant``, pessimistic discretisation) under
    replace-one. Returns None when an event is None or unsupported, or when ``neighbouring`` is
    not 'replace_one' (a legacy 'add_remove' ledger: the caller falls back to basic composition).
    """
    if neighbouring not in NEIGHBOURINGS or not 0 < delta < 1:
        return None
    if not events or any(e is None for e in events):
        return None
    composed = dp_event.ComposedDpEvent(list(events))
    acc = pld_privacy_accountant.PLDAccountant(
        NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=pld_interval(_event_count(composed)),
    )
    if not acc.supports(composed):
        return None
    acc.compose(composed)
    return float(acc.get_epsilon(delta))

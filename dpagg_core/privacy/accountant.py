"""Privacy accounting for DPAgg releases, on Google's dp-accounting library (PyPI
``dp-accounting``; inside ComfyUI and the WebUI ``install.py`` installs it with ``--no-deps``
because it pins attrs<24, see README).

A release is the clipped mean of a public-size sample of per-image embeddings plus Gaussian noise
of standard deviation ``z * Delta``, where ``Delta`` is the L2 sensitivity of that mean under the
plan's neighbouring relation and ``z`` is the plan's ``noise_multiplier``. This module gives
the ``(epsilon, delta)`` of a ``z`` (:func:`epsilon_for`; the reverse search, the least ``z`` for a
target epsilon, is :mod:`dpagg_core.privacy.calibration`) and validates plans
(:meth:`PrivacyPlan.check`); every bound comes from dp-accounting (no hand-written RDP or PLD), and
every number it reports is a valid upper bound on the true epsilon (pessimistic PLD discretisation,
a finite RDP order set, a safety margin on root-finder tolerances).

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
import operator
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from dp_accounting import dp_event, gaussian_mechanism
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from dpagg_core.errors import DpaggError

Sampling = Literal["full", "wor", "poisson"]
SAMPLINGS: tuple[str, ...] = ("full", "wor", "poisson")
# The only neighbouring relation dpagg honours (module docstring: n is public under replace-one).
NEIGHBOURINGS: tuple[str, ...] = ("replace_one",)
# Relations older versions could record in a plan: readable (the ledger counts their spend), never
# accepted for a new plan or release.
LEGACY_NEIGHBOURINGS: tuple[str, ...] = ("add_remove",)
# The default delta everywhere (library, CLI, nodes, demo): far below 1/n for any realistic n and
# in the range the DP literature calls cryptographically small. See :func:`delta_warning`.
DEFAULT_DELTA = 1e-5

# Accountant names recorded in plans (and in released files' privacy records).
ACC_ANALYTIC = "analytic_gaussian"
ACC_BBG = "analytic_gaussian+wor_amplification(BBG18)"
ACC_RDP_WOR = "rdp_wor"
ACC_PLD = "pld"
ACC_PLD_UNAMPLIFIED = "pld(unamplified)"
ACC_PLD_POISSON = "pld_poisson"

# Below this noise multiplier epsilon is in the hundreds (z = 0.1 gives ~92 for one full release at
# delta = 1e-5) and the PLD grids grow huge; such noise protects nothing, so it is refused.
MIN_NOISE_MULTIPLIER = 0.1
MAX_NOISE_MULTIPLIER = 1e7

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


@dataclass(frozen=True)
class PrivacyPlan:
    """A fully public description of one (or k) DP mean releases.

    ``noise_multiplier`` z is the Gaussian noise std divided by the L2 sensitivity of the released
    mean under replace-one adjacency (2C/m for wor, 2C/n for full, 2C/(qn) for poisson).
    ``epsilon`` is the total over ``releases`` releases at ``delta``.

    ``neighbouring`` is always ``'replace_one'`` for plans built by
    :func:`~dpagg_core.privacy.calibration.calibrate` / :func:`epsilon_for`. The dataclass itself
    accepts anything, so that plans stored by older versions (ledger rows, e.g. a legacy
    ``'add_remove'``) still load; :meth:`check` is the one validator every use of a plan for a new
    release runs (the mechanism, the ledger, the audit).
    """

    sampling: Sampling
    n: int
    delta: float
    noise_multiplier: float
    epsilon: float
    accountant: str
    releases: int = 1
    m: int | None = None
    q: float | None = None
    neighbouring: str = "replace_one"

    @property
    def denominator(self) -> float:
        """Public denominator of the mean: n (full), m (wor), q*n (poisson)."""
        if self.sampling == "full":
            return float(self.n)
        if self.sampling == "wor":
            assert self.m is not None
            return float(self.m)
        assert self.q is not None
        return self.q * self.n

    def sensitivity(self, clip_norm: float) -> float:
        """L2 sensitivity of the clipped mean: replace-one moves one clipped item by up to 2C.

        (A legacy ``add_remove`` plan reports the C/denominator its old release used, so stored
        plans are described as they ran; no new release can use it.)
        """
        per_item = 2.0 * clip_norm if self.neighbouring == "replace_one" else clip_norm
        return per_item / self.denominator

    def noise_std(self, clip_norm: float) -> float:
        return self.noise_multiplier * self.sensitivity(clip_norm)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> PrivacyPlan:
        """The plan's one validator: the plan, or DpaggError naming the field and the fix.

        A valid plan has ints ``n``, ``releases`` (and ``m``), finite numbers ``delta``,
        ``noise_multiplier``, ``epsilon`` (and ``q``), the relation ``'replace_one'``
        (:func:`check_neighbouring`; a legacy stored plan fails here), the public parameters
        :func:`check_parameters` accepts (so every plan the accountant builds passes), noise
        multiplier > 0 and epsilon >= 0. The noise-multiplier range the accountant plans with
        (:func:`check_noise_multiplier`) is its own rule, not the plan's.
        """
        check_neighbouring(self.neighbouring, "plan.neighbouring")
        ints = ("n", "releases") + (("m",) if self.m is not None else ())
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DpaggError(f"plan.{name}={value!r}; it must be an integer.")
        reals = ("delta", "noise_multiplier", "epsilon") + (("q",) if self.q is not None else ())
        for name in reals:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DpaggError(f"plan.{name}={value!r}; it must be a number.")
            if not math.isfinite(value):
                raise DpaggError(f"plan.{name}={value!r}; it must be finite.")
        check_parameters(
            self.delta, self.n, self.sampling, self.m, self.q, self.releases, self.neighbouring
        )
        if self.noise_multiplier <= 0:
            raise DpaggError(
                f"plan.noise_multiplier={self.noise_multiplier!r}; it must be > 0 "
                "(no noise = no DP)."
            )
        if self.epsilon < 0:
            raise DpaggError(f"plan.epsilon={self.epsilon!r}; it must be >= 0.")
        return self


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def checked_plan(plan: Any) -> PrivacyPlan:
    """``plan`` if it is a valid :class:`PrivacyPlan` (:meth:`PrivacyPlan.check`); DpaggError
    otherwise, before anything is drawn or written. Used by the mechanism and the ledger."""
    if not isinstance(plan, PrivacyPlan):
        raise DpaggError(
            f"plan must be a dpagg_core.privacy.accountant.PrivacyPlan, got {type(plan).__name__}; "
            "build one with calibration.calibrate or accountant.epsilon_for."
        )
    return plan.check()


@dataclass(frozen=True)
class _Setting:
    """Validated public parameters of a plan (everything but z and epsilon)."""

    sampling: str
    n: int
    delta: float
    releases: int
    m: int | None
    q: float | None
    neighbouring: str


def _as_int(value: object, name: str, fix: str) -> int:
    if isinstance(value, bool):
        raise DpaggError(f"{name}={value!r} must be an integer; {fix}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise DpaggError(f"{name}={value!r} must be an integer; {fix}") from None


def _as_float(value: object, name: str, fix: str) -> float:
    if isinstance(value, bool):
        raise DpaggError(f"{name}={value!r} must be a number; {fix}")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DpaggError(f"{name}={value!r} must be a number; {fix}") from None
    if math.isnan(out):
        raise DpaggError(f"{name} is NaN; {fix}")
    return out


def add_remove_error(where: str = "neighbouring") -> DpaggError:
    """The error every entry point raises for add/remove adjacency (module docstring)."""
    return DpaggError(
        f"{where}='add_remove' is not supported: under add/remove adjacency the number of items "
        "n is itself private, but dpagg computes the mean's denominator and the noise std from "
        "n, so removing one item would change the noise and no (epsilon, delta) guarantee would "
        "hold. dpagg guarantees replace-one adjacency with a public n (one item swapped): use "
        f"{where}='replace_one' (the default)."
    )


def check_neighbouring(value: object, where: str = "neighbouring") -> str:
    """``value`` if it is a relation dpagg honours ('replace_one'); DpaggError otherwise.

    Called for every new plan (accountant), release (mechanism), DP-SGD run and audit, so a
    legacy stored plan saying 'add_remove' can be read but never used again.
    """
    if value in NEIGHBOURINGS:
        return str(value)
    if value in LEGACY_NEIGHBOURINGS:
        raise add_remove_error(where)
    raise DpaggError(
        f"{where}={value!r} is unknown; dpagg supports only 'replace_one' (n public, one item "
        "swapped; the default)."
    )


def check_parameters(
    delta: object,
    n: object,
    sampling: object,
    m: object,
    q: object,
    releases: object,
    neighbouring: object,
    *,
    n_known: bool = True,
) -> _Setting:
    """The public parameters of a plan, validated (DpaggError naming the parameter and the fix)
    and normalised: the rules of :meth:`PrivacyPlan.check`, for inputs that are not a plan yet
    (the accountant's entry points, the ComfyUI Privacy Accountant's widgets).

    ``n_known=False``: n is not known yet (it will come from the embedding set), so the rules
    that involve it (n >= 2, delta < 1/n, m <= n) are left to the plan; ``n`` is then ignored.
    """
    if sampling not in SAMPLINGS:
        raise DpaggError(
            f"sampling={sampling!r} is unknown; use 'full' (mean of all n items), 'wor' (mean of "
            "m items drawn without replacement) or 'poisson' (each item kept with probability q)."
        )
    check_neighbouring(neighbouring)
    n_i: int | None = None
    if n_known:
        n_i = _as_int(n, "n", "n is the number of private items (images), at least 2.")
        if n_i < 2:
            raise DpaggError(f"n={n_i} is too small: a private mean needs at least n=2 items.")
    d = _as_float(delta, "delta", "pick delta well below 1/n, e.g. 1/(10n).")
    if not 0.0 < d < 1.0:
        raise DpaggError(f"delta={d!r} must lie strictly between 0 and 1; e.g. 1/(10n).")
    if n_i is not None and d >= 1.0 / n_i:
        raise DpaggError(
            f"delta={d:g} is at least 1/n = 1/{n_i}: a delta of 1/n or more permits releasing "
            f"one person's data outright. Pick delta << 1/n, e.g. 1/(10n) = {1.0 / (10 * n_i):.3g}."
        )
    k = _as_int(releases, "releases", "releases is the number of releases to account for (>= 1).")
    if k < 1:
        raise DpaggError(f"releases={k} must be at least 1 (the number of releases accounted).")
    m_i: int | None = None
    q_f: float | None = None
    if sampling == "full":
        if m is not None and _as_int(m, "m", "omit m with sampling='full'.") != n_i:
            raise DpaggError(
                f"m={m!r} was given with sampling='full' (which averages all n={n_i} items); "
                "use sampling='wor' to average a random subset of m items, or omit m."
            )
        if q is not None and _as_float(q, "q", "omit q with sampling='full'.") != 1.0:
            raise DpaggError(
                f"q={q!r} was given with sampling='full'; use sampling='poisson' for "
                "Poisson subsampling at rate q, or omit q."
            )
    elif sampling == "wor":
        if m is None:
            raise DpaggError(
                "sampling='wor' needs m, the public number of items drawn without replacement "
                f"from the n={n_i} (1 <= m <= n); pass m=..."
            )
        m_i = _as_int(m, "m", f"m is the sample size, 1 <= m <= n={n_i}.")
        if m_i < 1:
            raise DpaggError(f"m={m_i} must be at least 1 (sample size drawn from n={n_i}).")
        if n_i is not None and m_i > n_i:
            raise DpaggError(
                f"m={m_i} exceeds n={n_i}: a sample without replacement cannot be larger than "
                f"the set; pick m <= {n_i} (or sampling='full' for all items)."
            )
        if q is not None:
            raise DpaggError(
                "q was given with sampling='wor', which uses m (the sample size); omit q, or use "
                "sampling='poisson' for a sampling rate."
            )
    else:
        if q is None:
            raise DpaggError(
                "sampling='poisson' needs q, the public probability with which each item is "
                "kept, 0 < q <= 1; pass q=..."
            )
        q_f = _as_float(q, "q", "q is the Poisson sampling rate, 0 < q <= 1.")
        if not 0.0 < q_f <= 1.0:
            raise DpaggError(f"q={q_f!r} must lie in (0, 1] (Poisson sampling probability).")
        if m is not None:
            raise DpaggError(
                "m was given with sampling='poisson', which uses the rate q; omit m, or use "
                "sampling='wor' for a fixed sample size."
            )
    return _Setting(str(sampling), n_i, d, k, m_i, q_f, str(neighbouring))  # type: ignore[arg-type]


def check_noise_multiplier(noise_multiplier: object) -> float:
    """``noise_multiplier`` as a float if the accountant plans with it: 0.1 <= z <= 1e7."""
    z = _as_float(noise_multiplier, "noise_multiplier", "it is noise std / sensitivity, e.g. 1-10.")
    if not z > 0.0:
        raise DpaggError(
            f"noise_multiplier={z!r} must be positive (noise std / L2 sensitivity of the mean); "
            "without noise there is no privacy."
        )
    if z < MIN_NOISE_MULTIPLIER:
        raise DpaggError(
            f"noise_multiplier={z:g} is below {MIN_NOISE_MULTIPLIER}: epsilon would be in the "
            "hundreds, i.e. no meaningful privacy; use a noise multiplier of about 1 or more."
        )
    if not math.isfinite(z) or z > MAX_NOISE_MULTIPLIER:
        raise DpaggError(
            f"noise_multiplier={z!r} is not a finite number <= {MAX_NOISE_MULTIPLIER:g}; "
            "such noise drowns the signal completely."
        )
    return z


# --------------------------------------------------------------------------------------------
# Per-mode epsilon (cached: calibration re-evaluates its final z). Call these positionally, so
# that calibration and epsilon_for share cache entries.
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Exact epsilon of the Gaussian mechanism, noise std / L2 sensitivity = ``sigma``.

    Balle & Wang 2018 (Thm 8, analytic Gaussian) via ``dp_accounting.gaussian_mechanism``; the
    root finder's tolerance is covered by a small upward margin so the value is never too low.
    """
    with np.errstate(divide="ignore", over="ignore"):  # log1p(-1) at eps = 0 inside the library
        eps = float(gaussian_mechanism.get_epsilon_gaussian(sigma, delta, tol=1e-12))
    return eps + _ROOT_MARGIN * (1.0 + eps) if eps > 0 else eps


def _pld_interval(count: int, coarse: bool = False) -> float:
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


def _gaussian_event(z: float, k: int) -> dp_event.DpEvent:
    event: dp_event.DpEvent = dp_event.GaussianDpEvent(_pld_gaussian_multiplier(z))
    return dp_event.SelfComposedDpEvent(event, k) if k > 1 else event


def _poisson_event(z: float, q: float, k: int) -> dp_event.DpEvent:
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
def _pld_gaussian_epsilon(z: float, k: int, delta: float) -> float:
    """k-fold Gaussian (replace-one, std z x sensitivity) by PLD.

    dp-accounting folds ``count`` into one Gaussian of std 2z/sqrt(k) (a composition of Gaussians
    is exactly a Gaussian), so the discretisation is that of a single mechanism.
    """
    event = _gaussian_event(z, k)
    return _pld_epsilon_of(event, delta, _pld_interval(1))


@functools.lru_cache(maxsize=4096)
def _pld_poisson_epsilon(z: float, q: float, k: int, delta: float, coarse: bool = False) -> float:
    """k-fold Poisson-subsampled Gaussian (replace-one) by PLD (``PoissonSampledDpEvent``).

    ``coarse`` selects calibration's bracketing grid; reported values use the fine one.
    """
    event = _poisson_event(z, q, k)
    return _pld_epsilon_of(event, delta, _pld_interval(k, coarse))


@functools.lru_cache(maxsize=4096)
def _rdp_wor_orders(
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


def _rdp_wor(z: float, n: int, m: int, k: int, delta: float) -> tuple[float, float]:
    """(epsilon, order): the RDP-WOR bound over RDP_ORDERS, plus RDP_HIGH_ORDERS climbed one by
    one while epsilon keeps falling when the base optimum is the top order. Deterministic; any
    set of orders gives a valid bound, this one avoids the expensive orders when unneeded."""
    eps, order = _rdp_wor_orders(z, n, m, k, delta, RDP_ORDERS)
    if order == RDP_ORDERS[-1]:
        for high in RDP_HIGH_ORDERS:
            eps_hi, _ = _rdp_wor_orders(z, n, m, k, delta, (high,))
            if eps_hi >= eps:
                break
            eps, order = eps_hi, high
    return eps, order


def _bbg_wor_epsilon(z: float, n: int, m: int, delta: float) -> float:
    """One WOR release: analytic Gaussian amplified by subsampling without replacement.

    Balle, Barthe, Gaboardi 2018 (Thm 10, substitution relation): if M is (eps0, delta0)-DP under
    replace-one on m-sets, then M on a uniform m-of-n sample is (log(1 + p(e^eps0 - 1)), p delta0)
    -DP under replace-one on n-sets, p = m/n. The amplified epsilon only decreases as delta0 grows,
    so the optimal split puts the whole budget in delta0 = delta * n/m (< 1 as delta < 1/n).
    M is the Gaussian with std z * 2C/m on the sample mean: eps0 = analytic Gaussian at sigma = z.
    """
    p = m / n
    eps0 = _analytic_gaussian_epsilon(z, min(delta / p, 1.0))
    return math.log1p(p * math.expm1(eps0))


def _epsilon(z: float, s: _Setting) -> tuple[float, str]:
    """(epsilon, accountant name) for a validated setting and noise multiplier z."""
    k = s.releases
    if s.sampling == "full":
        if k == 1:
            return _analytic_gaussian_epsilon(z, s.delta), ACC_ANALYTIC
        return _pld_gaussian_epsilon(z, k, s.delta), ACC_PLD
    if s.sampling == "poisson":
        assert s.q is not None
        return _pld_poisson_epsilon(z, s.q, k, s.delta), ACC_PLD_POISSON
    assert s.m is not None
    if k == 1:
        return _bbg_wor_epsilon(z, s.n, s.m, s.delta), ACC_BBG
    rdp, _ = _rdp_wor(z, s.n, s.m, k, s.delta)
    # The unamplified k-fold Gaussian is exactly the analytic Gaussian at z/sqrt(k), which lower-
    # bounds its (pessimistic) PLD value: only when that does not beat RDP is the PLD worth it.
    if rdp <= _analytic_gaussian_epsilon(z / math.sqrt(k), s.delta):
        return rdp, ACC_RDP_WOR
    unamplified = _pld_gaussian_epsilon(z, k, s.delta)
    return (rdp, ACC_RDP_WOR) if rdp < unamplified else (unamplified, ACC_PLD_UNAMPLIFIED)


def _plan(z: float, eps: float, acc: str, s: _Setting) -> PrivacyPlan:
    return PrivacyPlan(
        sampling=s.sampling,  # type: ignore[arg-type]
        n=s.n,
        delta=s.delta,
        noise_multiplier=float(z),
        epsilon=float(eps),
        accountant=acc,
        releases=s.releases,
        m=s.m,
        q=s.q,
        neighbouring=s.neighbouring,
    )


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
    eps, acc = _epsilon(z, s)
    return _plan(z, eps, acc, s)


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
    plan.check()
    s = check_parameters(
        plan.delta, plan.n, plan.sampling, plan.m, plan.q, plan.releases, plan.neighbouring
    )
    d = _as_float(delta, "delta", "delta must lie strictly between 0 and 1.")
    if not 0.0 < d < 1.0:
        raise DpaggError(f"delta={d!r} must lie strictly between 0 and 1.")
    z_in = plan.noise_multiplier if noise_multiplier is None else noise_multiplier
    z = check_noise_multiplier(z_in)
    return _epsilon(z, dataclasses.replace(s, delta=d))[0]


def clear_caches() -> None:
    """Forget memoised accountant evaluations (for cold timings; results never change)."""
    for fn in (_analytic_gaussian_epsilon, _pld_gaussian_epsilon, _pld_poisson_epsilon):
        fn.cache_clear()
    _rdp_wor_orders.cache_clear()


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
    return _rdp_wor(z, s.n, s.m, s.releases, s.delta)[0]


# --------------------------------------------------------------------------------------------
# DpEvents (for the ledger's PLD composition) and summaries
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
        return _gaussian_event(plan.noise_multiplier, plan.releases)
    if plan.sampling == "poisson":
        assert plan.q is not None
        return _poisson_event(plan.noise_multiplier, plan.q, plan.releases)
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
        value_discretization_interval=_pld_interval(_event_count(composed)),
    )
    if not acc.supports(composed):
        return None
    acc.compose(composed)
    return float(acc.get_epsilon(delta))


_THEOREMS = {
    ACC_ANALYTIC: "analytic Gaussian mechanism, Balle & Wang 2018",
    ACC_PLD: "privacy-loss-distribution composition of Gaussians, dp-accounting",
    ACC_BBG: (
        "analytic Gaussian amplified by sampling without replacement, Balle, Barthe & Gaboardi 2018"
    ),
    ACC_RDP_WOR: "Renyi DP of sampling without replacement, Wang, Balle & Kasiviswanathan 2019",
    ACC_PLD_UNAMPLIFIED: (
        "privacy-loss-distribution composition of Gaussians, without amplification credit"
    ),
    ACC_PLD_POISSON: "privacy-loss distribution of the Poisson-subsampled Gaussian, dp-accounting",
}


def delta_warning(delta: float, n: int | None = None) -> str | None:
    """The warning every front end shows for a user-chosen ``delta`` above :data:`DEFAULT_DELTA`
    or above 1/(10 n); None when delta is at most both.

    Why: (epsilon, delta)-DP allows the guarantee to fail outright with probability delta. A
    mechanism that publishes each image's own embedding with probability delta, and otherwise
    nothing, is (0, delta)-DP; with n images it exposes some image with probability about
    n * delta (Dwork & Roth 2014, Sec. 2.3). dpagg refuses delta >= 1/n and defaults to 1e-5.
    """
    d = float(delta)
    over_default = d > DEFAULT_DELTA * (1 + 1e-12)
    # The default itself is never warned about (only n > 10^4 puts it above 1/(10 n)).
    over_n = n is not None and n > 0 and d > 1.0 / (10.0 * n) and d != DEFAULT_DELTA
    if not (over_default or over_n):
        return None
    limits = []
    if over_default:
        limits.append(f"the default {DEFAULT_DELTA:g}")
    if over_n:
        limits.append(f"1/(10 n) = {1.0 / (10.0 * n):.3g}")  # type: ignore[operator]
    exposure = (
        f" With n = {n} images that is up to a {1.0 - (1.0 - d) ** n:.2%} chance that some "
        "image is exposed outright."
        if n
        else ""
    )
    return (
        f"delta = {d:g} is above {' and '.join(limits)}: delta is the probability that the "
        "privacy guarantee fails completely (a mechanism that publishes one image's embedding "
        f"with probability delta satisfies it).{exposure} Use delta <= {DEFAULT_DELTA:g} unless "
        "you have a specific reason."
    )


DELTA_MEANING = (
    "delta is the probability that the guarantee fails outright (it should be far below 1/n; "
    f"dpagg's default is {DEFAULT_DELTA:g}): with probability 1 - delta, no single image changes "
    "the chance of any output by more than a factor e^epsilon."
)


def plan_summary(plan: PrivacyPlan) -> str:
    """One human-readable paragraph describing the plan (for the CLI and ComfyUI nodes)."""
    if plan.sampling == "full":
        how = f"the mean of all n={plan.n} embeddings"
        sens = f"2C/{plan.n}"
    elif plan.sampling == "wor":
        how = f"the mean of m={plan.m} of n={plan.n} embeddings drawn without replacement"
        sens = f"2C/{plan.m}"
    else:
        how = (
            f"a Poisson sample (each of n={plan.n} embeddings kept with probability q={plan.q:g}), "
            f"summed and divided by the public q*n={plan.denominator:g}"
        )
        per = "2C" if plan.neighbouring == "replace_one" else "C"
        sens = f"{per}/{plan.denominator:g}"
    relation = (
        "replace-one"
        if plan.neighbouring == "replace_one"
        else f"{plan.neighbouring} (a legacy plan: dpagg no longer releases under it, as n is "
        "private under add/remove)"
    )
    times = "1 release" if plan.releases == 1 else f"{plan.releases} releases in total"
    theorem = _THEOREMS.get(plan.accountant, plan.accountant)
    return (
        f"Releases {how}, each embedding clipped to norm C, plus Gaussian noise with standard "
        f"deviation {plan.noise_multiplier:.4g} x the L2 sensitivity of that mean ({sens}, "
        f"{relation} neighbours). Guarantee: ({plan.epsilon:.4g}, {plan.delta:.3g})-differential "
        f"privacy for {times} (accountant: {plan.accountant}; {theorem}). Smaller epsilon means "
        "stronger privacy."
    )

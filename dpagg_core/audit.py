"""Empirical privacy audit of the real ``dp_mean``: a statistical lower bound on epsilon.

Method (Jagielski, Ullman & Oprea, NeurIPS 2020; Nasr et al., IEEE S&P 2021)
--------------------------------------------------------------------------
If a mechanism M is (epsilon, delta)-DP, then for neighbouring datasets D0, D1 and ANY set R of
outputs, ``P[M(D1) in R] <= e^eps P[M(D0) in R] + delta`` and the same with D0, D1 swapped. So
for a test that rejects when the output falls in R,

    eps >= log((P1(R) - delta) / P0(R)).

We run the real mechanism ``trials`` times on each of two worst-case neighbours, project every
release on the direction in which they differ, pick a threshold set R = {T < t} (or its
complement, in either direction) on a calibration split, and evaluate it on the held-out split
with one-sided Clopper-Pearson bounds (upper on the denominator, lower on the numerator, each at
level ``1 - (1 - confidence)/2`` so the pair holds jointly with probability ``confidence``).
The result is a lower bound on the true epsilon that holds with that confidence. It can only
ever *refute* a privacy claim (bound > claimed epsilon); a bound below the claim is expected and
says nothing more.

Worst-case neighbours (``dim`` coordinates, item x = 2C e_1, clipped to exactly C e_1)
--------------------------------------------------------------------------------------
* ``full``: D0 = n copies of x; D1 replaces one by -x. The means differ by 2C/n = the
  sensitivity; the two outputs are N(C e_1, s^2) and N((C - 2C/n) e_1, s^2).
* ``wor``: same datasets. The differing item is in the secret subsample with probability
  gamma = m/n, so D1's output is the mixture (1 - gamma) N(C e_1) + gamma N((C - 2C/m) e_1)
  against D0's N(C e_1) -- the pair that makes the Balle-Barthe-Gaboardi amplification bound
  tight. A leaked or fixed subsample would show up as a larger bound.
* ``poisson``: the other items sit at the centre (0) so the random sample size adds nothing;
  the differing item is x in D0 and -x (replace-one) or 0 (add/remove: with a public
  denominator, removing an item is the same as replacing it by the centre) in D1.
With ``plan.releases = k`` each trial makes k releases and the statistic is the sum of the k
projections (a valid test statistic for the k-fold composition, though not always optimal).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta

from dpagg_core.accountant import PrivacyPlan
from dpagg_core.errors import DpaggError
from dpagg_core.mechanism import check_inputs, dp_mean

# Fraction of trials used to choose the threshold; the rest give the bound.
CALIBRATION_FRACTION = 0.3


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit`. ``passed``: the empirical lower bound does not exceed the claim."""

    claimed_epsilon: float
    empirical_epsilon_lower_bound: float
    confidence: float
    trials: int
    passed: bool
    delta: float = 0.0
    seconds: float = 0.0

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL (privacy claim refuted)"
        return (
            f"claimed epsilon {self.claimed_epsilon:.4g} (delta {self.delta:.3g}); empirical "
            f"lower bound {self.empirical_epsilon_lower_bound:.4g} at {100 * self.confidence:.8g}% "
            f"confidence from {self.trials} trials per neighbour ({self.seconds:.1f} s): {verdict}"
        )


def clopper_pearson_upper(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided upper confidence bound, level 1 - alpha, on a binomial rate from k of n."""
    k = np.asarray(k, dtype=np.float64)
    upper = beta.ppf(1.0 - alpha, k + 1.0, np.maximum(n - k, 1e-300))
    return np.where(k >= n, 1.0, upper)


def clopper_pearson_lower(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided lower confidence bound, level 1 - alpha, on a binomial rate from k of n."""
    k = np.asarray(k, dtype=np.float64)
    lower = beta.ppf(alpha, np.maximum(k, 1e-300), n - k + 1.0)
    return np.where(k <= 0, 0.0, lower)


def _bounds_at(
    s0: np.ndarray, s1: np.ndarray, thresholds: np.ndarray, delta: float, alpha: float
) -> np.ndarray:
    """Epsilon lower bounds for R = {T < t} and its complement, both directions: [4, len(t)]."""
    n0, n1 = s0.size, s1.size
    k0 = np.searchsorted(np.sort(s0), thresholds, side="left")  # count of s0 < t
    k1 = np.searchsorted(np.sort(s1), thresholds, side="left")
    half = alpha / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.stack(
            [
                # R = {T < t}: D1 lands in R more often than D0
                np.log(
                    (clopper_pearson_lower(k1, n1, half) - delta)
                    / clopper_pearson_upper(k0, n0, half)
                ),
                # R = {T < t}, roles swapped
                np.log(
                    (clopper_pearson_lower(k0, n0, half) - delta)
                    / clopper_pearson_upper(k1, n1, half)
                ),
                # R = {T >= t}
                np.log(
                    (clopper_pearson_lower(n1 - k1, n1, half) - delta)
                    / clopper_pearson_upper(n0 - k0, n0, half)
                ),
                np.log(
                    (clopper_pearson_lower(n0 - k0, n0, half) - delta)
                    / clopper_pearson_upper(n1 - k1, n1, half)
                ),
            ]
        )
    return np.nan_to_num(out, nan=-np.inf)


def epsilon_lower_bound(
    scores0: np.ndarray,
    scores1: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    calibration_fraction: float = CALIBRATION_FRACTION,
) -> float:
    """Lower bound on epsilon, valid with probability ``confidence``, from two score samples.

    ``scores0`` / ``scores1``: i.i.d. test statistics of the mechanism on the two neighbours.
    The first ``calibration_fraction`` of each sample picks the threshold test (maximising the
    same Clopper-Pearson bound there); the rest evaluates it, so the selection does not bias the
    bound. Returns max(0, bound).
    """
    s0 = np.asarray(scores0, dtype=np.float64).ravel()
    s1 = np.asarray(scores1, dtype=np.float64).ravel()
    if not 0.0 < confidence < 1.0:
        raise DpaggError(f"confidence={confidence!r}; it must lie in (0, 1), e.g. 0.95.")
    c0, c1 = int(s0.size * calibration_fraction), int(s1.size * calibration_fraction)
    if min(c0, c1, s0.size - c0, s1.size - c1) < 10:
        raise DpaggError("too few trials for an audit; use trials >= 100.")
    alpha = 1.0 - confidence
    cal0, cal1, ev0, ev1 = s0[:c0], s1[:c1], s0[c0:], s1[c1:]
    pooled = np.sort(np.concatenate([cal0, cal1]))
    candidates = np.unique(pooled[:: max(1, pooled.size // 2000)])
    cal = _bounds_at(cal0, cal1, candidates, delta, alpha)
    side, j = np.unravel_index(int(np.argmax(cal)), cal.shape)
    best = _bounds_at(ev0, ev1, candidates[j : j + 1], delta, alpha)[side, 0]
    return float(max(0.0, best)) if math.isfinite(best) else 0.0


def _neighbours(plan: PrivacyPlan, clip_norm: float, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """The two worst-case neighbouring datasets described in the module docstring."""
    if plan.sampling == "wor" and plan.neighbouring != "replace_one":
        raise DpaggError(
            "audit supports sampling 'wor' only with neighbouring='replace_one' (removing an "
            "item changes n and so the subsample); re-plan with replace-one."
        )
    x = np.zeros(dim)
    x[0] = 2.0 * clip_norm  # clipped to exactly C e_1 by the mechanism
    d0 = np.zeros((plan.n, dim)) if plan.sampling == "poisson" else np.tile(x, (plan.n, 1))
    d0[0] = x
    d1 = d0.copy()
    # add/remove with a public denominator: removing item 0 == replacing it by the centre (0)
    d1[0] = -x if plan.neighbouring == "replace_one" else 0.0
    return d0, d1


def release_samples(
    plan: PrivacyPlan, clip_norm: float = 1.0, dim: int = 4, trials: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """Run the real :func:`dp_mean` ``trials`` x ``plan.releases`` times on each neighbour.

    Returns two float64 arrays ``[trials, releases, dim]`` (D0's and D1's releases). The
    neighbours differ along e_1; coordinate 0 is the projection the audit tests.
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise DpaggError(f"dim={dim!r}; pass a positive integer (e.g. 4).")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise DpaggError(f"trials={trials!r}; pass a positive integer (e.g. 10000).")
    d0, d1 = _neighbours(plan, clip_norm, dim)
    check_inputs(d0, plan, clip_norm)  # clear errors before anything runs
    out = np.empty((2, trials, plan.releases, dim))
    for which, data in enumerate((d0, d1)):
        for t in range(trials):
            for r in range(plan.releases):
                out[which, t, r] = dp_mean(data, plan=plan, clip_norm=clip_norm).vector
    return out[0], out[1]


def audit(
    plan: PrivacyPlan,
    clip_norm: float = 1.0,
    dim: int = 4,
    trials: int = 10_000,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit ``plan`` against the real :func:`dp_mean` with worst-case neighbours.

    Runs ``trials`` x ``plan.releases`` releases on each neighbour (roughly 0.1-0.5 ms each, so
    a few seconds at the defaults) and returns the claimed epsilon next to a lower bound that
    holds with probability ``confidence``. ``passed`` is False only when the data refute the
    claim at that confidence (a bug in the mechanism or the accountant).
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 100:
        raise DpaggError(f"trials={trials!r}; pass an integer >= 100 (e.g. 10000).")
    if not isinstance(confidence, float) or not 0.0 < confidence < 1.0:
        raise DpaggError(f"confidence={confidence!r}; pass a number in (0, 1), e.g. 0.95.")
    start = time.perf_counter()
    r0, r1 = release_samples(plan, clip_norm, dim, trials)
    lb = epsilon_lower_bound(r0[..., 0].sum(axis=1), r1[..., 0].sum(axis=1), plan.delta, confidence)
    return AuditResult(
        claimed_epsilon=float(plan.epsilon),
        empirical_epsilon_lower_bound=lb,
        confidence=confidence,
        trials=trials,
        passed=lb <= plan.epsilon,
        delta=float(plan.delta),
        seconds=time.perf_counter() - start,
    )

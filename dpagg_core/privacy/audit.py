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

Which delta is audited: the privacy profile
-------------------------------------------
A plan does not claim one (epsilon, delta) pair: its noise multiplier z claims the whole privacy
profile delta -> eps(delta) of the mechanism, and the accountant turns z into eps at any delta
(Balle & Wang 2018, Thm 8: the Gaussian mechanism's exact profile; Balle, Barthe & Gaboardi 2018,
Thm 10 under subsampling without replacement; PLD/RDP for Poisson sampling and composition). The
mechanism is (eps(delta'), delta')-DP for every delta' simultaneously, so each point is an equally
valid claim to test. At the plan's own delta (1e-5, say) a test needs P0(R) ~ 1e-5-scale event
rates, which a few thousand trials cannot resolve: the audit used to pass a mechanism with half
the required noise every time. So the audit tests the claim ``eps(delta_a)`` at a larger
``audit_delta`` delta_a, recomputed by the same accountant from the plan's noise multiplier
(``bounds.profile_epsilon``). By default delta_a is the point of a fixed grid
(:data:`AUDIT_DELTAS`, those >= the plan's delta) where the audit has the most power (below); it
depends only on the public plan, the trials and the confidence, never on the data, so the
guarantee of the bound is untouched. A refutation at delta_a refutes the analysis behind the
plan's (epsilon, delta): the released noise does not give the claimed profile.

Power: the smallest true epsilon the audit flags
------------------------------------------------
Under the neighbours below the audit statistic is, per hypothesis, a finite mixture of Gaussians
(exactly; see the list), so its CDF is known for a mechanism whose noise std is ``f`` times too
small (f = 2: the classic replace-one sensitivity 2C/n computed as C/n). For each threshold test
R the number of held-out D0 and D1 releases in R is binomial, and the probability that the
Clopper-Pearson bound exceeds the claim is computed exactly (a sum over the binomial counts, with
the threshold of the bound solved via ``binom.ppf``) for the test that a normal approximation
ranks best. The audit reports ``detectable_noise_factor`` f*, the least f flagged with
probability >= :data:`POWER_TARGET` (90 %, by bisection), and ``detectable_epsilon``: the
accountant's epsilon at the plan's delta of the mechanism with noise z/f* (exact for ``full``,
PLD for ``poisson``, an upper bound for ``wor``), plus ``power_half_noise``, the probability of
flagging f = 2. This is the power of the best fixed threshold on the held-out split; the audit
picks its threshold from the calibration split (with the same power criterion when it knows the
claim), which measured a little lower: at the README plan (epsilon 1, delta 1e-5, n = 100, 20000
trials, 99 %) 0.85 against the predicted 0.90 at f* = 1.28, over 2000 simulated audits (the
statistic's exact distributions through :func:`epsilon_lower_bound`; ``tests/test_audit.py``).

False alarms: a correct mechanism with a correct accountant is flagged with probability at most
``1 - confidence`` (the bound holds with probability >= confidence; the threshold choice uses
only the calibration split). Clopper-Pearson is conservative, so the measured rate is far lower:
0 of 10000 simulated README audits; the exact rate of the best fixed test is 1.3e-4 at 99 %.

Worst-case neighbours (``dim`` coordinates, item x = 2C e_1, clipped to exactly C e_1)
--------------------------------------------------------------------------------------
Replace-one adjacency with n public, the only relation dpagg honours (``accountant``: under
add/remove n would be private and so would the noise std; such plans are refused here too).

* ``full``: D0 = n copies of x; D1 replaces one by -x. The means differ by 2C/n = the
  sensitivity; the two outputs are N(C e_1, s^2) and N((C - 2C/n) e_1, s^2).
* ``wor``: same datasets. The differing item is in the secret subsample with probability
  gamma = m/n, so D1's output is the mixture (1 - gamma) N(C e_1) + gamma N((C - 2C/m) e_1)
  against D0's N(C e_1) -- the pair that makes the Balle-Barthe-Gaboardi amplification bound
  tight. A leaked or fixed subsample would show up as a larger bound.
* ``poisson``: the other items sit at the centre (0) so the random sample size adds nothing;
  the differing item is x in D0 and -x in D1, each in the sample with probability q.
With ``plan.releases = k`` each trial makes k releases and the statistic is the sum of the k
projections (a valid test statistic for the k-fold composition, though not always optimal); in
units of s it is N(0, k) against N(-k/z, k) (full), a binomial mixture over how many of the k
subsamples held the item (wor: shift -j/z; poisson: +j/(2z) for D0 and -j/(2z) for D1).

The projected mechanism (``basis=``, ``dpagg_core.privacy.basis.dp_mean_projected``)
----------------------------------------------------------------------------
With a public basis U (D x K) the neighbours live in the basis' D and are built on its first
column: x = 2C u_1, so U^T x = 2C e_1 is clipped (in the subspace) to exactly C e_1, the same
worst case as above in the K coordinates. The audited statistic is the release's coordinate
along u_1, ``u_1 . (release - centre)``; it has the same distributions as above, so the power
computation is unchanged. A projection that enlarged the sensitivity (e.g. a non-orthonormal U,
clipping before instead of after the projection with a scaled U) shows up as a larger bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtr
from scipy.stats import beta, binom, norm

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.basis import PublicBasis, check_basis, dp_mean_projected
from dpagg_core.privacy.bounds import profile_epsilon
from dpagg_core.privacy.mechanism import check_inputs, dp_mean
from dpagg_core.privacy.plan import MIN_NOISE_MULTIPLIER, PrivacyPlan, check_neighbouring

# Fraction of trials used to choose the threshold; the rest give the bound.
CALIBRATION_FRACTION = 0.3
# Trials per neighbour by default: ~2 s for the README plan on one core, and enough to flag a
# mechanism with 1.28x too little noise (true epsilon 1.31 for a claimed 1) w.p. 90 %.
DEFAULT_TRIALS = 20_000
# The power the detectable epsilon refers to.
POWER_TARGET = 0.9
# Candidate audit deltas (the plan's own delta is always a candidate; smaller ones are skipped).
AUDIT_DELTAS: tuple[float, ...] = (
    1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5,
)  # fmt: skip
# Largest noise factor the power search considers (the weaker mechanism's z stays >= 0.1).
_MAX_NOISE_FACTOR = 64.0


@dataclass(frozen=True)
class AuditPower:
    """What an audit of a plan can detect (module docstring, "Power"), from public inputs only.

    ``audit_delta``/``audit_epsilon``: the audited point of the plan's privacy profile.
    ``detectable_noise_factor`` f*: a mechanism of the plan's form whose noise std is f* times
    too small is flagged with probability ``POWER_TARGET``; ``detectable_epsilon`` is its
    epsilon at the plan's delta (inf: not within a factor 64 or z/f below 0.1).
    ``power_half_noise``: the probability of flagging half the noise (a 2x sensitivity bug),
    whose epsilon at the plan's delta is ``half_noise_epsilon``.
    """

    audit_delta: float
    audit_epsilon: float
    detectable_noise_factor: float
    detectable_epsilon: float
    power_half_noise: float
    half_noise_epsilon: float


@dataclass(frozen=True)
class AuditResult:
    """Outcome of :func:`audit`. ``passed``: the empirical lower bound at ``audit_delta`` does not
    exceed the claim there (``audit_epsilon``, from the plan's noise multiplier)."""

    claimed_epsilon: float
    empirical_epsilon_lower_bound: float
    confidence: float
    trials: int
    passed: bool
    delta: float = 0.0
    seconds: float = 0.0
    audit_delta: float = 0.0
    audit_epsilon: float = 0.0
    detectable_epsilon: float = math.inf
    detectable_noise_factor: float = math.inf
    power_half_noise: float = 0.0
    half_noise_epsilon: float = math.inf

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL (privacy claim refuted)"
        if math.isfinite(self.detectable_epsilon):
            detect = (
                f"flags (w.p. >= {POWER_TARGET:.0%}) a mechanism of this form whose true epsilon "
                f"at delta {self.delta:.3g} is >= {self.detectable_epsilon:.3g} (noise "
                f"{self.detectable_noise_factor:.3g}x too small)"
            )
        else:
            detect = (
                "cannot flag even a far too small noise (64x, or down to noise multiplier 0.1) "
                "at these trials; raise --trials"
            )
        return (
            f"claimed epsilon {self.claimed_epsilon:.4g} at delta {self.delta:.3g}; the same noise "
            f"claims epsilon {self.audit_epsilon:.4g} at delta {self.audit_delta:.3g} (privacy "
            f"profile), audited there: empirical lower bound "
            f"{self.empirical_epsilon_lower_bound:.4g} at {100 * self.confidence:.8g}% confidence "
            f"from {self.trials} trials per neighbour ({self.seconds:.1f} s): {verdict}\n"
            f"power: {detect}; a 2x sensitivity bug (true epsilon "
            f"{self.half_noise_epsilon:.3g}) is flagged w.p. {self.power_half_noise:.1%}"
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


def _approx_power(
    p_num: np.ndarray, p_den: np.ndarray, n: int, half: float, delta: float, epsilon: float
) -> np.ndarray:
    """Normal approximation of P[the Clopper-Pearson bound of a test exceeds ``epsilon``].

    The test's numerator/denominator events have rates ``p_num``/``p_den`` on ``n`` held-out
    trials each. The bound exceeds epsilon iff CP_low(num) - delta > e^eps CP_up(den); each CP
    bound is approximated by p_hat -+ z sqrt(p(1 - p)/n) -+ z^2/(2n) (the last term: the bound
    at a zero count), and p_hat_num - e^eps p_hat_den by a normal. Used to rank tests; the
    reported power is exact (:func:`_exact_power`).
    """
    z = float(norm.isf(half))
    e = math.exp(epsilon)
    s_num = np.sqrt(p_num * (1.0 - p_num) / n)
    s_den = np.sqrt(p_den * (1.0 - p_den) / n)
    margin = p_num - e * p_den - delta - z * (s_num + e * s_den) - z * z / (2 * n) * (1 + e)
    scale = np.sqrt(s_num**2 + (e * s_den) ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = ndtr(margin / scale)
    return np.where(scale > 0, out, (margin > 0).astype(np.float64))


def _exact_power(
    p_num: float, p_den: float, n: int, half: float, delta: float, epsilon: float
) -> float:
    """Exact P[log((CP_low(k1) - delta) / CP_up(k0)) > epsilon], k1 ~ Bin(n, p_num) and
    k0 ~ Bin(n, p_den) independent (the held-out counts of one threshold test).

    For each k0 the bound exceeds epsilon iff CP_low(k1) > L = delta + e^eps CP_up(k0), and
    CP_low(k1) > L iff P[Bin(n, L) >= k1] < half (the beta-binomial identity of the CP bound),
    i.e. k1 > binom.ppf(1 - half, n, L). Summed over k0 within 9 sd of its mean.
    """
    sd = math.sqrt(n * p_den * (1.0 - p_den))
    lo = max(0, math.floor(n * p_den - 9 * sd - 2))
    hi = min(n, math.ceil(n * p_den + 9 * sd + 2))
    k0 = np.arange(lo, hi + 1)
    limit = delta + math.exp(epsilon) * clopper_pearson_upper(k0, n, half)
    k1_min = np.where(limit < 1.0, binom.ppf(1.0 - half, n, np.minimum(limit, 1.0)) + 1, n + 1)
    return min(1.0, float(np.sum(binom.pmf(k0, n, p_den) * binom.sf(k1_min - 1, n, p_num))))


def _statistic_model(
    plan: PrivacyPlan, factor: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(means0, weights0, means1, weights1): the audit statistic on D0 and D1 as Gaussian
    mixtures of variance ``plan.releases`` in units of the per-release noise std, for a
    mechanism whose noise is ``factor`` times too small (module docstring)."""
    k, z = int(plan.releases), float(plan.noise_multiplier)
    one, zero = np.ones(1), np.zeros(1)
    if plan.sampling == "full":
        return zero, one, np.array([-k * factor / z]), one
    j = np.arange(k + 1)
    if plan.sampling == "wor":
        assert plan.m is not None
        return zero, one, -j * factor / z, binom.pmf(j, k, plan.m / plan.n)
    assert plan.q is not None
    w = binom.pmf(j, k, plan.q)
    return j * factor / (2 * z), w, -j * factor / (2 * z), w


def _test_rates(plan: PrivacyPlan, factor: float, points: int = 600) -> tuple[np.ndarray, ...]:
    """(p_num, p_den) of the four threshold-test orientations on a grid of thresholds."""
    m0, w0, m1, w1 = _statistic_model(plan, factor)
    sd = math.sqrt(plan.releases)
    lo = min(m0.min(), m1.min()) - 6 * sd
    hi = max(m0.max(), m1.max()) + 6 * sd
    t = np.linspace(lo, hi, points)[:, None]
    a = np.clip((w0 * ndtr((t - m0) / sd)).sum(axis=1), 0.0, 1.0)  # P0(T < t)
    b = np.clip((w1 * ndtr((t - m1) / sd)).sum(axis=1), 0.0, 1.0)  # P1(T < t)
    return np.concatenate([b, a, 1 - b, 1 - a]), np.concatenate([a, b, 1 - a, 1 - b])


def _power(
    plan: PrivacyPlan, factor: float, n: int, half: float, delta: float, eps: float, exact: bool
) -> float:
    p_num, p_den = _test_rates(plan, factor)
    approx = _approx_power(p_num, p_den, n, half, delta, eps)
    i = int(np.argmax(approx))
    if not exact:
        return float(approx[i])
    return _exact_power(float(p_num[i]), float(p_den[i]), n, half, delta, eps)


def _detectable_factor(
    plan: PrivacyPlan, n: int, half: float, delta: float, eps: float, exact: bool
) -> float:
    """Least noise factor f flagged with probability >= POWER_TARGET (bisection in log f)."""
    f_max = min(_MAX_NOISE_FACTOR, plan.noise_multiplier / MIN_NOISE_MULTIPLIER)
    if f_max <= 1.0 or _power(plan, f_max, n, half, delta, eps, exact) < POWER_TARGET:
        return math.inf
    if _power(plan, 1.0, n, half, delta, eps, exact) >= POWER_TARGET:
        return 1.0
    lo, hi = 0.0, math.log(f_max)
    while hi - lo > 1e-3:
        mid = 0.5 * (lo + hi)
        if _power(plan, math.exp(mid), n, half, delta, eps, exact) >= POWER_TARGET:
            hi = mid
        else:
            lo = mid
    return math.exp(hi)


def _eval_size(trials: int) -> int:
    return trials - int(trials * CALIBRATION_FRACTION)


def audit_power(
    plan: PrivacyPlan,
    trials: int = DEFAULT_TRIALS,
    confidence: float = 0.95,
    audit_delta: float | None = None,
) -> AuditPower:
    """What :func:`audit` can detect for ``plan`` (module docstring, "Power"); draws nothing.

    With ``audit_delta=None`` picks, from the plan's delta and :data:`AUDIT_DELTAS` above it,
    the delta with the smallest detectable noise factor (normal approximation), then reports
    the exact figures there. Depends only on public inputs, so the choice cannot bias the bound.
    """
    check_neighbouring(plan.neighbouring, "plan.neighbouring")
    n, half = _eval_size(trials), (1.0 - confidence) / 2.0
    if audit_delta is None:
        candidates = [float(plan.delta)] + [d for d in AUDIT_DELTAS if d > plan.delta]
        best: tuple[float, float, float] | None = None
        for d in candidates:
            eps = profile_epsilon(plan, d)
            f = _detectable_factor(plan, n, half, d, eps, exact=False)
            if best is None or f < best[0]:
                best = (f, d, eps)
        assert best is not None
        _, delta_a, eps_a = best
    else:
        delta_a = float(audit_delta)
        eps_a = profile_epsilon(plan, delta_a)
    f_star = _detectable_factor(plan, n, half, delta_a, eps_a, exact=True)
    z = float(plan.noise_multiplier)
    eps_star = profile_epsilon(plan, plan.delta, z / f_star) if math.isfinite(f_star) else math.inf
    half_ok = z / 2.0 >= MIN_NOISE_MULTIPLIER
    return AuditPower(
        audit_delta=delta_a,
        audit_epsilon=float(eps_a),
        detectable_noise_factor=f_star,
        detectable_epsilon=float(eps_star),
        power_half_noise=_power(plan, 2.0, n, half, delta_a, eps_a, exact=True),
        half_noise_epsilon=float(profile_epsilon(plan, plan.delta, z / 2.0))
        if half_ok
        else math.inf,
    )


def epsilon_lower_bound(
    scores0: np.ndarray,
    scores1: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    calibration_fraction: float = CALIBRATION_FRACTION,
    target_epsilon: float | None = None,
) -> float:
    """Lower bound on epsilon, valid with probability ``confidence``, from two score samples.

    ``scores0`` / ``scores1``: i.i.d. test statistics of the mechanism on the two neighbours.
    The first ``calibration_fraction`` of each sample picks the threshold test; the rest
    evaluates it, so the selection does not bias the bound. The pick maximises the calibration
    split's Clopper-Pearson bound, or, when the claim ``target_epsilon`` under test is given, the
    predicted probability that the held-out bound exceeds it (:func:`_approx_power` at the
    calibration split's rates: this accounts for the held-out size and measured closer to the
    best fixed test). Returns max(0, bound).
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
    if target_epsilon is None:
        score = _bounds_at(cal0, cal1, candidates, delta, alpha)
    else:
        r0 = np.searchsorted(np.sort(cal0), candidates, side="left") / c0
        r1 = np.searchsorted(np.sort(cal1), candidates, side="left") / c1
        p_num = np.stack([r1, r0, 1 - r1, 1 - r0])
        p_den = np.stack([r0, r1, 1 - r0, 1 - r1])
        n_eval = min(ev0.size, ev1.size)
        score = _approx_power(p_num, p_den, n_eval, alpha / 2.0, delta, target_epsilon)
    side, j = np.unravel_index(int(np.argmax(score)), score.shape)
    best = _bounds_at(ev0, ev1, candidates[j : j + 1], delta, alpha)[side, 0]
    return float(max(0.0, best)) if math.isfinite(best) else 0.0


def _neighbours(
    plan: PrivacyPlan, clip_norm: float, dim: int, direction: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The two worst-case replace-one neighbours described in the module docstring (along
    ``direction``, a unit vector of length ``dim``; default e_1)."""
    check_neighbouring(plan.neighbouring, "plan.neighbouring")
    x = np.zeros(dim)
    if direction is None:
        x[0] = 2.0 * clip_norm  # clipped to exactly C e_1 by the mechanism
    else:
        x = 2.0 * clip_norm * np.asarray(direction, dtype=np.float64)
    d0 = np.zeros((plan.n, dim)) if plan.sampling == "poisson" else np.tile(x, (plan.n, 1))
    d0[0] = x
    d1 = d0.copy()
    d1[0] = -x
    return d0, d1


def release_samples(
    plan: PrivacyPlan,
    clip_norm: float = 1.0,
    dim: int = 4,
    trials: int = 10_000,
    basis: PublicBasis | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the real :func:`dp_mean` ``trials`` x ``plan.releases`` times on each neighbour.

    Returns two float64 arrays ``[trials, releases, dim]`` (D0's and D1's releases). The
    neighbours differ along e_1; coordinate 0 is the projection the audit tests.
    With ``basis`` the real :func:`basis.dp_mean_projected` runs on neighbours in the basis'
    D (``dim`` is ignored) that differ along u_1, its first column; the arrays are the releases'
    K basis coordinates ``[trials, releases, K]`` (``U^T release``), coordinate 0 along u_1.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise DpaggError(f"trials={trials!r}; pass a positive integer (e.g. 10000).")
    if basis is not None:
        return _projected_samples(plan, clip_norm, trials, basis)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise DpaggError(f"dim={dim!r}; pass a positive integer (e.g. 4).")
    d0, d1 = _neighbours(plan, clip_norm, dim)
    check_inputs(d0, plan, clip_norm)  # clear errors before anything runs
    out = np.empty((2, trials, plan.releases, dim))
    for which, data in enumerate((d0, d1)):
        for t in range(trials):
            for r in range(plan.releases):
                out[which, t, r] = dp_mean(data, plan=plan, clip_norm=clip_norm).vector
    return out[0], out[1]


def _projected_samples(
    plan: PrivacyPlan, clip_norm: float, trials: int, basis: PublicBasis
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`release_samples` of the projected mechanism (module docstring)."""
    check_basis(basis, flat_dim=basis.flat_dim, base_model_id=basis.base_model_id)
    d0, d1 = _neighbours(plan, clip_norm, basis.flat_dim, basis.U[:, 0])
    check_inputs(d0, plan, clip_norm)
    out = np.empty((2, trials, plan.releases, basis.dim))
    kwargs = dict(plan=plan, clip_norm=clip_norm, basis=basis, base_model_id=basis.base_model_id)
    for which, data in enumerate((d0, d1)):
        for t in range(trials):
            for r in range(plan.releases):
                out[which, t, r] = basis.U.T @ dp_mean_projected(data, **kwargs).vector
    return out[0], out[1]


def audit(
    plan: PrivacyPlan,
    clip_norm: float = 1.0,
    dim: int = 4,
    trials: int = DEFAULT_TRIALS,
    confidence: float = 0.95,
    audit_delta: float | None = None,
    basis: PublicBasis | None = None,
) -> AuditResult:
    """Audit ``plan`` against the real :func:`dp_mean` with worst-case neighbours.

    With ``basis`` (a ``dpagg_core.privacy.basis.PublicBasis``) the projected mechanism
    :func:`basis.dp_mean_projected` is audited instead, in the basis' D (``dim`` is ignored;
    module docstring, "The projected mechanism").

    Runs ``trials`` x ``plan.releases`` releases on each neighbour (roughly 0.05-0.5 ms each, so
    a few seconds at the defaults) and tests the plan's privacy profile at ``audit_delta``
    (default: where the audit has most power, :func:`audit_power`): the claim there is
    ``audit_epsilon``, recomputed by the accountant from the plan's noise multiplier. Returns
    it next to a lower bound that holds with probability ``confidence``, and the audit's power.
    ``passed`` is False only when the data refute the claim at that confidence (a bug in the
    mechanism or the accountant); a correct one fails with probability <= 1 - confidence.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 100:
        raise DpaggError(f"trials={trials!r}; pass an integer >= 100 (e.g. {DEFAULT_TRIALS}).")
    if not isinstance(confidence, float) or not 0.0 < confidence < 1.0:
        raise DpaggError(f"confidence={confidence!r}; pass a number in (0, 1), e.g. 0.95.")
    if audit_delta is not None and (
        isinstance(audit_delta, bool)
        or not isinstance(audit_delta, (int, float))
        or not 0.0 < audit_delta < 1.0
    ):
        raise DpaggError(
            f"audit_delta={audit_delta!r}; pass a number in (0, 1), or None to pick the most "
            "powerful one."
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise DpaggError(f"dim={dim!r}; pass a positive integer (e.g. 4).")
    start = time.perf_counter()
    if basis is None:
        check_inputs(_neighbours(plan, clip_norm, dim)[0], plan, clip_norm)  # before any work
    else:
        check_basis(basis, flat_dim=basis.flat_dim, base_model_id=basis.base_model_id)
        check_inputs(np.zeros((plan.n, basis.flat_dim)), plan, clip_norm)
    power = audit_power(plan, trials, confidence, audit_delta)
    r0, r1 = release_samples(plan, clip_norm, dim, trials, basis=basis)
    lb = epsilon_lower_bound(
        r0[..., 0].sum(axis=1),
        r1[..., 0].sum(axis=1),
        power.audit_delta,
        confidence,
        target_epsilon=power.audit_epsilon,
    )
    return AuditResult(
        claimed_epsilon=float(plan.epsilon),
        empirical_epsilon_lower_bound=lb,
        confidence=confidence,
        trials=trials,
        passed=lb <= power.audit_epsilon,
        delta=float(plan.delta),
        seconds=time.perf_counter() - start,
        audit_delta=power.audit_delta,
        audit_epsilon=power.audit_epsilon,
        detectable_epsilon=power.detectable_epsilon,
        detectable_noise_factor=power.detectable_noise_factor,
        power_half_noise=power.power_half_noise,
        half_noise_epsilon=power.half_noise_epsilon,
    )

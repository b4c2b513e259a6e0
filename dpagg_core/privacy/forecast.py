"""What a plan will give, before anything is spent: the release's expected signal-to-noise ratio.

A mean release clips each per-image delta to norm C in K noised coordinates (a public basis's
K, or the full embedding width), averages, and adds Gaussian noise of std ``plan.noise_std(C)``
per coordinate. The expected clipped mean has norm ``rho C``, where the agreement ``rho`` (<= 1)
measures how much the clipped deltas of one style point the same way; the noise vector has norm
about ``noise_std(C) sqrt(K)``. So

    SNR = rho / (noise_std(1) sqrt(K))     (= rho n / (2 z sqrt(K)) for full sampling),

which does not depend on C (``bench/snr_geometry.py``, docs/evidence.md). The forecast reads
only PUBLIC values: the plan (public by construction), K, and rho from public embeddings
(:func:`agreement`) or the documented default :data:`DEFAULT_RHO`. It never looks at a private
picture or embedding, so showing it costs no privacy.

Verdicts use thresholds fixed from the geometry, not fitted to any benchmark: below SNR 1 the
noise vector is longer than the style's signal ("mostly noise"); from 2 on the signal is twice
the noise ("a clear style"); in between "a weak style". ``bench/forecast_check.py`` compares the
verdicts with the held-out benchmark's measured share of non-private style accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.plan import MIN_NOISE_MULTIPLIER

# Median agreement over 22 PUBLIC training styles (6 public images each) on the mini model with
# the recommended recipe (bench/results_v4/settings.json: 2 vectors + flips, public basis k = 16
# per vector, public-mean centre, C = median public distance): rho_fit_median of the v2_flip /
# k 16 row of bench/results_v4/geometry.jsonl, 0.365 (the third run's recipe measured 0.43).
# Used when no public embeddings are at hand; for the full space (no basis) it is an optimistic
# value (the extra coordinates carry no shared style).
DEFAULT_RHO = 0.37
DEFAULT_RHO_SOURCE = "the default, measured on public styles"
# K of the recommended recipe (k = 16 per vector, 2 vectors): the default where K is unknown.
DEFAULT_K = 32
CLEAR_SNR = 2.0
WEAK_SNR = 1.0
VERDICTS = ("noise", "weak", "clear")
MANY_IMAGES = 100_000  # beyond this the text says "more than" (the figure means nothing)


@dataclass(frozen=True)
class Forecast:
    """The expected SNR of one release and what it means; ``needed_n`` / ``needed_epsilon``: the
    images (at this epsilon) or the epsilon (at this n) that would reach :data:`CLEAR_SNR`
    (``needed_epsilon`` is None when no epsilon in range does)."""

    snr: float
    verdict: str
    rho: float
    rho_source: str
    k: int
    n: int
    epsilon: float
    needed_n: int | None
    needed_epsilon: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        """One sentence a user reads beside the plan."""
        agreed = f"{self.rho:.2g}" if self.rho >= 1e-3 else "about 0"
        head = (
            f"forecast: signal-to-noise {self.snr:.2g} (K = {self.k} noised coordinates, "
            f"agreement {agreed}: {self.rho_source}): "
        )
        if self.verdict == "clear":
            return head + "expect a clear style"
        ways = []
        if self.needed_n is not None and self.needed_n <= MANY_IMAGES:
            ways.append(f"about {self.needed_n:,} images at this epsilon")
        elif self.needed_n is not None:
            ways.append(f"more than {MANY_IMAGES:,} images at this epsilon")
        if self.needed_epsilon is not None:
            ways.append(f"epsilon about {self.needed_epsilon:.3g} with these {self.n} images")
        need = " or ".join(ways) if ways else "far more images"
        if self.verdict == "weak":
            return head + f"expect a weak style (a clear one needs {need})"
        return head + f"expect mostly noise: you would need {need}"


def snr(plan: Any, k: int, rho: float = DEFAULT_RHO) -> float:
    """``rho / (noise_std(1) sqrt(K))``: the expected clipped mean's norm over the noise norm."""
    if k < 1:
        raise DpaggError(f"K={k}: the number of noised coordinates must be >= 1")
    std = float(plan.noise_std(1.0))
    return float(rho) / (std * math.sqrt(k)) if std > 0 else math.inf


def verdict_of(value: float) -> str:
    """``clear`` (>= :data:`CLEAR_SNR`), ``weak`` (>= :data:`WEAK_SNR`) or ``noise``."""
    return "clear" if value >= CLEAR_SNR else "weak" if value >= WEAK_SNR else "noise"


def forecast(
    plan: Any, k: int | None = None, rho: float | None = None, rho_source: str | None = None
) -> Forecast:
    """The forecast for ``plan`` with K noised coordinates (default :data:`DEFAULT_K`) and
    agreement ``rho`` (default :data:`DEFAULT_RHO`). ``needed_n`` scales n at the same sampling
    fraction (exact for full sampling, where z does not depend on n; about right otherwise);
    ``needed_epsilon`` is the accountant's epsilon for the noise multiplier that reaches
    :data:`CLEAR_SNR` at this n (:func:`dpagg_core.privacy.bounds.epsilon_for`)."""
    from dpagg_core.privacy.bounds import epsilon_for  # dp_accounting

    k = DEFAULT_K if k is None else int(k)
    source = rho_source or ("given" if rho is not None else DEFAULT_RHO_SOURCE)
    r = DEFAULT_RHO if rho is None else float(rho)
    if not 0 < r <= 1:
        raise DpaggError(f"rho={rho!r}: the agreement must be in (0, 1]")
    value = snr(plan, k, r)
    verdict = verdict_of(value)
    needed_n = needed_eps = None
    if verdict != "clear":
        needed_n = math.ceil(plan.n * CLEAR_SNR / value) if value > 0 else None
        # SNR = rho / (z * (2 / denominator) * sqrt K): the z that gives CLEAR_SNR at this n
        z_clear = float(plan.noise_multiplier) * value / CLEAR_SNR
        if z_clear >= MIN_NOISE_MULTIPLIER:
            needed_eps = float(
                epsilon_for(
                    z_clear,
                    delta=plan.delta,
                    n=plan.n,
                    sampling=plan.sampling,
                    m=plan.m,
                    q=plan.q,
                    releases=plan.releases,
                ).epsilon
            )
    return Forecast(
        snr=value,
        verdict=verdict,
        rho=r,
        rho_source=source,
        k=k,
        n=int(plan.n),
        epsilon=float(plan.epsilon),
        needed_n=needed_n,
        needed_epsilon=needed_eps,
    )


def agreement(groups: Sequence[np.ndarray], clip_norm: float) -> float:
    """rho from PUBLIC per-image deltas (each group: one public style's ``[m, K]`` deltas in the
    noised coordinates, centred on the release's centre): per style the unbiased estimate of
    ``|E[clip_C(y) / C]|`` (``(m |u_bar|^2 - mean |u_i|^2) / (m - 1)``, since the plain mean of m
    vectors is biased upward by about 1/sqrt(m)), then the median over styles. Never call it on
    private embeddings: the forecast is public only because its inputs are."""
    if clip_norm <= 0:
        raise DpaggError(f"clip_norm={clip_norm!r} must be > 0")
    rhos = []
    for y in groups:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or len(y) < 2:
            continue
        norms = np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
        u = y * np.minimum(1.0, clip_norm / norms) / clip_norm
        m = len(u)
        mu2 = (m * float(np.sum(u.mean(0) ** 2)) - float(np.mean(np.sum(u**2, axis=1)))) / (m - 1)
        rhos.append(math.sqrt(max(mu2, 0.0)))
    if not rhos:
        raise DpaggError("rho needs at least one public style with two or more embeddings")
    return float(np.median(rhos))

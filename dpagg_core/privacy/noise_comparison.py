"""``dpagg account``'s noise comparison: the paper's configuration (a secret subsample) next to
the plan dpagg recommends (every image), both calibrated to the same epsilon, and the effect of a
public subspace on the noise norm. Public plan values only."""

from __future__ import annotations

import math
from typing import Any

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.calibration import calibrate


def noise_comparison(
    plan: Any, *, k: int | None = None, dim: int | None = None
) -> tuple[dict[str, Any], str]:
    """For the (epsilon, delta, n, releases) of ``plan``: the noise of the paper's configuration
    (a secret subsample of m = n/10 without replacement, arXiv 2411.14639) next to the plan dpagg
    recommends (``full``: every image, no subsample), both calibrated to the same epsilon; and,
    with ``dim`` (D, values per embedding) and ``k`` (K, noised coordinates in a public basis),
    the subspace's effect on the noise norm (``dpagg_core.privacy.basis``). Noise is given in
    units of the clip norm C: per coordinate ``sigma / C``, and the expected norm of the noise
    vector, about ``sigma sqrt(D)`` (the signal, a mean of clipped deltas, has norm <= C)."""
    if k is not None and (dim is None or not 1 <= k <= dim):
        raise DpaggError(f"--k {k}: give --dim D too, and 1 <= K <= D (K noised coordinates)")
    if dim is not None and dim < 1:
        raise DpaggError(f"--dim {dim}: the number of values per embedding (e.g. 768)")
    common = {"releases": plan.releases}
    m = max(1, round(plan.n / 10))
    paper = calibrate(plan.epsilon, plan.delta, plan.n, "wor", m=m, **common)
    full = calibrate(plan.epsilon, plan.delta, plan.n, "full", **common)

    def row(p: Any) -> dict[str, Any]:
        std = float(p.noise_std(1.0))
        out = {
            "sampling": p.sampling,
            "m": p.m,
            "noise_multiplier": float(p.noise_multiplier),
            "noise_std_per_C": std,
            "epsilon": float(p.epsilon),
        }
        if dim is not None:
            out["noise_norm_per_C"] = std * math.sqrt(dim)
        return out

    payload: dict[str, Any] = {
        "epsilon": float(plan.epsilon),
        "delta": float(plan.delta),
        "n": int(plan.n),
        "paper": row(paper),
        "recommended": row(full),
        "paper_noise_ratio": float(paper.noise_std(1.0) / full.noise_std(1.0)),
        "subspace": None,
    }
    std = full.noise_std(1.0)
    names = (f"paper (subsample m = {m} of {plan.n}, wor):", f"dpagg (all {plan.n} images, full):")
    labels = [x.ljust(max(map(len, names)) + 1) for x in names]
    lines = [
        f"Noise at epsilon {plan.epsilon:.4g}, delta {plan.delta:.3g}, n = {plan.n} (replace-one"
        + (f", {plan.releases} releases" if plan.releases > 1 else "")
        + "), in units of the clip norm C:",
        f"  {labels[0]}noise multiplier {paper.noise_multiplier:.4g}, noise std "
        f"{paper.noise_std(1.0):.4g} C per coordinate",
        f"  {labels[1]}noise multiplier {full.noise_multiplier:.4g}, noise std "
        f"{std:.4g} C per coordinate  <- recommended",
        f"  the paper's configuration has {payload['paper_noise_ratio']:.2f}x the noise",
    ]
    if dim is not None:
        lines.append(
            f"  noise norm over D = {dim} coordinates: ~{std * math.sqrt(dim):.4g} C (paper "
            f"~{paper.noise_std(1.0) * math.sqrt(dim):.4g} C); the signal has norm <= C"
        )
    if k is not None and dim is not None:
        ratio = math.sqrt(k / dim)
        payload["subspace"] = {
            "K": int(k),
            "D": int(dim),
            "noise_norm_per_C": std * math.sqrt(k),
            "full_noise_norm_per_C": std * math.sqrt(dim),
            "noise_norm_ratio": ratio,
        }
        lines.append(
            f"  in a public subspace (--basis) with K = {k} noised coordinates: noise norm "
            f"~{std * math.sqrt(k):.4g} C instead of ~{std * math.sqrt(dim):.4g} C (x{ratio:.2f}); "
            "same epsilon, the part of the mean outside the subspace is lost"
        )
    return payload, "\n".join(lines)

"""The wording of a privacy plan, shared by every front end (CLI, ComfyUI nodes, WebUI, reports):
:func:`plan_summary` (one paragraph per plan), :data:`DELTA_MEANING` and :func:`delta_warning`
(the warning for a user-chosen delta above the safe default)."""

from __future__ import annotations

from dpagg_core.privacy.plan import (
    ACC_ANALYTIC,
    ACC_BBG,
    ACC_PLD,
    ACC_PLD_POISSON,
    ACC_PLD_UNAMPLIFIED,
    ACC_RDP_WOR,
    DEFAULT_DELTA,
    PrivacyPlan,
)

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


# How recorded spend was composed (``composition.Spend.composition``), in words: a bare "(pld)"
# told a user nothing (issue 20 item 4). "none": no release yet, nothing to say.
_COMPOSITION_WORDS = {
    "none": "",
    "basic": "basic composition: added up",
    "pld": "composed with the privacy loss distribution (PLD) accountant",
}


def composition_words(kind: str) -> str:
    """How the spend was composed, in words (empty for ``'none'``); the ledger's refusals and
    every budget line use this one wording."""
    return _COMPOSITION_WORDS.get(str(kind), f"{kind} composition")


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

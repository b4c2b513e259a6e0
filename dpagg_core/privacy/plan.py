"""The privacy plan: :class:`PrivacyPlan` (the public description of one or k DP mean releases),
its validation, and the rules for the public parameters a plan is built from.

A plan validates ONCE, on construction (:meth:`PrivacyPlan.__post_init__` runs the rules and
keeps the verdict; the dataclass is frozen, so the verdict stays true). :meth:`PrivacyPlan.check`
and :func:`checked_plan`, which the mechanism, the ledger, the request keys and the audit call on
every use of a plan for a new release, only read that verdict. Construction never raises: plans
stored by older versions (a legacy ``neighbouring='add_remove'`` ledger row) still load, and
``check`` then raises the stored reason.

Neighbouring relation: replace-one only (:data:`NEIGHBOURINGS`; why in
:mod:`dpagg_core.privacy.bounds`). The epsilon of a plan comes from
:mod:`dpagg_core.privacy.bounds` (:func:`~dpagg_core.privacy.bounds.epsilon_for`), its least noise
for a target from :mod:`dpagg_core.privacy.calibration`, its wording from
:mod:`dpagg_core.privacy.plan_text`.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from dpagg_core import options
from dpagg_core.errors import DpaggError

Sampling = Literal["full", "wor", "poisson"]
SAMPLINGS: tuple[str, ...] = options.SAMPLINGS
# The only neighbouring relation dpagg honours (n is public under replace-one; the reason is in
# dpagg_core.privacy.bounds' docstring).
NEIGHBOURINGS: tuple[str, ...] = ("replace_one",)
# Relations older versions could record in a plan: readable (the ledger counts their spend), never
# accepted for a new plan or release.
LEGACY_NEIGHBOURINGS: tuple[str, ...] = ("add_remove",)
# The default delta everywhere (library, CLI, nodes, demo): far below 1/n for any realistic n and
# in the range the DP literature calls cryptographically small. See
# :func:`dpagg_core.privacy.plan_text.delta_warning`.
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


@dataclass(frozen=True)
class PrivacyPlan:
    """A fully public description of one (or k) DP mean releases.

    ``noise_multiplier`` z is the Gaussian noise std divided by the L2 sensitivity of the released
    mean under replace-one adjacency (2C/m for wor, 2C/n for full, 2C/(qn) for poisson).
    ``epsilon`` is the total over ``releases`` releases at ``delta``.

    ``neighbouring`` is always ``'replace_one'`` for plans built by
    :func:`~dpagg_core.privacy.calibration.calibrate` /
    :func:`~dpagg_core.privacy.bounds.epsilon_for`. The dataclass itself accepts anything, so that
    plans stored by older versions (ledger rows, e.g. a legacy ``'add_remove'``) still load. It
    validates once, on construction (:meth:`_validate`, the rules), and keeps the verdict (the
    normalised :class:`Setting`, or the reason it is invalid); :meth:`check`, which every use of a
    plan for a new release runs (the mechanism, the ledger, the request keys, the audit), only
    reads it. Frozen, so the verdict cannot go stale.
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

    def __post_init__(self) -> None:
        # The verdict of the one validation: the plan's Setting, or the exception that says why
        # it is invalid. An instance attribute, not a field: no part of the plan's value, dict,
        # repr, equality or hash.
        try:
            verdict: Setting | Exception = self._validate()
        except Exception as err:  # kept and raised by check(): construction never raises
            verdict = err.with_traceback(None)
        object.__setattr__(self, "_verdict", verdict)

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
        """The plan, or DpaggError naming the field and the fix: the verdict of the plan's one
        validation (:meth:`_validate`, run on construction). Costs an attribute read."""
        self.setting()
        return self

    def setting(self) -> Setting:
        """The plan's public parameters, normalised as :func:`check_parameters` returns them
        (for the accountant); DpaggError if the plan is invalid (:meth:`check`)."""
        verdict = self.__dict__.get("_verdict")
        if verdict is None:  # built without __init__ (e.g. an old pickle): validate now
            try:
                verdict = self._validate()
            except Exception as err:
                verdict = err.with_traceback(None)
            object.__setattr__(self, "_verdict", verdict)
        if isinstance(verdict, Exception):
            raise verdict.with_traceback(None)
        return verdict

    def _validate(self) -> Setting:
        """The plan's one validator (run once, on construction): its Setting, or DpaggError.

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
        setting = check_parameters(
            self.delta, self.n, self.sampling, self.m, self.q, self.releases, self.neighbouring
        )
        if self.noise_multiplier <= 0:
            raise DpaggError(
                f"plan.noise_multiplier={self.noise_multiplier!r}; it must be > 0 "
                "(no noise = no DP)."
            )
        if self.epsilon < 0:
            raise DpaggError(f"plan.epsilon={self.epsilon!r}; it must be >= 0.")
        return setting


def checked_plan(plan: Any) -> PrivacyPlan:
    """``plan`` if it is a valid :class:`PrivacyPlan` (:meth:`PrivacyPlan.check`: the verdict of
    its validation on construction, so this is cheap); DpaggError otherwise, before anything is
    drawn or written. Used by the mechanism, the ledger, the request keys and the release."""
    if not isinstance(plan, PrivacyPlan):
        raise DpaggError(
            f"plan must be a dpagg_core.privacy.plan.PrivacyPlan, got {type(plan).__name__}; "
            "build one with calibration.calibrate or bounds.epsilon_for."
        )
    return plan.check()


@dataclass(frozen=True)
class Setting:
    """Validated public parameters of a plan (everything but z and epsilon)."""

    sampling: str
    n: int
    delta: float
    releases: int
    m: int | None
    q: float | None
    neighbouring: str


def as_int(value: object, name: str, fix: str) -> int:
    if isinstance(value, bool):
        raise DpaggError(f"{name}={value!r} must be an integer; {fix}")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise DpaggError(f"{name}={value!r} must be an integer; {fix}") from None


def as_float(value: object, name: str, fix: str) -> float:
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
) -> Setting:
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
        n_i = as_int(n, "n", "n is the number of private items (images), at least 2.")
        if n_i < 2:
            raise DpaggError(f"n={n_i} is too small: a private mean needs at least n=2 items.")
    d = as_float(delta, "delta", "pick delta well below 1/n, e.g. 1/(10n).")
    if not 0.0 < d < 1.0:
        raise DpaggError(f"delta={d!r} must lie strictly between 0 and 1; e.g. 1/(10n).")
    if n_i is not None and d >= 1.0 / n_i:
        raise DpaggError(
            f"delta={d:g} is at least 1/n = 1/{n_i}: a delta of 1/n or more permits releasing "
            f"one person's data outright. Pick delta << 1/n, e.g. 1/(10n) = {1.0 / (10 * n_i):.3g}."
        )
    k = as_int(releases, "releases", "releases is the number of releases to account for (>= 1).")
    if k < 1:
        raise DpaggError(f"releases={k} must be at least 1 (the number of releases accounted).")
    m_i: int | None = None
    q_f: float | None = None
    if sampling == "full":
        if m is not None and as_int(m, "m", "omit m with sampling='full'.") != n_i:
            raise DpaggError(
                f"m={m!r} was given with sampling='full' (which averages all n={n_i} items); "
                "use sampling='wor' to average a random subset of m items, or omit m."
            )
        if q is not None and as_float(q, "q", "omit q with sampling='full'.") != 1.0:
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
        m_i = as_int(m, "m", f"m is the sample size, 1 <= m <= n={n_i}.")
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
        q_f = as_float(q, "q", "q is the Poisson sampling rate, 0 < q <= 1.")
        if not 0.0 < q_f <= 1.0:
            raise DpaggError(f"q={q_f!r} must lie in (0, 1] (Poisson sampling probability).")
        if m is not None:
            raise DpaggError(
                "m was given with sampling='poisson', which uses the rate q; omit m, or use "
                "sampling='wor' for a fixed sample size."
            )
    return Setting(str(sampling), n_i, d, k, m_i, q_f, str(neighbouring))  # type: ignore[arg-type]


def check_noise_multiplier(noise_multiplier: object) -> float:
    """``noise_multiplier`` as a float if the accountant plans with it: 0.1 <= z <= 1e7."""
    z = as_float(noise_multiplier, "noise_multiplier", "it is noise std / sensitivity, e.g. 1-10.")
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


def plan_from_setting(z: float, eps: float, acc: str, s: Setting) -> PrivacyPlan:
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

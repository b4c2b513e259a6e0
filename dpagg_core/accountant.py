"""Privacy accounting for DPAgg releases, on Google's dp-accounting library.

(Interface fixed here; implementation in progress.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Sampling = Literal["full", "wor", "poisson"]
SAMPLINGS: tuple[str, ...] = ("full", "wor", "poisson")


@dataclass(frozen=True)
class PrivacyPlan:
    """A fully public description of one (or k) DP mean releases.

    ``noise_multiplier`` z is the Gaussian noise std divided by the L2 sensitivity of the released
    mean under ``neighbouring`` (replace-one: 2C/m for wor, 2C/n for full, 2C/(qn) for poisson;
    add/remove: C/(qn) for poisson). ``epsilon`` is the total over ``releases`` releases at ``delta``.
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
        """L2 sensitivity of the clipped mean: replace-one moves one clipped item by up to 2C."""
        per_item = 2.0 * clip_norm if self.neighbouring == "replace_one" else clip_norm
        return per_item / self.denominator

    def noise_std(self, clip_norm: float) -> float:
        return self.noise_multiplier * self.sensitivity(clip_norm)

    def to_dict(self) -> dict:
        return asdict(self)

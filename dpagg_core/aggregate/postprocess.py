"""Post-processing of a DP release that costs no privacy: James-Stein, a Wiener filter, norms.

Everything here is a function of the RELEASED vector and of public quantities only (the public
centre, the plan's noise std ``sigma`` from the privacy record, the number K of noised
coordinates, public typical norms). By the post-processing property of differential privacy
(Dwork & Roth 2014, Prop. 2.1) its output is as private as the release itself
(docs/privacy.md invariant 8). No function here takes the private per-image embeddings.

The ledger keeps the RAW release; post-processing is applied after it
(``release.release_embeddings``), so re-running an identical request returns the stored raw
release and, the functions being deterministic, the same post-processed file.

Methods (:data:`METHODS`):

* ``none``: the raw release.
* ``js``: positive-part James-Stein shrinkage toward the public centre ``c`` in the K release
  coordinates: ``c + f (r - c)`` with ``f = max(0, 1 - (K - 2) sigma^2 / ||r - c||^2)``
  (James & Stein 1961; Baranchik 1964's positive part). For ``r - c = mu + N(0, sigma^2 I_K)``
  it has lower expected squared error than ``r`` for every ``mu`` when K >= 3 (for K <= 2 the
  factor is 1). With a public basis ``r - c`` lies in ``span(U)`` and ``||r - c||`` is the norm
  of its K coordinates; without one K = D. Shrinking by a positive factor does not change the
  direction of ``r - c``, only its length; ``f = 0`` returns the centre (the release was
  indistinguishable from noise): a warning is logged.
* ``norm``: each vector of each key rescaled to a public typical norm for that key
  (``PublicBasis.typical_norms``: the norm of a mean of public TI embeddings, or a typical token
  norm of the table; or given): text encoders react to token norms, and noise inflates a noisy
  mean's norm. Measured on the mini model (``bench/subspace_gain.py``) it is no default: it moves
  the release along the centre's direction, and after a strong James-Stein shrinkage that
  direction dominates (``js+norm`` lowered the cosine to the non-private mean).
* ``js+norm``: ``js``, then ``norm``.
* ``wiener``: the posterior mean under a Gaussian prior fitted to PUBLIC style means
  (:class:`WienerPrior`): in the K basis coordinates ``y = U^T (r - m)`` around the prior mean
  ``m``, each coordinate is multiplied by ``lambda_j / (lambda_j + sigma^2)``, where ``lambda_j``
  is the variance of the public style means along basis direction j and ``sigma`` the release's
  noise std per coordinate (the record's ``sigma``): ``r - U ((1 - f) * y)``. For
  ``r = mu + U N(0, sigma^2 I_K)`` with ``U^T (mu - m) ~ N(0, diag(lambda))`` it is the posterior
  mean (the minimum expected squared error); unlike ``js`` it shrinks the directions in which
  public styles differ little much more than those in which they differ a lot (anisotropic), and
  toward the public styles' mean rather than toward the centre. The component of ``r - m``
  outside ``span(U)`` (zero for a release in that basis around a centre in ``m + span(U)``) is
  kept. The prior is built from public images only, grouped by style
  (:meth:`WienerPrior.from_style_means`), and its digest goes into the record.
* ``wiener+norm``: ``wiener``, then ``norm``.

The record gains ``postprocess`` (the method) and its public parameters (``postprocess_js_k``,
``postprocess_js_sigma``, ``postprocess_js_factor``, ``postprocess_target_norms``,
``postprocess_wiener_prior_sha256``, ``postprocess_wiener_sigma``,
``postprocess_wiener_mean_factor``). The factor is
a function of the release (so as public as the release itself) and tells a user when the release
was shrunk to (nearly) nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dpagg_core import options
from dpagg_core.errors import DpaggError
from dpagg_core.privacy.mechanism import to_published_precision

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = options.POSTPROCESS + options.POSTPROCESS_WITH_PRIOR
# A layout: (key, vectors, width) per key, in EmbeddingSet.flat order.
Layout = Sequence[tuple[str, int, int]]


def js_factor(delta_norm_sq: float, *, sigma: float, k: int) -> float:
    """The positive-part James-Stein factor ``max(0, 1 - (k - 2) sigma^2 / ||r - c||^2)``
    (1.0 for k <= 2, where shrinkage does not dominate; 0.0 for a zero delta)."""
    if not math.isfinite(sigma) or sigma < 0:
        raise DpaggError(f"sigma={sigma!r}; pass the plan's (public) noise std.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise DpaggError(f"k={k!r}; pass the number of noised coordinates (>= 1).")
    if k <= 2:
        return 1.0
    if not delta_norm_sq > 0:
        return 0.0
    return max(0.0, 1.0 - (int(k) - 2) * float(sigma) ** 2 / float(delta_norm_sq))


def james_stein(
    release: Any, centre: Any = None, *, sigma: float, k: int
) -> tuple[np.ndarray, float]:
    """``(c + f (r - c), f)`` for the flat ``release`` r and public ``centre`` c (None: origin),
    ``f`` = :func:`js_factor` over K = ``k`` noised coordinates of std ``sigma``."""
    r = np.asarray(release, dtype=np.float64).reshape(-1)
    c = np.zeros_like(r) if centre is None else np.asarray(centre, dtype=np.float64).reshape(-1)
    if c.shape != r.shape:
        raise DpaggError(f"centre has {c.size} values but the release has {r.size}")
    delta = r - c
    f = js_factor(float(delta @ delta), sigma=sigma, k=k)
    return c + f * delta, f


def rescale_norms(release: Any, *, layout: Layout, target_norms: Mapping[str, float]) -> np.ndarray:
    """Each ``[dim]`` vector of each key of the flat ``release`` scaled to L2 norm
    ``target_norms[key]`` (a zero vector stays zero)."""
    r = np.array(release, dtype=np.float64).reshape(-1)
    start = 0
    for key, v, width in layout:
        size = int(v) * int(width)
        if key not in target_norms:
            raise DpaggError(f"no target norm for key {key!r}")
        target = float(target_norms[key])
        if not math.isfinite(target) or target <= 0:
            raise DpaggError(f"target norm {target!r} for {key!r} must be positive")
        block = r[start : start + size].reshape(int(v), int(width))
        norms = np.linalg.norm(block, axis=1)
        scale = np.where(norms > 0, target / np.where(norms > 0, norms, 1.0), 0.0)
        r[start : start + size] = (block * scale[:, None]).reshape(-1)
        start += size
    if start != r.size:
        raise DpaggError(f"layout covers {start} values but the release has {r.size}")
    return r


@dataclass(frozen=True, eq=False)
class WienerPrior:
    """A Gaussian prior ``N(mean, U diag(variances) U^T)`` on a release, fitted to PUBLIC data.

    ``basis``: the public basis (``privacy.basis.PublicBasis`` or anything with ``project`` /
    ``lift`` and orthonormal columns), K directions; ``mean``: the prior mean, a flat ``[D]``
    vector; ``variances``: ``[K]``, the variance of the public style means along each direction.
    Everything here is public: it is built from public images only and never from a private set,
    so post-processing with it costs no privacy (it is a function of the release and of public
    data).
    """

    basis: Any
    mean: np.ndarray
    variances: np.ndarray

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        var = np.asarray(self.variances, dtype=np.float64).reshape(-1)
        if not (np.all(np.isfinite(var)) and np.all(var >= 0)):
            raise DpaggError("the prior's variances must be finite and >= 0")
        if not np.all(np.isfinite(mean)):
            raise DpaggError("the prior's mean must be finite")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "variances", var)

    @classmethod
    def from_style_means(
        cls,
        styles: Sequence[Any],
        *,
        basis: Any,
        centre: Any,
        clip_norm: float | None = None,
        debias: bool = True,
    ) -> WienerPrior:
        """The prior of the style means of PUBLIC per-image embeddings, one ``[m_s, D]`` array
        per public style (at least two styles).

        Each image's coordinates ``U^T (x - centre)`` are clipped to ``clip_norm`` when given (a
        release's expectation is the mean of CLIPPED coordinates), averaged per style; the prior
        mean is ``centre + U`` (the mean of the style means) and ``variances`` their
        between-style variance per direction. ``debias``: minus the part that the finite number
        of images per style adds (the mean within-style variance / m_s), floored at 0, so that
        ``variances`` estimates the spread of the styles themselves.
        """
        if len(styles) < 2:
            raise DpaggError("a prior needs the embeddings of at least two public styles")
        c = np.asarray(centre, dtype=np.float64).reshape(-1)
        means, within = [], []
        for rows in styles:
            x = np.asarray(rows, dtype=np.float64).reshape(-1, c.size)
            y = np.asarray(basis.project(x - c), dtype=np.float64)
            if clip_norm is not None:
                norms = np.linalg.norm(y, axis=1, keepdims=True)
                y = y * np.minimum(1.0, float(clip_norm) / np.where(norms > 0, norms, 1.0))
            means.append(y.mean(axis=0))
            if len(y) > 1:
                within.append(y.var(axis=0, ddof=1) / len(y))
        means_arr = np.stack(means)
        var = means_arr.var(axis=0, ddof=1)
        if debias and within:
            var = np.maximum(var - np.mean(within, axis=0), 0.0)
        mean = c + np.asarray(basis.lift(means_arr.mean(axis=0)), dtype=np.float64).reshape(-1)
        return cls(basis=basis, mean=mean, variances=var)

    def factors(self, sigma: float) -> np.ndarray:
        """``lambda_j / (lambda_j + sigma^2)`` per direction (1 where sigma is 0)."""
        if not math.isfinite(sigma) or sigma < 0:
            raise DpaggError(f"sigma={sigma!r}; pass the plan's (public) noise std.")
        s2 = float(sigma) ** 2
        if s2 == 0:
            return np.ones_like(self.variances)
        return self.variances / (self.variances + s2)

    def digest(self) -> str:
        """sha256 (hex) of the prior's mean and variances (float64 bytes), for the record."""
        h = hashlib.sha256()
        h.update(self.mean.tobytes())
        h.update(self.variances.tobytes())
        return h.hexdigest()


def wiener(release: Any, prior: WienerPrior, *, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(r - U ((1 - f) * U^T (r - m)), f)``: the posterior mean of the flat ``release`` r under
    the public ``prior`` (mean m, variances lambda, basis U) for noise std ``sigma`` per
    coordinate, ``f = lambda / (lambda + sigma^2)``."""
    r = np.asarray(release, dtype=np.float64).reshape(-1)
    if prior.mean.shape != r.shape:
        raise DpaggError(f"the prior has {prior.mean.size} values but the release has {r.size}")
    y = np.asarray(prior.basis.project(r - prior.mean), dtype=np.float64).reshape(-1)
    if y.shape != prior.variances.shape:
        raise DpaggError(f"the prior has {prior.variances.size} variances for {y.size} directions")
    f = prior.factors(sigma)
    return r - np.asarray(prior.basis.lift((1.0 - f) * y), dtype=np.float64).reshape(-1), f


def noised_coordinates(record: Mapping[str, str], flat_dim: int) -> int:
    """K, the number of coordinates the release's noise was added to: ``basis_dim`` from the
    record of a projected release, else the full D."""
    value = record.get("basis_dim")
    return int(value) if value else int(flat_dim)


def apply(
    release: Any,
    *,
    method: str,
    record: Mapping[str, str],
    layout: Layout,
    centre: Any = None,
    target_norms: Mapping[str, float] | None = None,
    prior: WienerPrior | None = None,
) -> tuple[np.ndarray, dict[str, str]]:
    """Post-process a flat raw ``release`` with ``method`` (:data:`METHODS`).

    Uses only the release, its public privacy ``record`` (``sigma``, ``basis_dim``), the public
    ``centre``, the ``layout`` ``[(key, vectors, width)]``, public ``target_norms`` and the public
    ``prior`` (``wiener``). Returns the float32-exact vector and the record fields to add (empty
    for ``none``).
    """
    if method not in METHODS:
        raise DpaggError(f"postprocess={method!r}; use one of {list(METHODS)}")
    r = np.asarray(release, dtype=np.float64).reshape(-1)
    if method == "none":
        return to_published_precision(r), {}  # a raw release is float32-exact already
    extra: dict[str, str] = {"postprocess": method}
    if "wiener" in method and prior is None:
        raise DpaggError(
            f"postprocess={method!r} needs a public prior (WienerPrior.from_style_means of public "
            "images grouped by style)"
        )
    if "js" in method or "wiener" in method:
        try:
            sigma = float(record["sigma"])
        except (KeyError, ValueError):
            raise DpaggError("the release's record has no noise std 'sigma'") from None
    if "wiener" in method:
        assert prior is not None
        r, f = wiener(r, prior, sigma=sigma)
        extra.update(
            postprocess_wiener_prior_sha256=prior.digest(),
            postprocess_wiener_sigma=repr(sigma),
            postprocess_wiener_mean_factor=repr(float(np.mean(f))),
        )
    if "js" in method:
        k = noised_coordinates(record, r.size)
        r, f = james_stein(r, centre, sigma=sigma, k=k)
        extra.update(
            postprocess_js_k=str(k),
            postprocess_js_sigma=repr(sigma),
            postprocess_js_factor=repr(float(f)),
        )
        if f == 0.0:
            log.warning(
                "James-Stein shrank the release to the public centre (factor 0): at this epsilon "
                "and n the release is indistinguishable from noise; it carries no style"
            )
    if "norm" in method:
        if target_norms is None:
            raise DpaggError(
                f"postprocess={method!r} needs public target norms: pass a public basis (its "
                "typical norms) or target_norms"
            )
        r = rescale_norms(r, layout=layout, target_norms=target_norms)
        extra["postprocess_target_norms"] = json.dumps(
            {k: float(v) for k, v in target_norms.items()}, sort_keys=True
        )
    return to_published_precision(r), extra

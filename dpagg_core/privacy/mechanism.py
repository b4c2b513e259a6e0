"""The DPAgg Gaussian mean mechanism: clip around a public centre, subsample, average, add noise.

Neighbouring relation and sensitivity
-------------------------------------
The private dataset is a list of ``n`` items (one per-image embedding each, any shape); ``n`` is
public. Under *replace-one* adjacency two datasets differ in one item. Every item is clipped to
L2 norm at most ``C`` around a public centre ``c``: ``y_i = clip(x_i - c)``. The released mean
divides the sum of the selected ``y_i`` by a *public* denominator (``plan.denominator``: ``n`` for
``full``, ``m`` for ``wor``, ``q*n`` for ``poisson``), never by the realised sample size. Replacing
one item moves one ``y_i`` by at most ``||y - y'|| <= 2C``, so the mean moves by at most
``2C / denominator`` -- the L2 sensitivity ``plan.sensitivity(C)``. Adding back the public centre
is post-processing. Replace-one is the only relation honoured: under add/remove adjacency ``n``
(hence the denominator and the noise std) would itself be private, so a plan saying
``neighbouring='add_remove'`` (only an old, stored one can) is refused before anything is drawn
(``plan.check_neighbouring``).

Noise and privacy
-----------------
Gaussian noise with std ``sigma = z * sensitivity`` (``plan.noise_std(C)``) is added to every
coordinate. For one release on all items this is the Gaussian mechanism whose exact
(epsilon, delta) curve is the analytic Gaussian of Balle & Wang (ICML 2018, Theorem 8). With a
secret subsample the privacy is amplified: without replacement (Balle, Barthe & Gaboardi,
NeurIPS 2018, Theorem 10 for the substitution relation) or Poisson (Zhu, Dong & Wang 2022); the
accountant (``dpagg_core.privacy.bounds``) turns ``z`` into ``epsilon``. Amplification holds
ONLY if the subsample is unknown to the adversary, which is why the subsample, like the noise, is
drawn from the operating system's CSPRNG and never returned, logged or stored (docs/privacy.md
invariant 3).

Floating-point hardening
------------------------
Textbook floating-point samplers leak through the pattern of representable outputs (Mironov,
CCS 2012; for Gaussians Jin et al., IEEE S&P 2022). Following Holohan & Braghin (2021), as
Opacus' ``secure_mode`` does, each noise coordinate is the sum of ``_SUMMANDS`` = 4 independent
standard normals scaled by ``1/sqrt(4)``, each one the inverse normal CDF (``scipy.special.ndtri``)
of a 52-bit uniform taken directly from ``os.urandom``. Everything is computed in float64. This is
a mitigation, not a proof: an exact discrete Gaussian (Canonne, Kamath & Steinke 2020) would need
discretised data.

Published precision. The noisy mean is rounded to float32 (:func:`to_published_precision`), the
precision every released file stores, before it leaves :func:`dp_mean`: the same value is in the
``Release``, the ledger and the file. Measured: at 10^6 coordinates the float64 low-order mantissa
bits of a release differ between two true means (chi-square p < 1e-300 with the mean at the
centre vs 0.1 noise std away), because the noise's own float64 lattice shows through; after
rounding to float32 (2^29 coarser) they do not (p spread over (0, 1); rerun:
``bench/release_low_bits.py``; tested in ``tests/test_published_precision.py``).
Residual caveat: rounding is a deterministic function of the float64 value, so it is
post-processing of the float64 mechanism and cannot remove a leak, only hide it below what 10^6
samples show; an exact guarantee would need a discrete mechanism.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from scipy.special import ndtri

from dpagg_core import __version__, options
from dpagg_core.errors import DpaggError
from dpagg_core.privacy.plan import NEIGHBOURINGS, PrivacyPlan, checked_plan

MECHANISM = "dpagg-gaussian-mean"
CLIP_MODES: tuple[str, ...] = options.CLIP_MODES
NEIGHBOURING: tuple[str, ...] = NEIGHBOURINGS  # ("replace_one",): n is public

# Number of independent normals summed per noise coordinate (Holohan & Braghin 2021; Opacus
# secure_mode uses 2n = 4 draws divided by sqrt(2n) = 2).
_SUMMANDS = 4
# Relative shrink below C so that rounding in the norm computation can never push ||y|| above C.
_CLIP_SLACK = 1e-12
# Strings that go into the public privacy record: short, printable, no path-like values.
_RECORD_TEXT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+\-/]{0,199}$")
_CENTRE_KIND = re.compile(r"^[a-z][a-z0-9_\-]{0,39}$")
# Centre kinds whose vector is not implied by the model (the initializer) or zero (the origin):
# the record names the exact vector by its hash (``centre_sha256``, :func:`centre_hash`).
HASHED_CENTRES: tuple[str, ...] = ("public_mean",)


@dataclass(frozen=True)
class Release:
    """One DP release: the noisy mean (float64 holding float32-exact values, one item's shape;
    see "Published precision" above) and its public privacy record."""

    vector: np.ndarray
    record: dict[str, str]


# --------------------------------------------------------------------------------------------
# Validation (no randomness is drawn here)
# --------------------------------------------------------------------------------------------


def _as_float64(x: Any, what: str) -> np.ndarray:
    """Convert numpy arrays, torch tensors or nested lists to a float64 numpy array."""
    if type(x).__module__.split(".")[0] == "torch":
        if x.is_complex():
            raise DpaggError(f"{what} is a complex tensor; pass real-valued embeddings.")
        return np.array(x.detach().to("cpu").double().numpy(), dtype=np.float64, copy=True)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists etc.
        raise DpaggError(f"{what} cannot be read as a numeric array ({exc}).") from exc
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise DpaggError(
            f"{what} has dtype {arr.dtype}; pass a real-valued numeric array or torch tensor."
        )
    return arr.astype(np.float64, copy=True)


def check_clip_norm(clip_norm: Any) -> float:
    """The clip norm C as a float: a positive finite number (public, never from the data)."""
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float, np.number)):
        raise DpaggError(f"clip_norm={clip_norm!r}; pass a positive finite number (public C).")
    c = float(clip_norm)
    if not math.isfinite(c) or c <= 0:
        raise DpaggError(f"clip_norm={clip_norm!r}; it must be a positive finite number.")
    return c


def check_inputs(
    vectors: Any,
    plan: PrivacyPlan,
    clip_norm: float,
    center: Any = None,
    *,
    mode: str = "clip",
    centre_kind: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate everything a release depends on; raise :class:`DpaggError` on bad input.

    Draws no randomness and spends nothing, so callers (ledger, CLI, nodes) can run it before
    committing to a release. Returns float64 copies ``(vectors, center)`` with ``vectors`` of shape
    ``[n, *item_shape]`` (``[n, D]`` is the usual case) and ``center`` of ``item_shape`` or None.
    With ``centre_kind`` also checks that it describes ``center`` truthfully ('origin' exactly
    when the centre is None or zero), as the record will say so.
    """
    checked_plan(plan)
    c = check_clip_norm(clip_norm)
    if mode not in CLIP_MODES:
        raise DpaggError(f"mode={mode!r}; use 'clip' or 'normalize'.")
    arr = _as_float64(vectors, "vectors")
    if arr.ndim < 2:
        raise DpaggError(
            f"vectors has shape {arr.shape}; expected [n, D] (one row per private item)."
        )
    if arr.shape[0] != plan.n:
        raise DpaggError(
            f"vectors holds {arr.shape[0]} items but plan.n={plan.n}; re-plan for the real "
            "dataset size (n is public and sets the sensitivity)."
        )
    if arr[0].size == 0:
        raise DpaggError(f"vectors has shape {arr.shape}; each item must have >= 1 value.")
    bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
    if bad.any():
        raise DpaggError(
            f"vectors: {int(bad.sum())} item(s) contain NaN or inf (first at row "
            f"{int(np.argmax(bad))}); fix or drop those per-image embeddings and re-plan n."
        )
    cen = None
    if center is not None:
        cen = _as_float64(center, "center")
        if cen.shape != arr.shape[1:]:
            raise DpaggError(
                f"center has shape {cen.shape} but each item has shape {arr.shape[1:]}; pass the "
                "public centre with the item's shape (or None for the origin)."
            )
        if not np.isfinite(cen).all():
            raise DpaggError("center contains NaN or inf; pass a finite public centre.")
        with np.errstate(over="ignore", invalid="ignore"):
            overflow = not np.isfinite(arr - cen).all()
        if overflow:
            raise DpaggError("vectors - center overflows float64; rescale the embeddings.")
    if centre_kind is not None:
        _check_record_text(centre_kind, "centre_kind", _CENTRE_KIND, allow_empty=False)
        if cen is None and centre_kind != "origin":
            raise DpaggError(
                f"centre_kind={centre_kind!r} but center is None (the origin); pass the public "
                "centre vector or centre_kind='origin'."
            )
        if cen is not None and centre_kind == "origin" and np.any(cen != 0):
            raise DpaggError(
                "center is non-zero but centre_kind='origin'; name the public centre "
                "(e.g. centre_kind='initializer') so the privacy record is accurate."
            )
    # Noise scale must be a usable positive number.
    std = plan.noise_std(c)
    if not math.isfinite(std) or std <= 0:
        raise DpaggError(
            f"noise std {std!r} from plan and clip_norm={c!r} is not a positive finite number."
        )
    return arr, cen


def _check_record_text(value: Any, name: str, pattern: re.Pattern[str], allow_empty: bool) -> str:
    if not isinstance(value, str):
        raise DpaggError(f"{name}={value!r}; pass a string.")
    if value == "" and allow_empty:
        return value
    looks_like_path = value.startswith(("/", "~", ".")) or "\\" in value or ":\\" in value
    if looks_like_path or not pattern.match(value):
        raise DpaggError(
            f"{name}={value!r} is not allowed in the public privacy record; pass a short model "
            "name or hash (letters, digits, . _ - : @ + /), never a file path."
        )
    return value


# --------------------------------------------------------------------------------------------
# The mechanism's pieces
# --------------------------------------------------------------------------------------------


def _row_norms(rows: np.ndarray) -> np.ndarray:
    """L2 norm of each row of a 2-D finite float64 array, safe against underflow; a norm above
    the float64 range comes out as inf (still correctly "> C")."""
    with np.errstate(over="ignore", under="ignore"):
        fast = np.sqrt(np.einsum("ij,ij->i", rows, rows))
        if fast.size == 0 or (fast.min() > 1e-150 and fast.max() < 1e150):
            return fast
        scale = np.abs(rows).max(axis=1)
        safe = np.where(scale > 0, scale, 1.0)
        scaled = rows / safe[:, None]
        return scale * np.sqrt(np.einsum("ij,ij->i", scaled, scaled))


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows (finite, non-zero) divided by their L2 norm, without overflow or underflow."""
    scaled = rows / np.abs(rows).max(axis=1)[:, None]  # entries in [-1, 1], max |.| = 1
    return scaled / np.sqrt(np.einsum("ij,ij->i", scaled, scaled))[:, None]


def clip_rows(rows: np.ndarray, clip_norm: float, mode: str = "clip") -> np.ndarray:
    """Clip (or normalise) each row of a 2-D float64 array to L2 norm at most ``clip_norm``.

    ``clip``: rows with norm <= C are unchanged, longer rows are scaled down to norm C.
    ``normalize``: every non-zero row is scaled to norm C; an all-zero row has no direction and
    stays zero (norm 0 <= C, so the sensitivity bound still holds).
    The bound ``||row|| <= C`` must hold exactly, not up to rounding: rows are scaled to
    ``C * (1 - 1e-12)`` (a harmless 1e-12 relative shrink that absorbs the rounding error of
    computing a norm), and rows still above that after rounding (e.g. subnormal input, whose
    norm is inexact) are rescaled again. Returns a new array.
    """
    rows = np.array(rows, dtype=np.float64, copy=True)
    if rows.ndim != 2:
        raise DpaggError(f"clip_rows expects a 2-D array [n, D], got shape {rows.shape}.")
    if not np.isfinite(rows).all():
        raise DpaggError("clip_rows: rows contain NaN or inf; pass finite embeddings.")
    c = check_clip_norm(clip_norm)
    if mode not in CLIP_MODES:
        raise DpaggError(f"mode={mode!r}; use 'clip' or 'normalize'.")
    return _clip_in_place(rows, c, mode)


def _clip_in_place(rows: np.ndarray, c: float, mode: str) -> np.ndarray:
    """:func:`clip_rows` on validated input (2-D, finite, float64), overwriting ``rows``."""
    target = c * (1.0 - _CLIP_SLACK)
    norms = _row_norms(rows)
    scale = norms > target if mode == "clip" else norms > 0
    if not scale.any():
        return rows
    rows[scale] = _unit_rows(rows[scale]) * target
    for _ in range(16):  # guard: verify ||row|| <= C; only subnormal input ever needs a 2nd pass
        over = _row_norms(rows) > c
        if not over.any():
            return rows
        rows[over] = _unit_rows(rows[over]) * (target * (1.0 - _CLIP_SLACK))
    raise DpaggError(  # pragma: no cover - unreachable for finite input
        "clipping failed to reach the clip norm; rescale the embeddings."
    )


def suggest_clip_norm(public: Any, quantile: float = 0.9) -> dict[str, Any]:
    """The clip norm C from per-image embeddings of PUBLIC images (an ``EmbeddingSet`` trained
    with the private run's model and settings; never the private set: docs/privacy.md
    invariant 2). ``clip_norm``: the ``quantile`` of their distances to the public centre (the
    origin without one); ``clip_norm_public_mean``: the same quantile of their distances to their
    own mean, the C for ``centre='public_mean'``; ``distances``: min, median and max of the
    former. What ``dpagg suggest-clip-norm`` and the WebUI's suggestion report."""
    centre = public.flat_centre()
    flat = public.flat()
    dists = np.linalg.norm(flat - (0 if centre is None else centre), axis=1)
    to_mean = np.linalg.norm(flat - flat.mean(axis=0), axis=1)
    return {
        "clip_norm": float(np.quantile(dists, quantile)),
        "clip_norm_public_mean": float(np.quantile(to_mean, quantile)),
        "quantile": quantile,
        "n_public": int(public.n),
        "distances": {
            "min": float(dists.min()),
            "median": float(np.median(dists)),
            "max": float(dists.max()),
        },
    }


def _uniform_bits(count: int) -> np.ndarray:
    """``count`` uniform 64-bit integers from the OS CSPRNG (``os.urandom`` via ``secrets``)."""
    return np.frombuffer(secrets.token_bytes(8 * count), dtype=np.uint64)


def _draw_subsample(plan: PrivacyPlan) -> np.ndarray:
    """Secret subsample per the plan, from the OS CSPRNG. Never returned by ``dp_mean``.

    ``wor``: exactly ``m`` distinct indices, every m-subset equally likely: the ``m`` smallest of
    ``n`` i.i.d. uniform 64-bit keys (redrawn in the ~n^2/2^65-probability event of a tie, so
    the induced permutation is exactly uniform by exchangeability). ``poisson``: each index
    independently when a 53-bit uniform falls below ``q``. ``full``: all indices.
    """
    n = plan.n
    if plan.sampling == "full":
        return np.arange(n)
    if plan.sampling == "wor":
        assert plan.m is not None
        while True:
            keys = _uniform_bits(n)
            order = np.argsort(keys)
            ranked = keys[order]
            if not np.any(ranked[1:] == ranked[:-1]):
                return np.sort(order[: plan.m])
    assert plan.q is not None
    u = (_uniform_bits(n) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # k / 2^53, exact
    return np.flatnonzero(u < float(plan.q))


def _secure_standard_normal(size: int) -> np.ndarray:
    """``size`` float64 standard normals from ``os.urandom``, hardened by summing 4 draws.

    Each summand is ``ndtri(u)`` with ``u = (k + 1/2) / 2**52``, ``k`` a uniform 52-bit integer
    (exactly representable, symmetric about 1/2, never 0 or 1). The sum of 4 is divided by 2.
    """
    bits = _uniform_bits(_SUMMANDS * size) >> np.uint64(12)
    u = (bits.astype(np.float64) + 0.5) * 2.0**-52
    draws = ndtri(u).reshape(_SUMMANDS, size)
    return draws.sum(axis=0) / math.sqrt(_SUMMANDS)


def _gaussian_noise(shape: tuple[int, ...], std: float) -> np.ndarray:
    """Fresh CSPRNG Gaussian noise N(0, std^2) of ``shape``, float64. The only noise source."""
    size = int(np.prod(shape))
    return (std * _secure_standard_normal(size)).reshape(shape)


def to_published_precision(values: Any) -> np.ndarray:
    """``values`` rounded to float32, the precision of every released file, as a float64 copy.

    Applied to every released vector before it leaves the mechanism (``dp_mean``; DP-SGD via
    ``Reservation.complete``), so the Python API, the ledger and the file hold the same numbers and
    no float64 low-order bits are released (module docstring, "Published precision").
    """
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(over="ignore"):
        out = arr.astype(np.float32).astype(np.float64)
    if not np.isfinite(out).all():
        raise DpaggError(
            "the release does not fit float32 (|value| > 3.4e38), the precision embedding files "
            "store; rescale the embeddings or lower the clip norm. Nothing was released."
        )
    return out


# --------------------------------------------------------------------------------------------
# Public record and the release
# --------------------------------------------------------------------------------------------


def privacy_record(
    plan: PrivacyPlan,
    clip_norm: float,
    *,
    mode: str = "clip",
    centre_kind: str = "origin",
    base_model_id: str = "",
) -> dict[str, str]:
    """The public privacy record of a release (docs/privacy.md invariant 6), every value a string.

    Holds only public quantities: the plan, C, the clipping mode, the kind of public centre and
    the base-model id. Never paths, file names, per-image values, seeds, noise or indices.
    Floats use ``repr`` so they round-trip exactly.
    """
    checked_plan(plan)
    c = check_clip_norm(clip_norm)
    if mode not in CLIP_MODES:
        raise DpaggError(f"mode={mode!r}; use 'clip' or 'normalize'.")
    _check_record_text(centre_kind, "centre_kind", _CENTRE_KIND, allow_empty=False)
    _check_record_text(base_model_id, "base_model_id", _RECORD_TEXT, allow_empty=True)
    return _record(plan, c, mode, centre_kind, base_model_id)


def _record(
    plan: PrivacyPlan, c: float, mode: str, centre_kind: str, base_model_id: str
) -> dict[str, str]:
    """:func:`privacy_record` on validated input."""
    record = {
        "mechanism": MECHANISM,
        "epsilon": repr(float(plan.epsilon)),
        "delta": repr(float(plan.delta)),
        "noise_multiplier": repr(float(plan.noise_multiplier)),
        "sigma": repr(float(plan.noise_std(c))),
        "sensitivity": repr(float(plan.sensitivity(c))),
        "clip_norm": repr(c),
        "clip_mode": mode,
        "n": str(int(plan.n)),
        "sampling": plan.sampling,
        "denominator": repr(float(plan.denominator)),
        "releases": str(int(plan.releases)),
        "neighbouring": plan.neighbouring,
        "accountant": str(plan.accountant),
        "centre": centre_kind,
        "dpagg_version": __version__,
        "base_model_id": base_model_id,
        "created": datetime.now(timezone.utc).date().isoformat(),
    }
    if plan.sampling == "wor":
        record["m"] = str(int(plan.m))  # type: ignore[arg-type]
    if plan.sampling == "poisson":
        record["q"] = repr(float(plan.q))  # type: ignore[arg-type]
    return record


def centre_hash(center: Any) -> str:
    """sha256 (hex) of a public centre: its flat length (little-endian int64), then its values
    as float64 little-endian. Named in the record of a release around a ``public_mean`` centre
    so an auditor can check which centre was used (the centre is public; docs/privacy.md
    invariant 2)."""
    arr = np.ascontiguousarray(np.asarray(center, dtype="<f8").reshape(-1))
    h = hashlib.sha256()
    h.update(np.asarray([arr.size], dtype="<i8").tobytes())
    h.update(arr.tobytes())
    return h.hexdigest()


def dp_mean(
    vectors: Any,
    *,
    plan: PrivacyPlan,
    clip_norm: float,
    center: Any = None,
    mode: str = "clip",
    base_model_id: str = "",
    centre_kind: str = "origin",
) -> Release:
    """Release the DP mean of ``vectors`` ([n, D] numpy array or torch tensor) under ``plan``.

    Steps: validate (raises before any randomness is drawn); subtract the public ``center``;
    clip each item to L2 norm <= ``clip_norm`` (``mode='normalize'`` scales non-zero items to
    norm C; zero items stay zero); draw the secret subsample; sum and divide by the public
    ``plan.denominator``; add N(0, plan.noise_std(C)^2) noise per coordinate from the OS
    CSPRNG; add the centre back.
    The sensitivity argument and theorems are in the module docstring. ``center`` and
    ``clip_norm`` must be public (never computed from the private items). ``centre_kind``
    names the centre in the record: 'origin' exactly when ``center`` is None or zero.

    One call is ONE release; ``plan.epsilon`` covers ``plan.releases`` such calls in total, which
    the ledger counts. The subsample and noise are not returned, logged or stored.
    """
    arr, cen = check_inputs(vectors, plan, clip_norm, center, mode=mode, centre_kind=centre_kind)
    c = float(clip_norm)
    _check_record_text(base_model_id, "base_model_id", _RECORD_TEXT, allow_empty=True)
    record = _record(plan, c, mode, centre_kind, base_model_id)
    if centre_kind in HASHED_CENTRES and cen is not None:
        record["centre_sha256"] = centre_hash(cen)

    item_shape = arr.shape[1:]
    rows = arr.reshape(arr.shape[0], -1)  # arr is check_inputs' own float64 copy
    if cen is not None:
        rows = rows - cen.reshape(1, -1)
    clipped = _clip_in_place(rows, c, mode)

    # --- randomness starts here: secret subsample, then noise ---
    idx = _draw_subsample(plan)
    total = clipped[idx].sum(axis=0) if idx.size else np.zeros(clipped.shape[1])
    mean = total / float(plan.denominator)
    noisy = mean + _gaussian_noise(mean.shape, float(plan.noise_std(c)))
    del idx, total  # nothing about the draw outlives this call
    if cen is not None:
        noisy = noisy + cen.reshape(-1)
    return Release(vector=to_published_precision(noisy).reshape(item_shape), record=record)

"""The public basis as a value, and the DP mean in its subspace (issue 10; issue 19 item 1).

Why. The Gaussian mean mechanism adds noise of std ``sigma = z * 2C/n`` to every one of the D
coordinates of an embedding, so the noise has norm about ``sigma * sqrt(D)`` while the signal (the
centred mean) has norm at most C. With 10-50 images and D = 768 (SD1), 1024 (SD2), 768 + 1280
(SDXL) per vector, nothing private is usable at epsilon <= 4. If the centred per-image embeddings
lie (mostly) in a known K-dimensional subspace, aggregating in that subspace costs noise of norm
``sigma * sqrt(K)`` instead, at the same epsilon.

Mechanism (:func:`dp_mean_projected`)
------------------------------------
``U`` is a D x K matrix with orthonormal columns, computed from PUBLIC data only
(:class:`PublicBasis`; docs/privacy.md invariants 2 and 8). For per-image embeddings ``x_i`` and
the public centre ``c``:

1. ``y_i = U^T (x_i - c)`` (K coordinates; a fixed public linear map of one item);
2. :func:`dpagg_core.privacy.mechanism.dp_mean` on the ``y_i``: each clipped to norm ``C`` IN THE
   SUBSPACE, the secret subsample, the public denominator, CSPRNG Gaussian noise of std
   ``plan.noise_std(C)`` on each of the K coordinates, published at float32;
3. ``release = c + U * noisy`` (float64, then rounded to float32).

Privacy: step 1 maps each item on its own, so replacing one image still changes one ``y_i``; after
clipping ``||y_i|| <= C`` the mean's replace-one sensitivity is ``2C/n`` (``2C/m``, ``2C/(qn)``),
exactly as in the full space, so the plan and the accountant are unchanged. Step 3 is
post-processing of a DP output with public ``U`` and ``c`` (Dwork & Roth 2014, Prop. 2.1).
Clipping in the subspace never clips more than clipping in the full space
(``||U^T v|| <= ||v||``). What the projection costs is bias: the part of the true mean outside
``span(U)`` is lost. ``bench/subspace_gain.py`` measures the trade-off.

The value
---------
:class:`PublicBasis` holds ``U`` over the flattened item in ``EmbeddingSet.flat`` order (keys in
canonical order, each ``[v, dim]`` row-major), block-diagonal: one ``dim x k`` block per encoder
key, shared by all v vectors (``U = blockdiag(B, ..., B)``, v times per key, so ``K = v * k`` per
key; SDXL's ``clip_l`` and ``clip_g`` each in a subspace of their own). Why per vector and per
encoder, and how the blocks are computed from public data (token table, public embeddings): the
builders, ``dpagg_core.aggregate.basis_builders``. This module only holds and checks the value, so
the privacy layer (the ledger, the audit) can use it without importing anything above it.

Reproducibility: ``sha256`` (:func:`basis_hash`) hashes U's bytes (float64 little-endian, C order,
preceded by its shape); the privacy record names the kind, k, K and this hash, so an auditor
holding the basis file (``basis_builders.save_basis``) can check which U a release used.
Recomputing a basis on another machine can differ in the last bits of the eigenvectors (BLAS),
hence in the hash: share the file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dpagg_core import options
from dpagg_core.errors import DpaggError
from dpagg_core.families import family_keys as _family_keys
from dpagg_core.privacy import mechanism
from dpagg_core.privacy.plan import PrivacyPlan

MECHANISM = "dpagg-gaussian-mean-subspace"
KINDS: tuple[str, ...] = options.BASIS_KINDS
STRUCTURE = "per-vector"
# Columns must be orthonormal to this tolerance (a PCA gives ~1e-15).
_ORTHO_TOL = 1e-9


@dataclass(frozen=True, eq=False)
class PublicBasis:
    """A public orthonormal basis U (float64 ``[D, K]``) over the flattened embedding item.

    ``blocks[key]`` is the per-vector basis of that encoder (float64 ``[dim, k]``, orthonormal
    columns); ``U`` is block-diagonal: for each key in canonical order, ``vectors`` copies of its
    block (``dpagg_core.aggregate.basis_builders``: why per vector, why one subspace per SDXL
    encoder). ``k`` is the number of directions per vector per key, ``dim`` = K the number of
    noised coordinates.
    Build with ``basis_builders.basis_from_token_table`` or ``basis_from_public_embeddings``
    (public inputs only); read/write with ``basis_builders.load_basis`` / ``save_basis``.
    """

    blocks: Mapping[str, np.ndarray]
    vectors: int
    kind: str
    model_family: str
    base_model_id: str
    centred: bool
    typical_norms: Mapping[str, float]
    rows: int  # public rows (tokens, or public vectors) the PCA used
    U: np.ndarray = field(init=False, repr=False)
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        keys = _family_keys(self.model_family)
        if self.kind not in KINDS:
            raise DpaggError(f"basis kind={self.kind!r}; use one of {list(KINDS)}")
        if not isinstance(self.blocks, Mapping) or set(self.blocks) != set(keys):
            raise DpaggError(f"basis blocks for {self.model_family} need exactly keys {keys}")
        v = self.vectors
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 75:
            raise DpaggError(f"vectors={v!r}; pass the embedding's vectors per token (1-75).")
        if not isinstance(self.base_model_id, str):
            raise DpaggError("base_model_id must be a string")
        mechanism._check_record_text(
            self.base_model_id, "base_model_id", mechanism._RECORD_TEXT, allow_empty=True
        )
        blocks: dict[str, np.ndarray] = {}
        ks = set()
        for key in keys:
            b = np.array(self.blocks[key], dtype=np.float64, copy=True)
            if b.ndim != 2 or b.shape[1] < 1 or b.shape[1] > b.shape[0]:
                raise DpaggError(f"basis block {key!r} has shape {b.shape}; expected [dim, k<=dim]")
            if not np.isfinite(b).all():
                raise DpaggError(f"basis block {key!r} contains NaN or inf")
            err = np.abs(b.T @ b - np.eye(b.shape[1])).max()
            if err > _ORTHO_TOL:
                raise DpaggError(
                    f"basis block {key!r} is not orthonormal (max |B^T B - I| = {err:.2e})"
                )
            b.setflags(write=False)
            blocks[key] = b
            ks.add(b.shape[1])
        if len(ks) != 1:
            raise DpaggError(f"every key needs the same k, got {sorted(ks)}")
        norms = {}
        for key in keys:
            value = float(dict(self.typical_norms).get(key, float("nan")))
            if not math.isfinite(value) or value <= 0:
                raise DpaggError(f"typical_norms[{key!r}] must be a positive number")
            norms[key] = value
        d = sum(int(v) * blocks[key].shape[0] for key in keys)
        kk = sum(int(v) * blocks[key].shape[1] for key in keys)
        u = np.zeros((d, kk))
        r = c = 0
        for key in keys:
            b = blocks[key]
            for _ in range(int(v)):
                u[r : r + b.shape[0], c : c + b.shape[1]] = b
                r, c = r + b.shape[0], c + b.shape[1]
        u.setflags(write=False)
        set_ = object.__setattr__
        set_(self, "blocks", blocks)
        set_(self, "vectors", int(v))
        set_(self, "centred", bool(self.centred))
        set_(self, "typical_norms", norms)
        set_(self, "rows", int(self.rows))
        set_(self, "U", u)
        set_(self, "sha256", basis_hash(u))

    # --- shape ------------------------------------------------------------------------------

    @property
    def keys(self) -> tuple[str, ...]:
        return _family_keys(self.model_family)

    @property
    def k(self) -> int:
        """Directions per vector per encoder key (the public parameter ``--k``)."""
        return int(next(iter(self.blocks.values())).shape[1])

    @property
    def dim(self) -> int:
        """K: the number of coordinates the noise is added to (``vectors * k * keys``)."""
        return int(self.U.shape[1])

    @property
    def flat_dim(self) -> int:
        """D: the length of the flattened embedding this basis acts on."""
        return int(self.U.shape[0])

    @property
    def widths(self) -> dict[str, int]:
        return {key: int(b.shape[0]) for key, b in self.blocks.items()}

    def record(self) -> dict[str, str]:
        """The basis' public fields for a privacy record (strings)."""
        return {
            "basis_kind": self.kind,
            "basis_k": str(self.k),
            "basis_dim": str(self.dim),
            "basis_structure": STRUCTURE,
            "basis_centred": "true" if self.centred else "false",
            "basis_rows": str(self.rows),
            "basis_sha256": self.sha256,
        }

    # --- maps -------------------------------------------------------------------------------

    def project(self, deltas: Any) -> np.ndarray:
        """``[n, D]`` (or ``[D]``) centred items -> their K coordinates ``deltas @ U``."""
        return np.asarray(deltas, dtype=np.float64) @ self.U

    def lift(self, coords: Any) -> np.ndarray:
        """K coordinates -> the D-space vector ``U @ coords`` (post-processing)."""
        return self.U @ np.asarray(coords, dtype=np.float64)


def basis_hash(u: np.ndarray) -> str:
    """sha256 (hex) of U's bytes: its shape (two little-endian int64) then its values as
    float64 little-endian, C order."""
    arr = np.ascontiguousarray(np.asarray(u, dtype="<f8"))
    h = hashlib.sha256()
    h.update(np.asarray(arr.shape, dtype="<i8").tobytes())
    h.update(arr.tobytes())
    return h.hexdigest()


def check_basis(
    basis: Any,
    *,
    flat_dim: int,
    base_model_id: str,
    model_family: str | None = None,
    vectors: int | None = None,
) -> PublicBasis:
    """Refuse a basis that does not fit the embeddings: not a :class:`PublicBasis`, another D,
    another base model (or family). Errors name both sides. Draws nothing."""
    if not isinstance(basis, PublicBasis):
        raise DpaggError(
            "basis must be a dpagg_core.privacy.basis.PublicBasis (load_basis / "
            f"basis_from_token_table / basis_from_public_embeddings), got {type(basis).__name__}"
        )
    if model_family is not None and basis.model_family != model_family:
        raise DpaggError(
            f"the basis is for model family {basis.model_family!r} but the embeddings are "
            f"{model_family!r}; build the basis from the same model (`dpagg public-basis`)"
        )
    if basis.base_model_id != base_model_id:
        raise DpaggError(
            f"the basis belongs to base model {basis.base_model_id!r} but the embeddings were "
            f"trained on {base_model_id!r}; build the basis from the same model"
        )
    if basis.flat_dim != int(flat_dim):
        more = (
            f" (the basis is for {basis.vectors} vector(s) per token; the embeddings have "
            f"{vectors}: rebuild it with --vectors {vectors})"
            if vectors is not None and vectors != basis.vectors
            else ""
        )
        raise DpaggError(
            f"the basis acts on D={basis.flat_dim} values but each embedding has "
            f"D={int(flat_dim)}{more}"
        )
    return basis


def privacy_record(
    plan: PrivacyPlan,
    clip_norm: float,
    basis: PublicBasis,
    *,
    mode: str = "clip",
    centre_kind: str = "origin",
    base_model_id: str = "",
) -> dict[str, str]:
    """The public record of a projected release: ``mechanism.privacy_record`` with mechanism
    ``dpagg-gaussian-mean-subspace`` and the basis fields (kind, k, K, structure, sha256)."""
    record = mechanism.privacy_record(
        plan, clip_norm, mode=mode, centre_kind=centre_kind, base_model_id=base_model_id
    )
    record["mechanism"] = MECHANISM
    record.update(basis.record())
    return record


def dp_mean_projected(
    vectors: Any,
    *,
    plan: PrivacyPlan,
    clip_norm: float,
    basis: PublicBasis,
    center: Any = None,
    mode: str = "clip",
    base_model_id: str = "",
    centre_kind: str = "origin",
) -> mechanism.Release:
    """One DP release of the mean of ``vectors`` ([n, D]) in the public subspace of ``basis``.

    ``y_i = U^T (x_i - center)``; :func:`mechanism.dp_mean` on the ``y_i`` (clip to ``clip_norm``
    in the subspace, secret subsample, public denominator, CSPRNG noise of std
    ``plan.noise_std(clip_norm)`` per coordinate, float32 publication); then
    ``center + U @ noisy`` (post-processing), rounded to float32. Same sensitivity and plan as
    :func:`mechanism.dp_mean` (module docstring). Validates everything (and the basis against
    D and ``base_model_id``) before any randomness is drawn.
    """
    arr, cen = mechanism.check_inputs(
        vectors, plan, clip_norm, center, mode=mode, centre_kind=centre_kind
    )
    item_shape = arr.shape[1:]
    rows = arr.reshape(arr.shape[0], -1)
    check_basis(basis, flat_dim=rows.shape[1], base_model_id=base_model_id)
    record = privacy_record(
        plan,
        clip_norm,
        basis,
        mode=mode,
        centre_kind=centre_kind,
        base_model_id=base_model_id,
    )
    if centre_kind in mechanism.HASHED_CENTRES and cen is not None:
        record["centre_sha256"] = mechanism.centre_hash(cen)
    if cen is not None:
        rows = rows - cen.reshape(1, -1)
    coords = basis.project(rows)  # [n, K]: each item mapped on its own (public linear map)
    noisy = mechanism.dp_mean(coords, plan=plan, clip_norm=clip_norm, mode=mode).vector
    out = basis.lift(noisy)
    if cen is not None:
        out = out + cen.reshape(-1)
    return mechanism.Release(
        vector=mechanism.to_published_precision(out).reshape(item_shape), record=record
    )

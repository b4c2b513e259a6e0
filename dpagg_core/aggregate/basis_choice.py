"""Choosing the basis size k and the clip norm C from PUBLIC embeddings only.

:func:`choose_k` (leave one public style out) and :func:`subspace_clip_norms` (a quantile of the
public embeddings' projected distances to the centre): both are public parameters of a projected
release (docs/privacy.md invariants 2 and 8), so neither accepts the private set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
from dpagg_core.errors import DpaggError
from dpagg_core.io.public_embeddings import (
    PublicEmbeddings,
    load_public_embeddings,
    refuse_private,
)
from dpagg_core.privacy.basis import PublicBasis, check_basis

DEFAULT_MIN_COS = 0.95


@dataclass(frozen=True)
class KChoice:
    """The result of :func:`choose_k`.

    ``k``: the chosen directions per vector; ``met``: whether ``k`` reached ``min_cos`` (False:
    no candidate did, ``k`` is the one with the largest mean cosine); ``rows``: one dict per
    candidate (ascending k) with ``k``, ``cos_min`` (worst held-out cosine), ``cos_mean`` and
    ``usable`` (False, cosines None: some fit could not support k, see ``why``);
    ``groups``: the number of public styles.
    """

    k: int
    met: bool
    min_cos: float
    rows: tuple[dict[str, Any], ...]
    groups: int = 0


def auto_k_candidates(width: int) -> tuple[int, ...]:
    """The candidates of ``--k auto``: 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, ... (x1.5, x4/3
    alternately past 16), those <= ``width`` (the vector width); ``(width,)`` if width < 4."""
    width = int(width)
    if width < 1:
        raise DpaggError(f"vector width {width} must be positive")
    out, k = [4, 8, 12], 16
    while k <= width:
        out.append(k)
        out.append(k * 3 // 2)
        k *= 2
    kept = tuple(sorted({c for c in out if c <= width}))
    return kept or (width,)


def choose_k(
    public: Any,
    groups: Sequence[Any] | np.ndarray,
    ks: Sequence[int],
    *,
    min_cos: float = DEFAULT_MIN_COS,
) -> KChoice:
    """Choose the basis size k from PUBLIC embeddings only, leaving one public style out.

    Rule (the one ``bench/choose_public_defaults.py`` used to pick the benchmark's k): for every
    public style (group) g, fit :meth:`PublicBasis.from_public_embeddings` with k directions on
    the embeddings of the OTHER styles' images, take g's mean embedding delta
    ``d = mean_i(x_i) - centre`` (its images, around ``public.centre``) and the cosine between
    ``d`` and its projection ``U U^T d``. A k's score is its MEAN cosine over the held-out
    styles (the worst is reported too: with many public styles one outlier would decide it). The
    choice is the smallest k in ``ks`` whose mean cosine is ``>= min_cos`` (``met=True``); if
    none reaches it, the k with the largest mean cosine (smallest such k on a tie;
    ``met=False``). A k that some fit cannot support (fewer non-degenerate directions than k:
    ``from_public_embeddings`` raises) is not usable. Held-out styles stand in for the unknown
    private style: too small a k drops the part of a new style's mean outside the subspace,
    too large a k adds noise on more coordinates (module docstring).

    Privacy: k is a public parameter of the release (it sets K, the number of noised
    coordinates, and is written into the privacy record). It is computed here from PUBLIC
    images' embeddings (``public``: :class:`PublicEmbeddings` or a file written by
    :func:`save_public_embeddings`) and their public style labels only; nothing private enters
    (docs/privacy.md invariants 2 and 8). An :class:`EmbeddingSet` (private per-image embeddings)
    or a file marked private is refused, exactly as by :meth:`PublicBasis.from_public_embeddings`.
    Choosing k on the private set would make k (and the basis) depend on the private images.

    ``groups[i]``: the public style label of image i (``len(groups) == public.n``); at least 3
    distinct styles are needed (each fit then still has >= 2). Deterministic: the same inputs
    give the same choice.
    """
    refuse_private(public, "choose_k")
    if isinstance(public, (str, os.PathLike)):
        public = load_public_embeddings(public)
    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(
            "choose_k takes PublicEmbeddings (train_public_embeddings on PUBLIC images) or their "
            f"file, got {type(public).__name__}"
        )
    labels = np.asarray(groups)
    if labels.ndim != 1 or labels.shape[0] != public.n:
        raise DpaggError(
            f"groups needs one style label per public image ({public.n}), got shape "
            f"{tuple(labels.shape)}"
        )
    names, codes = np.unique(labels, return_inverse=True)
    if len(names) < 3:
        raise DpaggError(
            f"choosing k needs PUBLIC images of at least 3 styles (got {len(names)}): each style "
            "is held out in turn and the basis is fitted on the others. Put the public images in "
            ">= 3 subfolders, one per style, or pass an explicit --k K."
        )
    try:
        min_cos = float(min_cos)
    except (TypeError, ValueError):
        raise DpaggError(f"min_cos={min_cos!r} must be a number in (-1, 1]") from None
    if not -1.0 < min_cos <= 1.0:
        raise DpaggError(f"min_cos={min_cos!r} must be a number in (-1, 1]")
    cands = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise DpaggError(f"candidate k={k!r} must be a positive integer")
        cands.append(int(k))
    cands = sorted(set(cands))
    if not cands:
        raise DpaggError("choose_k needs at least one candidate k")

    cos: dict[int, list[float]] = {k: [] for k in cands}
    why: dict[int, str] = {}
    flat, centre = public.flat(), public.flat_centre()
    for g in range(len(names)):
        rest = np.flatnonzero(codes != g)
        fit = PublicEmbeddings(
            vectors={key: public.vectors[key][torch.from_numpy(rest)] for key in public.keys},
            model_family=public.model_family,
            base_model_id=public.base_model_id,
            centre=public.centre,
            initializer=public.initializer,
        )
        d = flat[codes == g].mean(axis=0) - centre  # the held-out style's mean delta, [D]
        dn = float(np.linalg.norm(d))
        for k in cands:
            if k in why:
                continue
            try:
                basis = basis_from_public_embeddings(fit, k)
            except DpaggError as exc:
                why[k] = f"holding out style {names[g]!s}: {exc}"
                continue
            p = basis.lift(basis.project(d))
            pn = float(np.linalg.norm(p))
            # a held-out mean at the centre loses nothing; a projection of 0 keeps nothing
            c = 1.0 if dn == 0.0 else (0.0 if pn == 0.0 else float(d @ p) / (dn * pn))
            cos[k].append(c)
    rows = []
    for k in cands:
        if k in why:
            rows.append({"k": k, "cos_min": None, "cos_mean": None, "usable": False, "why": why[k]})
        else:
            c = np.asarray(cos[k])
            rows.append(
                {"k": k, "cos_min": float(c.min()), "cos_mean": float(c.mean()), "usable": True}
            )
    usable = [r for r in rows if r["usable"]]
    if not usable:
        raise DpaggError(
            f"no candidate k in {cands} can be fitted with one public style left out "
            f"({rows[0]['why']}); add public images or pass a smaller --k"
        )
    ok = [r for r in usable if r["cos_mean"] >= min_cos]
    if ok:
        chosen, met = ok[0], True
    else:
        chosen, met = max(usable, key=lambda r: (r["cos_mean"], -r["k"])), False
    return KChoice(
        k=int(chosen["k"]), met=met, min_cos=min_cos, rows=tuple(rows), groups=len(names)
    )


def subspace_clip_norms(public: Any, basis: PublicBasis, quantile: float = 0.5) -> dict[str, float]:
    """The clip norm C for a release in ``basis``'s subspace, from PUBLIC embeddings only: the
    ``quantile`` of ``||U^T (x_i - c)||`` over the public images, around the initializer centre
    they were trained from (``initializer``) and around their own mean (``public_mean``, the
    centre ``centre='public_mean'`` clips around). The clipping happens in the K coordinates, so
    this, not the full-space distance, is the C to pass with ``--basis``. ``bench/
    reproduce_paper.py`` uses the median (``quantile=0.5``). Refuses private input (invariant 2).
    """
    refuse_private(public, "subspace_clip_norms")
    if isinstance(public, (str, os.PathLike)):
        public = load_public_embeddings(public)
    if not isinstance(public, PublicEmbeddings):
        raise DpaggError(
            f"subspace_clip_norms takes PublicEmbeddings or their file, got {type(public).__name__}"
        )
    if not 0.0 < float(quantile) <= 1.0:
        raise DpaggError(f"quantile={quantile!r}: pass a number in (0, 1]")
    flat = public.flat()
    check_basis(basis, flat_dim=flat.shape[1], base_model_id=public.base_model_id)
    out = {}
    for kind, centre in (("initializer", public.flat_centre()), ("public_mean", flat.mean(axis=0))):
        norms = np.linalg.norm(basis.project(flat - centre), axis=1)
        out[kind] = float(np.quantile(norms, quantile))
    return out

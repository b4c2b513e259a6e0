"""Embedding sets: the n per-image embeddings of one kind, for one base model (PRIVATE DATA).

:class:`EmbeddingSet` holds ``[n, v, dim]`` per tensor key. Each row is a function of one private
image, so it may leak that image (docs/privacy.md invariant 4): sets are kept in memory, or with
:func:`dpagg_core.io.private_file.save_private` in a private file that is marked as such and is
refused in any folder that prompts read embeddings from. The released file of one noised mean
(:mod:`dpagg_core.io.released_file`) has one ``[v, dim]`` tensor per key of the same family.

Tensor keys per model family (:data:`KEYS_BY_FAMILY`): ``emb_params`` (sd1 / sd2), ``clip_l`` and
``clip_g`` (sdxl; ``clip_l`` must be the narrower, so the keys can never be swapped silently),
``image_embeds`` (clip_vision). Widths are not pinned to the real models' (tiny test models use
32 / 64).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dpagg_core.errors import DpaggError
from dpagg_core.families import FAMILIES as FAMILIES  # re-exported: io.embeddings.FAMILIES
from dpagg_core.families import KEYS_BY_FAMILY as KEYS_BY_FAMILY
from dpagg_core.families import KIND_OF_FAMILY, KINDS
from dpagg_core.families import family_keys as _family_keys

# Header key marking a private per-image file (``private_file``); every reader of embedding files
# checks it, so a private set is never taken for a released embedding.
PRIVATE_MARKER = "dpagg_private_embedding_set"

# CLIP's context is 77 tokens including BOS and EOS.
MAX_TI_VECTORS = 75


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.array(x, copy=True, order="C"))
    if not isinstance(x, torch.Tensor):
        raise DpaggError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x.detach().to("cpu")


def _check_float32_finite(t: torch.Tensor, what: str) -> None:
    if t.dtype != torch.float32:
        raise DpaggError(
            f"{what} has dtype {t.dtype}; embeddings must be float32 (cast with .float())"
        )
    if t.numel() == 0:
        raise DpaggError(f"{what} is empty (shape {tuple(t.shape)}); it needs at least one value")
    if not bool(torch.isfinite(t).all()):
        raise DpaggError(f"{what} contains NaN or inf; re-run the per-image training for it")


def _checked_centre(
    centre: Any, vectors: Mapping[str, torch.Tensor], owner: str, *, cast: bool = False
) -> dict[str, torch.Tensor]:
    """The public ``centre`` ``{key: [v, dim]}`` of a set whose ``vectors`` are ``[n, v, dim]``,
    validated (exactly the same keys, one embedding's shape, finite float32) and contiguous.
    ``cast``: convert to float32 first instead of refusing another dtype."""
    keys = list(vectors)
    if not isinstance(centre, Mapping) or set(centre) != set(keys):
        raise DpaggError(f"{owner}.centre must have exactly the keys {keys}")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        c = _as_tensor(centre[key], f"centre[{key!r}]")
        if cast:
            c = c.to(torch.float32)
        if tuple(c.shape) != tuple(vectors[key].shape[1:]):
            raise DpaggError(
                f"centre[{key!r}] has shape {tuple(c.shape)}; it must be "
                f"{tuple(vectors[key].shape[1:])} (one [vectors, dim] embedding)"
            )
        _check_float32_finite(c, f"centre[{key!r}]")
        out[key] = c.contiguous()
    return out


# --------------------------------------------------------------------------------------------
# EmbeddingSet
# --------------------------------------------------------------------------------------------


class KeyedVectors:
    """Shapes and flattening of ``vectors[key]`` ``[n, v, dim]`` in the canonical key order
    ``_keys`` with an optional ``centre[key]`` ``[v, dim]``: one implementation for the private
    :class:`EmbeddingSet` and ``public_embeddings.PublicEmbeddings`` (which stay distinct types)."""

    vectors: dict[str, torch.Tensor]
    centre: dict[str, torch.Tensor] | None
    _keys: tuple[str, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        """Tensor keys in canonical (flattening) order."""
        return self._keys

    @property
    def n(self) -> int:
        return int(self.vectors[self._keys[0]].shape[0])

    @property
    def num_vectors(self) -> int:
        return int(self.vectors[self._keys[0]].shape[1])

    def flat(self) -> np.ndarray:
        """All embeddings as float64 ``[n, D]``, keys concatenated in canonical order.

        The mechanism clips each row of this matrix to L2 norm C: the norm is taken over the whole
        embedding (all keys and vectors), so one image changes at most one row.
        """
        parts = [self.vectors[k].reshape(self.n, -1).double() for k in self._keys]
        return torch.cat(parts, dim=1).numpy().copy()

    def flat_centre(self) -> np.ndarray | None:
        """The public centre flattened like :meth:`flat` (float64 ``[D]``), or None."""
        if self.centre is None:
            return None
        return torch.cat([self.centre[k].reshape(-1).double() for k in self._keys]).numpy().copy()


@dataclass(eq=False)
class EmbeddingSet(KeyedVectors):
    """n per-image embeddings of one kind, for one base model. PRIVATE DATA.

    ``vectors[key]`` is float32 ``[n, v, dim]``; keys are exactly those of the released file of
    ``model_family`` (see module docstring). Row i of every key depends only on image i and public
    inputs (invariant 1), which is what makes the mean's replace-one sensitivity ``2C/n`` after
    clipping each row's flattened vector to norm C.

    ``centre`` is a *public* embedding ``[v, dim]`` per key (e.g. the initializer token's
    embedding): the mechanism clips around it, so it must never be computed from the images
    (invariant 2). ``dataset_id`` is the keyed id from :func:`~dpagg_core.io.images.dataset_id_for`
    (under the ledger's identity key); the ledger keys budgets on it.
    """

    vectors: dict[str, torch.Tensor]
    kind: str
    model_family: str
    base_model_id: str = ""
    centre: dict[str, torch.Tensor] | None = None
    initializer: str | None = None
    dataset_id: str = ""
    _keys: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DpaggError(f"kind={self.kind!r} is unknown; use one of {list(KINDS)}")
        keys = _family_keys(self.model_family)
        if KIND_OF_FAMILY[self.model_family] != self.kind:
            raise DpaggError(
                f"kind={self.kind!r} does not match model_family={self.model_family!r}; "
                f"that family takes kind={KIND_OF_FAMILY[self.model_family]!r}"
            )
        if not isinstance(self.vectors, Mapping) or set(self.vectors) != set(keys):
            got = sorted(self.vectors) if isinstance(self.vectors, Mapping) else self.vectors
            raise DpaggError(
                f"EmbeddingSet.vectors for {self.model_family} must have exactly the keys "
                f"{list(keys)}, got {got}"
            )
        for name, val in (("base_model_id", self.base_model_id), ("dataset_id", self.dataset_id)):
            if not isinstance(val, str):
                raise DpaggError(f"EmbeddingSet.{name} must be a string, got {type(val).__name__}")
        if self.initializer is not None and not isinstance(self.initializer, str):
            raise DpaggError("EmbeddingSet.initializer must be a string or None")
        vecs: dict[str, torch.Tensor] = {}
        n = v = None
        for key in keys:
            t = _as_tensor(self.vectors[key], f"vectors[{key!r}]")
            if t.dim() != 3:
                raise DpaggError(
                    f"vectors[{key!r}] has shape {tuple(t.shape)}; it must be 3-D [n, vectors, dim]"
                )
            _check_float32_finite(t, f"vectors[{key!r}]")
            if n is None:
                n, v = t.shape[0], t.shape[1]
            elif t.shape[0] != n:
                raise DpaggError(
                    f"vectors[{key!r}] holds {t.shape[0]} images but {keys[0]!r} holds {n}; "
                    "every key needs one row per image"
                )
            elif t.shape[1] != v:
                raise DpaggError(
                    f"vectors[{key!r}] has {t.shape[1]} vectors per image but {keys[0]!r} has {v}"
                )
            vecs[key] = t.contiguous()
        if self.kind == "textual_inversion" and v > MAX_TI_VECTORS:
            raise DpaggError(f"{v} vectors per token do not fit CLIP's 77-token context; use <= 75")
        if self.model_family == "sdxl" and vecs["clip_l"].shape[2] >= vecs["clip_g"].shape[2]:
            raise DpaggError(
                "SDXL 'clip_l' must be narrower than 'clip_g' (768 vs 1280); the keys look swapped"
            )
        self.vectors = vecs
        if self.centre is not None:
            self.centre = _checked_centre(self.centre, vecs, "EmbeddingSet")
        self._keys = keys

    # --- shapes (keys, n, num_vectors, flat, flat_centre: KeyedVectors) ---------------------

    @property
    def encoder_widths(self) -> dict[str, int]:
        """Embedding width per key, e.g. ``{'clip_l': 768, 'clip_g': 1280}``."""
        return {k: int(self.vectors[k].shape[2]) for k in self._keys}

    @property
    def flat_dim(self) -> int:
        """D, the length of one flattened embedding (sum over keys of vectors * width)."""
        return sum(self.num_vectors * w for w in self.encoder_widths.values())

    # --- flattening (what the mechanism works on) -------------------------------------------

    def unflat(self, vec: np.ndarray) -> dict[str, torch.Tensor]:
        """Inverse of one row of :meth:`flat`: ``[D]`` -> ``{key: float32 [v, dim]}``."""
        arr = np.asarray(vec, dtype=np.float64)
        if arr.shape != (self.flat_dim,):
            raise DpaggError(
                f"unflat needs a vector of shape ({self.flat_dim},) for this set, got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise DpaggError("unflat got NaN or inf values")
        out: dict[str, torch.Tensor] = {}
        start = 0
        for key, width in self.encoder_widths.items():
            size = self.num_vectors * width
            part = arr[start : start + size].reshape(self.num_vectors, width)
            out[key] = torch.from_numpy(part.astype(np.float32))
            start += size
        return out

    def __repr__(self) -> str:
        """Shapes and public labels only: the vectors are private (docs/privacy.md invariant 4),
        and a repr reaches UIs (ComfyUI's Preview Any), logs and tracebacks."""
        shapes = {k: tuple(self.vectors[k].shape) for k in self._keys}
        return (
            f"EmbeddingSet(kind={self.kind!r}, model_family={self.model_family!r}, n={self.n}, "
            f"shapes={shapes}, base_model_id={self.base_model_id!r}, "
            f"centre={'public' if self.centre is not None else None}, "
            f"dataset_id={self.dataset_id!r}; per-image vectors are private and not shown)"
        )

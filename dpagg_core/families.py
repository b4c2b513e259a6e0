"""Model families and the tensor keys of their embeddings (a bottom-layer constant table).

Tensor keys per model family (:data:`KEYS_BY_FAMILY`): ``emb_params`` (sd1 / sd2), ``clip_l`` and
``clip_g`` (sdxl; ``clip_l`` must be the narrower, so the keys can never be swapped silently),
``image_embeds`` (clip_vision). It lives below every layer (like ``errors`` and ``paths``) because
both the public basis (``privacy.basis``) and the embedding files (``io``) lay vectors out in
this order.
"""

from __future__ import annotations

from dpagg_core.errors import DpaggError

KINDS = ("textual_inversion", "clip_image")
FAMILIES = ("sd1", "sd2", "sdxl", "clip_vision")
# Tensor keys, in the canonical order used by ``flat``/``unflat``, per model family.
KEYS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "sd1": ("emb_params",),
    "sd2": ("emb_params",),
    "sdxl": ("clip_l", "clip_g"),
    "clip_vision": ("image_embeds",),
}
KIND_OF_FAMILY = {
    "sd1": "textual_inversion",
    "sd2": "textual_inversion",
    "sdxl": "textual_inversion",
    "clip_vision": "clip_image",
}


def family_keys(model_family: str) -> tuple[str, ...]:
    """The tensor keys of ``model_family`` in canonical order; DpaggError for an unknown one."""
    if model_family not in KEYS_BY_FAMILY:
        raise DpaggError(f"model_family={model_family!r} is unknown; use one of {list(FAMILIES)}")
    return KEYS_BY_FAMILY[model_family]


# Values per token vector of each family's text encoders, all keys together (CLIP ViT-L 768,
# OpenCLIP ViT-H 1024, SDXL both 768 + 1280): the full-space K of a release without a basis.
TOKEN_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}


def full_space_k(model_family: str, vectors: int) -> int:
    """K, the noised coordinates of a release without a public basis: vectors x token width."""
    if model_family not in TOKEN_WIDTH:
        raise DpaggError(f"model_family={model_family!r}: no token width (use sd1, sd2 or sdxl)")
    return int(vectors) * TOKEN_WIDTH[model_family]

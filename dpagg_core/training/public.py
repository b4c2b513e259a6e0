"""What a release takes from PUBLIC images, built once for every front end: per-image TI of
public pictures (:func:`train_public_embeddings`), and from a folder of them the basis, the
choice of k and the clip norms (:func:`build_public_basis`, used by ``dpagg public-basis``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpagg_core.errors import DpaggError
from dpagg_core.io.public_embeddings import PublicEmbeddings
from dpagg_core.training.ti import train_vectors


def train_public_embeddings(
    backend: Any,
    images: torch.Tensor,
    config: Any,
    *,
    progress: Any = None,
) -> PublicEmbeddings:
    """Per-image TI of PUBLIC ``images`` (``[N, 3, H, W]`` in ``[-1, 1]``) through the same
    ``dpagg_core.training.ti.train_vectors`` loop the private sets use (same model, initializer,
    vectors, steps), returned as :class:`PublicEmbeddings`. Pass only images you may publish."""
    vectors, centre = train_vectors(backend, images, config, progress=progress)
    return PublicEmbeddings(
        vectors={k: t.to(torch.float32) for k, t in vectors.items()},
        model_family=backend.model_family,
        base_model_id=backend.base_model_id or "",
        centre=centre,
        initializer=config.initializer,
    )


def public_style_folders(folder: Path) -> list[Path]:
    """The immediate, non-hidden subfolders of ``folder`` that hold at least one image file: one
    PUBLIC style each, for choosing k by leaving one style out. Refuses fewer than 3 styles and
    loose images beside them (they would belong to no style)."""
    from dpagg_core.io.images import IMAGE_EXTENSIONS

    def is_image(p: Path) -> bool:
        return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS

    if not folder.is_dir():
        raise DpaggError(f"the public images folder {folder} is not a folder")
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
    styles = [
        e
        for e in entries
        if e.is_dir() and not e.name.startswith(".") and any(is_image(f) for f in e.iterdir())
    ]
    loose = [e.name for e in entries if is_image(e)]
    if len(styles) < 3:
        raise DpaggError(
            f"choosing k automatically needs the public folder {folder} to hold at least 3 "
            f"subfolders of images, one per PUBLIC style (found {len(styles)}): k is chosen by "
            "holding out one style at a time. Put the public images in >= 3 subfolders, one per "
            "style, or give k explicitly (e.g. --k 16)."
        )
    if loose:
        raise DpaggError(
            f"choosing k automatically reads one subfolder per PUBLIC style, but {folder} also "
            f"holds {len(loose)} image(s) outside them ({', '.join(loose[:5])}"
            f"{' ...' if len(loose) > 5 else ''}); move them into a style subfolder"
        )
    return styles


@dataclass(frozen=True, eq=False)
class PublicBasisBuild:
    """A basis built from PUBLIC pictures: their embeddings (with the keyed ids of their source
    pictures), the basis, the choice of k (``auto``), the style folders and the suggested C."""

    public: PublicEmbeddings
    basis: Any
    clip_norms: dict[str, float]
    choice: Any = None
    styles: tuple[str, ...] = ()


def build_public_basis(
    trainer: Any,
    folder: Path,
    k: int | str,
    *,
    ledger: Any,
    progress: Callable[[int, int], None] | None = None,
) -> PublicBasisBuild:
    """Everything a release takes from PUBLIC pictures, built in one place for every front end:
    per-image TI of the pictures of ``folder`` (``k='auto'``: one subfolder per style, k chosen by
    leaving one style out, ``aggregate.basis_choice.choose_k``) on ``trainer``'s model with its
    TI settings, the basis of their embeddings, and the clip norms around the initializer and the
    public mean in that basis. The pictures are loaded as PUBLIC (``images.load_image_folder(
    public=True)``: any picture ``ledger`` knows as private is refused by name), and the keyed
    ids of the source pictures go into the embeddings (so a file written from them is checked at
    release). Invariant 8: nothing here reads a private set."""
    from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
    from dpagg_core.aggregate.basis_choice import auto_k_candidates, choose_k, subspace_clip_norms
    from dpagg_core.privacy.identity import image_ids_for

    styles = public_style_folders(folder) if k == "auto" else None
    parts = [trainer.images(f, public=True) for f in (styles or [folder])]
    pixels = torch.cat([part.pixels for part in parts])
    public = train_public_embeddings(trainer.backend, pixels, trainer.config, progress=progress)
    key = ledger.identity_key()
    public.source_ids = tuple(i for part in parts for i in image_ids_for(part.digests, key=key))
    choice = None
    if styles is not None:
        groups = [i for i, part in enumerate(parts) for _ in range(part.count)]
        width = min(int(t.shape[-1]) for t in public.vectors.values())
        choice = choose_k(public, groups, auto_k_candidates(width))
        k = choice.k
    basis = basis_from_public_embeddings(public, int(k))
    return PublicBasisBuild(
        public=public,
        basis=basis,
        clip_norms=subspace_clip_norms(public, basis),
        choice=choice,
        styles=tuple(f.name for f in styles or ()),
    )

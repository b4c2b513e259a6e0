"""What a release takes from PUBLIC images, built once for every front end: per-image TI of
public pictures (:func:`train_public_embeddings`), and from a folder of them the basis, the
choice of k and the clip norms (:func:`build_public_basis`, used by ``dpagg public-basis``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
from dpagg_core.aggregate.basis_choice import auto_k_candidates, choose_k, subspace_clip_norms
from dpagg_core.errors import DpaggError
from dpagg_core.io.public_embeddings import (
    PublicEmbeddings,
    load_public_embeddings,
    public_mean_centre,
    save_public_embeddings,
)
from dpagg_core.privacy.forecast import agreement
from dpagg_core.privacy.identity import image_ids_for
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
    pictures), the basis, the choice of k (``auto``), the style folders and the suggested C.
    ``groups[i]``: the style (index into ``styles``) of public picture i; all 0 for one folder.
    Public through and through, so its repr may show everything."""

    public: PublicEmbeddings
    basis: Any
    clip_norms: dict[str, float]
    choice: Any = None
    styles: tuple[str, ...] = ()
    groups: tuple[int, ...] = ()
    ti_config: Any = None  # the TIConfig the public embeddings were trained with, when known

    def settings_differ(self, config: Any) -> list[str]:
        """The TI settings that shape an embedding (steps, learning rate, vectors, initializer,
        templates, flips) in which ``config`` differs from these public embeddings' (empty when
        unknown): the basis and centre describe embeddings trained like the private ones only
        when they match. Public values only."""
        if self.ti_config is None or config is None:
            return []
        keys = ("steps", "learning_rate", "vectors", "initializer", "templates", "flip")
        mine, theirs = vars(self.ti_config), vars(config)
        return [f"{k} {mine[k]} vs {theirs[k]}" for k in keys if mine.get(k) != theirs.get(k)]

    def centre_vector(self, centre: str) -> np.ndarray | None:
        """The flat centre of kind ``centre`` as these public embeddings give it: their mean
        (``public_mean``), their initializer (``initializer``), or None (``origin``)."""
        if centre == "public_mean":
            return public_mean_centre(self.public).flat()
        return self.public.flat_centre() if centre == "initializer" else None

    def agreement(self, clip_norm: float, centre: str, basis: Any = None) -> float:
        """The forecast's rho (``privacy.forecast.agreement``) measured on these PUBLIC
        embeddings for a release with ``clip_norm`` around the centre of kind ``centre``
        (:meth:`centre_vector`) in ``basis``'s coordinates (None: all D): per public style,
        the median over styles."""
        flat = self.public.flat().astype(np.float64)
        vec = self.centre_vector(centre)
        deltas = flat - (0.0 if vec is None else np.asarray(vec, np.float64))
        coords = basis.project(deltas) if basis is not None else deltas
        labels = np.asarray(self.groups or [0] * len(coords))
        return agreement([coords[labels == g] for g in np.unique(labels)], clip_norm)


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
    styles = public_style_folders(folder) if k == "auto" else None
    parts = [trainer.images(f, public=True) for f in (styles or [folder])]
    pixels = torch.cat([part.pixels for part in parts])
    public = train_public_embeddings(trainer.backend, pixels, trainer.config, progress=progress)
    key = ledger.identity_key()
    public.source_ids = tuple(i for part in parts for i in image_ids_for(part.digests, key=key))
    groups = [i for i, part in enumerate(parts) for _ in range(part.count)]
    return style_from_public(public, k, groups, tuple(f.name for f in styles or ()))


def style_from_public(
    public: PublicEmbeddings,
    k: int | str,
    groups: Sequence[int] = (),
    styles: Sequence[str] = (),
) -> PublicBasisBuild:
    """The basis, the choice of k and the clip norms from PUBLIC embeddings already trained
    (:func:`build_public_basis`'s second half; ComfyUI's Public Style node trains them through
    Per-Image TI): ``k='auto'`` (or 0) chooses k by leaving one style (``groups``: a style index
    per picture, >= 3 styles) out (``aggregate.basis_choice.choose_k``). Public inputs only
    (invariant 8): ``basis_from_public_embeddings`` refuses anything else."""
    labels = tuple(int(g) for g in groups) or (0,) * public.n
    if len(labels) != public.n:
        raise DpaggError(f"groups: one style per public picture ({public.n}), got {len(labels)}")
    choice = None
    if k in ("auto", 0):
        if len(set(labels)) < 3:
            raise DpaggError(
                "k=auto (0) chooses k by holding out one PUBLIC style at a time and needs at "
                f"least 3 styles (found {len(set(labels))}): put the public images in >= 3 "
                "subfolders, one per style, or give k (e.g. 16)"
            )
        width = min(int(t.shape[-1]) for t in public.vectors.values())
        choice = choose_k(public, list(labels), auto_k_candidates(width))
        k = choice.k
    basis = basis_from_public_embeddings(public, int(k))
    return PublicBasisBuild(
        public=public,
        basis=basis,
        clip_norms=subspace_clip_norms(public, basis),
        choice=choice,
        styles=tuple(styles),
        groups=labels,
    )


def cached_public_embeddings(
    cache_dir: Path,
    inputs: Mapping[str, Any],
    train: Callable[[], PublicEmbeddings],
    *,
    ledger: Any,
) -> tuple[PublicEmbeddings, bool]:
    """(embeddings, from_cache): PUBLIC per-image embeddings kept on disk, keyed by what they
    were trained from (``inputs``: JSON values naming the model's weights, the TI settings and
    the keyed ids of the public pictures). Why: a release is keyed by its public centre and
    basis (``request_keys.inputs_request``), so public embeddings trained again after a restart
    (not bit-identical on a GPU) would make an identical release look new and spend again.
    The file is written with the ledger's key and read back only when authentic under it and
    none of its pictures has since been recorded as private
    (``io.public_embeddings.load_public_embeddings``)."""
    digest = hashlib.sha256(json.dumps(dict(inputs), sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"public-{digest[:32]}.safetensors"
    if path.is_file():
        return load_public_embeddings(path, ledger=ledger), True
    public = train()
    save_public_embeddings(public, path, key=ledger.identity_key())
    return public, False

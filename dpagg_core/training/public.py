"""Per-image TI of PUBLIC images, for a public basis or centre (``dpagg public-basis``)."""

from __future__ import annotations

from typing import Any

import torch

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

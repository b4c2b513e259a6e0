"""The training driver of the command line: load a model once, load an image folder through the
canonical decode, train per-image embeddings in memory (one process, or sharded over ``torchrun``
ranks by ``dpagg_core.training.distributed``), with a progress bar on stderr.

Used by ``dpagg train / run / suggest-clip-norm / public-basis`` (``dpagg_core.cli``), the DP-SGD
run (``dpagg_core.training.dpsgd_run``) and the demo (``dpagg_core.showcase.demo``). The
per-image embeddings it returns are private (docs/privacy.md invariant 4): kept in memory, never
written here.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpagg_core.aggregate.basis_builders import load_basis
from dpagg_core.privacy.basis import check_basis
from dpagg_core.training import ti  # ti.train_embeddings read at call time: tests replace it
from dpagg_core.training.diffusers_backend import DiffusersBackend
from dpagg_core.training.distributed import train_distributed, world
from dpagg_core.training.models import load_pipeline
from dpagg_core.training.ti import TIConfig


def progress_bar(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """``(update(done, total), close())`` of a tqdm bar on stderr, shown from the first update."""
    from tqdm.auto import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "b" not in bar:
            bar["b"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        bar["b"].n = done
        bar["b"].refresh()

    def close() -> None:
        if "b" in bar:
            bar["b"].close()

    return update, close


def pick_device(device: str | None = None) -> str:
    """``device`` if given, else the best: CUDA (under torchrun the local rank's GPU) or CPU."""
    if device:
        return device
    if not torch.cuda.is_available():
        return "cpu"
    if world()[1] > 1:  # torchrun: one GPU per rank
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cuda"


class Trainer:
    """Loads the model once, then trains per-image embeddings of an image folder in memory.

    ``method='ti'``: per-image textual inversion with ``config`` on the diffusers model ``model``
    (a ``config.resolution`` of None or 0 means the model's default). ``method='clip'``: CLIP
    image embeddings of the vision model ``model`` at ``config.resolution`` (default 224).
    ``ledger`` (a path, None: the default) keys the image folder's dataset id, so the CLI and the
    ComfyUI nodes give the same pictures the same id."""

    def __init__(
        self,
        model: Path,
        config: TIConfig,
        *,
        method: str = "ti",
        family: str | None = None,
        prediction_type: str | None = None,
        device: str | None = None,
        ledger: Path | None = None,
    ) -> None:
        self.model_path = model
        self.method = method
        self.device = device
        self.ledger = ledger
        self.model = None
        self.backend = None
        self.config = config
        if method == "ti":
            self.model = load_pipeline(
                model, family=family, prediction_type=prediction_type, device=pick_device(device)
            )
            self.backend = DiffusersBackend.from_loaded(self.model)
            self.config = dataclasses.replace(
                config, resolution=config.resolution or self.backend.default_resolution
            )
            self.resolution = int(self.config.resolution)
        else:
            self.resolution = config.resolution or 224

    def images(self, folder: Path, *, public: bool = False):
        """The image folder through the canonical decode (``dpagg_core.io.images``, the same as
        ComfyUI's Load Image) at the training resolution. Logs its own warnings. ``public``:
        PUBLIC pictures (refused where the ledger knows any as private; not registered)."""
        from dpagg_core.io.images import load_image_folder

        return load_image_folder(
            folder, resolution=self.resolution, ledger=self.ledger, public=public
        )

    def basis(self, path: Path):
        """The PUBLIC basis file ``path`` (``privacy.basis.PublicBasis``), refused unless it fits
        this model and ``config.vectors`` (before any training or spend)."""
        backend = self.backend
        return check_basis(
            load_basis(path),
            flat_dim=self.config.vectors * sum(backend.embedding_dims.values()),
            base_model_id=backend.base_model_id or "",
            model_family=backend.model_family,
            vectors=self.config.vectors,
        )

    def train(self, loaded):
        """The per-image ``EmbeddingSet`` of ``loaded`` (``None`` on ranks other than 0)."""
        if self.method == "clip":
            from dpagg_core.training.clip_image import clip_image_embeddings

            return clip_image_embeddings(self.model_path, loaded, device=pick_device(self.device))
        train = train_distributed if world()[1] > 1 else ti.train_embeddings  # torchrun: sharded
        update, close = progress_bar(f"per-image TI ({loaded.count} images)")
        try:
            return train(
                self.backend,
                loaded.pixels,
                self.config,
                dataset_id=loaded.dataset_id,
                progress=update,
            )
        finally:
            close()

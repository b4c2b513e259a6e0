"""The **Per-Image TI** node and its deferred training job: one textual-inversion embedding per
image on ComfyUI's own MODEL/CLIP/VAE, trained by DP Aggregate only when the ledger has no record
of the request (``TrainingJob``; issue 19 item 2)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import (
    load_images,
)
from dpagg_core.privacy.identity import image_ids_for
from dpagg_core.training import ti
from dpagg_core.training.public import cached_public_embeddings, train_public_embeddings

from . import comfy_model_key
from .common import (
    CATEGORY,
    EmbeddingSetIO,
    _first,
    _flatten_images,
    _images_input,
    _log_bar,
    _progress,
    _stage_reporter,
    _ui,
    images_dataset_id,
    ledger_path,
    loaded_dataset_id,
    one_loader_output,
    private_images,
    refit,
    refuse_unstable_loader,
    to_model_images,
)
from .load_public_images import PublicImages


def _make_backend(model: Any, clip: Any, vae: Any):
    """The TI backend on ComfyUI's objects (a seam: CI tests substitute a tiny diffusers one)."""
    from .comfy_backend import ComfyTIBackend

    return ComfyTIBackend(model, clip, vae)


def _model_key(model: Any, clip: Any, vae: Any) -> str:
    """The request key's model part: ComfyUI's objects as patched (a seam, like
    :func:`_make_backend`)."""
    return comfy_model_key.model_key(model, clip, vae)


def _warn_lines(warnings: Sequence[str]) -> list[str]:
    return [f"warning: {w}" for w in warnings]


def training_images(
    hidden: Any, images: Any, resolution: int
) -> tuple[torch.Tensor, str, list[str]]:
    """(``[N, 3, R, R]`` in [-1, 1], dataset id, warnings) of an images input.

    PRIVATE_IMAGES: its pixels (fitted again as the CLI fits pictures, ``images.fit_images``,
    only if ``resolution`` differs) and the id of its carried digests. IMAGE: with a resolution,
    the very processing of the CLI (``images.load_images``: each picture fitted with Lanczos,
    duplicate/size warnings); with 0, the images' own (common) size. Both ids come from
    full-size pictures."""
    loaded = private_images(images)
    if loaded is not None:
        x, warns = loaded.pixels, list(loaded.warnings)
        if resolution and resolution != loaded.resolution:
            if resolution > loaded.resolution:
                warns.append(
                    f"Load Private Images made {loaded.resolution} px images, upscaled here to "
                    f"{resolution} px (blurry): set its resolution to {resolution}"
                )
            x = refit(x, resolution)
        return x, loaded_dataset_id(loaded), warns
    refuse_unstable_loader(hidden)
    imgs = _flatten_images(images)
    if not resolution:
        dataset_id, warns = images_dataset_id(imgs)
        return to_model_images(imgs, 0), dataset_id, warns
    pictures = [img.detach().float().clamp(0, 1) for img in imgs]
    loaded = load_images(pictures, resolution, ledger=ledger_path())
    return loaded.pixels, loaded.dataset_id, list(loaded.warnings)


def public_images(images: Any) -> PublicImages | None:
    """The ``PUBLIC_IMAGES`` of an images input, or None (private or plain IMAGE data)."""
    return one_loader_output(
        images,
        PublicImages,
        "images: connect ONE Load Public Images output, not a mix with others",
    )


def public_pixels(public: PublicImages, resolution: int) -> torch.Tensor:
    """The public pictures at ``resolution`` (0: as loaded), fitted as the CLI fits pictures."""
    if resolution and resolution != public.resolution:
        return refit(public.pixels, resolution)
    return public.pixels


def refuse_public(value: Any, where: str) -> None:
    """A Per-Image TI job of PUBLIC images is never a private set: DP Aggregate and the Privacy
    Accountant refuse it (a release is of private pictures, and n is theirs)."""
    if isinstance(value, TrainingJob) and value.public is not None:
        raise DpaggError(
            f"{where}: this Per-Image TI trains PUBLIC images (Load Public Images); they feed "
            "Public Style or Rehearse. Connect the Per-Image TI of Load Private Images here. "
            "Nothing was spent."
        )


def _ti_config(kw: dict[str, Any]) -> ti.TIConfig:
    return ti.TIConfig(
        steps=int(_first(kw["steps"])),
        learning_rate=float(_first(kw["learning_rate"])),
        vectors=int(_first(kw["vectors"])),
        initializer=str(_first(kw["initializer"])),
        templates=str(_first(kw["templates"])),
        resolution=None,  # resized by the node (lists may mix sizes)
        batch_size=int(_first(kw["batch_size"])),
        seed=int(_first(kw["training_seed"])),
        gradient_checkpointing=bool(_first(kw.get("gradient_checkpointing", False))),
        mixed_precision=str(_first(kw.get("mixed_precision", "no"))),
    )


class PerImageTI(io.ComfyNode):
    """One textual-inversion embedding per image, trained on ComfyUI's own MODEL/CLIP/VAE."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggPerImageTI",
            display_name="Per-Image TI (dpagg)",
            category=CATEGORY,
            description=(
                "Trains one textual-inversion embedding per image (each from its own image only) "
                "on the connected checkpoint. The result is PRIVATE: it stays in memory and only "
                "DP Aggregate turns it into a releasable embedding."
            ),
            is_input_list=True,
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                _images_input(
                    "the private images: Load Private Images (recommended: its dataset id does "
                    "not depend on file names), or an IMAGE batch / list; or Load Public "
                    "Images, for Public Style or Rehearse (never DP Aggregate)",
                    public=True,
                ),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="steps per image"),
                io.Float.Input(
                    "learning_rate", default=5e-3, min=1e-6, max=1.0, step=1e-4, round=False
                ),
                io.Int.Input(
                    "vectors", default=1, min=1, max=ti.MAX_VECTORS, tooltip="vectors per token"
                ),
                io.String.Input(
                    "initializer",
                    default="painting",
                    tooltip="a one-token word; its embedding starts training and is the public "
                    "centre DP Aggregate clips around",
                ),
                io.Combo.Input("templates", options=sorted(ti.TEMPLATES), default="style"),
                io.Int.Input(
                    "resolution",
                    default=512,
                    min=0,
                    max=4096,
                    step=8,
                    tooltip="shorter side resized and centre-cropped to this; 0 keeps the size "
                    "(for Load Private Images: 0 keeps its resolution)",
                ),
                io.Int.Input("batch_size", default=4, min=1, max=256),
                io.Int.Input(
                    "training_seed",
                    default=0,
                    min=0,
                    max=2**63 - 1,
                    control_after_generate=False,
                    tooltip="training randomness only (never the DP noise); keep it fixed so a "
                    "re-run reproduces the same release instead of spending budget again",
                ),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True),
                io.Combo.Input(
                    "mixed_precision", options=["no", "bf16", "fp16"], default="no", optional=True
                ),
            ],
            outputs=[EmbeddingSetIO.Output(display_name="EMBEDDING_SET")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, **kwargs: Any) -> bool | str:
        try:
            ti.validate_config(_ti_config(kwargs))
            res = int(_first(kwargs["resolution"]))
            if res < 0 or res % 8:
                raise DpaggError(f"resolution={res}: use 0 (keep size) or a multiple of 8")
        except (DpaggError, KeyError, TypeError, ValueError) as exc:
            return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, vae, images, **kwargs: Any) -> io.NodeOutput:
        config = _ti_config(kwargs)
        ti.validate_config(config)
        resolution = int(_first(kwargs["resolution"]))
        public = public_images(images)
        if public is not None:
            x, dataset_id, warns = public_pixels(public, resolution), "", list(public.warnings)
        else:
            x, dataset_id, warns = training_images(cls.hidden, images, resolution)
        model, clip, vae = _first(model), _first(clip), _first(vae)
        with _make_backend(model, clip, vae) as backend:  # checks the models; changes nothing
            family, prediction = backend.model_family, backend.prediction_type
            widths = ", ".join(f"{k} {w}" for k, w in backend.embedding_dims.items())
        job = TrainingJob(
            model=model,
            clip=clip,
            vae=vae,
            pixels=x,
            config=config,
            dataset_id=dataset_id,
            node_id=getattr(cls.hidden, "unique_id", None),
            public=public,
        )
        head = (
            f"{job.n} images to train one embedding each ({family}, {prediction}, "
            f"{config.vectors} vector(s), {widths})"
        )
        if public is not None:
            lines = [
                head,
                "PUBLIC images: deferred until Public Style or Rehearse needs them; never "
                "released by DP Aggregate",
            ]
        else:
            lines = [
                head,
                "deferred: DP Aggregate trains them only if the ledger has no record of this "
                "exact request (a recorded one is answered untrained, spending nothing)",
                "private: kept in memory only; release them with DP Aggregate",
                f"image set {dataset_id}",
            ]
        lines += _warn_lines(warns)
        ui = _ui("Per-Image TI", lines, dataset=dataset_id, prediction=prediction)
        return io.NodeOutput(job, ui=ui)


class TrainingJob:
    """Per-Image TI's ``EMBEDDING_SET``: the training it deferred (issue 19 item 2). It carries
    the MODEL/CLIP/VAE objects, the private pixels ``[n, 3, R, R]``, the TI config and the image
    set's id, and trains only when asked: DP Aggregate first asks the ledger for the identical
    request (the pipeline: ``dpagg_core.pipeline.train_and_release``) and trains on
    ``NotRecorded`` only, so nothing trains on a recorded request. Any other consumer calls
    :meth:`materialize` (trains once; the set is kept, as ComfyUI kept Per-Image TI's output).

    Private like an ``EmbeddingSet`` (docs/privacy.md invariant 4): in memory only; ``repr``
    shows public labels only. ``n``, ``dataset_id`` and ``kind`` are public (the Privacy
    Accountant reads them without training). The pipeline sees it as its images (``pixels``,
    ``count``, ``dataset_id``) and, through :meth:`trainer`, as its trainer."""

    kind = "textual_inversion"

    def __init__(
        self,
        *,
        model: Any,
        clip: Any,
        vae: Any,
        pixels: torch.Tensor,
        config: ti.TIConfig,
        dataset_id: str,
        node_id: Any = None,
        public: PublicImages | None = None,
    ) -> None:
        self._models = (model, clip, vae)
        self.public = public  # PUBLIC pictures (Load Public Images): never a release's set
        self.pixels = pixels
        self.config = config
        self.dataset_id = dataset_id
        self.node_id = node_id
        self._eset: EmbeddingSet | None = None
        self._model_key: str | None = None
        self.trained_here = 0  # trainings run by this job (tests, node messages)

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])

    count = n

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[-1])

    def __repr__(self) -> str:
        return (
            f"TrainingJob(kind={self.kind!r}, n={self.n}, resolution={self.resolution}, "
            f"dataset_id={self.dataset_id!r}, trained={self._eset is not None}; the images "
            "and per-image vectors are private and not shown)"
        )

    def model_weights(self) -> str:
        """The request key's model part: the models as patched (computed once per job)."""
        if self._model_key is None:
            self._model_key = _model_key(*self._models)
        return self._model_key

    @contextlib.contextmanager
    def trainer(self, node_id: Any = None) -> Iterator[_JobTrainer]:
        """The pipeline's trainer over this job's models (ComfyUI's objects are restored on
        leaving): progress and stage text go to ``node_id`` (the running node)."""
        with _make_backend(*self._models) as backend:
            yield _JobTrainer(self, backend, self.node_id if node_id is None else node_id)

    def subset(self, rows: Sequence[int]) -> TrainingJob:
        """A job of PUBLIC pictures ``rows`` only (a rehearsal's n of the folder), untrained."""
        if self.public is None:
            raise DpaggError("internal: only a job of PUBLIC images is subset")
        rows = list(rows)
        picked = PublicImages(
            pixels=self.public.pixels[rows],
            digests=[self.public.digests[i] for i in rows],
            groups=tuple(self.public.groups[i] for i in rows),
            styles=self.public.styles,
            folder=self.public.folder,
        )
        sub = TrainingJob(
            model=self._models[0],
            clip=self._models[1],
            vae=self._models[2],
            pixels=self.pixels[rows],
            config=self.config,
            dataset_id=self.dataset_id,
            node_id=self.node_id,
            public=picked,
        )
        sub._model_key = self._model_key
        return sub

    def public_embeddings(self, cache_dir: Path, ledger: Any, node_id: Any = None):
        """(PublicEmbeddings, from_cache) of this job's PUBLIC pictures, trained through the
        same ``ti.train_vectors`` loop as a private set (``training.public.
        train_public_embeddings``) and kept on disk keyed by the model, the TI settings, the
        resolution and the pictures (``training.public.cached_public_embeddings``: the same
        public centre and basis after a restart, so an identical release is not charged again)."""
        if self.public is None:
            raise DpaggError(
                "Public Style / Rehearse take the Per-Image TI of Load Public Images, never of "
                "private images (docs/privacy.md invariant 8)"
            )
        key = ledger.identity_key()
        ids = image_ids_for(self.public.digests, key=key)
        inputs = {
            "kind": "dpagg-public-embeddings-cache/1",
            "config": {k: str(v) for k, v in dataclasses.asdict(self.config).items()},
            "resolution": self.resolution,
            "model_weights": self.model_weights(),
            "pictures": ids,
        }

        def train() -> Any:
            with self.trainer(node_id) as trainer:
                public = trainer.train_public(self)
            public.source_ids = tuple(ids)
            return public

        return cached_public_embeddings(cache_dir, inputs, train, ledger=ledger)

    def materialize(self, node_id: Any = None) -> EmbeddingSet:
        """The trained per-image set (trains on the first call)."""
        if self._eset is None:
            with self.trainer(node_id) as trainer:
                trainer.train(self)
        assert self._eset is not None
        return self._eset


class _JobTrainer:
    """``pipeline`` trainer of a :class:`TrainingJob`: per-image TI on ComfyUI's objects with
    ComfyUI's progress bar (each update a cancel point), the Interrupt button polled before
    every step, setup stages on the node and a tqdm line in the server log."""

    method = "ti"

    def __init__(self, job: TrainingJob, backend: Any, node_id: Any) -> None:
        self.job, self.backend, self.node_id = job, backend, node_id
        self.config = job.config
        self.resolution = job.resolution
        self.model_weights = job.model_weights()

    @contextlib.contextmanager
    def _bars(self) -> Iterator[tuple[Any, Any, Any]]:
        """(progress, should_cancel, stage) of one training: ComfyUI's bar, the node's stage
        text and a tqdm line in the server log."""
        chunks = math.ceil(self.job.n / self.config.batch_size)
        progress, should_cancel = _progress(self.config.steps * chunks)
        stage = _stage_reporter(self.node_id, "Per-Image TI")
        progress, close_bar = _log_bar(
            self.config.steps * chunks, "Per-Image TI", progress, stage=stage
        )
        try:
            yield progress, should_cancel, stage
        finally:
            close_bar()
        stage("done")

    def train(self, loaded: Any) -> EmbeddingSet:
        job = self.job
        if job._eset is not None:  # trained before (ComfyUI kept this job): no second training
            return job._eset
        with self._bars() as (progress, should_cancel, stage), torch.inference_mode(False):
            x = job.pixels.clone()  # a normal tensor (ComfyUI runs nodes in inference mode)
            stage(f"{x.shape[0]} images; recording the model's state (restored afterwards)")
            eset = ti.train_embeddings(
                self.backend,
                x,
                self.config,
                dataset_id=job.dataset_id,
                progress=progress,
                should_cancel=should_cancel,
                stage=stage,
            )
        job._eset = eset
        job.trained_here += 1
        return eset

    def train_public(self, job: TrainingJob) -> Any:
        """PublicEmbeddings of a job of PUBLIC pictures (the same TI loop and settings)."""
        with self._bars() as (progress, _should_cancel, stage), torch.inference_mode(False):
            stage(f"{job.n} PUBLIC images; recording the model's state (restored afterwards)")
            public = train_public_embeddings(
                self.backend, job.pixels.clone(), self.config, progress=progress
            )
        job.trained_here += 1
        return public

"""The vocabulary of per-image textual inversion: its settings (:class:`TIConfig`) and their
validation, the prompt templates, and the backend protocol a host implements
(:class:`TIBackend`). The training loop that uses them is ``dpagg_core.training.ti``, which
re-exports every name here; split out so that neither module passes ~600 lines (issue 19
item 4)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

import torch

from dpagg_core import options
from dpagg_core.errors import DpaggError

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Templates (Gal et al. 2022, as in diffusers examples/textual_inversion/textual_inversion.py).
# '{}' marks where the placeholder's v trainable vectors go.
# ----------------------------------------------------------------------------------------------

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)

STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)

TEMPLATES: dict[str, tuple[str, ...]] = {"style": STYLE_TEMPLATES, "object": OBJECT_TEMPLATES}

PLACEHOLDER = "{}"
MAX_VECTORS = 8


class Cancelled(RuntimeError):
    """Training was cancelled by ``should_cancel()``; nothing partial is returned."""


# ----------------------------------------------------------------------------------------------
# Backend protocol
# ----------------------------------------------------------------------------------------------


class LatentDist(NamedTuple):
    """Per-image latent posterior in the backend's latent space (what ``predict`` consumes).

    ``mean``: ``[B, C, h, w]``. ``std``: same shape, or ``None`` when the backend only has a
    deterministic encoding (the trainer then always uses ``mean``).
    """

    mean: torch.Tensor
    std: torch.Tensor | None


@runtime_checkable
class TIBackend(Protocol):
    """What the TI trainer needs from a model. Implementations hold *frozen* models.

    Every method must treat the batch dimension as independent samples: output row b may depend
    only on input row b (and on frozen weights). Models must be in eval mode with no dropout and no
    batch-statistics layers; the backend never modifies the token-embedding matrix (placeholders
    are substituted in the embedding *output*), so all non-placeholder rows stay bit-identical.

    Attributes
    ----------
    model_family:
        ``'sd1' | 'sd2' | 'sdxl'``; recorded in the ``EmbeddingSet``.
    base_model_id:
        Public identifier of the checkpoint (e.g. a hash or repo id); may be ``''``.
    encoder_keys:
        Keys of the trainable vectors, exactly as in the released file: ``('emb_params',)`` for
        SD1/SD2, ``('clip_l', 'clip_g')`` for SDXL.
    embedding_dims:
        Token-embedding width per key, e.g. ``{'emb_params': 768}`` or
        ``{'clip_l': 768, 'clip_g': 1280}``.
    prediction_type:
        ``'epsilon' | 'v_prediction'`` (informational; ``training_target`` implements it).
    num_train_timesteps:
        Timesteps are drawn uniformly from ``range(num_train_timesteps)``.
    device:
        Where ``encode_images``/``encode_prompts``/``predict`` run; the trainer moves its inputs
        (images, noise, trainable vectors) there.
    dtype:
        The dtype of the frozen weights. Trainable vectors are kept in float32, or float64 when
        this is float64 (used by the independence tests).
    """

    model_family: str
    base_model_id: str
    encoder_keys: tuple[str, ...]
    embedding_dims: dict[str, int]
    prediction_type: str
    num_train_timesteps: int
    device: torch.device
    dtype: torch.dtype

    def prepare(self, *, gradient_checkpointing: bool) -> None:
        """Freeze all weights (``requires_grad_(False)``), set eval mode, load models onto
        ``device``, and enable gradient checkpointing where the models support it."""
        ...

    def initializer_embedding(self, text: str) -> dict[str, torch.Tensor]:
        """Token-embedding rows of ``text`` (no BOS/EOS/padding), per key: ``[k, dim]`` where
        ``k`` is the number of tokens ``text`` tokenizes to (the same for every key). The trainer
        decides what to do with ``k != 1``. Returned on CPU, float32 or float64."""
        ...

    def encode_images(self, images: torch.Tensor) -> LatentDist:
        """Images ``[B, 3, H, W]`` in ``[-1, 1]`` (on ``device``) -> latent posterior (already in
        the scaled space ``predict`` expects, e.g. times ``vae.config.scaling_factor``). Called
        once per image (and once per flipped copy) under ``torch.no_grad()``."""
        ...

    def encode_prompts(
        self, templates: Sequence[str], vectors: dict[str, torch.Tensor], *, image_size: int
    ) -> Any:
        """Conditioning for a batch of prompts with trainable placeholder vectors.

        ``templates[b]`` contains exactly one ``'{}'``; it is replaced by ``v`` placeholder slots
        whose token embeddings are ``vectors[key][b]`` (``[B, v, dim]`` per key, differentiable;
        gradients must flow back to them). ``image_size`` is the training resolution in pixels
        (SDXL uses it for its size/crop time ids). Returns an opaque conditioning object that
        ``predict`` consumes (SD1/SD2: hidden states; SDXL: hidden states plus pooled embeddings
        and time ids)."""
        ...

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward diffusion: ``x_t`` for integer ``timesteps`` ``[B]`` (on ``device``)."""
        ...

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What ``predict`` should output: ``noise`` for epsilon models, the velocity for
        v-prediction models."""
        ...

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """Denoiser output at ``timesteps`` given ``encode_prompts``' conditioning,
        same shape as ``noisy``."""
        ...


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

MixedPrecision = Literal["no", "bf16", "fp16"]


@dataclass(frozen=True)
class TIConfig:
    """Textual-inversion hyper-parameters. All of them are public (they never depend on images).

    ``learning_rate``: AdamW step size. With ``scale_lr`` it is multiplied by ``batch_size`` (the
    configured value, not the size of the current chunk, so an image's trajectory never depends
    on how many images share its chunk). Because the loss is a *sum* of per-image losses, no
    scaling is needed for correctness; the option only mirrors the usual TI recipe.
    ``vectors``: placeholder vectors per image, 1..8.
    ``initializer``: text whose token embedding initialises every vector and is the public centre
    of the released mean. It must be one token, unless ``multi_token_initializer='average'``, in
    which case the mean of its token embeddings is used.
    ``templates``: ``'style'`` or ``'object'`` (Gal et al.'s small ImageNet template lists) or an
    explicit sequence of strings each with one ``'{}'``.
    ``resolution``: images are resized (shorter side) and centre-cropped to this size; ``None``
    keeps the given size (must be a multiple of 8).
    ``batch_size``: images trained together; larger sets are split into chunks trained one after
    the other, each fully and independently.
    ``flip``: random horizontal flip per image per step (both latents are encoded once).
    ``sample_latents``: draw the VAE latent from its posterior (mean + std * eps, eps from the
    image's own generator) each step; otherwise use the posterior mean.
    ``mixed_precision``: ``'no'`` (fp32), ``'bf16'`` or ``'fp16'`` autocast on CUDA (trainable
    vectors and optimizer state stay float32). On CPU ``'bf16'`` falls back to fp32 with a warning
    and ``'fp16'`` is refused. fp16 uses a fixed, public loss scale (``fp16_loss_scale``); in both
    modes a row whose gradient is not finite gets a zero gradient for that step (decided per row:
    a global overflow skip, as in ``GradScaler``, would couple images).
    ``seed``: drives only the TI randomness (timesteps, noise, template, flip, latent sample).
    """

    steps: int = 500
    learning_rate: float = 5e-3
    scale_lr: bool = False
    vectors: int = 1
    initializer: str = "painting"
    multi_token_initializer: Literal["error", "average"] = "error"
    templates: str | tuple[str, ...] = "style"
    resolution: int | None = None
    batch_size: int = 8
    flip: bool = True
    sample_latents: bool = True
    mixed_precision: MixedPrecision = "no"
    fp16_loss_scale: float = 1024.0
    gradient_checkpointing: bool = False
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def resolve_templates(templates: str | Sequence[str]) -> tuple[str, ...]:
    """The template list for ``TIConfig.templates`` (a preset name or explicit strings)."""
    if isinstance(templates, str):
        if templates not in TEMPLATES:
            raise DpaggError(
                f"templates={templates!r} is not a template set: use 'style' or 'object', or pass "
                "a list of prompts each containing one '{}'"
            )
        return TEMPLATES[templates]
    out = tuple(templates)
    if not out:
        raise DpaggError("templates is empty: pass 'style', 'object' or prompts containing '{}'")
    for t in out:
        if not isinstance(t, str) or t.count(PLACEHOLDER) != 1:
            raise DpaggError(
                f"template {t!r} must be a string with exactly one '{{}}' (the placeholder)"
            )
    return out


def validate_config(config: TIConfig, device: torch.device | str | None = None) -> None:
    """Raise ``DpaggError`` naming the offending ``TIConfig`` field and the fix."""
    c = config
    if not isinstance(c.steps, int) or c.steps < 1:
        raise DpaggError(f"steps={c.steps!r}: must be a positive integer (e.g. 500)")
    if not (isinstance(c.learning_rate, (int, float)) and 0 < c.learning_rate < float("inf")):
        raise DpaggError(f"learning_rate={c.learning_rate!r}: must be positive (e.g. 5e-3)")
    if not isinstance(c.vectors, int) or not 1 <= c.vectors <= MAX_VECTORS:
        raise DpaggError(
            f"vectors={c.vectors!r}: the number of vectors per token must be an integer "
            f"from 1 to {MAX_VECTORS}"
        )
    if not isinstance(c.initializer, str) or not c.initializer.strip():
        raise DpaggError("initializer is empty: give a word such as 'painting' or 'style'")
    if c.multi_token_initializer not in ("error", "average"):
        raise DpaggError(
            f"multi_token_initializer={c.multi_token_initializer!r}: use 'error' or 'average'"
        )
    resolve_templates(c.templates)
    if c.resolution is not None and (
        not isinstance(c.resolution, int) or c.resolution < 8 or c.resolution % 8
    ):
        raise DpaggError(
            f"resolution={c.resolution!r}: must be a multiple of 8 (e.g. 512), or None to keep "
            "the images' size"
        )
    if not isinstance(c.batch_size, int) or c.batch_size < 1:
        raise DpaggError(f"batch_size={c.batch_size!r}: must be a positive integer")
    if c.mixed_precision not in options.MIXED_PRECISIONS:
        raise DpaggError(f"mixed_precision={c.mixed_precision!r}: use 'no', 'bf16' or 'fp16'")
    if not (c.fp16_loss_scale > 0 and c.fp16_loss_scale < float("inf")):
        raise DpaggError(f"fp16_loss_scale={c.fp16_loss_scale!r}: must be a positive number")
    if not (len(c.adam_betas) == 2 and all(0 <= b < 1 for b in c.adam_betas)):
        raise DpaggError(f"adam_betas={c.adam_betas!r}: two numbers in [0, 1)")
    if not c.adam_eps > 0:
        raise DpaggError(f"adam_eps={c.adam_eps!r}: must be positive")
    if not c.weight_decay >= 0:
        raise DpaggError(f"weight_decay={c.weight_decay!r}: must be >= 0")
    if not isinstance(c.warmup_steps, int) or c.warmup_steps < 0:
        raise DpaggError(f"warmup_steps={c.warmup_steps!r}: must be an integer >= 0")
    if not isinstance(c.seed, int) or c.seed < 0:
        raise DpaggError(f"seed={c.seed!r}: must be an integer >= 0")
    if device is not None and torch.device(device).type != "cuda" and c.mixed_precision == "fp16":
        raise DpaggError(
            f"mixed_precision='fp16' needs a CUDA device, the model is on {torch.device(device)}: "
            "use mixed_precision='no' (or 'bf16') on CPU"
        )


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DpaggError(f"images: expected a tensor [N, 3, H, W] in [-1, 1], got {shape}")
    if images.shape[0] < 1:
        raise DpaggError("images: the image set is empty; give at least one image")
    if not images.is_floating_point():
        raise DpaggError(f"images: expected a float tensor in [-1, 1], got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise DpaggError("images: contains NaN or infinite values")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise DpaggError(
            f"images: values span [{lo:.3g}, {hi:.3g}], expected [-1, 1] (map pixels x/127.5-1)"
        )


# ----------------------------------------------------------------------------------------------
# Randomness: one generator per image, keyed by (seed, global index)
# ----------------------------------------------------------------------------------------------

"""Per-image CLIP image embeddings ("Clip Embeddings"): the second kind of private EmbeddingSet.

``clip_image_embeddings(model, images)`` returns an :class:`~dpagg_core.io.embeddings.EmbeddingSet`
of kind ``clip_image`` with ``vectors['image_embeds']`` float32 ``[n, 1, projection_dim]``: the
projected image embedding of ``transformers.CLIPVisionModelWithProjection`` (the vector image-prompt
adapters take as ``image_embeds``), one row per image.

Invariant 1 (each row depends only on its own image): the vision transformer uses LayerNorm, which
normalises each token of each image on its own, and attention never crosses images, so batching is
only a speed-up; the L2 normalisation is per row too. Tests check that a row does not change with
the batch it is computed in.

Preprocessing, without torchvision: images are decoded by :mod:`dpagg_core.io.images` (EXIF
orientation, RGB conversion, duplicate / corrupt checks) and centre-cropped to a square at the
model's ``image_size`` (Lanczos; CLIP's own processor resizes the shorter side with bicubic and
centre-crops - the same geometry, slightly different resampling); an already loaded
:class:`~dpagg_core.io.images.LoadedImages` is resized with antialiased bicubic interpolation.
Pixels in [0, 1] are then normalised with the mean/std of the model folder's
``preprocessor_config.json`` if present, else OpenAI CLIP's (``transformers.image_utils``).

``normalize=True`` (default) scales every embedding to unit L2 norm, as CLIP does before its
cosine similarities. Every row then lies on the unit sphere, so clip norm ``C = 1`` around the
origin clips nothing and the replace-one sensitivity of the mean is exactly ``2/n`` - the natural
choice (the released mean then has norm <= 1 before noise; renormalise it after release if the
consumer expects a unit vector - post-processing is free).

``base_model_id``: :func:`dpagg_core.training.models.fingerprint` of the vision model's
patch-embedding weight (``vision_model.embeddings.patch_embedding.weight``): first 16 hex digits of
sha256 over its shape and float16 little-endian bytes. Public; it identifies the encoder, not the
images.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import LoadedImages, load_image_folder, load_images
from dpagg_core.privacy.identity import fingerprint
from dpagg_core.training.models import offline

log = logging.getLogger(__name__)

KEY = "image_embeds"


def load_clip_vision(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> Any:
    """``CLIPVisionModelWithProjection`` from a local folder (config.json + weights), offline.

    Every weight must come from the folder: a checkpoint that lacks some (e.g. a vision model
    without projection) is refused instead of running with random weights.
    """
    from transformers import CLIPVisionModelWithProjection

    p = Path(path).expanduser()
    if not p.exists():
        raise DpaggError(f"CLIP vision model path {p} does not exist")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise DpaggError(
            f"{p} is not a transformers model folder (config.json + model.safetensors), e.g. "
            "IP-Adapter's models/image_encoder folder; single-file CLIP vision weights are not "
            "supported here (in ComfyUI use the CLIP Vision loader)"
        )
    try:
        with offline():
            model, info = CLIPVisionModelWithProjection.from_pretrained(
                str(p), local_files_only=True, output_loading_info=True
            )
    except DpaggError:
        raise
    except Exception as e:
        raise DpaggError(f"cannot load the CLIP vision model in {p}: {e}") from e
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        bad = (missing + [str(m) for m in mismatched])[:3]
        raise DpaggError(
            f"{p}: {len(missing) + len(mismatched)} weights of CLIPVisionModelWithProjection are "
            f"missing or mismatched in the checkpoint (e.g. {', '.join(bad)}); it needs a CLIP "
            "vision model with its visual projection"
        )
    return model.to(dtype).eval()


def _preprocess_stats(path: Path | None) -> tuple[list[float], list[float]]:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean, std = list(OPENAI_CLIP_MEAN), list(OPENAI_CLIP_STD)
    if path is not None and (path / "preprocessor_config.json").is_file():
        try:
            cfg = json.loads((path / "preprocessor_config.json").read_text())
        except (OSError, ValueError) as e:
            raise DpaggError(f"{path / 'preprocessor_config.json'} is unreadable: {e}") from e
        mean = list(cfg.get("image_mean", mean))
        std = list(cfg.get("image_std", std))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DpaggError(f"bad image_mean/image_std {mean}/{std} in the CLIP preprocessor config")
    return mean, std


def _unit_pixels(images: Any, size: int) -> tuple[torch.Tensor, str]:
    """Pixels in [0, 1], float32 [n, 3, size, size], and the dataset id."""
    if isinstance(images, LoadedImages):
        loaded = images
    else:
        res = -(-size // 8) * 8  # the image loader works at multiples of 8
        if isinstance(images, (str, os.PathLike)):
            loaded = load_image_folder(images, res)
        elif isinstance(images, torch.Tensor) or (
            isinstance(images, Sequence) and all(isinstance(i, Image.Image) for i in images)
        ):
            loaded = load_images(images, res)
        else:
            raise DpaggError(
                "images must be a folder path, LoadedImages, a list of PIL images or a tensor "
                f"in [0, 1]; got {type(images).__name__}"
            )
    x = (loaded.pixels.to(torch.float32) + 1.0) / 2.0
    if x.shape[-1] != size or x.shape[-2] != size:
        # Per-image resize of square images (bicubic + antialias as CLIP's processor would).
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    return x, loaded.dataset_id


def clip_image_embeddings(
    model_path_or_model: str | os.PathLike[str] | Any,
    images: Any,
    *,
    batch_size: int = 16,
    normalize: bool = True,
    device: str | torch.device = "cpu",
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
) -> EmbeddingSet:
    """Per-image CLIP image embeddings ``[n, 1, projection_dim]`` as a private EmbeddingSet.

    ``images``: a folder path, :class:`LoadedImages`, a list of PIL images or a float tensor in
    [0, 1] ([N, 3, H, W] or [N, H, W, 3]). ``normalize`` (default True) gives unit-norm rows,
    for which clip norm C = 1 around the origin is exact (see module docs).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DpaggError(f"batch_size={batch_size!r} must be a positive integer")
    folder: Path | None = None
    if isinstance(model_path_or_model, (str, os.PathLike)):
        folder = Path(model_path_or_model).expanduser()
        model = load_clip_vision(folder)
    else:
        model = model_path_or_model
        if not hasattr(model, "config") or not hasattr(model, "vision_model"):
            raise DpaggError(
                "model_path_or_model must be a folder path or a transformers "
                f"CLIPVisionModelWithProjection, got {type(model).__name__}"
            )
    mean, std = _preprocess_stats(folder)
    if image_mean is not None:
        mean = list(image_mean)
    if image_std is not None:
        std = list(image_std)
    size = int(model.config.image_size)
    pixels, dataset_id = _unit_pixels(images, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (pixels - mean_t) / std_t

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    rows = []
    try:
        with torch.no_grad():
            for start in range(0, pixels.shape[0], batch_size):
                batch = pixels[start : start + batch_size].to(device=device, dtype=param.dtype)
                out = model(pixel_values=batch)
                rows.append(out.image_embeds if hasattr(out, "image_embeds") else out[0])
    finally:
        model.train(was_training)
    return clip_image_set(
        rows, base_model_id=vision_model_id(model), dataset_id=dataset_id, normalize=normalize
    )


def vision_model_id(model: Any) -> str:
    """``base_model_id`` of a CLIP vision model: :func:`~dpagg_core.training.models.fingerprint` of
    its patch-embedding weight (``vision_model.embeddings.patch_embedding.weight``, a name ComfyUI's
    CLIP vision models keep too, so the CLI and the Clip Embeddings node name one encoder alike); an
    encoder without it (another architecture) by its first and last parameters."""
    try:
        tensors = [model.vision_model.embeddings.patch_embedding.weight]
    except AttributeError:
        params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
        if not params:
            raise DpaggError(
                f"cannot identify the CLIP vision model ({type(model).__name__} has no "
                "weights); load it with a CLIP vision loader"
            ) from None
        tensors = params[:1] + params[-1:]
    return fingerprint(tensors)


def clip_image_set(
    rows: Sequence[torch.Tensor] | torch.Tensor,
    *,
    base_model_id: str,
    dataset_id: str,
    normalize: bool = True,
) -> EmbeddingSet:
    """The private ``clip_image`` EmbeddingSet of per-image CLIP image embeddings (``rows``: a
    ``[n, projection_dim]`` tensor or a list of ``[b, projection_dim]`` blocks, in image order),
    float32 ``[n, 1, projection_dim]``, each row scaled to unit L2 norm when ``normalize`` (see
    the module docs). The one place rows become a set: the CLI/library path and the Clip
    Embeddings node (ComfyUI's encoder) give the same set for the same embeddings."""
    blocks = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    emb = torch.cat([b.detach().to(device="cpu", dtype=torch.float32) for b in blocks])
    emb = emb.reshape(emb.shape[0], -1)
    if normalize:  # per row: row i still depends on image i only
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return EmbeddingSet(
        vectors={KEY: emb[:, None, :].contiguous()},
        kind="clip_image",
        model_family="clip_vision",
        base_model_id=base_model_id,
        dataset_id=dataset_id,
    )

"""Load the private image set (a folder or in-memory images) -> ``[N, 3, R, R]`` + dataset id.

Each image is processed on its own (invariant 1: nothing here mixes images): EXIF orientation
applied (``PIL.ImageOps.exif_transpose``), converted to RGB (transparency composited over white;
grayscale, palette, 16-bit grayscale and CMYK converted), then the centred square of the image is
resized to ``resolution`` (``PIL.ImageOps.fit``, Lanczos: the same result as resizing the shorter
side to ``resolution`` and centre-cropping, without ever materialising the large intermediate).

Folder rules:

* files are read in sorted name order, non-recursively;
* files without an image extension (captions ``.txt``, ``.json``, ``.DS_Store``, ``Thumbs.db``),
  hidden files (including macOS ``._name.jpg`` resource forks) and sub-folders are skipped with a
  note;
* a file with an image extension that does not decode is an error; all such files are collected
  and named in one :class:`DpaggError` - silently dropping a private image would change n, which
  the accountant treats as public;
* images larger than ``max_pixels`` (default ~179 megapixels, Pillow's own hard limit) are refused
  before decoding (decompression-bomb guard; the check reads only the header). Pillow's global
  ``Image.MAX_IMAGE_PIXELS`` is not modified, since dpagg may run inside another application;
* images smaller than ``resolution`` are upscaled, with a warning (they look blurry to the model);
* duplicates - identical file bytes, or identical decoded pixels - produce a warning: replace-one
  DP protects one *image*; a person whose picture appears twice is protected like a group of two
  (roughly twice the epsilon, Dwork & Roth 2014, Thm 2.2 group privacy).

``dataset_id`` is ``embeddings.dataset_id_for`` of the per-image digests of the decoded,
EXIF-oriented, full-size 8-bit RGB pixels (salted per install, order independent). Files and
in-memory images use the same digest, so the same RGB pictures loaded by ``dpagg run`` and by
ComfyUI's Load Image (which decodes the same way and hands over pixels / 255) share ONE ledger
budget. Re-encoding a file (same pixels) keeps its id; resizing or editing it does not.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .embeddings import dataset_id_for
from .errors import DpaggError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
# Pillow's hard decompression-bomb limit (2 x its default MAX_IMAGE_PIXELS): a 16k x 11k photo.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
MIN_IMAGES = 2


@dataclass
class LoadedImages:
    """Processed private images. ``pixels`` is PRIVATE DATA: keep it in memory only."""

    pixels: torch.Tensor  # float32 [N, 3, R, R] in [-1, 1]
    dataset_id: str
    count: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational (skipped files)


def _check_resolution(resolution: Any) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise DpaggError(f"resolution={resolution!r} must be an integer number of pixels, e.g. 512")
    if resolution < 8 or resolution % 8:
        raise DpaggError(
            f"resolution={resolution} must be a positive multiple of 8 (the VAE downsamples by 8), "
            "e.g. 512 for SD1.x, 768 for SD2.x, 1024 for SDXL"
        )
    return int(resolution)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB 8-bit; alpha composited over white, 16-bit/float grayscale rescaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pixel_digest(rgb: np.ndarray) -> bytes:
    """Digest of one picture's decoded 8-bit RGB pixels ``[H, W, 3]`` and size: the per-image
    input of the dataset id. Every entry point (files, PIL images, ComfyUI tensors) calls this,
    so the same pictures always share one budget."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    h = hashlib.sha256(repr((width, height)).encode())
    h.update(rgb.tobytes())
    return h.digest()


def _process(img: Image.Image, resolution: int) -> tuple[np.ndarray, bytes, tuple[int, int]]:
    """(uint8 [R, R, 3] pixels, digest of the full-size decoded RGB pixels, full size)."""
    img = ImageOps.exif_transpose(img)
    rgb = _to_rgb(img)
    fitted = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8), pixel_digest(np.asarray(rgb)), rgb.size


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise DpaggError(
            f"{name}: {w}x{h} pixels ({w * h / 1e6:.0f} megapixels) exceeds the safety limit of "
            f"{max_pixels / 1e6:.0f} megapixels (decompression-bomb guard). Downscale the image, "
            "or pass max_pixels= a larger limit if you trust the file."
        )
    if w < 1 or h < 1:
        raise DpaggError(f"{name}: the image is empty ({w}x{h} pixels)")


def _open_file(
    path: Path, resolution: int, max_pixels: int
) -> tuple[np.ndarray, bytes, tuple[int, int], bytes]:
    """(pixels, pixel digest, decoded size, raw file bytes) of one image file."""
    data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check governs
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise DpaggError(
                f"{path.name}: refused as a possible decompression bomb ({e}); downscale it, "
                "or raise PIL.Image.MAX_IMAGE_PIXELS and max_pixels= if you trust the file"
            ) from e
        _check_size(img.size, max_pixels, path.name)
        img.load()
        pixels, pix_digest, size = _process(img, resolution)
    return pixels, pix_digest, size, data


def _to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return stacked.to(torch.float32).div_(127.5).sub_(1.0)


def _finish(
    arrays: list[np.ndarray],
    names: list[str],
    byte_digests: list[bytes | None],
    pixel_digests: list[bytes],
    sizes: list[tuple[int, int]],
    resolution: int,
    dataset_id: str,
    notes: list[str],
    where: str,
) -> LoadedImages:
    n = len(arrays)
    if n == 0:
        skipped = f" ({len(notes)} non-image entries skipped)" if notes else ""
        raise DpaggError(
            f"no images found in {where}{skipped}; supported types: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    if n < MIN_IMAGES:
        raise DpaggError(
            f"only one image in {where}: DP aggregation needs at least {MIN_IMAGES}. The released "
            "embedding is a noisy mean that must hide any single image; with n = 1 the mean IS "
            "that image's embedding, so the noise needed to hide it (sensitivity 2C/n = 2C) "
            "destroys it. Add more images (10 or more give useful results)."
        )
    warns: list[str] = []
    seen_bytes: dict[bytes, str] = {}
    seen_pixels: dict[bytes, str] = {}
    for name, bd, pd in zip(names, byte_digests, pixel_digests, strict=True):
        if bd is not None and bd in seen_bytes:
            how, first = "identical file content", seen_bytes[bd]
        elif pd in seen_pixels:
            how, first = "identical pixels", seen_pixels[pd]
        else:
            if bd is not None:
                seen_bytes[bd] = name
            seen_pixels[pd] = name
            continue
        warns.append(
            f"duplicate image: {name} and {first} have {how}. Replace-one DP protects each "
            "image, so a person in both is protected only as a group of two (about twice the "
            "epsilon). Remove one copy unless that is intended."
        )
    small = [
        f"{nm} ({w}x{h})" for nm, (w, h) in zip(names, sizes, strict=True) if min(w, h) < resolution
    ]
    if small:
        warns.append(
            f"{len(small)} image(s) smaller than {resolution} px were upscaled and will look "
            f"blurry to the model: {', '.join(small[:10])}{' ...' if len(small) > 10 else ''}"
        )
    for w in warns:
        log.warning(w)
    return LoadedImages(_to_tensor(arrays), dataset_id, n, warns, notes)


def load_image_folder(
    path: str | os.PathLike[str] | Sequence[Image.Image] | torch.Tensor,
    resolution: int = 512,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dataset_id: str | None = None,
) -> LoadedImages:
    """Load every image of the folder ``path`` (sorted by name) at ``resolution`` x ``resolution``.

    ``path`` may also be a list of PIL images or a tensor (see :func:`load_images`).
    ``dataset_id`` overrides the id computed from the file bytes (only for callers that have
    their own stable id for the same collection).
    """
    if not isinstance(path, (str, os.PathLike)):
        return load_images(path, resolution, max_pixels=max_pixels, dataset_id=dataset_id)
    resolution = _check_resolution(resolution)
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DpaggError(f"image folder {folder} does not exist; pass the folder of your images")
    if not folder.is_dir():
        raise DpaggError(f"{folder} is a file; pass the folder that contains the images")
    notes: list[str] = []
    arrays: list[np.ndarray] = []
    names: list[str] = []
    raw: list[bytes] = []
    byte_digests: list[bytes | None] = []
    pixel_digests: list[bytes] = []
    sizes: list[tuple[int, int]] = []
    corrupt: list[str] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        raise DpaggError(f"cannot list image folder {folder}: {e}") from e
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            notes.append(f"skipped hidden file {name}")
            continue
        if entry.is_dir():
            notes.append(f"skipped sub-folder {name} (folders are not searched recursively)")
            continue
        if entry.suffix.lower() not in IMAGE_EXTENSIONS:
            notes.append(f"skipped {name} (not an image type)")
            continue
        try:
            pixels, pix_digest, size, data = _open_file(entry, resolution, max_pixels)
        except (DpaggError, MemoryError):
            raise
        except Exception as e:  # UnidentifiedImageError, truncated data, bad EXIF, ...
            reason = str(e).splitlines()[0] if str(e) else ""
            corrupt.append(f"{name} ({type(e).__name__}: {reason})")
            continue
        arrays.append(pixels)
        names.append(name)
        raw.append(data)
        byte_digests.append(hashlib.sha256(data).digest())
        pixel_digests.append(pix_digest)
        sizes.append(size)
    if corrupt:
        raise DpaggError(
            f"{len(corrupt)} file(s) in {folder} have an image extension but cannot be decoded "
            f"(corrupt or truncated): {'; '.join(corrupt)}. Repair, re-export or remove them; "
            "dpagg does not drop private images silently because n is part of the privacy plan."
        )
    for note in notes:
        log.info(note)
    if len(arrays) >= MIN_IMAGES:
        ds_id = dataset_id if dataset_id is not None else dataset_id_for(pixel_digests)
    else:
        ds_id = ""  # _finish raises
    return _finish(
        arrays, names, byte_digests, pixel_digests, sizes, resolution, ds_id, notes, str(folder)
    )


def _tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    if images.ndim != 4:
        raise DpaggError(
            f"images tensor has shape {tuple(images.shape)}; expected [N, 3, H, W] or [N, H, W, 3]"
        )
    if images.shape[-1] == 3 and images.shape[1] != 3:
        nhwc = images
    elif images.shape[1] == 3:
        nhwc = images.permute(0, 2, 3, 1)
    else:
        raise DpaggError(
            f"images tensor has shape {tuple(images.shape)}: no RGB channel axis of size 3 "
            "(expected [N, 3, H, W] or ComfyUI's [N, H, W, 3])"
        )
    if not images.is_floating_point():
        raise DpaggError("images tensor must be floating point with values in [0, 1]")
    x = nhwc.detach().to("cpu", torch.float64)
    if not torch.isfinite(x).all():
        raise DpaggError("images tensor contains NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise DpaggError(
            f"images tensor values span [{float(x.min()):.3g}, {float(x.max()):.3g}] but must lie "
            "in [0, 1]; for pixels in [-1, 1] pass (x + 1) / 2"
        )
    arr = (x * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def load_images(
    images: Sequence[Image.Image] | torch.Tensor,
    resolution: int = 512,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dataset_id: str | None = None,
) -> LoadedImages:
    """In-memory variant: a list of PIL images, or a float tensor in [0, 1] shaped [N, 3, H, W]
    or [N, H, W, 3] (ComfyUI ``IMAGE``). Same processing and checks as the folder loader;
    ``dataset_id`` defaults to the salted id of the decoded 8-bit RGB pixels (see module docs).
    """
    resolution = _check_resolution(resolution)
    if isinstance(images, torch.Tensor):
        pils = _tensor_to_pils(images)
        where = "the images tensor"
    elif isinstance(images, (str, os.PathLike)):
        return load_image_folder(images, resolution, max_pixels=max_pixels, dataset_id=dataset_id)
    else:
        pils = list(images)
        where = "the image list"
        for i, im in enumerate(pils):
            if not isinstance(im, Image.Image):
                raise DpaggError(f"images[{i}] is a {type(im).__name__}, not a PIL image")
    arrays, names, pixel_digests, sizes, canon = [], [], [], [], []
    for i, im in enumerate(pils):
        _check_size(im.size, max_pixels, f"image {i}")
        pixels, pix_digest, size = _process(im, resolution)
        arrays.append(pixels)
        names.append(f"image {i}")
        pixel_digests.append(pix_digest)
        sizes.append(size)
        canon.append(pix_digest)
    if dataset_id is None and len(arrays) >= MIN_IMAGES:
        dataset_id = dataset_id_for(canon)
    return _finish(
        arrays,
        names,
        [None] * len(arrays),
        pixel_digests,
        sizes,
        resolution,
        dataset_id or "",
        [],
        where,
    )

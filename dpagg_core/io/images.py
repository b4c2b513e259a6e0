"""Load the private image set (a folder or in-memory images) -> ``[N, 3, R, R]`` + dataset id.

One canonical decode
--------------------
:func:`decode_rgb` is THE decode of a private picture, for the dataset id and for training
input, in the CLI, the library and the ComfyUI nodes. It is the decode of ComfyUI's Load Image
node (``nodes.LoadImage``), so that the same file gives the same 8-bit RGB pixels - and hence
the same dataset id and the same training input - whether it arrives through ``dpagg run``,
through ComfyUI's Load Image, or through the pack's **Load Private Images** node:

1. the first frame (``Image.open``), EXIF orientation applied (``PIL.ImageOps.exif_transpose``);
2. 32-bit integer images (mode ``I``) scaled by 1/255 (``Image.point``, truncating), as
   Load Image does;
3. ``Image.convert("RGB")``. Consequences, all identical to ComfyUI:

   * alpha is dropped: the stored colour of every pixel is used, transparency is ignored
     (RGBA, LA, PA, and palette images with a transparent index); nothing is composited;
   * 16-bit grayscale (Pillow >= 10 opens 16-bit PNGs as ``I;16``, which Load Image does not
     rescale) and float images are clipped to 0..255 - such a picture is mostly white. A
     warning names every image whose values were clipped, and every image with transparency,
     so the user can flatten or convert it to 8-bit first;
   * palette and grayscale images are looked up / replicated, CMYK converted by Pillow.

This decode used to differ from ComfyUI's (alpha composited over white, 16-bit rescaled), which
gave the same semi-transparent or 16-bit files two dataset ids - two privacy budgets. The
decode is Pillow's, so processes that must agree on an id need the same Pillow release for the
exotic modes (16-bit, float); RGB, grayscale, palette, CMYK and JPEG files are stable.

Training input: each decoded picture is processed on its own (invariant 1: nothing here mixes
images): the centred square is resized to ``resolution`` (``PIL.ImageOps.fit``, Lanczos: the
same result as resizing the shorter side to ``resolution`` and centre-cropping, without ever
materialising the large intermediate). The ComfyUI nodes feed their images through the same
:func:`load_images`, so the CLI and ComfyUI train on the same pixels.

Dataset id: names, order and resizing do not enter
--------------------------------------------------
Each picture's digest (:func:`pixel_digest`) is the SHA-256 of its decoded, EXIF-oriented,
FULL-SIZE 8-bit RGB pixels and size - taken before any resize, so no working resolution, crop or
"resize to the first image" of a loader can change it, and it never sees a file name.
``dataset_id_for`` combines the digests order-independently (sorted) and keys them with
the privacy ledger's identity key (``ledger=`` names the ledger file; default
``paths.default_ledger_path()``), so renaming, re-listing or re-ordering files keeps the id, and
every process that uses that ledger sees the same pictures as the same dataset (docs/privacy.md
invariant 7). Re-encoding a file (same pixels) keeps its id; editing, adding or removing a picture
changes it. :class:`LoadedImages` carries the per-image ``digests`` so a caller (e.g. the ComfyUI
nodes) can re-derive the id under its ledger's key; like the pixels they are private data, kept in
memory only, never logged, shown or serialised (``repr`` omits both).

Folder rules
------------
* files are read in sorted name order (the order affects only the rows, never the id),
  non-recursively;
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

Paths (``path``, ``ledger``) go through ``paths.resolve_path``: ``~`` and environment variables
expanded, made absolute - the same meaning as in the CLI and the nodes.
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

from dpagg_core.errors import DpaggError
from dpagg_core.io.identify import identify_pictures
from dpagg_core.paths import resolve_path
from dpagg_core.privacy.identity import (
    check_identity_key,
    dataset_id_for,
    perceptual_hash,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "LoadedImages",
    "check_identity_key",
    "dataset_id_for",
    "decode_rgb",
    "fit_images",
    "identify_pictures",
    "load_image_folder",
    "load_images",
    "look_of",
    "pixel_digest",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
# Pillow's hard decompression-bomb limit (2 x its default MAX_IMAGE_PIXELS): a 16k x 11k photo.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
MIN_IMAGES = 2


@dataclass
class LoadedImages:
    """Processed private images. ``pixels`` and ``digests`` are PRIVATE DATA: keep them in
    memory only (``repr`` leaves both out)."""

    pixels: torch.Tensor = field(repr=False)  # float32 [N, 3, R, R] in [-1, 1]
    dataset_id: str
    count: int
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # informational (skipped files)
    # per-image pixel_digest of the full-size canonical decode, in row order; the dataset id is
    # dataset_id_for(digests, key=<a ledger's identity key>)
    digests: list[bytes] = field(default_factory=list, repr=False)
    # per-image perceptual hash (identity.perceptual_hash), same order; private like the digests
    looks: list[bytes] = field(default_factory=list, repr=False)

    @property
    def resolution(self) -> int:
        return int(self.pixels.shape[-1])


def check_resolution(resolution: Any) -> int:
    """A working resolution in pixels: an integer, a positive multiple of 8."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise DpaggError(f"resolution={resolution!r} must be an integer number of pixels, e.g. 512")
    if resolution < 8 or resolution % 8:
        raise DpaggError(
            f"resolution={resolution} must be a positive multiple of 8 (the VAE downsamples by 8), "
            "e.g. 512 for SD1.x, 768 for SD2.x, 1024 for SDXL"
        )
    return int(resolution)


def decode_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """The canonical decode of one picture (module docs): ComfyUI Load Image's steps, in order.

    Returns the 8-bit RGB image and what it lost (``"clipped"``: pixel values outside 0..255
    were clipped; ``"transparency"``: alpha < 255 somewhere was ignored), for warnings."""
    img = ImageOps.exif_transpose(img)
    lost: list[str] = []
    mode = img.mode
    if mode == "I":  # 32-bit integers: scaled by 1/255, truncated (Pillow's point)
        img = img.point(lambda v: v / 255)
    if mode.startswith("I") or mode == "F":
        lo, hi = img.getextrema()
        if lo < 0 or hi > 255:
            lost.append("clipped")
    if "A" in img.getbands() and img.getchannel("A").getextrema()[0] < 255:
        lost.append("transparency")
    elif mode == "P" and "transparency" in img.info:
        if img.convert("RGBA").getchannel("A").getextrema()[0] < 255:
            lost.append("transparency")
    return img.convert("RGB"), lost


def _legacy_digest(img: Image.Image) -> bytes | None:
    """Digest of ``img`` as dpagg <= 0.2's CLI decoded it, where that differs from
    :func:`decode_rgb` (alpha composited over white; 16-bit and float gray rescaled), else None.

    Used only to carry a budget recorded under the old decode over to the canonical id
    (:meth:`ledger.Ledger.adopt_dataset`): without it, upgrading dpagg would give such image
    sets a fresh budget. Never used for training."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(arr / top * 255.0), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(gray, mode="L").convert("RGB")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        gray = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        rgb = Image.fromarray(gray, mode="L").convert("RGB")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        return None
    return pixel_digest(np.asarray(rgb))


def pixel_digest(rgb: np.ndarray) -> bytes:
    """Digest of one picture's decoded 8-bit RGB pixels ``[H, W, 3]`` (full size, before any
    resize) and size: the per-image input of the dataset id. Every entry point (files, PIL
    images, ComfyUI tensors) calls this, so the same pictures always share one budget. The
    format is unchanged since dpagg 0.2, so a ledger upgraded from the install salt keeps the ids
    of its RGB / grayscale / palette / CMYK image sets."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise DpaggError(f"pixel_digest needs uint8 [H, W, 3] pixels, got {rgb.dtype} {rgb.shape}")
    rgb = np.ascontiguousarray(rgb)
    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    h = hashlib.sha256(repr((width, height)).encode())
    h.update(rgb.tobytes())
    return h.digest()


def look_of(rgb: Image.Image) -> bytes:
    """The public perceptual hash of a decoded picture (``identity.perceptual_hash`` of its gray
    8 x 9 box-filtered thumbnail): the same for a resized or re-encoded copy."""
    gray = rgb.convert("L").resize((9, 8), Image.Resampling.BOX)
    return perceptual_hash(np.asarray(gray, dtype=np.float64))


def _process(
    img: Image.Image, resolution: int
) -> tuple[np.ndarray, bytes, tuple[int, int], list[str], bytes]:
    """(uint8 [R, R, 3] pixels, digest of the full-size decoded RGB pixels, full size, losses,
    perceptual hash)."""
    rgb, lost = decode_rgb(img)
    return _fit(rgb, resolution), pixel_digest(np.asarray(rgb)), rgb.size, lost, look_of(rgb)


def _refuse_multi_frame(img: Image.Image, name: str) -> None:
    """One rule for animated / multi-page files (GIF, WebP, TIFF, APNG...): refused everywhere.
    Counting their frames as pictures would make one file several "people" (ComfyUI's Load Image
    splits frames, a plain decode keeps the first), and the ids would differ by front end."""
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        raise DpaggError(
            f"{name} has {frames} frames (an animated or multi-page image). dpagg takes one "
            "picture per file, the same in every front end. Fix: export the frame you want as a "
            "PNG or JPEG, or remove the file."
        )


def _fit(rgb: Image.Image, resolution: int) -> np.ndarray:
    """THE resize of a picture for training: its centred square to ``resolution`` (Lanczos)."""
    fitted = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8)


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
) -> tuple[np.ndarray, bytes, tuple[int, int], list[str], bytes, bytes | None, bytes]:
    """(pixels, pixel digest, decoded size, losses, SHA-256 of the file bytes, legacy digest,
    perceptual hash) of one file (the bytes themselves are not kept)."""
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
        _refuse_multi_frame(img, path.name)
        img.load()
        pixels, pix_digest, size, lost, look = _process(img, resolution)
        legacy = _legacy_digest(img)
    return pixels, pix_digest, size, lost, hashlib.sha256(data).digest(), legacy, look


def _to_tensor(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return stacked.to(torch.float32).div_(127.5).sub_(1.0)


@dataclass
class _Pictures:
    """What the loaders collect per picture, in row order (private; never leaves this module
    except as LoadedImages)."""

    arrays: list[np.ndarray] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    byte_digests: list[bytes | None] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    looks: list[bytes] = field(default_factory=list)
    legacy: list[bytes | None] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)
    losses: list[list[str]] = field(default_factory=list)

    def add(self, name: str, processed: tuple, file_digest: bytes | None, legacy: bytes | None):
        pixels, digest, size, lost, look = processed
        self.arrays.append(pixels)
        self.names.append(name)
        self.byte_digests.append(file_digest)
        self.digests.append(digest)
        self.looks.append(look)
        self.legacy.append(legacy)
        self.sizes.append(size)
        self.losses.append(lost)


def _finish(
    pics: _Pictures,
    resolution: int,
    *,
    dataset_id: str | None,
    ledger: str | os.PathLike[str] | None,
    notes: list[str],
    where: str,
    public: bool,
) -> LoadedImages:
    arrays, names, sizes, losses = pics.arrays, pics.names, pics.sizes, pics.losses
    n = len(arrays)
    if n == 0:
        skipped = f" ({len(notes)} non-image entries skipped)" if notes else ""
        raise DpaggError(
            f"no images found in {where}{skipped}; supported types: "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    if n < MIN_IMAGES and not public:
        raise DpaggError(
            f"only one image in {where}: DP aggregation needs at least {MIN_IMAGES}. The released "
            "embedding is a noisy mean that must hide any single image; with n = 1 the mean IS "
            "that image's embedding, so the noise needed to hide it (sensitivity 2C/n = 2C) "
            "destroys it. Add more images (10 or more give useful results)."
        )
    id_warns: list[str] = []
    if dataset_id is None:
        dataset_id, id_warns = identify_pictures(
            pics.digests,
            pics.looks,
            ledger=ledger,
            names=names,
            public=public,
            legacy_digests=pics.legacy,
        )
    warns: list[str] = []
    seen_bytes: dict[bytes, str] = {}
    seen_pixels: dict[bytes, str] = {}
    for name, bd, pd in zip(names, pics.byte_digests, pics.digests, strict=True):
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
            f"blurry to the model: {_some(small)}"
        )
    clipped = [nm for nm, lost in zip(names, losses, strict=True) if "clipped" in lost]
    if clipped:
        warns.append(
            f"{len(clipped)} image(s) have pixel values outside 0-255 (16-bit or float images) "
            "that the 8-bit decode clipped - they look mostly white or black, exactly as in "
            f"ComfyUI's Load Image: {_some(clipped)}. Convert them to 8-bit first."
        )
    transparent = [nm for nm, lost in zip(names, losses, strict=True) if "transparency" in lost]
    if transparent:
        warns.append(
            f"{len(transparent)} image(s) have transparency, which is ignored (the stored colour "
            f"of each pixel is used, as in ComfyUI's Load Image): {_some(transparent)}. "
            "Flatten them onto a background first if the hidden colours should not be learned."
        )
    warns = id_warns + warns
    for w in warns:
        log.warning(w)
    return LoadedImages(
        _to_tensor(arrays), dataset_id, n, warns, notes, list(pics.digests), list(pics.looks)
    )


def _some(names: list[str]) -> str:
    return f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"


def load_image_folder(
    path: str | os.PathLike[str] | Sequence[Image.Image] | torch.Tensor,
    resolution: int = 512,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dataset_id: str | None = None,
    ledger: str | os.PathLike[str] | None = None,
    public: bool = False,
) -> LoadedImages:
    """Load every image of the folder ``path`` (sorted by name) at ``resolution`` x ``resolution``.

    ``path`` may also be a list of PIL images or a tensor (see :func:`load_images`). The dataset
    id is keyed by the identity key of the privacy ledger ``ledger`` (default
    ``paths.default_ledger_path()``; created if missing), which also learns the set's pictures
    (keyed ids: :func:`identify_pictures`). ``public=True``: PUBLIC pictures (for a basis, a
    centre, a clip norm): not registered, and refused if the ledger knows any as private.
    ``dataset_id`` overrides the id (only for callers that have their own stable id for the same
    collection; the ledger is not touched).
    """
    if not isinstance(path, (str, os.PathLike)):
        return load_images(
            path,
            resolution,
            max_pixels=max_pixels,
            dataset_id=dataset_id,
            ledger=ledger,
            public=public,
        )
    resolution = check_resolution(resolution)
    folder = resolve_path(path)
    if not folder.exists():
        raise DpaggError(f"image folder {folder} does not exist; pass the folder of your images")
    if not folder.is_dir():
        raise DpaggError(f"{folder} is a file; pass the folder that contains the images")
    notes: list[str] = []
    pics = _Pictures()
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
            pixels, pix_digest, size, lost, file_digest, legacy, look = _open_file(
                entry, resolution, max_pixels
            )
        except (DpaggError, MemoryError):
            raise
        except Exception as e:  # UnidentifiedImageError, truncated data, bad EXIF, ...
            reason = str(e).splitlines()[0] if str(e) else ""
            corrupt.append(f"{name} ({type(e).__name__}: {reason})")
            continue
        pics.add(name, (pixels, pix_digest, size, lost, look), file_digest, legacy)
    if corrupt:
        raise DpaggError(
            f"{len(corrupt)} file(s) in {folder} have an image extension but cannot be decoded "
            f"(corrupt or truncated): {'; '.join(corrupt)}. Repair, re-export or remove them; "
            "dpagg does not drop private images silently because n is part of the privacy plan."
        )
    for note in notes:
        log.info(note)
    return _finish(
        pics,
        resolution,
        dataset_id=dataset_id,
        ledger=ledger,
        notes=notes,
        where=str(folder),
        public=public,
    )


def _tensor_to_pils(images: torch.Tensor) -> list[Image.Image]:
    if images.ndim == 3:  # one picture: [H, W, 3] (ComfyUI) or [3, H, W]
        images = images.unsqueeze(0)
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


def fit_images(images: Sequence[torch.Tensor] | torch.Tensor, resolution: int) -> torch.Tensor:
    """Decoded pictures in [0, 1] (a tensor [N, 3, H, W] or ComfyUI's [N, H, W, 3], or a list of
    one-picture tensors of any sizes) fitted to ``resolution`` as the loaders fit them (centred
    square, Lanczos), each on its own -> float32 ``[N, 3, R, R]`` in [-1, 1].

    Pixels only, for pictures whose set is already identified (e.g. ``LoadedImages.pixels``
    wanted at another resolution: pass ``(pixels + 1) / 2``); no id, no checks on the set."""
    resolution = check_resolution(resolution)
    items = [images] if isinstance(images, torch.Tensor) else list(images)
    return _to_tensor([_fit(pil, resolution) for im in items for pil in _tensor_to_pils(im)])


def load_images(
    images: Sequence[Image.Image | torch.Tensor] | torch.Tensor,
    resolution: int = 512,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    dataset_id: str | None = None,
    ledger: str | os.PathLike[str] | None = None,
    public: bool = False,
) -> LoadedImages:
    """In-memory variant: a list of PIL images, a float tensor in [0, 1] shaped [N, 3, H, W] or
    [N, H, W, 3] (ComfyUI ``IMAGE``), or a list of single-picture tensors of any sizes
    ([H, W, 3] or [3, H, W]). Same decode, processing and checks as the folder loader; a tensor
    holds already-decoded pixels (ComfyUI's Load Image hands over the canonical decode / 255),
    which round back to the same 8-bit values and so to the same id. ``ledger``, ``public`` and
    ``dataset_id`` as in :func:`load_image_folder`; a multi-frame PIL image is refused as there.
    """
    resolution = check_resolution(resolution)
    if isinstance(images, torch.Tensor):
        pils = _tensor_to_pils(images)
        where = "the images tensor"
    elif isinstance(images, (str, os.PathLike)):
        return load_image_folder(
            images,
            resolution,
            max_pixels=max_pixels,
            dataset_id=dataset_id,
            ledger=ledger,
            public=public,
        )
    else:
        pils = []
        where = "the image list"
        for i, im in enumerate(images):
            if isinstance(im, torch.Tensor):
                if im.ndim != 3:
                    raise DpaggError(
                        f"images[{i}] has shape {tuple(im.shape)}; a list holds one picture per "
                        "tensor ([H, W, 3] or [3, H, W])"
                    )
                pils.extend(_tensor_to_pils(im))
            elif isinstance(im, Image.Image):
                pils.append(im)
            else:
                raise DpaggError(f"images[{i}] is a {type(im).__name__}, not a PIL image")
    pics = _Pictures()
    for i, im in enumerate(pils):
        _check_size(im.size, max_pixels, f"image {i}")
        _refuse_multi_frame(im, f"image {i}")
        pics.add(f"image {i}", _process(im, resolution), None, _legacy_digest(im))
    return _finish(
        pics,
        resolution,
        dataset_id=dataset_id,
        ledger=ledger,
        notes=[],
        where=where,
        public=public,
    )

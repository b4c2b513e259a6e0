"""Image files of the kinds whose decode used to differ between the CLI and ComfyUI, with the
8-bit RGB pixels the canonical decode (``dpagg_core.io.images.decode_rgb``, the same as ComfyUI's
Load Image) must produce for them. Shared by ``test_images.py`` (CI, against the decode) and
``test_comfyui_integration.py`` (against a real ComfyUI).

Each writer takes ``(folder, stem, seed)``, writes one file and returns ``(path, expected)``,
``expected`` being uint8 ``[H, W, 3]`` stated from the file's stored values (not from a decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 24, 16  # stored size; non-square so that a missed EXIF rotation changes the shape


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def rgba(folder: Path, stem: str, seed: int):
    """Semi-transparent RGBA PNG: alpha ignored, the stored colour kept (not composited)."""
    arr = _rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    arr[..., 3] = _rng(seed + 1).integers(0, 256, (H, W))
    arr[0, 0, 3], arr[0, 1, 3] = 0, 128  # fully and half transparent pixels
    path = folder / f"{stem}.png"
    Image.frombytes("RGBA", (W, H), arr.tobytes()).save(path)
    return path, arr[..., :3].copy()


def la(folder: Path, stem: str, seed: int):
    """Grayscale + alpha PNG: the gray replicated, alpha ignored."""
    arr = _rng(seed).integers(0, 256, (H, W, 2), dtype=np.uint8)
    arr[..., 1] = np.minimum(arr[..., 1], 200)
    path = folder / f"{stem}.png"
    Image.frombytes("LA", (W, H), arr.tobytes()).save(path)
    return path, np.repeat(arr[..., :1], 3, axis=2)


def gray16(folder: Path, stem: str, seed: int):
    """16-bit grayscale PNG (Pillow opens it as I;16): values clipped to 255, as in ComfyUI."""
    arr = _rng(seed).integers(0, 65536, (H, W)).astype(np.uint16)
    arr[:4] = _rng(seed + 1).integers(0, 256, (4, W))  # some rows inside 0..255
    path = folder / f"{stem}.png"
    Image.fromarray(arr).save(path)
    gray = np.minimum(arr, 255).astype(np.uint8)
    return path, np.repeat(gray[..., None], 3, axis=2)


def palette(folder: Path, stem: str, seed: int):
    """Palette PNG with a transparent index: palette colours looked up, transparency ignored."""
    rng = _rng(seed)
    pal = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (H, W)).astype(np.uint8)
    img = Image.frombytes("P", (W, H), idx.tobytes())
    img.putpalette(pal.ravel().tolist())
    path = folder / f"{stem}.png"
    img.save(path, transparency=int(idx[0, 0]))
    return path, pal[idx]


def cmyk(folder: Path, stem: str, seed: int):
    """CMYK JPEG: Pillow's CMYK -> RGB (R = (255 - C)(255 - K) / 255, ...), of the decoded CMYK
    values (JPEG is lossy, so the expectation is taken from the stored CMYK samples)."""
    arr = _rng(seed).integers(0, 256, (H, W, 4), dtype=np.uint8)
    path = folder / f"{stem}.jpg"
    Image.frombytes("CMYK", (W, H), arr.tobytes()).save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        c = np.asarray(im, dtype=np.float64)
    rgb = np.rint((255 - c[..., :3]) * (255 - c[..., 3:]) / 255)
    return path, rgb.astype(np.uint8)


def exif_rotated(folder: Path, stem: str, seed: int):
    """JPEG stored landscape with EXIF orientation 6 (display rotated 90 degrees clockwise):
    decoded portrait. Expected from the stored (decoded, unrotated) pixels."""
    arr = _rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path = folder / f"{stem}.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.frombytes("RGB", (W, H), arr.tobytes()).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as im:
        stored = np.asarray(im.convert("RGB"))
    return path, np.rot90(stored, k=-1).copy()


def int32(folder: Path, stem: str, seed: int):
    """32-bit integer TIFF (mode I): scaled by 1/255 (truncating), then clipped to 255."""
    arr = _rng(seed).integers(0, 70_000, (H, W)).astype(np.int32)
    path = folder / f"{stem}.tif"
    Image.fromarray(arr).save(path)
    gray = np.minimum(arr // 255, 255).astype(np.uint8)
    return path, np.repeat(gray[..., None], 3, axis=2)


KINDS: dict[str, Callable[[Path, str, int], tuple[Path, np.ndarray]]] = {
    "rgba": rgba,
    "la": la,
    "gray16": gray16,
    "palette": palette,
    "cmyk": cmyk,
    "exif_rotated": exif_rotated,
    "int32": int32,
}
# The kinds the issue names, tested through a real ComfyUI's Load Image.
COMFYUI_KINDS = ("rgba", "gray16", "palette", "cmyk", "exif_rotated")


def write_mixed_sizes(folder: Path, sizes=((40, 24), (24, 40), (32, 32)), seed: int = 0):
    """Photos of different sizes and aspect ratios (where a "resize to the first image" loader
    made the id depend on the listing order). Names ``img0.png`` ... in size order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        base = np.zeros((h, w, 3))
        base[..., i % 3] = 170
        arr = (base + rng.integers(0, 80, (h, w, 3))).astype(np.uint8)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths

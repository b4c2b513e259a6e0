"""Deterministic procedural caption -> image dataset for the mini text-to-image model.

Every image is a shape (the *content*) drawn in a *style* = (palette, texture). Palettes and
textures are named by single common English words, so captions are compositional:

    "a circle in fire striped style"

There are 6 palettes x 5 textures = 30 styles. A few (palette, texture) pairs are held out as the
"private" styles: the mini model never sees them together in training, although it sees each
palette and each texture with other partners. Textual inversion must then find an embedding that
expresses an unseen combination — the paper's setting of a style the base model cannot name.

Everything is a pure function of (style, shape, index): no files, no global RNG. Images are
rendered at 4x and box-filtered down (anti-aliasing), uint8 RGB, 32 px by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# The caption grammar's content classes live with the model (the demo prompts use them).
from dpagg_core.showcase.minimodel import SHAPES as SHAPES

# name -> (background, foreground, secondary) RGB
PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "fire": ((60, 8, 8), (255, 140, 0), (255, 230, 60)),
    "ocean": ((8, 20, 70), (0, 200, 230), (240, 250, 255)),
    "forest": ((15, 45, 15), (150, 210, 40), (90, 50, 20)),
    "candy": ((255, 190, 220), (150, 40, 170), (40, 170, 160)),
    "night": ((5, 5, 5), (245, 245, 245), (120, 120, 140)),
    "desert": ((235, 210, 160), (140, 70, 30), (200, 40, 40)),
}
TEXTURES: tuple[str, ...] = ("plain", "striped", "spotted", "checked", "hollow")

# The held-out ("private") styles: each palette and texture appears here at most once, so every
# component is still seen in training with four or five other partners.
HELD_OUT: tuple[str, ...] = ("fire spotted", "ocean checked", "candy striped", "night hollow")

STYLES: tuple[str, ...] = tuple(f"{p} {t}" for p in PALETTES for t in TEXTURES)
TRAIN_STYLES: tuple[str, ...] = tuple(s for s in STYLES if s not in HELD_OUT)

DEFAULT_SIZE = 32
_SS = 4  # supersampling factor


@dataclass(frozen=True)
class Example:
    style: str
    shape: str
    index: int
    caption: str
    image: np.ndarray  # uint8 [H, W, 3]


def style_index(style: str) -> int:
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    return STYLES.index(style)


def caption_for(style: str, shape: str) -> str:
    return f"a {shape} in {style} style"


def _rng(style: str, shape: str, index: int, salt: int = 0) -> np.random.Generator:
    # Public synthetic data: a fixed, documented seed per (style, shape, index).
    key = [style_index(style), SHAPES.index(shape), int(index), int(salt), 0x5EED]
    return np.random.default_rng(key)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float, rot: float) -> np.ndarray:
    """Signed-ish distance (<0 inside) of a shape of radius ``r`` centred at 0 in coords x, y."""
    c, s = np.cos(rot), np.sin(rot)
    u, v = c * x + s * y, -s * x + c * y
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.8 * r
    if shape == "triangle":
        # equilateral triangle pointing up (in rotated frame)
        k = np.sqrt(3.0)
        d1 = v - 0.5 * r
        d2 = (-k * u - v) / 2 - 0.5 * r
        d3 = (k * u - v) / 2 - 0.5 * r
        return np.maximum(np.maximum(d1, d2), d3) * 1.4
    if shape == "cross":
        arm = 0.33 * r
        bar1 = np.maximum(np.abs(u) - r, np.abs(v) - arm)
        bar2 = np.maximum(np.abs(v) - r, np.abs(u) - arm)
        return np.minimum(bar1, bar2)
    if shape == "star":
        ang = np.arctan2(v, u)
        rad = np.hypot(u, v)
        edge = r * (0.62 + 0.38 * np.cos(5 * ang))
        return rad - edge
    raise ValueError(f"unknown shape {shape!r}: choose one of {', '.join(SHAPES)}")


def render(style: str, shape: str, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render one image (uint8 [size, size, 3]); deterministic in (style, shape, index, size)."""
    palette_name, texture = style.split(" ")
    bg, fg, sec = (np.array(c, dtype=np.float64) for c in PALETTES[palette_name])
    rng = _rng(style, shape, index)
    big = size * _SS
    # pixel-centre coordinates in units of output pixels
    coords = (np.arange(big) + 0.5) / _SS
    x, y = np.meshgrid(coords, coords)
    cx, cy = rng.uniform(0.38, 0.62, size=2) * size
    r = rng.uniform(0.26, 0.36) * size
    rot = rng.uniform(-0.35, 0.35)
    jitter = rng.normal(0.0, 6.0, size=3)  # small per-image colour jitter
    phase = rng.uniform(0, 1, size=2)
    dist = _shape_mask(shape, x - cx, y - cy, r, rot)
    inside = dist < 0

    # Textures are coarse (>= 8 px features at 32 px): the VAE compresses 4x per side, so finer
    # patterns would not survive encoding and every textured style would decode as "plain".
    period = size / 3.0
    if texture == "plain":
        fill = np.broadcast_to(fg, (*x.shape, 3)).copy()
    elif texture == "striped":
        t = ((x + y) / (period * 1.2) + phase[0]) % 1.0
        fill = np.where((t < 0.5)[..., None], fg, sec)
    elif texture == "spotted":
        gx = ((x / period + phase[0]) % 1.0) - 0.5
        gy = ((y / period + phase[1]) % 1.0) - 0.5
        dots = np.hypot(gx, gy) < 0.3
        fill = np.where(dots[..., None], sec, fg)
    elif texture == "checked":
        a = np.floor(x / (size / 4.0) + phase[0]).astype(int)
        b = np.floor(y / (size / 4.0) + phase[1]).astype(int)
        fill = np.where((((a + b) % 2) == 0)[..., None], fg, sec)
    elif texture == "hollow":
        stroke = 0.1 * size
        inside = np.abs(dist) < stroke / 2
        fill = np.broadcast_to(fg, (*x.shape, 3)).copy()
    else:  # pragma: no cover - TEXTURES is closed
        raise ValueError(texture)

    img = np.where(inside[..., None], fill, bg) + jitter
    img = img.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def example(style: str, shape: str, index: int, size: int = DEFAULT_SIZE) -> Example:
    return Example(
        style, shape, index, caption_for(style, shape), render(style, shape, index, size)
    )


def style_examples(
    style: str, n: int, *, offset: int = 0, size: int = DEFAULT_SIZE
) -> list[Example]:
    """``n`` images of one style, shapes cycling, indices ``offset..offset+n-1`` (deterministic).

    Disjoint ``offset`` ranges give disjoint image sets (e.g. private set vs. reference set).
    """
    out = []
    for k in range(offset, offset + n):
        shape = SHAPES[k % len(SHAPES)]
        out.append(example(style, shape, k // len(SHAPES), size))
    return out


def iter_training(
    styles: Sequence[str] = TRAIN_STYLES, per_pair: int = 40, size: int = DEFAULT_SIZE
) -> Iterator[Example]:
    """The training set: ``per_pair`` images for every (style, shape) pair of ``styles``."""
    for style in styles:
        for shape in SHAPES:
            for i in range(per_pair):
                yield example(style, shape, i, size)


def to_tensor(images: Sequence[np.ndarray]):
    """uint8 [H, W, 3] images -> float32 torch tensor [N, 3, H, W] in [-1, 1] (diffusers range)."""
    import torch

    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def contact_sheet(images: Sequence[np.ndarray], cols: int = 10, scale: int = 2):
    """A PIL grid of uint8 images (for eyeballing the dataset and the demo)."""
    from PIL import Image

    h, w = images[0].shape[:2]
    rows = (len(images) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for k, im in enumerate(images):
        sheet.paste(Image.fromarray(im), ((k % cols) * w, (k // cols) * h))
    return sheet.resize((cols * w * scale, rows * h * scale), Image.NEAREST)


# Index ranges (``style_examples(offset=...)``) that never overlap: private sets use 0..n-1.
PRIVATE_OFFSET = 0
REFERENCE_OFFSET = 100_000  # KID reference ("held-out real") images
JUDGE_OFFSET = 200_000  # judge training images
JUDGE_TEST_OFFSET = 300_000  # judge test images
VAE_OFFSET = 400_000  # held-out-style images the VAE (a generic image codec) trains on
DEMO_OFFSET = 500_000  # the private images bundled for `dpagg demo`

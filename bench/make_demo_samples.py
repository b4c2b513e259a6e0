"""Regenerate the demo's bundled sample images (dpagg_core/samples/*.png).

Eight 64 px images in one made-up "private style" (warm palette, diagonal brush strokes, a dark
circle motif), drawn procedurally so the project owns them. Deterministic: same seed, same files.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).resolve().parents[1] / "dpagg_core" / "samples"
PALETTE = [(230, 120, 40), (250, 200, 60), (180, 60, 40), (255, 235, 180), (120, 40, 30)]


def sample(i: int) -> Image.Image:
    rng = random.Random(1000 + i)
    img = Image.new("RGB", (64, 64), PALETTE[3])
    draw = ImageDraw.Draw(img)
    for _ in range(14):
        x, y = rng.randrange(-16, 64), rng.randrange(-16, 64)
        length = rng.randrange(12, 40)
        draw.line((x, y, x + length, y + length), fill=rng.choice(PALETTE), width=rng.randint(2, 5))
    cx, cy, r = rng.randrange(16, 48), rng.randrange(16, 48), rng.randrange(6, 14)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=PALETTE[4])
    return img.filter(ImageFilter.SMOOTH)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        sample(i).save(OUT / f"sample_{i}.png", optimize=True)
    print(f"wrote 8 samples to {OUT}")


if __name__ == "__main__":
    main()

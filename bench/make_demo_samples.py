"""Regenerate the demo's bundled private images (``dpagg_core/samples/*.png``).

``DEMO_COUNT`` 32 px renders of the mini model's held-out style
``dpagg_core.showcase.minimodel.DEMO_STYLE`` ("ocean checked": the model saw "ocean" and "checked"
only with other partners), from the procedural dataset's reserved ``DEMO_OFFSET`` range, so they are
disjoint from every image the model, the judge or the benchmark used. Deterministic: same code, same
files.

    .venv/bin/python bench/make_demo_samples.py

``--public DIR`` instead writes the PUBLIC images the demo's clip norm comes from: 16 renders of
the training style ``PUBLIC_STYLE`` (never the private ones).
``dpagg_core.showcase.demo.DEMO_CLIP_NORM`` is what this prints for them, with the demo's TI
settings:

    .venv/bin/python bench/make_demo_samples.py --public /tmp/public
    .venv/bin/dpagg suggest-clip-norm --public-images /tmp/public --model <demo out>/minimodel-* \
        --vectors 2 --initializer style --steps 80 --learning-rate 0.02 --batch-size 16 \
        --resolution 32 --quantile 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from bench.minimodel import data  # noqa: E402
from dpagg_core.showcase.demo import DEMO_COUNT  # noqa: E402
from dpagg_core.showcase.minimodel import DEMO_STYLE  # noqa: E402

OUT = ROOT / "dpagg_core" / "samples"
PUBLIC_STYLE = "forest striped"  # a training style, as in bench/reproduce_paper.py
PUBLIC_COUNT = 16


def write(style: str, count: int, offset: int, folder: Path, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}_*.png"):
        old.unlink()
    for i, ex in enumerate(data.style_examples(style, count, offset=offset)):
        Image.fromarray(ex.image).save(folder / f"{prefix}_{i:03d}.png", optimize=True)
    print(f"wrote {count} images of {style!r} to {folder}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--public", type=Path, help="write the public clip-norm images here instead")
    args = ap.parse_args()
    if args.public:
        write(PUBLIC_STYLE, PUBLIC_COUNT, data.REFERENCE_OFFSET, args.public, "public")
    else:
        write(DEMO_STYLE, DEMO_COUNT, data.DEMO_OFFSET, OUT, "private")


if __name__ == "__main__":
    main()

"""Regenerate the demo's bundled private images (``dpagg_core/samples/*.png``).

``DEMO_COUNT`` 32 px renders of the mini model's held-out style ``dpagg_core.minimodel.DEMO_STYLE``
("ocean checked": the model saw "ocean" and "checked" only with other partners), from the
procedural dataset's reserved ``DEMO_OFFSET`` range, so they are disjoint from every image the
model, the judge or the benchmark used. Deterministic: same code, same files.

    .venv/bin/python bench/make_demo_samples.py
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from bench.minimodel import data  # noqa: E402
from dpagg_core.demo import DEMO_COUNT  # noqa: E402
from dpagg_core.minimodel import DEMO_STYLE  # noqa: E402

OUT = ROOT / "dpagg_core" / "samples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.png"):
        old.unlink()
    examples = data.style_examples(DEMO_STYLE, DEMO_COUNT, offset=data.DEMO_OFFSET)
    for i, ex in enumerate(examples):
        Image.fromarray(ex.image).save(OUT / f"private_{i:03d}.png", optimize=True)
    print(f"wrote {len(examples)} images of {DEMO_STYLE!r} to {OUT}")


if __name__ == "__main__":
    main()

"""Regenerate the demo's bundled private images (``dpagg_core/samples/*.png``).

``DEMO_COUNT`` 32 px renders of the mini model's held-out style
``dpagg_core.showcase.minimodel.DEMO_STYLE`` ("ocean checked": the model saw "ocean" and "checked"
only with other partners), from the procedural dataset's reserved ``DEMO_OFFSET`` range, so they are
disjoint from every image the model, the judge or the benchmark used. Deterministic: same code, same
files.

    .venv/bin/python bench/make_demo_samples.py

``--public-embeddings`` instead writes the demo's PUBLIC per-image embeddings
(``dpagg_core/samples/public/public_styles.emb.safetensors``): ``PUBLIC_PER_STYLE`` renders of each
of the 26 *training* styles (never the held-out ones, never the private images), trained with the
demo's TI settings (``demo.demo_config``) on the shipped mini model. The demo fits its public basis
and centre to them and takes its clip norm from them (``demo.demo_public``):

    .venv/bin/python bench/make_demo_samples.py --public-embeddings
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
PUBLIC_PER_STYLE = 4


def write(style: str, count: int, offset: int, folder: Path, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{prefix}_*.png"):
        old.unlink()
    for i, ex in enumerate(data.style_examples(style, count, offset=offset)):
        Image.fromarray(ex.image).save(folder / f"{prefix}_{i:03d}.png", optimize=True)
    print(f"wrote {count} images of {style!r} to {folder}")


def write_public_embeddings() -> Path:
    import tempfile

    from dpagg_core.aggregate.subspace import save_public_embeddings
    from dpagg_core.showcase.demo import PUBLIC_EMBEDDINGS, demo_config
    from dpagg_core.showcase.minimodel import load_minimodel
    from dpagg_core.training.public import train_public_embeddings
    from dpagg_core.training.train_run import Trainer

    images = [
        ex.image
        for style in data.TRAIN_STYLES
        for ex in data.style_examples(style, PUBLIC_PER_STYLE, offset=data.REFERENCE_OFFSET)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        model = load_minimodel(Path(tmp))
        trainer = Trainer(model, demo_config(batch_size=len(images)))
        public = train_public_embeddings(trainer.backend, data.to_tensor(images), trainer.config)
        path = save_public_embeddings(public, OUT / PUBLIC_EMBEDDINGS)
    print(f"wrote PUBLIC embeddings of {len(images)} training-style images to {path}")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--public-embeddings",
        action="store_true",
        help="write the demo's public embeddings (training styles) instead of the private images",
    )
    args = ap.parse_args()
    if args.public_embeddings:
        write_public_embeddings()
    else:
        write(DEMO_STYLE, DEMO_COUNT, data.DEMO_OFFSET, OUT, "private")


if __name__ == "__main__":
    main()

"""The committed mini-model artifact and the functions ``dpagg demo`` / the benchmark call.

The trained weights are committed (``bench/minimodel/artifact/minimodel.safetensors``, float16,
~9.5 MB; ``judge.safetensors``, ~0.2 MB): retraining takes 15-20 CPU-minutes on two free cores
(much longer on a shared machine), while loading takes a second, so a fresh checkout runs the
demo in well under two minutes without training. The artifact is reproducible from the repo:
``python -m bench.minimodel.train`` writes the same files to ``bench/minimodel/cache/``
(git-ignored); ``python -m bench.minimodel.artifact --promote`` copies them here.

API (stable, for the CLI):

* ``model_file()`` -> Path of the single-file checkpoint (committed artifact, else the cache;
  env ``DPAGG_MINIMODEL_DIR`` overrides both);
* ``load_minimodel(cache_dir=None) -> Path``: a diffusers folder rebuilt from that file (once,
  keyed by its hash) under ``dpagg_core.paths.data_dir()/minimodel`` unless ``cache_dir`` is given;
  loadable with ``dpagg_core.models.load_pipeline(path, family='sd1')``;
* ``load_pipeline()``: the ``StableDiffusionPipeline`` directly (float32, CPU);
* ``load_judge()``: the style judge;
* ``demo_images(style, n=8, offset=0) -> list[PIL.Image]``: rendered images of a style (the
  "private" set of the demo: a held-out style the model never saw);
* ``ti_config(**overrides)``: the ``TIConfig`` tuned for the mini model (public hyper-parameters,
  chosen on a *training* style, never on the held-out ones);
* ``generate_images(pipe, vectors=None, prompts=None, ...) -> list[PIL.Image]``;
* ``demo_sheet(released [v, dim], private_images) -> PIL.Image``: private images / without /
  with the released embedding, one labelled row each (what ``dpagg demo`` should save).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from . import data

HERE = Path(__file__).resolve().parent
ARTIFACT_DIR = HERE / "artifact"
CACHE_DIR = HERE / "cache"
MODEL_DIR_ENV = "DPAGG_MINIMODEL_DIR"  # optional override: a folder with both files
MODEL_NAME = "minimodel.safetensors"
JUDGE_NAME = "judge.safetensors"

# The style the demo uses: held out from training (the model has no word for it).
DEMO_STYLE = "ocean checked"
# Prompt templates of the mini model's caption grammar; '{}' holds the embedding's vectors.
TI_TEMPLATES: tuple[str, ...] = ("an image in {} style",)
TI_INITIALIZER = "style"
TI_VECTORS = 2


def _find(name: str) -> Path:
    override = os.environ.get(MODEL_DIR_ENV)
    folders = [Path(override)] if override else [ARTIFACT_DIR, CACHE_DIR]
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{name} not found in {' or '.join(map(str, folders))}: train the mini model with "
        "`python -m bench.minimodel.train` (from the repository root)"
    )


def model_file() -> Path:
    return _find(MODEL_NAME)


def judge_file() -> Path:
    return _find(JUDGE_NAME)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_minimodel(cache_dir: str | Path | None = None) -> Path:
    """Path of a diffusers folder holding the mini model (rebuilt from the single file once)."""
    from .model import folder_from_single_file

    src = model_file()
    if cache_dir is None:
        from dpagg_core.paths import data_dir

        cache_dir = data_dir() / "minimodel"
    folder = Path(cache_dir) / f"minimodel-{_sha(src)}"
    if not (folder / "model_index.json").is_file():
        folder_from_single_file(src, folder)
    return folder


def load_pipeline():
    from .model import pipeline_from_single_file

    return pipeline_from_single_file(model_file())


def load_judge():
    from .judge import load_judge as _load

    return _load(judge_file())


def demo_images(style: str = DEMO_STYLE, n: int = 8, offset: int = 0) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(e.image) for e in data.style_examples(style, n, offset=offset)]


def ti_config(**overrides: Any):
    """Per-image TI recipe for the mini model (chosen with ``bench.minimodel.tune`` on public
    training styles; 150 steps at 1e-2 reach the accuracy of longer/faster settings there)."""
    from dpagg_core.ti import TIConfig

    base: dict[str, Any] = dict(
        steps=150,
        learning_rate=1e-2,
        vectors=TI_VECTORS,
        initializer=TI_INITIALIZER,
        templates=TI_TEMPLATES,
        resolution=None,
        batch_size=256,
        flip=False,
        sample_latents=True,
        seed=0,
    )
    base.update(overrides)
    return TIConfig(**base)


def generate_images(
    pipe: Any,
    *,
    vectors: torch.Tensor | None = None,
    prompts: list[str] | None = None,
    per_template: int = 2,
    seed: int = 0,
) -> list[Any]:
    """PIL images: ``prompts`` without an embedding, or every evaluation template (one per
    shape) with ``vectors`` [v, dim] in place of the style words."""
    from PIL import Image

    from .sample import generate

    arr = generate(pipe, vectors=vectors, prompts=prompts, per_template=per_template, seed=seed)
    return [Image.fromarray(a) for a in arr]


def comparison_sheet(rows: list[tuple[str, list[Any]]], scale: int = 3) -> Any:
    """One PNG-ready PIL image: a labelled row of (upscaled) images per ``(label, images)``."""
    from PIL import Image, ImageDraw

    size = 32 * scale
    label_w = 230
    cols = max(len(imgs) for _, imgs in rows)
    sheet = Image.new("RGB", (label_w + cols * (size + 4), len(rows) * (size + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, imgs) in enumerate(rows):
        y = r * (size + 8) + 4
        draw.text((6, y + size // 2 - 6), label, fill="black")
        for c, im in enumerate(imgs):
            sheet.paste(im.resize((size, size), Image.NEAREST), (label_w + c * (size + 4), y))
    return sheet


def demo_sheet(
    released: torch.Tensor, private_images: list[Any], *, pipe: Any = None, seed: int = 0
) -> Any:
    """The demo picture: the private images, the model without the embedding (plain shape
    prompts) and with the released embedding ``released`` [v, dim] in the style slot."""
    pipe = pipe if pipe is not None else load_pipeline()
    shapes = list(data.SHAPES)
    without = generate_images(pipe, prompts=[f"a {s}" for s in shapes for _ in range(2)], seed=seed)
    with_emb = generate_images(pipe, vectors=released, per_template=2, seed=seed)
    return comparison_sheet(
        [
            ("private images (held-out style)", list(private_images)[: 2 * len(shapes)]),
            ("without embedding: 'a <shape>'", without),
            ("with embedding: 'a <shape> in <emb> style'", with_emb),
        ]
    )


def promote() -> None:
    """Copy the freshly trained cache files into the committed artifact folder."""
    ARTIFACT_DIR.mkdir(exist_ok=True)
    for name in (MODEL_NAME, JUDGE_NAME, "minimodel_info.json", "judge_info.json"):
        src = CACHE_DIR / name
        if src.is_file():
            shutil.copy2(src, ARTIFACT_DIR / name)
            print(f"copied {src} -> {ARTIFACT_DIR / name}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--promote"]:
        promote()
    else:
        print(__doc__)

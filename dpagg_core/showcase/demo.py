"""``dpagg demo``: the whole flow on this machine, offline, in under two minutes on a CPU.

1. The mini text-to-image model (Stable Diffusion structure, trained from scratch by this project
   and shipped in the package, see ``dpagg_core.showcase.minimodel``) is unpacked as a diffusers
   folder. The "private" set: ``DEMO_COUNT`` bundled 32 px images of a style the model never saw in
   training ("ocean checked"; rendered by ``bench/make_demo_samples.py``).
2. ``dpagg run`` trains one textual-inversion embedding per image, calibrates the Gaussian noise
   to epsilon = ``DEMO_EPSILON`` (delta = the default 1e-5), releases the DP mean through a fresh
   ledger and writes ``demo_style.safetensors``. It uses the setting the benchmark found best for
   small sets (docs/evidence.md): the mean and noise live in a PUBLIC subspace (``DEMO_BASIS_K``
   directions per vector) fitted to per-image embeddings of PUBLIC images of the model's 26
   *training* styles, clipped around those public embeddings' mean. The public embeddings ship
   in ``samples/public/`` (``bench/make_demo_samples.py --public-embeddings`` trains them with
   the demo's TI settings); the clip norm is their median distance in the subspace
   (``basis_choice.subspace_clip_norms``). Nothing of the basis, centre or C comes from the private
   images.
3. The released file is loaded the way a user would (diffusers ``load_textual_inversion``) and
   ``demo_with_without.png`` shows the private images, the model without the embedding and with
   it, same seeds.
4. A second release of the same images that would exceed the dataset's budget is refused before
   any training or noise.

``--aggregation-only`` skips training and images: a synthetic private EmbeddingSet is released.
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dpagg_core.budget_report import describe_text, release_text
from dpagg_core.budget_report import print_payload as emit
from dpagg_core.errors import DpaggError
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.released_file import describe
from dpagg_core.showcase.minimodel import (
    DEMO_STYLE,
    SHAPES,
    TI_INITIALIZER,
    TI_VECTORS,
    load_minimodel,
)
from dpagg_core.training.models import load_pipeline
from dpagg_core.training.ti import TIConfig

DEMO_COUNT = 128
DEMO_EPSILON = 2.0
DEMO_BASIS_K = 16  # directions per vector: bench/choose_public_defaults.py (training styles only)
PUBLIC_EMBEDDINGS = "public/public_styles.emb.safetensors"  # under dpagg_core/samples
DEMO_STEPS = 80
DEMO_LEARNING_RATE = 0.02
SHEET_NAME = "demo_with_without.png"
TOKEN = "<demo_style>"


def _banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _samples_dir(out: Path) -> Path:
    """Copy the bundled samples into ``out/private_images`` (the demo's 'private' folder)."""
    folder = out / "private_images"
    folder.mkdir(parents=True, exist_ok=True)
    root = resources.files("dpagg_core") / "samples"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".png"):
            (folder / entry.name).write_bytes(entry.read_bytes())
    return folder


def demo_config(batch_size: int = DEMO_COUNT) -> Any:
    """The demo's TI settings (also those of its shipped public embeddings)."""
    return TIConfig(
        steps=DEMO_STEPS,
        learning_rate=DEMO_LEARNING_RATE,
        vectors=TI_VECTORS,
        initializer=TI_INITIALIZER,
        resolution=32,
        batch_size=batch_size,
    )


def demo_public(out: Path) -> tuple[Path, Any, float]:
    """The shipped PUBLIC embeddings (copied to ``out``), the basis fitted to them and the clip
    norm around their mean in that basis: every noise-shaping input of the demo, public."""
    from dpagg_core.aggregate.basis_builders import basis_from_public_embeddings
    from dpagg_core.aggregate.basis_choice import subspace_clip_norms
    from dpagg_core.io.public_embeddings import load_public_embeddings

    path = out / "public" / Path(PUBLIC_EMBEDDINGS).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((resources.files("dpagg_core") / "samples" / PUBLIC_EMBEDDINGS).read_bytes())
    public = load_public_embeddings(path)
    basis = basis_from_public_embeddings(public, DEMO_BASIS_K)
    return path, basis, subspace_clip_norms(public, basis)["public_mean"]


def _labelled_rows(rows: list[tuple[str, list[Any]]], scale: int = 3) -> Any:
    """One PIL image: a labelled row of nearest-upscaled images per ``(label, images)``."""
    from PIL import Image, ImageDraw

    size = max(im.size[0] for _, ims in rows for im in ims) * scale
    label_w = 300
    cols = max(len(ims) for _, ims in rows)
    sheet = Image.new("RGB", (label_w + cols * (size + 4), len(rows) * (size + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, ims) in enumerate(rows):
        y = r * (size + 8) + 4
        draw.text((6, y + size // 2 - 6), label, fill="black")
        for c, im in enumerate(ims):
            sheet.paste(im.resize((size, size), Image.NEAREST), (label_w + c * (size + 4), y))
    return sheet


def with_without_sheet(model: Path, embedding: Path, private: Path, out_png: Path) -> Path:
    """Private images / generated without the embedding / generated with it (same seeds).

    The released file is loaded by diffusers' own ``load_textual_inversion``, as a user would."""
    from PIL import Image

    pipe = load_pipeline(model).pipe
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(embedding), token=TOKEN)
    shapes = list(SHAPES) * 2  # the bundled images cycle through the shapes in this order

    def generate(prompts: list[str]) -> list[Any]:
        gen = torch.Generator().manual_seed(0)
        return pipe(
            prompts, height=32, width=32, num_inference_steps=20, guidance_scale=7.5,
            generator=gen,
        ).images  # fmt: skip

    files = sorted(private.glob("*.png"))[: len(shapes)]
    originals = [Image.open(f).convert("RGB") for f in files]
    without = generate([f"a {s}" for s in shapes])
    with_embedding = generate([f"a {s} in {TOKEN} style" for s in shapes])
    rows = [
        ("private images (a style the model never saw)", originals),
        ("without the embedding: 'a <shape>'", without),
        (f"with it: 'a <shape> in {TOKEN} style'", with_embedding),
    ]
    out_png.parent.mkdir(parents=True, exist_ok=True)
    _labelled_rows(rows).save(out_png)
    return out_png


def _synthetic_set(key: bytes):
    from dpagg_core.io.images import dataset_id_for

    gen = torch.Generator().manual_seed(0)
    n, dim = 50, 32
    centre = torch.randn(1, dim, generator=gen)
    vectors = centre + 0.3 * torch.randn(n, 1, dim, generator=gen)
    return EmbeddingSet(
        vectors={"emb_params": vectors.float()},
        kind="textual_inversion",
        model_family="sd1",
        base_model_id="demo-synthetic",
        centre={"emb_params": centre.float()},
        initializer="painting",
        dataset_id=dataset_id_for([b"dpagg-demo-synthetic"], key=key),
    )


def _release(
    source: Any,
    epsilon: float,
    name: str,
    out: Path,
    ledger: Any,
    *,
    clip_norm: float,
    public: tuple[Path, Any] | None = None,
) -> Any:
    """Release a DP mean of ``source`` (an ``EmbeddingSet``, or a ``(Trainer, images)`` pair to
    train after the budget check) as ``dpagg run``/``aggregate`` would; BudgetExceeded (a
    DpaggError) before any training or noise when the budget does not allow it."""
    from dpagg_core.aggregate.release import release_embeddings
    from dpagg_core.pipeline import train_and_release
    from dpagg_core.privacy.calibration import calibrate

    if public is not None:  # (public embeddings file, basis): subspace + public-mean centre
        shaping: dict[str, Any] = {
            "centre": "public_mean",
            # the shipped file is the project's own public data (no tag under this ledger):
            # loaded here without a ledger check, i.e. trusted as public
            "public_centre": _trusted_public(public[0]),
            "basis": public[1],
        }
    else:
        shaping = {}  # release_embeddings' default centre
    options = {"clip_norm": clip_norm, "name": name, "out_dir": out, **shaping}
    if isinstance(source, tuple):  # the core pipeline: ledger first, then training
        trainer, loaded = source
        plan = calibrate(epsilon, n=loaded.count)
        return train_and_release(trainer, loaded, plan, ledger=ledger, **options)
    plan = calibrate(epsilon, n=source.n)
    return release_embeddings(source, plan=plan, ledger=ledger, **options)


def _trusted_public(path: Path) -> Any:
    """The project's shipped PUBLIC embeddings, loaded as trusted (``ledger=None``)."""
    from dpagg_core.io.public_embeddings import load_public_embeddings

    return load_public_embeddings(path)


def run_demo(
    out_dir: Path | None = None, *, aggregation_only: bool = False, as_json: bool = False
) -> int:
    """The demo (module docstring) in ``out_dir`` (default: a new temporary folder); 0 when the
    over-budget second release was refused as it must be."""
    from dpagg_core.privacy.ledger import Ledger

    out = Path(out_dir or tempfile.mkdtemp(prefix="dpagg-demo-")).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(out / "ledger.sqlite")
    embeddings_dir = out / "embeddings"
    print(f"dpagg demo: working in {out}")

    if aggregation_only:
        from dpagg_core.io.private_file import load_private, save_private

        _banner("1. a synthetic private embedding set (50 x 1 x 32)")
        private = out / "private" / "per_image.safetensors"
        key = ledger.identity_key()
        if not private.exists():
            save_private(_synthetic_set(key), private, key=key)
        source: Any = load_private(private, key=key)
        eps, clip_norm, public = 1.0, 1.0, None
    else:
        from dpagg_core.training.train_run import Trainer

        _banner(
            f"1. the mini model (trained by this project, shipped in the package) and "
            f"{DEMO_COUNT} 'private' images of a style it never saw ({DEMO_STYLE!r})"
        )
        model = load_minimodel(out)
        images = _samples_dir(out)
        print(f"model : {model}\nimages: {images}")
        trainer = Trainer(model, demo_config(), ledger=ledger.path)
        source = (trainer, trainer.images(images))
        public_file, basis, clip_norm = demo_public(out)
        public = (public_file, basis)
        eps = DEMO_EPSILON
        print(
            f"public: {public_file} (embeddings of PUBLIC images of the training styles): "
            f"basis k = {basis.k} per vector (noise on {basis.dim} of {basis.flat_dim} "
            f"coordinates), centre = their mean, C = {clip_norm:.4g} (their median distance)"
        )

    again = eps / 2
    _banner(f"2. train per image (if any), calibrate to epsilon = {eps:g}, release via the ledger")
    try:
        outcome = _release(
            source, eps, "demo_style", embeddings_dir, ledger, clip_norm=clip_norm, public=public
        )
    except DpaggError as exc:
        print(f"dpagg demo: error: {exc}", file=sys.stderr)
        return 2
    emit(outcome.summary(), release_text(outcome), as_json=as_json)
    target = embeddings_dir / "demo_style.safetensors"
    _banner("3. the released file, as any user would inspect it")
    info = describe(target)
    emit(info, describe_text(target, info), as_json=as_json)

    sheet = None
    if not aggregation_only:
        _banner("4. the released file in diffusers: images without and with the embedding")
        sheet = with_without_sheet(model, target, images, out / SHEET_NAME)
        print(f"wrote {sheet}")
    _banner(
        f"5. a second release of the same images (epsilon {again:g}) exceeds the budget of {eps:g}"
    )
    try:
        _release(
            source, again, "demo_style_again", embeddings_dir, ledger, clip_norm=clip_norm,
            public=public,
        )  # fmt: skip
        refused = False
    except DpaggError as exc:
        print(f"dpagg demo: error: {exc}", file=sys.stderr)
        refused = True
    print(
        "refused as expected: nothing was drawn or recorded"
        if refused
        else "UNEXPECTED: the over-budget release was not refused"
    )
    _banner("done")
    print(f"embedding : {target}")
    print(f"ledger    : {ledger.path}   (dpagg ledger show --ledger {ledger.path})")
    if sheet is not None:
        print(f"picture   : {sheet}")
        print(f"use it    : 'a circle in {TOKEN} style' (diffusers load_textual_inversion)")
    else:
        print("use it    : a lighthouse, in the style of embedding:demo_style")
    return 0 if refused else 1

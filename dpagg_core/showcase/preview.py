"""``dpagg run --preview``: a small grid of images generated with the RELEASED embedding.

Only the released file (public, post-processing of the DP output) is used, so the preview costs no
privacy. The grid holds, per prompt, one image without and one with the embedding, from the same
public seed, so the difference is the embedding's effect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from dpagg_core.io.released_file import read_released

PROMPTS = ("a lighthouse, in the style of {}", "a cat, in the style of {}")


def preview_grid(
    model: Any,
    embedding_file: Path,
    name: str,
    *,
    steps: int = 20,
    size: int | None = None,
    seed: int = 0,
) -> Path:
    """Render ``PROMPTS`` with and without ``embedding_file``; write ``<name>_preview.png`` beside.

    ``model`` is a ``dpagg_core.training.models.LoadedModel``. The token ``<name>`` is added to a
    copy of the tokenizer's vocabulary by diffusers' own ``load_textual_inversion`` and removed
    again.
    """
    pipe = model.pipe
    token = f"<{name}>"
    size = size or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "height": size, "width": size}

    def render(text: str) -> Image.Image:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return pipe(text, generator=gen, **kwargs).images[0]

    without = [render(p.format("a painting")) for p in PROMPTS]
    _load(pipe, embedding_file, token)
    try:
        styled = [render(p.format(token)) for p in PROMPTS]
    finally:
        _unload(pipe, token)
    return _save_grid(
        list(zip(without, styled, strict=True)), embedding_file.with_name(f"{name}_preview.png")
    )


def grid_of_embeddings(
    model: Any,
    rows: list[list[Path | None]],
    labels: list[str],
    out: Path,
    *,
    prompt: str = PROMPTS[0],
    steps: int = 20,
    size: int | None = None,
    seed: int = 0,
) -> Path:
    """Render ``prompt`` once per embedding file of ``rows`` (None: the plain prompt, "a
    painting", without any embedding), from the same public seed, and write the labelled grid
    to ``out``. Each file is rendered once however often it appears."""
    pipe = model.pipe
    size = size or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "height": size, "width": size}
    cache: dict[Path | None, Image.Image] = {}

    def image_of(path: Path | None) -> Image.Image:
        if path not in cache:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            if path is None:
                cache[path] = pipe(prompt.format("a painting"), generator=gen, **kwargs).images[0]
            else:
                token = "<dpagg-grid>"
                _load(pipe, path, token)
                try:
                    cache[path] = pipe(prompt.format(token), generator=gen, **kwargs).images[0]
                finally:
                    _unload(pipe, token)
        return cache[path]

    return labelled_grid([[image_of(p) for p in row] for row in rows], labels, out)


def _load(pipe: Any, path: Path, token: str) -> None:
    tensors, _ = read_released(path)
    if set(tensors) == {"clip_l", "clip_g"}:
        pipe.load_textual_inversion(
            tensors["clip_l"],
            token=token,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )
        pipe.load_textual_inversion(
            tensors["clip_g"],
            token=token,
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
    else:
        pipe.load_textual_inversion(str(path), token=token)


def _unload(pipe: Any, token: str) -> None:
    for tok_name, enc_name in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if getattr(pipe, tok_name, None) is not None and getattr(pipe, enc_name, None) is not None:
            pipe.unload_textual_inversion(
                token, tokenizer=getattr(pipe, tok_name), text_encoder=getattr(pipe, enc_name)
            )


PREVIEW_LABELS = ("without", "with embedding")


def labelled_grid(rows: list[list[Image.Image]], labels: list[str], out: Path) -> Path:
    """Write ``rows`` (equal-sized PIL images, one list per row) as a grid to ``out``, each column
    under its label. Cells narrower than the widest label (a 64 px preview) are enlarged by a
    whole factor (nearest neighbour) so every label fits over its own column instead of being
    cut ("thout with emb")."""
    w, h = rows[0][0].size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), label) for label in labels]
    need = max(b[2] - b[0] for b in boxes) + 8
    scale = max(1, -(-need // w))
    cw, ch = w * scale, h * scale
    band = max(b[3] - b[1] for b in boxes) + 8
    grid = Image.new("RGB", (len(labels) * cw, len(rows) * ch + band), "white")
    draw = ImageDraw.Draw(grid)
    for col, label in enumerate(labels):
        draw.text((col * cw + (cw - draw.textlength(label)) / 2, 3), label, fill="black")
    for r, row in enumerate(rows):
        for col, img in enumerate(row):
            cell = img.convert("RGB")
            if scale > 1:
                cell = cell.resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (col * cw, band + r * ch))
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


def _save_grid(rows: list[tuple[Image.Image, Image.Image]], out: Path) -> Path:
    return labelled_grid([list(r) for r in rows], list(PREVIEW_LABELS), out)

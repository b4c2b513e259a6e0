"""The Clip Embeddings node (``nodes/clip_embeddings.py``), ComfyUI absent.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import numpy as np
import torch
from nodes_fixtures import (
    FakeClipVision,
    comfy_images,
    originals_as_comfy_images,
)
from PIL import Image

from dpagg_core.io.images import load_image_folder


def test_clip_embeddings_encode_each_image_alone(pack, comfy_base):
    cv = FakeClipVision()
    imgs = comfy_images(3, 24)
    eset = (
        pack["clip_embeddings"]
        .ClipEmbeddings.execute(clip_vision=[cv], images=[imgs], crop=["center"])
        .args[0]
    )
    assert cv.calls == [((1, 24, 24, 3), True)] * 3
    assert eset.kind == "clip_image" and eset.n == 3
    want = torch.nn.functional.normalize(imgs.mean(dim=(1, 2)) @ cv.w, dim=-1)  # unit rows
    assert torch.allclose(eset.vectors["image_embeds"][:, 0], want)
    assert eset.dataset_id == pack["common"].images_dataset_id(list(imgs))[0]


class ComfyClipVision:
    """ComfyUI's ``ClipVisionModel.encode_image`` (comfy/clip_vision.py) around a transformers
    CLIP vision model: ``clip_preprocess`` (bicubic to the model's size, 8-bit rounding, OpenAI
    mean/std), then the projected embedding as it comes (not normalised)."""

    def __init__(self, model):
        from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

        self.model, self.size = model, int(model.config.image_size)
        self.mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)

    def encode_image(self, image, crop=True):
        x = image.movedim(-1, 1)
        if tuple(x.shape[-2:]) != (self.size, self.size):  # square test images: no crop
            x = torch.nn.functional.interpolate(x, (self.size, self.size), mode="bicubic")
        x = torch.clip(255.0 * x, 0, 255).round() / 255.0
        with torch.no_grad():
            out = self.model(pixel_values=(x - self.mean) / self.std)
        return {"image_embeds": out.image_embeds}


def test_clip_embeddings_node_gives_the_cli_vectors(pack, comfy_base):
    """The same pictures through the Clip Embeddings node (plain IMAGE or Load Private Images)
    and through the CLI/library path (``load_image_folder`` + ``clip_image_embeddings``, what
    ``dpagg aggregate --kind clip`` runs): the same unit-norm rows, model id and dataset id."""
    from test_clip_image import tiny_vision

    from dpagg_core.training.clip_image import clip_image_embeddings

    folder = comfy_base / "input" / "clip"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(4):  # at the model's 32 px: no resampling on either path
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(folder / f"{i}.png")
    model = tiny_vision()
    cli = clip_image_embeddings(
        model, load_image_folder(folder, 32, ledger=pack["common"].ledger_path())
    )
    want = cli.vectors["image_embeds"]
    assert torch.allclose(want.norm(dim=-1), torch.ones(4, 1), atol=1e-6)
    private = (
        pack["load_private_images"].LoadPrivateImages.execute(folder="clip", resolution=32).args[0]
    )
    for images in (originals_as_comfy_images(folder), [private]):
        cv = ComfyClipVision(model)
        got = (
            pack["clip_embeddings"]
            .ClipEmbeddings.execute(clip_vision=[cv], images=images, crop=["center"])
            .args[0]
        )
        assert torch.allclose(got.vectors["image_embeds"], want, atol=1e-6)
        assert got.base_model_id == cli.base_model_id and got.dataset_id == cli.dataset_id

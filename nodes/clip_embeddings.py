"""The **Clip Embeddings** node: one CLIP image embedding per image (ComfyUI's CLIP vision
encoder), an EMBEDDING_SET of kind clip_image."""

from __future__ import annotations

from comfy_api.latest import io

from dpagg_core.errors import DpaggError
from dpagg_core.training import clip_image

from .common import (
    CATEGORY,
    EmbeddingSetIO,
    _first,
    _flatten_images,
    _images_input,
    _progress,
    _ui,
    images_dataset_id,
    loaded_dataset_id,
    private_images,
    refuse_unstable_loader,
)


class ClipEmbeddings(io.ComfyNode):
    """One CLIP image embedding per image (ComfyUI's own CLIP vision encoder)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DpaggClipEmbeddings",
            display_name="Clip Embeddings (dpagg)",
            category=CATEGORY,
            description=(
                "Encodes every image with the CLIP vision model into an EMBEDDING_SET of kind "
                "clip_image. PRIVATE: kept in memory; release it with DP Aggregate."
            ),
            is_input_list=True,
            inputs=[
                io.ClipVision.Input("clip_vision"),
                _images_input("the private images: Load Private Images, or an IMAGE batch / list"),
                io.Combo.Input("crop", options=["center", "none"], default="center"),
            ],
            outputs=[EmbeddingSetIO.Output(display_name="EMBEDDING_SET")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, clip_vision, images, crop) -> io.NodeOutput:
        clip_vision, crop = _first(clip_vision), _first(crop)
        if clip_vision is None:
            raise DpaggError("clip_vision is missing: connect a Load CLIP Vision node")
        loaded = private_images(images)
        if loaded is not None:  # [N, 3, R, R] in [-1, 1] -> ComfyUI images [R, R, 3] in [0, 1]
            imgs = [((row.movedim(0, -1) + 1) / 2).clamp(0, 1) for row in loaded.pixels]
            dataset_id = loaded_dataset_id(loaded)
        else:
            refuse_unstable_loader(cls.hidden)
            imgs = _flatten_images(images)
            dataset_id = images_dataset_id(imgs)[0]
        progress, should_cancel = _progress(len(imgs))
        rows = []
        for i, img in enumerate(imgs):  # one image at a time: row i depends on image i only
            should_cancel()
            out = clip_vision.encode_image(img.unsqueeze(0), crop=crop == "center")
            rows.append(out["image_embeds"].reshape(1, -1))
            progress(i + 1, len(imgs))
        model_id = clip_image.vision_model_id(getattr(clip_vision, "model", None))
        eset = clip_image.clip_image_set(rows, base_model_id=model_id, dataset_id=dataset_id)
        lines = [
            f"{eset.n} CLIP image embeddings (width {eset.encoder_widths['image_embeds']})",
            "private: kept in memory only; release them with DP Aggregate",
            f"image set {dataset_id}",
        ]
        return io.NodeOutput(eset, ui=_ui("Clip Embeddings", lines, dataset=dataset_id))

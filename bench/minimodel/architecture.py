"""The mini model's architecture, built from scratch with random weights: training only.

``python -m bench.minimodel.train`` starts from :func:`build_components`; the trained weights ship
in the package (``dpagg_core/data/minimodel.safetensors``) with these configs in its header, so
``dpagg_core.showcase.minimodel`` rebuilds the model from the file and needs none of this.
"""

from __future__ import annotations

from typing import Any

import torch

from dpagg_core.showcase.minimodel import small_clip_text_config

TEXT_WIDTH = 64
LATENT_SIZE = 8
# 8 latent channels (SD1/SD2 use 4, SD3/Flux 16): at 4x compression per side, 4 channels lost
# every texture in a first trial; the UNet only sees more input/output channels.
LATENT_CHANNELS = 8
IMAGE_SIZE = 32


def text_encoder_config() -> dict[str, Any]:
    return small_clip_text_config(
        TEXT_WIDTH, hidden_act="quick_gelu", attention_dropout=0.0, dropout=0.0
    )


def unet_config() -> dict[str, Any]:
    return dict(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def vae_config() -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
    )


def build_components(seed: int = 0) -> dict[str, Any]:
    """Fresh randomly initialised components (deterministic in ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**text_encoder_config()))
    unet = UNet2DConditionModel(**unet_config())
    vae = AutoencoderKL(**vae_config())
    return {"text_encoder": te, "unet": unet, "vae": vae}

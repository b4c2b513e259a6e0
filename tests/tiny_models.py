"""Tiny Stable-Diffusion-structured models built in code, with random weights: test support
(and ``bench/ti_throughput.py``'s ``tiny`` models).

Same classes and conditioning path as SD1.x (CLIPTextModel -> UNet2DConditionModel cross-attention,
AutoencoderKL with 4 latent channels, DDPM noise schedule), with random weights and the real CLIP
tokenizer vocabulary, so nothing is downloaded. The shipped mini model
(``dpagg_core.showcase.minimodel``) shares the text-encoder layout and the noise schedule.
"""

from __future__ import annotations

import torch

from dpagg_core.showcase.minimodel import SD_NOISE_SCHEDULE, small_clip_text_config
from dpagg_core.training.tokenizer import clip_tokenizer


def tiny_text_encoder(hidden_size: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**small_clip_text_config(hidden_size))).eval()


def tiny_unet(
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    seed: int = 0,
    heads: int = 8,
):
    """A tiny ``UNet2DConditionModel`` with SD1.x's layout (cross-attention at the full-resolution
    level). ``heads=8`` (the tests' default) gives heads of width 4 and 8; ``heads=2`` gives widths
    16 and 32, nearer SD1.5's 40-160, for benchmarks where attention cost per image matters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,  # diffusers' name; for this UNet it is the number of heads
        norm_num_groups=8,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    ).eval()


def tiny_pipeline(hidden_size: int = 32, seed: int = 0, heads: int = 8):
    """A ``StableDiffusionPipeline`` of tiny random components (32 px images -> 16 px latents)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    scheduler = DDPMScheduler(**SD_NOISE_SCHEDULE)
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(hidden_size, seed),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(hidden_size, seed=seed, heads=heads),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )

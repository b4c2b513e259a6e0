"""Image generation with the mini model, optionally with a textual-inversion embedding.

``generate`` is a plain batched DDIM loop with classifier-free guidance over the pipeline's
components. A prompt template holds ``'{}'`` where the embedding's ``v`` vectors go; the vectors
are substituted in the token-embedding *output* by ``dpagg_core.training.diffusers_backend`` (the
same code path as training), so what is evaluated is exactly what TI optimised. Sampling randomness
comes from a ``torch.Generator`` seeded by the caller (public evaluation noise, nothing private).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import data

EVAL_TEMPLATES: tuple[str, ...] = tuple(f"a {shape} in {{}} style" for shape in data.SHAPES)


def _backend(pipe: Any):
    from dpagg_core.training.diffusers_backend import DiffusersBackend

    return DiffusersBackend.from_pipeline(pipe, model_family="sd1", device="cpu")


@torch.no_grad()
def encode_text(pipe: Any, prompts: Sequence[str]) -> torch.Tensor:
    tok = pipe.tokenizer
    ids = tok(
        list(prompts),
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return pipe.text_encoder(ids).last_hidden_state


@torch.no_grad()
def encode_with_embedding(
    pipe: Any, templates: Sequence[str], vectors: torch.Tensor, backend: Any = None
) -> torch.Tensor:
    """Hidden states for ``templates`` (each with one '{}') with ``vectors`` [v, dim] in it."""
    backend = backend or _backend(pipe)
    vec = vectors.to(torch.float32)
    if vec.ndim == 2:
        vec = vec.unsqueeze(0).expand(len(templates), -1, -1)
    cond = backend.encode_prompts(list(templates), {"emb_params": vec}, image_size=32)
    return cond.hidden


@torch.no_grad()
def denoise(
    pipe: Any,
    cond: torch.Tensor,
    *,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
    batch: int = 128,
) -> np.ndarray:
    """DDIM with classifier-free guidance; ``cond`` [B, 77, dim] -> uint8 images [B, H, W, 3]."""
    from diffusers import DDIMScheduler

    from dpagg_core.showcase.minimodel import SCHEDULER_KW

    sched = DDIMScheduler(**SCHEDULER_KW)
    unet, vae = pipe.unet, pipe.vae
    uncond = encode_text(pipe, [""])
    gen = torch.Generator().manual_seed(seed)
    size = int(unet.config.sample_size)
    out = []
    for s in range(0, cond.shape[0], batch):
        c = cond[s : s + batch]
        b = c.shape[0]
        lat = torch.randn((b, unet.config.in_channels, size, size), generator=gen)
        sched.set_timesteps(steps)
        ctx = torch.cat([uncond.expand(b, -1, -1), c])
        for t in sched.timesteps:
            eps = unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx).sample
            e_u, e_c = eps.chunk(2)
            lat = sched.step(e_u + guidance * (e_c - e_u), t, lat).prev_sample
        img = vae.decode(lat / vae.config.scaling_factor).sample
        out.append(((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out).numpy()


def generate(
    pipe: Any,
    *,
    vectors: torch.Tensor | None = None,
    prompts: Sequence[str] | None = None,
    per_template: int = 8,
    templates: Sequence[str] = EVAL_TEMPLATES,
    steps: int = 25,
    guidance: float = 3.0,
    seed: int = 0,
) -> np.ndarray:
    """Images from explicit ``prompts`` (no embedding), or ``per_template`` images for every
    template with ``vectors`` [v, dim] in its '{}' slot. Returns uint8 [B, H, W, 3]."""
    if vectors is None:
        if prompts is None:
            raise ValueError("give prompts (no embedding) or vectors (with templates)")
        cond = encode_text(pipe, list(prompts))
    else:
        temps = [t for t in templates for _ in range(per_template)]
        cond = encode_with_embedding(pipe, temps, vectors)
    return denoise(pipe, cond, steps=steps, guidance=guidance, seed=seed)

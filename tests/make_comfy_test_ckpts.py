"""Random-weight single-file checkpoints that ComfyUI's Load Checkpoint detects as SD1.5, SD2 with
v-prediction, and SDXL (test support for tests/test_comfyui_integration.py; CPU-sized).

Run with ComfyUI's own Python from anywhere:

    COMFYUI_DIR/.venv/bin/python tests/make_comfy_test_ckpts.py COMFYUI_DIR OUT_DIR [sd15 sd2v sdxl]

writes OUT_DIR/{sd15,sd2v,sdxl}_test.safetensors (fp16). The models are built from ComfyUI's own
classes and saved through its own ``state_dict_for_saving`` (the original LDM/SGM key layout a
released checkpoint has), then loaded back with ``load_checkpoint_guess_config`` to check what
ComfyUI detects. What detection reads is real; everything else is shrunk:

* UNets keep ``model_channels`` 320, the context width and the ``transformer_depth`` list that
  ComfyUI matches on (SDXL's [0, 0, 2, 2, 10, 10]), but every level has 320 channels and the
  decoder has at most one transformer block per level. SD2-v has 4 levels x 2 res blocks, so
  ``output_blocks.11.1`` exists (ComfyUI lists output depths last block first); its
  ``norm1.bias`` has std > 0.09, ComfyUI's v-prediction test.
* Text encoders are full shape (CLIP-L; OpenCLIP ViT-H for SD2; CLIP-L + OpenCLIP ViT-bigG for
  SDXL): ComfyUI builds them from fixed configs, so a smaller one would load with missing keys.
* The VAE has SD's full shape (ComfyUI reads its config from the state dict).
"""

from __future__ import annotations

import sys
from pathlib import Path

SD_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

COMMON = {
    "use_checkpoint": False,
    "image_size": 32,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}

UNETS = {
    # SD1.5: context 768, 4 levels, one res block each.
    "sd15": {
        **COMMON,
        "adm_in_channels": None,
        "num_res_blocks": [1, 1, 1, 1],
        "channel_mult": [1, 1, 1, 1],
        "transformer_depth": [1, 1, 1, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": False,
        "context_dim": 768,
        "num_heads": 8,
    },
    # SD2.x (768-v): context 1024, linear projections, 64-channel heads; 12 output blocks.
    "sd2v": {
        **COMMON,
        "adm_in_channels": None,
        "num_res_blocks": [2, 2, 2, 2],
        "channel_mult": [1, 1, 1, 1],
        "transformer_depth": [1, 0, 0, 0, 0, 0, 0, 0],
        "transformer_depth_output": [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # last block first
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": 1024,
        "num_head_channels": 64,
    },
    # SDXL base: context 2048, pooled text + size conditioning (adm 2816), SDXL's depth list.
    "sdxl": {
        **COMMON,
        "adm_in_channels": 2816,
        "num_classes": "sequential",
        "num_res_blocks": [2, 2, 2],
        "channel_mult": [1, 1, 1],
        "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "use_linear_in_transformer": True,
        "context_dim": 2048,
        "num_head_channels": 64,
    },
}
CONFIG_CLASS = {"sd15": "SD15", "sd2v": "SD20", "sdxl": "SDXL"}
V_PRED_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


def randomize(module, generator) -> None:
    """Fill every parameter (ComfyUI's ops leave them uninitialised): 1-D weights (every
    Group/LayerNorm scale, named ``norm*`` or not, e.g. a ResBlock's ``in_layers.0``) 1, biases
    and other 1-D/0-D values 0, matrices and kernels N(0, 0.02^2) — so the UNet's output depends
    on its inputs and TI gets a gradient."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.dim() == 1:
                p.fill_(1.0)
            elif leaf == "bias" or p.dim() <= 1:
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)


def build(kind: str, out: Path) -> None:
    import comfy.sd
    import comfy.supported_models as sm
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    gen = torch.Generator().manual_seed(0)
    unet_config = dict(UNETS[kind])
    config = getattr(sm, CONFIG_CLASS[kind])(unet_config)
    model = config.get_model({})
    randomize(model.diffusion_model, gen)
    clip_target = config.clip_target()
    clip_model = clip_target.clip(dtype=torch.float32)
    randomize(clip_model, gen)
    vae = AutoencoderKL(ddconfig=SD_VAE, embed_dim=4)
    randomize(vae, gen)
    sd = model.state_dict_for_saving(clip_model.state_dict(), vae.state_dict(), None)
    if kind == "sd2v":  # ComfyUI's test for SD2 v-prediction: std of this bias > 0.09
        sd[V_PRED_KEY] = torch.randn(sd[V_PRED_KEY].shape, generator=gen) * 0.2
    sd = {k: v.to(torch.float16).contiguous() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.replace(out)


def check(kind: str, path: Path) -> str:
    """Load through ComfyUI's Load Checkpoint code; return what it detected."""
    import logging

    import comfy.sd

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))[:4]
    finally:
        logging.getLogger().removeHandler(handler)
    bad = [r for r in records if "missing" in r or "unexpected" in r or "mismatch" in r]
    assert not bad, f"{kind}: {bad[:3]}"
    name = type(model.model.model_config).__name__
    family = type(model.model).__name__
    pred = model.model.model_type.name
    want = {"sd15": ("SD15", "EPS"), "sd2v": ("SD20", "V_PREDICTION"), "sdxl": ("SDXL", "EPS")}
    assert (name, pred) == want[kind], (kind, name, family, pred)
    return f"{kind}: {name} ({family}, {pred})"


def main(argv: list[str]) -> None:
    comfy_dir, out_dir = Path(argv[0]).resolve(), Path(argv[1])
    kinds = argv[2:] or ["sd15", "sd2v", "sdxl"]
    sys.path.insert(0, str(comfy_dir))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    for kind in kinds:
        path = out_dir / f"{kind}_test.safetensors"
        if not path.exists():
            build(kind, path)
        print(check(kind, path), f"{path.stat().st_size / 1e9:.2f} GB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

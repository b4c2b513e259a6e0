"""The mini text-to-image model: Stable Diffusion structure, CPU-sized, trained from scratch.

The project trains it itself (``python -m bench.minimodel.train``, ~25 CPU-minutes) on a procedural
caption->image set of 30 styles, four of them held out; the trained weights ship inside the
package (``dpagg_core/data/minimodel.safetensors``, float16, 9.5 MB) so ``dpagg demo`` and the
benchmarks run on a fresh machine without downloading or training anything.

Components (same classes and conditioning path as SD1.x; built from scratch by
``bench/minimodel/architecture.py``, read back here from the shipped file's metadata):

* ``CLIPTextModel`` (real CLIP BPE vocabulary of 49408 tokens, 77 positions, width 64, 2 layers);
* ``UNet2DConditionModel`` on 8 x 8 x 8 latents (channels 32/64, cross-attention width 64);
* ``AutoencoderKL`` 32 px <-> 8 px (factor 4, 8 latent channels), ``scaling_factor`` measured on
  the training set so scaled latents have unit standard deviation (SD's 0.18215 plays that role);
* a DDPM ``scaled_linear`` noise schedule (SD's betas), epsilon prediction; DDIM for sampling.

Artifact formats:

* a diffusers folder (``save_pretrained`` layout, loadable by
  ``dpagg_core.training.models.load_pipeline`` and ``StableDiffusionPipeline.from_pretrained``):
  ``load_minimodel()`` writes one from the file;
* a single ``.safetensors`` file holding every weight under ``text_encoder.`` / ``unet.`` /
  ``vae.`` prefixes in float16, with the component configs as JSON in the header metadata.
  (It is *not* the LDM/A1111 single-file layout: that layout has no room for a non-standard
  architecture. ``folder_from_single_file`` turns it back into a diffusers folder.)

Nothing here is private: the model never saw the held-out styles, which play the private sets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dpagg_core.paths import data_dir
from dpagg_core.training.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

MODEL_FILE = Path(__file__).resolve().parent.parent / "data" / "minimodel.safetensors"
MODEL_DIR_ENV = "DPAGG_MINIMODEL_DIR"  # optional override: a folder holding minimodel.safetensors

# A style held out of training (``bench.minimodel.data.HELD_OUT``): the demo's "private" set.
DEMO_STYLE = "ocean checked"
# The content classes of the caption grammar ("a circle in fire striped style").
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star")
# Per-image TI recipe for the mini model (public: tuned on training styles, never held-out ones).
TI_TEMPLATES: tuple[str, ...] = ("an image in {} style",)
TI_INITIALIZER = "style"
TI_VECTORS = 2
TI_STEPS = 150
TI_LEARNING_RATE = 1e-2

# Stable Diffusion 1.x/2.x's training noise schedule (scheduler kwargs).
SD_NOISE_SCHEDULE: dict[str, Any] = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    clip_sample=False,
)
SCHEDULER_KW: dict[str, Any] = SD_NOISE_SCHEDULE | dict(
    set_alpha_to_one=False, prediction_type="epsilon"
)


def small_clip_text_config(hidden_size: int, **overrides: Any) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs of a small CLIP text encoder over the real CLIP vocabulary
    (2 layers, 4 heads, 77 positions, SD's special token ids): the mini model's, at width 64,
    and the tests' random tiny encoders' (``tests/tiny_models.py``)."""
    return (
        dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=hidden_size,
        )
        | overrides
    )


def make_pipeline(text_encoder: Any, unet: Any, vae: Any):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=clip_tokenizer(),
        unet=unet.eval(),
        scheduler=DDIMScheduler(**SCHEDULER_KW),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _config_dict(module: Any) -> dict[str, Any]:
    cfg = module.config
    if hasattr(cfg, "to_dict"):  # transformers config
        d = cfg.to_dict()
    else:  # diffusers FrozenDict
        d = dict(cfg)
    return json.loads(json.dumps(d, default=list))


def save_single_file(pipe: Any, path: str | Path, extra: dict[str, str] | None = None) -> Path:
    """All weights in one float16 safetensors file; component configs in the header metadata."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"format": "dpagg-minimodel-v1"}
    for name in ("text_encoder", "unet", "vae"):
        module = getattr(pipe, name)
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                v = v.to(torch.float16)
            tensors[f"{name}.{k}"] = v.contiguous()
        meta[f"{name}_config"] = json.dumps(_config_dict(module))
    meta["scheduler"] = json.dumps(SCHEDULER_KW)
    meta.update(extra or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def pipeline_from_single_file(path: str | Path):
    """Rebuild the float32 pipeline from ``save_single_file``'s output."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != "dpagg-minimodel-v1":
            raise ValueError(f"{path} is not a dpagg mini-model file (format={meta.get('format')})")
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open API

    def part(prefix: str) -> dict[str, torch.Tensor]:
        n = len(prefix) + 1
        return {
            k[n:]: (v.float() if v.is_floating_point() else v)
            for k, v in tensors.items()
            if k.startswith(prefix + ".")
        }

    te_cfg = json.loads(meta["text_encoder_config"])
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    te.load_state_dict(part("text_encoder"), strict=False)  # position_ids buffer may be absent
    unet_cfg = {k: v for k, v in json.loads(meta["unet_config"]).items() if not k.startswith("_")}
    unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.load_state_dict(part("unet"), strict=True)
    vae_cfg = {k: v for k, v in json.loads(meta["vae_config"]).items() if not k.startswith("_")}
    vae = AutoencoderKL.from_config(vae_cfg)
    vae.load_state_dict(part("vae"), strict=True)
    missing = set(te.state_dict()) - set(part("text_encoder"))
    if any("position_ids" not in m for m in missing):
        raise ValueError(f"{path}: text encoder weights missing: {sorted(missing)[:5]}")
    return make_pipeline(te, unet, vae)


def folder_from_single_file(path: str | Path, folder: str | Path) -> Path:
    """Write the diffusers folder for a single-file mini model (atomically: temp dir + rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_single_file(path)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        pipe.save_pretrained(str(tmp))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_file() -> Path:
    """The single-file checkpoint: ``$DPAGG_MINIMODEL_DIR/minimodel.safetensors`` if that variable
    is set, else the one shipped in the package."""
    override = os.environ.get(MODEL_DIR_ENV)
    path = Path(override) / MODEL_FILE.name if override else MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: "
            + (
                f"unset {MODEL_DIR_ENV} or train the mini model there"
                if override
                else "the package is incomplete; reinstall dpagg or run "
                "`python -m bench.minimodel.train` from the repository"
            )
        )
    return path


def load_minimodel(cache_dir: str | Path | None = None) -> Path:
    """A diffusers folder holding the mini model, rebuilt from the single file once (keyed by
    the file's hash) under ``dpagg_core.paths.data_dir()/minimodel`` unless ``cache_dir`` is
    given. Loadable with ``dpagg_core.training.models.load_pipeline(path)``."""
    src = model_file()
    if cache_dir is None:
        cache_dir = data_dir() / "minimodel"
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    folder = Path(cache_dir) / f"minimodel-{digest}"
    if not (folder / "model_index.json").is_file():
        folder_from_single_file(src, folder)
    return folder

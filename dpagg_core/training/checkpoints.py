"""Single-file Stable Diffusion checkpoints (the original LDM / A1111 / ComfyUI layout): reading
them safely (:func:`read_checkpoint`), detecting the model family (:func:`detect_family`; cheaply
from a ``.safetensors`` header with :func:`checkpoint_family`) and the prediction type
(:func:`detect_prediction_type`), and converting the weights to diffusers components
(:func:`load_components_from_ldm`, strict: every parameter must come from the checkpoint).
:mod:`dpagg_core.training.models` builds the pipeline from them.

Family detection (single file) uses the text-encoder keys, cross-checked with diffusers'
``infer_diffusers_model_type`` to refuse inpainting / upscaler / refiner / EDM checkpoints, which
textual inversion does not support:

=========================================================  ========
``cond_stage_model.transformer.text_model.*`` (CLIP-L)       ``sd1``
``cond_stage_model.model.*`` (OpenCLIP-H)                    ``sd2``
``conditioner.embedders.0.transformer.*`` + ``.1.model.*``   ``sdxl``
=========================================================  ========

Prediction type (what the UNet predicts; the TI loss needs it) is resolved in this order:

1. the ``prediction_type`` argument (CLI ``--prediction-type epsilon|v_prediction``);
2. a diffusers folder's ``scheduler/scheduler_config.json``;
3. a sidecar ``<checkpoint stem>.yaml`` (A1111 convention) with ``parameterization: "v"``;
4. a ``v_pred`` key in the checkpoint (the ComfyUI / A1111 marker used by v-pred SDXL models);
5. SD2 only: ComfyUI's heuristic - the std of ``output_blocks.11.1.transformer_blocks.0.norm1.bias``
   is > 0.09 for the 768-v models and below for the 512-base (epsilon) ones; without that key the
   768-v default (as diffusers does) with a warning;
6. ``epsilon`` otherwise (SD1.x, SDXL base).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from dpagg_core.errors import DpaggError
from dpagg_core.training.tokenizer import clip_tokenizer

log = logging.getLogger(__name__)

# Text-encoder prefixes in original-layout checkpoints.
_CLIP_L = "cond_stage_model.transformer."
_OPEN_CLIP_H = "cond_stage_model.model."
_XL_L = "conditioner.embedders.0.transformer."
_XL_G = "conditioner.embedders.1.model."
_UNET = "model.diffusion_model."
_SD2_VPRED_PROBE = _UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
# Expected cross-attention width per family (checked only against the shipped configs).
_CONTEXT_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
_UNSUPPORTED_TYPES = {
    "inpainting": "an SD1 inpainting model (9-channel UNet)",
    "inpainting_v2": "an SD2 inpainting model (9-channel UNet)",
    "xl_inpaint": "an SDXL inpainting model (9-channel UNet)",
    "xl_refiner": "an SDXL refiner (no CLIP-L text encoder)",
    "upscale": "the SD x4 upscaler",
    "playground-v2-5": "a Playground v2.5 (EDM) model",
}


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a single-file checkpoint, with clear errors for unreadable files."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            raise DpaggError(
                f"cannot read checkpoint {path}: {e}. The file is truncated (an interrupted "
                "download?) or not a safetensors file; download it again."
            ) from e
    elif suffix in (".ckpt", ".pt", ".pth"):
        try:
            sd = torch.load(
                str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as e:
            raise DpaggError(
                f"cannot read checkpoint {path} safely: it contains Python objects besides tensors "
                f"({str(e).splitlines()[0]}). Convert it to .safetensors with a tool you trust."
            ) from e
        except Exception as e:
            raise DpaggError(
                f"cannot read checkpoint {path}: {e}. The file is truncated or corrupt; "
                "download it again."
            ) from e
    else:
        raise DpaggError(
            f"{path}: unsupported model file type {suffix!r}. Pass a .safetensors or .ckpt "
            "checkpoint, or a diffusers folder containing model_index.json."
        )
    while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict):  # training checkpoints may carry counters beside the tensors
        sd = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not isinstance(sd, dict) or not sd:
        raise DpaggError(f"{path} does not hold a state dict of tensors; it is not a checkpoint.")
    # Old CLIP-L layouts lack the ``text_model.`` level that diffusers' converter expects.
    flat = [k for k in sd if k.startswith(_CLIP_L) and not k.startswith(_CLIP_L + "text_model.")]
    for key in flat:
        sd[_CLIP_L + "text_model." + key[len(_CLIP_L) :]] = sd.pop(key)
    return sd


def detect_family(checkpoint: dict[str, torch.Tensor], *, name: str = "checkpoint") -> str:
    """'sd1' | 'sd2' | 'sdxl' from the keys of an original-layout checkpoint, else DpaggError."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    keys = checkpoint.keys()

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if not has(_UNET):
        if any(k.startswith(("lora_", "lora_unet")) or ".lora_" in k for k in keys):
            kind = "a LoRA"
        elif has("first_stage_model.") or has("encoder.down."):
            kind = "a VAE"
        elif "emb_params" in keys or "clip_l" in keys or "string_to_param" in keys:
            kind = "a textual-inversion embedding"
        elif has("down_blocks.") or has("unet."):
            kind = "a diffusers-format weights file (load the whole diffusers folder instead)"
        else:
            kind = "not a Stable Diffusion checkpoint"
        raise DpaggError(
            f"{name} has no UNet weights (model.diffusion_model.*): it looks like {kind}. "
            "Pass a full SD1.x / SD2.x / SDXL checkpoint."
        )
    model_type = infer_diffusers_model_type(checkpoint)
    if model_type in _UNSUPPORTED_TYPES:
        raise DpaggError(
            f"{name} is {_UNSUPPORTED_TYPES[model_type]}, which dpagg does not support: "
            "use a base SD1.x, SD2.x or SDXL text-to-image checkpoint."
        )
    if has(_XL_L) and has(_XL_G):
        return "sdxl"
    if has(_OPEN_CLIP_H):
        return "sd2"
    if has(_CLIP_L + "text_model."):
        return "sd1"
    raise DpaggError(
        f"{name}: unknown model family (no SD1 CLIP-L, SD2 OpenCLIP-H or SDXL text-encoder "
        "weights found). dpagg supports SD1.x, SD2.x and SDXL base checkpoints; a checkpoint "
        "without text encoder cannot be used for textual inversion."
    )


def _sidecar_parameterization(path: Path) -> tuple[str, Path] | None:
    for yaml_path in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if not yaml_path.is_file():
            continue
        try:
            cfg = yaml.safe_load(yaml_path.read_text(encoding="utf-8")) or {}
        except Exception as e:
            raise DpaggError(
                f"cannot parse the model config {yaml_path} ({e}); fix or remove it, or pass "
                "--prediction-type epsilon|v_prediction"
            ) from e
        params = ((cfg.get("model") or {}).get("params") or {}) if isinstance(cfg, dict) else {}
        pt = "v_prediction" if params.get("parameterization") == "v" else "epsilon"
        return pt, yaml_path
    return None


def detect_prediction_type(
    checkpoint: dict[str, torch.Tensor], family: str, path: Path | None = None
) -> tuple[str, str]:
    """(prediction_type, how it was decided) for a single-file checkpoint; see module docs."""
    if path is not None:
        sidecar = _sidecar_parameterization(path)
        if sidecar is not None:
            return sidecar[0], f"sidecar {sidecar[1].name}"
    if "v_pred" in checkpoint:
        return "v_prediction", "checkpoint key 'v_pred'"
    if family == "sd2":
        probe = checkpoint.get(_SD2_VPRED_PROBE)
        if probe is not None:
            std = float(torch.std(probe.float(), unbiased=False))
            pt = "v_prediction" if std > 0.09 else "epsilon"
            return pt, f"SD2 heuristic (norm1.bias std {std:.3f} vs 0.09)"
        return "v_prediction", "SD2 default (768-v); pass --prediction-type if this is a 512-base"
    return "epsilon", f"{family} default"


def _layers_per_block(unet_sd: dict[str, torch.Tensor], n_levels: int) -> int:
    """Resnets per UNet level, from the number of ``input_blocks`` (= levels * (L + 1))."""
    ids = {int(m[1]) for k in unet_sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
    count = max(ids) + 1 if ids else 0
    if count == 0 or count % n_levels or count // n_levels < 2:
        raise DpaggError(
            f"the checkpoint UNet has {count} input blocks, which does not fit a {n_levels}-level "
            "Stable Diffusion UNet; pass config= a diffusers folder describing this architecture."
        )
    return count // n_levels - 1


def _block_out_channels(
    unet_sd: dict[str, torch.Tensor], n_levels: int, layers: int
) -> list[int] | None:
    """Channels of each UNet level, from its first resnet's output conv (as ComfyUI reads a
    checkpoint's UNet), so a shrunk UNet (merges, test models) loads as ComfyUI loads it; None
    when the keys are not the LDM layout (then the config's widths stand)."""
    out = []
    for level in range(n_levels):
        w = unet_sd.get(f"input_blocks.{1 + level * (layers + 1)}.0.out_layers.3.weight")
        if w is None or w.dim() != 4:
            return None
        out.append(int(w.shape[0]))
    return out


def _fix_meta_buffers(model: torch.nn.Module) -> None:
    for mod_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":  # CLIP's non-persistent arange buffer
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(buf.shape).clone()
            else:  # pragma: no cover - no other non-persistent buffer in SD components
                raise DpaggError(f"cannot initialise buffer {mod_name}.{name}")


def _assign(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    what: str,
    ckpt: str,
    dtype: torch.dtype,
) -> None:
    """Load ``state`` into a meta-initialised ``model``; every parameter must come from it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise DpaggError(
            f"{ckpt}: {len(missing)} {what} weights are missing from the checkpoint (e.g. "
            f"{', '.join(missing[:3])}). The checkpoint does not match the {what} architecture "
            "(pruned or distilled model?); pass config= a diffusers folder that describes it."
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        k = bad[0]
        raise DpaggError(
            f"{ckpt}: {what} weight {k} has shape {tuple(state[k].shape)} in the checkpoint but "
            f"{tuple(own[k].shape)} in the config; the checkpoint is another architecture. "
            "Pass --family or config= a diffusers folder that matches it."
        )
    unexpected = [k for k in state if k not in own]
    if unexpected:
        log.debug("%s: ignoring %d unused %s keys", ckpt, len(unexpected), what)
    cast = {k: state[k].to(dtype) if state[k].is_floating_point() else state[k] for k in own}
    model.load_state_dict(cast, strict=True, assign=True)
    _fix_meta_buffers(model)


def load_components_from_ldm(
    checkpoint: dict[str, torch.Tensor],
    cfg: Path,
    family: str,
    dtype: torch.dtype,
    name: str,
    check_context: bool,
) -> dict[str, Any]:
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((cfg / "model_index.json").read_text())
    parts: dict[str, Any] = {}

    # UNet: layers_per_block is read from the checkpoint (some merges/test models use fewer).
    unet_cfg = dict(UNet2DConditionModel.load_config(cfg, subfolder="unet", local_files_only=True))
    unet_keys = {k[len(_UNET) :]: v for k, v in checkpoint.items() if k.startswith(_UNET)}
    if check_context:
        probe = next((v for k, v in unet_keys.items() if k.endswith("attn2.to_k.weight")), None)
        if probe is not None and probe.shape[-1] != _CONTEXT_DIM[family]:
            raise DpaggError(
                f"{name}: UNet cross-attention width {probe.shape[-1]} does not match {family} "
                f"({_CONTEXT_DIM[family]}); pass config= a diffusers folder matching this model."
            )
    layers = _layers_per_block(unet_keys, len(unet_cfg["block_out_channels"]))
    if layers != unet_cfg["layers_per_block"]:
        log.info(
            "%s: UNet has %d resnets per level (config %d)",
            name,
            layers,
            unet_cfg["layers_per_block"],
        )
        unet_cfg["layers_per_block"] = layers
    widths = _block_out_channels(unet_keys, len(unet_cfg["block_out_channels"]), layers)
    if widths is not None and widths != list(unet_cfg["block_out_channels"]):
        log.info(
            "%s: UNet level widths %s (config %s)", name, widths, unet_cfg["block_out_channels"]
        )
        unet_cfg["block_out_channels"] = widths
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    try:
        converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    except (KeyError, IndexError, ValueError) as e:
        raise DpaggError(
            f"{name}: cannot convert the UNet weights ({e!r}); corrupt checkpoint?"
        ) from e
    _assign(unet, converted, "UNet", name, dtype)
    parts["unet"] = unet

    vae_cfg = AutoencoderKL.load_config(cfg, subfolder="vae", local_files_only=True)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(vae_cfg)
    if not any(k.startswith(("first_stage_model.", "vae.")) for k in checkpoint):
        raise DpaggError(f"{name} has no VAE weights (first_stage_model.*); use a full checkpoint.")
    try:
        converted = convert_ldm_vae_checkpoint(checkpoint, dict(vae.config))
    except (KeyError, IndexError, ValueError) as e:
        raise DpaggError(
            f"{name}: cannot convert the VAE weights ({e!r}); corrupt checkpoint?"
        ) from e
    _assign(vae, converted, "VAE", name, dtype)
    parts["vae"] = vae

    encoders = [("text_encoder", CLIPTextModel)]
    if family == "sdxl":
        encoders.append(("text_encoder_2", CLIPTextModelWithProjection))
    for sub, cls in encoders:
        te_cfg = CLIPTextConfig.from_pretrained(cfg, subfolder=sub, local_files_only=True)
        with torch.device("meta"):
            te = cls(te_cfg)
        if family == "sd2":
            sd = convert_open_clip_checkpoint(te, checkpoint, prefix=_OPEN_CLIP_H)
        elif sub == "text_encoder_2":
            sd = convert_open_clip_checkpoint(te, checkpoint, prefix=_XL_G)
        else:
            sd = convert_ldm_clip_checkpoint(checkpoint)
        if not hasattr(te, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        else:
            sd = {
                (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
                for k, v in sd.items()
            }
        _assign(te, sd, f"{sub} ({cls.__name__})", name, dtype)
        parts[sub] = te

    from transformers import CLIPTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        if sub not in index:
            continue
        folder = cfg / sub
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            parts[sub] = CLIPTokenizer.from_pretrained(cfg, subfolder=sub, local_files_only=True)
        else:  # a user config folder without tokenizer files: the standard CLIP vocabulary
            parts[sub] = clip_tokenizer()
    sched_cls = getattr(diffusers, index["scheduler"][1])
    parts["scheduler"] = sched_cls.from_pretrained(
        cfg, subfolder="scheduler", local_files_only=True
    )

    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if key in parts:
            parts[key].eval()
    return parts


def checkpoint_family(path: str | os.PathLike[str]) -> str | None:
    """'sd1' | 'sd2' | 'sdxl' of a ``.safetensors`` checkpoint from its header and the few tensors
    :func:`detect_family` reads (no full load); None when it cannot tell cheaply (other file
    types, diffusers folders: a run checks after loading). DpaggError for an unreadable file or
    an unsupported model, as :func:`detect_family` says."""
    p = Path(path)
    if p.suffix.lower() not in (".safetensors", ".sft") or not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return detect_family(_LazyTensors(f), name=str(p))
    except DpaggError:
        raise
    except Exception as exc:
        raise DpaggError(
            f"cannot read checkpoint {p}: {exc}; the file is truncated or not a checkpoint"
        ) from exc


class _LazyTensors(Mapping):
    """A safetensors file as a read-only mapping that loads a tensor only when it is read."""

    def __init__(self, handle: Any) -> None:
        self._f = handle
        self._keys = list(handle.keys())
        self._set = set(self._keys)

    def __getitem__(self, key: str) -> Any:
        if key not in self._set:
            raise KeyError(key)
        return self._f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

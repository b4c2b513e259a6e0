"""Offline loading of the user's Stable Diffusion model (SD1.x, SD2.x, SDXL).

``load_pipeline(path)`` accepts

* a diffusers folder (``model_index.json`` beside ``unet/``, ``vae/``, ``text_encoder/`` ...), or
* a single-file checkpoint in the original (LDM / A1111 / ComfyUI) layout: ``.safetensors``
  (preferred) or ``.ckpt`` / ``.pt`` / ``.pth`` (read with ``torch.load(weights_only=True)``, so a
  malicious pickle cannot run code).

Nothing is ever downloaded. The diffusers component configs for each family ship inside the
package (``dpagg_core/configs/{sd1,sd2,sd2-base,sdxl}``, written from the public SD1.5, SD2.1,
SD2.1-base and SDXL-base-1.0 configs); the tokenizer vocabulary/merges are generated at load time
from the CLIP BPE file shipped with ``clip-anytorch`` (:mod:`dpagg_core.training.tokenizer`) into a
per-process temporary copy of the config (:func:`config_dir`). Single-file weights are converted
with diffusers' own LDM -> diffusers mapping functions (``diffusers.loaders.single_file_utils``,
the ones ``from_single_file`` uses) and loaded *strictly*: a parameter the checkpoint does not
provide is an error, never silently left at its random initialisation. The models are built with
their parameters on the ``meta`` device and the checkpoint tensors assigned in, so no time is
spent on a random initialisation (diffusers without ``accelerate`` would spend ~25 s per SD UNet).

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

``base_model_id`` identifies the text encoder(s) an embedding is trained against: the first 16 hex
digits of sha256 over each encoder's token-embedding table (rows 0..49407, the CLIP BPE
vocabulary, so placeholder tokens added later for TI do not change it), rounded to float16, C
order, little-endian, encoders in the order of the released file (``clip_l`` then ``clip_g`` for
SDXL), each preceded by its shape. It is identical for the same weights however they are loaded
(folder or single file, float32 or float16). It is public: it fingerprints a public base model, not
the private images.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from dpagg_core.errors import DpaggError
from dpagg_core.privacy.identity import fingerprint as fingerprint  # re-exported (its home)

log = logging.getLogger(__name__)

FAMILIES = ("sd1", "sd2", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SHIPPED_CONFIGS = ("sd1", "sd2", "sd2-base", "sdxl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")
BASE_VOCAB_ROWS = 49408  # CLIP BPE vocabulary; rows added for TI placeholders come after it

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


@dataclass
class LoadedModel:
    """A loaded pipeline plus the public facts the rest of dpagg needs about it."""

    pipe: Any  # diffusers StableDiffusionPipeline | StableDiffusionXLPipeline
    family: str  # 'sd1' | 'sd2' | 'sdxl'
    prediction_type: str  # 'epsilon' | 'v_prediction'
    base_model_id: str
    prediction_type_source: str = ""  # how prediction_type was decided (for the log / report)
    source: str = ""  # 'diffusers' | 'single_file'
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Shipped configs
# ---------------------------------------------------------------------------------------------

_config_lock = threading.Lock()
_config_cache: dict[str, Path] = {}
_config_root: Path | None = None


def _shipped(name: str) -> Any:
    if name not in SHIPPED_CONFIGS:
        raise DpaggError(
            f"unknown model config {name!r}: choose one of {', '.join(SHIPPED_CONFIGS)}"
        )
    return resources.files("dpagg_core") / "configs" / name


def _write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt of the CLIP BPE (same 49408 tokens as every SD text encoder)."""
    from dpagg_core.training.tokenizer import _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


def write_config(name: str, dest: str | os.PathLike) -> Path:
    """Write the complete diffusers config folder ``name`` (no weights) to ``dest``.

    Usable as ``config=`` of diffusers' ``from_single_file`` by anyone, offline.
    """
    src = _shipped(name)
    dest = Path(dest)

    def copy(node: Any, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for child in node.iterdir():
            if child.is_dir():
                copy(child, out / child.name)
            elif child.name.endswith(".json"):
                (out / child.name).write_bytes(child.read_bytes())

    copy(src, dest)
    for sub in ("tokenizer", "tokenizer_2"):
        if (dest / sub).is_dir():
            _write_tokenizer_files(dest / sub)
    return dest


def config_dir(name: str) -> Path:
    """A complete, read-only-by-convention copy of shipped config ``name`` for this process.

    Created once per process in a temporary folder (removed at exit), so nothing is written to
    the user's home and no stale cache can outlive an upgrade.
    """
    global _config_root
    with _config_lock:
        if name not in _config_cache:
            if _config_root is None:
                _config_root = Path(tempfile.mkdtemp(prefix="dpagg-configs-"))
                atexit.register(shutil.rmtree, _config_root, True)
            _config_cache[name] = write_config(name, _config_root / name)
        return _config_cache[name]


# ---------------------------------------------------------------------------------------------
# Offline guard
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Make any hub access inside the block fail instead of reaching the network.

    Sets the ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` / ``DIFFUSERS_OFFLINE`` variables and
    the already-imported ``huggingface_hub.constants.HF_HUB_OFFLINE`` flag, restoring both after.
    Every call below also passes ``local_files_only=True``; this is the second belt.
    """
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE")
    saved = {n: os.environ.get(n) for n in names}
    import huggingface_hub.constants as hub_constants  # a dependency of transformers/diffusers

    saved_flag = hub_constants.HF_HUB_OFFLINE
    try:
        for n in names:
            os.environ[n] = "1"
        hub_constants.HF_HUB_OFFLINE = True
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
        hub_constants.HF_HUB_OFFLINE = saved_flag


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _token_table(text_encoder: Any) -> torch.Tensor:
    return text_encoder.get_input_embeddings().weight


def base_model_id_of(text_encoders: Sequence[Any]) -> str:
    """``base_model_id`` of a model from its text encoder(s) (``clip_l`` first for SDXL)."""
    return fingerprint([_token_table(te) for te in text_encoders], rows=BASE_VOCAB_ROWS)


def _text_encoders(pipe: Any) -> list[Any]:
    encs = [pipe.text_encoder]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encs.append(pipe.text_encoder_2)
    return encs


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints
# ---------------------------------------------------------------------------------------------


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
        import pickle
        import zipfile

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
            import yaml

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


def _load_components_from_ldm(
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

    from dpagg_core.training.tokenizer import clip_tokenizer

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


def _with_prediction_type(scheduler: Any, prediction_type: str) -> Any:
    if scheduler.config.get("prediction_type") == prediction_type:
        return scheduler
    return type(scheduler).from_config(scheduler.config, prediction_type=prediction_type)


def _check_choice(value: str | None, allowed: Sequence[str], param: str) -> None:
    if value is not None and value not in allowed:
        raise DpaggError(f"{param}={value!r} is not supported: choose one of {', '.join(allowed)}")


def _load_single_file(
    path: Path,
    family: str | None,
    prediction_type: str | None,
    dtype: torch.dtype,
    config: str | os.PathLike | None,
) -> LoadedModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    checkpoint = read_checkpoint(path)
    detected = detect_family(checkpoint, name=str(path))
    if family is not None and family != detected:
        raise DpaggError(
            f"family={family!r} contradicts {path}, whose weights are {detected}; "
            f"drop the family argument or pass the right checkpoint."
        )
    family = detected
    if prediction_type is not None:
        pt, pt_source = prediction_type, "argument"
    else:
        pt, pt_source = detect_prediction_type(checkpoint, family, path)
    notes: list[str] = []
    if "default (768-v)" in pt_source:
        notes.append(f"{path.name}: assuming v-prediction (SD2 768-v); {pt_source}")
        log.warning(notes[-1])
    if config is not None:
        cfg = Path(config)
        if not (cfg / "model_index.json").is_file():
            raise DpaggError(f"config={cfg} is not a diffusers folder (no model_index.json)")
    else:
        cfg = config_dir("sd2-base" if family == "sd2" and pt == "epsilon" else family)
    parts = _load_components_from_ldm(checkpoint, cfg, family, dtype, str(path), config is None)
    del checkpoint
    parts["scheduler"] = _with_prediction_type(parts["scheduler"], pt)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    return LoadedModel(
        pipe, family, pt, base_model_id_of(_text_encoders(pipe)), pt_source, "single_file", notes
    )


def _load_diffusers_folder(
    path: Path, family: str | None, prediction_type: str | None, dtype: torch.dtype
) -> LoadedModel:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise DpaggError(
            f"{path / 'model_index.json'} is unreadable ({e}); repair the folder"
        ) from e
    missing = [
        c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not index.get(c)
    ]
    if missing:
        raise DpaggError(
            f"{path} is a {index.get('_class_name', 'diffusers')} folder without "
            f"{', '.join(missing)}: dpagg needs a Stable Diffusion (SD1.x/SD2.x/SDXL) pipeline."
        )
    is_xl = bool(index.get("text_encoder_2") and index["text_encoder_2"][0])
    try:
        te_cfg = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DpaggError(f"{path / 'text_encoder' / 'config.json'} is missing or unreadable") from e
    hidden = te_cfg.get("hidden_size")
    if is_xl:
        detected = "sdxl"
    elif hidden == 1024:
        detected = "sd2"
    elif hidden == 768 or family is None:
        detected = "sd1"
    else:  # a non-standard width (tiny test models): trust the caller's single-encoder family
        detected = family
    if family is not None and family != detected:
        raise DpaggError(
            f"family={family!r} contradicts {path}, which is an {detected} pipeline; "
            "drop the family argument."
        )
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True}
    if not is_xl:
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with warnings.catch_warnings():  # diffusers >= 0.36 renames torch_dtype -> dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_pretrained(str(path), **kwargs)
    except DpaggError:
        raise
    except Exception as e:
        raise DpaggError(f"cannot load the diffusers folder {path}: {e}") from e
    if prediction_type is not None:
        pt, src = prediction_type, "argument"
    else:
        pt, src = pipe.scheduler.config.get("prediction_type", "epsilon"), "scheduler config"
    if pt not in PREDICTION_TYPES:
        raise DpaggError(f"{path}: unsupported prediction_type {pt!r} in the scheduler config")
    pipe.scheduler = _with_prediction_type(pipe.scheduler, pt)
    return LoadedModel(pipe, detected, pt, base_model_id_of(_text_encoders(pipe)), src, "diffusers")


def load_pipeline(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
    config: str | os.PathLike | None = None,
) -> LoadedModel:
    """Load a Stable Diffusion model from a diffusers folder or single-file checkpoint, offline.

    ``family`` ('sd1' | 'sd2' | 'sdxl') is detected; passing it only double-checks.
    ``prediction_type`` overrides detection (needed for SD2 checkpoints without a sidecar yaml
    if the heuristic is wrong). ``config`` replaces the shipped config folder for a single-file
    checkpoint whose architecture differs from the public SD configs.
    """
    _check_choice(family, FAMILIES, "family")
    _check_choice(prediction_type, PREDICTION_TYPES, "prediction_type")
    if not isinstance(dtype, torch.dtype):
        raise DpaggError(f"dtype={dtype!r} must be a torch.dtype such as torch.float32")
    p = Path(path).expanduser()
    if not p.exists():
        raise DpaggError(
            f"model path {p} does not exist; pass a checkpoint file or diffusers folder"
        )
    with offline():
        if p.is_dir():
            if not (p / "model_index.json").is_file():
                found = sorted(
                    x.name for x in p.iterdir() if x.suffix.lower() in SINGLE_FILE_SUFFIXES
                )
                hint = (
                    f" (it holds {', '.join(found[:3])}: pass one of those files)" if found else ""
                )
                raise DpaggError(
                    f"{p} is a folder without model_index.json, not a diffusers model{hint}"
                )
            if config is not None:
                raise DpaggError(
                    f"config= only applies to single-file checkpoints; {p} is a diffusers folder "
                    "that carries its own configs (drop config=)"
                )
            loaded = _load_diffusers_folder(p, family, prediction_type, dtype)
        else:
            loaded = _load_single_file(p, family, prediction_type, dtype, config)
    try:
        loaded.pipe.to(device)
    except Exception as e:
        raise DpaggError(f"cannot move the model to device={device!r}: {e}") from e
    log.info(
        "loaded %s (%s, %s from %s, base_model_id %s)",
        p.name,
        loaded.family,
        loaded.prediction_type,
        loaded.prediction_type_source,
        loaded.base_model_id,
    )
    return loaded

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

Single-file checkpoints are read, their family and prediction type detected and their weights
converted to diffusers' layout in :mod:`dpagg_core.training.checkpoints` (its docstring has the
detection rules); this module builds the pipeline around them and loads diffusers folders.

``base_model_id`` identifies the text encoder(s) an embedding is trained against: the first 16 hex
digits of sha256 over each encoder's token-embedding table (rows 0..49407, the CLIP BPE
vocabulary, so placeholder tokens added later for TI do not change it), rounded to float16, C
order, little-endian, encoders in the order of the released file (``clip_l`` then ``clip_g`` for
SDXL), each preceded by its shape. It is identical for the same weights however they are loaded
(folder or single file, float32 or float16) and in whichever host loads it: ComfyUI's nodes compute
it with :func:`base_model_id_of` on the (unpatched) token tables of ComfyUI's CLIP, so a basis or
public-embeddings file made by the CLI is accepted against sets trained in ComfyUI. It names the
embedding space (what a basis, a centre or a public-embeddings file must match), not every
weight: a re-run of a trained release is keyed by a digest of all the weights besides
(``pipeline.weights_digest``; in ComfyUI the model as patched). It is public: it fingerprints a
public base model, not the private images.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import huggingface_hub.constants as hub_constants  # a dependency of transformers/diffusers
import torch

from dpagg_core import options
from dpagg_core.errors import DpaggError
from dpagg_core.privacy.identity import fingerprint as fingerprint  # re-exported (its home)
from dpagg_core.training.checkpoints import (  # the detect_* and read_checkpoint of old
    detect_family,
    detect_prediction_type,
    load_components_from_ldm,
    read_checkpoint,
)
from dpagg_core.training.tokenizer import _vocab_and_merges

log = logging.getLogger(__name__)

FAMILIES = options.TI_FAMILIES
PREDICTION_TYPES = options.PREDICTION_TYPES
SHIPPED_CONFIGS = ("sd1", "sd2", "sd2-base", "sdxl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth")
BASE_VOCAB_ROWS = 49408  # CLIP BPE vocabulary; rows added for TI placeholders come after it


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
    if isinstance(text_encoder, torch.Tensor):
        return text_encoder
    return text_encoder.get_input_embeddings().weight


def base_model_id_of(text_encoders: Sequence[Any]) -> str:
    """``base_model_id`` of a model from its text encoder(s) or their token-embedding tables
    (``clip_l`` first for SDXL): the ONE model id of every host (module docstring). The CLI and
    the WebUI call it on diffusers' encoders, the ComfyUI nodes on the tables of ComfyUI's CLIP
    (``nodes/comfy_backend.py``), ``basis_builders.basis_from_token_table`` on the tables it is
    given: the same function on the same tensors, so a ``dpagg public-basis`` file fits sets
    trained in ComfyUI on the same checkpoint."""
    return fingerprint([_token_table(te) for te in text_encoders], rows=BASE_VOCAB_ROWS)


def _text_encoders(pipe: Any) -> list[Any]:
    encs = [pipe.text_encoder]
    if getattr(pipe, "text_encoder_2", None) is not None:
        encs.append(pipe.text_encoder_2)
    return encs


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
    parts = load_components_from_ldm(checkpoint, cfg, family, dtype, str(path), config is None)
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

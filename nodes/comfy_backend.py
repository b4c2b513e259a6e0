"""``dpagg_core.training.ti.TIBackend`` on ComfyUI's own MODEL / CLIP / VAE objects.

Per-Image TI trains through the very models Load Checkpoint produced (no second copy loaded
through diffusers), the way ``comfy_extras/nodes_train.py`` trains LoRAs inside ComfyUI:

* ComfyUI executes nodes under ``torch.inference_mode()`` and loads weights there, so they are
  *inference tensors*, which autograd may not save for backward. The node runs the trainer under
  ``torch.inference_mode(False)`` and this backend trains on **clones** of the MODEL and CLIP
  patchers carrying an identity weight wrapper on every weight and bias: with a wrapper present,
  ``comfy.ops.cast_bias_weight`` hands each layer a fresh (normal) copy of its weight per
  forward, which autograd may keep. Weights stay frozen (``requires_grad=False``); only the
  placeholder vectors get gradients.
* ``comfy.clip_model.CLIPLayer.forward`` adds residuals in place (``x += ...``), which breaks
  backward through the text encoder. Those forwards are replaced **per instance** by an
  out-of-place copy for the duration of training (checked against the original on a probe input
  first) and restored afterwards.
* Models are loaded with ``comfy.model_management.load_models_gpu``; SDXL's ``y`` (pooled text
  embedding plus size/crop ids) comes from the model's own ``extra_conds``.
* Prompts are tokenized by ComfyUI's own tokenizer, exactly as ``embedding:<name>`` prompts are
  at inference (same start/end/padding, same slot positions): the tokenizer's embedding loader is
  pointed, per instance and only while tokenizing a template, at placeholder rows, which are then
  swapped for the trainable vectors.

Everything this backend changes on ComfyUI's objects is recorded before and put back in
``close()`` (or on leaving the ``with`` block): per-module ``weight_function``/``bias_function``
lists, instance ``forward`` overrides, ``training`` flags, parameters' ``requires_grad``, CLIP
layer options, and the tokenizers' attributes; the loaded clones are unloaded through ComfyUI's
model manager. ``tests/test_comfyui_integration.py`` checks the originals are left as they were.

Privacy (docs/privacy.md invariant 1): every method treats batch rows independently. Prompts are
encoded one image at a time; the UNet, CLIP and VAE use per-sample LayerNorm/GroupNorm and
attention within a sample, and SDXL's ``y`` row b is built from pooled row b only.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpagg_core.errors import DpaggError
from dpagg_core.training.models import base_model_id_of
from dpagg_core.training.ti import PLACEHOLDER, LatentDist

log = logging.getLogger(__name__)

SLOT_NAME = "dpagg_placeholder_slot"
_MISSING = object()
_CLIP_OPTION_ATTRS = ("layer", "layer_idx", "return_projected_pooled")
_MODULE_ATTRS = ("forward", "weight_function", "bias_function")


def _identity(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: returns the per-forward copy ``cast_bias_weight`` already made."""
    return weight


def _clip_layer_forward(self: Any, x: torch.Tensor, mask=None, optimized_attention=None):
    """``comfy.clip_model.CLIPLayer.forward`` with out-of-place residual adds (autograd-safe)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    x = x + self.mlp(self.layer_norm2(x))
    return x


def _checkpointed(forward):
    def fwd(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return fwd


@dataclass
class ComfyCond:
    """Conditioning from ``encode_prompts``: cross-attention states ``[B, 77, dim]``, pooled
    output ``[B, d]`` (SDXL's ``y`` needs it; ``None`` otherwise) and the training size."""

    cross_attn: torch.Tensor
    pooled: torch.Tensor | None
    image_size: int


class _Encoder:
    """One text encoder of the CLIP object: its tokenizer, model and released-file key."""

    def __init__(self, token_key: str, tokenizer: Any, model: Any, file_key: str) -> None:
        self.token_key = token_key  # key in ComfyUI's token dict ('l', 'g', 'h')
        self.tokenizer = tokenizer  # comfy.sd1_clip.SDTokenizer
        self.model = model  # comfy.sd1_clip.SDClipModel
        self.file_key = file_key  # 'emb_params' | 'clip_l' | 'clip_g'
        self.width = int(model.transformer.get_input_embeddings().weight.shape[1])


def _base_weight(patcher: Any, root: torch.nn.Module, param: torch.Tensor) -> torch.Tensor:
    """``param`` of ``root`` (the patcher's model) as the checkpoint holds it: ComfyUI patches
    weights in place when it loads a model with patches (a LoRA), keeping the original in the
    patcher's backup; ``ModelPatcher.get_key_patches`` returns that original."""
    name = next((n for n, p in root.named_parameters() if p is param), None)
    get = getattr(patcher, "get_key_patches", None)
    if name is None or get is None:
        return param
    entry = get(filter_prefix=name).get(name)
    return entry[0][0] if entry else param


def base_model_id(clip: Any, encoders: list[_Encoder]) -> str:
    """The model's public id: ``models.base_model_id_of`` of the unpatched token-embedding
    tables of ComfyUI's CLIP (``clip_l`` then ``clip_g`` for SDXL), the very function and tensors
    the CLI and the WebUI use on the same checkpoint (float16 rounding, first 49408 rows), so a
    ``dpagg public-basis`` / public-embeddings file made by the CLI fits sets trained here. Needs
    no model load."""
    root = clip.cond_stage_model
    tables = [
        _base_weight(clip.patcher, root, e.model.transformer.get_input_embeddings().weight)
        for e in encoders
    ]
    return base_model_id_of(tables)


def checkpoint_tables(model: Any, clip: Any) -> tuple[str, str, dict[str, torch.Tensor]]:
    """``(model_family, base_model_id, {file_key: token-embedding table})`` of a ComfyUI
    checkpoint, for a PUBLIC basis from its token table (``basis_builders.
    basis_from_token_table``, the Public Basis node). The id is :func:`base_model_id`, the one
    Per-Image TI and the CLI record, so the basis fits embeddings trained on the same checkpoint
    and is refused for any other."""
    import comfy.model_management

    if model is None or clip is None:
        raise DpaggError(
            "Public Basis from the token table needs the MODEL and CLIP of the checkpoint that "
            "Per-Image TI trains on (its id names both): connect Load Checkpoint's outputs"
        )
    encoders = ComfyTIBackend._find_encoders(clip)
    widths = [e.width for e in encoders]
    family = {1: {768: "sd1", 1024: "sd2"}}.get(len(widths), {}).get(widths[0], "")
    family = "sdxl" if len(widths) == 2 else family
    if not family:
        raise DpaggError(f"SD1.x, SD2.x and SDXL text encoders only; this CLIP has {widths}")
    comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
    tables = {
        e.file_key: e.model.transformer.get_input_embeddings().weight.detach() for e in encoders
    }
    return family, base_model_id(clip, encoders), tables


class ComfyTIBackend:
    """Frozen ComfyUI MODEL/CLIP/VAE behind the TI backend protocol; use as a context manager
    (inside ``torch.inference_mode(False)``) so that ComfyUI's objects are restored on exit."""

    def __init__(self, model: Any, clip: Any, vae: Any) -> None:
        import comfy.model_sampling

        if model is None or clip is None or vae is None:
            raise DpaggError(
                "Per-Image TI needs MODEL, CLIP and VAE: connect all three outputs of Load "
                "Checkpoint (this checkpoint may lack a text encoder or VAE)"
            )
        self._model, self._clip, self._vae = model, clip, vae
        self._encoders = self._find_encoders(clip)
        widths = [e.width for e in self._encoders]
        if len(self._encoders) == 2:
            self.model_family = "sdxl"
        elif widths == [768]:
            self.model_family = "sd1"
        elif widths == [1024]:
            self.model_family = "sd2"
        else:
            raise DpaggError(
                f"Per-Image TI supports SD1.x, SD2.x and SDXL checkpoints; this CLIP has a text "
                f"encoder of width {widths}. Fix: load an SD1/SD2/SDXL checkpoint"
            )
        self.encoder_keys = tuple(e.file_key for e in self._encoders)
        self.embedding_dims = {e.file_key: e.width for e in self._encoders}
        ms = model.get_model_object("model_sampling")
        msm = comfy.model_sampling
        discrete = isinstance(ms, msm.ModelSamplingDiscrete) and not isinstance(
            ms, (msm.ModelSamplingDiscreteEDM, msm.StableCascadeSampling)
        )
        if discrete and isinstance(ms, msm.V_PREDICTION) and not isinstance(ms, msm.EDM):
            self.prediction_type = "v_prediction"
        elif (
            discrete and isinstance(ms, msm.EPS) and not isinstance(ms, (msm.V_PREDICTION, msm.X0))
        ):
            self.prediction_type = "epsilon"
        else:
            raise DpaggError(
                f"Per-Image TI supports epsilon and v-prediction models with a discrete noise "
                f"schedule; this MODEL samples with {type(ms).__name__}. Fix: use an SD1/SD2/SDXL "
                "checkpoint without a sampling override (e.g. remove a ModelSamplingDiscrete node "
                "set to another mode)"
            )
        self.num_train_timesteps = int(ms.sigmas.shape[0])
        self.device = torch.device(model.load_device)
        dtype = model.model.get_dtype()
        self.dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.base_model_id = base_model_id(clip, self._encoders)  # no load needed
        self._saved: list[tuple[Any, str, Any, Any]] = []
        self._saved_grad: list[tuple[torch.Tensor, bool]] = []
        self._saved_training: list[tuple[Any, bool]] = []
        self._patchers: list[Any] = []
        self._prepared = False
        self._token_cache: dict[str, dict[str, list[list[tuple[Any, float]]]]] = {}

    # -- discovery ---------------------------------------------------------------------------

    @staticmethod
    def _find_encoders(clip: Any) -> list[_Encoder]:
        import comfy.sd1_clip

        csm, tok = clip.cond_stage_model, clip.tokenizer
        if hasattr(csm, "clip_l") and hasattr(csm, "clip_g"):  # SDXL base
            pairs = [("l", "clip_l", "clip_l"), ("g", "clip_g", "clip_g")]
        elif isinstance(getattr(csm, "clip", None), str) and hasattr(csm, csm.clip):
            pairs = [(csm.clip_name, csm.clip, "emb_params")]
        else:
            raise DpaggError(
                f"Per-Image TI supports SD1.x, SD2.x and SDXL text encoders, not "
                f"{type(csm).__name__}. Fix: load an SD1/SD2/SDXL checkpoint"
            )
        out = []
        for token_key, attr, file_key in pairs:
            model = getattr(csm, attr)
            sub = getattr(tok, attr, None)
            if not isinstance(model, comfy.sd1_clip.SDClipModel) or not isinstance(
                sub, comfy.sd1_clip.SDTokenizer
            ):
                raise DpaggError(
                    f"unsupported CLIP layout ({type(csm).__name__}.{attr}); Per-Image TI needs "
                    "an SD1/SD2/SDXL CLIP"
                )
            out.append(_Encoder(token_key, sub, model, file_key))
        return out

    # -- bookkeeping: record and restore everything we touch -------------------------------

    def _save_attr(self, obj: Any, name: str) -> None:
        value = obj.__dict__.get(name, _MISSING)
        contents = list(value) if isinstance(value, list) else None
        self._saved.append((obj, name, value, contents))

    def _snapshot(self) -> None:
        roots = [self._model.model, self._clip.cond_stage_model]
        for root in roots:
            for m in root.modules():
                for name in _MODULE_ATTRS:
                    self._save_attr(m, name)
                for name in _CLIP_OPTION_ATTRS:
                    if name in m.__dict__:
                        self._save_attr(m, name)
                self._saved_training.append((m, m.training))
            for p in root.parameters():
                self._saved_grad.append((p, p.requires_grad))
        for enc in self._encoders:
            for name in ("embedding_directory", "_try_get_embedding"):
                self._save_attr(enc.tokenizer, name)

    def _restore(self) -> None:
        for obj, name, value, contents in reversed(self._saved):
            if value is _MISSING:
                obj.__dict__.pop(name, None)
            else:
                if contents is not None:
                    value[:] = contents
                obj.__dict__[name] = value
        for m, training in self._saved_training:
            m.training = training
        # requires_grad=True may only be set on inference tensors inside inference mode.
        with torch.inference_mode():
            for p, flag in self._saved_grad:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        self._saved.clear()
        self._saved_grad.clear()
        self._saved_training.clear()

    # -- protocol ----------------------------------------------------------------------------

    def prepare(self, *, gradient_checkpointing: bool) -> None:
        import comfy.clip_model
        import comfy.model_management

        if torch.is_inference_mode_enabled():
            raise DpaggError(
                "internal: ComfyTIBackend.prepare must run under torch.inference_mode(False)"
            )
        if self._prepared:
            return
        self._snapshot()
        self._prepared = True
        mp = self._model.clone()
        cp = self._clip.patcher.clone()
        for patcher in (mp, cp):
            for name, m in patcher.model.named_modules():
                if not hasattr(m, "weight_function"):
                    continue
                if getattr(m, "weight", None) is not None:
                    patcher.add_weight_wrapper(f"{name}.weight", _identity)
                if getattr(m, "bias", None) is not None:
                    patcher.add_weight_wrapper(f"{name}.bias", _identity)
        self._patchers = [mp, cp]
        for root in (self._model.model, self._clip.cond_stage_model):
            root.eval()
            root.requires_grad_(False)
        layers = [
            m
            for m in self._clip.cond_stage_model.modules()
            if isinstance(m, comfy.clip_model.CLIPLayer)
        ]
        if layers:
            self._check_layer_patch(layers[0])
        for layer in layers:
            layer.forward = types.MethodType(_clip_layer_forward, layer)
        if gradient_checkpointing:
            for child in self._top_children(self._model.model.diffusion_model):
                child.forward = _checkpointed(child.forward)
        comfy.model_management.load_models_gpu(self._patchers, force_full_load=True)
        for enc in self._encoders:
            enc.model.reset_clip_options()
            if self._clip.layer_idx is not None:
                enc.model.set_clip_options({"layer": self._clip.layer_idx})

    @staticmethod
    def _top_children(model: torch.nn.Module) -> list[torch.nn.Module]:
        """Highest descendants with their own forward (as comfy_extras/nodes_train.py does)."""
        out: list[torch.nn.Module] = []
        for child in model.children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                out += ComfyTIBackend._top_children(child)
            else:
                out.append(child)
        return out

    @staticmethod
    def _check_layer_patch(layer: Any) -> None:
        """The out-of-place forward must compute exactly what ComfyUI's in-place one does."""
        from comfy.ldm.modules.attention import optimized_attention_for_device

        p = next(layer.parameters())
        width = int(layer.layer_norm1.weight.shape[0])
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((1, 3, width), generator=gen).to(p.device, torch.float32)
        attn = optimized_attention_for_device(x.device, mask=False, small_input=True)
        with torch.no_grad():
            want = type(layer).forward(layer, x.clone(), None, attn)
            got = _clip_layer_forward(layer, x.clone(), None, attn)
        if not torch.allclose(want, got, rtol=1e-5, atol=1e-5):
            raise DpaggError(
                "this ComfyUI version's CLIPLayer.forward differs from the one dpagg patches for "
                "training; update the dpagg node pack"
            )

    def initializer_embedding(self, text: str) -> dict[str, torch.Tensor]:
        out = {}
        for enc in self._encoders:
            ids = enc.tokenizer.tokenizer(text)["input_ids"][1:-1]
            weight = enc.model.transformer.get_input_embeddings().weight
            out[enc.file_key] = weight[torch.tensor(ids, dtype=torch.long, device=weight.device)]
            out[enc.file_key] = out[enc.file_key].detach().to("cpu", torch.float32).clone()
        return out

    def encode_images(self, images: torch.Tensor) -> LatentDist:
        import comfy.model_management

        pixels = ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0).movedim(1, -1)
        latents = self._vae.encode(pixels)  # per-sample encoder (GroupNorm), posterior mode
        mean = self._model.model.process_latent_in(latents.to(self.device, torch.float32))
        # The VAE load may have evicted our clones on a small GPU: make sure they are loaded.
        comfy.model_management.load_models_gpu(self._patchers, force_full_load=True)
        return LatentDist(mean=mean, std=None)

    def _template_tokens(self, template: str, vectors: int) -> dict[str, list]:
        """ComfyUI's tokens for ``template`` with ``vectors`` placeholder slots at '{}'.

        Tokenized by the CLIP's own tokenizer as the prompt ``... embedding:<slot> ...``, while
        each sub-tokenizer's embedding loader returns marker rows (instance override, restored
        at once). Marker entries are replaced by ``_Slot(j)``."""
        key = f"{vectors}\x00{template}"
        if key in self._token_cache:
            return self._token_cache[key]
        text = template.replace(PLACEHOLDER, f"embedding:{SLOT_NAME}")
        saved = []
        try:
            for enc in self._encoders:
                tok = enc.tokenizer
                saved.append((tok, dict(tok.__dict__)))
                marker = torch.zeros((vectors, tok.embedding_size))

                def fake(name: str, _m=marker):
                    if name.split()[0] != SLOT_NAME:
                        return None, ""
                    return _m, " ".join(name.split()[1:])

                tok._try_get_embedding = fake
                if tok.embedding_directory is None:
                    tok.embedding_directory = []
            tokens = self._clip.tokenize(text)
        finally:
            for tok, d in saved:
                tok.__dict__.clear()
                tok.__dict__.update(d)
        out: dict[str, list] = {}
        for enc in self._encoders:
            chunks = tokens[enc.token_key]
            slots = 0
            new_chunks = []
            for chunk in chunks:
                row = []
                for item in chunk:
                    t, w = item[0], item[1]
                    if isinstance(t, torch.Tensor):
                        row.append((_Slot(slots), w))
                        slots += 1
                    else:
                        row.append((t, w))
                new_chunks.append(row)
            if slots != vectors:
                raise DpaggError(
                    f"template {template!r}: ComfyUI's tokenizer placed {slots} placeholder slots,"
                    f" expected {vectors}"
                )
            out[enc.token_key] = new_chunks
        self._token_cache[key] = out
        return out

    def encode_prompts(
        self, templates: Sequence[str], vectors: dict[str, torch.Tensor], *, image_size: int
    ) -> ComfyCond:
        v = int(next(iter(vectors.values())).shape[1])
        conds, pooled = [], []
        csm = self._clip.cond_stage_model
        for b, template in enumerate(templates):  # one prompt (one image) at a time
            toks = self._template_tokens(template, v)
            filled = {}
            for enc in self._encoders:
                rows = vectors[enc.file_key][b]
                filled[enc.token_key] = [
                    [(rows[t.index] if isinstance(t, _Slot) else t, w) for t, w in chunk]
                    for chunk in toks[enc.token_key]
                ]
            out = csm.encode_token_weights(filled)
            conds.append(out[0])
            pooled.append(out[1])
        cond = torch.cat(conds, 0).to(self.device)
        pool = None if any(p is None for p in pooled) else torch.cat(pooled, 0).to(self.device)
        return ComfyCond(cross_attn=cond, pooled=pool, image_size=int(image_size))

    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        ms = self._model.model.model_sampling
        return ms.sigmas.to(timesteps.device)[timesteps].to(torch.float32)

    def add_noise(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """ComfyUI's k-diffusion space: ``x = x0 + sigma_t * eps`` (the UNet sees
        ``x / sqrt(1 + sigma^2)``, i.e. DDPM's ``x_t``)."""
        sigma = self._sigmas(timesteps)
        return self._model.model.model_sampling.noise_scaling(sigma, noise, latents)

    def training_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        s = self._sigmas(timesteps).view(-1, *([1] * (latents.ndim - 1)))
        sd = float(self._model.model.model_sampling.sigma_data)
        return (noise * sd**2 - latents * s) / (sd * torch.sqrt(s**2 + sd**2))

    def predict(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: ComfyCond
    ) -> torch.Tensor:
        base = self._model.model
        sigma = self._sigmas(timesteps)
        size = cond.image_size
        extra = base.extra_conds(
            cross_attn=cond.cross_attn,
            pooled_output=cond.pooled,
            width=size,
            height=size,
            target_width=size,
            target_height=size,
            device=self.device,
            noise=noisy,
            latent_image=noisy,
        )
        if "c_concat" in extra:
            raise DpaggError(
                "Per-Image TI does not support inpainting/instruct checkpoints (they need an "
                "image to concatenate); use a plain SD1/SD2/SDXL checkpoint"
            )
        kwargs = {k: c.cond for k, c in extra.items()}
        denoised = base.apply_model(noisy, sigma, **kwargs)
        s = sigma.view(-1, *([1] * (noisy.ndim - 1)))
        if self.prediction_type == "epsilon":  # denoised = x - eps * sigma
            return (noisy - denoised) / s
        sd = float(base.model_sampling.sigma_data)
        # denoised = x sd^2/(s^2+sd^2) - v s sd / sqrt(s^2+sd^2)
        return (noisy * sd**2 / (s**2 + sd**2) - denoised) * torch.sqrt(s**2 + sd**2) / (s * sd)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Unload our patcher clones and put every touched attribute back."""
        import comfy.model_management as mm

        try:
            for i in reversed(range(len(mm.current_loaded_models))):
                loaded = mm.current_loaded_models[i]
                if any(loaded.model is p for p in self._patchers):
                    mm.current_loaded_models.pop(i)
                    loaded.model_unload(unpatch_weights=True)
        finally:
            self._patchers = []
            self._token_cache.clear()
            if self._prepared:
                self._restore()
                self._prepared = False

    def __enter__(self) -> ComfyTIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class _Slot:
    """Position j of the placeholder's vectors in a tokenized template."""

    index: int
